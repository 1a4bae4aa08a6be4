//! Matrix products with a fused epilogue: `out = activation(a · b + bias)`.
//!
//! f32 runs a register-tiled micro-kernel in the style of BLIS: an `MR×NR` tile of C lives in
//! `MR·NR/lanes` vector registers (loop-carried `iter_args` of the k loop), each k step loads
//! one row of a packed B panel and broadcasts `MR` elements of a into FMAs. B is packed, per
//! block of `KC` rows and `NB` columns, into a contiguous scratch buffer of `NR`-wide panels
//! (zero-padded, so the micro-kernel never masks): this turns a transposed weight (`[N, K]`
//! stored, the PyTorch Linear layout, packed by in-register transposes) into the same
//! unit-stride stream as a plain one. A constant B (a weight) is packed once at compile time
//! instead ([`Panels`], [`emit_prepacked`]) and read in place. a is read in place, or copied block by block into
//! contiguous rows when its rows are far apart or K is strided. C is written once per K block,
//! its tile prefetched and read after the k loop; the last block adds the bias and applies the
//! activation in registers before the store.
//!
//! The parallel range is batch × column block × row tile (row tiles fastest): one call packs a
//! column block once for all the row tiles of its chunk, and column blocks split the work when
//! there are few rows. Batch axes over which B is shared and the rows of a and out simply
//! continue (a Linear layer on `[batch, seq, features]`) are folded into M first. Other dtypes use a plain scalar loop nest (halves accumulate in f32).

use super::View;
use crate::kernel::mlir_elem;
use crate::mlir_text::Body;
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{Activation, DType, GeluApprox};

/// Largest K block: a `KC×NR` panel of B stays in L1 while the row tiles stream past it.
const KC_MAX: usize = 256;
/// Target columns per column block when there are few rows: the packed `KC×NB` block stays in
/// L2, and several blocks let threads split N instead of each packing all of B.
const NB_SMALL: usize = 256;
/// Target columns per column block when there are many rows (`ROWS_LARGE`): fewer passes over
/// a (each column block streams all of it); the packed block then lives in L3.
const NB_LARGE: usize = 1024;
const ROWS_LARGE: usize = 512;
/// The fewest rows a tile over a run-time row tail computes: fewer rows than this are as slow
/// (their accumulators wait on FMA latency), so they run in this many, the rest not stored.
const TAIL_MIN_ROWS: usize = 4;
/// Rows per cache block of a (a multiple of MR is used).
const MC_TARGET: usize = 96;
/// Unroll of the micro-kernel's k loop.
const K_UNROLL: usize = 4;

/// `out = activation(a · b + bias)` over views `a [B…, M, K]`, `b [B…, K, N]`, `bias [B…, M, N]`
/// (broadcast axes have stride 0) and `out [B…, M, N]`. Arguments, in order: a, b, (bias), out.
pub fn emit(
    symbol: &str,
    a: &View,
    b: &View,
    bias: Option<&View>,
    activation: Activation,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let p = Problem::new(a, b, bias, activation, out)?;
    Ok(emit_problem(symbol, &p, None, target))
}

/// [`emit`] for a B stored ahead of time in `panels` (see [`Panels`]): the kernel reads the
/// panels in place and packs nothing per call. `a`, `bias` and `out` are as for [`emit`]; B's
/// memref is the packed buffer of `panels.len()` f32 elements.
pub fn emit_prepacked(
    symbol: &str,
    a: &View,
    panels: Panels,
    bias: Option<&View>,
    activation: Activation,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let unsupported = |msg: String| CodegenError::Unsupported(format!("matmul with packed B: {msg}"));
    let want = Panels::for_target(panels.k, panels.n, target);
    if panels != want || !Panels::applies(out.dtype, panels.k, panels.n) {
        return Err(unsupported(format!("{panels:?} is not the layout of this target ({want:?})")));
    }
    // Within a panel, (k, n mod nr) is at k·nr + n mod nr; the emitter adds the panel's base.
    let b = View {
        shape: vec![panels.k, panels.n],
        strides: vec![panels.nr, 1],
        offset: 0,
        dtype: DType::F32,
        buffer_len: panels.len(),
    };
    let p = Problem::new(a, &b, bias, activation, out)?;
    if p.m == 0 {
        return Err(unsupported("no rows".into()));
    }
    Ok(emit_problem(symbol, &p, Some(panels), target))
}

/// A row count M known only at run time (`docs/dynamic-shapes.md`): the operands' views are
/// sized for the largest M, and the kernel computes the run's M on entry.
pub struct RunRows<'a> {
    /// Emits the run's M as an `index` value at the top of the body.
    pub value: &'a dyn Fn(&mut Body) -> String,
    /// The extra parameter `value` reads (the run's symbol values), before `%begin`.
    pub param: String,
    /// The M the layout choices are made for (the symbols' hints), as a static kernel at that
    /// M would make them.
    pub plan: usize,
}

/// How [`emit_run_rows`] split its range: `column_blocks × ⌈M / row_tile⌉` iterations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowTiling {
    pub column_blocks: usize,
    pub row_tile: usize,
}

/// [`emit`] (or [`emit_prepacked`] with `panels`) for 2-D operands whose M is known only at run
/// time: `a [M_max, K]`, `out [M_max, N]` and the bias are views at the largest M. The f32
/// micro-kernel runs unchanged on whole row tiles; the rows left over, fewer than a tile, run
/// as a tile of exactly that many rows (at least [`TAIL_MIN_ROWS`], the rows past the run
/// reading its last row and not stored). The kernel's range at the largest M is returned
/// with the tiling it decomposes into, from which the caller writes the run's range.
#[allow(clippy::too_many_arguments)]
pub fn emit_run_rows(
    symbol: &str,
    a: &View,
    b: &View,
    panels: Option<Panels>,
    bias: Option<&View>,
    activation: Activation,
    out: &View,
    target: &dyn Target,
    rows: &RunRows<'_>,
) -> Result<(Kernel, RowTiling), CodegenError> {
    let unsupported = |msg: String| CodegenError::Unsupported(format!("matmul over run-time rows: {msg}"));
    if [a, b, out].into_iter().chain(bias).any(|v| v.rank() != 2) || out.dtype != DType::F32 {
        return Err(unsupported("only 2-D f32 operands".into()));
    }
    let b = match panels {
        Some(panels) => {
            if panels != Panels::for_target(panels.k, panels.n, target) {
                return Err(unsupported(format!("{panels:?} is not the layout of this target")));
            }
            View {
                shape: vec![panels.k, panels.n],
                strides: vec![panels.nr, 1],
                offset: 0,
                dtype: DType::F32,
                buffer_len: panels.len(),
            }
        }
        None => b.clone(),
    };
    let p = Problem::new(a, &b, bias, activation, out)?;
    if p.m == 0 || p.k == 0 || p.n == 0 {
        return Err(unsupported("an empty product".into()));
    }
    let tiled = Tiled::new(&p, panels.is_some(), target, Some(rows));
    let tiling = RowTiling { column_blocks: tiled.nbn, row_tile: tiled.mr };
    Ok((function(symbol, &p, Some(rows), tiled.emit()), tiling))
}

/// The layout a constant B (a weight) is stored in when it is packed at compile time: panel
/// `p` holds columns `[p·nr, (p+1)·nr)` for all K rows, row after row, zero past column N, so
/// element `(k, n)` is at `(n / nr)·K·nr + k·nr + n mod nr`. This is the layout the f32
/// micro-kernel streams B in; storing weights this way removes the per-call packing, which
/// costs as much as the arithmetic when there are only ~100 rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Panels {
    pub k: usize,
    pub n: usize,
    /// Panel width: the micro-kernel's tile width on the target.
    pub nr: usize,
}

