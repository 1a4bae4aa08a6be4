//! Tiled matrix products with their epilogue (bias, activation). Each workgroup computes one
//! `tile_m × tile_n` block of one batch index's result: it walks k in steps of `tile_k`,
//! loading an A tile and a B tile into shared memory together (each invocation a few elements,
//! zero past the edges), then each invocation accumulates `thread_m × thread_n` results in
//! private registers, strided across the tile so neighbouring invocations own neighbouring
//! columns. Operands are strided views, so transposed and batch-broadcast operands
//! need no copy.

use super::plan::{GpuPlan, Work};
use super::skeleton::{clamp, module, offset_at, shared, shared_type, unravel};
use super::{GpuCtx, GpuFlavor, GpuKernel};
use crate::kernels::elementwise::{load, reg_type, store};
use crate::kernels::matmul::activate;
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::CodegenError;
use kiln_ir::Activation;

/// `out = activation(a · b + bias)` for `a` `[B…, M, K]`, `b` `[B…, K, N]`, `bias` and `out`
/// `[B…, M, N]`. Arguments: a, b, [bias], out.
pub fn emit(
    symbol: &str,
    a: &View,
    bv: &View,
    bias: Option<&View>,
    act: Activation,
    out: &View,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let dtype = out.dtype;
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!("matmul on {dtype} on the {} target", cx.caps.name)));
    }
    let ty = reg_type(dtype);
    let r = out.rank();
    let batch_shape = &out.shape[..r - 2];
    let (m, n, k) = (out.shape[r - 2], out.shape[r - 1], a.shape[r - 1]);
    let batch: usize = batch_shape.iter().product();
    let reg_bytes = if ty == "f64" { 8 } else { 4 };
    // Tensor cores when the operands fit their precision exactly (f16 in TF32), or the user
    // allowed rounding f32 operands to it (`--precision tf32`).
    let exact = [a.dtype, bv.dtype].iter().all(|d| matches!(d, kiln_ir::DType::F16));
    let allowed = match (cx.caps.mma, cx.caps.tensor_cores) {
        (Some(hw), Some(asked)) if hw == asked && (ty == "f32") => Some(hw),
        (Some(hw), _) if exact => Some(hw),
        _ => None,
    };
    let tensor_cores = match allowed {
        Some(precision) => GpuPlan::matmul_tensor_cores(batch, m, n, k, precision, cx.caps)?,
        None => None,
    };
    let plan = match tensor_cores {
        Some(plan) => plan,
        None => GpuPlan::matmul(batch, m, n, k, reg_bytes, cx.caps)?,
    };
    let (tile, inner) = match plan.work {
        Work::Matmul { tile, thread, .. } => {
            let [wx, wy, _] = plan.launch.workgroup.map(|w| w as usize);
            (tile, Inner::Simt { rm: thread[0] as usize, rn: thread[1] as usize, wx, wy })
        }
        Work::MatmulTensorCores { tile, warps, .. } => {
            let (wm, wn) = (warps[0] as usize, warps[1] as usize);
            let sub = [tile[0] as usize / wm / MMA_M, tile[1] as usize / wn / MMA_N];
            (tile, Inner::Tf32 { warps: [wm, wn], sub })
        }
        Work::Elements { .. } | Work::Columns { .. } | Work::Rows { .. } | Work::Attention { .. } => {
            return Err(CodegenError::Unsupported("a matmul plan that is not one".into()))
        }
    };
    let [tm, tn, tk] = tile.map(|t| t as usize);
    let inv = plan.launch.invocations() as usize;

    let mut b = cx.body();
    let sh_a = shared(&mut b, tm * tk, ty);
    let sh_b = shared(&mut b, tk * tn, ty);
    let (sa, sb) = (shared_type(&b, tm * tk, ty), shared_type(&b, tk * tn, ty));
    let tx = b.assign("gpu.thread_id x");
    let ty_ = b.assign("gpu.thread_id y");
    let bx = b.assign("gpu.block_id x");
    let by = b.assign("gpu.block_id y");
    let bz = b.assign("gpu.block_id z");
    let wxc = b.index(plan.launch.workgroup[0] as usize);
    let lin = b.assign(format!("arith.muli {ty_}, {wxc} : index"));
    let lin = b.assign(format!("arith.addi {lin}, {tx} : index"));
    let bidx = unravel(&mut b, &bz, batch_shape);
    let batch_base = |b: &mut Body, v: &View| {
        let parts: Vec<(Option<&String>, usize)> =
            bidx.iter().zip(&v.strides).map(|(i, &s)| (Some(i), s)).collect();
        offset_at(b, v.offset, &parts)
    };
    let a_base = batch_base(&mut b, a);
    let b_base = batch_base(&mut b, bv);
    let o_base = batch_base(&mut b, out);
    let c_base = bias.map(|c| batch_base(&mut b, c));
    let tmc = b.index(tm);
    let tnc = b.index(tn);
    let row0 = b.assign(format!("arith.muli {by}, {tmc} : index"));
    let col0 = b.assign(format!("arith.muli {bx}, {tnc} : index"));
    let zero = b.float(0.0, ty);
    // With tensor cores, where each warp's fragments lie in the tile.
    let inner = match inner {
        Inner::Simt { rm, rn, wx, wy } => Step::Simt { rm, rn, wx, wy },
        Inner::Tf32 { warps, sub } => {
            Step::Tf32 { sub, lanes: Box::new(Lanes::new(&mut b, &lin, warps, sub)) }
        }
    };
    // The accumulators are loop-carried values (registers on every device), not an array.
    let nacc = inner.accumulators();
    let types = vec![ty; nacc].join(", ");

    let c0 = b.index(0);
    let kc = b.index(k);
    let tkc = b.index(tk);
    let carried: Vec<String> = (0..nacc).map(|i| format!("%o{i} = {zero}")).collect();
    b.open(format!(
        "%acc:{nacc} = scf.for %k0 = {c0} to {kc} step {tkc} iter_args({}) -> ({types})",
        carried.join(", ")
    ));
    // Cooperative tile loads: element l of a tile is loaded by invocation l mod inv.
    let tile_load = |b: &mut Body,
                     v: &View,
                     arg: &str,
                     base: &str,
                     sh: &str,
                     sty: &str,
                     rows: usize,
                     cols: usize,
                     origin: (&str, &str),
                     extent: (usize, usize)| {
        let total = rows * cols;
        for t in 0..total.div_ceil(inv) {
            let off = b.index(t * inv);
            let l = b.assign(format!("arith.addi {lin}, {off} : index"));
            let guard = (t + 1) * inv > total;
            if guard {
                let tot = b.index(total);
                let ok = b.assign(format!("arith.cmpi ult, {l}, {tot} : index"));
                b.open(format!("scf.if {ok}"));
            }
            let cc = b.index(cols);
            let rr = b.assign(format!("arith.divui {l}, {cc} : index"));
            let col = b.assign(format!("arith.remui {l}, {cc} : index"));
            let gr = b.assign(format!("arith.addi {}, {rr} : index", origin.0));
            let gc = b.assign(format!("arith.addi {}, {col} : index", origin.1));
            let er = b.index(extent.0);
            let ec = b.index(extent.1);
            let okr = b.assign(format!("arith.cmpi ult, {gr}, {er} : index"));
            let okc = b.assign(format!("arith.cmpi ult, {gc}, {ec} : index"));
            let ok = b.assign(format!("arith.andi {okr}, {okc} : i1"));
            let gr = clamp(b, &gr, extent.0);
            let gc = clamp(b, &gc, extent.1);
            let rk = v.rank();
            let at = offset_at(b, 0, &[(Some(&gr), v.strides[rk - 2]), (Some(&gc), v.strides[rk - 1])]);
            let at = b.assign(format!("arith.addi {base}, {at} : index"));
            let x = load(b, arg, v, &at);
            let x = b.select(&ok, &x, &zero, ty);
            b.line(format!("memref.store {x}, {sh}[{l}] : {sty}"));
            if guard {
                b.close("");
            }
        }
    };
    tile_load(&mut b, a, "%a0", &a_base, &sh_a, &sa, tm, tk, (&row0, "%k0"), (m, k));
    tile_load(&mut b, bv, "%a1", &b_base, &sh_b, &sb, tk, tn, ("%k0", &col0), (k, n));
    b.line("gpu.barrier");
    let next = match &inner {
        &Step::Simt { rm, rn, wx, wy } => {
            simt_step(&mut b, &SimtStep { rm, rn, wx, wy, tk, tn }, &tx, &ty_, (&sh_a, &sa), (&sh_b, &sb), ty)
        }
        Step::Tf32 { sub, lanes } => mma_step(&mut b, lanes, *sub, tk, tn, (&sh_a, &sa), (&sh_b, &sb)),
    };
    b.line("gpu.barrier");
    b.line(format!("scf.yield {} : {types}", next.join(", ")));
    b.close("");

    // Epilogue: bias, activation, store what lies inside the result.
    let or = out.rank();
    let bias_arg = "%a2";
    let out_arg = if bias.is_some() { "%a3" } else { "%a2" };
    for acc in 0..nacc {
        {
            let (r_in, c_in) = inner.position(&mut b, acc, &tx, &ty_);
            let row = b.assign(format!("arith.addi {row0}, {r_in} : index"));
            let col = b.assign(format!("arith.addi {col0}, {c_in} : index"));
            let mc = b.index(m);
            let nc = b.index(n);
            let okr = b.assign(format!("arith.cmpi ult, {row}, {mc} : index"));
            let okc = b.assign(format!("arith.cmpi ult, {col}, {nc} : index"));
            let ok = b.assign(format!("arith.andi {okr}, {okc} : i1"));
            b.open(format!("scf.if {ok}"));
            let mut v = format!("%acc#{acc}");
            if let (Some(cv), Some(cb)) = (bias, &c_base) {
                let rk = cv.rank();
                let at = offset_at(
                    &mut b,
                    0,
                    &[(Some(&row), cv.strides[rk - 2]), (Some(&col), cv.strides[rk - 1])],
                );
                let at = b.assign(format!("arith.addi {cb}, {at} : index"));
                let x = load(&mut b, bias_arg, cv, &at);
                v = b.fadd(&v, &x, ty);
            }
            let v = activate(&mut b, act, &v, ty);
            let at =
                offset_at(&mut b, 0, &[(Some(&row), out.strides[or - 2]), (Some(&col), out.strides[or - 1])]);
            let at = b.assign(format!("arith.addi {o_base}, {at} : index"));
            store(&mut b, &v, out_arg, out, &at);
            b.close("");
        }
    }
    let mut memrefs = vec![a.memref(), bv.memref()];
    memrefs.extend(bias.map(View::memref));
    memrefs.push(out.memref());
    let flops = (2 * batch * m * n * k) as u64;
    let bytes = ((a.numel() + bv.numel() + out.numel()) * dtype.size_bytes()) as u64;
    Ok(GpuKernel { symbol: symbol.into(), mlir: module(symbol, &memrefs, &plan, b), plan, flops, bytes })
}

