//! Attention with run-time query and key lengths (and batch axes): `softmax(q·kᵀ·scale +
//! mask) · v` per query row, the keys a causal row sees (`j ≤ i`) counted at run time.
//!
//! When every operand's last two axes have static strides (the layouts the shipped models
//! produce), this is the flash kernel of `kernels::attention` told the run's lengths
//! ([`kernels::attention::emit_run`]): its blocks and key tiles planned for the hinted
//! lengths, its batch offsets computed from the run's symbol values.
//!
//! Otherwise one range iteration is one query row: a first pass over the keys finds the
//! largest score, a second adds `exp(score − max) · v[j]` into the result row and sums the
//! weights, and the row is divided by the sum; the log-sum-exp (`max + ln sum`) is written
//! when the kernel has that result. Scores are recomputed in the second pass rather than
//! stored, so the kernel needs no scratch sized by the key length.

use super::{address, at_hints_and_maxima, buffer_view, refuse, row_kernel, step, unravel, walk, SYMS_ARG};
use crate::kernels::attention::{self as flash, RunLengths, RunValues};
use crate::kernels::elementwise::{load, store};
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::program::bad;
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{DType, Dim};
use kiln_sched::{Operand, Schedule, StridedView};

/// Lanes of the vector loops over the head size, used when it is a multiple of them and the
/// rows are contiguous.
const LANES: usize = 16;

