//! Exactly balanced hard labels: rounding the plan to an assignment whose cluster sizes are
//! ⌊N·r_j⌋ or ⌈N·r_j⌉ (⌊N/K⌋ or ⌈N/K⌉ under the uniform prior).
//!
//! Rows are served in one global priority order (decreasing confidence, ties in an order fixed
//! by the seed); each row prefers its own label, then the other clusters by decreasing entry of
//! Q. The result is the outcome of serving rows one by one, each taking the first cluster in its
//! preference with room left. It is computed by deferred acceptance, which reaches the same
//! assignment (with one priority order shared by all clusters there is exactly one stable
//! assignment, and both produce it) while needing only cluster-wise counts and thresholds over
//! all rows: every row proposes to its current choice; each cluster over capacity keeps its
//! `capacity` highest-priority proposers (a threshold found from global counts) and turns the
//! rest away; those move to their next choice; repeat until no cluster is over capacity.

use rayon::prelude::*;

use crate::{math, Assignment, Reduce, Sinkhorn};

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

    /// Each cluster's size: its floor, plus one for the `extra` eligible clusters with the
    /// largest fractional target, then the most rows wanting them (`demand`), then the lowest
    /// index.
    pub fn sizes(&self, target: &[f64], demand: &[usize]) -> Vec<usize> {
        let frac = |j: usize| target[j] - target[j].floor();
        let mut order: Vec<usize> = (0..self.floor.len())
            .filter(|&j| self.eligible[j])
            .collect();
        order.sort_by(|&a, &b| {
            frac(b)
                .total_cmp(&frac(a))
                .then(demand[b].cmp(&demand[a]))
                .then(a.cmp(&b))
        });
        let mut caps = self.floor.clone();
        for &j in order.iter().take(self.extra) {
            caps[j] += 1;
        }
        caps
    }
}

/// A well-mixed 64-bit hash of (seed, i): the order among rows of equal confidence. A bijection
/// of i for each seed, so no two rows tie.
pub(crate) fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A row's priority (larger is served first): its confidence in the total order of f32, then
/// the smaller hash. Below 2^96.
fn priority(confidence: f32, hash: u64) -> u128 {
    let b = confidence.to_bits() as i32;
    let ordered = (b ^ ((((b >> 31) as u32) >> 1) as i32)) as u32 ^ 0x8000_0000;
    ((ordered as u128) << 64) | (!hash) as u128
}

/// Keys live below this bound.
const KEY_END: u128 = 1 << 96;

impl<C: Reduce> Sinkhorn<C> {
    /// Rounds `assignment` (from [`Sinkhorn::assign`]) to exactly balanced sizes under the
    /// marginals of the last solve: rows are served in decreasing confidence (ties in an order
    /// fixed by `seed`), each keeps its label while that cluster has room and otherwise takes
    /// the cluster with room where its entry of Q is largest. Where the sizes cannot all be
    /// equal, the clusters with the larger fractional target, then those most rows' labels
    /// name, get the extra row. Confidence becomes the row's normalised entry of Q at its new
    /// label; sizes are updated.
    pub fn balance(&self, assignment: &mut Assignment, seed: u64) {
        let (k, first) = (self.k, self.rows.first);
        let caps = Capacity::new(self.n, &self.target).sizes(&self.target, &assignment.sizes);
        let keys: Vec<u128> = assignment
            .confidence
            .par_iter()
            .enumerate()
            .map(|(i, &c)| priority(c, mix(seed, (first + i) as u64)))
            .collect();
        let ln_v: Vec<f64> = self.v.iter().map(|&x| (x as f64).ln()).collect();
        let labels = &assignment.labels;
        let mut choice = labels.clone();
        let sizes = loop {
            let mut count = vec![0i64; k];
            for &c in &choice {
                count[c as usize] += 1;
            }
            self.comm.sum_i64(&mut count);
            let over: Vec<usize> = (0..k).filter(|&j| count[j] > caps[j] as i64).collect();
            if over.is_empty() {
                break count;
            }
            let cut = self.thresholds(&choice, &keys, &over, &caps);
            let w = &self.w;
            choice.par_iter_mut().enumerate().for_each(|(i, c)| {
                if cut[*c as usize].is_some_and(|t| keys[i] < t) {
                    *c = next_choice(&w[i * k..(i + 1) * k], labels[i], *c, &ln_v) as u32;
                }
            });
        };
        for (i, &c) in choice.iter().enumerate() {
            if c != assignment.labels[i] {
                let row = &self.w[i * k..(i + 1) * k];
                let score = math::decode(row[c as usize]) as f64 + ln_v[c as usize];
                let ln_d = math::dot_pos(row, &self.v).ln();
                assignment.labels[i] = c;
                assignment.confidence[i] = (score - ln_d).exp() as f32;
            }
        }
        assignment.sizes = sizes.iter().map(|&c| c as usize).collect();
    }

