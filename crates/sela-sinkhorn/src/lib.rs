//! Sinkhorn-Knopp for SeLa's label step.
//!
//! Given logits z (N×K, one row per image) and column marginals r (a cluster-size prior, uniform
//! 1/K by default), find the transport plan Q = diag(α)·P^λ·diag(β) with row sums 1/N and column
//! sums r, where P^λ ∝ exp(λ·(z − rowmax)), and read hard labels as the argmax of each row of Q.
//!
//! # Algorithm
//!
//! The kernel is stored in one f32 N×K matrix (the logits' own buffer, transformed in place).
//! Each iteration is one fused, parallel sweep over it: for every row, its normaliser
//! d_i = Σ_j K_ij·v_j and then its contribution K_ij/d_i to every column sum; the column
//! scaling is then updated, v_j ← N·r_j / s_j. Rows are split into chunks and blocks of 8
//! chunks whose sizes depend only on N ([`chunk_rows`], [`block_rows`]); each chunk's column sums
//! are f64, a block's chunk sums are added in chunk order, and the blocks' sums are added exactly
//! (fixed-point integers, rounded to f64 once), so results are bit-identical whatever the number
//! of threads, and whatever the number of processes the rows are split among. Products are
//! f32, sums f64.
//!
//! # Distributed solves
//!
//! [`Sinkhorn::distributed`] solves with the rows split among processes, each holding a range of
//! whole blocks ([`split_rows`]); the per-iteration column sums, the plan's measures and the
//! balancing's counts go through a [`Reduce`] (an all-reduce; [`Local`] for one process). Every
//! such combination is exact, so R processes reach the same bits as one.
//!
//! # Numerics
//!
//! With λ = 25–100 most entries of exp(λ(z − rowmax)) underflow f32, and a column that no row
//! favours can vanish entirely. Two devices keep every solve finite and exact:
//!
//! - **Log-encoded small entries.** An entry more than e^64 below its row's largest is stored as
//!   its (negative) log-relative value rather than as its value. Sweeps read negative entries as
//!   0; nothing is lost, because the value is still there when a rescaling makes it matter.
//! - **Absorption** (as POT's `sinkhorn_stabilized`). When the column scaling spreads over more
//!   than e^16, it is folded into the stored kernel (rows renormalised so each row's largest entry
//!   is 1) and reset to 1. A column whose every entry lies more than e^32 below its row's largest
//!   is lifted to e^−32 in the same way before any sweep. So every row's normaliser is at least
//!   e^−16, every column sum is positive, and no value is ever subnormal, infinite or NaN.
//!
//! [`Sinkhorn::path`] says whether any absorption was needed (`stabilized`) or not (`scaling`).
//!
//! # Convergence
//!
//! After a sweep the rows of the current plan sum exactly to their marginals; the error of a
//! sweep is the largest relative column error max_j |Σ_i Q_ij − r_j| / r_j. [`Sinkhorn::solve`]
//! stops when it is below `tol`, or after `max_iters` sweeps (then [`Solution::converged`] is
//! false). A non-finite error is an error, never a silent stop. A warm start from a previous
//! solve's column duals ([`Sinkhorn::log_beta`]) begins near the answer.
//!
//! Between sweeps the column scaling moves by Anderson acceleration of the plain update
//! ([`Acceleration`], the default; the `anderson` module documents it), which reaches the same
//! tolerance in several times fewer sweeps; [`Acceleration::None`] is plain Sinkhorn-Knopp. Only
//! the update of the K column duals differs: the sweep, the stopping rule and the plan read
//! from the final scaling are the same.
//!
//! # Limits
//!
//! N ≥ K is required: with fewer rows than clusters an equipartition must leave clusters empty,
//! which is a configuration mistake rather than something to solve. K = 1 is allowed (every row
//! gets label 0).

mod anderson;
mod balance;
mod exact;
mod math;
mod reduce;

