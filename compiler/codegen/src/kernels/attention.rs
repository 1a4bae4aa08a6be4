//! Fused attention, flash style: `softmax(q·kᵀ·scale + mask) · v` without the `Sq × Sk`
//! score matrix.
//!
//! One iteration of the parallel range is one block of query rows (one or two vectors of them,
//! the rows in lanes) of one batch index (batch·heads × query blocks, so two threads have work
//! even at batch 1). The block walks the keys in tiles of about `KEY_TILE`, keeping an online
//! softmax per row: the running max `m`, the running sum `l`, and the output accumulator `O`
//! (rescaled by `exp(m_old − m_new)` when the max grows), all in small stack scratch that stays
//! in L1. The block's q rows are kept transposed (`Q[d][row]`, scale folded in), and the
//! scores key-major (`S[j][row]`), so every step is vertical, without horizontal reductions:
//!
//! 1. scores: a register tile of a few keys × the block's row vectors accumulates along D,
//!    each step one broadcast `k[j][d]` times the vector `Q[d][rows]`; mask, causal hiding and
//!    the tile's end are applied lane-wise (hidden scores are −inf), and the tile's max per row
//!    is taken on the way;
//! 2. per row vector: `m_new`, `α`, `p = exp(s − m_new)` (exactly 0 for −inf), `l = α·l + Σp`;
//! 3. `O = α·O + p·V`, in register tiles of rows × vectors of Dv, every loaded value row
//!    shared by those rows.
//!
//! Causal blocks stop at their last row's diagonal, so tiles above it are never visited. A row
//! whose scores are all −inf ends with `l = 0` and gives `0/0 = NaN`, as the interpreter does.
//! The last block of rows is completed by repeating the last row (same values written twice),
//! so every block has the same shape.

use super::norm::{close_range, for_close, for_open, func_text, load, offsets, open_range, store};
use super::norm::{ComputeType, Count, Operand, Part};
use super::View;
use crate::mlir_text::{bool_type_like, Body};
use crate::{CodegenError, Kernel, Target};

