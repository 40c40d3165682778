//! Sparse contingency tables of two labelings and the metrics built on them.

/// The contingency table of two labelings of the same items, kept sparse.
///
/// Rows are the distinct labels of `a` in increasing order, columns those of
/// `b`; `cells` lists the non-zero counts sorted by (row, column). Every sum
/// over the table runs in that fixed order, so results are bit-for-bit
/// reproducible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contingency {
    /// Distinct labels of `a`, increasing.
    pub row_labels: Vec<u32>,
    /// Distinct labels of `b`, increasing.
    pub col_labels: Vec<u32>,
    /// Number of items per row.
    pub row_sums: Vec<u64>,
    /// Number of items per column.
    pub col_sums: Vec<u64>,
    /// Non-zero cells as (row index, column index, count), sorted.
    pub cells: Vec<(usize, usize, u64)>,
    /// Number of items.
    pub n: u64,
}

impl Contingency {
    /// Builds the table of two labelings.
    ///
    /// # Panics
    /// If `a` and `b` differ in length.
    pub fn new(a: &[u32], b: &[u32]) -> Self {
        assert_eq!(
            a.len(),
            b.len(),
            "labelings differ in length: {} vs {}",
            a.len(),
            b.len()
        );
        let row_labels = distinct(a);
        let col_labels = distinct(b);
        let mut pairs: Vec<(usize, usize)> = a
            .iter()
            .zip(b)
            .map(|(x, y)| (index_of(&row_labels, *x), index_of(&col_labels, *y)))
            .collect();
        pairs.sort_unstable();
        let mut cells: Vec<(usize, usize, u64)> = Vec::new();
        for (i, j) in pairs {
            match cells.last_mut() {
                Some(last) if last.0 == i && last.1 == j => last.2 += 1,
                _ => cells.push((i, j, 1)),
            }
        }
        Self::from_cells(row_labels, col_labels, cells)
    }

    /// The table of a dense row-major matrix of `rows × cols` counts, rows and columns labelled
    /// `0..rows` and `0..cols`; all-zero rows and columns are dropped, as [`Contingency::new`]
    /// never sees them.
    ///
    /// # Panics
    /// If `counts` does not hold `rows × cols` entries.
    pub fn from_dense(counts: &[u64], rows: usize, cols: usize) -> Self {
        assert_eq!(
            counts.len(),
            rows * cols,
            "a {rows} × {cols} table of counts"
        );
        let row_labels: Vec<u32> = (0..rows)
            .filter(|&i| counts[i * cols..(i + 1) * cols].iter().any(|&c| c > 0))
            .map(|i| i as u32)
            .collect();
        let col_labels: Vec<u32> = (0..cols)
            .filter(|&j| (0..rows).any(|i| counts[i * cols + j] > 0))
            .map(|j| j as u32)
            .collect();
        let mut cells = Vec::new();
        for (ri, &i) in row_labels.iter().enumerate() {
            for (ci, &j) in col_labels.iter().enumerate() {
                let c = counts[i as usize * cols + j as usize];
                if c > 0 {
                    cells.push((ri, ci, c));
                }
            }
        }
        Self::from_cells(row_labels, col_labels, cells)
    }

    /// The table of sorted non-zero `cells` (row index, column index, count).
    fn from_cells(
        row_labels: Vec<u32>,
        col_labels: Vec<u32>,
        cells: Vec<(usize, usize, u64)>,
    ) -> Self {
        let mut row_sums = vec![0u64; row_labels.len()];
        let mut col_sums = vec![0u64; col_labels.len()];
        for &(i, j, c) in &cells {
            row_sums[i] += c;
            col_sums[j] += c;
        }
        Contingency {
            n: row_sums.iter().sum(),
            row_labels,
            col_labels,
            row_sums,
            col_sums,
            cells,
        }
    }

    /// The table as a dense row-major matrix of counts (rows × columns).
    pub fn dense(&self) -> Vec<u64> {
        let cols = self.col_labels.len();
        let mut out = vec![0u64; self.row_labels.len() * cols];
        for &(i, j, c) in &self.cells {
            out[i * cols + j] = c;
        }
        out
    }
}

