//! Row-wise fused ops: softmax, log-softmax, layer norm, RMS norm, residual add + norm.
//!
//! One iteration of the parallel range is one row (or, for a softmax along a non-last axis,
//! one vector's worth of rows side by side). A row is read a few times, each pass a vector
//! loop with its tail masked: the first pass from memory, the later ones from L1, since a row
//! of even 4096 floats fits there. So the kernels keep the interpreter's numerics (max before
//! exp, mean before variance) at the cost of L1 bandwidth, which they have to spare.
//!
//! The vector helpers at the end (masked and strided loads and stores, flat-index
//! decomposition, `scf.for` with iter_args) are shared with the attention emitter.

use super::reduce::count_as;
use super::View;
use crate::mlir_text::{bool_type_like, elem_type, Body};
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{DType, NormKind};

/// Softmax (or log-softmax when `log`) of `x` along `axis` into `out` (same shape).
/// Arguments: x, out.
pub fn emit_softmax(
    symbol: &str,
    x: &View,
    axis: usize,
    log: bool,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let what = if log { "log_softmax" } else { "softmax" };
    let ct = ComputeType::of(&[x, out], target, what)?;
    if x.shape != out.shape || axis >= x.rank() {
        return Err(CodegenError::Unsupported(format!(
            "{what} along axis {axis} of {:?} into {:?}",
            x.shape, out.shape
        )));
    }
    let ops = [Operand::new("%x", x), Operand::new("%out", out)];
    let mut b = Body::new();
    let range = if axis + 1 == x.rank() {
        softmax_along(&mut b, &ct, &ops, log)
    } else {
        softmax_across(&mut b, &ct, &ops, axis, log)
    };
    // max, subtract, exp (~20 with its polynomial), sum, scale.
    let numel = out.numel() as u64;
    let flops = 24 * numel;
    Ok(Kernel {
        symbol: symbol.into(),
        mlir: func_text(symbol, &ops, b),
        range,
        grain: Kernel::grain_for(range, flops),
        flops,
        bytes: 2 * numel * ct.size,
    })
}

/// Softmax along the last axis: one row per iteration, vectors along the row. Returns the
/// range (rows).
fn softmax_along(b: &mut Body, ct: &ComputeType, ops: &[Operand; 2], log: bool) -> usize {
    let [x, out] = ops;
    let r = x.rank();
    let n = x.shape[r - 1];
    let rows = x.numel().checked_div(n).unwrap_or(0);
    let it = open_range(b);
    let offs = offsets(b, &it, &x.shape[..r - 1], &[x, out]);
    let row =
        Row { starts: (&offs.offsets[0], &offs.offsets[1]), strides: (x.strides[r - 1], out.strides[r - 1]) };
    softmax_row(b, ct, (x, out), &row, RowLen::Static(n), log);
    close_range(b);
    rows
}

/// Where a softmax's row starts in x and out, and their strides along it.
struct Row<'a> {
    starts: (&'a str, &'a str),
    strides: (usize, usize),
}

/// The three passes of a softmax (a log-softmax when `log`) along one row of `n` elements, in
/// vectors with four accumulators in flight ([`row_loop`]): the maximum, the exponentials
/// (stored) and their sum, the scaling; the lanes reduce once per pass.
fn softmax_row(
    b: &mut Body,
    ct: &ComputeType,
    (x, out): (&Operand, &Operand),
    row: &Row,
    n: RowLen,
    log: bool,
) {
    let vty = ct.vty.as_str();
    let (xo, oo) = row.starts;
    let (xs, os) = row.strides;
    let ninf = b.float(f64::NEG_INFINITY, vty);
    let zero = b.float(0.0, vty);
    let max_acc = Acc { init: &ninf, ty: vty, how: Combine::Max };
    let max = row_loop_len(b, n, ct.lanes, 4, Some(max_acc), &mut |b, pos, part, acc| {
        let at = addr(b, xo, pos, xs);
        let v = load(b, x, &at, xs, vty, part, f64::NEG_INFINITY);
        Some(b.fmax(acc?, &v, vty))
    });
    let m = reduce(b, Combine::Max, &max.unwrap_or(ninf.clone()), vty);
    let ms = b.splat(&m, vty);
    let sum_acc = Acc { init: &zero, ty: vty, how: Combine::Add };
    let sum = row_loop_len(b, n, ct.lanes, 4, Some(sum_acc), &mut |b, pos, part, acc| {
        let at = addr(b, xo, pos, xs);
        let v = load(b, x, &at, xs, vty, part, f64::NEG_INFINITY);
        let d = b.fsub(&v, &ms, vty);
        let mut e = b.exp_nonpositive(&d, vty);
        if let Some(p) = part {
            e = b.select(p.mask, &e, &zero, vty);
        }
        if !log {
            let at = addr(b, oo, pos, os);
            store(b, &e, out, &at, os, vty, part);
        }
        Some(b.fadd(acc?, &e, vty))
    });
    let s = reduce(b, Combine::Add, &sum.unwrap_or(zero.clone()), vty);
    let ety = ct.elem;
    if log {
        let ls = b.log(&s, ety);
        let lss = b.splat(&ls, vty);
        row_loop_len(b, n, ct.lanes, 4, None, &mut |b, pos, part, _| {
            let at = addr(b, xo, pos, xs);
            let v = load(b, x, &at, xs, vty, part, 0.0);
            let d = b.fsub(&v, &ms, vty);
            let y = b.fsub(&d, &lss, vty);
            let at = addr(b, oo, pos, os);
            store(b, &y, out, &at, os, vty, part);
            None
        });
    } else {
        let one = b.float(1.0, ety);
        let inv = b.fdiv(&one, &s, ety);
        let invs = b.splat(&inv, vty);
        row_loop_len(b, n, ct.lanes, 4, None, &mut |b, pos, part, _| {
            let at = addr(b, oo, pos, os);
            let e = load(b, out, &at, os, vty, part, 0.0);
            let y = b.fmul(&e, &invs, vty);
            store(b, &y, out, &at, os, vty, part);
            None
        });
    }
}

/// Softmax along a non-last axis: each iteration takes one vector of lanes along the last
/// axis (rows side by side) and walks the softmax axis, so no horizontal reductions are
/// needed and loads stay contiguous when the last axis is. Returns the range.
fn softmax_across(b: &mut Body, ct: &ComputeType, ops: &[Operand; 2], axis: usize, log: bool) -> usize {
    let [x, out] = ops;
    let r = x.rank();
    let lanes = open_side_by_side(b, &[x, out], axis, r - 1, &ct.vty);
    let (n, xs, os) = (b.index(x.shape[axis]), b.index(x.strides[axis]), b.index(out.strides[axis]));
    let rows = Lanes {
        starts: (&lanes.starts[0], &lanes.starts[1]),
        along: (&n, &xs, &os),
        lane_strides: (x.strides[r - 1], out.strides[r - 1]),
    };
    softmax_lanes(b, &ct.vty, (x, out), &rows, lanes.part().as_ref(), log);
    close_range(b);
    lanes.range
}