/// Rows and columns of an MMA tile: `m16n8k8`.
const MMA_M: usize = 16;
const MMA_N: usize = 8;
const MMA_K: usize = 8;

/// How a workgroup computes its tile between the shared-memory loads, as its plan says.
#[derive(Clone, Copy)]
enum Inner {
    /// Each invocation `(x, y)` of a `wx × wy` workgroup accumulates `rm × rn` results with FMAs.
    Simt { rm: usize, rn: usize, wx: usize, wy: usize },
    /// Each warp of `warps[0] × warps[1]` computes `sub[0] × sub[1]` `m16n8k8` products on
    /// tensor cores with TF32 operands.
    Tf32 { warps: [usize; 2], sub: [usize; 2] },
}

/// [`Inner`] once the kernel's body exists: the tensor-core form knows its lanes.
enum Step {
    Simt { rm: usize, rn: usize, wx: usize, wy: usize },
    Tf32 { sub: [usize; 2], lanes: Box<Lanes> },
}

impl Step {
    /// Accumulators per invocation.
    fn accumulators(&self) -> usize {
        match self {
            Step::Simt { rm, rn, .. } => rm * rn,
            Step::Tf32 { sub, .. } => sub[0] * sub[1] * C_FRAGMENT.len(),
        }
    }

    /// The tile row and column of accumulator `acc` of this invocation.
    fn position(&self, b: &mut Body, acc: usize, tx: &str, ty: &str) -> (String, String) {
        match self {
            &Step::Simt { rn, wx, wy, .. } => {
                let (i, j) = (acc / rn, acc % rn);
                let ic = b.index(i * wy);
                let jc = b.index(j * wx);
                let row = b.assign(format!("arith.addi {ty}, {ic} : index"));
                let col = b.assign(format!("arith.addi {tx}, {jc} : index"));
                (row, col)
            }
            Step::Tf32 { sub, lanes: l } => {
                let per = C_FRAGMENT.len();
                let (tile, e) = (acc / per, acc % per);
                let (i, j) = (tile / sub[1], tile % sub[1]);
                let (dr, dc) = C_FRAGMENT[e];
                let row = l.at(b, &l.warp_row, i * MMA_M + dr, &l.group, 1);
                let col = l.at(b, &l.warp_col, j * MMA_N + dc, &l.in_group, 2);
                (row, col)
            }
        }
    }
}

