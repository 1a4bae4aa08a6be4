//! The fault words ([`Faults`]): the manifest's fault table checked at load, and the words a
//! run leaves turned into the error the interpreter gives for the same inputs.
//!
//! Compiled kernels cannot stop at an integer division by zero as the interpreter does; they
//! record it (atomic unsigned minimums of the site and of the element) and go on. Every
//! backend fills the words with [`NONE`] before a run, in the run's own command stream, and
//! reads them back with the outputs; [`Model`](crate::Model) then fails the run with the
//! first fault, so the model stays usable for the next run.

use crate::error::RuntimeError;
use crate::manifest::{is_bidi_control, shape_str, BufRef, EntryView, FaultKind, FaultSite, Faults};

/// A fault word that holds nothing: no site faulted, or site `s` at no element.
pub(crate) const NONE: u32 = u32::MAX;

/// The most sites a table may list (each is a word; a site number must stay below [`NONE`]).
const MAX_SITES: usize = 1 << 20;

impl Faults {
    /// The number of `u32` words: the first-fault word, then one per site.
    pub fn words(&self) -> usize {
        1 + self.sites.len()
    }

    /// The words' size in bytes.
    pub fn bytes(&self) -> u64 {
        self.words() as u64 * 4
    }
}

/// Checks an entry point's fault table against its steps and the arena (`arena_bytes`): the
/// words lie inside the arena; each site names an existing step, in step order, whose kernel
/// takes exactly the words as its last argument; no other argument of any step touches them;
/// each site's shapes are ones the error can be computed from, and its words print as
/// themselves.
pub(crate) fn check(view: &EntryView<'_>, arena_bytes: u64) -> Result<(), RuntimeError> {
    let Some(faults) = view.faults else {
        return Ok(());
    };
    let bad = |what: String| RuntimeError::invalid(format!("fault table of `{}`: {what}", view.name));
    if faults.sites.is_empty() || faults.sites.len() > MAX_SITES {
        return Err(bad(format!("{} sites (the compiler lists 1 to {MAX_SITES})", faults.sites.len())));
    }
    let (start, bytes) = (faults.offset, faults.bytes());
    let Some(end) = start.checked_add(bytes).filter(|&e| e <= arena_bytes) else {
        return Err(bad(format!(
            "its {bytes} bytes at {start} lie outside the arena of {arena_bytes} bytes"
        )));
    };
    if !start.is_multiple_of(4) {
        return Err(bad(format!("its words start at byte {start}, not a multiple of 4")));
    }
    let mut previous = 0;
    for (i, site) in faults.sites.iter().enumerate() {
        check_site(i, site, view.steps.len(), previous).map_err(|w| bad(format!("site {i} {w}")))?;
        previous = site.step;
    }
    let the_words = BufRef::Arena { offset: start, bytes };
    for (s, step) in view.steps.iter().enumerate() {
        let faults_here = faults.sites.iter().any(|site| site.step as usize == s);
        let own = if faults_here { step.args.len().checked_sub(1) } else { None };
        if faults_here && step.args.last() != Some(&the_words) {
            return Err(bad(format!(
                "step {:?} holds a fault site, but its last argument is not the fault words (arena bytes {start}..{end})",
                step.label
            )));
        }
        for (a, arg) in step.args.iter().enumerate() {
            let BufRef::Arena { offset, bytes: len } = arg else { continue };
            let overlaps = *offset < end && start < offset.saturating_add(*len);
            if overlaps && Some(a) != own {
                return Err(bad(format!(
                    "step {:?} argument {a} (arena bytes {offset}..{}) overlaps the fault words",
                    step.label,
                    offset.saturating_add(*len)
                )));
            }
        }
    }
    Ok(())
}

