//! Exactly balanced hard labels: rounding the plan to an assignment whose cluster sizes are
//! ⌊N·r_j⌋ or ⌈N·r_j⌉ (⌊N/K⌋ or ⌈N/K⌉ under the uniform prior), greedily by confidence.

use crate::{math, Assignment, Sinkhorn};

/// The sizes an exactly balanced assignment may have: cluster j gets `floor[j]` rows, plus one
/// for exactly `extra` of the `eligible` clusters.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Capacity {
    pub floor: Vec<usize>,
    pub eligible: Vec<bool>,
    pub extra: usize,
}

impl Capacity {
    /// Capacities for `n` rows and target column sums `target` (summing to n).
    pub fn new(n: usize, target: &[f64]) -> Self {
        let k = target.len();
        if target.iter().all(|t| t.to_bits() == target[0].to_bits()) {
            return Capacity {
                floor: vec![n / k; k],
                eligible: vec![true; k],
                extra: n % k,
            };
        }
        let mut floor = Vec::with_capacity(k);
        let mut eligible = Vec::with_capacity(k);
        for &t in target {
            let f = t.floor();
            // A whole number computed a hair below itself is that whole number.
            if t - f > 1.0 - 1e-9 {
                floor.push(f as usize + 1);
                eligible.push(false);
            } else {
                floor.push(f as usize);
                eligible.push(t - f > 1e-9);
            }
        }
        let extra = n.saturating_sub(floor.iter().sum());
        if eligible.iter().filter(|&&e| e).count() < extra {
            eligible.fill(true);
        }
        Capacity {
            floor,
            eligible,
            extra,
        }
    }
}

/// A well-mixed 64-bit hash of (seed, i): the order among rows of equal confidence.
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Sinkhorn {
    /// Rounds `assignment` (from [`Sinkhorn::assign`]) to exactly balanced sizes under the
    /// marginals of the last solve: rows are taken in decreasing confidence (ties in an order
    /// fixed by `seed`), each keeps its label while that cluster has room, and otherwise takes
    /// the cluster with room where its entry of Q is largest. Confidence becomes the row's
    /// normalised entry of Q at its new label; sizes are updated.
    pub fn balance(&self, assignment: &mut Assignment, seed: u64) {
        let (n, k) = (self.n, self.k);
        let cap = Capacity::new(n, &self.target);
        let conf = &assignment.confidence;
        let keys: Vec<u64> = (0..n as u64).map(|i| mix(seed, i)).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            conf[b]
                .total_cmp(&conf[a])
                .then(keys[a].cmp(&keys[b]))
                .then(a.cmp(&b))
        });
        let ln_v: Vec<f64> = self.v.iter().map(|&x| (x as f64).ln()).collect();
        let mut count = vec![0usize; k];
        let mut extras = 0usize;
        let open = |count: &[usize], extras: usize, j: usize| {
            count[j] < cap.floor[j]
                || (count[j] == cap.floor[j] && cap.eligible[j] && extras < cap.extra)
        };
        for i in order {
            let mut j = assignment.labels[i] as usize;
            if !open(&count, extras, j) {
                let row = &self.w[i * k..(i + 1) * k];
                let mut best = None::<(usize, f64)>;
                for (c, (&x, &lv)) in row.iter().zip(&ln_v).enumerate() {
                    if open(&count, extras, c) {
                        let score = math::decode(x) as f64 + lv;
                        if best.is_none_or(|(_, s)| score > s) {
                            best = Some((c, score));
                        }
                    }
                }
                let (c, score) = best.expect("capacities add up to N, so some cluster has room");
                let ln_d = math::dot_pos(row, &self.v).ln();
                j = c;
                assignment.labels[i] = c as u32;
                assignment.confidence[i] = (score - ln_d).exp() as f32;
            }
            if count[j] == cap.floor[j] {
                extras += 1;
            }
            count[j] += 1;
        }
        assignment.sizes = count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_capacity_is_exact() {
        let c = Capacity::new(61, &[61.0 / 3.0; 3]);
        assert_eq!(c.floor, vec![20, 20, 20]);
        assert_eq!(c.extra, 1);
        let c = Capacity::new(60, &[20.0; 3]);
        assert_eq!((c.floor, c.extra), (vec![20, 20, 20], 0));
    }

    #[test]
    fn skewed_capacity_adds_up() {
        // 100 rows over shares 0.5, 0.3, 0.2 computed with rounding noise.
        let t: Vec<f64> = [0.5f64, 0.3, 0.2].iter().map(|r| r * 100.0).collect();
        let c = Capacity::new(100, &t);
        assert_eq!(c.floor.iter().sum::<usize>() + c.extra, 100);
        assert_eq!(c.floor, vec![50, 30, 20]);
        let t: Vec<f64> = [0.55f64, 0.3, 0.15].iter().map(|r| r * 7.0).collect();
        let c = Capacity::new(7, &t);
        assert_eq!(c.floor, vec![3, 2, 1]);
        assert_eq!(c.extra, 1);
        assert!(c.eligible.iter().all(|&e| e));
    }
}
