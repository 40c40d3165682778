//! Spectral labels: instead of solving a head's transport problem, label its rows with the
//! K-way spectral clustering of the embedding's nearest-neighbour graph (K the head's outputs).
//! The graph and its eigenvectors are computed once and shared by every head.
//!
//! With [`MergeSettings`] (`assign.spectral_fragments`) the K groups are merged from fragments
//! of the embedding ([`sela_spectral::cluster_merged`]), optionally refined towards the heads'
//! own clusterings ([`crate::refine`], `assign.spectral_refine`; with
//! `assign.spectral_extra_fragments` at several fragment counts, the refined partition of highest
//! modularity kept), then optionally smoothed by
//! balanced label propagation: each step re-labels every image by a transport problem (the label
//! step's Sinkhorn solver, uniform marginals) on its graph neighbours' labels. With
//! `assign.spectral_extra_grids`, more readouts of the embedding's stage get their own graphs,
//! labelled the same way, and one graph's labels are kept by a score every graph shares.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail};
use sela_io::features;
use sela_io::labels::{
    CutChoice, HeadLabels, HeadStats, MergeReport, MergeSettings, SpectralStats, SPECTRAL_PATH,
};
use sela_sinkhorn::{uniform_marginals, Sinkhorn};
use sela_spectral::{Graph, MergeOptions, Options, Spectrum};

use crate::neighbours::{same_rows, Neighbours};
use crate::refine::refine;

/// Pseudo-count added to every label's neighbour votes before the propagation's transport
/// problem, so a label no neighbour holds stays possible, if costly.
const VOTE_PSEUDOCOUNT: f32 = 0.01;
/// Marginal tolerance and iteration cap of each propagation step's transport problem.
const SMOOTHING_TOL: f64 = 1e-3;
const SMOOTHING_MAX_ITERS: usize = 1000;

/// One K's spectral labels, with what the head statistics report of them.
#[derive(Debug, Clone)]
struct Made {
    labels: Vec<u32>,
    confidence: Vec<f32>,
    iterations: usize,
    converged: bool,
    merge: Option<MergeReport>,
}

/// The kept merged partition of one fragment count, before any propagation.
#[derive(Debug)]
struct Merged {
    labels: Vec<u32>,
    /// The kept cut's own confidence (absent once refined: it holds only for the cut's labels).
    confidence: Option<Vec<f32>>,
    /// Its report, the propagation's fields still to fill.
    report: MergeReport,
    iterations: usize,
    converged: bool,
}

/// The embedding graph's leading eigenvectors, ready to cluster for any K up to their count.
#[derive(Debug, Clone)]
pub struct SpectralLabels {
    /// The embedding column the graph joins rows on.
    column: String,
    ids: Vec<u64>,
    graph: Graph,
    spectrum: Spectrum,
    options: Options,
    merge: Option<MergeSettings>,
    stats: SpectralStats,
    /// The clusterings made so far, by K (heads of one size share theirs).
    clusterings: BTreeMap<usize, Made>,
    /// The network's own clusterings of the rows (each head's argmax), which the cuts are
    /// compared with.
    predictions: Vec<Vec<u32>>,
    /// The graphs of the merge's `extra_grids`, labelled the same way; the labels of every graph
    /// are compared and one graph's kept.
    others: Vec<SpectralLabels>,
}

