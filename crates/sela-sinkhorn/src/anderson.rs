//! Anderson acceleration of the column-dual fixed point.
//!
//! A sweep at column log-duals x gives the plain Sinkhorn update G(x) = x + log t − log c(x),
//! c(x) the column sums of the row-normalised plan. Plain Sinkhorn-Knopp iterates x ← G(x),
//! which crawls when the plan is peaked (large λ) or the clusters are far from their target
//! sizes: its rate is the second eigenvalue of a matrix close to the identity. Anderson
//! acceleration (type II) keeps the last few pairs (x_i, f_i = G(x_i) − x_i) and steps to
//! x + f − (ΔX + ΔF)·γ, γ minimising ‖f − ΔF·γ‖₂: in the linear regime the residual is
//! minimised over a Krylov space, as GMRES does, at no extra sweep.
//!
//! Safeguards: a step whose error grows past [`GROWTH`] times that of the point it was taken
//! from is rejected: the history is cleared and the next point is the plain update from that
//! point instead, so a solve never does worse than plain iterations interleaved with rejected
//! steps. A
//! least-squares problem that is degenerate drops its nearly dependent columns (QR by modified
//! Gram–Schmidt). Everything is f64 arithmetic on K-vectors in a fixed order, so the same
//! column sums give the same iterates on every process and thread count.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

/// Iterates Anderson acceleration remembers by default.
pub const DEFAULT_MEMORY: usize = 5;
/// The largest memory accepted.
pub const MAX_MEMORY: usize = 32;
/// A step whose error exceeds this multiple of the error before it is rejected.
const GROWTH: f64 = 3.0;
/// A least-squares column whose part independent of the newer columns is below this fraction
/// of its norm is dropped.
const DEPENDENT: f64 = 1e-10;

/// How the column scaling moves from one sweep to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceleration {
    /// Plain Sinkhorn-Knopp: v ← t / s after every sweep.
    None,
    /// Anderson acceleration over the last `memory` updates (see the module documentation).
    Anderson {
        /// Differences of iterates kept (1..=[`MAX_MEMORY`]).
        memory: usize,
    },
}

impl Default for Acceleration {
    fn default() -> Self {
        Acceleration::Anderson {
            memory: DEFAULT_MEMORY,
        }
    }
}

impl fmt::Display for Acceleration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Acceleration::None => write!(f, "none"),
            Acceleration::Anderson { memory } => write!(f, "anderson:{memory}"),
        }
    }
}

impl FromStr for Acceleration {
    type Err = String;

    /// Parses `none`, `anderson` (memory [`DEFAULT_MEMORY`]) or `anderson:<memory>`.
    fn from_str(s: &str) -> Result<Self, String> {
        let memory = match s {
            "none" => return Ok(Acceleration::None),
            "anderson" => DEFAULT_MEMORY,
            _ => match s.strip_prefix("anderson:").map(str::parse::<usize>) {
                Some(Ok(m)) if (1..=MAX_MEMORY).contains(&m) => m,
                Some(_) => {
                    return Err(format!(
                        "`{s}`: the memory of `anderson:<memory>` must be a whole number from 1 \
                         to {MAX_MEMORY}"
                    ))
                }
                None => {
                    return Err(format!(
                        "`{s}` is not an acceleration: use `none`, `anderson` or \
                         `anderson:<memory>`"
                    ))
                }
            },
        };
        Ok(Acceleration::Anderson { memory })
    }
}

/// The state of Anderson acceleration within one solve.
#[derive(Debug)]
pub(crate) struct Anderson {
    memory: usize,
    /// The last iterates x_i and their residuals f_i, oldest first (at most memory + 1).
    xs: VecDeque<Vec<f64>>,
    fs: VecDeque<Vec<f64>>,
    /// The previous point's error and its plain update G(x).
    previous: Option<(f64, Vec<f64>)>,
    rejected: usize,
}

impl Anderson {
    pub(crate) fn new(memory: usize) -> Self {
        Anderson {
            memory: memory.clamp(1, MAX_MEMORY),
            xs: VecDeque::new(),
            fs: VecDeque::new(),
            previous: None,
            rejected: 0,
        }
    }

