//! Speed of the evaluation's heavy parts at Fashion-MNIST scale (60k train, 10k test, 10
//! classes): weighted kNN against a naive scalar scan measured in the same run (on a subset of
//! the queries, scaled up), the label step's neighbour search (each training row's 50 nearest
//! training rows) against the same scan, and the linear probe's L-BFGS fit.
//!
//! `cargo bench -p sela-metrics --bench eval_speed [-- DIMS]` (DIMS: comma-separated embedding
//! sizes, default 128,512).

use std::time::Instant;

use sela_metrics::{
    accuracy, knn_classify, nearest_neighbours, KnnParams, LinearProbe, ProbeParams,
};

const TRAIN: usize = 60_000;
const TEST: usize = 10_000;
const CLASSES: usize = 10;
const BASELINE_QUERIES: usize = 200;

struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

/// Overlapping Gaussian classes around `means` with unit noise.
fn data(n: usize, dim: usize, means: &[f32], g: &mut Gen) -> (Vec<f32>, Vec<u32>) {
    let mut x = Vec::with_capacity(n * dim);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % CLASSES;
        x.extend((0..dim).map(|d| means[c * dim + d] + g.normal()));
        y.push(c as u32);
    }
    (x, y)
}

/// Neighbours the label step averages over (`assign.neighbours` in the pipelines).
const LABEL_NEIGHBOURS: usize = 50;

/// The obvious implementation: per query, every cosine similarity, partial sort, weighted vote.
fn naive_knn(bank: &[f32], labels: &[u32], q: &[f32], dim: usize, k: usize, t: f32) -> u32 {
    let sims = naive_nearest(bank, q, dim, k);
    let mut votes = [0f64; CLASSES];
    for &(s, i) in &sims {
        votes[labels[i] as usize] += (s as f64 / t as f64).exp();
    }
    (0..CLASSES).fold(0, |best, c| if votes[c] > votes[best] { c } else { best }) as u32
}

/// Every cosine similarity of `q` to the bank, partially sorted: the `k` best, unordered.
fn naive_nearest(bank: &[f32], q: &[f32], dim: usize, k: usize) -> Vec<(f32, usize)> {
    let qn = q.iter().map(|v| v * v).sum::<f32>().sqrt();
    let mut sims: Vec<(f32, usize)> = bank
        .chunks(dim)
        .enumerate()
        .map(|(i, b)| {
            let dot: f32 = b.iter().zip(q).map(|(a, c)| a * c).sum();
            let bn = b.iter().map(|v| v * v).sum::<f32>().sqrt();
            (dot / (bn * qn), i)
        })
        .collect();
    sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
    sims.truncate(k);
    sims
}

fn main() {
    let dims: Vec<usize> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.split(',').map(|d| d.parse().expect("dims")).collect())
        .unwrap_or_else(|| vec![128, 512]);
    println!(
        "eval_speed: {TRAIN} train × {TEST} test, {CLASSES} classes, {} threads",
        rayon::current_num_threads()
    );
    for dim in dims {
        let mut g = Gen(dim as u64);
        let spread = 0.35 * (128.0 / dim as f32).sqrt();
        let means: Vec<f32> = (0..CLASSES * dim).map(|_| spread * g.normal()).collect();
        let (train, train_y) = data(TRAIN, dim, &means, &mut g);
        let (test, test_y) = data(TEST, dim, &means, &mut g);

        let params = KnnParams {
            ks: vec![20, 200],
            temperature: 0.07,
        };
        let t = Instant::now();
        let preds = knn_classify(&train, &train_y, &test, dim, CLASSES, &params);
        let knn_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let naive: Vec<u32> = test
            .chunks(dim)
            .take(BASELINE_QUERIES)
            .map(|q| naive_knn(&train, &train_y, q, dim, 20, 0.07))
            .collect();
        let naive_s = t.elapsed().as_secs_f64() * (TEST as f64 / BASELINE_QUERIES as f64);
        let agree = accuracy(&preds[0][..BASELINE_QUERIES], &naive);
        println!(
            "D={dim:4} kNN (k=20 and 200 in one pass): {knn_s:6.2} s; naive scalar scan (k=20, \
             one thread, scaled from {BASELINE_QUERIES} queries): {naive_s:7.2} s; speed-up \
             {:.1}x; agreement with naive {:.3}; acc20 {:.4} acc200 {:.4}",
            naive_s / knn_s,
            agree,
            accuracy(&preds[0], &test_y),
            accuracy(&preds[1], &test_y),
        );

        let t = Instant::now();
        let lists = nearest_neighbours(&train, &train, dim, LABEL_NEIGHBOURS);
        let search_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut same = 0;
        for (q, list) in train.chunks(dim).zip(&lists).take(BASELINE_QUERIES) {
            let mut want: Vec<usize> = naive_nearest(&train, q, dim, LABEL_NEIGHBOURS)
                .into_iter()
                .map(|(_, i)| i)
                .collect();
            want.sort_unstable();
            let mut have: Vec<usize> = list.iter().map(|&i| i as usize).collect();
            have.sort_unstable();
            same += usize::from(want == have);
        }
        let naive_s = t.elapsed().as_secs_f64() * (TRAIN as f64 / BASELINE_QUERIES as f64);
        println!(
            "D={dim:4} label-step neighbours ({LABEL_NEIGHBOURS} per row, all {TRAIN} rows): \
             {search_s:6.2} s; naive scalar scan (one thread, scaled from {BASELINE_QUERIES} \
             rows): {naive_s:7.2} s; speed-up {:.1}x; same lists as naive for {same} of \
             {BASELINE_QUERIES} rows",
            naive_s / search_s,
        );

        let t = Instant::now();
        let probe = LinearProbe::fit(
            &train,
            &train_y,
            dim,
            CLASSES,
            &ProbeParams {
                max_iters: 100,
                l2: 1e-4,
            },
        );
        let fit_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let acc = accuracy(&probe.predict(&test), &test_y);
        let predict_s = t.elapsed().as_secs_f64();
        println!(
            "D={dim:4} linear probe: fit {fit_s:6.2} s ({} L-BFGS iterations, {:.3} s each), \
             predict {predict_s:.3} s; test acc {acc:.4}; objective {:.5}",
            probe.iterations,
            fit_s / probe.iterations.max(1) as f64,
            probe.objective
        );
    }
}
