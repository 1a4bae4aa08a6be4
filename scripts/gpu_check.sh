#!/usr/bin/env bash
# The CUDA target's check on a machine with an NVIDIA GPU: every shipped model on CUDA against
# the reference interpreter, the MiniLM golden check, and Kiln's CUDA kernels and MiniLM timed
# against PyTorch (eager and torch.compile) on the same GPU, in one run.
#
#   scripts/gpu_check.sh              on a machine with the GPU, the build toolchain (`make deps`)
#                                     and PyTorch: builds, runs tests/compiled.rs's CUDA half and
#                                     the MiniLM golden check on the GPU, then packs and runs the
#                                     pack below. Results in target/gpu_check/results/.
#   scripts/gpu_check.sh pack [DIR]   here, with the toolchain and no GPU: compiles a check pack
#                                     into DIR (default target/gpu_check/pack, about 60 MB):
#                                     the runtime-only checker (runtime/examples/check_pack.rs),
#                                     CUDA artifacts of every shipped model (small configs, with
#                                     inputs and the interpreter's outputs) and the benchmark
#                                     artifacts (weights synthesized on the GPU machine); then
#                                     the same pack as one archive, DIR.tar.xz (about 35 MB).
#   scripts/gpu_check.sh golden [DIR] here: the MiniLM golden check's own pack (default
#                                     target/gpu_check/golden, about 41 MB as DIR.tar.xz): the
#                                     real all-MiniLM-L6-v2 weights in the BERT encoder against
#                                     sentence-transformers' embeddings (tests/golden/minilm).
#                                     It travels in a device call of its own, beside the pack's.
#   scripts/gpu_check.sh run [DIR]    on the GPU machine, which needs neither Rust nor LLVM:
#                                     runs the pack and PyTorch (bench/cuda/peers.py), writes
#                                     results.md and the JSON beside it into ${OUT:-DIR/results}.
#                                     DIR may be the archive: it is unpacked beside itself first
#                                     (with Python's tarfile where tar or xz is missing).
#
# KILN_CUDA_ARCH (default sm_90) is the architecture the pack is compiled for. `run` gives each
# part (a conformance set, the benchmarks) at most KILN_CHECK_LIMIT seconds (default 240). To
# try the pack's plumbing on a machine without a GPU: KILN_PACK_TARGET=host for `pack` and
# KILN_CHECK_DEVICE=cpu (with a larger KILN_CHECK_LIMIT: a CPU is slower) for `run`.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR_ARG="${2:+$(realpath -m "$2")}"
REPO="$(dirname "$SCRIPT_DIR")"
ARCH="${KILN_CUDA_ARCH:-sm_90}"
PACK_TARGET="${KILN_PACK_TARGET:-cuda:$ARCH}"
DEVICE="${KILN_CHECK_DEVICE:-cuda}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"

say() { echo "== gpu_check: $*" >&2; }

# name | spec | overrides: every shipped model, at sizes that keep the pack small (a device
# call carries at most 64 MiB with the repository, so the pack travels as its archive: `pack`
# says the sizes of both).
CONFORMANCE=(
    "mlp|models/mlp.ron|"
    "lstm|models/lstm.ron|"
    "resnet_block|models/resnet_block.ron|"
    "bert_encoder|models/bert_encoder.ron|--set vocab=1000 --set layers=1 --set max_positions=128"
    "seed_transformer|models/seed_transformer.ron|--set layers=1 --set d_model=128 --set heads=4 --set d_ff=512"
    "gpt2|models/gpt2.ron|--set vocab=2000 --set layers=1 --set d=256 --set heads=4 --set ctx=256"
    "matmul_shapes|tests/gpu_check/matmul_shapes.ron|"
    # Whole 128×128 tiles, B copied 4 stages deep (results reduced to row mean squares and
    # column maxima).
    "large_tiles|tests/gpu_check/large_tiles.ron|"
    # A decoder block written out by hand (RMS norms, rotary positions, a masked-fill causal
    # mask, a SwiGLU feed-forward), as the optimizer's variant test has it: one causal
    # attention, two RMS norms, a product with a SiLU epilogue.
    "decoder_block_written|compiler/opt/tests/variants/llama_block_written_out.ron|--set b=2 --set s=100 --set h=4 --set hd=32 --set dm=128 --set ffn=256"
    # Norms written over the channels of [N, C, H, W]: each one kernel of rows side by side.
    "channel_norms|tests/gpu_check/channel_norms.ron|"
    # One artifact for every batch and length, run at sizes no tile divides (the hints).
    "bert_dynamic|models/bert_encoder.ron|--set vocab=1000 --set layers=1 --set max_positions=128 --set hidden=128 --set heads=4 --set ffn=512 --set batch=Dyn(min:1,max:4,hint:3) --set seq=Dyn(min:1,max:128,hint:37)"
    "gpt2_dynamic|models/gpt2.ron|--set vocab=2000 --set layers=1 --set d=128 --set heads=4 --set ctx=256 --set batch=Dyn(min:1,max:4,hint:1) --set seq=Dyn(min:8,max:256,hint:200,multiple_of:8)"
    "mlp_dynamic|models/mlp.ron|--set batch=Dyn(min:1,max:64,hint:8)"
    "lstm_dynamic|models/lstm.ron|--set batch=Dyn(min:1,max:8,hint:4) --set steps=5"
    "seed_transformer_dynamic|models/seed_transformer.ron|--set batch=Dyn(min:1,max:4,hint:2) --set seq=Dyn(min:1,max:64,hint:32) --set layers=1 --set d_model=32 --set heads=2 --set d_ff=64 --set input_dim=50"
    "resnet_block_dynamic|models/resnet_block.ron|--set batch=Dyn(min:1,max:4,hint:2)"
    "channel_norms_dynamic|tests/gpu_check/channel_norms.ron|--set c=48 --set hw=16 --set n=Dyn(min:1,max:4,hint:3)"
    # Pooling and softmax along a run-time sequence and over an image of run-time size.
    "pooling_dynamic|tests/gpu_check/pooling.ron|--set batch=Dyn(min:1,max:4,hint:3) --set seq=Dyn(min:1,max:64,hint:23) --set hw=Dyn(min:1,max:16,hint:7)"
    # Convolution and pooling over a sequence and over an image of run-time size.
    "windows_dynamic|tests/gpu_check/windows.ron|--set batch=Dyn(min:1,max:3,hint:2) --set seq=Dyn(min:1,max:64,hint:23) --set hw=Dyn(min:1,max:16,hint:7)"
    # A decoder step joining its key/value cache to the new tokens' along the sequence.
    "kv_cache_dynamic|tests/gpu_check/kv_cache.ron|--set past=Dyn(min:1,max:96,hint:40) --set seq=Dyn(min:1,max:16,hint:1)"
)

