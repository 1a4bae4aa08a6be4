//! Flash attention on tensor cores: each warp of the workgroup owns 16 queries. It holds their
//! rows as `mma.sync` A fragments (rounded to TF32, or split in two TF32 parts at TF32×3, once)
//! for the whole walk over the keys; per key tile it forms its 16 × `block_k` scores with
//! products against the key tile (the B operand, straight from shared memory), runs the online
//! softmax on the scores where the products left them (each lane holds two query rows, four
//! lanes a row, so a row's max takes two butterfly shuffles), and multiplies the weights, still
//! in registers, with the value tile, accumulating the output rows in the products' f32
//! accumulators. The scores' accumulators are where the value products' A fragments want the
//! weights: for 16-bit products as they come, for TF32 ones because the key tile holds the
//! keys' rows interleaved ([`weight_of`]). Each lane keeps its part of
//! the row sums; the four lanes of a row add theirs only at the end. The output is divided by
//! the sum once, as in the one-query-per-invocation kernel.
//!
//! With async copies the key and value tiles are copied up to two tiles ahead (3 stages) with
//! `cp.async`; 16-bit keys and values are read with `ldmatrix`. On SPIR-V the products are
//! emulated per warp ([`super::mma`]), the shuffles go through shared memory, the copies are
//! plain reads and writes and `ldmatrix` the reads it stands for, so the same bookkeeping runs,
//! and is checked, on any Vulkan device.
//!
//! As warpgroup products (`sm_90a`) the lanes hold the same fragments and accumulators, but
//! each four warps issue one `wgmma` per 16 (TF32: 8) elements of the head for their 64
//! queries' scores against the whole key tile, and one per 16 (8) keys for the weights (still
//! in registers) times the whole value tile. The tiles lie in shared memory as core matrices
//! ([`warpgroup_attention_layouts`]), copied with `cp.async` and fenced for the async proxy;
//! each group of products is awaited before its results are read. With a group in flight (3
//! stages) the walk is overlapped: step t issues tile t's score products, then tile t − 1's
//! value products with the weights it carried in, waits for the scores only, runs tile t's
//! softmax while the value products run, and rescales the outputs once they are done; the
//! first tile's scores and softmax come before the loop, the last tile's value products after
//! it. On SPIR-V each warp emulates its share with `mma.sync`'s emulation, reading the B
//! operand as the descriptors describe it.

use super::attention::{keys_to_visit, Operands};
use super::mma::{
    eight, joined, mma_parts, words, Fragment, Fragments, Lanes, Part, Parts, C_FRAGMENT, MMA_M, MMA_N,
};
use super::plan::{attention_layouts, warpgroup_attention_layouts, MmaInstruction, MmaPrecision};
use super::skeleton::{clamp, offset_at, plus, shared, shared_type, Combine, LaneGroups, SharedArray};
use super::tiles::{shared_pointer, Fetched, OperandTile, Pipeline};
use super::wgmma::{self, Descriptor};
use super::{GpuCtx, GpuFlavor};
use crate::kernels::elementwise::{load, store};
use crate::mlir_text::Body;

/// The plan's numbers the body is written from.
pub(crate) struct Shape {
    /// Warps per workgroup, 16 queries each.
    pub warps: usize,
    /// Keys per tile.
    pub block_k: usize,
    /// Shared-memory stages of the key and value tiles (2: the next tile is read from memory
    /// while the current one is used).
    pub stages: usize,
    /// The products' operand precision.
    pub precision: MmaPrecision,
    /// Whether q, k and v are exact at it (f16 and bf16 tensors).
    pub exact: bool,
    /// Whether tiles that allow it are copied asynchronously.
    pub async_copies: bool,
    /// Per warp, or per warpgroup from shared memory.
    pub instruction: MmaInstruction,
}

