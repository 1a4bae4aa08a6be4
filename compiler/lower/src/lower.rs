//! The walker: statements and expressions of a checked spec → nodes of a [`Graph`].
//!
//! Modules are inlined at each call, repeats are unrolled, config expressions are evaluated,
//! and every node records the spec position it came from. Errors are collected and lowering
//! goes on past them (a value that failed is "poisoned" and silently skipped by its users),
//! so one run reports every independent mistake.

use crate::config::{self, CValue, ConfigEnv, ShapeLookup};
use crate::symbols::{self, Range};
use kiln_ir::{DType, Dim, Graph, InferError, NodeId, Op, Origin, SizeExpr};
use kiln_spec::*;
use std::collections::HashMap;
use std::sync::Arc;

/// Bounds that keep a mistaken config from unrolling without end.
const MAX_REPEAT: usize = 100_000;
pub(crate) const MAX_NODES: usize = 2_000_000;
/// The expansion budget: statements run, repeat iterations and module calls entered, counted
/// over the whole model after every `Repeat` is unrolled and every `Call` inlined. Nodes
/// alone do not bound the work: nested `Repeat`s whose bodies add no op, or modules that call
/// another module twice, 40 deep (2⁴⁰ calls), would run for hours. 4,000,000 is twice
/// `MAX_NODES` (a statement usually adds at least one node) and takes a few seconds.
pub const MAX_EXPANSION: u64 = 4_000_000;
/// How deeply expressions and module calls may nest while lowering (an op inside an op's
/// argument, a module calling a module): 100 levels. Each level is several frames of
/// recursion; a debug build overflows a 2 MiB thread stack (a test thread's) at about 190
/// nested calls. The reader bounds one file's nesting at 100 too; calls add up across modules.
pub const MAX_NESTING: usize = 100;

/// A lowered operand: a graph node, or a literal number whose dtype follows its partner
/// (numpy's weak scalars: `x * 0.5` keeps x's dtype).
#[derive(Clone, Copy, Debug)]
pub enum Operand {
    Node(NodeId),
    Number(f64),
    Bool(bool),
}

/// What an expression lowers to: one operand or several (`Split`, a module with several
/// returns).
#[derive(Clone, Debug)]
pub enum LValue {
    One(Operand),
    Many(Vec<Operand>),
}

/// A name bound in a frame, with where it was bound.
#[derive(Clone, Debug)]
struct Binding {
    value: Option<Operand>,
    span: Span,
}

/// One function activation: the model body or an inlined module call.
struct Frame {
    tensors: HashMap<String, Binding>,
    config: HashMap<String, CValue>,
    /// The ranges of this frame's config names that depend on dynamic sizes.
    dynamic: HashMap<String, Range>,
    /// Their sizes over the graph's symbols (see `Lowerer::sizes`).
    sizes: HashMap<String, Result<SizeExpr, String>>,
    /// Which library the code of this frame belongs to ("" for the model), for resolving calls.
    namespace: String,
}

/// Every module the model can call, by qualified name (`block`, `std.linear`).
pub struct ModuleTable<'a> {
    pub modules: HashMap<String, (&'a ModuleDef, String)>,
}

pub struct Lowerer<'a> {
    pub sources: &'a Sources,
    pub graph: Graph,
    pub diags: Vec<Diagnostic>,
    pub global: HashMap<String, CValue>,
    /// The ranges of the global config entries that are dynamic (`global` holds their
    /// values at the hints).
    pub dynamic: HashMap<String, Range>,
    /// The sizes of the global dynamic entries over the graph's symbols.
    pub sizes: HashMap<String, Result<SizeExpr, String>>,
    /// Each graph symbol's name and declaration, by index.
    pub symbol_spans: Vec<(String, Span)>,
    modules: &'a ModuleTable<'a>,
    frames: Vec<Frame>,
    scope: Vec<String>,
    /// Checkpoint name → the parameter's node and where it was first declared.
    params: HashMap<String, (NodeId, Span)>,
    /// The spec span that defined each node (for "where did this shape come from").
    def_span: HashMap<NodeId, Span>,
    call_stack: Vec<(String, Span)>,
    /// The `Repeat`s being unrolled (their spans), for the expansion-budget diagnostic.
    repeat_stack: Vec<Span>,
    /// Steps of expansion so far (see [`MAX_EXPANSION`]); past it lowering stops.
    expansion: u64,
    /// Current nesting of expressions and calls (see [`MAX_NESTING`]).
    nesting: usize,
    /// Set once a limit has stopped the lowering, so nothing more is lowered or reported.
    stopped: bool,
    random_sites: u64,
    /// Input name → node, and whether anything used it.
    pub input_uses: HashMap<String, (NodeId, Span, bool)>,
    file_names: Vec<Arc<str>>,
}

impl<'a> ShapeLookup for Lowerer<'a> {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let hints: Vec<i64> = self.graph.symbols.iter().map(|s| s.hint).collect();
        Some(self.dims_of(name)?.iter().map(|d| d.eval(&hints).unwrap_or(0)).collect())
    }

    fn dynamic_dim(&self, name: &str, axis: i64) -> Option<(Range, SizeExpr)> {
        let dims = self.dims_of(name)?;
        let rank = i64::try_from(dims.len()).ok()?;
        let a = usize::try_from(if axis < 0 { axis + rank } else { axis }).ok()?;
        let Dim::Sym(e) = dims.get(a)? else { return None };
        let r = e.range(&self.graph.symbols);
        let mut symbols: Vec<(String, Span)> =
            e.symbols().iter().filter_map(|s| self.symbol_spans.get(s.index as usize).cloned()).collect();
        symbols.sort_by(|a, b| a.0.cmp(&b.0));
        Some((Range { min: r.min, max: r.max, multiple: r.multiple, symbols }, e.clone()))
    }
}