/// Where the fragments of `mma.sync.m16n8k8` with TF32 operands lie (PTX ISA, "Matrix
/// Fragments for mma.m16n8k8", `.tf32`): lane `l` of the warp has `group = l / 4` and
/// `in_group = l % 4`. Each entry is `(row, column)` offsets added to `(group, in_group)` for A
/// (16×8, row-major) and C (16×8, where the column is `2·in_group + offset`), and to
/// `(in_group, group)` for B (8×8).
const A_FRAGMENT: [(usize, usize); 4] = [(0, 0), (8, 0), (0, 4), (8, 4)];
const B_FRAGMENT: [(usize, usize); 2] = [(0, 0), (4, 0)];
const C_FRAGMENT: [(usize, usize); 4] = [(0, 0), (0, 1), (8, 0), (8, 1)];

/// A warp lane's coordinates, computed once per kernel.
struct Lanes {
    /// `lane / 4` and `lane % 4`.
    group: String,
    in_group: String,
    /// The first row and column of this warp's block of the tile.
    warp_row: String,
    warp_col: String,
    /// Where a lane emulates `mma.sync` (SPIR-V, for checking the fragment bookkeeping on any
    /// Vulkan device): its warp's slices of two shared scratch arrays (a 16×8 A and an 8×8 B
    /// per warp), and their types.
    emulation: Option<Emulation>,
}

