//! Reading a run directory: its round folders, their tables, and the training images.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sela_io::cluster_stats::ClusterStatRow;
use sela_io::dataset::DatasetFile;
use sela_io::features::{logits_column, read_matrix};

/// One `round-RRR` folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundDir {
    pub round: u32,
    pub path: PathBuf,
}

impl RoundDir {
    /// `labels.parquet` of the round, if present.
    pub fn labels(&self) -> Option<PathBuf> {
        Some(self.path.join("labels.parquet")).filter(|p| p.is_file())
    }

    /// `features-train` of the round, if present.
    pub fn features_train(&self) -> Option<PathBuf> {
        Some(self.path.join("features-train")).filter(|p| p.exists())
    }
}

/// The `round-RRR` folders of a run, by round.
pub fn round_dirs(run_dir: &Path) -> Result<Vec<RoundDir>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(run_dir).with_context(|| format!("{}", run_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}", run_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(round) = name
            .strip_prefix("round-")
            .and_then(|r| r.parse::<u32>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            out.push(RoundDir {
                round,
                path: entry.path(),
            });
        }
    }
    out.sort_by_key(|r| r.round);
    Ok(out)
}

/// Every round's cluster statistics, where written.
pub fn cluster_stats(rounds: &[RoundDir]) -> Result<BTreeMap<u32, Vec<ClusterStatRow>>> {
    let mut out = BTreeMap::new();
    for r in rounds {
        let path = r.path.join("cluster_stats.parquet");
        if path.is_file() {
            out.insert(r.round, sela_io::cluster_stats::read(&path)?);
        }
    }
    Ok(out)
}

/// Mean training loss of each round, per head: head → [(round, loss)].
pub fn train_loss(rounds: &[RoundDir]) -> Result<BTreeMap<u32, Vec<(f64, f64)>>> {
    let mut out: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rounds {
        let path = r.path.join("train_log.parquet");
        if !path.is_file() {
            continue;
        }
        let mut sums: BTreeMap<u32, (f64, usize)> = BTreeMap::new();
        for row in sela_io::train_log::read(&path)? {
            let e = sums.entry(row.head).or_default();
            e.0 += row.loss as f64;
            e.1 += 1;
        }
        for (head, (sum, n)) in sums {
            out.entry(head)
                .or_default()
                .push((r.round as f64, sum / n as f64));
        }
    }
    Ok(out)
}

/// Where the latest assignment came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The round's Sinkhorn labels and their confidences.
    Labels,
    /// The heads' argmax on the round's training features, softmax probability as confidence.
    Argmax,
}

/// One head's hard assignment of the training images in the latest round that has one.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub round: u32,
    pub source: Source,
    pub file: PathBuf,
    pub ids: Vec<u64>,
    pub clusters: Vec<u32>,
    pub confidence: Vec<f32>,
}

/// The latest round's Sinkhorn labels of `head`, else the latest round's argmax of its logits.
pub fn latest_assignment(rounds: &[RoundDir], head: u32, k: usize) -> Result<Option<Assignment>> {
    let with_labels = rounds.iter().rev().find_map(|r| r.labels().map(|p| (r, p)));
    let with_features = rounds
        .iter()
        .rev()
        .find_map(|r| r.features_train().map(|p| (r, p)));
    match (with_labels, with_features) {
        (Some((r, path)), _) => {
            let labels = sela_io::labels::read(&path)?;
            let Some(hl) = labels.heads.get(&head) else {
                bail!("{}: no labels for head {head}", path.display());
            };
            if let Some(bad) = hl.labels.iter().find(|&&l| l as usize >= k) {
                bail!(
                    "{}: column `label` has cluster {bad} for head {head}, expected 0..{k}",
                    path.display()
                );
            }
            Ok(Some(Assignment {
                round: r.round,
                source: Source::Labels,
                file: path.clone(),
                ids: hl.ids.clone(),
                clusters: hl.labels.clone(),
                confidence: hl.confidence.clone(),
            }))
        }
        (None, Some((r, path))) => {
            let m = read_matrix(&path, &logits_column(head as usize))?;
            if m.cols != k {
                bail!(
                    "{}: column `{}` has {} values per row, expected K = {k}",
                    path.display(),
                    logits_column(head as usize),
                    m.cols
                );
            }
            let (clusters, confidence) = m
                .values
                .chunks(k)
                .map(|row| {
                    let mut best = 0;
                    for (j, &v) in row.iter().enumerate() {
                        if v > row[best] {
                            best = j;
                        }
                    }
                    let denom: f64 = row
                        .iter()
                        .map(|&v| (v as f64 - row[best] as f64).exp())
                        .sum();
                    (best as u32, (1.0 / denom) as f32)
                })
                .unzip();
            Ok(Some(Assignment {
                round: r.round,
                source: Source::Argmax,
                file: path.clone(),
                ids: m.ids,
                clusters,
                confidence,
            }))
        }
        (None, None) => Ok(None),
    }
}

/// The training dataset's ground truth and class names.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    pub class_names: Vec<String>,
    pub by_id: HashMap<u64, i64>,
    pub classes: usize,
}

impl Truth {
    /// Reads the `id` and `label` columns.
    pub fn read(path: &Path) -> Result<Self> {
        let file = DatasetFile::open(path)?;
        let class_names = file.class_names.clone();
        let (ids, labels) = file.ids_and_labels()?;
        let mut by_id = HashMap::new();
        let mut classes = class_names.len();
        for (row, (id, label)) in ids.into_iter().zip(labels).enumerate() {
            if let Some(l) = label {
                if l < 0 {
                    bail!(
                        "{}: column `label`, row {row}: negative class {l}",
                        path.display()
                    );
                }
                classes = classes.max(l as usize + 1);
                by_id.insert(id, l);
            }
        }
        Ok(Truth {
            class_names,
            by_id,
            classes,
        })
    }

    /// The display name of class `c`.
    pub fn name(&self, c: i64) -> String {
        self.class_names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| format!("class {c}"))
    }
}

/// The encoded image bytes of `ids` from a dataset file (ids not found are left out).
pub fn images(path: &Path, ids: &HashSet<u64>) -> Result<HashMap<u64, Vec<u8>>> {
    let mut out = HashMap::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok(out);
    }
    for batch in DatasetFile::open(path)?.batches(2048)? {
        let batch = batch?;
        let batch_ids = batch.ids();
        for i in 0..batch.len() {
            let id = batch_ids.value(i);
            if ids.contains(&id) && !batch.image_missing(i) {
                out.insert(id, batch.image_bytes(i).to_vec());
            }
        }
        if out.len() == ids.len() {
            break;
        }
    }
    Ok(out)
}