impl Panels {
    /// The layout of a `k × n` B for `target`'s micro-kernel.
    pub fn for_target(k: usize, n: usize, target: &dyn Target) -> Panels {
        Panels { k, n, nr: Tiled::NV * target.f32_lanes().max(1) }
    }

    /// Whether products of `dtype` with this B use the micro-kernel (and so can read panels).
    pub fn applies(dtype: DType, k: usize, n: usize) -> bool {
        dtype == DType::F32 && k > 0 && n > 0
    }

    /// Elements of the packed buffer.
    pub fn len(&self) -> usize {
        self.n.div_ceil(self.nr) * self.k * self.nr
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Packs B, whose element `(k, n)` is `src[offset + k·sk + n·sn]`. `None` when that
    /// reaches past `src`.
    pub fn pack(&self, src: &[f32], offset: usize, sk: usize, sn: usize) -> Option<Vec<f32>> {
        if self.k == 0 || self.n == 0 || offset + (self.k - 1) * sk + (self.n - 1) * sn >= src.len() {
            return None;
        }
        let mut out = vec![0.0f32; self.len()];
        for (p, panel) in out.chunks_exact_mut(self.k * self.nr).enumerate() {
            for (k, row) in panel.chunks_exact_mut(self.nr).enumerate() {
                let cols = (self.n - p * self.nr).min(self.nr);
                for (j, x) in row[..cols].iter_mut().enumerate() {
                    *x = src[offset + k * sk + (p * self.nr + j) * sn];
                }
            }
        }
        Some(out)
    }
}

fn emit_problem(symbol: &str, p: &Problem, packed: Option<Panels>, target: &dyn Target) -> Kernel {
    let body = if p.dtype == DType::F32 && p.k > 0 && p.m > 0 && p.n > 0 {
        Tiled::new(p, packed.is_some(), target, None).emit()
    } else {
        p.emit_scalar()
    };
    function(symbol, p, None, body)
}

/// The kernel around `body` (its text, range and grain): a, b, (bias), out, then the run's
/// symbol values when `run` gives the row count.
fn function(
    symbol: &str,
    p: &Problem,
    run: Option<&RunRows<'_>>,
    (text, range, grain): (String, usize, usize),
) -> Kernel {
    let mut args = vec![format!("%a: {}", p.a.memref()), format!("%b: {}", p.b.memref())];
    if let Some(c) = &p.bias {
        args.push(format!("%bias: {}", c.memref()));
    }
    args.push(format!("%out: {}", p.out.memref()));
    if let Some(r) = run {
        args.push(r.param.clone());
    }
    let mlir = format!("func.func @{symbol}({}, %begin: index, %end: index) {{\n{text}}}\n", args.join(", "));
    let (bn, m, n, k) = (p.batch as u64, p.m as u64, p.n as u64, p.k as u64);
    let flops = 2 * bn * m * n * k;
    let elem = p.dtype.size_bytes() as u64;
    let bytes = (distinct(&p.a) + distinct(&p.b) + distinct(&p.out)) as u64 * elem;
    Kernel { symbol: symbol.into(), mlir, range, grain: grain.max(1), flops, bytes }
}

/// The checked operands, every view brought to the output's rank and batch shape.
struct Problem {
    a: View,
    b: View,
    bias: Option<View>,
    out: View,
    act: Activation,
    dtype: DType,
    /// Batch axes (rank − 2) and their product.
    lead: usize,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
}

impl Problem {
    fn new(
        a: &View,
        b: &View,
        bias: Option<&View>,
        act: Activation,
        out: &View,
    ) -> Result<Problem, CodegenError> {
        let unsupported = |msg: String| CodegenError::Unsupported(format!("matmul: {msg}"));
        let dtype = out.dtype;
        if dtype == DType::Bool {
            return Err(unsupported("bool is not a matmul dtype".into()));
        }
        if let Some(v) = [a, b].into_iter().chain(bias).find(|v| v.dtype != dtype) {
            return Err(unsupported(format!("operands of {} and {} differ in dtype", v.dtype, dtype)));
        }
        if !dtype.is_float() && !matches!(act, Activation::None | Activation::Relu) {
            return Err(unsupported(format!("activation {} on integer dtype {dtype}", act.name())));
        }
        let r = out.rank();
        if r < 2 || a.rank() < 2 || b.rank() < 2 || a.rank() > r || b.rank() > r {
            return Err(unsupported(format!(
                "operand ranks a {}, b {}, out {} (want at least 2, a and b at most out's)",
                a.rank(),
                b.rank(),
                r
            )));
        }
        let lead = r - 2;
        let (m, n) = (out.shape[lead], out.shape[lead + 1]);
        let k = a.shape[a.rank() - 1];
        let batch_shape = &out.shape[..lead];
        let full = |rows: usize, cols: usize| {
            let mut s = batch_shape.to_vec();
            s.extend([rows, cols]);
            s
        };
        let a = fit(a, &full(m, k), 2, "a")?;
        let b = fit(b, &full(k, n), 2, "b")?;
        let bias = bias.map(|c| fit(c, &full(m, n), 0, "bias")).transpose()?;
        let out = fit(out, &full(m, n), 2, "out")?;
        if out.shape.iter().zip(&out.strides).any(|(&d, &s)| d > 1 && s == 0) {
            return Err(unsupported("the output view broadcasts (stride 0)".into()));
        }
        let batch = batch_shape.iter().product();
        let mut p = Problem { a, b, bias, out, act, dtype, lead, batch, m, k, n };
        while p.lead > 0 && p.batch_axis_is_more_rows() {
            p.merge_batch_axis_into_rows();
        }
        Ok(p)
    }

    /// Whether the innermost batch axis just continues the rows: a, out (and bias) step over it
    /// by M rows, and B is the same for every index of it (a weight shared across the batch).
    /// The product is then one taller matrix product, so row tiles run across batch elements
    /// (no edge tile per element) and each packed panel of B serves all their rows.
    fn batch_axis_is_more_rows(&self) -> bool {
        let (ax, row) = (self.lead - 1, self.lead);
        let continues = |v: &View| v.strides[ax] == self.m * v.strides[row];
        self.b.strides[ax] == 0
            && continues(&self.a)
            && continues(&self.out)
            && self.bias.as_ref().is_none_or(continues)
    }

    /// Folds the innermost batch axis into M (see [`Problem::batch_axis_is_more_rows`]).
    fn merge_batch_axis_into_rows(&mut self) {
        let ax = self.lead - 1;
        let d = self.out.shape[ax];
        for v in [&mut self.a, &mut self.out].into_iter().chain(self.bias.as_mut()) {
            v.shape.remove(ax);
            v.strides.remove(ax);
            v.shape[ax] *= d;
        }
        self.b.shape.remove(ax);
        self.b.strides.remove(ax);
        self.m *= d;
        self.batch /= d;
        self.lead -= 1;
    }