struct Emulation {
    a_base: String,
    b_base: String,
    scratch_a: String,
    scratch_b: String,
    a_type: String,
    b_type: String,
}

impl Lanes {
    fn new(b: &mut Body, lin: &str, warps: [usize; 2], sub: [usize; 2]) -> Lanes {
        let emulate = b.gpu() != Some(GpuFlavor::Nvvm);
        let count = warps[0] * warps[1];
        let scratch = emulate.then(|| {
            let a = shared(b, count * MMA_M * MMA_K, "f32");
            let bb = shared(b, count * MMA_K * MMA_N, "f32");
            (
                a,
                bb,
                shared_type(b, count * MMA_M * MMA_K, "f32"),
                shared_type(b, count * MMA_K * MMA_N, "f32"),
            )
        });
        let c32 = b.index(32);
        let lane = b.assign(format!("arith.remui {lin}, {c32} : index"));
        let warp = b.assign(format!("arith.divui {lin}, {c32} : index"));
        let c4 = b.index(4);
        let group = b.assign(format!("arith.divui {lane}, {c4} : index"));
        let in_group = b.assign(format!("arith.remui {lane}, {c4} : index"));
        let wn = b.index(warps[1]);
        let wr = b.assign(format!("arith.divui {warp}, {wn} : index"));
        let wc = b.assign(format!("arith.remui {warp}, {wn} : index"));
        let rows = b.index(sub[0] * MMA_M);
        let cols = b.index(sub[1] * MMA_N);
        let warp_row = b.assign(format!("arith.muli {wr}, {rows} : index"));
        let warp_col = b.assign(format!("arith.muli {wc}, {cols} : index"));
        let emulation = scratch.map(|(scratch_a, scratch_b, a_type, b_type)| {
            let ca = b.index(MMA_M * MMA_K);
            let cb = b.index(MMA_K * MMA_N);
            let a_base = b.assign(format!("arith.muli {warp}, {ca} : index"));
            let b_base = b.assign(format!("arith.muli {warp}, {cb} : index"));
            Emulation { a_base, b_base, scratch_a, scratch_b, a_type, b_type }
        });
        Lanes { group, in_group, warp_row, warp_col, emulation }
    }

