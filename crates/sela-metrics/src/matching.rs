//! Optimal one-to-one matching (the Hungarian algorithm) and the cluster-to-class accuracies
//! built on it.

use crate::contingency::Contingency;

/// Minimum-cost assignment on a `rows × cols` cost matrix (row-major): each row gets at most one
/// column, each column at most one row, and `min(rows, cols)` pairs are made so that their total
/// cost is smallest. Returns, per row, its column (`None` for rows left over when rows > cols).
///
/// The shortest-augmenting-path form with row and column potentials, O(min² · max).
///
/// # Panics
/// If `cost.len() != rows * cols` or a cost is not finite.
pub fn hungarian(cost: &[f64], rows: usize, cols: usize) -> Vec<Option<usize>> {
    assert_eq!(cost.len(), rows * cols, "cost is not {rows}×{cols}");
    assert!(
        cost.iter().all(|c| c.is_finite()),
        "hungarian: costs must be finite"
    );
    if rows <= cols {
        return assign_rows(|i, j| cost[i * cols + j], rows, cols);
    }
    // More rows than columns: solve the transpose and invert the matching.
    let by_col = assign_rows(|j, i| cost[i * cols + j], cols, rows);
    let mut out = vec![None; rows];
    for (j, i) in by_col.into_iter().enumerate() {
        if let Some(i) = i {
            out[i] = Some(j);
        }
    }
    out
}

