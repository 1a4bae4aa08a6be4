//! The loop skeleton most scalar kernels share: the parallel range walks the output's rows
//! (every axis but the last, as one flat number), an inner loop walks the last axis, and each
//! element knows its full multi-index.

use crate::mlir_text::Body;

/// Opens `scf.for %r` over the range and the inner `scf.for` over the last axis of `shape`;
/// returns the index of every axis (SSA names). Close with two `b.close("")`.
pub(crate) fn open_rows(b: &mut Body, shape: &[usize]) -> Vec<String> {
    let rank = shape.len();
    let c0 = b.index(0);
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let mut idx = vec![String::new(); rank];
    let mut rem = "%r".to_string();
    for k in (0..rank.saturating_sub(1)).rev() {
        if k == 0 {
            idx[0] = rem.clone();
        } else {
            let d = b.index(shape[k]);
            idx[k] = b.assign(format!("arith.remui {rem}, {d} : index"));
            rem = b.assign(format!("arith.divui {rem}, {d} : index"));
        }
    }
    let last = shape.last().copied().unwrap_or(1);
    let n = b.index(last);
    b.open(format!("scf.for %j = {c0} to {n} step {c1}"));
    if rank > 0 {
        idx[rank - 1] = "%j".to_string();
    }
    idx
}

/// The range [`open_rows`] needs: the number of rows of `shape`.
pub(crate) fn row_count(shape: &[usize]) -> usize {
    match shape.split_last() {
        Some((_, lead)) => lead.iter().product(),
        None => 1,
    }
}

/// The function text around a body: flat memref parameters `%a0…`, then begin/end.
pub(crate) fn wrap(symbol: &str, memrefs: &[String], body: Body) -> String {
    let params: Vec<String> = memrefs.iter().enumerate().map(|(i, m)| format!("%a{i}: {m}")).collect();
    format!(
        "func.func @{symbol}({}, %begin: index, %end: index) {{\n{}}}\n",
        params.join(", "),
        body.finish()
    )
}
