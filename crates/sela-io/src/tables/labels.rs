//! The labels table: the Sinkhorn stage's hard assignment of every image, per head.
//!
//! | column | type | |
//! |---|---|---|
//! | `id` | UInt64 | the dataset row |
//! | `head` | UInt32 | head index |
//! | `label` | UInt32 | assigned cluster, `0..K_head` |
//! | `confidence` | Float32 | the row's largest entry of Q, normalised to sum 1 over the row (spectral labels: the row's fuzzy membership of its cluster) |
//!
//! Metadata `sela.assign`: the solver's per-head statistics (JSON, written by the assign stage).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float32Array, RecordBatch, UInt32Array, UInt64Array};
use arrow::datatypes::{Float32Type, UInt32Type, UInt64Type};

use crate::contract::{Column, ColumnType, Contract};
use crate::error::{IoError, Result};
use crate::meta::FileMeta;
use crate::parts::{find_duplicate_id, resolve};
use crate::table::{TableFile, TableWriter, DEFAULT_ROWS_PER_GROUP};

/// Table name.
pub const TABLE: &str = "labels";
/// Schema version.
pub const VERSION: u32 = 1;
/// Metadata key holding the assign stage's statistics.
pub const KEY_ASSIGN: &str = "sela.assign";
/// [`HeadStats::path`] of a head whose labels were read off the spectral clustering of the
/// embedding's neighbour graph rather than solved.
pub const SPECTRAL_PATH: &str = "spectral";

/// The Sinkhorn stage's statistics: stored as JSON in the labels file's `sela.assign` metadata and
/// in the stage's stats file (which also seeds the next round's warm start).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AssignStats {
    /// The exponent λ of P^λ.
    pub lambda: f64,
    /// Convergence tolerance on the largest relative marginal error.
    pub tol: f64,
    /// Iteration cap.
    pub max_iters: usize,
    /// The cluster-size prior as given (`uniform`, `power:<a>`, a file).
    pub prior: String,
    /// Whether hard labels were rounded to exactly balanced sizes.
    pub exact_balance: bool,
    /// Column updates between sweeps: `none` (plain Sinkhorn-Knopp) or `anderson:<memory>`.
    /// Files written before this field existed used plain updates.
    #[serde(default = "plain_updates")]
    pub acceleration: String,
    /// How many nearest neighbours in the embedding each row's probabilities were averaged over
    /// before the solve; 0 (also in files written before this field existed): none.
    #[serde(default)]
    pub neighbours: usize,
    /// Wall time of the neighbour search, seconds (0 without one).
    #[serde(default)]
    pub neighbour_seconds: f64,
    /// The embedding graph and its spectrum, when the labels were read off a spectral
    /// clustering (`assign.spectral`) instead of solved; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spectral: Option<SpectralStats>,
    /// One entry per solved head.
    pub heads: Vec<HeadStats>,
}

/// The graph and spectrum behind spectral labels.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpectralStats {
    /// Nearest images each image is joined to (itself included).
    pub neighbours: usize,
    /// Undirected edges of the symmetrised graph.
    pub edges: usize,
    /// Leading eigenvalues of the normalised adjacency, largest first.
    pub eigenvalues: Vec<f64>,
    /// Largest residual ‖A·v − θ·v‖ of the eigenvectors.
    pub max_residual: f64,
    /// Lanczos steps taken.
    pub lanczos_steps: usize,
    /// Wall time of the neighbour search, graph and eigenvectors, seconds.
    pub seconds: f64,
    /// How K-way labels were merged from fragments (`assign.spectral_fragments`); absent when
    /// they were read off K-way k-means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeSettings>,
    /// The embedding column the graph joins rows on; absent: `embedding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// The graphs of the merge's `extra_grids`, in their order (empty: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_graphs: Vec<SpectralStats>,
}

/// Which of several merged cuts is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CutChoice {
    /// The highest modularity of the merged partition on the graph.
    #[default]
    Modularity,
    /// The highest mean NMI of the merged partition with the network's own clusterings: every
    /// head's argmax over its logits.
    Agreement,
}

impl std::str::FromStr for CutChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "modularity" => Ok(CutChoice::Modularity),
            "agreement" => Ok(CutChoice::Agreement),
            other => Err(format!(
                "`{other}` is not a cut choice: `modularity` or `agreement`"
            )),
        }
    }
}

