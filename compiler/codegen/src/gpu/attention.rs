//! Flash attention: `softmax(q·kᵀ·scale + mask) · v` without the `sq × sk` score matrix. One
//! workgroup per block of queries, one invocation per query; keys and values come in tiles of
//! `block_k` rows that the workgroup loads into shared memory together. Each invocation keeps
//! its query row, its output row and the tile's scores in private arrays and an online softmax
//! (running max `m`, running sum `l`): per tile, the row is rescaled by `exp(m − m_new)` once.
//!
//! Scores are formed in the interpreter's order (dot product over d in order, with fused
//! multiply-adds, times `scale`, plus the mask). Hidden keys (causal, or past the end) are −inf. A row whose scores
//! are all −inf ends as 0/0 = NaN, as the interpreter's does.
//!
//! The log-sum-exp of each query row's scores, `m + log l` when the walk ends (−inf for a row
//! with nothing to see), is written beside the output when the schedule asks for it (the
//! backward recomputes the probabilities from it), or alone: without v the kernel forms the
//! scores and the running max and sum, and nothing else.

use super::plan::SharedLayout;
use super::plan::{GpuPlan, Work};
use super::skeleton::{
    clamp, module, offset_at, plus, private, private_type, shared, shared_type, unravel, SharedArray,
};
use super::tiles::{aligned_by, OperandTile};
use super::{ceil_div, GpuCtx, GpuFlavor, GpuKernel};
use crate::dynamic::{self, size_value};
use crate::kernels::elementwise::{load, reg_type, store};
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::CodegenError;
use kiln_ir::Dim;
use kiln_sched::StridedView;

/// Head sizes up to this are unrolled, so the query and output rows stay in registers (a
/// private array indexed by a loop variable lives in memory on most devices).
const UNROLL_MAX: usize = 128;

/// Keys whose scores an invocation forms side by side (independent FMA chains).
const KEYS_AT_ONCE: usize = 4;

/// Runs `body` for every position `0..n` along a head row: unrolled with constant indices when
/// `n` is small enough, else as an `scf.for` over `name`.
fn each(b: &mut Body, n: usize, name: &str, body: &mut dyn FnMut(&mut Body, &str)) {
    if n <= UNROLL_MAX {
        for i in 0..n {
            let c = b.index(i);
            body(b, &c);
        }
    } else {
        let (c0, c1, nc) = (b.index(0), b.index(1), b.index(n));
        b.open(format!("scf.for {name} = {c0} to {nc} step {c1}"));
        body(b, name);
        b.close("");
    }
}

/// Attention over run-time sizes: the batch extents and the query and key lengths are sizes over
/// the symbols, and so are the operands' batch strides and offsets (their last two axes'
/// strides are static). The views given to [`emit_run`] are at the maxima; these are the sizes
/// the kernel reads from `%syms`.
pub struct RunSizes<'a> {
    pub n_syms: usize,
    pub batch: &'a [Dim],
    pub sq: &'a Dim,
    pub sk: &'a Dim,
    /// The symbolic views of q, k, v, the mask, the output and the log-sum-exp (the ones
    /// present), whose batch strides and offsets the kernel computes.
    pub views: [Option<&'a StridedView>; 6],
}

/// Attention of `q` `[B…, Sq, D]`, `k` `[B…, Sk, D]`, `v` `[B…, Sk, Dv]`, optional additive
/// `mask` `[B…, Sq, Sk]`, into `out` `[B…, Sq, Dv]` and, when given, the scores' log-sum-exp
/// into `lse` `[B…, Sq]`; without `v` and `out`, the log-sum-exp alone. Arguments: q, k, [v],
/// [mask], [out], [lse].
#[allow(clippy::too_many_arguments)]
pub fn emit(
    symbol: &str,
    q: &View,
    k: &View,
    v_out: Option<(&View, &View)>,
    mask: Option<&View>,
    scale: f64,
    causal: bool,
    lse: Option<&View>,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    emit_run(symbol, q, k, v_out, mask, scale, causal, lse, cx, None)
}

