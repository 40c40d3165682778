//! The linear probe: multinomial logistic regression on frozen, standardised embeddings, fitted
//! by full-batch L-BFGS. Every reduction runs over fixed-size row chunks combined in order, so a
//! fit is reproducible bit for bit regardless of the number of threads.

use std::collections::VecDeque;

use rayon::prelude::*;

use crate::linalg::{matmul_ab, matmul_atb};

/// Rows per parallel work item.
const CHUNK: usize = 4096;
/// Curvature pairs kept by L-BFGS.
const MEMORY: usize = 10;
/// Stop when the largest gradient entry falls below this.
const GRAD_TOL: f64 = 1e-6;
/// Stop when an iteration improves the objective by less than this, relatively.
const REL_DECREASE_TOL: f64 = 1e-10;

/// Settings of [`LinearProbe::fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeParams {
    /// Most L-BFGS iterations (each one pass over the training set, plus line-search passes).
    pub max_iters: usize,
    /// L2 penalty λ on the weights (not the biases): the objective is the mean cross-entropy
    /// plus λ/2 · ‖W‖².
    pub l2: f64,
}

/// A fitted probe: the standardisation learnt from the training rows and the linear classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbe {
    dim: usize,
    classes: usize,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    /// dim × classes, row-major.
    weights: Vec<f32>,
    bias: Vec<f64>,
    /// L-BFGS iterations run.
    pub iterations: usize,
    /// Final value of the objective.
    pub objective: f64,
}

impl LinearProbe {
    /// Fits the probe on `x` (n×dim, row-major) with labels `< num_classes`.
    ///
    /// Features are standardised with the training mean and standard deviation (a constant
    /// feature becomes 0). The objective is strictly convex when `params.l2 > 0`.
    ///
    /// # Panics
    /// On inconsistent shapes, no rows, or a label out of range.
    pub fn fit(
        x: &[f32],
        labels: &[u32],
        dim: usize,
        num_classes: usize,
        params: &ProbeParams,
    ) -> Self {
        assert!(dim > 0 && num_classes > 0, "probe: empty shape");
        assert_eq!(x.len() % dim, 0, "probe: x is not n×{dim}");
        let n = x.len() / dim;
        assert!(n > 0, "probe: no training rows");
        assert_eq!(
            labels.len(),
            n,
            "probe: {n} rows but {} labels",
            labels.len()
        );
        assert!(
            labels.iter().all(|&l| (l as usize) < num_classes),
            "probe: label out of range 0..{num_classes}"
        );
        let (mean, inv_std) = moments(x, dim);
        let xs = standardise(x, dim, &mean, &inv_std);
        let problem = Problem {
            x: &xs,
            y: labels,
            dim,
            classes: num_classes,
            l2: params.l2,
        };
        let (theta, objective, iterations) = lbfgs(&problem, params.max_iters);
        let wlen = dim * num_classes;
        LinearProbe {
            dim,
            classes: num_classes,
            mean,
            inv_std,
            weights: theta[..wlen].iter().map(|&v| v as f32).collect(),
            bias: theta[wlen..].to_vec(),
            iterations,
            objective,
        }
    }

    /// The predicted class of every row of `x` (q×dim); ties go to the smallest class.
    pub fn predict(&self, x: &[f32]) -> Vec<u32> {
        assert_eq!(x.len() % self.dim, 0, "probe: x is not q×{}", self.dim);
        let xs = standardise(x, self.dim, &self.mean, &self.inv_std);
        let c = self.classes;
        xs.par_chunks(CHUNK * self.dim)
            .flat_map_iter(|chunk| {
                let m = chunk.len() / self.dim;
                let mut logits = vec![0.0f32; m * c];
                matmul_ab(chunk, &self.weights, m, c, self.dim, &mut logits);
                (0..m)
                    .map(|i| {
                        let row = &logits[i * c..(i + 1) * c];
                        let mut best = 0;
                        let mut best_v = f64::NEG_INFINITY;
                        for (j, &z) in row.iter().enumerate() {
                            let v = z as f64 + self.bias[j];
                            if v > best_v {
                                best_v = v;
                                best = j;
                            }
                        }
                        best as u32
                    })
                    .collect::<Vec<u32>>()
            })
            .collect()
    }
}

