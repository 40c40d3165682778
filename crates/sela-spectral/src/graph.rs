//! The symmetric nearest-neighbour graph: an edge joins i and j when either is among the
//! other's nearest rows. Unweighted, without self-loops, stored as adjacency lists (CSR).

use crate::SpectralError;

/// An undirected, unweighted graph in compressed sparse row form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// `offsets[i]..offsets[i + 1]` indexes the neighbours of node i in `targets`.
    offsets: Vec<usize>,
    /// Neighbour indices, ascending within each node.
    targets: Vec<u32>,
}

impl Graph {
    /// The graph of `nodes` rows whose nearest rows are `lists` (row-major, `k` per row; a row
    /// listing itself is ignored). Every node needs at least one edge.
    pub fn from_neighbour_lists(lists: &[u32], k: usize) -> Result<Self, SpectralError> {
        if k == 0 || lists.len() % k != 0 {
            return Err(SpectralError::Shape(format!(
                "{} neighbour entries are not whole rows of {k}",
                lists.len()
            )));
        }
        let nodes = lists.len() / k;
        let mut edges: Vec<Vec<u32>> = vec![Vec::with_capacity(2 * k); nodes];
        for (i, row) in lists.chunks(k).enumerate() {
            for &j in row {
                if j as usize >= nodes {
                    return Err(SpectralError::Shape(format!(
                        "row {i} names neighbour {j}, but there are {nodes} rows"
                    )));
                }
                if j as usize != i {
                    edges[i].push(j);
                    edges[j as usize].push(i as u32);
                }
            }
        }
        let mut offsets = Vec::with_capacity(nodes + 1);
        let mut targets = Vec::with_capacity(nodes * k * 2);
        offsets.push(0);
        for (i, mut list) in edges.into_iter().enumerate() {
            list.sort_unstable();
            list.dedup();
            if list.is_empty() {
                return Err(SpectralError::Isolated(i));
            }
            targets.extend(list);
            offsets.push(targets.len());
        }
        Ok(Graph { offsets, targets })
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Number of undirected edges.
    pub fn edges(&self) -> usize {
        self.targets.len() / 2
    }

    /// The neighbours of node `i`, ascending.
    pub fn neighbours(&self, i: usize) -> &[u32] {
        &self.targets[self.offsets[i]..self.offsets[i + 1]]
    }

    /// Degree of every node.
    pub fn degrees(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Newman's modularity of a partition into `k` groups (`labels[i]` in `0..k`):
    /// Σ_g [ L_g / 2m − (vol_g / 2m)² ], with L_g twice the edges inside group g, vol_g the
    /// degree sum of its nodes and m the edges. Higher means more of the edges fall inside the
    /// groups than chance would put there, for groups of those volumes. Counts are exact
    /// integers, so the value does not depend on the order of the nodes.
    ///
    /// # Panics
    /// If `labels` does not have one entry per node or names a group `>= k`.
    pub fn modularity(&self, labels: &[u32], k: usize) -> f64 {
        assert_eq!(labels.len(), self.nodes(), "one label per node");
        let mut inside = vec![0u64; k];
        let mut volume = vec![0u64; k];
        for (i, &g) in labels.iter().enumerate() {
            let near = self.neighbours(i);
            volume[g as usize] += near.len() as u64;
            inside[g as usize] += near.iter().filter(|&&j| labels[j as usize] == g).count() as u64;
        }
        let total = self.targets.len() as f64;
        if total == 0.0 {
            return 0.0;
        }
        inside
            .iter()
            .zip(&volume)
            .map(|(&l, &v)| l as f64 / total - (v as f64 / total).powi(2))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetrises_drops_self_loops_and_duplicates() {
        // Row 0 lists itself and 1; row 1 lists 2 twice; row 2 lists 0.
        let g = Graph::from_neighbour_lists(&[0, 1, 2, 2, 0, 2], 2).unwrap();
        assert_eq!(g.nodes(), 3);
        assert_eq!(g.neighbours(0), &[1, 2]);
        assert_eq!(g.neighbours(1), &[0, 2]);
        assert_eq!(g.neighbours(2), &[0, 1]);
        assert_eq!(g.edges(), 3);
        assert_eq!(g.degrees(), vec![2, 2, 2]);
    }

    #[test]
    fn modularity_of_two_joined_triangles() {
        // Triangles {0, 1, 2} and {3, 4, 5} joined by the edge 2–3: m = 7.
        let lists = [1, 2, 0, 2, 0, 3, 4, 5, 3, 5, 3, 4];
        let g = Graph::from_neighbour_lists(&lists, 2).unwrap();
        assert_eq!(g.edges(), 7);
        // Each triangle: 6 of 14 edge ends inside, volume 7: 2 · (6/14 − (7/14)²).
        let split = g.modularity(&[0, 0, 0, 1, 1, 1], 2);
        assert!(
            (split - (2.0 * (6.0 / 14.0 - 0.25))).abs() < 1e-12,
            "{split}"
        );
        // One group holds every edge: 1 − 1 = 0.
        assert_eq!(g.modularity(&[0; 6], 1), 0.0);
        // A partition across the triangles is worse than the natural one.
        assert!(g.modularity(&[0, 1, 0, 1, 0, 1], 2) < split);
        // The group numbers do not matter.
        assert_eq!(g.modularity(&[1, 1, 1, 0, 0, 0], 2), split);
    }

    #[test]
    fn rejects_isolated_nodes_and_bad_indices() {
        assert!(matches!(
            Graph::from_neighbour_lists(&[0, 1], 1),
            Err(SpectralError::Isolated(0))
        ));
        assert!(matches!(
            Graph::from_neighbour_lists(&[1, 5], 1),
            Err(SpectralError::Shape(_))
        ));
        assert!(Graph::from_neighbour_lists(&[1, 0, 1], 2).is_err());
    }
}
