//! Fused elementwise loops: one kernel evaluates a whole tree of elementwise ops per element.
//!
//! Axes that every operand walks in the same order are merged first, so most kernels become a
//! loop over rows (the parallel range) around a loop over one contiguous run, which LLVM
//! vectorizes; the math helpers of [`crate::mlir_text`] are plain arithmetic, so `exp`, `erf`
//! and `tanh` vectorize too. Values are computed in registers in their own type, except f16
//! and bf16, which are computed in f32 and rounded after every op (as the interpreter does).
//!
//! An integer division whose divisor can be zero is a fault site (`kiln_sched::Faults`): it
//! still gives 0 there, and records the fault in the slot the kernel then takes as its last
//! argument (atomic unsigned minimums of the site and of the element, in a branch taken only
//! on a zero divisor). Kernels without a site are unchanged.

use super::View;
use crate::mlir_text::Body;
use crate::{CodegenError, Kernel};
use kiln_ir::{BinaryOp, CompareOp, DType, GeluApprox, Op, UnaryOp};
use kiln_sched::Expr;

/// Elements per range iteration when the whole kernel is one contiguous run.
pub(crate) const CHUNK: usize = 4096;

/// The register type a dtype is computed in.
pub(crate) fn reg_type(d: DType) -> &'static str {
    match d {
        DType::F32 | DType::F16 | DType::BF16 => "f32",
        DType::F64 => "f64",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::Bool => "i1",
    }
}

/// Loads element `idx` of `v`'s buffer `arg` into its register type. A buffer bound in pieces
/// ([`crate::mlir_text::Split`]) is read from every piece at a clamped index, and the right
/// piece's value selected.
pub(crate) fn load(b: &mut Body, arg: &str, v: &View, idx: &str) -> String {
    let x = match b.split_of(arg).cloned() {
        None => b.assign(format!("memref.load {arg}[{idx}] : {}", v.memref())),
        Some(split) => {
            let len = b.index(split.piece_len);
            let piece = b.assign(format!("arith.divui {idx}, {len} : index"));
            let local = b.assign(format!("arith.remui {idx}, {len} : index"));
            let elem = v.elem();
            let mut value: Option<String> = None;
            for k in (0..split.pieces()).rev() {
                let n = split.len_of(k);
                let last = b.index(n.saturating_sub(1));
                let at = b.assign(format!("arith.minui {local}, {last} : index"));
                let x = b.assign(format!("memref.load {arg}_{k}[{at}] : memref<{}x{elem}>", n.max(1)));
                value = Some(match value {
                    None => x,
                    Some(later) => {
                        let kc = b.index(k);
                        let here = b.assign(format!("arith.cmpi eq, {piece}, {kc} : index"));
                        b.assign(format!("arith.select {here}, {x}, {later} : {elem}"))
                    }
                });
            }
            value.unwrap_or_default()
        }
    };
    to_reg(b, &x, v.dtype)
}

/// A loaded element of dtype `d` in its register type ([`reg_type`]).
pub(crate) fn to_reg(b: &mut Body, x: &str, d: DType) -> String {
    match d {
        DType::Bool => b.assign(format!("arith.trunci {x} : i8 to i1")),
        DType::F16 => b.assign(format!("arith.extf {x} : f16 to f32")),
        DType::BF16 => b.assign(format!("arith.extf {x} : bf16 to f32")),
        _ => x.to_string(),
    }
}

/// Stores register value `x` of dtype `d` at `idx` of buffer `arg`.
pub(crate) fn store(b: &mut Body, x: &str, arg: &str, v: &View, idx: &str) {
    let m = match v.dtype {
        DType::Bool => b.assign(format!("arith.extui {x} : i1 to i8")),
        DType::F16 => b.assign(format!("arith.truncf {x} : f32 to f16")),
        DType::BF16 => b.assign(format!("arith.truncf {x} : f32 to bf16")),
        _ => x.to_string(),
    };
    b.line(format!("memref.store {m}, {arg}[{idx}] : {}", v.memref()));
}

