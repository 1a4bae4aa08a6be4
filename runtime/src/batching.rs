//! Batch planning for inputs of different lengths (sentences, token sequences): sort them by
//! length, group neighbours into batches that each fit a budget of padded tokens, and remember
//! where every input went so that the results come back in input order.
//!
//! Running a batch costs about its padded size (batch × padded length), so sorting first keeps
//! the padding small: each batch is padded only to its own longest input, rounded up to
//! `multiple_of` so that the set of distinct padded lengths (compiled shapes, kernel plans)
//! stays small. This is what sentence-transformers and most serving code do; here it is a
//! plain function of the lengths, independent of any model.
//!
//! ```
//! use kiln_runtime::batching::{plan, Limits};
//!
//! let limits = Limits { tokens: 64, max_batch: 4, multiple_of: 8 };
//! let plan = plan(&[5, 17, 3, 9, 30, 8], &limits)?;
//! assert_eq!(plan.batches[0].indices, [2, 0, 5, 3]); // lengths 3, 5, 8, 9
//! assert_eq!(plan.batches[0].padded_len, 16);
//! assert_eq!(plan.batches[1].indices, [1, 4]); // lengths 17, 30
//! assert_eq!(plan.batches[1].padded_len, 32);
//! // Results computed batch after batch, restored to input order:
//! let computed = ["c3", "c5", "c8", "c9", "c17", "c30"];
//! assert_eq!(plan.restore(&computed), ["c5", "c17", "c3", "c9", "c30", "c8"]);
//! # Ok::<(), kiln_runtime::batching::PlanError>(())
//! ```

use thiserror::Error;

/// What one batch may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Padded tokens per batch: a batch's size times its padded length is at most this.
    pub tokens: usize,
    /// Inputs per batch.
    pub max_batch: usize,
    /// Padded lengths are rounded up to a multiple of this (1: no rounding, each batch runs at
    /// its longest input's exact length).
    pub multiple_of: usize,
}

/// One batch: which inputs it holds and the length they are all padded to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Indices into the input, shortest first.
    pub indices: Vec<usize>,
    /// The longest input's length rounded up to [`Limits::multiple_of`].
    pub padded_len: usize,
}

impl Batch {
    /// Padded tokens this batch runs: `indices.len() × padded_len`.
    pub fn padded_tokens(&self) -> usize {
        self.indices.len() * self.padded_len
    }
}

/// Batches in the order they run, and where each input's result lands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The batches, shortest inputs first; every input index appears in exactly one.
    pub batches: Vec<Batch>,
    /// `position[i]` is input `i`'s place among the results of all batches laid end to end.
    pub position: Vec<usize>,
}

impl Plan {
    /// Puts results computed batch after batch (in [`Plan::batches`] order, laid end to end)
    /// back into input order. `results` must hold one value per input.
    ///
    /// # Panics
    /// When `results.len()` is not the number of planned inputs: a caller's bug, not bad input.
    pub fn restore<T: Clone>(&self, results: &[T]) -> Vec<T> {
        assert_eq!(results.len(), self.position.len(), "one result per planned input");
        self.position.iter().map(|&p| results[p].clone()).collect()
    }
}

/// Lengths and limits that no plan can satisfy.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    /// A limit is zero.
    #[error("the batch limits need a positive {name} (it is 0)")]
    ZeroLimit {
        /// `tokens`, `max_batch` or `multiple_of`.
        name: &'static str,
    },
    /// An input of length 0: nothing to run, not even a [CLS] token.
    #[error("input {index} is empty (length 0)")]
    Empty {
        /// The input's index.
        index: usize,
    },
    /// An input that does not fit the token budget even alone.
    #[error(
        "input {index} has length {length}, padded to {padded}, but a batch may hold only {tokens} \
         padded tokens: raise the token budget to at least {padded} or truncate the input"
    )]
    TooLong {
        /// The input's index.
        index: usize,
        /// Its length.
        length: usize,
        /// Its length rounded up to `multiple_of`.
        padded: usize,
        /// [`Limits::tokens`].
        tokens: usize,
    },
}

