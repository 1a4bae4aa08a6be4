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

struct P {
    toks: Vec<(Tok, usize, usize)>,
    i: usize,
    len: usize,
    depth: usize,
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

    fn bin(
        &mut self,
        ops: &[(&str, BinOp)],
        next: fn(&mut P) -> Result<CExpr, CExprError>,
    ) -> Result<CExpr, CExprError> {
        let mut lhs = next(self)?;
        'outer: loop {
            for (sym, op) in ops {
                if self.is_op(sym) {
                    self.i += 1;
                    let rhs = next(self)?;
                    lhs = CExpr::Bin(*op, Box::new(lhs), Box::new(rhs));
                    continue 'outer;
                }
            }
            return Ok(lhs);
        }
    }

    fn or(&mut self) -> Result<CExpr, CExprError> {
        self.depth += 1;
        if self.depth > 64 {
            return Err(self.err("expression nests too deeply"));
        }
        let r = self.bin(&[("or", BinOp::Or)], P::and);
        self.depth -= 1;
        r
    }

    fn and(&mut self) -> Result<CExpr, CExprError> {
        self.bin(&[("and", BinOp::And)], P::not)
    }

    fn not(&mut self) -> Result<CExpr, CExprError> {
        if self.is_op("not") {
            self.i += 1;
            return Ok(CExpr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<CExpr, CExprError> {
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

    fn sum(&mut self) -> Result<CExpr, CExprError> {
        self.bin(&[("+", BinOp::Add), ("-", BinOp::Sub)], P::product)
    }

    fn product(&mut self) -> Result<CExpr, CExprError> {
        self.bin(
            &[("*", BinOp::Mul), ("//", BinOp::FloorDiv), ("/", BinOp::Div), ("%", BinOp::Rem)],
            P::unary,
        )
    }

    fn unary(&mut self) -> Result<CExpr, CExprError> {
        if self.is_op("-") {
            self.i += 1;
            return Ok(CExpr::Neg(Box::new(self.unary()?)));
        }
        if self.is_op("+") {
            self.i += 1;
            return self.unary();
        }
        self.power()
    }

    fn power(&mut self) -> Result<CExpr, CExprError> {
        let base = self.atom()?;
        if self.is_op("**") {
            self.i += 1;
            let exp = self.unary()?;
            return Ok(CExpr::Bin(BinOp::Pow, Box::new(base), Box::new(exp)));
        }
        Ok(base)
    }

    fn atom(&mut self) -> Result<CExpr, CExprError> {
        let Some((tok, start, end)) = self.toks.get(self.i).cloned() else {
            return Err(self.err("expected a number, a name or `(`, found the end of the expression"));
        };
        self.i += 1;
        match tok {
            Tok::Num(n) => {
                if let Ok(i) = n.parse::<i64>() {
                    Ok(CExpr::Int(i))
                } else {
                    n.parse::<f64>().map(CExpr::Float).map_err(|_| CExprError {
                        message: format!("`{n}` is not a valid number"),
                        start,
                        end,
                    })
                }
            }
            Tok::Ident(w) if w == "true" => Ok(CExpr::Bool(true)),
            Tok::Ident(w) if w == "false" => Ok(CExpr::Bool(false)),
            Tok::Ident(w) if w == "pi" => Ok(CExpr::Float(std::f64::consts::PI)),
            Tok::Ident(w) if w == "inf" => Ok(CExpr::Float(f64::INFINITY)),
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
                    if self.peek() != Some(&Tok::RParen) {
                        loop {
                            args.push(self.or()?);
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
                    Ok(CExpr::Call(w, args))
                } else {
                    Ok(CExpr::Name(w))
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

/// Parses a config expression.
pub fn parse_cexpr(s: &str) -> Result<CExpr, CExprError> {
    let toks = lex(s)?;
    let mut p = P { toks, i: 0, len: s.len(), depth: 0 };
    if p.toks.is_empty() {
        return Err(CExprError { message: "empty expression".into(), start: 0, end: s.len() });
    }
    let e = p.or()?;
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
}
