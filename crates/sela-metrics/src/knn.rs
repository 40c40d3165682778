//! Weighted k-nearest-neighbour classification on cosine similarity, as used to judge
//! self-supervised embeddings: each of the k most similar bank items votes for its class with
//! weight exp(similarity / T).

use rayon::prelude::*;

use crate::linalg::matmul_abt;

/// Queries per parallel work item.
const QUERY_BLOCK: usize = 256;
/// Bank rows per similarity block.
const BANK_BLOCK: usize = 2048;

/// Settings of [`knn_classify`].
#[derive(Debug, Clone, PartialEq)]
pub struct KnnParams {
    /// Neighbour counts to evaluate (one prediction set per value).
    pub ks: Vec<usize>,
    /// Temperature T of the vote weights exp(sim / T); must be positive.
    pub temperature: f32,
}

/// Classifies every query row by a weighted vote of its nearest bank rows.
///
/// `bank` (n×dim) and `queries` (q×dim) are row-major embeddings; they are L2-normalised here
/// (all-zero rows stay zero, similarity 0 to everything). `bank_labels[i] < num_classes`.
/// Neighbours are ranked by similarity, ties broken by bank row order; a vote tie goes to the
/// smallest class. Returns one prediction vector per entry of `params.ks`, in that order
/// (k larger than the bank uses the whole bank).
///
/// The work is split into fixed blocks of queries and bank rows, so the result does not depend
/// on the number of threads.
///
/// # Panics
/// On inconsistent shapes, a label out of range, or a non-positive temperature.
pub fn knn_classify(
    bank: &[f32],
    bank_labels: &[u32],
    queries: &[f32],
    dim: usize,
    num_classes: usize,
    params: &KnnParams,
) -> Vec<Vec<u32>> {
    assert!(dim > 0, "knn: dim must be positive");
    assert_eq!(bank.len() % dim, 0, "knn: bank is not n×{dim}");
    assert_eq!(queries.len() % dim, 0, "knn: queries are not q×{dim}");
    let n = bank.len() / dim;
    assert_eq!(
        bank_labels.len(),
        n,
        "knn: {n} bank rows but {} labels",
        bank_labels.len()
    );
    assert!(
        bank_labels.iter().all(|&l| (l as usize) < num_classes),
        "knn: bank label out of range 0..{num_classes}"
    );
    assert!(
        params.temperature > 0.0,
        "knn: temperature must be positive"
    );
    let k_max = params.ks.iter().copied().max().unwrap_or(0).min(n);
    let neighbours = ranked(bank, queries, dim, k_max);

    params
        .ks
        .iter()
        .map(|&k| {
            neighbours
                .iter()
                .map(|nb| {
                    vote(
                        &nb[..k.min(nb.len())],
                        bank_labels,
                        num_classes,
                        params.temperature,
                    )
                })
                .collect()
        })
        .collect()
}

/// The `k` nearest bank rows of every query row by cosine similarity, most similar first (ties
/// to the earlier bank row); `k` beyond the bank gives the whole bank. A query that is also in
/// the bank finds itself first unless an earlier row points the same way.
///
/// Exact: every query is compared with every bank row, in the same fixed blocks as
/// [`knn_classify`], so the result does not depend on the number of threads.
///
/// # Panics
/// When `dim` is 0 or a slice is not a whole number of rows.
pub fn nearest_neighbours(bank: &[f32], queries: &[f32], dim: usize, k: usize) -> Vec<Vec<u32>> {
    assert!(dim > 0, "nearest_neighbours: dim must be positive");
    assert_eq!(
        bank.len() % dim,
        0,
        "nearest_neighbours: bank is not n×{dim}"
    );
    assert_eq!(
        queries.len() % dim,
        0,
        "nearest_neighbours: queries are not q×{dim}"
    );
    ranked(bank, queries, dim, k.min(bank.len() / dim))
        .into_iter()
        .map(|nb| nb.into_iter().map(|(_, i)| i).collect())
        .collect()
}

/// Each query's `k` (≤ bank rows) most similar bank rows by cosine similarity, best first, with
/// their similarities: both sides L2-normalised, queries in parallel blocks.
fn ranked(bank: &[f32], queries: &[f32], dim: usize, k: usize) -> Vec<Vec<(f32, u32)>> {
    let bank = normalized(bank, dim);
    let queries = normalized(queries, dim);
    queries
        .par_chunks(QUERY_BLOCK * dim)
        .flat_map_iter(|block| nearest(block, &bank, dim, k))
        .collect()
}

/// Share of positions where `pred` equals `truth` (1.0 when empty).
pub fn accuracy(pred: &[u32], truth: &[u32]) -> f64 {
    assert_eq!(pred.len(), truth.len(), "accuracy: lengths differ");
    if pred.is_empty() {
        return 1.0;
    }
    let hits = pred.iter().zip(truth).filter(|(p, t)| p == t).count();
    hits as f64 / pred.len() as f64
}

