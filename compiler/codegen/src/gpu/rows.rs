//! Row kernels: softmax, log-softmax, layer and RMS norm, add + norm, and reductions with few
//! outputs over many elements. One workgroup per row. Where the plan holds the row, each
//! invocation reads its few elements once into registers and every pass works on them;
//! otherwise its invocations stride over the row on each pass. Each statistic (max, sum,
//! mean, variance) combines their partial results ([`GroupCombine`]: warp shuffles where the
//! target has them, a tree in shared memory elsewhere). The arithmetic follows the
//! interpreter's order (`interp/fused.rs`): x − max, then exp; mean, then the centered
//! squares; division by √(var + eps).

use super::plan::{GpuPlan, RowValue, Work};
use super::skeleton::{clamp, module, offset_at, step, unravel, workgroup_number, Combine, GroupCombine};
use super::{GpuCtx, GpuKernel};
use crate::dynamic::RunLead;
use crate::kernels::elementwise::{constant, load, reg_type, store};
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::CodegenError;
use kiln_ir::{DType, NormKind, ReduceOp};

/// What every row kernel starts with: its plan, the workgroup's row (under an `scf.if` that
/// skips rows past the end; close with `b.close("")`), the invocation number, the group size,
/// the elements each invocation holds (0: none) and how the invocations combine.
struct Row {
    plan: GpuPlan,
    /// The grid at the run's rows, in row form.
    run_grid: Option<[kiln_ir::Dim; 3]>,
    row: String,
    tid: String,
    group: u32,
    held: usize,
    combine: GroupCombine,
}

/// Element `j` of the row that one held register stands for, and whether it lies in the row
/// (`None`: always; only the last slot can run past the end).
struct Slot {
    j: String,
    valid: Option<String>,
}

impl Row {
    /// The kernel: body `b` over arguments of `memrefs`, with its costs.
    fn kernel(
        self,
        symbol: &str,
        memrefs: &[String],
        b: Body,
        (flops, bytes): (u64, u64),
    ) -> Result<GpuKernel, CodegenError> {
        Ok(GpuKernel {
            symbol: symbol.into(),
            mlir: module(symbol, memrefs, &self.plan, b)?,
            plan: self.plan,
            flops,
            bytes,
            run_grid: self.run_grid,
        })
    }
}

fn open_row(
    b: &mut Body,
    rows: usize,
    len: usize,
    ty: &str,
    passes: u32,
    cx: &GpuCtx,
) -> Result<Row, CodegenError> {
    let bytes = if matches!(ty, "f64" | "i64") { 8 } else { 4 };
    let value = RowValue { bytes, shuffled: matches!(ty, "f32" | "i32"), passes };
    let plan = GpuPlan::rows(rows, len, value, cx.caps)?;
    let Work::Rows { group, held, warp, .. } = plan.work else {
        return Err(CodegenError::Unsupported("a row plan that is not one".into()));
    };
    let row = workgroup_number(b, &plan);
    let tid = b.assign("gpu.thread_id x");
    let combine = GroupCombine::new(b, group, &tid, ty, warp);
    // The condition is the same for the whole workgroup, so barriers inside stay uniform.
    let n = cx.count_value(b, rows)?;
    let ok = b.assign(format!("arith.cmpi ult, {row}, {n} : index"));
    b.open(format!("scf.if {ok}"));
    let run_grid = cx.run_grid(&plan, rows, 1)?;
    Ok(Row { plan, run_grid, row, tid, group, held: held as usize, combine })
}

impl Row {
    /// This invocation's held elements of a row of `len`, each read by `read(j)` (none where
    /// the plan holds none): slot `i` is element `tid + i·group`.
    fn hold(&self, b: &mut Body, len: usize, read: &dyn Fn(&mut Body, &str) -> String) -> Held {
        let group = self.group as usize;
        let slots: Vec<Slot> = (0..self.held)
            .map(|i| {
                let j = match i {
                    0 => self.tid.clone(),
                    _ => {
                        let o = b.index(i * group);
                        b.assign(format!("arith.addi {}, {o} : index", self.tid))
                    }
                };
                let valid = ((i + 1) * group > len).then(|| {
                    let n = b.index(len);
                    b.assign(format!("arith.cmpi ult, {j}, {n} : index"))
                });
                Slot { j, valid }
            })
            .collect();
        let values = slots
            .iter()
            .map(|s| {
                let j = s.read_at(b, len);
                read(b, &j)
            })
            .collect();
        Held { len, slots, values }
    }

    /// `f(j, x, i)` for each of this invocation's elements `x` of the row, element `j`: the
    /// held ones (slot `i`; skipped past the row's end), or read by `read(j)` in a strided
    /// loop (no slot).
    fn each(&self, b: &mut Body, row: &Held, read: &dyn Fn(&mut Body, &str) -> String, f: &Visit) {
        if self.held > 0 {
            for (i, (slot, x)) in row.slots.iter().zip(&row.values).enumerate() {
                let opened = slot.open_valid(b);
                f(b, &slot.j, x, Some(i));
                if opened {
                    b.close("");
                }
            }
            return;
        }
        let n = b.index(row.len);
        let g = b.index(self.group as usize);
        let j = b.fresh("j");
        b.open(format!("scf.for {j} = {} to {n} step {g}", self.tid));
        let x = read(b, &j);
        f(b, &j, &x, None);
        b.close("");
    }
}