/// Per-feature mean and inverse standard deviation (1 for constant features), accumulated in
/// f64 in row order.
fn moments(x: &[f32], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let n = (x.len() / dim) as f64;
    let mut mean = vec![0.0f64; dim];
    for row in x.chunks(dim) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0f64; dim];
    for row in x.chunks(dim) {
        for ((s, &m), &v) in var.iter_mut().zip(&mean).zip(row) {
            let d = v as f64 - m;
            *s += d * d;
        }
    }
    let inv_std = var
        .iter()
        .map(|&s| {
            let sd = (s / n).sqrt();
            if sd > 1e-12 {
                1.0 / sd
            } else {
                1.0
            }
        })
        .collect();
    (mean, inv_std)
}

fn standardise(x: &[f32], dim: usize, mean: &[f64], inv_std: &[f64]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK * dim)
        .zip(x.par_chunks(CHUNK * dim))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_mut(dim).zip(xi.chunks(dim)) {
                for j in 0..dim {
                    orow[j] = ((xrow[j] as f64 - mean[j]) * inv_std[j]) as f32;
                }
            }
        });
    out
}

/// The training problem: standardised rows, labels and the penalty.
struct Problem<'a> {
    x: &'a [f32],
    y: &'a [u32],
    dim: usize,
    classes: usize,
    l2: f64,
}