# name | shapes: the conformance models with sizes set at run time run again at each of these
# shapes (`NAME=V,NAME=V`, space-separated) besides their hints: 1 and each bound's maximum
# (gpt2's logits at batch 4 × seq 256 would take 8 MB, so its maxima are taken one at a time).
# The interpreter evaluates each at that static shape with the same seed, so with the same
# parameters, into the artifact's runs/, which check_pack compares run by run.
DYNAMIC_RUNS=(
    "bert_dynamic|batch=1,seq=1 batch=2,seq=16 batch=4,seq=128"
    "gpt2_dynamic|batch=1,seq=8 batch=4,seq=8 batch=1,seq=256"
    "mlp_dynamic|batch=1 batch=13 batch=64"
    "lstm_dynamic|batch=1 batch=3 batch=8"
    "seed_transformer_dynamic|batch=1,seq=1 batch=3,seq=17 batch=4,seq=64"
    "resnet_block_dynamic|batch=1 batch=3 batch=4"
    "channel_norms_dynamic|n=1 n=4"
    "pooling_dynamic|batch=1,seq=1,hw=1 batch=4,seq=64,hw=16 batch=2,seq=9,hw=3"
    "windows_dynamic|batch=1,seq=1,hw=1 batch=3,seq=64,hw=16 batch=2,seq=10,hw=4"
    "kv_cache_dynamic|past=1,seq=1 past=96,seq=16 past=33,seq=5"
)
# name | spec | tolerance: the math functions GPU kernels compute themselves, in the
# conformance group, each checked at a few ulp of its dtype (its tolerance.txt).
CONFORMANCE_MATH=(
    "math_f32|tests/gpu_check/math_f32.ron|4e-6"
    "math_f64|tests/gpu_check/math_f64.ron|1e-13"
)
# On tensor cores: with operands rounded to TF32 (--precision tf32), checked at TF32's stated
# tolerance, and split in two TF32 parts (--precision tf32x3), checked at f32's. Heads of 32,
# so attention runs on tensor cores too.
CONFORMANCE_TF32=(
    "mlp|models/mlp.ron|"
    "bert_encoder|models/bert_encoder.ron|--set vocab=1000 --set layers=1 --set max_positions=128 --set hidden=128 --set heads=4 --set ffn=512"
    "gpt2|models/gpt2.ron|--set vocab=1000 --set layers=1 --set d=128 --set heads=4 --set ctx=128"
    # Tensor-core plans take 64×64 tiles here, as at the default m (the large tiles need
    # outputs too big for the pack; the emulated Vulkan test runs them).
    "matmul_shapes|tests/gpu_check/matmul_shapes.ron|--set m=1152"
    # 128×128 tiles in 4 stages of dynamic shared memory, copied asynchronously (results
    # reduced to row mean squares and column maxima).
    "large_tiles|tests/gpu_check/large_tiles.ron|"
    # The encoder and the operand pairings on sm_90a: TF32 warpgroup products, rounded in place
    # (k = 32, as matmul_shapes: TF32's rounding alone reaches the tolerance at k = 64).
    "bert_wgmma_encoder|models/bert_encoder.ron|--set vocab=1000 --set layers=1 --set max_positions=128 --set hidden=128 --set heads=4 --set ffn=512"
    "operands_wgmma_f32|tests/gpu_check/wgmma_operands.ron|--set k=32"
)
CONFORMANCE_TF32X3=(
    "mlp|models/mlp.ron|"
    "bert_encoder|models/bert_encoder.ron|--set vocab=1000 --set layers=1 --set max_positions=128 --set hidden=128 --set heads=4 --set ffn=512"
    # The same encoder compiled for sm_90a (a `_wgmma_` name): its linear layers (`x·Wᵀ`, both
    # operands along k) as TF32 warpgroup products of tiles split in place, three per k step.
    "bert_wgmma_encoder|models/bert_encoder.ron|--set vocab=1000 --set layers=1 --set max_positions=128 --set hidden=128 --set heads=4 --set ffn=512"
    # Every operand pairing in f32 (an `_f32` name: the f16 spec's tensors renamed), compiled
    # for sm_90a: the pairing along k as warpgroup products, the others on mma.sync.
    "operands_wgmma_f32|tests/gpu_check/wgmma_operands.ron|"
    # Attention compiled for sm_90a: warpgroup products of split operands (the keys' rows
    # interleaved, the value tile transposed), two warpgroups, heads of 64, 4 tiles of 64 keys.
    "attention_wgmma_seq256|bench/cuda/attention.ron|--set batch=1 --set heads=2 --set seq=256"
    # The same compiled for sm_90: mma.sync products of split operands, the weights kept in
    # registers (the keys' rows interleaved), heads of 64 as in the benchmark.
    "attention_seq256|bench/cuda/attention.ron|--set batch=1 --set heads=2 --set seq=256"
    "gpt2|models/gpt2.ron|--set vocab=1000 --set layers=1 --set d=128 --set heads=4 --set ctx=128"
    # Tensor-core plans take 64×64 tiles here, as at the default m (the large tiles need
    # outputs too big for the pack; the emulated Vulkan test runs them).
    "matmul_shapes|tests/gpu_check/matmul_shapes.ron|--set m=1152"
)
# 16-bit tensors on the tensor cores' f16 and bf16 products (the bf16 twin is the f16 spec with
# its dtype renamed), checked at their stated tolerances (1e-2 and 5e-2).
CONFORMANCE_HALF=(
    "half_block_f16|tests/gpu_check/half_block.ron|"
    "half_block_bf16|tests/gpu_check/half_block.ron|"
    # The same block compiled for sm_90a: its attention (heads of 32, 100 queries, keys past
    # the last whole tile) as warpgroup products.
    "half_block_wgmma_f16|tests/gpu_check/half_block.ron|"
    "half_block_wgmma_bf16|tests/gpu_check/half_block.ron|"
    # Attention as warpgroup products over whole key tiles, copied asynchronously: two
    # warpgroups of 64 queries, heads of 64, 2 tiles of 128 keys in 3 stages.
    "attention_wgmma_f16|bench/cuda/attention.ron|--set batch=1 --set heads=2 --set seq=256"
    # The same with each step's products awaited (`_awaited_`: --products-in-flight 0).
    "attention_wgmma_awaited_f16|bench/cuda/attention.ron|--set batch=1 --set heads=2 --set seq=256"
    # 128×128 tiles in 4 stages of dynamic shared memory, copied asynchronously, read with
    # `ldmatrix` (B transposed as it is read).
    "large_tiles_f16|tests/gpu_check/large_tiles.ron|--set k=128"
    # Compiled for sm_90a (a `_wgmma_` name) in 128×256 tiles (`_t256_`: --matmul-tile
    # 128x256): warpgroup products of A k-major and B row-major, 4 stages, one group of
    # products in flight.
    "large_tiles_wgmma_t256_f16|tests/gpu_check/large_tiles.ron|--set m=512 --set n=256 --set k=256"
    "large_tiles_wgmma_t256_bf16|tests/gpu_check/large_tiles.ron|--set m=512 --set n=256 --set k=256"
    # A and B each contiguous along either axis: the four ways the instruction takes them.
    "operands_wgmma_f16|tests/gpu_check/wgmma_operands.ron|"
    # The same with each step's products awaited (`_awaited_`: --products-in-flight 0).
    "operands_wgmma_awaited_f16|tests/gpu_check/wgmma_operands.ron|"
)
# name | spec | overrides: training artifacts (`--train`), whose `train_step` runs three times
# on the GPU and is compared with the same spec's step compiled for this CPU (last outputs and
# every state tensor).
TRAIN=(
    "mlp_train|models/mlp.ron|"
)
# name | spec | overrides: the benchmarks (weights are synthesized on the GPU machine); a
# `_tf32` name compiles with --precision tf32, an `_f16` or `_bf16` one has its f32 tensors in
# that dtype, a `_registers` one compiles with --no-async-copies (the same workload's tiles
# through registers, beside the cp.async pipelines), a `_k64_` one with --attention-key-tile 64,
# a `_per_query` one with --attention-per-query (f32 attention one query per invocation, beside
# the register tiles), a `_square` one with --matmul-tile 128x128 (f32 products in square tiles
# only, beside the plan's 128×96 ones); a `_wgmma_` one is compiled for sm_90a (16-bit
# products and attention, TF32 products of operands along k and TF32 attention, as warpgroup
# products, beside sm_90's mma.sync), a `_t256_` or
# `_t128_` one with --matmul-tile 128x256 or 128x128, an `_awaited_` one with
# --products-in-flight 0 (each step's warpgroup products awaited before the next step's; in
# attention, no tile's value products beside the next tile's softmax). A `_dynamic` one has
# dynamic sizes (check_pack runs it at their hints, the shape of its static twin: one artifact
# for every size against one for that size).
BENCH=(
    "matmul|bench/cuda/matmul.ron|"
    "matmul_registers|bench/cuda/matmul.ron|"
    "matmul_tf32|bench/cuda/matmul.ron|"
    "attention|bench/cuda/attention.ron|"
    "attention_per_query|bench/cuda/attention.ron|"
    "attention_tf32|bench/cuda/attention.ron|"
    "matmul_tf32x3|bench/cuda/matmul.ron|"
    "attention_tf32x3|bench/cuda/attention.ron|"
    "matmul_f16|bench/cuda/matmul.ron|"
    "matmul_bf16|bench/cuda/matmul.ron|"
    "matmul_wgmma_f16|bench/cuda/matmul.ron|"
    "matmul_wgmma_bf16|bench/cuda/matmul.ron|"
    "matmul_wgmma_t128_f16|bench/cuda/matmul.ron|"
    "matmul_wgmma_awaited_f16|bench/cuda/matmul.ron|"
    "attention_f16|bench/cuda/attention.ron|"
    "attention_bf16|bench/cuda/attention.ron|"
    "attention_k64_f16|bench/cuda/attention.ron|"
    "attention_wgmma_f16|bench/cuda/attention.ron|"
    "attention_wgmma_bf16|bench/cuda/attention.ron|"
    "attention_wgmma_k64_f16|bench/cuda/attention.ron|"
    "attention_wgmma_awaited_f16|bench/cuda/attention.ron|"
    "minilm_b1|models/bert_encoder.ron|--set batch=1"
    "minilm_b8|models/bert_encoder.ron|--set batch=8"
    "minilm_b64|models/bert_encoder.ron|--set batch=64"
    "minilm_b64_registers|models/bert_encoder.ron|--set batch=64"
    "minilm_b64_per_query|models/bert_encoder.ron|--set batch=64"
    "minilm_b64_square|models/bert_encoder.ron|--set batch=64"
    "minilm_b64_tf32|models/bert_encoder.ron|--set batch=64"
    "minilm_b64_tf32x3|models/bert_encoder.ron|--set batch=64"
    "minilm_b64_wgmma_tf32|models/bert_encoder.ron|--set batch=64"
    "minilm_b64_wgmma_tf32x3|models/bert_encoder.ron|--set batch=64"
    "matmul_nt_tf32x3|bench/cuda/matmul_nt.ron|"
    "matmul_nt_wgmma_tf32|bench/cuda/matmul_nt.ron|"
    "matmul_nt_wgmma_tf32x3|bench/cuda/matmul_nt.ron|"
    "matmul_nt_wgmma_t128_tf32x3|bench/cuda/matmul_nt.ron|"
    "minilm_b64_wgmma_t128_tf32x3|models/bert_encoder.ron|--set batch=64"
    "attention_wgmma_tf32|bench/cuda/attention.ron|"
    "attention_wgmma_tf32x3|bench/cuda/attention.ron|"
    "attention_wgmma_awaited_tf32x3|bench/cuda/attention.ron|"
    "minilm_b64_dynamic|models/bert_encoder.ron|--set batch=Dyn(min:1,max:64,hint:64) --set seq=Dyn(min:1,max:128,hint:128)"
    "minilm_b1_dynamic|models/bert_encoder.ron|--set batch=1 --set seq=Dyn(min:1,max:256,hint:128)"
)