/// What [`Row::each`] does with element `j`, its value, and its held slot.
type Visit<'a> = dyn Fn(&mut Body, &str, &str, Option<usize>) + 'a;

/// A row of `len` as one invocation holds it: its slots and their values (empty where the
/// plan holds none).
struct Held {
    len: usize,
    slots: Vec<Slot>,
    values: Vec<String>,
}

impl Slot {
    /// An index to read the slot's element at: `j`, clamped into the row where it may run
    /// past it (the value read there is selected away).
    fn read_at(&self, b: &mut Body, len: usize) -> String {
        match self.valid {
            None => self.j.clone(),
            Some(_) => clamp(b, &self.j, len),
        }
    }

    /// `x` where the slot lies in the row, `otherwise` past its end.
    fn or(&self, b: &mut Body, x: &str, otherwise: &str, ty: &str) -> String {
        match &self.valid {
            None => x.to_string(),
            Some(ok) => b.select(ok, x, otherwise, ty),
        }
    }

    /// Opens an `scf.if` on the slot lying in the row where it may not; returns whether it
    /// opened one (close with `b.close("")`).
    fn open_valid(&self, b: &mut Body) -> bool {
        match &self.valid {
            None => false,
            Some(ok) => {
                b.open(format!("scf.if {ok}"));
                true
            }
        }
    }
}

/// Opens `scf.for j = tid to len step group` carrying an accumulator that starts at `init`;
/// returns (the loop's result, `j`, the accumulator). Yield, then close with `b.close("")`.
fn open_strided(b: &mut Body, r: &Row, len: usize, init: &str, ty: &str) -> (String, String, String) {
    open_fold(b, (&r.tid, len, r.group as usize), init, ty)
}

/// Opens `scf.for j = from to len step step` carrying an accumulator that starts at `init`;
/// returns (the loop's result, `j`, the accumulator). Yield, then close with `b.close("")`.
fn open_fold(
    b: &mut Body,
    (from, len, step): (&str, usize, usize),
    init: &str,
    ty: &str,
) -> (String, String, String) {
    let n = b.index(len);
    let g = b.index(step);
    let (res, j, acc) = (b.fresh("sum"), b.fresh("j"), b.fresh("part"));
    b.open(format!("{res} = scf.for {j} = {from} to {n} step {g} iter_args({acc} = {init}) -> ({ty})"));
    (res, j, acc)
}

/// `init ⊕ f(read(j))` for `j` from `from` to `len` by `step`, in order.
fn fold(
    b: &mut Body,
    walk: (&str, usize, usize),
    (init, ty, op): (&str, &str, Combine),
    read: &dyn Fn(&mut Body, &str) -> String,
    f: &dyn Fn(&mut Body, &str) -> String,
) -> String {
    let (res, j, acc) = open_fold(b, walk, init, ty);
    let x = read(b, &j);
    let y = f(b, &x);
    let next = op.apply(b, &acc, &y, ty);
    b.line(format!("scf.yield {next} : {ty}"));
    b.close("");
    res
}

/// `init ⊕ f(x₀) ⊕ f(x₁) …` over the invocation's elements of the row, in order: from `values`
/// (the held ones, or what was made of them; those past the row's end left out), or read by
/// `read(j)` in a strided loop.
fn partial(
    b: &mut Body,
    r: &Row,
    (row, values): (&Held, &[String]),
    (init, ty, op): (&str, &str, Combine),
    read: &dyn Fn(&mut Body, &str) -> String,
    f: &dyn Fn(&mut Body, &str) -> String,
) -> String {
    if r.held > 0 {
        let mut acc = init.to_string();
        for (slot, x) in row.slots.iter().zip(values) {
            let y = f(b, x);
            let next = op.apply(b, &acc, &y, ty);
            acc = slot.or(b, &next, &acc, ty);
        }
        return acc;
    }
    fold(b, (&r.tid, row.len, r.group as usize), (init, ty, op), read, f)
}