/// One site: its step exists and does not come before `previous`'s; its divisor broadcasts to
/// its shape; its texts are plain.
fn check_site(i: usize, site: &FaultSite, steps: usize, previous: u32) -> Result<(), String> {
    let FaultSite { kind, step, op, name, origin, shape, divisor } = site;
    match kind {
        FaultKind::IntDivByZero => {}
    }
    if *step as usize >= steps || (i > 0 && *step < previous) {
        return Err(format!("names step {step} (of {steps}; sites are listed in step order)"));
    }
    if shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).is_none() {
        return Err(format!("has shape {} whose size overflows", shape_str(shape)));
    }
    let skip = shape.len().checked_sub(divisor.len());
    let broadcasts = skip.is_some_and(|k| divisor.iter().zip(&shape[k..]).all(|(&d, &s)| d == 1 || d == s));
    if !broadcasts {
        return Err(format!(
            "has divisor shape {} that does not broadcast to {}",
            shape_str(divisor),
            shape_str(shape)
        ));
    }
    for text in std::iter::once(op).chain(name).chain(origin) {
        if text.len() > 4096 || text.chars().any(|c| c.is_control() || is_bidi_control(c)) {
            return Err(format!("has a name or position that is not plain text: {text:?}"));
        }
    }
    Ok(())
}

/// The run's error, if the fault words a run of entry point `view` left (`words`, one per
/// [`Faults::words`]) hold a fault: the first faulting site, with the divisor element when the
/// element word holds one.
pub(crate) fn check_run(view: &EntryView<'_>, words: &[u32]) -> Result<(), RuntimeError> {
    let Some(faults) = view.faults else {
        return Ok(());
    };
    let first = words.first().copied().unwrap_or(NONE);
    if first == NONE {
        return Ok(());
    }
    let site = faults.sites.get(first as usize).ok_or(RuntimeError::FaultWord { word: first })?;
    let element = words.get(1 + first as usize).copied().filter(|&e| e != NONE);
    let mut what = site.op.clone();
    if let Some(name) = &site.name {
        what.push_str(&format!(" `{name}`"));
    }
    if let Some(origin) = &site.origin {
        what.push_str(&format!(" at {origin}"));
    }
    let fault = match site.kind {
        FaultKind::IntDivByZero => match element.and_then(|e| divisor_index(site, u64::from(e))) {
            Some(index) => format!("integer division by zero (divisor element {})", shape_str(&index)),
            None => "integer division by zero".to_string(),
        },
    };
    let step =
        view.steps.get(site.step as usize).map_or_else(|| format!("{}", site.step), |s| s.label.clone());
    Err(RuntimeError::Fault { step, op: what, fault })
}

/// The divisor's multi-index at row-major position `element` of the site's shape (broadcast
/// axes of the divisor are 0), or `None` past the shape's end.
fn divisor_index(site: &FaultSite, element: u64) -> Option<Vec<u64>> {
    let total = site.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?;
    if element >= total {
        return None;
    }
    let mut rest = element;
    let mut index = vec![0; site.shape.len()];
    for (k, &d) in site.shape.iter().enumerate().rev() {
        index[k] = rest % d;
        rest /= d;
    }
    let skip = site.shape.len().checked_sub(site.divisor.len())?;
    Some(site.divisor.iter().zip(&index[skip..]).map(|(&d, &i)| if d == 1 { 0 } else { i }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(shape: Vec<u64>, divisor: Vec<u64>) -> FaultSite {
        FaultSite {
            kind: FaultKind::IntDivByZero,
            step: 0,
            op: "div".into(),
            name: None,
            origin: None,
            shape,
            divisor,
        }
    }

    #[test]
    fn elements_map_to_the_divisors_index() {
        assert_eq!(divisor_index(&site(vec![2, 3], vec![2, 3]), 4), Some(vec![1, 1]));
        assert_eq!(divisor_index(&site(vec![2, 3], vec![3]), 4), Some(vec![1]));
        assert_eq!(divisor_index(&site(vec![2, 3], vec![2, 1]), 5), Some(vec![1, 0]));
        assert_eq!(divisor_index(&site(vec![2, 3], vec![]), 5), Some(vec![]));
        assert_eq!(divisor_index(&site(vec![2, 3], vec![2, 3]), 6), None);
    }
}