# `--precision tf32` (or `tf32x3`) for a name ending in _tf32 (or _tf32x3), `--no-async-copies`
# for one ending in _registers, `--attention-key-tile 64` for one with _k64_,
# `--attention-per-query` for one ending in _per_query, `--matmul-tile 128x128` for one ending
# in _square, `--matmul-tile 128x256` (128x128) for one with _t256_ (_t128_),
# `--products-in-flight 0` for one with _awaited_ (CUDA packs only); a name may ask for several.
flags_of() {
    if [[ "$PACK_TARGET" != cuda* ]]; then return; fi
    local name="$1" flags=()
    case "$name" in
        *_tf32) flags+=(--precision tf32) ;;
        *_tf32x3) flags+=(--precision tf32x3) ;;
    esac
    [[ "$name" == *_registers ]] && flags+=(--no-async-copies)
    [[ "$name" == *_k64_* ]] && flags+=(--attention-key-tile 64)
    [[ "$name" == *_per_query ]] && flags+=(--attention-per-query)
    [[ "$name" == *_square || "$name" == *_t128_* ]] && flags+=(--matmul-tile 128x128)
    [[ "$name" == *_t256_* ]] && flags+=(--matmul-tile 128x256)
    [[ "$name" == *_awaited_* ]] && flags+=(--products-in-flight 0)
    echo "${flags[*]}"
}