    /// `base + offset + scale·lane_part`.
    fn at(&self, b: &mut Body, base: &str, offset: usize, lane_part: &str, scale: usize) -> String {
        let part = if scale == 1 {
            lane_part.to_string()
        } else {
            let s = b.index(scale);
            b.assign(format!("arith.muli {lane_part}, {s} : index"))
        };
        let o = b.index(offset);
        let x = b.assign(format!("arith.addi {base}, {o} : index"));
        b.assign(format!("arith.addi {x}, {part} : index"))
    }
}

/// The sizes the SIMT inner product needs.
struct SimtStep {
    rm: usize,
    rn: usize,
    wx: usize,
    wy: usize,
    tk: usize,
    tn: usize,
}

/// One k tile on the SIMT path: for each k of the tile, every invocation multiplies its `rm` A
/// values by its `rn` B values into its accumulators `%p…` (carried as `%o…`). Returns the
/// accumulators after the tile.
fn simt_step(
    b: &mut Body,
    st: &SimtStep,
    tx: &str,
    ty_: &str,
    (sh_a, sa): (&str, &str),
    (sh_b, sb): (&str, &str),
    ty: &str,
) -> Vec<String> {
    let SimtStep { rm, rn, wx, wy, tk, tn } = *st;
    let nacc = rm * rn;
    let types = vec![ty; nacc].join(", ");
    let c0 = b.index(0);
    let tkc = b.index(tk);
    let tnc = b.index(tn);
    let c1 = b.index(1);
    let carried: Vec<String> = (0..nacc).map(|i| format!("%p{i} = %o{i}")).collect();
    b.open(format!(
        "%step:{nacc} = scf.for %kk = {c0} to {tkc} step {c1} iter_args({}) -> ({types})",
        carried.join(", ")
    ));
    // Invocation (x, y) owns rows y + i·wy and columns x + j·wx of the tile: neighbouring
    // invocations touch neighbouring columns (coalesced on a GPU, one vector on a CPU device),
    // and a row of invocations reads the same A element.
    let (my_row, my_col) = (ty_.to_string(), tx.to_string());
    let a_vals: Vec<String> = (0..rm)
        .map(|i| {
            let ic = b.index(i * wy);
            let row = b.assign(format!("arith.addi {my_row}, {ic} : index"));
            let at = b.assign(format!("arith.muli {row}, {tkc} : index"));
            let at = b.assign(format!("arith.addi {at}, %kk : index"));
            b.assign(format!("memref.load {sh_a}[{at}] : {sa}"))
        })
        .collect();
    let b_vals: Vec<String> = (0..rn)
        .map(|j| {
            let jc = b.index(j * wx);
            let col = b.assign(format!("arith.addi {my_col}, {jc} : index"));
            let at = b.assign(format!("arith.muli %kk, {tnc} : index"));
            let at = b.assign(format!("arith.addi {at}, {col} : index"));
            b.assign(format!("memref.load {sh_b}[{at}] : {sb}"))
        })
        .collect();
    let mut next = Vec::with_capacity(nacc);
    for av in &a_vals {
        for bw in &b_vals {
            let old = format!("%p{}", next.len());
            next.push(b.fma(av, bw, &old, ty));
        }
    }
    b.line(format!("scf.yield {} : {types}", next.join(", ")));
    b.close("");
    (0..nacc).map(|i| format!("%step#{i}")).collect()
}