/// The kernel body (operands as [`Operands`] describes; f32 registers).
pub(crate) fn body(b: &mut Body, o: &Operands, shape: Shape, cx: &GpuCtx) {
    let Shape { warps, block_k: bk, stages, precision, exact, async_copies, instruction } = shape;
    // Warpgroup products, and whether a tile's value products run while the next tile's
    // scores are formed and its softmax computed (overlapped: with products in flight, at
    // least 3 stages, so the stage the value products read is refilled a step later).
    let warpgroups = matches!(instruction, MmaInstruction::Warpgroup { .. });
    let ty = "f32";
    let (q, k) = (o.q, o.k);
    let r = q.rank();
    let (sq, d) = (q.shape[r - 2], q.shape[r - 1]);
    let (sk, dv) = (k.shape[r - 2], o.v.map_or(0, |v| v.shape[r - 1]));
    let nvvm = cx.caps.flavor() == GpuFlavor::Nvvm;
    let ops = Parts::new(precision, cx.caps.flavor(), exact);
    let entering = Some(&ops);
    let lay = match warpgroups {
        true => warpgroup_attention_layouts(d, dv, bk, precision),
        false => attention_layouts(d, dv, bk, precision),
    };
    let overlapped = instruction.overlaps_attention(dv);
    let inv = 32 * warps;
    // TF32 products: the keys' rows interleaved, so that the scores lie where the value
    // products' A fragments want them ([`weight_of`]); for warpgroup products at TF32×3 each
    // stage holds the tiles' low parts after them.
    let interleaved = !precision.paired();
    let split = (warpgroups && precision == MmaPrecision::Tf32x3).then_some([lay.keys.len, lay.values.len]);
    let lens = [lay.keys.len, lay.values.len].map(|len| len * if split.is_some() { 2 } else { 1 });

    // Keys and values as the products take them.
    let elem = ops.shared_elem();
    let sh_k = shared(b, stages * lens[0], elem);
    let sk_ty = shared_type(b, stages * lens[0], elem);
    let sh_v = shared(b, stages * lens[1], elem);
    let sv_ty = shared_type(b, stages * lens[1], elem);
    let lin = b.assign("gpu.thread_id x");
    // A query row's four lanes (a quad) combine its max and sum.
    let quads = LaneGroups::new(b, 4, inv, &lin, 2);
    let bx = b.assign("gpu.block_id x");
    let l = Lanes::new(b, &lin, [warps, 1], [1, 1], precision);
    let frag = l.frag;
    let k_lane = l.k_lane(b);
    let (c0, c1) = (b.index(0), b.index(1));
    let zero = b.float(0.0, ty);
    let one = b.float(1.0, ty);
    let neg_inf = b.float(f64::NEG_INFINITY, ty);

    // This lane's first accumulator column (`2·in_group` of each 8).
    let two = b.index(2);
    let two_t = b.assign(format!("arith.muli {}, {two} : index", l.in_group));
    // This lane's two query rows (`group` and `group + 8` of its warp's 16), clamped for reads.
    let bqc = b.index(MMA_M * warps);
    let first = b.assign(format!("arith.muli {bx}, {bqc} : index"));
    let first = b.assign(format!("arith.addi {first}, {} : index", l.warp_row));
    let rows = [l.at(b, &first, 0, &l.group, 1), l.at(b, &first, 8, &l.group, 1)];
    let rows_c = [clamp(b, &rows[0], sq), clamp(b, &rows[1], sq)];

    // The warp's queries as A fragments, one per k columns of the head.
    let q_frags: Vec<Fragment> = (0..d / frag.k)
        .map(|kk| {
            let parts = frag
                .a
                .iter()
                .map(|&(dr, dc)| {
                    let col = plus(b, &k_lane, kk * frag.k + dc);
                    let at = offset_at(
                        b,
                        0,
                        &[(Some(&rows_c[dr / 8]), q.strides[r - 2]), (Some(&col), q.strides[r - 1])],
                    );
                    let at = b.assign(format!("arith.addi {}, {at} : index", o.q_base));
                    let x = load(b, "%a0", q, &at);
                    ops.fresh(b, &x)
                })
                .collect();
            Fragment::Elements(parts)
        })
        .collect();

    // The key and value tiles as the workgroup reads them (zeros past the run's keys).
    let vectors = nvvm;
    let run_keys = o.run_lengths.then(|| o.sk_run.clone());
    let tile_k = OperandTile::new(b, k, "%a1", o.k_base.clone(), (bk, d), (sk, d), lay.keys, inv, vectors)
        .with_run_rows(run_keys.clone());
    let tile_k = if interleaved { tile_k.with_rows_interleaved() } else { tile_k };
    let tile_v = match (o.v, &o.v_base) {
        (Some(v), Some(vb)) if dv > 0 => Some(
            OperandTile::new(b, v, "%a2", vb.clone(), (bk, dv), (sk, dv), lay.values, inv, vectors)
                .with_run_rows(run_keys),
        ),
        _ => None,
    };
    let mem_k = SharedArray { name: &sh_k, ty: &sk_ty, vectors };
    let mem_v = SharedArray { name: &sh_v, ty: &sv_ty, vectors };

    // The start of the last key tile, where the two-stage walk reads "the next tile" at the end
    // (always in bounds; a tile whose keys all lie past the run's reads zeros).
    let bkc = b.index(bk);
    let last = if o.run_lengths {
        let bk1 = b.index(bk - 1);
        let n = b.assign(format!("arith.addi {}, {bk1} : index", o.sk_run));
        let n = b.assign(format!("arith.divui {n}, {bkc} : index"));
        let n = b.assign(format!("arith.maxui {n}, {c1} : index"));
        let n = b.assign(format!("arith.subi {n}, {c1} : index"));
        b.assign(format!("arith.muli {n}, {bkc} : index"))
    } else {
        b.index((sk.div_ceil(bk).max(1) - 1) * bk)
    };
    let tiles = [Some(&tile_k), tile_v.as_ref()];
    let pipe = Pipeline::new(b, tiles, [&mem_k, &mem_v], lens, stages, Some(&ops), async_copies, &lin)
        .read_by_async_proxy(warpgroups)
        .with_products_in_flight(usize::from(overlapped))
        .splitting_into(split);
    // On NVVM, where 16-bit fragments are read with `ldmatrix`: the key and value tiles'
    // pointers.
    let matrix_ptrs = (nvvm && precision.paired() && !warpgroups)
        .then(|| [shared_pointer(b, &mem_k), shared_pointer(b, &mem_v)]);
    // As warpgroup products: the key tile read transposed (the score products' B, k-major),
    // the value tile as it is (n-major); on NVVM the arrays' addresses and the queries'
    // fragments as the registers the instructions take.
    let group = warpgroups.then(|| {
        let elem = precision.shared_bytes();
        let descriptors =
            [Descriptor::of_b(&lay.keys.transposed(), elem), Descriptor::of_b(&lay.values, elem)];
        let addresses = nvvm.then(|| {
            let [pk, pv] = [shared_pointer(b, &mem_k), shared_pointer(b, &mem_v)];
            [wgmma::shared_address(b, &pk), wgmma::shared_address(b, &pv)]
        });
        let q_words = q_frags.iter().map(|f| nvvm.then(|| part_words(b, precision, f))).collect();
        let lows = [lay.keys.len, lay.values.len];
        Warpgroup { descriptors, addresses, q_words, lows }
    });
    let origins = |k0: &str| [(k0.to_string(), c0.clone()), (k0.to_string(), c0.clone())];
    let kend = keys_to_visit(b, o, &bx, MMA_M * warps);
    // Whether the tile at `k0` is visited: only those are copied.
    let visited = |b: &mut Body, k0: &str| {
        pipe.copying().then(|| b.assign(format!("arith.cmpi ult, {k0}, {kend} : index")))
    };
    if stages >= 2 {
        // The first tiles the copies run ahead by (`stages − 1`, less the products in
        // flight; the last one again past the end), each into its stage.
        for s in 0..pipe.ahead_by() {
            let k_s = b.index(s * bk);
            let clamped = b.assign(format!("arith.minui {k_s}, {last} : index"));
            let real = visited(b, &clamped);
            let at = origins(&clamped);
            pipe.fill(b, s, (&at, &at), real.as_deref(), &zero, ty);
        }
        pipe.filled(b);
    }

    // Opens the step of the key tile at `fk`: waits for its tiles and sends tile t + S − 1 on
    // its way (less the products in flight; the last one again past the end for the
    // registers' tiles, into a stage no one reads; copied only where it is visited), or with
    // one stage reads the tile and publishes it.
    let open_step = |b: &mut Body, fk: &str| -> Step {
        if stages < 2 {
            let fk_tile = tile_k.fetch(b, &lin, (fk, &c0), &zero, ty);
            let fv = tile_v.as_ref().map(|t| t.fetch(b, &lin, (fk, &c0), &zero, ty));
            tile_k.deposit(b, &fk_tile, &mem_k, &c0, entering, ty);
            if let (Some(t), Some(fv)) = (&tile_v, &fv) {
                t.deposit(b, fv, &mem_v, &c0, entering, ty);
            }
            b.line("gpu.barrier");
            return Step { keys: c0.clone(), values: c0.clone(), next: None };
        }
        let t = b.assign(format!("arith.divui {fk}, {bkc} : index"));
        let ([keys, values], next) = pipe.arrive(b, &t);
        let ahead = b.index(pipe.ahead_by() * bk);
        let kn = b.assign(format!("arith.addi {fk}, {ahead} : index"));
        let clamped = b.assign(format!("arith.minui {kn}, {last} : index"));
        let real = visited(b, &kn);
        let fetched = pipe.ahead(b, (&origins(&clamped), &origins(&kn)), real.as_deref(), &next, &zero, ty);
        Step { keys, values, next: Some((fetched, next)) }
    };
    // Closes a step: stores the registers' tiles it read ahead, or with one stage the
    // barrier before the tile is overwritten.
    let close_step = |b: &mut Body, step: Step| match step.next {
        Some((fetched, next)) => pipe.close(b, &fetched, &next, ty),
        None => b.line("gpu.barrier"),
    };

    // The scores of the queries against the key tile in the stage at `cur_k`, as
    // accumulators (per 8 keys, in the order of `C_FRAGMENT`); as warpgroup products issued,
    // to be awaited. Key `n` of the tile is column `n` of the B operand, its element `e` row
    // `e`.
    let (kr, kc) = (lay.keys.row, lay.keys.col);
    let issue_scores = |b: &mut Body, cur_k: &str| -> Vec<String> {
        let mut scores: Vec<Vec<String>> = vec![vec![zero.clone(); C_FRAGMENT.len()]; bk / MMA_N];
        if let Some(g) = &group {
            // The warpgroup's 64 queries times the whole key tile, 16 (TF32: 8) elements of the
            // head at a time.
            let products = q_frags
                .iter()
                .zip(&g.q_words)
                .enumerate()
                .map(|(kk, (af, words))| (af, words.as_ref(), lay.keys.offset(0, kk * frag.k)))
                .collect::<Vec<_>>();
            return g.products(b, &l, &ops, (&mem_k, cur_k, 0), &products, scores.concat());
        }
        if precision.paired() && (bk / MMA_N).is_multiple_of(2) {
            // 16-bit keys through `ldmatrix`: lane `8j + i` names key `i` (+ 8 for `j / 2`) of
            // the pair of 8-key blocks, elements from 8 × (`j % 2`) of the k block; the keys'
            // rows are the B operand's columns.
            for nb in (0..bk / MMA_N).step_by(2) {
                for (kk, af) in q_frags.iter().enumerate() {
                    let mut row_at = |b: &mut Body, i: &str, h: &str, q: &str| {
                        let key = plus(b, i, nb * MMA_N);
                        let key = eight(b, &key, q);
                        let e = b.index(kk * frag.k);
                        let e = eight(b, &e, h);
                        let at = offset_at(b, 0, &[(Some(&key), kr), (Some(&e), kc)]);
                        b.assign(format!("arith.addi {cur_k}, {at} : index"))
                    };
                    let ptr = matrix_ptrs.as_ref().map(|p| p[0].as_str());
                    let m = l.ldmatrix(b, &ops, &mem_k, ptr, false, &mut row_at);
                    for (half, pair) in m.chunks(2).enumerate() {
                        let c = &scores[nb + half];
                        scores[nb + half] = mma_parts(b, &l, af, &joined(pair), c);
                    }
                }
            }
            return scores.concat();
        }
        let key_lane = offset_at(b, 0, &[(Some(&l.group), kr), (Some(&k_lane), kc)]);
        let key_lane = b.assign(format!("arith.addi {cur_k}, {key_lane} : index"));
        for (nb, c) in scores.iter_mut().enumerate() {
            for (kk, af) in q_frags.iter().enumerate() {
                let mut at = |b: &mut Body, dr: usize, dc: usize| {
                    plus(b, &key_lane, (nb * MMA_N + dc) * kr + (kk * frag.k + dr) * kc)
                };
                let bf = l.read(b, &ops, &mem_k, frag.b, kc == 1, &mut at);
                *c = mma_parts(b, &l, af, &bf, c);
            }
        }
        scores.concat()
    };

    // The online softmax of the tile at `fk` from its scores and the rows' running max and
    // sums: scale, mask, hide; the tile's max per row, over the quad; the new max, the
    // factor exp(m − m_new) the outputs are rescaled by, the weights `p = exp(score − m_new)`
    // (0 for a row with nothing to see) and the sums with them. Accumulator column `c` of
    // each 8 holds key `c` of them, or with the keys interleaved key `c / 2 + 4·(c mod 2)`
    // (this lane's columns `2·in_group` and `2·in_group + 1`: keys `in_group` and
    // `in_group + 4`).
    let sc = b.float(o.scale, ty);
    let softmax = |b: &mut Body, fk: &str, scores: &[String], [m0, m1]: [&str; 2], [l0, l1]: [&str; 2]| {
        let (j_lane, key_step) = match interleaved {
            true => (b.assign(format!("arith.addi {fk}, {} : index", l.in_group)), 4),
            false => (b.assign(format!("arith.addi {fk}, {two_t} : index")), 1),
        };
        let mut tmax = [neg_inf.clone(), neg_inf.clone()];
        let mut scores: Vec<Vec<String>> = scores.chunks(C_FRAGMENT.len()).map(<[String]>::to_vec).collect();
        for (nb, c) in scores.iter_mut().enumerate() {
            for (e, s) in c.iter_mut().enumerate() {
                let (dr, dc) = C_FRAGMENT[e];
                let half = dr / 8;
                let j = plus(b, &j_lane, nb * MMA_N + dc * key_step);
                let mut score = b.fmul(s, &sc, ty);
                if let (Some(mv), Some(mb), Some(ma)) = (o.mask, &o.m_base, &o.mask_arg) {
                    let jc = clamp(b, &j, sk);
                    let off = offset_at(
                        b,
                        0,
                        &[(Some(&rows_c[half]), mv.strides[r - 2]), (Some(&jc), mv.strides[r - 1])],
                    );
                    let at = b.assign(format!("arith.addi {mb}, {off} : index"));
                    let m = load(b, ma, mv, &at);
                    score = b.fadd(&score, &m, ty);
                }
                let mut hidden = b.assign(format!("arith.cmpi uge, {j}, {} : index", o.sk_run));
                if o.causal {
                    let future = b.assign(format!("arith.cmpi ugt, {j}, {} : index", rows[half]));
                    hidden = b.assign(format!("arith.ori {hidden}, {future} : i1"));
                }
                *s = b.select(&hidden, &neg_inf, &score, ty);
                tmax[half] = b.fmax(&tmax[half], s, ty);
            }
        }
        let tmax = quads.all(b, &tmax, Combine::Max);
        let mut m_new = [m0, m1].map(str::to_string);
        let mut dead = [String::new(), String::new()];
        let mut corr = [String::new(), String::new()];
        for (half, t) in tmax.iter().enumerate() {
            let m = b.fmax(&m_new[half], t, ty);
            let gone = b.fcmp("oeq", &m, &neg_inf, ty);
            let shift = b.fsub(&m_new[half], &m, ty);
            let c = b.exp_nonpositive(&shift, ty);
            corr[half] = b.select(&gone, &one, &c, ty);
            m_new[half] = m;
            dead[half] = gone;
        }
        let mut sums = [b.fmul(l0, &corr[0], ty), b.fmul(l1, &corr[1], ty)];
        let mut weights = Vec::with_capacity(scores.len());
        for c in &scores {
            for (e, s) in c.iter().enumerate() {
                let half = C_FRAGMENT[e].0 / 8;
                let x = b.fsub(s, &m_new[half], ty);
                let p = b.exp_nonpositive(&x, ty);
                let p = b.select(&dead[half], &zero, &p, ty);
                sums[half] = b.fadd(&sums[half], &p, ty);
                weights.push(p);
            }
        }
        Softmax { max: m_new, corr, sums, weights }
    };
    // The output accumulators times each row's factor.
    let rescaled = |b: &mut Body, outs: &[String], corr: &[String; 2]| -> Vec<String> {
        outs.iter()
            .enumerate()
            .map(|(i, o)| b.fmul(o, &corr[C_FRAGMENT[i % C_FRAGMENT.len()].0 / 8], ty))
            .collect()
    };

    // `outs += weights · values` with the value tile in the stage at `cur_v`; as warpgroup
    // products issued, to be awaited. The scores' accumulators lie where the A fragments want
    // the weights (for TF32 products with the keys interleaved), so the weights stay in
    // registers ([`weight_of`]), one fragment per k keys.
    let issue_values =
        |b: &mut Body, weights: &[String], cur_v: &str, mut outs: Vec<String>| -> Vec<String> {
            let w_frags: Vec<Fragment> = (0..bk / frag.k)
                .map(|kk| {
                    let parts = frag
                        .a
                        .iter()
                        .map(|&(dr, dc)| {
                            let (nb, e) = weight_of(kk, (dr, dc), frag);
                            ops.computed(b, &weights[nb * C_FRAGMENT.len() + e])
                        })
                        .collect();
                    Fragment::Elements(parts)
                })
                .collect();
            if let Some(g) = &group {
                // The warpgroup's weights times the whole value tile, 16 (TF32: 8) keys at a time.
                let w_words: Vec<Option<Vec<Vec<String>>>> =
                    w_frags.iter().map(|f| nvvm.then(|| part_words(b, precision, f))).collect();
                let products = w_frags
                    .iter()
                    .zip(&w_words)
                    .enumerate()
                    .map(|(kk, (af, words))| (af, words.as_ref(), lay.values.offset(kk * frag.k, 0)))
                    .collect::<Vec<_>>();
                return g.products(b, &l, &ops, (&mem_v, cur_v, 1), &products, outs);
            }
            let (vr, vc) = (lay.values.row, lay.values.col);
            let v_lane = offset_at(b, 0, &[(Some(&k_lane), vr), (Some(&l.group), vc)]);
            let v_lane = b.assign(format!("arith.addi {cur_v}, {v_lane} : index"));
            for (kk, af) in w_frags.iter().enumerate() {
                if precision.paired() {
                    // 16-bit values through `ldmatrix`, transposed: lane `8j + i` names key `i`
                    // (+ 8 for `j % 2`) of the k block, elements from 8 × (`j / 2`) of the pair of
                    // 8-element blocks.
                    for nb in (0..dv / MMA_N).step_by(2) {
                        let mut row_at = |b: &mut Body, i: &str, h: &str, q: &str| {
                            let key = plus(b, i, kk * frag.k);
                            let key = eight(b, &key, h);
                            let e = b.index(nb * MMA_N);
                            let e = eight(b, &e, q);
                            let at = offset_at(b, 0, &[(Some(&key), vr), (Some(&e), vc)]);
                            b.assign(format!("arith.addi {cur_v}, {at} : index"))
                        };
                        let ptr = matrix_ptrs.as_ref().map(|p| p[1].as_str());
                        let m = l.ldmatrix(b, &ops, &mem_v, ptr, true, &mut row_at);
                        for (half, pair) in m.chunks(2).enumerate() {
                            let base = (nb + half) * C_FRAGMENT.len();
                            let d = mma_parts(b, &l, af, &joined(pair), &outs[base..base + C_FRAGMENT.len()]);
                            outs[base..base + C_FRAGMENT.len()].clone_from_slice(&d);
                        }
                    }
                    continue;
                }
                for nb in 0..dv / MMA_N {
                    let mut at = |b: &mut Body, dr: usize, dc: usize| {
                        plus(b, &v_lane, (kk * frag.k + dr) * vr + (nb * MMA_N + dc) * vc)
                    };
                    let bf = l.read(b, &ops, &mem_v, frag.b, vr == 1, &mut at);
                    let base = nb * C_FRAGMENT.len();
                    let d = mma_parts(b, &l, af, &bf, &outs[base..base + C_FRAGMENT.len()]);
                    outs[base..base + C_FRAGMENT.len()].clone_from_slice(&d);
                }
            }
            outs
        };
    // `values` once no more than `pending` groups of warpgroup products run.
    let awaited = |b: &mut Body, values: Vec<String>, pending: usize| match &group {
        Some(g) => g.awaited(b, values, pending),
        None => values,
    };

    // Carried over the key tiles: each row's running max and this lane's part of its sum, and
    // the output accumulators (4 per 8 columns of the value row); overlapped, also the
    // previous tile's weights and the stage of its values.
    let n_out = dv / MMA_N * C_FRAGMENT.len();
    let n_weights = bk / MMA_N * C_FRAGMENT.len();
    let outs_in: Vec<String> = (0..n_out).map(|i| format!("%fo{i}")).collect();
    let walked = if overlapped {
        // The first tile's scores and softmax (its outputs are still zero).
        let step = open_step(b, &c0);
        let scores = issue_scores(b, &step.keys);
        let scores = awaited(b, scores, 0);
        let first = softmax(b, &c0, &scores, [&neg_inf, &neg_inf], [&zero, &zero]);
        let first_values = step.values.clone();
        close_step(b, step);

        // Step t issues its score products, then the value products of tile t − 1 with the
        // weights carried in; the softmax of tile t runs while those are in flight, and the
        // outputs are rescaled once they are done.
        let names = ["%fm0", "%fm1", "%fl0", "%fl1"].map(str::to_string).into_iter();
        let names = names.chain((0..n_out).map(|i| format!("%fo{i}")));
        let names = names.chain((0..n_weights).map(|i| format!("%fw{i}"))).chain(["%fv".to_string()]);
        let inits = [
            first.max.to_vec(),
            first.sums.to_vec(),
            vec![zero.clone(); n_out],
            first.weights,
            vec![first_values],
        ]
        .concat();
        let carried: Vec<String> = names.zip(&inits).map(|(n, v)| format!("{n} = {v}")).collect();
        let types = [vec![ty; 4 + n_out + n_weights], vec!["index"]].concat();
        b.open(format!(
            "%fa:{} = scf.for %fk = {bkc} to {kend} step {bkc} iter_args({}) -> ({})",
            carried.len(),
            carried.join(", "),
            types.join(", ")
        ));
        let step = open_step(b, "%fk");
        let scores = issue_scores(b, &step.keys);
        let weights: Vec<String> = (0..n_weights).map(|i| format!("%fw{i}")).collect();
        let outs = issue_values(b, &weights, "%fv", outs_in);
        let scores = awaited(b, scores, 1);
        let s = softmax(b, "%fk", &scores, ["%fm0", "%fm1"], ["%fl0", "%fl1"]);
        let outs = awaited(b, outs, 0);
        let outs = rescaled(b, &outs, &s.corr);
        let values = step.values.clone();
        close_step(b, step);
        let yielded = [s.max.to_vec(), s.sums.to_vec(), outs, s.weights, vec![values]].concat();
        b.line(format!("scf.yield {} : {}", yielded.join(", "), types.join(", ")));
        b.close("");
        let mut results: Vec<String> = (0..inits.len()).map(|i| format!("%fa#{i}")).collect();

        // The last tile's value products.
        let last_values = results.pop().expect("the values' stage is carried last");
        let weights = results.split_off(4 + n_out);
        let outs = results.split_off(4);
        let outs = issue_values(b, &weights, &last_values, outs);
        let outs = awaited(b, outs, 0);
        Walked {
            max: [results[0].clone(), results[1].clone()],
            sums: [results[2].clone(), results[3].clone()],
            outs,
        }
    } else {
        // Step t: the tile's scores, awaited; its softmax; its value products, awaited.
        let names = ["%fm0", "%fm1", "%fl0", "%fl1"].map(str::to_string).into_iter();
        let names = names.chain((0..n_out).map(|i| format!("%fo{i}")));
        let inits = [vec![neg_inf.clone(); 2], vec![zero.clone(); 2 + n_out]].concat();
        let carried: Vec<String> = names.zip(&inits).map(|(n, v)| format!("{n} = {v}")).collect();
        let types = vec![ty; 4 + n_out];
        b.open(format!(
            "%fa:{} = scf.for %fk = {c0} to {kend} step {bkc} iter_args({}) -> ({})",
            4 + n_out,
            carried.join(", "),
            types.join(", ")
        ));
        let step = open_step(b, "%fk");
        let scores = issue_scores(b, &step.keys);
        let scores = awaited(b, scores, 0);
        let s = softmax(b, "%fk", &scores, ["%fm0", "%fm1"], ["%fl0", "%fl1"]);
        let mut outs = rescaled(b, &outs_in, &s.corr);
        if dv > 0 {
            outs = issue_values(b, &s.weights, &step.values, outs);
            outs = awaited(b, outs, 0);
        }
        close_step(b, step);
        let yielded = [s.max.to_vec(), s.sums.to_vec(), outs].concat();
        b.line(format!("scf.yield {} : {}", yielded.join(", "), types.join(", ")));
        b.close("");
        let mut results: Vec<String> = (0..inits.len()).map(|i| format!("%fa#{i}")).collect();
        let outs = results.split_off(4);
        Walked {
            max: [results[0].clone(), results[1].clone()],
            sums: [results[2].clone(), results[3].clone()],
            outs,
        }
    };
    pipe.drain(b);

    // Each row's sum over its quad; the output rows divided by it, and the log-sum-exp.
    let sums = quads.all(b, &walked.sums, Combine::Add);
    for (half, row) in rows.iter().enumerate() {
        let valid = b.assign(format!("arith.cmpi ult, {row}, {} : index", o.sq_run));
        b.open(format!("scf.if {valid}"));
        if let (Some(out), Some(o_base), Some(out_arg)) = (o.out, &o.o_base, &o.out_arg) {
            for nb in 0..dv / MMA_N {
                for (e, &(dr, dc)) in C_FRAGMENT.iter().enumerate() {
                    if dr / 8 != half {
                        continue;
                    }
                    let x = &walked.outs[nb * C_FRAGMENT.len() + e];
                    let y = b.fdiv(x, &sums[half], ty);
                    let col = plus(b, &two_t, nb * MMA_N + dc);
                    let off =
                        offset_at(b, 0, &[(Some(row), out.strides[r - 2]), (Some(&col), out.strides[r - 1])]);
                    let at = b.assign(format!("arith.addi {o_base}, {off} : index"));
                    store(b, &y, out_arg, out, &at);
                }
            }
        }
        if let (Some(lv), Some(l_base), Some(lse_arg)) = (o.lse, &o.l_base, &o.lse_arg) {
            let first_lane = b.assign(format!("arith.cmpi eq, {}, {c0} : index", l.in_group));
            b.open(format!("scf.if {first_lane}"));
            let log_l = b.log(&sums[half], ty);
            let y = b.fadd(&walked.max[half], &log_l, ty);
            let off = offset_at(b, 0, &[(Some(row), lv.strides[r - 2])]);
            let at = b.assign(format!("arith.addi {l_base}, {off} : index"));
            store(b, &y, lse_arg, lv, &at);
            b.close("");
        }
        b.close("");
    }
}