/// Rounds an f32 register value to `d` when `d` is a half type (and back to f32).
fn round_to(b: &mut Body, x: String, d: DType) -> String {
    let half = match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => return x,
    };
    let t = b.assign(format!("arith.truncf {x} : f32 to {half}"));
    b.assign(format!("arith.extf {t} : {half} to f32"))
}

/// Merges adjacent axes that every view walks contiguously, and drops extent-1 axes.
pub(crate) fn coalesce(views: &[View]) -> Vec<View> {
    let shape = &views[0].shape;
    let keep: Vec<usize> = (0..shape.len()).filter(|&k| shape[k] != 1).collect();
    let mut out: Vec<View> = views
        .iter()
        .map(|v| View {
            shape: keep.iter().map(|&k| v.shape[k]).collect(),
            strides: keep.iter().map(|&k| v.strides[k]).collect(),
            ..v.clone()
        })
        .collect();
    let mut k = 0;
    while k + 1 < out[0].shape.len() {
        if out.iter().all(|v| v.strides[k] == v.strides[k + 1] * v.shape[k + 1]) {
            for v in &mut out {
                v.shape[k] *= v.shape[k + 1];
                v.strides[k] = v.strides[k + 1];
                v.shape.remove(k + 1);
                v.strides.remove(k + 1);
            }
        } else {
            k += 1;
        }
    }
    out
}