/// A vector of rows side by side, one per lane: where x's and out's start, the rows' length
/// and strides along them (`index` values), and the strides from lane to lane.
struct Lanes<'a> {
    starts: (&'a str, &'a str),
    along: (&'a str, &'a str, &'a str),
    lane_strides: (usize, usize),
}

/// The three passes of a softmax (a log-softmax when `log`) over a vector of rows side by
/// side (`part` masks the lanes past the last row): the maxima, the exponentials (stored)
/// and their sums, then the scaling.
fn softmax_lanes(
    b: &mut Body,
    vty: &str,
    (x, out): (&Operand, &Operand),
    rows: &Lanes,
    part: Option<&Part>,
    log: bool,
) {
    let (xo, oo) = rows.starts;
    let (n, xs, os) = rows.along;
    let (xl, ol) = rows.lane_strides;
    let at = |b: &mut Body, base: &str, i: &str, stride: &str| {
        let t = b.assign(format!("arith.muli {i}, {stride} : index"));
        b.assign(format!("arith.addi {base}, {t} : index"))
    };
    let (lo, one) = (b.index(0), b.index(1));
    let ninf = b.float(f64::NEG_INFINITY, vty);
    let zero = b.float(0.0, vty);
    let inits = [(ninf.clone(), vty.to_string())];
    let (a, acc, res) = for_open(b, &lo, n, &one, &inits);
    let xa = at(b, xo, &a, xs);
    let v = load(b, x, &xa, xl, vty, part, f64::NEG_INFINITY);
    let m = b.fmax(&acc[0], &v, vty);
    for_close(b, &[m], &inits);
    let m = res[0].clone();
    let inits = [(zero.clone(), vty.to_string())];
    let (a, acc, res) = for_open(b, &lo, n, &one, &inits);
    let xa = at(b, xo, &a, xs);
    let v = load(b, x, &xa, xl, vty, part, f64::NEG_INFINITY);
    let d = b.fsub(&v, &m, vty);
    let e = b.exp_nonpositive(&d, vty);
    if !log {
        let oa = at(b, oo, &a, os);
        store(b, &e, out, &oa, ol, vty, part);
    }
    let s = b.fadd(&acc[0], &e, vty);
    for_close(b, &[s], &inits);
    let s = res[0].clone();
    let ls = if log {
        b.log(&s, vty)
    } else {
        let onev = b.float(1.0, vty);
        b.fdiv(&onev, &s, vty)
    };
    let (a, _, _) = for_open(b, &lo, n, &one, &[]);
    if log {
        let xa = at(b, xo, &a, xs);
        let v = load(b, x, &xa, xl, vty, part, 0.0);
        let d = b.fsub(&v, &m, vty);
        let y = b.fsub(&d, &ls, vty);
        let oa = at(b, oo, &a, os);
        store(b, &y, out, &oa, ol, vty, part);
    } else {
        let oa = at(b, oo, &a, os);
        let e = load(b, out, &oa, ol, vty, part, 0.0);
        let y = b.fmul(&e, &ls, vty);
        store(b, &y, out, &oa, ol, vty, part);
    }
    for_close(b, &[], &[]);
}

/// A softmax (a log-softmax when `log`) of a vector of rows side by side in a kernel over
/// run-time sizes: x and out are `%a0` and `%a1` (buffers `xv`, `ov`), the vector's rows
/// start at `starts` with unit stride from lane to lane, run `n` elements at strides
/// `xs` and `os` (`index` values); `left`, the rows left from the vector's first, when fewer
/// than a vector's may be.
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_softmax_lanes(
    b: &mut Body,
    (xv, ov): (&View, &View),
    starts: (&str, &str),
    (n, xs, os): (&str, &str, &str),
    left: Option<&str>,
    log: bool,
    target: &dyn Target,
) -> Result<(), CodegenError> {
    let ct = ComputeType::of(&[xv, ov], target, "softmax")?;
    let (x, out) = (Operand::new("%a0", xv), Operand::new("%a1", ov));
    let mask =
        left.map(|count| b.assign(format!("vector.create_mask {count} : {}", bool_type_like(&ct.vty))));
    let part = mask.as_ref().zip(left).map(|(mask, count)| Part { mask, count: Count::Dynamic(count) });
    let rows = Lanes { starts, along: (n, xs, os), lane_strides: (1, 1) };
    softmax_lanes(b, &ct.vty, (&x, &out), &rows, part.as_ref(), log);
    Ok(())
}

/// A softmax (a log-softmax when `log`) of one contiguous row of run-time length `n` (an
/// `index` value) in a kernel over run-time sizes: x and out are `%a0` and `%a1` (buffers
/// `xv`, `ov`), the row starts at `starts` with unit strides. The static row's passes
/// ([`softmax_row`]) with the length read at run time.
pub(crate) fn emit_softmax_run_row(
    b: &mut Body,
    (xv, ov): (&View, &View),
    starts: (&str, &str),
    n: &str,
    log: bool,
    target: &dyn Target,
) -> Result<(), CodegenError> {
    let ct = ComputeType::of(&[xv, ov], target, "softmax")?;
    let (x, out) = (Operand::new("%a0", xv), Operand::new("%a1", ov));
    softmax_row(b, &ct, (&x, &out), &Row { starts, strides: (1, 1) }, RowLen::Run(n), log);
    Ok(())
}

/// The lanes per vector of a softmax over `xv`'s dtype on `target` (`None` for a dtype the
/// vector kernels do not compute in).
pub(crate) fn softmax_lanes_of(xv: &View, target: &dyn Target) -> Option<usize> {
    ComputeType::of(&[xv], target, "softmax").ok().map(|ct| ct.lanes)
}

/// `norm(a + b)` over the last axis, then `· gamma + beta` (layer) or `· gamma` (rms) when
/// given; `b` is `None` for a plain LayerNorm/RMSNorm. a, b, out share the shape `[…, N]`
/// (broadcast axes stride 0); gamma and beta are `[N]`. With `sum` (an `add_norm` whose sum
/// other kernels read, in out's layout) the kernel also stores `a + b` there as it writes the
/// result. Arguments: a, (b), (gamma), (beta), out, (sum).
#[allow(clippy::too_many_arguments)]
pub fn emit_norm(
    symbol: &str,
    kind: NormKind,
    eps: f64,
    (a, b): (&View, Option<&View>),
    gamma: Option<&View>,
    beta: Option<&View>,
    (out, sum): (&View, Option<&View>),
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    emit_norm_run(symbol, kind, eps, (a, b), gamma, beta, (out, sum), target, RowStarts::Static)
}