impl SpectralLabels {
    /// Joins every row of `features` to its `neighbours` nearest rows in the embedding and
    /// computes the graph's `max_k` leading eigenvectors (or `merge`'s count, if more; 0
    /// eigenvectors in `merge` means `max_k`, 0 cuts one cut); the same for each of `merge`'s
    /// `extra_grids`, on its own column.
    pub fn compute(
        features: &Path,
        neighbours: usize,
        max_k: usize,
        mut merge: Option<MergeSettings>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        if let Some(m) = merge.as_mut() {
            if m.eigenvectors == 0 {
                m.eigenvectors = max_k;
            }
            m.cuts = m.cuts.max(1);
        }
        let extra_grids = merge.as_ref().map_or(Vec::new(), |m| m.extra_grids.clone());
        let mut found = Self::on_column(
            features,
            features::EMBEDDING,
            neighbours,
            max_k,
            merge.clone(),
            seed,
        )?;
        for grid in extra_grids {
            let column = features::grid_embedding_column(grid);
            let other = Self::on_column(features, &column, neighbours, max_k, merge.clone(), seed)?;
            same_rows(
                &other.ids,
                &found.ids,
                &format!("{}: column `{column}`", features.display()),
            )?;
            found.stats.extra_graphs.push(SpectralStats {
                merge: None,
                column: Some(column),
                ..other.stats.clone()
            });
            found.others.push(other);
        }
        Ok(found)
    }

