//! kiln-spec: the model language. RON text → a typed [`Model`] with a span on every node.
//!
//! **Architecture invariant:** this crate knows nothing of graphs; it parses and checks the
//! form of a spec. Names, shapes and config values are resolved by the lowering (`kiln-lower`),
//! which reports through the same [`Diagnostic`]s.

pub mod ast;
pub mod cexpr;
mod convert;
mod diag;
pub mod ops;
mod source;
mod suggest;
pub mod syntax;

pub use ast::*;
pub use cexpr::{parse_cexpr, CExpr, SpannedCExpr};
pub use convert::name_problem;
pub use diag::{Diagnostic, Diagnostics, Severity};
pub use source::{FileId, Location, SourceFile, Sources, Span};
pub use suggest::closest;
pub use syntax::Ident;

/// The standard layer library, written in the language itself.
pub const STD_LIBRARY: &str = include_str!("../../../models/std.ron");

/// Checks that `text` is RON as the `ron` crate reads it; the error carries its position.
fn ron_check(file: FileId, text: &str) -> Result<(), Diagnostic> {
    match ron::from_str::<ron::Value>(text) {
        Ok(_) => Ok(()),
        Err(e) => {
            let line = e.span.start.line.max(1);
            let col = e.span.start.col.max(1);
            let offset = offset_of(text, line, col);
            Err(Diagnostic::error(format!("syntax error: {}", e.code))
                .at(Span::new(file, offset, (offset + 1).min(text.len()).max(offset)), "here"))
        }
    }
}

fn offset_of(text: &str, line: usize, col: usize) -> usize {
    let mut off = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            return off + l.char_indices().nth(col - 1).map(|(b, _)| b).unwrap_or(l.len());
        }
        off += l.len();
    }
    text.len()
}

/// Parses a file into the spanned RON tree: the `ron` crate decides what is valid RON, then
/// Kiln's reader builds the tree with spans.
pub fn parse_value(file: FileId, text: &str) -> Result<syntax::Value, Diagnostics> {
    // Kiln's reader gives the more precise message; the ron crate is the arbiter of validity.
    let value = syntax::parse(file, text).map_err(|d| Diagnostics(vec![d]))?;
    ron_check(file, text).map_err(|d| Diagnostics(vec![d]))?;
    Ok(value)
}

/// Parses and checks the form of a model file. Errors that conversion recovered from come
/// back with the model, so lowering can report its own errors in the same run.
pub fn parse_model(sources: &Sources, file: FileId) -> Result<(Model, Vec<Diagnostic>), Diagnostics> {
    let value = parse_value(file, &sources.get(file).text)?;
    let mut c = convert::Converter::default();
    match c.model(&value) {
        Some(model) => Ok((model, c.diags)),
        None => Err(Diagnostics(c.diags)),
    }
}

/// Parses a dynamic size given on the command line (`--set seq=Dyn(min: 1, max: 512, hint:
/// 128)`), held as its own source file so its errors point into it.
pub fn parse_dyn(sources: &Sources, file: FileId) -> Result<DynDecl, Diagnostics> {
    let value = parse_value(file, &sources.get(file).text)?;
    let mut c = convert::Converter::default();
    if value.head().is_none_or(|h| h.name != "Dyn") {
        return Err(Diagnostics(vec![Diagnostic::error(
            "a dynamic size is written `Dyn(min: …, max: …, hint: …[, multiple_of: …])`",
        )
        .at(value.span, "not a `Dyn(…)`")]));
    }
    match c.dyn_decl(&value) {
        Some(d) if !c.diags.iter().any(Diagnostic::is_error) => Ok(d),
        _ => Err(Diagnostics(c.diags)),
    }
}

/// Parses and checks the form of a library file.
pub fn parse_library(sources: &Sources, file: FileId) -> Result<Library, Diagnostics> {
    let value = parse_value(file, &sources.get(file).text)?;
    let mut c = convert::Converter::default();
    let lib = c.library(&value);
    match lib {
        Some(v) if !c.diags.iter().any(Diagnostic::is_error) => Ok(v),
        _ => Err(Diagnostics(c.diags)),
    }
}
