//! Fused attention, flash style: `softmax(q·kᵀ·scale + mask) · v` without the `Sq × Sk`
//! score matrix.
//!
//! One iteration of the parallel range is one block of `QB` query rows of one batch index
//! (batch·heads × query blocks, so two threads have work even at batch 1). The block walks the
//! keys in tiles of `KT`, keeping an online softmax per row: the running max `m`, the running
//! sum `l`, and the output accumulator `O` (rescaled by `exp(m_old − m_new)` when the max
//! grows), all in small stack scratch that stays in L1:
//!
//! 1. scores: for each group of `L` keys (`L` = vector lanes) and each row, `L` dot products
//!    accumulate along D in vectors and one transposing shuffle tree sums them into the vector
//!    of `L` scores; scale (folded into q), mask, causal hiding and the tile's end are applied
//!    lane-wise, so hidden scores are −inf;
//! 2. per row: the tile's max, `p = exp(s − m_new)` (exactly 0 for −inf), `l = α·l + Σp`;
//! 3. `O = α·O + p·V`, in register tiles of rows × vectors of Dv, every loaded value row
//!    shared by those rows.
//!
//! Causal blocks stop at their last row's diagonal, so tiles above it are never visited. A row
//! whose scores are all −inf ends with `l = 0` and gives `0/0 = NaN`, as the interpreter does.
//! The last block of rows is completed by repeating the last row (same values written twice),
//! so every block has the same shape.

use super::norm::{close_range, for_close, for_open, func_text, load, offsets, open_range, reduce, store};
use super::norm::{Combine, ComputeType, Count, Operand, Part};
use super::View;
use crate::mlir_text::{bool_type_like, Body};
use crate::{CodegenError, Kernel, Target};

/// Query rows per block; every key and value row loaded is used by all of them.
const QUERY_BLOCK: usize = 8;
/// Keys per tile: the scores of a block for one tile are `QUERY_BLOCK × KEY_TILE` in scratch.
const KEY_TILE: usize = 128;
/// Rows of the `p·V` register tile.
const PV_ROWS: usize = 4;

/// `out = softmax(q·kᵀ·scale + mask, causal) · v` over views `q [B…, Sq, D]`, `k [B…, Sk, D]`,
/// `v [B…, Sk, Dv]`, `mask [B…, Sq, Sk]` (broadcast axes stride 0), `out [B…, Sq, Dv]`.
/// Arguments, in order: q, k, v, (mask), out.
#[allow(clippy::too_many_arguments)]
pub fn emit(
    symbol: &str,
    q: &View,
    k: &View,
    v: &View,
    mask: Option<&View>,
    scale: f64,
    causal: bool,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let mut views = vec![q, k, v];
    views.extend(mask);
    views.push(out);
    let ct = ComputeType::of(&views, target, "attention")?;
    let shape = Shape::of(q, k, v, mask, out)?;
    let Shape { batch, sq, d, sk, dv } = shape.clone();
    let nb: usize = batch.iter().product();
    if sk == 0 && nb * sq * dv > 0 {
        return Err(CodegenError::Unsupported("attention over zero keys (an empty softmax)".into()));
    }
    let lanes = ct.lanes;
    let qb = if sq >= QUERY_BLOCK { QUERY_BLOCK } else { sq.max(1) };
    let nqb = sq.div_ceil(qb);
    let range = if nb * sq * dv == 0 { 0 } else { nb * nqb };
    let plan = Plan {
        qb,
        kt: KEY_TILE.min(sk.div_ceil(lanes) * lanes).max(lanes),
        nc: d.div_ceil(lanes),
        nv: dv.div_ceil(lanes),
        pv_rows: if qb.is_multiple_of(PV_ROWS) { PV_ROWS } else { qb },
        lanes,
    };
    let mut ops = vec![Operand::new("%q", q), Operand::new("%k", k), Operand::new("%v", v)];
    if let Some(m) = mask {
        ops.push(Operand::new("%mask", m));
    }
    ops.push(Operand::new("%out", out));
    let mut b = Body::new();
    body(&mut b, &ct, &ops, &shape, &plan, scale, causal, nqb);
    // Scored pairs (i, j): all of them, or those on or below the diagonal.
    let pairs: u64 = if causal {
        (0..sq).map(|i| (i + 1).min(sk) as u64).sum::<u64>() * nb as u64
    } else {
        (nb * sq * sk) as u64
    };
    let flops = pairs * 2 * (d + dv) as u64 + pairs * 24;
    let distinct = |o: &Operand| {
        o.shape.iter().zip(&o.strides).map(|(&n, &s)| if s == 0 { 1 } else { n }).product::<usize>() as u64
    };
    let bytes = ops.iter().map(distinct).sum::<u64>() * ct.size;
    Ok(Kernel {
        symbol: symbol.into(),
        mlir: func_text(symbol, &ops, b),
        range,
        grain: Kernel::grain_for(range, flops),
        flops,
        bytes,
    })
}

