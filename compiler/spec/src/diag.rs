//! Diagnostics: errors and warnings with source spans, rendered with file:line:col and a caret.

use crate::source::{Sources, Span};
use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::{Error as FilesError, Files};
use codespan_reporting::term::{self, termcolor};
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a model, with where it is and what else is relevant.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    /// The primary position and its label.
    pub span: Option<(Span, String)>,
    /// Related positions (where an operand was defined, the other definition, …).
    pub related: Vec<(Span, String)>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            span: None,
            related: vec![],
            notes: vec![],
        }
    }

    pub fn warning(message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(message) }
    }

    pub fn at(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.span = Some((span, label.into()));
        self
    }

    pub fn with_related(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.related.push((span, label.into()));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Renders the diagnostic as plain text:
    /// `error: message` / `  --> file:line:col` followed by the source excerpt with carets.
    pub fn render(&self, sources: &Sources) -> String {
        render_all(std::slice::from_ref(self), sources)
    }
}

/// A problem that stops a stage, carrying every diagnostic found (errors and warnings).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", summary(.0))]
pub struct Diagnostics(pub Vec<Diagnostic>);

fn summary(d: &[Diagnostic]) -> String {
    let errors: Vec<&str> = d.iter().filter(|d| d.is_error()).map(|d| d.message.as_str()).collect();
    match errors.len() {
        0 => "no errors".into(),
        1 => errors[0].to_string(),
        n => format!("{} (and {} more errors)", errors[0], n - 1),
    }
}

impl Diagnostics {
    pub fn render(&self, sources: &Sources) -> String {
        render_all(&self.0, sources)
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }
}

struct FilesAdapter<'a>(&'a Sources);

impl<'a> Files<'a> for FilesAdapter<'a> {
    type FileId = usize;
    type Name = &'a str;
    type Source = &'a str;

    fn name(&'a self, id: usize) -> Result<&'a str, FilesError> {
        self.0.files().get(id).map(|f| f.name.as_str()).ok_or(FilesError::FileMissing)
    }

    fn source(&'a self, id: usize) -> Result<&'a str, FilesError> {
        self.0.files().get(id).map(|f| f.text.as_str()).ok_or(FilesError::FileMissing)
    }

    fn line_index(&'a self, id: usize, byte_index: usize) -> Result<usize, FilesError> {
        let f = self.0.files().get(id).ok_or(FilesError::FileMissing)?;
        Ok(f.line_col(byte_index).0 as usize - 1)
    }

    fn line_range(&'a self, id: usize, line_index: usize) -> Result<Range<usize>, FilesError> {
        let f = self.0.files().get(id).ok_or(FilesError::FileMissing)?;
        let starts: Vec<usize> =
            std::iter::once(0).chain(f.text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        let start = *starts
            .get(line_index)
            .ok_or(FilesError::LineTooLarge { given: line_index, max: starts.len() - 1 })?;
        let end = starts.get(line_index + 1).copied().unwrap_or(f.text.len());
        Ok(start..end)
    }
}

fn render_all(diags: &[Diagnostic], sources: &Sources) -> String {
    let mut out = String::new();
    let files = FilesAdapter(sources);
    let config = term::Config::default();
    for d in diags {
        // The location line first, so the message and file:line:col are greppable together.
        let head = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut cs = match d.severity {
            Severity::Error => CsDiagnostic::error(),
            Severity::Warning => CsDiagnostic::warning(),
        }
        .with_message(&d.message);
        let mut labels = Vec::new();
        if let Some((span, label)) = &d.span {
            labels
                .push(Label::primary(span.file, span.start as usize..span.end as usize).with_message(label));
        }
        for (span, label) in &d.related {
            labels.push(
                Label::secondary(span.file, span.start as usize..span.end as usize).with_message(label),
            );
        }
        cs = cs.with_labels(labels).with_notes(d.notes.clone());
        let mut buf = termcolor::NoColor::new(Vec::new());
        if term::emit_to_write_style(&mut buf, &config, &files, &cs).is_err() {
            // A span that does not fit its file: still say everything we know.
            out.push_str(&format!("{head}: {}\n", d.message));
            continue;
        }
        out.push_str(&String::from_utf8_lossy(&buf.into_inner()));
    }
    out
}