/// The result of a config evaluation.
type CResult = Option<CValue>;

impl<'a> Lowerer<'a> {
    pub fn new(
        sources: &'a Sources,
        name: &str,
        global: HashMap<String, CValue>,
        modules: &'a ModuleTable<'a>,
    ) -> Self {
        Lowerer {
            sources,
            graph: Graph::new(name),
            diags: Vec::new(),
            global,
            modules,
            frames: vec![Frame {
                tensors: HashMap::new(),
                config: HashMap::new(),
                dynamic: HashMap::new(),
                sizes: HashMap::new(),
                namespace: String::new(),
            }],
            dynamic: HashMap::new(),
            sizes: HashMap::new(),
            symbol_spans: Vec::new(),
            scope: Vec::new(),
            params: HashMap::new(),
            def_span: HashMap::new(),
            call_stack: Vec::new(),
            repeat_stack: Vec::new(),
            expansion: 0,
            nesting: 0,
            stopped: false,
            random_sites: 0,
            input_uses: HashMap::new(),
            file_names: sources.files().iter().map(|f| Arc::from(f.name.as_str())).collect(),
        }
    }

    fn error(&mut self, span: Span, msg: impl Into<String>, label: impl Into<String>) {
        self.diags.push(Diagnostic::error(msg).at(span, label));
    }

    fn origin(&self, span: Span) -> Origin {
        let loc = self.sources.location(span);
        // A library line also records the call that entered the library from another file
        // (the model's line), so `--explain` can show both.
        let call_site = self.call_stack.iter().rev().find(|(_, s)| s.file != span.file).map(|(_, s)| {
            let at = self.sources.location(*s);
            Box::new(Origin {
                file: self.file_names[s.file].clone(),
                line: at.line,
                col: at.col,
                call_site: None,
            })
        });
        Origin { file: self.file_names[span.file].clone(), line: loc.line, col: loc.col, call_site }
    }

    fn frame(&self) -> &Frame {
        self.frames.last().expect("the model frame is never popped")
    }

    fn frame_mut(&mut self) -> &mut Frame {
        self.frames.last_mut().expect("the model frame is never popped")
    }

    // ------------------------------------------------------------ config

    /// The range of a config expression over dynamic sizes (`None`: it is static), and the
    /// error when it is not a size expression.
    fn range_of(&self, e: &CExpr) -> Result<Option<Range>, String> {
        if self.graph.symbols.is_empty() {
            return Ok(None);
        }
        let frame = self.frame();
        // A frame's own name hides a global one, dynamic or not.
        let lookup = |n: &str| match frame.config.contains_key(n) {
            true => frame.dynamic.get(n).cloned(),
            false => self.dynamic.get(n).cloned(),
        };
        let env = ConfigEnv { frames: vec![&frame.config, &self.global] };
        symbols::range(e, &env, self, &lookup)
    }

    /// The size `e` is over the graph's symbols (`None`: it is static), the twin of
    /// [`Self::range_of`].
    fn size_of(&self, e: &CExpr) -> Result<Option<SizeExpr>, String> {
        if self.graph.symbols.is_empty() {
            return Ok(None);
        }
        let frame = self.frame();
        let lookup = |n: &str| match frame.config.contains_key(n) {
            true => frame.sizes.get(n).cloned(),
            false => self.sizes.get(n).cloned(),
        };
        let env = ConfigEnv { frames: vec![&frame.config, &self.global] };
        symbols::size(e, &env, self, &lookup)
    }

    /// The extents of the tensor bound to `name` in the current frame.
    fn dims_of(&self, name: &str) -> Option<Vec<Dim>> {
        match self.frames.last()?.tensors.get(name)?.value? {
            Operand::Node(n) => Some(self.graph.ty(n).shape.clone()),
            Operand::Number(_) | Operand::Bool(_) => Some(vec![]),
        }
    }

    /// The range of `e` (reported like a bad config expression when it has none).
    pub fn range(&mut self, e: &SpannedCExpr) -> Option<Option<Range>> {
        match self.range_of(&e.expr) {
            Ok(r) => Some(r),
            Err(msg) => {
                self.bad_config(e, &msg);
                None
            }
        }
    }

    fn bad_config(&mut self, e: &SpannedCExpr, msg: &str) {
        self.diags.push(
            Diagnostic::error(format!(
                "bad config expression `{}`: {msg}",
                kiln_spec::cexpr::abbreviate(self.sources.snippet(e.span).trim_matches('"'), 80)
            ))
            .at(e.span, msg),
        );
    }

