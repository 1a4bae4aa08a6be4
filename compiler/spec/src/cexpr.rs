//! Config expressions: the arithmetic inside strings like `"d / heads"` or `"4 * d"`.
//!
//! Grammar (lowest precedence first):
//! `or` → `and` → `not` → comparison (`== != < <= > >=`) → `+ -` → `* / // %` → unary `-`
//! → `**` → atom (number, `true`/`false`, `pi`, `inf`, name, `f(args)`, `(expr)`).
//! Functions: `sqrt rsqrt exp log abs floor ceil min max` and, inside modules, `dim(x, axis)`
//! and `rank(x)` for the static shape of a tensor bound to `x`.

use crate::source::Span;
use std::fmt;

/// A parsed config expression.
#[derive(Clone, Debug, PartialEq)]
pub enum CExpr {
    Int(i64),
    Float(f64),
    Bool(bool),
    Name(String),
    Neg(Box<CExpr>),
    Not(Box<CExpr>),
    Bin(BinOp, Box<CExpr>, Box<CExpr>),
    Call(String, Vec<CExpr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Rem,
    Pow,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::FloorDiv => "//",
            BinOp::Rem => "%",
            BinOp::Pow => "**",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "and",
            BinOp::Or => "or",
        }
    }
}

/// Words config expressions read as constants or operators: a config entry, module config
/// argument or repeat index with one of these names could never be read, so it is refused.
pub const RESERVED: &[&str] = &["true", "false", "pi", "inf", "and", "or", "not"];

/// The functions config expressions may call, with their arity.
pub const FUNCTIONS: &[(&str, usize)] = &[
    ("sqrt", 1),
    ("rsqrt", 1),
    ("exp", 1),
    ("log", 1),
    ("abs", 1),
    ("floor", 1),
    ("ceil", 1),
    ("min", 2),
    ("max", 2),
    ("dim", 2),
    ("rank", 1),
];

/// A syntax error inside a config expression: message and byte range within the string.
#[derive(Clone, Debug, PartialEq)]
pub struct CExprError {
    pub message: String,
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(String),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

fn lex(s: &str) -> Result<Vec<(Tok, usize, usize)>, CExprError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            while i < b.len()
                && (b[i].is_ascii_digit()
                    || b[i] == b'.'
                    || b[i] == b'_'
                    || ((b[i] == b'e' || b[i] == b'E') && i > start)
                    || ((b[i] == b'-' || b[i] == b'+') && matches!(b[i - 1], b'e' | b'E')))
            {
                i += 1;
            }
            out.push((Tok::Num(s[start..i].replace('_', "")), start, i));
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Ident(s[start..i].to_string()), start, i));
            continue;
        }
        let two = s.get(i..i + 2).unwrap_or("");
        let tok = match two {
            "**" | "//" | "==" | "!=" | "<=" | ">=" | "&&" | "||" => {
                i += 2;
                Tok::Op(match two {
                    "**" => "**",
                    "//" => "//",
                    "==" => "==",
                    "!=" => "!=",
                    "<=" => "<=",
                    ">=" => ">=",
                    "&&" => "and",
                    _ => "or",
                })
            }
            _ => {
                i += 1;
                match c {
                    b'+' => Tok::Op("+"),
                    b'-' => Tok::Op("-"),
                    b'*' => Tok::Op("*"),
                    b'/' => Tok::Op("/"),
                    b'%' => Tok::Op("%"),
                    b'<' => Tok::Op("<"),
                    b'>' => Tok::Op(">"),
                    b'!' => Tok::Op("not"),
                    b'(' => Tok::LParen,
                    b')' => Tok::RParen,
                    b',' => Tok::Comma,
                    _ => {
                        let ch = s[start..].chars().next().unwrap_or('?');
                        return Err(CExprError {
                            message: format!("unexpected character `{ch}`"),
                            start,
                            end: start + ch.len_utf8(),
                        });
                    }
                }
            }
        };
        out.push((tok, start, i));
    }
    Ok(out)
}

/// How deeply a config expression may nest: the depth of its tree (`a + b + c` is two
/// levels, `-(-x)` two) and the nesting of unary operators and `**` while it is parsed
/// (parentheses and calls have their own, lower bound, [`MAX_CEXPR_PARENS`]). Evaluation, printing and dropping walk the tree recursively, so the bound keeps
/// every one of them far from the stack's limit; no sensible config needs more than a few
/// levels, and a 20,000-term chain is refused with a message instead of overflowing the stack.
pub const MAX_CEXPR_DEPTH: usize = 256;

