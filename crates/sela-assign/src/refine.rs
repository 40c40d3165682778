//! Refining a merged partition with the network's own clusterings.
//!
//! The graph's merge of fragments is greedy and myopic: a fragment joins the group it is most
//! strongly linked to at the moment it merges, and modularity alone cannot tell the class-true
//! grouping of the fragments from several near-equal others. The heads' argmax clusterings carry
//! what the network learned from augmented views, independently of the graph. [`refine`] moves
//! whole fragments between groups, one at a time, while that raises
//!
//! score = mean NMI of the partition with the heads' clusterings + `weight` × its modularity,
//!
//! never moving a fragment into a group that would pass the size cap or out of one that would
//! fall below a floor. The weight on modularity keeps the graph in charge: a move the heads favour
//! must not cost the graph more than it gains.

use anyhow::bail;
use sela_io::labels::RefineReport;
use sela_metrics::contingency::Contingency;
use sela_spectral::Graph;

/// Smallest group a refinement may leave, as a multiple of N / K.
pub const REFINE_FLOOR: f64 = 0.6;
/// Most sweeps over the fragments (each sweep moves every fragment at most once).
const MAX_SWEEPS: usize = 100;
/// A move must raise the score by more than this.
const MIN_GAIN: f64 = 1e-12;

/// How a refinement came out.
#[derive(Debug, Clone, PartialEq)]
pub struct Refined {
    /// Group (`0..k`) of every fragment (`u32::MAX` for a fragment without nodes, as given).
    pub groups: Vec<u32>,
    /// Fragments moved, the share of nodes whose group changed, and the agreement and modularity
    /// of the groups given and of those returned.
    pub report: RefineReport,
}

