//! `sela-report`: one self-contained HTML page per run that answers "is it learning?".
//!
//! The page holds headline numbers (latest against round 0 and optional floors), metrics over
//! rounds, the cluster-size distribution, a cluster × class heat map, and per cluster a gallery
//! of its most and least confident images. Charts are plotters SVG inlined in the page; images
//! are the dataset's own encoded bytes as `data:` URIs. Nothing is fetched from the network.

pub mod html;
mod page;
pub mod plots;
pub mod rundir;
pub mod table;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use sela_config::PipelineConfig;
use serde::Serialize;

use crate::rundir::{cluster_stats, images, latest_assignment, round_dirs, train_loss, Truth};

/// The stage's name.
pub const STAGE: &str = "sela-report";

/// What to report on.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// The run's pipeline config (training dataset, heads, gallery size).
    pub config: PipelineConfig,
    /// The run directory (`metrics.parquet` and `round-RRR/` folders).
    pub run_dir: PathBuf,
    /// The HTML file to write.
    pub output: PathBuf,
    /// The head whose clusters the heat map and galleries show.
    pub head: u32,
    /// Reference values drawn with the metrics, by metric name (e.g. `acc`, `knn20_acc`).
    pub floors: Vec<(String, f64)>,
    /// What the reference values are.
    pub floor_label: String,
    /// Largest number of clusters given a gallery and a heat-map row (the largest ones).
    pub max_clusters: usize,
}

/// The one-line JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub output: PathBuf,
    pub bytes: usize,
    pub rounds: Vec<u32>,
    pub head: u32,
    pub charts: usize,
    pub gallery_clusters: usize,
    pub gallery_images: usize,
    pub notes: Vec<String>,
}

/// The run's metrics file, or an error saying there is none yet.
fn read_metrics(run_dir: &Path) -> Result<Vec<sela_io::metrics::MetricRow>> {
    let metrics_path = run_dir.join("metrics.parquet");
    if !metrics_path.is_file() {
        bail!(
            "{}: no metrics yet; run sela-eval for at least one round first",
            metrics_path.display()
        );
    }
    Ok(sela_io::metrics::read(&metrics_path)?)
}

/// The per-round text table ([`table::table`]) for the heads of the same K as head `head`.
pub fn text_table(config: &PipelineConfig, run_dir: &Path, head: u32) -> Result<String> {
    let k = head_size(config, head)?;
    Ok(table::table(
        &read_metrics(run_dir)?,
        &config.model.heads,
        k,
    ))
}

/// The runs' metrics side by side ([`table::compare`]) at the latest round all of them have, for
/// the heads of the same K as head `head` in `config` (the runs' shared `model.heads`).
pub fn compare_table(config: &PipelineConfig, run_dirs: &[PathBuf], head: u32) -> Result<String> {
    let k = head_size(config, head)?;
    let runs = run_dirs
        .iter()
        .map(|dir| {
            Ok(table::Run {
                name: dir.display().to_string(),
                metrics: read_metrics(dir)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    table::compare(&runs, &config.model.heads, k).map_err(anyhow::Error::msg)
}

/// K of head `head`, or an error naming the heads the pipeline has.
fn head_size(config: &PipelineConfig, head: u32) -> Result<usize> {
    match config.model.heads.get(head as usize) {
        Some(&k) => Ok(k),
        None => bail!(
            "--head {head}: the pipeline has {} heads (model.heads = {:?})",
            config.model.heads.len(),
            config.model.heads
        ),
    }
}

/// Reads the run, renders the page and writes it atomically.
pub fn run(opts: &ReportOptions) -> Result<Summary> {
    let cfg = &opts.config;
    let k = head_size(cfg, opts.head)?;
    let metrics = read_metrics(&opts.run_dir)?;
    let rounds = round_dirs(&opts.run_dir)?;
    let stats = cluster_stats(&rounds)?;
    let losses = train_loss(&rounds)?;
    let assignment = latest_assignment(&rounds, opts.head, k)?;
    let truth = Truth::read(&cfg.data.train)?;
    let gallery = page::gallery_plan(
        assignment.as_ref(),
        &truth,
        k,
        cfg.eval.gallery_size,
        opts.max_clusters,
    );
    let wanted: HashSet<u64> = gallery.ids().collect();
    let pictures = images(&cfg.data.train, &wanted)?;

    let input = page::PageInput {
        opts,
        k,
        metrics: &metrics,
        stats: &stats,
        losses: &losses,
        assignment: assignment.as_ref(),
        truth: &truth,
        gallery: &gallery,
        pictures: &pictures,
    };
    let rendered = page::render(&input)?;
    sela_io::atomic::write_bytes(&opts.output, rendered.html.as_bytes())?;
    Ok(Summary {
        output: opts.output.clone(),
        bytes: rendered.html.len(),
        rounds: rounds.iter().map(|r| r.round).collect(),
        head: opts.head,
        charts: rendered.charts,
        gallery_clusters: gallery.clusters.len(),
        gallery_images: rendered.images,
        notes: rendered.notes,
    })
}
