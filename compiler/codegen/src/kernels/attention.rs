//! Fused attention, flash style: `softmax(q·kᵀ·scale + mask) · v` without the `Sq × Sk`
//! score matrix.
//!
//! Query rows sit in vector lanes throughout, so every step is vertical, without horizontal
//! reductions. A block is `rv` vectors of rows (three, or two when three would pad a short
//! sequence with many repeated rows); one iteration of the parallel range is a group of blocks
//! of one batch index (batch·heads × groups, so two threads have work even at batch 1). The
//! group is one block unless the keys and values of a batch index overflow a share of L2: then
//! four blocks take turns on each key tile while it is cached, instead of each streaming all
//! keys from L3. Each block keeps, in stack scratch that stays in L1, its q rows transposed
//! (`Q[d][row]`, scale folded in), the online softmax state per row (running max `m`, running
//! sum `l`) and the output accumulator transposed (`O[c][row]`), and walks the keys in tiles of
//! about `KEY_TILE`, the tile's scores key-major (`S[j][row]`).
//!
//! Scores are kept in log₂ units: the q scale carries a factor log₂e and the mask is multiplied
//! by it as it is added, so every exponential is a `2ˣ`, whose range reduction is an add and a
//! subtract where `eˣ`'s takes three FMAs (`softmax(x) = 2^(x·log₂e − max) / Σ`, the same
//! weights). A finite mask stays finite ([`mask_in_log2_units`]).
//!
//! 1. scores: a register tile of a few keys × the block's row vectors accumulates along D, each
//!    step one broadcast `k[j][d]` times the vector `Q[d][rows]`; the mask (and the causal
//!    hiding) is applied lane-wise and the tile's max per row taken on the way. Only the tile's
//!    last, partial group of keys tests for the end of the keys (hidden scores are −inf).
//! 2. per row vector: `m_new`, `α = 2^(m_old − m_new)`, `p = 2^(s − m_new)` in place of `s`,
//!    `l = α·l + Σp`. The `2ˣ` is one for arguments ≤ 0 whose result is exactly 0 for
//!    −inf (and tiny arguments), so hidden keys need no test; a row with every score so far
//!    −inf subtracts 0 instead of `m`, so its `p` and `α` are 0 rather than NaN. A group of
//!    keys per iteration (the last group's keys past the end are −inf scores), so several
//!    independent exps are in flight.
//! 3. `O = α·O + p·V`: the same register tile shape, a few columns of Dv × the block's row
//!    vectors, accumulated over the tile's keys with one broadcast `v[j][c]` times the vector
//!    `p[j][rows]`; each tile of O is loaded (scaled by α) and stored once per key tile.
//!
//! Both products thus load each key and value element once per block and reuse every loaded
//! vector across the tile; the register tile (3 row vectors × 4 keys or columns, 12
//! accumulators) is the largest that fits 16 vector registers with its operands. At the block's
//! start its q rows are transposed, and at its end `O / l` is transposed back, `lanes × lanes`
//! at a time with vector shuffles.
//!
//! When the rows of k or v lie a kilobyte or more apart (a head-split `[B, S, heads·D]`
//! layout), a call first copies the k and v of each batch index it reaches into contiguous
//! heap scratch (once per batch index per call: a call's iterations of one batch index are
//! consecutive), and every block reads them from there.
//!
//! The log-sum-exp of each query row's scores, `m·ln2 + ln l` at the end of the walk (−inf
//! for a row with nothing to see), is stored beside the output when the schedule asks for it
//! (the backward recomputes the probabilities from it), one lane at a time; without v and the
//! output (the statistic alone) Dv is 0, so step 3 and the output rows vanish.
//!
//! Causal blocks stop at their last row's diagonal, so tiles above it are never visited (a
//! causal iteration is one block). A row whose scores are all −inf ends with `l = 0` and gives
//! `0/0 = NaN`, as the interpreter does. The last group of each batch index runs a second
//! plan, blocks of fewer row vectors that cover just the vectors left ([`Plan::tail`]), under
//! an `scf.if` on the group number; a last vector that is partial is completed by repeating
//! the last row (same values written twice). Over run-time lengths ([`emit_run`]) there is no
//! tail plan; instead a run whose query rows are at most [`ROW_VECTORS`] vectors runs one
//! block of exactly its vectors ([`Plan::short`]), chosen under an `scf.if` on the run's
//! vector count.

use super::norm::{
    close_range, for_close, for_open, func_text_with, load, offsets, open_range, store, Offsets,
};
use super::norm::{ComputeType, Count, Operand, Part};
use super::View;
use crate::mlir_text::{bool_type_like, elem_type, Body};
use crate::{CodegenError, Kernel, Target};

/// Vectors of query rows per block (at most): every key and value element loaded is used by
/// all of the block's rows. Three row vectors × four columns is the largest register tile
/// that fits 16 vector registers with its operands, without spills.
const ROW_VECTORS: usize = 3;
/// Relative time per row vector of blocks of 1, 2 and 3 row vectors: three measured ~8 %
/// faster than two per vector, and one vector's tile (1 × 12 keys) 1.4–1.9× slower than three
/// (seq 512 on one thread with and without its twelve tail blocks of one vector).
const VECTOR_COST: [usize; ROW_VECTORS] = [150, 108, 100];
/// Keys per tile (about): the scores of a block for one tile are `rows × KEY_TILE` in scratch.
const KEY_TILE: usize = 128;
/// Bytes of keys and values per batch index that stay cached between blocks (a share of a
/// 512 KiB L2); above it, [`GROUP`] blocks walk the keys together.
const KV_CACHED_BYTES: usize = 256 << 10;
/// Blocks per iteration when the keys and values do not stay cached.
const GROUP: usize = 4;
/// The most stack scratch a group's q and O may take (48 KiB at D = Dv = 64 in f32).
const GROUP_SCRATCH_BYTES: usize = 128 << 10;
/// Accumulators of a register tile (row vectors × keys, or row vectors × columns of Dv).
const TILE_ACCS: usize = 12;

/// `out = softmax(q·kᵀ·scale + mask, causal) · v` over views `q [B…, Sq, D]`, `k [B…, Sk, D]`,
/// `v [B…, Sk, Dv]`, `mask [B…, Sq, Sk]` (broadcast axes stride 0), `out [B…, Sq, Dv]` (`v_out`),
/// and the scores' log-sum-exp into `lse [B…, Sq]`: both, or either alone. Arguments, in
/// order: q, k, (v), (mask), (out), (lse).
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
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let (made, _) = emit_with(symbol, [q, k], v_out, mask, (scale, causal), lse, target, None)?;
    Ok(made)
}

/// Extents of an attention known only at run time (`docs/dynamic-shapes.md`): the views given
/// to [`emit_run`] are at the largest extents, and the kernel reads the run's on entry.
pub struct RunLengths<'a> {
    /// Emits the run's extents and batch offsets at the top of the body.
    pub values: &'a dyn Fn(&mut Body) -> RunValues,
    /// The extra parameter `values` reads (the run's symbol values), before `%begin`.
    pub param: String,
    /// The Sq and Sk the blocks and tiles are planned for (the symbols' hints).
    pub plan: (usize, usize),
}

/// A run's extents as `index` values.
pub struct RunValues {
    pub sq: String,
    pub sk: String,
    /// The extent of each batch axis.
    pub batch: Vec<String>,
    /// For each argument in order (q, k, then v, mask, out, lse as present): its element offset
    /// and the strides of its batch axes.
    pub offsets: Vec<String>,
    pub batch_strides: Vec<Vec<String>>,
}

/// [`emit`] over run-time lengths and batch extents (see [`RunLengths`]): the same blocks and
/// key tiles, planned for the hinted lengths; the last block of each batch index completes
/// its rows by repeating the last one, and the last key tile is as long as the keys left.
/// Returns the kernel (its range at the largest extents) and the query rows one range
/// iteration covers: the run's range is `batch · ⌈Sq / rows⌉`.
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
    target: &dyn Target,
    run: &RunLengths<'_>,
) -> Result<(Kernel, usize), CodegenError> {
    emit_with(symbol, [q, k], v_out, mask, (scale, causal), lse, target, Some(run))
}