/// How deeply parentheses and function calls may nest (`((((x))))`, `abs(abs(x))`): each
/// level re-enters the whole precedence ladder (a dozen stack frames), so this bound is
/// lower than [`MAX_CEXPR_DEPTH`].
pub const MAX_CEXPR_PARENS: usize = 64;

/// A parse result: the expression and the depth of its tree.
type Parsed = Result<(CExpr, usize), CExprError>;

struct P {
    toks: Vec<(Tok, usize, usize)>,
    i: usize,
    len: usize,
    /// Nesting of unary operators and `**` being parsed (see [`MAX_CEXPR_DEPTH`]).
    depth: usize,
    /// Nesting of parentheses and call arguments being parsed (see [`MAX_CEXPR_PARENS`]).
    parens: usize,
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|t| &t.0)
    }

    fn err(&self, message: impl Into<String>) -> CExprError {
        let (start, end) = self.toks.get(self.i).map(|t| (t.1, t.2)).unwrap_or((self.len, self.len));
        CExprError { message: message.into(), start, end }
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(self.peek(), Some(Tok::Op(o)) if *o == op)
            || matches!(self.peek(), Some(Tok::Ident(w)) if w == op && (op == "and" || op == "or" || op == "not"))
    }

    /// The error for an expression deeper than [`MAX_CEXPR_DEPTH`], at the current token.
    fn too_deep(&self) -> CExprError {
        self.err(format!("expression nests too deeply (more than {MAX_CEXPR_DEPTH} levels)"))
    }

    /// A node one level above children of depth `depth`, refused past [`MAX_CEXPR_DEPTH`].
    fn above(&self, depth: usize) -> Result<usize, CExprError> {
        if depth >= MAX_CEXPR_DEPTH {
            return Err(self.too_deep());
        }
        Ok(depth + 1)
    }

    /// Enters one level of unary or `**` recursion, refused past [`MAX_CEXPR_DEPTH`].
    fn enter(&mut self) -> Result<(), CExprError> {
        self.depth += 1;
        if self.depth > MAX_CEXPR_DEPTH {
            return Err(self.too_deep());
        }
        Ok(())
    }

    /// A left-associative chain, built in a loop (not by recursion) with its depth checked
    /// at each operator, so a long chain is refused before it grows deep.
    fn bin(&mut self, ops: &[(&str, BinOp)], next: fn(&mut P) -> Parsed) -> Parsed {
        let (mut lhs, mut depth) = next(self)?;
        'outer: loop {
            for (sym, op) in ops {
                if self.is_op(sym) {
                    let d = self.above(depth)?;
                    self.i += 1;
                    let (rhs, rd) = next(self)?;
                    depth = self.above(rd)?.max(d);
                    lhs = CExpr::Bin(*op, Box::new(lhs), Box::new(rhs));
                    continue 'outer;
                }
            }
            return Ok((lhs, depth));
        }
    }

    fn or(&mut self) -> Parsed {
        self.parens += 1;
        if self.parens > MAX_CEXPR_PARENS {
            return Err(self.err(format!(
                "expression nests too deeply (more than {MAX_CEXPR_PARENS} levels of parentheses or calls)"
            )));
        }
        let r = self.bin(&[("or", BinOp::Or)], P::and);
        self.parens -= 1;
        r
    }

    fn and(&mut self) -> Parsed {
        self.bin(&[("and", BinOp::And)], P::not)
    }

    fn not(&mut self) -> Parsed {
        if self.is_op("not") {
            self.enter()?;
            self.i += 1;
            let (e, d) = self.not()?;
            self.depth -= 1;
            return Ok((CExpr::Not(Box::new(e)), self.above(d)?));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Parsed {
        self.bin(
            &[
                ("==", BinOp::Eq),
                ("!=", BinOp::Ne),
                ("<=", BinOp::Le),
                (">=", BinOp::Ge),
                ("<", BinOp::Lt),
                (">", BinOp::Gt),
            ],
            P::sum,
        )
    }

    fn sum(&mut self) -> Parsed {
        self.bin(&[("+", BinOp::Add), ("-", BinOp::Sub)], P::product)
    }

    fn product(&mut self) -> Parsed {
        self.bin(
            &[("*", BinOp::Mul), ("//", BinOp::FloorDiv), ("/", BinOp::Div), ("%", BinOp::Rem)],
            P::unary,
        )
    }

    fn unary(&mut self) -> Parsed {
        if self.is_op("-") || self.is_op("+") {
            let neg = self.is_op("-");
            self.enter()?;
            self.i += 1;
            let (e, d) = self.unary()?;
            self.depth -= 1;
            return if neg { Ok((CExpr::Neg(Box::new(e)), self.above(d)?)) } else { Ok((e, d)) };
        }
        self.power()
    }

    fn power(&mut self) -> Parsed {
        let (base, bd) = self.atom()?;
        if self.is_op("**") {
            self.enter()?;
            self.i += 1;
            let (exp, ed) = self.unary()?;
            self.depth -= 1;
            let d = self.above(bd.max(ed))?;
            return Ok((CExpr::Bin(BinOp::Pow, Box::new(base), Box::new(exp)), d));
        }
        Ok((base, bd))
    }

    fn atom(&mut self) -> Parsed {
        let Some((tok, start, end)) = self.toks.get(self.i).cloned() else {
            return Err(self.err("expected a number, a name or `(`, found the end of the expression"));
        };
        self.i += 1;
        match tok {
            Tok::Num(n) => {
                if let Ok(i) = n.parse::<i64>() {
                    Ok((CExpr::Int(i), 0))
                } else {
                    n.parse::<f64>().map(|f| (CExpr::Float(f), 0)).map_err(|_| CExprError {
                        message: format!("`{n}` is not a valid number"),
                        start,
                        end,
                    })
                }
            }
            Tok::Ident(w) if w == "true" => Ok((CExpr::Bool(true), 0)),
            Tok::Ident(w) if w == "false" => Ok((CExpr::Bool(false), 0)),
            Tok::Ident(w) if w == "pi" => Ok((CExpr::Float(std::f64::consts::PI), 0)),
            Tok::Ident(w) if w == "inf" => Ok((CExpr::Float(f64::INFINITY), 0)),
            Tok::Ident(w) => {
                if self.peek() == Some(&Tok::LParen) {
                    let Some(&(_, arity)) = FUNCTIONS.iter().find(|(f, _)| *f == w) else {
                        let names: Vec<&str> = FUNCTIONS.iter().map(|f| f.0).collect();
                        return Err(CExprError {
                            message: format!("unknown function `{w}` (known: {})", names.join(", ")),
                            start,
                            end,
                        });
                    };
                    self.i += 1;
                    let mut args = Vec::new();
                    let mut depth = 0;
                    if self.peek() != Some(&Tok::RParen) {
                        loop {
                            let (a, d) = self.or()?;
                            depth = depth.max(d);
                            args.push(a);
                            if self.peek() == Some(&Tok::Comma) {
                                self.i += 1;
                            } else {
                                break;
                            }
                        }
                    }
                    if self.peek() != Some(&Tok::RParen) {
                        return Err(self.err("expected `,` or `)`"));
                    }
                    self.i += 1;
                    if args.len() != arity {
                        return Err(CExprError {
                            message: format!("`{w}` takes {arity} argument(s), got {}", args.len()),
                            start,
                            end,
                        });
                    }
                    Ok((CExpr::Call(w, args), self.above(depth)?))
                } else {
                    Ok((CExpr::Name(w), 0))
                }
            }
            Tok::LParen => {
                let e = self.or()?;
                if self.peek() != Some(&Tok::RParen) {
                    return Err(self.err("expected `)`"));
                }
                self.i += 1;
                Ok(e)
            }
            _ => {
                self.i -= 1;
                Err(self.err("expected a number, a name or `(`"))
            }
        }
    }
}

/// `s` for a message: at most `max` characters, the rest elided with `…`, so a diagnostic
/// about a 20,000-term expression quotes its start rather than all of it.
pub fn abbreviate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// Parses a config expression; one that nests deeper than [`MAX_CEXPR_DEPTH`] is an error.
pub fn parse_cexpr(s: &str) -> Result<CExpr, CExprError> {
    let toks = lex(s)?;
    let mut p = P { toks, i: 0, len: s.len(), depth: 0, parens: 0 };
    if p.toks.is_empty() {
        return Err(CExprError { message: "empty expression".into(), start: 0, end: s.len() });
    }
    let (e, _) = p.or()?;
    if p.i < p.toks.len() {
        return Err(p.err("unexpected text after the expression"));
    }
    Ok(e)
}

/// A config expression with the span of the spec text it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct SpannedCExpr {
    pub expr: CExpr,
    pub span: Span,
}

