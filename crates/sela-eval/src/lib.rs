//! `sela-eval`: evaluates one round of a run.
//!
//! - **Clustering vs ground truth**, per head and split: NMI, ARI, purity, and accuracy under the
//!   best one-to-one cluster ↔ class matching when the head has as many clusters as there are
//!   classes; for the heads' argmax on the `train` and `test` features and for the Sinkhorn
//!   labels (split `labels`).
//! - **Representation quality** of the embeddings (head null, split `test`): weighted kNN
//!   (`knn<k>_acc`) and a linear probe (`linear_probe_acc`), trained on train, scored on test.
//! - **Solver statistics** from the assign stage's stats file (head h, split `train`):
//!   `sinkhorn_iterations`, `sinkhorn_seconds`, `label_churn`, `label_churn_nmi` (spectral
//!   labels: the seconds and the churn NMI only).
//! - **Cluster statistics** (size, purity, majority class, mean confidence per head and cluster)
//!   into the round's cluster-stats table.
//!
//! Metrics are appended to the run's long-format metrics table; re-evaluating a round replaces
//! its rows. Everything is computed before anything is written, so bad input writes nothing.

pub mod features;
pub mod stats;
pub mod truth;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sela_config::PipelineConfig;
use sela_io::labels::{AssignStats, Labels};
use sela_io::metrics::MetricRow;
use sela_io::{cluster_stats, metrics, FileMeta, Provenance};
use sela_metrics::{Contingency, KnnParams, LinearProbe, ProbeParams};
use serde::Serialize;

use crate::features::{argmax_softmax, SplitFeatures};
use crate::stats::HeadAssignment;
use crate::truth::{known, num_classes, Truth};

/// The stage's name in provenance.
pub const STAGE: &str = "sela-eval";

/// What to evaluate and where to write.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The resolved pipeline config (ground-truth paths, heads, evaluation settings).
    pub config: PipelineConfig,
    /// The round: the model after this many rounds of training.
    pub round: u32,
    /// Features of the training split (file, directory of parts or glob).
    pub features_train: PathBuf,
    /// Features of the held-out split.
    pub features_test: Option<PathBuf>,
    /// The round's Sinkhorn labels.
    pub labels: Option<PathBuf>,
    /// The assign stage's statistics (JSON).
    pub assign_stats: Option<PathBuf>,
    /// The run's metrics table (created if absent).
    pub metrics: PathBuf,
    /// The round's cluster-statistics table to write.
    pub cluster_stats: PathBuf,
    /// No progress output.
    pub quiet: bool,
}

/// The one-line JSON summary of an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub round: u32,
    pub config_hash: String,
    pub train_rows: usize,
    pub test_rows: Option<usize>,
    /// Classes in the ground truth (0 without).
    pub classes: usize,
    /// What could not be computed, and why.
    pub skipped: Vec<String>,
    /// Every value written, keyed `h<head>.<split>.<metric>` or `<split>.<metric>`.
    pub metrics: BTreeMap<String, f64>,
    pub metrics_file: PathBuf,
    pub cluster_stats_file: PathBuf,
    pub clusters: usize,
    pub seconds: Timings,
}

/// Wall time of the phases, seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub read: f64,
    pub clustering: f64,
    pub knn: f64,
    pub linear_probe: f64,
    pub total: f64,
}

/// One split's features aligned with its ground truth.
struct Split {
    features: SplitFeatures,
    truth: Truth,
    classes: Vec<Option<u32>>,
}

impl Split {
    fn read(features: &Path, dataset: &Path, heads: &[usize]) -> Result<Self> {
        let truth = Truth::read(dataset)?;
        let features = SplitFeatures::read(features, heads)?;
        let classes = truth.align(&features.ids, &features.path)?;
        Ok(Split {
            features,
            truth,
            classes,
        })
    }
}

/// Collects metric rows and the summary's flat view of them.
struct Sink {
    round: u32,
    hash: String,
    time_ms: i64,
    rows: Vec<MetricRow>,
}

impl Sink {
    fn push(&mut self, head: Option<u32>, split: &str, metric: &str, value: f64) {
        self.rows.push(MetricRow {
            round: self.round,
            head,
            split: split.to_string(),
            metric: metric.to_string(),
            value,
            config_hash: self.hash.clone(),
            time_ms: self.time_ms,
        });
    }