/// Vectors of query rows per block (when there are enough rows); every key and value row
/// loaded is used by all of the block's rows.
const ROW_VECTORS: usize = 2;
/// Keys per tile (about): the scores of a block for one tile are `rows × KEY_TILE` in scratch.
const KEY_TILE: usize = 128;
/// Accumulators of the score register tile (row vectors × keys).
const SCORE_ACCS: usize = 12;
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
    let rv = if sq > lanes { ROW_VECTORS } else { 1 };
    let qb = rv * lanes;
    let nqb = sq.div_ceil(qb);
    let range = if nb * sq * dv == 0 { 0 } else { nb * nqb };
    let ks = (SCORE_ACCS / rv).max(1);
    let plan = Plan {
        qb,
        kt: (KEY_TILE / ks * ks).min(sk.div_ceil(ks) * ks).max(ks),
        ks,
        rv,
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
    /// Keys per tile (a multiple of `ks`).
    kt: usize,
    /// Keys per score register tile.
    ks: usize,
    /// Vectors of rows per block (`qb = rv · lanes`).
    rv: usize,
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
    let Plan { qb, kt: ktile, ks: kstep, rv, nv, pv_rows, .. } = *plan;
    let (q, k, v, out) = (&ops[0], &ops[1], &ops[2], &ops[ops.len() - 1]);
    let mask = (ops.len() == 5).then(|| &ops[3]);
    let r = q.rank();
    let (sq, d, sk, dv) = (shape.sq, shape.d, shape.sk, shape.dv);
    let (qs, qd) = (q.strides[r - 2], q.strides[r - 1]);
    let (ks, kd) = (k.strides[r - 2], k.strides[r - 1]);
    let (vs, vd) = (v.strides[r - 2], v.strides[r - 1]);
    let (os, od) = (out.strides[r - 2], out.strides[r - 1]);
    let (msq, msk) = mask.map(|m| (m.strides[r - 2], m.strides[r - 1])).unwrap_or((0, 0));
    let ity = format!("vector<{lanes}xi32>");
    let bty = bool_type_like(vty);

    // Scores and probabilities key-major (`S[j][row]`), q transposed (`Q[d][row]`).
    let s_buf = scratch(b, "%S", ktile * qb, ety);
    let q_buf = scratch(b, "%Q", d * qb, ety);
    let o_buf = scratch(b, "%O", qb * nv * lanes, ety);
    let m_buf = scratch(b, "%M", qb, ety);
    let l_buf = scratch(b, "%L", qb, ety);
    let a_buf = scratch(b, "%A", qb, ety);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let zero_v = b.float(0.0, vty);
    let ninf_v = b.float(f64::NEG_INFINITY, vty);
    let scale_s = b.float(scale, ety);

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
    let sk_last = b.index(sk.saturating_sub(1));
    let kend = if causal {
        let e = ix_add(b, &last_row, 1);
        ix(b, "minui", &e, &sk_c)
    } else {
        sk_c.clone()
    };
    // The clamped rows of each row vector, as i32 lanes (for the causal test).
    let rowv: Vec<String> = if causal {
        let r0 = b.assign(format!("arith.index_cast {row0} : index to i32"));
        let r0 = b.assign(format!("vector.broadcast {r0} : i32 to {ity}"));
        let lastv = b.assign(format!("arith.constant dense<{}> : {ity}", sq.saturating_sub(1)));
        (0..rv)
            .map(|u| {
                let iota: Vec<String> = (u * lanes..(u + 1) * lanes).map(|x| x.to_string()).collect();
                let iota = b.assign(format!("arith.constant dense<[{}]> : {ity}", iota.join(", ")));
                let x = b.assign(format!("arith.addi {r0}, {iota} : {ity}"));
                b.assign(format!("arith.minsi {x}, {lastv} : {ity}"))
            })
            .collect()
    } else {
        Vec::new()
    };
    // Mask row offsets of each lane of each row vector (when the mask varies along rows).
    let mrows: Vec<Vec<String>> = match &mbase {
        Some(mb) if msq != 0 => (0..rv)
            .map(|u| {
                (0..lanes)
                    .map(|t| {
                        let rr = b.index(u * lanes + t);
                        let i = row_of(b, &rr);
                        let off = ix_mul(b, &i, msq);
                        ix(b, "addi", mb, &off)
                    })
                    .collect()
            })
            .collect(),
        _ => Vec::new(),
    };

    // Block start: q rows (scaled, transposed) into scratch, O = 0, m = −inf, l = 0.
    let v_parts: Vec<Option<(String, usize)>> = (0..nv).map(|c| chunk_part(b, c, dv, lanes)).collect();
    let qbc = b.index(qb);
    let dc = b.index(d);
    {
        let (rr, _, _) = for_open(b, &c0, &qbc, &c1, &[]);
        let i = row_of(b, &rr);
        let qrow = ix_mul(b, &i, qs);
        let qrow = ix(b, "addi", &qbase, &qrow);
        for c in 0..nv {
            let slot = ix_mul(b, &rr, nv * lanes);
            let slot = ix_add(b, &slot, c * lanes);
            store(b, &zero_v, &o_buf, &slot, 1, vty, None);
        }
        let (dd, _, _) = for_open(b, &c0, &dc, &c1, &[]);
        let off = ix_mul(b, &dd, qd);
        let at = ix(b, "addi", &qrow, &off);
        let x = b.assign(format!("memref.load {}[{at}] : {}", q.name, q.memref));
        let x = b.fmul(&x, &scale_s, ety);
        let slot = ix_mul(b, &dd, qb);
        let slot = ix(b, "addi", &slot, &rr);
        b.line(format!("memref.store {x}, {}[{slot}] : {}", q_buf.name, q_buf.memref));
        for_close(b, &[], &[]);
        for_close(b, &[], &[]);
        for u in 0..rv {
            let at = b.index(u * lanes);
            store(b, &ninf_v, &m_buf, &at, 1, vty, None);
            store(b, &zero_v, &l_buf, &at, 1, vty, None);
        }
    }

    let ktc = b.index(ktile);
    let ksc = b.index(kstep);
    let (j0, _, _) = for_open(b, &c0, &kend, &ktc, &[]);
    let left = ix(b, "subi", &kend, &j0);
    let kt = ix(b, "minui", &left, &ktc);

    // 1. Scores of `kstep` keys × the block's rows at a time: broadcast k[j][d] times the
    //    vector of q[rows][d], accumulated along D in registers; the tile's max fused in.
    let tile_max = {
        let inits: Vec<(String, String)> = (0..rv).map(|_| (ninf_v.clone(), vty.to_string())).collect();
        let (g, mx, mres) = for_open(b, &c0, &kt, &ksc, &inits);
        let jbase = ix(b, "addi", &j0, &g);
        let jabs: Vec<String> = (0..kstep).map(|t| ix_add(b, &jbase, t)).collect();
        let jcl: Vec<String> = jabs.iter().map(|j| ix(b, "minui", j, &sk_last)).collect();
        let krows: Vec<String> = jcl
            .iter()
            .map(|j| {
                let off = ix_mul(b, j, ks);
                ix(b, "addi", &kbase, &off)
            })
            .collect();
        let ainits: Vec<(String, String)> =
            (0..rv * kstep).map(|_| (zero_v.clone(), vty.to_string())).collect();
        let (dd, acc, res) = for_open(b, &c0, &dc, &c1, &ainits);
        let qslot = ix_mul(b, &dd, qb);
        let qv: Vec<String> = (0..rv)
            .map(|u| {
                let at = ix_add(b, &qslot, u * lanes);
                load(b, &q_buf, &at, 1, vty, None, 0.0)
            })
            .collect();
        let koff = ix_mul(b, &dd, kd);
        let mut outs = Vec::with_capacity(rv * kstep);
        for (t, krow) in krows.iter().enumerate() {
            let at = ix(b, "addi", krow, &koff);
            let kx = b.assign(format!("memref.load {}[{at}] : {}", k.name, k.memref));
            let kx = b.splat(&kx, vty);
            for (u, qx) in qv.iter().enumerate() {
                outs.push(b.fma(qx, &kx, &acc[t * rv + u], vty));
            }
        }
        for_close(b, &outs, &ainits);
        let mut newmx = mx.clone();
        for t in 0..kstep {
            let inb = b.assign(format!("arith.cmpi ult, {}, {kend} : index", jabs[t]));
            let inb = b.assign(format!("vector.broadcast {inb} : i1 to {bty}"));
            let jv = causal.then(|| {
                let ji = b.assign(format!("arith.index_cast {} : index to i32", jabs[t]));
                b.assign(format!("vector.broadcast {ji} : i32 to {ity}"))
            });
            let moff = mask.map(|_| ix_mul(b, &jcl[t], msk));
            let srow = ix_add(b, &g, t);
            let srow = ix_mul(b, &srow, qb);
            for u in 0..rv {
                let mut s = res[t * rv + u].clone();
                if let (Some(m), Some(mb), Some(moff)) = (mask, &mbase, &moff) {
                    let mv = if msq == 0 {
                        let at = ix(b, "addi", mb, moff);
                        load(b, m, &at, 0, vty, None, 0.0)
                    } else {
                        let elems: Vec<String> = mrows[u]
                            .iter()
                            .map(|mr| {
                                let at = ix(b, "addi", mr, moff);
                                b.assign(format!("memref.load {}[{at}] : {}", m.name, m.memref))
                            })
                            .collect();
                        b.assign(format!("vector.from_elements {} : {vty}", elems.join(", ")))
                    };
                    s = b.fadd(&s, &mv, vty);
                }
                s = b.select(&inb, &s, &ninf_v, vty);
                if let Some(jv) = &jv {
                    let c = b.assign(format!("arith.cmpi sle, {jv}, {} : {ity}", rowv[u]));
                    s = b.select(&c, &s, &ninf_v, vty);
                }
                let at = ix_add(b, &srow, u * lanes);
                store(b, &s, &s_buf, &at, 1, vty, None);
                newmx[u] = b.fmax(&newmx[u], &s, vty);
            }
        }
        for_close(b, &newmx, &inits);
        mres
    };

    // 2. Online softmax update, rows in lanes: m, l, α, and p = exp(s − m) in place of s.
    {
        let mut m_new = Vec::with_capacity(rv);
        let mut alphas = Vec::with_capacity(rv);
        for (u, mt) in tile_max.iter().enumerate() {
            let at = b.index(u * lanes);
            let m_old = load(b, &m_buf, &at, 1, vty, None, 0.0);
            let mn = b.fmax(&m_old, mt, vty);
            let none = b.fcmp("oeq", &mn, &ninf_v, vty);
            let dm = b.fsub(&m_old, &mn, vty);
            let alpha = b.exp(&dm, vty);
            let alpha = b.select(&none, &zero_v, &alpha, vty);
            store(b, &mn, &m_buf, &at, 1, vty, None);
            store(b, &alpha, &a_buf, &at, 1, vty, None);
            m_new.push(mn);
            alphas.push(alpha);
        }
        let inits: Vec<(String, String)> = (0..rv).map(|_| (zero_v.clone(), vty.to_string())).collect();
        let (j, acc, res) = for_open(b, &c0, &kt, &c1, &inits);
        let srow = ix_mul(b, &j, qb);
        let mut sums = Vec::with_capacity(rv);
        for u in 0..rv {
            let at = ix_add(b, &srow, u * lanes);
            let s = load(b, &s_buf, &at, 1, vty, None, 0.0);
            let x = b.fsub(&s, &m_new[u], vty);
            let e = b.exp(&x, vty);
            let hidden = b.fcmp("oeq", &s, &ninf_v, vty);
            let e = b.select(&hidden, &zero_v, &e, vty);
            store(b, &e, &s_buf, &at, 1, vty, None);
            sums.push(b.fadd(&acc[u], &e, vty));
        }
        for_close(b, &sums, &inits);
        for u in 0..rv {
            let at = b.index(u * lanes);
            let l_old = load(b, &l_buf, &at, 1, vty, None, 0.0);
            let l_new = b.fma(&l_old, &alphas[u], &res[u], vty);
            store(b, &l_new, &l_buf, &at, 1, vty, None);
        }
    }

    // 3. O = α·O + p·V in register tiles of `pv_rows` rows × a few vectors of Dv.
    {
        let group = (12 / pv_rows).max(1);
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
            let prow = ix_mul(b, &j, qb);
            let mut outs = Vec::new();
            for (t, rr) in rows.iter().enumerate() {
                let at = ix(b, "addi", &prow, rr);
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
