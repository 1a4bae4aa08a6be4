//! Config values and the evaluation of config expressions.

use kiln_spec::{CExpr, SpannedCExpr};
use std::collections::HashMap;
use std::fmt;

/// The value of a config expression.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CValue {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for CValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CValue::Int(i) => write!(f, "{i}"),
            CValue::Float(x) => write!(f, "{x:?}"),
            CValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl CValue {
    pub fn as_f64(self) -> Option<f64> {
        match self {
            CValue::Int(i) => Some(i as f64),
            CValue::Float(f) => Some(f),
            CValue::Bool(_) => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            CValue::Int(_) => "an integer",
            CValue::Float(_) => "a number",
            CValue::Bool(_) => "a bool",
        }
    }

    /// Parses a command-line value (`--set k=v`): an integer, a number or a bool.
    pub fn parse_literal(s: &str) -> Option<CValue> {
        let s = s.trim();
        match s {
            "true" => Some(CValue::Bool(true)),
            "false" => Some(CValue::Bool(false)),
            _ => s.parse::<i64>().map(CValue::Int).ok().or_else(|| s.parse::<f64>().ok().map(CValue::Float)),
        }
    }
}

/// Answers `dim(x, axis)` and `rank(x)`: the shape of a tensor bound to a name, each extent
/// at the symbols' hints (what a config value is checked with).
pub trait ShapeLookup {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>>;

    /// The range and size of axis `axis` of `name` when that extent is symbolic (a negative
    /// axis counts from the end); `None` when it is static or there is no such axis.
    fn dynamic_dim(&self, _name: &str, _axis: i64) -> Option<(crate::symbols::Range, kiln_ir::SizeExpr)> {
        None
    }
}

/// Where config names are looked up: innermost first.
pub struct ConfigEnv<'a> {
    pub frames: Vec<&'a HashMap<String, CValue>>,
}

impl ConfigEnv<'_> {
    pub fn get(&self, name: &str) -> Option<CValue> {
        self.frames.iter().find_map(|f| f.get(name).copied())
    }

    pub fn names(&self) -> Vec<&str> {
        self.frames.iter().flat_map(|f| f.keys().map(|k| k.as_str())).collect()
    }
}

/// Evaluates a config expression; the error is a message for the expression's span.
///
/// Arithmetic is checked: integer overflow (`i64::MIN % -1`'s quotient, `-i64::MIN`,
/// `abs(i64::MIN)`), division by zero, a float that does not fit an integer (`floor(1e300)`)
/// and any result that is NaN (`sqrt(-1)`, `0.0 / 0.0`, `inf - inf`) are errors rather than
/// panics or silently wrong values. Infinities stay allowed: `-inf` is a mask's fill value.
pub fn eval(e: &CExpr, env: &ConfigEnv, shapes: &dyn ShapeLookup) -> Result<CValue, String> {
    let v = eval_unchecked(e, env, shapes)?;
    match v {
        CValue::Float(f) if f.is_nan() => Err(format!("`{e}` is NaN (not a number)")),
        v => Ok(v),
    }
}