/// `softmax` (or `log_softmax`) of `x` along `axis` into `out`. Arguments: x, out.
pub fn emit_softmax(
    symbol: &str,
    x: &View,
    axis: usize,
    log: bool,
    out: &View,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let views = [x.clone(), out.clone()];
    if let (None, Some(side)) = (&cx.run, side_by_side(&views, axis)) {
        return softmax_side_by_side(symbol, &views, axis, log, side, cx);
    }
    let ty = reg_type(out.dtype);
    let len = x.shape[axis];
    let rows = x.numel() / len.max(1);
    let outer: Vec<usize> = (0..x.rank()).filter(|&k| k != axis).collect();
    let outer_shape: Vec<usize> = outer.iter().map(|&k| x.shape[k]).collect();
    let mut b = cx.body();
    let r = open_row(&mut b, rows, len, ty, 3, cx)?;
    let oidx = unravel(&mut b, &r.row, &outer_shape);
    let parts = |v: &View| -> Vec<(Option<&String>, usize)> {
        outer.iter().zip(&oidx).map(|(&k, i)| (Some(i), v.strides[k])).collect()
    };
    let xbase = offset_at(&mut b, x.offset, &parts(x));
    let obase = offset_at(&mut b, out.offset, &parts(out));
    let read = |b: &mut Body, j: &str| -> String {
        let at = step(b, &xbase, j, x.strides[axis]);
        load(b, "%a0", x, &at)
    };
    let row = r.hold(&mut b, len, &read);
    let neg_inf = b.float(f64::NEG_INFINITY, ty);
    let m = partial(&mut b, &r, (&row, &row.values), (&neg_inf, ty, Combine::Max), &read, &|_, x| x.into());
    let max = r.combine.all(&mut b, &m, Combine::Max);

    let zero = b.float(0.0, ty);
    let exp_less_max = |b: &mut Body, v: &str| -> String {
        let d = b.fsub(v, &max, ty);
        b.exp_nonpositive(&d, ty)
    };
    // Held rows keep their exponentials for the outputs.
    let exps: Vec<String> = row.values.iter().map(|v| exp_less_max(&mut b, v)).collect();
    let s = partial(&mut b, &r, (&row, &exps), (&zero, ty, Combine::Add), &read, &|b, x| {
        if r.held > 0 {
            x.into()
        } else {
            exp_less_max(b, x)
        }
    });
    let total = r.combine.all(&mut b, &s, Combine::Add);
    let denom = if log { b.log(&total, ty) } else { total };
    r.each(&mut b, &row, &read, &|b, j, v, slot| {
        let y = if log {
            let d = b.fsub(v, &max, ty);
            b.fsub(&d, &denom, ty)
        } else {
            let e = match slot {
                Some(i) => exps[i].clone(),
                None => exp_less_max(b, v),
            };
            b.fdiv(&e, &denom, ty)
        };
        let at = step(b, &obase, j, out.strides[axis]);
        store(b, &y, "%a1", out, &at);
    });
    b.close("");
    let flops = (x.numel() * 5) as u64;
    // A held row is read once, else once per pass.
    let reads = if r.held > 0 { 1 } else { 3 };
    let bytes = ((x.numel() * reads + out.numel()) * out.dtype.size_bytes()) as u64;
    let memrefs = [x.memref(), out.memref()];
    r.kernel(symbol, &memrefs, b, (flops, bytes))
}

/// `softmax` (or `log_softmax`) along `axis` of rows that lie side by side along `side`
/// ([`Work::RowsSideBySide`]): each invocation walks its row for the maximum, then the sum of
/// `exp(x − max)`, then the outputs (the exponentials computed again, as the interpreter
/// computes them). Arguments: x, out.
fn softmax_side_by_side(
    symbol: &str,
    views: &[View; 2],
    axis: usize,
    log: bool,
    side: usize,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let [x, out] = views;
    let ty = reg_type(out.dtype);
    let len = x.shape[axis];
    let mut b = cx.body();
    let (plan, starts) = open_side_by_side(&mut b, views, axis, side, cx)?;
    let read = |b: &mut Body, j: &str| -> String {
        let at = step(b, &starts[0], j, x.strides[axis]);
        load(b, "%a0", x, &at)
    };
    let neg_inf = b.float(f64::NEG_INFINITY, ty);
    let max = fold_row(&mut b, len, (&neg_inf, ty, Combine::Max), &read, &|_, v| v.into());
    let exp_less_max = |b: &mut Body, v: &str| -> String {
        let d = b.fsub(v, &max, ty);
        b.exp_nonpositive(&d, ty)
    };
    let zero = b.float(0.0, ty);
    let total = fold_row(&mut b, len, (&zero, ty, Combine::Add), &read, &exp_less_max);
    let denom = if log { b.log(&total, ty) } else { total };
    let j = open_walk(&mut b, len);
    let v = read(&mut b, &j);
    let y = if log {
        let d = b.fsub(&v, &max, ty);
        b.fsub(&d, &denom, ty)
    } else {
        let e = exp_less_max(&mut b, &v);
        b.fdiv(&e, &denom, ty)
    };
    let at = step(&mut b, &starts[1], &j, out.strides[axis]);
    store(&mut b, &y, "%a1", out, &at);
    b.close("");
    b.close("");
    let flops = (x.numel() * 5) as u64;
    let bytes = ((x.numel() * 3 + out.numel()) * out.dtype.size_bytes()) as u64;
    let memrefs = [x.memref(), out.memref()];
    Ok(GpuKernel {
        symbol: symbol.into(),
        mlir: module(symbol, &memrefs, &plan, b)?,
        plan,
        flops,
        bytes,
        run_grid: None,
    })
}