/// The settings of spectral labels merged from fragments.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeSettings {
    /// Fragments k-means cut the embedding into.
    pub fragments: usize,
    /// Leading eigenvectors the fragments were cut from.
    pub eigenvectors: usize,
    /// Cap on a merged group's size, × N / K, before any relaxation.
    pub size_cap: f64,
    /// Fragment cuts made (one k-means run each, from its own seed); `keep` chose among them.
    pub cuts: usize,
    /// How the kept cut was chosen (modularity in statistics written before there was a choice).
    #[serde(default)]
    pub keep: CutChoice,
    /// Steps of balanced label propagation after the merge (0: none).
    pub smoothing_steps: usize,
    /// The exponent λ of those steps' transport problems.
    pub smoothing_lambda: f64,
    /// With a weight on modularity: the kept partition was refined by moving fragments towards
    /// the heads' own clusterings (absent: not refined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<f64>,
    /// Fragment counts tried beside `fragments`, each cut, merged and refined the same way; the
    /// refined partition of highest modularity was kept (empty: `fragments` alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_fragments: Vec<usize>,
    /// Grids of more readouts of the embedding's stage (columns `embedding_grid<G>`), each with
    /// its own graph, labelled the same way; of every graph's labels those of highest mean NMI
    /// with the heads' clusterings + `refine` × mean modularity over the graphs were kept
    /// (empty: the `embedding` graph alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_grids: Vec<usize>,
}

/// How one head's merged spectral labels came out.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeReport {
    /// The cut kept (`0..cuts`): the one whose merged partition scores highest by the
    /// settings' `keep`.
    pub kept_cut: usize,
    /// With the settings' `extra_fragments`: the fragment count kept (the cut figures here are
    /// that count's); absent when only one count was tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_fragments: Option<usize>,
    /// That modularity (0 in statistics written before cuts were chosen by it).
    #[serde(default)]
    pub modularity: f64,
    /// Every cut's merged-partition modularity, in cut order: how close the choice was (empty
    /// in statistics written before they were reported).
    #[serde(default)]
    pub cut_modularities: Vec<f64>,
    /// Every cut's mean NMI with the heads' own clusterings (their argmax), in cut order (empty
    /// in statistics written before they were reported).
    #[serde(default)]
    pub cut_agreements: Vec<f64>,
    /// The kept partition's mean NMI with the other cuts' merged partitions (1 for a single
    /// cut).
    pub agreement: f64,
    /// Cap on a group's size (images) at the last merge, after any relaxation.
    pub final_cap: f64,
    /// Steps of balanced label propagation run (fewer than asked when the labels settled).
    pub smoothing_steps: usize,
    /// Fraction of images whose label the propagation changed.
    pub smoothing_changed: f64,
    /// How the refinement towards the heads' clusterings went (absent: none was asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refinement: Option<RefineReport>,
    /// With the settings' `extra_grids`: the embedding column whose graph's labels were kept
    /// (the figures above are that graph's); absent when there was one graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_embedding: Option<String>,
    /// With the settings' `extra_grids`: each graph's labels' score, `embedding` first, then
    /// the extra grids in order (empty when there was one graph).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding_scores: Vec<f64>,
}

/// How a merged partition was refined towards the heads' own clusterings.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RefineReport {
    /// Fragments moved between groups.
    pub moves: usize,
    /// Share of images whose group changed.
    pub changed: f64,
    /// Mean NMI with the heads' clusterings before the refinement.
    pub agreement_before: f64,
    /// The same after.
    pub agreement_after: f64,
    /// Modularity on the graph before the refinement.
    pub modularity_before: f64,
    /// The same after.
    pub modularity_after: f64,
}

fn plain_updates() -> String {
    "none".to_string()
}

/// Statistics of one head's solve.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadStats {
    /// Head index.
    pub head: u32,
    /// The logits column solved.
    pub column: String,
    /// Rows N.
    pub n: usize,
    /// Clusters K.
    pub k: usize,
    /// Sinkhorn iterations run.
    pub iterations: usize,
    /// Whether the tolerance was reached.
    pub converged: bool,
    /// Final largest relative error of the row marginals.
    pub row_error: f64,
    /// Final largest relative error of the column marginals.
    pub col_error: f64,
    /// Σ Q·log P, with Q normalised to total mass 1.
    pub objective: f64,
    /// Mean entropy of the rows of Q (nats).
    pub entropy: f64,
    /// Smallest hard cluster.
    pub min_cluster_size: usize,
    /// Largest hard cluster.
    pub max_cluster_size: usize,
    /// Numerical path used: `scaling`, or `stabilized` when the column scaling had to be absorbed
    /// into the kernel; `spectral` for labels read off the spectral clustering (then
    /// `iterations` and `converged` are the k-means run's, the marginal errors those of the hard
    /// cluster sizes, `objective` and `entropy` 0, and there are no duals).
    pub path: String,
    /// Times the column scaling was absorbed into the kernel (0 on the `scaling` path).
    #[serde(default)]
    pub absorptions: usize,
    /// Anderson steps rejected (replaced by the plain update) because they made the error grow.
    #[serde(default)]
    pub rejected_steps: usize,
    /// Whether the solve was warm-started.
    pub warm_started: bool,
    /// Wall time of the solve, seconds.
    pub seconds: f64,
    /// Fraction of rows whose label changed against the previous labels, when given.
    pub churn_fraction: Option<f64>,
    /// NMI between the previous and the new labels, when given.
    pub churn_nmi: Option<f64>,
    /// log β, the column duals, for warm-starting the next solve (empty for spectral labels).
    pub log_beta: Vec<f64>,
    /// For spectral labels merged from fragments: how the merge and the propagation went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeReport>,
    /// For spectral labels: the share of rows whose label is the head's own prediction (argmax
    /// of its logits) once the clusters are renumbered to agree with those predictions best.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_agreement: Option<f64>,
}