/// [`eval`] without the NaN check at the root (each operand is checked as it is evaluated).
fn eval_unchecked(e: &CExpr, env: &ConfigEnv, shapes: &dyn ShapeLookup) -> Result<CValue, String> {
    use kiln_spec::cexpr::BinOp as B;
    Ok(match e {
        CExpr::Int(i) => CValue::Int(*i),
        // RON reads `NaN`; no config value (an eps, a scale, a fill value) means it.
        CExpr::Float(f) if f.is_nan() => return Err("NaN is not a valid config value".into()),
        CExpr::Float(f) => CValue::Float(*f),
        CExpr::Bool(b) => CValue::Bool(*b),
        CExpr::Name(n) => match env.get(n) {
            Some(v) => v,
            None => {
                let hint = kiln_spec::closest(n, env.names())
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                return Err(format!("unknown config name `{n}`{hint}"));
            }
        },
        CExpr::Neg(x) => match eval(x, env, shapes)? {
            CValue::Int(i) => {
                CValue::Int(i.checked_neg().ok_or_else(|| format!("integer overflow in `-({i})`"))?)
            }
            CValue::Float(f) => CValue::Float(-f),
            CValue::Bool(_) => return Err("cannot negate a bool".into()),
        },
        CExpr::Not(x) => match eval(x, env, shapes)? {
            CValue::Bool(b) => CValue::Bool(!b),
            v => return Err(format!("`not` needs a bool, got {}", v.kind())),
        },
        CExpr::Bin(op, a, b) => {
            let (a, b) = (eval(a, env, shapes)?, eval(b, env, shapes)?);
            match (op, a, b) {
                (B::And, CValue::Bool(x), CValue::Bool(y)) => CValue::Bool(x && y),
                (B::Or, CValue::Bool(x), CValue::Bool(y)) => CValue::Bool(x || y),
                (B::And | B::Or, _, _) => return Err(format!("`{}` needs two bools", op.symbol())),
                (B::Eq, x, y) => CValue::Bool(x == y || (x.as_f64().is_some() && x.as_f64() == y.as_f64())),
                (B::Ne, x, y) => {
                    CValue::Bool(!(x == y || (x.as_f64().is_some() && x.as_f64() == y.as_f64())))
                }
                (_, CValue::Int(x), CValue::Int(y)) => int_op(*op, x, y)?,
                (_, x, y) => {
                    let (Some(x), Some(y)) = (x.as_f64(), y.as_f64()) else {
                        return Err(format!(
                            "`{}` needs numbers, got {} and {}",
                            op.symbol(),
                            x.kind(),
                            y.kind()
                        ));
                    };
                    match op {
                        B::Add => CValue::Float(x + y),
                        B::Sub => CValue::Float(x - y),
                        B::Mul => CValue::Float(x * y),
                        B::Div => CValue::Float(x / y),
                        B::FloorDiv => CValue::Float((x / y).floor()),
                        B::Rem => CValue::Float(x % y),
                        B::Pow => CValue::Float(x.powf(y)),
                        B::Lt => CValue::Bool(x < y),
                        B::Le => CValue::Bool(x <= y),
                        B::Gt => CValue::Bool(x > y),
                        B::Ge => CValue::Bool(x >= y),
                        B::Eq | B::Ne | B::And | B::Or => unreachable!("handled above"),
                    }
                }
            }
        }
        CExpr::Call(f, args) => match f.as_str() {
            "dim" | "rank" => {
                let CExpr::Name(t) = &args[0] else {
                    return Err(format!("`{f}` takes a tensor name as its first argument"));
                };
                let Some(shape) = shapes.shape_of(t) else {
                    return Err(format!("`{f}({t}, …)`: no tensor named `{t}` here"));
                };
                if f == "rank" {
                    CValue::Int(shape.len() as i64)
                } else {
                    let CValue::Int(axis) = eval(&args[1], env, shapes)? else {
                        return Err("`dim` needs an integer axis".into());
                    };
                    let r = shape.len() as i64;
                    let a = if axis < 0 { axis + r } else { axis };
                    if a < 0 || a >= r {
                        return Err(format!("`dim({t}, {axis})`: axis out of range for rank {r}"));
                    }
                    CValue::Int(shape[a as usize] as i64)
                }
            }
            "min" | "max" => {
                let (a, b) = (eval(&args[0], env, shapes)?, eval(&args[1], env, shapes)?);
                match (a, b) {
                    (CValue::Int(x), CValue::Int(y)) => {
                        CValue::Int(if f == "min" { x.min(y) } else { x.max(y) })
                    }
                    _ => {
                        let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
                            return Err(format!("`{f}` needs numbers"));
                        };
                        CValue::Float(if f == "min" { x.min(y) } else { x.max(y) })
                    }
                }
            }
            _ => {
                let v = eval(&args[0], env, shapes)?;
                if let (CValue::Int(i), "abs") = (v, f.as_str()) {
                    return i
                        .checked_abs()
                        .map(CValue::Int)
                        .ok_or_else(|| format!("integer overflow in `abs({i})`"));
                }
                let Some(x) = v.as_f64() else {
                    return Err(format!("`{f}` needs a number, got {}", v.kind()));
                };
                match f.as_str() {
                    "sqrt" => CValue::Float(x.sqrt()),
                    "rsqrt" => CValue::Float(1.0 / x.sqrt()),
                    "exp" => CValue::Float(x.exp()),
                    "log" => CValue::Float(x.ln()),
                    "abs" => CValue::Float(x.abs()),
                    "floor" => CValue::Int(to_int(x.floor(), f)?),
                    "ceil" => CValue::Int(to_int(x.ceil(), f)?),
                    other => return Err(format!("unknown function `{other}`")),
                }
            }
        },
    })
}