/// Emits the kernel for `expr` over `inputs` (broadcast to the output's shape) into `out`.
/// Arguments: the inputs in order, then the output, then `slot` (the schedule's fault words)
/// when `expr` holds a fault site.
///
/// `in_place` names the input that is the output itself (the same buffer and view: an
/// optimizer's update written over the state it reads). The kernel then stores through that
/// input's argument, so LLVM sees each element read and written at one address and vectorizes
/// the loop; through two arguments, its runtime overlap check would fail and leave the scalar
/// loop running.
pub fn emit(
    symbol: &str,
    expr: &Expr,
    inputs: &[View],
    out: &View,
    in_place: Option<usize>,
    slot: Option<&View>,
) -> Result<Kernel, CodegenError> {
    if let Some(i) = in_place {
        if inputs.get(i) != Some(out) {
            return Err(CodegenError::Unsupported(format!(
                "elementwise kernel written in place over input {i}, whose view is not the output's"
            )));
        }
    }
    let positional = matches!(expr, Expr::Iota { .. });
    let mut all: Vec<View> = inputs.to_vec();
    all.push(out.clone());
    // Iota needs the original axes; everything else walks merged ones.
    let views = if positional {
        all.iter()
            .map(|v| {
                if v.shape.is_empty() {
                    View { shape: vec![1], strides: vec![0], ..v.clone() }
                } else {
                    v.clone()
                }
            })
            .collect()
    } else {
        coalesce(&all)
    };
    let views: Vec<View> = views
        .into_iter()
        .map(|v| if v.shape.is_empty() { View { shape: vec![1], strides: vec![0], ..v } } else { v })
        .collect();
    let rank = views[0].rank();
    let numel = out.numel();
    let inner = views[0].shape[rank - 1];
    // One contiguous run → chunks of it; otherwise one row per range iteration.
    let (range, row_len) = if rank == 1 {
        (numel.div_ceil(CHUNK).max(1), CHUNK.min(inner))
    } else {
        (numel / inner.max(1), inner)
    };

    let mut b = Body::new();
    let c0 = b.index(0);
    let c1 = b.index(1);
    let args: Vec<String> = (0..views.len()).map(|i| format!("%a{i}")).collect();
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let (bases, count, lin0) = if rank == 1 {
        let chunk = b.index(row_len);
        let start = b.assign(format!("arith.muli %r, {chunk} : index"));
        let total = b.index(numel);
        let left = b.assign(format!("arith.subi {total}, {start} : index"));
        let count = b.assign(format!("arith.minui {left}, {chunk} : index"));
        let bases: Vec<String> = views
            .iter()
            .map(|v| {
                let off = b.index(v.offset);
                let s = b.index(v.strides[0]);
                let t = b.assign(format!("arith.muli {start}, {s} : index"));
                b.assign(format!("arith.addi {off}, {t} : index"))
            })
            .collect();
        (bases, count, start)
    } else {
        let bases: Vec<String> =
            views.iter().map(|v| v.leading_offset_expr(&mut b, "%r", rank - 1)).collect();
        let count = b.index(inner);
        let lin0 = b.assign(format!("arith.muli %r, {count} : index"));
        (bases, count, lin0)
    };
    b.open(format!("scf.for %j = {c0} to {count} step {c1}"));
    let idx: Vec<String> = views
        .iter()
        .zip(&bases)
        .map(|(v, base)| match v.strides[rank - 1] {
            0 => base.clone(),
            1 => b.assign(format!("arith.addi {base}, %j : index")),
            s => {
                let s = b.index(s);
                let t = b.assign(format!("arith.muli %j, {s} : index"));
                b.assign(format!("arith.addi {base}, {t} : index"))
            }
        })
        .collect();
    let lin = b.assign(format!("arith.addi {lin0}, %j : index"));
    let slot_arg = format!("%a{}", views.len());
    let fault = slot.map(|v| FaultSlot { arg: &slot_arg, memref: v.memref() });
    let mut ctx = Ctx {
        inputs: &views[..views.len() - 1],
        args: &args,
        idx: &idx,
        lin: &lin,
        out_shape: &out.shape,
        fault,
    };
    let value = eval(&mut b, &mut ctx, expr)?;
    let o = in_place.unwrap_or(views.len() - 1);
    store(&mut b, &value.0, &args[o], &views[o], &idx[o]);
    b.close("");
    b.close("");
    b.line("return");

    let mut params: Vec<String> =
        views.iter().zip(&args).map(|(v, a)| format!("{a}: {}", v.memref())).collect();
    if let Some(v) = slot {
        params.push(format!("{slot_arg}: {}", v.memref()));
    }
    let mlir = format!(
        "func.func @{symbol}({}, %begin: index, %end: index) {{\n{}}}\n",
        params.join(", "),
        b.finish()
    );
    let flops = (numel * expr.op_count().max(1)) as u64;
    let bytes = (inputs.iter().chain([out]).map(|v| v.numel() * v.dtype.size_bytes()).sum::<usize>()) as u64;
    Ok(Kernel { symbol: symbol.into(), mlir, range, grain: Kernel::grain_for(range, bytes), flops, bytes })
}

/// Where the element being computed is: each input's view and argument name, each operand's
/// buffer index for this element, its row-major position and the output's shape.
pub(crate) struct Ctx<'a> {
    pub inputs: &'a [View],
    pub args: &'a [String],
    pub idx: &'a [String],
    /// Row-major position of the element in the output.
    pub lin: &'a str,
    pub out_shape: &'a [usize],
    /// Where fault sites record, when the kernel has any.
    pub fault: Option<FaultSlot<'a>>,
}

/// The fault words a kernel with fault sites takes as its last argument.
pub(crate) struct FaultSlot<'a> {
    /// The argument's SSA name.
    pub arg: &'a str,
    /// Its type (`memref<Nxi32>`).
    pub memref: String,
}