#[allow(clippy::too_many_arguments)]
fn emit_with(
    symbol: &str,
    [q, k]: [&View; 2],
    v_out: Option<(&View, &View)>,
    mask: Option<&View>,
    (scale, causal): (f64, bool),
    lse: Option<&View>,
    target: &dyn Target,
    run: Option<&RunLengths<'_>>,
) -> Result<(Kernel, usize), CodegenError> {
    let (v, out) = (v_out.map(|(v, _)| v), v_out.map(|(_, o)| o));
    let mut views = vec![q, k];
    views.extend(v);
    views.extend(mask);
    views.extend(out);
    views.extend(lse);
    let ct = ComputeType::of(&views, target, "attention")?;
    let shape = Shape::of(q, k, v_out, mask, lse)?;
    let Shape { batch, sq, sk, dv, .. } = shape.clone();
    let nb: usize = batch.iter().product();
    let written = nb * sq * (dv + usize::from(lse.is_some()));
    if sk == 0 && written > 0 {
        return Err(CodegenError::Unsupported("attention over zero keys (an empty softmax)".into()));
    }
    let row_bytes = |x: &View| x.strides[x.rank() - 2] * ct.size as usize;
    let pack_kv = pack_kv_policy(row_bytes(k).max(v.map_or(0, row_bytes)));
    let planned = match run {
        None => shape.clone(),
        Some(r) => {
            Shape { sq: r.plan.0.clamp(1, sq.max(1)), sk: r.plan.1.clamp(1, sk.max(1)), ..shape.clone() }
        }
    };
    let plan = Plan::new(&planned, ct.lanes, causal, ct.size as usize, pack_kv);
    let groups_per_batch = sq.div_ceil(plan.qb * plan.group);
    // Over run-time lengths the last group's rows are not known: it repeats its last row.
    let tail = if run.is_some() { None } else { plan.tail(&shape, groups_per_batch) };
    let short = if run.is_some() { plan.short(&planned, sq.div_ceil(plan.lanes)) } else { Vec::new() };
    let range = if written == 0 { 0 } else { nb * groups_per_batch };
    let mut ops = vec![Operand::new("%q", q), Operand::new("%k", k)];
    let slot = |ops: &mut Vec<Operand>, name: &str, x: Option<&View>| {
        x.map(|x| {
            ops.push(Operand::new(name, x));
            ops.len() - 1
        })
    };
    let slots = Slots {
        v: slot(&mut ops, "%v", v),
        mask: slot(&mut ops, "%mask", mask),
        out: slot(&mut ops, "%out", out),
        lse: slot(&mut ops, "%lse", lse),
    };
    let mut b = Body::new();
    let values = run.map(|r| (r.values)(&mut b));
    let extents = match &values {
        None => Extents::Fixed(groups_per_batch),
        Some(v) => Extents::Run(v),
    };
    let plans = Plans { main: &plan, tail: tail.as_ref(), short: &short };
    body(&mut b, &ct, &ops, &slots, &shape, &plans, (scale, causal), &extents);
    // Scored pairs (i, j): all of them, or those on or below the diagonal.
    let pairs: u64 = if causal {
        (0..sq).map(|i| (i + 1).min(sk) as u64).sum::<u64>() * nb as u64
    } else {
        (nb * sq * sk) as u64
    };
    let flops = pairs * 2 * (shape.d + dv) as u64 + pairs * 24;
    let distinct = |o: &Operand| {
        o.shape.iter().zip(&o.strides).map(|(&n, &s)| if s == 0 { 1 } else { n }).product::<usize>() as u64
    };
    let bytes = ops.iter().map(distinct).sum::<u64>() * ct.size;
    let mlir = func_text_with(symbol, &ops, run.map(|r| r.param.as_str()), b);
    let made =
        Kernel { symbol: symbol.into(), mlir, range, grain: Kernel::grain_for(range, flops), flops, bytes };
    Ok((made, plan.qb * plan.group))
}

/// The extents [`body`] walks: static (the groups per batch index), or the run's.
enum Extents<'a> {
    Fixed(usize),
    Run(&'a RunValues),
}

/// The query and key extents a group reads, as `index` values.
struct Lens {
    sq_last: String,
    sk: String,
}

/// Where the optional operands are among a kernel's arguments (q and k are 0 and 1).
struct Slots {
    v: Option<usize>,
    mask: Option<usize>,
    out: Option<usize>,
    lse: Option<usize>,
}

/// The plans a kernel runs: `main` for every group, except the last group of each batch index
/// when there is a `tail`; over run-time lengths, a `short` plan (one block of exactly `rv`
/// row vectors, indexed by `rv − 1`) for a run whose query rows are `rv ≤` [`ROW_VECTORS`]
/// vectors, where `main` would compute more vectors or take more iterations.
struct Plans<'a> {
    main: &'a Plan,
    tail: Option<&'a Plan>,
    short: &'a [Option<Plan>],
}

/// The extents of an attention, checked across its operands (Dv is 0 without v).
#[derive(Clone, Debug)]
struct Shape {
    batch: Vec<usize>,
    sq: usize,
    d: usize,
    sk: usize,
    dv: usize,
}

impl Shape {
    fn of(
        q: &View,
        k: &View,
        v_out: Option<(&View, &View)>,
        mask: Option<&View>,
        lse: Option<&View>,
    ) -> Result<Shape, CodegenError> {
        let r = q.rank();
        let bad = || {
            CodegenError::Unsupported(format!(
                "attention of q {:?}, k {:?}, v {:?}, mask {:?} into {:?} and {:?}",
                q.shape,
                k.shape,
                v_out.map(|(v, _)| &v.shape),
                mask.map(|m| &m.shape),
                v_out.map(|(_, o)| &o.shape),
                lse.map(|l| &l.shape),
            ))
        };
        let wrong_rank = |x: &View| x.rank() != r;
        if r < 2
            || k.rank() != r
            || v_out.is_some_and(|(v, o)| wrong_rank(v) || wrong_rank(o))
            || mask.is_some_and(wrong_rank)
            || lse.is_some_and(|l| l.rank() + 1 != r)
            || (v_out.is_none() && lse.is_none())
        {
            return Err(bad());
        }
        let batch = q.shape[..r - 2].to_vec();
        let (sq, d, sk) = (q.shape[r - 2], q.shape[r - 1], k.shape[r - 2]);
        let dv = v_out.map_or(0, |(v, _)| v.shape[r - 1]);
        let fits = |x: &View, want: &[usize]| x.shape[..r - 2] == batch[..] && x.shape[r - 2..] == *want;
        let mask_fits = |m: &View| {
            let mut want = batch.clone();
            want.extend([sq, sk]);
            m.shape.iter().zip(&want).all(|(&a, &w)| a == w || a == 1)
        };
        let v_out_fits = v_out.is_none_or(|(v, o)| fits(v, &[sk, dv]) && fits(o, &[sq, dv]));
        let lse_fits = lse.is_none_or(|l| l.shape[..r - 2] == batch[..] && l.shape[r - 2] == sq);
        if !fits(k, &[sk, d]) || !v_out_fits || !mask.is_none_or(mask_fits) || !lse_fits {
            return Err(bad());
        }
        Ok(Shape { batch, sq, d, sk, dv })
    }
}

/// Block and tile sizes.
struct Plan {
    /// Query rows per block (`rv · lanes`).
    qb: usize,
    /// Blocks per iteration, taking turns on each key tile while it is in cache.
    group: usize,
    /// Vectors of rows per block.
    rv: usize,
    /// Keys per tile (a multiple of `ks`).
    kt: usize,
    /// Keys per score register tile.
    ks: usize,
    /// Columns of Dv per `p·V` register tile: `(first, count)`, in order.
    pv_cols: Vec<(usize, usize)>,
    lanes: usize,
    /// Whether each call first copies a batch index's k and v into contiguous rows
    /// ([`pack_kv_policy`]).
    pack_kv: bool,
}