/// [`emit`], over the run's sizes when `run` is given (`q`…`lse` then hold the maxima).
#[allow(clippy::too_many_arguments)]
pub fn emit_run(
    symbol: &str,
    q: &View,
    k: &View,
    v_out: Option<(&View, &View)>,
    mask: Option<&View>,
    scale: f64,
    causal: bool,
    lse: Option<&View>,
    cx: &GpuCtx,
    run: Option<&RunSizes>,
) -> Result<GpuKernel, CodegenError> {
    let (v, out) = (v_out.map(|(v, _)| v), v_out.map(|(_, o)| o));
    if out.is_none() && lse.is_none() {
        return Err(CodegenError::Unsupported("an attention kernel with nothing to write".into()));
    }
    let dtype = q.dtype;
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!(
            "attention on {dtype} on the {} target",
            cx.caps.name
        )));
    }
    let ty = reg_type(dtype);
    let r = q.rank();
    let batch_shape = &q.shape[..r - 2];
    let batch: usize = batch_shape.iter().product();
    let (sq, d) = (q.shape[r - 2], q.shape[r - 1]);
    let (sk, dv) = (k.shape[r - 2], v.map_or(0, |v| v.shape[r - 1]));
    // Argument names in order: q, k, then the operands present.
    let mut next = 2;
    let mut arg = |present: bool| {
        present.then(|| {
            next += 1;
            format!("%a{}", next - 1)
        })
    };
    let (_, mask_arg, out_arg, lse_arg) =
        (arg(v.is_some()), arg(mask.is_some()), arg(out.is_some()), arg(lse.is_some()));
    // Tensor cores for f16 and bf16 tensors at their precision, and for f32 ones where the
    // user allowed rounding to TF32 (`--precision tf32` or `tf32x3`). The weights are
    // rounded to the precision too: for 16-bit tensors, as any 16-bit flash attention does.
    let mut dtypes = vec![q.dtype, k.dtype];
    dtypes.extend(v.map(|v| v.dtype));
    let allowed = super::mma::tensor_core_precision(&dtypes, cx.caps);
    // Warpgroup products where the target has them and the key and value rows lie contiguous
    // in 16-byte runs, so their tiles copy whole into core matrices.
    let rows = |w: &View| aligned_by(w, r - 1, 16 / w.dtype.size_bytes());
    let copyable = run.is_none() && rows(k) && v.is_none_or(rows);
    let tensor_cores = match allowed {
        Some((precision, _)) => {
            match GpuPlan::attention_warpgroups(batch, sq, sk, d, dv, precision, copyable, cx.caps)? {
                Some(plan) => Some(plan),
                None => GpuPlan::attention_tensor_cores(batch, sq, sk, d, dv, precision, cx.caps)?,
            }
        }
        None => None,
    };
    let exact = allowed.is_some_and(|(_, exact)| exact);
    let reg_bytes = if ty == "f64" { 8 } else { 4 };
    let plan = match tensor_cores {
        Some(plan) => plan,
        None => match GpuPlan::attention_tiled(batch, sq, sk, d, dv, reg_bytes, cx.caps)? {
            Some(plan) => plan,
            None => GpuPlan::attention(batch, sq, sk, d, dv, reg_bytes, cx.caps)?,
        },
    };
    let mut b = cx.body();
    let by = b.assign("gpu.block_id y");
    // Each operand's offset at this workgroup's batch index.
    let (q_base, k_base, v_base, m_base, o_base, l_base) = match run {
        None => {
            let bidx = unravel(&mut b, &by, batch_shape);
            let base = |b: &mut Body, w: &View| {
                let parts: Vec<(Option<&String>, usize)> =
                    bidx.iter().zip(&w.strides).map(|(i, &s)| (Some(i), s)).collect();
                offset_at(b, w.offset, &parts)
            };
            let (q_base, k_base) = (base(&mut b, q), base(&mut b, k));
            let v_base = v.map(|v| base(&mut b, v));
            let m_base = mask.map(|mv| base(&mut b, mv));
            let o_base = out.map(|o| base(&mut b, o));
            let l_base = lse.map(|l| base(&mut b, l));
            (q_base, k_base, v_base, m_base, o_base, l_base)
        }
        Some(run) => {
            let nb = run.batch.len();
            let extents: Vec<String> = run.batch.iter().map(|d| size_value(&mut b, d, run.n_syms)).collect();
            let bidx = dynamic::unravel(&mut b, &by, &extents, nb);
            let bases: Vec<Option<String>> = run
                .views
                .iter()
                .map(|w| {
                    w.map(|w| {
                        let walked = dynamic::walk(&mut b, w, run.n_syms);
                        dynamic::address(&mut b, &walked, &bidx)
                    })
                })
                .collect();
            let (q_base, k_base) = (bases[0].clone(), bases[1].clone());
            let (v_base, m_base, o_base, l_base) =
                (bases[2].clone(), bases[3].clone(), bases[4].clone(), bases[5].clone());
            let missing = || CodegenError::Unsupported("attention over run-time sizes without q or k".into());
            (q_base.ok_or_else(missing)?, k_base.ok_or_else(missing)?, v_base, m_base, o_base, l_base)
        }
    };
    // The run's query and key lengths (the views' extents are their maxima).
    let (sq_run, sk_run) = match run {
        Some(run) => (size_value(&mut b, run.sq, run.n_syms), size_value(&mut b, run.sk, run.n_syms)),
        None => (b.index(sq), b.index(sk)),
    };
    let ops = Operands {
        q,
        k,
        v,
        mask,
        out,
        lse,
        mask_arg,
        out_arg,
        lse_arg,
        q_base,
        k_base,
        v_base,
        m_base,
        o_base,
        l_base,
        sq_run,
        sk_run,
        run_lengths: run.is_some(),
        scale,
        causal,
        ty,
    };
    let block_q = match plan.work {
        Work::Attention { block_q, block_k, .. } => {
            simt(&mut b, &ops, block_q as usize, block_k as usize, cx);
            block_q as usize
        }
        Work::AttentionTiled { rows, lanes, block_k, .. } => {
            let shape = super::attention_tiled::Shape {
                rows: rows as usize,
                lanes: lanes as usize,
                block_k: block_k as usize,
            };
            super::attention_tiled::body(&mut b, &ops, shape, cx);
            super::plan::ATTENTION_TILED_GROUPS * rows as usize
        }
        Work::AttentionTensorCores {
            warps, block_k, stages, precision, async_copies, instruction, ..
        } => {
            let shape = super::attention_mma::Shape {
                warps: warps as usize,
                block_k: block_k as usize,
                stages: stages as usize,
                precision,
                exact,
                async_copies,
                instruction,
            };
            super::attention_mma::body(&mut b, &ops, shape, cx);
            16 * warps as usize
        }
        Work::Elements { .. }
        | Work::Columns { .. }
        | Work::Rows { .. }
        | Work::RowsSideBySide { .. }
        | Work::Matmul { .. }
        | Work::MatmulTensorCores { .. } => {
            return Err(CodegenError::Unsupported("an attention plan that is not one".into()))
        }
    };

    let mut memrefs = vec![q.memref(), k.memref()];
    memrefs.extend(v.map(View::memref));
    memrefs.extend(mask.map(View::memref));
    memrefs.extend(out.map(View::memref));
    memrefs.extend(lse.map(View::memref));
    let flops = (2 * batch * sq * sk * (d + dv)) as u64;
    let written = out.map_or(0, View::numel) + lse.map_or(0, View::numel);
    let bytes = ((q.numel() + k.numel() + v.map_or(0, View::numel) + written) * dtype.size_bytes()) as u64;
    // Over run-time sizes: blocks of the run's queries along x, its batch along y.
    let run_grid = match run {
        Some(run) => {
            let batch =
                kiln_sched::product(run.batch).map_err(|e| CodegenError::Unsupported(e.to_string()))?;
            Some([ceil_div(run.sq, block_q)?, batch, Dim::Const(1)])
        }
        None => None,
    };
    Ok(GpuKernel {
        symbol: symbol.into(),
        mlir: module(symbol, &memrefs, &plan, b)?,
        plan,
        flops,
        bytes,
        run_grid,
    })
}

