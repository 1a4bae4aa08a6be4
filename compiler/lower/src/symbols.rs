//! Dynamic sizes: config entries declared `Dyn(min: …, max: …, hint: …[, multiple_of: …])`,
//! the ranges of config expressions over them, and their specialization by `--set`.
//!
//! A symbol left unspecialized becomes a symbol of the graph: [`range`] bounds what a config
//! expression over symbols takes (for the checks: a weight sized by a symbol, a table shorter
//! than a symbol's maximum), and its twin [`size`] builds the extent it is, a `SizeExpr`
//! over the graph's symbols (`docs/dynamic-shapes.md`).

use crate::config::{self, CValue, ConfigEnv, ShapeLookup};
use kiln_ir::SizeExpr;
use kiln_spec::cexpr::BinOp;
use kiln_spec::{CExpr, Diagnostic, DynDecl, Span, SpannedCExpr};

/// A dynamic config entry with its checked bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Symbol {
    pub name: String,
    pub min: i64,
    pub max: i64,
    /// The typical value (what costs are estimated at).
    pub hint: i64,
    /// Every value is a multiple of this (1: any integer).
    pub multiple_of: i64,
    /// The `Dyn(…)` declaration.
    pub span: Span,
}

impl Symbol {
    /// The graph's declaration of the symbol.
    pub fn decl(&self) -> kiln_ir::SymbolDecl {
        kiln_ir::SymbolDecl {
            name: self.name.clone(),
            min: self.min,
            max: self.max,
            hint: self.hint,
            multiple_of: self.multiple_of,
        }
    }

    /// `1..=512` or `8..=512, a multiple of 8`, for messages.
    pub fn describe(&self) -> String {
        match self.multiple_of {
            1 => format!("{}..={}", self.min, self.max),
            m => format!("{}..={}, a multiple of {m}", self.min, self.max),
        }
    }
}

/// The values a config expression over symbols can take: integers from `min` to `max`, each
/// a multiple of `multiple`. Derived by interval arithmetic, so it may include values no
/// choice of the symbols gives (`seq - seq` is `-511..=511` for `seq` in `1..=512`), never
/// miss one.
#[derive(Clone, Debug, PartialEq)]
pub struct Range {
    pub min: i64,
    pub max: i64,
    /// Every value is a multiple of this (0: the value is always 0).
    pub multiple: i64,
    /// The symbols it depends on, with their declarations, sorted by name.
    pub symbols: Vec<(String, Span)>,
}

impl Range {
    pub fn of(s: &Symbol) -> Range {
        Range { min: s.min, max: s.max, multiple: s.multiple_of, symbols: vec![(s.name.clone(), s.span)] }
    }

    /// `the dynamic size `seq`` or `the dynamic sizes `batch` and `seq``, for messages.
    pub fn names(&self) -> String {
        let noun = if self.symbols.len() == 1 { "size" } else { "sizes" };
        format!("the dynamic {noun} {}", names(&self.symbols))
    }

    fn merged(&self, other: &Range, min: i64, max: i64, multiple: i64) -> Range {
        let mut symbols = self.symbols.clone();
        for s in &other.symbols {
            if !symbols.iter().any(|(n, _)| *n == s.0) {
                symbols.push(s.clone());
            }
        }
        symbols.sort_by(|a, b| a.0.cmp(&b.0));
        Range { min, max, multiple, symbols }
    }
}

