//! kiln-lower: a checked spec → a [`Graph`] of primitive ops.
//!
//! Inlines modules, unrolls repeats, substitutes config (with `--set` overrides), names every
//! parameter by its checkpoint path, and reports shape and dtype errors at the spec position
//! of the op, showing each operand's type and where it came from.

mod config;
mod lower;
mod ops;
mod optim;
mod schedule;
mod symbols;
mod training;

pub use config::CValue;
pub use lower::{MAX_EXPANSION, MAX_NESTING};
pub use optim::{
    clip_grad_norm, declare_forward_state, declare_train_state, train_step, update, Optimizer, TrainStep,
};
pub use schedule::{learning_rate, Schedule};
pub use training::{
    cross_entropy, mse, training_graph, LossKind, TrainingError, TrainingGraph, TrainingPlan, MAX_ACCUMULATE,
};

use kiln_ir::{verify, Graph};
use kiln_spec::{Diagnostic, Diagnostics, FileId, Library, Model, Sources, Span};
use lower::{Lowerer, ModuleTable, Operand};
use std::collections::HashMap;
use std::path::Path;

/// A model lowered to a graph, with everything a user may want to know about it.
#[derive(Debug)]
pub struct Lowered {
    /// The checked spec the graph was lowered from.
    pub spec: Model,
    pub graph: Graph,
    /// The resolved config, in declaration order (after overrides).
    pub config: Vec<(String, CValue)>,
    pub training: Option<TrainingPlan>,
    /// The config entries computed from dynamic sizes, in declaration order (the symbols
    /// themselves are `graph.symbols`).
    pub derived: Vec<DerivedSize>,
    /// Warnings (unused inputs, …); errors stop lowering instead.
    pub warnings: Vec<Diagnostic>,
}

/// A config entry computed from the symbols (`"tokens": "batch * seq"`): the extent it is,
/// and the values it takes within their bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct DerivedSize {
    pub name: String,
    /// Its size over the graph's symbols, or why it is no extent the graph can hold
    /// (`min(seq, 100)`; an error only where it is used as one).
    pub size: Result<kiln_ir::SizeExpr, String>,
    pub min: i64,
    pub max: i64,
    /// Every value is a multiple of this.
    pub multiple: i64,
}

/// A `--set name=value` override.
#[derive(Clone, Debug)]
pub struct Override {
    pub name: String,
    pub value: String,
}

impl Override {
    /// Parses `name=value`.
    pub fn parse(s: &str) -> Result<Override, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok(Override { name: k.trim().to_string(), value: v.trim().to_string() })
            }
            _ => Err(format!("expected `name=value`, got `{s}`")),
        }
    }
}

/// The largest spec file (model or library) Kiln reads: 16 MiB. The shipped models are a few
/// KiB and weights live in `.safetensors` files, so anything larger is a mistake (a weights
/// file named by accident, `/dev/zero`); reading stops there instead of filling memory.
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