/// The labels contract.
pub fn contract() -> Contract {
    Contract {
        table: TABLE,
        version: VERSION,
        columns: vec![
            Column::required("id", ColumnType::UInt64),
            Column::required("head", ColumnType::UInt32),
            Column::required("label", ColumnType::UInt32),
            Column::required("confidence", ColumnType::Float32),
        ],
    }
}

/// One head's labels, aligned by row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadLabels {
    /// Dataset ids.
    pub ids: Vec<u64>,
    /// Assigned cluster of each id.
    pub labels: Vec<u32>,
    /// Confidence of each assignment.
    pub confidence: Vec<f32>,
}

impl HeadLabels {
    /// Number of labelled rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no row is labelled.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The labels reordered to follow `ids` (e.g. the dataset's order). Fails naming an id that
    /// has no label or an id that is not in `ids`.
    pub fn aligned_to(&self, path: &Path, head: u32, ids: &[u64]) -> Result<Vec<u32>> {
        let index: std::collections::HashMap<u64, usize> = self
            .ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i))
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            match index.get(&id) {
                Some(&i) => out.push(self.labels[i]),
                None => {
                    return Err(IoError::Value {
                        path: path.to_path_buf(),
                        column: "id".to_string(),
                        row: 0,
                        message: format!("head {head} has no label for dataset id {id}"),
                    })
                }
            }
        }
        if self.ids.len() != ids.len() {
            let known: std::collections::HashSet<u64> = ids.iter().copied().collect();
            if let Some(extra) = self.ids.iter().find(|id| !known.contains(id)) {
                return Err(IoError::Value {
                    path: path.to_path_buf(),
                    column: "id".to_string(),
                    row: 0,
                    message: format!("head {head} labels id {extra}, which is not in the dataset"),
                });
            }
        }
        Ok(out)
    }
}

/// Writes a labels file atomically: every head's rows, head by head.
pub fn write(
    target: impl AsRef<Path>,
    heads: &BTreeMap<u32, HeadLabels>,
    meta: &FileMeta,
) -> Result<PathBuf> {
    let schema = Arc::new(contract().schema());
    let mut out = TableWriter::create(target, schema.clone(), meta, DEFAULT_ROWS_PER_GROUP)?;
    for (&head, rows) in heads {
        for start in (0..rows.len()).step_by(DEFAULT_ROWS_PER_GROUP) {
            let end = (start + DEFAULT_ROWS_PER_GROUP).min(rows.len());
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(UInt64Array::from(rows.ids[start..end].to_vec())),
                    Arc::new(UInt32Array::from(vec![head; end - start])),
                    Arc::new(UInt32Array::from(rows.labels[start..end].to_vec())),
                    Arc::new(Float32Array::from(rows.confidence[start..end].to_vec())),
                ],
            )
            .expect("labels batch matches its schema");
            out.write(&batch)?;
        }
    }
    out.finish()
}

/// A labels file (or set of parts) read into memory, by head.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    /// Labels per head.
    pub heads: BTreeMap<u32, HeadLabels>,
    /// Metadata of the first file.
    pub meta: FileMeta,
    /// Files read.
    pub files: Vec<PathBuf>,
}

/// Reads a labels file, directory of parts or glob. Rejects an id labelled twice for one head.
pub fn read(spec: &Path) -> Result<Labels> {
    let files = resolve(spec)?;
    let mut out = Labels {
        files: files.clone(),
        ..Default::default()
    };
    for (i, f) in files.iter().enumerate() {
        let table = TableFile::open(f, &contract())?;
        if i == 0 {
            out.meta = table.meta().clone();
        }
        for batch in table.batches(64 * 1024)? {
            let batch = batch?;
            let ids = batch.column(0).as_primitive::<UInt64Type>();
            let heads = batch.column(1).as_primitive::<UInt32Type>();
            let labels = batch.column(2).as_primitive::<UInt32Type>();
            let conf = batch.column(3).as_primitive::<Float32Type>();
            for r in 0..batch.num_rows() {
                let h = out.heads.entry(heads.value(r)).or_default();
                h.ids.push(ids.value(r));
                h.labels.push(labels.value(r));
                h.confidence.push(conf.value(r));
            }
            debug_assert_eq!(ids.null_count(), 0);
        }
    }
    for (head, rows) in &out.heads {
        if let Some(dup) = find_duplicate_id(&rows.ids) {
            return Err(IoError::Value {
                path: spec.to_path_buf(),
                column: "id".to_string(),
                row: 0,
                message: format!("id {dup} is labelled more than once for head {head}"),
            });
        }
    }
    Ok(out)
}