/// A step of the walk as opened: the offsets of its key and value tiles' stage, and what it
/// sends ahead (the registers' tiles read, to be stored, and the stages they go to); `None`
/// with one stage.
struct Step {
    keys: String,
    values: String,
    next: Option<([Option<Fetched>; 2], [String; 2])>,
}

/// The online softmax of a key tile: each of the lane's two rows' new max, the factor its
/// outputs are rescaled by, and its part of the sum; the weights, one per score accumulator.
struct Softmax {
    max: [String; 2],
    corr: [String; 2],
    sums: [String; 2],
    weights: Vec<String>,
}

/// After the walk: each row's max and this lane's part of its sum, and the output
/// accumulators (every product done).
struct Walked {
    max: [String; 2],
    sums: [String; 2],
    outs: Vec<String>,
}

/// One warpgroup product of a step: its A fragment, on NVVM its registers per part
/// ([`part_words`]), and the element offset of its B operand in the stage.
type Product<'f> = (&'f Fragment, Option<&'f Vec<Vec<String>>>, usize);

/// What the warpgroup products of a kernel need: how the key and the value tile lie for them,
/// where their low parts' tiles lie (TF32×3: this many elements after each), and on NVVM the
/// tiles' shared addresses and the query fragments as `i32` registers, per part.
struct Warpgroup {
    descriptors: [Descriptor; 2],
    addresses: Option<[String; 2]>,
    q_words: Vec<Option<Vec<Vec<String>>>>,
    lows: [usize; 2],
}

