//! Lloyd's k-means with greedy k-means++ seeding and restarts, deterministic for a seed and independent
//! of the number of threads.

use rayon::prelude::*;

use crate::{unit_draw, SpectralError};

/// A k-means partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// Cluster of every point, `0..k`.
    pub labels: Vec<u32>,
    /// Row-major `k × dim` centres.
    pub centres: Vec<f64>,
    /// Sum of squared distances of the points to their centres.
    pub inertia: f64,
    /// Lloyd iterations of the restart kept.
    pub iterations: usize,
    /// Whether that restart stopped because no label changed (not at the iteration cap).
    pub converged: bool,
}

/// Partitions the row-major `points` (`dim` columns) into `k` clusters: `restarts` runs of
/// greedy k-means++ seeding and at most `max_iters` Lloyd iterations; the run of least inertia wins
/// (the earliest among equals). A cluster left empty takes the point farthest from its centre.
pub fn kmeans(
    points: &[f64],
    dim: usize,
    k: usize,
    restarts: usize,
    max_iters: usize,
    seed: u64,
) -> Result<Partition, SpectralError> {
    if dim == 0 || points.len() % dim != 0 {
        return Err(SpectralError::Shape(format!(
            "{} values are not whole points of {dim}",
            points.len()
        )));
    }
    let n = points.len() / dim;
    if k == 0 || k > n {
        return Err(SpectralError::Shape(format!(
            "{k} clusters asked of {n} points"
        )));
    }
    let mut best: Option<Partition> = None;
    for restart in 0..restarts.max(1) as u64 {
        let centres = seed_centres(points, dim, k, seed, restart);
        let run = lloyd(points, dim, k, centres, max_iters);
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    Ok(best.expect("at least one restart"))
}

fn distance2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The nearest centre of every point and its squared distance.
fn nearest_centres(points: &[f64], dim: usize, centres: &[f64]) -> Vec<(u32, f64)> {
    points
        .par_chunks(dim)
        .map(|p| {
            centres
                .chunks(dim)
                .enumerate()
                .map(|(c, centre)| (c as u32, distance2(p, centre)))
                .fold((0, f64::INFINITY), |best, cand| {
                    if cand.1 < best.1 {
                        cand
                    } else {
                        best
                    }
                })
        })
        .collect()
}

/// Greedy k-means++ seeding: the first centre uniformly, then at each step
/// `2 + ⌊ln k⌋` candidates drawn with probability proportional to the squared distance to the
/// nearest centre so far, keeping the candidate that leaves the smallest total squared distance.
/// Trying several candidates a step avoids most of the poor seeds a single draw makes, which
/// Lloyd's iterations cannot repair. Every draw comes from `(seed, restart, step, trial)`, every
/// sum is taken in point order, so the centres do not depend on the number of threads.
fn seed_centres(points: &[f64], dim: usize, k: usize, seed: u64, restart: u64) -> Vec<f64> {
    let n = points.len() / dim;
    let stream = 1_000_000 + restart;
    let trials = 2 + (k as f64).ln().floor() as usize;
    let first = ((unit_draw(seed, stream, 0) * n as f64) as usize).min(n - 1);
    let mut centres = points[first * dim..(first + 1) * dim].to_vec();
    let mut nearest: Vec<f64> = points
        .par_chunks(dim)
        .map(|p| distance2(p, &centres))
        .collect();
    for c in 1..k {
        let total: f64 = nearest.iter().sum();
        let mut best: Option<(f64, Vec<f64>)> = None;
        for t in 0..trials {
            let pick = if total > 0.0 {
                let target = unit_draw(seed, stream, (c * trials + t) as u64) * total;
                let mut acc = 0.0;
                nearest
                    .iter()
                    .position(|&d| {
                        acc += d;
                        acc > target
                    })
                    .unwrap_or(n - 1)
            } else {
                (c + t) % n
            };
            let centre = &points[pick * dim..(pick + 1) * dim];
            let after: Vec<f64> = nearest
                .par_iter()
                .zip(points.par_chunks(dim))
                .map(|(&d, p)| d.min(distance2(p, centre)))
                .collect();
            let potential: f64 = after.iter().sum();
            if best.as_ref().is_none_or(|(b, _)| potential < *b) {
                centres.truncate(c * dim);
                centres.extend_from_slice(centre);
                best = Some((potential, after));
            }
        }
        nearest = best.expect("at least one trial").1;
    }
    centres
}

/// Lloyd iterations from `centres` until no label changes or `max_iters`.
fn lloyd(
    points: &[f64],
    dim: usize,
    k: usize,
    mut centres: Vec<f64>,
    max_iters: usize,
) -> Partition {
    let n = points.len() / dim;
    let mut labels = vec![u32::MAX; n];
    let mut iterations = 0;
    let mut converged = false;
    let mut assigned = nearest_centres(points, dim, &centres);
    while iterations < max_iters {
        iterations += 1;
        let changed = labels
            .iter_mut()
            .zip(&assigned)
            .fold(false, |changed, (l, &(c, _))| {
                let moved = *l != c;
                *l = c;
                changed || moved
            });
        if !changed {
            converged = true;
            break;
        }
        let mut sums = vec![0.0; k * dim];
        let mut counts = vec![0usize; k];
        for (p, &l) in points.chunks(dim).zip(&labels) {
            let l = l as usize;
            counts[l] += 1;
            sums[l * dim..(l + 1) * dim]
                .iter_mut()
                .zip(p)
                .for_each(|(s, x)| *s += x);
        }
        for c in 0..k {
            if counts[c] == 0 {
                // Refill an empty cluster with the point farthest from its centre.
                let far = assigned.iter().enumerate().fold(0, |best, (i, a)| {
                    if a.1 > assigned[best].1 {
                        i
                    } else {
                        best
                    }
                });
                sums[c * dim..(c + 1) * dim].copy_from_slice(&points[far * dim..(far + 1) * dim]);
                counts[c] = 1;
                assigned[far].1 = 0.0;
            }
            let inv = 1.0 / counts[c] as f64;
            centres[c * dim..(c + 1) * dim]
                .iter_mut()
                .zip(&sums[c * dim..(c + 1) * dim])
                .for_each(|(m, s)| *m = s * inv);
        }
        assigned = nearest_centres(points, dim, &centres);
    }
    Partition {
        labels: assigned.iter().map(|a| a.0).collect(),
        inertia: assigned.iter().map(|a| a.1).sum(),
        centres,
        iterations,
        converged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three well separated blobs of `per` points in 2-D.
    fn blobs(per: usize) -> (Vec<f64>, Vec<u32>) {
        let centres = [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0)];
        let mut points = Vec::new();
        let mut truth = Vec::new();
        for (c, (x, y)) in centres.iter().enumerate() {
            for i in 0..per {
                let dx = unit_draw(3, c as u64, 2 * i as u64) - 0.5;
                let dy = unit_draw(3, c as u64, 2 * i as u64 + 1) - 0.5;
                points.extend([x + dx, y + dy]);
                truth.push(c as u32);
            }
        }
        (points, truth)
    }

    #[test]
    fn recovers_separated_blobs_deterministically() {
        let (points, truth) = blobs(40);
        let a = kmeans(&points, 2, 3, 4, 100, 11).unwrap();
        assert!(a.converged);
        // Same partition as the truth up to renaming.
        for i in 0..truth.len() {
            for j in 0..truth.len() {
                assert_eq!(truth[i] == truth[j], a.labels[i] == a.labels[j]);
            }
        }
        assert_eq!(kmeans(&points, 2, 3, 4, 100, 11).unwrap(), a);
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert_eq!(
            single
                .install(|| kmeans(&points, 2, 3, 4, 100, 11))
                .unwrap(),
            a
        );
    }

    #[test]
    fn more_restarts_never_raise_the_inertia() {
        let (points, _) = blobs(30);
        let one = kmeans(&points, 2, 5, 1, 100, 2).unwrap();
        let many = kmeans(&points, 2, 5, 8, 100, 2).unwrap();
        assert!(many.inertia <= one.inertia);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(kmeans(&[1.0, 2.0, 3.0], 2, 1, 1, 10, 0).is_err());
        assert!(kmeans(&[1.0, 2.0], 2, 2, 1, 10, 0).is_err());
        assert!(kmeans(&[1.0, 2.0], 2, 0, 1, 10, 0).is_err());
    }
}