/// Sorts the inputs by length (ties in input order) and cuts the sorted list greedily into
/// batches: an input joins the current batch unless that would make it hold more than
/// `max_batch` inputs or more than `tokens` padded tokens at the longer padded length.
pub fn plan(lengths: &[usize], limits: &Limits) -> Result<Plan, PlanError> {
    let Limits { tokens, max_batch, multiple_of } = *limits;
    for (name, value) in [("tokens", tokens), ("max_batch", max_batch), ("multiple_of", multiple_of)] {
        if value == 0 {
            return Err(PlanError::ZeroLimit { name });
        }
    }
    let mut padded = Vec::with_capacity(lengths.len());
    for (index, &length) in lengths.iter().enumerate() {
        if length == 0 {
            return Err(PlanError::Empty { index });
        }
        match length.div_ceil(multiple_of).checked_mul(multiple_of) {
            Some(p) if p <= tokens => padded.push(p),
            // A length that overflows when rounded up fits no budget either.
            p => return Err(PlanError::TooLong { index, length, padded: p.unwrap_or(usize::MAX), tokens }),
        }
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]); // stable: ties keep input order

    let mut batches: Vec<Batch> = Vec::new();
    for &i in &order {
        let fits = batches.last().is_some_and(|b| {
            // Sorted ascending, so input i is the batch's longest from now on.
            b.indices.len() < max_batch && (b.indices.len() + 1) * padded[i] <= tokens
        });
        match batches.last_mut() {
            Some(b) if fits => {
                b.indices.push(i);
                b.padded_len = padded[i];
            }
            _ => batches.push(Batch { indices: vec![i], padded_len: padded[i] }),
        }
    }
    let mut position = vec![0; lengths.len()];
    for (p, &i) in batches.iter().flat_map(|b| &b.indices).enumerate() {
        position[i] = p;
    }
    Ok(Plan { batches, position })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(tokens: usize, max_batch: usize, multiple_of: usize) -> Limits {
        Limits { tokens, max_batch, multiple_of }
    }

    /// The plan as `(indices, padded_len)` pairs, for exact comparisons.
    fn shape(p: &Plan) -> Vec<(Vec<usize>, usize)> {
        p.batches.iter().map(|b| (b.indices.clone(), b.padded_len)).collect()
    }

    #[test]
    fn sorts_by_length_and_cuts_at_the_token_budget() {
        let p = plan(&[5, 17, 3, 9, 30, 8], &limits(64, 4, 8)).unwrap();
        // 3 5 8 9 pad to 16: 4 × 16 = 64 fits exactly; then max_batch closes the batch.
        // 17 30 pad to 32: 2 × 32 = 64.
        assert_eq!(shape(&p), [(vec![2, 0, 5, 3], 16), (vec![1, 4], 32)]);
        assert_eq!(p.position, [1, 4, 0, 3, 5, 2]);
    }

    #[test]
    fn a_longer_input_that_would_exceed_the_budget_starts_a_batch() {
        // 8 8 8 fit as 3 × 8 = 24 ≤ 40; adding 20 (pad 24) would be 4 × 24 = 96 > 40.
        // 20 and 21 pad to 24: 2 × 24 = 48 > 40, so each runs alone.
        let p = plan(&[8, 20, 8, 21, 8], &limits(40, 32, 8)).unwrap();
        assert_eq!(shape(&p), [(vec![0, 2, 4], 8), (vec![1], 24), (vec![3], 24)]);
        assert_eq!(p.position, [0, 3, 1, 4, 2]);
    }

    #[test]
    fn batch_one_without_rounding_runs_every_input_at_its_own_length() {
        let p = plan(&[7, 3, 12], &limits(512, 1, 1)).unwrap();
        assert_eq!(shape(&p), [(vec![1], 3), (vec![0], 7), (vec![2], 12)]);
        assert_eq!(p.restore(&["three", "seven", "twelve"]), ["seven", "three", "twelve"]);
    }

    #[test]
    fn equal_lengths_keep_input_order_and_fill_to_max_batch() {
        let p = plan(&[4; 5], &limits(1000, 2, 8)).unwrap();
        assert_eq!(shape(&p), [(vec![0, 1], 8), (vec![2, 3], 8), (vec![4], 8)]);
        assert_eq!(p.position, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn empty_input_is_an_empty_plan() {
        assert_eq!(plan(&[], &limits(64, 4, 8)).unwrap(), Plan::default());
    }

    #[test]
    fn an_input_longer_than_the_budget_is_an_error() {
        let e = plan(&[5, 70, 3], &limits(64, 4, 1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 1 has length 70, padded to 70, but a batch may hold only 64 padded tokens: \
             raise the token budget to at least 70 or truncate the input"
        );
    }

    #[test]
    fn a_budget_smaller_than_one_padded_input_is_an_error() {
        // 60 fits the budget of 62 unpadded, but not rounded up to 64.
        let e = plan(&[60], &limits(62, 4, 8)).unwrap_err();
        assert_eq!(e, PlanError::TooLong { index: 0, length: 60, padded: 64, tokens: 62 });
        assert_eq!(
            e.to_string(),
            "input 0 has length 60, padded to 64, but a batch may hold only 62 padded tokens: \
             raise the token budget to at least 64 or truncate the input"
        );
    }

    #[test]
    fn zero_limits_and_empty_inputs_are_errors() {
        assert_eq!(
            plan(&[1], &limits(64, 0, 8)).unwrap_err().to_string(),
            "the batch limits need a positive max_batch (it is 0)"
        );
        assert_eq!(
            plan(&[1], &limits(64, 4, 0)).unwrap_err().to_string(),
            "the batch limits need a positive multiple_of (it is 0)"
        );
        assert_eq!(
            plan(&[1], &limits(0, 4, 1)).unwrap_err().to_string(),
            "the batch limits need a positive tokens (it is 0)"
        );
        assert_eq!(plan(&[3, 0], &limits(64, 4, 1)).unwrap_err().to_string(), "input 1 is empty (length 0)");
    }

    #[test]
    fn a_length_that_overflows_when_rounded_is_too_long() {
        let e = plan(&[usize::MAX - 2], &limits(usize::MAX, 1, 8)).unwrap_err();
        assert_eq!(
            e,
            PlanError::TooLong { index: 0, length: usize::MAX - 2, padded: usize::MAX, tokens: usize::MAX }
        );
    }

    proptest! {
        #[test]
        fn every_input_once_sorted_and_within_limits(
            lengths in proptest::collection::vec(1usize..300, 0..200),
            max_batch in 1usize..40,
            multiple_of in 1usize..17,
            extra in 0usize..4000,
        ) {
            let tokens = 314 + extra; // ≥ the longest input (299) rounded up to a multiple of ≤ 16
            let p = plan(&lengths, &limits(tokens, max_batch, multiple_of)).unwrap();
            let mut seen = vec![0usize; lengths.len()];
            let mut last = 0;
            for b in &p.batches {
                prop_assert!(!b.indices.is_empty());
                prop_assert!(b.indices.len() <= max_batch);
                prop_assert!(b.padded_tokens() <= tokens);
                prop_assert_eq!(b.padded_len % multiple_of, 0);
                let longest = b.indices.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                prop_assert_eq!(b.padded_len, longest.div_ceil(multiple_of) * multiple_of);
                for &i in &b.indices {
                    prop_assert!(lengths[i] >= last, "sorted by length");
                    last = lengths[i];
                    seen[i] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1), "every index exactly once: {:?}", seen);
            let flat: Vec<usize> = p.batches.iter().flat_map(|b| b.indices.clone()).collect();
            prop_assert_eq!(p.restore(&flat), (0..lengths.len()).collect::<Vec<_>>());
        }
    }
}