    /// The graph of one embedding column and its leading eigenvectors.
    fn on_column(
        features: &Path,
        column: &str,
        neighbours: usize,
        max_k: usize,
        merge: Option<MergeSettings>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let count = merge.as_ref().map_or(max_k, |m| m.eigenvectors.max(max_k));
        let start = Instant::now();
        let found = Neighbours::search(features, column, neighbours)?;
        let graph = Graph::from_neighbour_lists(found.lists(), found.k()).map_err(|e| {
            anyhow!(
                "{}: column `{column}`'s neighbour graph: {e}",
                features.display()
            )
        })?;
        if count > graph.nodes() {
            bail!(
                "{}: {} rows cannot give {count} spectral eigenvectors",
                features.display(),
                graph.nodes()
            );
        }
        let most_fragments = merge.as_ref().map_or(0, |m| {
            m.extra_fragments
                .iter()
                .copied()
                .fold(m.fragments, usize::max)
        });
        if most_fragments > graph.nodes() {
            bail!(
                "{}: {} rows cannot be cut into {most_fragments} fragments",
                features.display(),
                graph.nodes(),
            );
        }
        let options = Options {
            seed,
            ..Options::default()
        };
        let spectrum =
            sela_spectral::leading_eigenpairs(&graph, count, options.tol, options.max_steps, seed)
                .map_err(|e| {
                    anyhow!(
                        "{}: column `{column}`'s neighbour graph: {e}",
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
            merge: merge.clone(),
            column: None,
            extra_graphs: Vec::new(),
        };
        Ok(SpectralLabels {
            column: column.to_string(),
            ids: found.ids().to_vec(),
            graph,
            spectrum,
            options,
            merge,
            stats,
            clusterings: BTreeMap::new(),
            predictions: Vec::new(),
            others: Vec::new(),
        })
    }

    /// Adds a head's own clustering of the rows `ids` (which must be the embedding's): the
    /// argmax of each row of `logits` (row-major, `k` per row). Every cut is compared with
    /// these (`cut_agreements`), and `CutChoice::Agreement` keeps the cut that agrees best.
    pub fn add_prediction(
        &mut self,
        ids: &[u64],
        logits: &[f32],
        k: usize,
        context: &str,
    ) -> anyhow::Result<()> {
        same_rows(ids, &self.ids, context)?;
        if k == 0 || logits.len() != ids.len() * k {
            bail!(
                "{context}: {} logits for {} rows of K = {k}",
                logits.len(),
                ids.len()
            );
        }
        let prediction: Vec<u32> = logits.chunks(k).map(|row| argmax(row) as u32).collect();
        for other in &mut self.others {
            other.predictions.push(prediction.clone());
        }
        self.predictions.push(prediction);
        Ok(())
    }

    /// The graph's statistics.
    pub fn stats(&self) -> &SpectralStats {
        &self.stats
    }

    /// The K-way labels of `head` (column `column`, rows `ids`, which must be the embedding's),
    /// its clusters numbered to agree best with the head's own predictions (the argmax of each
    /// row of `logits`, row-major `ids.len() × k`); heads of one K get the same clustering, made
    /// once.
    pub fn head(
        &mut self,
        (head, column): (u32, &str),
        ids: &[u64],
        logits: &[f32],
        k: usize,
        context: &str,
    ) -> anyhow::Result<(HeadLabels, HeadStats)> {
        same_rows(ids, &self.ids, context)?;
        if logits.len() != ids.len() * k {
            bail!(
                "{context}: {} logits for {} rows of K = {k}",
                logits.len(),
                ids.len()
            );
        }
        if !self.clusterings.contains_key(&k) {
            let made = self.make(k).map_err(|e| anyhow!("{context}: {e}"))?;
            self.clusterings.insert(k, made);
        }
        let clustering = &self.clusterings[&k];
        let mut labels = clustering.labels.clone();
        let agreement = align_to_predictions(&mut labels, logits, k);
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
            iterations: clustering.iterations,
            converged: clustering.converged,
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
            merge: clustering.merge.clone(),
            predicted_agreement: Some(agreement),
        };
        let labels = HeadLabels {
            ids: ids.to_vec(),
            labels,
            confidence: clustering.confidence.clone(),
        };
        Ok((labels, stats))
    }

    /// The mean NMI of `partition` with the heads' own clusterings (0 without any).
    fn agreement_with_predictions(&self, partition: &[u32]) -> f64 {
        if self.predictions.is_empty() {
            return 0.0;
        }
        let total: f64 = self
            .predictions
            .iter()
            .map(|p| sela_metrics::nmi(p, partition))
            .sum();
        total / self.predictions.len() as f64
    }

    /// The K-way labels: this graph's, or with more graphs the labels of whichever graph scores
    /// highest by their mean NMI with the heads' clusterings + the refinement weight × their
    /// mean modularity over every graph. Unlike modularity on one graph, that score means the
    /// same for every graph's labels.
    fn make(&self, k: usize) -> anyhow::Result<Made> {
        let own = self.make_on_graph(k)?;
        if self.others.is_empty() {
            return Ok(own);
        }
        let mut candidates = vec![own];
        for other in &self.others {
            candidates.push(other.make_on_graph(k)?);
        }
        let weight = self.merge.as_ref().and_then(|m| m.refine).unwrap_or(0.0);
        let graphs: Vec<&Graph> = std::iter::once(&self.graph)
            .chain(self.others.iter().map(|o| &o.graph))
            .collect();
        let scores: Vec<f64> = candidates
            .iter()
            .map(|c| {
                let modularity: f64 = graphs.iter().map(|g| g.modularity(&c.labels, k)).sum();
                self.agreement_with_predictions(&c.labels)
                    + weight * modularity / graphs.len() as f64
            })
            .collect();
        let chosen = first_highest(&scores);
        let column = if chosen == 0 {
            self.column.clone()
        } else {
            self.others[chosen - 1].column.clone()
        };
        let mut made = candidates.swap_remove(chosen);
        if let Some(report) = made.merge.as_mut() {
            report.kept_embedding = Some(column);
            report.embedding_scores = scores;
        }
        Ok(made)
    }

    /// This graph's K-way labels: K-way k-means, or merged fragments then propagation.
    fn make_on_graph(&self, k: usize) -> anyhow::Result<Made> {
        let Some(merge) = &self.merge else {
            let c = sela_spectral::cluster(&self.spectrum, k, &self.options)?;
            return Ok(Made {
                labels: c.labels,
                confidence: c.confidence,
                iterations: c.partition.iterations,
                converged: c.partition.converged,
                merge: None,
            });
        };
        let counts: Vec<usize> = std::iter::once(merge.fragments)
            .chain(merge.extra_fragments.iter().copied())
            .collect();
        let mut candidates = counts
            .iter()
            .map(|&fragments| self.merged(k, merge, fragments))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Of several fragment counts, the refined partition of highest modularity is kept.
        let modularities: Vec<f64> = candidates
            .iter()
            .map(|c| {
                let r = &c.report;
                r.refinement
                    .as_ref()
                    .map_or(r.modularity, |r| r.modularity_after)
            })
            .collect();
        let chosen = first_highest(&modularities);
        let Merged {
            labels: merged,
            confidence: merged_confidence,
            mut report,
            iterations,
            converged,
        } = candidates.swap_remove(chosen);
        report.kept_fragments = (counts.len() > 1).then_some(counts[chosen]);
        let (labels, confidence, steps, changed) = if merge.smoothing_steps > 0 {
            let (labels, confidence, steps) = propagate(
                &self.graph,
                merged.clone(),
                k,
                merge.smoothing_steps,
                merge.smoothing_lambda,
            )?;
            let changed = labels.iter().zip(&merged).filter(|(a, b)| a != b).count();
            (labels, confidence, steps, changed)
        } else {
            let confidence = merged_confidence
                .unwrap_or_else(|| sela_spectral::neighbour_share(&self.graph, &merged));
            (merged, confidence, 0, 0)
        };
        report.smoothing_steps = steps;
        report.smoothing_changed = changed as f64 / labels.len().max(1) as f64;
        Ok(Made {
            iterations,
            converged,
            merge: Some(report),
            labels,
            confidence,
        })
    }

    /// The kept merged partition of one fragment count, refined when the settings ask.
    fn merged(&self, k: usize, merge: &MergeSettings, fragments: usize) -> anyhow::Result<Merged> {
        let options = MergeOptions {
            fragments,
            eigenvectors: merge.eigenvectors,
            size_cap: merge.size_cap,
        };
        // One k-means run a cut: its inertia says little about how well the fragments merge, so
        // the cuts are judged after merging, by the modularity of the merged partition.
        let cuts = (0..merge.cuts as u64)
            .map(|cut| {
                let seeded = Options {
                    seed: self.options.seed.wrapping_add(cut),
                    restarts: 1,
                    ..self.options.clone()
                };
                sela_spectral::cluster_merged(&self.graph, &self.spectrum, k, &options, &seeded)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let partitions: Vec<&[u32]> = cuts.iter().map(|c| &c.labels[..]).collect();
        let cut_modularities: Vec<f64> = partitions
            .iter()
            .map(|p| self.graph.modularity(p, k))
            .collect();
        let cut_agreements: Vec<f64> = partitions
            .iter()
            .map(|p| self.agreement_with_predictions(p))
            .collect();
        let kept = match merge.keep {
            CutChoice::Modularity => first_highest(&cut_modularities),
            CutChoice::Agreement if self.predictions.is_empty() => {
                bail!("keeping the cut that agrees with the heads needs their predictions")
            }
            CutChoice::Agreement => first_highest(&cut_agreements),
        };
        let agreement = agreement(&partitions, kept);
        let c = cuts.into_iter().nth(kept).expect("the kept cut exists");
        // The kept cut's own confidence holds only while its labels stand as they are.
        let (merged, merged_confidence, refinement) = match merge.refine {
            None => (c.labels, Some(c.confidence), None),
            Some(weight) => {
                let cap = merge.size_cap * self.graph.nodes() as f64 / k as f64;
                let refined = refine(
                    &self.graph,
                    &c.fragments.labels,
                    &c.merge.groups,
                    k,
                    &self.predictions,
                    (weight, cap),
                )?;
                let labels: Vec<u32> = c
                    .fragments
                    .labels
                    .iter()
                    .map(|&f| refined.groups[f as usize])
                    .collect();
                (labels, None, Some(refined.report))
            }
        };
        Ok(Merged {
            labels: merged,
            confidence: merged_confidence,
            report: MergeReport {
                kept_cut: kept,
                kept_fragments: None,
                modularity: cut_modularities[kept],
                cut_modularities,
                cut_agreements,
                agreement,
                final_cap: c.merge.final_cap,
                smoothing_steps: 0,
                smoothing_changed: 0.0,
                refinement,
                kept_embedding: None,
                embedding_scores: Vec::new(),
            },
            iterations: c.fragments.iterations,
            converged: c.fragments.converged,
        })
    }
}

/// Renumbers the clusters of `labels` (`0..k`) so that as many rows as possible carry the head's
/// own prediction, the argmax of their row of `logits` (row-major, `k` per row; the first of
/// equal maxima), and returns the share of rows that then do. A cluster's number means nothing
/// to the clustering, but the head trained next starts from what it predicts now, so the
/// renumbering keeps it from having to unlearn an arbitrary permutation.
pub fn align_to_predictions(labels: &mut [u32], logits: &[f32], k: usize) -> f64 {
    let mut overlap = vec![0u64; k * k];
    for (row, &label) in logits.chunks(k).zip(labels.iter()) {
        let predicted = argmax(row);
        overlap[label as usize * k + predicted] += 1;
    }
    let cost: Vec<f64> = overlap.iter().map(|&c| -(c as f64)).collect();
    let renumber: Vec<u32> = sela_metrics::hungarian(&cost, k, k)
        .into_iter()
        .map(|to| to.expect("a square matching pairs every cluster") as u32)
        .collect();
    let agreeing: u64 = (0..k).map(|c| overlap[c * k + renumber[c] as usize]).sum();
    labels.iter_mut().for_each(|l| *l = renumber[*l as usize]);
    agreeing as f64 / labels.len().max(1) as f64
}

/// The index of the largest of `row` (the first of equal maxima).
fn argmax(row: &[f32]) -> usize {
    (1..row.len()).fold(0, |best, c| if row[c] > row[best] { c } else { best })
}

/// The index of the highest of the cuts' `scores` (the first among equals).
fn first_highest(scores: &[f64]) -> usize {
    scores
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &q)| {
            if q > best.1 {
                (i, q)
            } else {
                best
            }
        })
        .0
}

/// The mean NMI of partition `kept` with the other `partitions` (1 when there are none).
fn agreement(partitions: &[&[u32]], kept: usize) -> f64 {
    if partitions.len() < 2 {
        return 1.0;
    }
    let total: f64 = (0..partitions.len())
        .filter(|&i| i != kept)
        .map(|i| sela_metrics::nmi(partitions[kept], partitions[i]))
        .sum();
    total / (partitions.len() - 1) as f64
}

/// Balanced label propagation: at most `steps` times, every node's label becomes its argmax of
/// the transport plan (exponent `lambda`, uniform cluster marginals) on its graph neighbours'
/// label votes; stops early once no label changes. Returns the labels, each node's normalised
/// plan entry at its label, and the steps run.
pub fn propagate(
    graph: &Graph,
    mut labels: Vec<u32>,
    k: usize,
    steps: usize,
    lambda: f64,
) -> anyhow::Result<(Vec<u32>, Vec<f32>, usize)> {
    let n = graph.nodes();
    if labels.len() != n {
        bail!("{} labels for a graph of {n} nodes", labels.len());
    }
    let marginals = uniform_marginals(k);
    let mut confidence = vec![1.0; n];
    let mut run = 0;
    while run < steps {
        run += 1;
        let mut votes = vec![VOTE_PSEUDOCOUNT; n * k];
        for (i, row) in votes.chunks_mut(k).enumerate() {
            for &j in graph.neighbours(i) {
                row[labels[j as usize] as usize] += 1.0;
            }
            row.iter_mut().for_each(|v| *v = v.ln());
        }
        let mut solver = Sinkhorn::new(votes, k, lambda, None)?;
        let solution = solver.solve(&marginals, SMOOTHING_TOL, SMOOTHING_MAX_ITERS, |_| {})?;
        if !solution.converged {
            eprintln!(
                "warning: label propagation step {run}: marginal error {:.2e} after {} \
                 iterations (tol {SMOOTHING_TOL:e})",
                solution.error, solution.iterations
            );
        }
        let assignment = solver.assign()?;
        confidence = assignment.confidence;
        let same = assignment.labels == labels;
        labels = assignment.labels;
        if same {
            break;
        }
    }
    Ok((labels, confidence, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rings of `per` nodes, each joined to its `reach` successors, bridged by one edge.
    fn two_rings(per: usize, reach: usize) -> Graph {
        let mut lists = Vec::new();
        for g in 0..2 {
            for i in 0..per {
                for s in 1..=reach {
                    lists.push((g * per + (i + s) % per) as u32);
                }
            }
        }
        lists[0] = per as u32;
        Graph::from_neighbour_lists(&lists, reach).unwrap()
    }

    #[test]
    fn the_most_modular_partition_is_kept() {
        let per = 20;
        let g = two_rings(per, 3);
        let rings: Vec<u32> = (0..2 * per).map(|i| (i / per) as u32).collect();
        // Halves that cut across both rings, and the rings themselves under other numbers.
        let across: Vec<u32> = (0..2 * per).map(|i| ((i / (per / 2)) % 2) as u32).collect();
        let renumbered: Vec<u32> = rings.iter().map(|&l| 1 - l).collect();
        let q: Vec<f64> = [&across, &rings, &renumbered]
            .iter()
            .map(|p| g.modularity(p, 2))
            .collect();
        assert!(q[0] < q[1] && q[1] == q[2]);
        assert_eq!(first_highest(&q), 1, "the first of equals");
        assert_eq!(first_highest(&[0.2, 0.5, 0.4]), 1);
        assert_eq!(agreement(&[&across, &rings, &renumbered], 1), {
            (sela_metrics::nmi(&rings, &across) + 1.0) / 2.0
        });
        assert_eq!(agreement(&[&rings], 0), 1.0);
    }

    #[test]
    fn clusters_are_renumbered_to_the_heads_predictions() {
        // Clusters 0, 1, 2 are mostly predicted as 2, 0, 1; row 5 disagrees.
        let mut labels = vec![0, 0, 1, 1, 2, 2];
        let one_hot = |c: usize| (0..3).map(move |j| if j == c { 1.0 } else { 0.0 });
        let logits: Vec<f32> = [2, 2, 0, 0, 1, 0].into_iter().flat_map(one_hot).collect();
        let agreement = align_to_predictions(&mut labels, &logits, 3);
        assert_eq!(labels, vec![2, 2, 0, 0, 1, 1]);
        assert!((agreement - 5.0 / 6.0).abs() < 1e-12, "{agreement}");
        // Already agreeing labels stay as they are.
        let mut same = labels.clone();
        let exact: Vec<f32> = labels.iter().flat_map(|&c| one_hot(c as usize)).collect();
        assert_eq!(align_to_predictions(&mut same, &exact, 3), 1.0);
        assert_eq!(same, labels);
    }

    #[test]
    fn propagation_repairs_scattered_errors_and_settles() {
        let per = 50;
        let g = two_rings(per, 3);
        let truth: Vec<u32> = (0..2 * per).map(|i| (i / per) as u32).collect();
        let mut noisy = truth.clone();
        // Five scattered nodes of each ring carry the other ring's label.
        for i in [3, 14, 25, 36, 47] {
            noisy[i] = 1;
            noisy[per + i] = 0;
        }
        let (labels, confidence, steps) = propagate(&g, noisy.clone(), 2, 10, 10.0).unwrap();
        assert_eq!(labels, truth);
        assert!(steps < 10, "settled after {steps} steps");
        assert!(confidence.iter().all(|&c| c > 0.5 && c <= 1.0));
        // Settled labels stay put.
        let (again, _, one) = propagate(&g, truth.clone(), 2, 10, 10.0).unwrap();
        assert_eq!((again, one), (truth, 1));
        assert!(propagate(&g, noisy[..10].to_vec(), 2, 10, 10.0).is_err());
    }
}