/// `` `a` ``, `` `a` and `b` ``, `` `a`, `b` and `c` ``.
pub fn names(symbols: &[(String, Span)]) -> String {
    let quoted: Vec<String> = symbols.iter().map(|(n, _)| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
}

/// Checks a `Dyn` declaration: its fields are integers, `1 ≤ min ≤ hint ≤ max`, and with a
/// `multiple_of` (at least 1) every bound is one of the values the symbol takes.
pub fn declare(name: &str, d: &DynDecl, env: &ConfigEnv) -> Result<Symbol, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut field = |e: &SpannedCExpr, what: &str| -> Option<i64> {
        let v = config::eval(&e.expr, env, &config::NoShapes)
            .and_then(|v| config::expect_int(v, &format!("`{what}` of `{name}`"), e));
        match v {
            Ok(i) => Some(i),
            Err(msg) => {
                diags.push(Diagnostic::error(msg.clone()).at(e.span, msg));
                None
            }
        }
    };
    let (min, max, hint) = (field(&d.min, "min"), field(&d.max, "max"), field(&d.hint, "hint"));
    let multiple_of = match &d.multiple_of {
        Some(e) => field(e, "multiple_of"),
        None => Some(1),
    };
    let (Some(min), Some(max), Some(hint), Some(multiple_of)) = (min, max, hint, multiple_of) else {
        return Err(diags);
    };
    let mut fail = |at: &SpannedCExpr, msg: String, label: &str, other: Option<(&SpannedCExpr, String)>| {
        let mut diag = Diagnostic::error(msg).at(at.span, label);
        if let Some((e, l)) = other {
            diag = diag.with_related(e.span, l);
        }
        diags.push(diag);
    };
    if min < 1 {
        fail(&d.min, format!("`min` of `{name}` must be at least 1, but it is {min}"), "below 1", None);
    }
    if max < min {
        fail(
            &d.max,
            format!("`max` of `{name}` is {max}, below its `min` {min}"),
            "below `min`",
            Some((&d.min, format!("`min` is {min}"))),
        );
    } else if !(min..=max).contains(&hint) {
        let (bound, which) = if hint < min { (&d.min, "min") } else { (&d.max, "max") };
        fail(
            &d.hint,
            format!("`hint` of `{name}` is {hint}, outside its bounds {min}..={max}"),
            "outside the bounds",
            Some((bound, format!("`{which}` is {}", if hint < min { min } else { max }))),
        );
    }
    match &d.multiple_of {
        Some(m) if multiple_of < 1 => fail(
            m,
            format!("`multiple_of` of `{name}` must be at least 1, but it is {multiple_of}"),
            "below 1",
            None,
        ),
        Some(m) => {
            for (e, what, v) in [(&d.min, "min", min), (&d.hint, "hint", hint), (&d.max, "max", max)] {
                if v % multiple_of != 0 {
                    fail(
                        e,
                        format!(
                            "`{what}` of `{name}` is {v}, not a multiple of its `multiple_of` {multiple_of}"
                        ),
                        "not a multiple",
                        Some((m, format!("`multiple_of` is {multiple_of}"))),
                    );
                }
            }
        }
        None => {}
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok(Symbol { name: name.to_string(), min, max, hint, multiple_of, span: d.span })
}

/// `--set NAME=VALUE` of a symbol: the static value it specializes to, or why it cannot.
pub fn specialize(s: &Symbol, given: &str, v: CValue) -> Result<i64, String> {
    let n = &s.name;
    let i = match v {
        CValue::Int(i) => i,
        CValue::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
        other => {
            return Err(format!(
                "--set {n}={given}: `{n}` is a size, so its value must be an integer, not {other}"
            ))
        }
    };
    if !(s.min..=s.max).contains(&i) {
        return Err(format!(
            "--set {n}={i}: `{n}` is declared from {} to {}, and {i} is outside",
            s.min, s.max
        ));
    }
    if i % s.multiple_of != 0 {
        return Err(format!(
            "--set {n}={i}: `{n}` is declared a multiple of {}, and {i} is not",
            s.multiple_of
        ));
    }
    Ok(i)
}

/// The range of `e` when it reads a dynamic name, `None` when it is static. `range_of` gives
/// each dynamic name's range; the static parts are evaluated in `env`. Only integer size
/// arithmetic applies to dynamic values (`+ - *`, `/ // %` by a static integer, `min`,
/// `max`, unary `-`); anything else is an error naming the symbols, and so is a `/` that is
/// not exact for every value (`seq / 12` needs `seq` declared a multiple of 12).
pub fn range(
    e: &CExpr,
    env: &ConfigEnv,
    shapes: &dyn ShapeLookup,
    range_of: &dyn Fn(&str) -> Option<Range>,
) -> Result<Option<Range>, String> {
    let sub = |x: &CExpr| range(x, env, shapes, range_of);
    // A static operand as a one-value range (only integers mix with sizes).
    let fixed = |x: &CExpr, other: &Range| -> Result<Range, String> {
        match config::eval(x, env, shapes)? {
            CValue::Int(i) => {
                Ok(Range { min: i, max: i, multiple: i.checked_abs().unwrap_or(0), symbols: vec![] })
            }
            v => Err(format!(
                "`{e}` combines {} with {v}: a dynamic size only combines with integers",
                other.names()
            )),
        }
    };
    let unsupported = |r: &Range| {
        Err(format!("`{e}` depends on {}: dynamic sizes only take + - * / // % min max", r.names()))
    };
    let overflow = |r: &Range| format!("the range of `{e}` overflows within the bounds of {}", r.names());
    match e {
        CExpr::Int(_) | CExpr::Float(_) | CExpr::Bool(_) => Ok(None),
        CExpr::Name(n) => Ok(range_of(n)),
        CExpr::Neg(x) => match sub(x)? {
            None => Ok(None),
            Some(r) => {
                let (Some(min), Some(max)) = (r.max.checked_neg(), r.min.checked_neg()) else {
                    return Err(overflow(&r));
                };
                Ok(Some(Range { min, max, ..r }))
            }
        },
        CExpr::Not(x) => match sub(x)? {
            None => Ok(None),
            Some(r) => unsupported(&r),
        },
        CExpr::Bin(op, a, b) => {
            let (ra, rb) = (sub(a)?, sub(b)?);
            let (ra, rb) = match (ra, rb) {
                (None, None) => return Ok(None),
                (Some(ra), None) => {
                    let rb = fixed(b, &ra)?;
                    (ra, rb)
                }
                (None, Some(rb)) => (fixed(a, &rb)?, rb),
                (Some(ra), Some(rb)) => (ra, rb),
            };
            let dynamic = if ra.symbols.is_empty() { &rb } else { &ra };
            let merged = |min: Option<i64>, max: Option<i64>, multiple: i64| match (min, max) {
                (Some(min), Some(max)) => Ok(Some(ra.merged(&rb, min, max, multiple))),
                _ => Err(overflow(dynamic)),
            };
            match op {
                BinOp::Add => merged(
                    ra.min.checked_add(rb.min),
                    ra.max.checked_add(rb.max),
                    gcd(ra.multiple, rb.multiple),
                ),
                BinOp::Sub => merged(
                    ra.min.checked_sub(rb.max),
                    ra.max.checked_sub(rb.min),
                    gcd(ra.multiple, rb.multiple),
                ),
                BinOp::Mul => {
                    let corners = [(ra.min, rb.min), (ra.min, rb.max), (ra.max, rb.min), (ra.max, rb.max)]
                        .map(|(x, y)| x.checked_mul(y));
                    let corners: Option<Vec<i64>> = corners.into_iter().collect();
                    let Some(c) = corners else { return Err(overflow(dynamic)) };
                    let multiple = ra.multiple.checked_mul(rb.multiple).unwrap_or(1);
                    merged(c.iter().min().copied(), c.iter().max().copied(), multiple)
                }
                BinOp::Div | BinOp::FloorDiv | BinOp::Rem => {
                    if !rb.symbols.is_empty() {
                        return Err(format!(
                            "`{e}` divides by {}: a size may only be divided by a static integer",
                            rb.names()
                        ));
                    }
                    let k = rb.min;
                    if k <= 0 {
                        return Err(format!(
                            "`{e}` divides {} by {k}: the divisor must be positive",
                            ra.names()
                        ));
                    }
                    match op {
                        BinOp::Div if ra.multiple % k != 0 => Err(format!(
                            "`{e}` is not an integer for every value of {}: declare a `multiple_of` that {k} divides, or use `//`",
                            ra.names()
                        )),
                        BinOp::Div => merged(Some(ra.min / k), Some(ra.max / k), ra.multiple / k),
                        BinOp::FloorDiv => {
                            let multiple = if ra.multiple % k == 0 { ra.multiple / k } else { 1 };
                            merged(Some(ra.min.div_euclid(k)), Some(ra.max.div_euclid(k)), multiple)
                        }
                        _ if ra.multiple % k == 0 => merged(Some(0), Some(0), 0),
                        _ => merged(Some(0), Some(k - 1), gcd(ra.multiple, k)),
                    }
                }
                BinOp::Pow
                | BinOp::Eq
                | BinOp::Ne
                | BinOp::Lt
                | BinOp::Le
                | BinOp::Gt
                | BinOp::Ge
                | BinOp::And
                | BinOp::Or => unsupported(dynamic),
            }
        }
        CExpr::Call(f, args) => {
            // `rank` is static; `dim` is dynamic when the tensor's axis is symbolic.
            if f == "rank" {
                return Ok(None);
            }
            if f == "dim" {
                return Ok(dynamic_dim(args, env, shapes).map(|(r, _)| r));
            }
            let ranges: Vec<Option<Range>> = args.iter().map(sub).collect::<Result<_, _>>()?;
            let Some(dynamic) = ranges.iter().flatten().next().cloned() else { return Ok(None) };
            match (f.as_str(), args.as_slice(), ranges.as_slice()) {
                ("min" | "max", [a, b], [ra, rb]) => {
                    let ra = match ra {
                        Some(r) => r.clone(),
                        None => fixed(a, &dynamic)?,
                    };
                    let rb = match rb {
                        Some(r) => r.clone(),
                        None => fixed(b, &dynamic)?,
                    };
                    let pick = if f == "min" { i64::min } else { i64::max };
                    Ok(Some(ra.merged(
                        &rb,
                        pick(ra.min, rb.min),
                        pick(ra.max, rb.max),
                        gcd(ra.multiple, rb.multiple),
                    )))
                }
                _ => unsupported(&dynamic),
            }
        }
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    let (mut a, mut b) = (a.unsigned_abs(), b.unsigned_abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    i64::try_from(a).unwrap_or(1)
}

/// The symbolic axis `dim(x, a)` reads, with its range and size; `None` when it is static
/// or malformed (evaluation reports the latter).
fn dynamic_dim(args: &[CExpr], env: &ConfigEnv, shapes: &dyn ShapeLookup) -> Option<(Range, SizeExpr)> {
    let [CExpr::Name(t), axis] = args else { return None };
    match config::eval(axis, env, shapes) {
        Ok(CValue::Int(a)) => shapes.dynamic_dim(t, a),
        _ => None,
    }
}

/// The twin of [`range`]: the size a config expression over symbols is, as the graph's
/// extents are written (`None` when it is static). `size_of` gives each dynamic name's size;
/// `dim(x, a)` of a symbolic axis is that axis's size. Call it on an expression whose
/// [`range`] is known, so that what is not size arithmetic has been reported already; the
/// one form the IR cannot hold, a `min` or `max` over symbols, is an error here.
pub fn size(
    e: &CExpr,
    env: &ConfigEnv,
    shapes: &dyn ShapeLookup,
    size_of: &dyn Fn(&str) -> Option<Result<SizeExpr, String>>,
) -> Result<Option<SizeExpr>, String> {
    let sub = |x: &CExpr| size(x, env, shapes, size_of);
    let fixed = |x: &CExpr| -> Result<SizeExpr, String> {
        match config::eval(x, env, shapes)? {
            CValue::Int(i) => Ok(SizeExpr::constant(i)),
            v => Err(format!(
                "`{e}` combines a dynamic size with {v}: a dynamic size only combines with integers"
            )),
        }
    };
    let arith = |r: Result<SizeExpr, kiln_ir::SizeError>| r.map(Some).map_err(|err| format!("`{e}`: {err}"));
    match e {
        CExpr::Int(_) | CExpr::Float(_) | CExpr::Bool(_) => Ok(None),
        CExpr::Name(n) => size_of(n).transpose(),
        CExpr::Neg(x) => match sub(x)? {
            None => Ok(None),
            Some(s) => arith(s.neg()),
        },
        CExpr::Bin(op, a, b) => {
            let (sa, sb) = match (sub(a)?, sub(b)?) {
                (None, None) => return Ok(None),
                (Some(sa), None) => (sa, fixed(b)?),
                (None, Some(sb)) => (fixed(a)?, sb),
                (Some(sa), Some(sb)) => (sa, sb),
            };
            let divisor = || {
                sb.as_constant()
                    .filter(|k| *k > 0)
                    .ok_or_else(|| format!("`{e}`: a size may only be divided by a positive static integer"))
            };
            match op {
                BinOp::Add => arith(sa.add(&sb)),
                BinOp::Sub => arith(sa.sub(&sb)),
                BinOp::Mul => arith(sa.mul(&sb)),
                // [`range`] proved the quotient exact for every value; when the normal form
                // cannot show it (`seq / 8` with `seq` a multiple of 8), it is the floor.
                BinOp::Div => {
                    let k = divisor()?;
                    arith(sa.div_exact(k).or_else(|_| sa.floor_div(k)))
                }
                BinOp::FloorDiv => arith(sa.floor_div(divisor()?)),
                // x % k = x - k·(x // k)
                BinOp::Rem => {
                    let k = divisor()?;
                    arith(sa.floor_div(k).and_then(|q| q.scale(k)).and_then(|kq| sa.sub(&kq)))
                }
                BinOp::Pow
                | BinOp::Eq
                | BinOp::Ne
                | BinOp::Lt
                | BinOp::Le
                | BinOp::Gt
                | BinOp::Ge
                | BinOp::And
                | BinOp::Or => Err(format!("`{e}` is not a size")),
            }
        }
        CExpr::Not(x) => match sub(x)? {
            None => Ok(None),
            Some(_) => Err(format!("`{e}` is not a size")),
        },
        CExpr::Call(f, args) => {
            if f == "rank" {
                return Ok(None);
            }
            if f == "dim" {
                return Ok(dynamic_dim(args, env, shapes).map(|(_, s)| s));
            }
            let sizes: Vec<Option<SizeExpr>> = args.iter().map(sub).collect::<Result<_, _>>()?;
            if sizes.iter().all(Option::is_none) {
                return Ok(None);
            }
            Err(format!(
                "`{e}` is not an extent the graph can hold: an extent is a sum of products of dynamic sizes, with floor division by a static integer"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn sym(name: &str, min: i64, max: i64, multiple_of: i64) -> Symbol {
        Symbol { name: name.into(), min, max, hint: min, multiple_of, span: Span::default() }
    }

    fn range_of_text(text: &str) -> Result<Option<(i64, i64, i64)>, String> {
        let symbols = [sym("seq", 8, 512, 8), sym("batch", 1, 64, 1)];
        let cfg: HashMap<String, CValue> = [("heads".to_string(), CValue::Int(4))].into();
        let env = ConfigEnv { frames: vec![&cfg] };
        let lookup = |n: &str| symbols.iter().find(|s| s.name == n).map(Range::of);
        let e = kiln_spec::parse_cexpr(text).expect("parses");
        range(&e, &env, &config::NoShapes, &lookup).map(|r| r.map(|r| (r.min, r.max, r.multiple)))
    }

    #[test]
    fn size_arithmetic_derives_ranges() {
        for (text, want) in [
            ("heads * 2", None),
            ("seq", Some((8, 512, 8))),
            ("seq * 2", Some((16, 1024, 16))),
            ("seq / heads", Some((2, 128, 2))),
            ("seq // 3", Some((2, 170, 1))),
            ("seq % 4", Some((0, 0, 0))),
            ("batch % 4", Some((0, 3, 1))),
            ("batch * seq", Some((8, 32768, 8))),
            ("seq - 1", Some((7, 511, 1))),
            ("-batch", Some((-64, -1, 1))),
            ("min(seq, 100)", Some((8, 100, 4))),
            ("max(batch, seq)", Some((8, 512, 1))),
            ("dim(x, 0) + 1", None),
        ] {
            assert_eq!(range_of_text(text), Ok(want), "{text}");
        }
    }

    /// The size of an expression over `seq` (symbol 0) and `batch` (symbol 1), printed.
    fn size_of_text(text: &str) -> Result<Option<String>, String> {
        let cfg: HashMap<String, CValue> = [("heads".to_string(), CValue::Int(4))].into();
        let env = ConfigEnv { frames: vec![&cfg] };
        let size_of = |n: &str| match n {
            "seq" => Some(Ok(SizeExpr::symbol(0, "seq"))),
            "batch" => Some(Ok(SizeExpr::symbol(1, "batch"))),
            _ => None,
        };
        let e = kiln_spec::parse_cexpr(text).expect("parses");
        size(&e, &env, &config::NoShapes, &size_of).map(|s| s.map(|s| s.to_string()))
    }

    #[test]
    fn size_arithmetic_builds_normal_forms() {
        for (text, want) in [
            ("heads * 2", None),
            ("seq", Some("seq")),
            ("seq * 2 + batch * seq - seq", Some("seq + seq*batch")),
            ("seq * heads / heads", Some("seq")),
            ("seq / heads", Some("seq//4")),
            ("(seq + 2 * batch) // 2", Some("batch + seq//2")),
            ("seq % 4", Some("seq - 4*(seq//4)")),
            ("-batch", Some("-batch")),
        ] {
            assert_eq!(size_of_text(text), Ok(want.map(String::from)), "{text}");
        }
        for (text, want) in [
            ("min(seq, 100)", "`min(seq, 100)` is not an extent the graph can hold: an extent is a sum of products of dynamic sizes, with floor division by a static integer"),
            ("seq // 0", "`(seq // 0)`: a size may only be divided by a positive static integer"),
            ("seq * 0.5", "`(seq * 0.5)` combines a dynamic size with 0.5: a dynamic size only combines with integers"),
        ] {
            assert_eq!(size_of_text(text), Err(want.to_string()), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_size_is_an_error() {
        for (text, want) in [
            ("batch / 2", "`(batch / 2)` is not an integer for every value of the dynamic size `batch`: declare a `multiple_of` that 2 divides, or use `//`"),
            ("seq * 0.5", "`(seq * 0.5)` combines the dynamic size `seq` with 0.5: a dynamic size only combines with integers"),
            ("heads / seq", "`(heads / seq)` divides by the dynamic size `seq`: a size may only be divided by a static integer"),
            ("seq > 128", "`(seq > 128)` depends on the dynamic size `seq`: dynamic sizes only take + - * / // % min max"),
            ("sqrt(seq * batch)", "`sqrt((seq * batch))` depends on the dynamic sizes `batch` and `seq`: dynamic sizes only take + - * / // % min max"),
            ("seq // 0", "`(seq // 0)` divides the dynamic size `seq` by 0: the divisor must be positive"),
            ("seq * 9223372036854775807", "the range of `(seq * 9223372036854775807)` overflows within the bounds of the dynamic size `seq`"),
        ] {
            assert_eq!(range_of_text(text), Err(want.to_string()), "{text}");
        }
    }

    #[test]
    fn specialization_checks_bounds_and_multiples() {
        let s = sym("seq", 8, 512, 8);
        assert_eq!(specialize(&s, "64", CValue::Int(64)), Ok(64));
        assert_eq!(specialize(&s, "64.0", CValue::Float(64.0)), Ok(64));
        assert_eq!(
            specialize(&s, "1024", CValue::Int(1024)),
            Err("--set seq=1024: `seq` is declared from 8 to 512, and 1024 is outside".into())
        );
        assert_eq!(
            specialize(&s, "100", CValue::Int(100)),
            Err("--set seq=100: `seq` is declared a multiple of 8, and 100 is not".into())
        );
        assert_eq!(
            specialize(&s, "true", CValue::Bool(true)),
            Err("--set seq=true: `seq` is a size, so its value must be an integer, not true".into())
        );
    }
}