/// The extents of an attention, checked across its operands.
#[derive(Clone, Debug)]
struct Shape {
    batch: Vec<usize>,
    sq: usize,
    d: usize,
    sk: usize,
    dv: usize,
}

impl Shape {
    fn of(q: &View, k: &View, v: &View, mask: Option<&View>, out: &View) -> Result<Shape, CodegenError> {
        let r = q.rank();
        let bad = || {
            CodegenError::Unsupported(format!(
                "attention of q {:?}, k {:?}, v {:?}, mask {:?} into {:?}",
                q.shape,
                k.shape,
                v.shape,
                mask.map(|m| &m.shape),
                out.shape
            ))
        };
        if r < 2 || [k, v, out].iter().any(|x| x.rank() != r) || mask.is_some_and(|m| m.rank() != r) {
            return Err(bad());
        }
        let batch = q.shape[..r - 2].to_vec();
        let (sq, d, sk, dv) = (q.shape[r - 2], q.shape[r - 1], k.shape[r - 2], v.shape[r - 1]);
        let fits = |x: &View, want: &[usize]| x.shape[..r - 2] == batch[..] && x.shape[r - 2..] == *want;
        let mask_fits = |m: &View| {
            let mut want = batch.clone();
            want.extend([sq, sk]);
            m.shape.iter().zip(&want).all(|(&a, &w)| a == w || a == 1)
        };
        if !fits(k, &[sk, d]) || !fits(v, &[sk, dv]) || !fits(out, &[sq, dv]) || !mask.is_none_or(mask_fits) {
            return Err(bad());
        }
        Ok(Shape { batch, sq, d, sk, dv })
    }
}

/// Block and tile sizes.
struct Plan {
    /// Query rows per block.
    qb: usize,
    /// Keys per tile (a multiple of `lanes`).
    kt: usize,
    /// Vectors along D.
    nc: usize,
    /// Vectors along Dv.
    nv: usize,
    /// Rows of the `p·V` register tile (divides `qb`).
    pv_rows: usize,
    lanes: usize,
}

/// A `memref.alloca` scratch operand of `len` elements.
fn scratch(b: &mut Body, name: &str, len: usize, elem: &str) -> Operand {
    let memref = format!("memref<{}x{elem}>", len.max(1));
    b.line(format!("{name} = memref.alloca() {{alignment = 64 : i64}} : {memref}"));
    Operand { name: name.into(), memref, shape: vec![len], strides: vec![1], offset: 0 }
}

fn ix(b: &mut Body, op: &str, x: &str, y: &str) -> String {
    b.assign(format!("arith.{op} {x}, {y} : index"))
}

/// `x + c` for a constant `c`.
fn ix_add(b: &mut Body, x: &str, c: usize) -> String {
    if c == 0 {
        return x.to_string();
    }
    let c = b.index(c);
    ix(b, "addi", x, &c)
}

/// `x · c` for a constant `c`.
fn ix_mul(b: &mut Body, x: &str, c: usize) -> String {
    match c {
        0 => b.index(0),
        1 => x.to_string(),
        _ => {
            let c = b.index(c);
            ix(b, "muli", x, &c)
        }
    }
}

