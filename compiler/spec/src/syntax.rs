//! A RON reader that keeps a source span on every value.
//!
//! Spec files are plain RON (the `ron` crate accepts every file this reader accepts; a test
//! checks it on every shipped model). The `ron` crate drops positions once it hands values to
//! serde, and every Kiln diagnostic needs one, so the typed spec is built from this tree.

use crate::diag::Diagnostic;
use crate::source::{FileId, Span};

/// A RON value with the span of its source text.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub kind: Kind,
    pub span: Span,
}

/// A name with its span (a struct field or a struct/enum name).
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Char(char),
    /// A bare identifier: a unit struct or enum variant (`f32`, `Zeros`, `None`).
    Unit(Ident),
    /// `Name(a, b)` or `(a, b)`.
    Tuple(Option<Ident>, Vec<Value>),
    /// `Name(x: a, y: b)` or `(x: a)`.
    Struct(Option<Ident>, Vec<(Ident, Value)>),
    List(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl Value {
    /// A short description of the value's form, for "expected …, found …" messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Bool(b) => format!("`{b}`"),
            Kind::Int(i) => format!("the integer {i}"),
            Kind::Float(f) => format!("the number {f}"),
            Kind::Str(s) => format!("the string {s:?}"),
            Kind::Char(c) => format!("the character {c:?}"),
            Kind::Unit(i) => format!("`{}`", i.name),
            Kind::Tuple(Some(n), _) | Kind::Struct(Some(n), _) => format!("`{}(…)`", n.name),
            Kind::Tuple(None, _) => "a tuple".into(),
            Kind::Struct(None, _) => "an unnamed struct".into(),
            Kind::List(_) => "a list".into(),
            Kind::Map(_) => "a map".into(),
        }
    }

    /// The name of a named struct, tuple struct or unit (`Add` in `Add(a, b)`).
    pub fn head(&self) -> Option<&Ident> {
        match &self.kind {
            Kind::Unit(i) => Some(i),
            Kind::Tuple(n, _) | Kind::Struct(n, _) => n.as_ref(),
            _ => None,
        }
    }
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    file: FileId,
    depth: usize,
}

/// Nesting deeper than this is refused rather than risking the stack: 100 levels. The reader,
/// the converter and the lowering each recurse once per level, and a debug build's frames
/// overflow a 2 MiB thread stack (a test thread's) at about 190; the `ron` crate, which
/// confirms the file is valid RON, stops at 128 with a message about its own options.
pub const MAX_DEPTH: usize = 100;

/// Parses one RON value (the whole file, apart from comments and whitespace).
pub fn parse(file: FileId, src: &str) -> Result<Value, Diagnostic> {
    let mut p = Parser { src, bytes: src.as_bytes(), pos: 0, file, depth: 0 };
    p.skip_ws()?;
    // RON allows `#![enable(...)]` attributes before the value.
    while p.peek() == Some(b'#') {
        p.skip_attribute()?;
        p.skip_ws()?;
    }
    let v = p.value()?;
    p.skip_ws()?;
    if p.pos < p.bytes.len() {
        return Err(
            p.error_here("unexpected text after the end of the value", "expected the end of the file")
        );
    }
    Ok(v)
}

impl<'a> Parser<'a> {
    fn span(&self, start: usize) -> Span {
        Span::new(self.file, start, self.pos)
    }

    fn error_at(&self, start: usize, end: usize, msg: &str, label: &str) -> Diagnostic {
        Diagnostic::error(format!("syntax error: {msg}"))
            .at(Span::new(self.file, start, end.max(start)), label)
    }