    /// For each cluster in `over` (more rows choose it than its capacity), the key of its
    /// `caps[j]`-th highest-priority chooser over all processes: choosers with a lower key are
    /// turned away. Alone, by sorting; distributed, by a bisection of the key range on global
    /// counts (96 all-reduces of |over| counts).
    fn thresholds(
        &self,
        choice: &[u32],
        keys: &[u128],
        over: &[usize],
        caps: &[usize],
    ) -> Vec<Option<u128>> {
        let k = self.k;
        let mut slot = vec![usize::MAX; k];
        for (s, &j) in over.iter().enumerate() {
            slot[j] = s;
        }
        let mut mine: Vec<Vec<u128>> = vec![Vec::new(); over.len()];
        for (&c, &key) in choice.iter().zip(keys) {
            if let Some(list) = mine.get_mut(slot[c as usize]) {
                list.push(key);
            }
        }
        mine.par_iter_mut().for_each(|l| l.sort_unstable());
        let want: Vec<usize> = over.iter().map(|&j| caps[j]).collect();
        let found: Vec<u128> = if self.comm.ranks() == 1 {
            mine.iter()
                .zip(&want)
                .map(|(l, &c)| if c == 0 { KEY_END } else { l[l.len() - c] })
                .collect()
        } else {
            // Largest t with at least `want` keys ≥ t; keys are distinct, so exactly `want`.
            let mut lo = vec![0u128; over.len()];
            let mut hi = vec![KEY_END; over.len()];
            for (s, &c) in want.iter().enumerate() {
                if c == 0 {
                    lo[s] = KEY_END;
                }
            }
            while lo.iter().zip(&hi).any(|(l, h)| *l + 1 < *h) {
                let mid: Vec<u128> = lo.iter().zip(&hi).map(|(l, h)| l + (h - l) / 2).collect();
                let mut at_least: Vec<i64> = mine
                    .iter()
                    .zip(&mid)
                    .map(|(l, &m)| (l.len() - l.partition_point(|&x| x < m)) as i64)
                    .collect();
                self.comm.sum_i64(&mut at_least);
                for s in 0..over.len() {
                    if lo[s] + 1 < hi[s] {
                        if at_least[s] >= want[s] as i64 {
                            lo[s] = mid[s];
                        } else {
                            hi[s] = mid[s];
                        }
                    }
                }
            }
            lo
        };
        let mut cut = vec![None; k];
        for (&j, t) in over.iter().zip(found) {
            cut[j] = Some(t);
        }
        cut
    }
}