    /// The generic path: one range iteration per output row, a scalar dot product per element.
    fn emit_scalar(&self) -> (String, usize, usize) {
        let range = self.batch * self.m;
        let flops = 2 * (self.batch * self.m * self.n * self.k) as u64;
        let elem = mlir_elem(self.dtype);
        let half = matches!(self.dtype, DType::F16 | DType::BF16);
        let acc_ty = if half { "f32" } else { elem };
        let float = self.dtype.is_float();
        let lead = self.lead;
        let mut b = Body::new();
        if range == 0 || self.n == 0 {
            b.line("return");
            return (b.finish(), range, 1);
        }
        let one = b.index(1);
        let zero = b.index(0);
        let mc = b.index(self.m);
        let it = b.fresh("it");
        b.open(format!("scf.for {it} = %begin to %end step {one}"));
        let bt = b.assign(format!("arith.divui {it}, {mc} : index"));
        let i = b.assign(format!("arith.remui {it}, {mc} : index"));
        let a0 = self.a.leading_offset_expr(&mut b, &bt, lead);
        let b0 = self.b.leading_offset_expr(&mut b, &bt, lead);
        let o0 = self.out.leading_offset_expr(&mut b, &bt, lead);
        let c0 = self.bias.as_ref().map(|c| c.leading_offset_expr(&mut b, &bt, lead));
        let arow = add_scaled(&mut b, &a0, &i, self.a.strides[lead]);
        let orow = add_scaled(&mut b, &o0, &i, self.out.strides[lead]);
        let crow = match (&self.bias, &c0) {
            (Some(c), Some(c0)) => Some(add_scaled(&mut b, c0, &i, c.strides[lead])),
            _ => None,
        };
        let nc = b.index(self.n);
        let kcnt = b.index(self.k);
        let j = b.fresh("j");
        b.open(format!("scf.for {j} = {zero} to {nc} step {one}"));
        let bcol = add_scaled(&mut b, &b0, &j, self.b.strides[lead + 1]);
        let init = if float { b.float(0.0, acc_ty) } else { b.int(0, acc_ty) };
        let sum = b.fresh("sum");
        let kk = b.fresh("k");
        let s = b.fresh("s");
        b.open(format!(
            "{sum} = scf.for {kk} = {zero} to {kcnt} step {one} iter_args({s} = {init}) -> ({acc_ty})"
        ));
        let ai = add_scaled(&mut b, &arow, &kk, self.a.strides[lead + 1]);
        let bi = add_scaled(&mut b, &bcol, &kk, self.b.strides[lead]);
        let x = self.load_scalar(&mut b, "%a", &self.a, &ai, half);
        let y = self.load_scalar(&mut b, "%b", &self.b, &bi, half);
        let next = if float {
            b.fma(&x, &y, &s, acc_ty)
        } else {
            let p = b.assign(format!("arith.muli {x}, {y} : {acc_ty}"));
            b.assign(format!("arith.addi {s}, {p} : {acc_ty}"))
        };
        b.line(format!("scf.yield {next} : {acc_ty}"));
        b.close("");
        let mut v = sum;
        if let (Some(c), Some(crow)) = (&self.bias, &crow) {
            let ci = add_scaled(&mut b, crow, &j, c.strides[lead + 1]);
            let x = self.load_scalar(&mut b, "%bias", c, &ci, half);
            v = if float {
                b.fadd(&v, &x, acc_ty)
            } else {
                b.assign(format!("arith.addi {v}, {x} : {acc_ty}"))
            };
        }
        v = if float {
            activate(&mut b, self.act, &v, acc_ty)
        } else if self.act == Activation::Relu {
            let z = b.int(0, acc_ty);
            b.assign(format!("arith.maxsi {v}, {z} : {acc_ty}"))
        } else {
            v
        };
        if self.dtype == DType::BF16 {
            v = truncate_bf16(&mut b, &v);
        } else if half {
            v = b.assign(format!("arith.truncf {v} : f32 to {elem}"));
        }
        let oi = add_scaled(&mut b, &orow, &j, self.out.strides[lead + 1]);
        b.line(format!("memref.store {v}, %out[{oi}] : {}", self.out.memref()));
        b.close("");
        b.close("");
        b.line("return");
        (b.finish(), range, Kernel::grain_for(range, flops))
    }

    fn load_scalar(&self, b: &mut Body, mem: &str, view: &View, idx: &str, widen: bool) -> String {
        let x = b.assign(format!("memref.load {mem}[{idx}] : {}", view.memref()));
        if widen {
            b.assign(format!("arith.extf {x} : {} to f32", view.elem()))
        } else {
            x
        }
    }
}

/// Elements a view actually covers (a broadcast axis counts once).
fn distinct(v: &View) -> usize {
    v.shape.iter().zip(&v.strides).filter(|(_, &s)| s != 0).map(|(d, _)| d).product()
}

/// `view` as a view of shape `full`: missing leading axes and size-1 axes broadcast (stride 0),
/// except the last `exact` axes, which must match. Fails when a size differs otherwise, or when
/// the view reaches past its buffer.
fn fit(view: &View, full: &[usize], exact: usize, what: &str) -> Result<View, CodegenError> {
    let unsupported = |msg: String| CodegenError::Unsupported(format!("matmul: {msg}"));
    if view.rank() > full.len() {
        return Err(unsupported(format!("{what} has rank {}, more than {}", view.rank(), full.len())));
    }
    let pad = full.len() - view.rank();
    let mut strides = vec![0; full.len()];
    for (k, &want) in full.iter().enumerate() {
        if k < pad {
            continue;
        }
        let (d, s) = (view.shape[k - pad], view.strides[k - pad]);
        strides[k] = match d {
            _ if d == want => s,
            1 if k + exact < full.len() => 0,
            _ => {
                return Err(unsupported(format!(
                    "{what} has shape {:?}, which does not broadcast to {full:?}",
                    view.shape
                )))
            }
        };
    }
    let fitted = View { shape: full.to_vec(), strides, ..view.clone() };
    if fitted.numel() > 0 {
        let last: usize =
            fitted.offset + fitted.shape.iter().zip(&fitted.strides).map(|(d, s)| (d - 1) * s).sum::<usize>();
        if last >= fitted.buffer_len {
            return Err(unsupported(format!(
                "{what} reaches element {last} of a buffer of {}",
                fitted.buffer_len
            )));
        }
    }
    Ok(fitted)
}

/// f32 → bf16, rounding to nearest even, in integer arithmetic: LLVM would otherwise call
/// `__truncsfbf2`, which the kernels' shared objects do not link.
fn truncate_bf16(b: &mut Body, x: &str) -> String {
    let bits = b.assign(format!("arith.bitcast {x} : f32 to i32"));
    let c16 = b.int(16, "i32");
    let one = b.int(1, "i32");
    let half = b.int(0x7FFF, "i32");
    let odd = b.assign(format!("arith.shrui {bits}, {c16} : i32"));
    let odd = b.assign(format!("arith.andi {odd}, {one} : i32"));
    let r = b.assign(format!("arith.addi {bits}, {half} : i32"));
    let r = b.assign(format!("arith.addi {r}, {odd} : i32"));
    let nan = b.fcmp("uno", x, x, "f32");
    let quiet = b.int(0x0040_0000, "i32");
    let q = b.assign(format!("arith.ori {bits}, {quiet} : i32"));
    let r = b.select(&nan, &q, &r, "i32");
    let hi = b.assign(format!("arith.shrui {r}, {c16} : i32"));
    let hi = b.assign(format!("arith.trunci {hi} : i32 to i16"));
    b.assign(format!("arith.bitcast {hi} : i16 to bf16"))
}

/// Whether a is copied into contiguous blocks first: when K is strided, or when there are many
/// rows far apart (each micro-kernel row stream then costs a TLB entry, and rows 4 KiB apart
/// alias in L1 sets; measured +3% on 4096³, neutral on 1024³, a loss on 128-row products).
fn pack_a_policy(p: &Problem, m: usize) -> bool {
    let (sam, sak) = (p.a.strides[p.lead], p.a.strides[p.lead + 1]);
    sak != 1 || (sam >= 1024 && m >= 256)
}

/// `base + i·stride` as index arithmetic (nothing emitted for stride 0, no multiply for 1).
fn add_scaled(b: &mut Body, base: &str, i: &str, stride: usize) -> String {
    match stride {
        0 => base.to_string(),
        1 => b.assign(format!("arith.addi {base}, {i} : index")),
        s => {
            let c = b.index(s);
            let t = b.assign(format!("arith.muli {i}, {c} : index"));
            b.assign(format!("arith.addi {base}, {t} : index"))
        }
    }
}

/// The activation applied to `x` of float type `ty` (scalar or vector).
pub(crate) fn activate(b: &mut Body, act: Activation, x: &str, ty: &str) -> String {
    match act {
        Activation::None => x.to_string(),
        Activation::Relu => b.relu(x, ty),
        Activation::Gelu(approx) => b.gelu(x, approx == GeluApprox::Tanh, ty),
        Activation::Sigmoid => b.sigmoid(x, ty),
        Activation::Tanh => b.tanh(x, ty),
        Activation::Silu => b.silu(x, ty),
    }
}

/// Which K block a micro-tile computes: whether C starts from zero or from its partial sums,
/// and whether the epilogue (bias, activation) runs before the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Only,
    First,
    Middle,
    Last,
}

