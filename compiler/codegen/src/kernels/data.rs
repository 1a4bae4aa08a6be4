//! Data movement with index arithmetic: gather (embedding lookups), concat and pad.

use super::elementwise::{constant, load, store};
use super::rows::{open_rows, row_count, wrap};
use super::View;
use crate::mlir_text::Body;
use crate::{CodegenError, Kernel};

fn finish(symbol: &str, memrefs: Vec<String>, b: Body, out: &View, moved: usize) -> Kernel {
    let range = row_count(&out.shape).max(1);
    let bytes = (moved * out.dtype.size_bytes()) as u64;
    Kernel {
        symbol: symbol.into(),
        mlir: wrap(symbol, &memrefs, b),
        range,
        grain: Kernel::grain_for(range, bytes),
        flops: 0,
        bytes,
    }
}

/// `out = gather(table, indices)` along `axis`: out is `table[..axis] ++ indices ++
/// table[axis+1..]`. Indices outside `0..table.shape[axis]` are clamped into it (compiled code
/// cannot report them; the interpreter does). Arguments: table, indices, out.
pub fn emit_gather(
    symbol: &str,
    axis: usize,
    table: &View,
    indices: &View,
    out: &View,
) -> Result<Kernel, CodegenError> {
    if !indices.dtype.is_int() {
        return Err(CodegenError::Unsupported(format!("gather with {} indices", indices.dtype)));
    }
    let mut b = Body::new();
    let idx = open_rows(&mut b, &out.shape);
    let v = gather_value(&mut b, axis, table, indices, &idx);
    let at_o = out.index_expr(&mut b, &idx);
    store(&mut b, &v, "%a2", out, &at_o);
    b.close("");
    b.close("");
    b.line("return");
    Ok(finish(symbol, vec![table.memref(), indices.memref(), out.memref()], b, out, 2 * out.numel()))
}

/// Element `idx` of `gather(table %a0, indices %a1)`, in its register type; an index outside
/// the table is clamped into it. The caller checked that the indices are integers.
pub(crate) fn gather_value(
    b: &mut Body,
    axis: usize,
    table: &View,
    indices: &View,
    idx: &[String],
) -> String {
    let k = indices.rank();
    let at_i = indices.index_expr(b, &idx[axis..axis + k]);
    let raw = load(b, "%a1", indices, &at_i);
    let ity = if indices.dtype == kiln_ir::DType::I32 { "i32" } else { "i64" };
    let zero = b.int(0, ity);
    let hi = b.int(table.shape[axis] as i64 - 1, ity);
    let c = b.assign(format!("arith.maxsi {raw}, {zero} : {ity}"));
    let c = b.assign(format!("arith.minsi {c}, {hi} : {ity}"));
    let row = b.assign(format!("arith.index_cast {c} : {ity} to index"));
    let mut t_idx: Vec<String> = idx[..axis].to_vec();
    t_idx.push(row);
    t_idx.extend(idx[axis + k..].iter().cloned());
    let at_t = table.index_expr(b, &t_idx);
    load(b, "%a0", table, &at_t)
}

/// `out = concat(inputs…)` along `axis`. Arguments: the inputs, out.
///
/// With two or more indices before `axis` (a cache of keys per batch and head joined along the
/// sequence, an LSTM's steps joined per batch), one range iteration per such index copies each
/// input's part into its slice of the result by nested loops, merged where the input's and
/// the result's strides chain, so the copies are long contiguous runs. Otherwise one
/// iteration per row of the result, each element loaded from the input that holds it.
pub fn emit_concat(symbol: &str, axis: usize, inputs: &[View], out: &View) -> Result<Kernel, CodegenError> {
    let outer: usize = out.shape[..axis.min(out.rank())].iter().product();
    if outer >= 2 && axis < out.rank() && !inputs.is_empty() {
        return Ok(concat_by_copies(symbol, axis, inputs, out, outer));
    }
    let mut b = Body::new();
    let idx = open_rows(&mut b, &out.shape);
    let value = concat_value(&mut b, axis, inputs, out, &idx)?;
    let at_o = out.index_expr(&mut b, &idx);
    store(&mut b, &value, &format!("%a{}", inputs.len()), out, &at_o);
    b.close("");
    b.close("");
    b.line("return");
    let mut memrefs: Vec<String> = inputs.iter().map(View::memref).collect();
    memrefs.push(out.memref());
    Ok(finish(symbol, memrefs, b, out, 2 * out.numel()))
}