/// The partial-vector mask of chunk `c` along an axis of `n` elements (None when whole).
fn chunk_part(b: &mut Body, c: usize, n: usize, lanes: usize) -> Option<(String, usize)> {
    let valid = n - c * lanes;
    (valid < lanes).then(|| {
        let m = b.assign(format!("vector.constant_mask [{valid}] : vector<{lanes}xi1>"));
        (m, valid)
    })
}

/// Sums each of `accs` (`lanes` vectors) into lane `j` of one vector: a tree of shuffles that
/// adds neighbouring lanes of pairs, doubling the width each level.
fn transpose_sum(b: &mut Body, accs: Vec<String>, vty: &str, lanes: usize) -> String {
    let mut cur = accs;
    let mut w = 1;
    while cur.len() > 1 {
        let mut next = Vec::with_capacity(cur.len() / 2);
        let pick = |shift: usize| -> String {
            (0..lanes)
                .map(|p| {
                    let (blk, within) = (p / (2 * w) * 2 * w, p % (2 * w));
                    let lane = if within < w { blk + within } else { lanes + blk + within - w };
                    (lane + shift).to_string()
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (lo, hi) = (pick(0), pick(w));
        for pair in cur.chunks(2) {
            let (x, y) = (&pair[0], &pair[1]);
            let a = b.assign(format!("vector.shuffle {x}, {y} [{lo}] : {vty}, {vty}"));
            let c = b.assign(format!("vector.shuffle {x}, {y} [{hi}] : {vty}, {vty}"));
            next.push(b.fadd(&a, &c, vty));
        }
        cur = next;
        w *= 2;
    }
    cur.pop().unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn body(
    b: &mut Body,
    ct: &ComputeType,
    ops: &[Operand],
    shape: &Shape,
    plan: &Plan,
    scale: f64,
    causal: bool,
    nqb: usize,
) {
    let (vty, ety, lanes) = (ct.vty.as_str(), ct.elem, plan.lanes);
    let Plan { qb, kt: ktile, nc, nv, pv_rows, .. } = *plan;
    let (q, k, v, out) = (&ops[0], &ops[1], &ops[2], &ops[ops.len() - 1]);
    let mask = (ops.len() == 5).then(|| &ops[3]);
    let r = q.rank();
    let (sq, d, sk, dv) = (shape.sq, shape.d, shape.sk, shape.dv);
    let (qs, qd) = (q.strides[r - 2], q.strides[r - 1]);
    let (ks, kd) = (k.strides[r - 2], k.strides[r - 1]);
    let (vs, vd) = (v.strides[r - 2], v.strides[r - 1]);
    let (os, od) = (out.strides[r - 2], out.strides[r - 1]);
    let (msq, msk) = mask.map(|m| (m.strides[r - 2], m.strides[r - 1])).unwrap_or((0, 0));

    let s_buf = scratch(b, "%S", qb * ktile, ety);
    let q_buf = scratch(b, "%Q", qb * nc * lanes, ety);
    let o_buf = scratch(b, "%O", qb * nv * lanes, ety);
    let m_buf = scratch(b, "%M", qb, ety);
    let l_buf = scratch(b, "%L", qb, ety);
    let a_buf = scratch(b, "%A", qb, ety);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let zero_v = b.float(0.0, vty);
    let ninf_v = b.float(f64::NEG_INFINITY, vty);
    let zero_s = b.float(0.0, ety);
    let ninf_s = b.float(f64::NEG_INFINITY, ety);
    let scale_v = b.float(scale, vty);

    let it = open_range(b);
    // Batch offsets of every operand, and the block number (the last "axis").
    let mut dims = shape.batch.clone();
    dims.push(nqb);
    let with_block = |o: &Operand| -> Operand {
        let mut strides = o.strides[..r - 2].to_vec();
        strides.push(0);
        Operand { strides, ..o.clone() }
    };
    let bops: Vec<Operand> = ops.iter().map(with_block).collect();
    let brefs: Vec<&Operand> = bops.iter().collect();
    let offs = offsets(b, &it, &dims, &brefs);
    let (qbase, kbase, vbase, obase) = (
        offs.offsets[0].clone(),
        offs.offsets[1].clone(),
        offs.offsets[2].clone(),
        offs.offsets[ops.len() - 1].clone(),
    );
    let mbase = mask.map(|_| offs.offsets[3].clone());
    let blk = offs.indices.last().cloned().unwrap_or_default();
    let row0 = ix_mul(b, &blk, qb);
    let sq_last = b.index(sq.saturating_sub(1));
    // The clamped query row of block row `rr` (an index value).
    let row_of = |b: &mut Body, rr: &str| -> String {
        let i = ix(b, "addi", &row0, rr);
        ix(b, "minui", &i, &sq_last)
    };
    let last_row = {
        let rr = b.index(qb - 1);
        row_of(b, &rr)
    };
    let sk_c = b.index(sk);
    let kend = if causal {
        let e = ix_add(b, &last_row, 1);
        ix(b, "minui", &e, &sk_c)
    } else {
        sk_c.clone()
    };

    // Block start: q rows (scaled) into scratch, O = 0, m = −inf, l = 0.
    let d_parts: Vec<Option<(String, usize)>> = (0..nc).map(|c| chunk_part(b, c, d, lanes)).collect();
    let v_parts: Vec<Option<(String, usize)>> = (0..nv).map(|c| chunk_part(b, c, dv, lanes)).collect();
    {
        let qbc = b.index(qb);
        let (rr, _, _) = for_open(b, &c0, &qbc, &c1, &[]);
        let i = row_of(b, &rr);
        let qrow = ix_mul(b, &i, qs);
        let qrow = ix(b, "addi", &qbase, &qrow);
        for (c, p) in d_parts.iter().enumerate() {
            let at = ix_add(b, &qrow, c * lanes * qd);
            let part = p.as_ref().map(|(m, n)| Part { mask: m, count: Count::Static(*n) });
            let x = load(b, q, &at, qd, vty, part.as_ref(), 0.0);
            let x = b.fmul(&x, &scale_v, vty);
            let slot = ix_mul(b, &rr, nc * lanes);
            let slot = ix_add(b, &slot, c * lanes);
            store(b, &x, &q_buf, &slot, 1, vty, None);
        }
        for c in 0..nv {
            let slot = ix_mul(b, &rr, nv * lanes);
            let slot = ix_add(b, &slot, c * lanes);
            store(b, &zero_v, &o_buf, &slot, 1, vty, None);
        }
        b.line(format!("memref.store {ninf_s}, {}[{rr}] : {}", m_buf.name, m_buf.memref));
        b.line(format!("memref.store {zero_s}, {}[{rr}] : {}", l_buf.name, l_buf.memref));
        for_close(b, &[], &[]);
    }

    let ktc = b.index(ktile);
    let lanes_c = b.index(lanes);
    let qbc = b.index(qb);
    let (j0, _, _) = for_open(b, &c0, &kend, &ktc, &[]);
    let left = ix(b, "subi", &kend, &j0);
    let kt = ix(b, "minui", &left, &ktc);

    // 1. Scores of each group of `lanes` keys, for every row of the block.
    {
        let (g, _, _) = for_open(b, &c0, &kt, &lanes_c, &[]);
        let jabs = ix(b, "addi", &j0, &g);
        let sk_last = b.index(sk - 1);
        let krows: Vec<String> = (0..lanes)
            .map(|t| {
                let j = ix_add(b, &jabs, t);
                let j = ix(b, "minui", &j, &sk_last);
                let off = ix_mul(b, &j, ks);
                ix(b, "addi", &kbase, &off)
            })
            .collect();
        let (rr, _, _) = for_open(b, &c0, &qbc, &c1, &[]);
        let i = row_of(b, &rr);
        let rend = if causal {
            let e = ix_add(b, &i, 1);
            ix(b, "minui", &e, &kend)
        } else {
            kend.clone()
        };
        let count = ix(b, "subi", &rend, &jabs);
        let valid = b.assign(format!("vector.create_mask {count} : {}", bool_type_like(vty)));
        let qslot = ix_mul(b, &rr, nc * lanes);
        let qv: Vec<String> = (0..nc)
            .map(|c| {
                let at = ix_add(b, &qslot, c * lanes);
                load(b, &q_buf, &at, 1, vty, None, 0.0)
            })
            .collect();
        let mut accs = Vec::with_capacity(lanes);
        for krow in &krows {
            let mut acc = zero_v.clone();
            for (c, p) in d_parts.iter().enumerate() {
                let at = ix_add(b, krow, c * lanes * kd);
                let part = p.as_ref().map(|(m, n)| Part { mask: m, count: Count::Static(*n) });
                let kx = load(b, k, &at, kd, vty, part.as_ref(), 0.0);
                acc = b.fma(&qv[c], &kx, &acc, vty);
            }
            accs.push(acc);
        }
        let mut s = transpose_sum(b, accs, vty, lanes);
        if let (Some(m), Some(mbase)) = (mask, &mbase) {
            let mrow = ix_mul(b, &i, msq);
            let mrow = ix(b, "addi", mbase, &mrow);
            let moff = ix_mul(b, &jabs, msk);
            let at = ix(b, "addi", &mrow, &moff);
            let part = Part { mask: &valid, count: Count::Dynamic(&count) };
            let mv = load(b, m, &at, msk, vty, Some(&part), 0.0);
            s = b.fadd(&s, &mv, vty);
        }
        let s = b.select(&valid, &s, &ninf_v, vty);
        let slot = ix_mul(b, &rr, ktile);
        let slot = ix(b, "addi", &slot, &g);
        store(b, &s, &s_buf, &slot, 1, vty, None);
        for_close(b, &[], &[]);
        for_close(b, &[], &[]);
    }

    // 2. Online softmax update per row: m, l, α, and p = exp(s − m) in place of s.
    {
        let (rr, _, _) = for_open(b, &c0, &qbc, &c1, &[]);
        let srow = ix_mul(b, &rr, ktile);
        let inits = [(ninf_v.clone(), vty.to_string())];
        let (g, acc, res) = for_open(b, &c0, &kt, &lanes_c, &inits);
        let at = ix(b, "addi", &srow, &g);
        let s = load(b, &s_buf, &at, 1, vty, None, 0.0);
        let mx = b.fmax(&acc[0], &s, vty);
        for_close(b, &[mx], &inits);
        let mt = reduce(b, Combine::Max, &res[0], vty);
        let m_old = b.assign(format!("memref.load {}[{rr}] : {}", m_buf.name, m_buf.memref));
        let m_new = b.fmax(&m_old, &mt, ety);
        let none = b.fcmp("oeq", &m_new, &ninf_s, ety);
        let dm = b.fsub(&m_old, &m_new, ety);
        let alpha = b.exp(&dm, ety);
        let alpha = b.select(&none, &zero_s, &alpha, ety);
        let mns = b.splat(&m_new, vty);
        let inits = [(zero_v.clone(), vty.to_string())];
        let (g, acc, res) = for_open(b, &c0, &kt, &lanes_c, &inits);
        let at = ix(b, "addi", &srow, &g);
        let s = load(b, &s_buf, &at, 1, vty, None, 0.0);
        let x = b.fsub(&s, &mns, vty);
        let e = b.exp(&x, vty);
        let hidden = b.fcmp("oeq", &s, &ninf_v, vty);
        let e = b.select(&hidden, &zero_v, &e, vty);
        store(b, &e, &s_buf, &at, 1, vty, None);
        let sum = b.fadd(&acc[0], &e, vty);
        for_close(b, &[sum], &inits);
        let sum = reduce(b, Combine::Add, &res[0], vty);
        let l_old = b.assign(format!("memref.load {}[{rr}] : {}", l_buf.name, l_buf.memref));
        let l_new = b.fma(&l_old, &alpha, &sum, ety);
        b.line(format!("memref.store {m_new}, {}[{rr}] : {}", m_buf.name, m_buf.memref));
        b.line(format!("memref.store {l_new}, {}[{rr}] : {}", l_buf.name, l_buf.memref));
        b.line(format!("memref.store {alpha}, {}[{rr}] : {}", a_buf.name, a_buf.memref));
        for_close(b, &[], &[]);
    }

    // 3. O = α·O + p·V in register tiles of `pv_rows` rows × a few vectors of Dv.
    {
        let group = (8 / pv_rows).max(1);
        let pvc = b.index(pv_rows);
        let (rb, _, _) = for_open(b, &c0, &qbc, &pvc, &[]);
        let rows: Vec<String> = (0..pv_rows).map(|t| ix_add(b, &rb, t)).collect();
        let alphas: Vec<String> = rows
            .iter()
            .map(|rr| {
                let a = b.assign(format!("memref.load {}[{rr}] : {}", a_buf.name, a_buf.memref));
                b.splat(&a, vty)
            })
            .collect();
        let srows: Vec<String> = rows.iter().map(|rr| ix_mul(b, rr, ktile)).collect();
        let orows: Vec<String> = rows.iter().map(|rr| ix_mul(b, rr, nv * lanes)).collect();
        for c_lo in (0..nv).step_by(group) {
            let cs: Vec<usize> = (c_lo..(c_lo + group).min(nv)).collect();
            let mut inits = Vec::new();
            for (t, orow) in orows.iter().enumerate() {
                for &c in &cs {
                    let at = ix_add(b, orow, c * lanes);
                    let o = load(b, &o_buf, &at, 1, vty, None, 0.0);
                    inits.push((b.fmul(&o, &alphas[t], vty), vty.to_string()));
                }
            }
            let (j, acc, res) = for_open(b, &c0, &kt, &c1, &inits);
            let jabs = ix(b, "addi", &j0, &j);
            let voff = ix_mul(b, &jabs, vs);
            let vrow = ix(b, "addi", &vbase, &voff);
            let vx: Vec<String> = cs
                .iter()
                .map(|&c| {
                    let at = ix_add(b, &vrow, c * lanes * vd);
                    let part = v_parts[c].as_ref().map(|(m, n)| Part { mask: m, count: Count::Static(*n) });
                    load(b, v, &at, vd, vty, part.as_ref(), 0.0)
                })
                .collect();
            let mut outs = Vec::new();
            for (t, srow) in srows.iter().enumerate() {
                let at = ix(b, "addi", srow, &j);
                let p = b.assign(format!("memref.load {}[{at}] : {}", s_buf.name, s_buf.memref));
                let p = b.splat(&p, vty);
                for (u, x) in vx.iter().enumerate() {
                    outs.push(b.fma(&p, x, &acc[t * cs.len() + u], vty));
                }
            }
            for_close(b, &outs, &inits);
            for (t, orow) in orows.iter().enumerate() {
                for (u, &c) in cs.iter().enumerate() {
                    let at = ix_add(b, orow, c * lanes);
                    store(b, &res[t * cs.len() + u], &o_buf, &at, 1, vty, None);
                }
            }
        }
        for_close(b, &[], &[]);
    }
    for_close(b, &[], &[]);

    // out = O / l, into the (possibly strided) output rows.
    {
        let (rr, _, _) = for_open(b, &c0, &qbc, &c1, &[]);
        let i = row_of(b, &rr);
        let orow = ix_mul(b, &i, os);
        let orow = ix(b, "addi", &obase, &orow);
        let l = b.assign(format!("memref.load {}[{rr}] : {}", l_buf.name, l_buf.memref));
        let one = b.float(1.0, ety);
        let inv = b.fdiv(&one, &l, ety);
        let inv = b.splat(&inv, vty);
        let slot0 = ix_mul(b, &rr, nv * lanes);
        for (c, p) in v_parts.iter().enumerate() {
            let at = ix_add(b, &slot0, c * lanes);
            let o = load(b, &o_buf, &at, 1, vty, None, 0.0);
            let y = b.fmul(&o, &inv, vty);
            let at = ix_add(b, &orow, c * lanes * od);
            let part = p.as_ref().map(|(m, n)| Part { mask: m, count: Count::Static(*n) });
            store(b, &y, out, &at, od, vty, part.as_ref());
        }
        for_close(b, &[], &[]);
    }
    close_range(b);
}