/// An integral float as an integer, or an error when it is beyond `i64` (or not finite).
fn to_int(v: f64, f: &str) -> Result<i64, String> {
    // -2^63 is exact in f64 and in range; 2^63 is the first value past the top.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if (-LIMIT..LIMIT).contains(&v) {
        Ok(v as i64)
    } else {
        Err(format!("`{f}` of {v:?} does not fit a 64-bit integer"))
    }
}

fn int_op(op: kiln_spec::cexpr::BinOp, x: i64, y: i64) -> Result<CValue, String> {
    use kiln_spec::cexpr::BinOp as B;
    let overflow = || format!("integer overflow in `{x} {} {y}`", op.symbol());
    Ok(match op {
        B::Add => CValue::Int(x.checked_add(y).ok_or_else(overflow)?),
        B::Sub => CValue::Int(x.checked_sub(y).ok_or_else(overflow)?),
        B::Mul => CValue::Int(x.checked_mul(y).ok_or_else(overflow)?),
        B::Div | B::FloorDiv | B::Rem if y == 0 => {
            return Err(format!("division by zero in `{x} {} {y}`", op.symbol()))
        }
        // `/` stays an integer when it divides exactly, so `d / heads` is a valid extent.
        // (`wrapping_rem` is the true remainder, 0 even for `i64::MIN % -1`; the quotient
        // that overflows there is checked.)
        B::Div if x.wrapping_rem(y) == 0 => CValue::Int(x.checked_div(y).ok_or_else(overflow)?),
        B::Div => CValue::Float(x as f64 / y as f64),
        // Floor division and its remainder, as in Python: the remainder takes the sign of y.
        B::FloorDiv => {
            let q = x.checked_div(y).ok_or_else(overflow)?;
            // Truncation rounded toward zero; floor is one lower when the signs differ. `q`
            // is above i64::MIN here (it equals it only for `i64::MIN // 1`, which is exact).
            CValue::Int(if x.wrapping_rem(y) != 0 && ((x < 0) != (y < 0)) { q - 1 } else { q })
        }
        B::Rem => CValue::Int(floor_rem(x, y)),
        B::Pow if (0..64).contains(&y) => CValue::Int(x.checked_pow(y as u32).ok_or_else(overflow)?),
        B::Pow => CValue::Float((x as f64).powf(y as f64)),
        B::Lt => CValue::Bool(x < y),
        B::Le => CValue::Bool(x <= y),
        B::Gt => CValue::Bool(x > y),
        B::Ge => CValue::Bool(x >= y),
        B::Eq | B::Ne | B::And | B::Or => unreachable!("handled by the caller"),
    })
}

/// `x mod y` with the sign of `y` (so `(x // y) * y + x % y == x`).
fn floor_rem(x: i64, y: i64) -> i64 {
    // `wrapping_rem` only wraps for `i64::MIN % -1`, whose true remainder is 0.
    let r = x.wrapping_rem(y);
    if r != 0 && (r < 0) != (y < 0) {
        r + y
    } else {
        r
    }
}

/// No tensors in scope (top-level config).
pub struct NoShapes;

impl ShapeLookup for NoShapes {
    fn shape_of(&self, _: &str) -> Option<Vec<usize>> {
        None
    }
}