impl Block {
    fn loads_c(self) -> bool {
        matches!(self, Block::Middle | Block::Last)
    }
    fn finishes(self) -> bool {
        matches!(self, Block::Only | Block::Last)
    }
}

/// The f32 micro-kernel emitter; sizes are in elements.
struct Tiled<'p> {
    p: &'p Problem,
    lanes: usize,
    /// Vectors per tile row; the tile is `mr × nr` with `nr = nv·lanes`.
    nv: usize,
    mr: usize,
    nr: usize,
    mc: usize,
    kc: usize,
    kblocks: usize,
    /// Columns per column block (a multiple of `nr`) and the number of blocks.
    nb: usize,
    nbn: usize,
    /// Row tiles (`⌈M / mr⌉`).
    mt: usize,
    vty: String,
    /// The packed B's memref: per-call scratch, or the argument itself when `prepacked`.
    bp_ty: String,
    /// Whether `%b` is already in [`Panels`] layout (nothing is packed per call).
    prepacked: bool,
    /// Whether each `MC×KC` block of a is first copied, row by row, into contiguous scratch
    /// (`ap_ty`), and the micro-kernel reads it from there.
    pack_a: bool,
    ap_ty: String,
    /// The run-time M, when M is not `p.m` (then the largest M).
    run: Option<&'p RunRows<'p>>,
}

/// Per-group SSA values: the batch's operand offsets and the column block.
struct Group {
    a0: String,
    b0: String,
    c0: Option<String>,
    o0: String,
    n0: String,
    r0: String,
    r1: String,
    full_panels: String,
    rem: String,
    /// The packed-a scratch buffer, when a is packed.
    ap: Option<String>,
}

impl<'p> Tiled<'p> {
    /// Vectors per tile row.
    const NV: usize = 2;