    fn error_here(&self, msg: &str, label: &str) -> Diagnostic {
        let end = self.src[self.pos..].chars().next().map(|c| self.pos + c.len_utf8()).unwrap_or(self.pos);
        self.error_at(self.pos, end, msg, label)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) -> Result<(), Diagnostic> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.pos += 1,
                Some(b'/') if self.bytes.get(self.pos + 1) == Some(&b'/') => {
                    while let Some(c) = self.peek() {
                        if c == b'\n' {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                Some(b'/') if self.bytes.get(self.pos + 1) == Some(&b'*') => {
                    let start = self.pos;
                    self.pos += 2;
                    let mut level = 1;
                    while level > 0 {
                        match (self.peek(), self.bytes.get(self.pos + 1)) {
                            (None, _) => {
                                return Err(self.error_at(
                                    start,
                                    start + 2,
                                    "unterminated block comment",
                                    "this comment is never closed",
                                ))
                            }
                            (Some(b'*'), Some(b'/')) => {
                                level -= 1;
                                self.pos += 2;
                            }
                            (Some(b'/'), Some(b'*')) => {
                                level += 1;
                                self.pos += 2;
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn skip_attribute(&mut self) -> Result<(), Diagnostic> {
        let start = self.pos;
        let mut depth = 0usize;
        while let Some(c) = self.peek() {
            self.pos += 1;
            match c {
                b'[' => depth += 1,
                b']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        Err(self.error_at(start, start + 1, "unterminated attribute", "`#![...]` is never closed"))
    }

    fn expect(&mut self, c: u8, what: &str) -> Result<(), Diagnostic> {
        self.skip_ws()?;
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            let found = self.describe_here();
            Err(self.error_here(&format!("expected {what}, found {found}"), &format!("expected {what}")))
        }
    }

    fn describe_here(&self) -> String {
        let rest = &self.src[self.pos..];
        let word: &str =
            &rest[..rest.find(|c: char| !(c == '_' || c.is_alphanumeric())).unwrap_or(rest.len())];
        match rest.chars().next() {
            None => "the end of the file".into(),
            Some(_) if !word.is_empty() => format!("`{word}`"),
            Some(c) => format!("`{c}`"),
        }
    }

    fn value(&mut self) -> Result<Value, Diagnostic> {
        self.skip_ws()?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_here(
                &format!("nesting is too deep (more than {MAX_DEPTH} levels)"),
                &format!("more than {MAX_DEPTH} levels of nesting"),
            ));
        }
        let start = self.pos;
        let kind = match self.peek() {
            None => {
                return Err(self.error_here("expected a value, found the end of the file", "expected a value"))
            }
            Some(b'"') => Kind::Str(self.string()?),
            Some(b'r') if matches!(self.bytes.get(self.pos + 1), Some(b'"' | b'#')) => {
                Kind::Str(self.raw_string()?)
            }
            Some(b'\'') => Kind::Char(self.char_lit()?),
            Some(b'[') => {
                self.pos += 1;
                let items = self.seq(b']', |p| p.value())?;
                Kind::List(items)
            }
            Some(b'{') => {
                self.pos += 1;
                let entries = self.seq(b'}', |p| {
                    let k = p.value()?;
                    p.expect(b':', "`:` after a map key")?;
                    let v = p.value()?;
                    Ok((k, v))
                })?;
                Kind::Map(entries)
            }
            Some(b'(') => self.paren_body(None)?,
            Some(c) if c == b'-' || c == b'+' || c == b'.' || c.is_ascii_digit() => self.number()?,
            Some(c) if c == b'_' || c.is_ascii_alphabetic() => {
                let ident = self.ident()?;
                match ident.name.as_str() {
                    "true" => Kind::Bool(true),
                    "false" => Kind::Bool(false),
                    "inf" => Kind::Float(f64::INFINITY),
                    "NaN" => Kind::Float(f64::NAN),
                    _ => {
                        self.skip_ws()?;
                        if self.peek() == Some(b'(') {
                            self.pos += 1;
                            self.paren_body(Some(ident))?
                        } else {
                            Kind::Unit(ident)
                        }
                    }
                }
            }
            Some(_) => {
                let found = self.describe_here();
                return Err(self.error_here(&format!("expected a value, found {found}"), "expected a value"));
            }
        };
        self.depth -= 1;
        Ok(Value { kind, span: self.span(start) })
    }

    /// After `(`: either `ident: value, …` (a struct) or `value, …` (a tuple).
    fn paren_body(&mut self, name: Option<Ident>) -> Result<Kind, Diagnostic> {
        if name.is_none() && self.peek() == Some(b'(') {
            self.pos += 1;
        }
        self.skip_ws()?;
        if self.looks_like_field() {
            let fields = self.seq(b')', |p| {
                p.skip_ws()?;
                if !p.looks_like_field() {
                    let found = p.describe_here();
                    return Err(p.error_here(
                        &format!("expected a field `name: value`, found {found} (RON does not mix named and positional arguments)"),
                        "expected `name: value`",
                    ));
                }
                let f = p.ident()?;
                p.expect(b':', "`:`")?;
                let v = p.value()?;
                Ok((f, v))
            })?;
            Ok(Kind::Struct(name, fields))
        } else {
            let items = self.seq(b')', |p| {
                p.skip_ws()?;
                if p.looks_like_field() {
                    return Err(p.error_here(
                        "a named field after positional arguments (RON does not mix named and positional arguments)",
                        "use either all `name: value` or all positional arguments",
                    ));
                }
                p.value()
            })?;
            Ok(Kind::Tuple(name, items))
        }
    }

    /// Whether the text at the cursor is `identifier :` (but not `::`).
    fn looks_like_field(&self) -> bool {
        let mut i = self.pos;
        match self.bytes.get(i) {
            Some(c) if *c == b'_' || c.is_ascii_alphabetic() => {}
            _ => return false,
        }
        while matches!(self.bytes.get(i), Some(c) if *c == b'_' || c.is_ascii_alphanumeric()) {
            i += 1;
        }
        let mut j = i;
        while matches!(self.bytes.get(j), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            j += 1;
        }
        self.bytes.get(j) == Some(&b':') && self.bytes.get(j + 1) != Some(&b':')
    }

    /// A comma-separated sequence up to `close`, trailing comma allowed.
    fn seq<T>(
        &mut self,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Result<T, Diagnostic>,
    ) -> Result<Vec<T>, Diagnostic> {
        let open = self.pos.saturating_sub(1);
        let unclosed = |p: &Self| {
            p.error_at(open, open + 1, &format!("`{}` is never closed", p.bytes[open] as char), "opened here")
                .note(format!("expected `{}` before the end of the file", close as char))
        };
        let mut out = Vec::new();
        loop {
            self.skip_ws()?;
            match self.peek() {
                Some(c) if c == close => {
                    self.pos += 1;
                    return Ok(out);
                }
                None => return Err(unclosed(self)),
                _ => {}
            }
            out.push(item(self)?);
            self.skip_ws()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(c) if c == close => {}
                None => return Err(unclosed(self)),
                _ => {
                    let found = self.describe_here();
                    return Err(self.error_here(
                        &format!("expected `,` or `{}`, found {found}", close as char),
                        &format!("expected `,` or `{}`", close as char),
                    ));
                }
            }
        }
    }

    fn ident(&mut self) -> Result<Ident, Diagnostic> {
        let start = self.pos;
        if self.src[self.pos..].starts_with("r#") {
            self.pos += 2;
        }
        while matches!(self.peek(), Some(c) if c == b'_' || c.is_ascii_alphanumeric()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error_here("expected an identifier", "expected an identifier"));
        }
        let name = self.src[start..self.pos].trim_start_matches("r#").to_string();
        Ok(Ident { name, span: self.span(start) })
    }

    fn number(&mut self) -> Result<Kind, Diagnostic> {
        let start = self.pos;
        if matches!(self.peek(), Some(b'-' | b'+')) {
            self.pos += 1;
        }
        if self.src[self.pos..].starts_with("inf") {
            self.pos += 3;
            let neg = self.bytes[start] == b'-';
            return Ok(Kind::Float(if neg { f64::NEG_INFINITY } else { f64::INFINITY }));
        }
        if self.src[self.pos..].starts_with("NaN") {
            self.pos += 3;
            return Ok(Kind::Float(f64::NAN));
        }
        let radix = if self.src[self.pos..].starts_with("0x") {
            16
        } else if self.src[self.pos..].starts_with("0b") {
            2
        } else if self.src[self.pos..].starts_with("0o") {
            8
        } else {
            10
        };
        if radix != 10 {
            self.pos += 2;
            let digits_start = self.pos;
            while matches!(self.peek(), Some(c) if c.is_ascii_hexdigit() || c == b'_') {
                self.pos += 1;
            }
            let digits: String = self.src[digits_start..self.pos].chars().filter(|&c| c != '_').collect();
            let neg = self.bytes[start] == b'-';
            return i64::from_str_radix(&digits, radix).map(|v| Kind::Int(if neg { -v } else { v })).map_err(
                |_| self.error_at(start, self.pos, "invalid integer literal", "not a valid integer"),
            );
        }
        let mut is_float = false;
        while let Some(c) = self.peek() {
            match c {
                b'0'..=b'9' | b'_' => {}
                b'.' | b'e' | b'E' => is_float = true,
                b'-' | b'+' if matches!(self.bytes[self.pos - 1], b'e' | b'E') => {}
                _ => break,
            }
            self.pos += 1;
        }
        let text: String = self.src[start..self.pos].chars().filter(|&c| c != '_').collect();
        let bad = |p: &Self| p.error_at(start, p.pos, "invalid number literal", "not a valid number");
        if is_float {
            text.parse::<f64>().map(Kind::Float).map_err(|_| bad(self))
        } else {
            text.parse::<i64>().map(Kind::Int).map_err(|_| bad(self))
        }
    }

    fn string(&mut self) -> Result<String, Diagnostic> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.src[self.pos..].chars().next() else {
                return Err(self.error_at(
                    start,
                    start + 1,
                    "unterminated string",
                    "this string is never closed",
                ));
            };
            self.pos += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let esc_start = self.pos - 1;
                    let Some(e) = self.src[self.pos..].chars().next() else {
                        return Err(self.error_at(
                            start,
                            start + 1,
                            "unterminated string",
                            "this string is never closed",
                        ));
                    };
                    self.pos += e.len_utf8();
                    out.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '0' => '\0',
                        '\\' => '\\',
                        '"' => '"',
                        '\'' => '\'',
                        'u' => self.unicode_escape(esc_start)?,
                        _ => {
                            return Err(self.error_at(
                                esc_start,
                                self.pos,
                                "unknown escape sequence",
                                "not a valid escape",
                            ))
                        }
                    });
                }
                _ => out.push(c),
            }
        }
    }

    fn unicode_escape(&mut self, esc_start: usize) -> Result<char, Diagnostic> {
        let bad = |p: &Self| p.error_at(esc_start, p.pos, "invalid unicode escape", "expected `\\u{XXXX}`");
        if self.peek() != Some(b'{') {
            return Err(bad(self));
        }
        let close = self.src[self.pos..].find('}').ok_or_else(|| bad(self))?;
        let hex = &self.src[self.pos + 1..self.pos + close];
        self.pos += close + 1;
        u32::from_str_radix(hex, 16).ok().and_then(char::from_u32).ok_or_else(|| bad(self))
    }

    fn raw_string(&mut self) -> Result<String, Diagnostic> {
        let start = self.pos;
        self.pos += 1;
        let hashes = self.src[self.pos..].bytes().take_while(|&b| b == b'#').count();
        self.pos += hashes;
        if self.peek() != Some(b'"') {
            return Err(self.error_here("expected `\"` in a raw string", "expected `\"`"));
        }
        self.pos += 1;
        let terminator = format!("\"{}", "#".repeat(hashes));
        match self.src[self.pos..].find(&terminator) {
            Some(end) => {
                let s = self.src[self.pos..self.pos + end].to_string();
                self.pos += end + terminator.len();
                Ok(s)
            }
            None => {
                Err(self.error_at(start, start + 1, "unterminated raw string", "this string is never closed"))
            }
        }
    }

    fn char_lit(&mut self) -> Result<char, Diagnostic> {
        let start = self.pos;
        self.pos += 1;
        let c = self.src[self.pos..].chars().next();
        let Some(mut c) = c else {
            return Err(self.error_at(start, start + 1, "unterminated character literal", "never closed"));
        };
        self.pos += c.len_utf8();
        if c == '\\' {
            let e = self.src[self.pos..].chars().next().unwrap_or('\\');
            self.pos += e.len_utf8();
            c = match e {
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                '0' => '\0',
                other => other,
            };
        }
        if self.peek() != Some(b'\'') {
            return Err(self.error_at(start, self.pos, "unterminated character literal", "expected `'`"));
        }
        self.pos += 1;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Value {
        parse(0, s).unwrap_or_else(|d| panic!("{}", d.message))
    }

    #[test]
    fn parses_every_form_with_spans() {
        let v = p(r#"Model(name: "x", xs: [1, -2.5e3, true], m: {"a": (1, 2)}, u: f32, t: Add("a", 2),)"#);
        let Kind::Struct(Some(name), fields) = &v.kind else { panic!("{v:?}") };
        assert_eq!(name.name, "Model");
        assert_eq!(fields.len(), 5);
        assert_eq!(fields[0].1.kind, Kind::Str("x".into()));
        assert_eq!(fields[0].1.span, Span::new(0, 12, 15));
        let Kind::List(xs) = &fields[1].1.kind else { panic!() };
        assert_eq!(xs[1].kind, Kind::Float(-2500.0));
        let Kind::Tuple(Some(add), args) = &fields[4].1.kind else { panic!() };
        assert_eq!(add.name, "Add");
        assert_eq!(args[1].kind, Kind::Int(2));
    }

    #[test]
    fn comments_and_raw_strings() {
        let v = p("// c\n/* a /* nested */ b */ [r#\"q\"uote\"#, 'c']");
        assert_eq!(
            v.kind,
            Kind::List(vec![
                Value { kind: Kind::Str("q\"uote".into()), span: Span::new(0, 29, 40) },
                Value { kind: Kind::Char('c'), span: Span::new(0, 42, 45) },
            ])
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = |n: usize| format!("{}1{}", "Add(".repeat(n), ")".repeat(n));
        assert!(parse(0, &deep(MAX_DEPTH - 1)).is_ok());
        let e = parse(0, &deep(MAX_DEPTH)).unwrap_err();
        assert_eq!(e.message, format!("syntax error: nesting is too deep (more than {MAX_DEPTH} levels)"));
        // Far past the limit (on a test thread's 2 MiB stack).
        let e = parse(0, &"[".repeat(100_000)).unwrap_err();
        assert!(e.message.contains("nesting is too deep"), "{}", e.message);
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = parse(0, "Model(a: 1 b: 2)").unwrap_err();
        assert_eq!(e.message, "syntax error: expected `,` or `)`, found `b`");
        assert_eq!(e.span.unwrap().0, Span::new(0, 11, 12));
        let e = parse(0, "Add(\"x\", axis: 1)").unwrap_err();
        assert!(e.message.contains("named field after positional"), "{}", e.message);
        let e = parse(0, "[1, 2").unwrap_err();
        assert_eq!(e.message, "syntax error: `[` is never closed");
    }
}
