//! Acceptance tests of the reference interpreter: every op with hand-worked expected values.

use half::{bf16, f16};
use kiln_ir::{
    eval, eval_op, infer, BinaryOp, Bindings, Buffer, CompareOp, DType, Dim, EvalError, Graph, Init, Op,
    PoolKind, ReduceOp, Tensor, TensorType, UnaryOp,
};

// ---------------------------------------------------------------------------------------
// helpers

fn t32(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::F32(v.to_vec())).unwrap()
}
fn t64(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::F64(v.to_vec())).unwrap()
}
fn ti32(shape: &[usize], v: &[i32]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::I32(v.to_vec())).unwrap()
}
fn ti64(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::I64(v.to_vec())).unwrap()
}
fn tb(shape: &[usize], v: &[bool]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::Bool(v.to_vec())).unwrap()
}
fn tf16(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::F16(v.iter().map(|&x| f16::from_f32(x)).collect())).unwrap()
}
fn tbf16(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())).unwrap()
}

fn ty_of(op: &Op, args: &[&Tensor]) -> TensorType {
    let types: Vec<TensorType> = args.iter().map(|t| TensorType::new(t.dtype(), t.shape.clone())).collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    infer(op, &refs).unwrap_or_else(|e| panic!("{e}"))
}

fn run(op: Op, args: &[&Tensor]) -> Tensor {
    let ty = ty_of(&op, args);
    let out = eval_op(&op, args, &ty).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.shape, ty.static_shape(), "result shape");
    assert_eq!(out.dtype(), ty.dtype, "result dtype");
    assert_eq!(out.data.len(), ty.numel());
    out
}

fn run_err(op: Op, args: &[&Tensor]) -> EvalError {
    let ty = ty_of(&op, args);
    eval_op(&op, args, &ty).expect_err("expected an error")
}

fn f32s(t: &Tensor) -> &[f32] {
    match &t.data {
        Buffer::F32(v) => v,
        b => panic!("expected f32, got {:?}", b.dtype()),
    }
}
fn f64s(t: &Tensor) -> &[f64] {
    match &t.data {
        Buffer::F64(v) => v,
        b => panic!("expected f64, got {:?}", b.dtype()),
    }
}

#[track_caller]
fn close32(got: &Tensor, shape: &[usize], want: &[f32], tol: f32) {
    assert_eq!(got.shape, shape);
    let g = f32s(got);
    assert_eq!(g.len(), want.len());
    for (i, (&a, &b)) in g.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * b.abs().max(1.0), "element {i}: got {a}, want {b} (all: {g:?})");
    }
}

#[track_caller]
fn close64(got: &Tensor, shape: &[usize], want: &[f64], tol: f64) {
    assert_eq!(got.shape, shape);
    let g = f64s(got);
    assert_eq!(g.len(), want.len());
    for (i, (&a, &b)) in g.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * b.abs().max(1.0), "element {i}: got {a}, want {b} (all: {g:?})");
    }
}

fn un(op: UnaryOp, x: &Tensor) -> Tensor {
    run(Op::Unary(op), &[x])
}
fn bin(op: BinaryOp, a: &Tensor, b: &Tensor) -> Tensor {
    run(Op::Binary(op), &[a, b])
}
fn cmp(op: CompareOp, a: &Tensor, b: &Tensor) -> Tensor {
    run(Op::Compare(op), &[a, b])
}
fn reduce(op: ReduceOp, axes: &[usize], keepdims: bool, x: &Tensor) -> Tensor {
    run(Op::Reduce { op, axes: axes.to_vec(), keepdims }, &[x])
}

/// 0, 1, 2, … as f32 in `shape`.
fn arange32(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    t32(shape, &(0..n).map(|i| i as f32).collect::<Vec<_>>())
}

/// A deterministic pseudo-random f64 tensor in [-1, 1).
fn rand64(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    t64(shape, &(0..n as u64).map(|i| 2.0 * kiln_ir::rng::uniform(seed, 99, i) - 1.0).collect::<Vec<_>>())
}

// ---------------------------------------------------------------------------------------
// unary

#[test]
fn unary_f32_values() {
    let x = t32(&[4], &[0.0, 1.0, -2.0, 0.5]);
    assert_eq!(un(UnaryOp::Neg, &x), t32(&[4], &[-0.0, -1.0, 2.0, -0.5]));
    assert_eq!(un(UnaryOp::Abs, &x), t32(&[4], &[0.0, 1.0, 2.0, 0.5]));
    close32(&un(UnaryOp::Exp, &x), &[4], &[1.0, std::f32::consts::E, 0.135_335_28, 1.648_721_3], 1e-6);
    close32(&un(UnaryOp::Tanh, &x), &[4], &[0.0, 0.761_594_2, -0.964_027_6, 0.462_117_16], 1e-6);
    close32(&un(UnaryOp::Erf, &x), &[4], &[0.0, 0.842_700_8, -0.995_322_3, 0.520_499_9], 1e-6);
    close32(&un(UnaryOp::Sin, &x), &[4], &[0.0, 0.841_470_96, -0.909_297_4, 0.479_425_55], 1e-6);
    close32(&un(UnaryOp::Cos, &x), &[4], &[1.0, 0.540_302_3, -0.416_146_84, 0.877_582_55], 1e-6);
    close32(&un(UnaryOp::Sigmoid, &x), &[4], &[0.5, 0.731_058_6, 0.119_202_92, 0.622_459_3], 1e-6);

    let pos = t32(&[4], &[1.0, std::f32::consts::E, 0.5, 4.0]);
    close32(
        &un(UnaryOp::Log, &pos),
        &[4],
        &[0.0, 1.0, -std::f32::consts::LN_2, 2.0 * std::f32::consts::LN_2],
        1e-6,
    );
    let sq = t32(&[4], &[0.0, 1.0, 4.0, 2.25]);
    assert_eq!(un(UnaryOp::Sqrt, &sq), t32(&[4], &[0.0, 1.0, 2.0, 1.5]));
    let rs = t32(&[4], &[1.0, 4.0, 0.25, 16.0]);
    assert_eq!(un(UnaryOp::Rsqrt, &rs), t32(&[4], &[1.0, 0.5, 2.0, 0.25]));
    let rc = t32(&[4], &[1.0, 2.0, -4.0, 0.5]);
    assert_eq!(un(UnaryOp::Recip, &rc), t32(&[4], &[1.0, 0.5, -0.25, 2.0]));
    let r = t32(&[2, 2], &[-1.0, 0.0, 2.0, -0.5]);
    assert_eq!(un(UnaryOp::Relu, &r), t32(&[2, 2], &[0.0, 0.0, 2.0, 0.0]));
}

#[test]
fn unary_ieee_edge_cases() {
    let x = t32(&[3], &[0.0, -1.0, f32::NAN]);
    let log = un(UnaryOp::Log, &x);
    assert_eq!(f32s(&log)[0], f32::NEG_INFINITY);
    assert!(f32s(&log)[1].is_nan());
    assert_eq!(f32s(&un(UnaryOp::Recip, &x))[0], f32::INFINITY);
    assert!(f32s(&un(UnaryOp::Relu, &x))[2].is_nan(), "relu keeps NaN");
    // sigmoid saturates without NaN
    let big = t32(&[2], &[-200.0, 200.0]);
    assert_eq!(un(UnaryOp::Sigmoid, &big), t32(&[2], &[0.0, 1.0]));
}

#[test]
fn unary_f64_is_precise() {
    let x = t64(&[4], &[1.0, 0.5, -2.0, 3.0]);
    close64(
        &un(UnaryOp::Erf, &x),
        &[4],
        &[
            0.842_700_792_949_714_9,
            0.520_499_877_813_046_5,
            -0.995_322_265_018_952_7,
            0.999_977_909_503_001_4,
        ],
        1e-12,
    );
    close64(&un(UnaryOp::Exp, &t64(&[1], &[1.0])), &[1], &[std::f64::consts::E], 1e-15);
    close64(&un(UnaryOp::Sigmoid, &t64(&[1], &[0.0])), &[1], &[0.5], 0.0);
}

#[test]
fn unary_ints_wrap() {
    let x = ti32(&[4], &[-3, 0, 5, i32::MIN]);
    assert_eq!(un(UnaryOp::Neg, &x), ti32(&[4], &[3, 0, -5, i32::MIN]));
    assert_eq!(un(UnaryOp::Abs, &x), ti32(&[4], &[3, 0, 5, i32::MIN]));
    assert_eq!(un(UnaryOp::Relu, &x), ti32(&[4], &[0, 0, 5, 0]));
    let y = ti64(&[3], &[-7, 8, i64::MIN]);
    assert_eq!(un(UnaryOp::Neg, &y), ti64(&[3], &[7, -8, i64::MIN]));
    assert_eq!(un(UnaryOp::Abs, &y), ti64(&[3], &[7, 8, i64::MIN]));
    assert_eq!(un(UnaryOp::Relu, &y), ti64(&[3], &[0, 8, 0]));
}

#[test]
fn unary_half_types_round_once() {
    // e rounds to 2.71875 in both f16 (ulp 2^-9) and bf16 (ulp 2^-6).
    assert_eq!(un(UnaryOp::Exp, &tf16(&[1], &[1.0])), tf16(&[1], &[2.718_75]));
    assert_eq!(un(UnaryOp::Exp, &tbf16(&[1], &[1.0])), tbf16(&[1], &[2.718_75]));
    // sqrt(2) = 1.41421…: f16 → 1.4140625 (1448/1024), bf16 → 1.4140625 (181/128)
    assert_eq!(un(UnaryOp::Sqrt, &tf16(&[1], &[2.0])), tf16(&[1], &[1.414_062_5]));
    assert_eq!(un(UnaryOp::Sqrt, &tbf16(&[1], &[2.0])), tbf16(&[1], &[1.414_062_5]));
    assert_eq!(un(UnaryOp::Neg, &tf16(&[2], &[1.5, -2.0])), tf16(&[2], &[-1.5, 2.0]));
}

// ---------------------------------------------------------------------------------------
// binary

#[test]
fn binary_broadcasting_shapes() {
    let a = t32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let row = t32(&[3], &[10.0, 20.0, 30.0]);
    assert_eq!(bin(BinaryOp::Add, &a, &row), t32(&[2, 3], &[11.0, 22.0, 33.0, 14.0, 25.0, 36.0]));
    // lower rank on the left
    assert_eq!(bin(BinaryOp::Sub, &row, &a), t32(&[2, 3], &[9.0, 18.0, 27.0, 6.0, 15.0, 24.0]));
    // [2,1] + [1,3]
    let col = t32(&[2, 1], &[1.0, 2.0]);
    let r13 = t32(&[1, 3], &[10.0, 20.0, 30.0]);
    assert_eq!(bin(BinaryOp::Add, &col, &r13), t32(&[2, 3], &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]));
    // scalars on either side
    let s = t32(&[], &[3.0]);
    assert_eq!(bin(BinaryOp::Mul, &a, &s), t32(&[2, 3], &[3.0, 6.0, 9.0, 12.0, 15.0, 18.0]));
    let ten = t32(&[], &[10.0]);
    assert_eq!(bin(BinaryOp::Sub, &ten, &row), t32(&[3], &[0.0, -10.0, -20.0]));
    assert_eq!(bin(BinaryOp::Add, &s, &ten), t32(&[], &[13.0]));
    // [2,1,2] + [3,1] -> [2,3,2]
    let x = t32(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let y = t32(&[3, 1], &[10.0, 20.0, 30.0]);
    assert_eq!(
        bin(BinaryOp::Add, &x, &y),
        t32(&[2, 3, 2], &[11.0, 12.0, 21.0, 22.0, 31.0, 32.0, 13.0, 14.0, 23.0, 24.0, 33.0, 34.0])
    );
    // a [1]-shaped operand against a rank-2 one
    let one = t32(&[1], &[2.0]);
    assert_eq!(bin(BinaryOp::Div, &a, &one), t32(&[2, 3], &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]));
}

