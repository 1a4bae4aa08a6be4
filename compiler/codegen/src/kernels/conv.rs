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

/// Where a window op reads: its input's spatial extents and its operands' elements. The
/// static emitters read views of static extents; the run-time ones (`dynamic::window`) read
/// extents and strides computed from the run's sizes.
pub(crate) trait WindowReads {
    /// The input's extent along spatial axis `a` (0: height, 1: width), an `index` value.
    fn extent(&self, b: &mut Body, a: usize) -> String;
    /// Element `idx` of operand `i` (0: the input, 1: the weight) in register type.
    fn load(&self, b: &mut Body, i: usize, idx: &[String]) -> String;
}

/// Operands of static views, in arguments `%a0`, `%a1`, … in order.
pub(crate) struct StaticReads<'a>(pub &'a [&'a View]);

impl WindowReads for StaticReads<'_> {
    fn extent(&self, b: &mut Body, a: usize) -> String {
        b.index(self.0[0].shape[2 + a])
    }

    fn load(&self, b: &mut Body, i: usize, idx: &[String]) -> String {
        let v = self.0[i];
        let at = v.index_expr(b, idx);
        load(b, &format!("%a{i}"), v, &at)
    }
}

/// In-bounds flag and input coordinate for output coordinate `o` along one spatial axis:
/// `o·stride + k·dilation − pad` must lie in `0..extent`; out of bounds the coordinate is 0,
/// so the read stays inside the tensor and its value is dropped.
fn tap(
    b: &mut Body,
    o: &str,
    k: &str,
    (stride, dilation, pad): (usize, usize, usize),
    extent: &str,
) -> (String, String) {
    let s = b.index(stride);
    let d = b.index(dilation);
    let p = b.index(pad);
    let a = b.assign(format!("arith.muli {o}, {s} : index"));
    let kd = b.assign(format!("arith.muli {k}, {d} : index"));
    let pos = b.assign(format!("arith.addi {a}, {kd} : index"));
    let ge = b.assign(format!("arith.cmpi uge, {pos}, {p} : index"));
    let local = b.assign(format!("arith.subi {pos}, {p} : index"));
    let lt = b.assign(format!("arith.cmpi ult, {local}, {extent} : index"));
    let ok = b.assign(format!("arith.andi {ge}, {lt} : i1"));
    let zero = b.index(0);
    let l = b.assign(format!("arith.select {ok}, {local}, {zero} : index"));
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
    let reads = StaticReads(&[x, w]);
    let v = conv_value(&mut b, stride, padding, dilation, groups, &w.shape, dtype, &idx, &reads);
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
    let result = pool_value(&mut b, kind, kernel, stride, padding, dtype, &idx, &StaticReads(&[x]));
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

/// Element `idx` (`[n, o, oh, ow]`) of `conv2d(x, w)` in register type, for a weight of
/// `w_shape` (`[O, C/groups, KH, KW]`); padding taps count as zero.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_value(
    b: &mut Body,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    w_shape: &[usize],
    dtype: kiln_ir::DType,
    idx: &[String],
    reads: &dyn WindowReads,
) -> String {
    let ty = reg_type(dtype);
    let (o_ch, cg, kh, kw) = (w_shape[0], w_shape[1], w_shape[2], w_shape[3]);
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
    let (h, w) = (reads.extent(b, 0), reads.extent(b, 1));
    let (ok_h, ih) = tap(b, &oh, "%y", (stride[0], dilation[0], padding[0]), &h);
    let (ok_w, iw) = tap(b, &ow, "%x", (stride[1], dilation[1], padding[1]), &w);
    let ok = b.assign(format!("arith.andi {ok_h}, {ok_w} : i1"));
    let ci = b.assign(format!("arith.addi {cbase}, %c : index"));
    let xv = reads.load(b, 0, &[n.clone(), ci, ih, iw]);
    let xv = b.select(&ok, &xv, &zero, ty);
    let wv = reads.load(b, 1, &[o.clone(), "%c".into(), "%y".into(), "%x".into()]);
    let acc = b.fma(&xv, &wv, "%t2", ty);
    b.line(format!("scf.yield {acc} : {ty}"));
    b.close("");
    b.line(format!("scf.yield %s2 : {ty}"));
    b.close("");
    b.line(format!("scf.yield %s1 : {ty}"));
    b.close("");
    "%s0".to_string()
}

/// Element `idx` (`[n, c, oh, ow]`) of `pool2d(x)` in register type: the max over the
/// in-bounds taps, or their average.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_value(
    b: &mut Body,
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dtype: kiln_ir::DType,
    idx: &[String],
    reads: &dyn WindowReads,
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
    let (h, w) = (reads.extent(b, 0), reads.extent(b, 1));
    let (ok_h, ih) = tap(b, &idx[2], "%y", (stride[0], 1, padding[0]), &h);
    let (ok_w, iw) = tap(b, &idx[3], "%x", (stride[1], 1, padding[1]), &w);
    let ok = b.assign(format!("arith.andi {ok_h}, {ok_w} : i1"));
    let v = reads.load(b, 0, &[idx[0].clone(), idx[1].clone(), ih, iw]);
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