/// Reads a spec file as text, refusing more than [`MAX_SPEC_BYTES`] (without reading past
/// them: the file may never end) and text that is not UTF-8.
pub fn read_spec(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(format!(
            "`{}` is larger than {} MiB, the limit for a spec file (weights belong in a .safetensors file)",
            path.display(),
            MAX_SPEC_BYTES >> 20
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| format!("cannot read `{}`: it is not UTF-8 text ({e})", path.display()))
}

/// Config names every model has, with their defaults, unless it defines them itself.
pub const BUILTIN_CONFIG: &[(&str, CValue)] = &[("training", CValue::Bool(false)), ("seed", CValue::Int(0))];

/// Reads, checks and lowers a model file; `use`d libraries are read from the model's folder
/// (`NAME.ron`), and `std` falls back to the built-in standard library.
pub fn load(path: &Path, overrides: &[Override]) -> (Sources, Result<Lowered, Diagnostics>) {
    let mut sources = Sources::new();
    let text = match read_spec(path) {
        Ok(t) => t,
        Err(e) => return (sources, Err(Diagnostics(vec![Diagnostic::error(e)]))),
    };
    let file = sources.add(path.display().to_string(), text);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let r = lower_file(&mut sources, file, Some(&dir), overrides);
    (sources, r)
}

/// Lowers model text held in memory (tests, tools); `std` is the built-in library.
pub fn load_str(name: &str, text: &str, overrides: &[Override]) -> (Sources, Result<Lowered, Diagnostics>) {
    let mut sources = Sources::new();
    let file = sources.add(name, text);
    let r = lower_file(&mut sources, file, None, overrides);
    (sources, r)
}

fn lower_file(
    sources: &mut Sources,
    file: FileId,
    dir: Option<&Path>,
    overrides: &[Override],
) -> Result<Lowered, Diagnostics> {
    let (mut model, diags) = kiln_spec::parse_model(sources, file)?;
    // Libraries that do not parse stop the run; the model's own recovered errors wait for
    // the lowering to add its findings.
    let mut fatal = Vec::new();
    let mut libs: Vec<Library> = Vec::new();
    for u in &model.uses {
        let local = dir.map(|d| d.join(format!("{}.ron", u.name)));
        let text = match local.as_ref().filter(|p| p.is_file()) {
            Some(p) => match read_spec(p) {
                Ok(t) => Some((p.display().to_string(), t)),
                Err(e) => {
                    fatal.push(Diagnostic::error(e).at(u.span, "used here"));
                    None
                }
            },
            None if u.name == "std" => {
                Some(("<std>/std.ron".to_string(), kiln_spec::STD_LIBRARY.to_string()))
            }
            None => {
                fatal.push(
                    Diagnostic::error(format!("unknown library `{}`", u.name)).at(u.span, "not found").note(
                        format!(
                            "looked for `{}.ron` beside the model; the built-in library is `std`",
                            u.name
                        ),
                    ),
                );
                None
            }
        };
        if let Some((name, text)) = text {
            let id = sources.add(name, text);
            match kiln_spec::parse_library(sources, id) {
                Ok(lib) => libs.push(lib),
                Err(e) => fatal.extend(e.0),
            }
        }
    }
    let overrides = dynamic_overrides(sources, &mut model, &libs, overrides, &mut fatal);
    if !fatal.is_empty() {
        fatal.extend(diags);
        return Err(Diagnostics(fatal));
    }
    let (graph, config, derived, training, warnings) =
        lower_model(sources, &model, &libs, &overrides, diags)?;
    Ok(Lowered { spec: model, graph, config, derived, training, warnings })
}

/// Applies the overrides that make a config entry dynamic (`--set seq=Dyn(min: 1, max: 512,
/// hint: 128)`): the entry, the model's or a library's, becomes that `Dyn` (its bounds read
/// from a source of their own, `--set seq`, so their errors point there). Returns the other
/// overrides; a `Dyn` for a built-in entry or one that does not parse is an error in `diags`.
fn dynamic_overrides(
    sources: &mut Sources,
    model: &mut Model,
    libs: &[Library],
    overrides: &[Override],
    diags: &mut Vec<Diagnostic>,
) -> Vec<Override> {
    let mut rest = Vec::new();
    for o in overrides {
        if !o.value.starts_with("Dyn") {
            rest.push(o.clone());
            continue;
        }
        if BUILTIN_CONFIG.iter().any(|(n, _)| *n == o.name) {
            diags.push(Diagnostic::error(format!(
                "--set {}=Dyn(…): the built-in config `{}` cannot be a dynamic size",
                o.name, o.name
            )));
            continue;
        }
        let id = sources.add(format!("--set {}", o.name), o.value.clone());
        let decl = match kiln_spec::parse_dyn(sources, id) {
            Ok(d) => d,
            Err(e) => {
                diags.extend(e.0);
                continue;
            }
        };
        let value = kiln_spec::ConfigValue::Dyn(Box::new(decl));
        if let Some(entry) = model.config.iter_mut().find(|e| e.name.name == o.name) {
            entry.value = value;
        } else if let Some(entry) = libs.iter().flat_map(|l| &l.config).find(|e| e.name.name == o.name) {
            // A library's entry: the model's own entry of that name shadows it.
            model.config.push(kiln_spec::ConfigEntry { name: entry.name.clone(), value });
        } else {
            // Not an entry: reported by name with the other unknown `--set`s.
            rest.push(o.clone());
        }
    }
    rest
}

/// What lowering produces besides the spec itself: graph, config, derived sizes, training
/// plan, warnings.
type LowerResult = Result<
    (Graph, Vec<(String, CValue)>, Vec<DerivedSize>, Option<TrainingPlan>, Vec<Diagnostic>),
    Diagnostics,
>;

/// The model's config after overrides: every entry's value (a dynamic one at its hint), in a
/// map and in declaration order, and what is dynamic.
struct ResolvedConfig {
    values: HashMap<String, CValue>,
    ordered: Vec<(String, CValue)>,
    /// The range of every dynamic entry: the symbols and the entries computed from them.
    dynamic: HashMap<String, symbols::Range>,
    /// The size of every dynamic entry over the graph's symbols (an error where the entry is
    /// no extent the graph can hold, reported only where one is used as an extent).
    sizes: HashMap<String, Result<kiln_ir::SizeExpr, String>>,
    /// The `Dyn` entries `--set` did not specialize, in declaration order.
    symbols: Vec<symbols::Symbol>,
}

/// Evaluates the model's config (entries may refer to each other; cycles are errors), with
/// overrides applied first.
fn resolve_config(
    sources: &Sources,
    model: &Model,
    libs: &[Library],
    overrides: &[Override],
    diags: &mut Vec<Diagnostic>,
) -> ResolvedConfig {
    let mut exprs: Vec<(&str, &kiln_spec::ConfigValue, Span)> = Vec::new();
    for e in &model.config {
        exprs.push((&e.name.name, &e.value, e.name.span));
    }
    for lib in libs {
        for e in &lib.config {
            if !exprs.iter().any(|(n, ..)| *n == e.name.name) {
                exprs.push((&e.name.name, &e.value, e.name.span));
            }
        }
    }
    let mut values: HashMap<String, CValue> = HashMap::new();
    let mut set: HashMap<String, (CValue, &str)> = HashMap::new();
    for o in overrides {
        let known =
            exprs.iter().any(|(n, ..)| *n == o.name) || BUILTIN_CONFIG.iter().any(|(n, _)| *n == o.name);
        if !known {
            let names: Vec<&str> =
                exprs.iter().map(|(n, ..)| *n).chain(BUILTIN_CONFIG.iter().map(|(n, _)| *n)).collect();
            let hint = kiln_spec::closest(&o.name, names.iter().copied())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            diags.push(
                Diagnostic::error(format!("--set {}: the model has no config `{}`{hint}", o.name, o.name))
                    .note(format!("config names: {}", names.join(", "))),
            );
            continue;
        }
        match CValue::parse_literal(&o.value) {
            Some(CValue::Float(f)) if f.is_nan() => diags.push(Diagnostic::error(format!(
                "--set {}={}: NaN is not a valid config value",
                o.name, o.value
            ))),
            // Entries of the spec take their override as they are resolved (a symbol's is
            // checked against its bounds); a built-in takes it now.
            Some(v) if exprs.iter().any(|(n, ..)| *n == o.name) => {
                set.insert(o.name.clone(), (v, &o.value));
            }
            Some(v) => {
                values.insert(o.name.clone(), v);
            }
            None => diags.push(Diagnostic::error(format!(
                "--set {}={}: expected an integer, a number, true or false",
                o.name, o.value
            ))),
        }
    }
    // A symbol's index in the graph is its place among the `Dyn` entries `--set` leaves.
    let mut sym_index = HashMap::new();
    for (n, e, _) in &exprs {
        if matches!(e, kiln_spec::ConfigValue::Dyn(_)) && !set.contains_key(*n) {
            let i = u32::try_from(sym_index.len()).unwrap_or(u32::MAX);
            sym_index.insert(n.to_string(), i);
        }
    }
    let mut resolver = ConfigResolver {
        exprs: &exprs,
        values,
        set,
        sym_index,
        sizes: HashMap::new(),
        dynamic: HashMap::new(),
        symbols: Vec::new(),
        stack: Vec::new(),
        failed: Default::default(),
        diags,
        sources,
    };
    for (n, ..) in &exprs {
        resolver.visit(n);
    }
    let (mut values, dynamic, sizes) = (resolver.values, resolver.dynamic, resolver.sizes);
    let mut symbols = resolver.symbols;
    symbols.sort_by_key(|s| exprs.iter().position(|(n, ..)| *n == s.name));
    for (k, v) in BUILTIN_CONFIG {
        values.entry(k.to_string()).or_insert(*v);
    }
    check_builtins(&values, &exprs, diags);
    let ordered = exprs
        .iter()
        .map(|(n, ..)| n.to_string())
        .chain(BUILTIN_CONFIG.iter().map(|(n, _)| n.to_string()))
        .filter_map(|n| values.get(&n).map(|v| (n, *v)))
        .collect();
    ResolvedConfig { values, ordered, dynamic, sizes, symbols }
}

/// The built-in config entries have one meaning each, so a value of another kind is an
/// error (at the model's entry when it defines one, else about `--set`): `training` is a
/// bool (`training=2` is not "true"), `seed` a non-negative integer (the random streams take
/// an unsigned seed; a negative, fractional or NaN one would be silently converted).
fn check_builtins(
    values: &HashMap<String, CValue>,
    exprs: &[(&str, &kiln_spec::ConfigValue, Span)],
    diags: &mut Vec<Diagnostic>,
) {
    let training = match values.get("training") {
        Some(CValue::Bool(_)) | None => None,
        Some(v) => Some(("training", format!("config `training` must be true or false, but it is {v}"))),
    };
    let seed = match values.get("seed") {
        Some(CValue::Int(i)) if *i >= 0 => None,
        None => None,
        Some(v) => Some(("seed", format!("config `seed` must be a non-negative integer, but it is {v}"))),
    };
    for (name, msg) in [training, seed].into_iter().flatten() {
        let d = Diagnostic::error(msg.clone());
        diags.push(match exprs.iter().find(|(n, ..)| *n == name) {
            Some((_, e, _)) => d.at(e.span(), msg),
            None => d.note(format!("set by `--set {name}=…`")),
        });
    }
}

/// Depth-first evaluation of config entries that refer to each other, reporting each cycle
/// once.
struct ConfigResolver<'m, 'd> {
    exprs: &'m [(&'m str, &'m kiln_spec::ConfigValue, Span)],
    values: HashMap<String, CValue>,
    /// `--set` values of the spec's entries, with their text.
    set: HashMap<String, (CValue, &'m str)>,
    /// Each symbol's index in the graph, by name.
    sym_index: HashMap<String, u32>,
    sizes: HashMap<String, Result<kiln_ir::SizeExpr, String>>,
    dynamic: HashMap<String, symbols::Range>,
    symbols: Vec<symbols::Symbol>,
    stack: Vec<&'m str>,
    failed: std::collections::HashSet<&'m str>,
    diags: &'d mut Vec<Diagnostic>,
    sources: &'d Sources,
}

impl<'m> ConfigResolver<'m, '_> {
    fn visit(&mut self, name: &str) {
        if self.values.contains_key(name) || self.failed.contains(name) {
            return;
        }
        let Some(&(n, e, span)) = self.exprs.iter().find(|(n, ..)| *n == name) else { return };
        if let (Some((v, _)), kiln_spec::ConfigValue::Expr(_)) = (self.set.get(n), e) {
            self.values.insert(n.to_string(), *v);
            return;
        }
        if let Some(pos) = self.stack.iter().position(|s| *s == n) {
            let chain = self.stack[pos..].to_vec();
            self.diags.push(
                Diagnostic::error(format!("cycle in config: {} → {n}", chain.join(" → ")))
                    .at(span, "refers back to itself through these entries"),
            );
            self.failed.extend(chain);
            return;
        }
        self.stack.push(n);
        let mut deps = Vec::new();
        e.names(&mut deps);
        for d in &deps {
            self.visit(d);
        }
        self.stack.pop();
        if self.failed.contains(n) || deps.iter().any(|d| self.failed.contains(d.as_str())) {
            self.failed.insert(n);
            return;
        }
        let builtins: HashMap<String, CValue> =
            BUILTIN_CONFIG.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let env = config::ConfigEnv { frames: vec![&self.values, &builtins] };
        let e = match e {
            kiln_spec::ConfigValue::Expr(e) => e,
            kiln_spec::ConfigValue::Dyn(d) => {
                // The bounds read static entries only: a snapshot of them is their scope.
                let values = self.values.clone();
                let env = config::ConfigEnv { frames: vec![&values, &builtins] };
                match self.symbol(n, d, &deps, &env) {
                    Some(v) => {
                        self.values.insert(n.to_string(), CValue::Int(v));
                    }
                    None => {
                        self.failed.insert(n);
                    }
                }
                return;
            }
        };
        // An entry computed from symbols is dynamic too: its range is derived, and its value
        // at the symbols' hints is what the body is checked with.
        if deps.iter().any(|d| self.dynamic.contains_key(d)) {
            let lookup = |d: &str| self.dynamic.get(d).cloned();
            match symbols::range(&e.expr, &env, &config::NoShapes, &lookup) {
                Ok(Some(r)) => {
                    self.dynamic.insert(n.to_string(), r);
                    let size_of = |d: &str| self.sizes.get(d).cloned();
                    let size = match symbols::size(&e.expr, &env, &config::NoShapes, &size_of) {
                        Ok(Some(s)) => Ok(s),
                        Ok(None) => Err(format!("`{}` is not a size", e.expr)),
                        Err(msg) => Err(msg),
                    };
                    self.sizes.insert(n.to_string(), size);
                }
                Ok(None) => {}
                Err(msg) => {
                    self.failed.insert(n);
                    self.diags.push(self.bad_expression(e, &msg));
                    return;
                }
            }
        }
        match config::eval(&e.expr, &env, &config::NoShapes) {
            Ok(v) => {
                self.values.insert(n.to_string(), v);
            }
            Err(msg) => {
                self.failed.insert(n);
                self.diags.push(self.bad_expression(e, &msg))
            }
        }
    }

    fn bad_expression(&self, e: &kiln_spec::SpannedCExpr, msg: &str) -> Diagnostic {
        Diagnostic::error(format!(
            "bad config expression `{}`: {msg}",
            kiln_spec::cexpr::abbreviate(self.sources.snippet(e.span).trim_matches('"'), 80)
        ))
        .at(e.span, msg)
    }

    /// A `Dyn` entry: its bounds checked, then its `--set` value checked against them (the
    /// static value it specializes to), or the symbol recorded with its hint as the value.
    fn symbol(
        &mut self,
        n: &str,
        d: &kiln_spec::DynDecl,
        deps: &[String],
        env: &config::ConfigEnv,
    ) -> Option<i64> {
        if let Some(dep) = deps.iter().find(|d| self.dynamic.contains_key(*d)) {
            let at = d.fields().find(|e| {
                let mut names = Vec::new();
                e.expr.names(&mut names);
                names.contains(dep)
            });
            let msg = format!("the bounds of `{n}` must be static, but they read the dynamic `{dep}`");
            self.diags
                .push(Diagnostic::error(msg).at(at.map_or(d.span, |e| e.span), format!("reads `{dep}`")));
            return None;
        }
        let symbol = match symbols::declare(n, d, env) {
            Ok(s) => s,
            Err(diags) => {
                self.diags.extend(diags);
                return None;
            }
        };
        if let Some(&(v, text)) = self.set.get(n) {
            return match symbols::specialize(&symbol, text, v) {
                Ok(i) => Some(i),
                Err(msg) => {
                    self.diags.push(
                        Diagnostic::error(msg).at(d.span, format!("`{n}` takes {}", symbol.describe())),
                    );
                    None
                }
            };
        }
        self.dynamic.insert(n.to_string(), symbols::Range::of(&symbol));
        let index = self.sym_index.get(n).copied().unwrap_or(u32::MAX);
        self.sizes.insert(n.to_string(), Ok(kiln_ir::SizeExpr::symbol(index, n)));
        let hint = symbol.hint;
        self.symbols.push(symbol);
        Some(hint)
    }
}

fn lower_model(
    sources: &Sources,
    model: &Model,
    libs: &[Library],
    overrides: &[Override],
    mut diags: Vec<Diagnostic>,
) -> LowerResult {
    let mut config_diags = Vec::new();
    let ResolvedConfig { values: global, ordered: config, dynamic, sizes, symbols } =
        resolve_config(sources, model, libs, overrides, &mut config_diags);
    // A broken config would only cause follow-on errors in the body: stop here.
    if config_diags.iter().any(Diagnostic::is_error) {
        diags.extend(config_diags);
        return Err(Diagnostics(diags));
    }
    diags.extend(config_diags);
    let mut table = ModuleTable { modules: HashMap::new() };
    for m in &model.modules {
        table.modules.insert(m.name.name.clone(), (m, String::new()));
    }
    for lib in libs {
        for m in &lib.modules {
            table.modules.insert(format!("{}.{}", lib.name.name, m.name.name), (m, lib.name.name.clone()));
        }
    }
    let mut l = Lowerer::new(sources, &model.name.name, global, &table);
    l.graph.symbols = symbols.iter().map(symbols::Symbol::decl).collect();
    l.symbol_spans = symbols.iter().map(|s| (s.name.clone(), s.span)).collect();
    let derived: Vec<DerivedSize> = config
        .iter()
        .filter(|(n, _)| !symbols.iter().any(|s| s.name == *n))
        .filter_map(|(n, _)| {
            let r = dynamic.get(n)?;
            let size = sizes.get(n).cloned().unwrap_or_else(|| Err(format!("`{n}` is not a size")));
            Some(DerivedSize { name: n.clone(), size, min: r.min, max: r.max, multiple: r.multiple })
        })
        .collect();
    l.dynamic = dynamic;
    l.sizes = sizes;
    l.declare_inputs(&model.inputs);
    l.stmts(&model.body);
    if l.stopped() {
        // The body was cut short: outputs and training would only report names it never
        // reached. The limit's own diagnostic says what happened.
        diags.append(&mut l.diags);
        return Err(Diagnostics(diags));
    }
    let mut seen = HashMap::new();
    for out in &model.outputs {
        if let Some(prev) = seen.insert(out.name.name.clone(), out.name.span) {
            l.diags.push(
                Diagnostic::error(format!("output `{}` is declared twice", out.name.name))
                    .at(out.name.span, "again here")
                    .with_related(prev, "first here"),
            );
            continue;
        }
        match l.top_binding(&out.value.name) {
            Some((Some(Operand::Node(n)), _)) => l.graph.add_output(out.name.name.clone(), n),
            Some((Some(_), span)) => l.diags.push(
                Diagnostic::error(format!("output `{}` is a literal, not a tensor", out.value.name))
                    .at(out.value.span, "not a tensor")
                    .with_related(span, "bound here"),
            ),
            Some((None, _)) => {} // already reported where it failed
            None => l.unknown_top_name(&out.value),
        }
    }
    let training = model.training.as_ref().and_then(|t| training::check(&mut l, t));
    // `diags` holds what conversion recovered from; the lowering adds its own.
    diags.append(&mut l.diags);
    if diags.iter().any(Diagnostic::is_error) {
        diags.sort_by_key(|d| d.span.as_ref().map(|(s, _)| (s.file, s.start)));
        return Err(Diagnostics(diags));
    }
    let mut warnings = diags;
    let mut unused: Vec<_> =
        l.input_uses.iter().filter(|(_, (_, _, used))| !used).map(|(n, (_, s, _))| (n.clone(), *s)).collect();
    unused.sort_by_key(|(_, s)| s.start);
    let training_names: Vec<String> = model.training.as_ref().map(training::names_used).unwrap_or_default();
    for (name, span) in unused {
        if !training_names.contains(&name) {
            warnings
                .push(Diagnostic::warning(format!("input `{name}` is never used")).at(span, "declared here"));
        }
    }
    let mut graph = l.graph;
    graph.remove_dead();
    if let Err(e) = verify(&graph) {
        return Err(Diagnostics(vec![Diagnostic::error(format!(
            "internal error: the lowered graph fails verification: {e}"
        ))]));
    }
    Ok((graph, config, derived, training, warnings))
}