impl CExpr {
    /// The config names the expression reads (not counting `dim`/`rank` tensor arguments).
    pub fn names(&self, out: &mut Vec<String>) {
        match self {
            CExpr::Name(n) => out.push(n.clone()),
            CExpr::Neg(e) | CExpr::Not(e) => e.names(out),
            CExpr::Bin(_, a, b) => {
                a.names(out);
                b.names(out);
            }
            CExpr::Call(f, args) => {
                let skip = usize::from(f == "dim" || f == "rank");
                for a in &args[skip.min(args.len())..] {
                    a.names(out);
                }
            }
            CExpr::Int(_) | CExpr::Float(_) | CExpr::Bool(_) => {}
        }
    }
}

impl fmt::Display for CExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CExpr::Int(i) => write!(f, "{i}"),
            CExpr::Float(x) => write!(f, "{x:?}"),
            CExpr::Bool(b) => write!(f, "{b}"),
            CExpr::Name(n) => f.write_str(n),
            CExpr::Neg(e) => write!(f, "-({e})"),
            CExpr::Not(e) => write!(f, "not ({e})"),
            CExpr::Bin(op, a, b) => write!(f, "({a} {} {b})", op.symbol()),
            CExpr::Call(n, args) => {
                let a: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                write!(f, "{n}({})", a.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        assert_eq!(parse_cexpr("1 + 2 * 3").unwrap().to_string(), "(1 + (2 * 3))");
        assert_eq!(parse_cexpr("-2 ** 2").unwrap().to_string(), "-((2 ** 2))");
        assert_eq!(parse_cexpr("d / heads").unwrap().to_string(), "(d / heads)");
        assert_eq!(parse_cexpr("a < b and not c").unwrap().to_string(), "((a < b) and not (c))");
        assert_eq!(parse_cexpr("dim(x, -1) // 2").unwrap().to_string(), "(dim(x, -(1)) // 2)");
        assert_eq!(parse_cexpr("1e-12").unwrap(), CExpr::Float(1e-12));
    }

    #[test]
    fn errors() {
        let e = parse_cexpr("d / ").unwrap_err();
        assert_eq!(e.message, "expected a number, a name or `(`, found the end of the expression");
        assert_eq!((e.start, e.end), (4, 4));
        let e = parse_cexpr("d $ 2").unwrap_err();
        assert_eq!((e.message.as_str(), e.start), ("unexpected character `$`", 2));
        let e = parse_cexpr("sqr(d)").unwrap_err();
        assert!(e.message.starts_with("unknown function `sqr`"));
    }

    /// Long chains and deep nesting are refused with a message (the parser builds chains in
    /// a loop, and stops them at the depth limit), not a stack overflow; this runs on a test
    /// thread's small stack.
    #[test]
    fn deep_and_long_expressions_are_errors() {
        let too_deep = format!("expression nests too deeply (more than {MAX_CEXPR_DEPTH} levels)");
        for text in [
            format!("1{}", " + 1".repeat(20_000)),
            format!("1{}", " * 2 - 1".repeat(10_000)),
            format!("{}1", "-".repeat(20_000)),
            format!("{}true", "not ".repeat(20_000)),
            format!("2{}", " ** 1".repeat(20_000)),
        ] {
            let e = parse_cexpr(&text).expect_err("too deep");
            assert_eq!(e.message, too_deep, "{}", abbreviate(&text, 40));
        }
        let too_nested = format!(
            "expression nests too deeply (more than {MAX_CEXPR_PARENS} levels of parentheses or calls)"
        );
        for text in [
            format!("{}1{}", "(".repeat(20_000), ")".repeat(20_000)),
            format!("{}1{}", "abs(".repeat(20_000), ")".repeat(20_000)),
        ] {
            let e = parse_cexpr(&text).expect_err("too deep");
            assert_eq!(e.message, too_nested, "{}", abbreviate(&text, 40));
        }
        // Up to the limit is fine: a chain of 256 operators has depth 256.
        let at_limit = format!("1{}", " + 1".repeat(MAX_CEXPR_DEPTH));
        assert!(parse_cexpr(&at_limit).is_ok());
        let past = format!("1{}", " + 1".repeat(MAX_CEXPR_DEPTH + 1));
        assert!(parse_cexpr(&past).is_err());
        // Parentheses alone add no depth to the tree, but are bounded for the parser (the
        // whole expression is the first level).
        let parens = |n: usize| format!("{}1{}", "(".repeat(n), ")".repeat(n));
        assert!(parse_cexpr(&parens(MAX_CEXPR_PARENS - 1)).is_ok());
        assert!(parse_cexpr(&parens(MAX_CEXPR_PARENS)).is_err());
    }

    #[test]
    fn abbreviate_keeps_short_text_and_cuts_long_text() {
        assert_eq!(abbreviate("d / h", 80), "d / h");
        assert_eq!(abbreviate("abcdef", 3), "abc…");
        assert_eq!(abbreviate("ééé", 2), "éé…");
    }
}