use std::time::Instant;

use rayon::prelude::*;

use anderson::Anderson;
pub use anderson::{
    Acceleration, DEFAULT_MEMORY as DEFAULT_ANDERSON_MEMORY, MAX_MEMORY as MAX_ANDERSON_MEMORY,
};
use exact::ExactSums;
pub use reduce::{block_rows, chunk_rows, split_rows, Local, Reduce, Rows};

/// λ of the official ImageNet code.
pub const DEFAULT_LAMBDA: f64 = 25.0;
/// Default tolerance on the largest relative marginal error.
pub const DEFAULT_TOL: f64 = 1e-3;
/// Default iteration cap.
pub const DEFAULT_MAX_ITERS: usize = 1000;

/// Column scalings spreading over more than e^SPREAD are absorbed into the kernel.
const SPREAD: f64 = 16.0;
/// After an absorption every column has an entry within e^VISIBLE of its row's largest.
const VISIBLE: f64 = 32.0;

/// An error of the solver. Each names what was wrong and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SinkhornError {
    /// The logits are not an N×K matrix.
    #[error("{len} logits are not rows of K = {k} values")]
    Shape { len: usize, k: usize },
    /// K = 0 or N = 0.
    #[error("empty problem: N = {n} rows, K = {k} clusters")]
    Empty { n: usize, k: usize },
    /// N < K.
    #[error(
        "N = {n} rows is fewer than K = {k} clusters: an equipartition would leave clusters \
         empty; use fewer clusters or more rows"
    )]
    FewerRowsThanClusters { n: usize, k: usize },
    /// A logit is NaN or infinite.
    #[error("logit at row {row}, column {col} is {value}, not a finite number")]
    NonFinite { row: usize, col: usize, value: f32 },
    /// λ ≤ 0 or not finite.
    #[error("lambda must be a positive finite number, got {0}")]
    Lambda(f64),
    /// tol ≤ 0 or not finite.
    #[error("tol must be a positive finite number, got {0}")]
    Tolerance(f64),
    /// The column marginals are unusable.
    #[error("column marginals: {0}")]
    Marginals(String),
    /// The warm-start duals are unusable.
    #[error("warm start: {0}")]
    WarmStart(String),
    /// This process's rows do not fit the global rows of a distributed solve.
    #[error("rows: {0}")]
    Rows(String),
    /// The final pass produced a value it cannot sum (a bug, never silently ignored).
    #[error("measures of the plan: {0}")]
    Measures(String),
    /// A sweep produced a non-finite value (a bug, never silently ignored).
    #[error("iteration {iteration}: {message}")]
    Numerical { iteration: usize, message: String },
}

/// Result alias of the solver.
pub type Result<T, E = SinkhornError> = std::result::Result<T, E>;

/// The state of a solve after one iteration, for progress display.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// Iterations done (1-based).
    pub iteration: usize,
    /// Largest relative marginal error after this iteration.
    pub error: f64,
    /// Absorptions so far.
    pub absorptions: usize,
}

/// The outcome of [`Sinkhorn::solve`].
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// Iterations (sweeps) run by this call.
    pub iterations: usize,
    /// Whether the error fell below the tolerance.
    pub converged: bool,
    /// Largest relative marginal error of the final plan.
    pub error: f64,
    /// Absorptions since the kernel was built (construction included).
    pub absorptions: usize,
    /// Wall time of the iterations, seconds.
    pub seconds: f64,
    /// Anderson steps rejected (replaced by the plain update) because they made the error grow.
    pub rejected: usize,
}

