//! Tiled matrix products with their epilogue (bias, activation). Each workgroup computes one
//! `tile_m × tile_n` block of one batch index's result. It walks k in steps of `tile_k`: every
//! invocation reads a few elements of the next A and B tiles from memory (runs of 4 as one
//! vector where the layout allows; nothing past the edges), and with two stages it does so
//! while the workgroup multiplies the current tiles, which lie in the other half of shared
//! memory, so one barrier per step suffices. Products with async copies (CUDA) keep up to
//! four stages: tiles that allow it are copied `stages − 1` tiles ahead with `cp.async`
//! (through a ring of stages, one group of copies per step), the others still one tile ahead
//! through registers. The inner step is either SIMT FMAs (each
//! invocation a `thread_m × thread_n` block of accumulators in registers, in runs of adjacent
//! rows and columns read as vectors) or tensor-core `mma.sync` products per warp, 16-bit
//! fragments read with `ldmatrix`. Operands are
//! strided views, so transposed and batch-broadcast operands need no copy; where the product's
//! sizes are multiples of the tile, no bounds are checked at all.

use super::mma::{
    eight, joined, mma_parts, tensor_core_precision, Fragment, Lanes, Parts, C_FRAGMENT, MMA_M, MMA_N,
};
use super::plan::{
    matmul_layouts, warpgroup_layouts, GpuPlan, MmaInstruction, MmaPrecision, SharedLayout, Work,
};
use super::skeleton::{module, offset_at, plus, shared, shared_type, unravel, SharedArray};
use super::tiles::{aligned_by, aligned_by_4, shared_pointer, OperandTile, Pipeline};
use super::wgmma::{self, Descriptor, WGMMA_M};
use super::{ceil_div, GpuCtx, GpuFlavor, GpuKernel};
use crate::kernels::elementwise::{load, reg_type, store};
use crate::kernels::matmul::activate;
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::CodegenError;
use kiln_ir::{Activation, DType, Dim};

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
    // Tensor cores for f16 and bf16 operands at their precision, and for f32 ones where the
    // user allowed rounding them (`--precision tf32`, or splitting them: `tf32x3`).
    let allowed = tensor_core_precision(&[a.dtype, bv.dtype], cx.caps);
    // Warpgroup products where the target has them and both operands lie contiguous along
    // one axis in 16-byte runs, so their tiles copy whole into core matrices whose lines run
    // along it (A's rows or k, B's columns or k).
    let runs = |v: &View, axis: usize| aligned_by(v, axis, 16 / v.dtype.size_bytes());
    let mn_contiguous = [!runs(a, r - 1), runs(bv, r - 1)];
    let core_copies = (runs(a, r - 1) || runs(a, r - 2)) && (runs(bv, r - 1) || runs(bv, r - 2));
    let copies = (core_copies && cx.run.is_none()).then_some(mn_contiguous);
    let warpgroups = match allowed {
        Some((precision, _)) => GpuPlan::matmul_warpgroups(batch, [m, n, k], precision, copies, cx.caps)?,
        None => None,
    };
    let tensor_cores = match (warpgroups, allowed) {
        (Some(plan), _) => Some(plan),
        (None, Some((precision, _))) => GpuPlan::matmul_tensor_cores(batch, m, n, k, precision, cx.caps)?,
        (None, None) => None,
    };
    let exact = allowed.is_some_and(|(_, exact)| exact);
    let plan = match tensor_cores {
        Some(plan) => plan,
        None => {
            // The SIMT tiles hold A k-major and B row-major: what lies so in memory may be copied.
            let copyable = [a.strides[r - 2] == 1, bv.strides[r - 1] == 1];
            GpuPlan::matmul(batch, [m, n, k], reg_bytes, copyable, cx.caps)?
        }
    };
    let (tile, inner, stages, async_copies) = match plan.work {
        Work::Matmul { tile, thread, vector, stages, async_copies, .. } => {
            let [wx, wy, _] = plan.launch.workgroup.map(|w| w as usize);
            let (rm, rn, v) = (thread[0] as usize, thread[1] as usize, vector as usize);
            (tile, Inner::Simt { rm, rn, wx, wy, vec: v }, stages as usize, async_copies)
        }
        Work::MatmulTensorCores { tile, warps, stages, precision, async_copies, instruction, .. } => {
            let (wm, wn) = (warps[0] as usize, warps[1] as usize);
            let sub = [tile[0] as usize / wm / MMA_M, tile[1] as usize / wn / MMA_N];
            let parts = Parts::new(precision, cx.caps.flavor(), exact);
            let inner = match instruction {
                MmaInstruction::Sync => Inner::TensorCores { warps: [wm, wn], sub, parts },
                MmaInstruction::Warpgroup { in_flight } => {
                    Inner::Warpgroups { warps: [wm, wn], sub, parts, in_flight: in_flight as usize }
                }
            };
            (tile, inner, stages as usize, async_copies)
        }
        Work::Elements { .. }
        | Work::Columns { .. }
        | Work::Rows { .. }
        | Work::RowsSideBySide { .. }
        | Work::Attention { .. }
        | Work::AttentionTiled { .. }
        | Work::AttentionTensorCores { .. } => {
            return Err(CodegenError::Unsupported("a matmul plan that is not one".into()))
        }
    };
    let [tm, tn, tk] = tile.map(|t| t as usize);
    // How tensor-core operands enter and leave the shared tiles.
    let parts = match inner {
        Inner::TensorCores { parts, .. } | Inner::Warpgroups { parts, .. } => Some(parts),
        Inner::Simt { .. } => None,
    };
    // 16-bit B tiles lie as B does in memory where its rows are contiguous.
    let b_row_major = bv.strides[r - 1] == 1;
    let [la, lb] = match inner {
        Inner::Warpgroups { parts, .. } => {
            warpgroup_layouts(tile, mn_contiguous, parts.precision.shared_bytes())
        }
        Inner::TensorCores { .. } | Inner::Simt { .. } => {
            matmul_layouts(tile, parts.map(|p| p.precision), b_row_major)
        }
    };
    let inv = plan.launch.invocations() as usize;
    let nvvm = cx.caps.flavor() == GpuFlavor::Nvvm;
    // Vectors of 4 only for 4-byte register values, and only where the device reads them as
    // one access (NVVM).
    let vectors = nvvm && ty == "f32";
    // Shared tiles hold register values, or tensor-core operands as the products take them.
    let elem = parts.as_ref().map_or(ty, Parts::shared_elem);

    // Warpgroup products of TF32×3 operands read their high and low parts from tiles of
    // their own: each stage holds the operand's tile, split in place once it landed, then
    // the low parts' tile.
    let split = matches!(inner, Inner::Warpgroups { parts, .. } if parts.precision == MmaPrecision::Tf32x3);
    let stage_lens = [la.len, lb.len].map(|len| if split { 2 * len } else { len });
    let mut b = cx.body();
    let sh_a = shared(&mut b, stages * stage_lens[0], elem);
    let sh_b = shared(&mut b, stages * stage_lens[1], elem);
    let sa = shared_type(&b, stages * stage_lens[0], elem);
    let sb = shared_type(&b, stages * stage_lens[1], elem);
    let tx = b.assign("gpu.thread_id x");
    let ty_ = b.assign("gpu.thread_id y");
    let bx = b.assign("gpu.block_id x");
    let by = b.assign("gpu.block_id y");
    let bz = b.assign("gpu.block_id z");
    let wxc = b.index(plan.launch.workgroup[0] as usize);
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
    // With tensor cores, where each warp's fragments lie in the tile.
    let inner = match inner {
        Inner::Simt { rm, rn, wx, wy, vec } => {
            let vc = b.index(vec);
            let my_row = b.assign(format!("arith.muli {ty_}, {vc} : index"));
            let my_col = b.assign(format!("arith.muli {tx}, {vc} : index"));
            Step::Simt { rm, rn, wx, wy, vec, my_row, my_col }
        }
        Inner::TensorCores { warps, sub, parts } => {
            // 16-bit fragments come through `ldmatrix` (emulated off NVVM), four 8 × 8
            // matrices at a time: one A fragment, or B fragments of two neighbouring columns.
            let matrices = parts.precision.paired() && sub[1] % 2 == 0;
            let pointers = (matrices && nvvm).then(|| {
                let a = shared_pointer(&mut b, &SharedArray { name: &sh_a, ty: &sa, vectors });
                let bp = shared_pointer(&mut b, &SharedArray { name: &sh_b, ty: &sb, vectors });
                [a, bp]
            });
            Step::TensorCores {
                sub,
                lanes: Box::new(Lanes::new(&mut b, &lin, warps, sub, parts.precision)),
                parts,
                adjacent: [la.col == 1, lb.row == 1],
                matrices: matrices.then_some(Matrices { pointers }),
            }
        }
        Inner::Warpgroups { warps, sub, parts, in_flight } => {
            let lanes = Lanes::placed(&mut b, &lin, warps, sub, parts.precision);
            let addresses = nvvm.then(|| {
                let pa = shared_pointer(&mut b, &SharedArray { name: &sh_a, ty: &sa, vectors });
                let pb = shared_pointer(&mut b, &SharedArray { name: &sh_b, ty: &sb, vectors });
                [wgmma::shared_address(&mut b, &pa), wgmma::shared_address(&mut b, &pb)]
            });
            let group = Warpgroup::new(&mut b, &lanes, parts.precision, [&la, &lb], addresses, in_flight);
            Step::Warpgroups { sub, lanes: Box::new(lanes), group: Box::new(group) }
        }
    };
    // In row form, the run's rows (m is their maximum).
    let run_m = match cx.run {
        Some(_) => Some(cx.count_value(&mut b, m)?),
        None => None,
    };
    let tile_a = OperandTile::new(&b, a, "%a0", a_base, (tm, tk), (m, k), la, inv, vectors)
        .with_run_rows(run_m.clone());
    let tile_b = OperandTile::new(&b, bv, "%a1", b_base, (tk, tn), (k, n), lb, inv, vectors);
    // Operands take the tensor cores' precision once, as they enter shared memory (TF32×3
    // ones are split as they are read from it).
    let entering = parts.as_ref();
    let mem_a = SharedArray { name: &sh_a, ty: &sa, vectors };
    let mem_b = SharedArray { name: &sh_b, ty: &sb, vectors };
    // The accumulators are loop-carried values (registers on every device), not an array.
    let nacc = inner.accumulators();
    let types = vec![ty; nacc].join(", ");

    let tiles = k.div_ceil(tk).max(1);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let tiles_c = b.index(tiles);
    let tkc = b.index(tk);
    let pipe = Pipeline::new(
        &mut b,
        [Some(&tile_a), Some(&tile_b)],
        [&mem_a, &mem_b],
        stage_lens,
        stages,
        parts.as_ref(),
        async_copies,
        &lin,
    )
    .read_by_async_proxy(matches!(inner, Step::Warpgroups { .. }))
    .with_products_in_flight(inner.in_flight())
    .splitting_into(split.then_some([la.len, lb.len]));
    if split && !pipe.copies_whole() {
        return Err(CodegenError::Unsupported(format!(
            "matmul `{symbol}`: warpgroup products of split operands need both tiles copied whole"
        )));
    }
    // Where the A and the B tile at k `k0` start.
    let origins = |k0: &str| [(row0.clone(), k0.to_string()), (k0.to_string(), col0.clone())];
    if stages >= 2 {
        // The first k tiles the copies run ahead by (`stages − 1`, less the products in
        // flight), each into its stage (the last one again past the end, into a stage no one
        // reads).
        for s in 0..pipe.ahead_by() {
            let k_s = origins(&b.index(s.min(tiles - 1) * tk));
            pipe.fill(&mut b, s, (&k_s, &k_s), None, &zero, ty);
        }
        pipe.filled(&mut b);
    }
    let carried: Vec<String> = (0..nacc).map(|i| format!("%o{i} = {zero}")).collect();
    b.open(format!(
        "%acc:{nacc} = scf.for %t = {c0} to {tiles_c} step {c1} iter_args({}) -> ({types})",
        carried.join(", ")
    ));
    let k0 = b.assign(format!("arith.muli %t, {tkc} : index"));
    let next = if stages >= 2 {
        // Tile t + S − 1 (less the products in flight; the last one again past the end for
        // the registers' tiles, into a stage no one reads again; copied only where it exists).
        let (here, next) = pipe.arrive(&mut b, "%t");
        let ahead = b.index(pipe.ahead_by() * tk);
        let kn = b.assign(format!("arith.addi {k0}, {ahead} : index"));
        let last = b.index((tiles - 1) * tk);
        let clamped = b.assign(format!("arith.minui {kn}, {last} : index"));
        let real = pipe.copying().then(|| {
            let end = b.index(tiles * tk);
            b.assign(format!("arith.cmpi ult, {kn}, {end} : index"))
        });
        let fetched =
            pipe.ahead(&mut b, (&origins(&clamped), &origins(&kn)), real.as_deref(), &next, &zero, ty);
        let next_acc = inner.step(&mut b, (&mem_a, &here[0], la), (&mem_b, &here[1], lb), tk, ty);
        pipe.close(&mut b, &fetched, &next, ty);
        next_acc
    } else {
        let fa = tile_a.fetch(&mut b, &lin, (&row0, &k0), &zero, ty);
        let fb = tile_b.fetch(&mut b, &lin, (&k0, &col0), &zero, ty);
        tile_a.deposit(&mut b, &fa, &mem_a, &c0, entering, ty);
        tile_b.deposit(&mut b, &fb, &mem_b, &c0, entering, ty);
        b.line("gpu.barrier");
        let next = inner.step(&mut b, (&mem_a, &c0, la), (&mem_b, &c0, lb), tk, ty);
        b.line("gpu.barrier");
        next
    };
    b.line(format!("scf.yield {} : {types}", next.join(", ")));
    b.close("");
    pipe.drain(&mut b);
    let results: Vec<String> = (0..nacc).map(|i| format!("%acc#{i}")).collect();
    // Warpgroup products still in flight finish before their accumulators are read.
    let results = match &inner {
        Step::Warpgroups { group, .. } if group.addresses.is_some() => wgmma::finished(&mut b, 0, &results),
        Step::Warpgroups { .. } | Step::Simt { .. } | Step::TensorCores { .. } => results,
    };

    // Epilogue: bias, activation, store what lies inside the result.
    let or = out.rank();
    let bias_arg = "%a2";
    let out_arg = if bias.is_some() { "%a3" } else { "%a2" };
    let exact_tiles = m % tm == 0 && n % tn == 0 && run_m.is_none();
    // Runs of 4 adjacent columns stored as one vector where the result allows.
    let run = match &inner {
        Step::Simt { vec: 4, .. }
            if vectors
                && exact_tiles
                && out.dtype == DType::F32
                && b.split_of(out_arg).is_none()
                && aligned_by_4(out, or - 1) =>
        {
            4
        }
        // An invocation's tensor-core accumulators come in pairs of adjacent columns (on
        // SPIR-V too, where tensor-core plans exist only emulated, so the tests check them).
        Step::TensorCores { .. } | Step::Warpgroups { .. }
            if exact_tiles
                && matches!(out.dtype, DType::F32 | DType::F16 | DType::BF16)
                && b.split_of(out_arg).is_none()
                && aligned_by(out, or - 1, 2) =>
        {
            2
        }
        Step::Simt { .. } | Step::TensorCores { .. } | Step::Warpgroups { .. } => 1,
    };
    let mut acc = 0;
    while acc < nacc {
        let (r_in, c_in) = inner.position(&mut b, acc);
        let row = b.assign(format!("arith.addi {row0}, {r_in} : index"));
        let col = b.assign(format!("arith.addi {col0}, {c_in} : index"));
        if !exact_tiles {
            let mc = match &run_m {
                Some(v) => v.clone(),
                None => b.index(m),
            };
            let nc = b.index(n);
            let okr = b.assign(format!("arith.cmpi ult, {row}, {mc} : index"));
            let okc = b.assign(format!("arith.cmpi ult, {col}, {nc} : index"));
            let ok = b.assign(format!("arith.andi {okr}, {okc} : i1"));
            b.open(format!("scf.if {ok}"));
        }
        let mut values = Vec::with_capacity(run);
        for e in 0..run {
            let col_e = if e == 0 {
                col.clone()
            } else {
                let ec = b.index(e);
                b.assign(format!("arith.addi {col}, {ec} : index"))
            };
            let mut v = results[acc + e].clone();
            if let (Some(cv), Some(cb)) = (bias, &c_base) {
                let rk = cv.rank();
                let at = offset_at(
                    &mut b,
                    0,
                    &[(Some(&row), cv.strides[rk - 2]), (Some(&col_e), cv.strides[rk - 1])],
                );
                let at = b.assign(format!("arith.addi {cb}, {at} : index"));
                let x = load(&mut b, bias_arg, cv, &at);
                v = b.fadd(&v, &x, ty);
            }
            values.push(activate(&mut b, act, &v, ty));
        }
        let at =
            offset_at(&mut b, 0, &[(Some(&row), out.strides[or - 2]), (Some(&col), out.strides[or - 1])]);
        let at = b.assign(format!("arith.addi {o_base}, {at} : index"));
        if run == 1 {
            store(&mut b, &values[0], out_arg, out, &at);
        } else {
            // One store of the run, in the result's own type.
            let elem = out.elem();
            let stored: Vec<String> = match out.dtype {
                DType::F16 | DType::BF16 => {
                    values.iter().map(|x| b.assign(format!("arith.truncf {x} : {ty} to {elem}"))).collect()
                }
                DType::F32 | DType::F64 | DType::I32 | DType::I64 | DType::Bool => values,
            };
            let vt = format!("vector<{run}x{elem}>");
            let align = run * out.dtype.size_bytes();
            let v = b.assign(format!("vector.from_elements {} : {vt}", stored.join(", ")));
            b.line(format!(
                "vector.store {v}, {out_arg}[{at}] {{alignment = {align}}} : {}, {vt}",
                out.memref()
            ));
        }
        if !exact_tiles {
            b.close("");
        }
        acc += run;
    }
    let mut memrefs = vec![a.memref(), bv.memref()];
    memrefs.extend(bias.map(View::memref));
    memrefs.push(out.memref());
    let flops = (2 * batch * m * n * k) as u64;
    let bytes = ((a.numel() + bv.numel() + out.numel()) * dtype.size_bytes()) as u64;
    // In row form, as many row tiles as the run's rows need.
    let run_grid = match cx.at_run(m)? {
        Some(rows) => {
            let [x, _, z] = plan.launch.grid;
            Some([Dim::Const(x as usize), ceil_div(&rows, tm)?, Dim::Const(z as usize)])
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

/// How a workgroup computes its tile between the shared-memory loads, as its plan says.
#[derive(Clone, Copy)]
enum Inner {
    /// Each invocation `(x, y)` of a `wx × wy` workgroup accumulates `rm × rn` results with
    /// FMAs, in runs of `vec` adjacent rows and columns.
    Simt { rm: usize, rn: usize, wx: usize, wy: usize, vec: usize },
    /// Each warp of `warps[0] × warps[1]` computes `sub[0] × sub[1]` `m16n8` products on
    /// tensor cores with operands as `parts` forms them.
    TensorCores { warps: [usize; 2], sub: [usize; 2], parts: Parts },
    /// Each warpgroup (four of the `warps[0]` warps along m) computes 64 rows by all the
    /// tile's columns as warpgroup products; each warp's accumulators lie as `sub` `m16n8`
    /// products' would.
    Warpgroups { warps: [usize; 2], sub: [usize; 2], parts: Parts, in_flight: usize },
}

/// [`Inner`] once the kernel's body exists: the SIMT form knows where its runs start, the
/// tensor-core form its lanes.
enum Step {
    Simt {
        rm: usize,
        rn: usize,
        wx: usize,
        wy: usize,
        vec: usize,
        my_row: String,
        my_col: String,
    },
    /// `adjacent`: whether a 16-bit register's pair lies next to each other in the A and the B
    /// tile; `matrices`: where 16-bit fragments are read with `ldmatrix` instead.
    TensorCores {
        sub: [usize; 2],
        lanes: Box<Lanes>,
        parts: Parts,
        adjacent: [bool; 2],
        matrices: Option<Matrices>,
    },
    /// Warpgroup products: the accumulators lie as `sub` `m16n8` products' of each warp.
    Warpgroups {
        sub: [usize; 2],
        lanes: Box<Lanes>,
        group: Box<Warpgroup>,
    },
}

/// What this invocation's warpgroup needs for its products.
struct Warpgroup {
    precision: MmaPrecision,
    /// How A's and B's tiles lie for the products.
    descriptors: [Descriptor; 2],
    /// Where this warpgroup's A rows start in a stage (elements).
    a_group: String,
    /// The warp's first row in the warpgroup's 64.
    warp_rows: String,
    /// The shared arrays' byte addresses (NVVM; `None` where the products are emulated).
    addresses: Option<[String; 2]>,
    /// Groups of products left running at the end of a step.
    in_flight: usize,
}

impl Warpgroup {
    /// The warpgroup of the warp `lanes` places: the warps stack along m, 16 rows each, so
    /// its warpgroup's first A row is the warp's first row rounded down to 64, and the warp's
    /// first row in the warpgroup's is what remains.
    fn new(
        b: &mut Body,
        lanes: &Lanes,
        precision: MmaPrecision,
        [la, lb]: [&SharedLayout; 2],
        addresses: Option<[String; 2]>,
        in_flight: usize,
    ) -> Warpgroup {
        let elem = precision.shared_bytes();
        let c64 = b.index(WGMMA_M);
        let group = b.assign(format!("arith.divui {}, {c64} : index", lanes.warp_row));
        let a_rows = b.index(la.offset(WGMMA_M, 0));
        let a_group = b.assign(format!("arith.muli {group}, {a_rows} : index"));
        let warp_rows = b.assign(format!("arith.remui {}, {c64} : index", lanes.warp_row));
        let descriptors = [Descriptor::of_a(la, elem), Descriptor::of_b(lb, elem)];
        Warpgroup { precision, descriptors, a_group, warp_rows, addresses, in_flight }
    }
}

/// The shared tiles' pointers `ldmatrix` reads from (NVVM; `None` where it is emulated).
struct Matrices {
    pointers: Option<[String; 2]>,
}

impl Step {
    /// Steps whose products may still run when the next step begins.
    fn in_flight(&self) -> usize {
        match self {
            Step::Warpgroups { group, .. } => group.in_flight,
            Step::Simt { .. } | Step::TensorCores { .. } => 0,
        }
    }

    /// Accumulators per invocation.
    fn accumulators(&self) -> usize {
        match self {
            Step::Simt { rm, rn, .. } => rm * rn,
            Step::TensorCores { sub, .. } | Step::Warpgroups { sub, .. } => {
                sub[0] * sub[1] * C_FRAGMENT.len()
            }
        }
    }

    /// The tile row and column of accumulator `acc` of this invocation. SIMT accumulator
    /// `i·rn + j` is row `i` and column `j` of the invocation's block; its run `i / vec`
    /// starts `vec·wy` rows after the previous one.
    fn position(&self, b: &mut Body, acc: usize) -> (String, String) {
        match self {
            Step::Simt { rn, wx, wy, vec, my_row, my_col, .. } => {
                let (i, j) = (acc / rn, acc % rn);
                let row = plus(b, my_row, (i / vec) * vec * wy + i % vec);
                let col = plus(b, my_col, (j / vec) * vec * wx + j % vec);
                (row, col)
            }
            Step::TensorCores { sub, lanes: l, .. } | Step::Warpgroups { sub, lanes: l, .. } => {
                let per = C_FRAGMENT.len();
                let (tile, e) = (acc / per, acc % per);
                let (i, j) = (tile / sub[1], tile % sub[1]);
                let (dr, dc) = C_FRAGMENT[e];
                let row = l.at(b, &l.warp_row, i * MMA_M + dr, &l.group, 1);
                let col = l.at(b, &l.warp_col, j * MMA_N + dc, &l.in_group, 2);
                (row, col)
            }
        }
    }

    /// One k tile from the stages at the given offsets: returns the accumulators after it
    /// (carried in as `%o…`).
    fn step(
        &self,
        b: &mut Body,
        a: (&SharedArray, &str, SharedLayout),
        bb: (&SharedArray, &str, SharedLayout),
        tk: usize,
        ty: &str,
    ) -> Vec<String> {
        match self {
            Step::Simt { rm, rn, wx, wy, vec, my_row, my_col } => {
                let st = SimtStep { rm: *rm, rn: *rn, wx: *wx, wy: *wy, vec: *vec, tk };
                simt_step(b, &st, (my_row, my_col), a, bb, ty)
            }
            Step::TensorCores { sub, lanes, parts, adjacent, matrices } => {
                mma_step(b, lanes, *parts, (*sub, *adjacent, matrices.as_ref()), tk, a, bb)
            }
            Step::Warpgroups { sub, lanes, group } => warpgroup_step(b, (*sub, lanes), group, tk, a, bb),
        }
    }
}

/// One k tile as warpgroup products: per 16 of k (8 of TF32), this warpgroup's 64 rows of A
/// times the tile's B, each named by a descriptor of the stage (NVVM: `wgmma`, fenced before
/// and committed after, `in_flight` groups left running), or emulated by each invocation from
/// the same descriptors. TF32×3 operands multiply as three products, their low parts' tiles
/// (right after each stage's operand tile) with the high parts' first, so the small terms are
/// not lost to the large. Returns the accumulators after the tile (carried in as `%o…`).
fn warpgroup_step(
    b: &mut Body,
    (sub, lanes): ([usize; 2], &Lanes),
    group: &Warpgroup,
    tk: usize,
    (ma, sa, la): (&SharedArray, &str, SharedLayout),
    (mb, sb, lb): (&SharedArray, &str, SharedLayout),
) -> Vec<String> {
    let Warpgroup { precision, descriptors, a_group, warp_rows, addresses, in_flight } = group;
    let per = C_FRAGMENT.len();
    let mut acc: Vec<String> = (0..sub[0] * sub[1] * per).map(|i| format!("%o{i}")).collect();
    let a_stage = b.assign(format!("arith.addi {sa}, {a_group} : index"));
    if addresses.is_some() {
        wgmma::fence(b);
    }
    let [da, db] = descriptors;
    // (A's part, B's part) of each product: 0 the operand's tile, 1 its low parts'.
    let products: &[(usize, usize)] = match precision {
        MmaPrecision::Tf32x3 => &[(1, 0), (0, 1), (0, 0)],
        MmaPrecision::Tf32 | MmaPrecision::F16 | MmaPrecision::Bf16 => &[(0, 0)],
    };
    for kk in (0..tk).step_by(precision.warpgroup_k() as usize) {
        for &(pa, pb) in products {
            let at_a = plus(b, &a_stage, la.offset(0, kk) + pa * la.len);
            let at_b = plus(b, sb, lb.offset(kk, 0) + pb * lb.len);
            acc = match addresses {
                Some([base_a, base_b]) => {
                    let elem = precision.shared_bytes();
                    let dva = wgmma::descriptor(b, base_a, &at_a, elem, da);
                    let dvb = wgmma::descriptor(b, base_b, &at_b, elem, db);
                    wgmma::product(b, *precision, (&dva, &dvb), [da, db], &acc)
                }
                None => {
                    wgmma::emulated(b, lanes, *precision, (ma, &at_a, da), (mb, &at_b, db), warp_rows, &acc)
                }
            };
        }
    }
    if addresses.is_some() {
        wgmma::commit(b, *in_flight);
    }
    acc
}

/// The sizes the SIMT inner product needs.
struct SimtStep {
    rm: usize,
    rn: usize,
    wx: usize,
    wy: usize,
    vec: usize,
    tk: usize,
}

/// One k tile on the SIMT path, unrolled: for each k of the tile, every invocation reads its
/// `rm` A values (A is k-major in shared memory) and `rn` B values in runs of `vec`, and
/// multiplies them into its accumulators.
fn simt_step(
    b: &mut Body,
    st: &SimtStep,
    (my_row, my_col): (&str, &str),
    (ma, sa, la): (&SharedArray, &str, SharedLayout),
    (mb, sb, lb): (&SharedArray, &str, SharedLayout),
    ty: &str,
) -> Vec<String> {
    let SimtStep { rm, rn, wx, wy, vec, tk } = *st;
    let mut acc: Vec<String> = (0..rm * rn).map(|i| format!("%o{i}")).collect();
    let a0 = b.assign(format!("arith.addi {sa}, {my_row} : index"));
    let b0 = b.assign(format!("arith.addi {sb}, {my_col} : index"));
    for kk in 0..tk {
        let a_vals: Vec<String> = (0..rm / vec)
            .flat_map(|i| {
                let at = plus(b, &a0, kk * la.col + i * vec * wy * la.row);
                ma.read(b, &at, vec, ty)
            })
            .collect();
        let b_vals: Vec<String> = (0..rn / vec)
            .flat_map(|j| {
                let at = plus(b, &b0, kk * lb.row + j * vec * wx * lb.col);
                mb.read(b, &at, vec, ty)
            })
            .collect();
        for (i, av) in a_vals.iter().enumerate() {
            for (j, bw) in b_vals.iter().enumerate() {
                let x = &mut acc[i * rn + j];
                *x = b.fma(av, bw, x, ty);
            }
        }
    }
    acc
}

/// One k tile on tensor cores: for each k step of the products (8 or 16), every warp loads its
/// A fragments (one per 16-row block) and B fragments (one per 8-column block) from shared
/// memory, where they were stored already at the products' precision (or are split as they
/// are read), and runs `sub[0] × sub[1]` `mma.sync` products into its
/// accumulators (carried as `%o…`, 4 per product). Returns the accumulators after the tile.
fn mma_step(
    b: &mut Body,
    l: &Lanes,
    ops: Parts,
    (sub, adjacent, matrices): ([usize; 2], [bool; 2], Option<&Matrices>),
    tk: usize,
    (ma, sa, la): (&SharedArray, &str, SharedLayout),
    (mb, sb, lb): (&SharedArray, &str, SharedLayout),
) -> Vec<String> {
    let per = C_FRAGMENT.len();
    let mut acc: Vec<String> = (0..sub[0] * sub[1] * per).map(|i| format!("%o{i}")).collect();
    let frag = l.frag;
    // A fragment (row, col) of the warp's block at `a_lane + row·la.row + col·la.col`.
    let k_lane = l.k_lane(b);
    let a_lane = {
        let r = l.at(b, &l.warp_row, 0, &l.group, 1);
        let at = offset_at(b, 0, &[(Some(&r), la.row), (Some(&k_lane), la.col)]);
        b.assign(format!("arith.addi {sa}, {at} : index"))
    };
    let b_lane = {
        let c = l.at(b, &l.warp_col, 0, &l.group, 1);
        let at = offset_at(b, 0, &[(Some(&k_lane), lb.row), (Some(&c), lb.col)]);
        b.assign(format!("arith.addi {sb}, {at} : index"))
    };
    for kk in (0..tk).step_by(frag.k) {
        if let Some(mx) = matrices {
            let (a_frags, b_frags) = matrix_fragments(b, l, &ops, mx, (sub, kk), (ma, sa, la), (mb, sb, lb));
            for (i, af) in a_frags.iter().enumerate() {
                for (j, bf) in b_frags.iter().enumerate() {
                    let base = (i * sub[1] + j) * per;
                    let d = mma_parts(b, l, af, bf, &acc[base..base + per]);
                    acc[base..base + per].clone_from_slice(&d);
                }
            }
            continue;
        }
        let a_frags: Vec<Fragment> = (0..sub[0])
            .map(|i| {
                let mut at = |b: &mut Body, dr: usize, dc: usize| {
                    plus(b, &a_lane, (i * MMA_M + dr) * la.row + (kk + dc) * la.col)
                };
                l.read(b, &ops, ma, frag.a, adjacent[0], &mut at)
            })
            .collect();
        let b_frags: Vec<Fragment> = (0..sub[1])
            .map(|j| {
                let mut at = |b: &mut Body, dr: usize, dc: usize| {
                    plus(b, &b_lane, (kk + dr) * lb.row + (j * MMA_N + dc) * lb.col)
                };
                l.read(b, &ops, mb, frag.b, adjacent[1], &mut at)
            })
            .collect();
        for (i, af) in a_frags.iter().enumerate() {
            for (j, bf) in b_frags.iter().enumerate() {
                let base = (i * sub[1] + j) * per;
                let d = mma_parts(b, l, af, bf, &acc[base..base + per]);
                acc[base..base + per].clone_from_slice(&d);
            }
        }
    }
    acc
}

/// The warp's 16-bit A fragments (one `ldmatrix` each: rows 0–7 and 8–15 of its 16-row block
/// at k 0–7 and 8–15) and B fragments (one `ldmatrix` per two 8-column blocks: k 0–7 and 8–15
/// of each, read transposed from a row-major B) at k step `kk` of the stages at `sa` and `sb`.
/// Lane `8j + i` names row `i` of matrix `j`; `j % 2` and `j / 2` pick the block.
#[allow(clippy::type_complexity)]
fn matrix_fragments(
    b: &mut Body,
    l: &Lanes,
    ops: &Parts,
    mx: &Matrices,
    (sub, kk): ([usize; 2], usize),
    (ma, sa, la): (&SharedArray, &str, SharedLayout),
    (mb, sb, lb): (&SharedArray, &str, SharedLayout),
) -> (Vec<Fragment>, Vec<Fragment>) {
    let [pa, pb] = match &mx.pointers {
        Some([a, bp]) => [Some(a.as_str()), Some(bp.as_str())],
        None => [None, None],
    };
    let a_frags = (0..sub[0])
        .map(|i| {
            let mut row_at = |b: &mut Body, r: &str, h: &str, q: &str| {
                let row = plus(b, &l.warp_row, i * MMA_M);
                let row = b.assign(format!("arith.addi {row}, {r} : index"));
                let row = eight(b, &row, h);
                let c0 = b.index(kk);
                let col = eight(b, &c0, q);
                let at = offset_at(b, 0, &[(Some(&row), la.row), (Some(&col), la.col)]);
                b.assign(format!("arith.addi {sa}, {at} : index"))
            };
            joined(&l.ldmatrix(b, ops, ma, pa, false, &mut row_at))
        })
        .collect();
    // A row-major B holds 8 columns of a k row adjacent: read transposed. A transposed one
    // holds 8 k of a column adjacent: its rows are B's columns.
    let trans = lb.col == 1;
    let mut b_frags = Vec::with_capacity(sub[1]);
    for jp in (0..sub[1]).step_by(2) {
        let mut row_at = |b: &mut Body, r: &str, h: &str, q: &str| {
            let col = plus(b, &l.warp_col, jp * MMA_N);
            let k0 = b.index(kk);
            let (k, n) = if trans {
                let k = b.assign(format!("arith.addi {k0}, {r} : index"));
                (eight(b, &k, h), eight(b, &col, q))
            } else {
                let n = b.assign(format!("arith.addi {col}, {r} : index"));
                (eight(b, &k0, h), eight(b, &n, q))
            };
            let at = offset_at(b, 0, &[(Some(&k), lb.row), (Some(&n), lb.col)]);
            b.assign(format!("arith.addi {sb}, {at} : index"))
        };
        let m = l.ldmatrix(b, ops, mb, pb, trans, &mut row_at);
        b_frags.push(joined(&m[0..2]));
        b_frags.push(joined(&m[2..4]));
    }
    (a_frags, b_frags)
}