# The target NAME is compiled for: cuda:sm_90a for a `_wgmma_` name in an sm_90 pack (the
# architecture-specific target, whose 16-bit products are warpgroup products), else the pack's.
target_of() {
    if [[ "$PACK_TARGET" == cuda:sm_90 && "$1" == *_wgmma_* ]]; then
        echo "cuda:sm_90a"
    else
        echo "$PACK_TARGET"
    fi
}

# SPEC itself, or for a NAME ending in _f16, _bf16 or _f32 a copy in SCRATCH with its f32 and
# f16 tensors in that dtype.
spec_for() {
    local name="$1" spec="$2" scratch="$3" dtype
    case "$name" in
        *_bf16) dtype=bf16 ;;
        *_f16) dtype=f16 ;;
        *_f32) dtype=f32 ;;
        *) echo "$spec"; return ;;
    esac
    sed -E "s/\b(f32|f16)\b/$dtype/g" "$spec" >"$scratch/$name.ron"
    echo "$scratch/$name.ron"
}

# Compiles SPEC with the overrides SET (and any further compile flags) into the artifact ART
# for the pack's target, beside its inputs and the interpreter's outputs. Uses pack's $kiln.
conformance_artifact() {
    local art="$1" spec="$2" set="$3"
    shift 3
    # shellcheck disable=SC2086
    "$kiln" compile "$spec" $set --seed 0 --target "$(target_of "$(basename "$art" .kiln)")" "$@" -o "$art" >&2
    # shellcheck disable=SC2086
    "$kiln" eval "$spec" $set --seed 0 --save-inputs "$art/inputs.safetensors" \
        -o "$art/expected.safetensors" >/dev/null
}

