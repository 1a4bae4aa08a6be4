//! Tiled matrix products with their epilogue (bias, activation). Each workgroup computes one
//! `tile_m × tile_n` block of one batch index's result: it walks k in steps of `tile_k`,
//! loading an A tile and a B tile into shared memory together (each invocation a few elements,
//! zero past the edges), then each invocation accumulates `thread_m × thread_n` results in
//! private registers, strided across the tile so neighbouring invocations own neighbouring
//! columns. Operands are strided views, so transposed and batch-broadcast operands
//! need no copy.

use super::plan::{GpuPlan, Work};
use super::skeleton::{clamp, module, offset_at, shared, shared_type, unravel};
use super::{GpuCtx, GpuKernel};
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
    let plan = GpuPlan::matmul(batch, m, n, k, reg_bytes, cx.caps)?;
    let Work::Matmul { tile, thread, .. } = plan.work else {
        return Err(CodegenError::Unsupported("a matmul plan that is not one".into()));
    };
    let [tm, tn, tk] = tile.map(|t| t as usize);
    let [rm, rn] = thread.map(|t| t as usize);
    let [wx, wy, _] = plan.launch.workgroup.map(|w| w as usize);
    let inv = wx * wy;

    let mut b = cx.body();
    let sh_a = shared(&mut b, tm * tk, ty);
    let sh_b = shared(&mut b, tk * tn, ty);
    let (sa, sb) = (shared_type(&b, tm * tk, ty), shared_type(&b, tk * tn, ty));
    let tx = b.assign("gpu.thread_id x");
    let ty_ = b.assign("gpu.thread_id y");
    let bx = b.assign("gpu.block_id x");
    let by = b.assign("gpu.block_id y");
    let bz = b.assign("gpu.block_id z");
    let wxc = b.index(wx);
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
    // The accumulators are loop-carried values (registers on every device), not an array.
    let nacc = rm * rn;
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
    let c1 = b.index(1);
    let carried: Vec<String> = (0..nacc).map(|i| format!("%p{i} = %o{i}")).collect();
    b.open(format!(
        "%step:{nacc} = scf.for %kk = {c0} to {tkc} step {c1} iter_args({}) -> ({types})",
        carried.join(", ")
    ));
    // Invocation (x, y) owns rows y + i·wy and columns x + j·wx of the tile: neighbouring
    // invocations touch neighbouring columns (coalesced on a GPU, one vector on a CPU device),
    // and a row of invocations reads the same A element.
    let (my_row, my_col) = (ty_.clone(), tx.clone());
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
    b.line("gpu.barrier");
    let stepped: Vec<String> = (0..nacc).map(|i| format!("%step#{i}")).collect();
    b.line(format!("scf.yield {} : {types}", stepped.join(", ")));
    b.close("");

    // Epilogue: bias, activation, store what lies inside the result.
    let or = out.rank();
    let bias_arg = "%a2";
    let out_arg = if bias.is_some() { "%a3" } else { "%a2" };
    for i in 0..rm {
        for j in 0..rn {
            let ic = b.index(i * wy);
            let jc = b.index(j * wx);
            let row = b.assign(format!("arith.addi {row0}, {my_row} : index"));
            let row = b.assign(format!("arith.addi {row}, {ic} : index"));
            let col = b.assign(format!("arith.addi {col0}, {my_col} : index"));
            let col = b.assign(format!("arith.addi {col}, {jc} : index"));
            let mc = b.index(m);
            let nc = b.index(n);
            let okr = b.assign(format!("arith.cmpi ult, {row}, {mc} : index"));
            let okc = b.assign(format!("arith.cmpi ult, {col}, {nc} : index"));
            let ok = b.assign(format!("arith.andi {okr}, {okc} : i1"));
            b.open(format!("scf.if {ok}"));
            let mut v = format!("%acc#{}", i * rn + j);
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