    fn flat(&self) -> BTreeMap<String, f64> {
        self.rows
            .iter()
            .map(|r| {
                let key = match r.head {
                    Some(h) => format!("h{h}.{}.{}", r.split, r.metric),
                    None => format!("{}.{}", r.split, r.metric),
                };
                (key, r.value)
            })
            .collect()
    }
}

/// Runs the evaluation and writes its outputs.
pub fn run(opts: &EvalOptions) -> Result<Summary> {
    let started = Instant::now();
    let cfg = &opts.config;
    let heads = cfg.model.heads.clone();
    let mut timings = Timings::default();
    let mut skipped = Vec::new();
    let mut progress = sela_cli::Progress::new("eval", Some(5), "steps", opts.quiet);

    let temperature = cfg.eval.knn_temperature;
    if temperature.is_nan() || temperature <= 0.0 {
        bail!("eval.knn_temperature must be positive, got {temperature}");
    }
    for out in [&opts.metrics, &opts.cluster_stats] {
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            if !dir.is_dir() {
                bail!("{}: output directory does not exist", dir.display());
            }
        }
    }
    if opts.metrics.exists() {
        // Fail before the work if the history cannot be appended to.
        metrics::read(&opts.metrics)?;
    }

    progress.message("reading");
    let train = Split::read(&opts.features_train, &cfg.data.train, &heads)?;
    let test = match &opts.features_test {
        Some(path) => {
            let Some(dataset) = &cfg.data.test else {
                bail!(
                    "--features-test {} was given, but the pipeline config has no data.test \
                     dataset to take its ground truth from",
                    path.display()
                );
            };
            Some(Split::read(path, dataset, &heads)?)
        }
        None => None,
    };
    let labels = match &opts.labels {
        Some(path) => Some(read_labels(path, &heads, &train.features)?),
        None => None,
    };
    let assign = match &opts.assign_stats {
        Some(path) => Some(read_assign_stats(path, &heads)?),
        None => None,
    };
    timings.read = started.elapsed().as_secs_f64();
    progress.inc(1);

    let classes = num_classes(std::iter::once(&train.truth).chain(test.as_ref().map(|t| &t.truth)));
    let mut sink = Sink {
        round: opts.round,
        hash: cfg.hash(),
        time_ms: now_ms(),
        rows: Vec::new(),
    };

    // Clustering of each head against the ground truth.
    progress.message("clustering metrics");
    let t = Instant::now();
    if !train.truth.has_labels() {
        skipped.push(format!(
            "clustering metrics: {} has no ground-truth labels",
            cfg.data.train.display()
        ));
    }
    let mut train_argmax = Vec::with_capacity(heads.len());
    for (h, &k) in heads.iter().enumerate() {
        let (pred, conf) = argmax_softmax(&train.features.logits[h], k);
        score_clustering(
            &mut sink,
            h as u32,
            "train",
            &pred,
            &train.classes,
            k,
            classes,
        );
        if let Some(test) = &test {
            let (pred, _) = argmax_softmax(&test.features.logits[h], k);
            score_clustering(
                &mut sink,
                h as u32,
                "test",
                &pred,
                &test.classes,
                k,
                classes,
            );
        }
        train_argmax.push((pred, conf));
    }
    if let Some(test) = &test {
        if !test.truth.has_labels() {
            skipped.push(format!(
                "test clustering metrics: {} has no ground-truth labels",
                test.truth.path.display()
            ));
        }
    }
    if let Some((labels, path)) = labels.as_ref().zip(opts.labels.as_ref()) {
        for (&h, hl) in &labels.heads {
            let aligned = hl.aligned_to(path, h, &train.features.ids)?;
            score_clustering(
                &mut sink,
                h,
                "labels",
                &aligned,
                &train.classes,
                heads[h as usize],
                classes,
            );
        }
    }
    timings.clustering = t.elapsed().as_secs_f64();
    progress.inc(1);

    // Representation quality.
    let representation = match &test {
        None => Err("kNN and linear probe: no --features-test given".to_string()),
        Some(_) if !train.truth.has_labels() => Err(format!(
            "kNN and linear probe: {} has no ground-truth labels",
            cfg.data.train.display()
        )),
        Some(test) if !test.truth.has_labels() => Err(format!(
            "kNN and linear probe: {} has no ground-truth labels",
            test.truth.path.display()
        )),
        Some(test) => Ok(test),
    };
    match representation {
        Err(why) => {
            skipped.push(why);
            progress.inc(2);
        }
        Ok(test) => {
            let bank = labelled_rows(&train);
            let queries = labelled_rows(test);
            let dim = train.features.dim;
            if test.features.dim != dim {
                bail!(
                    "{}: embeddings have {} dimensions, but the training features have {dim}",
                    test.features.path.display(),
                    test.features.dim
                );
            }
            progress.message("kNN");
            let t = Instant::now();
            let params = KnnParams {
                ks: cfg.eval.knn_k.clone(),
                temperature: cfg.eval.knn_temperature,
            };
            let preds =
                sela_metrics::knn_classify(&bank.0, &bank.1, &queries.0, dim, classes, &params);
            for (k, pred) in params.ks.iter().zip(&preds) {
                let acc = sela_metrics::accuracy(pred, &queries.1);
                sink.push(None, "test", &format!("knn{k}_acc"), acc);
            }
            timings.knn = t.elapsed().as_secs_f64();
            progress.inc(1);

            progress.message("linear probe");
            let t = Instant::now();
            let probe = LinearProbe::fit(
                &bank.0,
                &bank.1,
                dim,
                classes,
                &ProbeParams {
                    max_iters: cfg.eval.probe_epochs,
                    l2: cfg.eval.probe_l2,
                },
            );
            let acc = sela_metrics::accuracy(&probe.predict(&queries.0), &queries.1);
            sink.push(None, "test", "linear_probe_acc", acc);
            timings.linear_probe = t.elapsed().as_secs_f64();
            progress.inc(1);
        }
    }

    if let Some(stats) = &assign {
        for hs in &stats.heads {
            // Spectral labels count k-means iterations, not Sinkhorn's.
            if hs.path != sela_io::labels::SPECTRAL_PATH {
                sink.push(
                    Some(hs.head),
                    "train",
                    "sinkhorn_iterations",
                    hs.iterations as f64,
                );
            }
            sink.push(Some(hs.head), "train", "sinkhorn_seconds", hs.seconds);
            if let Some(c) = hs.churn_fraction {
                sink.push(Some(hs.head), "train", "label_churn", c);
            }
            if let Some(c) = hs.churn_nmi {
                sink.push(Some(hs.head), "train", "label_churn_nmi", c);
            }
        }
    }

    // Cluster statistics: of the Sinkhorn labels when given, else of the heads' argmax.
    progress.message("cluster statistics");
    let truth_pairs: Vec<(u64, Option<u32>)> = train
        .features
        .ids
        .iter()
        .copied()
        .zip(train.classes.iter().copied())
        .collect();
    let assignments: Vec<HeadAssignment<'_>> = match &labels {
        Some(labels) => labels
            .heads
            .iter()
            .map(|(&h, hl)| HeadAssignment {
                head: h,
                k: heads[h as usize],
                ids: &hl.ids,
                clusters: &hl.labels,
                confidence: &hl.confidence,
            })
            .collect(),
        None => train_argmax
            .iter()
            .enumerate()
            .map(|(h, (pred, conf))| HeadAssignment {
                head: h as u32,
                k: heads[h],
                ids: &train.features.ids,
                clusters: pred,
                confidence: conf,
            })
            .collect(),
    };
    let stat_rows = stats::cluster_stats(opts.round, &assignments, &truth_pairs)?;

    let mut provenance = Provenance::new(STAGE)
        .round(Some(opts.round))
        .config_hash(Some(sink.hash.clone()))
        .input(&opts.features_train)
        .input(&cfg.data.train);
    for p in [
        &opts.features_test,
        &cfg.data.test,
        &opts.labels,
        &opts.assign_stats,
    ]
    .into_iter()
    .flatten()
    {
        provenance = provenance.input(p);
    }
    cluster_stats::write(
        &opts.cluster_stats,
        &stat_rows,
        &FileMeta::new(
            cluster_stats::TABLE,
            cluster_stats::VERSION,
            provenance.clone(),
        ),
    )?;
    metrics::append(
        &opts.metrics,
        &sink.rows,
        &FileMeta::new(metrics::TABLE, metrics::VERSION, provenance),
    )?;
    progress.inc(1);
    progress.finish();

    timings.total = started.elapsed().as_secs_f64();
    Ok(Summary {
        round: opts.round,
        config_hash: sink.hash.clone(),
        train_rows: train.features.len(),
        test_rows: test.as_ref().map(|t| t.features.len()),
        classes,
        skipped,
        metrics: sink.flat(),
        metrics_file: opts.metrics.clone(),
        cluster_stats_file: opts.cluster_stats.clone(),
        clusters: stat_rows.len(),
        seconds: timings,
    })
}