impl Plan {
    fn new(shape: &Shape, lanes: usize, causal: bool, elem_size: usize, pack_kv: bool) -> Plan {
        let rv = row_vectors(shape.sq, lanes);
        // Keys and values of one batch index that overflow a quarter MiB (a share of L2) are
        // streamed from further away once per block: a group of blocks streams them once.
        // (Unless the group's q and O scratch would grow past `GROUP_SCRATCH_BYTES` of stack.)
        let kv_bytes = shape.sk * (shape.d + shape.dv) * elem_size;
        let block_bytes = (shape.d + shape.dv) * rv * lanes * elem_size;
        let blocks = shape.sq.div_ceil(rv * lanes);
        let group = if causal || kv_bytes <= KV_CACHED_BYTES || block_bytes * GROUP > GROUP_SCRATCH_BYTES {
            1
        } else {
            GROUP.min(blocks).max(1)
        };
        Plan::of(shape, lanes, rv, group, pack_kv)
    }

    /// Groups of `group` blocks of `rv` row vectors.
    fn of(shape: &Shape, lanes: usize, rv: usize, group: usize, pack_kv: bool) -> Plan {
        let ks = (TILE_ACCS / rv).max(1);
        // Dv in near-equal groups of at most `ks` columns.
        let groups = shape.dv.div_ceil(ks).max(1);
        let (base, extra) = (shape.dv / groups, shape.dv % groups);
        let mut pv_cols = Vec::with_capacity(groups);
        let mut first = 0;
        for g in 0..groups {
            let count = base + usize::from(g < extra);
            if count > 0 {
                pv_cols.push((first, count));
            }
            first += count;
        }
        Plan { qb: rv * lanes, group, rv, kt: key_tile(shape.sk, ks), ks, pv_cols, lanes, pack_kv }
    }

    /// The single-block plans of runs whose query rows fit `rv ≤` [`ROW_VECTORS`] vectors (index
    /// `rv − 1`), over run-time lengths of at most `most` vectors: `None` where this plan
    /// already computes exactly one block of `rv` vectors, or no run has `rv` vectors. At
    /// MiniLM's shape planned for seq 128 (blocks of two vectors), a 40-token query runs one
    /// block of three vectors instead of two blocks of two (64 rows for 40). The key tiles
    /// stay those planned for `shape`.
    fn short(&self, shape: &Shape, most: usize) -> Vec<Option<Plan>> {
        (1..=ROW_VECTORS)
            .map(|rv| {
                let same = rv == self.rv && self.group == 1;
                (!same && rv <= most).then(|| Plan::of(shape, self.lanes, rv, 1, self.pack_kv))
            })
            .collect()
    }

    /// The plan of the last group of each batch index when its rows would leave whole row
    /// vectors of its blocks idle (repeating the last row): blocks of fewer row vectors that
    /// cover just the vectors left. Seq 512 in 8 lanes is 21 blocks of 3 vectors and one of 1,
    /// not 22 blocks of 3 (3 % more work); None when the vectors fill the group.
    fn tail(&self, shape: &Shape, groups_per_batch: usize) -> Option<Plan> {
        let rows = shape.sq.checked_sub((groups_per_batch.checked_sub(1)?) * self.group * self.qb)?;
        let left = rows.div_ceil(self.lanes);
        if left == self.group * self.rv {
            return None;
        }
        // Vectors computed, weighted by their block's time per vector.
        let cost = |rv: usize| left.div_ceil(rv) * rv * VECTOR_COST[rv - 1];
        let rv = (1..=self.rv).rev().min_by_key(|&rv| cost(rv))?;
        Some(Plan::of(shape, self.lanes, rv, left.div_ceil(rv), self.pack_kv))
    }
}

/// Keys per tile for `sk` keys and score tiles of `ks` keys: as few tiles as hold about
/// [`KEY_TILE`] keys each, of near-equal size rounded up to `ks`, so that no tile is a short
/// remainder (128 keys in groups of 6 are one tile of 132, not 126 and then 2).
fn key_tile(sk: usize, ks: usize) -> usize {
    let tiles = sk.div_ceil(KEY_TILE).max(1);
    sk.div_ceil(tiles).div_ceil(ks).max(1) * ks
}

/// Whether a call copies each batch index's k and v into contiguous rows before using them:
/// when their rows lie `row_bytes` apart, as in a head-split `[B, S, heads·D]` layout. The
/// score and `p·V` loops walk every key tile once per block and the `p·V` loop once per
/// column group; rows kilobytes apart take a TLB entry each and fall into a few cache sets
/// (rows a multiple of 1 KiB apart share 1/16 of them). Measured on one thread at 12 heads ×
/// 64, seq 2048: the head-major layout runs 10–20 % faster than the head-split one. A call
/// copies each batch index it reaches once (its range iterations of one batch index are
/// consecutive), so the copy costs about one read of k and v per call.
fn pack_kv_policy(row_bytes: usize) -> bool {
    row_bytes >= 1024
}

/// Row vectors per block for `sq` query rows: as many as there are up to [`ROW_VECTORS`], and
/// two instead of three when three would pad the last block with enough repeated rows to
/// outweigh the larger tile's better throughput ([`VECTOR_COST`]; seq 128 in 8 lanes: 16
/// vectors are 8 blocks of two, or 6 blocks of three computing 18). The tail ([`Plan::tail`])
/// computes just the vectors left, but at MiniLM's shape (12 heads × 32, seq 128) five blocks
/// of three and one of one measured no faster than eight of two (one thread, 337–394 µs
/// against 348–350).
fn row_vectors(sq: usize, lanes: usize) -> usize {
    let vectors = sq.div_ceil(lanes).max(1);
    if vectors <= ROW_VECTORS {
        return vectors;
    }
    let padded = |rv: usize| vectors.div_ceil(rv) * rv;
    if padded(2) * VECTOR_COST[1] < padded(ROW_VECTORS) * VECTOR_COST[ROW_VECTORS - 1] {
        2
    } else {
        ROW_VECTORS
    }
}

/// A `memref.alloca` scratch operand of `len` elements.
fn scratch(b: &mut Body, name: &str, len: usize, elem: &str) -> Operand {
    let memref = format!("memref<{}x{elem}>", len.max(1));
    b.line(format!("{name} = memref.alloca() {{alignment = 64 : i64}} : {memref}"));
    Operand { name: name.into(), memref, shape: vec![len], strides: vec![1], offset: 0 }
}

/// A heap (`memref.alloc`) scratch operand of `len` elements, for the caller to free.
fn heap(b: &mut Body, name: &str, len: usize, elem: &str) -> Operand {
    let memref = format!("memref<{}x{elem}>", len.max(1));
    b.line(format!("{name} = memref.alloc() {{alignment = 64 : i64}} : {memref}"));
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

/// Calls `chunk(b, first column, part)` for the `lanes`-wide chunks of `n` columns: the whole
/// chunks in a loop, then the partial last one (with its mask and count) if any.
fn for_lane_chunks(
    b: &mut Body,
    n: usize,
    lanes: usize,
    chunk: impl Fn(&mut Body, &str, Option<(String, usize)>),
) {
    let whole = n / lanes * lanes;
    if whole > 0 {
        let c0 = b.index(0);
        let wc = b.index(whole);
        let lc = b.index(lanes);
        let (col, _, _) = for_open(b, &c0, &wc, &lc, &[]);
        chunk(b, &col, None);
        for_close(b, &[], &[]);
    }
    if whole < n {
        let part = chunk_part(b, whole / lanes, n, lanes);
        let col = b.index(whole);
        chunk(b, &col, part);
    }
}

/// `max(a, b)` as `a > b ? a : b`: one `maxps` on x86 (a NaN `a` gives `b`; callers make a
/// NaN score reach the output through `p` instead).
fn vmax(b: &mut Body, a: &str, y: &str, vty: &str) -> String {
    let gt = b.fcmp("ogt", a, y, vty);
    b.select(&gt, a, y, vty)
}

/// What every phase of the kernel body needs: operands, strides and the block's indices.
#[derive(Clone)]
struct Ctx<'a> {
    vty: &'a str,
    lanes: usize,
    q: &'a Operand,
    k: &'a Operand,
    /// v, or k standing in for it when there is none (Dv is 0 then: nothing reads it).
    v: &'a Operand,
    mask: Option<&'a Operand>,
    out: Option<&'a Operand>,
    lse: Option<&'a Operand>,
    /// Element offsets of this iteration's batch index in q, k, v, mask, out, lse.
    qbase: String,
    kbase: String,
    vbase: String,
    mbase: Option<String>,
    obase: String,
    lbase: String,
    /// First query row of the block.
    row0: String,
    /// The block's offsets in the q scratch, the O scratch, and the m and l scratch.
    q_at: String,
    o_at: String,
    ml_at: String,
    sq_last: String,
    /// Row and last-axis strides.
    qs: usize,
    qd: usize,
    ks: usize,
    kd: usize,
    vs: usize,
    vd: usize,
    os: usize,
    od: usize,
    ls: usize,
    msq: usize,
    msk: usize,
}