/// Rows scaled to unit L2 norm (zero rows unchanged).
fn normalized(x: &[f32], dim: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_mut(dim) {
        let norm = row
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            let inv = (1.0 / norm) as f32;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    out
}

/// The `k` most similar bank rows of each query in `block`, best first.
fn nearest(block: &[f32], bank: &[f32], dim: usize, k: usize) -> Vec<Vec<(f32, u32)>> {
    let m = block.len() / dim;
    let n = bank.len() / dim;
    let mut tops: Vec<TopK> = (0..m).map(|_| TopK::new(k)).collect();
    if k == 0 {
        return vec![Vec::new(); m];
    }
    let mut sims = vec![0.0f32; m * BANK_BLOCK];
    for start in (0..n).step_by(BANK_BLOCK) {
        let rows = BANK_BLOCK.min(n - start);
        let sims = &mut sims[..m * rows];
        matmul_abt(
            block,
            &bank[start * dim..(start + rows) * dim],
            m,
            rows,
            dim,
            sims,
        );
        for (top, row) in tops.iter_mut().zip(sims.chunks(rows)) {
            top.offer_all(row, start as u32);
        }
    }
    tops.into_iter().map(TopK::into_sorted).collect()
}

/// The weighted vote of neighbours `nb` (best first).
fn vote(nb: &[(f32, u32)], labels: &[u32], num_classes: usize, temperature: f32) -> u32 {
    let mut votes = vec![0.0f64; num_classes];
    let inv_t = 1.0 / temperature as f64;
    for &(sim, i) in nb {
        votes[labels[i as usize] as usize] += (sim as f64 * inv_t).exp();
    }
    let mut best = 0usize;
    for (c, &v) in votes.iter().enumerate() {
        if v > votes[best] {
            best = c;
        }
    }
    best as u32
}

/// The k best (similarity, index) pairs seen so far: a binary min-heap whose root is the worst
/// kept pair. Candidates arrive in increasing index order, so a candidate only displaces the
/// root when strictly more similar (on equal similarity the earlier index wins).
struct TopK {
    k: usize,
    heap: Vec<(f32, u32)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            heap: Vec::with_capacity(k),
        }
    }

    /// Whether `a` ranks below `b` (lower similarity, or equal and later).
    fn worse(a: (f32, u32), b: (f32, u32)) -> bool {
        a.0 < b.0 || (a.0 == b.0 && a.1 > b.1)
    }

    fn offer_all(&mut self, sims: &[f32], first_index: u32) {
        let mut j = 0;
        while self.heap.len() < self.k && j < sims.len() {
            self.push((sims[j], first_index + j as u32));
            j += 1;
        }
        if j == sims.len() {
            return;
        }
        let mut threshold = self.heap[0].0;
        for (offset, &s) in sims[j..].iter().enumerate() {
            if s > threshold {
                self.replace_root((s, first_index + (j + offset) as u32));
                threshold = self.heap[0].0;
            }
        }
    }

    fn push(&mut self, item: (f32, u32)) {
        self.heap.push(item);
        let mut i = self.heap.len() - 1;
        while i > 0 {
            let parent = (i - 1) / 2;
            if Self::worse(self.heap[i], self.heap[parent]) {
                self.heap.swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
    }

    fn replace_root(&mut self, item: (f32, u32)) {
        self.heap[0] = item;
        let len = self.heap.len();
        let mut i = 0;
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut worst = i;
            if l < len && Self::worse(self.heap[l], self.heap[worst]) {
                worst = l;
            }
            if r < len && Self::worse(self.heap[r], self.heap[worst]) {
                worst = r;
            }
            if worst == i {
                break;
            }
            self.heap.swap(i, worst);
            i = worst;
        }
    }

    fn into_sorted(mut self) -> Vec<(f32, u32)> {
        self.heap
            .sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        self.heap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bank (2-D): (1,0) class 0; (0,1) class 1; (1,1) class 1; (-1,0) class 2.
    // Query (1, 0.1). Cosine similarities:
    //   (1,0):  1/√1.01            = 0.995037
    //   (0,1):  0.1/√1.01          = 0.099504
    //   (1,1):  1.1/(√2·√1.01)     = 0.773957
    //   (-1,0): −0.995037
    // k = 1: the nearest is (1,0) → class 0.
    // k = 3, T = 1:   class 0: e^0.995037 = 2.7048; class 1: e^0.099504 + e^0.773957
    //                 = 1.1046 + 2.1684 = 3.2730 → class 1.
    // k = 3, T = 0.1: class 0: e^9.95037 ≈ 20952; class 1: e^0.99504 + e^7.73957 ≈ 2298
    //                 → class 0.
    const BANK: [f32; 8] = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0];
    const LABELS: [u32; 4] = [0, 1, 1, 2];

    #[test]
    fn toy_votes_by_hand() {
        let query = [1.0, 0.1];
        let hot = KnnParams {
            ks: vec![1, 3, 4],
            temperature: 1.0,
        };
        assert_eq!(
            knn_classify(&BANK, &LABELS, &query, 2, 3, &hot),
            vec![vec![0], vec![1], vec![1]]
        );
        let cold = KnnParams {
            ks: vec![3],
            temperature: 0.1,
        };
        assert_eq!(
            knn_classify(&BANK, &LABELS, &query, 2, 3, &cold),
            vec![vec![0]]
        );
        // Scale does not matter (cosine); k beyond the bank uses the whole bank.
        let scaled: Vec<f32> = BANK.iter().map(|v| v * 7.0).collect();
        let big = KnnParams {
            ks: vec![1, 50],
            temperature: 1.0,
        };
        assert_eq!(
            knn_classify(&scaled, &LABELS, &[10.0, 1.0], 2, 3, &big),
            vec![vec![0], vec![1]]
        );
    }

    #[test]
    fn nearest_is_exact_across_blocks() {
        // More bank rows than one block and more queries than one block: compare the kept
        // neighbours against a full sort.
        let dim = 3;
        let n = BANK_BLOCK + 300;
        let q = QUERY_BLOCK + 5;
        let val = |i: usize| (((i * 2654435761) % 1000) as f32 / 500.0) - 1.0;
        let bank: Vec<f32> = (0..n * dim).map(val).collect();
        let queries: Vec<f32> = (0..q * dim).map(|i| val(i + 77)).collect();
        let bn = normalized(&bank, dim);
        let qn = normalized(&queries, dim);
        let k = 9;
        let got: Vec<Vec<(f32, u32)>> = qn
            .chunks(QUERY_BLOCK * dim)
            .flat_map(|b| nearest(b, &bn, dim, k))
            .collect();
        for (qi, nb) in got.iter().enumerate() {
            let mut all: Vec<(f32, u32)> = (0..n)
                .map(|i| {
                    let s = (0..dim)
                        .map(|d| qn[qi * dim + d] * bn[i * dim + d])
                        .sum::<f32>();
                    (s, i as u32)
                })
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<u32> = all[..k].iter().map(|p| p.1).collect();
            let have: Vec<u32> = nb.iter().map(|p| p.1).collect();
            // Similarities agree to rounding; compare the sets of the strictly separated ones.
            for (w, h) in all[..k].iter().zip(nb) {
                assert!((w.0 - h.0).abs() < 1e-5, "query {qi}: {want:?} vs {have:?}");
            }
        }
    }

    #[test]
    fn nearest_neighbours_ranks_by_cosine() {
        // Against the bank above: from (1, 0.1) the order is (1,0), (1,1), (0,1), (-1,0); from
        // (0.1, -3) it is (1,0) at 0.033, (-1,0) at -0.033, (1,1) at -0.683, (0,1) at -0.999.
        let got = nearest_neighbours(&BANK, &[1.0, 0.1, 0.1, -3.0], 2, 3);
        assert_eq!(got, vec![vec![0, 2, 1], vec![0, 3, 2]]);
        // Each bank row finds itself first; k beyond the bank keeps every row once.
        let own = nearest_neighbours(&BANK, &BANK, 2, 10);
        for (i, nb) in own.iter().enumerate() {
            assert_eq!(nb[0] as usize, i);
            let mut sorted = nb.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3]);
        }
    }

    #[test]
    fn clusters_are_recovered_and_results_are_reproducible() {
        // Three directions in 4-D with noise; queries drawn the same way.
        let dim = 4;
        let centres = [
            [1.0, 0.0, 0.0, 0.2],
            [0.0, 1.0, 0.2, 0.0],
            [0.0, 0.1, 0.0, 1.0],
        ];
        let mut s = 7u64;
        let mut noise = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.3
        };
        let mut make = |count: usize| {
            let mut x = Vec::new();
            let mut y = Vec::new();
            for i in 0..count {
                let c = i % 3;
                for &v in &centres[c] {
                    x.push(v + noise());
                }
                y.push(c as u32);
            }
            (x, y)
        };
        let (bank, labels) = make(600);
        let (queries, truth) = make(90);
        let params = KnnParams {
            ks: vec![5, 20],
            temperature: 0.07,
        };
        let preds = knn_classify(&bank, &labels, &queries, dim, 3, &params);
        for p in &preds {
            assert_eq!(accuracy(p, &truth), 1.0);
        }
        assert_eq!(
            preds,
            knn_classify(&bank, &labels, &queries, dim, 3, &params)
        );
    }
}