/// Moves the fragments of `graph` (fragment of every node in `fragment_of`) between the `k`
/// groups of `groups` (group of every fragment) while the score of the module documentation
/// rises (modularity weighted by `weight`): the best move of each fragment in turn, fragments
/// in index order, until a sweep moves none. `predictions` are the heads' clusterings of the
/// nodes; no move makes a group larger than `cap` nodes or leaves one smaller than
/// [`REFINE_FLOOR`] × N / K. Deterministic.
pub fn refine(
    graph: &Graph,
    fragment_of: &[u32],
    groups: &[u32],
    k: usize,
    predictions: &[Vec<u32>],
    (weight, cap): (f64, f64),
) -> anyhow::Result<Refined> {
    let n = graph.nodes();
    let fragments = groups.len();
    if fragment_of.len() != n {
        bail!(
            "{} fragment labels for a graph of {n} nodes",
            fragment_of.len()
        );
    }
    if predictions.is_empty() {
        bail!("refining a partition with the heads' clusterings needs their predictions");
    }
    if let Some(p) = predictions.iter().find(|p| p.len() != n) {
        bail!("a head's clustering has {} labels for {n} nodes", p.len());
    }
    if !(weight.is_finite() && weight >= 0.0) {
        bail!("the refinement's weight on modularity must be finite and ≥ 0, got {weight}");
    }
    let mut state = State::new(graph, fragment_of, fragments, groups, k, predictions)?;
    let floor = REFINE_FLOOR * n as f64 / k as f64;
    let (agreement_before, modularity_before) = (state.agreement(), state.modularity());
    let mut score = state.score(weight);
    let mut moves = 0;
    for _ in 0..MAX_SWEEPS {
        let mut moved = false;
        for f in 0..fragments {
            let from = state.groups[f];
            if from == u32::MAX {
                continue;
            }
            let size = state.fragment_size[f] as f64;
            if (state.group_size[from as usize] as f64) - size < floor {
                continue;
            }
            let to_groups = state.links_to_groups(f);
            let mut best = (score, from);
            for to in (0..k as u32).filter(|&g| g != from) {
                if state.group_size[to as usize] as f64 + size > cap {
                    continue;
                }
                state.relocate(f, to, &to_groups);
                let s = state.score(weight);
                state.relocate(f, from, &to_groups);
                if s > best.0 + MIN_GAIN {
                    best = (s, to);
                }
            }
            if best.1 != from {
                state.relocate(f, best.1, &to_groups);
                score = best.0;
                moves += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let changed: u64 = (0..fragments)
        .filter(|&f| state.groups[f] != groups[f])
        .map(|f| state.fragment_size[f])
        .sum();
    let report = RefineReport {
        moves,
        changed: changed as f64 / n.max(1) as f64,
        agreement_before,
        agreement_after: state.agreement(),
        modularity_before,
        modularity_after: state.modularity(),
    };
    Ok(Refined {
        groups: state.groups,
        report,
    })
}

/// Fragment-level tables and their sums per group, kept up to date as fragments move. All
/// counts are integers, so a score depends only on the grouping, not on the moves that led to it.
struct State {
    k: usize,
    groups: Vec<u32>,
    fragment_size: Vec<u64>,
    group_size: Vec<u64>,
    /// Edge ends between fragments, row-major `fragments × fragments` (symmetric).
    links: Vec<u64>,
    /// Edge ends from each fragment (its volume).
    fragment_volume: Vec<u64>,
    /// Edge ends inside each group (both ends in it) and from it.
    group_inside: Vec<u64>,
    group_volume: Vec<u64>,
    /// Edge ends in all (twice the graph's edges).
    total: f64,
    /// Per head: its outputs, its row-major `fragments × outputs` counts and their sums per group
    /// (`k × outputs`).
    tables: Vec<HeadTable>,
}

struct HeadTable {
    outputs: usize,
    counts: Vec<u64>,
    grouped: Vec<u64>,
}

impl State {
    fn new(
        graph: &Graph,
        fragment_of: &[u32],
        fragments: usize,
        groups: &[u32],
        k: usize,
        predictions: &[Vec<u32>],
    ) -> anyhow::Result<Self> {
        let m = fragments;
        let mut fragment_size = vec![0u64; m];
        let mut links = vec![0u64; m * m];
        for (i, &a) in fragment_of.iter().enumerate() {
            let a = a as usize;
            if a >= m || groups[a] as usize >= k {
                bail!("node {i} lies in fragment {a}, which has no group among {k}");
            }
            fragment_size[a] += 1;
            for &j in graph.neighbours(i) {
                links[a * m + fragment_of[j as usize] as usize] += 1;
            }
        }
        let fragment_volume: Vec<u64> = links.chunks(m).map(|row| row.iter().sum()).collect();
        let tables = predictions
            .iter()
            .map(|p| {
                let outputs = p.iter().map(|&c| c as usize + 1).max().unwrap_or(1);
                let mut counts = vec![0u64; m * outputs];
                for (&f, &c) in fragment_of.iter().zip(p) {
                    counts[f as usize * outputs + c as usize] += 1;
                }
                HeadTable {
                    outputs,
                    counts,
                    grouped: vec![0; k * outputs],
                }
            })
            .collect();
        let mut state = State {
            k,
            groups: vec![u32::MAX; m],
            fragment_size,
            group_size: vec![0; k],
            total: fragment_volume.iter().sum::<u64>() as f64,
            links,
            fragment_volume,
            group_inside: vec![0; k],
            group_volume: vec![0; k],
            tables,
        };
        for (f, &g) in groups.iter().enumerate() {
            if g != u32::MAX {
                let to_groups = state.links_to_groups(f);
                state.enter(f, g, &to_groups);
            }
        }
        Ok(state)
    }

    /// Edge ends from fragment `f` into each group, `f`'s own links left out.
    fn links_to_groups(&self, f: usize) -> Vec<u64> {
        let m = self.groups.len();
        let mut to = vec![0u64; self.k];
        for (b, &g) in self.groups.iter().enumerate() {
            if b != f && g != u32::MAX {
                to[g as usize] += self.links[f * m + b];
            }
        }
        to
    }

    /// Puts fragment `f` (in no group) into group `g`; `to_groups` is [`Self::links_to_groups`].
    fn enter(&mut self, f: usize, g: u32, to_groups: &[u64]) {
        let m = self.groups.len();
        let gi = g as usize;
        self.groups[f] = g;
        self.group_size[gi] += self.fragment_size[f];
        self.group_volume[gi] += self.fragment_volume[f];
        self.group_inside[gi] += 2 * to_groups[gi] + self.links[f * m + f];
        for t in &mut self.tables {
            let o = t.outputs;
            let (row, into) = (
                &t.counts[f * o..(f + 1) * o],
                &mut t.grouped[gi * o..(gi + 1) * o],
            );
            into.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
        }
    }

    /// Takes fragment `f` out of its group; `to_groups` is [`Self::links_to_groups`].
    fn leave(&mut self, f: usize, to_groups: &[u64]) {
        let m = self.groups.len();
        let gi = self.groups[f] as usize;
        self.groups[f] = u32::MAX;
        self.group_size[gi] -= self.fragment_size[f];
        self.group_volume[gi] -= self.fragment_volume[f];
        self.group_inside[gi] -= 2 * to_groups[gi] + self.links[f * m + f];
        for t in &mut self.tables {
            let o = t.outputs;
            let (row, from) = (
                &t.counts[f * o..(f + 1) * o],
                &mut t.grouped[gi * o..(gi + 1) * o],
            );
            from.iter_mut().zip(row).for_each(|(a, &b)| *a -= b);
        }
    }

    /// Moves fragment `f` into group `to`.
    fn relocate(&mut self, f: usize, to: u32, to_groups: &[u64]) {
        self.leave(f, to_groups);
        self.enter(f, to, to_groups);
    }

    /// Mean NMI of the grouping with the heads' clusterings.
    fn agreement(&self) -> f64 {
        self.tables
            .iter()
            .map(|t| Contingency::from_dense(&t.grouped, self.k, t.outputs).nmi())
            .sum::<f64>()
            / self.tables.len() as f64
    }

    /// Modularity of the grouping on the graph, as [`Graph::modularity`] computes it.
    fn modularity(&self) -> f64 {
        if self.total == 0.0 {
            return 0.0;
        }
        self.group_inside
            .iter()
            .zip(&self.group_volume)
            .map(|(&l, &v)| l as f64 / self.total - (v as f64 / self.total).powi(2))
            .sum()
    }

    /// Mean NMI with the heads' clusterings + `weight` × modularity.
    fn score(&self, weight: f64) -> f64 {
        self.agreement() + weight * self.modularity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER: usize = 10;

    /// Three rings A, B, C of `PER` nodes, each node joined to its 3 successors, with
    /// `ab` bridges from A to B and `bc` from B to C (each replacing one ring edge).
    fn three_rings(ab: usize, bc: usize) -> Graph {
        let mut lists = Vec::new();
        for ring in 0..3 {
            for i in 0..PER {
                for s in 1..=3 {
                    lists.push((ring * PER + (i + s) % PER) as u32);
                }
            }
        }
        for b in 0..ab {
            lists[b * 3] = (PER + b) as u32;
        }
        for b in 0..bc {
            lists[(PER + b) * 3] = (2 * PER + b) as u32;
        }
        Graph::from_neighbour_lists(&lists, 3).unwrap()
    }

    /// Fragments A, B, C (one per ring); heads that see B with C.
    fn setup() -> (Vec<u32>, Vec<Vec<u32>>) {
        let fragment_of: Vec<u32> = (0..3 * PER).map(|i| (i / PER) as u32).collect();
        let heads = fragment_of.iter().map(|&f| (f > 0) as u32).collect();
        (fragment_of, vec![heads, vec![0; 3 * PER]])
    }

    #[test]
    fn a_fragment_moves_to_the_group_the_heads_see_it_in() {
        let g = three_rings(4, 1);
        let (fragment_of, heads) = setup();
        let merged = [0, 0, 1];
        let r = refine(&g, &fragment_of, &merged, 2, &heads, (0.0, 25.0)).unwrap();
        assert_eq!((r.groups.clone(), r.report.moves), (vec![0, 1, 1], 1));
        // The score at weight 0 is the agreement.
        assert!(r.report.agreement_after > r.report.agreement_before);
        assert_eq!(r.report.changed, 10.0 / 30.0);
        // A small weight on modularity still lets the heads decide; the same run, the same result.
        let again = refine(&g, &fragment_of, &merged, 2, &heads, (0.1, 25.0)).unwrap();
        assert_eq!(again.groups, r.groups);
    }

    #[test]
    fn moved_sums_equal_sums_made_afresh() {
        let g = three_rings(4, 1);
        let (fragment_of, heads) = setup();
        let mut moved = State::new(&g, &fragment_of, 3, &[0, 0, 1], 2, &heads).unwrap();
        for (f, to) in [(1, 1), (0, 1), (0, 0), (2, 0), (2, 1)] {
            let to_groups = moved.links_to_groups(f);
            moved.relocate(f, to, &to_groups);
        }
        let fresh = State::new(&g, &fragment_of, 3, &[0, 1, 1], 2, &heads).unwrap();
        assert_eq!(moved.groups, fresh.groups);
        assert_eq!(
            (&moved.group_inside, &moved.group_volume, &moved.group_size),
            (&fresh.group_inside, &fresh.group_volume, &fresh.group_size)
        );
        let labels: Vec<u32> = fragment_of
            .iter()
            .map(|&f| fresh.groups[f as usize])
            .collect();
        let modularity = g.modularity(&labels, 2);
        assert_eq!(
            moved.score(1.0) - moved.score(0.0),
            fresh.score(1.0) - fresh.score(0.0)
        );
        assert!((fresh.score(1.0) - fresh.score(0.0) - modularity).abs() < 1e-12);
        let agreement = heads
            .iter()
            .map(|h| sela_metrics::nmi(h, &labels))
            .sum::<f64>()
            / 2.0;
        assert!((fresh.score(0.0) - agreement).abs() < 1e-12);
    }

    #[test]
    fn the_graph_overrules_the_heads_when_it_weighs_more() {
        // A and B are joined by four bridges, B and C by one: moving B costs modularity.
        let g = three_rings(4, 1);
        let (fragment_of, heads) = setup();
        let merged = [0, 0, 1];
        let q = |groups: [u32; 3]| {
            let labels: Vec<u32> = fragment_of.iter().map(|&f| groups[f as usize]).collect();
            g.modularity(&labels, 2)
        };
        assert!(q([0, 0, 1]) > q([0, 1, 1]));
        let r = refine(&g, &fragment_of, &merged, 2, &heads, (100.0, 25.0)).unwrap();
        assert_eq!((r.groups, r.report.moves), (merged.to_vec(), 0));
    }

    #[test]
    fn no_move_passes_the_cap_or_the_floor() {
        let g = three_rings(4, 1);
        let (fragment_of, heads) = setup();
        // B would make C's group 20 nodes: over a cap of 19.
        let r = refine(&g, &fragment_of, &[0, 0, 1], 2, &heads, (0.0, 19.0)).unwrap();
        assert_eq!(r.report.moves, 0);
        // Three groups, one ring each: B joining C would agree with the heads exactly, but would
        // leave its group empty, under the floor of 0.6 × 10 nodes.
        let r = refine(&g, &fragment_of, &[0, 1, 2], 3, &heads, (0.0, 30.0)).unwrap();
        assert_eq!(r.report.moves, 0);
        assert!(refine(&g, &fragment_of, &[0, 0, 1], 2, &[], (0.0, 25.0)).is_err());
        assert!(refine(&g, &fragment_of, &[0, 0, 1], 2, &heads, (f64::NAN, 25.0)).is_err());
        assert!(refine(&g, &fragment_of[1..], &[0, 0, 1], 2, &heads, (0.0, 25.0)).is_err());
    }
}
