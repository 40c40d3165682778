//! Leading eigenvectors of the normalised adjacency D^-1/2·W·D^-1/2 of a [`Graph`], by Lanczos
//! iteration with full reorthogonalisation, and the symmetric tridiagonal eigensolver (implicit
//! QL) it needs for the Ritz pairs.

use rayon::prelude::*;

use crate::graph::Graph;
use crate::{unit_draw, SpectralError};

/// How often (in Lanczos steps) the Ritz pairs are checked for convergence.
const CHECK_EVERY: usize = 25;

/// The leading eigenpairs of a graph's normalised adjacency.
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    /// Eigenvalues, largest first.
    pub values: Vec<f64>,
    /// Row-major `nodes × values.len()`: row i holds node i's coordinates, column c the c-th
    /// eigenvector (unit norm).
    pub vectors: Vec<f64>,
    /// Lanczos steps taken.
    pub steps: usize,
    /// Largest residual ‖A·v − θ·v‖ over the pairs returned.
    pub max_residual: f64,
}

impl Spectrum {
    /// Number of eigenpairs held.
    pub fn count(&self) -> usize {
        self.values.len()
    }

    /// The first `count` eigenvectors as row-major `nodes × count` coordinates.
    pub fn leading(&self, count: usize) -> Vec<f64> {
        let held = self.count();
        assert!(count <= held, "asked for {count} of {held} eigenvectors");
        self.vectors
            .chunks(held)
            .flat_map(|row| row[..count].iter().copied())
            .collect()
    }
}

/// The `count` largest eigenpairs of D^-1/2·W·D^-1/2, converged to residual `tol` with at
/// most `max_steps` Lanczos steps per sweep (the best found is returned if the cap is reached;
/// see [`Spectrum::max_residual`]). Start vectors are drawn from `seed`.
///
/// One Lanczos sweep sees a repeated eigenvalue once, so sweeps repeat, each in the orthogonal
/// complement of the eigenvectors kept so far, until one finds nothing above the `count`-th.
pub fn leading_eigenpairs(
    graph: &Graph,
    count: usize,
    tol: f64,
    max_steps: usize,
    seed: u64,
) -> Result<Spectrum, SpectralError> {
    let n = graph.nodes();
    if count == 0 || count > n {
        return Err(SpectralError::Shape(format!(
            "{count} eigenvectors asked of a graph of {n} nodes"
        )));
    }
    let scale: Vec<f64> = graph
        .degrees()
        .into_iter()
        .map(|d| 1.0 / (d as f64).sqrt())
        .collect();
    let apply = |x: &[f64]| -> Vec<f64> {
        (0..n)
            .into_par_iter()
            .map(|i| {
                let sum: f64 = graph
                    .neighbours(i)
                    .iter()
                    .map(|&j| scale[j as usize] * x[j as usize])
                    .sum();
                scale[i] * sum
            })
            .collect()
    };
    let mut kept: Vec<RitzPair> = Vec::new();
    let mut steps = 0;
    for sweep in 0.. {
        let threshold = if kept.len() < count {
            f64::NEG_INFINITY
        } else {
            kept[count - 1].value
        };
        let found = lanczos(
            &apply,
            n,
            &kept,
            (count, threshold + tol),
            tol,
            max_steps,
            (seed, sweep),
        )?;
        steps += found.steps;
        // A new pair must beat the count-th kept one by more than the eigenvalue accuracy.
        let new: Vec<RitzPair> = found
            .pairs
            .into_iter()
            .filter(|p| p.value > threshold + tol)
            .collect();
        if new.is_empty() {
            break;
        }
        kept.extend(new);
        kept.sort_by(|a, b| b.value.total_cmp(&a.value));
        kept.truncate(count);
        if kept.len() == n {
            break;
        }
    }
    let count = kept.len();
    let mut vectors = vec![0.0; n * count];
    for (c, pair) in kept.iter().enumerate() {
        for (i, x) in pair.vector.iter().enumerate() {
            vectors[i * count + c] = *x;
        }
    }
    Ok(Spectrum {
        values: kept.iter().map(|p| p.value).collect(),
        vectors,
        steps,
        max_residual: kept.iter().map(|p| p.residual).fold(0.0, f64::max),
    })
}

/// An approximate eigenpair and the residual norm of its vector.
#[derive(Debug, Clone)]
struct RitzPair {
    value: f64,
    vector: Vec<f64>,
    residual: f64,
}

/// What one Lanczos sweep found.
struct Sweep {
    pairs: Vec<RitzPair>,
    steps: usize,
}

