//! Spectral clustering of a nearest-neighbour graph (Ng, Jordan & Weiss): the leading
//! eigenvectors of the normalised adjacency D^-1/2·W·D^-1/2 ([`eigen`]), each node's row of them
//! scaled to unit length, then k-means on those rows ([`kmeans`]).
//!
//! [`cluster_merged`] instead over-clusters those rows into many fragments and merges them under
//! a size cap ([`merge`]), for graphs where K-way k-means joins several classes in one blob.
//!
//! sela's label step uses it to read labels off the learned embedding's neighbour graph rather
//! than off the heads (`assign.spectral`). Everything is deterministic for a seed and does not
//! depend on the number of threads.

pub mod eigen;
pub mod graph;
pub mod kmeans;
pub mod merge;

pub use eigen::{leading_eigenpairs, Spectrum};
pub use graph::Graph;
pub use kmeans::{kmeans, Partition};
pub use merge::{merge_fragments, Merge};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum SpectralError {
    /// Inputs of inconsistent or impossible sizes.
    #[error("{0}")]
    Shape(String),
    /// A node with no edge: its row of the normalised adjacency is undefined.
    #[error("node {0} has no neighbour other than itself")]
    Isolated(usize),
    /// An eigensolver failed.
    #[error("{0}")]
    NoConvergence(String),
}

/// How to cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Residual at which the eigenpairs count as converged.
    pub tol: f64,
    /// Lanczos step cap.
    pub max_steps: usize,
    /// k-means restarts.
    pub restarts: usize,
    /// Lloyd iteration cap per restart.
    pub max_iters: usize,
    /// Seed of the Lanczos start vector and the k-means++ draws.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tol: 1e-6,
            max_steps: 1000,
            restarts: 10,
            max_iters: 300,
            seed: 0,
        }
    }
}

/// A spectral clustering into `k` clusters.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Cluster of every node, `0..k`.
    pub labels: Vec<u32>,
    /// Each node's fuzzy membership (c-means, m = 2) of its own cluster:
    /// (1/d_own) / Σ_c (1/d_c) over squared distances d to the centres, in (0, 1].
    pub confidence: Vec<f32>,
    /// The k-means run kept.
    pub partition: Partition,
}

/// Clusters the nodes into `k` clusters using the first `k` eigenvectors of `spectrum`.
pub fn cluster(
    spectrum: &Spectrum,
    k: usize,
    options: &Options,
) -> Result<Clustering, SpectralError> {
    if k > spectrum.count() {
        return Err(SpectralError::Shape(format!(
            "{k} clusters need {k} eigenvectors; {} were computed",
            spectrum.count()
        )));
    }
    let rows = unit_rows(spectrum, k);
    let partition = kmeans(
        &rows,
        k,
        k,
        options.restarts,
        options.max_iters,
        options.seed,
    )?;
    let confidence = rows
        .chunks(k)
        .zip(&partition.labels)
        .map(|(row, &own)| membership(row, &partition.centres, k, own as usize))
        .collect();
    Ok(Clustering {
        labels: partition.labels.clone(),
        confidence,
        partition,
    })
}

/// How [`cluster_merged`] over-clusters and merges.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeOptions {
    /// Fragments k-means cuts the embedding into (more than K).
    pub fragments: usize,
    /// Leading eigenvectors the fragments are cut from.
    pub eigenvectors: usize,
    /// Largest merged group, as a multiple of N / K (relaxed only when no pair fits).
    pub size_cap: f64,
}

/// A K-way clustering merged from fragments.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedClustering {
    /// Group of every node, `0..k`.
    pub labels: Vec<u32>,
    /// Each node's share of graph neighbours in its own group, in [0, 1].
    pub confidence: Vec<f32>,
    /// The k-means run that cut the fragments.
    pub fragments: Partition,
    /// How the fragments merged.
    pub merge: Merge,
}

/// Clusters the nodes of `graph` into `k` groups: k-means into `merge.fragments` fragments on
/// the first `merge.eigenvectors` eigenvectors of `spectrum` (rows scaled to unit length), then
/// [`merge_fragments`].
pub fn cluster_merged(
    graph: &Graph,
    spectrum: &Spectrum,
    k: usize,
    merge: &MergeOptions,
    options: &Options,
) -> Result<MergedClustering, SpectralError> {
    let dim = merge.eigenvectors;
    if dim == 0 || dim > spectrum.count() {
        return Err(SpectralError::Shape(format!(
            "fragments cut from {dim} eigenvectors; {} were computed",
            spectrum.count()
        )));
    }
    if merge.fragments <= k {
        return Err(SpectralError::Shape(format!(
            "{} fragments cannot be merged into {k} groups: over-clustering needs more than K",
            merge.fragments
        )));
    }
    let rows = unit_rows(spectrum, dim);
    let fragments = kmeans(
        &rows,
        dim,
        merge.fragments,
        options.restarts,
        options.max_iters,
        options.seed,
    )?;
    let merged = merge_fragments(graph, &fragments.labels, merge.fragments, k, merge.size_cap)?;
    let labels: Vec<u32> = fragments
        .labels
        .iter()
        .map(|&f| merged.groups[f as usize])
        .collect();
    let confidence = neighbour_share(graph, &labels);
    Ok(MergedClustering {
        labels,
        confidence,
        fragments,
        merge: merged,
    })
}

/// Each node's share of its graph neighbours that carry its own label, in [0, 1].
pub fn neighbour_share(graph: &Graph, labels: &[u32]) -> Vec<f32> {
    (0..graph.nodes())
        .map(|i| {
            let near = graph.neighbours(i);
            let same = near
                .iter()
                .filter(|&&j| labels[j as usize] == labels[i])
                .count();
            same as f32 / near.len() as f32
        })
        .collect()
}