fn distinct(x: &[u32]) -> Vec<u32> {
    let mut v = x.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn index_of(sorted: &[u32], x: u32) -> usize {
    sorted
        .binary_search(&x)
        .expect("label comes from the same slice")
}

/// Shannon entropy (nats) of a distribution given by counts summing to `n`.
fn entropy<I: IntoIterator<Item = u64>>(counts: I, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let nf = n as f64;
    let s: f64 = counts
        .into_iter()
        .filter(|&c| c > 0)
        .map(|c| {
            let c = c as f64;
            c * c.ln()
        })
        .sum();
    (nf.ln() - s / nf).max(0.0)
}

/// Normalised mutual information of two labelings, normalised by the
/// arithmetic mean of their entropies (scikit-learn's default).
///
/// Two labelings that each put every item in one cluster, and two empty
/// labelings, score 1.0; a constant labeling against a non-constant one
/// scores 0.0. Invariant to renaming labels.
///
/// # Panics
/// If `a` and `b` differ in length.
pub fn nmi(a: &[u32], b: &[u32]) -> f64 {
    Contingency::new(a, b).nmi()
}

/// Adjusted Rand index of two labelings (Hubert & Arabie), computed exactly
/// in integer arithmetic up to the final division.
///
/// Identical partitions score 1.0 (including the degenerate cases of one
/// cluster each, all singletons, or no items); independent labelings score
/// about 0; it may be negative.
///
/// # Panics
/// If `a` and `b` differ in length.
pub fn ari(a: &[u32], b: &[u32]) -> f64 {
    Contingency::new(a, b).ari()
}

impl Contingency {
    /// Entropy (nats) of the row labeling.
    pub fn row_entropy(&self) -> f64 {
        entropy(self.row_sums.iter().copied(), self.n)
    }

    /// Entropy (nats) of the column labeling.
    pub fn col_entropy(&self) -> f64 {
        entropy(self.col_sums.iter().copied(), self.n)
    }

    /// Mutual information (nats) between rows and columns, as
    /// H(rows) + H(cols) − H(rows, cols), clamped at 0.
    pub fn mutual_information(&self) -> f64 {
        let joint = entropy(self.cells.iter().map(|c| c.2), self.n);
        (self.row_entropy() + self.col_entropy() - joint).max(0.0)
    }

    /// See [`nmi`].
    pub fn nmi(&self) -> f64 {
        let (r, c) = (self.row_labels.len(), self.col_labels.len());
        if (r == 1 && c == 1) || (r == 0 && c == 0) {
            return 1.0;
        }
        let mi = self.mutual_information();
        if mi == 0.0 {
            return 0.0;
        }
        let norm = (self.row_entropy() + self.col_entropy()) / 2.0;
        (mi / norm).min(1.0)
    }

    /// See [`ari`].
    pub fn ari(&self) -> f64 {
        let pairs = |c: u64| -> i128 {
            let c = c as i128;
            c * (c - 1) / 2
        };
        let total = pairs(self.n);
        let sum_cells: i128 = self.cells.iter().map(|c| pairs(c.2)).sum();
        let sum_rows: i128 = self.row_sums.iter().map(|&c| pairs(c)).sum();
        let sum_cols: i128 = self.col_sums.iter().map(|&c| pairs(c)).sum();
        // ARI = (Σ_ij − Σ_i Σ_j / T) / ((Σ_i + Σ_j)/2 − Σ_i Σ_j / T), times 2T.
        let num = 2 * (sum_cells * total - sum_rows * sum_cols);
        let den = (sum_rows + sum_cols) * total - 2 * sum_rows * sum_cols;
        if den == 0 {
            // Only when both partitions are all-singletons or both are one
            // cluster (or there are fewer than two items): identical.
            return 1.0;
        }
        num as f64 / den as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64, enough for test labelings.
    fn labels(n: usize, k: u32, seed: u64) -> Vec<u32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % k as u64) as u32
            })
            .collect()
    }

    // a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]; contingency (rows a, cols b):
    //   [2 1 0]
    //   [0 1 2]
    // Pairs: Σ_ij C(n_ij,2) = 1+1 = 2, Σ_i C(3,2) = 6, Σ_j C(2,2) = 3, C(6,2) = 15.
    // ARI = (2 − 6·3/15) / ((6+3)/2 − 6·3/15) = 0.8 / 3.3 = 8/33.
    // H(a) = ln 2, H(b) = ln 3, H(a,b) = (2/3) ln 3 + (1/3) ln 6,
    // so MI = (2/3) ln 2 and NMI = (2/3) ln 2 / ((ln 2 + ln 3)/2) = (4/3) ln 2 / ln 6.
    const A: [u32; 6] = [0, 0, 0, 1, 1, 1];
    const B: [u32; 6] = [0, 0, 1, 1, 2, 2];

    #[test]
    fn known_table_exact_values() {
        let t = Contingency::new(&A, &B);
        assert_eq!(t.dense(), vec![2, 1, 0, 0, 1, 2]);
        assert_eq!(t.row_sums, vec![3, 3]);
        assert_eq!(t.col_sums, vec![2, 2, 2]);
        assert!((ari(&A, &B) - 8.0 / 33.0).abs() < 1e-15);
        let expected_nmi = (4.0 / 3.0) * 2f64.ln() / 6f64.ln();
        assert!((nmi(&A, &B) - expected_nmi).abs() < 1e-12);
        assert!((t.mutual_information() - (2.0 / 3.0) * 2f64.ln()).abs() < 1e-12);
        // Symmetric.
        assert!((ari(&B, &A) - 8.0 / 33.0).abs() < 1e-15);
        assert!((nmi(&B, &A) - expected_nmi).abs() < 1e-12);
    }

    #[test]
    fn a_dense_table_gives_the_labelings_table() {
        let a = labels(2000, 6, 7);
        let b = labels(2000, 9, 8);
        let t = Contingency::new(&a, &b);
        let (rows, cols) = (t.row_labels.len(), t.col_labels.len());
        assert_eq!(Contingency::from_dense(&t.dense(), rows, cols), t);
        // Empty rows and columns are dropped: the table of A and B with a zero row and column.
        let padded = [2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 2];
        let p = Contingency::from_dense(&padded, 3, 4);
        let known = Contingency::new(&A, &B);
        assert_eq!((p.row_labels, p.col_labels), (vec![0, 2], vec![0, 2, 3]));
        assert_eq!((p.cells, p.n), (known.cells.clone(), 6));
        assert_eq!(Contingency::from_dense(&padded, 3, 4).nmi(), known.nmi());
    }

    #[test]
    fn identical_and_relabelled_labelings_score_one() {
        let a = labels(1000, 7, 1);
        assert_eq!(nmi(&a, &a), 1.0);
        assert_eq!(ari(&a, &a), 1.0);
        // A permutation of label names (and sparse, large label values).
        let perm = [900_000u32, 3, 17, 0, 5, 4_000_000_000, 2];
        let b: Vec<u32> = a.iter().map(|&x| perm[x as usize]).collect();
        assert!((nmi(&a, &b) - 1.0).abs() < 1e-12);
        assert_eq!(ari(&a, &b), 1.0);
    }

    #[test]
    fn relabelling_does_not_change_scores() {
        let a = labels(500, 5, 2);
        let b = labels(500, 4, 3);
        let b2: Vec<u32> = b.iter().map(|&x| 10 - x).collect();
        assert!((nmi(&a, &b) - nmi(&a, &b2)).abs() < 1e-12);
        assert_eq!(ari(&a, &b), ari(&a, &b2));
    }

    #[test]
    fn random_labelings_have_ari_near_zero() {
        let a = labels(20_000, 10, 4);
        let b = labels(20_000, 10, 5);
        let r = ari(&a, &b);
        assert!(r.abs() < 0.005, "ARI {r}");
        assert!(nmi(&a, &b) < 0.01);
    }

    #[test]
    fn degenerate_cases() {
        assert_eq!(nmi(&[], &[]), 1.0);
        assert_eq!(ari(&[], &[]), 1.0);
        assert_eq!(nmi(&[3, 3, 3], &[1, 1, 1]), 1.0);
        assert_eq!(ari(&[3, 3, 3], &[1, 1, 1]), 1.0);
        // One cluster against a real split: no information.
        assert_eq!(nmi(&[0, 0, 0, 0], &[0, 0, 1, 1]), 0.0);
        assert_eq!(ari(&[0, 0, 0, 0], &[0, 0, 1, 1]), 0.0);
        // All singletons on both sides.
        assert_eq!(ari(&[0, 1, 2, 3], &[3, 2, 1, 0]), 1.0);
        assert_eq!(nmi(&[0, 1, 2, 3], &[3, 2, 1, 0]), 1.0);
    }

    #[test]
    #[should_panic(expected = "differ in length")]
    fn length_mismatch_panics() {
        nmi(&[0, 1], &[0]);
    }
}