/// Writes `nmi`, `ari`, `purity` and (when K equals the number of classes) `acc` of one
/// clustering against the ground truth, over the rows whose class is known; and the
/// normalised entropy of its cluster sizes (`size_entropy`, 1 = perfectly balanced, 0 = one
/// cluster), which needs no ground truth.
fn score_clustering(
    sink: &mut Sink,
    head: u32,
    split: &str,
    pred: &[u32],
    truth: &[Option<u32>],
    k: usize,
    classes: usize,
) {
    sink.push(Some(head), split, "size_entropy", size_entropy(pred, k));
    let (p, t) = known(pred, truth);
    if p.is_empty() {
        return;
    }
    let table = Contingency::new(&p, &t);
    if k == classes {
        sink.push(Some(head), split, "acc", table.best_matching().accuracy());
    }
    sink.push(Some(head), split, "nmi", table.nmi());
    sink.push(Some(head), split, "ari", table.ari());
    sink.push(Some(head), split, "purity", table.purity());
}

/// Entropy of the cluster-size distribution over K clusters divided by ln K (1 when K = 1).
fn size_entropy(pred: &[u32], k: usize) -> f64 {
    if k <= 1 || pred.is_empty() {
        return 1.0;
    }
    let mut sizes = vec![0u64; k];
    for &p in pred {
        sizes[p as usize] += 1;
    }
    let n = pred.len() as f64;
    let h: f64 = sizes
        .iter()
        .filter(|&&s| s > 0)
        .map(|&s| {
            let p = s as f64 / n;
            -p * p.ln()
        })
        .sum();
    h / (k as f64).ln()
}