/// Hard labels read from the plan, and measures of the plan. In a distributed solve `labels`
/// and `confidence` are this process's rows; every other field is over all rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Label of each row.
    pub labels: Vec<u32>,
    /// The row's entry of Q at its label, Q normalised to sum 1 over the row (for argmax labels,
    /// the row's largest).
    pub confidence: Vec<f32>,
    /// Largest relative error of the plan's row sums, |Σ_j Q_ij − 1/N|·N.
    pub row_error: f64,
    /// Largest relative error of the plan's column sums, |Σ_i Q_ij − r_j| / r_j.
    pub col_error: f64,
    /// Σ_ij Q_ij·log P_ij with Q of total mass 1 and P = softmax(z) per row.
    pub objective: f64,
    /// Mean entropy of the rows of Q (nats).
    pub entropy: f64,
    /// Rows per label.
    pub sizes: Vec<usize>,
}

/// Uniform column marginals.
pub fn uniform_marginals(k: usize) -> Vec<f64> {
    vec![1.0 / k as f64; k]
}

/// Column marginals r_k ∝ (k+1)^−a (a Zipf-like prior on cluster sizes), normalised.
pub fn power_marginals(k: usize, a: f64) -> Result<Vec<f64>> {
    if !a.is_finite() {
        return Err(SinkhornError::Marginals(format!(
            "power prior exponent must be finite, got {a}"
        )));
    }
    let w: Vec<f64> = (0..k).map(|i| ((i + 1) as f64).powf(-a)).collect();
    normalised(&w, k)
}

/// Checks marginals (K of them, finite, positive) and scales them to sum 1.
fn normalised(r: &[f64], k: usize) -> Result<Vec<f64>> {
    if r.len() != k {
        return Err(SinkhornError::Marginals(format!(
            "{} values for K = {k} clusters",
            r.len()
        )));
    }
    if let Some(j) = r.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
        return Err(SinkhornError::Marginals(format!(
            "cluster {j} has target share {}; every cluster needs a positive finite share",
            r[j]
        )));
    }
    let total: f64 = r.iter().sum();
    Ok(r.iter().map(|x| x / total).collect())
}

/// A Sinkhorn problem: the kernel of one head's logits, stored in place, and its current
/// scaling. See the crate documentation for the algorithm and numerics.
///
/// In a distributed solve (`C` other than [`Local`]) it holds this process's rows only; every
/// process makes the same calls in the same order.
pub struct Sinkhorn<C: Reduce = Local> {
    w: Vec<f32>,
    /// Rows of all processes (N).
    n: usize,
    /// This process's rows.
    rows: Rows,
    k: usize,
    lambda: f64,
    chunk_rows: usize,
    /// Column log-scaling absorbed into `w`.
    absorbed: Vec<f64>,
    /// Residual column scaling, largest 1; the plan's β is exp(absorbed)·v.
    v: Vec<f32>,
    /// Per row: log P_ij = (log-relative entry − absorbed_j)/λ + row_log_p_i.
    row_log_p: Vec<f64>,
    /// Target column sums of the last solve, in units where every row has mass 1.
    target: Vec<f64>,
    absorptions: usize,
    /// Scratch of the sweeps: each chunk's column sums.
    partials: Vec<f64>,
    acceleration: Acceleration,
    comm: C,
}

impl<C: Reduce> std::fmt::Debug for Sinkhorn<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinkhorn")
            .field("n", &self.n)
            .field("rows", &self.rows)
            .field("k", &self.k)
            .field("lambda", &self.lambda)
            .field("absorptions", &self.absorptions)
            .field("acceleration", &self.acceleration)
            .finish()
    }
}

impl Sinkhorn<Local> {
    /// Builds the kernel of `logits` (row-major N×K, consumed and transformed in place) for
    /// exponent `lambda`, optionally warm-started from column duals `warm_log_beta` (a previous
    /// solve's [`Sinkhorn::log_beta`], any additive normalisation). Fails on N < K, on N = 0 or
    /// K = 0, on λ ≤ 0, and on a non-finite logit (naming its row and column).
    pub fn new(
        logits: Vec<f32>,
        k: usize,
        lambda: f64,
        warm_log_beta: Option<&[f64]>,
    ) -> Result<Self> {
        let total = logits.len().checked_div(k).unwrap_or(0);
        Self::distributed(
            logits,
            k,
            lambda,
            warm_log_beta,
            Rows { first: 0, total },
            Local,
        )
    }
}