/// Records a fault at `site` for the current element when `divisor` (of register type `ty`)
/// is zero: word `1 + site` keeps the lowest faulting element, word 0 the lowest faulting
/// site (see `kiln_sched::Faults`).
fn record_zero_divisor(
    b: &mut Body,
    c: &Ctx,
    site: usize,
    divisor: &str,
    ty: &str,
) -> Result<(), CodegenError> {
    let slot = c.fault.as_ref().ok_or_else(|| {
        CodegenError::Unsupported("an elementwise kernel with a fault site but no fault slot".into())
    })?;
    let zero = b.int(0, ty);
    let hit = b.assign(format!("arith.cmpi eq, {divisor}, {zero} : {ty}"));
    b.open(format!("scf.if {hit}"));
    // GPU indices are 32 bits already; a CPU element past u32::MAX is saturated (the runtime
    // then reports no element).
    let lin = match b.gpu() {
        Some(_) => c.lin.to_string(),
        None => {
            let max = b.index(u32::MAX as usize);
            b.assign(format!("arith.minui {}, {max} : index", c.lin))
        }
    };
    let element = b.assign(format!("arith.index_cast {lin} : index to i32"));
    let word = b.index(1 + site);
    b.assign(format!(
        "memref.atomic_rmw minu {element}, {}[{word}] : (i32, {}) -> i32",
        slot.arg, slot.memref
    ));
    let number = b.int(site as i64, "i32");
    let first = b.index(0);
    b.assign(format!(
        "memref.atomic_rmw minu {number}, {}[{first}] : (i32, {}) -> i32",
        slot.arg, slot.memref
    ));
    b.close("");
    Ok(())
}

/// Evaluates `e` for the current element; returns the register value and its dtype.
pub(crate) fn eval(b: &mut Body, c: &mut Ctx, e: &Expr) -> Result<(String, DType), CodegenError> {
    Ok(match e {
        Expr::Operand(i) => {
            let v = &c.inputs[*i];
            (load(b, &c.args[*i], v, &c.idx[*i]), v.dtype)
        }
        Expr::Scalar { value, dtype } => (constant(b, *value, *dtype), *dtype),
        Expr::Iota { axis, dtype } => {
            let stride: usize = c.out_shape[axis + 1..].iter().product();
            let s = b.index(stride);
            let d = b.index(c.out_shape[*axis]);
            let q = b.assign(format!("arith.divui {}, {s} : index", c.lin));
            let i = b.assign(format!("arith.remui {q}, {d} : index"));
            let i64v = b.assign(format!("arith.index_cast {i} : index to i64"));
            (convert(b, &i64v, DType::I64, *dtype), *dtype)
        }
        Expr::Random { seed, offset, base, dtype } => {
            let base = match base {
                Some(i) => {
                    let v = &c.inputs[*i];
                    Some(load(b, &c.args[*i], v, &c.idx[*i]))
                }
                None => None,
            };
            let u = random(b, *seed, *offset, base.as_deref(), c.lin);
            let v = convert(b, &u, DType::F64, *dtype);
            // Rounding to a narrower float can reach 1.0: keep the largest value below it,
            // as the interpreter does.
            let below_one = match dtype {
                DType::F32 => Some(1.0 - f64::powi(2.0, -24)),
                DType::F16 => Some(1.0 - f64::powi(2.0, -11)),
                DType::BF16 => Some(1.0 - f64::powi(2.0, -8)),
                _ => None,
            };
            let v = match below_one {
                Some(m) => {
                    let ty = reg_type(*dtype);
                    let m = b.float(m, ty);
                    b.fmin(&v, &m, ty)
                }
                None => v,
            };
            (v, *dtype)
        }
        Expr::Apply { op, args, dtype, fault } => {
            let mut vals = Vec::with_capacity(args.len());
            for a in args {
                vals.push(eval(b, c, a)?);
            }
            if let (Some(site), Some((divisor, d))) = (fault, vals.get(1)) {
                record_zero_divisor(b, c, *site, divisor, reg_type(*d))?;
            }
            (apply(b, op, &vals, *dtype)?, *dtype)
        }
    })
}

/// A constant in `d`'s register type.
pub(crate) fn constant(b: &mut Body, v: f64, d: DType) -> String {
    match d {
        DType::Bool => b.int(i64::from(v != 0.0), "i1"),
        DType::I32 | DType::I64 => b.int(v as i64, reg_type(d)),
        DType::F16 => b.float(half::f16::from_f64(v).to_f64(), "f32"),
        DType::BF16 => b.float(half::bf16::from_f64(v).to_f64(), "f32"),
        _ => b.float(v, reg_type(d)),
    }
}