/// One Lanczos sweep with full reorthogonalisation in the orthogonal complement of `locked`:
/// the (at most) `count` largest Ritz pairs, once their residuals are below `tol` or after
/// `max_steps` steps. It ends early with none once its largest Ritz pair has converged at or
/// below `floor`: Ritz values approach the eigenvalues from below, so the complement has no
/// eigenvalue above it.
fn lanczos(
    apply: &(dyn Fn(&[f64]) -> Vec<f64> + Sync),
    n: usize,
    locked: &[RitzPair],
    (count, floor): (usize, f64),
    tol: f64,
    max_steps: usize,
    (seed, sweep): (u64, u64),
) -> Result<Sweep, SpectralError> {
    let room = n - locked.len();
    let max_steps = max_steps.max(count).min(room);
    let mut basis: Vec<Vec<f64>> = locked.iter().map(|p| p.vector.clone()).collect();
    let mut alphas: Vec<f64> = Vec::new();
    let mut betas: Vec<f64> = Vec::new();
    let mut restarts = 0u64;
    let stream = |restarts: u64| sweep * 1_000 + restarts;
    let Some(mut q) = fresh_direction(n, seed, stream(restarts), &basis) else {
        return Ok(Sweep {
            pairs: Vec::new(),
            steps: 0,
        });
    };
    loop {
        let mut w = apply(&q);
        let alpha = dot(&q, &w);
        basis.push(q);
        alphas.push(alpha);
        // Full reorthogonalisation, twice (the first pass also removes α·q_j and β·q_{j-1}).
        orthogonalise(&mut w, &basis);
        orthogonalise(&mut w, &basis);
        let beta = norm(&w);
        let steps = alphas.len();
        let breakdown = beta <= 1e-10;
        let mut next = None;
        if breakdown {
            // An invariant subspace is exhausted: go on from a new direction, with a zero
            // coupling in the tridiagonal matrix.
            restarts += 1;
            next = fresh_direction(n, seed, stream(restarts), &basis);
        }
        let exhausted = breakdown && next.is_none();
        if exhausted || steps == max_steps || steps % CHECK_EVERY == 0 {
            let coupling = if breakdown { 0.0 } else { beta };
            let (values, vectors) = tridiagonal_eigen(&alphas, &betas)?;
            let mut order: Vec<usize> = (0..steps).collect();
            order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
            order.truncate(count);
            // The residual of Ritz pair c is |β_m · y_{m,c}|.
            let residual = |c: usize| (coupling * vectors[(steps - 1) * steps + c]).abs();
            if values[order[0]] <= floor && residual(order[0]) <= tol {
                return Ok(Sweep {
                    pairs: Vec::new(),
                    steps,
                });
            }
            let converged = order.len() == count && order.iter().all(|&c| residual(c) <= tol);
            if exhausted || steps == max_steps || converged {
                let krylov = &basis[locked.len()..];
                let pairs = order
                    .iter()
                    .map(|&c| RitzPair {
                        value: values[c],
                        vector: combine(krylov, &vectors, steps, c),
                        residual: residual(c),
                    })
                    .collect();
                return Ok(Sweep { pairs, steps });
            }
        }
        if breakdown {
            betas.push(0.0);
            q = next.expect("not exhausted");
        } else {
            betas.push(beta);
            w.iter_mut().for_each(|v| *v /= beta);
            q = w;
        }
    }
}

/// A seeded random unit vector orthogonal to `basis`, or `None` when the basis spans all.
fn fresh_direction(n: usize, seed: u64, restart: u64, basis: &[Vec<f64>]) -> Option<Vec<f64>> {
    if basis.len() >= n {
        return None;
    }
    for attempt in 0..8u64 {
        let mut v: Vec<f64> = (0..n as u64)
            .map(|i| unit_draw(seed, 1 + restart * 8 + attempt, i) - 0.5)
            .collect();
        orthogonalise(&mut v, basis);
        orthogonalise(&mut v, basis);
        let len = norm(&v);
        if len > 1e-8 {
            v.iter_mut().for_each(|x| *x /= len);
            return Some(v);
        }
    }
    None
}

/// Subtracts from `w` its projection on every (orthonormal) vector of `basis`.
fn orthogonalise(w: &mut [f64], basis: &[Vec<f64>]) {
    let coefficients: Vec<f64> = basis.par_iter().map(|b| dot(b, w)).collect();
    w.par_chunks_mut(4096)
        .enumerate()
        .for_each(|(block, chunk)| {
            let range = block * 4096..block * 4096 + chunk.len();
            for (b, &c) in basis.iter().zip(&coefficients) {
                for (x, &y) in chunk.iter_mut().zip(&b[range.clone()]) {
                    *x -= c * y;
                }
            }
        });
}

