//! Spectral labels: instead of solving a head's transport problem, label its rows with the
//! K-way spectral clustering of the embedding's nearest-neighbour graph (K the head's outputs).
//! The graph and its eigenvectors are computed once and shared by every head.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail};
use sela_io::labels::{HeadLabels, HeadStats, SpectralStats, SPECTRAL_PATH};
use sela_spectral::{Clustering, Graph, Options, Spectrum};

use crate::neighbours::{same_rows, Neighbours};

/// The embedding graph's leading eigenvectors, ready to cluster for any K up to their count.
#[derive(Debug, Clone)]
pub struct SpectralLabels {
    ids: Vec<u64>,
    spectrum: Spectrum,
    options: Options,
    stats: SpectralStats,
    /// The clusterings made so far, by K (heads of one size share theirs).
    clusterings: BTreeMap<usize, Clustering>,
}

impl SpectralLabels {
    /// Joins every row of `features` to its `neighbours` nearest rows in the embedding and
    /// computes the graph's `max_k` leading eigenvectors.
    pub fn compute(
        features: &Path,
        neighbours: usize,
        max_k: usize,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let start = Instant::now();
        let found = Neighbours::search(features, neighbours)?;
        let graph = Graph::from_neighbour_lists(found.lists(), found.k()).map_err(|e| {
            anyhow!(
                "{}: the embedding's neighbour graph: {e}",
                features.display()
            )
        })?;
        if max_k > graph.nodes() {
            bail!(
                "{}: {} rows cannot make {max_k} spectral clusters",
                features.display(),
                graph.nodes()
            );
        }
        let options = Options {
            seed,
            ..Options::default()
        };
        let spectrum =
            sela_spectral::leading_eigenpairs(&graph, max_k, options.tol, options.max_steps, seed)
                .map_err(|e| {
                    anyhow!(
                        "{}: the embedding's neighbour graph: {e}",
                        features.display()
                    )
                })?;
        let stats = SpectralStats {
            neighbours: found.k(),
            edges: graph.edges(),
            eigenvalues: spectrum.values.clone(),
            max_residual: spectrum.max_residual,
            lanczos_steps: spectrum.steps,
            seconds: start.elapsed().as_secs_f64(),
        };
        Ok(SpectralLabels {
            ids: found.ids().to_vec(),
            spectrum,
            options,
            stats,
            clusterings: BTreeMap::new(),
        })
    }

    /// The graph's statistics.
    pub fn stats(&self) -> &SpectralStats {
        &self.stats
    }

    /// The K-way labels of `head` (column `column`, rows `ids`, which must be the embedding's);
    /// heads of one K get the same clustering, made once.
    pub fn head(
        &mut self,
        (head, column): (u32, &str),
        ids: &[u64],
        k: usize,
        context: &str,
    ) -> anyhow::Result<(HeadLabels, HeadStats)> {
        same_rows(ids, &self.ids, context)?;
        if !self.clusterings.contains_key(&k) {
            let made = sela_spectral::cluster(&self.spectrum, k, &self.options)
                .map_err(|e| anyhow!("{context}: {e}"))?;
            self.clusterings.insert(k, made);
        }
        let clustering = &self.clusterings[&k];
        let n = ids.len();
        let mut sizes = vec![0usize; k];
        for &l in &clustering.labels {
            sizes[l as usize] += 1;
        }
        let even = n as f64 / k as f64;
        let col_error = sizes
            .iter()
            .map(|&s| (s as f64 - even).abs() / even)
            .fold(0.0, f64::max);
        let stats = HeadStats {
            head,
            column: column.to_string(),
            n,
            k,
            iterations: clustering.partition.iterations,
            converged: clustering.partition.converged,
            row_error: 0.0,
            col_error,
            objective: 0.0,
            entropy: 0.0,
            min_cluster_size: sizes.iter().copied().min().unwrap_or(0),
            max_cluster_size: sizes.iter().copied().max().unwrap_or(0),
            path: SPECTRAL_PATH.to_string(),
            absorptions: 0,
            rejected_steps: 0,
            warm_started: false,
            seconds: 0.0,
            churn_fraction: None,
            churn_nmi: None,
            log_beta: Vec::new(),
        };
        let labels = HeadLabels {
            ids: ids.to_vec(),
            labels: clustering.labels.clone(),
            confidence: clustering.confidence.clone(),
        };
        Ok((labels, stats))
    }
}