/// One k tile on tensor cores: for each k step of 8, every warp loads its A fragments (one per
/// 16-row block) and B fragments (one per 8-column block) from shared memory, rounds them to
/// TF32, and runs `sub[0] × sub[1]` `mma.sync` products into its accumulators (carried as
/// `%o…`, 4 per product). Returns the accumulators after the tile.
fn mma_step(
    b: &mut Body,
    l: &Lanes,
    sub: [usize; 2],
    tk: usize,
    tn: usize,
    (sh_a, sa): (&str, &str),
    (sh_b, sb): (&str, &str),
) -> Vec<String> {
    let per = C_FRAGMENT.len();
    let mut acc: Vec<String> = (0..sub[0] * sub[1] * per).map(|i| format!("%o{i}")).collect();
    let tf32 = |b: &mut Body, x: &str| match &l.emulation {
        None => b.assign(format!("llvm.call_intrinsic \"llvm.nvvm.f2tf32.rna\"({x}) : (f32) -> i32")),
        // cvt.rna.tf32.f32: round the 13 dropped mantissa bits to nearest, ties away from zero.
        Some(_) => {
            let bits = b.assign(format!("arith.bitcast {x} : f32 to i32"));
            let half = b.int(0x1000, "i32");
            let up = b.assign(format!("arith.addi {bits}, {half} : i32"));
            let mask = b.int(0xFFFF_E000u32 as i32 as i64, "i32");
            b.assign(format!("arith.andi {up}, {mask} : i32"))
        }
    };
    for kk in (0..tk).step_by(MMA_K) {
        let a_frags: Vec<Vec<String>> = (0..sub[0])
            .map(|i| {
                A_FRAGMENT
                    .iter()
                    .map(|&(dr, dc)| {
                        let row = l.at(b, &l.warp_row, i * MMA_M + dr, &l.group, 1);
                        let col = b.index(kk + dc);
                        let col = b.assign(format!("arith.addi {col}, {} : index", l.in_group));
                        let tkc = b.index(tk);
                        let at = b.assign(format!("arith.muli {row}, {tkc} : index"));
                        let at = b.assign(format!("arith.addi {at}, {col} : index"));
                        let x = b.assign(format!("memref.load {sh_a}[{at}] : {sa}"));
                        tf32(b, &x)
                    })
                    .collect()
            })
            .collect();
        let b_frags: Vec<Vec<String>> = (0..sub[1])
            .map(|j| {
                B_FRAGMENT
                    .iter()
                    .map(|&(dr, dc)| {
                        let row = b.index(kk + dr);
                        let row = b.assign(format!("arith.addi {row}, {} : index", l.in_group));
                        let col = l.at(b, &l.warp_col, j * MMA_N + dc, &l.group, 1);
                        let tnc = b.index(tn);
                        let at = b.assign(format!("arith.muli {row}, {tnc} : index"));
                        let at = b.assign(format!("arith.addi {at}, {col} : index"));
                        let x = b.assign(format!("memref.load {sh_b}[{at}] : {sb}"));
                        tf32(b, &x)
                    })
                    .collect()
            })
            .collect();
        for (i, af) in a_frags.iter().enumerate() {
            for (j, bf) in b_frags.iter().enumerate() {
                let base = (i * sub[1] + j) * per;
                let c = &acc[base..base + per];
                if let Some(em) = &l.emulation {
                    let d = emulate_mma(b, l, em, af, bf, c);
                    acc[base..base + per].clone_from_slice(&d);
                    continue;
                }
                let r = b.assign(format!(
                    "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, multiplicandAPtxType = #nvvm.mma_type<tf32>, multiplicandBPtxType = #nvvm.mma_type<tf32>, shape = #nvvm.shape<m = 16, n = 8, k = 8>}} : (i32, i32, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
                    af.join(", "),
                    bf.join(", "),
                    c.join(", ")
                ));
                for e in 0..per {
                    acc[base + e] =
                        b.assign(format!("llvm.extractvalue {r}[{e}] : !llvm.struct<(f32, f32, f32, f32)>"));
                }
            }
        }
    }
    acc
}