# The CONFORMANCE entry named NAME (DYNAMIC_RUNS names its models so).
conformance_entry() {
    local conf
    for conf in "${CONFORMANCE[@]}"; do
        if [[ "${conf%%|*}" == "$1" ]]; then
            echo "$conf"
            return 0
        fi
    done
    say "no conformance model is named $1"
    return 1
}

# Writes the runs of the artifact ART, compiled from SPEC with the overrides SET, at each shape
# of SHAPES (as DYNAMIC_RUNS gives them) into ART/runs/. Uses the caller's $kiln.
dynamic_runs() {
    local art="$1" spec="$2" set="$3" shapes="$4" shape pair tag pairs
    for shape in $shapes; do
        local sets=()
        IFS=',' read -ra pairs <<<"$shape"
        for pair in "${pairs[@]}"; do sets+=(--set "$pair"); done
        # `batch1_seq16` for `batch=1,seq=16` (a path with `=` would read as `--input NAME=FILE`).
        tag="${shape//,/_}"
        tag="${tag//=/}"
        mkdir -p "$art/runs/$tag"
        # shellcheck disable=SC2086
        "$kiln" eval "$spec" $set "${sets[@]}" --seed 0 --save-inputs "$art/runs/$tag/inputs.safetensors" \
            -o "$art/runs/$tag/expected.safetensors" >/dev/null
    done
}

# Builds kiln and the checker (release), fetches ptxas, and starts the pack DIR afresh with the
# checker and this script in it.
start_pack() {
    local dir="$1"
    cd "$REPO"
    say "building kiln and the checker (release)"
    cargo build --release --bin kiln >&2
    cargo build --release -p kiln-runtime --example check_pack >&2
    KILN_PTXAS="$(scripts/fetch_ptxas.sh)"
    export KILN_PTXAS
    rm -rf "$dir"
    mkdir -p "$dir/bin"
    cp "$TARGET_DIR/release/examples/check_pack" "$dir/bin/"
    # Without its symbols (0.7 MB less of the 64 MiB a device call carries), where binutils is.
    strip "$dir/bin/check_pack" 2>/dev/null || true
    cp scripts/gpu_check.sh "$dir/"
}

