//! Concat and pad along run-time axes, or along static axes before one: keys and values of a
//! cache joined with the new tokens' along the sequence, a sequence padded at its ends. The
//! row form cannot take them (it merges the joined axis into the rows), so they are walked at
//! the run's extents and strides. A concat takes one range iteration per index of the axes
//! before the joined one and copies each input's part by nested loops, merged where the
//! input's and the result's strides chain. A pad takes one row of the result (every axis but
//! the last) per iteration: the padding's value, the input's part and the value again, each a
//! loop between bounds computed from the run's extents, or the value alone for a row outside
//! the input. No element is tested on its own.
//!
//! The GPU twins (`gpu::dynamic`) take one element per invocation and find its operand with
//! [`concat_value`] and [`pad_value`].

use super::{address, at_hints_and_maxima, buffer_view, coalesce_sym, row_kernel, step, unravel, walk, Walk};
use crate::kernels::elementwise::{constant, load, reg_type, store};
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::program::bad;
use crate::{CodegenError, Kernel};
use kiln_ir::Dim;
use kiln_sched::Schedule;

/// An operand of a data-movement kernel: its argument, its buffer and its run-time walk.
pub(crate) struct Part {
    pub arg: String,
    pub view: View,
    pub walk: Walk,
}

/// Each input's walk and the result's (arguments `%a0`… in that order), emitted where `b`
/// stands.
pub(crate) fn parts(s: &Schedule, b: &mut Body, k: &kiln_sched::Kernel, n_syms: usize) -> (Vec<Part>, Part) {
    let mut part = |i: usize, o: &kiln_sched::Operand| Part {
        arg: format!("%a{i}"),
        view: buffer_view(s, o),
        walk: walk(b, &o.view, n_syms),
    };
    let inputs: Vec<Part> = k.inputs.iter().enumerate().map(|(i, o)| part(i, o)).collect();
    let out = part(k.inputs.len(), &k.output);
    (inputs, out)
}

/// Where each input starts along the joined axis: 0, then the running sums of the inputs'
/// extents (`index` values), one more than there are inputs.
pub(crate) fn bounds(b: &mut Body, inputs: &[Part], axis: usize) -> Vec<String> {
    let mut at = vec![b.index(0)];
    for p in inputs {
        let prev = at.last().cloned().unwrap_or_default();
        at.push(b.assign(format!("arith.addi {prev}, {} : index", p.walk.extents[axis])));
    }
    at
}

/// The element of a concat along `axis` at the result's indices `idx` (one per axis): the
/// input whose bounds hold `idx[axis]`, chosen by a chain of `scf.if`s.
pub(crate) fn concat_value(
    b: &mut Body,
    inputs: &[Part],
    bounds: &[String],
    idx: &[String],
    axis: usize,
) -> String {
    let ty = reg_type(inputs[0].view.dtype);
    let read = |b: &mut Body, i: usize| {
        let mut at = idx.to_vec();
        at[axis] = b.assign(format!("arith.subi {}, {} : index", idx[axis], bounds[i]));
        let a = address(b, &inputs[i].walk, &at);
        load(b, &inputs[i].arg, &inputs[i].view, &a)
    };
    let last = inputs.len() - 1;
    let mut results = Vec::with_capacity(last);
    for i in 0..last {
        let before = b.assign(format!("arith.cmpi ult, {}, {} : index", idx[axis], bounds[i + 1]));
        let res = b.fresh("part");
        b.open(format!("{res} = scf.if {before} -> ({ty})"));
        let v = read(b, i);
        b.line(format!("scf.yield {v} : {ty}"));
        b.close("");
        b.open("else");
        results.push(res);
    }
    let mut v = read(b, last);
    for res in results.into_iter().rev() {
        b.line(format!("scf.yield {v} : {ty}"));
        b.close("");
        v = res;
    }
    v
}

/// Whether the result's indices `idx` (over the axes given) fall inside the padded input, and
/// the input's indices there (meaningful only inside). Unsigned arithmetic: an index before
/// the padding wraps past the input's extent.
fn inside(
    b: &mut Body,
    input: &Walk,
    pads: &[(usize, usize)],
    idx: &[String],
) -> (Option<String>, Vec<String>) {
    let mut all: Option<String> = None;
    let mut at = Vec::with_capacity(idx.len());
    for (a, i) in idx.iter().enumerate() {
        let before = pads.get(a).map_or(0, |p| p.0);
        let padded = pads.get(a).is_some_and(|&p| p != (0, 0));
        if !padded {
            at.push(i.clone());
            continue;
        }
        let c = b.index(before);
        let j = b.assign(format!("arith.subi {i}, {c} : index"));
        let ok = b.assign(format!("arith.cmpi ult, {j}, {} : index", input.extents[a]));
        all = Some(match all {
            None => ok,
            Some(prev) => b.assign(format!("arith.andi {prev}, {ok} : i1")),
        });
        at.push(j);
    }
    (all, at)
}

