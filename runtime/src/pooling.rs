//! Sentence embeddings from a token encoder's output: the mean of the token vectors that the
//! attention mask keeps, then L2 normalization. This is what sentence-transformers' `Pooling`
//! (mean mode) and `Normalize` compute after a BERT-style encoder, so the vectors come out
//! comparable with theirs: the same clamps (a token count of at least 1e-9, a norm of at least
//! 1e-12), sums in f64 whatever the encoder's dtype.
//!
//! ```
//! use kiln_runtime::pooling::mean_pool_normalize;
//!
//! // One sentence of 3 tokens (the last one padding), vectors of width 2.
//! let hidden = [3.0f32, 0.0, 1.0, 4.0, 100.0, 100.0];
//! let keep = [true, true, false];
//! let embeddings = mean_pool_normalize(&hidden, &keep, 3, 2)?;
//! // Mean of the kept tokens: (2, 2); normalized: (1/√2, 1/√2).
//! assert!((embeddings[0][0] - 0.5f64.sqrt()).abs() < 1e-12);
//! assert!((embeddings[0][1] - 0.5f64.sqrt()).abs() < 1e-12);
//! # Ok::<(), kiln_runtime::pooling::PoolingError>(())
//! ```

use thiserror::Error;

/// The encoder's output and the mask do not describe the same `[batch, seq]` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error(
    "pooling: {hidden} hidden values and {mask} mask values are not [batch, {seq}, {width}] \
     and [batch, {seq}] with seq and width at least 1"
)]
pub struct PoolingError {
    /// Values in the encoder's output.
    pub hidden: usize,
    /// Values in the mask.
    pub mask: usize,
    /// Tokens per sentence.
    pub seq: usize,
    /// Values per token.
    pub width: usize,
}

/// One embedding of `width` values per sentence: `hidden` is `[batch, seq, width]` row-major and
/// `keep` is `[batch, seq]`, true for the tokens that count (the attention mask's ones). A
/// sentence that keeps no token gets a zero vector, as sentence-transformers gives.
pub fn mean_pool_normalize<T: Copy + Into<f64>>(
    hidden: &[T],
    keep: &[bool],
    seq: usize,
    width: usize,
) -> Result<Vec<Vec<f64>>, PoolingError> {
    let whole_sentences = seq > 0 && width > 0 && keep.len().is_multiple_of(seq);
    if !whole_sentences || keep.len().checked_mul(width) != Some(hidden.len()) {
        return Err(PoolingError { hidden: hidden.len(), mask: keep.len(), seq, width });
    }
    let embeddings = keep
        .chunks_exact(seq)
        .zip(hidden.chunks_exact(seq * width))
        .map(|(kept, tokens)| {
            let mut sum = vec![0.0f64; width];
            let mut count = 0.0f64;
            for (_, token) in kept.iter().zip(tokens.chunks_exact(width)).filter(|(&k, _)| k) {
                for (acc, &x) in sum.iter_mut().zip(token) {
                    *acc += x.into();
                }
                count += 1.0;
            }
            let mean: Vec<f64> = sum.iter().map(|x| x / count.max(1e-9)).collect();
            let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            mean.iter().map(|x| x / norm).collect()
        })
        .collect();
    Ok(embeddings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_does_not_move_the_embedding() {
        let short = mean_pool_normalize(&[1.0f64, 2.0, 3.0, 5.0], &[true, true], 2, 2).unwrap();
        let padded =
            mean_pool_normalize(&[1.0f64, 2.0, 3.0, 5.0, -7.0, 9.0], &[true, true, false], 3, 2).unwrap();
        assert_eq!(short, padded);
        let norm: f64 = short[0].iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-15, "{norm}");
    }

    #[test]
    fn a_sentence_without_tokens_is_zero_and_its_neighbours_keep_their_own() {
        let hidden = [0.0f32, 0.0, 5.0, 5.0, 6.0, 8.0, 1.0, 1.0];
        let got = mean_pool_normalize(&hidden, &[false, false, true, false], 2, 2).unwrap();
        assert_eq!(got, [vec![0.0, 0.0], vec![0.6, 0.8]]);
    }

    #[test]
    fn shapes_that_disagree_are_refused() {
        let refused = |hidden: usize, mask: usize, seq, width| {
            mean_pool_normalize(&vec![0.0f32; hidden], &vec![true; mask], seq, width)
                == Err(PoolingError { hidden, mask, seq, width })
        };
        assert!(refused(12, 4, 2, 2), "hidden is not batch × seq × width");
        assert!(refused(15, 5, 2, 3), "the mask is not whole sentences");
        assert!(refused(0, 0, 0, 4), "seq 0");
        assert!(refused(0, 4, 2, 0), "width 0");
        assert_eq!(mean_pool_normalize::<f32>(&[], &[], 2, 3), Ok(vec![]));
    }
}
