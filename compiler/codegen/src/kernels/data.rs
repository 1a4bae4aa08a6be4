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
pub fn emit_concat(symbol: &str, axis: usize, inputs: &[View], out: &View) -> Result<Kernel, CodegenError> {
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