impl Warpgroup {
    /// `acc += A·B` over `products`, each an A fragment (with its registers per part on NVVM)
    /// and the element offset of its B operand in tile `which` (0: keys, 1: values) from the
    /// stage at `stage` of `mem`: on NVVM `wgmma` from registers, fenced before and committed
    /// after as one group ([`Warpgroup::awaited`] waits for it); else emulated. TF32×3
    /// operands multiply as three products, the low parts with the high ones first, so the
    /// small terms are not lost to the large. Returns the accumulators after them.
    fn products(
        &self,
        b: &mut Body,
        l: &Lanes,
        ops: &Parts,
        (mem, stage, which): (&SharedArray, &str, usize),
        products: &[Product],
        mut acc: Vec<String>,
    ) -> Vec<String> {
        let d = &self.descriptors[which];
        // (A's part, B's part) of each product: 0 the high (or only) one, 1 the low one.
        let (pairs, single): (&[(usize, usize)], Parts) = match ops.precision {
            MmaPrecision::Tf32x3 => {
                (&[(1, 0), (0, 1), (0, 0)], Parts { precision: MmaPrecision::Tf32, ..*ops })
            }
            MmaPrecision::Tf32 | MmaPrecision::F16 | MmaPrecision::Bf16 => (&[(0, 0)], *ops),
        };
        if self.addresses.is_some() {
            wgmma::fence(b);
        }
        for &(af, registers, offset) in products {
            for &(pa, pb) in pairs {
                let at = plus(b, stage, offset + pb * self.lows[which]);
                acc = match (&self.addresses, registers) {
                    (Some(addresses), Some(a)) => {
                        let desc =
                            wgmma::descriptor(b, &addresses[which], &at, ops.precision.shared_bytes(), d);
                        wgmma::product_from_registers(b, ops.precision, &a[pa], (&desc, d), &acc)
                    }
                    _ => {
                        let part = part_of(af, pa);
                        let af = part.as_ref().unwrap_or(af);
                        wgmma::emulated_from_registers(b, l, &single, af, (mem, &at, d), &acc)
                    }
                };
            }
        }
        if self.addresses.is_some() {
            wgmma::group(b);
        }
        acc
    }