impl Problem<'_> {
    fn len(&self) -> usize {
        self.dim * self.classes + self.classes
    }

    /// The objective and its gradient at `theta` = [W (dim×classes, row-major), b].
    fn evaluate(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let (d, c) = (self.dim, self.classes);
        let wlen = d * c;
        let w32: Vec<f32> = theta[..wlen].iter().map(|&v| v as f32).collect();
        let bias = &theta[wlen..];
        let partials: Vec<(f64, Vec<f32>, Vec<f64>)> = self
            .x
            .par_chunks(CHUNK * d)
            .zip(self.y.par_chunks(CHUNK))
            .map(|(xc, yc)| {
                let m = yc.len();
                let mut logits = vec![0.0f32; m * c];
                matmul_ab(xc, &w32, m, c, d, &mut logits);
                let mut loss = 0.0f64;
                let mut resid = vec![0.0f32; m * c];
                let mut gb = vec![0.0f64; c];
                let mut z = vec![0.0f64; c];
                for i in 0..m {
                    for j in 0..c {
                        z[j] = logits[i * c + j] as f64 + bias[j];
                    }
                    let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let lse = mx + z.iter().map(|&v| (v - mx).exp()).sum::<f64>().ln();
                    let yi = yc[i] as usize;
                    loss += lse - z[yi];
                    for j in 0..c {
                        let r = (z[j] - lse).exp() - if j == yi { 1.0 } else { 0.0 };
                        resid[i * c + j] = r as f32;
                        gb[j] += r;
                    }
                }
                let mut gw = vec![0.0f32; wlen];
                matmul_atb(xc, &resid, d, c, m, &mut gw);
                (loss, gw, gb)
            })
            .collect();
        let n = self.y.len() as f64;
        let mut loss = 0.0f64;
        let mut grad = vec![0.0f64; self.len()];
        for (l, gw, gb) in &partials {
            loss += l;
            for (g, &v) in grad[..wlen].iter_mut().zip(gw) {
                *g += v as f64;
            }
            for (g, &v) in grad[wlen..].iter_mut().zip(gb) {
                *g += v;
            }
        }
        let mut penalty = 0.0f64;
        for (g, &w) in grad[..wlen].iter_mut().zip(&theta[..wlen]) {
            *g = *g / n + self.l2 * w;
            penalty += w * w;
        }
        grad[wlen..].iter_mut().for_each(|g| *g /= n);
        (loss / n + 0.5 * self.l2 * penalty, grad)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimises the problem from θ = 0 with L-BFGS and a backtracking (Armijo) line search.
/// Returns θ, the objective and the iterations run.
fn lbfgs(problem: &Problem<'_>, max_iters: usize) -> (Vec<f64>, f64, usize) {
    let len = problem.len();
    let mut theta = vec![0.0f64; len];
    let (mut f, mut g) = problem.evaluate(&theta);
    let mut history: VecDeque<(Vec<f64>, Vec<f64>, f64)> = VecDeque::new();
    let mut iterations = 0;
    while iterations < max_iters {
        if g.iter().fold(0.0f64, |m, v| m.max(v.abs())) < GRAD_TOL {
            break;
        }
        // Two-loop recursion: direction = −H·g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        let gamma = match history.back() {
            Some((s, y, _)) => dot(s, y) / dot(y, y),
            None => 1.0 / dot(&g, &g).sqrt().max(1.0),
        };
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &dir);
        if slope >= 0.0 {
            // Not a descent direction (should not happen for convex problems): restart.
            history.clear();
            let scale = 1.0 / dot(&g, &g).sqrt().max(1.0);
            dir = g.iter().map(|v| -v * scale).collect();
            slope = dot(&g, &dir);
        }
        let mut step = 1.0;
        let mut accepted = None;
        for _ in 0..40 {
            let candidate: Vec<f64> = theta.iter().zip(&dir).map(|(t, d)| t + step * d).collect();
            let (fc, gc) = problem.evaluate(&candidate);
            if fc <= f + 1e-4 * step * slope {
                accepted = Some((candidate, fc, gc));
                break;
            }
            step *= 0.5;
        }
        iterations += 1;
        let Some((next, f_next, g_next)) = accepted else {
            break;
        };
        let s: Vec<f64> = next.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_next.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y).max(f64::MIN_POSITIVE) {
            if history.len() == MEMORY {
                history.pop_front();
            }
            history.push_back((s, y, 1.0 / sy));
        }
        let decrease = f - f_next;
        theta = next;
        f = f_next;
        g = g_next;
        if decrease <= REL_DECREASE_TOL * f.abs().max(1.0) {
            break;
        }
    }
    (theta, f, iterations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// Overlapping Gaussian-ish blobs: class c centred at 2·e_c, noise ±`spread`/2 per feature.
    fn blobs(n: usize, dim: usize, classes: usize, spread: f32, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut r = rng(seed);
        let mut x = Vec::with_capacity(n * dim);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % classes;
            for j in 0..dim {
                let centre = if j == c { 2.0 } else { 0.0 };
                x.push(centre + spread * r() + 3.0);
            }
            y.push(c as u32);
        }
        (x, y)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (dim, c) = (3, 4);
        let (x, y) = blobs(50, dim, c, 4.0, 1);
        let problem = Problem {
            x: &x,
            y: &y,
            dim,
            classes: c,
            l2: 0.1,
        };
        let mut r = rng(9);
        let theta: Vec<f64> = (0..problem.len()).map(|_| r() as f64).collect();
        let (_, g) = problem.evaluate(&theta);
        let eps = 1e-3;
        for i in 0..theta.len() {
            let mut plus = theta.clone();
            plus[i] += eps;
            let mut minus = theta.clone();
            minus[i] -= eps;
            let fd = (problem.evaluate(&plus).0 - problem.evaluate(&minus).0) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-3,
                "θ[{i}]: analytic {} vs numeric {fd}",
                g[i]
            );
        }
    }

    #[test]
    fn separable_classes_are_learnt() {
        let (dim, c) = (4, 3);
        let (x, y) = blobs(300, dim, c, 1.0, 2);
        let (xt, yt) = blobs(90, dim, c, 1.0, 3);
        let params = ProbeParams {
            max_iters: 100,
            l2: 1e-4,
        };
        let probe = LinearProbe::fit(&x, &y, dim, c, &params);
        assert_eq!(crate::knn::accuracy(&probe.predict(&x), &y), 1.0);
        assert_eq!(crate::knn::accuracy(&probe.predict(&xt), &yt), 1.0);
        assert!(probe.iterations > 1);
    }

    #[test]
    fn converges_to_the_stationary_point_and_is_reproducible() {
        // Overlapping classes with a real L2 penalty: a unique optimum where the gradient
        // vanishes. More rows than one chunk, to exercise the ordered reduction.
        let (dim, c) = (5, 3);
        let (x, y) = blobs(CHUNK + 500, dim, c, 6.0, 4);
        let params = ProbeParams {
            max_iters: 200,
            l2: 1e-2,
        };
        let a = LinearProbe::fit(&x, &y, dim, c, &params);
        let b = LinearProbe::fit(&x, &y, dim, c, &params);
        assert_eq!(a, b);
        let (mean, inv_std) = moments(&x, dim);
        let xs = standardise(&x, dim, &mean, &inv_std);
        let problem = Problem {
            x: &xs,
            y: &y,
            dim,
            classes: c,
            l2: params.l2,
        };
        let mut theta: Vec<f64> = a.weights.iter().map(|&w| w as f64).collect();
        theta.extend(&a.bias);
        let (f, g) = problem.evaluate(&theta);
        let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            gmax < 1e-4,
            "gradient {gmax} after {} iterations",
            a.iterations
        );
        // The objective at θ = 0 is ln(3); the fit must improve on it clearly.
        assert!(f < 3f64.ln() - 0.1, "objective {f}");
        let acc = crate::knn::accuracy(&a.predict(&x), &y);
        assert!(acc > 0.6 && acc < 1.0, "accuracy {acc}");
    }
}