#[test]
fn binary_broadcast_matches_reference() {
    // [4,1,5,3] op [6,1,3] against an index-by-index reference
    let a = rand64(&[4, 1, 5, 3], 1);
    let b = rand64(&[6, 1, 3], 2);
    let out = bin(BinaryOp::Sub, &a, &b);
    assert_eq!(out.shape, vec![4, 6, 5, 3]);
    let (av, bv, ov) = (f64s(&a), f64s(&b), f64s(&out));
    for i in 0..4 {
        for j in 0..6 {
            for k in 0..5 {
                for l in 0..3 {
                    let want = av[(i * 5 + k) * 3 + l] - bv[j * 3 + l];
                    assert_eq!(ov[((i * 6 + j) * 5 + k) * 3 + l], want);
                }
            }
        }
    }
}

#[test]
fn binary_f32_ops() {
    let a = t32(&[4], &[2.0, 3.0, -4.0, 4.0]);
    let b = t32(&[4], &[3.0, 2.0, 2.0, 0.5]);
    assert_eq!(bin(BinaryOp::Mul, &a, &b), t32(&[4], &[6.0, 6.0, -8.0, 2.0]));
    assert_eq!(bin(BinaryOp::Div, &a, &b), t32(&[4], &[2.0 / 3.0, 1.5, -2.0, 8.0]));
    assert_eq!(bin(BinaryOp::Pow, &a, &b), t32(&[4], &[8.0, 9.0, 16.0, 2.0]));
    assert_eq!(bin(BinaryOp::Max, &a, &b), t32(&[4], &[3.0, 3.0, 2.0, 4.0]));
    assert_eq!(bin(BinaryOp::Min, &a, &b), t32(&[4], &[2.0, 2.0, -4.0, 0.5]));
    // float division by zero is IEEE, not an error
    let z = bin(BinaryOp::Div, &t32(&[2], &[1.0, 0.0]), &t32(&[], &[0.0]));
    assert_eq!(f32s(&z)[0], f32::INFINITY);
    assert!(f32s(&z)[1].is_nan());
}

#[test]
fn binary_max_min_propagate_nan() {
    let a = t32(&[3], &[1.0, f32::NAN, 3.0]);
    let b = t32(&[3], &[2.0, 0.0, f32::NAN]);
    let mx = bin(BinaryOp::Max, &a, &b);
    let mn = bin(BinaryOp::Min, &a, &b);
    assert_eq!(f32s(&mx)[0], 2.0);
    assert_eq!(f32s(&mn)[0], 1.0);
    assert!(f32s(&mx)[1].is_nan() && f32s(&mx)[2].is_nan());
    assert!(f32s(&mn)[1].is_nan() && f32s(&mn)[2].is_nan());
}

#[test]
fn binary_f64() {
    let a = t64(&[2], &[1.0, 2.0]);
    let b = t64(&[2], &[3.0, 0.5]);
    assert_eq!(bin(BinaryOp::Div, &a, &b), t64(&[2], &[1.0 / 3.0, 4.0]));
    assert_eq!(bin(BinaryOp::Add, &t64(&[1], &[0.1]), &t64(&[1], &[0.2])), t64(&[1], &[0.1 + 0.2]));
    close64(&bin(BinaryOp::Pow, &a, &b), &[2], &[1.0, std::f64::consts::SQRT_2], 1e-15);
}

#[test]
fn binary_ints() {
    let a = ti32(&[4], &[7, -7, 7, -7]);
    let b = ti32(&[4], &[2, 2, -2, -2]);
    // division truncates toward zero
    assert_eq!(bin(BinaryOp::Div, &a, &b), ti32(&[4], &[3, -3, -3, 3]));
    assert_eq!(bin(BinaryOp::Add, &a, &b), ti32(&[4], &[9, -5, 5, -9]));
    assert_eq!(bin(BinaryOp::Sub, &a, &b), ti32(&[4], &[5, -9, 9, -5]));
    assert_eq!(bin(BinaryOp::Mul, &a, &b), ti32(&[4], &[14, -14, -14, 14]));
    assert_eq!(bin(BinaryOp::Max, &a, &b), ti32(&[4], &[7, 2, 7, -2]));
    assert_eq!(bin(BinaryOp::Min, &a, &b), ti32(&[4], &[2, -7, -2, -7]));
    // overflow wraps
    let m = ti32(&[2], &[i32::MAX, i32::MIN]);
    assert_eq!(bin(BinaryOp::Add, &m, &ti32(&[], &[1])), ti32(&[2], &[i32::MIN, i32::MIN + 1]));
    assert_eq!(bin(BinaryOp::Div, &m, &ti32(&[], &[-1])), ti32(&[2], &[-i32::MAX, i32::MIN]));
    // i64 with broadcasting
    let x = ti64(&[2, 2], &[1, 2, 3, 4]);
    let y = ti64(&[2, 1], &[10, -3]);
    assert_eq!(bin(BinaryOp::Mul, &x, &y), ti64(&[2, 2], &[10, 20, -9, -12]));
    assert_eq!(bin(BinaryOp::Div, &y, &x), ti64(&[2, 2], &[10, 5, -1, 0]));
    assert_eq!(bin(BinaryOp::Add, &ti64(&[1], &[i64::MAX]), &ti64(&[1], &[1])), ti64(&[1], &[i64::MIN]));
}

#[test]
fn int_division_by_zero_is_an_error() {
    let a = ti32(&[3], &[1, 2, 3]);
    let b = ti32(&[3], &[1, 0, 1]);
    let e = run_err(Op::Binary(BinaryOp::Div), &[&a, &b]);
    assert_eq!(e, EvalError::IntDivByZero { index: vec![1] });
    assert_eq!(e.to_string(), "integer division by zero (divisor element [1])");
    let e = run_err(Op::Binary(BinaryOp::Div), &[&ti64(&[2], &[4, 5]), &ti64(&[], &[0])]);
    assert!(matches!(e, EvalError::IntDivByZero { .. }));
}

#[test]
fn binary_half_types_round_to_nearest_even() {
    // f16 has 10 mantissa bits: 1 + 2^-11 is a tie between 1 and 1 + 2^-10 → even (1.0)
    let one = tf16(&[2], &[1.0, 1.0]);
    let d = tf16(&[2], &[2f32.powi(-11), 2f32.powi(-10)]);
    assert_eq!(bin(BinaryOp::Add, &one, &d), tf16(&[2], &[1.0, 1.0 + 2f32.powi(-10)]));
    // 300 * 300 = 90000 overflows f16 (max 65504)
    let o = bin(BinaryOp::Mul, &tf16(&[1], &[300.0]), &tf16(&[1], &[300.0]));
    assert_eq!(o, tf16(&[1], &[f32::INFINITY]));
    // bf16 has 7 mantissa bits: 1 + 2^-8 ties to 1.0; 1 + 3·2^-9 rounds up to 1 + 2^-7
    let one = tbf16(&[2], &[1.0, 1.0]);
    let d = tbf16(&[2], &[2f32.powi(-8), 3.0 * 2f32.powi(-9)]);
    assert_eq!(bin(BinaryOp::Add, &one, &d), tbf16(&[2], &[1.0, 1.0 + 2f32.powi(-7)]));
    // 1/3 in bf16: 0.333984375 (171/512)
    let third = bin(BinaryOp::Div, &tbf16(&[1], &[1.0]), &tbf16(&[1], &[3.0]));
    assert_eq!(third, tbf16(&[1], &[171.0 / 512.0]));
    // pow in f16 with broadcasting
    let p = bin(BinaryOp::Pow, &tf16(&[2], &[2.0, 3.0]), &tf16(&[], &[2.0]));
    assert_eq!(p, tf16(&[2], &[4.0, 9.0]));
}

// ---------------------------------------------------------------------------------------
// compare, where, cast

#[test]
fn compare_all_ops_with_broadcasting() {
    let a = t32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = t32(&[2], &[1.0, 3.0]);
    let f = false;
    let t = true;
    assert_eq!(cmp(CompareOp::Lt, &a, &b), tb(&[2, 2], &[f, t, f, f]));
    assert_eq!(cmp(CompareOp::Le, &a, &b), tb(&[2, 2], &[t, t, f, f]));
    assert_eq!(cmp(CompareOp::Gt, &a, &b), tb(&[2, 2], &[f, f, t, t]));
    assert_eq!(cmp(CompareOp::Ge, &a, &b), tb(&[2, 2], &[t, f, t, t]));
    assert_eq!(cmp(CompareOp::Eq, &a, &b), tb(&[2, 2], &[t, f, f, f]));
    assert_eq!(cmp(CompareOp::Ne, &a, &b), tb(&[2, 2], &[f, t, t, t]));
}

#[test]
fn compare_dtypes() {
    let (f, t) = (false, true);
    let nan = t32(&[2], &[f32::NAN, 1.0]);
    assert_eq!(cmp(CompareOp::Eq, &nan, &nan), tb(&[2], &[f, t]));
    assert_eq!(cmp(CompareOp::Ne, &nan, &nan), tb(&[2], &[t, f]));
    assert_eq!(cmp(CompareOp::Lt, &nan, &t32(&[], &[5.0])), tb(&[2], &[f, t]));
    // bool orders false < true
    let x = tb(&[2], &[f, t]);
    let y = tb(&[2], &[t, t]);
    assert_eq!(cmp(CompareOp::Lt, &x, &y), tb(&[2], &[t, f]));
    assert_eq!(cmp(CompareOp::Eq, &x, &y), tb(&[2], &[f, t]));
    // ints
    let i = ti64(&[3], &[-1, 0, i64::MAX]);
    assert_eq!(cmp(CompareOp::Ge, &i, &ti64(&[], &[0])), tb(&[3], &[f, t, t]));
    assert_eq!(cmp(CompareOp::Ne, &ti32(&[2], &[3, 4]), &ti32(&[2], &[3, 5])), tb(&[2], &[f, t]));
    // halves and f64
    assert_eq!(cmp(CompareOp::Gt, &tf16(&[2], &[1.0, -1.0]), &tf16(&[], &[0.0])), tb(&[2], &[t, f]));
    assert_eq!(cmp(CompareOp::Le, &tbf16(&[2], &[1.0, 2.0]), &tbf16(&[2], &[1.0, 1.0])), tb(&[2], &[t, f]));
    assert_eq!(cmp(CompareOp::Lt, &t64(&[1], &[0.1]), &t64(&[1], &[0.2])), tb(&[1], &[t]));
}

#[test]
fn where_selects_and_broadcasts() {
    let c = tb(&[3], &[true, false, true]);
    let a = t32(&[3], &[1.0, 2.0, 3.0]);
    let b = t32(&[3], &[10.0, 20.0, 30.0]);
    assert_eq!(run(Op::Where, &[&c, &a, &b]), t32(&[3], &[1.0, 20.0, 3.0]));
    // cond [2,1], a [3], b scalar -> [2,3]
    let c = tb(&[2, 1], &[true, false]);
    let z = t32(&[], &[0.0]);
    assert_eq!(run(Op::Where, &[&c, &a, &z]), t32(&[2, 3], &[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]));
    // ints and bools as values, scalar condition
    let yes = tb(&[], &[true]);
    assert_eq!(run(Op::Where, &[&yes, &ti64(&[2], &[1, 2]), &ti64(&[2], &[3, 4])]), ti64(&[2], &[1, 2]));
    let c = tb(&[2], &[false, true]);
    assert_eq!(
        run(Op::Where, &[&c, &tb(&[2], &[true, true]), &tb(&[2], &[false, false])]),
        tb(&[2], &[false, true])
    );
    assert_eq!(
        run(Op::Where, &[&c, &ti32(&[], &[7]), &ti32(&[2, 1], &[1, 2])]),
        ti32(&[2, 2], &[1, 7, 2, 7])
    );
    assert_eq!(run(Op::Where, &[&c, &tf16(&[2], &[1.0, 2.0]), &tf16(&[], &[9.0])]), tf16(&[2], &[9.0, 2.0]));
}

