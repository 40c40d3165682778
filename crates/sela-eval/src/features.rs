//! One split's features read whole: ids, embeddings and each head's logits.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use sela_io::features::{logits_column, open_parts, read_matrix, EMBEDDING};

/// A split's features, rows in file order.
#[derive(Debug, Clone)]
pub struct SplitFeatures {
    /// The features file, directory or glob.
    pub path: PathBuf,
    /// Row ids.
    pub ids: Vec<u64>,
    /// Embedding size D.
    pub dim: usize,
    /// Row-major n×D embeddings.
    pub embedding: Vec<f32>,
    /// Per head, row-major n×K_h logits.
    pub logits: Vec<Vec<f32>>,
    /// K of each head.
    pub head_sizes: Vec<usize>,
}

impl SplitFeatures {
    /// Reads `spec`, expecting the heads `head_sizes` (the pipeline config's `model.heads`).
    pub fn read(spec: &Path, head_sizes: &[usize]) -> Result<Self> {
        let (_, info) = open_parts(spec)?;
        if let Some(info) = &info {
            if info.layout.head_sizes != head_sizes {
                bail!(
                    "{}: the features have heads of sizes {:?}, but the pipeline config's \
                     model.heads is {:?}",
                    spec.display(),
                    info.layout.head_sizes,
                    head_sizes
                );
            }
        }
        let emb = read_matrix(spec, EMBEDDING)?;
        let mut logits = Vec::with_capacity(head_sizes.len());
        for (h, &k) in head_sizes.iter().enumerate() {
            let column = logits_column(h);
            let m = read_matrix(spec, &column)?;
            if m.cols != k {
                bail!(
                    "{}: column `{column}` has {} values per row, expected K = {k} (model.heads)",
                    spec.display(),
                    m.cols
                );
            }
            if m.ids != emb.ids {
                bail!(
                    "{}: column `{column}` rows are not in the same id order as `{EMBEDDING}`",
                    spec.display()
                );
            }
            logits.push(m.values);
        }
        Ok(SplitFeatures {
            path: spec.to_path_buf(),
            ids: emb.ids,
            dim: emb.cols,
            embedding: emb.values,
            logits,
            head_sizes: head_sizes.to_vec(),
        })
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Each row's argmax (ties to the lowest index) and its softmax probability.
pub fn argmax_softmax(logits: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    logits
        .chunks(k)
        .map(|row| {
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = j;
                }
            }
            let mx = row[best] as f64;
            let denom: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
            (best as u32, (1.0 / denom) as f32)
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_and_probability() {
        let (a, p) = argmax_softmax(&[0.0, 2.0, 1.0, 5.0, 5.0, 5.0], 3);
        assert_eq!(a, vec![1, 0]);
        let e = |x: f64| x.exp();
        let want = e(2.0) / (e(0.0) + e(2.0) + e(1.0));
        assert!((p[0] as f64 - want).abs() < 1e-6);
        assert!((p[1] - 1.0 / 3.0).abs() < 1e-6);
    }
}