impl Ctx<'_> {
    /// The context of block `sb` (an index value) of the group starting at row `row0`.
    fn block(&self, b: &mut Body, sb: &str, qb: usize, d: usize, dv: usize) -> Self {
        let r = ix_mul(b, sb, qb);
        Ctx {
            row0: ix(b, "addi", &self.row0, &r),
            q_at: ix_mul(b, sb, d * qb),
            o_at: ix_mul(b, sb, dv * qb),
            ml_at: r,
            ..self.clone()
        }
    }

    /// The clamped query row of block row `rr` (an index value).
    fn row_of(&self, b: &mut Body, rr: &str) -> String {
        let i = ix(b, "addi", &self.row0, rr);
        ix(b, "minui", &i, &self.sq_last)
    }

    /// The element offsets `base + row·stride` of the clamped query rows of block rows
    /// `ulane … ulane + lanes − 1`: one row vector's rows, in a q-shaped operand.
    fn lane_rows(&self, b: &mut Body, ulane: &str, base: &str, stride: usize) -> Vec<String> {
        (0..self.lanes)
            .map(|t| {
                let rr = ix_add(b, ulane, t);
                let i = self.row_of(b, &rr);
                let off = ix_mul(b, &i, stride);
                ix(b, "addi", base, &off)
            })
            .collect()
    }
}

/// Scratch of a group of blocks, shared by the main plan and the tail's.
struct Scratch {
    s: Operand,
    q: Operand,
    o: Operand,
    m: Operand,
    l: Operand,
}

#[allow(clippy::too_many_arguments)]
fn body(
    b: &mut Body,
    ct: &ComputeType,
    ops: &[Operand],
    slots: &Slots,
    shape: &Shape,
    plans: &Plans,
    (scale, causal): (f64, bool),
    extents: &Extents,
) {
    let Plans { main: plan, tail, .. } = *plans;
    let (vty, ety) = (ct.vty.as_str(), ct.elem);
    let Plan { qb, group, lanes, .. } = *plan;
    let (q, k) = (&ops[0], &ops[1]);
    let v = slots.v.map_or(k, |i| &ops[i]);
    let (mask, out, lse) =
        (slots.mask.map(|i| &ops[i]), slots.out.map(|i| &ops[i]), slots.lse.map(|i| &ops[i]));
    let r = q.rank();
    let (sq, d, sk, dv) = (shape.sq, shape.d, shape.sk, shape.dv);
    let c1 = b.index(1);
    // Groups per batch index, and the lengths: constants, or the run's.
    let (groups, lens) = match extents {
        Extents::Fixed(n) => (b.index(*n), Lens { sq_last: b.index(sq.saturating_sub(1)), sk: b.index(sk) }),
        Extents::Run(v) => {
            let rows = b.index(plan.qb * plan.group);
            let n = ix(b, "ceildivui", &v.sq, &rows);
            let sq1 = ix(b, "maxui", &v.sq, &c1);
            (ix(b, "maxui", &n, &c1), Lens { sq_last: ix(b, "subi", &sq1, &c1), sk: v.sk.clone() })
        }
    };

    // Scores and probabilities key-major (`S[j][row]`), q and O transposed (`Q[d][row]`,
    // `O[c][row]`): rows in lanes everywhere. Sized for the largest of the plans.
    let plans_all: Vec<&Plan> =
        std::iter::once(plan).chain(tail).chain(plans.short.iter().flatten()).collect();
    let most = |f: &dyn Fn(&Plan) -> usize| plans_all.iter().map(|p| f(p)).max().unwrap_or(0);
    let bufs = Scratch {
        s: scratch(b, "%S", most(&|p| p.kt * p.qb), ety),
        q: scratch(b, "%Q", most(&|p| p.group * d * p.qb), ety),
        o: scratch(b, "%O", most(&|p| p.group * dv * p.qb), ety),
        m: scratch(b, "%M", most(&|p| p.group * p.qb), ety),
        l: scratch(b, "%L", most(&|p| p.group * p.qb), ety),
    };
    let c0 = b.index(0);

    // The copies of one batch index's k and v (and which batch index they hold), when packed.
    let packed = plan.pack_kv.then(|| {
        let kp = heap(b, "%KP", sk * d, ety);
        let vp = heap(b, "%VP", sk * dv, ety);
        let held = "%KV_HELD".to_string();
        b.line(format!("{held} = memref.alloca() : memref<1xindex>"));
        let none = b.index(usize::MAX >> 1);
        b.line(format!("memref.store {none}, {held}[{c0}] : memref<1xindex>"));
        (kp, vp, held)
    });

    let it = open_range(b);
    // Batch offsets of every operand, and the group number (the last "axis").
    let offs = match extents {
        Extents::Fixed(n) => {
            let mut dims = shape.batch.clone();
            dims.push(*n);
            let with_block = |o: &Operand| -> Operand {
                let mut strides = o.strides[..r - 2].to_vec();
                strides.push(0);
                Operand { strides, ..o.clone() }
            };
            let bops: Vec<Operand> = ops.iter().map(with_block).collect();
            let brefs: Vec<&Operand> = bops.iter().collect();
            offsets(b, &it, &dims, &brefs)
        }
        Extents::Run(v) => run_offsets(b, &it, v, &groups),
    };
    let blk = offs.indices.last().cloned().unwrap_or_default();
    let row0 = ix_mul(b, &blk, group * qb);
    let sq_last = lens.sq_last.clone();
    let (msq, msk) = mask.map(|m| (m.strides[r - 2], m.strides[r - 1])).unwrap_or((0, 0));
    let (os, od) = out.map(|o| (o.strides[r - 2], o.strides[r - 1])).unwrap_or((0, 0));
    let at = |slot: Option<usize>| slot.map(|i| offs.offsets[i].clone()).unwrap_or_else(|| c0.clone());
    let cx = Ctx {
        vty,
        lanes,
        q,
        k,
        v,
        mask,
        out,
        lse,
        qbase: offs.offsets[0].clone(),
        kbase: offs.offsets[1].clone(),
        vbase: at(slots.v.or(Some(1))),
        mbase: slots.mask.map(|i| offs.offsets[i].clone()),
        obase: at(slots.out),
        lbase: at(slots.lse),
        row0,
        q_at: c0.clone(),
        o_at: c0.clone(),
        ml_at: c0.clone(),
        sq_last,
        qs: q.strides[r - 2],
        qd: q.strides[r - 1],
        ks: k.strides[r - 2],
        kd: k.strides[r - 1],
        vs: v.strides[r - 2],
        vd: v.strides[r - 1],
        os,
        od,
        ls: lse.map_or(0, |l| l.strides[r - 2]),
        msq,
        msk,
    };
    let cx = match &packed {
        Some((kp, vp, held)) => {
            let bi = ix(b, "divui", &it, &groups);
            let prev = b.assign(format!("memref.load {held}[{c0}] : memref<1xindex>"));
            let other = b.assign(format!("arith.cmpi ne, {bi}, {prev} : index"));
            b.open(format!("scf.if {other}"));
            copy_rows(b, &cx, (cx.k, &cx.kbase, cx.ks, cx.kd), &c0, &lens.sk, d, kp);
            if dv > 0 {
                copy_rows(b, &cx, (cx.v, &cx.vbase, cx.vs, cx.vd), &c0, &lens.sk, dv, vp);
            }
            b.line(format!("memref.store {bi}, {held}[{c0}] : memref<1xindex>"));
            b.close("");
            Ctx { k: kp, v: vp, kbase: c0.clone(), vbase: c0.clone(), ks: d, kd: 1, vs: dv, vd: 1, ..cx }
        }
        None => cx,
    };
    match (tail, extents) {
        (None, Extents::Run(v)) if plans.short.iter().any(Option::is_some) => {
            // Over run-time lengths: a run whose rows fit one block of `rv` vectors runs that
            // block in its batch index's first group (the other groups have nothing to do).
            let lanes_c = b.index(lanes);
            let vectors = ix(b, "ceildivui", &v.sq, &lanes_c);
            let first = b.assign(format!("arith.cmpi eq, {blk}, {c0} : index"));
            let mut open = 0;
            for (i, p) in plans.short.iter().enumerate() {
                let Some(p) = p else { continue };
                let rv = b.index(i + 1);
                let fits = b.assign(format!("arith.cmpi eq, {vectors}, {rv} : index"));
                b.open(format!("scf.if {fits}"));
                b.open(format!("scf.if {first}"));
                group_body(b, &cx, p, &bufs, shape, &lens, scale, causal);
                b.close("");
                b.close("");
                b.open("else");
                open += 1;
            }
            group_body(b, &cx, plan, &bufs, shape, &lens, scale, causal);
            for _ in 0..open {
                b.close("");
            }
        }
        (None, _) => group_body(b, &cx, plan, &bufs, shape, &lens, scale, causal),
        (Some(t), _) => {
            // The last group of each batch index holds the rows left over, in the tail's blocks.
            let last = ix(b, "subi", &groups, &c1);
            let is_last = b.assign(format!("arith.cmpi eq, {blk}, {last} : index"));
            b.open(format!("scf.if {is_last}"));
            group_body(b, &cx, t, &bufs, shape, &lens, scale, causal);
            b.close("");
            b.open("else");
            group_body(b, &cx, plan, &bufs, shape, &lens, scale, causal);
            b.close("");
        }
    }
    close_range(b);
    if let Some((kp, vp, _)) = &packed {
        b.line(format!("memref.dealloc {} : {}", kp.name, kp.memref));
        b.line(format!("memref.dealloc {} : {}", vp.name, vp.memref));
    }
}

