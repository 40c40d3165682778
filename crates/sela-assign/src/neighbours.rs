//! Neighbour-averaged probabilities: before a head is solved, each row's softmax is replaced by
//! the mean softmax of its nearest rows in the embedding, so the label step sees what an image's
//! neighbourhood predicts rather than the image alone. The transport problem is unchanged; only
//! its input P is smoothed (P^λ of the mean, handed to the solver as log-probabilities).

use std::path::Path;

use anyhow::bail;
use sela_io::features;

/// Most (row, neighbour) pairs held at once: 8 bytes each while searching.
const MAX_PAIRS: usize = 1 << 28;

/// Probabilities below this are treated as this when taking logs (P^λ of it underflows anyway).
const FLOOR: f64 = 1e-30;

/// Every row's nearest rows in the embedding column of a features table.
#[derive(Debug, Clone)]
pub struct Neighbours {
    ids: Vec<u64>,
    /// Row-major `ids.len() × k` row indices, most similar first.
    lists: Vec<u32>,
    k: usize,
}

impl Neighbours {
    /// Reads the embedding column `column` of `features` and finds each row's `k` nearest rows
    /// by cosine similarity, itself included (exact search; `k` is capped at the row count).
    pub fn search(features: &Path, column: &str, k: usize) -> anyhow::Result<Self> {
        let matrix = features::read_matrix(features, column)?;
        let dim = matrix.cols;
        if dim == 0 {
            bail!(
                "{}: column `{column}` has length 0; neighbours need an embedding",
                features.display(),
            );
        }
        let rows = matrix.ids.len();
        if rows.saturating_mul(k.min(rows)) > MAX_PAIRS {
            bail!(
                "{}: {k} neighbours for each of {rows} rows would hold {} pairs in memory (at \
                 most {MAX_PAIRS}); ask for fewer neighbours",
                features.display(),
                rows.saturating_mul(k.min(rows))
            );
        }
        let nearest = sela_metrics::nearest_neighbours(&matrix.values, &matrix.values, dim, k);
        let k = nearest.first().map_or(0, Vec::len);
        Ok(Neighbours {
            ids: matrix.ids,
            lists: nearest.into_iter().flatten().collect(),
            k,
        })
    }

    /// Neighbours kept per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows searched.
    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    /// The ids of the rows searched, in order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// Row-major `rows × k` row indices of every row's neighbours, most similar first.
    pub fn lists(&self) -> &[u32] {
        &self.lists
    }

    /// The log of each row's softmax averaged over its neighbours, for `logits` (row-major,
    /// `ids.len() × cols`). `ids` must be the rows the neighbours were searched for, in order.
    pub fn averaged_log_probs(
        &self,
        ids: &[u64],
        logits: &[f32],
        cols: usize,
        context: &str,
    ) -> anyhow::Result<Vec<f32>> {
        same_rows(ids, &self.ids, context)?;
        let probs: Vec<f64> = logits.chunks(cols).flat_map(softmax).collect();
        let mut out = Vec::with_capacity(logits.len());
        let mut mean = vec![0.0f64; cols];
        for list in self.lists.chunks(self.k) {
            mean.iter_mut().for_each(|m| *m = 0.0);
            for &j in list {
                let row = &probs[j as usize * cols..(j as usize + 1) * cols];
                mean.iter_mut().zip(row).for_each(|(m, p)| *m += p);
            }
            let scale = 1.0 / list.len() as f64;
            out.extend(mean.iter().map(|&m| (m * scale).max(FLOOR).ln() as f32));
        }
        Ok(out)
    }
}

/// Fails unless a head's rows `ids` are the embedding's rows `embedding`, in order.
pub(crate) fn same_rows(ids: &[u64], embedding: &[u64], context: &str) -> anyhow::Result<()> {
    if ids != embedding {
        bail!(
            "{context}: the logits have {} rows and the embedding {}, or their ids differ; both \
             columns must come from the same features table",
            ids.len(),
            embedding.len()
        );
    }
    Ok(())
}

/// The softmax of one row of logits, in f64.
fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let exp: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(ids: Vec<u64>, lists: Vec<u32>, k: usize) -> Neighbours {
        Neighbours { ids, lists, k }
    }

    #[test]
    fn averages_the_softmax_of_the_neighbours() {
        // Row 0's neighbours are rows 0 and 1; row 1's are rows 1 and 2; row 2's only itself
        // twice. Softmax of [0, ln 3] is [1/4, 3/4]; of [ln 3, 0] is [3/4, 1/4].
        let nb = with(vec![7, 8, 9], vec![0, 1, 1, 2, 2, 2], 2);
        let l3 = 3f32.ln();
        let logits = [0.0, l3, l3, 0.0, 5.0, 5.0];
        let got = nb.averaged_log_probs(&[7, 8, 9], &logits, 2, "t").unwrap();
        let want = [0.5f64, 0.5, 0.625, 0.375, 0.5, 0.5].map(|p| p.ln() as f32);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn a_vanishing_probability_is_floored_not_minus_infinity() {
        let nb = with(vec![1], vec![0], 1);
        let got = nb.averaged_log_probs(&[1], &[0.0, -1e4], 2, "t").unwrap();
        assert_eq!(got[0], 0.0);
        assert_eq!(got[1], (FLOOR.ln()) as f32);
    }

    #[test]
    fn rows_must_match_the_embedding() {
        let nb = with(vec![1, 2], vec![0, 1], 1);
        let err = nb
            .averaged_log_probs(&[1, 3], &[0.0; 4], 2, "f.parquet: column `logits_0`")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f.parquet: column `logits_0`") && err.contains("ids differ"));
    }
}
