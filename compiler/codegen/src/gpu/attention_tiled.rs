//! Flash attention in register tiles ([`Work::AttentionTiled`](super::plan::Work)): the
//! one-query-per-invocation kernel reads every key and value element from shared memory once
//! per FMA it feeds (four per 16-byte read), which bounds it by shared-memory traffic rather
//! than by arithmetic. Here a workgroup of 16 groups of `lanes` invocations takes `16·rows`
//! queries. Group `g` owns queries `g, g + 16, …`; its lane `c` forms their scores against keys
//! `c, c + lanes, …` of each tile (a matrix product of `rows` × `block_k / lanes` in
//! registers: each 16-byte read of a query run feeds `4·keys` FMAs, of a key run `4·rows`) and
//! accumulates their output over value columns `4c…4c + 3, 4(c + lanes)…` (likewise). The
//! group's lanes combine each row's max per tile and its sum at the end; the weights go from
//! the lanes that formed them to the lanes that use them through shared memory.
//!
//! Scores are dot products over d in order with fused multiply-adds, times `scale`, plus the
//! mask; hidden keys (causal, or past the run's keys) are −inf; a row with nothing to see ends
//! as 0/0 = NaN; outputs add the weighted value rows key by key in order. Query rows are
//! interleaved (`g + 16i`) and keys too (`c + lanes·u`), so a warp's reads of its groups' rows
//! and its lanes' keys fall in different banks (rows padded by 4 elements).

use super::attention::{keys_to_visit, Operands};
use super::plan::{tiled_attention_layouts, ATTENTION_TILED_GROUPS as GROUPS};
use super::skeleton::{clamp, offset_at, plus, shared, shared_type, Combine, LaneGroups, SharedArray};
use super::tiles::OperandTile;
use super::{GpuCtx, GpuFlavor};
use crate::kernels::elementwise::{load, store};
use crate::mlir_text::Body;

/// The plan's numbers the body is written from.
pub(crate) struct Shape {
    /// Queries per group.
    pub rows: usize,
    /// Invocations per group.
    pub lanes: usize,
    /// Keys per tile.
    pub block_k: usize,
}