#[test]
fn cast_conversions() {
    let x = t32(&[5], &[1.7, -1.7, 0.0, 2.5, f32::NAN]);
    let cast = |t: &Tensor, to: DType| run(Op::Cast { to }, &[t]);
    assert_eq!(cast(&x, DType::I32), ti32(&[5], &[1, -1, 0, 2, 0]));
    assert_eq!(cast(&x, DType::I64), ti64(&[5], &[1, -1, 0, 2, 0]));
    assert_eq!(cast(&x, DType::Bool), tb(&[5], &[true, true, false, true, true]));
    let b = tb(&[2], &[true, false]);
    assert_eq!(cast(&b, DType::F32), t32(&[2], &[1.0, 0.0]));
    assert_eq!(cast(&b, DType::I64), ti64(&[2], &[1, 0]));
    assert_eq!(cast(&b, DType::BF16), tbf16(&[2], &[1.0, 0.0]));
    // i64 -> i32 wraps
    assert_eq!(cast(&ti64(&[3], &[(1 << 32) + 5, -1, 1 << 31]), DType::I32), ti32(&[3], &[5, -1, i32::MIN]));
    assert_eq!(cast(&ti32(&[2], &[0, -3]), DType::Bool), tb(&[2], &[false, true]));
    assert_eq!(cast(&ti32(&[2], &[3, -3]), DType::F64), t64(&[2], &[3.0, -3.0]));
    // float narrowing rounds to nearest
    let tenth = t32(&[1], &[0.1]);
    assert_eq!(f32s(&cast(&tenth, DType::F16).cast(DType::F32))[0], 0.099_975_586);
    assert_eq!(f32s(&cast(&tenth, DType::BF16).cast(DType::F32))[0], 0.100_097_656);
    assert_eq!(cast(&t64(&[1], &[0.1]), DType::F32), t32(&[1], &[0.1]));
    assert_eq!(cast(&tf16(&[2], &[-2.75, 65504.0]), DType::I32), ti32(&[2], &[-2, 65504]));
    assert_eq!(cast(&t64(&[1], &[1e300]), DType::F32), t32(&[1], &[f32::INFINITY]));
}

// ---------------------------------------------------------------------------------------
// reductions

#[test]
fn reduce_sum_over_axes() {
    let x = t32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(reduce(ReduceOp::Sum, &[0], false, &x), t32(&[3], &[5.0, 7.0, 9.0]));
    assert_eq!(reduce(ReduceOp::Sum, &[1], false, &x), t32(&[2], &[6.0, 15.0]));
    assert_eq!(reduce(ReduceOp::Sum, &[1], true, &x), t32(&[2, 1], &[6.0, 15.0]));
    assert_eq!(reduce(ReduceOp::Sum, &[0], true, &x), t32(&[1, 3], &[5.0, 7.0, 9.0]));
    assert_eq!(reduce(ReduceOp::Sum, &[0, 1], false, &x), t32(&[], &[21.0]));
    assert_eq!(reduce(ReduceOp::Sum, &[0, 1], true, &x), t32(&[1, 1], &[21.0]));
    assert_eq!(reduce(ReduceOp::Sum, &[], false, &x), x);

    // x[i][j][k] = 12i + 4j + k
    let y = arange32(&[2, 3, 4]);
    assert_eq!(reduce(ReduceOp::Sum, &[0, 2], false, &y), t32(&[3], &[60.0, 92.0, 124.0]));
    assert_eq!(reduce(ReduceOp::Sum, &[0, 2], true, &y), t32(&[1, 3, 1], &[60.0, 92.0, 124.0]));
    assert_eq!(
        reduce(ReduceOp::Sum, &[1], false, &y),
        t32(&[2, 4], &[12.0, 15.0, 18.0, 21.0, 48.0, 51.0, 54.0, 57.0])
    );
    assert_eq!(
        reduce(ReduceOp::Sum, &[0], false, &y),
        t32(&[3, 4], &[12.0, 14.0, 16.0, 18.0, 20.0, 22.0, 24.0, 26.0, 28.0, 30.0, 32.0, 34.0])
    );
    assert_eq!(reduce(ReduceOp::Sum, &[1, 2], false, &y), t32(&[2], &[66.0, 210.0]));
    // extent-1 axes, reduced or kept
    assert_eq!(reduce(ReduceOp::Sum, &[1], false, &arange32(&[2, 3, 1])), t32(&[2, 1], &[3.0, 12.0]));
    assert_eq!(reduce(ReduceOp::Sum, &[1], false, &arange32(&[2, 1, 3])), arange32(&[2, 3]));
    assert_eq!(reduce(ReduceOp::Sum, &[0], true, &arange32(&[3, 1, 2])), t32(&[1, 1, 2], &[6.0, 9.0]));
}

#[test]
fn reduce_mean_max_min() {
    let x = t32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(reduce(ReduceOp::Mean, &[1], false, &x), t32(&[2], &[2.0, 5.0]));
    assert_eq!(reduce(ReduceOp::Mean, &[0, 1], false, &x), t32(&[], &[3.5]));
    assert_eq!(reduce(ReduceOp::Mean, &[0], true, &x), t32(&[1, 3], &[2.5, 3.5, 4.5]));
    let y = t32(&[2, 3], &[3.0, -1.0, 2.0, 0.0, 7.0, 7.5]);
    assert_eq!(reduce(ReduceOp::Max, &[1], false, &y), t32(&[2], &[3.0, 7.5]));
    assert_eq!(reduce(ReduceOp::Min, &[1], true, &y), t32(&[2, 1], &[-1.0, 0.0]));
    assert_eq!(reduce(ReduceOp::Max, &[0], false, &y), t32(&[3], &[3.0, 7.0, 7.5]));
    assert_eq!(reduce(ReduceOp::Min, &[0, 1], false, &y), t32(&[], &[-1.0]));
    // NaN propagates through max and min
    let n = t32(&[2, 2], &[1.0, f32::NAN, 2.0, 3.0]);
    let m = reduce(ReduceOp::Max, &[1], false, &n);
    assert!(f32s(&m)[0].is_nan());
    assert_eq!(f32s(&m)[1], 3.0);
    assert!(f32s(&reduce(ReduceOp::Min, &[0], false, &n))[1].is_nan());
    // f64 mean and max over the middle axis of a rank-3 tensor
    let z = t64(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(reduce(ReduceOp::Mean, &[1], false, &z), t64(&[2, 2], &[2.0, 3.0, 6.0, 7.0]));
    assert_eq!(reduce(ReduceOp::Max, &[0, 2], true, &z), t64(&[1, 2, 1], &[6.0, 8.0]));
}

#[test]
fn reduce_ints_and_halves() {
    let x = ti32(&[2, 3], &[3, -1, 2, 0, 7, 7]);
    assert_eq!(reduce(ReduceOp::Max, &[1], false, &x), ti32(&[2], &[3, 7]));
    assert_eq!(reduce(ReduceOp::Min, &[1], false, &x), ti32(&[2], &[-1, 0]));
    assert_eq!(reduce(ReduceOp::Sum, &[0], false, &x), ti32(&[3], &[3, 6, 9]));
    // integer sums wrap
    assert_eq!(reduce(ReduceOp::Sum, &[0], false, &ti32(&[2], &[i32::MAX, 1])), ti32(&[], &[i32::MIN]));
    assert_eq!(reduce(ReduceOp::Sum, &[0, 1], true, &ti64(&[2, 2], &[1, 2, 3, 4])), ti64(&[1, 1], &[10]));
    assert_eq!(reduce(ReduceOp::Mean, &[0], false, &tf16(&[2], &[1.0, 2.0])), tf16(&[], &[1.5]));
    assert_eq!(reduce(ReduceOp::Max, &[0], false, &tbf16(&[3], &[1.0, 5.0, 2.0])), tbf16(&[], &[5.0]));
    // f16 sum accumulates in f64: 2048 + 1 + 1 = 2050 (summing in f16 would stay at 2048)
    assert_eq!(reduce(ReduceOp::Sum, &[0], false, &tf16(&[3], &[2048.0, 1.0, 1.0])), tf16(&[], &[2050.0]));
}

#[test]
fn reduce_f32_accumulates_in_f64() {
    // In f32, 1e8 + 1 == 1e8, so a naive f32 sum gives 1; the f64 accumulator gives 2.
    let x = t32(&[4], &[1e8, 1.0, -1e8, 1.0]);
    assert_eq!(reduce(ReduceOp::Sum, &[0], false, &x), t32(&[], &[2.0]));
    assert_eq!(reduce(ReduceOp::Mean, &[0], false, &x), t32(&[], &[0.5]));
}

#[test]
fn reduce_empty() {
    let x = t32(&[2, 0], &[]);
    assert_eq!(reduce(ReduceOp::Sum, &[1], false, &x), t32(&[2], &[0.0, 0.0]));
    let e = run_err(Op::Reduce { op: ReduceOp::Max, axes: vec![1], keepdims: false }, &[&x]);
    assert!(matches!(e, EvalError::EmptyReduction { .. }), "{e}");
    assert_eq!(e.to_string(), "`reduce_max` over zero elements of [2, 0] has no identity");
}

// ---------------------------------------------------------------------------------------
// layout

#[test]
fn reshape_keeps_order() {
    let x = arange32(&[2, 3]);
    assert_eq!(run(Op::Reshape { shape: kiln_ir::dims(&[3, 2]) }, &[&x]), arange32(&[3, 2]));
    assert_eq!(run(Op::Reshape { shape: kiln_ir::dims(&[6]) }, &[&x]), arange32(&[6]));
    assert_eq!(run(Op::Reshape { shape: kiln_ir::dims(&[]) }, &[&tb(&[1, 1], &[true])]), tb(&[], &[true]));
    assert_eq!(
        run(Op::Reshape { shape: kiln_ir::dims(&[2, 1]) }, &[&ti64(&[2], &[4, 5])]),
        ti64(&[2, 1], &[4, 5])
    );
}

#[test]
fn transpose_rank_2_3_4() {
    let x = t32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(run(Op::Transpose { perm: vec![1, 0] }, &[&x]), t32(&[3, 2], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]));
    // out[a][b][c] = x[b][c][a] = 12b + 4c + a
    let y = arange32(&[2, 3, 4]);
    let want: Vec<f32> =
        [0, 4, 8, 12, 16, 20, 1, 5, 9, 13, 17, 21, 2, 6, 10, 14, 18, 22, 3, 7, 11, 15, 19, 23]
            .iter()
            .map(|&v| v as f32)
            .collect();
    assert_eq!(run(Op::Transpose { perm: vec![2, 0, 1] }, &[&y]), t32(&[4, 2, 3], &want));
    // NCHW -> NHWC: out[0][h][w][c] = 6c + 3h + w
    let z = ti32(&[1, 2, 2, 3], &(0..12).collect::<Vec<_>>());
    assert_eq!(
        run(Op::Transpose { perm: vec![0, 2, 3, 1] }, &[&z]),
        ti32(&[1, 2, 3, 2], &[0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])
    );
    // identity permutation and bool
    let b = tb(&[2, 2], &[true, false, false, false]);
    assert_eq!(run(Op::Transpose { perm: vec![0, 1] }, &[&b]), b);
    assert_eq!(run(Op::Transpose { perm: vec![1, 0] }, &[&b]), tb(&[2, 2], &[true, false, false, false]));
}