/// Where a norm kernel's rows start, and so what its range counts.
#[derive(Clone, Copy)]
pub(crate) enum RowStarts<'a> {
    /// From static strides; rows that lie side by side share vectors, and the range then
    /// counts vectors of rows.
    Static,
    /// From static strides, one row per iteration: the row form of a kernel over run-time
    /// sizes, whose range must count rows (it is the run's rows times what one row takes).
    OnePerIteration,
    /// Where `RunLead` says at run time (operands whose leading axes do not merge into rows:
    /// a position table broadcast over a run-time batch); a, b and out are then the views at
    /// the maxima with a static last stride, and the kernel takes the run's symbol values
    /// after its operands.
    Run(&'a crate::dynamic::RunLead<'a>),
}

/// [`emit_norm`] with its rows found as `row_starts` says.
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_norm_run(
    symbol: &str,
    kind: NormKind,
    eps: f64,
    (a, b): (&View, Option<&View>),
    gamma: Option<&View>,
    beta: Option<&View>,
    (out, sum): (&View, Option<&View>),
    target: &dyn Target,
    row_starts: RowStarts,
) -> Result<Kernel, CodegenError> {
    let lead = match row_starts {
        RowStarts::Run(l) => Some(l),
        RowStarts::Static | RowStarts::OnePerIteration => None,
    };
    let what = match (b.is_some(), kind) {
        (true, _) => "add_norm",
        (false, NormKind::Layer) => "layer_norm",
        (false, NormKind::Rms) => "rms_norm",
    };
    let mut views = vec![a];
    views.extend(b.iter().chain(&gamma).chain(&beta).copied());
    views.push(out);
    views.extend(sum);
    let ct = ComputeType::of(&views, target, what)?;
    let r = out.rank();
    let n = out.shape.last().copied().unwrap_or(0);
    let same = |v: &View| v.shape == out.shape;
    let param = |v: &Option<&View>| v.is_none_or(|v| v.shape == [n]);
    let sum_ok = sum.is_none_or(|v| b.is_some() && v.shape == out.shape && v.strides == out.strides);
    if r == 0 || !same(a) || !b.is_none_or(same) || !param(&gamma) || !param(&beta) || !sum_ok {
        return Err(CodegenError::Unsupported(format!(
            "{what} with operand shapes that differ from {:?}",
            out.shape
        )));
    }
    let mut ops = vec![Operand::new("%a", a)];
    let bi = b.map(|v| {
        ops.push(Operand::new("%b", v));
        ops.len() - 1
    });
    let gi = gamma.map(|v| {
        ops.push(Operand::new("%gamma", v));
        ops.len() - 1
    });
    let betai = beta.map(|v| {
        ops.push(Operand::new("%beta", v));
        ops.len() - 1
    });
    ops.push(Operand::new("%out", out));
    let oi = ops.len() - 1;
    let si = sum.map(|v| {
        ops.push(Operand::new("%sum", v));
        ops.len() - 1
    });
    let rows = out.numel().checked_div(n).unwrap_or(0);
    let stride = |i: usize| ops[i].strides[r - 1];

    let args = NormArgs { a: 0, b: bi, gamma: gi, beta: betai, out: oi };
    // Rows side by side write a contiguous result only by chance; a stored sum (in the
    // result's layout, row-major) takes the row plan.
    if let (RowStarts::Static, None, Some(side)) = (row_starts, si, side_by_side(&ops, &args)) {
        let mut body = Body::new();
        let range = norm_across(&mut body, &ct, &ops, &args, (kind, eps), side);
        return Ok(norm_kernel(symbol, &ops, &ct, body, range, None));
    }
    let mut body = Body::new();
    let bd = &mut body;
    // Where a row starts: from static strides, or computed from the run's sizes.
    let walked = lead.map(|l| l.walks(bd));
    let it = open_range(bd);
    let row_ops: Vec<&Operand> = [Some(0), bi, Some(oi)].into_iter().flatten().map(|i| &ops[i]).collect();
    let starts = match (lead, &walked) {
        (Some(l), Some(w)) => l.starts(bd, &it, w),
        _ => offsets(bd, &it, &out.shape[..r - 1], &row_ops).offsets,
    };
    let oo = starts[row_ops.len() - 1].clone();
    // The sum has out's layout: its row starts after out's in `lead`'s walks, else where out's
    // does, moved by the difference of their offsets.
    let so = si.map(|i| match starts.get(row_ops.len()) {
        Some(start) => start.clone(),
        None => {
            let delta = ops[i].offset as i64 - ops[oi].offset as i64;
            let d = bd.assign(format!("arith.constant {delta} : index"));
            bd.assign(format!("arith.addi {oo}, {d} : index"))
        }
    });
    let at = NormRowAt {
        a: (&starts[0], stride(0)),
        b: bi.map(|i| (starts[1].as_str(), stride(i))),
        out: (&oo, stride(oi)),
        sum: si.zip(so.as_deref()).map(|(i, so)| (i, so, stride(oi))),
    };
    norm_row(bd, &ct, &ops, &args, &at, RowLen::Static(n), (kind, eps));
    close_range(bd);
    Ok(norm_kernel(symbol, &ops, &ct, body, rows, lead))
}

