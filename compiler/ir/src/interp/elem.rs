//! Element traits and the strided-iteration helpers every kernel is built on.
//!
//! Kernels are written once, generically over [`Elem`] (any stored element type), [`Real`]
//! (f32 and f64) or [`Int`] (i32 and i64), and dispatched on the [`Buffer`] variant once per
//! op, so inner loops run on typed slices and never go through `Buffer::get_f64`.
//! f16 and bf16 have no arithmetic of their own here: kernels widen them to f32, compute,
//! and round the result back (see [`widen_f32`] / [`narrow_like`]).

use crate::dtype::DType;
use crate::tensor::Buffer;
use half::{bf16, f16};

/// Any element type a [`Buffer`] stores, with the conversions of a `cast`.
///
/// Float → int truncates toward zero (out-of-range values saturate and NaN becomes 0, as
/// Rust's `as` does); int → int wraps (two's complement, like numpy's `astype`); anything →
/// bool is `x != 0` (so NaN → true); bool → number is 0 or 1; conversions between floats
/// round to nearest even.
pub(crate) trait Elem: Copy + Send + Sync + PartialOrd + 'static {
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    fn to_i32(self) -> i32;
    fn to_i64(self) -> i64;
    fn to_bool(self) -> bool;
    fn to_f16(self) -> f16;
    fn to_bf16(self) -> bf16;
    /// The value of a scalar attribute (a pad or fill value) in this type, like
    /// [`Buffer::from_f64`].
    fn from_f64(v: f64) -> Self;
}