    fn new(p: &'p Problem, prepacked: bool, target: &dyn Target, run: Option<&'p RunRows<'p>>) -> Tiled<'p> {
        let lanes = target.f32_lanes().max(1);
        let regs = target.vector_registers().max(8);
        let nv = Self::NV;
        let mr = ((regs - nv - 1) / nv).clamp(1, 12);
        let nr = nv * lanes;
        let mc = MC_TARGET.div_ceil(mr) * mr;
        let kblocks = p.k.div_ceil(KC_MAX);
        let kc = p.k.div_ceil(kblocks);
        let m_plan = run.map_or(p.m, |r| r.plan.clamp(1, p.m));
        // Column blocks as a static product of the planned rows would have them: wide ones
        // for many rows (fewer passes over a), more of them for few (work for every thread).
        let nb_target = if m_plan * p.batch >= ROWS_LARGE { NB_LARGE } else { NB_SMALL };
        let nbn = p.n.div_ceil(nb_target);
        let nb = p.n.div_ceil(nbn).div_ceil(nr) * nr;
        let nbn = p.n.div_ceil(nb);
        let vty = format!("vector<{lanes}xf32>");
        let bp_ty = if prepacked { p.b.memref() } else { format!("memref<{}xf32>", kc * nb) };
        let pack_a = pack_a_policy(p, m_plan);
        let ap_ty = format!("memref<{}xf32>", mc * kc + lanes);
        Tiled {
            p,
            lanes,
            nv,
            mr,
            nr,
            mc,
            kc,
            kblocks,
            nb,
            nbn,
            mt: p.m.div_ceil(mr),
            vty,
            bp_ty,
            prepacked,
            pack_a,
            ap_ty,
            run,
        }
    }

    /// The kernel body, its range and grain.
    fn emit(&self) -> (String, usize, usize) {
        let p = self.p;
        let range = p.batch * self.nbn * self.mt;
        let flops = 2 * (p.batch * p.m * p.n * p.k) as u64;
        let mut b = Body::new();
        let one = b.index(1);
        let bp = if self.prepacked {
            "%b".to_string()
        } else {
            b.assign(format!("memref.alloc() {{alignment = 64 : i64}} : {}", self.bp_ty))
        };
        let ap = self
            .pack_a
            .then(|| b.assign(format!("memref.alloc() {{alignment = 64 : i64}} : {}", self.ap_ty)));
        // Row tiles per column block, and M: constants, or the run's.
        let (mt, mcount) = match self.run {
            None => (b.index(self.mt), b.index(p.m)),
            Some(run) => {
                let m = (run.value)(&mut b);
                let (mrc, c1) = (b.index(self.mr), b.index(1));
                let mt = b.assign(format!("arith.ceildivui {m}, {mrc} : index"));
                (b.assign(format!("arith.maxui {mt}, {c1} : index")), m)
            }
        };
        let g0 = b.assign(format!("arith.divui %begin, {mt} : index"));
        let gend = b.assign(format!("arith.ceildivui %end, {mt} : index"));
        let g = b.fresh("g");
        b.open(format!("scf.for {g} = {g0} to {gend} step {one}"));
        let gbase = b.assign(format!("arith.muli {g}, {mt} : index"));
        let lo = b.assign(format!("arith.maxui %begin, {gbase} : index"));
        let lo = b.assign(format!("arith.subi {lo}, {gbase} : index"));
        let gtop = b.assign(format!("arith.addi {gbase}, {mt} : index"));
        let hi = b.assign(format!("arith.minui %end, {gtop} : index"));
        let hi = b.assign(format!("arith.subi {hi}, {gbase} : index"));
        let nonempty = b.assign(format!("arith.cmpi ult, {lo}, {hi} : index"));
        b.open(format!("scf.if {nonempty}"));
        let mrc = b.index(self.mr);
        let r0 = b.assign(format!("arith.muli {lo}, {mrc} : index"));
        let r1 = b.assign(format!("arith.muli {hi}, {mrc} : index"));
        let r1 = b.assign(format!("arith.minui {r1}, {mcount} : index"));
        self.group(&mut b, &bp, ap.clone(), &g, (&r0, &r1));
        b.close("");
        b.close("");
        if !self.prepacked {
            b.line(format!("memref.dealloc {bp} : {}", self.bp_ty));
        }
        if let Some(ap) = &ap {
            b.line(format!("memref.dealloc {ap} : {}", self.ap_ty));
        }
        b.line("return");
        // A chunk packs its column block once: give each task at least a few row tiles.
        let grain = Kernel::grain_for(range, flops);
        let grain = if self.prepacked { grain } else { grain.max(4.min(self.mt)) };
        (b.finish(), range, grain)
    }

    /// Rows `[r0, r1)` of group `g` (batch index · column blocks + column block): every K block
    /// over them.
    fn group(&self, b: &mut Body, bp: &str, ap: Option<String>, g: &str, (r0, r1): (&str, &str)) {
        let p = self.p;
        let nbn = b.index(self.nbn);
        let bt = b.assign(format!("arith.divui {g}, {nbn} : index"));
        let nbi = b.assign(format!("arith.remui {g}, {nbn} : index"));
        let lead = p.lead;
        let a0 = p.a.leading_offset_expr(b, &bt, lead);
        let b0 = p.b.leading_offset_expr(b, &bt, lead);
        let c0 = p.bias.as_ref().map(|c| c.leading_offset_expr(b, &bt, lead));
        let o0 = p.out.leading_offset_expr(b, &bt, lead);
        let nbc = b.index(self.nb);
        let n0 = b.assign(format!("arith.muli {nbi}, {nbc} : index"));
        let ncount = b.index(p.n);
        let left = b.assign(format!("arith.subi {ncount}, {n0} : index"));
        let ncols = b.assign(format!("arith.minui {left}, {nbc} : index"));
        let nrc = b.index(self.nr);
        let full_panels = b.assign(format!("arith.divui {ncols}, {nrc} : index"));
        let rem = b.assign(format!("arith.remui {ncols}, {nrc} : index"));
        let (r0, r1) = (r0.to_string(), r1.to_string());
        let grp = Group { a0, b0, c0, o0, n0, r0, r1, full_panels, rem, ap };
        let last_kc = p.k - (self.kblocks - 1) * self.kc;
        if self.kblocks == 1 {
            let pc = b.index(0);
            self.kblock(b, bp, &grp, &pc, last_kc, Block::Only);
        } else {
            let pc = b.index(0);
            self.kblock(b, bp, &grp, &pc, self.kc, Block::First);
            if self.kblocks > 2 {
                let lo = b.index(self.kc);
                let hi = b.index((self.kblocks - 1) * self.kc);
                let step = b.index(self.kc);
                let pc = b.fresh("pc");
                b.open(format!("scf.for {pc} = {lo} to {hi} step {step}"));
                self.kblock(b, bp, &grp, &pc, self.kc, Block::Middle);
                b.close("");
            }
            let pc = b.index((self.kblocks - 1) * self.kc);
            self.kblock(b, bp, &grp, &pc, last_kc, Block::Last);
        }
    }

    /// One K block of the group: pack B rows `[pc, pc+kc)`, then every (row tile, panel).
    fn kblock(&self, b: &mut Body, bp: &str, g: &Group, pc: &str, kc: usize, mode: Block) {
        if !self.prepacked {
            self.pack(b, bp, g, pc, kc);
        }
        let one = b.index(1);
        let zero = b.index(0);
        let mcc = b.index(self.mc);
        let mrc = b.index(self.mr);
        let edge_rows = self.p.m % self.mr;
        let edge_cols = !self.p.n.is_multiple_of(self.nr);
        let ic = b.fresh("ic");
        b.open(format!("scf.for {ic} = {} to {} step {mcc}", g.r0, g.r1));
        let top = b.assign(format!("arith.addi {ic}, {mcc} : index"));
        let ie = b.assign(format!("arith.minui {top}, {} : index", g.r1));
        let rows = b.assign(format!("arith.subi {ie}, {ic} : index"));
        let tiles = b.assign(format!("arith.divui {rows}, {mrc} : index"));
        let tail_row = b.assign(format!("arith.muli {tiles}, {mrc} : index"));
        let tail_row = b.assign(format!("arith.addi {ic}, {tail_row} : index"));
        let has_tail = b.assign(format!("arith.cmpi ult, {tail_row}, {ie} : index"));
        if let Some(ap) = &g.ap {
            self.pack_a_block(b, ap, g, &ic, &ie, pc, kc);
        }
        let panels = |b: &mut Body, panel: &str, valid: Option<&str>| {
            let t = b.fresh("t");
            b.open(format!("scf.for {t} = {zero} to {tiles} step {one}"));
            let row = b.assign(format!("arith.muli {t}, {mrc} : index"));
            let row = b.assign(format!("arith.addi {ic}, {row} : index"));
            self.tile(b, bp, g, &ic, (&row, None), self.mr, panel, valid, pc, kc, mode);
            b.close("");
            if self.run.is_some() {
                // A run-time tail of t < mr rows: a tile of exactly t rows, or of TAIL_MIN_ROWS
                // for fewer, its rows past t reading row t − 1 and not stored. (A tile of one or
                // two rows waits on its few accumulators' FMA latency: four cost the same.)
                b.open(format!("scf.if {has_tail}"));
                let t = b.assign(format!("arith.subi {ie}, {tail_row} : index"));
                let sizes: Vec<usize> = (TAIL_MIN_ROWS.min(self.mr - 1).max(1)..self.mr).collect();
                let mut open = 0;
                for (i, &size) in sizes.iter().enumerate() {
                    if i + 1 < sizes.len() {
                        let cap = b.index(size);
                        let fits = b.assign(format!("arith.cmpi ule, {t}, {cap} : index"));
                        b.open(format!("scf.if {fits}"));
                        self.tile(b, bp, g, &ic, (&tail_row, Some(&t)), size, panel, valid, pc, kc, mode);
                        b.close("");
                        b.open("else");
                        open += 1;
                    } else {
                        self.tile(b, bp, g, &ic, (&tail_row, Some(&t)), size, panel, valid, pc, kc, mode);
                    }
                }
                for _ in 0..open {
                    b.close("");
                }
                b.close("");
            } else if edge_rows != 0 {
                b.open(format!("scf.if {has_tail}"));
                self.tile(b, bp, g, &ic, (&tail_row, None), edge_rows, panel, valid, pc, kc, mode);
                b.close("");
            }
        };
        let pnl = b.fresh("p");
        b.open(format!("scf.for {pnl} = {zero} to {} step {one}", g.full_panels));
        panels(b, &pnl, None);
        b.close("");
        if edge_cols {
            let some = b.assign(format!("arith.cmpi ne, {}, {zero} : index", g.rem));
            b.open(format!("scf.if {some}"));
            panels(b, &g.full_panels, Some(&g.rem));
            b.close("");
        }
        b.close("");
    }

    /// Copies rows `[ic, ie)`, columns `[pc, pc+kc)` of a to `ap`, row `i` at `(i − ic)·kc_max`.
    /// A transposed a (unit stride along M: the activations of a weight gradient, `xᵀ·dy`) is
    /// copied in `lanes × lanes` squares, `lanes` vector loads along M transposed in registers
    /// into `lanes` row pieces, and only the rows and columns past the last whole square one
    /// element at a time.
    #[allow(clippy::too_many_arguments)]
    fn pack_a_block(&self, b: &mut Body, ap: &str, g: &Group, ic: &str, ie: &str, pc: &str, kc: usize) {
        let p = self.p;
        let (sam, sak) = (p.a.strides[p.lead], p.a.strides[p.lead + 1]);
        let l = self.lanes;
        if !(sam == 1 && sak != 1 && l.is_power_of_two() && l >= 2 && kc >= l) {
            self.pack_a_rows(b, ap, g, ic, ie, ic, pc, 0, kc);
            return;
        }
        let lc = b.index(l);
        let rows = b.assign(format!("arith.subi {ie}, {ic} : index"));
        let squares = b.assign(format!("arith.divui {rows}, {lc} : index"));
        let covered = b.assign(format!("arith.muli {squares}, {lc} : index"));
        let mid = b.assign(format!("arith.addi {ic}, {covered} : index"));
        let main = kc / l * l;
        // A row's last partial vector is stored whole and spills zeros into the next row's
        // first elements: each row's tail goes before anything later rows hold.
        if main < kc {
            self.pack_a_rows(b, ap, g, ic, &mid, ic, pc, main, kc);
        }
        self.pack_a_transposed(b, ap, g, ic, &mid, pc, main);
        self.pack_a_rows(b, ap, g, &mid, ie, ic, pc, 0, kc);
    }

    /// Copies rows `[lo, hi)` of a (`hi − lo` a multiple of lanes), columns `[pc, pc+k_hi)`
    /// (`k_hi` a multiple of lanes), of an a with unit stride along M, by in-register transposes.
    #[allow(clippy::too_many_arguments)]
    fn pack_a_transposed(
        &self,
        b: &mut Body,
        ap: &str,
        g: &Group,
        lo: &str,
        hi: &str,
        pc: &str,
        k_hi: usize,
    ) {
        let p = self.p;
        let sak = p.a.strides[p.lead + 1];
        let l = self.lanes;
        let am = p.a.memref();
        let vty = self.vty.clone();
        let zero = b.index(0);
        let lc = b.index(l);
        let kcmax = b.index(self.kc);
        let start = add_scaled(b, &g.a0, pc, sak);
        let i = b.fresh("iq");
        b.open(format!("scf.for {i} = {lo} to {hi} step {lc}"));
        let src = b.assign(format!("arith.addi {start}, {i} : index"));
        let hic = b.index(k_hi);
        let k = b.fresh("kq");
        b.open(format!("scf.for {k} = {zero} to {hic} step {lc}"));
        let srck = add_scaled(b, &src, &k, sak);
        let cols: Vec<String> = (0..l)
            .map(|t| {
                let c = b.index(t * sak);
                let at = b.assign(format!("arith.addi {srck}, {c} : index"));
                b.assign(format!("vector.load %a[{at}] : {am}, {vty}"))
            })
            .collect();
        let rows = b.transpose(&cols, &vty);
        for (t, y) in rows.iter().enumerate() {
            let tc = b.index(t);
            let r = b.assign(format!("arith.addi {i}, {tc} : index"));
            let r = b.assign(format!("arith.subi {r}, {lo} : index"));
            let d = b.assign(format!("arith.muli {r}, {kcmax} : index"));
            let d = b.assign(format!("arith.addi {d}, {k} : index"));
            b.line(format!("vector.store {y}, {ap}[{d}] : {}, {vty}", self.ap_ty));
        }
        b.close("");
        b.close("");
    }

    /// Copies rows `[lo, hi)`, columns `[pc + k_lo, pc + k_hi)` of a to `ap` element by element
    /// along K (a vector at a time), row `i` at `(i − ic)·kc_max + k`.
    #[allow(clippy::too_many_arguments)]
    fn pack_a_rows(
        &self,
        b: &mut Body,
        ap: &str,
        g: &Group,
        lo: &str,
        hi: &str,
        ic: &str,
        pc: &str,
        k_lo: usize,
        k_hi: usize,
    ) {
        let p = self.p;
        let (sam, sak) = (p.a.strides[p.lead], p.a.strides[p.lead + 1]);
        let am = p.a.memref();
        let (l, vty) = (self.lanes, self.vty.clone());
        let one = b.index(1);
        let kcmax = b.index(self.kc);
        let start = add_scaled(b, &g.a0, pc, sak);
        let i = b.fresh("ia");
        b.open(format!("scf.for {i} = {lo} to {hi} step {one}"));
        let src = add_scaled(b, &start, &i, sam);
        let rel = b.assign(format!("arith.subi {i}, {ic} : index"));
        let dst = b.assign(format!("arith.muli {rel}, {kcmax} : index"));
        let main = k_lo + (k_hi - k_lo) / l * l;
        if main > k_lo {
            let (from, to) = (b.index(k_lo), b.index(main));
            let lc = b.index(l);
            let k = b.fresh("ka");
            b.open(format!("scf.for {k} = {from} to {to} step {lc}"));
            let s = add_scaled(b, &src, &k, sak);
            let x = self.load_vec(b, "%a", &am, &s, sak, 0, None);
            let d = b.assign(format!("arith.addi {dst}, {k} : index"));
            b.line(format!("vector.store {x}, {ap}[{d}] : {}, {vty}", self.ap_ty));
            b.close("");
        }
        if main < k_hi {
            let mc = b.index(main);
            let s = add_scaled(b, &src, &mc, sak);
            let valid = b.index(k_hi - main);
            let x = self.load_vec(b, "%a", &am, &s, sak, 0, Some(&valid));
            let d = b.assign(format!("arith.addi {dst}, {mc} : index"));
            b.line(format!("vector.store {x}, {ap}[{d}] : {}, {vty}", self.ap_ty));
        }
        b.close("");
    }

    /// Packs rows `[pc, pc+kc)` of the group's column block of B into `bp`: panel `p` holds
    /// `kc` rows of `nr` columns at `p·kc_max·nr`, zero-padded past the last column. A
    /// transposed B (unit stride along K) is packed by in-register `lanes×lanes` transposes.
    fn pack(&self, b: &mut Body, bp: &str, g: &Group, pc: &str, kc: usize) {
        let p = self.p;
        let (sk, sn) = (p.b.strides[p.lead], p.b.strides[p.lead + 1]);
        let l = self.lanes;
        if sk == 1 && sn != 1 && l.is_power_of_two() && l >= 2 && kc >= l {
            let k8 = kc / l * l;
            self.pack_transposed(b, bp, g, pc, k8);
            self.pack_rows(b, bp, g, pc, k8, kc, true, false);
            self.pack_rows(b, bp, g, pc, 0, kc, false, true);
        } else {
            self.pack_rows(b, bp, g, pc, 0, kc, true, true);
        }
    }

    /// Packs rows `[k_lo, k_hi)` of the K block row by row: the full panels, the edge panel, or
    /// both.
    #[allow(clippy::too_many_arguments)]
    fn pack_rows(
        &self,
        b: &mut Body,
        bp: &str,
        g: &Group,
        pc: &str,
        k_lo: usize,
        k_hi: usize,
        full: bool,
        edge: bool,
    ) {
        let p = self.p;
        let edge = edge && !p.n.is_multiple_of(self.nr);
        if k_lo >= k_hi || !(full || edge) {
            return;
        }
        let (sk, sn) = (p.b.strides[p.lead], p.b.strides[p.lead + 1]);
        let one = b.index(1);
        let zero = b.index(0);
        let lo = b.index(k_lo);
        let hi = b.index(k_hi);
        let k = b.fresh("kp");
        b.open(format!("scf.for {k} = {lo} to {hi} step {one}"));
        let kk = b.assign(format!("arith.addi {pc}, {k} : index"));
        let brow = add_scaled(b, &g.b0, &kk, sk);
        let brow = add_scaled(b, &brow, &g.n0, sn);
        let nrc = b.index(self.nr);
        let dst_row = b.assign(format!("arith.muli {k}, {nrc} : index"));
        let panel_stride = b.index(self.kc * self.nr);
        if full {
            let pnl = b.fresh("p");
            b.open(format!("scf.for {pnl} = {zero} to {} step {one}", g.full_panels));
            let col = b.assign(format!("arith.muli {pnl}, {nrc} : index"));
            let src = add_scaled(b, &brow, &col, sn);
            let dst = b.assign(format!("arith.muli {pnl}, {panel_stride} : index"));
            let dst = b.assign(format!("arith.addi {dst}, {dst_row} : index"));
            self.pack_row(b, bp, &src, sn, &dst, None);
            b.close("");
        }
        if edge {
            let some = b.assign(format!("arith.cmpi ne, {}, {zero} : index", g.rem));
            b.open(format!("scf.if {some}"));
            let col = b.assign(format!("arith.muli {}, {nrc} : index", g.full_panels));
            let src = add_scaled(b, &brow, &col, sn);
            let dst = b.assign(format!("arith.muli {}, {panel_stride} : index", g.full_panels));
            let dst = b.assign(format!("arith.addi {dst}, {dst_row} : index"));
            self.pack_row(b, bp, &src, sn, &dst, Some(&g.rem));
            b.close("");
        }
        b.close("");
    }

    /// Packs rows `[0, k_hi)` (a multiple of lanes) of the full panels of a B whose K axis has
    /// unit stride: `lanes` vector loads along K (one per column), transposed in registers,
    /// give `lanes` packed row pieces.
    fn pack_transposed(&self, b: &mut Body, bp: &str, g: &Group, pc: &str, k_hi: usize) {
        let p = self.p;
        let sn = p.b.strides[p.lead + 1];
        let l = self.lanes;
        let bm = p.b.memref();
        let (vty, bpty) = (self.vty.clone(), self.bp_ty.clone());
        let one = b.index(1);
        let zero = b.index(0);
        let nrc = b.index(self.nr);
        let panel_stride = b.index(self.kc * self.nr);
        let pnl = b.fresh("p");
        b.open(format!("scf.for {pnl} = {zero} to {} step {one}", g.full_panels));
        let col = b.assign(format!("arith.muli {pnl}, {nrc} : index"));
        let col = b.assign(format!("arith.addi {}, {col} : index", g.n0));
        let src = add_scaled(b, &g.b0, &col, sn);
        let src = b.assign(format!("arith.addi {src}, {pc} : index"));
        let dst = b.assign(format!("arith.muli {pnl}, {panel_stride} : index"));
        let hi = b.index(k_hi);
        let lc = b.index(l);
        let k = b.fresh("kt");
        b.open(format!("scf.for {k} = {zero} to {hi} step {lc}"));
        let srck = b.assign(format!("arith.addi {src}, {k} : index"));
        let dstk = b.assign(format!("arith.muli {k}, {nrc} : index"));
        let dstk = b.assign(format!("arith.addi {dst}, {dstk} : index"));
        for jb in 0..self.nv {
            let rows: Vec<String> = (0..l)
                .map(|t| {
                    let c = b.index((jb * l + t) * sn);
                    let i = b.assign(format!("arith.addi {srck}, {c} : index"));
                    b.assign(format!("vector.load %b[{i}] : {bm}, {vty}"))
                })
                .collect();
            let cols = b.transpose(&rows, &vty);
            for (i, y) in cols.iter().enumerate() {
                let off = b.index(i * self.nr + jb * l);
                let d = b.assign(format!("arith.addi {dstk}, {off} : index"));
                b.line(format!("vector.store {y}, {bp}[{d}] : {bpty}, {vty}"));
            }
        }
        b.close("");
        b.close("");
    }

    /// Copies `nr` elements of one B row (from `src`, step `sn`) to `bp[dst..]`; with `valid`,
    /// only that many, the rest zero.
    fn pack_row(&self, b: &mut Body, bp: &str, src: &str, sn: usize, dst: &str, valid: Option<&str>) {
        let bm = self.p.b.memref();
        for v in 0..self.nv {
            let x = self.load_vec(b, "%b", &bm, src, sn, v, valid);
            let off = b.index(v * self.lanes);
            let d = b.assign(format!("arith.addi {dst}, {off} : index"));
            b.line(format!("vector.store {x}, {bp}[{d}] : {}, {}", self.bp_ty, self.vty));
        }
    }

    /// Vector `v` (elements `v·lanes…`) of a row of `mem` starting at `base` with element step
    /// `stride`; with `valid`, elements at or past it read as zero (and are not touched).
    #[allow(clippy::too_many_arguments)]
    fn load_vec(
        &self,
        b: &mut Body,
        mem: &str,
        memty: &str,
        base: &str,
        stride: usize,
        v: usize,
        valid: Option<&str>,
    ) -> String {
        let vty = &self.vty;
        let lanes = self.lanes;
        match (stride, valid) {
            (0, _) => {
                let x = b.assign(format!("memref.load {mem}[{base}] : {memty}"));
                b.splat(&x, vty)
            }
            (1, None) => {
                let off = b.index(v * lanes);
                let i = b.assign(format!("arith.addi {base}, {off} : index"));
                b.assign(format!("vector.load {mem}[{i}] : {memty}, {vty}"))
            }
            (1, Some(valid)) => {
                let off = b.index(v * lanes);
                let i = b.assign(format!("arith.addi {base}, {off} : index"));
                let mask = self.mask(b, valid, v);
                let zero = b.float(0.0, vty);
                b.assign(format!(
                    "vector.maskedload {mem}[{i}], {mask}, {zero} : {memty}, {}, {vty} into {vty}",
                    self.mask_ty()
                ))
            }
            (s, valid) => {
                let mut elems = Vec::with_capacity(lanes);
                for t in 0..lanes {
                    let e = b.index(v * lanes + t);
                    let (e, inside) = match valid {
                        None => (e, None),
                        Some(valid) => {
                            let inside = b.assign(format!("arith.cmpi ult, {e}, {valid} : index"));
                            let c1 = b.index(1);
                            let lastv = b.assign(format!("arith.subi {valid}, {c1} : index"));
                            (b.assign(format!("arith.minui {e}, {lastv} : index")), Some(inside))
                        }
                    };
                    let i = add_scaled(b, base, &e, s);
                    let x = b.assign(format!("memref.load {mem}[{i}] : {memty}"));
                    elems.push(match inside {
                        None => x,
                        Some(inside) => {
                            let z = b.float(0.0, "f32");
                            b.select(&inside, &x, &z, "f32")
                        }
                    });
                }
                b.assign(format!("vector.from_elements {} : {vty}", elems.join(", ")))
            }
        }
    }

    /// Stores vector `x` as elements `v·lanes…` of a row of `%out` at `base` with step `stride`,
    /// only those before `valid` when given.
    #[allow(clippy::too_many_arguments)]
    fn store_vec(&self, b: &mut Body, x: &str, base: &str, stride: usize, v: usize, valid: Option<&str>) {
        let vty = &self.vty;
        let memty = self.p.out.memref();
        let lanes = self.lanes;
        match (stride, valid) {
            (1, None) => {
                let off = b.index(v * lanes);
                let i = b.assign(format!("arith.addi {base}, {off} : index"));
                b.line(format!("vector.store {x}, %out[{i}] : {memty}, {vty}"));
            }
            (1, Some(valid)) => {
                let off = b.index(v * lanes);
                let i = b.assign(format!("arith.addi {base}, {off} : index"));
                let mask = self.mask(b, valid, v);
                b.line(format!(
                    "vector.maskedstore %out[{i}], {mask}, {x} : {memty}, {}, {vty}",
                    self.mask_ty()
                ));
            }
            (s, valid) => {
                for t in 0..lanes {
                    let e = b.index(v * lanes + t);
                    let y = b.assign(format!("vector.extract {x}[{t}] : f32 from {vty}"));
                    let i = add_scaled(b, base, &e, s);
                    match valid {
                        None => b.line(format!("memref.store {y}, %out[{i}] : {memty}")),
                        Some(valid) => {
                            let inside = b.assign(format!("arith.cmpi ult, {e}, {valid} : index"));
                            b.open(format!("scf.if {inside}"));
                            b.line(format!("memref.store {y}, %out[{i}] : {memty}"));
                            b.close("");
                        }
                    }
                }
            }
        }
    }

    fn mask_ty(&self) -> String {
        format!("vector<{}xi1>", self.lanes)
    }

    /// The mask of the elements of vector `v` that lie before column `valid`.
    fn mask(&self, b: &mut Body, valid: &str, v: usize) -> String {
        let off = b.index(v * self.lanes);
        let lo = b.assign(format!("arith.maxui {valid}, {off} : index"));
        let n = b.assign(format!("arith.subi {lo}, {off} : index"));
        b.assign(format!("vector.create_mask {n} : {}", self.mask_ty()))
    }

    /// One `mr × nr` micro-tile of C at row `row.0`, panel `panel` (`valid` columns of it when
    /// given). With `row.1`, only that many rows are there: the others read the last of them
    /// (so nothing is read past the rows) and are not stored.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        b: &mut Body,
        bp: &str,
        g: &Group,
        ic: &str,
        (row, there): (&str, Option<&str>),
        mr: usize,
        panel: &str,
        valid: Option<&str>,
        pc: &str,
        kc: usize,
        mode: Block,
    ) {
        let p = self.p;
        let lead = p.lead;
        let (nv, lanes, nr) = (self.nv, self.lanes, self.nr);
        let vty = self.vty.clone();
        let (som, son) = (p.out.strides[lead], p.out.strides[lead + 1]);
        let nrc = b.index(nr);
        let col = b.assign(format!("arith.muli {panel}, {nrc} : index"));
        let col = b.assign(format!("arith.addi {}, {col} : index", g.n0));
        // Where a's rows are read: in place from k = pc, or from the packed block, whose row i
        // starts at (i − ic)·kc_max.
        let (amem, am, a_start, a_from, sam, sak) = match &g.ap {
            Some(ap) => (ap.clone(), self.ap_ty.clone(), b.index(0), Some(ic), self.kc, 1),
            None => {
                let (sam, sak) = (p.a.strides[lead], p.a.strides[lead + 1]);
                let start = add_scaled(b, &g.a0, pc, sak);
                ("%a".to_string(), p.a.memref(), start, None, sam, sak)
            }
        };
        // Row r of the tile, clamped to the last row there when rows are missing.
        let last = there.map(|n| {
            let c1 = b.index(1);
            let end = b.assign(format!("arith.addi {row}, {n} : index"));
            b.assign(format!("arith.subi {end}, {c1} : index"))
        });
        let rows: Vec<String> = (0..mr)
            .map(|r| {
                let rc = b.index(r);
                let i = b.assign(format!("arith.addi {row}, {rc} : index"));
                match (&last, r) {
                    (Some(last), 1..) => b.assign(format!("arith.minui {i}, {last} : index")),
                    _ => i,
                }
            })
            .collect();
        let mut arows = Vec::with_capacity(mr);
        let mut orows = Vec::with_capacity(mr);
        let ocol = add_scaled(b, &g.o0, &col, son);
        // Each row's a offset, and its out offset at the panel's column.
        for i in &rows {
            let ia = match a_from {
                Some(ic) => b.assign(format!("arith.subi {i}, {ic} : index")),
                None => i.clone(),
            };
            arows.push(add_scaled(b, &a_start, &ia, sam));
            orows.push(add_scaled(b, &ocol, i, som));
        }
        // C is read after the k loop (into accumulators that start at zero), so the prefetch
        // issued here has the whole loop to bring its lines in.
        let om = p.out.memref();
        for o in &orows {
            b.line(format!("memref.prefetch %out[{o}], write, locality<3>, data : {om}"));
        }
        let zero = b.float(0.0, &vty);
        let mut acc = vec![zero; mr * nv];
        let bbase = if self.prepacked {
            // Panels of the whole B, K·nr apart: this one is the column block's first panel
            // (n0 / nr) plus `panel`, and the K block starts pc rows into it.
            let first = b.assign(format!("arith.divui {}, {nrc} : index", g.n0));
            let gp = b.assign(format!("arith.addi {first}, {panel} : index"));
            let panel_stride = b.index(p.k * nr);
            let base = b.assign(format!("arith.muli {gp}, {panel_stride} : index"));
            let row = b.assign(format!("arith.muli {pc}, {nrc} : index"));
            b.assign(format!("arith.addi {base}, {row} : index"))
        } else {
            let panel_stride = b.index(self.kc * nr);
            b.assign(format!("arith.muli {panel}, {panel_stride} : index"))
        };
        let n = mr * nv;
        let types = vec![vty.as_str(); n].join(", ");
        let step = |b: &mut Body, k: &str, acc: &[String]| -> Vec<String> {
            let kn = b.assign(format!("arith.muli {k}, {nrc} : index"));
            let kn = b.assign(format!("arith.addi {bbase}, {kn} : index"));
            let bv: Vec<String> = (0..nv)
                .map(|v| {
                    let off = b.index(v * lanes);
                    let i = b.assign(format!("arith.addi {kn}, {off} : index"));
                    b.assign(format!("vector.load {bp}[{i}] : {}, {vty}", self.bp_ty))
                })
                .collect();
            let mut next = Vec::with_capacity(n);
            for ar in &arows {
                let i = add_scaled(b, ar, k, sak);
                let x = b.assign(format!("memref.load {amem}[{i}] : {am}"));
                let x = b.splat(&x, &vty);
                for bvv in &bv {
                    let j = next.len();
                    next.push(b.fma(&x, bvv, &acc[j], &vty));
                }
            }
            next
        };
        let main = kc / K_UNROLL * K_UNROLL;
        if main > 0 {
            let zero_i = b.index(0);
            let hi = b.index(main);
            let stepc = b.index(K_UNROLL);
            let res = b.fresh("acc");
            let k = b.fresh("k");
            let names: Vec<String> = (0..n).map(|_| b.fresh("c")).collect();
            let inits: Vec<String> = names.iter().zip(&acc).map(|(x, a)| format!("{x} = {a}")).collect();
            b.open(format!(
                "{res}:{n} = scf.for {k} = {zero_i} to {hi} step {stepc} iter_args({}) -> ({types})",
                inits.join(", ")
            ));
            let mut cur = names.clone();
            for u in 0..K_UNROLL {
                let ku = if u == 0 {
                    k.clone()
                } else {
                    let uc = b.index(u);
                    b.assign(format!("arith.addi {k}, {uc} : index"))
                };
                cur = step(b, &ku, &cur);
            }
            b.line(format!("scf.yield {} : {types}", cur.join(", ")));
            b.close("");
            acc = (0..n).map(|j| format!("{res}#{j}")).collect();
        }
        for kk in main..kc {
            let kc_ = b.index(kk);
            acc = step(b, &kc_, &acc);
        }
        if mode.loads_c() {
            for (r, o) in orows.iter().enumerate() {
                for v in 0..nv {
                    let x = self.load_vec(b, "%out", &om, o, son, v, valid);
                    let j = r * nv + v;
                    acc[j] = b.fadd(&acc[j], &x, &vty);
                }
            }
        }
        if mode.finishes() {
            if let (Some(c), Some(c0)) = (&p.bias, &g.c0) {
                let (scm, scn) = (c.strides[lead], c.strides[lead + 1]);
                let cm = c.memref();
                let ccol = add_scaled(b, c0, &col, scn);
                for (r, i) in rows.iter().enumerate() {
                    let crow = add_scaled(b, &ccol, i, scm);
                    for v in 0..nv {
                        let x = self.load_vec(b, "%bias", &cm, &crow, scn, v, valid);
                        let j = r * nv + v;
                        acc[j] = b.fadd(&acc[j], &x, &vty);
                    }
                }
            }
            for a in acc.iter_mut() {
                *a = activate(b, p.act, a, &vty);
            }
        }
        for (r, o) in orows.iter().enumerate() {
            let guarded = match there {
                Some(n) if r > 0 => {
                    let rc = b.index(r);
                    let inside = b.assign(format!("arith.cmpi ult, {rc}, {n} : index"));
                    b.open(format!("scf.if {inside}"));
                    true
                }
                _ => false,
            };
            for v in 0..nv {
                self.store_vec(b, &acc[r * nv + v], o, son, v, valid);
            }
            if guarded {
                b.close("");
            }
        }
    }
}