/// Layer or RMS norm over the last axis of `a` (+ `b_in` for add + norm, both at the output's
/// shape), times `gamma` and plus `beta` when given; with `sum` (an add + norm whose sum other
/// kernels read, in the output's layout) also stores `a + b` there. Arguments: a, [b],
/// [gamma], [beta], out, [sum].
#[allow(clippy::too_many_arguments)]
pub fn emit_norm(
    symbol: &str,
    kind: NormKind,
    eps: f64,
    (a, b_in): (&View, Option<&View>),
    gamma: Option<&View>,
    beta: Option<&View>,
    (out, sum): (&View, Option<&View>),
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let mut views: Vec<View> = vec![a.clone()];
    views.extend(b_in.cloned());
    views.push(out.clone());
    let len = out.shape.last().copied().unwrap_or(1);
    if sum.is_some_and(|v| b_in.is_none() || v.shape != out.shape || v.strides != out.strides) {
        return Err(CodegenError::Unsupported("a norm's sum in another layout than its result".into()));
    }
    // Static rows only: in row form the rows' count is the run's, numbered in their order. A
    // stored sum (in the result's row-major layout) takes the row plan.
    if let (None, None, Some(side)) = (&cx.run, sum, side_by_side(&views, out.rank().saturating_sub(1))) {
        return norm_side_by_side(symbol, (kind, eps), &views, (gamma, beta), side, cx);
    }
    norm(symbol, kind, eps, (&views, len, sum), gamma, beta, None, cx)
}

/// The axis along which rows that run along `axis` lie side by side, if they are strided:
/// another axis (extent > 1) with unit stride in the first operand and the output while the
/// first operand's rows are not contiguous (a norm over the channels of `[N, C, H, W]`, read
/// through the transpose that puts C last and written back through it; a softmax along a
/// non-last axis). Only where there are at least as many rows as elements in a row: one
/// invocation walks a whole row, so a few long rows (64 rows of 4096) would leave the device
/// idle, where a workgroup per row spreads each row over its invocations.
fn side_by_side(operands: &[View], axis: usize) -> Option<usize> {
    let (a, out) = (operands.first()?, operands.last()?);
    let len = *out.shape.get(axis)?;
    if len <= 1 || a.strides[axis] == 1 || out.numel() / len < len {
        return None;
    }
    (0..out.rank()).rev().find(|&k| k != axis && out.shape[k] > 1 && a.strides[k] == 1 && out.strides[k] == 1)
}

