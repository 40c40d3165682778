//! Over-cluster, then merge: k-means cuts the spectral embedding into many small fragments, and
//! the fragments most strongly joined in the graph are merged, pair by pair, until K groups
//! remain. A cap on a group's size keeps one group from swallowing several classes, the failure
//! of K-way k-means on a graph where a few classes form one dense blob.
//!
//! Two fragments a and b are joined by their normalised association C_ab / (vol_a · vol_b):
//! C_ab the edges between them, vol the sum of their nodes' degrees. The pair of highest
//! association whose merged size stays under the cap merges first; when no pair fits and more
//! than K groups are left, the cap grows by 5 % until one does. Fragments with no edge between
//! them merge only when no joined pair is left: the cap grows first, since a group of unrelated
//! fragments is never the structure sought.

use crate::graph::Graph;
use crate::SpectralError;

/// How the cap on a merged group's size grows when no pair fits under it.
const CAP_GROWTH: f64 = 1.05;

/// The outcome of [`merge_fragments`].
#[derive(Debug, Clone, PartialEq)]
pub struct Merge {
    /// Group (`0..k`) of every fragment, numbered in the order of their first node
    /// (`u32::MAX` for a fragment that holds no node).
    pub groups: Vec<u32>,
    /// The cap on a group's size (nodes) in force at the last merge.
    pub final_cap: f64,
}