/// The Ritz vector Σ_j y_{j,c}·q_j of column c of the m×m eigenvector matrix `vectors`.
fn combine(krylov: &[Vec<f64>], vectors: &[f64], m: usize, c: usize) -> Vec<f64> {
    let n = krylov[0].len();
    let mut out = vec![0.0; n];
    out.par_chunks_mut(4096)
        .enumerate()
        .for_each(|(block, chunk)| {
            let range = block * 4096..block * 4096 + chunk.len();
            for (j, q) in krylov.iter().enumerate() {
                let y = vectors[j * m + c];
                for (x, &v) in chunk.iter_mut().zip(&q[range.clone()]) {
                    *x += y * v;
                }
            }
        });
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Eigenvalues and eigenvectors of the symmetric tridiagonal matrix with diagonal `diagonal`
/// and sub-diagonal `off` (one shorter), by the implicit QL method with Wilkinson shifts.
/// Returns the eigenvalues (unordered) and the row-major m×m matrix whose column c is the
/// eigenvector of eigenvalue c.
pub fn tridiagonal_eigen(
    diagonal: &[f64],
    off: &[f64],
) -> Result<(Vec<f64>, Vec<f64>), SpectralError> {
    let m = diagonal.len();
    assert_eq!(off.len() + 1, m.max(1), "sub-diagonal must be one shorter");
    let mut d = diagonal.to_vec();
    let mut e: Vec<f64> = off.iter().copied().chain(std::iter::once(0.0)).collect();
    let mut z = vec![0.0; m * m];
    for i in 0..m {
        z[i * m + i] = 1.0;
    }
    for l in 0..m {
        let mut sweeps = 0;
        loop {
            // The first negligible sub-diagonal entry at or after l splits the matrix.
            let mut end = l;
            while end + 1 < m {
                let scale = d[end].abs() + d[end + 1].abs();
                if e[end].abs() <= f64::EPSILON * scale {
                    break;
                }
                end += 1;
            }
            if end == l {
                break;
            }
            sweeps += 1;
            if sweeps > 100 {
                return Err(SpectralError::NoConvergence(format!(
                    "the tridiagonal eigensolver did not converge on entry {l} of {m}"
                )));
            }
            // Wilkinson shift from the leading 2×2 block.
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[end] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            let mut deflated = false;
            for i in (l..end).rev() {
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[end] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                for row in z.chunks_mut(m) {
                    let next = row[i + 1];
                    row[i + 1] = s * row[i] + c * next;
                    row[i] = c * row[i] - s * next;
                }
            }
            if deflated {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[end] = 0.0;
        }
    }
    Ok((d, z))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tridiagonal_eigenpairs_of_the_path_laplacian() {
        // tridiag(-1, 2, -1) of size m has eigenvalues 2 − 2·cos(πk/(m+1)), k = 1..m.
        let m = 40;
        let diagonal = vec![2.0; m];
        let off = vec![-1.0; m - 1];
        let (mut values, vectors) = tridiagonal_eigen(&diagonal, &off).unwrap();
        for c in 0..m {
            // T·z = λ·z for every column.
            for i in 0..m {
                let mut tz = 2.0 * vectors[i * m + c];
                if i > 0 {
                    tz -= vectors[(i - 1) * m + c];
                }
                if i + 1 < m {
                    tz -= vectors[(i + 1) * m + c];
                }
                assert!((tz - values[c] * vectors[i * m + c]).abs() < 1e-10);
            }
        }
        values.sort_by(f64::total_cmp);
        for (k, v) in values.iter().enumerate() {
            let want = 2.0 - 2.0 * (std::f64::consts::PI * (k + 1) as f64 / (m + 1) as f64).cos();
            assert!((v - want).abs() < 1e-10, "{k}: {v} vs {want}");
        }
    }

    /// A ring of `n` nodes, each joined to its `reach` nearest on either side.
    fn ring(n: usize, reach: usize) -> Graph {
        let lists: Vec<u32> = (0..n)
            .flat_map(|i| (1..=reach).map(move |s| ((i + s) % n) as u32))
            .collect();
        Graph::from_neighbour_lists(&lists, reach).unwrap()
    }

    #[test]
    fn lanczos_finds_the_ring_spectrum() {
        // A regular ring's normalised adjacency has eigenvalues
        // Σ_{s=1..r} cos(2πks/n) / r; the largest is 1, then the pair k = ±1, then k = ±2.
        let (n, r) = (300, 3);
        let spectrum = leading_eigenpairs(&ring(n, r), 5, 1e-9, 300, 7).unwrap();
        let eig = |k: f64| {
            (1..=r)
                .map(|s| (2.0 * std::f64::consts::PI * k * s as f64 / n as f64).cos())
                .sum::<f64>()
                / r as f64
        };
        let want = [1.0, eig(1.0), eig(1.0), eig(2.0), eig(2.0)];
        for (got, want) in spectrum.values.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        assert!(spectrum.max_residual <= 1e-9);
        // Orthonormal columns.
        let c = spectrum.count();
        for a in 0..c {
            for b in 0..c {
                let d: f64 = spectrum.vectors.chunks(c).map(|row| row[a] * row[b]).sum();
                assert!((d - f64::from(a == b)).abs() < 1e-8, "{a},{b}: {d}");
            }
        }
    }

    #[test]
    fn separate_components_each_give_an_eigenvalue_one() {
        // Two disjoint rings: eigenvalue 1 twice, the eigenvectors constant on each ring.
        let mut lists: Vec<u32> = (0..50u32)
            .flat_map(|i| [(i + 1) % 50, (i + 2) % 50])
            .collect();
        lists.extend(lists.clone().iter().map(|j| j + 50));
        let g = Graph::from_neighbour_lists(&lists, 2).unwrap();
        let s = leading_eigenpairs(&g, 2, 1e-9, 100, 1).unwrap();
        assert!((s.values[0] - 1.0).abs() < 1e-9 && (s.values[1] - 1.0).abs() < 1e-9);
        assert_eq!(leading_eigenpairs(&g, 2, 1e-9, 100, 1).unwrap(), s);
    }
}