/// One group of blocks of `plan`, from the query rows starting at `cx.row0`: q rows into
/// scratch, the walk over the key tiles, and the output rows.
#[allow(clippy::too_many_arguments)]
fn group_body(
    b: &mut Body,
    cx: &Ctx,
    plan: &Plan,
    bufs: &Scratch,
    shape: &Shape,
    lens: &Lens,
    scale: f64,
    causal: bool,
) {
    let (vty, lanes) = (cx.vty, plan.lanes);
    let Plan { qb, group, rv, kt: ktile, ks: kstep, .. } = *plan;
    let (d, dv) = (shape.d, shape.dv);
    let Scratch { s: s_buf, q: q_buf, o: o_buf, m: m_buf, l: l_buf } = bufs;
    let c0 = b.index(0);
    let c1 = b.index(1);
    let zero_v = b.float(0.0, vty);
    let ninf_v = b.float(f64::NEG_INFINITY, vty);
    let last_row = {
        let rr = b.index(group * qb - 1);
        cx.row_of(b, &rr)
    };
    let sk_c = lens.sk.clone();
    let sk_last = {
        let sk1 = ix(b, "maxui", &sk_c, &c1);
        ix(b, "subi", &sk1, &c1)
    };
    let kend = if causal {
        let e = ix_add(b, &last_row, 1);
        ix(b, "minui", &e, &sk_c)
    } else {
        sk_c.clone()
    };
    // Start: q rows (scaled, transposed) into scratch, O = 0, m = −inf, l = 0.
    let groupc = b.index(group);
    {
        let (sb, _, _) = for_open(b, &c0, &groupc, &c1, &[]);
        let bx = cx.block(b, &sb, qb, d, dv);
        load_q_transposed(b, &bx, q_buf, d, qb, rv, scale * std::f64::consts::LOG2_E);
        for_close(b, &[], &[]);
    }
    {
        let dvc = b.index(group * dv);
        let (c, _, _) = for_open(b, &c0, &dvc, &c1, &[]);
        let slot = ix_mul(b, &c, qb);
        for u in 0..rv {
            let at = ix_add(b, &slot, u * lanes);
            store(b, &zero_v, o_buf, &at, 1, vty, None);
        }
        for_close(b, &[], &[]);
    }
    for u in 0..group * rv {
        let at = b.index(u * lanes);
        store(b, &ninf_v, m_buf, &at, 1, vty, None);
        store(b, &zero_v, l_buf, &at, 1, vty, None);
    }

    let ktc = b.index(ktile);
    let ksc = b.index(kstep);
    let (j0, _, _) = for_open(b, &c0, &kend, &ktc, &[]);
    let left = ix(b, "subi", &kend, &j0);
    let kt = ix(b, "minui", &left, &ktc);
    let (sb, _, _) = for_open(b, &c0, &groupc, &c1, &[]);
    let group_cx = cx.clone();
    let cx = cx.block(b, &sb, qb, d, dv);
    let rowv = if causal { causal_rows(b, &cx, rv) } else { Vec::new() };

    // 1. Scores, `kstep` keys at a time: whole groups without bounds tests, then the tile's
    //    last, partial group (zero or one of them) with its keys past the end hidden.
    let tile_max = {
        let rem = ix(b, "remui", &kt, &ksc);
        let whole = ix(b, "subi", &kt, &rem);
        let keys = Keys { j0: &j0, kend: &kend, sk_last: &sk_last, kstep, rowv: &rowv };
        let init: Vec<String> = vec![ninf_v.clone(); rv];
        let mx = score_groups(b, &cx, &keys, q_buf, s_buf, qb, rv, d, (&c0, &whole), &init, false);
        score_groups(b, &cx, &keys, q_buf, s_buf, qb, rv, d, (&whole, &kt), &mx, true)
    };

    // 2. Online softmax update, rows in lanes: m, l, α, and p = 2^(s − m) in place of s. A row
    //    with every score so far −inf subtracts 0 instead of m = −inf, so its p and α are 0.
    let alphas = {
        let mut m_safe = Vec::with_capacity(rv);
        let mut alphas = Vec::with_capacity(rv);
        for (u, mt) in tile_max.iter().enumerate() {
            let at = ix_add(b, &cx.ml_at, u * lanes);
            let m_old = load(b, m_buf, &at, 1, vty, None, 0.0);
            let mn = vmax(b, mt, &m_old, vty);
            store(b, &mn, m_buf, &at, 1, vty, None);
            let none = b.fcmp("oeq", &mn, &ninf_v, vty);
            let ms = b.select(&none, &zero_v, &mn, vty);
            let dm = b.fsub(&m_old, &ms, vty);
            alphas.push(b.exp2_nonpositive(&dm, vty));
            m_safe.push(ms);
        }
        // `kstep` keys per iteration, for independent exps in flight: the score groups wrote
        // whole groups, the keys past the tile's end as −inf, whose p is 0.
        let inits: Vec<(String, String)> = (0..rv).map(|_| (zero_v.clone(), vty.to_string())).collect();
        let kt_groups = ix_add(b, &kt, kstep - 1);
        let kt_groups = ix(b, "divui", &kt_groups, &ksc);
        let kt_whole = ix(b, "muli", &kt_groups, &ksc);
        let (j, acc, res) = for_open(b, &c0, &kt_whole, &ksc, &inits);
        let mut sums = Vec::with_capacity(rv);
        for u in 0..rv {
            let mut es = Vec::with_capacity(kstep);
            for t in 0..kstep {
                let jt = ix_add(b, &j, t);
                let srow = ix_mul(b, &jt, qb);
                let at = ix_add(b, &srow, u * lanes);
                let s = load(b, s_buf, &at, 1, vty, None, 0.0);
                let x = b.fsub(&s, &m_safe[u], vty);
                let e = b.exp2_nonpositive(&x, vty);
                store(b, &e, s_buf, &at, 1, vty, None);
                es.push(e);
            }
            while es.len() > 1 {
                es = es
                    .chunks(2)
                    .map(|p| if p.len() == 2 { b.fadd(&p[0], &p[1], vty) } else { p[0].clone() })
                    .collect();
            }
            sums.push(b.fadd(&acc[u], &es[0], vty));
        }
        for_close(b, &sums, &inits);
        for u in 0..rv {
            let at = ix_add(b, &cx.ml_at, u * lanes);
            let l_old = load(b, l_buf, &at, 1, vty, None, 0.0);
            let l_new = b.fma(&l_old, &alphas[u], &res[u], vty);
            store(b, &l_new, l_buf, &at, 1, vty, None);
        }
        alphas
    };

    // 3. O = α·O + p·V, register tiles of a few columns of Dv × the block's row vectors,
    //    accumulated over the tile's keys: broadcast v[j][c] times the vector p[j][rows].
    for &(first, count) in &plan.pv_cols {
        let mut inits = Vec::with_capacity(count * rv);
        for c in first..first + count {
            for (u, alpha) in alphas.iter().enumerate() {
                let at = ix_add(b, &cx.o_at, c * qb + u * lanes);
                let o = load(b, o_buf, &at, 1, vty, None, 0.0);
                inits.push((b.fmul(&o, alpha, vty), vty.to_string()));
            }
        }
        let (j, acc, res) = for_open(b, &c0, &kt, &c1, &inits);
        let jabs = ix(b, "addi", &j0, &j);
        let voff = ix_mul(b, &jabs, cx.vs);
        let vrow = ix(b, "addi", &cx.vbase, &voff);
        let prow = ix_mul(b, &j, qb);
        let pv: Vec<String> = (0..rv)
            .map(|u| {
                let at = ix_add(b, &prow, u * lanes);
                load(b, s_buf, &at, 1, vty, None, 0.0)
            })
            .collect();
        let mut outs = Vec::with_capacity(count * rv);
        for t in 0..count {
            let at = ix_add(b, &vrow, (first + t) * cx.vd);
            let x = b.assign(format!("memref.load {}[{at}] : {}", cx.v.name, cx.v.memref));
            let x = b.splat(&x, vty);
            for (u, p) in pv.iter().enumerate() {
                outs.push(b.fma(p, &x, &acc[t * rv + u], vty));
            }
        }
        for_close(b, &outs, &inits);
        for t in 0..count {
            for u in 0..rv {
                let at = ix_add(b, &cx.o_at, (first + t) * qb + u * lanes);
                store(b, &res[t * rv + u], o_buf, &at, 1, vty, None);
            }
        }
    }
    for_close(b, &[], &[]);
    for_close(b, &[], &[]);

    let (sb, _, _) = for_open(b, &c0, &groupc, &c1, &[]);
    let cx = group_cx.block(b, &sb, qb, d, dv);
    if cx.out.is_some() {
        store_out_transposed(b, &cx, o_buf, l_buf, dv, qb, rv);
    }
    store_lse(b, &cx, m_buf, l_buf, rv);
    for_close(b, &[], &[]);
}

