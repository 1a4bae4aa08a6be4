//! From the spanned RON tree to the typed spec, collecting every error it finds.

use crate::ast::*;
use crate::cexpr::{parse_cexpr, CExpr, SpannedCExpr};
use crate::diag::Diagnostic;
use crate::ops::{self, ArgKind, OpSig};
use crate::source::Span;
use crate::suggest::closest;
use crate::syntax::{Ident, Kind, Value};

/// Collects diagnostics while converting; conversion continues past errors where it can.
#[derive(Default)]
pub struct Converter {
    pub diags: Vec<Diagnostic>,
}

type Fields<'v> = Vec<(&'v Ident, &'v Value)>;

/// A variant name with its `name: value` arguments and the span of the whole value.
type NamedArgs = (String, Vec<(Ident, SpannedCExpr)>, Span);

impl Converter {
    fn error(&mut self, span: Span, msg: impl Into<String>, label: impl Into<String>) {
        self.diags.push(Diagnostic::error(msg).at(span, label));
    }

    fn expected(&mut self, v: &Value, what: &str) {
        let found = v.describe();
        self.error(v.span, format!("expected {what}, found {found}"), format!("expected {what}"));
    }

    /// The fields of `Name(field: …)`, checking the struct name and the field names.
    fn fields<'v>(
        &mut self,
        v: &'v Value,
        name: &str,
        allowed: &[&str],
        required: &[&str],
    ) -> Option<Fields<'v>> {
        let fields: Fields<'v> = match &v.kind {
            Kind::Struct(n, f) if n.as_ref().is_none_or(|n| n.name == name) => {
                f.iter().map(|(k, v)| (k, v)).collect()
            }
            Kind::Tuple(Some(n), items) if n.name == name && items.is_empty() => vec![],
            _ => {
                self.expected(v, &format!("`{name}(…)` with named fields"));
                return None;
            }
        };
        let mut ok = true;
        for (i, (k, _)) in fields.iter().enumerate() {
            if !allowed.contains(&k.name.as_str()) {
                let hint = closest(&k.name, allowed.iter().copied())
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("`{name}` has the fields: {}", allowed.join(", ")));
                self.diags.push(
                    Diagnostic::error(format!("unknown field `{}` in `{name}`", k.name))
                        .at(k.span, "unknown field")
                        .note(hint),
                );
                ok = false;
            } else if fields[..i].iter().any(|(p, _)| p.name == k.name) {
                self.error(k.span, format!("field `{}` is given twice", k.name), "given again here");
                ok = false;
            }
        }
        for r in required {
            if !fields.iter().any(|(k, _)| k.name == *r) {
                self.error(v.span, format!("`{name}` is missing the field `{r}`"), format!("needs `{r}: …`"));
                ok = false;
            }
        }
        ok.then_some(fields)
    }

    fn field<'v>(fields: &Fields<'v>, name: &str) -> Option<&'v Value> {
        fields.iter().find(|(k, _)| k.name == name).map(|(_, v)| *v)
    }

    /// A string as a name with its span (inside the quotes).
    pub fn name(&mut self, v: &Value, what: &str) -> Option<Ident> {
        match &v.kind {
            Kind::Str(s) => Some(Ident { name: s.clone(), span: inner_span(v) }),
            _ => {
                self.expected(v, what);
                None
            }
        }
    }

    fn names(&mut self, v: &Value, what: &str) -> Option<Vec<Ident>> {
        match &v.kind {
            Kind::List(items) => items.iter().map(|i| self.name(i, what)).collect(),
            Kind::Str(_) => self.name(v, what).map(|n| vec![n]),
            _ => {
                self.expected(v, &format!("{what} or a list of them"));
                None
            }
        }
    }

    /// A config expression: a number, a bool, or a string holding an expression.
    pub fn cexpr(&mut self, v: &Value) -> Option<SpannedCExpr> {
        let expr = match &v.kind {
            Kind::Int(i) => CExpr::Int(*i),
            Kind::Float(f) => CExpr::Float(*f),
            Kind::Bool(b) => CExpr::Bool(*b),
            Kind::Str(s) => match parse_cexpr(s) {
                Ok(e) => e,
                Err(e) => {
                    let base = v.span.start as usize + 1;
                    let span =
                        Span::new(v.span.file, base + e.start, base + e.end.max(e.start + 1).min(s.len()));
                    let span = if span.end <= span.start { v.span } else { span };
                    self.diags.push(
                        Diagnostic::error(format!(
                            "bad config expression {:?}: {}",
                            crate::cexpr::abbreviate(s, 80),
                            e.message
                        ))
                        .at(span, e.message.clone()),
                    );
                    return None;
                }
            },
            _ if v.head().is_some_and(|h| h.name == "Dyn") => {
                self.error(
                    v.span,
                    "`Dyn` declares a dynamic size: it is only allowed as the value of a config entry",
                    "not a config entry",
                );
                return None;
            }
            _ => {
                self.expected(v, "a number, a bool or an expression string");
                return None;
            }
        };
        Some(SpannedCExpr { expr, span: v.span })
    }

    /// Refuses a config name that config expressions read as a constant or an operator
    /// (`pi`, `inf`, `true`, `and`, …): the entry could never be read, so defining it is a
    /// mistake rather than a redefinition.
    /// Whether an input or output name can name a file: `kiln eval -o`/`kiln run -o` write
    /// `NAME.npy` into the output folder, and the compiled model's C ABI hands the name out as
    /// a C string, so a name must be one plain path component that prints as itself. The
    /// runtime refuses the same names in a manifest (`kiln_runtime::name_problem`).
    fn file_name(&mut self, name: &Ident, kind: &str) -> bool {
        let Some(problem) = name_problem(&name.name) else { return true };
        self.diags.push(
            Diagnostic::error(format!("{kind} name {:?} {problem}", name.name))
                .at(name.span, "not a plain name")
                .note(format!("{kind} names become file names (NAME.npy) under `-o`: use letters, digits, `_`, `-` or `.`")),
        );
        false
    }

    fn reserved(&mut self, name: &Ident, what: &str) -> bool {
        if !crate::cexpr::RESERVED.contains(&name.name.as_str()) {
            return false;
        }
        self.diags.push(
            Diagnostic::error(format!(
                "`{}` cannot be {what}: config expressions read it as a constant or an operator",
                name.name
            ))
            .at(name.span, "reserved name")
            .note(format!("reserved: {}", crate::cexpr::RESERVED.join(", "))),
        );
        true
    }

    fn config_map(&mut self, v: &Value) -> Vec<ConfigEntry> {
        let Kind::Map(entries) = &v.kind else {
            self.expected(v, "a map of config values `{\"name\": value, …}`");
            return vec![];
        };
        let mut out: Vec<ConfigEntry> = Vec::new();
        for (k, val) in entries {
            let value = match val.head() {
                Some(h) if h.name == "Dyn" => self.dyn_decl(val).map(|d| ConfigValue::Dyn(Box::new(d))),
                _ => self.cexpr(val).map(ConfigValue::Expr),
            };
            let (Some(name), Some(value)) = (self.name(k, "a config name string"), value) else {
                continue;
            };
            if self.reserved(&name, "a config name") {
                continue;
            }
            if let Some(prev) = out.iter().find(|e| e.name.name == name.name) {
                self.diags.push(
                    Diagnostic::error(format!("config `{}` is defined twice", name.name))
                        .at(name.span, "defined again here")
                        .with_related(prev.name.span, "first defined here"),
                );
                continue;
            }
            out.push(ConfigEntry { name, value });
        }
        out
    }

    /// `Dyn(min: …, max: …, hint: …[, multiple_of: …])`, each a config expression.
    pub(crate) fn dyn_decl(&mut self, v: &Value) -> Option<DynDecl> {
        const FIELDS: &[&str] = &["min", "max", "hint", "multiple_of"];
        let f = self.fields(v, "Dyn", FIELDS, &["min", "max", "hint"])?;
        let mut get = |name: &str| Self::field(&f, name).map(|e| self.cexpr(e));
        // Every field is converted, so each bad one is reported.
        let (min, max, hint, multiple_of) = (get("min"), get("max"), get("hint"), get("multiple_of"));
        let multiple_of = match multiple_of {
            Some(e) => Some(e?),
            None => None,
        };
        Some(DynDecl { min: min??, max: max??, hint: hint??, multiple_of, span: v.span })
    }

    fn dtype(&mut self, v: &Value) -> Option<(String, Span)> {
        let s = match &v.kind {
            Kind::Unit(i) => i.name.clone(),
            Kind::Str(s) => s.clone(),
            _ => {
                self.expected(v, "a dtype (f32, f64, f16, bf16, i32, i64, bool)");
                return None;
            }
        };
        if !ir_dtype::NAMES.contains(&s.as_str()) {
            let hint = closest(&s, ir_dtype::NAMES).map(|c| format!("did you mean `{c}`?"));
            let mut d = Diagnostic::error(format!("unknown dtype `{s}`"))
                .at(v.span, "not a dtype")
                .note(format!("dtypes: {}", ir_dtype::NAMES.join(", ")));
            if let Some(h) = hint {
                d = d.note(h);
            }
            self.diags.push(d);
            return None;
        }
        Some((s, v.span))
    }

    fn shape(&mut self, v: &Value) -> Option<ShapeExpr> {
        match &v.kind {
            Kind::List(items) => {
                let dims: Option<Vec<_>> = items.iter().map(|d| self.cexpr(d)).collect();
                Some(ShapeExpr::Dims(dims?, v.span))
            }
            Kind::Str(s) => {
                let inner = s.trim();
                if let Some(arg) = inner.strip_prefix("shape(").and_then(|r| r.strip_suffix(')')) {
                    return Some(ShapeExpr::Of(
                        Ident { name: arg.trim().to_string(), span: inner_span(v) },
                        v.span,
                    ));
                }
                // A single expression is a rank-1 shape.
                self.cexpr(v).map(|e| ShapeExpr::Dims(vec![e], v.span))
            }
            Kind::Int(_) => self.cexpr(v).map(|e| ShapeExpr::Dims(vec![e], v.span)),
            _ => {
                self.expected(v, "a shape: a list of extents or \"shape(x)\"");
                None
            }
        }
    }

    // ---------------------------------------------------------------- files

    pub fn model(&mut self, v: &Value) -> Option<Model> {
        const ALLOWED: &[&str] =
            &["name", "config", "inputs", "use", "modules", "body", "outputs", "training"];
        let f = self.fields(v, "Model", ALLOWED, &["name", "body", "outputs"])?;
        let name = Self::field(&f, "name").and_then(|n| self.name(n, "the model name string"));
        let config = Self::field(&f, "config").map(|c| self.config_map(c)).unwrap_or_default();
        let inputs = Self::field(&f, "inputs").map(|i| self.inputs(i)).unwrap_or_default();
        let uses = Self::field(&f, "use").and_then(|u| self.names(u, "a library name")).unwrap_or_default();
        let modules = Self::field(&f, "modules").map(|m| self.modules(m)).unwrap_or_default();
        let body = Self::field(&f, "body").map(|b| self.stmts(b)).unwrap_or_default();
        let outputs = Self::field(&f, "outputs").map(|o| self.outputs(o)).unwrap_or_default();
        let training = Self::field(&f, "training").and_then(|t| self.training(t));
        Some(Model { name: name?, config, inputs, uses, modules, body, outputs, training, span: v.span })
    }

    pub fn library(&mut self, v: &Value) -> Option<Library> {
        let f = self.fields(v, "Library", &["name", "config", "modules"], &["name", "modules"])?;
        let name = Self::field(&f, "name").and_then(|n| self.name(n, "the library name string"));
        let config = Self::field(&f, "config").map(|c| self.config_map(c)).unwrap_or_default();
        let modules = Self::field(&f, "modules").map(|m| self.modules(m)).unwrap_or_default();
        Some(Library { name: name?, config, modules })
    }

    fn inputs(&mut self, v: &Value) -> Vec<InputDecl> {
        let Kind::Map(entries) = &v.kind else {
            self.expected(v, "a map `{\"name\": (dtype, [shape]), …}`");
            return vec![];
        };
        let mut out: Vec<InputDecl> = Vec::new();
        for (k, val) in entries {
            let Some(name) = self.name(k, "an input name string") else { continue };
            if !self.file_name(&name, "input") {
                continue;
            }
            if let Some(prev) = out.iter().find(|i| i.name.name == name.name) {
                self.diags.push(
                    Diagnostic::error(format!("input `{}` is declared twice", name.name))
                        .at(name.span, "declared again here")
                        .with_related(prev.name.span, "first declared here"),
                );
                continue;
            }
            match &val.kind {
                Kind::Tuple(None, parts) if parts.len() == 2 => {
                    if let (Some(dtype), Some(shape)) = (self.dtype(&parts[0]), self.shape(&parts[1])) {
                        out.push(InputDecl { name, dtype, shape });
                    }
                }
                _ => self.expected(val, "`(dtype, [shape])`"),
            }
        }
        out
    }

    fn outputs(&mut self, v: &Value) -> Vec<OutputDecl> {
        match &v.kind {
            Kind::List(items) => items
                .iter()
                .filter_map(|i| {
                    let n = self.name(i, "an output name")?;
                    self.file_name(&n, "output").then(|| OutputDecl { name: n.clone(), value: n })
                })
                .collect(),
            Kind::Map(entries) => entries
                .iter()
                .filter_map(|(k, val)| {
                    let name = self.name(k, "an output name")?;
                    let value = self.name(val, "the name of the tensor to output")?;
                    self.file_name(&name, "output").then_some(OutputDecl { name, value })
                })
                .collect(),
            _ => {
                self.expected(v, "a list of names or a map `{\"output\": \"tensor\"}`");
                vec![]
            }
        }
    }

    fn modules(&mut self, v: &Value) -> Vec<ModuleDef> {
        let Kind::Map(entries) = &v.kind else {
            self.expected(v, "a map `{\"name\": Module(…), …}`");
            return vec![];
        };
        let mut out: Vec<ModuleDef> = Vec::new();
        for (k, val) in entries {
            let Some(name) = self.name(k, "a module name string") else { continue };
            let Some(m) = self.module(name, val) else { continue };
            if let Some(prev) = out.iter().find(|p| p.name.name == m.name.name) {
                self.diags.push(
                    Diagnostic::error(format!("module `{}` is defined twice", m.name.name))
                        .at(m.name.span, "defined again here")
                        .with_related(prev.name.span, "first defined here"),
                );
                continue;
            }
            out.push(m);
        }
        out
    }

    fn module(&mut self, name: Ident, v: &Value) -> Option<ModuleDef> {
        let f = self.fields(v, "Module", &["args", "config", "body", "ret"], &["body", "ret"])?;
        let args =
            Self::field(&f, "args").and_then(|a| self.names(a, "an argument name")).unwrap_or_default();
        let mut config = Vec::new();
        if let Some(c) = Self::field(&f, "config") {
            match &c.kind {
                Kind::Map(entries) => {
                    for (k, val) in entries {
                        let Some(n) = self.name(k, "a config argument name") else { continue };
                        if self.reserved(&n, "a config argument name") {
                            continue;
                        }
                        let default = match &val.kind {
                            Kind::Unit(i) if i.name == "Required" => None,
                            _ => match self.cexpr(val) {
                                Some(e) => Some(e),
                                None => continue,
                            },
                        };
                        config.push((n, default));
                    }
                }
                _ => self.expected(c, "a map `{\"name\": default or Required, …}`"),
            }
        }
        let body = Self::field(&f, "body").map(|b| self.stmts(b)).unwrap_or_default();
        let ret = Self::field(&f, "ret").and_then(|r| self.names(r, "a returned name"))?;
        Some(ModuleDef { name, args, config, body, ret, span: v.span })
    }

    // ---------------------------------------------------------------- statements

    fn stmts(&mut self, v: &Value) -> Vec<Stmt> {
        let Kind::List(items) = &v.kind else {
            self.expected(v, "a list of statements `[Let(…), Repeat(…), …]`");
            return vec![];
        };
        items.iter().filter_map(|s| self.stmt(s)).collect()
    }

    fn stmt(&mut self, v: &Value) -> Option<Stmt> {
        match (&v.kind, v.head().map(|h| h.name.as_str())) {
            (Kind::Tuple(_, parts), Some("Let")) => {
                if parts.len() != 2 {
                    self.error(
                        v.span,
                        format!("`Let` takes 2 arguments (name, value), got {}", parts.len()),
                        "expected `Let(\"name\", value)`",
                    );
                    return None;
                }
                let names = self.names(&parts[0], "a name string")?;
                let value = self.expr(&parts[1]).unwrap_or(Expr::Error(parts[1].span));
                Some(Stmt::Let { names, value, span: v.span })
            }
            (_, Some("Repeat")) => {
                let f = self.fields(v, "Repeat", &["n", "index", "body"], &["n", "body"])?;
                let n = Self::field(&f, "n").and_then(|n| self.cexpr(n));
                let index = match Self::field(&f, "index") {
                    Some(i) => self.name(i, "the index name")?,
                    None => Ident { name: "i".into(), span: v.span },
                };
                if self.reserved(&index, "a repeat index") {
                    return None;
                }
                let body = Self::field(&f, "body").map(|b| self.stmts(b)).unwrap_or_default();
                Some(Stmt::Repeat { n: n?, index, body, span: v.span })
            }
            (_, Some(other)) => {
                let hint = closest(other, ["Let", "Repeat"]);
                let mut d = Diagnostic::error(format!("unknown statement `{other}`"))
                    .at(v.head().map(|h| h.span).unwrap_or(v.span), "not a statement")
                    .note("a body holds `Let(\"name\", expr)` and `Repeat(n: …, index: …, body: […])`");
                if let Some(h) = hint {
                    d = d.note(format!("did you mean `{h}`?"));
                }
                self.diags.push(d);
                None
            }
            _ => {
                self.expected(v, "a statement `Let(\"name\", expr)` or `Repeat(…)`");
                None
            }
        }
    }

    // ---------------------------------------------------------------- expressions

    pub fn expr(&mut self, v: &Value) -> Option<Expr> {
        match &v.kind {
            Kind::Str(s) => Some(Expr::Name(Ident { name: s.clone(), span: inner_span(v) })),
            Kind::Int(i) => Some(Expr::Number(*i as f64, v.span)),
            Kind::Float(f) => Some(Expr::Number(*f, v.span)),
            Kind::Bool(b) => Some(Expr::Bool(*b, v.span)),
            Kind::List(_) => {
                self.diags.push(
                    Diagnostic::error("expected a tensor expression, found a list")
                        .at(v.span, "a list is not a tensor")
                        .note("write a literal tensor as `Const([…])`"),
                );
                None
            }
            Kind::Unit(h) | Kind::Tuple(Some(h), _) | Kind::Struct(Some(h), _) => match h.name.as_str() {
                "Param" => self.param(v).map(Expr::Param),
                "Call" => self.call(v).map(Expr::Call),
                "Scalar" => self.scalar(v),
                "If" => self.if_expr(v),
                name => match ops::lookup(name) {
                    Some(sig) => self.op_call(sig, h, v).map(Expr::Op),
                    None => {
                        let mut d = Diagnostic::error(format!("unknown op `{name}`")).at(h.span, "not an op");
                        if let Some(m) = ops::std_module_for(name) {
                            d = d.note(format!(
                                "`{name}` is a layer of the standard library: `Call(fn: \"std.{m}\", args: [...])` with `use: [\"std\"]`"
                            ));
                        } else if let Some(s) = ops::suggest_op(name) {
                            d = d.note(format!("did you mean `{s}`?"));
                        }
                        self.diags.push(d);
                        None
                    }
                },
            },
            _ => {
                self.expected(v, "a tensor expression (a name, a number or an op)");
                None
            }
        }
    }

    /// Matches positional or named arguments to the op's signature.
    fn op_call(&mut self, sig: &'static OpSig, head: &Ident, v: &Value) -> Option<OpCall> {
        let mut slots: Vec<Option<&Value>> = vec![None; sig.args.len()];
        let arg_list = || sig.args.iter().map(|a| a.name).collect::<Vec<_>>().join(", ");
        match &v.kind {
            Kind::Unit(_) => {}
            Kind::Tuple(_, items) => {
                if items.len() > sig.args.len() {
                    let needed = sig.args.iter().filter(|a| a.default == ops::ArgDefault::Required).count();
                    self.diags.push(
                        Diagnostic::error(format!(
                            "wrong number of arguments: `{}` takes {} ({}), got {}",
                            sig.name,
                            if needed == sig.args.len() {
                                needed.to_string()
                            } else {
                                format!("{needed} to {}", sig.args.len())
                            },
                            arg_list(),
                            items.len()
                        ))
                        .at(
                            items[sig.args.len()].span.to(items[items.len() - 1].span),
                            "unexpected argument(s)",
                        ),
                    );
                    return None;
                }
                for (i, it) in items.iter().enumerate() {
                    slots[i] = Some(it);
                }
            }
            Kind::Struct(_, fields) => {
                for (k, val) in fields {
                    match sig.args.iter().position(|a| a.name == k.name) {
                        Some(i) if slots[i].is_none() => slots[i] = Some(val),
                        Some(_) => {
                            self.error(k.span, format!("argument `{}` is given twice", k.name), "given again")
                        }
                        None => {
                            let mut d =
                                Diagnostic::error(format!("`{}` has no argument `{}`", sig.name, k.name))
                                    .at(k.span, "unknown argument")
                                    .note(format!("`{}` takes: {}", sig.name, arg_list()));
                            if let Some(s) = closest(&k.name, sig.args.iter().map(|a| a.name)) {
                                d = d.note(format!("did you mean `{s}`?"));
                            }
                            self.diags.push(d);
                            return None;
                        }
                    }
                }
            }
            _ => unreachable!("op_call is only called on named values"),
        }
        let mut args = Vec::with_capacity(slots.len());
        let mut ok = true;
        for (sig_arg, slot) in sig.args.iter().zip(&slots) {
            let Some(val) = slot else {
                if sig_arg.default == ops::ArgDefault::Required {
                    self.diags.push(
                        Diagnostic::error(format!(
                            "wrong number of arguments: `{}` is missing `{}`",
                            sig.name, sig_arg.name
                        ))
                        .at(v.span, format!("needs `{}`", sig_arg.name))
                        .note(format!("`{}` takes: {}", sig.name, arg_list())),
                    );
                    ok = false;
                }
                args.push(None);
                continue;
            };
            let arg = match sig_arg.kind {
                ArgKind::Tensor => self.expr(val).map(Arg::Tensor),
                ArgKind::Tensors => match &val.kind {
                    Kind::List(items) => {
                        let xs: Option<Vec<Expr>> = items.iter().map(|i| self.expr(i)).collect();
                        xs.map(|xs| Arg::Tensors(xs, val.span))
                    }
                    _ => {
                        self.expected(val, "a list of tensors");
                        None
                    }
                },
                ArgKind::Int | ArgKind::Float | ArgKind::Bool => self.cexpr(val).map(Arg::Config),
                ArgKind::Ints => match &val.kind {
                    Kind::List(items) => {
                        let xs: Option<Vec<_>> = items.iter().map(|i| self.cexpr(i)).collect();
                        xs.map(|xs| Arg::List(xs, val.span))
                    }
                    _ => self.cexpr(val).map(Arg::Config),
                },
                ArgKind::Shape => self.shape(val).map(Arg::Shape),
                ArgKind::DType => self.dtype(val).map(|(d, s)| Arg::DType(d, s)),
                ArgKind::Pairs => self.pairs(val),
                ArgKind::Values => self.values(val),
                ArgKind::Name(choices) => self.choice(val, sig.name, sig_arg.name, choices),
            };
            ok &= arg.is_some();
            args.push(arg);
        }
        ok.then_some(OpCall { sig, name_span: head.span, args, span: v.span })
    }

    /// One of `choices`, written bare (`tanh`) or quoted (`"tanh"`).
    fn choice(&mut self, v: &Value, op: &str, arg: &str, choices: &[&str]) -> Option<Arg> {
        let s = match &v.kind {
            Kind::Unit(i) => i.name.clone(),
            Kind::Str(s) => s.clone(),
            _ => {
                self.expected(v, &format!("one of {}", choices.join(", ")));
                return None;
            }
        };
        if choices.contains(&s.as_str()) {
            return Some(Arg::Name(s, v.span));
        }
        let mut d = Diagnostic::error(format!("`{s}` is not a valid `{arg}` of `{op}`"))
            .at(v.span, format!("not a valid `{arg}`"))
            .note(format!("`{arg}` is one of: {}", choices.join(", ")));
        if let Some(c) = closest(&s, choices.iter().copied()) {
            d = d.note(format!("did you mean `{c}`?"));
        }
        self.diags.push(d);
        None
    }

    fn pairs(&mut self, v: &Value) -> Option<Arg> {
        let Kind::List(items) = &v.kind else {
            self.expected(v, "a list of [before, after] pairs");
            return None;
        };
        let mut out = Vec::new();
        for it in items {
            match &it.kind {
                Kind::List(p) | Kind::Tuple(None, p) if p.len() == 2 => {
                    out.push((self.cexpr(&p[0])?, self.cexpr(&p[1])?));
                }
                _ => {
                    self.expected(it, "a pair [before, after]");
                    return None;
                }
            }
        }
        Some(Arg::Pairs(out, v.span))
    }

    fn values(&mut self, v: &Value) -> Option<Arg> {
        fn walk(
            v: &Value,
            depth: usize,
            shape: &mut Vec<usize>,
            out: &mut Vec<f64>,
        ) -> Result<(), (Span, String)> {
            match &v.kind {
                Kind::Int(i) => leaf(v, depth, shape, *i as f64, out),
                Kind::Float(f) => leaf(v, depth, shape, *f, out),
                Kind::Bool(b) => leaf(v, depth, shape, *b as u8 as f64, out),
                Kind::List(items) => {
                    if depth == shape.len() {
                        if !out.is_empty() {
                            return Err((v.span, "a list where the other rows have numbers".into()));
                        }
                        shape.push(items.len());
                    } else if shape[depth] != items.len() {
                        return Err((
                            v.span,
                            format!("a row of {} where the others have {}", items.len(), shape[depth]),
                        ));
                    }
                    items.iter().try_for_each(|i| walk(i, depth + 1, shape, out))
                }
                _ => Err((v.span, format!("expected a number, found {}", v.describe()))),
            }
        }
        fn leaf(
            v: &Value,
            depth: usize,
            shape: &[usize],
            x: f64,
            out: &mut Vec<f64>,
        ) -> Result<(), (Span, String)> {
            if depth != shape.len() {
                return Err((v.span, "a number where the other rows have lists".into()));
            }
            out.push(x);
            Ok(())
        }
        let mut shape = Vec::new();
        let mut out = Vec::new();
        match walk(v, 0, &mut shape, &mut out) {
            Ok(()) => Some(Arg::Values(shape, out, v.span)),
            Err((span, msg)) => {
                self.error(span, format!("ragged literal tensor: {msg}"), msg);
                None
            }
        }
    }

    fn param(&mut self, v: &Value) -> Option<ParamDecl> {
        let f = self.fields(v, "Param", &["name", "shape", "dtype", "init"], &["shape"])?;
        let name = match Self::field(&f, "name") {
            Some(n) => Some(self.name(n, "the parameter name string")?),
            None => None,
        };
        let shape = Self::field(&f, "shape").and_then(|s| self.shape(s));
        let dtype = match Self::field(&f, "dtype") {
            Some(d) => Some(self.dtype(d)?),
            None => None,
        };
        let init = match Self::field(&f, "init") {
            Some(i) => self.init(i)?,
            None => InitExpr { kind: InitKind::Zeros, args: vec![], span: v.span },
        };
        Some(ParamDecl { name, shape: shape?, dtype, init, span: v.span })
    }

    fn init(&mut self, v: &Value) -> Option<InitExpr> {
        const KINDS: &[(&str, &[&str])] = &[
            ("Zeros", &[]),
            ("Ones", &[]),
            ("Constant", &["value"]),
            ("Normal", &["std", "mean"]),
            ("Uniform", &["low", "high"]),
            ("XavierUniform", &["gain"]),
            ("XavierNormal", &["gain"]),
            ("KaimingUniform", &["gain"]),
            ("KaimingNormal", &["gain"]),
        ];
        let Some(head) = v.head() else {
            self.expected(v, "an initializer such as `Normal(0.02)` or `Zeros`");
            return None;
        };
        let Some(&(name, params)) = KINDS.iter().find(|(k, _)| *k == head.name) else {
            let mut d = Diagnostic::error(format!("unknown initializer `{}`", head.name))
                .at(head.span, "not an initializer");
            if let Some(s) = closest(&head.name, KINDS.iter().map(|k| k.0)) {
                d = d.note(format!("did you mean `{s}`?"));
            }
            self.diags.push(
                d.note(format!("initializers: {}", KINDS.iter().map(|k| k.0).collect::<Vec<_>>().join(", "))),
            );
            return None;
        };
        let mut args = Vec::new();
        match &v.kind {
            Kind::Unit(_) => {}
            Kind::Tuple(_, items) => {
                if items.len() > params.len() {
                    self.error(
                        v.span,
                        format!(
                            "`{name}` takes at most {} argument(s) ({})",
                            params.len(),
                            params.join(", ")
                        ),
                        "too many arguments",
                    );
                    return None;
                }
                for (p, it) in params.iter().zip(items) {
                    args.push((p.to_string(), self.cexpr(it)?));
                }
            }
            Kind::Struct(_, fields) => {
                for (k, it) in fields {
                    if !params.contains(&k.name.as_str()) {
                        self.error(
                            k.span,
                            format!(
                                "`{name}` has no argument `{}` (it takes: {})",
                                k.name,
                                params.join(", ")
                            ),
                            "unknown argument",
                        );
                        return None;
                    }
                    args.push((k.name.clone(), self.cexpr(it)?));
                }
            }
            _ => unreachable!("head() is only Some for named values"),
        }
        let kind = match name {
            "Zeros" => InitKind::Zeros,
            "Ones" => InitKind::Ones,
            "Constant" => InitKind::Constant,
            "Normal" => InitKind::Normal,
            "Uniform" => InitKind::Uniform,
            "XavierUniform" => InitKind::XavierUniform,
            "XavierNormal" => InitKind::XavierNormal,
            "KaimingUniform" => InitKind::KaimingUniform,
            _ => InitKind::KaimingNormal,
        };
        Some(InitExpr { kind, args, span: v.span })
    }

    fn call(&mut self, v: &Value) -> Option<CallExpr> {
        let f = self.fields(v, "Call", &["fn", "args", "scope", "with"], &["fn"])?;
        let func = Self::field(&f, "fn").and_then(|n| self.name(n, "the module name string"));
        let args = match Self::field(&f, "args") {
            Some(a) => match &a.kind {
                Kind::List(items) => items.iter().map(|i| self.expr(i)).collect::<Option<Vec<_>>>()?,
                _ => {
                    self.expected(a, "a list of tensor arguments");
                    return None;
                }
            },
            None => vec![],
        };
        let scope = match Self::field(&f, "scope") {
            Some(s) => Some(self.name(s, "a scope string such as \"layer.{i}\"")?),
            None => None,
        };
        let mut with = Vec::new();
        if let Some(w) = Self::field(&f, "with") {
            let Kind::Map(entries) = &w.kind else {
                self.expected(w, "a map of config arguments");
                return None;
            };
            for (k, val) in entries {
                with.push((self.name(k, "a config argument name")?, self.cexpr(val)?));
            }
        }
        Some(CallExpr { func: func?, args, scope, with, span: v.span })
    }

    fn scalar(&mut self, v: &Value) -> Option<Expr> {
        match &v.kind {
            Kind::Tuple(_, items) if items.len() == 1 || items.len() == 2 => {
                let e = self.cexpr(&items[0])?;
                let dtype = match items.get(1) {
                    Some(d) => Some(self.dtype(d)?),
                    None => None,
                };
                Some(Expr::Scalar(e, dtype, v.span))
            }
            _ => {
                self.expected(v, "`Scalar(\"expression\")` or `Scalar(\"expression\", dtype)`");
                None
            }
        }
    }

    fn if_expr(&mut self, v: &Value) -> Option<Expr> {
        let f = self.fields(v, "If", &["cond", "then", "else"], &["cond", "then", "else"])?;
        let cond = Self::field(&f, "cond").and_then(|c| self.cexpr(c));
        let then = Self::field(&f, "then").and_then(|t| self.expr(t));
        let otherwise = Self::field(&f, "else").and_then(|e| self.expr(e));
        Some(Expr::If { cond: cond?, then: Box::new(then?), otherwise: Box::new(otherwise?), span: v.span })
    }

    // ---------------------------------------------------------------- training

    fn training(&mut self, v: &Value) -> Option<Training> {
        let f = self.fields(
            v,
            "Training",
            &["loss", "optimizer", "schedule", "clip_grad_norm", "accumulate"],
            &["loss", "optimizer"],
        )?;
        let loss = Self::field(&f, "loss").and_then(|l| self.loss(l));
        let optimizer = Self::field(&f, "optimizer").and_then(|o| {
            self.named_hyper(
                o,
                &[
                    ("Sgd", &["lr", "momentum", "dampening", "nesterov", "weight_decay"]),
                    ("Adam", &["lr", "beta1", "beta2", "eps", "weight_decay"]),
                    ("AdamW", &["lr", "beta1", "beta2", "eps", "weight_decay"]),
                    ("RmsProp", &["lr", "alpha", "eps", "momentum", "weight_decay", "centered"]),
                ],
            )
            .map(|(kind, hyper, span)| Optimizer { kind, hyper, span })
        });
        let schedule = match Self::field(&f, "schedule") {
            Some(s) => Some(
                self.named_hyper(
                    s,
                    &[
                        ("Constant", &[]),
                        ("Linear", &["warmup", "total"]),
                        ("Cosine", &["warmup", "total", "min_lr"]),
                        ("Step", &["step_size", "gamma"]),
                    ],
                )
                .map(|(kind, args, span)| Schedule { kind, args, span })?,
            ),
            None => None,
        };
        let clip_grad_norm = match Self::field(&f, "clip_grad_norm") {
            Some(x) => Some(self.cexpr(x)?),
            None => None,
        };
        let accumulate = match Self::field(&f, "accumulate") {
            Some(x) => Some(self.cexpr(x)?),
            None => None,
        };
        Some(Training {
            loss: loss?,
            optimizer: optimizer?,
            schedule,
            clip_grad_norm,
            accumulate,
            span: v.span,
        })
    }

    fn loss(&mut self, v: &Value) -> Option<Loss> {
        match v.head().map(|h| h.name.as_str()) {
            Some("CrossEntropy") => {
                let f = self.fields(
                    v,
                    "CrossEntropy",
                    &["logits", "labels", "label_smoothing", "ignore_index"],
                    &["logits", "labels"],
                )?;
                let logits = Self::field(&f, "logits").and_then(|x| self.name(x, "a tensor name"));
                let labels = Self::field(&f, "labels").and_then(|x| self.name(x, "a tensor name"));
                let label_smoothing = match Self::field(&f, "label_smoothing") {
                    Some(x) => Some(self.cexpr(x)?),
                    None => None,
                };
                let ignore_index = match Self::field(&f, "ignore_index") {
                    Some(x) => Some(self.cexpr(x)?),
                    None => None,
                };
                Some(Loss::CrossEntropy {
                    logits: logits?,
                    labels: labels?,
                    label_smoothing,
                    ignore_index,
                    span: v.span,
                })
            }
            Some("Mse") => {
                let f = self.fields(v, "Mse", &["pred", "target"], &["pred", "target"])?;
                let pred = Self::field(&f, "pred").and_then(|x| self.name(x, "a tensor name"));
                let target = Self::field(&f, "target").and_then(|x| self.name(x, "a tensor name"));
                Some(Loss::Mse { pred: pred?, target: target?, span: v.span })
            }
            _ => {
                self.expected(v, "a loss: `CrossEntropy(logits: …, labels: …)` or `Mse(pred: …, target: …)`");
                None
            }
        }
    }

    fn named_hyper(&mut self, v: &Value, kinds: &[(&str, &[&str])]) -> Option<NamedArgs> {
        let names: Vec<&str> = kinds.iter().map(|k| k.0).collect();
        let Some(head) = v.head() else {
            self.expected(v, &format!("one of {}", names.join(", ")));
            return None;
        };
        let Some(&(kind, allowed)) = kinds.iter().find(|k| k.0 == head.name) else {
            let mut d =
                Diagnostic::error(format!("unknown `{}` (expected one of {})", head.name, names.join(", ")))
                    .at(head.span, "not known here");
            if let Some(s) = closest(&head.name, names.iter().copied()) {
                d = d.note(format!("did you mean `{s}`?"));
            }
            self.diags.push(d);
            return None;
        };
        let f = self.fields(v, kind, allowed, &[])?;
        let mut out = Vec::new();
        for (k, val) in f {
            out.push((k.clone(), self.cexpr(val)?));
        }
        Some((kind.to_string(), out, v.span))
    }
}

/// The span of a string's contents, without its quotes.
fn inner_span(v: &Value) -> Span {
    if v.span.end >= v.span.start + 2 {
        Span { file: v.span.file, start: v.span.start + 1, end: v.span.end - 1 }
    } else {
        v.span
    }
}

/// Why `name` cannot be an input or output name, if it cannot: the rules of
/// `kiln_runtime::name_problem` (kept equal; `tests/compiled.rs` checks both on the same list).
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("is empty");
    }
    if name == "." || name == ".." {
        return Some("is a relative directory");
    }
    if name.contains(['/', '\\']) {
        return Some("contains a path separator");
    }
    if name.contains('\0') {
        return Some("contains a NUL character");
    }
    if name.chars().any(char::is_control) {
        return Some("contains a control character");
    }
    if name.chars().any(|c| {
        matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    }) {
        return Some("contains a bidirectional-text control character");
    }
    if name.len() > 200 {
        return Some("is longer than 200 bytes");
    }
    None
}