/// [`emit_concat`] over `outer` indices of the axes before `axis`, each input's part copied by
/// nested loops.
fn concat_by_copies(symbol: &str, axis: usize, inputs: &[View], out: &View, outer: usize) -> Kernel {
    let mut b = Body::new();
    let (c0, c1) = (b.index(0), b.index(1));
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    // The index over the axes before `axis`, row-major.
    let mut idx = vec![String::new(); axis];
    let mut rem = "%r".to_string();
    for k in (0..axis).rev() {
        if k == 0 {
            idx[0] = rem.clone();
        } else {
            let d = b.index(out.shape[k]);
            idx[k] = b.assign(format!("arith.remui {rem}, {d} : index"));
            rem = b.assign(format!("arith.divui {rem}, {d} : index"));
        }
    }
    let start_of = |b: &mut Body, v: &View| {
        let mut at = b.index(v.offset);
        for (i, &st) in idx.iter().zip(&v.strides[..axis]) {
            let s = b.index(st);
            let t = b.assign(format!("arith.muli {i}, {s} : index"));
            at = b.assign(format!("arith.addi {at}, {t} : index"));
        }
        at
    };
    let obase = start_of(&mut b, out);
    let out_arg = format!("%a{}", inputs.len());
    let mut first = 0;
    for (i, v) in inputs.iter().enumerate() {
        let from = start_of(&mut b, v);
        let skip = b.index(first * out.strides[axis]);
        let to = b.assign(format!("arith.addi {obase}, {skip} : index"));
        // The part's axes from `axis` on: (extent, input stride, result stride), merged.
        let mut dims: Vec<(usize, usize, usize)> = Vec::new();
        for k in axis..v.rank() {
            let d = (v.shape[k], v.strides[k], out.strides[k]);
            match dims.last_mut() {
                _ if d.0 == 1 => {}
                Some(p) if p.1 == d.1 * d.0 && p.2 == d.2 * d.0 => *p = (p.0 * d.0, d.1, d.2),
                _ => dims.push(d),
            }
        }
        let (mut x, mut y) = (from, to);
        for &(n, xs, ys) in &dims {
            let (n, xs, ys) = (b.index(n), b.index(xs), b.index(ys));
            let j = b.fresh("j");
            b.open(format!("scf.for {j} = {c0} to {n} step {c1}"));
            let t = b.assign(format!("arith.muli {j}, {xs} : index"));
            x = b.assign(format!("arith.addi {x}, {t} : index"));
            let t = b.assign(format!("arith.muli {j}, {ys} : index"));
            y = b.assign(format!("arith.addi {y}, {t} : index"));
        }
        let value = load(&mut b, &format!("%a{i}"), v, &x);
        store(&mut b, &value, &out_arg, out, &y);
        for _ in &dims {
            b.close("");
        }
        first += v.shape[axis];
    }
    b.close("");
    b.line("return");
    let mut memrefs: Vec<String> = inputs.iter().map(View::memref).collect();
    memrefs.push(out.memref());
    let bytes = (2 * out.numel() * out.dtype.size_bytes()) as u64;
    Kernel {
        symbol: symbol.into(),
        mlir: wrap(symbol, &memrefs, b),
        range: outer,
        grain: Kernel::grain_for(outer, bytes),
        flops: 0,
        bytes,
    }
}