    /// Refuses an expression that reads a dynamic size where the value must be static (a
    /// weight's shape, a repeat count, an `If` condition), naming it and its declaration.
    pub fn require_static(&mut self, e: &SpannedCExpr, what: &str) -> Option<()> {
        if self.graph.symbols.is_empty() {
            return Some(());
        }
        let mut read = Vec::new();
        e.expr.names(&mut read);
        let frame = self.frame();
        let mut ranges: Vec<Range> = read
            .iter()
            .filter_map(|n| match frame.config.contains_key(n) {
                true => frame.dynamic.get(n).cloned(),
                false => self.dynamic.get(n).cloned(),
            })
            .collect();
        // `dim(x, a)` of a symbolic axis is dynamic too.
        let mut dims = Vec::new();
        dim_calls(&e.expr, &mut dims);
        let env = ConfigEnv { frames: vec![&frame.config, &self.global] };
        for args in dims {
            let one = |a: &[CExpr]| match a {
                [CExpr::Name(t), axis] => match config::eval(axis, &env, self) {
                    Ok(CValue::Int(axis)) => self.dynamic_dim(t, axis).map(|(r, _)| r),
                    _ => None,
                },
                _ => None,
            };
            ranges.extend(one(args));
        }
        let mut found: Vec<(String, Span)> = Vec::new();
        for r in &ranges {
            for s in &r.symbols {
                if !found.iter().any(|(f, _)| *f == s.0) {
                    found.push(s.clone());
                }
            }
        }
        if found.is_empty() {
            return Some(());
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let noun = if found.len() == 1 { "size" } else { "sizes" };
        let mut d = Diagnostic::error(format!(
            "{what} must be static, but `{}` depends on the dynamic {noun} {}",
            kiln_spec::cexpr::abbreviate(self.sources.snippet(e.span).trim_matches('"'), 80),
            symbols::names(&found)
        ))
        .at(e.span, "dynamic here");
        for (n, span) in &found {
            d = d.with_related(*span, format!("`{n}` is declared dynamic here"));
        }
        if let Some((name, call_span)) = self.call_stack.last().cloned() {
            d = d.with_related(call_span, format!("in this call of `{name}`"));
        }
        self.diags.push(d);
        None
    }

    /// A slice bound that depends on dynamic sizes must stay inside a static axis for every
    /// value they take: a learned position table shorter than the longest sequence is an
    /// error at the slice, not a silent clamp at some lengths. (A symbolic axis is left to
    /// shape inference, which proves the bound with the symbols' ranges.)
    pub fn check_dynamic_bound(
        &mut self,
        e: &SpannedCExpr,
        extent: i64,
        x: NodeId,
        span: Span,
    ) -> Option<()> {
        let Some(r) = self.range(e)? else { return Some(()) };
        if r.max <= extent {
            return Some(());
        }
        let mut d = Diagnostic::error(format!(
            "the slice bound `{}` reaches {} for {} in its bounds, past the axis's {extent} entries",
            kiln_spec::cexpr::abbreviate(self.sources.snippet(e.span).trim_matches('"'), 80),
            r.max,
            r.names()
        ))
        .at(span, format!("slices {extent} entries"));
        if let Some(def) = self.def_span.get(&x).copied() {
            d = d.with_related(def, format!("{extent} entries here"));
        }
        for (n, s) in &r.symbols {
            d = d.with_related(*s, format!("`{n}` is declared dynamic here"));
        }
        if let Some((name, call_span)) = self.call_stack.last().cloned() {
            d = d.with_related(call_span, format!("in this call of `{name}`"));
        }
        self.diags.push(d);
        None
    }

    /// Evaluates a config expression in the current frame, reporting errors at its span. The
    /// graph holds the value as a constant, so it must be static: dynamic sizes go through
    /// [`Self::size_value`] and [`Self::dynamic_cvalue`].
    pub fn cvalue(&mut self, e: &SpannedCExpr) -> CResult {
        if self.range(e)?.is_some() {
            self.require_static(e, "a constant of the graph")?;
        }
        self.dynamic_cvalue(e)
    }

    /// [`Self::cvalue`] for a value that may be dynamic (a module's config argument): a
    /// dynamic one is its value at the symbols' hints, and its range and size travel beside it.
    fn dynamic_cvalue(&mut self, e: &SpannedCExpr) -> CResult {
        // An expression over dynamic sizes must be a size expression.
        self.range(e)?;
        let result = {
            let env = ConfigEnv { frames: vec![&self.frame().config, &self.global] };
            config::eval(&e.expr, &env, &*self)
        };
        match result {
            Ok(v) => Some(v),
            Err(msg) => {
                self.bad_config(e, &msg);
                None
            }
        }
    }

    pub fn cint(&mut self, e: &SpannedCExpr, what: &str) -> Option<i64> {
        let v = self.cvalue(e)?;
        match config::expect_int(v, what, e) {
            Ok(i) => Some(i),
            Err(msg) => {
                self.error(e.span, msg.clone(), msg);
                None
            }
        }
    }

    pub fn cfloat(&mut self, e: &SpannedCExpr, what: &str) -> Option<f64> {
        match self.cvalue(e)? {
            CValue::Bool(_) => {
                self.error(e.span, format!("{what} must be a number, not a bool"), "expected a number");
                None
            }
            v => v.as_f64(),
        }
    }

    pub fn cbool(&mut self, e: &SpannedCExpr, what: &str) -> Option<bool> {
        match self.cvalue(e)? {
            CValue::Bool(b) => Some(b),
            v => {
                self.error(
                    e.span,
                    format!("{what} must be a bool, but it is {v}"),
                    "expected `true` or `false`",
                );
                None
            }
        }
    }

    /// An extent or count: a non-negative integer.
    pub fn cextent(&mut self, e: &SpannedCExpr, what: &str) -> Option<usize> {
        let i = self.cint(e, what)?;
        if i < 0 {
            self.error(e.span, format!("{what} must not be negative, but it is {i}"), "negative");
            return None;
        }
        Some(i as usize)
    }

    /// A config expression as a graph extent or slice bound: a static integer, or a size
    /// over the graph's symbols when it reads one (its range checked not to go negative).
    /// `Err` carries a static value (which may be negative: the caller's rules apply to it).
    pub fn size_value(&mut self, e: &SpannedCExpr, what: &str) -> Option<Result<Dim, i64>> {
        let Some(r) = self.range(e)? else { return self.cint(e, what).map(Err) };
        let size = match self.size_of(&e.expr) {
            Ok(Some(s)) => s,
            Ok(None) => return self.cint(e, what).map(Err),
            Err(msg) => {
                self.bad_config(e, &msg);
                return None;
            }
        };
        if r.min < 0 {
            let msg = format!(
                "{what} must not be negative, but `{}` reaches {} for {} in its bounds",
                kiln_spec::cexpr::abbreviate(self.sources.snippet(e.span).trim_matches('"'), 80),
                r.min,
                r.names()
            );
            self.error(e.span, msg, "negative for some values");
            return None;
        }
        match Dim::from_expr(size) {
            Ok(d) => Some(Ok(d)),
            Err(err) => {
                self.bad_config(e, &err.to_string());
                None
            }
        }
    }

    /// Evaluates a shape, each extent a constant or a size over the symbols; with
    /// `allow_infer` one extent may be -1 (for reshape), given as `None`.
    pub fn shape_with(&mut self, s: &ShapeExpr, allow_infer: bool) -> Option<Vec<Option<Dim>>> {
        match s {
            ShapeExpr::Of(name, span) => match self.dims_of(&name.name) {
                Some(sh) => Some(sh.into_iter().map(Some).collect()),
                None => {
                    self.unknown_name(name, *span);
                    None
                }
            },
            ShapeExpr::Dims(dims, _) => {
                let mut out = Vec::with_capacity(dims.len());
                for d in dims {
                    match self.size_value(d, "an extent")? {
                        Ok(dim) => out.push(Some(dim)),
                        Err(-1) if allow_infer => out.push(None),
                        Err(v) if v < 0 => {
                            let msg = format!("extent must not be negative, but `{}` is {v}", d.expr);
                            self.error(d.span, msg, "negative extent");
                            return None;
                        }
                        Err(v) => out.push(Some(Dim::Const(v as usize))),
                    }
                }
                Some(out)
            }
        }
    }

    /// Evaluates a shape with no extent left to infer.
    pub fn shape(&mut self, s: &ShapeExpr) -> Option<Vec<Dim>> {
        self.shape_with(s, false)?.into_iter().collect()
    }

    /// A shape that must be static (a parameter's): `what` names it in the error.
    pub fn static_shape(&mut self, s: &ShapeExpr, what: &str) -> Option<Vec<usize>> {
        let shape = self.shape(s)?;
        if let Some(fixed) = kiln_ir::static_dims(&shape) {
            return Some(fixed);
        }
        let msg = format!("{what} must be static, but it is {}", kiln_ir::fmt_shape(&shape));
        self.error(s.span(), msg, "dynamic here");
        None
    }

    pub fn dtype(&mut self, name: &str, span: Span) -> Option<DType> {
        let d = DType::parse(name);
        if d.is_none() {
            self.error(span, format!("unknown dtype `{name}`"), "not a dtype");
        }
        d
    }

    /// Replaces `{expr}` holes in a scope or name template with config values.
    fn template(&mut self, t: &Ident) -> Option<String> {
        let mut out = String::new();
        let mut rest = t.name.as_str();
        let mut offset = 0usize;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                self.error(t.span, format!("unclosed `{{` in {:?}", t.name), "expected `}`");
                return None;
            };
            let inner = &rest[open + 1..open + close];
            let start = t.span.start as usize + offset + open + 1;
            let span = Span::new(t.span.file, start, start + inner.len());
            let expr = match parse_cexpr(inner) {
                Ok(e) => e,
                Err(e) => {
                    self.error(
                        span,
                        format!(
                            "bad config expression {:?}: {}",
                            kiln_spec::cexpr::abbreviate(inner, 80),
                            e.message
                        ),
                        e.message,
                    );
                    return None;
                }
            };
            match self.cvalue(&SpannedCExpr { expr, span })? {
                CValue::Int(i) => out.push_str(&i.to_string()),
                v => out.push_str(&v.to_string()),
            }
            offset += open + close + 1;
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        Some(out)
    }