/// Emits attention kernel `k`: inputs q, k, (v when `with_v`), then `mask` when there is one;
/// results: the attention (when `with_v`) and the log-sum-exp (its extra result, or its only
/// one for an `attention_lse`).
#[allow(clippy::too_many_arguments)]
pub(super) fn emit(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    scale: f64,
    causal: bool,
    mask: Option<&Operand>,
    with_v: bool,
    target: &dyn Target,
) -> Result<(Kernel, Dim), CodegenError> {
    let ins = &k.inputs;
    let (q, kk) = match ins.as_slice() {
        [q, kk, ..] => (q, kk),
        _ => return Err(bad("attention")),
    };
    let v = if with_v { Some(ins.get(2).ok_or_else(|| bad("attention"))?) } else { None };
    let (out, lse) =
        if with_v { (Some(&k.output), k.extra_outputs.first()) } else { (None, Some(&k.output)) };
    let all: Vec<&Operand> = ins.iter().chain([&k.output]).chain(&k.extra_outputs).collect();
    if all.iter().any(|o| o.dtype != DType::F32) {
        return Err(refuse(k, "only f32 attention takes run-time lengths"));
    }
    let r = q.view.shape.len();
    if r < 2 || kk.view.shape.len() != r || v.is_some_and(|v| v.view.shape.len() != r) {
        return Err(bad("attention operand ranks"));
    }
    let (d, dv) =
        match (q.view.shape[r - 1].as_const(), v.map_or(Some(0), |v| v.view.shape[r - 1].as_const())) {
            (Some(d), Some(dv)) => (d, dv),
            _ => return Err(refuse(k, "the head dimensions must be static")),
        };
    // The mask as the scores' shape [B…, Sq, Sk].
    let mut scores_shape = q.view.shape.clone();
    scores_shape[r - 1] = kk.view.shape[r - 2].clone();
    let mask_view = mask.map(|m| m.view.broadcast_to(&scores_shape));
    // The operands in the kernel's argument order, the mask as the scores' shape.
    let mut ordered: Vec<StridedView> = vec![q.view.clone(), kk.view.clone()];
    ordered.extend(v.map(|v| v.view.clone()));
    ordered.extend(mask_view.clone());
    ordered.extend(out.map(|o| o.view.clone()));
    ordered.extend(lse.map(|o| o.view.clone()));
    let present = (with_v, mask.is_some(), lse.is_some());
    if let Some(made) = emit_flash(s, sym, &all, &ordered, (scale, causal), present, target)? {
        return Ok(made);
    }
    let rows = kiln_sched::product(&q.view.shape[..r - 1]).map_err(|e| bad(&e.to_string()))?;
    let n_syms = s.symbols.len().max(1);

    // Arguments: the inputs in order, then the results.
    let views: Vec<View> = all.iter().map(|o| buffer_view(s, o)).collect();
    let args: Vec<String> = (0..all.len()).map(|i| format!("%a{i}")).collect();
    let arg_of = |o: &Operand| all.iter().position(|x| std::ptr::eq(*x, o)).unwrap_or(0);

    let mut b = Body::new();
    let c0 = b.index(0);
    let c1 = b.index(1);
    let dc = b.index(d);
    let dvc = b.index(dv);
    let wq = walk(&mut b, &q.view, n_syms);
    let wk = walk(&mut b, &kk.view, n_syms);
    let wv = v.map(|v| walk(&mut b, &v.view, n_syms));
    let wm = mask_view.as_ref().map(|m| walk(&mut b, m, n_syms));
    let wo = out.map(|o| walk(&mut b, &o.view, n_syms));
    let wl = lse.map(|o| walk(&mut b, &o.view, n_syms));
    let sk = wk.extents[r - 2].clone();
    let scale_c = b.float(scale, "f32");

    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let idx = unravel(&mut b, "%r", &wq.extents, r - 1);
    let i = idx[r - 2].clone();
    let batch = &idx[..r - 2];
    let q_row = address(&mut b, &wq, &idx);
    let k_base = address(&mut b, &wk, batch);
    let v_base = wv.as_ref().map(|w| address(&mut b, w, batch));
    let m_row = wm.as_ref().map(|w| address(&mut b, w, &idx));
    let seen = if causal {
        let next = b.assign(format!("arith.addi {i}, {c1} : index"));
        b.assign(format!("arith.minui {next}, {sk} : index"))
    } else {
        sk.clone()
    };
    let (qa, ka) = (arg_of(q), arg_of(kk));
    let unit = |v: &kiln_sched::StridedView| v.strides[r - 1].as_const() == Some(1);
    let vty = format!("vector<{LANES}xf32>");
    // Dot products over the head size in vectors, when q and k rows are contiguous.
    let vector_dot = d % LANES == 0 && unit(&q.view) && unit(&kk.view);
    // The score of key `j`: q·k[j]·scale (+ mask).
    let score = |b: &mut Body, j: &str| -> String {
        let k_row = step(b, &k_base, j, &wk.strides[r - 2]);
        if vector_dot {
            let mut acc = b.float(0.0, &vty);
            for c in 0..d / LANES {
                let off = b.index(c * LANES);
                let at_q = b.assign(format!("arith.addi {q_row}, {off} : index"));
                let at_k = b.assign(format!("arith.addi {k_row}, {off} : index"));
                let x = b.assign(format!("vector.load {}[{at_q}] : {}, {vty}", args[qa], views[qa].memref()));
                let y = b.assign(format!("vector.load {}[{at_k}] : {}, {vty}", args[ka], views[ka].memref()));
                acc = b.fma(&x, &y, &acc, &vty);
            }
            let dot = b.assign(format!("vector.reduction <add>, {acc} : {vty} into f32"));
            let mut sc = b.fmul(&dot, &scale_c, "f32");
            if let (Some(w), Some(row), Some(m)) = (&wm, &m_row, mask) {
                let at = step(b, row, j, &w.strides[r - 1]);
                let ma = arg_of(m);
                let mv = load(b, &args[ma], &views[ma], &at);
                sc = b.fadd(&sc, &mv, "f32");
            }
            return sc;
        }
        let zero = b.float(0.0, "f32");
        let acc = b.fresh("dot");
        let res = b.fresh("dots");
        b.open(format!("{res} = scf.for %d = {c0} to {dc} step {c1} iter_args({acc} = {zero}) -> (f32)"));
        let at_q = step(b, &q_row, "%d", &wq.strides[r - 1]);
        let at_k = step(b, &k_row, "%d", &wk.strides[r - 1]);
        let x = load(b, &args[qa], &views[qa], &at_q);
        let y = load(b, &args[ka], &views[ka], &at_k);
        let next = b.fma(&x, &y, &acc, "f32");
        b.line(format!("scf.yield {next} : f32"));
        b.close("");
        let mut sc = b.fmul(&res, &scale_c, "f32");
        if let (Some(w), Some(row), Some(m)) = (&wm, &m_row, mask) {
            let at = step(b, row, j, &w.strides[r - 1]);
            let ma = arg_of(m);
            let mv = load(b, &args[ma], &views[ma], &at);
            sc = b.fadd(&sc, &mv, "f32");
        }
        sc
    };
    // Pass 1: the largest score.
    let ninf = b.float(f64::NEG_INFINITY, "f32");
    let mx = b.fresh("mx");
    let max = b.fresh("max");
    b.open(format!("{max} = scf.for %j = {c0} to {seen} step {c1} iter_args({mx} = {ninf}) -> (f32)"));
    let sc = score(&mut b, "%j");
    let next = b.fmax(&mx, &sc, "f32");
    b.line(format!("scf.yield {next} : f32"));
    b.close("");
    // Pass 2: the weights' sum, and the weighted values into the result row.
    let o_row = match (&wo, out) {
        (Some(w), Some(_)) => {
            let row = address(&mut b, w, &idx);
            let oa = arg_of(&k.output);
            let zero = b.float(0.0, "f32");
            b.open(format!("scf.for %e = {c0} to {dvc} step {c1}"));
            let at = step(&mut b, &row, "%e", &w.strides[r - 1]);
            store(&mut b, &zero, &args[oa], &views[oa], &at);
            b.close("");
            Some((row, oa))
        }
        _ => None,
    };
    let zero = b.float(0.0, "f32");
    let acc = b.fresh("l");
    let sum = b.fresh("sum");
    b.open(format!("{sum} = scf.for %j = {c0} to {seen} step {c1} iter_args({acc} = {zero}) -> (f32)"));
    let sc = score(&mut b, "%j");
    let shifted = b.fsub(&sc, &max, "f32");
    let p = b.exp_nonpositive(&shifted, "f32");
    if let (Some((row, oa)), Some(w), Some(vb), Some(vo)) = (&o_row, &wo, &v_base, v) {
        let wv = wv.as_ref().ok_or_else(|| bad("attention values"))?;
        let va = arg_of(vo);
        let v_row = step(&mut b, vb, "%j", &wv.strides[r - 2]);
        if dv % LANES == 0 && unit(&vo.view) && out.is_some_and(|o| unit(&o.view)) {
            // o[e..e+16] += p · v[j, e..e+16], in vectors.
            let pv = b.assign(format!("vector.broadcast {p} : f32 to {vty}"));
            for c in 0..dv / LANES {
                let off = b.index(c * LANES);
                let at_v = b.assign(format!("arith.addi {v_row}, {off} : index"));
                let at_o = b.assign(format!("arith.addi {row}, {off} : index"));
                let (vm, om) = (views[va].memref(), views[*oa].memref());
                let x = b.assign(format!("vector.load {}[{at_v}] : {vm}, {vty}", args[va]));
                let o = b.assign(format!("vector.load {}[{at_o}] : {om}, {vty}", args[*oa]));
                let y = b.fma(&pv, &x, &o, &vty);
                b.line(format!("vector.store {y}, {}[{at_o}] : {om}, {vty}", args[*oa]));
            }
        } else {
            b.open(format!("scf.for %e = {c0} to {dvc} step {c1}"));
            let at_v = step(&mut b, &v_row, "%e", &wv.strides[r - 1]);
            let x = load(&mut b, &args[va], &views[va], &at_v);
            let at_o = step(&mut b, row, "%e", &w.strides[r - 1]);
            let o = load(&mut b, &args[*oa], &views[*oa], &at_o);
            let y = b.fma(&p, &x, &o, "f32");
            store(&mut b, &y, &args[*oa], &views[*oa], &at_o);
            b.close("");
        }
    }
    let next = b.fadd(&acc, &p, "f32");
    b.line(format!("scf.yield {next} : f32"));
    b.close("");
    if let (Some((row, oa)), Some(w)) = (&o_row, &wo) {
        b.open(format!("scf.for %e = {c0} to {dvc} step {c1}"));
        let at_o = step(&mut b, row, "%e", &w.strides[r - 1]);
        let o = load(&mut b, &args[*oa], &views[*oa], &at_o);
        let y = b.fdiv(&o, &sum, "f32");
        store(&mut b, &y, &args[*oa], &views[*oa], &at_o);
        b.close("");
    }
    if let (Some(w), Some(l)) = (&wl, lse) {
        let la = arg_of(l);
        let ln = b.log(&sum, "f32");
        let value = b.fadd(&max, &ln, "f32");
        let at = address(&mut b, w, &idx);
        store(&mut b, &value, &args[la], &views[la], &at);
    }
    b.close("");
    b.line("return");

    let (sk_hint, _) = at_hints_and_maxima(s, &kk.view.shape[r - 2]);
    let costs = |rows_hint: usize| {
        let flops = (rows_hint * sk_hint * (2 * d + 2 * dv + 24)) as u64;
        (flops, (4 * rows_hint * (d + dv + 2 * sk_hint)) as u64)
    };
    Ok(row_kernel(s, sym, (&views, &args), b, &rows, costs))
}