/// What both attention bodies read: the operands (at the maxima over run-time sizes), their
/// argument names, this workgroup's offsets into them, and the run's query and key lengths.
pub(crate) struct Operands<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: Option<&'a View>,
    pub mask: Option<&'a View>,
    pub out: Option<&'a View>,
    pub lse: Option<&'a View>,
    pub mask_arg: Option<String>,
    pub out_arg: Option<String>,
    pub lse_arg: Option<String>,
    pub q_base: String,
    pub k_base: String,
    pub v_base: Option<String>,
    pub m_base: Option<String>,
    pub o_base: Option<String>,
    pub l_base: Option<String>,
    /// The run's query and key lengths (`index` values; constants without run-time sizes).
    pub sq_run: String,
    pub sk_run: String,
    /// Whether the lengths are the run's, so key tiles past them read as zero.
    pub run_lengths: bool,
    pub scale: f64,
    pub causal: bool,
    /// The register type (f32 for half operands).
    pub ty: &'static str,
}

/// How far along the keys workgroup `bx` of `block_q` queries walks: the run's keys, and with
/// causal attention no further than its last query (the keys past it are hidden from every
/// query of the workgroup, so their tiles would add nothing).
pub(crate) fn keys_to_visit(b: &mut Body, o: &Operands, bx: &str, block_q: usize) -> String {
    if !o.causal {
        return o.sk_run.clone();
    }
    let (c1, bqc) = (b.index(1), b.index(block_q));
    let next = b.assign(format!("arith.addi {bx}, {c1} : index"));
    let end = b.assign(format!("arith.muli {next}, {bqc} : index"));
    b.assign(format!("arith.minui {end}, {} : index", o.sk_run))
}