    /// `values` once no more than `pending` groups of products run, the latest ones (NVVM:
    /// after the wait, through an empty instruction, so nothing reads them early).
    fn awaited(&self, b: &mut Body, values: Vec<String>, pending: usize) -> Vec<String> {
        match self.addresses {
            Some(_) => wgmma::finished(b, pending, &values),
            None => values,
        }
    }
}

/// A fragment's registers as the instructions take them ([`words`]), per part: the high (or
/// only) part's, then at TF32×3 the low part's.
fn part_words(b: &mut Body, precision: MmaPrecision, f: &Fragment) -> Vec<Vec<String>> {
    let mut parts = vec![words(b, precision, f)];
    if let Some(Fragment::Elements(lo)) = part_of(f, 1) {
        parts.push(lo.into_iter().map(|p| p.hi).collect());
    }
    parts
}

/// Part `part` (0: high, 1: low) of a fragment whose elements are split, as a fragment of its
/// own; `None` for one that is not.
fn part_of(f: &Fragment, part: usize) -> Option<Fragment> {
    let Fragment::Elements(e) = f else { return None };
    let values = e.iter().map(|x| match part {
        0 => x.lo.as_ref().map(|_| x.hi.clone()),
        _ => x.lo.clone(),
    });
    let values = values.collect::<Option<Vec<String>>>()?;
    Some(Fragment::Elements(values.into_iter().map(|hi| Part { hi, lo: None }).collect()))
}