    // ------------------------------------------------------------ names

    fn unknown_name(&mut self, name: &Ident, span: Span) {
        let frame = self.frame();
        let candidates: Vec<&str> = frame.tensors.keys().map(|k| k.as_str()).collect();
        let mut d = Diagnostic::error(format!("unknown name `{}`", name.name))
            .at(if name.span.end > name.span.start { name.span } else { span }, "not defined here");
        if let Some(s) = closest(&name.name, candidates.iter().copied()) {
            d = d.note(format!("did you mean `{s}`?"));
        }
        if self.frames.len() > 1 {
            d = d.note("inside a module only its arguments and its own `Let`s are visible");
        }
        self.diags.push(d);
    }

    fn bind(&mut self, name: &Ident, value: Option<Operand>) {
        if let Some(Operand::Node(n)) = value {
            let node = self.graph.node_mut(n);
            if !matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
                node.name = Some(name.name.clone());
            }
        }
        self.frame_mut().tensors.insert(name.name.clone(), Binding { value, span: name.span });
    }

    // ------------------------------------------------------------ statements

    pub fn declare_inputs(&mut self, inputs: &[InputDecl]) {
        for inp in inputs {
            let dtype = self.dtype(&inp.dtype.0, inp.dtype.1);
            let shape = self.shape(&inp.shape);
            let (Some(dtype), Some(shape)) = (dtype, shape) else {
                self.bind(&inp.name, None);
                continue;
            };
            let op = Op::Input { name: inp.name.name.clone(), dtype, shape };
            match self.graph.add_at(op, &[], Some(self.origin(inp.name.span))) {
                Ok(n) => {
                    self.def_span.insert(n, inp.name.span);
                    self.input_uses.insert(inp.name.name.clone(), (n, inp.name.span, false));
                    self.bind(&inp.name, Some(Operand::Node(n)));
                }
                Err(e) => self.error(inp.name.span, e.to_string(), "bad input"),
            }
        }
    }

    pub fn stmts(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            if self.stopped {
                return;
            }
            self.stmt(s);
        }
    }

    /// Counts one step of expansion at `span`; past [`MAX_EXPANSION`] reports the error once,
    /// with the repeats and calls that led there, and stops the lowering.
    fn expand(&mut self, span: Span) -> bool {
        if self.stopped {
            return false;
        }
        self.expansion += 1;
        if self.expansion <= MAX_EXPANSION {
            return true;
        }
        self.stop(
            Diagnostic::error(format!(
                "the model expands to more than {MAX_EXPANSION} steps (statements, repeat iterations and module calls)"
            ))
            .at(span, "the budget ran out here"),
        );
        false
    }

    /// Reports a limit that stops the lowering, with the enclosing repeats and calls (the
    /// innermost eight of each) as related spans, and stops.
    fn stop(&mut self, mut d: Diagnostic) {
        for r in self.repeat_stack.iter().rev().take(8) {
            d = d.with_related(*r, "inside this repeat");
        }
        for (name, c) in self.call_stack.iter().rev().take(8) {
            d = d.with_related(*c, format!("inside this call of `{name}`"));
        }
        self.diags.push(
            d.note("nested `Repeat`s multiply, and so do modules that call other modules several times"),
        );
        self.stopped = true;
    }

    /// Enters one level of expression or call nesting; past [`MAX_NESTING`] reports it once
    /// and stops.
    fn nest(&mut self, span: Span) -> bool {
        if self.stopped {
            return false;
        }
        if self.nesting >= MAX_NESTING {
            let d = Diagnostic::error(format!(
                "expressions and module calls nest more than {MAX_NESTING} levels deep"
            ))
            .at(span, "too deep here");
            self.stop(d);
            return false;
        }
        self.nesting += 1;
        true
    }

    fn stmt(&mut self, s: &Stmt) {
        let span = match s {
            Stmt::Let { span, .. } | Stmt::Repeat { span, .. } => *span,
        };
        if !self.expand(span) {
            return;
        }
        match s {
            Stmt::Let { names, value, span } => {
                let single_name = (names.len() == 1).then(|| names[0].name.clone());
                let v = self.expr_named(value, single_name.as_deref());
                match (v, names.len()) {
                    (Some(LValue::One(o)), 1) => self.bind(&names[0], Some(o)),
                    (Some(LValue::Many(os)), n) if os.len() == n => {
                        for (name, o) in names.iter().zip(os) {
                            self.bind(name, Some(o));
                        }
                    }
                    (Some(v), n) => {
                        let got = match v {
                            LValue::One(_) => 1,
                            LValue::Many(os) => os.len(),
                        };
                        self.error(
                            *span,
                            format!("`Let` binds {n} name(s) but the value has {got}"),
                            format!("{got} value(s)"),
                        );
                        for name in names {
                            self.bind(name, None);
                        }
                    }
                    (None, _) => {
                        for name in names {
                            self.bind(name, None);
                        }
                    }
                }
            }
            Stmt::Repeat { n, index, body, span } => {
                if self.require_static(n, "a repeat count").is_none() {
                    return;
                }
                let Some(count) = self.cextent(n, "the repeat count") else { return };
                if count > MAX_REPEAT {
                    self.error(
                        n.span,
                        format!("a repeat count of {count} is more than {MAX_REPEAT}"),
                        "too many repetitions",
                    );
                    return;
                }
                let shadowed = self.frame().config.get(&index.name).copied();
                let shadowed_range = self.frame_mut().dynamic.remove(&index.name);
                let shadowed_size = self.frame_mut().sizes.remove(&index.name);
                self.repeat_stack.push(*span);
                for i in 0..count {
                    if !self.expand(*span) {
                        break;
                    }
                    self.frame_mut().config.insert(index.name.clone(), CValue::Int(i as i64));
                    self.stmts(body);
                }
                self.repeat_stack.pop();
                match shadowed {
                    Some(v) => self.frame_mut().config.insert(index.name.clone(), v),
                    None => self.frame_mut().config.remove(&index.name),
                };
                if let Some(r) = shadowed_range {
                    self.frame_mut().dynamic.insert(index.name.clone(), r);
                }
                if let Some(size) = shadowed_size {
                    self.frame_mut().sizes.insert(index.name.clone(), size);
                }
            }
        }
    }

    // ------------------------------------------------------------ expressions

    pub fn expr(&mut self, e: &Expr) -> Option<LValue> {
        self.expr_named(e, None)
    }

    /// `let_name` names a parameter declared directly in a `Let`.
    fn expr_named(&mut self, e: &Expr, let_name: Option<&str>) -> Option<LValue> {
        if !self.nest(e.span()) {
            return None;
        }
        let v = self.expr_inner(e, let_name);
        self.nesting -= 1;
        v
    }

    fn expr_inner(&mut self, e: &Expr, let_name: Option<&str>) -> Option<LValue> {
        match e {
            Expr::Name(n) => {
                let Some(b) = self.frame().tensors.get(&n.name).cloned() else {
                    self.unknown_name(n, n.span);
                    return None;
                };
                if let Some(Operand::Node(node)) = b.value {
                    if let Op::Input { name, .. } = &self.graph.node(node).op {
                        let name = name.clone();
                        if let Some(u) = self.input_uses.get_mut(&name) {
                            u.2 = true;
                        }
                    }
                }
                b.value.map(LValue::One)
            }
            Expr::Number(v, _) => Some(LValue::One(Operand::Number(*v))),
            Expr::Bool(b, _) => Some(LValue::One(Operand::Bool(*b))),
            Expr::Scalar(c, dtype, span) => {
                let value = self.cvalue(c)?;
                let dtype = match dtype {
                    Some((d, s)) => Some(self.dtype(d, *s)?),
                    None => None,
                };
                match (value, dtype) {
                    (CValue::Bool(b), None) => Some(LValue::One(Operand::Bool(b))),
                    (v, None) => Some(LValue::One(Operand::Number(v.as_f64().unwrap_or(0.0)))),
                    (v, Some(d)) => {
                        let x = match v {
                            CValue::Bool(b) => b as u8 as f64,
                            v => v.as_f64().unwrap_or(0.0),
                        };
                        let n = self.add(Op::Full { value: x, dtype: d, shape: vec![] }, &[], *span, &[])?;
                        Some(LValue::One(Operand::Node(n)))
                    }
                }
            }
            Expr::If { cond, then, otherwise, .. } => {
                self.require_static(cond, "an `If` condition")?;
                if self.cbool(cond, "an `If` condition")? {
                    self.expr_named(then, let_name)
                } else {
                    self.expr_named(otherwise, let_name)
                }
            }
            Expr::Param(p) => self.param(p, let_name).map(|n| LValue::One(Operand::Node(n))),
            Expr::Call(c) => self.call(c),
            Expr::Op(o) => crate::ops::lower_op(self, o),
            Expr::Error(_) => None,
        }
    }

    /// Lowers an expression that must be a single operand.
    pub fn operand(&mut self, e: &Expr) -> Option<Operand> {
        match self.expr(e)? {
            LValue::One(o) => Some(o),
            LValue::Many(v) => {
                self.error(
                    e.span(),
                    format!("expected one tensor, but this gives {}", v.len()),
                    "several values",
                );
                None
            }
        }
    }

    /// Turns a weak literal into a node of `dtype` (scalar shape).
    pub fn materialize(&mut self, o: Operand, dtype: DType, span: Span) -> Option<NodeId> {
        match o {
            Operand::Node(n) => Some(n),
            Operand::Number(v) => {
                if !dtype.is_float() && v.fract() != 0.0 {
                    self.error(
                        span,
                        format!("the literal {v} is not an integer, but the other operand is {dtype}"),
                        "dtype mismatch",
                    );
                    return None;
                }
                self.add(Op::Full { value: v, dtype, shape: vec![] }, &[], span, &[])
            }
            Operand::Bool(b) => self.add(
                Op::Full { value: b as u8 as f64, dtype: DType::Bool, shape: vec![] },
                &[],
                span,
                &[],
            ),
        }
    }

    /// The dtype a weak operand should take: the first node operand's, else f32 (or bool).
    pub fn common_dtype(&self, ops: &[Operand]) -> DType {
        ops.iter()
            .find_map(|o| match o {
                Operand::Node(n) => Some(self.graph.ty(*n).dtype),
                _ => None,
            })
            .unwrap_or(if ops.iter().all(|o| matches!(o, Operand::Bool(_))) {
                DType::Bool
            } else {
                DType::F32
            })
    }

    /// Adds a node, turning a typing error into a diagnostic that shows every operand's type
    /// and where each came from. `operand_exprs` are the spec expressions of the operands.
    pub fn add(
        &mut self,
        op: Op,
        operands: &[NodeId],
        span: Span,
        operand_exprs: &[&Expr],
    ) -> Option<NodeId> {
        if self.stopped {
            return None;
        }
        if self.graph.node_count() >= MAX_NODES {
            let d = Diagnostic::error(format!("the model unrolls to more than {MAX_NODES} ops"))
                .at(span, "while adding this op");
            self.stop(d);
            return None;
        }
        match self.graph.add_at(op, operands, Some(self.origin(span))) {
            Ok(n) => {
                self.def_span.insert(n, span);
                Some(n)
            }
            Err(e) => {
                self.type_error(e, operands, span, operand_exprs);
                None
            }
        }
    }

    fn type_error(&mut self, e: InferError, operands: &[NodeId], span: Span, exprs: &[&Expr]) {
        let label = match &e {
            InferError::Broadcast { .. } => "shape mismatch",
            InferError::DTypeMismatch { .. } | InferError::DTypeKind { .. } => "dtype mismatch",
            InferError::Unproven { .. } => "not provably equal",
            _ => "invalid here",
        };
        let mut d = Diagnostic::error(e.to_string()).at(span, label);
        for (i, &n) in operands.iter().enumerate() {
            let ty = self.graph.ty(n).clone();
            let expr = exprs.get(i);
            match expr {
                Some(Expr::Name(id)) => {
                    let def = self.frame().tensors.get(&id.name).map(|b| b.span);
                    d = d.with_related(id.span, format!("`{}` is {ty}", id.name));
                    if let Some(def) = def.filter(|s| *s != id.span) {
                        d = d.with_related(def, format!("`{}` defined here", id.name));
                    }
                }
                Some(ex) => d = d.with_related(ex.span(), format!("this is {ty}")),
                None => {
                    if let Some(s) = self.def_span.get(&n).copied() {
                        d = d.with_related(s, format!("operand {i} ({ty}) comes from here"));
                    }
                }
            }
        }
        if let Some((name, call_span)) = self.call_stack.last().cloned() {
            d = d.with_related(call_span, format!("in this call of `{name}`"));
        }
        self.diags.push(d);
    }

    // ------------------------------------------------------------ params and calls

    fn param(&mut self, p: &ParamDecl, let_name: Option<&str>) -> Option<NodeId> {
        let leaf = match (&p.name, let_name) {
            (Some(n), _) => self.template(n)?,
            (None, Some(l)) => l.to_string(),
            (None, None) => {
                self.error(
                    p.span,
                    "a `Param` needs a `name:` when it is not bound directly by a `Let`",
                    "unnamed parameter",
                );
                return None;
            }
        };
        let full = if self.scope.is_empty() { leaf } else { format!("{}.{}", self.scope.join("."), leaf) };
        if let ShapeExpr::Dims(dims, _) = &p.shape {
            let what = format!("the shape of parameter `{full}`");
            let dynamic = dims.iter().filter(|d| self.require_static(d, &what).is_none()).count();
            if dynamic > 0 {
                return None;
            }
        }
        let shape = self.static_shape(&p.shape, &format!("the shape of parameter `{full}`"));
        let dtype = match &p.dtype {
            Some((d, s)) => self.dtype(d, *s),
            None => Some(DType::F32),
        };
        let init = self.init(&p.init);
        let (shape, dtype, init) = (shape?, dtype?, init?);
        // One checkpoint name is one tensor: declaring it again (an RNN cell called at every
        // step, a tied embedding) reuses it, provided the declarations agree.
        if let Some(&(prev_node, prev_span)) = self.params.get(&full) {
            let prev_ty = self.graph.ty(prev_node).clone();
            if prev_ty.shape == shape && prev_ty.dtype == dtype {
                return Some(prev_node);
            }
            self.diags.push(
                Diagnostic::error(format!(
                    "parameter `{full}` is declared twice with different types: {prev_ty} and {}",
                    kiln_ir::TensorType::new(dtype, shape)
                ))
                .at(p.span, "declared again here")
                .with_related(prev_span, "first declared here")
                .note("each checkpoint name is one tensor; give each call its own `scope` to get separate parameters"),
            );
            return None;
        }
        let n = self.add(
            Op::Param { name: full.clone(), dtype, shape: kiln_ir::dims(&shape), init },
            &[],
            p.span,
            &[],
        )?;
        self.params.insert(full, (n, p.span));
        Some(n)
    }

    fn init(&mut self, i: &InitExpr) -> Option<kiln_ir::Init> {
        let get = |name: &str, default: f64, this: &mut Self| -> Option<f64> {
            match i.args.iter().find(|(k, _)| k == name) {
                Some((_, e)) => this.cfloat(e, &format!("the initializer's `{name}`")),
                None => Some(default),
            }
        };
        use kiln_ir::Init as I;
        Some(match i.kind {
            InitKind::Zeros => I::Zeros,
            InitKind::Ones => I::Ones,
            InitKind::Constant => I::Constant(get("value", 0.0, self)?),
            InitKind::Normal => I::Normal { mean: get("mean", 0.0, self)?, std: get("std", 1.0, self)? },
            InitKind::Uniform => I::Uniform { low: get("low", 0.0, self)?, high: get("high", 1.0, self)? },
            InitKind::XavierUniform => I::XavierUniform { gain: get("gain", 1.0, self)? },
            InitKind::XavierNormal => I::XavierNormal { gain: get("gain", 1.0, self)? },
            InitKind::KaimingUniform => {
                I::KaimingUniform { gain: get("gain", std::f64::consts::SQRT_2, self)? }
            }
            InitKind::KaimingNormal => {
                I::KaimingNormal { gain: get("gain", std::f64::consts::SQRT_2, self)? }
            }
        })
    }

    fn resolve_module(&self, func: &str) -> Option<(&'a ModuleDef, String)> {
        let ns = &self.frame().namespace;
        let local = if ns.is_empty() { func.to_string() } else { format!("{ns}.{func}") };
        self.modules
            .modules
            .get(&local)
            .or_else(|| self.modules.modules.get(func))
            .map(|(m, ns)| (*m, ns.clone()))
    }

    fn call(&mut self, c: &CallExpr) -> Option<LValue> {
        let Some((module, namespace)) = self.resolve_module(&c.func.name) else {
            let names: Vec<&str> = self.modules.modules.keys().map(|k| k.as_str()).collect();
            let mut d =
                Diagnostic::error(format!("unknown module `{}`", c.func.name)).at(c.func.span, "not defined");
            if let Some(s) = closest(&c.func.name, names.iter().copied()) {
                d = d.note(format!("did you mean `{s}`?"));
            }
            self.diags.push(d);
            return None;
        };
        let qualified = if namespace.is_empty() {
            module.name.name.clone()
        } else {
            format!("{namespace}.{}", module.name.name)
        };
        if let Some(pos) = self.call_stack.iter().position(|(n, _)| *n == qualified) {
            let chain: Vec<&str> = self.call_stack[pos..].iter().map(|(n, _)| n.as_str()).collect();
            let mut d = Diagnostic::error(format!(
                "cycle: module `{qualified}` calls itself ({} → {qualified})",
                chain.join(" → ")
            ))
            .at(c.func.span, "this call closes the cycle");
            d = d.with_related(self.call_stack[pos].1, format!("`{qualified}` was entered here"));
            self.diags.push(d);
            return None;
        }
        if c.args.len() != module.args.len() {
            let params: Vec<&str> = module.args.iter().map(|a| a.name.as_str()).collect();
            self.diags.push(
                Diagnostic::error(format!(
                    "wrong number of arguments: module `{qualified}` takes {} ({}), got {}",
                    module.args.len(),
                    params.join(", "),
                    c.args.len()
                ))
                .at(c.span, "in this call")
                .with_related(module.name.span, "module defined here"),
            );
            return None;
        }
        // Arguments and config are evaluated in the caller's frame.
        let mut args = Vec::with_capacity(c.args.len());
        for a in &c.args {
            args.push(self.operand(a));
        }
        let mut config = HashMap::new();
        let mut dynamic = HashMap::new();
        let mut sizes = HashMap::new();
        for (k, e) in &c.with {
            if !module.config.iter().any(|(n, _)| n.name == k.name) {
                let names: Vec<&str> = module.config.iter().map(|(n, _)| n.name.as_str()).collect();
                let mut d =
                    Diagnostic::error(format!("module `{qualified}` has no config argument `{}`", k.name))
                        .at(k.span, "unknown config argument");
                d = match closest(&k.name, names.iter().copied()) {
                    Some(s) => d.note(format!("did you mean `{s}`?")),
                    None => d.note(format!(
                        "it takes: {}",
                        if names.is_empty() { "none".into() } else { names.join(", ") }
                    )),
                };
                self.diags.push(d);
                return None;
            }
            let value = self.dynamic_cvalue(e)?;
            // The std norms add `eps` under a square root, as the fused norm ops do: a negative
            // or infinite one makes every output NaN or zero, so it is refused with the ops'
            // words (`LayerNorm(eps: …)`), at the caller's value.
            if qualified.starts_with("std.") && k.name == "eps" {
                let eps = match value {
                    CValue::Float(f) => Some(f),
                    CValue::Int(i) => Some(i as f64),
                    CValue::Bool(_) => None,
                };
                if let Some(eps) = eps.filter(|x| !(x.is_finite() && *x >= 0.0)) {
                    let msg = format!("`eps` must be a finite non-negative number, but it is {eps}");
                    self.diags.push(Diagnostic::error(msg).at(e.span, "invalid eps"));
                    return None;
                }
            }
            config.insert(k.name.clone(), value);
            if let Ok(Some(r)) = self.range_of(&e.expr) {
                dynamic.insert(k.name.clone(), r);
                sizes.insert(k.name.clone(), some_size(self.size_of(&e.expr), &e.expr));
            }
        }
        let scope_seg = match &c.scope {
            Some(s) => Some(self.template(s)?),
            None => None,
        };
        if args.iter().any(Option::is_none) {
            return None;
        }
        // Enter the module.
        let mut frame = Frame { tensors: HashMap::new(), config: HashMap::new(), dynamic, sizes, namespace };
        for (name, a) in module.args.iter().zip(&args) {
            frame.tensors.insert(name.name.clone(), Binding { value: *a, span: name.span });
        }
        self.frames.push(frame);
        let mut ok = true;
        for (name, default) in &module.config {
            let v = match (config.get(&name.name), default) {
                (Some(v), _) => Some(*v),
                (None, Some(d)) => {
                    let v = self.dynamic_cvalue(d);
                    if let Ok(Some(r)) = self.range_of(&d.expr) {
                        let size = some_size(self.size_of(&d.expr), &d.expr);
                        self.frame_mut().dynamic.insert(name.name.clone(), r);
                        self.frame_mut().sizes.insert(name.name.clone(), size);
                    }
                    v
                }
                (None, None) => {
                    self.diags.push(
                        Diagnostic::error(format!(
                            "module `{qualified}` needs the config argument `{}`",
                            name.name
                        ))
                        .at(c.span, format!("add `with: {{\"{}\": …}}`", name.name))
                        .with_related(name.span, "declared here without a default"),
                    );
                    None
                }
            };
            match v {
                Some(v) => {
                    self.frame_mut().config.insert(name.name.clone(), v);
                }
                None => ok = false,
            }
        }
        if let Some(seg) = &scope_seg {
            self.scope.push(seg.clone());
        }
        self.call_stack.push((qualified.clone(), c.span));
        if ok && self.expand(c.span) {
            self.stmts(&module.body);
        }
        self.call_stack.pop();
        if scope_seg.is_some() {
            self.scope.pop();
        }
        let mut rets = Vec::new();
        if ok {
            for r in &module.ret {
                match self.frame().tensors.get(&r.name).cloned() {
                    Some(b) => rets.push(b.value),
                    None => {
                        self.unknown_name(r, r.span);
                        rets.push(None);
                    }
                }
            }
        }
        self.frames.pop();
        if !ok || rets.iter().any(Option::is_none) {
            return None;
        }
        let rets: Vec<Operand> = rets.into_iter().flatten().collect();
        Some(if rets.len() == 1 { LValue::One(rets[0]) } else { LValue::Many(rets) })
    }

    /// A fresh seed for a random op: a pure function of the model seed, the scope and the
    /// op's position, so two dropout sites never share numbers.
    pub fn next_random_seed(&mut self) -> u64 {
        let seed = self.global.get("seed").and_then(|v| v.as_f64()).unwrap_or(0.0) as u64;
        self.random_sites += 1;
        kiln_ir::rng::bits(seed, kiln_ir::rng::stream_of(&self.scope.join(".")), self.random_sites) >> 11
    }

    /// Whether a limit (expansion, nesting, node count) stopped the lowering: the graph is
    /// then incomplete, and names it never bound are not the user's mistake.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Looks up a name in the model frame after the body ran (for outputs and training).
    pub fn top_binding(&self, name: &str) -> Option<(Option<Operand>, Span)> {
        self.frames.first().and_then(|f| f.tensors.get(name)).map(|b| (b.value, b.span))
    }

    pub fn unknown_top_name(&mut self, name: &Ident) {
        self.unknown_name(name, name.span);
    }
}

/// The argument lists of every `dim(…)` call in `e`.
fn dim_calls<'e>(e: &'e CExpr, out: &mut Vec<&'e [CExpr]>) {
    match e {
        CExpr::Int(_) | CExpr::Float(_) | CExpr::Bool(_) | CExpr::Name(_) => {}
        CExpr::Neg(x) | CExpr::Not(x) => dim_calls(x, out),
        CExpr::Bin(_, a, b) => {
            dim_calls(a, out);
            dim_calls(b, out);
        }
        CExpr::Call(f, args) => {
            if f == "dim" {
                out.push(args);
            }
            for a in args {
                dim_calls(a, out);
            }
        }
    }
}

/// The size of an expression whose range is dynamic (a static result would be a broken
/// twin, reported as not a size).
fn some_size(size: Result<Option<SizeExpr>, String>, e: &CExpr) -> Result<SizeExpr, String> {
    size?.ok_or_else(|| format!("`{e}` is not a size"))
}