#[test]
fn transpose_rank_4_matches_reference() {
    let x = rand64(&[2, 3, 4, 5], 3);
    let perm = [3, 1, 0, 2];
    let out = run(Op::Transpose { perm: perm.to_vec() }, &[&x]);
    assert_eq!(out.shape, vec![5, 3, 2, 4]);
    let (xv, ov) = (f64s(&x), f64s(&out));
    let xs = [60, 20, 5, 1];
    let mut n = 0;
    for a in 0..5 {
        for b in 0..3 {
            for c in 0..2 {
                for d in 0..4 {
                    let idx = [a, b, c, d];
                    let mut src = [0; 4];
                    for (i, &p) in perm.iter().enumerate() {
                        src[p] = idx[i];
                    }
                    let off: usize = src.iter().zip(xs).map(|(i, s)| i * s).sum();
                    assert_eq!(ov[n], xv[off]);
                    n += 1;
                }
            }
        }
    }
}

#[test]
fn broadcast_to() {
    let row = t32(&[3], &[1.0, 2.0, 3.0]);
    assert_eq!(
        run(Op::BroadcastTo { shape: kiln_ir::dims(&[2, 3]) }, &[&row]),
        t32(&[2, 3], &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    );
    let col = ti32(&[2, 1], &[1, 2]);
    assert_eq!(
        run(Op::BroadcastTo { shape: kiln_ir::dims(&[2, 3]) }, &[&col]),
        ti32(&[2, 3], &[1, 1, 1, 2, 2, 2])
    );
    let s = tb(&[], &[true]);
    assert_eq!(run(Op::BroadcastTo { shape: kiln_ir::dims(&[2, 2]) }, &[&s]), tb(&[2, 2], &[true; 4]));
    let m = t32(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(
        run(Op::BroadcastTo { shape: kiln_ir::dims(&[2, 2, 2]) }, &[&m]),
        t32(&[2, 2, 2], &[1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0])
    );
}

#[test]
fn slice_with_step() {
    let x = arange32(&[10]);
    let s = |t: &Tensor, axis, start: usize, end: usize, step| {
        run(Op::Slice { axis, start: start.into(), end: end.into(), step }, &[t])
    };
    assert_eq!(s(&x, 0, 1, 8, 3), t32(&[3], &[1.0, 4.0, 7.0]));
    assert_eq!(s(&x, 0, 0, 10, 4), t32(&[3], &[0.0, 4.0, 8.0]));
    assert_eq!(s(&x, 0, 3, 3, 1), t32(&[0], &[]));
    let m = ti32(&[2, 5], &(0..10).collect::<Vec<_>>());
    assert_eq!(s(&m, 1, 0, 5, 2), ti32(&[2, 3], &[0, 2, 4, 5, 7, 9]));
    assert_eq!(s(&m, 0, 1, 2, 1), ti32(&[1, 5], &[5, 6, 7, 8, 9]));
    // middle axis of a rank-3 tensor: x[i][j][k] = 12i + 4j + k, j in {1}
    let y = arange32(&[2, 3, 4]);
    assert_eq!(s(&y, 1, 1, 3, 2), t32(&[2, 1, 4], &[4.0, 5.0, 6.0, 7.0, 16.0, 17.0, 18.0, 19.0]));
}

#[test]
fn concat_axes() {
    let a = t32(&[1, 2], &[1.0, 2.0]);
    let b = t32(&[2, 2], &[3.0, 4.0, 5.0, 6.0]);
    assert_eq!(run(Op::Concat { axis: 0 }, &[&a, &b]), t32(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
    let c = ti32(&[2, 1], &[1, 2]);
    let d = ti32(&[2, 2], &[3, 4, 5, 6]);
    let e = ti32(&[2, 1], &[7, 8]);
    assert_eq!(run(Op::Concat { axis: 1 }, &[&c, &d, &e]), ti32(&[2, 4], &[1, 3, 4, 7, 2, 5, 6, 8]));
    let one = tb(&[2], &[true, false]);
    assert_eq!(run(Op::Concat { axis: 0 }, &[&one]), one);
    assert_eq!(
        run(Op::Concat { axis: 0 }, &[&tbf16(&[1], &[1.0]), &tbf16(&[2], &[2.0, 3.0])]),
        tbf16(&[3], &[1.0, 2.0, 3.0])
    );
}

#[test]
fn pad_values() {
    let x = t32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(
        run(Op::Pad { pads: vec![(1, 0), (0, 2)], value: 9.0 }, &[&x]),
        t32(&[3, 4], &[9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 9.0, 9.0, 3.0, 4.0, 9.0, 9.0])
    );
    assert_eq!(
        run(Op::Pad { pads: vec![(2, 1)], value: -1.0 }, &[&ti32(&[3], &[5, 6, 7])]),
        ti32(&[6], &[-1, -1, 5, 6, 7, -1])
    );
    assert_eq!(
        run(Op::Pad { pads: vec![(1, 1)], value: 1.0 }, &[&tb(&[1], &[false])]),
        tb(&[3], &[true, false, true])
    );
    // rank 3, padding on every axis
    let y = ti64(&[1, 1, 2], &[1, 2]);
    assert_eq!(
        run(Op::Pad { pads: vec![(0, 1), (1, 0), (0, 1)], value: 0.0 }, &[&y]),
        ti64(&[2, 2, 3], &[0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0])
    );
    // zero padding is the identity
    assert_eq!(run(Op::Pad { pads: vec![(0, 0), (0, 0)], value: 5.0 }, &[&x]), x);
}

#[test]
fn gather_axis_0_and_1() {
    let table = t32(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let idx = ti64(&[3], &[2, 0, 2]);
    assert_eq!(run(Op::Gather { axis: 0 }, &[&table, &idx]), t32(&[3, 2], &[5.0, 6.0, 1.0, 2.0, 5.0, 6.0]));
    let idx2 = ti32(&[2, 2], &[0, 1, 1, 2]);
    assert_eq!(
        run(Op::Gather { axis: 0 }, &[&table, &idx2]),
        t32(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 5.0, 6.0])
    );
    let t2 = ti32(&[2, 3], &[1, 2, 3, 4, 5, 6]);
    assert_eq!(run(Op::Gather { axis: 1 }, &[&t2, &ti32(&[2], &[2, 0])]), ti32(&[2, 2], &[3, 1, 6, 4]));
    // scalar index drops the axis
    assert_eq!(run(Op::Gather { axis: 1 }, &[&t2, &ti64(&[], &[1])]), ti32(&[2], &[2, 5]));
}

#[test]
fn gather_out_of_range_is_an_error() {
    let table = t32(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let e = run_err(Op::Gather { axis: 0 }, &[&table, &ti64(&[2], &[0, 3])]);
    assert_eq!(e, EvalError::GatherIndex { index: 3, position: vec![1], axis: 0, extent: 3 });
    assert_eq!(
        e.to_string(),
        "gather index 3 at position [1] of the indices is out of range for axis 0 of extent 3"
    );
    let e = run_err(Op::Gather { axis: 1 }, &[&table, &ti32(&[2, 2], &[0, 1, -1, 0])]);
    assert_eq!(e, EvalError::GatherIndex { index: -1, position: vec![1, 0], axis: 1, extent: 2 });
}

#[test]
fn scatter_add_sums_repeated_rows_and_zeroes_the_rest() {
    let updates = t32(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let idx = ti64(&[3], &[2, 0, 2]);
    assert_eq!(
        run(Op::ScatterAdd { axis: 0, extent: 4 }, &[&updates, &idx]),
        t32(&[4, 2], &[3.0, 4.0, 0.0, 0.0, 6.0, 8.0, 0.0, 0.0])
    );
    // axis 1 of integers, a 2-D index array, and a scalar index (the axis reappears).
    let u = ti32(&[2, 2], &[1, 2, 3, 4]);
    assert_eq!(
        run(Op::ScatterAdd { axis: 1, extent: 3 }, &[&u, &ti32(&[2], &[2, 2])]),
        ti32(&[2, 3], &[0, 0, 3, 0, 0, 7])
    );
    let u = t64(&[2, 2, 1], &[1.0, 10.0, 100.0, 1000.0]);
    assert_eq!(
        run(Op::ScatterAdd { axis: 0, extent: 2 }, &[&u, &ti64(&[2, 2], &[0, 1, 1, 1])]),
        t64(&[2, 1], &[1.0, 1110.0])
    );
    let u = t32(&[2], &[7.0, 8.0]);
    assert_eq!(
        run(Op::ScatterAdd { axis: 1, extent: 3 }, &[&u, &ti64(&[], &[1])]),
        t32(&[2, 3], &[0.0, 7.0, 0.0, 0.0, 8.0, 0.0])
    );
}

#[test]
fn scatter_add_adds_in_position_order_rounding_each_step() {
    // f32: (1e8 + 1) rounds back to 1e8, so the row ends at 0, not at 1.
    let u = t32(&[3], &[1e8, 1.0, -1e8]);
    assert_eq!(run(Op::ScatterAdd { axis: 0, extent: 1 }, &[&u, &ti32(&[3], &[0, 0, 0])]), t32(&[1], &[0.0]));
    // f16 and bf16 round after every addition: 2048 + 1 + 1 stays 2048 (a single rounding
    // of the f32 sum would give 2050); the same at 256 in bf16.
    let h = tf16(&[3], &[2048.0, 1.0, 1.0]);
    assert_eq!(
        run(Op::ScatterAdd { axis: 0, extent: 1 }, &[&h, &ti32(&[3], &[0, 0, 0])]),
        tf16(&[1], &[2048.0])
    );
    let h = tbf16(&[3], &[256.0, 1.0, 1.0]);
    assert_eq!(
        run(Op::ScatterAdd { axis: 0, extent: 1 }, &[&h, &ti32(&[3], &[0, 0, 0])]),
        tbf16(&[1], &[256.0])
    );
    // Integers wrap.
    let i = ti32(&[2], &[i32::MAX, 1]);
    assert_eq!(
        run(Op::ScatterAdd { axis: 0, extent: 1 }, &[&i, &ti64(&[2], &[0, 0])]),
        ti32(&[1], &[i32::MIN])
    );
}

#[test]
fn scatter_add_out_of_range_is_an_error() {
    let u = t32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let e = run_err(Op::ScatterAdd { axis: 0, extent: 3 }, &[&u, &ti64(&[2], &[0, 3])]);
    assert_eq!(e, EvalError::ScatterIndex { index: 3, position: vec![1], axis: 0, extent: 3 });
    assert_eq!(
        e.to_string(),
        "scatter_add index 3 at position [1] of the indices is out of range for axis 0 of extent 3"
    );
    let e = run_err(Op::ScatterAdd { axis: 1, extent: 2 }, &[&u, &ti32(&[2], &[-1, 0])]);
    assert_eq!(e, EvalError::ScatterIndex { index: -1, position: vec![0], axis: 1, extent: 2 });
}

#[test]
fn scatter_add_typing_errors() {
    let types = |op: &Op, a: TensorType, b: TensorType| infer(op, &[&a, &b]).unwrap_err().to_string();
    let op = Op::ScatterAdd { axis: 0, extent: 4 };
    assert_eq!(
        types(&op, TensorType::new(DType::F32, vec![3, 2]), TensorType::new(DType::F32, vec![3])),
        "`scatter_add` needs integer indices (and numeric updates) operands, got f32"
    );
    assert_eq!(
        types(&op, TensorType::new(DType::Bool, vec![3, 2]), TensorType::new(DType::I64, vec![3])),
        "`scatter_add` needs numeric updates (and integer indices) operands, got bool"
    );
    assert_eq!(
        types(&op, TensorType::new(DType::F32, vec![3, 2]), TensorType::new(DType::I64, vec![2])),
        "`scatter_add`: updates [3, 2] do not hold indices [2] at axis 0"
    );
    assert_eq!(
        types(
            &Op::ScatterAdd { axis: 2, extent: 4 },
            TensorType::new(DType::F32, vec![3, 2]),
            TensorType::new(DType::I64, vec![3])
        ),
        "`scatter_add`: updates [3, 2] do not hold indices [3] at axis 2"
    );
}

// ---------------------------------------------------------------------------------------
// matmul

#[test]
fn matmul_2d_and_1d() {
    let a = t32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = t32(&[2, 2], &[5.0, 6.0, 7.0, 8.0]);
    assert_eq!(run(Op::MatMul, &[&a, &b]), t32(&[2, 2], &[19.0, 22.0, 43.0, 50.0]));
    // vector · vector
    let u = t32(&[3], &[1.0, 2.0, 3.0]);
    let v = t32(&[3], &[4.0, 5.0, 6.0]);
    assert_eq!(run(Op::MatMul, &[&u, &v]), t32(&[], &[32.0]));
    // vector · matrix
    let m = t32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(run(Op::MatMul, &[&t32(&[2], &[1.0, 2.0]), &m]), t32(&[3], &[9.0, 12.0, 15.0]));
    // matrix · vector
    assert_eq!(run(Op::MatMul, &[&m, &t32(&[3], &[1.0, 0.0, -1.0])]), t32(&[2], &[-2.0, -2.0]));
    // [2,3] x [3,1]
    assert_eq!(run(Op::MatMul, &[&m, &t32(&[3, 1], &[1.0, 1.0, 1.0])]), t32(&[2, 1], &[6.0, 15.0]));
}

#[test]
fn matmul_batched_and_broadcast() {
    // batch of 2: A0 = I, A1 = swap; B0 = [[1,2],[3,4]], B1 = [[5,6],[7,8]]
    let a = t32(&[2, 2, 2], &[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
    let b = t32(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(run(Op::MatMul, &[&a, &b]), t32(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 7.0, 8.0, 5.0, 6.0]));
    // batched left, plain right: [I, 2I] · B0
    let a = t32(&[2, 2, 2], &[1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 2.0]);
    let b0 = t32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(run(Op::MatMul, &[&a, &b0]), t32(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 2.0, 4.0, 6.0, 8.0]));
    // batch 1 broadcast against batch 3: A = [[1,1],[0,1]], B_i = diag(i, 1)
    let a = t32(&[1, 2, 2], &[1.0, 1.0, 0.0, 1.0]);
    let b = t32(&[3, 2, 2], &[1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 1.0]);
    assert_eq!(
        run(Op::MatMul, &[&a, &b]),
        t32(&[3, 2, 2], &[1.0, 1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 1.0, 3.0, 1.0, 0.0, 1.0])
    );
    // batch axes [2,1] x [3] -> [2,3], with [1,2]x[2,1] matrices
    let a = t32(&[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = t32(&[3, 2, 1], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    assert_eq!(run(Op::MatMul, &[&a, &b]), t32(&[2, 3, 1, 1], &[1.0, 2.0, 3.0, 3.0, 4.0, 7.0]));
    // vector times a batch of matrices
    let v = t32(&[2], &[1.0, -1.0]);
    assert_eq!(run(Op::MatMul, &[&v, &b0]), t32(&[2], &[-2.0, -2.0]));
    let bb = t32(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(run(Op::MatMul, &[&v, &bb]), t32(&[2, 2], &[-2.0, -2.0, -2.0, -2.0]));
    assert_eq!(run(Op::MatMul, &[&bb, &v]), t32(&[2, 2], &[-1.0, -1.0, -1.0, -1.0]));
}

#[test]
fn matmul_dtypes() {
    let a = ti32(&[2, 2], &[1, 2, 3, 4]);
    let b = ti32(&[2, 2], &[5, 6, 7, 8]);
    assert_eq!(run(Op::MatMul, &[&a, &b]), ti32(&[2, 2], &[19, 22, 43, 50]));
    let a = ti64(&[1, 2], &[i64::MAX, 1]);
    let b = ti64(&[2, 1], &[1, 1]);
    assert_eq!(run(Op::MatMul, &[&a, &b]), ti64(&[1, 1], &[i64::MIN]), "integer products wrap");
    let a = t64(&[1, 3], &[0.1, 0.2, 0.3]);
    let b = t64(&[3], &[1.0, 1.0, 1.0]);
    assert_eq!(run(Op::MatMul, &[&a, &b]), t64(&[1], &[0.1 + 0.2 + 0.3]));
    // f16: accumulate in f32, round once: 1024 + 0.5 + 0.5 = 1025 (f16 steps by 1 there)
    let a = tf16(&[1, 3], &[1024.0, 0.5, 0.5]);
    let b = tf16(&[3, 1], &[1.0, 1.0, 1.0]);
    assert_eq!(run(Op::MatMul, &[&a, &b]), tf16(&[1, 1], &[1025.0]));
    let a = tbf16(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(run(Op::MatMul, &[&a, &a]), tbf16(&[2, 2], &[7.0, 10.0, 15.0, 22.0]));
}

fn naive_matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    c
}

#[test]
fn matmul_large_matches_reference() {
    // m not a multiple of the row block, n crossing the column panel, parallel path
    for &(m, k, n) in &[(9, 13, 600), (5, 64, 7), (130, 33, 65)] {
        let a = rand64(&[m, k], 10);
        let b = rand64(&[k, n], 11);
        let want = naive_matmul(f64s(&a), f64s(&b), m, k, n);
        close64(&run(Op::MatMul, &[&a, &b]), &[m, n], &want, 1e-12);
        let a32 = a.cast(DType::F32);
        let b32 = b.cast(DType::F32);
        let want32: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        close32(&run(Op::MatMul, &[&a32, &b32]), &[m, n], &want32, 1e-5);
    }
    // batched with broadcasting, against the reference per batch
    let a = rand64(&[3, 1, 6, 5], 12);
    let b = rand64(&[4, 5, 7], 13);
    let out = run(Op::MatMul, &[&a, &b]);
    assert_eq!(out.shape, vec![3, 4, 6, 7]);
    for i in 0..3 {
        for j in 0..4 {
            let am = &f64s(&a)[i * 30..(i + 1) * 30];
            let bm = &f64s(&b)[j * 35..(j + 1) * 35];
            let want = naive_matmul(am, bm, 6, 5, 7);
            let got = &f64s(&out)[(i * 4 + j) * 42..(i * 4 + j + 1) * 42];
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// conv2d and pool2d

fn conv(
    x: &Tensor,
    w: &Tensor,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> Tensor {
    run(Op::Conv2d { stride, padding, dilation, groups }, &[x, w])
}

#[test]
fn conv2d_hand_worked() {
    let x = t32(&[1, 1, 3, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    // diagonal kernel: out[i][j] = x[i][j] + x[i+1][j+1]
    let w = t32(&[1, 1, 2, 2], &[1.0, 0.0, 0.0, 1.0]);
    assert_eq!(conv(&x, &w, [1, 1], [0, 0], [1, 1], 1), t32(&[1, 1, 2, 2], &[6.0, 8.0, 12.0, 14.0]));
    // 3x3 ones, padding 1, stride 2: corner windows of the padded input
    let ones = t32(&[1, 1, 3, 3], &[1.0; 9]);
    assert_eq!(conv(&x, &ones, [2, 2], [1, 1], [1, 1], 1), t32(&[1, 1, 2, 2], &[12.0, 16.0, 24.0, 28.0]));
    // padding 1, stride 1: every 3x3 window sum
    assert_eq!(
        conv(&x, &ones, [1, 1], [1, 1], [1, 1], 1),
        t32(&[1, 1, 3, 3], &[12.0, 21.0, 16.0, 27.0, 45.0, 33.0, 24.0, 39.0, 28.0])
    );
    // 2x2 ones with dilation 2 reads the four corners
    let w2 = t32(&[1, 1, 2, 2], &[1.0; 4]);
    assert_eq!(conv(&x, &w2, [1, 1], [0, 0], [2, 2], 1), t32(&[1, 1, 1, 1], &[20.0]));
    // groups = 2: channel 0 scaled by 2, channel 1 by -1
    let x2 = t32(&[1, 2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let wg = t32(&[2, 1, 1, 1], &[2.0, -1.0]);
    assert_eq!(
        conv(&x2, &wg, [1, 1], [0, 0], [1, 1], 2),
        t32(&[1, 2, 2, 2], &[2.0, 4.0, 6.0, 8.0, -5.0, -6.0, -7.0, -8.0])
    );
    // two output channels summing both input channels (groups = 1), non-square stride
    let wsum = t32(&[2, 2, 1, 1], &[1.0, 1.0, 1.0, -1.0]);
    assert_eq!(conv(&x2, &wsum, [1, 2], [0, 0], [1, 1], 1), t32(&[1, 2, 2, 1], &[6.0, 10.0, -4.0, -4.0]));
}

/// The definition of conv2d, one output element at a time.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
    groups: usize,
) -> (Vec<usize>, Vec<f64>) {
    let [n, c, h, wd] = xs;
    let [o, cg, kh, kw] = ws;
    let oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) / stride[0] + 1;
    let ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) / stride[1] + 1;
    let og = o / groups;
    let mut out = Vec::new();
    for b in 0..n {
        for oc in 0..o {
            let g = oc / og;
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = 0.0;
                    for ci in 0..cg {
                        let ch = g * cg + ci;
                        for p in 0..kh {
                            for q in 0..kw {
                                let y = (i * stride[0] + p * dil[0]) as isize - pad[0] as isize;
                                let z = (j * stride[1] + q * dil[1]) as isize - pad[1] as isize;
                                if y < 0 || z < 0 || y >= h as isize || z >= wd as isize {
                                    continue;
                                }
                                let xv = x[((b * c + ch) * h + y as usize) * wd + z as usize];
                                acc += xv * w[((oc * cg + ci) * kh + p) * kw + q];
                            }
                        }
                    }
                    out.push(acc);
                }
            }
        }
    }
    (vec![n, o, oh, ow], out)
}

#[test]
fn conv2d_matches_reference() {
    type Case = ([usize; 4], [usize; 4], [usize; 2], [usize; 2], [usize; 2], usize);
    let cases: &[Case] = &[
        ([2, 4, 7, 6], [6, 2, 3, 2], [2, 1], [1, 2], [1, 2], 2),
        ([1, 3, 9, 9], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1], 1),
        ([1, 4, 8, 5], [4, 1, 3, 3], [2, 2], [0, 1], [2, 1], 4),
        ([2, 2, 5, 5], [3, 2, 5, 5], [3, 3], [2, 2], [1, 1], 1),
    ];
    for (i, &(xs, ws, stride, pad, dil, groups)) in cases.iter().enumerate() {
        let x = rand64(&xs, 20 + i as u64);
        let w = rand64(&ws, 40 + i as u64);
        let (shape, want) = naive_conv(f64s(&x), xs, f64s(&w), ws, stride, pad, dil, groups);
        close64(&conv(&x, &w, stride, pad, dil, groups), &shape, &want, 1e-12);
        let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        close32(
            &conv(&x.cast(DType::F32), &w.cast(DType::F32), stride, pad, dil, groups),
            &shape,
            &want32,
            1e-5,
        );
    }
}

fn pool(kind: PoolKind, x: &Tensor, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Tensor {
    run(Op::Pool2d { kind, kernel, stride, padding }, &[x])
}

#[test]
fn pool2d_max_and_avg() {
    let x = arange32(&[1, 1, 4, 4]); // 0..16
    let x = bin(BinaryOp::Add, &x, &t32(&[], &[1.0])); // 1..=16
    assert_eq!(pool(PoolKind::Max, &x, [2, 2], [2, 2], [0, 0]), t32(&[1, 1, 2, 2], &[6.0, 8.0, 14.0, 16.0]));
    assert_eq!(pool(PoolKind::Avg, &x, [2, 2], [2, 2], [0, 0]), t32(&[1, 1, 2, 2], &[3.5, 5.5, 11.5, 13.5]));
    // 3x3 windows, stride 1, padding 1 over 1..=9
    let y = t32(&[1, 1, 3, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    assert_eq!(
        pool(PoolKind::Max, &y, [3, 3], [1, 1], [1, 1]),
        t32(&[1, 1, 3, 3], &[5.0, 6.0, 6.0, 8.0, 9.0, 9.0, 8.0, 9.0, 9.0])
    );
    // the divisor counts only real elements (count_include_pad = False)
    assert_eq!(
        pool(PoolKind::Avg, &y, [3, 3], [1, 1], [1, 1]),
        t32(&[1, 1, 3, 3], &[3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0])
    );
    // padding acts as -inf for max: all-negative input never yields 0
    let neg = bin(BinaryOp::Mul, &y, &t32(&[], &[-1.0]));
    assert_eq!(
        pool(PoolKind::Max, &neg, [3, 3], [2, 2], [1, 1]),
        t32(&[1, 1, 2, 2], &[-1.0, -2.0, -4.0, -5.0])
    );
    // two channels, non-square kernel, f64
    let z = t64(&[1, 2, 2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
    assert_eq!(
        pool(PoolKind::Avg, &z, [2, 1], [1, 1], [0, 0]),
        t64(&[1, 2, 1, 3], &[2.5, 3.5, 4.5, -2.5, -3.5, -4.5])
    );
    assert_eq!(
        pool(PoolKind::Max, &z, [1, 3], [1, 1], [0, 1]),
        t64(&[1, 2, 2, 3], &[2.0, 3.0, 3.0, 5.0, 6.0, 6.0, -1.0, -1.0, -2.0, -4.0, -4.0, -5.0])
    );
    assert_eq!(
        pool(PoolKind::Avg, &tf16(&[1, 1, 1, 2], &[1.0, 2.0]), [1, 2], [1, 1], [0, 0]),
        tf16(&[1, 1, 1, 1], &[1.5])
    );
}

// ---------------------------------------------------------------------------------------
// sources

#[test]
fn const_and_full() {
    let v = ti32(&[2], &[3, 4]);
    assert_eq!(run(Op::Const { value: v.clone() }, &[]), v);
    assert_eq!(
        run(Op::Full { value: 1.5, dtype: DType::F32, shape: kiln_ir::dims(&[2]) }, &[]),
        t32(&[2], &[1.5, 1.5])
    );
    assert_eq!(
        run(Op::Full { value: -2.7, dtype: DType::I32, shape: kiln_ir::dims(&[1, 2]) }, &[]),
        ti32(&[1, 2], &[-2, -2])
    );
    assert_eq!(
        run(Op::Full { value: 0.5, dtype: DType::Bool, shape: kiln_ir::dims(&[]) }, &[]),
        tb(&[], &[true])
    );
    assert_eq!(
        run(Op::Full { value: 0.1, dtype: DType::BF16, shape: kiln_ir::dims(&[1]) }, &[]),
        tbf16(&[1], &[0.1])
    );
}

#[test]
fn iota_counts_along_axis() {
    let i = |dtype, shape: &[usize], axis| run(Op::Iota { dtype, shape: kiln_ir::dims(shape), axis }, &[]);
    assert_eq!(i(DType::I64, &[2, 3], 0), ti64(&[2, 3], &[0, 0, 0, 1, 1, 1]));
    assert_eq!(i(DType::I32, &[2, 3], 1), ti32(&[2, 3], &[0, 1, 2, 0, 1, 2]));
    assert_eq!(i(DType::F32, &[2, 2, 2], 1), t32(&[2, 2, 2], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]));
    assert_eq!(i(DType::F16, &[3], 0), tf16(&[3], &[0.0, 1.0, 2.0]));
}

#[test]
fn random_uniform_is_deterministic() {
    let r = |dtype, offset| {
        run(Op::RandomUniform { dtype, shape: kiln_ir::dims(&[2, 2]), seed: 7, offset, base: false }, &[])
    };
    let a = r(DType::F64, 10);
    let want: Vec<f64> = (10..14).map(|i| kiln_ir::rng::uniform(7, 0, i)).collect();
    assert_eq!(a, t64(&[2, 2], &want));
    assert_eq!(a, r(DType::F64, 10), "same seed and offset, same values");
    // offset shifts the counter: offset 12 starts where offset 10's third element is
    assert_eq!(&f64s(&r(DType::F64, 12))[..2], &want[2..]);
    let f = r(DType::F32, 10);
    assert_eq!(f32s(&f), want.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice());
    assert_ne!(
        r(DType::F64, 10),
        run(
            Op::RandomUniform {
                dtype: DType::F64,
                shape: kiln_ir::dims(&[2, 2]),
                seed: 8,
                offset: 10,
                base: false
            },
            &[]
        )
    );
    // every dtype stays in [0, 1)
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let big = run(
            Op::RandomUniform { dtype, shape: kiln_ir::dims(&[4096]), seed: 1, offset: 0, base: false },
            &[],
        );
        let v = big.to_f64_vec();
        assert!(v.iter().all(|&x| (0.0..1.0).contains(&x)), "{dtype}");
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!((mean - 0.5).abs() < 0.03, "{dtype}: mean {mean}");
    }
}

#[test]
fn random_uniform_adds_its_base_to_the_counter() {
    let op =
        Op::RandomUniform { dtype: DType::F64, shape: kiln_ir::dims(&[3]), seed: 7, offset: 10, base: true };
    let at = |base: i64| run(op.clone(), &[&ti64(&[], &[base])]);
    let want = |from: u64| (from..from + 3).map(|i| kiln_ir::rng::uniform(7, 0, i)).collect::<Vec<_>>();
    assert_eq!(at(0), t64(&[3], &want(10)));
    assert_eq!(at(5), t64(&[3], &want(15)), "base 5 draws from counter offset + 5");
    // A negative base is its two's complement: the counter wraps, as generated code's does.
    assert_eq!(at(-10), t64(&[3], &want(0)));
    let ty = TensorType::new(DType::F64, vec![3]);
    let e = eval_op(&op, &[&ti32(&[], &[1])], &ty).unwrap_err();
    assert_eq!(e.to_string(), "`random_uniform`: the counter base must be an i64 scalar, not i32[]");
    let e = eval_op(&op, &[&ti64(&[2], &[1, 2])], &ty).unwrap_err();
    assert_eq!(e.to_string(), "`random_uniform`: the counter base must be an i64 scalar, not i64[2]");
}

// ---------------------------------------------------------------------------------------
// eval_op argument checking

#[test]
fn eval_op_rejects_bad_operands() {
    let a = t32(&[2], &[1.0, 2.0]);
    let b = ti32(&[2], &[1, 2]);
    let ty = TensorType::new(DType::F32, vec![2]);
    let e = eval_op(&Op::Binary(BinaryOp::Add), &[&a, &b], &ty).unwrap_err();
    assert_eq!(e.to_string(), "`add`: operand dtypes differ: f32 vs i32");
    let e = eval_op(&Op::Binary(BinaryOp::Add), &[&a], &ty).unwrap_err();
    assert!(matches!(e, EvalError::Infer(_)), "{e}");
    assert_eq!(e.to_string(), "`add` takes 2 operand(s), got 1");
    let wrong = TensorType::new(DType::F32, vec![3]);
    let e = eval_op(&Op::Unary(UnaryOp::Neg), &[&a], &wrong).unwrap_err();
    assert_eq!(e.to_string(), "`neg`: the operands give a result of type f32[2], not f32[3]");
    let broken = Tensor { shape: vec![3], data: Buffer::F32(vec![1.0]) };
    let e = eval_op(&Op::Unary(UnaryOp::Neg), &[&broken], &wrong).unwrap_err();
    assert_eq!(e.to_string(), "operand 0 of `neg`: 1 elements do not fill shape [3]");
    let input = Op::Input { name: "x".into(), dtype: DType::F32, shape: kiln_ir::dims(&[2]) };
    assert_eq!(
        eval_op(&input, &[], &ty).unwrap_err().to_string(),
        "input `x` is read from the bindings; evaluate the graph with `eval`"
    );
}

// ---------------------------------------------------------------------------------------
// eval over graphs

fn input(g: &mut Graph, name: &str, dtype: DType, shape: &[usize]) -> kiln_ir::NodeId {
    g.add(Op::Input { name: name.into(), dtype, shape: kiln_ir::dims(shape) }, &[]).unwrap()
}

fn param(g: &mut Graph, name: &str, shape: &[usize]) -> kiln_ir::NodeId {
    g.add(
        Op::Param { name: name.into(), dtype: DType::F32, shape: kiln_ir::dims(shape), init: Init::Zeros },
        &[],
    )
    .unwrap()
}

#[test]
fn eval_small_graph() {
    // y = relu(x @ w + b); s = sum(y * y) ; also output the intermediate `h`
    let mut g = Graph::new("mlp");
    let x = input(&mut g, "x", DType::F32, &[2, 2]);
    let w = param(&mut g, "w", &[2, 3]);
    let b = param(&mut g, "b", &[3]);
    let mm = g.add(Op::MatMul, &[x, w]).unwrap();
    let h = g.add(Op::Binary(BinaryOp::Add), &[mm, b]).unwrap();
    let y = g.add(Op::Unary(UnaryOp::Relu), &[h]).unwrap();
    let sq = g.add(Op::Binary(BinaryOp::Mul), &[y, y]).unwrap();
    let s = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1], keepdims: false }, &[sq]).unwrap();
    // a dead branch that would fail if evaluated
    let bad_idx = g.add(Op::Const { value: ti64(&[1], &[99]) }, &[]).unwrap();
    g.add(Op::Gather { axis: 0 }, &[w, bad_idx]).unwrap();
    g.add_output("y", y);
    g.add_output("s", s);
    g.add_output("h", h);
    g.add_output("y_again", y);

    let mut bind = Bindings::default();
    bind.inputs.insert("x".into(), t32(&[2, 2], &[1.0, 2.0, -1.0, 0.0]));
    bind.params.insert("w".into(), t32(&[2, 3], &[1.0, 0.0, -1.0, 0.0, 1.0, 1.0]));
    bind.params.insert("b".into(), t32(&[3], &[0.5, -0.5, 0.0]));
    let out = eval(&g, &bind).unwrap();
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["y", "s", "h", "y_again"]);
    // x @ w = [[1, 2, 1], [-1, 0, 1]]; + b = [[1.5, 1.5, 1], [-0.5, -0.5, 1]]
    assert_eq!(out[2].1, t32(&[2, 3], &[1.5, 1.5, 1.0, -0.5, -0.5, 1.0]));
    assert_eq!(out[0].1, t32(&[2, 3], &[1.5, 1.5, 1.0, 0.0, 0.0, 1.0]));
    assert_eq!(out[3].1, out[0].1);
    assert_eq!(out[1].1, t32(&[], &[2.25 + 2.25 + 1.0 + 1.0]));
    // deterministic
    assert_eq!(eval(&g, &bind).unwrap(), out);
}

#[test]
fn eval_reports_missing_and_mistyped_bindings() {
    let mut g = Graph::new("g");
    let x = input(&mut g, "x", DType::F32, &[2]);
    let t = input(&mut g, "tokens", DType::I64, &[3]);
    let w = param(&mut g, "w", &[2]);
    let s = g.add(Op::Binary(BinaryOp::Add), &[x, w]).unwrap();
    g.add_output("s", s);
    g.add_output("t", t);

    let e = eval(&g, &Bindings::default()).unwrap_err();
    assert_eq!(e.to_string(), "missing 2 inputs: `x` (f32[2]), `tokens` (i64[3])");

    let mut b = Bindings::default();
    b.inputs.insert("x".into(), t32(&[2], &[1.0, 2.0]));
    b.inputs.insert("tokens".into(), ti64(&[3], &[1, 2, 3]));
    let e = eval(&g, &b).unwrap_err();
    assert_eq!(e.to_string(), "missing param: `w` (f32[2])");

    b.params.insert("w".into(), t32(&[3], &[1.0, 2.0, 3.0]));
    let e = eval(&g, &b).unwrap_err();
    assert_eq!(e.to_string(), "param `w`: expected f32[2], got f32[3]");
    b.inputs.insert("tokens".into(), ti32(&[3], &[1, 2, 3]));
    b.params.insert("w".into(), t32(&[2], &[1.0, 1.0]));
    let e = eval(&g, &b).unwrap_err();
    assert_eq!(e.to_string(), "input `tokens`: expected i64[3], got i32[3]");

    b.inputs.insert("tokens".into(), ti64(&[3], &[1, 2, 3]));
    let out = eval(&g, &b).unwrap();
    assert_eq!(out[0].1, t32(&[2], &[2.0, 3.0]));
    assert_eq!(out[1].1, ti64(&[3], &[1, 2, 3]));
}

#[test]
fn eval_errors_name_the_node() {
    let mut g = Graph::new("g");
    let table = param(&mut g, "emb", &[4, 2]);
    let ids = input(&mut g, "ids", DType::I64, &[2]);
    let e = g.add(Op::Gather { axis: 0 }, &[table, ids]).unwrap();
    g.node_mut(e).name = Some("embedded".into());
    g.add_output("e", e);
    let mut b = Bindings::default();
    b.params.insert("emb".into(), t32(&[4, 2], &[0.0; 8]));
    b.inputs.insert("ids".into(), ti64(&[2], &[1, 4]));
    let err = eval(&g, &b).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "node %{} (gather `embedded`): gather index 4 at position [1] of the indices is out of range for axis 0 of extent 4",
            e.index()
        )
    );
    assert_eq!(err.root(), &EvalError::GatherIndex { index: 4, position: vec![1], axis: 0, extent: 4 });

    // integer division by zero inside a graph
    let mut g = Graph::new("g");
    let a = input(&mut g, "a", DType::I32, &[2]);
    let z = g.add(Op::Full { value: 0.0, dtype: DType::I32, shape: kiln_ir::dims(&[]) }, &[]).unwrap();
    let d = g.add(Op::Binary(BinaryOp::Div), &[a, z]).unwrap();
    g.add_output("d", d);
    let mut b = Bindings::default();
    b.inputs.insert("a".into(), ti32(&[2], &[1, 2]));
    let err = eval(&g, &b).unwrap_err();
    assert_eq!(err.root(), &EvalError::IntDivByZero { index: vec![] });
}

// ---------------------------------------------------------------------------------------
// a BERT-sized matmul (the timing is printed, not asserted)

#[test]
fn matmul_128x384x1536_matches_f64() {
    let mut g = Graph::new("mm");
    let x = input(&mut g, "x", DType::F32, &[128, 384]);
    let w = param(&mut g, "w", &[384, 1536]);
    let y = g.add(Op::MatMul, &[x, w]).unwrap();
    g.add_output("y", y);
    let mut b = Bindings::default();
    b.inputs.insert("x".into(), rand64(&[128, 384], 1).cast(DType::F32));
    b.params.insert("w".into(), rand64(&[384, 1536], 2).cast(DType::F32));
    eval(&g, &b).unwrap(); // warm up the thread pool
    let t0 = std::time::Instant::now();
    let out = eval(&g, &b).unwrap();
    let dt = t0.elapsed();
    eprintln!("eval of f32 [128,384] x [384,1536]: {dt:?}");
    assert_eq!(out[0].1.shape, vec![128, 1536]);
    // Spot-check elements spread over the result against an f64 dot product.
    let (xv, wv) = (b.inputs["x"].to_f64_vec(), b.params["w"].to_f64_vec());
    for (i, j) in [(0, 0), (5, 77), (64, 1000), (127, 1535), (99, 512)] {
        let want: f64 = (0..384).map(|k| xv[i * 384 + k] * wv[k * 1536 + j]).sum();
        assert!((f32s(&out[0].1)[i * 1536 + j] as f64 - want).abs() < 1e-4, "({i}, {j})");
    }
}

// ---------------------------------------------------------------------------------------
// hostile sizes

/// Whether the system refuses an allocation larger than it can back. With
/// `vm.overcommit_memory = 1` Linux grants any size and the OOM killer decides later, so the
/// refusal cannot be observed there.
fn refuses_huge_allocations() -> bool {
    std::fs::read_to_string("/proc/sys/vm/overcommit_memory").map_or(true, |s| s.trim() != "1")
}

#[test]
fn a_result_too_large_to_allocate_is_an_error_with_its_size() {
    if !refuses_huge_allocations() {
        eprintln!("skipped: vm.overcommit_memory = 1 grants any allocation");
        return;
    }
    // 2^40 f64 elements (8 TiB): the largest tensor the IR allows, more than any test machine.
    let op = Op::Full { value: 1.0, dtype: DType::F64, shape: kiln_ir::dims(&[1 << 20, 1 << 20]) };
    let e = run_err(op.clone(), &[]);
    let msg = e.to_string();
    assert!(matches!(e, EvalError::OutOfMemory(ref a) if a.bytes == 1 << 43), "{msg}");
    assert!(
        msg.starts_with(
            "cannot allocate 8.0 TiB (8796093022208 bytes) for the result of `full`, f64[1048576, 1048576]"
        ),
        "{msg}"
    );
    // Through `eval`, the error names the node.
    let mut g = Graph::new("huge");
    let n = g.add(op, &[]).unwrap();
    g.add_output("y", n);
    let e = eval(&g, &Bindings::default()).expect_err("too large");
    assert!(matches!(e.root(), EvalError::OutOfMemory(_)), "{e}");
    assert!(e.to_string().starts_with("node %0 (full): cannot allocate 8.0 TiB"), "{e}");
}

#[test]
fn matmul_with_an_empty_batch_axis_is_empty() {
    // A batch extent of 0 broadcast against 1 is 0 (not the larger of the two).
    let a = t32(&[1, 2, 3], &[1.0; 6]);
    let b = t32(&[0, 3, 4], &[]);
    let out = run(Op::MatMul, &[&a, &b]);
    assert_eq!(out.shape, vec![0, 2, 4]);
    let out = run(Op::MatMul, &[&b, &t32(&[1, 4, 2], &[1.0; 8])]);
    assert_eq!(out.shape, vec![0, 3, 2]);
    // And an empty contraction is zeros.
    let out = run(Op::MatMul, &[&t32(&[2, 0], &[]), &t32(&[0, 3], &[])]);
    assert_eq!(f32s(&out), &[0.0; 6]);
}

#[test]
fn a_zero_stride_or_dilation_is_a_typing_error() {
    let x = t32(&[1, 1, 4, 4], &[1.0; 16]);
    let w = t32(&[1, 1, 2, 2], &[1.0; 4]);
    for (stride, dilation) in [([1, 1], [0, 1]), ([0, 1], [1, 1])] {
        let op = Op::Conv2d { stride, padding: [0, 0], dilation, groups: 1 };
        let types =
            [TensorType::new(DType::F32, x.shape.clone()), TensorType::new(DType::F32, w.shape.clone())];
        let e = infer(&op, &[&types[0], &types[1]]).expect_err("zero");
        assert!(e.to_string().contains("must be at least 1"), "{e}");
    }
}

// ---- Symbolic sizes: typing, printing, specialization and binding from the inputs ----

/// `batch` in 1..=16 (hint 2) and `seq` in 8..=512, a multiple of 8 (hint 128).
fn symbolic_graph() -> (Graph, kiln_ir::SizeExpr, kiln_ir::SizeExpr) {
    let mut g = Graph::new("dyn");
    g.symbols = vec![
        kiln_ir::SymbolDecl { name: "batch".into(), min: 1, max: 16, hint: 2, multiple_of: 1 },
        kiln_ir::SymbolDecl { name: "seq".into(), min: 8, max: 512, hint: 128, multiple_of: 8 },
    ];
    (g, kiln_ir::SizeExpr::symbol(0, "batch"), kiln_ir::SizeExpr::symbol(1, "seq"))
}

fn sym(e: &kiln_ir::SizeExpr) -> Dim {
    Dim::Sym(e.clone())
}

/// ids `i64[batch, seq]` and a mask `f32[batch, seq]` → embeddings of the ids, summed with
/// the first `seq` rows of a position table, times the mask, flattened to `[batch*seq, 4]`.
fn embed(g: &mut Graph, b: &kiln_ir::SizeExpr, s: &kiln_ir::SizeExpr) -> kiln_ir::NodeId {
    let ids = g
        .add(Op::Input { name: "input_ids".into(), dtype: DType::I64, shape: vec![sym(b), sym(s)] }, &[])
        .unwrap();
    let mask = g
        .add(Op::Input { name: "attention_mask".into(), dtype: DType::F32, shape: vec![sym(b), sym(s)] }, &[])
        .unwrap();
    let init = kiln_ir::Init::Normal { mean: 0.0, std: 1.0 };
    let table = g
        .add(
            Op::Param {
                name: "wte".into(),
                dtype: DType::F32,
                shape: kiln_ir::dims(&[10, 4]),
                init: init.clone(),
            },
            &[],
        )
        .unwrap();
    let pos = g
        .add(Op::Param { name: "wpe".into(), dtype: DType::F32, shape: kiln_ir::dims(&[512, 4]), init }, &[])
        .unwrap();
    let x = g.add(Op::Gather { axis: 0 }, &[table, ids]).unwrap();
    let p = g.add(Op::Slice { axis: 0, start: Dim::Const(0), end: sym(s), step: 1 }, &[pos]).unwrap();
    let x = g.add(Op::Binary(BinaryOp::Add), &[x, p]).unwrap();
    let m = g.add(Op::Reshape { shape: vec![sym(b), sym(s), Dim::Const(1)] }, &[mask]).unwrap();
    let x = g.add(Op::Binary(BinaryOp::Mul), &[x, m]).unwrap();
    let rows = b.mul(s).unwrap();
    g.add(Op::Reshape { shape: vec![sym(&rows), Dim::Const(4)] }, &[x]).unwrap()
}

#[test]
fn symbolic_graphs_print_their_symbols_and_extents_by_name() {
    let (mut g, b, s) = symbolic_graph();
    let y = embed(&mut g, &b, &s);
    g.add_output("y", y);
    kiln_ir::verify(&g).unwrap();
    assert_eq!(
        kiln_ir::print::to_text(&g, Default::default()),
        "graph dyn {
  symbol batch : 1..=16, hint 2
  symbol seq : 8..=512, a multiple of 8, hint 128
  %0 = input {name = \"input_ids\"} : i64[batch, seq]
  %1 = input {name = \"attention_mask\"} : f32[batch, seq]
  %2 = param {name = \"wte\", init = normal(0, 1)} : f32[10, 4]
  %3 = param {name = \"wpe\", init = normal(0, 1)} : f32[512, 4]
  %4 = gather(%2, %0) {axis = 0} : f32[batch, seq, 4]
  %5 = slice(%3) {axis = 0, start = 0, end = seq, step = 1} : f32[seq, 4]
  %6 = add(%4, %5) : f32[batch, seq, 4]
  %7 = reshape(%1) {shape = [batch, seq, 1]} : f32[batch, seq, 1]
  %8 = mul(%6, %7) : f32[batch, seq, 4]
  %9 = reshape(%8) {shape = [batch*seq, 4]} : f32[batch*seq, 4]
  output y = %9
}
"
    );
    assert!(!g.is_static());
    assert_eq!(
        g.require_static().unwrap_err().to_string(),
        "the dynamic sizes `batch` and `seq` are not specialized: compiling needs static shapes; \
         specialize with `--set NAME=VALUE` (--set batch=2 --set seq=128)"
    );
}

#[test]
fn unproven_extents_are_typing_errors_naming_both_sizes() {
    let (_, b, s) = symbolic_graph();
    let t = |shape: Vec<Dim>| TensorType { dtype: DType::F32, shape };
    let err = |op: Op, types: &[TensorType]| {
        let refs: Vec<&TensorType> = types.iter().collect();
        kiln_ir::infer(&op, &refs).unwrap_err().to_string()
    };
    assert_eq!(
        err(Op::MatMul, &[t(vec![Dim::Const(2), sym(&s)]), t(vec![sym(&b), Dim::Const(3)])]),
        "`matmul`: cannot prove that the inner dimensions of [2, seq] · [batch, 3] are equal: seq vs batch"
    );
    assert_eq!(
        err(Op::Binary(BinaryOp::Add), &[t(vec![sym(&s)]), t(vec![sym(&b)])]),
        "`add`: cannot prove that axis 0 of [seq] and [batch] are equal: seq vs batch"
    );
    let two_s = s.scale(2).unwrap();
    assert_eq!(
        err(Op::Reshape { shape: vec![sym(&two_s)] }, &[t(vec![sym(&b), sym(&s)])]),
        "`reshape`: cannot prove that the element counts of [batch, seq] and [2*seq] are equal: batch*seq vs 2*seq"
    );
    assert_eq!(
        err(Op::Concat { axis: 1 }, &[t(vec![sym(&b), Dim::Const(2)]), t(vec![sym(&s), Dim::Const(2)])]),
        "`concat`: cannot prove that axis 0 of the concatenated [batch, 2] and [seq, 2] are equal: batch vs seq"
    );
    // A convolution's channels are the weight's: they stay static.
    let conv = Op::Conv2d { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 };
    let x = t(vec![Dim::Const(2), sym(&b), Dim::Const(4), Dim::Const(8)]);
    assert_eq!(
        err(conv, &[x, t(kiln_ir::dims(&[4, 3, 3, 3]))]),
        "`conv2d`: needs the input channels (axis 1) to be static, got [2, batch, 4, 8]"
    );
    // Equal normal forms agree however they were written.
    let ok =
        kiln_ir::infer(&Op::Reshape { shape: vec![sym(&s.mul(&b).unwrap())] }, &[&t(vec![sym(&b), sym(&s)])]);
    assert_eq!(ok.map(|t| t.to_string()), Ok("f32[batch*seq]".to_string()));
}

#[test]
fn symbolic_slices_are_checked_against_the_bounds() {
    let (mut g, _, s) = symbolic_graph();
    let short = g
        .add(Op::Input { name: "t".into(), dtype: DType::F32, shape: kiln_ir::dims(&[256, 4]) }, &[])
        .unwrap();
    let e = g.add(Op::Slice { axis: 0, start: Dim::Const(0), end: sym(&s), step: 1 }, &[short]).unwrap_err();
    assert_eq!(e.to_string(), "`slice`: slice 0..seq step 1 on axis 0 is out of range for [256, 4]");
    let long = g
        .add(Op::Input { name: "u".into(), dtype: DType::F32, shape: kiln_ir::dims(&[512, 4]) }, &[])
        .unwrap();
    let ty = g
        .add(Op::Slice { axis: 0, start: Dim::Const(2), end: sym(&s), step: 2 }, &[long])
        .map(|n| g.ty(n).to_string());
    assert_eq!(ty, Ok("f32[(seq + 1)//2 - 1, 4]".to_string()));
    // Interval arithmetic cannot see that `seq//2 <= seq`, so that slice is refused.
    let half = s.floor_div(2).unwrap();
    let e = g.add(Op::Slice { axis: 0, start: sym(&half), end: sym(&s), step: 2 }, &[long]).unwrap_err();
    assert_eq!(e.to_string(), "`slice`: slice seq//2..seq step 2 on axis 0 is out of range for [512, 4]");
}

/// A window along a run-time extent has a run-time output, `⌊(size + 2·pad − span) / stride⌋
/// + 1`, and must fit the input at the smallest size the bounds allow.
#[test]
fn windows_along_run_time_extents_have_run_time_outputs_that_fit_the_bounds() {
    let (mut g, b, s) = symbolic_graph();
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![sym(&b), Dim::Const(3), Dim::Const(1), sym(&s)],
            },
            &[],
        )
        .unwrap();
    let w = g
        .add(
            Op::Param {
                name: "w".into(),
                dtype: DType::F32,
                shape: kiln_ir::dims(&[4, 3, 1, 5]),
                init: kiln_ir::Init::Zeros,
            },
            &[],
        )
        .unwrap();
    let conv = |stride: usize, pad: usize, dilation: usize| Op::Conv2d {
        stride: [1, stride],
        padding: [0, pad],
        dilation: [1, dilation],
        groups: 1,
    };
    let ty = |g: &mut Graph, op: Op, args: &[kiln_ir::NodeId]| g.add(op, args).map(|n| g.ty(n).to_string());
    assert_eq!(ty(&mut g, conv(1, 2, 1), &[x, w]), Ok("f32[batch, 4, 1, seq]".to_string()));
    assert_eq!(ty(&mut g, conv(2, 2, 1), &[x, w]), Ok("f32[batch, 4, 1, (seq + 1)//2]".to_string()));
    assert_eq!(ty(&mut g, conv(1, 0, 1), &[x, w]), Ok("f32[batch, 4, 1, seq - 4]".to_string()));
    // seq is at least 8: a span of 9 (5 taps, dilation 2) fits it with one padding each side.
    assert_eq!(ty(&mut g, conv(1, 1, 2), &[x, w]), Ok("f32[batch, 4, 1, seq - 6]".to_string()));
    assert_eq!(
        ty(&mut g, conv(1, 0, 2), &[x, w]).unwrap_err().to_string(),
        "`conv2d`: window 5 (dilation 2) does not fit input seq with padding 0 at its smallest, 8"
    );
    let pool = Op::Pool2d { kind: kiln_ir::PoolKind::Max, kernel: [1, 2], stride: [1, 2], padding: [0, 0] };
    assert_eq!(ty(&mut g, pool, &[x]), Ok("f32[batch, 3, 1, seq//2]".to_string()));
}

/// The same graph built with static extents, as `--set` gives it.
fn static_embed(batch: usize, seq: usize) -> Graph {
    let mut g = Graph::new("dyn");
    let (b, s) = (kiln_ir::SizeExpr::constant(batch as i64), kiln_ir::SizeExpr::constant(seq as i64));
    let y = embed_static(&mut g, &b, &s);
    g.add_output("y", y);
    g
}

fn embed_static(g: &mut Graph, b: &kiln_ir::SizeExpr, s: &kiln_ir::SizeExpr) -> kiln_ir::NodeId {
    // `embed` with constants: each extent goes through `Dim::from_expr`, so it is a `Const`.
    let c = |e: &kiln_ir::SizeExpr| Dim::from_expr(e.clone()).unwrap();
    let ids = g
        .add(Op::Input { name: "input_ids".into(), dtype: DType::I64, shape: vec![c(b), c(s)] }, &[])
        .unwrap();
    let mask = g
        .add(Op::Input { name: "attention_mask".into(), dtype: DType::F32, shape: vec![c(b), c(s)] }, &[])
        .unwrap();
    let init = kiln_ir::Init::Normal { mean: 0.0, std: 1.0 };
    let table = g
        .add(
            Op::Param {
                name: "wte".into(),
                dtype: DType::F32,
                shape: kiln_ir::dims(&[10, 4]),
                init: init.clone(),
            },
            &[],
        )
        .unwrap();
    let pos = g
        .add(Op::Param { name: "wpe".into(), dtype: DType::F32, shape: kiln_ir::dims(&[512, 4]), init }, &[])
        .unwrap();
    let x = g.add(Op::Gather { axis: 0 }, &[table, ids]).unwrap();
    let p = g.add(Op::Slice { axis: 0, start: Dim::Const(0), end: c(s), step: 1 }, &[pos]).unwrap();
    let x = g.add(Op::Binary(BinaryOp::Add), &[x, p]).unwrap();
    let m = g.add(Op::Reshape { shape: vec![c(b), c(s), Dim::Const(1)] }, &[mask]).unwrap();
    let x = g.add(Op::Binary(BinaryOp::Mul), &[x, m]).unwrap();
    g.add(Op::Reshape { shape: vec![c(&b.mul(s).unwrap()), Dim::Const(4)] }, &[x]).unwrap()
}

#[test]
fn specializing_gives_the_static_graph() {
    let (mut g, b, s) = symbolic_graph();
    let y = embed(&mut g, &b, &s);
    g.add_output("y", y);
    for (batch, seq) in [(1, 8), (2, 128), (16, 512), (3, 40)] {
        let spec = g.specialize(&[batch as i64, seq as i64]).unwrap();
        assert!(spec.is_static());
        let text = |g: &Graph| kiln_ir::print::to_text(g, Default::default());
        assert_eq!(text(&spec), text(&static_embed(batch, seq)), "batch {batch}, seq {seq}");
    }
    let err = |v: &[i64]| g.specialize(v).unwrap_err().to_string();
    assert_eq!(err(&[2, 100]), "`seq` is 100, but it takes 8..=512, a multiple of 8");
    assert_eq!(err(&[0, 8]), "`batch` is 0, but it takes 1..=16");
    assert_eq!(err(&[2]), "the graph has 2 symbol(s), but 1 value(s) were given");
}

#[test]
fn the_interpreter_binds_symbols_from_the_inputs() {
    let (mut g, b, s) = symbolic_graph();
    let y = embed(&mut g, &b, &s);
    g.add_output("y", y);
    let params = kiln_ir::bind_params(&g, None, 3, true).unwrap();
    let bind = |ids: &[usize], mask: &[usize]| {
        let n: usize = ids.iter().product();
        let ids_t = Tensor::new(ids.to_vec(), Buffer::I64((0..n as i64).map(|i| i % 10).collect())).unwrap();
        let m: usize = mask.iter().product();
        let mask_t =
            Tensor::new(mask.to_vec(), Buffer::F32((0..m).map(|i| (i % 3) as f32).collect())).unwrap();
        Bindings {
            inputs: [("input_ids".to_string(), ids_t), ("attention_mask".to_string(), mask_t)].into(),
            params: params.clone(),
        }
    };
    for (batch, seq) in [(1, 8), (2, 128), (16, 512)] {
        let inputs = bind(&[batch, seq], &[batch, seq]);
        let got = eval(&g, &inputs).unwrap();
        let want = eval(&static_embed(batch, seq), &inputs).unwrap();
        assert_eq!(got, want, "batch {batch}, seq {seq}");
        assert_eq!(got[0].1.shape, vec![batch * seq, 4]);
    }
    let err = |ids: &[usize], mask: &[usize]| eval(&g, &bind(ids, mask)).unwrap_err().to_string();
    assert_eq!(err(&[1, 600], &[1, 600]), "input `input_ids` axis 1 is 600, but `seq` is at most 512");
    assert_eq!(err(&[1, 100], &[1, 100]), "input `input_ids` axis 1 is 100, but `seq` is a multiple of 8");
    assert_eq!(err(&[1, 0], &[1, 0]), "input `input_ids` axis 1 is 0, but `seq` is at least 8");
    assert_eq!(
        err(&[1, 128], &[1, 64]),
        "input `attention_mask` axis 1 is 64, but `seq` is 128 (from input `input_ids` axis 1)"
    );
}