/// Element `idx` of `concat(inputs %a0…)` along `axis`, in its register type.
pub(crate) fn concat_value(
    b: &mut Body,
    axis: usize,
    inputs: &[View],
    out: &View,
    idx: &[String],
) -> Result<String, CodegenError> {
    // Find which input holds position idx[axis]: a chain of selects over the running starts,
    // loading each input at a clamped index and keeping the one whose part it is.
    let mut value: Option<String> = None;
    let mut start = 0;
    let reg = super::elementwise::reg_type(out.dtype);
    for (i, v) in inputs.iter().enumerate() {
        let e = v.shape[axis];
        let s = b.index(start);
        let last = b.index(e.saturating_sub(1));
        let local = b.assign(format!("arith.subi {}, {s} : index", idx[axis]));
        let local = b.assign(format!("arith.minui {local}, {last} : index"));
        let mut vi = idx.to_vec();
        vi[axis] = local;
        let at = v.index_expr(b, &vi);
        let x = load(b, &format!("%a{i}"), v, &at);
        value = Some(match value {
            None => x,
            Some(prev) => {
                let s = b.index(start);
                let inside = b.assign(format!("arith.cmpi uge, {}, {s} : index", idx[axis]));
                b.assign(format!("arith.select {inside}, {x}, {prev} : {reg}"))
            }
        });
        start += e;
    }
    value.ok_or_else(|| CodegenError::Unsupported("concat of nothing".into()))
}

/// `out = pad(x, pads, value)`. Arguments: x, out.
pub fn emit_pad(
    symbol: &str,
    pads: &[(usize, usize)],
    value: f64,
    x: &View,
    out: &View,
) -> Result<Kernel, CodegenError> {
    let mut b = Body::new();
    let idx = open_rows(&mut b, &out.shape);
    let r = pad_value(&mut b, pads, value, x, out, &idx);
    let at_o = out.index_expr(&mut b, &idx);
    store(&mut b, &r, "%a1", out, &at_o);
    b.close("");
    b.close("");
    b.line("return");
    Ok(finish(symbol, vec![x.memref(), out.memref()], b, out, 2 * out.numel()))
}

/// Element `idx` of `pad(x %a0, pads, value)`, in its register type (the load is always in
/// bounds: the index is clamped, and the fill value selected outside `x`).
pub(crate) fn pad_value(
    b: &mut Body,
    pads: &[(usize, usize)],
    value: f64,
    x: &View,
    out: &View,
    idx: &[String],
) -> String {
    let mut inside: Option<String> = None;
    let mut src = Vec::with_capacity(idx.len());
    for (k, i) in idx.iter().enumerate() {
        let before = b.index(pads[k].0);
        let n = b.index(x.shape[k]);
        let last = b.index(x.shape[k].saturating_sub(1));
        let ge = b.assign(format!("arith.cmpi uge, {i}, {before} : index"));
        let local = b.assign(format!("arith.subi {i}, {before} : index"));
        let lt = b.assign(format!("arith.cmpi ult, {local}, {n} : index"));
        let ok = b.assign(format!("arith.andi {ge}, {lt} : i1"));
        inside = Some(match inside {
            None => ok,
            Some(prev) => b.assign(format!("arith.andi {prev}, {ok} : i1")),
        });
        // A clamped index, so the load is always in bounds.
        let zero = b.index(0);
        let l = b.assign(format!("arith.select {ge}, {local}, {zero} : index"));
        src.push(b.assign(format!("arith.minui {l}, {last} : index")));
    }
    let at = x.index_expr(b, &src);
    let v = load(b, "%a0", x, &at);
    let fill = constant(b, value, out.dtype);
    let reg = super::elementwise::reg_type(out.dtype);
    match inside {
        Some(ok) => b.assign(format!("arith.select {ok}, {v}, {fill} : {reg}")),
        None => v,
    }
}