/// Merges the `fragments` fragments of `graph` (fragment of every node in `fragment_of`) into
/// `k` groups, never past `size_cap · N / k` nodes in a group while another pair fits.
pub fn merge_fragments(
    graph: &Graph,
    fragment_of: &[u32],
    fragments: usize,
    k: usize,
    size_cap: f64,
) -> Result<Merge, SpectralError> {
    let n = graph.nodes();
    if fragment_of.len() != n {
        return Err(SpectralError::Shape(format!(
            "{} fragment labels for a graph of {n} nodes",
            fragment_of.len()
        )));
    }
    if k == 0 || k > fragments {
        return Err(SpectralError::Shape(format!(
            "{fragments} fragments cannot merge into {k} groups"
        )));
    }
    if !(size_cap.is_finite() && size_cap >= 1.0) {
        return Err(SpectralError::Shape(format!(
            "the size cap must be at least 1 (× N / K), got {size_cap}"
        )));
    }
    if let Some(bad) = fragment_of.iter().find(|&&f| f as usize >= fragments) {
        return Err(SpectralError::Shape(format!(
            "fragment {bad} named, but there are {fragments}"
        )));
    }
    // Edge counts between fragments (each undirected edge counted from both ends), volumes
    // and sizes.
    let m = fragments;
    let mut links = vec![0.0f64; m * m];
    let mut volume = vec![0.0f64; m];
    let mut size = vec![0usize; m];
    for (i, &a) in fragment_of.iter().enumerate() {
        let a = a as usize;
        size[a] += 1;
        for &j in graph.neighbours(i) {
            let b = fragment_of[j as usize] as usize;
            links[a * m + b] += 1.0;
            volume[a] += 1.0;
        }
    }
    let mut alive: Vec<bool> = size.iter().map(|&s| s > 0).collect();
    let mut groups_left = alive.iter().filter(|&&a| a).count();
    if groups_left < k {
        return Err(SpectralError::Shape(format!(
            "{groups_left} non-empty fragments cannot merge into {k} groups"
        )));
    }
    let mut owner: Vec<usize> = (0..m).collect();
    let mut cap = size_cap * n as f64 / k as f64;
    while groups_left > k {
        let joined = |a: usize, b: usize| links[a * m + b] > 0.0;
        let any_joined = (0..m)
            .filter(|&a| alive[a])
            .any(|a| (a + 1..m).any(|b| alive[b] && joined(a, b)));
        let mut best: Option<(f64, usize, usize)> = None;
        for a in (0..m).filter(|&a| alive[a]) {
            for b in (a + 1..m).filter(|&b| alive[b]) {
                if (size[a] + size[b]) as f64 > cap || (any_joined && !joined(a, b)) {
                    continue;
                }
                let score = links[a * m + b] / (volume[a] * volume[b]).max(f64::MIN_POSITIVE);
                if best.is_none_or(|(s, _, _)| score > s) {
                    best = Some((score, a, b));
                }
            }
        }
        let Some((_, a, b)) = best else {
            cap *= CAP_GROWTH;
            continue;
        };
        // b joins a.
        for c in 0..m {
            links[a * m + c] += links[b * m + c];
        }
        for c in 0..m {
            links[c * m + a] += links[c * m + b];
        }
        volume[a] += volume[b];
        size[a] += size[b];
        alive[b] = false;
        owner.iter_mut().filter(|o| **o == b).for_each(|o| *o = a);
        groups_left -= 1;
    }
    // Number the groups in the order of their first node.
    let mut number = vec![u32::MAX; m];
    let mut next = 0;
    for &f in fragment_of {
        let o = owner[f as usize];
        if number[o] == u32::MAX {
            number[o] = next;
            next += 1;
        }
    }
    let groups = owner.iter().map(|&o| number[o]).collect();
    Ok(Merge {
        groups,
        final_cap: cap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::rings;

    #[test]
    fn merges_the_halves_of_each_ring() {
        // Three rings of 40, each cut into two fragments of 20: the merge must rejoin the halves.
        let (per, g) = (40, rings(3, 40, 3));
        let fragment_of: Vec<u32> = (0..3 * per).map(|i| (i / (per / 2)) as u32).collect();
        let merge = merge_fragments(&g, &fragment_of, 6, 3, 1.2).unwrap();
        assert_eq!(merge.groups, vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(merge.final_cap, 1.2 * 40.0);
    }

    #[test]
    fn the_cap_keeps_a_dense_pair_apart_until_it_must_grow() {
        // Two rings of 40 (fragments 0 and 1) and two of 20 (fragments 2 and 3), rings bridged
        // in a chain: merging into 3 groups of a cap 1.2 × 120 / 3 = 48 can only join the two
        // small rings; into 2 groups of a cap 60 the pairs left all hold 80 nodes, so the cap
        // grows until they fit, and the two big rings (the weaker volumes) merge.
        let mut lists = Vec::new();
        let sizes = [40usize, 40, 20, 20];
        let mut first = 0;
        for &s in &sizes {
            for i in 0..s {
                for r in 1..=3 {
                    lists.push((first + (i + r) % s) as u32);
                }
            }
            first += s;
        }
        lists[0] = 40;
        lists[40 * 3] = 80;
        lists[80 * 3] = 100;
        let g = Graph::from_neighbour_lists(&lists, 3).unwrap();
        let fragment_of: Vec<u32> = sizes
            .iter()
            .enumerate()
            .flat_map(|(f, &s)| std::iter::repeat_n(f as u32, s))
            .collect();
        let three = merge_fragments(&g, &fragment_of, 4, 3, 1.2).unwrap();
        assert_eq!(three.groups, vec![0, 1, 2, 2]);
        let two = merge_fragments(&g, &fragment_of, 4, 2, 1.0).unwrap();
        assert!(two.final_cap >= 80.0, "{}", two.final_cap);
        assert_eq!(two.groups, vec![0, 0, 1, 1]);
    }

    #[test]
    fn unjoined_fragments_merge_only_when_no_joined_pair_is_left() {
        // Three separate rings: A (60 nodes, fragments 0 and 1 of 30), B (20: fragments 2 and 3
        // of 10) and C (10: fragment 4). Into 3 groups under a cap of 30: B's halves merge;
        // then only B + C (no edge between them) would fit, so the cap grows until A's halves
        // do instead.
        let mut lists = Vec::new();
        let mut first = 0;
        for s in [60usize, 20, 10] {
            for i in 0..s {
                for r in 1..=3 {
                    lists.push((first + (i + r) % s) as u32);
                }
            }
            first += s;
        }
        let g = Graph::from_neighbour_lists(&lists, 3).unwrap();
        let fragment_of: Vec<u32> = (0..90)
            .map(|i| [0, 0, 0, 1, 1, 1, 2, 3, 4][i / 10])
            .collect();
        let merge = merge_fragments(&g, &fragment_of, 5, 3, 1.0).unwrap();
        assert_eq!(merge.groups, vec![0, 0, 1, 1, 2]);
        assert!(merge.final_cap >= 60.0, "{}", merge.final_cap);
        // Separate rings beyond K: unjoined pairs must merge, and do.
        let rings_only: Vec<u32> = (0..90)
            .map(|i| [0, 1, 2][(i >= 60) as usize + (i >= 80) as usize])
            .collect();
        let two = merge_fragments(&g, &rings_only, 3, 2, 1.0).unwrap();
        assert_eq!(two.groups, vec![0, 1, 1]);
    }

    #[test]
    fn rejects_bad_inputs() {
        let g = rings(2, 10, 2);
        let f: Vec<u32> = (0..20).map(|i| (i / 5) as u32).collect();
        assert!(merge_fragments(&g, &f[..19], 4, 2, 1.2).is_err());
        assert!(merge_fragments(&g, &f, 4, 5, 1.2).is_err());
        assert!(merge_fragments(&g, &f, 4, 2, 0.5).is_err());
        assert!(merge_fragments(&g, &f, 3, 2, 1.2).is_err());
        // Only three of five fragments are used: three groups are possible, four are not.
        let sparse: Vec<u32> = (0..20).map(|i| [0, 2, 4][i % 3]).collect();
        assert!(merge_fragments(&g, &sparse, 5, 3, 1.2).is_ok());
        assert!(merge_fragments(&g, &sparse, 5, 4, 1.2).is_err());
    }
}