/// `lse[row] = m[row]·ln2 + ln l[row]` for the block's rows (`m` is in log₂ units), when the
/// kernel writes it: each row vector's lanes go to their rows one at a time (the last row
/// repeated where the vector is partial, the same value written again).
fn store_lse(b: &mut Body, cx: &Ctx, m_buf: &Operand, l_buf: &Operand, rv: usize) {
    let Some(lse) = cx.lse else { return };
    let (vty, lanes) = (cx.vty, cx.lanes);
    let elem = elem_type(vty);
    let ln2 = b.float(std::f64::consts::LN_2, vty);
    for u in 0..rv {
        let ulane = b.index(u * lanes);
        let at = ix(b, "addi", &ulane, &cx.ml_at);
        let m = load(b, m_buf, &at, 1, vty, None, 0.0);
        let l = load(b, l_buf, &at, 1, vty, None, 0.0);
        let ln_l = b.log(&l, vty);
        let y = b.fma(&m, &ln2, &ln_l, vty);
        for (t, row) in cx.lane_rows(b, &ulane, &cx.lbase, cx.ls).iter().enumerate() {
            let x = b.assign(format!("vector.extract {y}[{t}] : {elem} from {vty}"));
            b.line(format!("memref.store {x}, {}[{row}] : {}", lse.name, lse.memref));
        }
    }
}

/// Copies rows `[j0, j0 + n)` of `src` (`(operand, base offset, row stride, column stride)`,
/// `width` columns) to `dst`, row `j − j0` at `(j − j0)·width`.
fn copy_rows(
    b: &mut Body,
    cx: &Ctx,
    (src, base, rs, cs): (&Operand, &str, usize, usize),
    j0: &str,
    n: &str,
    width: usize,
    dst: &Operand,
) {
    let (vty, lanes) = (cx.vty, cx.lanes);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let (j, _, _) = for_open(b, &c0, n, &c1, &[]);
    let jabs = ix(b, "addi", j0, &j);
    let off = ix_mul(b, &jabs, rs);
    let row = ix(b, "addi", base, &off);
    let to = ix_mul(b, &j, width);
    for c in 0..width.div_ceil(lanes) {
        let part = chunk_part(b, c, width, lanes);
        let p = part.as_ref().map(|(m, n)| Part { mask: m, count: Count::Static(*n) });
        let at = ix_add(b, &row, c * lanes * cs);
        let x = load(b, src, &at, cs, vty, p.as_ref(), 0.0);
        let at = ix_add(b, &to, c * lanes);
        store(b, &x, dst, &at, 1, vty, p.as_ref());
    }
    for_close(b, &[], &[]);
}

/// The key range of one tile, shared by its score groups.
struct Keys<'a> {
    j0: &'a str,
    kend: &'a str,
    sk_last: &'a str,
    kstep: usize,
    /// The clamped rows of each row vector (i32 lanes) when causal, else empty.
    rowv: &'a [String],
}