pack() {
    local dir="$1" kiln="$TARGET_DIR/release/kiln" scratch
    start_pack "$dir"
    scratch="$(mktemp -d)"
    mkdir -p "$dir/conformance" "$dir/conformance_tf32" "$dir/conformance_tf32x3" \
        "$dir/conformance_f16" "$dir/conformance_bf16" "$dir/bench"
    cp bench/cuda/peers.py bench/cuda/report.py "$dir/"
    local entry name spec set art
    for entry in "${CONFORMANCE[@]}"; do
        IFS='|' read -r name spec set <<<"$entry"
        art="$dir/conformance/$name.kiln"
        say "conformance: $name ($spec $set)"
        conformance_artifact "$art" "$spec" "$set"
    done
    local shapes found
    for entry in "${DYNAMIC_RUNS[@]}"; do
        IFS='|' read -r name shapes <<<"$entry"
        found="$(conformance_entry "$name")" || return 1
        IFS='|' read -r _ spec set <<<"$found"
        say "conformance: $name again at $shapes"
        dynamic_runs "$dir/conformance/$name.kiln" "$spec" "$set" "$shapes"
    done
    local tolerance
    for entry in "${CONFORMANCE_MATH[@]}"; do
        IFS='|' read -r name spec tolerance <<<"$entry"
        art="$dir/conformance/$name.kiln"
        say "conformance: $name ($spec, tolerance $tolerance)"
        conformance_artifact "$art" "$spec" ""
        echo "$tolerance" >"$art/tolerance.txt"
    done
    # A run that must fail: an integer division by zero, with the interpreter's words.
    art="$dir/conformance/int_div_zero.kiln"
    say "conformance: int_div_zero (tests/gpu_check/int_div.ron, a zero divisor)"
    "$kiln" compile tests/gpu_check/int_div.ron --target "$PACK_TARGET" -o "$art" >&2
    python3 "$SCRIPT_DIR/pack_data.py" int-div-inputs "$art/inputs.safetensors"
    echo "integer division by zero (divisor element [1])" >"$art/expected_error.txt"
    local host_dir
    host_dir="$(mktemp -d)"
    for entry in "${TRAIN[@]}"; do
        IFS='|' read -r name spec set <<<"$entry"
        art="$dir/conformance/$name.kiln"
        say "training: $name ($spec $set), recorded on this CPU"
        # shellcheck disable=SC2086
        "$kiln" compile "$spec" $set --train --seed 0 --target "$PACK_TARGET" -o "$art" >&2
        # shellcheck disable=SC2086
        "$kiln" compile "$spec" $set --train --seed 0 --target host -o "$host_dir/$name.kiln" >&2
        echo 3 >"$art/train_steps.txt"
        echo 3 >"$host_dir/$name.kiln/train_steps.txt"
    done
    "$dir/bin/check_pack" "$host_dir" --device cpu --repeats 1 --record >&2
    for entry in "${TRAIN[@]}"; do
        IFS='|' read -r name _ _ <<<"$entry"
        cp "$host_dir/$name.kiln/expected.safetensors" "$dir/conformance/$name.kiln/"
    done
    rm -rf "$host_dir"
    if [[ "$PACK_TARGET" == cuda* ]]; then
        local precision entries
        for precision in tf32 tf32x3; do
            if [[ "$precision" == tf32 ]]; then entries=("${CONFORMANCE_TF32[@]}"); else entries=("${CONFORMANCE_TF32X3[@]}"); fi
            for entry in "${entries[@]}"; do
                IFS='|' read -r name spec set <<<"$entry"
                spec="$(spec_for "$name" "$spec" "$scratch")"
                art="$dir/conformance_$precision/$name.kiln"
                say "conformance on tensor cores ($precision): $name ($spec $set)"
                conformance_artifact "$art" "$spec" "$set" --precision "$precision"
            done
        done
        # 16-bit attention and bf16 tensors compile for CUDA only.
        for entry in "${CONFORMANCE_HALF[@]}"; do
            IFS='|' read -r name spec set <<<"$entry"
            spec="$(spec_for "$name" "$spec" "$scratch")"
            art="$dir/conformance_${name##*_}/$name.kiln"
            say "conformance in ${name##*_}: $name ($spec $set)"
            # shellcheck disable=SC2046
            conformance_artifact "$art" "$spec" "$set" $(flags_of "$name")
        done
    fi
    for entry in "${BENCH[@]}"; do
        IFS='|' read -r name spec set <<<"$entry"
        art="$dir/bench/$name.kiln"
        # 16-bit attention and bf16 tensors compile for CUDA only.
        if [[ "$PACK_TARGET" != cuda* && "$name" == *f16 ]]; then continue; fi
        spec="$(spec_for "$name" "$spec" "$scratch")"
        say "benchmark: $name ($spec $set)"
        # shellcheck disable=SC2086
        "$kiln" compile "$spec" $set $(flags_of "$name") --seed 0 --target "$(target_of "$name")" -o "$art" >&2
        # Keep only the weights file's header: the GPU machine synthesizes the values.
        python3 "$SCRIPT_DIR/pack_data.py" header "$art/weights.safetensors" "$art/weights.header"
        rm "$art/weights.safetensors"
    done
    rm -rf "$scratch"
    dedupe "$dir"
    say "pack: $(du -sh "$dir" | cut -f1) in $dir"
}

# Keeps one copy of each set of identical data files in the pack DIR (twins compiled from the
# same spec differ only in their kernels): every other copy becomes FILE.same_as, holding the
# kept file's path in DIR, which `restore` copies back before the pack runs.
dedupe() {
    local dir="$1" file sum saved=0
    local -A first=()
    while IFS= read -r file; do
        sum="$(sha256sum "$file" | cut -d' ' -f1)"
        if [[ -n "${first[$sum]:-}" ]]; then
            saved=$((saved + $(stat -c %s "$file")))
            echo "${first[$sum]}" >"$file.same_as"
            rm "$file"
        else
            first[$sum]="${file#"$dir"/}"
        fi
    done < <(find "$dir" -name '*.safetensors' | sort)
    say "pack: $((saved / 1024)) KiB of repeated data files left out"
}