/// A norm kernel's arguments in order, a, [b], [gamma], [beta], out: the input views and the
/// names of γ's, β's and the output's arguments.
struct NormArgs<'v> {
    inputs: Vec<&'v View>,
    gamma: Option<(&'v View, String)>,
    beta: Option<(&'v View, String)>,
    out: String,
    /// The stored sum's view and argument, after the output's.
    sum: Option<(&'v View, String)>,
}

impl<'v> NormArgs<'v> {
    fn new(
        a: &'v View,
        b_in: Option<&'v View>,
        gamma: Option<&'v View>,
        beta: Option<&'v View>,
        sum: Option<&'v View>,
    ) -> Self {
        let mut inputs: Vec<&View> = vec![a];
        inputs.extend(b_in);
        let mut named = |v: Option<&'v View>| {
            v.map(|v| {
                inputs.push(v);
                (v, format!("%a{}", inputs.len() - 1))
            })
        };
        let (gamma, beta) = (named(gamma), named(beta));
        let out = format!("%a{}", inputs.len());
        let sum = sum.map(|v| (v, format!("%a{}", inputs.len() + 1)));
        NormArgs { inputs, gamma, beta, out, sum }
    }

    /// Stores the row's sum `x` at element `j` of the row starting at `start`, when the
    /// kernel stores its sum.
    fn store_sum(&self, b: &mut Body, x: &str, (start, j): (Option<&String>, &str)) {
        if let (Some((v, arg)), Some(start)) = (&self.sum, start) {
            let at = step(b, start, j, v.strides.last().copied().unwrap_or(0));
            store(b, x, arg, v, &at);
        }
    }

    /// `y · γ[j] + β[j]`, with what of γ and β the norm has.
    fn affine(&self, b: &mut Body, y: &str, j: &str, ty: &str) -> String {
        let mut y = y.to_string();
        for (param, add) in [(&self.gamma, false), (&self.beta, true)] {
            if let Some((v, arg)) = param {
                let off = b.index(v.offset);
                let at = step(b, &off, j, v.strides[0]);
                let w = load(b, arg, v, &at);
                y = if add { b.fadd(&y, &w, ty) } else { b.fmul(&y, &w, ty) };
            }
        }
        y
    }

    /// The kernel's memrefs: the inputs', the output's, and the sum's when it is stored.
    fn memrefs(&self, out: &View) -> Vec<String> {
        let sum = self.sum.as_ref().map(|(v, _)| v.memref());
        self.inputs.iter().map(|v| v.memref()).chain([out.memref()]).chain(sum).collect()
    }
}

/// An element function over a row's values (`f(b, x)`), as the folds apply it.
type ElementFn<'a> = dyn Fn(&mut Body, &str) -> String + 'a;

/// Σ over a row of an element function: how a plan sums its rows for [`statistics`].
type RowSum<'a> = dyn Fn(&mut Body, &ElementFn) -> String + 'a;

/// A norm's statistics in the interpreter's order, from `total` (Σ over the row of a function
/// of its elements) and the row's length `nf` (a float value): layer norm's mean and `√(var + ε)`, or RMS norm's `1 / √(mean(x²) + ε)`
/// (no mean), as [`normalized`] reads them.
fn statistics(
    b: &mut Body,
    (kind, eps): (NormKind, f64),
    nf: &str,
    ty: &str,
    total: &RowSum,
) -> (Option<String>, String) {
    let e = b.float(eps, ty);
    match kind {
        NormKind::Layer => {
            let s = total(b, &|_, x| x.into());
            let mean = b.fdiv(&s, nf, ty);
            let s = total(b, &|b, x| {
                let c = b.fsub(x, &mean, ty);
                b.fmul(&c, &c, ty)
            });
            let var = b.fdiv(&s, nf, ty);
            let ve = b.fadd(&var, &e, ty);
            let root = b.sqrt(&ve, ty);
            (Some(mean), root)
        }
        NormKind::Rms => {
            let s = total(b, &|b, x| b.fmul(x, x, ty));
            let ms = b.fdiv(&s, nf, ty);
            let me = b.fadd(&ms, &e, ty);
            let root = b.sqrt(&me, ty);
            let one = b.float(1.0, ty);
            (None, b.fdiv(&one, &root, ty))
        }
    }
}

/// `init ⊕ f(read(j))` for `j` in `0..len`, in order: an invocation walking its own row
/// ([`Work::RowsSideBySide`]).
fn fold_row(
    b: &mut Body,
    len: usize,
    acc: (&str, &str, Combine),
    read: &dyn Fn(&mut Body, &str) -> String,
    f: &dyn Fn(&mut Body, &str) -> String,
) -> String {
    let zero = b.index(0);
    fold(b, (&zero, len, 1), acc, read, f)
}

/// Opens `scf.for j = 0 to len` over an invocation's own row; returns `j` (close with
/// `b.close("")`).
fn open_walk(b: &mut Body, len: usize) -> String {
    let (lo, hi, one) = (b.index(0), b.index(len), b.index(1));
    let j = b.fresh("j");
    b.open(format!("scf.for {j} = {lo} to {hi} step {one}"));
    j
}

/// A norm's `x` normalized: `(x − mean) / scale` (layer norm: the scale is `√(var + ε)`) or
/// `x · scale` (RMS norm: `1 / √(mean(x²) + ε)`), the interpreter's arithmetic.
fn normalized(b: &mut Body, x: &str, (mean, scale): (Option<&str>, &str), ty: &str) -> String {
    match mean {
        Some(mean) => {
            let c = b.fsub(x, mean, ty);
            b.fdiv(&c, scale, ty)
        }
        None => b.fmul(x, scale, ty),
    }
}

/// Opens the invocation's row of a [`Work::RowsSideBySide`] plan over `operands` (views of
/// one shape) whose rows run along `axis`, neighbouring rows along `side`: rows are numbered
/// over the other axes with `side` innermost, so neighbouring invocations take neighbouring
/// rows. Returns the plan and where each operand's row starts, under an `scf.if` that skips
/// numbers past the rows (close with `b.close("")`).
fn open_side_by_side(
    b: &mut Body,
    operands: &[View],
    axis: usize,
    side: usize,
    cx: &GpuCtx,
) -> Result<(GpuPlan, Vec<String>), CodegenError> {
    let shape = &operands[0].shape;
    let len = shape[axis];
    let rows = shape.iter().product::<usize>() / len.max(1);
    let order: Vec<usize> = (0..shape.len()).filter(|&k| k != side && k != axis).chain([side]).collect();
    let dims: Vec<usize> = order.iter().map(|&k| shape[k]).collect();
    let plan = GpuPlan::rows_side_by_side(rows, len, cx.caps)?;
    let row = super::elements::open_element(b, &plan, rows, cx)?;
    let idx = unravel(b, &row, &dims);
    let starts = operands
        .iter()
        .map(|v| {
            let parts: Vec<(Option<&String>, usize)> =
                order.iter().zip(&idx).map(|(&k, i)| (Some(i), v.strides[k])).collect();
            offset_at(b, v.offset, &parts)
        })
        .collect();
    Ok((plan, starts))
}

/// A norm over rows that lie side by side along `side` ([`Work::RowsSideBySide`]): one
/// invocation per row, rows numbered with `side` innermost so that neighbouring invocations
/// take neighbouring rows; each walks its row once per pass (the mean, the centered squares,
/// the outputs) in the interpreter's order. Arguments: a, [b], [gamma], [beta], out.
fn norm_side_by_side(
    symbol: &str,
    (kind, eps): (NormKind, f64),
    operands: &[View],
    (gamma, beta): (Option<&View>, Option<&View>),
    side: usize,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let (a, out) = (&operands[0], &operands[operands.len() - 1]);
    let b_in = (operands.len() == 3).then(|| &operands[1]);
    let ty = reg_type(out.dtype);
    let r = out.rank();
    let len = out.shape[r - 1];
    let mut b = cx.body();
    let (plan, starts) = open_side_by_side(&mut b, operands, r - 1, side, cx)?;
    let args = NormArgs::new(a, b_in, gamma, beta, None);
    let x_at = |b: &mut Body, j: &str| -> String {
        let at = step(b, &starts[0], j, a.strides[r - 1]);
        let x = load(b, "%a0", a, &at);
        match b_in {
            Some(bv) => {
                let at = step(b, &starts[1], j, bv.strides[r - 1]);
                let y = load(b, "%a1", bv, &at);
                b.fadd(&x, &y, ty)
            }
            None => x,
        }
    };
    let zero = b.float(0.0, ty);
    let total =
        |b: &mut Body, f: &ElementFn| -> String { fold_row(b, len, (&zero, ty, Combine::Add), &x_at, f) };
    let nf = b.float(len as f64, ty);
    let (center, scale) = statistics(&mut b, (kind, eps), &nf, ty, &total);
    let j = open_walk(&mut b, len);
    let x = x_at(&mut b, &j);
    let y = normalized(&mut b, &x, (center.as_deref(), &scale), ty);
    let y = args.affine(&mut b, &y, &j, ty);
    let at = step(&mut b, &starts[starts.len() - 1], &j, out.strides[r - 1]);
    store(&mut b, &y, &args.out, out, &at);
    b.close("");
    b.close("");
    let flops = (out.numel() * 8) as u64;
    let bytes = ((args.inputs.len() + 1) * out.numel() * out.dtype.size_bytes()) as u64;
    Ok(GpuKernel {
        symbol: symbol.into(),
        mlir: module(symbol, &args.memrefs(out), &plan, b)?,
        plan,
        flops,
        bytes,
        run_grid: None,
    })
}

/// [`emit_norm`] over run-time leading axes: `operands` (a, [b], out: the buffers, with static
/// strides along the last axis, of `len` elements) are addressed through `lead`; `cx` holds the
/// rows (their product).
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_norm_run(
    symbol: &str,
    kind: NormKind,
    eps: f64,
    operands: (&[View], usize, Option<&View>),
    gamma: Option<&View>,
    beta: Option<&View>,
    lead: &RunLead,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    norm(symbol, kind, eps, operands, gamma, beta, Some(lead), cx)
}

/// The row plan's norm: operands a, [b], out, of `len` elements per row, and the stored sum
/// (whose row starts follow out's in `run_lead`'s walks).
#[allow(clippy::too_many_arguments)]
fn norm(
    symbol: &str,
    kind: NormKind,
    eps: f64,
    (operands, len, sum): (&[View], usize, Option<&View>),
    gamma: Option<&View>,
    beta: Option<&View>,
    run_lead: Option<&RunLead>,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let (a, out) = match operands {
        [a, .., out] if operands.len() <= 3 => (a, out),
        _ => return Err(CodegenError::Unsupported("a norm of other than one or two operands".into())),
    };
    let b_in = if operands.len() == 3 { Some(&operands[1]) } else { None };
    let ty = reg_type(out.dtype);
    let rank = out.rank();
    let rows = out.numel() / len.max(1);
    let lead = &out.shape[..rank.saturating_sub(1)];
    let args = NormArgs::new(a, b_in, gamma, beta, sum);
    let mut b = cx.body();
    let passes = match kind {
        NormKind::Layer => 3,
        NormKind::Rms => 2,
    };
    let r = open_row(&mut b, rows, len, ty, passes, cx)?;
    // Where each operand's row starts: from the static strides, or the run's.
    let starts: Vec<String> = match run_lead {
        None => {
            let idx = unravel(&mut b, &r.row, lead);
            operands
                .iter()
                .chain(sum)
                .map(|v| {
                    let parts: Vec<(Option<&String>, usize)> =
                        idx.iter().zip(&v.strides).map(|(i, &s)| (Some(i), s)).collect();
                    offset_at(&mut b, v.offset, &parts)
                })
                .collect()
        }
        Some(run) => {
            let walked = run.walks(&mut b);
            run.starts(&mut b, &r.row, &walked)
        }
    };
    let (a_base, o_base) = (starts[0].clone(), starts[operands.len() - 1].clone());
    let s_base = starts.get(operands.len());
    let b_base = b_in.map(|_| starts[1].clone());
    let last = |v: &View| v.strides.last().copied().unwrap_or(0);
    // x[j]: a[j] (+ b[j]), rounded like the interpreter's sum in the tensor's type.
    let x_at = |b: &mut Body, j: &str| -> String {
        let at = step(b, &a_base, j, last(a));
        let x = load(b, "%a0", a, &at);
        match (b_in, &b_base) {
            (Some(bv), Some(bb)) => {
                let at = step(b, bb, j, last(bv));
                let y = load(b, "%a1", bv, &at);
                b.fadd(&x, &y, ty)
            }
            _ => x,
        }
    };
    let held = r.hold(&mut b, len, &x_at);
    let row = (&held, held.values.as_slice());
    let zero = b.float(0.0, ty);
    // Σ over the row: the invocation's partial sums, combined across the group.
    let total = |b: &mut Body, f: &ElementFn| -> String {
        let s = partial(b, &r, row, (&zero, ty, Combine::Add), &x_at, f);
        r.combine.all(b, &s, Combine::Add)
    };
    let nf = b.float(len as f64, ty);
    let (center, scale) = statistics(&mut b, (kind, eps), &nf, ty, &total);
    r.each(&mut b, &held, &x_at, &|b, j, x, _| {
        args.store_sum(b, x, (s_base, j));
        let y = normalized(b, x, (center.as_deref(), &scale), ty);
        let y = args.affine(b, &y, j, ty);
        let at = step(b, &o_base, j, last(out));
        store(b, &y, &args.out, out, &at);
    });
    b.close("");
    let flops = (out.numel() * 8) as u64;
    let bytes = ((args.inputs.len() + 1) * out.numel() * out.dtype.size_bytes()) as u64;
    r.kernel(symbol, &args.memrefs(out), b, (flops, bytes))
}

/// What a row of run-time length computes ([`emit_run_rows`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum RunRowOp {
    /// A softmax, a log-softmax when `log`. Arguments: x, out.
    Softmax { log: bool },
    /// A norm without γ and β. Arguments: a, [b] (`added`), out, [the sum, `sum`].
    Norm { kind: NormKind, eps: f64, added: bool, sum: bool },
}