/// The core algorithm for n ≤ m: every one of the `n` rows is assigned a distinct column.
fn assign_rows(cost: impl Fn(usize, usize) -> f64, n: usize, m: usize) -> Vec<Option<usize>> {
    // 1-based internally; column 0 is a virtual column that holds the row being inserted.
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    let mut owner = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        owner[0] = i;
        let mut j0 = 0usize;
        let mut min_slack = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = owner[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0usize;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let slack = cost(i0 - 1, j - 1) - u[i0] - v[j];
                if slack < min_slack[j] {
                    min_slack[j] = slack;
                    way[j] = j0;
                }
                if min_slack[j] < delta {
                    delta = min_slack[j];
                    j1 = j;
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[owner[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_slack[j] -= delta;
                }
            }
            j0 = j1;
            if owner[j0] == 0 {
                break;
            }
        }
        // Flip the augmenting path.
        loop {
            let j1 = way[j0];
            owner[j0] = owner[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut out = vec![None; n];
    for j in 1..=m {
        if owner[j] != 0 {
            out[owner[j] - 1] = Some(j - 1);
        }
    }
    out
}

/// A one-to-one matching of predicted clusters to true classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassMatching {
    /// (cluster label, class label) pairs, by increasing cluster label.
    pub pairs: Vec<(u32, u32)>,
    /// Items whose cluster is matched to their own class.
    pub correct: u64,
    /// Items.
    pub n: u64,
}

impl ClassMatching {
    /// Share of items whose cluster is matched to their class (1.0 when there are no items).
    pub fn accuracy(&self) -> f64 {
        if self.n == 0 {
            1.0
        } else {
            self.correct as f64 / self.n as f64
        }
    }
}

impl Contingency {
    /// The one-to-one row ↔ column matching with the most items on matched cells (rows are
    /// predicted clusters, columns true classes). With more clusters than classes, the unmatched
    /// clusters' items count as wrong.
    pub fn best_matching(&self) -> ClassMatching {
        let (r, c) = (self.row_labels.len(), self.col_labels.len());
        let counts = self.dense();
        let cost: Vec<f64> = counts.iter().map(|&x| -(x as f64)).collect();
        let assignment = hungarian(&cost, r, c);
        let mut pairs = Vec::new();
        let mut correct = 0u64;
        for (i, j) in assignment.into_iter().enumerate() {
            if let Some(j) = j {
                pairs.push((self.row_labels[i], self.col_labels[j]));
                correct += counts[i * c + j];
            }
        }
        ClassMatching {
            pairs,
            correct,
            n: self.n,
        }
    }

    /// Share of items that belong to their row's most frequent column (1.0 when empty).
    pub fn purity(&self) -> f64 {
        if self.n == 0 {
            return 1.0;
        }
        let mut best = vec![0u64; self.row_labels.len()];
        for &(i, _, count) in &self.cells {
            best[i] = best[i].max(count);
        }
        best.iter().sum::<u64>() as f64 / self.n as f64
    }
}

/// Clustering accuracy: the share of items whose predicted cluster is matched to their true class
/// under the best one-to-one cluster ↔ class matching (Hungarian algorithm).
///
/// # Panics
/// If the slices differ in length.
pub fn matched_accuracy(pred: &[u32], truth: &[u32]) -> f64 {
    Contingency::new(pred, truth).best_matching().accuracy()
}

/// Purity: the share of items that belong to the majority class of their predicted cluster
/// (a many-to-one mapping, so it favours many clusters).
///
/// # Panics
/// If the slices differ in length.
pub fn purity(pred: &[u32], truth: &[u32]) -> f64 {
    Contingency::new(pred, truth).purity()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Every injective map of the smaller side into the larger one, by recursion.
    fn brute_force(cost: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(cost: &[f64], rows: usize, cols: usize, i: usize, used: &mut Vec<bool>) -> f64 {
            if i == rows {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..cols {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost[i * cols + j] + go(cost, rows, cols, i + 1, used));
                    used[j] = false;
                }
            }
            best
        }
        if rows <= cols {
            go(cost, rows, cols, 0, &mut vec![false; cols])
        } else {
            let mut t = vec![0.0; cost.len()];
            for i in 0..rows {
                for j in 0..cols {
                    t[j * rows + i] = cost[i * cols + j];
                }
            }
            go(&t, cols, rows, 0, &mut vec![false; rows])
        }
    }

    #[test]
    fn hungarian_matches_brute_force_on_random_matrices() {
        let mut s = 42u64;
        for trial in 0..300 {
            let rows = 1 + (next(&mut s) % 6) as usize;
            let cols = 1 + (next(&mut s) % 6) as usize;
            // Small integer costs make ties common, which exercises the tie handling.
            let range = if trial % 2 == 0 { 5 } else { 1000 };
            let cost: Vec<f64> = (0..rows * cols)
                .map(|_| (next(&mut s) % range) as f64 - (range / 2) as f64)
                .collect();
            let assignment = hungarian(&cost, rows, cols);
            let mut seen = vec![false; cols];
            let mut total = 0.0;
            for (i, j) in assignment.iter().enumerate() {
                if let Some(j) = *j {
                    assert!(!seen[j], "column {j} used twice");
                    seen[j] = true;
                    total += cost[i * cols + j];
                }
            }
            assert_eq!(
                assignment.iter().flatten().count(),
                rows.min(cols),
                "{rows}×{cols}"
            );
            assert_eq!(
                total,
                brute_force(&cost, rows, cols),
                "{rows}×{cols} {cost:?}"
            );
        }
    }

    #[test]
    fn known_assignment() {
        // The diagonal is the unique optimum: 1 + 2 + 3 = 6.
        let cost = [1.0, 9.0, 9.0, 9.0, 2.0, 9.0, 9.0, 9.0, 3.0];
        assert_eq!(hungarian(&cost, 3, 3), vec![Some(0), Some(1), Some(2)]);
        assert!(hungarian(&[], 0, 4).is_empty());
        assert_eq!(hungarian(&[], 2, 0), vec![None, None]);
    }

    #[test]
    fn matched_accuracy_and_purity_by_hand() {
        // clusters × classes:
        //        c0 c1 c2
        //   k0 [  3  1  0 ]
        //   k1 [  0  0  2 ]
        //   k2 [  2  0  0 ]
        // Best one-to-one: k0→c0 (3), k1→c2 (2), k2→c1 (0) = 5 of 8.
        // Purity: max per cluster 3 + 2 + 2 = 7 of 8.
        let pred = [0, 0, 0, 0, 1, 1, 2, 2];
        let truth = [0, 0, 0, 1, 2, 2, 0, 0];
        assert_eq!(matched_accuracy(&pred, &truth), 5.0 / 8.0);
        assert_eq!(purity(&pred, &truth), 7.0 / 8.0);
        let m = Contingency::new(&pred, &truth).best_matching();
        assert_eq!(m.pairs, vec![(0, 0), (1, 2), (2, 1)]);
        // A perfect clustering with permuted names.
        let renamed: Vec<u32> = truth.iter().map(|&t| [7, 3, 5][t as usize]).collect();
        assert_eq!(matched_accuracy(&renamed, &truth), 1.0);
        // More clusters than classes: the extra cluster's items are wrong under matching,
        // right under purity.
        let split = [0, 0, 1, 1, 2, 2, 3, 3];
        let truth2 = [0, 0, 0, 0, 1, 1, 1, 1];
        assert_eq!(matched_accuracy(&split, &truth2), 0.5);
        assert_eq!(purity(&split, &truth2), 1.0);
    }
}