/// Which score accumulator holds the weight that entry `(dr, dc)` of an A fragment wants in k
/// block `kk` (keys `k·kk …`): the 8-key block `nb` and its accumulator `e`. A lane's
/// accumulators lie at `(group + r, 2·in_group + c)` of each 8-key block. A 16-bit A element
/// lies at `(group + dr, 2·in_group + dc)`, so key column `dc` of the k block is column
/// `dc mod 8` of block `k·kk / 8 + dc / 8`. A TF32 one lies at `(group + dr, in_group + dc)`:
/// with the keys interleaved (key `i` of each 8 at column `2i`, key `4 + i` at `2i + 1`), key
/// `in_group + dc` is the lane's column `dc / 4` of block `kk`.
fn weight_of(kk: usize, (dr, dc): (usize, usize), frag: &Fragments) -> (usize, usize) {
    let nb = kk * frag.k / MMA_N + dc / MMA_N;
    // Where lanes of a quad lie 2 columns apart in A, as in the accumulators, or 1 apart.
    let column = match frag.lane_k {
        2 => dc % MMA_N,
        _ => dc / 4,
    };
    let e = C_FRAGMENT
        .iter()
        .position(|&c| c == (dr, column))
        .expect("every A fragment element is a score accumulator (see the test)");
    (nb, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::mma::{HALF_FRAGMENTS, TF32_FRAGMENTS};

    /// The scores' accumulators hold every weight the 16-bit value products read, each once
    /// per k block: the register path needs no shared memory.
    #[test]
    fn sixteen_bit_weights_are_score_accumulators() {
        for kk in 0..2 {
            let mut seen = std::collections::HashSet::new();
            for &entry in HALF_FRAGMENTS.a {
                let (nb, e) = weight_of(kk, entry, &HALF_FRAGMENTS);
                assert!(nb == 2 * kk || nb == 2 * kk + 1);
                assert!(seen.insert((nb, e)), "{entry:?}");
            }
            assert_eq!(seen.len(), 8);
        }
    }

    /// With the keys interleaved, each TF32 A element of k block `kk` is the accumulator of
    /// its key: entry `(dr, dc)` of lane `in_group` wants key `in_group + dc` of row `group +
    /// dr`, and the accumulator it gets holds the key at column `2·in_group + c`, which the
    /// interleaving fills with key `in_group` (c = 0) or `in_group + 4` (c = 1).
    #[test]
    fn tf32_weights_are_score_accumulators_with_the_keys_interleaved() {
        let interleaved = |column: usize| column / 2 + 4 * (column % 2);
        for kk in 0..3 {
            for in_group in 0..4 {
                let mut seen = std::collections::HashSet::new();
                for &(dr, dc) in TF32_FRAGMENTS.a {
                    let (nb, e) = weight_of(kk, (dr, dc), &TF32_FRAGMENTS);
                    assert_eq!(nb, kk);
                    let (row, c) = C_FRAGMENT[e];
                    assert_eq!(row, dr);
                    assert_eq!(interleaved(2 * in_group + c), in_group + dc);
                    assert!(seen.insert(e));
                }
                assert_eq!(seen.len(), 4);
            }
        }
    }
}