# The MiniLM golden check as a pack of its own in DIR: models/bert_encoder.ron at batch 16 with
# all-MiniLM-L6-v2's real weights (scripts/fetch_minilm.sh), on tests/golden/minilm's inputs,
# against sentence-transformers' embeddings of them, which check_pack compares after pooling
# the output as tests/minilm.rs does (`pooled.txt`), within the golden's 1e-4. The weights
# (87 MiB) do not fit beside the pack in one device call (64 MiB), nor alone as they are: the
# artifact keeps only the word-embedding rows of the tokens the inputs hold, the others zero
# (they compress to nothing). A gather reads no other row, so the outputs on these inputs are
# those of the full weights.
golden_pack() {
    local dir="$1" kiln="$TARGET_DIR/release/kiln" weights scratch art
    start_pack "$dir"
    weights="$(scripts/fetch_minilm.sh)/model.safetensors"
    mkdir -p "$dir/golden"
    scratch="$(mktemp -d)"
    golden_weights "$weights" tests/golden/minilm/inputs.safetensors "$scratch/model.safetensors"
    art="$dir/golden/minilm.kiln"
    say "golden: models/bert_encoder.ron at batch 16 with the real weights, for $PACK_TARGET"
    "$kiln" compile models/bert_encoder.ron --set batch=16 --weights "$scratch/model.safetensors" \
        --target "$PACK_TARGET" -o "$art" >&2
    cp tests/golden/minilm/inputs.safetensors tests/golden/minilm/expected.safetensors "$art/"
    echo "last_hidden_state attention_mask sentence_embedding" >"$art/pooled.txt"
    echo 1e-4 >"$art/tolerance.txt"
    # One artifact for every length, each sentence run unpadded at its own (runs/).
    art="$dir/golden/minilm_dynamic.kiln"
    say "golden: one artifact for every length up to 128, each sentence at its own"
    "$kiln" compile models/bert_encoder.ron --set batch=1 --set "seq=Dyn(min:1,max:128,hint:16)" \
        --weights "$scratch/model.safetensors" --target "$PACK_TARGET" -o "$art" >&2
    golden_sentences tests/golden/minilm/inputs.safetensors tests/golden/minilm/expected.safetensors "$art/runs"
    echo "last_hidden_state attention_mask sentence_embedding" >"$art/pooled.txt"
    echo 1e-4 >"$art/tolerance.txt"
    rm -rf "$scratch"
    dedupe "$dir"
    say "golden pack: $(du -sh "$dir" | cut -f1) in $dir"
}

# Splits the golden INPUTS ([16, 128], padded) and EXPECTED (sentence_embedding [16, 384]) into
# one run per sentence in RUNS/sNN/: its tokens up to its length ([1, length]) and its row.
golden_sentences() {
    python3 "$SCRIPT_DIR/pack_data.py" golden-sentences "$@"
}

# Copies the checkpoint WEIGHTS to OUT with every row of the word embeddings that no token of
# INPUTS' input_ids reads set to zero (the header and every other byte as they are).
golden_weights() {
    python3 "$SCRIPT_DIR/pack_data.py" golden-weights "$@"
}

# Writes the pack DIR as one archive, DIR.tar.xz, with the pack's files at its root: the PTX,
# manifests and inputs compress well, so the archive is what a device call carries.
archive() {
    local dir="$1"
    rm -f "$dir.tar.xz"
    XZ_OPT="-6 -T0" tar -C "$dir" -cJf "$dir.tar.xz" .
    say "archive: $(du -sh "$dir.tar.xz" | cut -f1) in $dir.tar.xz"
}

# The pack directory `run` was given: PATH itself, or for an archive PATH.tar.xz (as `archive`
# writes it), the directory PATH it is unpacked into, afresh.
unpacked() {
    local path="$1" into
    if [[ "$path" != *.tar.xz ]]; then
        echo "$path"
        return
    fi
    into="${path%.tar.xz}"
    rm -rf "$into"
    mkdir -p "$into"
    if command -v tar >/dev/null && command -v xz >/dev/null; then
        tar -C "$into" -xJf "$path" || return 1
    else
        # The "data" filter (Python 3.11.4 and later) refuses links and paths out of the folder.
        python3 -c 'import sys, tarfile
safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
tarfile.open(sys.argv[1]).extractall(sys.argv[2], **safe)' "$path" "$into" || return 1
    fi
    say "unpacked $path into $into"
    echo "$into"
}

# Copies back the data files `dedupe` left out of the pack DIR.
restore() {
    local dir="$1" note
    while IFS= read -r note; do
        cp "$dir/$(cat "$note")" "${note%.same_as}"
    done < <(find "$dir" -name '*.same_as')
}