/// A config expression that must be an integer, with a message naming its value otherwise.
pub fn expect_int(v: CValue, what: &str, e: &SpannedCExpr) -> Result<i64, String> {
    match v {
        CValue::Int(i) => Ok(i),
        CValue::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        other => Err(format!("{what} must be an integer, but `{}` is {other}", e.expr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str) -> CValue {
        let e = kiln_spec::parse_cexpr(s).expect("parses");
        let cfg: HashMap<String, CValue> =
            [("d".to_string(), CValue::Int(384)), ("h".to_string(), CValue::Int(12))].into();
        eval(&e, &ConfigEnv { frames: vec![&cfg] }, &NoShapes).expect("evaluates")
    }

    #[test]
    fn integer_division_stays_integer_when_exact() {
        assert_eq!(ev("d / h"), CValue::Int(32));
        assert_eq!(ev("d / 5"), CValue::Float(76.8));
        assert_eq!(ev("4 * d"), CValue::Int(1536));
    }

    #[test]
    fn floor_division_and_remainder_agree() {
        for (x, y) in [(7, 2), (-7, 2), (7, -2), (-7, -2), (6, 3), (0, 5)] {
            let q = ev(&format!("{x} // {y}"));
            let r = ev(&format!("{x} % {y}"));
            let (CValue::Int(q), CValue::Int(r)) = (q, r) else { panic!() };
            assert_eq!(q * y + r, x, "{x} // {y}");
            assert_eq!(q, (x as f64 / y as f64).floor() as i64);
        }
    }

    fn ev_err(s: &str) -> String {
        let e = kiln_spec::parse_cexpr(s).expect("parses");
        let cfg: HashMap<String, CValue> = HashMap::new();
        eval(&e, &ConfigEnv { frames: vec![&cfg] }, &NoShapes).expect_err("fails")
    }

    const MIN: &str = "(-9223372036854775807 - 1)";

    #[test]
    fn integer_edge_cases_are_exact_or_errors() {
        // The true remainder of i64::MIN by -1 is 0; the quotient overflows.
        assert_eq!(ev(&format!("{MIN} % -1")), CValue::Int(0));
        assert_eq!(ev(&format!("{MIN} // 1")), CValue::Int(i64::MIN));
        assert_eq!(ev(&format!("{MIN} // 3")), CValue::Int(i64::MIN / 3 - 1));
        assert_eq!(ev(&format!("{MIN} % 3")), CValue::Int(1));
        assert_eq!(ev(&format!("{MIN} / -2")), CValue::Int(1 << 62));
        assert_eq!(ev("9223372036854775807 // -1"), CValue::Int(-i64::MAX));
        for (e, msg) in [
            (format!("{MIN} // -1"), "integer overflow in `-9223372036854775808 // -1`"),
            (format!("{MIN} / -1"), "integer overflow in `-9223372036854775808 / -1`"),
            (format!("-{MIN}"), "integer overflow in `-(-9223372036854775808)`"),
            (format!("abs{MIN}"), "integer overflow in `abs(-9223372036854775808)`"),
            (format!("{MIN} - 1"), "integer overflow in `-9223372036854775808 - 1`"),
            ("2 ** 63".into(), "integer overflow in `2 ** 63`"),
            ("7 % 0".into(), "division by zero in `7 % 0`"),
        ] {
            assert_eq!(ev_err(&e), msg, "{e}");
        }
    }

    #[test]
    fn floats_that_are_nan_or_past_the_integers_are_errors() {
        assert_eq!(ev_err("sqrt(-1)"), "`sqrt(-(1))` is NaN (not a number)");
        assert_eq!(ev_err("inf - inf"), "`(inf - inf)` is NaN (not a number)");
        assert_eq!(ev_err("0.0 / 0.0 + 1"), "`(0.0 / 0.0)` is NaN (not a number)");
        assert_eq!(ev_err("log(-1) > 0"), "`log(-(1))` is NaN (not a number)");
        assert_eq!(ev_err("floor(1e300)"), "`floor` of 1e300 does not fit a 64-bit integer");
        assert_eq!(ev_err("ceil(-inf)"), "`ceil` of -inf does not fit a 64-bit integer");
        assert_eq!(
            ev_err("floor(9223372036854775808.0)"),
            "`floor` of 9.223372036854776e18 does not fit a 64-bit integer"
        );
        assert_eq!(ev("floor(-9223372036854775808.0)"), CValue::Int(i64::MIN));
        // Infinity itself is a value (a mask's fill).
        assert_eq!(ev("-inf"), CValue::Float(f64::NEG_INFINITY));
        assert_eq!(ev("10.0 ** 400"), CValue::Float(f64::INFINITY));
    }

    #[test]
    fn functions_and_logic() {
        assert_eq!(ev("sqrt(d / h * 2)"), CValue::Float(8.0));
        assert_eq!(ev("max(d, 2 ** 10)"), CValue::Int(1024));
        assert_eq!(ev("d > 100 and not (h == 3)"), CValue::Bool(true));
        assert_eq!(ev("ceil(d / 5)"), CValue::Int(77));
    }
}