/// The first `dim` eigenvectors of `spectrum`, each node's row scaled to unit length.
fn unit_rows(spectrum: &Spectrum, dim: usize) -> Vec<f64> {
    let mut rows = spectrum.leading(dim);
    for row in rows.chunks_mut(dim) {
        let len = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if len > 0.0 {
            row.iter_mut().for_each(|x| *x /= len);
        }
    }
    rows
}

/// Fuzzy c-means membership (m = 2) of `point` in centre `own`.
fn membership(point: &[f64], centres: &[f64], dim: usize, own: usize) -> f32 {
    let d: Vec<f64> = centres
        .chunks(dim)
        .map(|c| point.iter().zip(c).map(|(x, y)| (x - y) * (x - y)).sum())
        .collect();
    if d[own] <= 0.0 {
        return 1.0;
    }
    let total: f64 = d
        .iter()
        .map(|&x| if x > 0.0 { 1.0 / x } else { f64::INFINITY })
        .sum();
    ((1.0 / d[own]) / total) as f32
}

/// A uniform draw in [0, 1) for `(seed, stream, index)`: SplitMix64 finalisers over the tuple,
/// so each draw is independent of how many others were made.
pub(crate) fn unit_draw(seed: u64, stream: u64, index: u64) -> f64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let bits = mix(mix(mix(seed) ^ stream) ^ index);
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `groups` rings of `per` nodes (each joined to its `reach` successors), ring g bridged to
    /// ring g + 1 by one edge.
    pub(crate) fn rings(groups: usize, per: usize, reach: usize) -> Graph {
        let mut lists = Vec::new();
        for g in 0..groups {
            for i in 0..per {
                for s in 1..=reach {
                    lists.push((g * per + (i + s) % per) as u32);
                }
            }
        }
        for g in 0..groups - 1 {
            lists[g * per * reach] = ((g + 1) * per) as u32;
        }
        Graph::from_neighbour_lists(&lists, reach).unwrap()
    }

    /// Two dense groups of `per` nodes (each node joined to its `reach` successors within the
    /// group, around a ring), bridged by a single edge.
    fn two_groups(per: usize, reach: usize) -> Graph {
        let mut lists = Vec::new();
        for group in 0..2 {
            for i in 0..per {
                for s in 1..=reach {
                    lists.push((group * per + (i + s) % per) as u32);
                }
            }
        }
        // Bridge: node 0's last neighbour becomes node `per`.
        lists[reach - 1] = per as u32;
        Graph::from_neighbour_lists(&lists, reach).unwrap()
    }

    #[test]
    fn splits_two_bridged_groups() {
        let per = 60;
        let g = two_groups(per, 4);
        let options = Options::default();
        let spectrum = leading_eigenpairs(&g, 2, options.tol, options.max_steps, 5).unwrap();
        assert!(spectrum.max_residual <= options.tol);
        let c = cluster(&spectrum, 2, &options).unwrap();
        let first = c.labels[0];
        assert!(c.labels[..per].iter().all(|&l| l == first));
        assert!(c.labels[per..].iter().all(|&l| l != first));
        assert!(c.confidence.iter().all(|&x| x > 0.5 && x <= 1.0));
        assert!(cluster(&spectrum, 3, &options).is_err());

        // The same bits on one thread.
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let again = single.install(|| {
            let s = leading_eigenpairs(&g, 2, options.tol, options.max_steps, 5).unwrap();
            (cluster(&s, 2, &options).unwrap(), s)
        });
        assert_eq!(again, (c, spectrum));
    }

    #[test]
    fn merged_fragments_recover_bridged_rings() {
        // Three rings of 60 bridged in a chain, cut into 9 fragments from 9 eigenvectors and
        // merged into 3 groups: one group per ring, the same bits on one thread.
        let per = 60;
        let g = rings(3, per, 4);
        let options = Options::default();
        let merge = MergeOptions {
            fragments: 9,
            eigenvectors: 9,
            size_cap: 1.2,
        };
        let run = || {
            let s = leading_eigenpairs(&g, 9, options.tol, options.max_steps, 1).unwrap();
            cluster_merged(&g, &s, 3, &merge, &options).unwrap()
        };
        let c = run();
        for ring in c.labels.chunks(per) {
            assert!(ring.iter().all(|&l| l == ring[0]), "{ring:?}");
        }
        assert_eq!(c.labels[0], 0);
        assert_eq!(c.labels[per], 1);
        assert_eq!(c.labels[2 * per], 2);
        assert!(c.confidence.iter().all(|&x| (0.75..=1.0).contains(&x)));
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert_eq!(single.install(run), c);

        let s = leading_eigenpairs(&g, 9, options.tol, options.max_steps, 1).unwrap();
        let too_few = MergeOptions {
            fragments: 3,
            ..merge.clone()
        };
        assert!(cluster_merged(&g, &s, 3, &too_few, &options).is_err());
        let too_many_vectors = MergeOptions {
            eigenvectors: 10,
            ..merge
        };
        assert!(cluster_merged(&g, &s, 3, &too_many_vectors, &options).is_err());
    }

    #[test]
    fn draws_are_uniform_and_reproducible() {
        let draws: Vec<f64> = (0..10_000).map(|i| unit_draw(9, 2, i)).collect();
        assert!(draws.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert_eq!(unit_draw(9, 2, 5), draws[5]);
        assert_ne!(unit_draw(9, 3, 5), draws[5]);
    }
}