impl<C: Reduce> Sinkhorn<C> {
    /// [`Sinkhorn::new`] for rows split among processes: `logits` are this process's rows,
    /// global rows `rows.first..` of `rows.total`, which must start at a multiple of
    /// [`block_rows`]`(rows.total)` and end at one or at the last row ([`split_rows`] gives such
    /// ranges; a process may hold no rows). `comm` combines the processes' partial results.
    /// Errors name global rows; every process returns the same error.
    pub fn distributed(
        logits: Vec<f32>,
        k: usize,
        lambda: f64,
        warm_log_beta: Option<&[f64]>,
        rows: Rows,
        comm: C,
    ) -> Result<Self> {
        let n = rows.total;
        if k == 0 || n == 0 {
            return Err(SinkhornError::Empty { n, k });
        }
        let (cr, br) = (chunk_rows(n), block_rows(n));
        let local = logits.len() / k;
        // This process's own problems; the others learn of them below.
        let mine = if logits.len() % k != 0 {
            Some(SinkhornError::Shape {
                len: logits.len(),
                k,
            })
        } else if rows.first + local > n
            || (local > 0 && rows.first % br != 0)
            || (rows.first + local != n && local % br != 0)
        {
            Some(SinkhornError::Rows(format!(
                "rows {}..{} of {n} are not whole blocks of {br} rows",
                rows.first,
                rows.first + local
            )))
        } else {
            None
        };
        // Problems of the shared inputs are the same on every process.
        let warm = warm_start(warm_log_beta, k);
        let shared = if n < k {
            Some(SinkhornError::FewerRowsThanClusters { n, k })
        } else if comm.ranks() > exact::MAX_PROCESSES {
            Some(SinkhornError::Rows(format!(
                "{} processes; at most {} can add their sums exactly",
                comm.ranks(),
                exact::MAX_PROCESSES
            )))
        } else if !(lambda.is_finite() && lambda > 0.0) {
            Some(SinkhornError::Lambda(lambda))
        } else {
            warm.as_ref().err().cloned()
        };
        if let Some(e) = shared {
            return Err(mine.unwrap_or(e));
        }
        // The kernel is built in place; the first row with a non-finite logit stops its chunk
        // and is left as it was, so its value can be reported.
        let g0 = warm?;
        let mut w = logits;
        let mut row_log_p = vec![0.0; local];
        let (mut colmax, bad) = match &mine {
            None => rows_pass(&mut w, &mut row_log_p, k, cr, |w, out| {
                math::build_rows(w, k, lambda, &g0, out)
            }),
            Some(_) => (vec![f64::NEG_INFINITY; k], None),
        };
        // [any process's own problem, −(first global row with a non-finite logit)]
        let mut probe = [
            if mine.is_some() { 1.0 } else { 0.0 },
            bad.map_or(f64::NEG_INFINITY, |(r, _)| -((rows.first + r) as f64)),
        ];
        comm.max_f64(&mut probe);
        if probe[0] > 0.0 {
            return Err(mine.unwrap_or_else(|| {
                SinkhornError::Rows("another process's rows are unusable".to_string())
            }));
        }
        if probe[1] > f64::NEG_INFINITY {
            let row = (-probe[1]) as usize;
            let mut found = [0i64; 2];
            if let Some((r, col)) = bad.filter(|&(r, _)| rows.first + r == row) {
                found = [col as i64, w[r * k + col].to_bits() as i64];
            }
            comm.sum_i64(&mut found);
            return Err(SinkhornError::NonFinite {
                row,
                col: found[0] as usize,
                value: f32::from_bits(found[1] as u32),
            });
        }
        comm.max_f64(&mut colmax);
        let mut s = Sinkhorn {
            w,
            n,
            rows,
            k,
            lambda,
            chunk_rows: cr,
            absorbed: g0,
            v: vec![1.0; k],
            row_log_p,
            target: uniform_marginals(k).iter().map(|r| r * n as f64).collect(),
            absorptions: 0,
            partials: vec![0.0; local.div_ceil(cr) * k],
            acceleration: Acceleration::default(),
            comm,
        };
        s.ensure_visible(&colmax);
        Ok(s)
    }