/// The embeddings and classes of the rows with a known class, in row order.
fn labelled_rows(split: &Split) -> (Vec<f32>, Vec<u32>) {
    let dim = split.features.dim;
    let mut x = Vec::with_capacity(split.truth.labelled * dim);
    let mut y = Vec::with_capacity(split.truth.labelled);
    for (row, class) in split.features.embedding.chunks(dim).zip(&split.classes) {
        if let Some(c) = class {
            x.extend_from_slice(row);
            y.push(*c);
        }
    }
    (x, y)
}

/// Reads the Sinkhorn labels and checks them against the heads and the training features.
fn read_labels(path: &Path, heads: &[usize], train: &SplitFeatures) -> Result<Labels> {
    let labels = sela_io::labels::read(path)?;
    if labels.heads.is_empty() {
        bail!("{}: the labels table has no rows", path.display());
    }
    for (&h, hl) in &labels.heads {
        let Some(&k) = heads.get(h as usize) else {
            bail!(
                "{}: column `head` has head {h}, but the pipeline has {} heads (model.heads)",
                path.display(),
                heads.len()
            );
        };
        if let Some(bad) = hl.labels.iter().find(|&&l| l as usize >= k) {
            bail!(
                "{}: column `label` has cluster {bad} for head {h}, expected 0..{k} (model.heads)",
                path.display()
            );
        }
        // Fails naming an id missing on either side.
        hl.aligned_to(path, h, &train.ids)?;
    }
    Ok(labels)
}

/// Reads the assign stage's statistics (JSON).
fn read_assign_stats(path: &Path, heads: &[usize]) -> Result<AssignStats> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let stats: AssignStats = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not the assign stage's statistics JSON", path.display()))?;
    for hs in &stats.heads {
        if hs.head as usize >= heads.len() {
            bail!(
                "{}: statistics for head {}, but the pipeline has {} heads (model.heads)",
                path.display(),
                hs.head,
                heads.len()
            );
        }
    }
    Ok(stats)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