/// Scores of the groups of `kstep` keys at `g ∈ [lo, hi)` (relative to the tile) into `S`:
/// a register tile of keys × row vectors accumulated along D, each step one broadcast
/// `k[j][d]` times the vector `Q[d][rows]`; then mask, causal and (when `checked`) end-of-keys
/// hiding lane-wise, and the running max per row vector, from `init`, is returned.
#[allow(clippy::too_many_arguments)]
fn score_groups(
    b: &mut Body,
    cx: &Ctx,
    keys: &Keys,
    q_buf: &Operand,
    s_buf: &Operand,
    qb: usize,
    rv: usize,
    d: usize,
    (lo, hi): (&str, &str),
    init: &[String],
    checked: bool,
) -> Vec<String> {
    let (vty, lanes, kstep) = (cx.vty, cx.lanes, keys.kstep);
    let ity = format!("vector<{lanes}xi32>");
    let bty = bool_type_like(vty);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let dc = b.index(d);
    let ksc = b.index(kstep);
    let ninf_v = b.float(f64::NEG_INFINITY, vty);
    let inits: Vec<(String, String)> = init.iter().map(|m| (m.clone(), vty.to_string())).collect();
    let (g, mx, mres) = for_open(b, lo, hi, &ksc, &inits);
    let jbase = ix(b, "addi", keys.j0, &g);
    let jabs: Vec<String> = (0..kstep).map(|t| ix_add(b, &jbase, t)).collect();
    // Keys past the end (checked groups only) read the last key, then are hidden.
    let jcl: Vec<String> =
        if checked { jabs.iter().map(|j| ix(b, "minui", j, keys.sk_last)).collect() } else { jabs.clone() };
    let krows: Vec<String> = jcl
        .iter()
        .map(|j| {
            let off = ix_mul(b, j, cx.ks);
            ix(b, "addi", &cx.kbase, &off)
        })
        .collect();
    let zero_v = b.float(0.0, vty);
    let ainits: Vec<(String, String)> = (0..rv * kstep).map(|_| (zero_v.clone(), vty.to_string())).collect();
    let (dd, acc, res) = for_open(b, &c0, &dc, &c1, &ainits);
    let qslot = ix_mul(b, &dd, qb);
    let qslot = ix(b, "addi", &qslot, &cx.q_at);
    let qv: Vec<String> = (0..rv)
        .map(|u| {
            let at = ix_add(b, &qslot, u * lanes);
            load(b, q_buf, &at, 1, vty, None, 0.0)
        })
        .collect();
    let koff = ix_mul(b, &dd, cx.kd);
    let mut outs = Vec::with_capacity(rv * kstep);
    for (t, krow) in krows.iter().enumerate() {
        let at = ix(b, "addi", krow, &koff);
        let kx = b.assign(format!("memref.load {}[{at}] : {}", cx.k.name, cx.k.memref));
        let kx = b.splat(&kx, vty);
        for (u, qx) in qv.iter().enumerate() {
            outs.push(b.fma(qx, &kx, &acc[t * rv + u], vty));
        }
    }
    for_close(b, &outs, &ainits);
    // Mask row offsets of each lane of each row vector (when the mask varies along rows).
    let mrows: Vec<Vec<String>> = match (&cx.mbase, cx.mask) {
        (Some(mb), Some(_)) if cx.msq != 0 => (0..rv)
            .map(|u| {
                (0..lanes)
                    .map(|t| {
                        let rr = b.index(u * lanes + t);
                        let i = cx.row_of(b, &rr);
                        let off = ix_mul(b, &i, cx.msq);
                        ix(b, "addi", mb, &off)
                    })
                    .collect()
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut newmx = mx.clone();
    for t in 0..kstep {
        let inb = checked.then(|| {
            let inb = b.assign(format!("arith.cmpi ult, {}, {} : index", jabs[t], keys.kend));
            b.assign(format!("vector.broadcast {inb} : i1 to {bty}"))
        });
        let jv = (!keys.rowv.is_empty()).then(|| {
            let ji = b.assign(format!("arith.index_cast {} : index to i32", jabs[t]));
            b.assign(format!("vector.broadcast {ji} : i32 to {ity}"))
        });
        let moff = cx.mask.map(|_| ix_mul(b, &jcl[t], cx.msk));
        let srow = ix_add(b, &g, t);
        let srow = ix_mul(b, &srow, qb);
        // A mask the same for all rows is loaded (and put in log₂ units) once per key.
        let row_mask = match (cx.mask, &cx.mbase, &moff) {
            (Some(m), Some(mb), Some(moff)) if cx.msq == 0 => {
                let at = ix(b, "addi", mb, moff);
                let mv = load(b, m, &at, 0, vty, None, 0.0);
                Some(mask_in_log2_units(b, &mv, vty))
            }
            _ => None,
        };
        for u in 0..rv {
            let mut s = res[t * rv + u].clone();
            if let (Some(m), Some(moff)) = (cx.mask, &moff) {
                let mv = match &row_mask {
                    Some(mv) => mv.clone(),
                    None => {
                        let elems: Vec<String> = mrows[u]
                            .iter()
                            .map(|mr| {
                                let at = ix(b, "addi", mr, moff);
                                b.assign(format!("memref.load {}[{at}] : {}", m.name, m.memref))
                            })
                            .collect();
                        let mv = b.assign(format!("vector.from_elements {} : {vty}", elems.join(", ")));
                        mask_in_log2_units(b, &mv, vty)
                    }
                };
                s = b.fadd(&s, &mv, vty);
            }
            if let Some(inb) = &inb {
                s = b.select(inb, &s, &ninf_v, vty);
            }
            if let Some(jv) = &jv {
                let c = b.assign(format!("arith.cmpi sle, {jv}, {} : {ity}", keys.rowv[u]));
                s = b.select(&c, &s, &ninf_v, vty);
            }
            let at = ix_add(b, &srow, u * lanes);
            store(b, &s, s_buf, &at, 1, vty, None);
            newmx[u] = vmax(b, &s, &newmx[u], vty);
        }
    }
    for_close(b, &newmx, &inits);
    mres
}

/// `mask · log₂e`, the additive mask in the log₂ units of the scores: a finite mask stays
/// finite (BERT's −3.4e38 would overflow to −inf, and a row hidden by it entirely must average
/// its values, not give 0/0), so values below `−MAX` are raised to it; −inf and NaN pass.
fn mask_in_log2_units(b: &mut Body, mv: &str, vty: &str) -> String {
    let log2e = b.float(std::f64::consts::LOG2_E, vty);
    let scaled = b.fmul(mv, &log2e, vty);
    let max = if elem_type(vty) == "f32" { f32::MAX as f64 } else { f64::MAX };
    let floor = b.float(-max, vty);
    let below = b.fcmp("olt", &scaled, &floor, vty);
    let raised = b.select(&below, &floor, &scaled, vty);
    let ninf = b.float(f64::NEG_INFINITY, vty);
    let hidden = b.fcmp("oeq", mv, &ninf, vty);
    b.select(&hidden, mv, &raised, vty)
}

/// `Q[d][row] = scale · q[row][d]` for the block's rows: `lanes` rows × `lanes` columns at a
/// time, loaded as row vectors and transposed in registers.
fn load_q_transposed(b: &mut Body, cx: &Ctx, q_buf: &Operand, d: usize, qb: usize, rv: usize, scale: f64) {
    let (vty, lanes) = (cx.vty, cx.lanes);
    let scale_v = b.float(scale, vty);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let rvc = b.index(rv);
    let (u, _, _) = for_open(b, &c0, &rvc, &c1, &[]);
    let ulane = ix_mul(b, &u, lanes);
    let qrows = cx.lane_rows(b, &ulane, &cx.qbase, cx.qs);
    let chunk = |b: &mut Body, col: &str, part: Option<(String, usize)>| {
        let p = part.as_ref().map(|(m, n)| Part { mask: m, count: Count::Static(*n) });
        let coff = ix_mul(b, col, cx.qd);
        let rows: Vec<String> = qrows
            .iter()
            .map(|qr| {
                let at = ix(b, "addi", qr, &coff);
                load(b, cx.q, &at, cx.qd, vty, p.as_ref(), 0.0)
            })
            .collect();
        let cols = b.transpose(&rows, vty);
        let valid = part.as_ref().map_or(lanes, |(_, n)| *n);
        for (i, x) in cols.iter().take(valid).enumerate() {
            let x = b.fmul(x, &scale_v, vty);
            let c = ix_add(b, col, i);
            let slot = ix_mul(b, &c, qb);
            let slot = ix(b, "addi", &slot, &ulane);
            let slot = ix(b, "addi", &slot, &cx.q_at);
            store(b, &x, q_buf, &slot, 1, vty, None);
        }
    };
    for_lane_chunks(b, d, lanes, chunk);
    for_close(b, &[], &[]);
}

/// `out[row][c] = O[c][row] / l[row]` for the block's rows: `lanes` columns × `lanes` rows at a
/// time, scaled as column vectors, transposed in registers and stored as row vectors.
fn store_out_transposed(
    b: &mut Body,
    cx: &Ctx,
    o_buf: &Operand,
    l_buf: &Operand,
    dv: usize,
    qb: usize,
    rv: usize,
) {
    let (vty, lanes) = (cx.vty, cx.lanes);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let rvc = b.index(rv);
    let (u, _, _) = for_open(b, &c0, &rvc, &c1, &[]);
    let ulane = ix_mul(b, &u, lanes);
    let lslot = ix(b, "addi", &ulane, &cx.ml_at);
    let l = load(b, l_buf, &lslot, 1, vty, None, 0.0);
    let one = b.float(1.0, vty);
    let inv = b.fdiv(&one, &l, vty);
    let orows = cx.lane_rows(b, &ulane, &cx.obase, cx.os);
    let zero_v = b.float(0.0, vty);
    let chunk = |b: &mut Body, col: &str, part: Option<(String, usize)>| {
        let valid = part.as_ref().map_or(lanes, |(_, n)| *n);
        let cols: Vec<String> = (0..lanes)
            .map(|i| {
                if i >= valid {
                    return zero_v.clone();
                }
                let c = ix_add(b, col, i);
                let slot = ix_mul(b, &c, qb);
                let slot = ix(b, "addi", &slot, &ulane);
                let slot = ix(b, "addi", &slot, &cx.o_at);
                let o = load(b, o_buf, &slot, 1, vty, None, 0.0);
                b.fmul(&o, &inv, vty)
            })
            .collect();
        let rows = b.transpose(&cols, vty);
        let p = part.as_ref().map(|(m, n)| Part { mask: m, count: Count::Static(*n) });
        let coff = ix_mul(b, col, cx.od);
        for (orow, x) in orows.iter().zip(&rows) {
            let at = ix(b, "addi", orow, &coff);
            if let Some(out) = cx.out {
                store(b, x, out, &at, cx.od, vty, p.as_ref());
            }
        }
    };
    for_lane_chunks(b, dv, lanes, chunk);
    for_close(b, &[], &[]);
}

/// [`offsets`] over the run's batch extents and the `groups` per batch index: the indices of
/// iteration `it`, and each operand's element offset.
fn run_offsets(b: &mut Body, it: &str, v: &RunValues, groups: &str) -> Offsets {
    let mut extents = v.batch.clone();
    extents.push(groups.to_string());
    let mut indices = vec![String::new(); extents.len()];
    let mut rem = it.to_string();
    for k in (0..extents.len()).rev() {
        if k == 0 {
            indices[k] = rem.clone();
        } else {
            indices[k] = ix(b, "remui", &rem, &extents[k]);
            rem = ix(b, "divui", &rem, &extents[k]);
        }
    }
    let offsets = v
        .offsets
        .iter()
        .zip(&v.batch_strides)
        .map(|(off, strides)| {
            let mut acc = off.clone();
            for (i, st) in indices.iter().zip(strides) {
                let t = ix(b, "muli", i, st);
                acc = ix(b, "addi", &acc, &t);
            }
            acc
        })
        .collect();
    Offsets { indices, offsets }
}

/// The clamped query rows of each of the block's row vectors, as i32 lanes (for the causal
/// test).
fn causal_rows(b: &mut Body, cx: &Ctx, rv: usize) -> Vec<String> {
    let lanes = cx.lanes;
    let ity = format!("vector<{lanes}xi32>");
    let r0 = b.assign(format!("arith.index_cast {} : index to i32", cx.row0));
    let r0 = b.assign(format!("vector.broadcast {r0} : i32 to {ity}"));
    let last = b.assign(format!("arith.index_cast {} : index to i32", cx.sq_last));
    let lastv = b.assign(format!("vector.broadcast {last} : i32 to {ity}"));
    (0..rv)
        .map(|u| {
            let iota: Vec<String> = (u * lanes..(u + 1) * lanes).map(|x| x.to_string()).collect();
            let iota = b.assign(format!("arith.constant dense<[{}]> : {ity}", iota.join(", ")));
            let x = b.assign(format!("arith.addi {r0}, {iota} : {ity}"));
            b.assign(format!("arith.minsi {x}, {lastv} : {ity}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sq: usize, sk: usize, d: usize) -> Shape {
        Shape { batch: vec![1], sq, d, sk, dv: d }
    }

    #[test]
    fn the_last_group_computes_only_the_row_vectors_left() {
        let plans = |sq: usize, sk: usize, causal: bool| {
            let s = shape(sq, sk, 64);
            let plan = Plan::new(&s, 8, causal, 4, false);
            let tail = plan.tail(&s, sq.div_ceil(plan.qb * plan.group));
            (plan.rv, plan.group, tail.map(|t| (t.rv, t.group)))
        };
        // Seq 512: 64 vectors, 21 blocks of 3 and one of 1 (not a 22nd block of 3).
        assert_eq!(plans(512, 512, false), (3, 1, Some((1, 1))));
        // Seq 2048: keys past the cached share, groups of 4 blocks; the last group's 4 vectors
        // are two blocks of 2, not four blocks of 3.
        assert_eq!(plans(2048, 2048, false), (3, 4, Some((2, 2))));
        assert_eq!(plans(2048, 2048, true), (3, 1, Some((1, 1))));
        // Vectors that fill the last group: no tail.
        assert_eq!(plans(504, 504, false), (3, 1, None));
        assert_eq!(plans(128, 128, false), (2, 1, None));
        // 5 vectors left in a group of 4 × 3: one block of 3 and one of 2 would need two plans;
        // two blocks of 3 (6 vectors) cost less than five of 1.
        assert_eq!(plans(96 * 3 + 40, 2048, false), (3, 4, Some((3, 2))));
        // A partial last vector counts as a vector.
        assert_eq!(plans(19, 19, false), (3, 1, None));
        assert_eq!(plans(33, 33, false), (3, 1, Some((2, 1))));
    }

    #[test]
    fn runs_of_up_to_three_vectors_get_one_block_of_their_vectors() {
        let short = |hint: usize, max: usize, causal: bool| {
            let s = shape(hint, hint, 32);
            let plan = Plan::new(&s, 16, causal, 4, false);
            let rvs: Vec<Option<(usize, usize, usize)>> = plan
                .short(&s, max.div_ceil(16))
                .iter()
                .map(|p| p.as_ref().map(|p| (p.rv, p.group, p.qb)))
                .collect();
            (plan.rv, rvs)
        };
        // MiniLM planned for seq 128 in 16 lanes: blocks of two vectors; one and three get their own.
        assert_eq!(short(128, 256, false), (2, vec![Some((1, 1, 16)), None, Some((3, 1, 48))]));
        // Planned for seq 40 (one block of three): one and two vectors get theirs.
        assert_eq!(short(40, 70, true), (3, vec![Some((1, 1, 16)), Some((2, 1, 32)), None]));
        // Keys past the cached share, groups of four blocks of three: even three vectors are one
        // block, not a group of four.
        assert_eq!(short(2048, 2048, false), (3, vec![Some((1, 1, 16)), Some((2, 1, 32)), Some((3, 1, 48))]));
        // No run is longer than one vector: nothing but that.
        assert_eq!(short(8, 16, false), (1, vec![None, None, None]));
        assert_eq!(short(8, 20, false), (1, vec![None, Some((2, 1, 32)), None]));
    }

    #[test]
    fn key_tiles_are_near_equal_multiples_of_the_score_tile() {
        // MiniLM's 128 keys in groups of 6: one tile, not 126 keys and then 2.
        assert_eq!(key_tile(128, 6), 132);
        assert_eq!(key_tile(512, 4), 128);
        assert_eq!(key_tile(2048, 4), 128);
        // 130 keys are two tiles of 65, rounded up to the group of 4.
        assert_eq!(key_tile(130, 4), 68);
        assert_eq!(key_tile(1, 4), 4);
        for (sk, ks) in [(7, 6), (300, 4), (257, 3), (150, 12)] {
            let kt = key_tile(sk, ks);
            assert_eq!(kt % ks, 0);
            let tiles = sk.div_ceil(kt);
            assert!(sk - (tiles - 1) * kt > kt / 2 || tiles == 1, "{sk} keys, tile {kt}");
        }
    }
}