macro_rules! elem_prim {
    ($t:ty, $zero:expr) => {
        impl Elem for $t {
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn to_i32(self) -> i32 {
                self as i32
            }
            #[inline(always)]
            fn to_i64(self) -> i64 {
                self as i64
            }
            #[inline(always)]
            fn to_bool(self) -> bool {
                self != $zero
            }
            #[inline(always)]
            fn to_f16(self) -> f16 {
                f16::from_f64(self as f64)
            }
            #[inline(always)]
            fn to_bf16(self) -> bf16 {
                bf16::from_f64(self as f64)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}
// Rust's primitive numbers: `as` conversions; only the zero for `to_bool` differs.
elem_prim!(f32, 0.0);
elem_prim!(f64, 0.0);
elem_prim!(i32, 0);
elem_prim!(i64, 0);

macro_rules! elem_half {
    ($t:ty) => {
        impl Elem for $t {
            #[inline(always)]
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn to_i32(self) -> i32 {
                <$t>::to_f32(self) as i32
            }
            #[inline(always)]
            fn to_i64(self) -> i64 {
                <$t>::to_f32(self) as i64
            }
            #[inline(always)]
            fn to_bool(self) -> bool {
                <$t>::to_f32(self) != 0.0
            }
            #[inline(always)]
            fn to_f16(self) -> f16 {
                // Widening to f32 is exact, so this rounds once.
                f16::from_f32(<$t>::to_f32(self))
            }
            #[inline(always)]
            fn to_bf16(self) -> bf16 {
                bf16::from_f32(<$t>::to_f32(self))
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
        }
    };
}
elem_half!(f16);
elem_half!(bf16);

impl Elem for bool {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as u8 as f32
    }
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
    #[inline(always)]
    fn to_bool(self) -> bool {
        self
    }
    #[inline(always)]
    fn to_f16(self) -> f16 {
        if self {
            f16::ONE
        } else {
            f16::ZERO
        }
    }
    #[inline(always)]
    fn to_bf16(self) -> bf16 {
        if self {
            bf16::ONE
        } else {
            bf16::ZERO
        }
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v != 0.0
    }
}

/// f32 and f64: the types float kernels compute in.
pub(crate) trait Real: Elem + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    const INFINITY: Self;
    fn is_nan(self) -> bool;
    fn neg(self) -> Self;
    fn abs(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn powf(self, o: Self) -> Self;
    /// numpy `maximum`: NaN if either operand is NaN.
    #[inline(always)]
    fn max_nan(self, o: Self) -> Self {
        if self.is_nan() || o.is_nan() {
            if self.is_nan() {
                self
            } else {
                o
            }
        } else if o > self {
            o
        } else {
            self
        }
    }
    /// numpy `minimum`: NaN if either operand is NaN.
    #[inline(always)]
    fn min_nan(self, o: Self) -> Self {
        if self.is_nan() || o.is_nan() {
            if self.is_nan() {
                self
            } else {
                o
            }
        } else if o < self {
            o
        } else {
            self
        }
    }
}

macro_rules! real {
    ($t:ty, $erf:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const INFINITY: Self = <$t>::INFINITY;
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn neg(self) -> Self {
                -self
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                let f: fn($t) -> $t = $erf;
                f(self)
            }
            #[inline(always)]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline(always)]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline(always)]
            fn powf(self, o: Self) -> Self {
                <$t>::powf(self, o)
            }
        }
    };
}
// f32 erf is evaluated in f64 and rounded once: more accurate than `erff`.
real!(f32, |x| libm::erf(x as f64) as f32);
real!(f64, libm::erf);

/// i32 and i64, with numpy's wrap-around arithmetic.
pub(crate) trait Int: Elem + Ord + Eq {
    const ZERO: Self;
    const MIN: Self;
    const MAX: Self;
    fn wadd(self, o: Self) -> Self;
    fn wsub(self, o: Self) -> Self;
    fn wmul(self, o: Self) -> Self;
    /// Division truncating toward zero (C semantics); `MIN / -1` wraps to `MIN`.
    /// The caller guarantees `o != 0`.
    fn wdiv(self, o: Self) -> Self;
    fn wneg(self) -> Self;
    fn wabs(self) -> Self;
}

macro_rules! int {
    ($t:ty) => {
        impl Int for $t {
            const ZERO: Self = 0;
            const MIN: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            #[inline(always)]
            fn wadd(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn wsub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            #[inline(always)]
            fn wmul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            #[inline(always)]
            fn wdiv(self, o: Self) -> Self {
                self.wrapping_div(o)
            }
            #[inline(always)]
            fn wneg(self) -> Self {
                self.wrapping_neg()
            }
            #[inline(always)]
            fn wabs(self) -> Self {
                self.wrapping_abs()
            }
        }
    };
}
int!(i32);
int!(i64);

/// Applies a generic expression to whichever typed vector a [`Buffer`] holds, producing a
/// buffer of the same dtype: `map_buffer!(buf, v => f(v))`, with `v: &Vec<T>` in each arm.
macro_rules! map_buffer {
    ($buf:expr, $v:ident => $body:expr) => {
        match $buf {
            $crate::tensor::Buffer::F32($v) => $crate::tensor::Buffer::F32($body),
            $crate::tensor::Buffer::F64($v) => $crate::tensor::Buffer::F64($body),
            $crate::tensor::Buffer::F16($v) => $crate::tensor::Buffer::F16($body),
            $crate::tensor::Buffer::BF16($v) => $crate::tensor::Buffer::BF16($body),
            $crate::tensor::Buffer::I32($v) => $crate::tensor::Buffer::I32($body),
            $crate::tensor::Buffer::I64($v) => $crate::tensor::Buffer::I64($body),
            $crate::tensor::Buffer::Bool($v) => $crate::tensor::Buffer::Bool($body),
        }
    };
}
pub(crate) use map_buffer;

/// The elements of an f16 or bf16 buffer widened (exactly) to f32.
pub(crate) fn widen_f32(b: &Buffer) -> Option<Vec<f32>> {
    match b {
        Buffer::F16(v) => Some(v.iter().map(|x| x.to_f32()).collect()),
        Buffer::BF16(v) => Some(v.iter().map(|x| x.to_f32()).collect()),
        _ => None,
    }
}

/// f32 results rounded (to nearest even) back to `dtype`, which is f16 or bf16.
pub(crate) fn narrow_like(dtype: DType, v: Vec<f32>) -> Buffer {
    match dtype {
        DType::F16 => Buffer::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => Buffer::BF16(v.into_iter().map(bf16::from_f32).collect()),
        _ => Buffer::F32(v),
    }
}

/// Converts a typed slice to `to` (the conversions of [`Elem`]).
pub(crate) fn cast_slice<S: Elem>(v: &[S], to: DType) -> Buffer {
    match to {
        DType::F32 => Buffer::F32(v.iter().map(|x| x.to_f32()).collect()),
        DType::F64 => Buffer::F64(v.iter().map(|x| x.to_f64()).collect()),
        DType::F16 => Buffer::F16(v.iter().map(|x| x.to_f16()).collect()),
        DType::BF16 => Buffer::BF16(v.iter().map(|x| x.to_bf16()).collect()),
        DType::I32 => Buffer::I32(v.iter().map(|x| x.to_i32()).collect()),
        DType::I64 => Buffer::I64(v.iter().map(|x| x.to_i64()).collect()),
        DType::Bool => Buffer::Bool(v.iter().map(|x| x.to_bool()).collect()),
    }
}

/// Strides (in elements) of an operand of shape `shape` read as if it had shape `out`, with
/// numpy broadcasting: missing leading axes and extent-1 axes get stride 0.
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = crate::dtype::strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len()).map(|i| if i < lead || shape[i - lead] == 1 { 0 } else { own[i - lead] }).collect()
}

/// A strided view of `N` operands over a row-major output shape, simplified for iteration:
/// extent-1 axes are dropped and adjacent axes that every operand walks contiguously are
/// merged, so the last axis is as long as possible.
pub(crate) struct Walk<const N: usize> {
    /// Output extents after simplification (never empty; `[1]` for a scalar).
    pub shape: Vec<usize>,
    /// Per operand, its stride along each simplified axis.
    pub strides: [Vec<usize>; N],
}

impl<const N: usize> Walk<N> {
    pub fn new(out: &[usize], strides: [Vec<usize>; N]) -> Walk<N> {
        let mut shape: Vec<usize> = Vec::with_capacity(out.len());
        let mut st: [Vec<usize>; N] = std::array::from_fn(|_| Vec::with_capacity(out.len()));
        for (d, &ext) in out.iter().enumerate() {
            if ext == 1 {
                continue;
            }
            if let Some(&last) = shape.last() {
                // Merge axis d into the previous axis when, for every operand, stepping the
                // previous axis once equals stepping axis d `ext` times.
                let mergeable = (0..N).all(|k| *st[k].last().unwrap() == strides[k][d] * ext);
                if mergeable {
                    *shape.last_mut().unwrap() = last * ext;
                    for k in 0..N {
                        *st[k].last_mut().unwrap() = strides[k][d];
                    }
                    continue;
                }
            }
            shape.push(ext);
            for k in 0..N {
                st[k].push(strides[k][d]);
            }
        }
        if shape.is_empty() {
            shape.push(1);
            for s in st.iter_mut() {
                s.push(0);
            }
        }
        Walk { shape, strides: st }
    }

    /// Length of one row (the last simplified axis).
    pub fn row_len(&self) -> usize {
        *self.shape.last().unwrap()
    }

    /// Each operand's stride along a row.
    pub fn row_strides(&self) -> [usize; N] {
        std::array::from_fn(|k| *self.strides[k].last().unwrap())
    }

    /// Calls `f(row, offsets)` for every row in row-major order, with each operand's offset
    /// of the row's first element.
    pub fn for_each_row(&self, mut f: impl FnMut(usize, [usize; N])) {
        let total: usize = self.shape.iter().product();
        if total == 0 {
            return;
        }
        let rows = total / self.row_len();
        let outer = self.shape.len() - 1;
        let mut idx = vec![0usize; outer];
        let mut offs = [0usize; N];
        for row in 0..rows {
            f(row, offs);
            // Advance the odometer over the outer axes.
            let mut d = outer;
            while d > 0 {
                d -= 1;
                idx[d] += 1;
                for (o, s) in offs.iter_mut().zip(&self.strides) {
                    *o += s[d];
                }
                if idx[d] < self.shape[d] {
                    break;
                }
                for (o, s) in offs.iter_mut().zip(&self.strides) {
                    *o -= s[d] * self.shape[d];
                }
                idx[d] = 0;
            }
        }
    }
}

/// Copies the elements of `src` seen through `strides` (one per axis of `out`, starting at
/// `base`) into a new row-major vector of shape `out`.
pub(crate) fn strided_copy<T: Copy>(src: &[T], base: usize, out: &[usize], strides: Vec<usize>) -> Vec<T> {
    let n: usize = out.iter().product();
    let mut dst = Vec::with_capacity(n);
    let walk = Walk::new(out, [strides]);
    let len = walk.row_len();
    let [s] = walk.row_strides();
    walk.for_each_row(|_, [o]| {
        let o = o + base;
        match s {
            1 => dst.extend_from_slice(&src[o..o + len]),
            0 => dst.extend(std::iter::repeat_n(src[o], len)),
            _ => dst.extend((0..len).map(|j| src[o + j * s])),
        }
    });
    dst
}

/// Minimum element count before an elementwise loop is split across threads.
pub(crate) const PAR_MIN: usize = 1 << 15;