/// The cluster a row prefers next after `current`: its label comes first, then the others by
/// decreasing score (its log-entry of Q up to a constant), lowest index on ties.
fn next_choice(row: &[f32], label: u32, current: u32, ln_v: &[f64]) -> usize {
    let score = |j: usize| math::decode(row[j]) as f64 + ln_v[j];
    // Whether (sa, a) comes before (sb, b) in the preference.
    let before = |(sa, a): (f64, usize), (sb, b): (f64, usize)| sa > sb || (sa == sb && a < b);
    let after = (current != label).then(|| (score(current as usize), current as usize));
    let mut best: Option<(f64, usize)> = None;
    for j in (0..row.len()).filter(|&j| j != label as usize) {
        let cand = (score(j), j);
        if after.is_some_and(|a| !before(a, cand)) {
            continue;
        }
        if best.is_none_or(|b| before(cand, b)) {
            best = Some(cand);
        }
    }
    best.expect("capacities add up to N, so no row is turned away by every cluster")
        .1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uniform_marginals;

    #[test]
    fn uniform_capacity_is_exact() {
        let c = Capacity::new(61, &[61.0 / 3.0; 3]);
        assert_eq!(c.floor, vec![20, 20, 20]);
        assert_eq!(c.extra, 1);
        let c = Capacity::new(60, &[20.0; 3]);
        assert_eq!((c.floor.clone(), c.extra), (vec![20, 20, 20], 0));
        assert_eq!(c.sizes(&[20.0; 3], &[1, 2, 3]), vec![20, 20, 20]);
        // The extra rows go to the clusters most in demand, then the lowest index.
        let c = Capacity::new(62, &[62.0 / 3.0; 3]);
        assert_eq!(c.sizes(&[62.0 / 3.0; 3], &[10, 30, 22]), vec![20, 21, 21]);
        assert_eq!(c.sizes(&[62.0 / 3.0; 3], &[5, 5, 5]), vec![21, 21, 20]);
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
        // 3.85, 2.1, 1.05: the largest fractional part gets the extra row.
        assert_eq!(c.sizes(&t, &[0, 7, 0]), vec![4, 2, 1]);
    }

    #[test]
    fn priorities_follow_confidence_then_hash() {
        let confs = [-1.0f32, -0.0, 0.0, 1e-30, 0.25, 0.5, 1.0];
        for w in confs.windows(2) {
            assert!(priority(w[0], 0) < priority(w[1], u64::MAX), "{w:?}");
        }
        assert!(priority(0.5, 3) > priority(0.5, 4));
        assert!(priority(f32::MAX, 0) < KEY_END);
        let hashes: std::collections::BTreeSet<u64> = (0..10_000).map(|i| mix(7, i)).collect();
        assert_eq!(hashes.len(), 10_000);
    }

    /// Serving rows one by one in priority order, each taking its label if it has room and
    /// otherwise the cluster with room of highest score: the definition deferred acceptance
    /// must reproduce.
    fn serve_in_order(s: &Sinkhorn, a: &Assignment, seed: u64) -> Vec<u32> {
        let (n, k) = (s.n, s.k);
        let caps = Capacity::new(n, &s.target).sizes(&s.target, &a.sizes);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| {
            a.confidence[y]
                .total_cmp(&a.confidence[x])
                .then(mix(seed, x as u64).cmp(&mix(seed, y as u64)))
        });
        let ln_v: Vec<f64> = s.v.iter().map(|&x| (x as f64).ln()).collect();
        let mut count = vec![0usize; k];
        let mut out = a.labels.clone();
        for i in order {
            let mut j = a.labels[i] as usize;
            if count[j] >= caps[j] {
                let row = &s.w[i * k..(i + 1) * k];
                let mut best = None::<(usize, f64)>;
                for (c, (&x, &lv)) in row.iter().zip(&ln_v).enumerate() {
                    let score = math::decode(x) as f64 + lv;
                    if count[c] < caps[c] && best.is_none_or(|(_, b)| score > b) {
                        best = Some((c, score));
                    }
                }
                j = best.unwrap().0;
            }
            count[j] += 1;
            out[i] = j as u32;
        }
        out
    }

    #[test]
    fn deferred_acceptance_equals_serving_in_order() {
        let mut state = 99u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        let mut moved = 0;
        for case in 0..24 {
            let k = [2usize, 3, 5, 9, 16][case % 5];
            let n = 40 + case * 23;
            // Coarse logits (many ties in score and confidence), a favoured cluster, and
            // duplicated rows.
            let mut z: Vec<f32> = (0..n * k)
                .map(|x| {
                    let bump = if x % k == 0 { 1.5 } else { 0.0 };
                    ((next() * 4.0).round() / 2.0 + bump) as f32
                })
                .collect();
            for i in (0..n).step_by(5).skip(1) {
                let src: Vec<f32> = z[..k].to_vec();
                z[i * k..(i + 1) * k].copy_from_slice(&src);
            }
            let lambda = [2.0, 10.0, 40.0][case % 3];
            let mut s = Sinkhorn::new(z, k, lambda, None).unwrap();
            let r = if case % 2 == 0 {
                uniform_marginals(k)
            } else {
                crate::power_marginals(k, 0.7).unwrap()
            };
            s.solve(&r, 1e-2, 2 + case * 3, |_| {}).unwrap();
            let a = s.assign().unwrap();
            for seed in [0u64, 5] {
                let want = serve_in_order(&s, &a, seed);
                let mut b = a.clone();
                s.balance(&mut b, seed);
                assert_eq!(b.labels, want, "case {case}, seed {seed}");
                moved += a
                    .labels
                    .iter()
                    .zip(&b.labels)
                    .filter(|(x, y)| x != y)
                    .count();
                let mut sizes = vec![0usize; k];
                for &l in &b.labels {
                    sizes[l as usize] += 1;
                }
                assert_eq!(sizes, b.sizes);
            }
        }
        // The cases must exercise the rounding: many rows lose their label.
        assert!(moved > 1000, "{moved} rows moved");
    }
}