/// The flash kernel over the run's lengths, when the last two axes of every operand (`views`,
/// in argument order, of `ops`' buffers) have static strides; `None` otherwise.
fn emit_flash(
    s: &Schedule,
    sym: &str,
    ops: &[&Operand],
    views: &[StridedView],
    (scale, causal): (f64, bool),
    (with_v, masked, with_lse): (bool, bool, bool),
    target: &dyn Target,
) -> Result<Option<(Kernel, Dim)>, CodegenError> {
    let r = views[0].shape.len();
    let maxima: Vec<i64> = s.symbols.iter().map(|x| x.max).collect();
    let at_max = |d: &Dim| d.eval(&maxima);
    // Each operand at the largest extents; its trailing axes (one for the log-sum-exp) static.
    let mut pinned = Vec::with_capacity(views.len());
    for (o, v) in ops.iter().zip(views) {
        let trailing = v.shape.len() + 2 - r;
        let fixed = v.strides[v.strides.len() - trailing..].iter().all(Dim::is_static);
        let shape: Option<Vec<usize>> = v.shape.iter().map(at_max).collect();
        let strides: Option<Vec<usize>> = v.strides.iter().map(at_max).collect();
        let (Some(shape), Some(strides), Some(offset), true) = (shape, strides, at_max(&v.offset), fixed)
        else {
            return Ok(None);
        };
        pinned.push(View { shape, strides, offset, dtype: o.dtype, buffer_len: s.buffers[o.buffer].len });
    }
    let n_syms = s.symbols.len().max(1);
    let hint = |d: &Dim| at_hints_and_maxima(s, d).0;
    let plan = (hint(&views[0].shape[r - 2]), hint(&views[1].shape[r - 2]));
    let values = |bd: &mut Body| {
        let walks: Vec<_> = views.iter().map(|v| walk(bd, v, n_syms)).collect();
        RunValues {
            sq: walks[0].extents[r - 2].clone(),
            sk: walks[1].extents[r - 2].clone(),
            batch: walks[0].extents[..r - 2].to_vec(),
            offsets: walks.iter().map(|w| w.offset.clone()).collect(),
            batch_strides: walks.iter().map(|w| w.strides[..r - 2].to_vec()).collect(),
        }
    };
    let run = RunLengths { values: &values, param: format!("{SYMS_ARG}: memref<{n_syms}xi64>"), plan };
    // In argument order: q, k, then v, the mask, the result and the log-sum-exp as present.
    let (q, kk) = (&pinned[0], &pinned[1]);
    let mut rest = pinned[2..].iter();
    let mut take = |present: bool| if present { rest.next() } else { None };
    let v = take(with_v);
    let mask = take(masked);
    let out = take(with_v);
    let lse = take(with_lse);
    let v_out = v.zip(out);
    let (made, rows) = flash::emit_run(sym, q, kk, v_out, mask, scale, causal, lse, target, &run)?;
    // The run's range: batch · ⌈Sq / rows⌉; the costs at the hints.
    let dim = |e: Result<Dim, kiln_ir::SizeError>| e.map_err(|e| bad(&e.to_string()));
    let batch = dim(kiln_sched::product(&views[0].shape[..r - 2]))?;
    let groups = dim(views[0].shape[r - 2].add(&Dim::Const(rows - 1)))?;
    let range = dim(batch.mul(&dim(groups.floor_div(rows))?))?;
    let scaled =
        |x: u64, at_hint: usize, at_max: usize| (x as u128 * at_hint as u128 / at_max.max(1) as u128) as u64;
    let (q_hint, q_max) = at_hints_and_maxima(s, &dim(kiln_sched::product(&views[0].shape[..r - 1]))?);
    let (k_hint, k_max) = at_hints_and_maxima(s, &views[1].shape[r - 2]);
    let made = Kernel {
        flops: scaled(scaled(made.flops, q_hint, q_max), k_hint, k_max),
        bytes: scaled(made.bytes, q_hint, q_max),
        ..made
    };
    Ok(Some((made, range)))
}