/// Where a row of run-time length lies: each argument's start and stride along the row, and
/// the row's length (`index` values), for the row numbered `row`.
pub(crate) struct RunRow {
    pub starts: Vec<String>,
    pub strides: Vec<String>,
    pub len: String,
}

/// A softmax or norm over rows whose length is known at run time only: one workgroup per row
/// (the row plan at the rows' and the length's maxima, `rows_max` and `len_max`), its
/// invocations striding over the row on every pass, their partial results combined as the
/// static row kernels combine them. `cx.run` holds the run's rows; `at(b, row)` finds the
/// row. `views` are the arguments' buffers, in [`RunRowOp`]'s order; `costs` (flops, bytes)
/// are the caller's, at the hints.
pub(crate) fn emit_run_rows(
    symbol: &str,
    op: RunRowOp,
    views: &[View],
    (rows_max, len_max): (usize, usize),
    (flops, bytes): (u64, u64),
    at: &dyn Fn(&mut Body, &str) -> RunRow,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let out_at = match op {
        RunRowOp::Softmax { .. } => 1,
        RunRowOp::Norm { added, .. } => 1 + usize::from(added),
    };
    let out = views.get(out_at).ok_or_else(|| CodegenError::Unsupported("a row kernel's output".into()))?;
    let ty = reg_type(out.dtype);
    let passes = match op {
        RunRowOp::Softmax { .. } | RunRowOp::Norm { kind: NormKind::Layer, .. } => 3,
        RunRowOp::Norm { kind: NormKind::Rms, .. } => 2,
    };
    let mut b = cx.body();
    let r = open_row(&mut b, rows_max, len_max, ty, passes, cx)?;
    let row = at(&mut b, &r.row);
    let arg = |i: usize| format!("%a{i}");
    let element = |b: &mut Body, i: usize, j: &str| -> String {
        let t = b.assign(format!("arith.muli {j}, {} : index", row.strides[i]));
        b.assign(format!("arith.addi {}, {t} : index", row.starts[i]))
    };
    let read = |b: &mut Body, i: usize, j: &str| -> String {
        let e = element(b, i, j);
        load(b, &arg(i), &views[i], &e)
    };
    let write = |b: &mut Body, i: usize, j: &str, v: &str| {
        let e = element(b, i, j);
        store(b, v, &arg(i), &views[i], &e);
    };
    // The workgroup's combination of `f(j)` over the row, each invocation taking every
    // group-th element from its own number.
    let group = b.index(r.group as usize);
    let fold =
        |b: &mut Body, (init, how): (&str, Combine), f: &dyn Fn(&mut Body, &str) -> String| -> String {
            let (res, j, acc) = (b.fresh("part"), b.fresh("j"), b.fresh("acc"));
            b.open(format!(
                "{res} = scf.for {j} = {} to {} step {group} iter_args({acc} = {init}) -> ({ty})",
                r.tid, row.len
            ));
            let y = f(b, &j);
            let next = how.apply(b, &acc, &y, ty);
            b.line(format!("scf.yield {next} : {ty}"));
            b.close("");
            r.combine.all(b, &res, how)
        };
    let each = |b: &mut Body, f: &dyn Fn(&mut Body, &str)| {
        let j = b.fresh("j");
        b.open(format!("scf.for {j} = {} to {} step {group}", r.tid, row.len));
        f(b, &j);
        b.close("");
    };
    let zero = b.float(0.0, ty);
    match op {
        RunRowOp::Softmax { log } => {
            let neg_inf = b.float(f64::NEG_INFINITY, ty);
            let max = fold(&mut b, (&neg_inf, Combine::Max), &|b, j| read(b, 0, j));
            // The exponentials (or, for a log-softmax, x − max) are stored and summed; each
            // invocation rereads only what it stored, so no barrier is needed before the last pass.
            let total = fold(&mut b, (&zero, Combine::Add), &|b, j| {
                let x = read(b, 0, j);
                let d = b.fsub(&x, &max, ty);
                let e = b.exp_nonpositive(&d, ty);
                write(b, 1, j, if log { &d } else { &e });
                e
            });
            let denom = if log { b.log(&total, ty) } else { total };
            each(&mut b, &|b, j| {
                let v = read(b, 1, j);
                let y = if log { b.fsub(&v, &denom, ty) } else { b.fdiv(&v, &denom, ty) };
                write(b, 1, j, &y);
            });
        }
        RunRowOp::Norm { kind, eps, added, sum } => {
            let x_at = |b: &mut Body, j: &str| -> String {
                let x = read(b, 0, j);
                if added {
                    let y = read(b, 1, j);
                    b.fadd(&x, &y, ty)
                } else {
                    x
                }
            };
            let n = crate::kernels::reduce::count_as(&mut b, &row.len, ty);
            let total = |b: &mut Body, f: &ElementFn| -> String {
                fold(b, (&zero, Combine::Add), &|b, j| {
                    let x = x_at(b, j);
                    f(b, &x)
                })
            };
            let (center, scale) = statistics(&mut b, (kind, eps), &n, ty, &total);
            each(&mut b, &|b, j| {
                let x = x_at(b, j);
                if sum {
                    write(b, out_at + 1, j, &x);
                }
                let y = normalized(b, &x, (center.as_deref(), &scale), ty);
                write(b, out_at, j, &y);
            });
        }
    }
    b.close("");
    let memrefs: Vec<String> = views.iter().map(View::memref).collect();
    r.kernel(symbol, &memrefs, b, (flops, bytes))
}