    /// Steps rejected because they made the error grow.
    pub(crate) fn rejected(&self) -> usize {
        self.rejected
    }

    /// The next iterate, given the current one `x`, its plain update `g` = G(x) and the error of
    /// the sweep at `x`.
    pub(crate) fn next(&mut self, x: &[f64], g: &[f64], error: f64) -> Vec<f64> {
        if let Some((before, g_before)) = self.previous.take() {
            if error > GROWTH * before {
                self.rejected += 1;
                self.xs.clear();
                self.fs.clear();
                return g_before;
            }
        }
        self.previous = Some((error, g.to_vec()));
        let f: Vec<f64> = g.iter().zip(x).map(|(g, x)| g - x).collect();
        if self.xs.len() == self.memory + 1 {
            self.xs.pop_front();
            self.fs.pop_front();
        }
        self.xs.push_back(x.to_vec());
        self.fs.push_back(f);
        let step = self.extrapolate(g);
        if step.iter().all(|v| v.is_finite()) {
            step
        } else {
            self.rejected += 1;
            self.xs.clear();
            self.fs.clear();
            g.to_vec()
        }
    }

    /// g − (ΔX + ΔF)·γ with γ the least-squares coefficients of the latest residual on ΔF.
    fn extrapolate(&self, g: &[f64]) -> Vec<f64> {
        let m = self.xs.len() - 1;
        let f = self.fs.back().expect("the current point was just pushed");
        // Differences, newest first: column c is (x, f)_{m−c} − (x, f)_{m−c−1}.
        let diff = |v: &VecDeque<Vec<f64>>, c: usize| -> Vec<f64> {
            let (a, b) = (&v[m - c], &v[m - c - 1]);
            a.iter().zip(b).map(|(a, b)| a - b).collect()
        };
        let dfs: Vec<Vec<f64>> = (0..m).map(|c| diff(&self.fs, c)).collect();
        let gamma = least_squares(&dfs, f);
        let mut out = g.to_vec();
        for (c, gam) in gamma.iter().enumerate() {
            if *gam == 0.0 {
                continue;
            }
            let dx = diff(&self.xs, c);
            for ((o, dx), df) in out.iter_mut().zip(&dx).zip(&dfs[c]) {
                *o -= gam * (dx + df);
            }
        }
        out
    }
}