/// `kiln_ir::rng::uniform(seed, 0, offset + base + lin)` as f64 (`base` an i64 register, when the op has one), the interpreter's `random_uniform`
/// (the stream key is folded at compile time).
fn random(b: &mut Body, seed: u64, offset: u64, base: Option<&str>, lin: &str) -> String {
    use kiln_ir::rng::GOLDEN;
    let key = kiln_ir::rng::key(seed, 0);
    let i = b.assign(format!("arith.index_cast {lin} : index to i64"));
    let off = b.int(offset as i64, "i64");
    let mut i = b.assign(format!("arith.addi {i}, {off} : i64"));
    if let Some(base) = base {
        // The counter base (an i64 read from the kernel's input): wraps as the interpreter's.
        i = b.assign(format!("arith.addi {i}, {base} : i64"));
    }
    let one = b.int(1, "i64");
    let golden = b.int(GOLDEN as i64, "i64");
    let i1 = b.assign(format!("arith.addi {i}, {one} : i64"));
    let g = b.assign(format!("arith.muli {i1}, {golden} : i64"));
    let k = b.int(key as i64, "i64");
    let mut z = b.assign(format!("arith.addi {k}, {g} : i64"));
    for (shift, mul) in [(30, Some(0xBF58_476D_1CE4_E5B9u64)), (27, Some(0x94D0_49BB_1331_11EB)), (31, None)]
    {
        let s = b.int(shift, "i64");
        let t = b.assign(format!("arith.shrui {z}, {s} : i64"));
        z = b.assign(format!("arith.xori {z}, {t} : i64"));
        if let Some(m) = mul {
            let m = b.int(m as i64, "i64");
            z = b.assign(format!("arith.muli {z}, {m} : i64"));
        }
    }
    let eleven = b.int(11, "i64");
    let top = b.assign(format!("arith.shrui {z}, {eleven} : i64"));
    let f = b.assign(format!("arith.uitofp {top} : i64 to f64"));
    let scale = b.float(1.0 / (1u64 << 53) as f64, "f64");
    b.fmul(&f, &scale, "f64")
}

/// Converts register value `x` from dtype `from` to `to` with the interpreter's semantics
/// (float → int saturates and maps NaN to 0; → bool is `x != 0`).
pub(crate) fn convert(b: &mut Body, x: &str, from: DType, to: DType) -> String {
    let (rf, rt) = (reg_type(from), reg_type(to));
    let value = match (from, to) {
        _ if rf == rt => x.to_string(),
        (f, t) if f.is_float() && t.is_float() => {
            let op = if rf == "f32" { "arith.extf" } else { "arith.truncf" };
            b.assign(format!("{op} {x} : {rf} to {rt}"))
        }
        (f, DType::Bool) if f.is_float() => {
            let z = b.float(0.0, rf);
            b.assign(format!("arith.cmpf une, {x}, {z} : {rf}"))
        }
        (_, DType::Bool) => {
            let z = b.int(0, rf);
            b.assign(format!("arith.cmpi ne, {x}, {z} : {rf}"))
        }
        (DType::Bool, t) if t.is_float() => b.assign(format!("arith.uitofp {x} : i1 to {rt}")),
        (DType::Bool, _) => b.assign(format!("arith.extui {x} : i1 to {rt}")),
        (f, t) if f.is_int() && t.is_float() => b.assign(format!("arith.sitofp {x} : {rf} to {rt}")),
        (f, t) if f.is_int() && t.is_int() => {
            let op = if rf == "i32" { "arith.extsi" } else { "arith.trunci" };
            b.assign(format!("{op} {x} : {rf} to {rt}"))
        }
        _ => {
            // float → int as the interpreter's `as`: truncate toward zero, saturating (±inf and
            // out-of-range values give MIN/MAX), NaN → 0. The integer type's MAX is not a float
            // (2³¹ − 1 and 2⁶³ − 1 round up to 2³¹ and 2⁶³, which `fptosi` cannot convert), so
            // values at or above 2ᵇⁱᵗˢ⁻¹ select MAX instead of being clamped to it; MIN (−2ᵇⁱᵗˢ⁻¹)
            // is exact and clamping to it is enough. `fptosi` only ever sees a value in range.
            let (bits, max) = if rt == "i32" { (31, i64::from(i32::MAX)) } else { (63, i64::MAX) };
            let lo = b.float(-(2f64.powi(bits)), rf);
            let limit = b.float(2f64.powi(bits), rf);
            let zero = b.float(0.0, rf);
            let too_big = b.assign(format!("arith.cmpf oge, {x}, {limit} : {rf}"));
            let is_nan = b.assign(format!("arith.cmpf uno, {x}, {x} : {rf}"));
            let no_value = b.assign(format!("arith.ori {too_big}, {is_nan} : i1"));
            let c = b.fmax(x, &lo, rf);
            let c = b.select(&no_value, &zero, &c, rf);
            let i = b.assign(format!("arith.fptosi {c} : {rf} to {rt}"));
            let max = b.int(max, rt);
            b.select(&too_big, &max, &i, rt)
        }
    };
    match to {
        DType::F16 | DType::BF16 => round_to(b, value, to),
        _ => value,
    }
}