/// The kernel body (operands as [`Operands`] describes; registers of `o.ty`, f32).
pub(crate) fn body(b: &mut Body, o: &Operands, shape: Shape, cx: &GpuCtx) {
    let Shape { rows: nr, lanes, block_k: bk } = shape;
    let ty = o.ty;
    let (q, k) = (o.q, o.k);
    let r = q.rank();
    let (sq, d) = (q.shape[r - 2], q.shape[r - 1]);
    let (sk, dv) = (k.shape[r - 2], o.v.map_or(0, |v| v.shape[r - 1]));
    let (inv, bq) = (GROUPS * lanes, GROUPS * nr);
    // Keys and value runs per lane.
    let (nk, nw) = (bk / lanes, dv / (4 * lanes));
    let vectors = cx.caps.flavor() == GpuFlavor::Nvvm && ty == "f32";
    let lay = tiled_attention_layouts(d, dv, nr, bk);

    let (sh_q, sq_ty) = (shared(b, lay.queries.len, ty), shared_type(b, lay.queries.len, ty));
    let (sh_k, sk_ty) = (shared(b, lay.keys.len, ty), shared_type(b, lay.keys.len, ty));
    let [values, weights] = [lay.values.len, lay.weights.len]
        .map(|len| (len > 0).then(|| (shared(b, len, ty), shared_type(b, len, ty))));
    let lin = b.assign("gpu.thread_id x");
    let bx = b.assign("gpu.block_id x");
    let groups = LaneGroups::new(b, lanes, inv, &lin, nr);
    let lanes_c = b.index(lanes);
    let lane = b.assign(format!("arith.remui {lin}, {lanes_c} : index"));
    let group = b.assign(format!("arith.divui {lin}, {lanes_c} : index"));
    let (c0, c4) = (b.index(0), b.index(4));
    let zero = b.float(0.0, ty);
    let one = b.float(1.0, ty);
    let neg_inf = b.float(f64::NEG_INFINITY, ty);

    // This group's query rows, in the tile and in the operand.
    let first = b.index(bq);
    let first = b.assign(format!("arith.muli {bx}, {first} : index"));
    let tile_rows: Vec<String> = (0..nr).map(|i| plus(b, &group, GROUPS * i)).collect();
    let rows: Vec<String> =
        tile_rows.iter().map(|t| b.assign(format!("arith.addi {first}, {t} : index"))).collect();
    let rows_c: Vec<String> = rows.iter().map(|row| clamp(b, row, sq)).collect();
    // This lane's keys in a tile, and the first column of each of its value runs.
    let keys: Vec<String> = (0..nk).map(|u| plus(b, &lane, lanes * u)).collect();
    let lane4 = b.assign(format!("arith.muli {lane}, {c4} : index"));
    let cols: Vec<String> = (0..nw).map(|w| plus(b, &lane4, 4 * lanes * w)).collect();

    // The workgroup's queries, once (zeros past the run's queries).
    let mem_q = SharedArray { name: &sh_q, ty: &sq_ty, vectors };
    let run_queries = o.run_lengths.then(|| o.sq_run.clone());
    let tile_q = OperandTile::new(b, q, "%a0", o.q_base.clone(), (bq, d), (sq, d), lay.queries, inv, vectors)
        .with_run_rows(run_queries);
    let fq = tile_q.fetch(b, &lin, (&first, &c0), &zero, ty);
    tile_q.deposit(b, &fq, &mem_q, &c0, None, ty);

    let mem_k = SharedArray { name: &sh_k, ty: &sk_ty, vectors };
    let run_keys = o.run_lengths.then(|| o.sk_run.clone());
    let tile_k = OperandTile::new(b, k, "%a1", o.k_base.clone(), (bk, d), (sk, d), lay.keys, inv, vectors)
        .with_run_rows(run_keys.clone());
    let tile_v = match (o.v, &o.v_base, &values) {
        (Some(v), Some(vb), Some(_)) => Some(
            OperandTile::new(b, v, "%a2", vb.clone(), (bk, dv), (sk, dv), lay.values, inv, vectors)
                .with_run_rows(run_keys),
        ),
        _ => None,
    };
    let mem_v = values.as_ref().map(|(name, t)| SharedArray { name, ty: t, vectors });
    let mem_w = weights.as_ref().map(|(name, t)| SharedArray { name, ty: t, vectors });

    // Carried over the key tiles: each row's running max and this lane's part of its sum,
    // and this lane's output accumulators (row by row, run by run, 4 each).
    let n_out = nr * nw * 4;
    let carried_n = 2 * nr + n_out;
    let types = vec![ty; carried_n].join(", ");
    let mut carried: Vec<String> = (0..nr).map(|i| format!("%tm{i} = {neg_inf}")).collect();
    carried.extend((0..nr).map(|i| format!("%tl{i} = {zero}")));
    carried.extend((0..n_out).map(|n| format!("%to{n} = {zero}")));
    let bkc = b.index(bk);
    let kend = keys_to_visit(b, o, &bx, bq);
    b.open(format!(
        "%ta:{carried_n} = scf.for %tk = {c0} to {kend} step {bkc} iter_args({}) -> ({types})",
        carried.join(", ")
    ));
    // The key and value tiles (zeros past the end): every read first, then every store.
    let fk = tile_k.fetch(b, &lin, ("%tk", &c0), &zero, ty);
    let fv = tile_v.as_ref().map(|t| t.fetch(b, &lin, ("%tk", &c0), &zero, ty));
    tile_k.deposit(b, &fk, &mem_k, &c0, None, ty);
    if let (Some(t), Some(fv), Some(mem)) = (&tile_v, &fv, &mem_v) {
        t.deposit(b, fv, mem, &c0, None, ty);
    }
    b.line("gpu.barrier");

    // Scores: over d in runs of 4, each query run and key run read once for this lane's
    // rows × keys.
    let n_s = nr * nk;
    let s_types = vec![ty; n_s].join(", ");
    let s_init: Vec<String> = (0..n_s).map(|n| format!("%ts{n} = {zero}")).collect();
    let dc = b.index(d);
    b.open(format!(
        "%tsc:{n_s} = scf.for %td = {c0} to {dc} step {c4} iter_args({}) -> ({s_types})",
        s_init.join(", ")
    ));
    let q_runs: Vec<Vec<String>> = tile_rows
        .iter()
        .map(|t| {
            let at = offset_at(b, 0, &[(Some(t), lay.queries.row)]);
            let at = b.assign(format!("arith.addi {at}, %td : index"));
            mem_q.read(b, &at, 4, ty)
        })
        .collect();
    let k_runs: Vec<Vec<String>> = keys
        .iter()
        .map(|j| {
            let at = offset_at(b, 0, &[(Some(j), lay.keys.row)]);
            let at = b.assign(format!("arith.addi {at}, %td : index"));
            mem_k.read(b, &at, 4, ty)
        })
        .collect();
    let mut s: Vec<String> = (0..n_s).map(|n| format!("%ts{n}")).collect();
    for e in 0..4 {
        for (i, qr) in q_runs.iter().enumerate() {
            for (u, kr) in k_runs.iter().enumerate() {
                s[i * nk + u] = b.fma(&qr[e], &kr[e], &s[i * nk + u], ty);
            }
        }
    }
    b.line(format!("scf.yield {} : {s_types}", s.join(", ")));
    b.close("");

    // Scale, mask, hide; each row's max over the tile, over the group.
    let sc = b.float(o.scale, ty);
    let mut scores: Vec<Vec<String>> = vec![Vec::with_capacity(nk); nr];
    let mut tmax = vec![neg_inf.clone(); nr];
    for (i, row) in rows.iter().enumerate() {
        for (u, key) in keys.iter().enumerate() {
            let j = b.assign(format!("arith.addi %tk, {key} : index"));
            let mut score = b.fmul(&format!("%tsc#{}", i * nk + u), &sc, ty);
            if let (Some(mv), Some(mb), Some(ma)) = (o.mask, &o.m_base, &o.mask_arg) {
                let jc = clamp(b, &j, sk);
                let off =
                    offset_at(b, 0, &[(Some(&rows_c[i]), mv.strides[r - 2]), (Some(&jc), mv.strides[r - 1])]);
                let at = b.assign(format!("arith.addi {mb}, {off} : index"));
                let m = load(b, ma, mv, &at);
                score = b.fadd(&score, &m, ty);
            }
            let mut hidden = b.assign(format!("arith.cmpi uge, {j}, {} : index", o.sk_run));
            if o.causal {
                let future = b.assign(format!("arith.cmpi ugt, {j}, {row} : index"));
                hidden = b.assign(format!("arith.ori {hidden}, {future} : i1"));
            }
            let score = b.select(&hidden, &neg_inf, &score, ty);
            tmax[i] = b.fmax(&tmax[i], &score, ty);
            scores[i].push(score);
        }
    }
    let tmax = groups.all(b, &tmax, Combine::Max);

    // Online softmax: each row's output rescaled by exp(m − m_new) once; the weights
    // `p = exp(score − m_new)` (0 for a row with nothing to see) into this lane's sums.
    let mut m_new = Vec::with_capacity(nr);
    let mut sums = Vec::with_capacity(nr);
    let mut outs: Vec<String> = Vec::with_capacity(n_out);
    let mut weights_of: Vec<Vec<String>> = Vec::with_capacity(nr);
    for (i, t) in tmax.iter().enumerate() {
        let m_old = format!("%tm{i}");
        let m = b.fmax(&m_old, t, ty);
        let dead = b.fcmp("oeq", &m, &neg_inf, ty);
        let shift = b.fsub(&m_old, &m, ty);
        let corr = b.exp_nonpositive(&shift, ty);
        let corr = b.select(&dead, &one, &corr, ty);
        let mut sum = b.fmul(&format!("%tl{i}"), &corr, ty);
        let mut w = Vec::with_capacity(nk);
        for score in &scores[i] {
            let x = b.fsub(score, &m, ty);
            let p = b.exp_nonpositive(&x, ty);
            let p = b.select(&dead, &zero, &p, ty);
            sum = b.fadd(&sum, &p, ty);
            w.push(p);
        }
        for n in 0..nw * 4 {
            outs.push(b.fmul(&format!("%to{}", i * nw * 4 + n), &corr, ty));
        }
        m_new.push(m);
        sums.push(sum);
        weights_of.push(w);
    }

    if let (Some(mem_v), Some(mem_w)) = (&mem_v, &mem_w) {
        // The weights through shared memory: query row by key.
        for (i, w) in weights_of.iter().enumerate() {
            for (u, p) in w.iter().enumerate() {
                let at = offset_at(b, 0, &[(Some(&tile_rows[i]), lay.weights.row), (Some(&keys[u]), 1)]);
                b.line(format!("memref.store {p}, {}[{at}] : {}", mem_w.name, mem_w.ty));
            }
        }
        b.line("gpu.barrier");
        // Outputs: over the tile's keys in runs of 4, each row's 4 weights and each key's
        // value runs read once for this lane's rows × columns.
        let o_types = vec![ty; n_out].join(", ");
        let o_init: Vec<String> = outs.iter().enumerate().map(|(n, x)| format!("%tp{n} = {x}")).collect();
        b.open(format!(
            "%tov:{n_out} = scf.for %tj = {c0} to {bkc} step {c4} iter_args({}) -> ({o_types})",
            o_init.join(", ")
        ));
        let w_runs: Vec<Vec<String>> = tile_rows
            .iter()
            .map(|t| {
                let at = offset_at(b, 0, &[(Some(t), lay.weights.row)]);
                let at = b.assign(format!("arith.addi {at}, %tj : index"));
                mem_w.read(b, &at, 4, ty)
            })
            .collect();
        let mut acc: Vec<String> = (0..n_out).map(|n| format!("%tp{n}")).collect();
        for e in 0..4 {
            let key = plus(b, "%tj", e);
            let key_at = offset_at(b, 0, &[(Some(&key), lay.values.row)]);
            let v_runs: Vec<Vec<String>> = cols
                .iter()
                .map(|col| {
                    let at = b.assign(format!("arith.addi {key_at}, {col} : index"));
                    mem_v.read(b, &at, 4, ty)
                })
                .collect();
            for (i, wr) in w_runs.iter().enumerate() {
                for (w, vr) in v_runs.iter().enumerate() {
                    for (f, x) in vr.iter().enumerate() {
                        let n = (i * nw + w) * 4 + f;
                        acc[n] = b.fma(&wr[e], x, &acc[n], ty);
                    }
                }
            }
        }
        b.line(format!("scf.yield {} : {o_types}", acc.join(", ")));
        b.close("");
        outs = (0..n_out).map(|n| format!("%tov#{n}")).collect();
    }
    b.line("gpu.barrier");
    let mut yielded = m_new;
    yielded.extend(sums);
    yielded.extend(outs);
    b.line(format!("scf.yield {} : {types}", yielded.join(", ")));
    b.close("");

    // Each row's sum over its group; its output divided by it, and the log-sum-exp.
    let partial: Vec<String> = (0..nr).map(|i| format!("%ta#{}", nr + i)).collect();
    let sums = groups.all(b, &partial, Combine::Add);
    for (i, row) in rows.iter().enumerate() {
        let valid = b.assign(format!("arith.cmpi ult, {row}, {} : index", o.sq_run));
        b.open(format!("scf.if {valid}"));
        if let (Some(out), Some(o_base), Some(out_arg)) = (o.out, &o.o_base, &o.out_arg) {
            for (w, col) in cols.iter().enumerate() {
                for f in 0..4 {
                    let x = format!("%ta#{}", 2 * nr + (i * nw + w) * 4 + f);
                    let y = b.fdiv(&x, &sums[i], ty);
                    let c = plus(b, col, f);
                    let off =
                        offset_at(b, 0, &[(Some(row), out.strides[r - 2]), (Some(&c), out.strides[r - 1])]);
                    let at = b.assign(format!("arith.addi {o_base}, {off} : index"));
                    store(b, &y, out_arg, out, &at);
                }
            }
        }
        if let (Some(lv), Some(l_base), Some(lse_arg)) = (o.lse, &o.l_base, &o.lse_arg) {
            let first_lane = b.assign(format!("arith.cmpi eq, {lane}, {c0} : index"));
            b.open(format!("scf.if {first_lane}"));
            let log_l = b.log(&sums[i], ty);
            let y = b.fadd(&format!("%ta#{i}"), &log_l, ty);
            let off = offset_at(b, 0, &[(Some(row), lv.strides[r - 2])]);
            let at = b.assign(format!("arith.addi {l_base}, {off} : index"));
            store(b, &y, lse_arg, lv, &at);
            b.close("");
        }
        b.close("");
    }
}