/// γ minimising ‖b − Σ_c γ_c·a_c‖₂ by modified Gram–Schmidt, columns taken in order; a column
/// nearly dependent on the ones before it gets γ_c = 0.
fn least_squares(cols: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let m = cols.len();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(m);
    // r[i][c]: coefficient of q_i in column c; `kept[c]` the index of column c's own q.
    let mut r = vec![vec![0f64; m]; m];
    let mut kept: Vec<Option<usize>> = vec![None; m];
    for (c, col) in cols.iter().enumerate() {
        let norm = dot(col, col).sqrt();
        let mut w = col.clone();
        for (i, qi) in q.iter().enumerate() {
            let rij = dot(qi, &w);
            r[i][c] = rij;
            w.iter_mut().zip(qi).for_each(|(w, q)| *w -= rij * q);
        }
        let rest = dot(&w, &w).sqrt();
        if !(norm > 0.0 && rest > DEPENDENT * norm) {
            continue;
        }
        r[q.len()][c] = rest;
        kept[c] = Some(q.len());
        w.iter_mut().for_each(|w| *w /= rest);
        q.push(w);
    }
    // Solve R·γ = Qᵀb over the kept columns, by back substitution.
    let qb: Vec<f64> = q.iter().map(|qi| dot(qi, b)).collect();
    let mut gamma = vec![0f64; m];
    for c in (0..m).rev() {
        let Some(i) = kept[c] else { continue };
        let mut s = qb[i];
        for (c2, g) in gamma.iter().enumerate().skip(c + 1) {
            s -= r[i][c2] * g;
        }
        gamma[c] = s / r[i][c];
    }
    gamma
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("none".parse(), Ok(Acceleration::None));
        assert_eq!(
            "anderson".parse(),
            Ok(Acceleration::Anderson {
                memory: DEFAULT_MEMORY
            })
        );
        assert_eq!(
            "anderson:3".parse(),
            Ok(Acceleration::Anderson { memory: 3 })
        );
        for bad in ["anderson:0", "anderson:33", "anderson:x", "fast", ""] {
            let e = bad.parse::<Acceleration>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        for a in [Acceleration::None, Acceleration::Anderson { memory: 7 }] {
            assert_eq!(a.to_string().parse(), Ok(a));
        }
    }

    #[test]
    fn least_squares_solves_and_drops_dependent_columns() {
        let a = vec![vec![1.0, 0.0, 1.0], vec![0.0, 2.0, 0.0]];
        let b = [2.0, 4.0, 2.0];
        let g = least_squares(&a, &b);
        assert!(
            (g[0] - 2.0).abs() < 1e-12 && (g[1] - 2.0).abs() < 1e-12,
            "{g:?}"
        );
        // A repeated column gets no weight; the fit is still exact.
        let a = vec![
            vec![1.0, 1.0, 0.0],
            vec![2.0, 2.0, 0.0],
            vec![0.0, 0.0, 1.0],
        ];
        let g = least_squares(&a, &[3.0, 3.0, 1.0]);
        assert_eq!(g[1], 0.0);
        assert!(
            (g[0] - 3.0).abs() < 1e-12 && (g[2] - 1.0).abs() < 1e-12,
            "{g:?}"
        );
    }

    /// On a linear contraction G(x) = M·x + c in n dimensions, Anderson with memory ≥ n finds
    /// the fixed point in about n + 1 steps, where plain iteration needs hundreds.
    #[test]
    fn solves_a_slow_linear_fixed_point_in_few_steps() {
        let n = 4;
        let m = [
            [0.97, 0.01, 0.0, 0.0],
            [0.01, 0.95, 0.01, 0.0],
            [0.0, 0.01, 0.9, 0.02],
            [0.0, 0.0, 0.02, 0.6],
        ];
        let c = [1.0, -2.0, 0.5, 3.0];
        let g_of = |x: &[f64]| -> Vec<f64> {
            (0..n)
                .map(|i| (0..n).map(|j| m[i][j] * x[j]).sum::<f64>() + c[i])
                .collect()
        };
        let residual = |x: &[f64]| {
            g_of(x)
                .iter()
                .zip(x)
                .map(|(g, x)| (g - x).abs())
                .fold(0.0, f64::max)
        };
        let mut aa = Anderson::new(n);
        let mut x = vec![0.0; n];
        let mut steps = 0;
        while residual(&x) > 1e-9 {
            let g = g_of(&x);
            x = aa.next(&x, &g, residual(&x));
            steps += 1;
            assert!(steps <= n + 2, "not converged after {steps} steps: {x:?}");
        }
        let mut plain = vec![0.0; n];
        let mut plain_steps = 0;
        while residual(&plain) > 1e-9 {
            plain = g_of(&plain);
            plain_steps += 1;
        }
        assert!(plain_steps > 100 * steps, "{plain_steps} plain steps");
        assert_eq!(aa.rejected(), 0);
    }

    #[test]
    fn a_step_that_makes_the_error_grow_is_replaced_by_the_plain_one() {
        let mut aa = Anderson::new(3);
        let x1 = aa.next(&[0.0, 0.0], &[1.0, 1.0], 0.1);
        assert_eq!(x1, vec![1.0, 1.0]);
        let _ = aa.next(&[1.0, 1.0], &[1.5, 2.0], 0.05);
        let back = aa.next(&[9.0, 9.0], &[10.0, 10.0], 0.2);
        assert_eq!(back, vec![1.5, 2.0], "plain update of the point before");
        assert_eq!(aa.rejected(), 1);
        // After a restart the history holds only what comes next: a plain step.
        assert_eq!(aa.next(&[1.5, 2.0], &[1.7, 2.1], 0.01), vec![1.7, 2.1]);
    }
}