/// The element of a pad at the result's indices `idx`: the input's where they fall inside it,
/// else `value`.
pub(crate) fn pad_value(
    b: &mut Body,
    input: &Part,
    pads: &[(usize, usize)],
    value: f64,
    idx: &[String],
) -> String {
    let dtype = input.view.dtype;
    let ty = reg_type(dtype);
    let (ok, at) = inside(b, &input.walk, pads, idx);
    let Some(ok) = ok else {
        let a = address(b, &input.walk, &at);
        return load(b, &input.arg, &input.view, &a);
    };
    let res = b.fresh("padded");
    b.open(format!("{res} = scf.if {ok} -> ({ty})"));
    let a = address(b, &input.walk, &at);
    let v = load(b, &input.arg, &input.view, &a);
    b.line(format!("scf.yield {v} : {ty}"));
    b.close("");
    b.open("else");
    let c = constant(b, value, dtype);
    b.line(format!("scf.yield {c} : {ty}"));
    b.close("");
    res
}

/// Copies `n` elements from `from` (argument, buffer, first element, stride) to `to`,
/// starting at element `lo` of both runs (`index` values).
fn copy_run(
    b: &mut Body,
    from: (&Part, &str, &str),
    to: (&Part, &str, &str),
    (lo, hi): (&str, &str),
    shift: &str,
) {
    let c1 = b.index(1);
    b.open(format!("scf.for %j = {lo} to {hi} step {c1}"));
    let jj = b.assign(format!("arith.subi %j, {shift} : index"));
    let src = step(b, from.1, &jj, from.2);
    let v = load(b, &from.0.arg, &from.0.view, &src);
    let dst = step(b, to.1, "%j", to.2);
    store(b, &v, &to.0.arg, &to.0.view, &dst);
    b.close("");
}

/// Fills elements `lo..hi` of `to`'s run from `base` at `stride` with `value`.
fn fill_run(b: &mut Body, to: &Part, (base, stride): (&str, &str), (lo, hi): (&str, &str), value: f64) {
    let c1 = b.index(1);
    let c = constant(b, value, to.view.dtype);
    b.open(format!("scf.for %j = {lo} to {hi} step {c1}"));
    let dst = step(b, base, "%j", stride);
    store(b, &c, &to.arg, &to.view, &dst);
    b.close("");
}

/// The CPU concat along `axis` of kernel `k`'s inputs: one range iteration per index of the
/// axes before `axis`, in which each input's part (its axes from `axis` on) is copied by
/// nested loops, merged where the input's and the result's strides chain (a cache and the new
/// tokens' keys whose heads are contiguous copy as one run each). Arguments: the inputs, out,
/// `%syms`.
pub(super) fn emit_concat(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    axis: usize,
) -> Result<(Kernel, Dim), CodegenError> {
    let rank = k.output.view.shape.len();
    if rank == 0 || axis >= rank || k.inputs.is_empty() {
        return Err(bad("concat"));
    }
    let n_syms = s.symbols.len().max(1);
    let mut b = Body::new();
    let (inputs, out) = parts(s, &mut b, k, n_syms);
    let at = bounds(&mut b, &inputs, axis);
    // Each input's part and the result's slice for it, over the axes from `axis` on.
    let tail = |v: &kiln_sched::StridedView, shape: &[Dim]| kiln_sched::StridedView {
        shape: shape[axis..].to_vec(),
        strides: v.strides[axis..].to_vec(),
        offset: Dim::Const(0),
    };
    let runs: Vec<Vec<Walk>> = k
        .inputs
        .iter()
        .map(|o| {
            let merged = coalesce_sym(&[tail(&o.view, &o.view.shape), tail(&k.output.view, &o.view.shape)]);
            merged.iter().map(|v| walk(&mut b, v, n_syms)).collect()
        })
        .collect();
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let idx = unravel(&mut b, "%r", &out.walk.extents, axis);
    let lead = |w: &Walk| Walk { strides: w.strides[..axis].to_vec(), ..w.clone() };
    let obase = address(&mut b, &lead(&out.walk), &idx);
    for (i, p) in inputs.iter().enumerate() {
        let from = address(&mut b, &lead(&p.walk), &idx);
        let to = step(&mut b, &obase, &at[i], &out.walk.strides[axis]);
        copy_nest(&mut b, (p, &from), (&out, &to), &runs[i]);
    }
    b.close("");
    b.line("return");
    let shape = &k.output.view.shape;
    let rows = kiln_sched::product(&shape[..axis]).map_err(|e| bad(&e.to_string()))?;
    finish(s, sym, k, b, (inputs, out), &rows)
}