/// The plan's body with one query per invocation: `bq` queries per workgroup, key tiles of
/// `bk`.
fn simt(b: &mut Body, o: &Operands, bq: usize, bk: usize, cx: &GpuCtx) {
    // Views, flags and the register type by value; argument names and offsets by reference.
    let &Operands {
        q,
        k,
        v,
        mask,
        out,
        lse,
        ref mask_arg,
        ref out_arg,
        ref lse_arg,
        ref q_base,
        ref k_base,
        ref v_base,
        ref m_base,
        ref o_base,
        ref l_base,
        ref sq_run,
        ref sk_run,
        run_lengths,
        scale,
        causal,
        ty,
    } = o;
    let r = q.rank();
    let (sq, d) = (q.shape[r - 2], q.shape[r - 1]);
    let (sk, dv) = (k.shape[r - 2], v.map_or(0, |v| v.shape[r - 1]));
    // Runs of 4 f32 values as one shared-memory access where the device has them (NVVM).
    let vectors = cx.caps.flavor() == GpuFlavor::Nvvm && ty == "f32";
    let sh_k = shared(b, bk * d, ty);
    let sh_v = shared(b, bk * dv, ty);
    let (sk_ty, sv_ty) = (shared_type(b, bk * d, ty), shared_type(b, bk * dv, ty));
    let qp = private(b, d, ty);
    let ap = private(b, dv, ty);
    let sp = private(b, bk, ty);
    let (qp_ty, ap_ty, sp_ty) = (private_type(b, d, ty), private_type(b, dv, ty), private_type(b, bk, ty));
    let tid = b.assign("gpu.thread_id x");
    let bx = b.assign("gpu.block_id x");
    let bqc = b.index(bq);
    let i = b.assign(format!("arith.muli {bx}, {bqc} : index"));
    let i = b.assign(format!("arith.addi {i}, {tid} : index"));
    let ic = clamp(b, &i, sq);
    let valid = b.assign(format!("arith.cmpi ult, {i}, {sq_run} : index"));
    let (c0, c1) = (b.index(0), b.index(1));
    let zero = b.float(0.0, ty);
    let one = b.float(1.0, ty);
    let neg_inf = b.float(f64::NEG_INFINITY, ty);

    // This invocation's query row, and a zero output row.
    let dc = b.index(d);
    let dvc = b.index(dv);
    each(b, d, "%dq", &mut |b, dq| {
        let dq = dq.to_string();
        let row = offset_at(b, 0, &[(Some(&ic), q.strides[r - 2]), (Some(&dq), q.strides[r - 1])]);
        let at = b.assign(format!("arith.addi {q_base}, {row} : index"));
        let x = load(b, "%a0", q, &at);
        b.line(format!("memref.store {x}, {qp}[{dq}] : {qp_ty}"));
    });
    each(b, dv, "%da", &mut |b, da| b.line(format!("memref.store {zero}, {ap}[{da}] : {ap_ty}")));

    let mem_k = SharedArray { name: &sh_k, ty: &sk_ty, vectors: vectors && d % 4 == 0 };
    let mem_v = SharedArray { name: &sh_v, ty: &sv_ty, vectors: vectors && dv % 4 == 0 };
    let layout_k = SharedLayout { row: d, col: 1, len: bk * d, cores: None };
    let layout_v = SharedLayout { row: dv, col: 1, len: bk * dv, cores: None };
    let run_keys = run_lengths.then(|| sk_run.clone());
    let tile_k = OperandTile::new(b, k, "%a1", k_base.clone(), (bk, d), (sk, d), layout_k, bq, vectors)
        .with_run_rows(run_keys.clone());
    // v, when present, is the third argument.
    let tile_v = match (v, &v_base) {
        (Some(v), Some(vb)) => Some(
            OperandTile::new(b, v, "%a2", vb.clone(), (bk, dv), (sk, dv), layout_v, bq, vectors)
                .with_run_rows(run_keys.clone()),
        ),
        _ => None,
    };
    let skc = sk_run.clone();
    let bkc = b.index(bk);
    let kend = keys_to_visit(b, o, &bx, bq);
    b.open(format!(
        "%ml:2 = scf.for %kt = {c0} to {kend} step {bkc} iter_args(%m = {neg_inf}, %l = {zero}) -> ({ty}, {ty})"
    ));
    // The workgroup loads the tile's keys and values (zeros past the end): every read first,
    // then every store, so the reads overlap.
    let fk = tile_k.fetch(b, &tid, ("%kt", &c0), &zero, ty);
    let fv = tile_v.as_ref().map(|t| t.fetch(b, &tid, ("%kt", &c0), &zero, ty));
    tile_k.deposit(b, &fk, &mem_k, &c0, None, ty);
    if let (Some(t), Some(fv)) = (&tile_v, &fv) {
        t.deposit(b, fv, &mem_v, &c0, None, ty);
    }
    b.line("gpu.barrier");

    let sc = b.float(scale, ty);
    // The score of key `jj` of the tile for this invocation's query: the dot product over d
    // in order from 0, times `scale`, plus the mask; −inf where the key is hidden.
    let score_of = |b: &mut Body, dot: &str, jj: &str| {
        let mut score = b.fmul(dot, &sc, ty);
        let j = b.assign(format!("arith.addi %kt, {jj} : index"));
        let jc = clamp(b, &j, sk);
        if let (Some(mv), Some(mb), Some(ma)) = (mask, &m_base, &mask_arg) {
            let off = offset_at(b, 0, &[(Some(&ic), mv.strides[r - 2]), (Some(&jc), mv.strides[r - 1])]);
            let at = b.assign(format!("arith.addi {mb}, {off} : index"));
            let mval = load(b, ma, mv, &at);
            score = b.fadd(&score, &mval, ty);
        }
        let mut hidden = b.assign(format!("arith.cmpi uge, {j}, {skc} : index"));
        if causal {
            let future = b.assign(format!("arith.cmpi ugt, {j}, {i} : index"));
            hidden = b.assign(format!("arith.ori {hidden}, {future} : i1"));
        }
        b.select(&hidden, &neg_inf, &score, ty)
    };
    // Online softmax: rescale by exp(m − m_new) once per tile.
    let rescale = |b: &mut Body, tmax: &str| {
        let m_new = b.fmax("%m", tmax, ty);
        let dead = b.fcmp("oeq", &m_new, &neg_inf, ty);
        let shift = b.fsub("%m", &m_new, ty);
        let corr = b.exp_nonpositive(&shift, ty);
        let corr = b.select(&dead, &one, &corr, ty);
        each(b, dv, "%da", &mut |b, da| {
            let o = b.assign(format!("memref.load {ap}[{da}] : {ap_ty}"));
            let o = b.fmul(&o, &corr, ty);
            b.line(format!("memref.store {o}, {ap}[{da}] : {ap_ty}"));
        });
        (m_new, dead, corr)
    };
    // The tile's weights `p = exp(score − m_new)` (0 for a row with nothing to see), key `%jj`
    // by key: `add_row` adds `p` times the key's value row to the output row; the loop yields
    // the sum of the weights (`%lt`).
    let weighted = |b: &mut Body, m_new: &str, dead: &str, add_row: &mut dyn FnMut(&mut Body, &str)| {
        b.open(format!("%lt = scf.for %jj = {c0} to {bkc} step {c1} iter_args(%ls = {zero}) -> ({ty})"));
        let s = b.assign(format!("memref.load {sp}[%jj] : {sp_ty}"));
        let dlt = b.fsub(&s, m_new, ty);
        let p = b.exp_nonpositive(&dlt, ty);
        let p = b.select(dead, &zero, &p, ty);
        add_row(b, &p);
        let ls = b.fadd("%ls", &p, ty);
        b.line(format!("scf.yield {ls} : {ty}"));
        b.close("");
    };
    let (m_new, corr, lt) = if d <= UNROLL_MAX && dv <= UNROLL_MAX {
        // Rows unrolled: the query and output rows stay in registers, each key and value row
        // is read from shared memory in runs of 4 (one vector access each on NVVM; every
        // invocation reads the same address, a broadcast), and `KEYS_AT_ONCE` keys' dot
        // products are formed side by side so their FMA chains overlap.
        let at_once = if bk.is_multiple_of(KEYS_AT_ONCE) { KEYS_AT_ONCE } else { 1 };
        let step = b.index(at_once);
        b.open(format!(
            "%tmax = scf.for %jj = {c0} to {bkc} step {step} iter_args(%mx = {neg_inf}) -> ({ty})"
        ));
        let q_row: Vec<String> = (0..d)
            .map(|dd| {
                let c = b.index(dd);
                b.assign(format!("memref.load {qp}[{c}] : {qp_ty}"))
            })
            .collect();
        let keys: Vec<String> = (0..at_once).map(|u| plus(b, "%jj", u)).collect();
        let rows: Vec<String> =
            keys.iter().map(|j| b.assign(format!("arith.muli {j}, {dc} : index"))).collect();
        let mut dots = vec![zero.clone(); at_once];
        for d0 in (0..d).step_by(4) {
            for (u, row) in rows.iter().enumerate() {
                let at = plus(b, row, d0);
                let kv = mem_k.read(b, &at, 4.min(d - d0), ty);
                for (e, x) in kv.iter().enumerate() {
                    dots[u] = b.fma(&q_row[d0 + e], x, &dots[u], ty);
                }
            }
        }
        let mut mx = "%mx".to_string();
        for (dot, j) in dots.iter().zip(&keys) {
            let score = score_of(b, dot, j);
            b.line(format!("memref.store {score}, {sp}[{j}] : {sp_ty}"));
            mx = b.fmax(&mx, &score, ty);
        }
        b.line(format!("scf.yield {mx} : {ty}"));
        b.close("");
        let (m_new, dead, corr) = rescale(b, "%tmax");
        weighted(b, &m_new, &dead, &mut |b, p| {
            let vrow = b.assign(format!("arith.muli %jj, {dvc} : index"));
            for d0 in (0..dv).step_by(4) {
                let at = plus(b, &vrow, d0);
                let vv = mem_v.read(b, &at, 4.min(dv - d0), ty);
                for (e, x) in vv.iter().enumerate() {
                    let c = b.index(d0 + e);
                    let o = b.assign(format!("memref.load {ap}[{c}] : {ap_ty}"));
                    let o = b.fma(p, x, &o, ty);
                    b.line(format!("memref.store {o}, {ap}[{c}] : {ap_ty}"));
                }
            }
        });
        (m_new, corr, "%lt".to_string())
    } else {
        // Scores of this tile, and their max.
        b.open(format!("%tmax = scf.for %jj = {c0} to {bkc} step {c1} iter_args(%mx = {neg_inf}) -> ({ty})"));
        let kbase = b.assign(format!("arith.muli %jj, {dc} : index"));
        b.open(format!("%dot = scf.for %dd = {c0} to {dc} step {c1} iter_args(%s = {zero}) -> ({ty})"));
        let qv = b.assign(format!("memref.load {qp}[%dd] : {qp_ty}"));
        let at = b.assign(format!("arith.addi {kbase}, %dd : index"));
        let kv = b.assign(format!("memref.load {sh_k}[{at}] : {sk_ty}"));
        let s = b.fma(&qv, &kv, "%s", ty);
        b.line(format!("scf.yield {s} : {ty}"));
        b.close("");
        let score = score_of(b, "%dot", "%jj");
        b.line(format!("memref.store {score}, {sp}[%jj] : {sp_ty}"));
        let mx = b.fmax("%mx", &score, ty);
        b.line(format!("scf.yield {mx} : {ty}"));
        b.close("");
        let (m_new, dead, corr) = rescale(b, "%tmax");
        weighted(b, &m_new, &dead, &mut |b, p| {
            let vbase = b.assign(format!("arith.muli %jj, {dvc} : index"));
            each(b, dv, "%dd", &mut |b, dd| {
                let at = b.assign(format!("arith.addi {vbase}, {dd} : index"));
                let vv = b.assign(format!("memref.load {sh_v}[{at}] : {sv_ty}"));
                let o = b.assign(format!("memref.load {ap}[{dd}] : {ap_ty}"));
                let o = b.fma(p, &vv, &o, ty);
                b.line(format!("memref.store {o}, {ap}[{dd}] : {ap_ty}"));
            });
        });
        (m_new, corr, "%lt".to_string())
    };
    let l_old = b.fmul("%l", &corr, ty);
    let l_new = b.fadd(&l_old, &lt, ty);
    b.line("gpu.barrier");
    b.line(format!("scf.yield {m_new}, {l_new} : {ty}, {ty}"));
    b.close("");

    // The output row, and the log-sum-exp `m + log l`.
    b.open(format!("scf.if {valid}"));
    if let (Some(out), Some(o_base), Some(out_arg)) = (out, &o_base, &out_arg) {
        each(b, dv, "%da", &mut |b, da| {
            let da = da.to_string();
            let o = b.assign(format!("memref.load {ap}[{da}] : {ap_ty}"));
            let y = b.fdiv(&o, "%ml#1", ty);
            let off = offset_at(b, 0, &[(Some(&i), out.strides[r - 2]), (Some(&da), out.strides[r - 1])]);
            let at = b.assign(format!("arith.addi {o_base}, {off} : index"));
            store(b, &y, out_arg, out, &at);
        });
    }
    if let (Some(lv), Some(l_base), Some(lse_arg)) = (lse, &l_base, &lse_arg) {
        let log_l = b.log("%ml#1", ty);
        let y = b.fadd("%ml#0", &log_l, ty);
        let off = offset_at(b, 0, &[(Some(&i), lv.strides[r - 2])]);
        let at = b.assign(format!("arith.addi {l_base}, {off} : index"));
        store(b, &y, lse_arg, lv, &at);
    }
    b.close("");
}