    /// Uses `acceleration` for the column updates of later solves (default: Anderson with
    /// memory [`DEFAULT_ANDERSON_MEMORY`]).
    pub fn with_acceleration(mut self, acceleration: Acceleration) -> Self {
        self.acceleration = acceleration;
        self
    }

    /// How the column scaling is updated between sweeps.
    pub fn acceleration(&self) -> Acceleration {
        self.acceleration
    }

    /// Rows N (of all processes).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Where this process's rows lie among all rows.
    pub fn rows(&self) -> Rows {
        self.rows
    }

    /// Rows held by this process (N when solving alone).
    pub fn local_rows(&self) -> usize {
        self.row_log_p.len()
    }

    /// Clusters K.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The exponent λ.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// Absorptions of the column scaling into the kernel so far (see the crate documentation).
    pub fn absorptions(&self) -> usize {
        self.absorptions
    }

    /// `scaling` when the plain scaling iteration sufficed, `stabilized` when the column scaling
    /// had to be absorbed into the kernel at least once.
    pub fn path(&self) -> &'static str {
        if self.absorptions == 0 {
            "scaling"
        } else {
            "stabilized"
        }
    }

    /// Iterates from the current scaling towards column sums ∝ `marginals` (K positive values,
    /// normalised here) until the largest relative marginal error is below `tol` or `max_iters`
    /// iterations have run. `observe` sees every iteration. Can be called again to go on.
    pub fn solve(
        &mut self,
        marginals: &[f64],
        tol: f64,
        max_iters: usize,
        mut observe: impl FnMut(&Step),
    ) -> Result<Solution> {
        if !(tol.is_finite() && tol > 0.0) {
            return Err(SinkhornError::Tolerance(tol));
        }
        let n = self.n as f64;
        self.target = normalised(marginals, self.k)?
            .into_iter()
            .map(|r| r * n)
            .collect();
        let start = Instant::now();
        let mut anderson = match self.acceleration {
            Acceleration::None => None,
            Acceleration::Anderson { memory } => Some(Anderson::new(memory)),
        };
        let mut iterations = 0;
        let mut error = f64::INFINITY;
        let mut converged = false;
        while iterations < max_iters {
            let x = anderson.as_ref().map(|_| self.log_dual());
            let sums = self.sweep();
            iterations += 1;
            if sums.bad() > 0 {
                return Err(SinkhornError::Numerical {
                    iteration: iterations,
                    message: format!(
                        "{} partial column sums are not finite or out of range",
                        sums.bad()
                    ),
                });
            }
            let s = sums.values();
            error = col_error(&self.v, &s, &self.target);
            if let Some(j) = s.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(SinkhornError::Numerical {
                    iteration: iterations,
                    message: format!("column {j} sums to {}", s[j]),
                });
            }
            if !error.is_finite() {
                return Err(SinkhornError::Numerical {
                    iteration: iterations,
                    message: format!("marginal error is {error}"),
                });
            }
            observe(&Step {
                iteration: iterations,
                error,
                absorptions: self.absorptions,
            });
            if error < tol {
                converged = true;
                break;
            }
            if iterations == max_iters {
                break;
            }
            // The plain update, relative to the absorbed scaling: v ← t / s.
            let mut lv: Vec<f64> = self
                .target
                .iter()
                .zip(&s)
                .map(|(t, s)| t.ln() - s.ln())
                .collect();
            if let (Some(aa), Some(x)) = (anderson.as_mut(), x) {
                let g: Vec<f64> = self.absorbed.iter().zip(&lv).map(|(a, l)| a + l).collect();
                let next = aa.next(&x, &g, error);
                for ((l, n), a) in lv.iter_mut().zip(&next).zip(&self.absorbed) {
                    *l = n - a;
                }
            }
            self.update(lv);
        }
        Ok(Solution {
            iterations,
            converged,
            error,
            absorptions: self.absorptions,
            seconds: start.elapsed().as_secs_f64(),
            rejected: anderson.map_or(0, |a| a.rejected()),
        })
    }

    /// Hard labels (each row's argmax of Q, lowest cluster on ties) and measures of the current
    /// plan, in one parallel pass. Fails only if a measure's partial sums are not finite or out
    /// of the exact accumulator's range (beyond λ times any f32 logit).
    pub fn assign(&self) -> Result<Assignment> {
        let k = self.k;
        let ln_v: Vec<f32> = self.v.iter().map(|&x| x.ln()).collect();
        let g_over_lambda: Vec<f32> = self
            .absorbed
            .iter()
            .map(|g| (g / self.lambda) as f32)
            .collect();
        let ctx = math::AssignCtx {
            k,
            v: &self.v,
            ln_v: &ln_v,
            g_over_lambda: &g_over_lambda,
            inv_lambda: (1.0 / self.lambda) as f32,
        };
        let local = self.local_rows();
        let mut labels = vec![0u32; local];
        let mut confidence = vec![0f32; local];
        let cr = self.chunk_rows;
        // Per chunk: its column sums of Q, then its entropy and objective; added exactly.
        let mut parts = vec![0f64; local.div_ceil(cr) * (k + 2)];
        let mut row_errors = vec![0f64; local.div_ceil(cr)];
        self.w
            .par_chunks(cr * k)
            .zip(self.row_log_p.par_chunks(cr))
            .zip(labels.par_chunks_mut(cr))
            .zip(confidence.par_chunks_mut(cr))
            .zip(parts.par_chunks_mut(k + 2))
            .zip(row_errors.par_iter_mut())
            .for_each(|(((((w, lp), lab), conf), part), row_error)| {
                let (mut q, mut lnw) = (vec![0f32; k], vec![0f32; k]);
                let (cq, rest) = part.split_at_mut(k);
                let t = math::assign_rows(w, &ctx, lp, lab, conf, cq, (&mut q, &mut lnw));
                rest.copy_from_slice(&[t.entropy, t.objective]);
                *row_error = t.row_error;
            });
        let mut sums = ExactSums::new(k + 2);
        sums.add_columns(block_sums(&mut parts, k + 2));
        let row_error = row_errors.iter().fold(0f64, |a, &b| a.max(b));
        let mut sizes = vec![0i64; k];
        for &l in &labels {
            sizes[l as usize] += 1;
        }
        let mut row_error = [row_error];
        self.comm.sum_i64(sums.as_mut_slice());
        sums.normalise();
        self.comm.sum_i64(&mut sizes);
        self.comm.max_f64(&mut row_error);
        if sums.bad() > 0 {
            return Err(SinkhornError::Measures(format!(
                "{} partial sums of the plan's column sums, entropy or objective are not finite \
                 or out of range",
                sums.bad()
            )));
        }
        let colsum = sums.values();
        let n = self.n as f64;
        Ok(Assignment {
            labels,
            confidence,
            row_error: row_error[0],
            col_error: colsum[..k]
                .iter()
                .zip(&self.target)
                .map(|(s, t)| ((s - t) / t).abs())
                .fold(0.0, f64::max),
            objective: colsum[k + 1] / n,
            entropy: colsum[k] / n,
            sizes: sizes.iter().map(|&c| c as usize).collect(),
        })
    }

    /// Row `i` of this process's rows of the current plan, normalised to sum 1.
    pub fn plan_row(&self, i: usize) -> Vec<f64> {
        let row = &self.w[i * self.k..(i + 1) * self.k];
        let d = math::dot_pos(row, &self.v);
        let ln_d = d.ln();
        row.iter()
            .zip(&self.v)
            .map(|(&x, &v)| {
                if x > 0.0 {
                    (x * v) as f64 / d
                } else {
                    (x as f64 + (v as f64).ln() - ln_d).exp()
                }
            })
            .collect()
    }

    /// The plan's column duals log β (largest 0): the warm start of a later solve.
    pub fn log_beta(&self) -> Vec<f64> {
        let lb = self.log_dual();
        let top = lb.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        lb.iter().map(|x| x - top).collect()
    }

    /// The chunk-wise reading of the stored matrix that a sweep's memory traffic is compared
    /// against (one parallel read of this process's values, summed). For benchmarks.
    pub fn stream_read(&self) -> f64 {
        let parts: Vec<f64> = self
            .w
            .par_chunks(self.chunk_rows * self.k)
            .map(math::stream_sum)
            .collect();
        parts.iter().sum()
    }

    /// One sweep: the column sums Σ_i K_ij / d_i of the plan with rows scaled to mass 1, over
    /// all processes' rows, exactly accumulated.
    fn sweep(&mut self) -> ExactSums {
        let k = self.k;
        let v = &self.v;
        self.w
            .par_chunks(self.chunk_rows * k)
            .zip(self.partials.par_chunks_mut(k))
            .for_each(|(w, out)| {
                let mut acc = vec![0f32; k];
                math::sweep_rows(w, k, v, &mut acc, out);
            });
        let mut sums = ExactSums::new(k);
        sums.add_columns(block_sums(&mut self.partials, k));
        self.comm.sum_i64(sums.as_mut_slice());
        sums.normalise();
        sums
    }

    /// The column duals the next sweep uses, log β = absorbed + ln v (any additive constant).
    fn log_dual(&self) -> Vec<f64> {
        self.absorbed
            .iter()
            .zip(&self.v)
            .map(|(g, &v)| g + (v as f64).ln())
            .collect()
    }

    /// Sets the column scaling to ln v = `lv` (relative to the absorbed scaling, any additive
    /// constant), absorbed into the kernel when it spreads too far.
    fn update(&mut self, mut lv: Vec<f64>) {
        let top = lv.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        lv.iter_mut().for_each(|x| *x -= top);
        let low = lv.iter().fold(f64::INFINITY, |a, &b| a.min(b));
        if -low > SPREAD {
            let colmax = self.absorb(&lv);
            self.ensure_visible(&colmax);
        } else {
            for (v, l) in self.v.iter_mut().zip(&lv) {
                *v = l.exp() as f32;
            }
        }
    }

    /// Folds a column log-scaling into the stored kernel and resets v to 1. Returns each
    /// column's largest log-relative entry over all processes' rows.
    fn absorb(&mut self, shift: &[f64]) -> Vec<f64> {
        let (k, lambda) = (self.k, self.lambda);
        let (mut colmax, _) = rows_pass(
            &mut self.w,
            &mut self.row_log_p,
            k,
            self.chunk_rows,
            |w, out| {
                math::absorb_rows(w, k, lambda, shift, out);
                None
            },
        );
        self.comm.max_f64(&mut colmax);
        for (g, s) in self.absorbed.iter_mut().zip(shift) {
            *g += s;
        }
        self.v.fill(1.0);
        self.absorptions += 1;
        colmax
    }

    /// Lifts every column whose entries all lie more than e^VISIBLE below their rows' largest
    /// to exactly e^−VISIBLE. Such a lift changes no row's largest entry.
    fn ensure_visible(&mut self, colmax: &[f64]) {
        let lift: Vec<f64> = colmax.iter().map(|&m| (-VISIBLE - m).max(0.0)).collect();
        if lift.iter().any(|&x| x > 0.0) {
            self.absorb(&lift);
        }
    }
}