/// Where one norm row's operands start (`index` values) and their strides along it; the sum
/// also names its operand.
struct NormRowAt<'a> {
    a: (&'a str, usize),
    b: Option<(&'a str, usize)>,
    out: (&'a str, usize),
    sum: Option<(usize, &'a str, usize)>,
}

/// The passes of a norm along one row of `n` elements, in vectors ([`row_loop_len`]): the
/// sum (layer norm), the squares about the mean, then the result (with γ and β, and the sum
/// stored where `at` has one).
fn norm_row(
    bd: &mut Body,
    ct: &ComputeType,
    ops: &[Operand],
    args: &NormArgs,
    at: &NormRowAt,
    n: RowLen,
    (kind, eps): (NormKind, f64),
) {
    let vty = ct.vty.as_str();
    let ety = ct.elem;
    // Param views are [N]: their one stride steps along the row.
    let pstride = |i: usize| ops[i].strides[0];
    // The row element `a + b` at `pos`; lanes outside `part` are 0.
    let sum_at = |bd: &mut Body, pos: &str, part: Option<&Part>| -> String {
        let (ao, as_) = at.a;
        let a = addr(bd, ao, pos, as_);
        let x = load(bd, &ops[args.a], &a, as_, vty, part, 0.0);
        match (args.b, at.b) {
            (Some(i), Some((bo, bs))) => {
                let a = addr(bd, bo, pos, bs);
                let y = load(bd, &ops[i], &a, bs, vty, part, 0.0);
                bd.fadd(&x, &y, vty)
            }
            _ => x,
        }
    };
    let zero = bd.float(0.0, vty);
    let add = Acc { init: &zero, ty: vty, how: Combine::Add };
    let inv_n = match n {
        RowLen::Static(n) => bd.float(1.0 / n.max(1) as f64, ety),
        RowLen::Run(n) => {
            let count = count_as(bd, n, ety);
            let one = bd.float(1.0, ety);
            bd.fdiv(&one, &count, ety)
        }
    };
    let epsc = bd.float(eps, ety);
    // `shift` is subtracted (layer norm's mean), then `factor` multiplies.
    let (shift, factor) = match kind {
        NormKind::Layer => {
            let s = row_loop_len(bd, n, ct.lanes, 4, Some(add), &mut |bd, pos, part, acc| {
                let x = sum_at(bd, pos, part);
                Some(bd.fadd(acc?, &x, vty))
            });
            let s = reduce(bd, Combine::Add, &s.unwrap_or(zero.clone()), vty);
            let mean = bd.fmul(&s, &inv_n, ety);
            let means = bd.splat(&mean, vty);
            let q = row_loop_len(bd, n, ct.lanes, 4, Some(add), &mut |bd, pos, part, acc| {
                let x = sum_at(bd, pos, part);
                let mut c = bd.fsub(&x, &means, vty);
                if let Some(p) = part {
                    c = bd.select(p.mask, &c, &zero, vty);
                }
                Some(bd.fma(&c, &c, acc?, vty))
            });
            let q = reduce(bd, Combine::Add, &q.unwrap_or(zero.clone()), vty);
            let var = bd.fmul(&q, &inv_n, ety);
            (Some(means), var)
        }
        NormKind::Rms => {
            let q = row_loop_len(bd, n, ct.lanes, 4, Some(add), &mut |bd, pos, part, acc| {
                let x = sum_at(bd, pos, part);
                Some(bd.fma(&x, &x, acc?, vty))
            });
            let q = reduce(bd, Combine::Add, &q.unwrap_or(zero.clone()), vty);
            (None, bd.fmul(&q, &inv_n, ety))
        }
    };
    let ve = bd.fadd(&factor, &epsc, ety);
    let rs = bd.rsqrt(&ve, ety);
    let rss = bd.splat(&rs, vty);
    let (oo, os) = at.out;
    let go = args.gamma.map(|g| bd.index(ops[g].offset));
    let bo2 = args.beta.map(|g| bd.index(ops[g].offset));
    row_loop_len(bd, n, ct.lanes, 4, None, &mut |bd, pos, part, _| {
        let x = sum_at(bd, pos, part);
        if let Some((i, so, ss)) = at.sum {
            let a = addr(bd, so, pos, ss);
            store(bd, &x, &ops[i], &a, ss, vty, part);
        }
        let c = match &shift {
            Some(m) => bd.fsub(&x, m, vty),
            None => x,
        };
        let mut y = bd.fmul(&c, &rss, vty);
        if let (Some(g), Some(go)) = (args.gamma, &go) {
            let a = addr(bd, go, pos, pstride(g));
            let gv = load(bd, &ops[g], &a, pstride(g), vty, part, 0.0);
            y = bd.fmul(&y, &gv, vty);
        }
        if let (Some(g), Some(bo)) = (args.beta, &bo2) {
            let a = addr(bd, bo, pos, pstride(g));
            let bv = load(bd, &ops[g], &a, pstride(g), vty, part, 0.0);
            y = bd.fadd(&y, &bv, vty);
        }
        let a = addr(bd, oo, pos, os);
        store(bd, &y, &ops[args.out], &a, os, vty, part);
        None
    });
}

/// A norm without γ and β of one contiguous row of run-time length `n` (an `index` value) in
/// a kernel over run-time sizes: the operands are `%a0`, … (buffers `views`: a, b when
/// `added`, out, then the sum where the kernel stores it), each row starting at `starts`
/// with unit strides. The static row's passes ([`norm_row`]) with the length read at run time.
pub(crate) fn emit_norm_run_row(
    b: &mut Body,
    views: &[View],
    added: bool,
    starts: &[String],
    n: &str,
    norm: (NormKind, f64),
    target: &dyn Target,
) -> Result<(), CodegenError> {
    let refs: Vec<&View> = views.iter().collect();
    let ct = ComputeType::of(&refs, target, "norm")?;
    let ops: Vec<Operand> =
        views.iter().enumerate().map(|(i, v)| Operand::new(&format!("%a{i}"), v)).collect();
    let out = 1 + usize::from(added);
    let args = NormArgs { a: 0, b: added.then_some(1), gamma: None, beta: None, out };
    let at = NormRowAt {
        a: (&starts[0], 1),
        b: added.then(|| (starts[1].as_str(), 1)),
        out: (&starts[out], 1),
        sum: starts.get(out + 1).map(|so| (out + 1, so.as_str(), 1)),
    };
    norm_row(b, &ct, &ops, &args, &at, RowLen::Run(n), norm);
    Ok(())
}

/// The kernel of a norm's `body` over `range` iterations: 10 flops per element, and the
/// distinct elements of every operand read or written once.
fn norm_kernel(
    symbol: &str,
    ops: &[Operand],
    ct: &ComputeType,
    body: Body,
    range: usize,
    lead: Option<&crate::dynamic::RunLead>,
) -> Kernel {
    let numel = ops.last().map_or(0, Operand::numel) as u64;
    let flops = 10 * numel;
    let distinct = |o: &Operand| {
        o.shape.iter().zip(&o.strides).map(|(&d, &s)| if s == 0 { 1 } else { d }).product::<usize>() as u64
    };
    let bytes = ops.iter().map(distinct).sum::<u64>() * ct.size;
    let syms = lead.map(|l| format!("{}: memref<{}xi64>", crate::dynamic::SYMS_ARG, l.n_syms));
    Kernel {
        symbol: symbol.into(),
        mlir: func_text_with(symbol, ops, syms.as_deref(), body),
        range,
        grain: Kernel::grain_for(range, flops),
        flops,
        bytes,
    }
}

/// Where a norm's operands are among its kernel's arguments.
struct NormArgs {
    a: usize,
    b: Option<usize>,
    gamma: Option<usize>,
    beta: Option<usize>,
    out: usize,
}

/// The axis along which a norm's rows lie side by side, if its rows are strided: one of the
/// leading axes with unit stride in `a` and `out` while the row's own stride is not 1 in
/// `a` (a norm over the channels of `[N, C, H, W]`, read through the transpose that puts C
/// last and written back through it, has the rows of neighbouring pixels side by side).
fn side_by_side(ops: &[Operand], args: &NormArgs) -> Option<usize> {
    let (a, out) = (&ops[args.a], &ops[args.out]);
    let r = out.rank();
    if r < 2 || a.strides[r - 1] == 1 {
        return None;
    }
    (0..r - 1).rev().find(|&k| a.strides[k] == 1 && out.strides[k] == 1)
}

/// A norm over rows that lie side by side along axis `side` ([`side_by_side`]): each
/// iteration takes one vector of neighbouring rows and walks their elements, so every load
/// and store is a contiguous vector rather than a gather, and each lane keeps its own row's
/// sums (no horizontal reduction). The passes are the row plan's: the mean (layer norm),
/// the mean square of the centered values, then the scaled result. Returns the range.
fn norm_across(
    b: &mut Body,
    ct: &ComputeType,
    ops: &[Operand],
    args: &NormArgs,
    (kind, eps): (NormKind, f64),
    side: usize,
) -> usize {
    let out = &ops[args.out];
    let r = out.rank();
    let n = out.shape[r - 1];
    let vty = ct.vty.as_str();
    let rowed: Vec<usize> = [Some(args.a), args.b, Some(args.out)].into_iter().flatten().collect();
    let lanes = open_side_by_side(b, &rowed.iter().map(|&i| &ops[i]).collect::<Vec<_>>(), r - 1, side, vty);
    let start = |i: usize| lanes.starts[rowed.iter().position(|&k| k == i).unwrap_or(0)].clone();
    let part = lanes.part();
    let part = part.as_ref();
    // The lanes' row elements at position `e`: a (+ b).
    let x_at = |b: &mut Body, e: &str| -> String {
        let mut x: Option<String> = None;
        for i in [Some(args.a), args.b].into_iter().flatten() {
            let o = &ops[i];
            let at = addr(b, &start(i), e, o.strides[r - 1]);
            let v = load(b, o, &at, o.strides[side], vty, part, 0.0);
            x = Some(match x {
                Some(x) => b.fadd(&x, &v, vty),
                None => v,
            });
        }
        x.unwrap_or_default()
    };
    let (lo, hi, one) = (b.index(0), b.index(n), b.index(1));
    let zero = b.float(0.0, vty);
    let inv_n = b.float(1.0 / n.max(1) as f64, vty);
    // Σ over the row of `f(x)`, one sum per lane.
    let sum = |b: &mut Body, f: &dyn Fn(&mut Body, &str, &str) -> String| -> String {
        let inits = [(zero.clone(), vty.to_string())];
        let (e, acc, res) = for_open(b, &lo, &hi, &one, &inits);
        let x = x_at(b, &e);
        let s = f(b, &x, &acc[0]);
        for_close(b, &[s], &inits);
        res[0].clone()
    };
    let (shift, square_mean) = match kind {
        NormKind::Layer => {
            let s = sum(b, &|b, x, acc| b.fadd(acc, x, vty));
            let mean = b.fmul(&s, &inv_n, vty);
            let q = sum(b, &|b, x, acc| {
                let c = b.fsub(x, &mean, vty);
                b.fma(&c, &c, acc, vty)
            });
            (Some(mean), b.fmul(&q, &inv_n, vty))
        }
        NormKind::Rms => {
            let q = sum(b, &|b, x, acc| b.fma(x, x, acc, vty));
            (None, b.fmul(&q, &inv_n, vty))
        }
    };
    let epsv = b.float(eps, vty);
    let ve = b.fadd(&square_mean, &epsv, vty);
    let rs = b.rsqrt(&ve, vty);
    let (e, _, _) = for_open(b, &lo, &hi, &one, &[]);
    let x = x_at(b, &e);
    let c = match &shift {
        Some(m) => b.fsub(&x, m, vty),
        None => x,
    };
    let mut y = b.fmul(&c, &rs, vty);
    // γ and β: one value per row element, the same in every lane.
    for (i, add) in [(args.gamma, false), (args.beta, true)] {
        let Some(i) = i else { continue };
        let o = &ops[i];
        let base = b.index(o.offset);
        let at = addr(b, &base, &e, o.strides[0]);
        let v = load(b, o, &at, 0, vty, None, 0.0);
        y = if add { b.fadd(&y, &v, vty) } else { b.fmul(&y, &v, vty) };
    }
    let at = addr(b, &start(args.out), &e, out.strides[r - 1]);
    store(b, &y, out, &at, out.strides[side], vty, part);
    for_close(b, &[], &[]);
    close_range(b);
    lanes.range
}

/// One iteration of the parallel range over rows that run along `axis` and lie side by side
/// along `side`: a vector of neighbouring rows, one per lane ([`open_side_by_side`]).
struct SideBySide {
    /// The iterations: every axis but `axis`, `side` counted in vectors.
    range: usize,
    /// Where each operand's vector of rows starts.
    starts: Vec<String>,
    /// The lane mask and count of a last vector that `side` does not fill.
    tail: Option<(String, String)>,
}

impl SideBySide {
    /// The partial-vector mask of the tail, for loads and stores.
    fn part(&self) -> Option<Part<'_>> {
        self.tail.as_ref().map(|(mask, count)| Part { mask, count: Count::Dynamic(count) })
    }
}

/// Opens the parallel range over the rows of `ops` (of one shape) along `axis`, a vector of
/// `vty`'s lanes of neighbouring rows along `side` at a time (close with [`close_range`]):
/// walking a row, every load and store of the vector is contiguous where `side` has unit
/// stride, and each lane keeps its own row's statistics (no horizontal reduction).
fn open_side_by_side(b: &mut Body, ops: &[&Operand], axis: usize, side: usize, vty: &str) -> SideBySide {
    let shape = &ops[0].shape;
    let (lanes, extent) = (vector_lanes(vty), shape[side]);
    let keep: Vec<usize> = (0..shape.len()).filter(|&k| k != axis).collect();
    let dims: Vec<usize> =
        keep.iter().map(|&k| if k == side { extent.div_ceil(lanes) } else { shape[k] }).collect();
    let per_vector: Vec<Operand> = ops
        .iter()
        .map(|o| {
            let strides =
                keep.iter().map(|&k| if k == side { o.strides[k] * lanes } else { o.strides[k] }).collect();
            Operand { strides, shape: dims.clone(), ..(*o).clone() }
        })
        .collect();
    let range = if shape[axis] == 0 { 0 } else { dims.iter().product() };
    let it = open_range(b);
    let offs = offsets(b, &it, &dims, &per_vector.iter().collect::<Vec<_>>());
    let tail = (!extent.is_multiple_of(lanes)).then(|| {
        let at = keep.iter().position(|&k| k == side).unwrap_or(0);
        let done = scale(b, &offs.indices[at], lanes);
        let all = b.index(extent);
        let count = b.assign(format!("arith.subi {all}, {done} : index"));
        let mask = b.assign(format!("vector.create_mask {count} : {}", bool_type_like(vty)));
        (mask, count)
    });
    SideBySide { range, starts: offs.offsets, tail }
}

// ------------------------------------------------------------------------------- helpers

/// The element type a kernel computes in and its vector of the target's register width.
pub(super) struct ComputeType {
    /// `f32` or `f64`.
    pub elem: &'static str,
    /// Lanes of `vty`.
    pub lanes: usize,
    /// `vector<{lanes}x{elem}>`.
    pub vty: String,
    /// Bytes per element.
    pub size: u64,
}

impl ComputeType {
    /// The compute type of operands that must all have one float dtype (f32 or f64).
    pub fn of(views: &[&View], target: &dyn Target, what: &str) -> Result<ComputeType, CodegenError> {
        let dtype = views[0].dtype;
        if let Some(v) = views.iter().find(|v| v.dtype != dtype) {
            return Err(CodegenError::Unsupported(format!("{what} mixing {dtype} and {}", v.dtype)));
        }
        let f32_lanes = target.f32_lanes().max(2);
        let (elem, lanes, size) = match dtype {
            DType::F32 => ("f32", f32_lanes, 4),
            DType::F64 => ("f64", (f32_lanes / 2).max(2), 8),
            other => {
                return Err(CodegenError::Unsupported(format!(
                    "{what} on {other} (its kernels compute in f32 or f64)"
                )))
            }
        };
        Ok(ComputeType { elem, lanes, vty: format!("vector<{lanes}x{elem}>"), size })
    }
}

/// A kernel argument: its SSA name and the view it addresses. Axes of extent 1 count as
/// broadcast (stride 0), so a view may be given in its own shape or broadcast already.
#[derive(Clone, Debug)]
pub(super) struct Operand {
    pub name: String,
    pub memref: String,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
}

impl Operand {
    pub fn new(name: &str, v: &View) -> Operand {
        let strides = v.shape.iter().zip(&v.strides).map(|(&d, &s)| if d == 1 { 0 } else { s }).collect();
        Operand { name: name.into(), memref: v.memref(), shape: v.shape.clone(), strides, offset: v.offset }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The `func.func` text of a kernel over `ops` (in argument order) with body `b`.
pub(super) fn func_text(symbol: &str, ops: &[Operand], b: Body) -> String {
    func_text_with(symbol, ops, None, b)
}

/// [`func_text`] with one more parameter after the operands (a kernel over run-time sizes
/// takes their values there).
pub(super) fn func_text_with(symbol: &str, ops: &[Operand], extra: Option<&str>, b: Body) -> String {
    let mut args: Vec<String> = ops.iter().map(|o| format!("{}: {}", o.name, o.memref)).collect();
    args.extend(extra.map(str::to_string));
    format!(
        "func.func @{symbol}({}, %begin: index, %end: index) {{\n{}  return\n}}\n",
        args.join(", "),
        b.finish()
    )
}

/// Opens the loop over `[begin, end)` of the parallel range; returns its induction variable.
pub(super) fn open_range(b: &mut Body) -> String {
    let one = b.index(1);
    let it = b.fresh("it");
    b.open(format!("scf.for {it} = %begin to %end step {one}"));
    it
}

pub(super) fn close_range(b: &mut Body) {
    b.close("");
}

/// Indices of a flat iteration number over some axes, and each operand's element offset.
pub(super) struct Offsets {
    pub indices: Vec<String>,
    pub offsets: Vec<String>,
}

/// Decomposes `it` row-major over `dims` and forms `offset + Σ idx·stride` for each operand
/// (whose leading `dims.len()` strides are used).
pub(super) fn offsets(b: &mut Body, it: &str, dims: &[usize], ops: &[&Operand]) -> Offsets {
    let mut indices = vec![String::new(); dims.len()];
    let mut rem = it.to_string();
    for k in (0..dims.len()).rev() {
        if k == 0 {
            indices[k] = rem.clone();
        } else {
            let d = b.index(dims[k]);
            indices[k] = b.assign(format!("arith.remui {rem}, {d} : index"));
            rem = b.assign(format!("arith.divui {rem}, {d} : index"));
        }
    }
    let offsets = ops
        .iter()
        .map(|o| {
            let mut acc = b.index(o.offset);
            for (i, &s) in indices.iter().zip(&o.strides) {
                if s != 0 {
                    let t = scale(b, i, s);
                    acc = b.assign(format!("arith.addi {acc}, {t} : index"));
                }
            }
            acc
        })
        .collect();
    Offsets { indices, offsets }
}

/// `i · s` as an index (no op for `s` = 1).
pub(super) fn scale(b: &mut Body, i: &str, s: usize) -> String {
    if s == 1 {
        return i.to_string();
    }
    let c = b.index(s);
    b.assign(format!("arith.muli {i}, {c} : index"))
}

/// `base + pos · stride`.
pub(super) fn addr(b: &mut Body, base: &str, pos: &str, stride: usize) -> String {
    if stride == 0 {
        return base.to_string();
    }
    let t = scale(b, pos, stride);
    b.assign(format!("arith.addi {base}, {t} : index"))
}

/// How many lanes of a partial vector are valid.
#[derive(Clone, Copy, Debug)]
pub(super) enum Count<'a> {
    Static(usize),
    /// An `index` value (it may exceed the lanes, or be ≤ 0 when lane 0 is in bounds).
    Dynamic(&'a str),
}

/// A partial vector: its `i1` lane mask and the count of leading valid lanes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Part<'a> {
    pub mask: &'a str,
    pub count: Count<'a>,
}

/// Loads the vector of `op`'s elements `base + t·stride` for lanes `t`; lanes outside `part`
/// read as `pad`. Stride 1 is a vector load, stride 0 a splat, other strides a gather.
pub(super) fn load(
    b: &mut Body,
    op: &Operand,
    base: &str,
    stride: usize,
    vty: &str,
    part: Option<&Part>,
    pad: f64,
) -> String {
    let (name, mem) = (&op.name, &op.memref);
    match (stride, part) {
        (0, _) => {
            let s = b.assign(format!("memref.load {name}[{base}] : {mem}"));
            let v = b.splat(&s, vty);
            match part {
                Some(p) => {
                    let pv = b.float(pad, vty);
                    b.select(p.mask, &v, &pv, vty)
                }
                None => v,
            }
        }
        (1, None) => b.assign(format!("vector.load {name}[{base}] : {mem}, {vty}")),
        (1, Some(p)) => {
            let pass = b.float(pad, vty);
            b.assign(format!(
                "vector.maskedload {name}[{base}], {}, {pass} : {mem}, {}, {vty} into {vty}",
                p.mask,
                bool_type_like(vty)
            ))
        }
        (s, _) => {
            let lanes = vector_lanes(vty);
            let elem = elem_type(vty);
            let padc = b.float(pad, elem);
            let mut elems = Vec::with_capacity(lanes);
            let last = match part.map(|p| p.count) {
                Some(Count::Dynamic(c)) => {
                    // Invalid lanes re-read the last valid one (lane 0 when none is valid).
                    let (zero, one) = (b.index(0), b.index(1));
                    let last = b.assign(format!("arith.subi {c}, {one} : index"));
                    Some(b.assign(format!("arith.maxsi {last}, {zero} : index")))
                }
                _ => None,
            };
            for t in 0..lanes {
                if let Some(Count::Static(c)) = part.map(|p| p.count) {
                    if t >= c {
                        elems.push(padc.clone());
                        continue;
                    }
                }
                let mut lane = b.index(t);
                if let Some(last) = &last {
                    lane = b.assign(format!("arith.minui {lane}, {last} : index"));
                }
                let at = addr(b, base, &lane, s);
                elems.push(b.assign(format!("memref.load {name}[{at}] : {mem}")));
            }
            let v = b.assign(format!("vector.from_elements {} : {vty}", elems.join(", ")));
            match part {
                Some(p) if matches!(p.count, Count::Dynamic(_)) => {
                    let pv = b.float(pad, vty);
                    b.select(p.mask, &v, &pv, vty)
                }
                _ => v,
            }
        }
    }
}

/// Stores the lanes of `v` (those in `part`) to `op`'s elements `base + t·stride`.
pub(super) fn store(
    b: &mut Body,
    v: &str,
    op: &Operand,
    base: &str,
    stride: usize,
    vty: &str,
    part: Option<&Part>,
) {
    let (name, mem) = (&op.name, &op.memref);
    match (stride, part) {
        (1, None) => b.line(format!("vector.store {v}, {name}[{base}] : {mem}, {vty}")),
        (1, Some(p)) => b.line(format!(
            "vector.maskedstore {name}[{base}], {}, {v} : {mem}, {}, {vty}",
            p.mask,
            bool_type_like(vty)
        )),
        (s, _) => {
            let elem = elem_type(vty);
            for t in 0..vector_lanes(vty) {
                let guard = match part.map(|p| p.count) {
                    Some(Count::Static(c)) if t >= c => break,
                    Some(Count::Dynamic(c)) => {
                        let lane = b.index(t);
                        Some(b.assign(format!("arith.cmpi ult, {lane}, {c} : index")))
                    }
                    _ => None,
                };
                let x = b.assign(format!("vector.extract {v}[{t}] : {elem} from {vty}"));
                let lane = b.index(t);
                let at = addr(b, base, &lane, s);
                if let Some(g) = guard {
                    b.open(format!("scf.if {g}"));
                    b.line(format!("memref.store {x}, {name}[{at}] : {mem}"));
                    b.close("");
                } else {
                    b.line(format!("memref.store {x}, {name}[{at}] : {mem}"));
                }
            }
        }
    }
}

/// The lanes of a vector type string (`vector<8xf32>` → 8).
pub(super) fn vector_lanes(vty: &str) -> usize {
    vty.strip_prefix("vector<").and_then(|s| s.split('x').next()).and_then(|n| n.parse().ok()).unwrap_or(1)
}

/// How partial results of a reduction combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Combine {
    Add,
    Max,
}

impl Combine {
    fn apply(self, b: &mut Body, x: &str, y: &str, ty: &str) -> String {
        match self {
            Combine::Add => b.fadd(x, y, ty),
            Combine::Max => b.fmax(x, y, ty),
        }
    }
}

/// Reduces the lanes of `v` to a scalar (max propagates NaN).
pub(super) fn reduce(b: &mut Body, how: Combine, v: &str, vty: &str) -> String {
    let elem = elem_type(vty);
    match how {
        Combine::Add => {
            b.assign(format!("vector.reduction <add>, {v} fastmath<reassoc> : {vty} into {elem}"))
        }
        Combine::Max => b.assign(format!("vector.reduction <maximumf>, {v} : {vty} into {elem}")),
    }
}

/// A row body: gets the element position `pos` (an `index`), the partial-vector mask for the
/// tail, and the accumulator; returns the new accumulator.
pub(super) type RowBody<'f> = dyn FnMut(&mut Body, &str, Option<&Part>, Option<&str>) -> Option<String> + 'f;

/// An accumulator carried through a loop: initial value, type, and how copies combine.
#[derive(Clone, Copy, Debug)]
pub(super) struct Acc<'a> {
    pub init: &'a str,
    pub ty: &'a str,
    pub how: Combine,
}

/// Runs `body` over the `n` positions of a row in vectors of `lanes`: a main loop unrolled
/// `unroll` times (one accumulator each, for independent dependency chains), the remaining
/// whole vectors, then one masked tail. Returns the combined accumulator.
pub(super) fn row_loop(
    b: &mut Body,
    n: usize,
    lanes: usize,
    unroll: usize,
    acc: Option<Acc>,
    body: &mut RowBody,
) -> Option<String> {
    let step = lanes * unroll;
    let main = n / step * step;
    let whole = n / lanes * lanes;
    let mut cur = acc.map(|a| a.init.to_string());
    let ty = acc.map(|a| a.ty.to_string()).unwrap_or_default();
    if main > 0 {
        let (lo, hi, st) = (b.index(0), b.index(main), b.index(step));
        let inits: Vec<(String, String)> = match &cur {
            Some(c) => (0..unroll).map(|_| (c.clone(), ty.clone())).collect(),
            None => Vec::new(),
        };
        let (iv, args, res) = for_open(b, &lo, &hi, &st, &inits);
        let mut outs = Vec::new();
        for u in 0..unroll {
            let pos = if u == 0 {
                iv.clone()
            } else {
                let c = b.index(u * lanes);
                b.assign(format!("arith.addi {iv}, {c} : index"))
            };
            outs.extend(body(b, &pos, None, args.get(u).map(String::as_str)));
        }
        for_close(b, &outs, &inits);
        if let (Some(a), Some((first, rest))) = (acc, res.split_first()) {
            let mut x = first.clone();
            for r in rest {
                x = a.how.apply(b, &x, r, &ty);
            }
            cur = Some(x);
        }
    }
    if whole > main {
        let (lo, hi, st) = (b.index(main), b.index(whole), b.index(lanes));
        let inits: Vec<(String, String)> = cur.iter().map(|c| (c.clone(), ty.clone())).collect();
        let (iv, args, res) = for_open(b, &lo, &hi, &st, &inits);
        let outs: Vec<String> = body(b, &iv, None, args.first().map(String::as_str)).into_iter().collect();
        for_close(b, &outs, &inits);
        if let Some(r) = res.into_iter().next() {
            cur = Some(r);
        }
    }
    if n > whole {
        let pos = b.index(whole);
        let mask = b.assign(format!("vector.constant_mask [{}] : vector<{lanes}xi1>", n - whole));
        let part = Part { mask: &mask, count: Count::Static(n - whole) };
        let r = body(b, &pos, Some(&part), cur.as_deref());
        if cur.is_some() {
            cur = r;
        }
    }
    cur
}

/// A row's length: known when compiling, or an `index` value read at run time.
#[derive(Clone, Copy, Debug)]
pub(super) enum RowLen<'a> {
    Static(usize),
    Run(&'a str),
}

/// [`row_loop`] over a row of length `n`, static or read at run time ([`row_loop_run`]).
pub(super) fn row_loop_len(
    b: &mut Body,
    n: RowLen,
    lanes: usize,
    unroll: usize,
    acc: Option<Acc>,
    body: &mut RowBody,
) -> Option<String> {
    match n {
        RowLen::Static(n) => row_loop(b, n, lanes, unroll, acc, body),
        RowLen::Run(n) => row_loop_run(b, n, lanes, unroll, acc, body),
    }
}

/// [`row_loop`] over a row of run-time length `n` (an `index` value): the unrolled main loop,
/// the remaining whole vectors and the masked tail are each emitted, bounded at run time (the
/// tail's mask is empty when `n` is a multiple of the lanes).
fn row_loop_run(
    b: &mut Body,
    n: &str,
    lanes: usize,
    unroll: usize,
    acc: Option<Acc>,
    body: &mut RowBody,
) -> Option<String> {
    let (zero, step, lane) = (b.index(0), b.index(lanes * unroll), b.index(lanes));
    let main = b.assign(format!("arith.remui {n}, {step} : index"));
    let main = b.assign(format!("arith.subi {n}, {main} : index"));
    let tail = b.assign(format!("arith.remui {n}, {lane} : index"));
    let whole = b.assign(format!("arith.subi {n}, {tail} : index"));
    let ty = acc.map(|a| a.ty.to_string()).unwrap_or_default();
    // The main loop, one accumulator per unrolled vector, combined after it.
    let inits: Vec<(String, String)> =
        acc.iter().flat_map(|a| (0..unroll).map(|_| (a.init.to_string(), ty.clone()))).collect();
    let (iv, args, res) = for_open(b, &zero, &main, &step, &inits);
    let mut outs = Vec::new();
    for u in 0..unroll {
        let c = b.index(u * lanes);
        let pos = b.assign(format!("arith.addi {iv}, {c} : index"));
        outs.extend(body(b, &pos, None, args.get(u).map(String::as_str)));
    }
    for_close(b, &outs, &inits);
    let mut cur = match (acc, res.split_first()) {
        (Some(a), Some((first, rest))) => {
            Some(rest.iter().fold(first.clone(), |x, r| a.how.apply(b, &x, r, &ty)))
        }
        _ => None,
    };
    // The whole vectors left, then the partial one.
    let inits: Vec<(String, String)> = cur.iter().map(|c| (c.clone(), ty.clone())).collect();
    let (iv, args, res) = for_open(b, &main, &whole, &lane, &inits);
    let outs: Vec<String> = body(b, &iv, None, args.first().map(String::as_str)).into_iter().collect();
    for_close(b, &outs, &inits);
    if let Some(r) = res.into_iter().next() {
        cur = Some(r);
    }
    let mask = b.assign(format!("vector.create_mask {tail} : vector<{lanes}xi1>"));
    let part = Part { mask: &mask, count: Count::Dynamic(&tail) };
    let r = body(b, &whole, Some(&part), cur.as_deref());
    if cur.is_some() {
        cur = r;
    }
    cur
}

/// Opens `scf.for iv = lo to hi step st` carrying `inits` (value, type); returns the
/// induction variable, the iter_args and the loop's results.
pub(super) fn for_open(
    b: &mut Body,
    lo: &str,
    hi: &str,
    st: &str,
    inits: &[(String, String)],
) -> (String, Vec<String>, Vec<String>) {
    let iv = b.fresh("i");
    if inits.is_empty() {
        b.open(format!("scf.for {iv} = {lo} to {hi} step {st}"));
        return (iv, Vec::new(), Vec::new());
    }
    let res = b.fresh("r");
    let args: Vec<String> = inits.iter().map(|_| b.fresh("a")).collect();
    let binds: Vec<String> = args.iter().zip(inits).map(|(a, (v, _))| format!("{a} = {v}")).collect();
    let tys: Vec<&str> = inits.iter().map(|(_, t)| t.as_str()).collect();
    let (head, results) = if inits.len() == 1 {
        (res.clone(), vec![res])
    } else {
        (format!("{res}:{}", inits.len()), (0..inits.len()).map(|i| format!("{res}#{i}")).collect())
    };
    b.open(format!(
        "{head} = scf.for {iv} = {lo} to {hi} step {st} iter_args({}) -> ({})",
        binds.join(", "),
        tys.join(", ")
    ));
    (iv, args, results)
}

/// Closes a loop opened by [`for_open`], yielding `outs` (of the types of `inits`).
pub(super) fn for_close(b: &mut Body, outs: &[String], inits: &[(String, String)]) {
    if !inits.is_empty() {
        let tys: Vec<&str> = inits.iter().map(|(_, t)| t.as_str()).collect();
        b.line(format!("scf.yield {} : {}", outs.join(", "), tys.join(", ")));
    }
    b.close("");
}