fn apply(b: &mut Body, op: &Op, vals: &[(String, DType)], dtype: DType) -> Result<String, CodegenError> {
    let unsupported = |what: &str| CodegenError::Unsupported(format!("{what} on {dtype}"));
    let ty = reg_type(dtype);
    let result = match op {
        Op::Unary(u) => {
            let x = &vals[0].0;
            if dtype.is_float() {
                match u {
                    UnaryOp::Neg => b.fneg(x, ty),
                    UnaryOp::Abs => b.fabs(x, ty),
                    UnaryOp::Exp => b.exp(x, ty),
                    UnaryOp::Log => b.log(x, ty),
                    UnaryOp::Sqrt => b.sqrt(x, ty),
                    UnaryOp::Rsqrt => b.rsqrt(x, ty),
                    UnaryOp::Recip => {
                        let one = b.float(1.0, ty);
                        b.fdiv(&one, x, ty)
                    }
                    UnaryOp::Tanh => b.tanh(x, ty),
                    UnaryOp::Erf => b.erf(x, ty),
                    UnaryOp::Sin => b.sin(x, ty),
                    UnaryOp::Cos => b.cos(x, ty),
                    UnaryOp::Sigmoid => b.sigmoid(x, ty),
                    UnaryOp::Relu => {
                        let zero = b.float(0.0, ty);
                        let neg = b.fcmp("olt", x, &zero, ty);
                        b.select(&neg, &zero, x, ty)
                    }
                }
            } else if dtype.is_int() {
                let zero = b.int(0, ty);
                match u {
                    UnaryOp::Neg => b.assign(format!("arith.subi {zero}, {x} : {ty}")),
                    UnaryOp::Abs => b.assign(format!("math.absi {x} : {ty}")),
                    UnaryOp::Relu => b.assign(format!("arith.maxsi {x}, {zero} : {ty}")),
                    _ => return Err(unsupported(u.name())),
                }
            } else {
                return Err(unsupported(u.name()));
            }
        }
        Op::Binary(op) => {
            let (x, y) = (&vals[0].0, &vals[1].0);
            if dtype.is_float() {
                match op {
                    BinaryOp::Add => b.fadd(x, y, ty),
                    BinaryOp::Sub => b.fsub(x, y, ty),
                    BinaryOp::Mul => b.fmul(x, y, ty),
                    BinaryOp::Div => b.fdiv(x, y, ty),
                    BinaryOp::Pow => b.powf(x, y, ty),
                    BinaryOp::Max => b.fmax(x, y, ty),
                    BinaryOp::Min => b.fmin(x, y, ty),
                }
            } else if dtype.is_int() {
                match op {
                    BinaryOp::Add => b.assign(format!("arith.addi {x}, {y} : {ty}")),
                    BinaryOp::Sub => b.assign(format!("arith.subi {x}, {y} : {ty}")),
                    BinaryOp::Mul => b.assign(format!("arith.muli {x}, {y} : {ty}")),
                    BinaryOp::Div => {
                        // Never trap: a zero divisor gives 0 (and is recorded at the op's fault
                        // site, see `record_zero_divisor`), MIN / -1 wraps to MIN like
                        // `wrapping_div`.
                        let zero = b.int(0, ty);
                        let one = b.int(1, ty);
                        let minus = b.int(-1, ty);
                        let is_zero = b.assign(format!("arith.cmpi eq, {y}, {zero} : {ty}"));
                        let is_minus = b.assign(format!("arith.cmpi eq, {y}, {minus} : {ty}"));
                        let bad = b.assign(format!("arith.ori {is_zero}, {is_minus} : i1"));
                        let d = b.assign(format!("arith.select {bad}, {one}, {y} : {ty}"));
                        let q = b.assign(format!("arith.divsi {x}, {d} : {ty}"));
                        let neg = b.assign(format!("arith.subi {zero}, {x} : {ty}"));
                        let q = b.assign(format!("arith.select {is_minus}, {neg}, {q} : {ty}"));
                        b.assign(format!("arith.select {is_zero}, {zero}, {q} : {ty}"))
                    }
                    BinaryOp::Max => b.assign(format!("arith.maxsi {x}, {y} : {ty}")),
                    BinaryOp::Min => b.assign(format!("arith.minsi {x}, {y} : {ty}")),
                    BinaryOp::Pow => return Err(unsupported("pow")),
                }
            } else {
                return Err(unsupported(op.name()));
            }
        }
        Op::Compare(cmp) => {
            let (x, y) = (&vals[0].0, &vals[1].0);
            let from = vals[0].1;
            let rt = reg_type(from);
            if from.is_float() {
                let pred = match cmp {
                    CompareOp::Lt => "olt",
                    CompareOp::Le => "ole",
                    CompareOp::Gt => "ogt",
                    CompareOp::Ge => "oge",
                    CompareOp::Eq => "oeq",
                    CompareOp::Ne => "une",
                };
                b.fcmp(pred, x, y, rt)
            } else {
                let signed = from != DType::Bool;
                let pred = match (cmp, signed) {
                    (CompareOp::Lt, true) => "slt",
                    (CompareOp::Le, true) => "sle",
                    (CompareOp::Gt, true) => "sgt",
                    (CompareOp::Ge, true) => "sge",
                    (CompareOp::Lt, false) => "ult",
                    (CompareOp::Le, false) => "ule",
                    (CompareOp::Gt, false) => "ugt",
                    (CompareOp::Ge, false) => "uge",
                    (CompareOp::Eq, _) => "eq",
                    (CompareOp::Ne, _) => "ne",
                };
                b.assign(format!("arith.cmpi {pred}, {x}, {y} : {rt}"))
            }
        }
        Op::Where => b.assign(format!("arith.select {}, {}, {} : {ty}", vals[0].0, vals[1].0, vals[2].0)),
        Op::Cast { to } => return Ok(convert(b, &vals[0].0, vals[0].1, *to)),
        Op::Gelu { approx } => {
            if !dtype.is_float() {
                return Err(unsupported("gelu"));
            }
            b.gelu(&vals[0].0, *approx == GeluApprox::Tanh, ty)
        }
        other => return Err(CodegenError::Unsupported(format!("`{}` in an elementwise loop", other.name()))),
    };
    Ok(round_to(b, result, dtype))
}