/// Copies the block `walks` describes (the source's walk and the destination's, over the same
/// extents) from `from` to `to` (each an argument and where the block starts), one loop per
/// axis, the innermost the last.
fn copy_nest(b: &mut Body, (src, from): (&Part, &str), (dst, to): (&Part, &str), walks: &[Walk]) {
    let (c0, c1) = (b.index(0), b.index(1));
    let (mut x, mut y) = (from.to_string(), to.to_string());
    let rank = walks[0].extents.len();
    for a in 0..rank {
        let iv = b.fresh("j");
        b.open(format!("scf.for {iv} = {c0} to {} step {c1}", walks[0].extents[a]));
        x = step(b, &x, &iv, &walks[0].strides[a]);
        y = step(b, &y, &iv, &walks[1].strides[a]);
    }
    let v = load(b, &src.arg, &src.view, &x);
    store(b, &v, &dst.arg, &dst.view, &y);
    for _ in 0..rank {
        b.close("");
    }
}

/// The CPU pad of kernel `k`'s input: one range iteration per row of the result. Arguments:
/// x, out, `%syms`.
pub(super) fn emit_pad(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    pads: &[(usize, usize)],
    value: f64,
) -> Result<(Kernel, Dim), CodegenError> {
    let rank = k.output.view.shape.len();
    if rank == 0 || k.inputs.len() != 1 || pads.len() != rank {
        return Err(bad("pad"));
    }
    let n_syms = s.symbols.len().max(1);
    let mut b = Body::new();
    let (inputs, out) = parts(s, &mut b, k, n_syms);
    let x = &inputs[0];
    let last = rank - 1;
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let idx = unravel(&mut b, "%r", &out.walk.extents, last);
    let lead = |w: &Walk| Walk { strides: w.strides[..last].to_vec(), ..w.clone() };
    let obase = address(&mut b, &lead(&out.walk), &idx);
    let ostride = out.walk.strides[last].clone();
    let (ok, at) = inside(&mut b, &x.walk, &pads[..last], &idx);
    let (c0, n_out) = (b.index(0), out.walk.extents[last].clone());
    if let Some(ok) = &ok {
        b.open(format!("scf.if {ok}"));
    }
    // Inside: the value before the input's part of the row, the part, the value after it.
    let before = b.index(pads[last].0);
    let end = b.assign(format!("arith.addi {before}, {} : index", x.walk.extents[last]));
    let base = address(&mut b, &lead(&x.walk), &at);
    fill_run(&mut b, &out, (&obase, &ostride), (&c0, &before), value);
    copy_run(&mut b, (x, &base, &x.walk.strides[last]), (&out, &obase, &ostride), (&before, &end), &before);
    fill_run(&mut b, &out, (&obase, &ostride), (&end, &n_out), value);
    if ok.is_some() {
        b.close("");
        b.open("else");
        fill_run(&mut b, &out, (&obase, &ostride), (&c0, &n_out), value);
        b.close("");
    }
    b.close("");
    b.line("return");
    let shape = &k.output.view.shape;
    let rows = kiln_sched::product(&shape[..rank - 1]).map_err(|e| bad(&e.to_string()))?;
    finish(s, sym, k, b, (inputs, out), &rows)
}

/// The kernel over `rows` range iterations, costed at the hints: one operation per element of
/// the result (as a layout copy counts), the result written once and the inputs read once.
fn finish(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    b: Body,
    (inputs, out): (Vec<Part>, Part),
    rows: &Dim,
) -> Result<(Kernel, Dim), CodegenError> {
    let numel = |v: &kiln_sched::StridedView| {
        kiln_sched::product(&v.shape).map(|d| at_hints_and_maxima(s, &d).0).unwrap_or(0)
    };
    let bytes: usize =
        k.inputs.iter().chain([&k.output]).map(|o| numel(&o.view) * o.dtype.size_bytes()).sum();
    let flops = numel(&k.output.view) as u64;
    let views: Vec<View> = inputs.iter().chain([&out]).map(|p| p.view.clone()).collect();
    let args: Vec<String> = inputs.iter().chain([&out]).map(|p| p.arg.clone()).collect();
    Ok(row_kernel(s, sym, (&views, &args), b, rows, |_| (flops, bytes as u64)))
}