# Runs the command given for at most ${KILN_CHECK_LIMIT:-240} seconds, so that a kernel that
# never returns costs that much of a device call, not all of it (the other parts still run).
limited() {
    local limit="${KILN_CHECK_LIMIT:-240}" rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if [[ $rc == 124 || $rc == 137 ]]; then
        say "stopped after $limit s: $*"
    fi
    return $rc
}

run_pack() {
    local dir="$1" out="${OUT:-$1/results}"
    mkdir -p "$out"
    restore "$dir"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /' >&2
    local status=0
    if compgen -G "$dir/conformance/*.kiln" >/dev/null; then
        say "conformance: every shipped model, and the math functions, on CUDA against the interpreter"
        limited "$dir/bin/check_pack" "$dir/conformance" --device "$DEVICE" --repeats 10 --json "$out/conformance.jsonl" \
            | tee "$out/conformance.txt" || status=1
    fi
    if compgen -G "$dir/golden/*.kiln" >/dev/null; then
        say "the MiniLM golden check: real weights against sentence-transformers' embeddings (1e-4)"
        limited "$dir/bin/check_pack" "$dir/golden" --device "$DEVICE" --repeats 10 --json "$out/golden.jsonl" \
            | tee "$out/golden.txt" || status=1
    fi
    if compgen -G "$dir/conformance_tf32/*.kiln" >/dev/null; then
        say "conformance on tensor cores (TF32, tolerance 1e-2)"
        limited "$dir/bin/check_pack" "$dir/conformance_tf32" --device "$DEVICE" --repeats 10 --tolerance 1e-2 \
            --json "$out/conformance_tf32.jsonl" | tee "$out/conformance_tf32.txt" || status=1
    fi
    if compgen -G "$dir/conformance_tf32x3/*.kiln" >/dev/null; then
        say "conformance on tensor cores (TF32×3, f32's tolerance 1e-4)"
        limited "$dir/bin/check_pack" "$dir/conformance_tf32x3" --device "$DEVICE" --repeats 10 \
            --json "$out/conformance_tf32x3.jsonl" | tee "$out/conformance_tf32x3.txt" || status=1
    fi
    local dtype tolerance
    for dtype in f16 bf16; do
        if compgen -G "$dir/conformance_$dtype/*.kiln" >/dev/null; then
            if [[ "$dtype" == f16 ]]; then tolerance=1e-2; else tolerance=5e-2; fi
            say "conformance in $dtype (tolerance $tolerance)"
            limited "$dir/bin/check_pack" "$dir/conformance_$dtype" --device "$DEVICE" --repeats 10 --tolerance "$tolerance" \
                --json "$out/conformance_$dtype.jsonl" | tee "$out/conformance_$dtype.txt" || status=1
        fi
    done
    # The golden pack has no benchmarks.
    if ! compgen -G "$dir/bench/*.kiln" >/dev/null; then
        return $status
    fi
    say "Kiln benchmarks"
    limited "$dir/bin/check_pack" "$dir/bench" --device "$DEVICE" --repeats 30 --json "$out/kiln_bench.jsonl" \
        | tee "$out/kiln_bench.txt" || status=1
    say "PyTorch on the same GPU"
    if python3 "$dir/peers.py" --json "$out/torch.json" --repeats 30 | tee "$out/torch.txt"; then
        python3 "$dir/report.py" "$out/kiln_bench.jsonl" "$out/torch.json" "$out"/conformance*.jsonl \
            | tee "$out/results.md"
    else
        say "PyTorch did not run: no peer comparison"
        status=1
    fi
    return $status
}

# Sourced (as tests/compiled.rs does, for the functions above): define them, run nothing.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    return 0
fi

case "${1:-all}" in
    pack)
        pack "${DIR_ARG:-$TARGET_DIR/gpu_check/pack}"
        archive "${DIR_ARG:-$TARGET_DIR/gpu_check/pack}"
        ;;
    golden)
        golden_pack "${DIR_ARG:-$TARGET_DIR/gpu_check/golden}"
        archive "${DIR_ARG:-$TARGET_DIR/gpu_check/golden}"
        ;;
    run)
        # (A failure inside the substitution does not stop the script by itself.)
        pack_dir="$(unpacked "${DIR_ARG:-$SCRIPT_DIR}")" || exit 1
        run_pack "$pack_dir"
        ;;
    all)
        cd "$REPO"
        start=$(date +%s)
        scripts/fetch_minilm.sh >/dev/null
        KILN_PTXAS="$(scripts/fetch_ptxas.sh)"
        export KILN_PTXAS
        say "the conformance suite and the MiniLM golden check on CUDA"
        cargo nextest run --release --test compiled --test minilm -E 'test(/cuda/)' --no-fail-fast
        pack "$TARGET_DIR/gpu_check/pack"
        OUT="$TARGET_DIR/gpu_check/results" run_pack "$TARGET_DIR/gpu_check/pack"
        say "done in $(($(date +%s) - start)) s"
        ;;
    *)
        echo "usage: scripts/gpu_check.sh [all | pack [DIR] | golden [DIR] | run [DIR]]" >&2
        exit 2
        ;;
esac