/// Checks warm-start duals (K finite values) and shifts them so the largest is 0; zeros without.
fn warm_start(g: Option<&[f64]>, k: usize) -> Result<Vec<f64>> {
    let Some(g) = g else {
        return Ok(vec![0.0; k]);
    };
    if g.len() != k {
        return Err(SinkhornError::WarmStart(format!(
            "{} column duals for K = {k} clusters",
            g.len()
        )));
    }
    if let Some(j) = g.iter().position(|x| !x.is_finite()) {
        return Err(SinkhornError::WarmStart(format!(
            "dual of cluster {j} is {}",
            g[j]
        )));
    }
    let top = g.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    Ok(g.iter().map(|x| x - top).collect())
}

/// Runs `f` on every chunk of rows in parallel, each with its row offsets, a K-vector for its
/// column maxima and scratch; returns the column maxima over all rows, and the first
/// (row, column) any chunk's `f` reported, the row counted from the first row of `w`.
fn rows_pass(
    w: &mut [f32],
    row_log_p: &mut [f64],
    k: usize,
    chunk_rows: usize,
    f: impl Fn(&mut [f32], math::RowInit<'_>) -> Option<(usize, usize)> + Sync + Send,
) -> (Vec<f64>, Option<(usize, usize)>) {
    let chunks = w.len().div_ceil(chunk_rows * k);
    let mut colmax = vec![f32::NEG_INFINITY; chunks * k];
    let mut found: Vec<Option<(usize, usize)>> = vec![None; chunks];
    w.par_chunks_mut(chunk_rows * k)
        .zip(row_log_p.par_chunks_mut(chunk_rows))
        .zip(colmax.par_chunks_mut(k))
        .zip(found.par_iter_mut())
        .enumerate()
        .for_each(|(c, (((w, lp), cm), found))| {
            let mut rel = vec![0f64; k];
            let mut tmp = vec![0f32; k];
            let out = math::RowInit {
                row_log_p: lp,
                colmax: cm,
                rel: &mut rel,
                tmp: &mut tmp,
            };
            *found = f(w, out).map(|(r, col)| (c * chunk_rows + r, col));
        });
    let mut out = vec![f64::NEG_INFINITY; k];
    for c in colmax.chunks(k) {
        for (o, &x) in out.iter_mut().zip(c) {
            *o = o.max(x as f64);
        }
    }
    (out, found.into_iter().flatten().next())
}

/// Adds each block's chunk rows (`width` values per chunk, chunks in row order) in chunk order;
/// returns the blocks' sums, one row per block, compacted at the front of `partials`.
fn block_sums(partials: &mut [f64], width: usize) -> &[f64] {
    let chunks = partials.len() / width;
    let blocks = chunks.div_ceil(reduce::CHUNKS_PER_BLOCK);
    for b in 0..blocks {
        let first = b * reduce::CHUNKS_PER_BLOCK;
        let end = (first + reduce::CHUNKS_PER_BLOCK).min(chunks);
        let (head, rest) = partials.split_at_mut((first + 1) * width);
        let sum = &mut head[first * width..];
        for row in rest[..(end - first - 1) * width].chunks_exact(width) {
            for (s, x) in sum.iter_mut().zip(row) {
                *s += x;
            }
        }
        // Row b lies in an earlier block (or is this block's first row): already added up.
        partials.copy_within(first * width..(first + 1) * width, b * width);
    }
    &partials[..blocks * width]
}

/// max_j |v_j·s_j − t_j| / t_j.
fn col_error(v: &[f32], s: &[f64], target: &[f64]) -> f64 {
    v.iter()
        .zip(s)
        .zip(target)
        .map(|((&v, &s), &t)| ((v as f64 * s - t) / t).abs())
        .fold(0.0, f64::max)
}