/// Whether a reduction of `count` elements into `outputs` runs a workgroup per output: when
/// each output sums enough elements to keep a workgroup busy and there are too few outputs to
/// keep the device busy one invocation each.
pub fn reduce_by_rows(outputs: usize, count: usize) -> bool {
    count >= 256 && outputs < 4096
}

/// `reduce(x, axes)` with one workgroup per output element: its invocations stride over the
/// reduced elements, then a tree combines them. Arguments: x, out.
pub fn emit_reduce(
    symbol: &str,
    op: ReduceOp,
    axes: &[usize],
    x: &View,
    out: &View,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let dtype = x.dtype;
    let ty = reg_type(dtype);
    let kept: Vec<usize> = (0..x.rank()).filter(|a| !axes.contains(a)).collect();
    let kept_shape: Vec<usize> = kept.iter().map(|&a| x.shape[a]).collect();
    let red_shape: Vec<usize> = axes.iter().map(|&a| x.shape[a]).collect();
    let outputs: usize = kept_shape.iter().product();
    let count: usize = red_shape.iter().product();
    let mut b = cx.body();
    let r = open_row(&mut b, outputs, count, ty, 1, cx)?;
    let kidx = unravel(&mut b, &r.row, &kept_shape);
    let parts: Vec<(Option<&String>, usize)> =
        kept.iter().zip(&kidx).map(|(&a, i)| (Some(i), x.strides[a])).collect();
    let base = offset_at(&mut b, x.offset, &parts);
    let (combine, init) = match (op, dtype.is_float()) {
        (ReduceOp::Sum | ReduceOp::Mean, _) => (Combine::Add, constant(&mut b, 0.0, dtype)),
        (ReduceOp::Max, true) => (Combine::Max, b.float(f64::NEG_INFINITY, ty)),
        (ReduceOp::Min, true) => (Combine::Min, b.float(f64::INFINITY, ty)),
        (ReduceOp::Max, false) => {
            (Combine::Max, b.int(if ty == "i32" { i32::MIN as i64 } else { i64::MIN }, ty))
        }
        (ReduceOp::Min, false) => {
            (Combine::Min, b.int(if ty == "i32" { i32::MAX as i64 } else { i64::MAX }, ty))
        }
    };
    let (s, e, acc) = open_strided(&mut b, &r, count, &init, ty);
    let ridx = unravel(&mut b, &e, &red_shape);
    let rparts: Vec<(Option<&String>, usize)> =
        axes.iter().zip(&ridx).map(|(&a, i)| (Some(i), x.strides[a])).collect();
    let off = offset_at(&mut b, 0, &rparts);
    let at = b.assign(format!("arith.addi {base}, {off} : index"));
    let v = load(&mut b, "%a0", x, &at);
    let next = combine.apply(&mut b, &acc, &v, ty);
    b.line(format!("scf.yield {next} : {ty}"));
    b.close("");
    let mut total = r.combine.all(&mut b, &s, combine);
    if op == ReduceOp::Mean {
        let n = b.float(count as f64, ty);
        total = b.fdiv(&total, &n, ty);
    }
    let zero = b.index(0);
    let first = b.assign(format!("arith.cmpi eq, {}, {zero} : index", r.tid));
    b.open(format!("scf.if {first}"));
    // Output r in row-major order over the kept axes is element r of `out`'s shape.
    let oidx = unravel(&mut b, &r.row, &out.shape);
    let at = out.index_expr(&mut b, &oidx);
    store(&mut b, &total, "%a1", out, &at);
    b.close("");
    b.close("");
    let memrefs = [x.memref(), out.memref()];
    let bytes = ((x.numel() + outputs) * dtype.size_bytes()) as u64;
    let flops = if dtype == DType::Bool { 0 } else { x.numel() as u64 };
    r.kernel(symbol, &memrefs, b, (flops, bytes))
}
