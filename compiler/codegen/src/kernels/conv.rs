//! 2-D convolution and pooling (NCHW), as direct loops with bounds checks for padding.
//!
//! Correct for every stride, padding, dilation and group count; the inner loop over output
//! columns is what LLVM vectorizes. (A tiled im2col-free convolution is future work; the
//! shipped models spend their time in matmuls and attention.)

use super::elementwise::{load, reg_type, store};
use super::rows::{open_rows, row_count, wrap};
use super::View;
use crate::mlir_text::Body;
use crate::{CodegenError, Kernel};
use kiln_ir::PoolKind;

/// In-bounds flag and clamped input coordinate for output coordinate `o` along one spatial
/// axis: `o·stride + k·dilation − pad` must lie in `0..extent`.
fn tap(
    b: &mut Body,
    o: &str,
    k: &str,
    stride: usize,
    dilation: usize,
    pad: usize,
    extent: usize,
) -> (String, String) {
    let s = b.index(stride);
    let d = b.index(dilation);
    let p = b.index(pad);
    let a = b.assign(format!("arith.muli {o}, {s} : index"));
    let kd = b.assign(format!("arith.muli {k}, {d} : index"));
    let pos = b.assign(format!("arith.addi {a}, {kd} : index"));
    let ge = b.assign(format!("arith.cmpi uge, {pos}, {p} : index"));
    let local = b.assign(format!("arith.subi {pos}, {p} : index"));
    let n = b.index(extent);
    let lt = b.assign(format!("arith.cmpi ult, {local}, {n} : index"));
    let ok = b.assign(format!("arith.andi {ge}, {lt} : i1"));
    let zero = b.index(0);
    let last = b.index(extent.saturating_sub(1));
    let l = b.assign(format!("arith.select {ge}, {local}, {zero} : index"));
    let l = b.assign(format!("arith.minui {l}, {last} : index"));
    (ok, l)
}

/// `out = conv2d(x, w)`: x `[N, C, H, W]`, w `[O, C/groups, KH, KW]`, out `[N, O, OH, OW]`.
/// Arguments: x, w, out.
#[allow(clippy::too_many_arguments)]
pub fn emit_conv2d(
    symbol: &str,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    x: &View,
    w: &View,
    out: &View,
) -> Result<Kernel, CodegenError> {
    let dtype = out.dtype;
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!("conv2d on {dtype}")));
    }
    let (cg, kh, kw) = (w.shape[1], w.shape[2], w.shape[3]);
    let mut b = Body::new();
    let idx = open_rows(&mut b, &out.shape);
    let v = conv_value(&mut b, stride, padding, dilation, groups, x, w, dtype, &idx);
    let at_o = out.index_expr(&mut b, &idx);
    store(&mut b, &v, "%a2", out, &at_o);
    b.close("");
    b.close("");
    b.line("return");
    let range = row_count(&out.shape).max(1);
    let flops = (2 * out.numel() * cg * kh * kw) as u64;
    let bytes = ((x.numel() + w.numel() + out.numel()) * dtype.size_bytes()) as u64;
    Ok(Kernel {
        symbol: symbol.into(),
        mlir: wrap(symbol, &[x.memref(), w.memref(), out.memref()], b),
        range,
        grain: Kernel::grain_for(range, flops),
        flops,
        bytes,
    })
}

/// `out = pool2d(x)`: max (padding never wins) or average (over the in-bounds taps only).
/// Arguments: x, out.
pub fn emit_pool2d(
    symbol: &str,
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    x: &View,
    out: &View,
) -> Result<Kernel, CodegenError> {
    let dtype = out.dtype;
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!("pool2d on {dtype}")));
    }
    let mut b = Body::new();
    let idx = open_rows(&mut b, &out.shape);
    let result = pool_value(&mut b, kind, kernel, stride, padding, x, dtype, &idx);
    let at_o = out.index_expr(&mut b, &idx);
    store(&mut b, &result, "%a1", out, &at_o);
    b.close("");
    b.close("");
    b.line("return");
    let range = row_count(&out.shape).max(1);
    let flops = (out.numel() * kernel[0] * kernel[1]) as u64;
    let bytes = ((x.numel() + out.numel()) * dtype.size_bytes()) as u64;
    Ok(Kernel {
        symbol: symbol.into(),
        mlir: wrap(symbol, &[x.memref(), out.memref()], b),
        range,
        grain: Kernel::grain_for(range, flops),
        flops,
        bytes,
    })
}