/// `mma.sync.m16n8k8` with TF32 operands, emulated by one warp through shared memory: each
/// lane stores its A and B fragment elements where the fragment tables put them, then computes
/// its four C elements from the whole 16×8 and 8×8 operands. Every lane of the workgroup runs
/// it, so its barriers are uniform.
fn emulate_mma(
    b: &mut Body,
    l: &Lanes,
    em: &Emulation,
    a: &[String],
    bf: &[String],
    c: &[String],
) -> Vec<String> {
    let at = |b: &mut Body, base: &str, row: &str, stride: usize, col: &str| {
        let s = b.index(stride);
        let r = b.assign(format!("arith.muli {row}, {s} : index"));
        let r = b.assign(format!("arith.addi {base}, {r} : index"));
        b.assign(format!("arith.addi {r}, {col} : index"))
    };
    let plus = |b: &mut Body, x: &str, d: usize| {
        let dc = b.index(d);
        b.assign(format!("arith.addi {x}, {dc} : index"))
    };
    for (x, &(dr, dc)) in a.iter().zip(&A_FRAGMENT) {
        let row = plus(b, &l.group, dr);
        let col = plus(b, &l.in_group, dc);
        let i = at(b, &em.a_base, &row, MMA_K, &col);
        let v = b.assign(format!("arith.bitcast {x} : i32 to f32"));
        b.line(format!("memref.store {v}, {}[{i}] : {}", em.scratch_a, em.a_type));
    }
    for (x, &(dr, dc)) in bf.iter().zip(&B_FRAGMENT) {
        let row = plus(b, &l.in_group, dr);
        let col = plus(b, &l.group, dc);
        let i = at(b, &em.b_base, &row, MMA_N, &col);
        let v = b.assign(format!("arith.bitcast {x} : i32 to f32"));
        b.line(format!("memref.store {v}, {}[{i}] : {}", em.scratch_b, em.b_type));
    }
    b.line("gpu.barrier");
    let mut out = Vec::with_capacity(c.len());
    for (old, &(dr, dc)) in c.iter().zip(&C_FRAGMENT) {
        let row = plus(b, &l.group, dr);
        let two = b.index(2);
        let col = b.assign(format!("arith.muli {}, {two} : index", l.in_group));
        let col = plus(b, &col, dc);
        let mut sum = old.clone();
        for kk in 0..MMA_K {
            let k = b.index(kk);
            let ia = at(b, &em.a_base, &row, MMA_K, &k);
            let ib = at(b, &em.b_base, &k, MMA_N, &col);
            let x = b.assign(format!("memref.load {}[{ia}] : {}", em.scratch_a, em.a_type));
            let y = b.assign(format!("memref.load {}[{ib}] : {}", em.scratch_b, em.b_type));
            sum = b.fma(&x, &y, &sum, "f32");
        }
        out.push(sum);
    }
    b.line("gpu.barrier");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of A (16×8), B (8×8) and C (16×8) belongs to exactly one lane and one
    /// fragment slot, as the PTX layout requires: a slip in the tables would show here, not as
    /// wrong numbers on a GPU.
    #[test]
    fn tf32_fragments_cover_each_matrix_once() {
        let mut a = [[0u8; 8]; 16];
        let mut bm = [[0u8; 8]; 8];
        let mut c = [[0u8; 8]; 16];
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for &(dr, dc) in &A_FRAGMENT {
                a[g + dr][t + dc] += 1;
            }
            for &(dr, dc) in &B_FRAGMENT {
                bm[t + dr][g + dc] += 1;
            }
            for &(dr, dc) in &C_FRAGMENT {
                c[g + dr][2 * t + dc] += 1;
            }
        }
        assert!(a.iter().flatten().all(|&n| n == 1), "{a:?}");
        assert!(bm.iter().flatten().all(|&n| n == 1), "{bm:?}");
        assert!(c.iter().flatten().all(|&n| n == 1), "{c:?}");
    }
}