/// Element `idx` (`[n, o, oh, ow]`) of `conv2d(x %a0, w %a1)` in register type; padding taps
/// read a clamped index and count as zero.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_value(
    b: &mut Body,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    x: &View,
    w: &View,
    dtype: kiln_ir::DType,
    idx: &[String],
) -> String {
    let ty = reg_type(dtype);
    let (o_ch, cg, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    let og = o_ch / groups.max(1);
    let (n, o, oh, ow) = (idx[0].clone(), idx[1].clone(), idx[2].clone(), idx[3].clone());
    let c0 = b.index(0);
    let c1 = b.index(1);
    let zero = b.float(0.0, ty);
    let ogc = b.index(og);
    let g = b.assign(format!("arith.divui {o}, {ogc} : index"));
    let cgc = b.index(cg);
    let cbase = b.assign(format!("arith.muli {g}, {cgc} : index"));
    let (nc, nkh, nkw) = (b.index(cg), b.index(kh), b.index(kw));
    b.open(format!("%s0 = scf.for %c = {c0} to {nc} step {c1} iter_args(%t0 = {zero}) -> ({ty})"));
    b.open(format!("%s1 = scf.for %y = {c0} to {nkh} step {c1} iter_args(%t1 = %t0) -> ({ty})"));
    b.open(format!("%s2 = scf.for %x = {c0} to {nkw} step {c1} iter_args(%t2 = %t1) -> ({ty})"));
    let (ok_h, ih) = tap(b, &oh, "%y", stride[0], dilation[0], padding[0], x.shape[2]);
    let (ok_w, iw) = tap(b, &ow, "%x", stride[1], dilation[1], padding[1], x.shape[3]);
    let ok = b.assign(format!("arith.andi {ok_h}, {ok_w} : i1"));
    let ci = b.assign(format!("arith.addi {cbase}, %c : index"));
    let at_x = x.index_expr(b, &[n.clone(), ci, ih, iw]);
    let xv = load(b, "%a0", x, &at_x);
    let xv = b.select(&ok, &xv, &zero, ty);
    let at_w = w.index_expr(b, &[o.clone(), "%c".into(), "%y".into(), "%x".into()]);
    let wv = load(b, "%a1", w, &at_w);
    let acc = b.fma(&xv, &wv, "%t2", ty);
    b.line(format!("scf.yield {acc} : {ty}"));
    b.close("");
    b.line(format!("scf.yield %s2 : {ty}"));
    b.close("");
    b.line(format!("scf.yield %s1 : {ty}"));
    b.close("");
    "%s0".to_string()
}

/// Element `idx` (`[n, c, oh, ow]`) of `pool2d(x %a0)` in register type: the max over the
/// in-bounds taps, or their average.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_value(
    b: &mut Body,
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    x: &View,
    dtype: kiln_ir::DType,
    idx: &[String],
) -> String {
    let ty = reg_type(dtype);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let init = match kind {
        PoolKind::Max => b.float(f64::NEG_INFINITY, ty),
        PoolKind::Avg => b.float(0.0, ty),
    };
    let zero = b.float(0.0, ty);
    let (nkh, nkw) = (b.index(kernel[0]), b.index(kernel[1]));
    b.open(format!(
        "%s1:2 = scf.for %y = {c0} to {nkh} step {c1} iter_args(%t1 = {init}, %u1 = {zero}) -> ({ty}, {ty})"
    ));
    b.open(format!(
        "%s2:2 = scf.for %x = {c0} to {nkw} step {c1} iter_args(%t2 = %t1, %u2 = %u1) -> ({ty}, {ty})"
    ));
    let (ok_h, ih) = tap(b, &idx[2], "%y", stride[0], 1, padding[0], x.shape[2]);
    let (ok_w, iw) = tap(b, &idx[3], "%x", stride[1], 1, padding[1], x.shape[3]);
    let ok = b.assign(format!("arith.andi {ok_h}, {ok_w} : i1"));
    let at = x.index_expr(b, &[idx[0].clone(), idx[1].clone(), ih, iw]);
    let v = load(b, "%a0", x, &at);
    let one = b.float(1.0, ty);
    let (acc, cnt) = match kind {
        PoolKind::Max => {
            let m = b.fmax("%t2", &v, ty);
            (b.select(&ok, &m, "%t2", ty), "%u2".to_string())
        }
        PoolKind::Avg => {
            let s = b.fadd("%t2", &v, ty);
            let c = b.fadd("%u2", &one, ty);
            (b.select(&ok, &s, "%t2", ty), b.select(&ok, &c, "%u2", ty))
        }
    };
    b.line(format!("scf.yield {acc}, {cnt} : {ty}, {ty}"));
    b.close("");
    b.line(format!("scf.yield %s2#0, %s2#1 : {ty}, {ty}"));
    b.close("");
    match kind {
        PoolKind::Max => "%s1#0".to_string(),
        PoolKind::Avg => b.fdiv("%s1#0", "%s1#1", ty),
    }
}
