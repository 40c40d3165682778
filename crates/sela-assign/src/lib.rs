//! The label step of self-labelling: solve the equipartition transport problem on each head's
//! logits with Sinkhorn-Knopp ([`sela_sinkhorn`]) and write hard labels.
//!
//! Input: a features table (file, directory of part files or glob) or any Parquet with an `id`
//! column and a fixed-size-list logits column. Without `--column` every `logits_<h>` column is
//! solved as head h; with `--column NAME` that column is solved as head 0. Heads are solved one
//! after another, each in one f32 N×K matrix read straight from the Parquet row groups.
//!
//! Output: the labels table (`id`, `head`, `label`, `confidence`) with the solver statistics
//! ([`AssignStats`]) in its `sela.assign` metadata, and the same statistics as a JSON file
//! (`--stats`, default `assign-stats.json` beside the labels), which a later round can
//! warm-start from (`--warm-start`). Everything is deterministic except the `seconds` fields.
//!
//! With `--neighbours` (config `assign.neighbours`) each head is solved on its softmax averaged
//! over every row's nearest rows in the `embedding` column instead ([`neighbours`]).
//!
//! With `--spectral` (config `assign.spectral`) the heads are not solved: every head with K
//! outputs is labelled with the K-way spectral clustering of the `embedding` column's nearest-
//! neighbour graph ([`sela_spectral`]), computed once for all heads.
//!
//! Fewer rows than clusters (N < K) is an error: an equipartition would leave clusters empty.

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod neighbours;
pub mod refine;
pub mod spectral;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use sela_cli::{OptionalPipelineArgs, OutputArgs, Progress};
use sela_io::contract::{Column, ColumnType, Contract};
use sela_io::features;
use sela_io::labels::{
    self, AssignStats, CutChoice, HeadLabels, HeadStats, MergeSettings, SPECTRAL_PATH,
};
use sela_io::table::TableFile;
use sela_io::{FileMeta, Provenance};
use sela_sinkhorn::{Acceleration, Assignment, Reduce, Sinkhorn, Solution};
use serde::Serialize;

use crate::neighbours::Neighbours;
use crate::spectral::SpectralLabels;

/// Command-line flags of `sela-assign`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sela-assign",
    version,
    about = "Self-labels by optimal transport: Sinkhorn-Knopp on each head's logits, hard labels out",
    long_about = "Self-labels by optimal transport. For each head, finds Q = diag(α)·P^λ·diag(β) \
        with row sums 1/N and column sums given by the prior (uniform by default), where \
        P^λ ∝ exp(λ·(z − rowmax)), and labels each row with the argmax of its row of Q.\n\n\
        Requires N ≥ K (at least as many rows as clusters); fewer rows is an error.\n\n\
        With --spectral, no head is solved: each head with K outputs is labelled with the K-way \
        spectral clustering of the graph joining every row to its nearest rows in the \
        `embedding` column.",
    after_help = "Examples:\n  \
        sela-assign --logits runs/m/round-000/features-train \\\n    \
        --output runs/m/round-001/labels.parquet --config pipelines/m.toml --round 1 \\\n    \
        --warm-start runs/m/round-000/assign-stats.json\n  \
        sela-assign --logits mine.parquet --column z --output labels.parquet \\\n    \
        --lambda 50 --exact-balance\n  \
        sela-assign --logits runs/m/round-012/features-train --spectral 10 \\\n    \
        --output runs/m/round-013/labels.parquet"
)]
pub struct Args {
    /// Logits: a Parquet file, a directory of part files, or a glob.
    #[arg(long, value_name = "PATH")]
    pub logits: PathBuf,
    /// The labels file to write.
    #[arg(long, value_name = "LABELS.parquet")]
    pub output: PathBuf,
    /// Solve this fixed-size-list column as head 0 (default: every `logits_<h>` column).
    #[arg(long, value_name = "NAME")]
    pub column: Option<String>,
    /// Exponent λ of P^λ [config assign.lambda, default 25].
    #[arg(long, value_name = "λ", value_parser = positive_f64, allow_negative_numbers = true)]
    pub lambda: Option<f64>,
    /// Stop when the largest relative marginal error is below this [config assign.tol, default 1e-3].
    #[arg(long, value_parser = positive_f64, allow_negative_numbers = true)]
    pub tol: Option<f64>,
    /// Iteration cap [config assign.max_iters, default 1000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_iters: Option<u64>,
    /// Cluster-size prior: `uniform`, `power:<a>` (share of cluster k ∝ (k+1)^−a), or a prior
    /// Parquet file (`cluster`, `weight`) [config assign.prior, default uniform].
    #[arg(long, value_name = "SPEC")]
    pub prior: Option<String>,
    /// Previous round's labels: report churn (fraction changed, NMI) against them.
    #[arg(long, value_name = "LABELS.parquet")]
    pub previous: Option<PathBuf>,
    /// Warm-start each head from the column duals in a previous stats file.
    #[arg(long, value_name = "STATS")]
    pub warm_start: Option<PathBuf>,
    /// Column updates between sweeps: `anderson` (Anderson acceleration over the last 5
    /// updates), `anderson:<memory>`, or `none` (plain Sinkhorn-Knopp) [config
    /// assign.acceleration, default anderson].
    #[arg(long, value_name = "SPEC")]
    pub acceleration: Option<Acceleration>,
    /// Solve each head on its probabilities averaged over every row's COUNT nearest rows in
    /// the `embedding` column (cosine similarity, itself included); 0 solves the head's own
    /// [config assign.neighbours, default 0].
    #[arg(long, value_name = "COUNT")]
    pub neighbours: Option<usize>,
    /// The last round (--round) solved on neighbour-averaged probabilities; later rounds solve
    /// the heads' own. Without --round every run averages [config
    /// assign.neighbours_until_round, default every round].
    #[arg(long, value_name = "ROUND")]
    pub neighbours_until_round: Option<u32>,
    /// Label every head with K outputs by the K-way spectral clustering of the graph joining
    /// each row to its COUNT nearest rows in the `embedding` column (cosine, itself included)
    /// instead of solving it; 0 solves the heads [config assign.spectral, default 0].
    #[arg(long, value_name = "COUNT")]
    pub spectral: Option<usize>,
    /// The first round (--round) labelled by --spectral; earlier rounds solve the heads.
    /// Without --round every run is [config assign.spectral_from_round, default every round].
    #[arg(long, value_name = "ROUND")]
    pub spectral_from_round: Option<u32>,
    /// With --spectral: only these heads (comma-separated indices) are labelled by it; the
    /// others are solved [config assign.spectral_heads, default every head].
    #[arg(long, value_name = "H,…", value_delimiter = ',')]
    pub spectral_heads: Option<Vec<u32>>,
    /// With --spectral: cut the embedding into COUNT fragments and merge them into each head's
    /// K groups under a size cap, instead of K-way k-means; 0: K-way k-means [config
    /// assign.spectral_fragments, default 0].
    #[arg(long, value_name = "COUNT")]
    pub spectral_fragments: Option<usize>,
    /// With --spectral-fragments: the leading eigenvectors the fragments are cut from; 0: the
    /// largest spectral K [config assign.spectral_eigenvectors, default 0].
    #[arg(long, value_name = "COUNT")]
    pub spectral_eigenvectors: Option<usize>,
    /// With --spectral-fragments: the largest merged group, × N / K [config
    /// assign.spectral_size_cap, default 1.2].
    #[arg(long, value_name = "X")]
    pub spectral_size_cap: Option<f64>,
    /// With --spectral-fragments: cut the fragments COUNT times (one k-means run from its own
    /// seed each) and keep one merged partition, as --spectral-keep says [config
    /// assign.spectral_cuts, default 1].
    #[arg(long, value_name = "COUNT")]
    pub spectral_cuts: Option<usize>,
    /// With --spectral-cuts: keep the merged partition of highest `modularity` on the graph, or
    /// the one in most `agreement` (mean NMI) with the heads' own clusterings, each head's
    /// argmax [config assign.spectral_keep, default modularity].
    #[arg(long, value_name = "CHOICE")]
    pub spectral_keep: Option<CutChoice>,
    /// With --spectral-fragments: steps of balanced label propagation on the graph after the
    /// merge [config assign.spectral_smoothing, default 0].
    #[arg(long, value_name = "STEPS")]
    pub spectral_smoothing: Option<usize>,
    /// The exponent λ of --spectral-smoothing's transport problems [config
    /// assign.spectral_smoothing_lambda, default 10].
    #[arg(long, value_name = "LAMBDA")]
    pub spectral_smoothing_lambda: Option<f64>,
    /// With --spectral-fragments: refine the kept partition by moving whole fragments between
    /// groups while that raises its mean NMI with the heads' own clusterings plus WEIGHT × its
    /// modularity [config assign.spectral_refine, default none].
    #[arg(long, value_name = "WEIGHT")]
    pub spectral_refine: Option<f64>,
    /// With --spectral-refine: more fragment counts (comma-separated) to cut, merge and refine
    /// beside --spectral-fragments, keeping the refined partition of highest modularity
    /// [config assign.spectral_extra_fragments, default none].
    #[arg(long, value_name = "COUNTS", value_delimiter = ',')]
    pub spectral_extra_fragments: Option<Vec<usize>>,
    /// With --spectral-refine: more readouts of the embedding's stage (grids, comma-separated;
    /// columns `embedding_grid<G>` of --logits), each with its own graph labelled the same way,
    /// keeping the labels of highest mean NMI with the heads' clusterings + WEIGHT × mean
    /// modularity over the graphs [config assign.spectral_extra_grids, default none].
    #[arg(long, value_name = "GRIDS", value_delimiter = ',')]
    pub spectral_extra_grids: Option<Vec<usize>>,
    /// Round to exactly balanced hard labels (sizes ⌊N/K⌋ or ⌈N/K⌉), by confidence
    /// [or config assign.exact_balance].
    #[arg(long)]
    pub exact_balance: bool,
    /// Fail (writing nothing) when a head does not converge.
    #[arg(long)]
    pub strict: bool,
    /// Order among equally confident rows in --exact-balance [config pipeline.seed, default 0].
    /// The solve itself uses no randomness.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where to write the statistics JSON [default: assign-stats.json beside --output].
    #[arg(long, value_name = "PATH")]
    pub stats: Option<PathBuf>,
    #[command(flatten)]
    pub pipeline: OptionalPipelineArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(x) => Err(format!("must be a positive finite number, got {x}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The one-line summary printed on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The labels file written.
    pub output: PathBuf,
    /// The statistics file written.
    pub stats: PathBuf,
    /// Rows labelled per head.
    pub rows: usize,
    /// Per head, the essentials of its solve.
    pub heads: Vec<HeadSummary>,
}

/// One head in the [`Summary`].
#[derive(Debug, Clone, Serialize)]
pub struct HeadSummary {
    /// Head index.
    pub head: u32,
    /// Clusters K.
    pub k: usize,
    /// Sinkhorn iterations run.
    pub iterations: usize,
    /// Whether the tolerance was reached.
    pub converged: bool,
    /// Final largest relative column-marginal error.
    pub col_error: f64,
    /// `scaling` or `stabilized`.
    pub path: String,
    /// Whether the solve started from previous duals.
    pub warm_started: bool,
    /// Wall time of the head, seconds.
    pub seconds: f64,
    /// Fraction of labels changed against `--previous`.
    pub churn_fraction: Option<f64>,
}

/// A cluster-size prior as given on the command line or in the config.
#[derive(Debug, Clone, PartialEq)]
pub enum Prior {
    /// Every cluster the same share.
    Uniform,
    /// Share of cluster k ∝ (k+1)^−a.
    Power(f64),
    /// Weights per cluster from a prior Parquet file.
    File(PathBuf),
}

impl Prior {
    /// Parses `uniform`, `power:<a>` or the path of an existing file.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        if spec == "uniform" {
            return Ok(Prior::Uniform);
        }
        if let Some(a) = spec.strip_prefix("power:") {
            return match a.parse::<f64>() {
                Ok(a) if a.is_finite() => Ok(Prior::Power(a)),
                _ => bail!("prior `{spec}`: `power:` takes a finite number, e.g. `power:0.5`"),
            };
        }
        let path = PathBuf::from(spec);
        if !path.is_file() {
            bail!("prior `{spec}` is neither `uniform`, `power:<a>` nor an existing Parquet file");
        }
        Ok(Prior::File(path))
    }

    /// The normalised column marginals for `k` clusters.
    pub fn marginals(&self, k: usize) -> anyhow::Result<Vec<f64>> {
        Ok(match self {
            Prior::Uniform => sela_sinkhorn::uniform_marginals(k),
            Prior::Power(a) => sela_sinkhorn::power_marginals(k, *a)?,
            Prior::File(path) => {
                let w = sela_io::prior::read(path, k)?;
                if let Some(j) = w.iter().position(|&x| x <= 0.0) {
                    bail!(
                        "{}: cluster {j} has weight 0; every cluster needs a positive weight",
                        path.display()
                    );
                }
                w
            }
        })
    }
}

/// The settings after merging flags over the config's `[assign]` section over the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Exponent λ.
    pub lambda: f64,
    /// Convergence tolerance.
    pub tol: f64,
    /// Iteration cap.
    pub max_iters: usize,
    /// The prior as given.
    pub prior_spec: String,
    /// The prior, parsed.
    pub prior: Prior,
    /// Column updates between sweeps.
    pub acceleration: Acceleration,
    /// Round to exactly balanced labels.
    pub exact_balance: bool,
    /// Tie order of --exact-balance.
    pub seed: u64,
    /// Nearest neighbours each row's probabilities are averaged over in this run (0: none).
    pub neighbours: usize,
    /// Nearest neighbours of the spectral graph in this run (0: the heads are solved).
    pub spectral: usize,
    /// The heads labelled by the spectral clustering (`None`: every head).
    pub spectral_heads: Option<Vec<u32>>,
    /// Merge spectral labels from fragments (`None`: K-way k-means).
    pub spectral_merge: Option<MergeSettings>,
    /// Round stamped into provenance.
    pub round: Option<u32>,
    /// Hash of the pipeline config, when one was given.
    pub config_hash: Option<String>,
}

impl Settings {
    /// Explicit flags win over the config, which wins over the built-in defaults.
    pub fn resolve(args: &Args) -> anyhow::Result<Self> {
        let config = args.pipeline.load()?;
        let d = config
            .as_ref()
            .map(|c| c.assign.clone())
            .unwrap_or_default();
        let prior_spec = args.prior.clone().unwrap_or(d.prior);
        let lambda = args.lambda.unwrap_or(d.lambda);
        if !(lambda.is_finite() && lambda > 0.0) {
            bail!("lambda must be a positive finite number, got {lambda}");
        }
        let acceleration = match args.acceleration {
            Some(a) => a,
            None => d
                .acceleration
                .parse()
                .map_err(|e| anyhow!("config assign.acceleration: {e}"))?,
        };
        let until = args.neighbours_until_round.or(d.neighbours_until_round);
        let this_round = match (until, args.pipeline.round) {
            (Some(last), Some(round)) => round <= last,
            _ => true,
        };
        let from = args.spectral_from_round.or(d.spectral_from_round);
        let spectral_round = match (from, args.pipeline.round) {
            (Some(first), Some(round)) => round >= first,
            _ => true,
        };
        let spectral = if spectral_round {
            args.spectral.unwrap_or(d.spectral)
        } else {
            0
        };
        if spectral == 1 {
            bail!(
                "assign.spectral = 1 joins every row only to itself; the spectral graph needs at \
                 least 2 nearest rows (e.g. 10)"
            );
        }
        let fragments = args.spectral_fragments.unwrap_or(d.spectral_fragments);
        let keep = match args.spectral_keep {
            Some(k) => k,
            None => d
                .spectral_keep
                .parse::<CutChoice>()
                .map_err(|e| anyhow!("assign.spectral_keep: {e}"))?,
        };
        let spectral_merge = (fragments > 0).then(|| MergeSettings {
            fragments,
            eigenvectors: args
                .spectral_eigenvectors
                .unwrap_or(d.spectral_eigenvectors),
            size_cap: args
                .spectral_size_cap
                .or(d.spectral_size_cap)
                .unwrap_or(sela_config::DEFAULT_SPECTRAL_SIZE_CAP),
            cuts: args.spectral_cuts.unwrap_or(d.spectral_cuts),
            keep,
            smoothing_steps: args.spectral_smoothing.unwrap_or(d.spectral_smoothing),
            smoothing_lambda: args
                .spectral_smoothing_lambda
                .or(d.spectral_smoothing_lambda)
                .unwrap_or(sela_config::DEFAULT_SPECTRAL_SMOOTHING_LAMBDA),
            refine: args.spectral_refine.or(d.spectral_refine),
            extra_fragments: args
                .spectral_extra_fragments
                .clone()
                .unwrap_or_else(|| d.spectral_extra_fragments.clone()),
            extra_grids: args
                .spectral_extra_grids
                .clone()
                .unwrap_or_else(|| d.spectral_extra_grids.clone()),
        });
        if let Some(m) = &spectral_merge {
            if !(m.size_cap.is_finite() && m.size_cap >= 1.0) {
                bail!(
                    "--spectral-size-cap must be at least 1 (× N / K), got {}",
                    m.size_cap
                );
            }
            if let Some(w) = m.refine.filter(|w| !(w.is_finite() && *w >= 0.0)) {
                bail!("--spectral-refine must be a finite number ≥ 0, got {w}");
            }
            if !m.extra_fragments.is_empty() && m.refine.is_none() {
                bail!(
                    "--spectral-extra-fragments needs --spectral-refine: the refined partitions \
                     are what is compared"
                );
            }
            if !m.extra_grids.is_empty() && m.refine.is_none() {
                bail!(
                    "--spectral-extra-grids needs --spectral-refine: its weight scores the \
                     graphs' labels"
                );
            }
            if !(m.smoothing_lambda.is_finite() && m.smoothing_lambda > 0.0) {
                bail!(
                    "--spectral-smoothing-lambda must be a positive finite number, got {}",
                    m.smoothing_lambda
                );
            }
        }
        Ok(Settings {
            spectral_merge,
            neighbours: if this_round {
                args.neighbours.unwrap_or(d.neighbours)
            } else {
                0
            },
            spectral,
            spectral_heads: args.spectral_heads.clone().or(d.spectral_heads),
            acceleration,
            lambda,
            tol: args.tol.unwrap_or(d.tol),
            max_iters: args.max_iters.map_or(d.max_iters, |m| m as usize),
            prior: Prior::parse(&prior_spec)?,
            prior_spec,
            exact_balance: args.exact_balance || d.exact_balance,
            seed: args
                .seed
                .or(config.as_ref().map(|c| c.pipeline.seed))
                .unwrap_or(0),
            round: args.pipeline.round,
            config_hash: config.as_ref().map(|c| c.hash()),
        })
    }
}

/// The head columns to solve: `(head index, column name)`.
pub fn head_columns(logits: &Path, column: Option<&str>) -> anyhow::Result<Vec<(u32, String)>> {
    if let Some(c) = column {
        return Ok(vec![(0, c.to_string())]);
    }
    let files = sela_io::parts::resolve(logits)?;
    let contract = Contract {
        table: features::TABLE,
        version: features::VERSION,
        columns: vec![Column::required("id", ColumnType::UInt64)],
    };
    let table = TableFile::open(&files[0], &contract)?;
    let names = features::logits_columns(table.schema());
    if names.is_empty() {
        let found: Vec<String> = table
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        bail!(
            "{}: no `logits_<h>` columns (found: {}); name the column to solve with --column",
            files[0].display(),
            found.join(", ")
        );
    }
    Ok(names
        .into_iter()
        .map(|n| {
            let h = features::parse_logits_column(&n).expect("logits_columns parses its names");
            (h as u32, n)
        })
        .collect())
}

/// Reads a stats file written by this stage.
pub fn read_stats(path: &Path) -> anyhow::Result<AssignStats> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not an assign statistics file", path.display()))
}

/// The warm-start duals for `head` of size `k`, rescaled from the stats' λ to `lambda`
/// (the duals of exp(λz) scale with λ). `None` when the stats have no such head.
fn warm_duals(
    path: &Path,
    stats: &AssignStats,
    head: u32,
    k: usize,
    lambda: f64,
) -> anyhow::Result<Option<Vec<f64>>> {
    let Some(h) = stats.heads.iter().find(|h| h.head == head) else {
        return Ok(None);
    };
    if h.log_beta.is_empty() && h.path == SPECTRAL_PATH {
        // Spectral labels have no duals: start cold.
        return Ok(None);
    }
    if h.k != k || h.log_beta.len() != k {
        bail!(
            "{}: head {head} has K = {} ({} duals) in the warm-start statistics, but its logits \
             have K = {k}",
            path.display(),
            h.k,
            h.log_beta.len()
        );
    }
    let scale = if stats.lambda > 0.0 {
        lambda / stats.lambda
    } else {
        1.0
    };
    Ok(Some(h.log_beta.iter().map(|x| x * scale).collect()))
}

/// The environment of an MPI launcher: `Some(processes)` when this process was started by
/// `mpirun` (OpenMPI), `mpiexec` (MPICH) or `srun` with PMI/PMIx, with the number of processes
/// when the launcher says it (0 when it does not).
pub fn mpi_launch() -> Option<usize> {
    let var = |name: &str| std::env::var(name).ok();
    let size = |name: &str| var(name).and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = size("OMPI_COMM_WORLD_SIZE").or_else(|| size("PMI_SIZE")) {
        return Some(n);
    }
    var("PMIX_RANK").map(|_| size("SLURM_STEP_NUM_TASKS").unwrap_or(0))
}

/// The warm-start statistics, if any, read once.
pub(crate) fn read_warm(args: &Args) -> anyhow::Result<Option<(PathBuf, AssignStats)>> {
    Ok(match &args.warm_start {
        Some(p) => Some((p.clone(), read_stats(p)?)),
        None => None,
    })
}

/// The duals a head starts from: the warm-start file's, when it has the head.
pub(crate) fn duals_for(
    warm: &Option<(PathBuf, AssignStats)>,
    head: u32,
    k: usize,
    lambda: f64,
) -> anyhow::Result<Option<Vec<f64>>> {
    match warm {
        Some((p, s)) => warm_duals(p, s, head, k, lambda),
        None => Ok(None),
    }
}

/// Statistics of a run before any head is solved.
pub(crate) fn empty_stats(settings: &Settings) -> AssignStats {
    AssignStats {
        lambda: settings.lambda,
        tol: settings.tol,
        max_iters: settings.max_iters,
        prior: settings.prior_spec.clone(),
        exact_balance: settings.exact_balance,
        acceleration: settings.acceleration.to_string(),
        neighbours: 0,
        neighbour_seconds: 0.0,
        spectral: None,
        heads: Vec::new(),
    }
}

/// How [`solve_head`] reports: `ctx` prefixes solver errors; progress shows unless `quiet`;
/// a head that does not converge is a warning when `warn`, or an error under `strict`.
pub(crate) struct Reporting<'a> {
    pub ctx: &'a str,
    pub quiet: bool,
    pub warn: bool,
    pub strict: bool,
}

/// Solves one head from its current scaling.
pub(crate) fn solve_head<C: Reduce>(
    solver: &mut Sinkhorn<C>,
    marginals: &[f64],
    settings: &Settings,
    (head, column): (u32, &str),
    report: &Reporting<'_>,
) -> anyhow::Result<Solution> {
    let mut progress = Progress::new(&format!("head {head}"), None, "iterations", report.quiet);
    let solution = solver
        .solve(marginals, settings.tol, settings.max_iters, |step| {
            progress.inc(1);
            progress.message(format!(
                "error {:.2e} (tol {:.0e})",
                step.error, settings.tol
            ));
        })
        .map_err(|e| anyhow!("{}: {e}", report.ctx))?;
    progress.finish();
    if !solution.converged {
        let msg = format!(
            "head {head} (`{column}`) did not converge: marginal error {:.3e} after {} \
             iterations (tol {:e})",
            solution.error, solution.iterations, settings.tol
        );
        if report.strict {
            bail!("{msg}; nothing written (--strict)");
        }
        if report.warn {
            eprintln!("warning: {msg}; raise --max-iters or --tol");
        }
    }
    Ok(solution)
}

/// The statistics of one solved head (churn left for the caller).
pub(crate) fn head_stats<C: Reduce>(
    head: u32,
    column: &str,
    solver: &Sinkhorn<C>,
    solution: &Solution,
    assignment: &Assignment,
    warm_started: bool,
) -> HeadStats {
    HeadStats {
        head,
        column: column.to_string(),
        n: solver.n(),
        k: solver.k(),
        iterations: solution.iterations,
        converged: solution.converged,
        row_error: assignment.row_error,
        col_error: assignment.col_error,
        objective: assignment.objective,
        entropy: assignment.entropy,
        min_cluster_size: assignment.sizes.iter().copied().min().unwrap_or(0),
        max_cluster_size: assignment.sizes.iter().copied().max().unwrap_or(0),
        path: solver.path().to_string(),
        absorptions: solver.absorptions(),
        rejected_steps: solution.rejected,
        warm_started,
        seconds: 0.0,
        churn_fraction: None,
        churn_nmi: None,
        log_beta: solver.log_beta(),
        merge: None,
        predicted_agreement: None,
    }
}

/// The one-line report of a solved head on stderr.
pub(crate) fn report_head(h: &HeadStats) {
    eprintln!(
        "head {}: N = {}, K = {}: {} in {} iterations (error {:.2e}, {}{}), cluster sizes {}..{}, \
         {:.2} s",
        h.head,
        h.n,
        h.k,
        if h.converged {
            "converged"
        } else {
            "NOT converged"
        },
        h.iterations,
        h.col_error,
        h.path,
        if h.warm_started { ", warm start" } else { "" },
        h.min_cluster_size,
        h.max_cluster_size,
        h.seconds
    );
    if let Some(m) = &h.merge {
        let agreement = if m.cut_agreements.is_empty() {
            String::new()
        } else {
            format!(
                ", agreement with the heads {}",
                against_the_rest(&m.cut_agreements, m.kept_cut)
            )
        };
        eprintln!(
            "head {}: kept cut {} of {}: modularity {}{agreement}; smoothing changed {:.1}% of \
             the labels",
            h.head,
            m.kept_cut,
            m.cut_modularities.len(),
            against_the_rest(&m.cut_modularities, m.kept_cut),
            100.0 * m.smoothing_changed
        );
    }
}

/// `scores[kept]`, and the best of the others in brackets when there are others.
fn against_the_rest(scores: &[f64], kept: usize) -> String {
    let rest = scores
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != kept)
        .map(|(_, &q)| q)
        .fold(f64::NEG_INFINITY, f64::max);
    let own = scores.get(kept).copied().unwrap_or(f64::NAN);
    if rest.is_finite() {
        format!("{own:.4} (best other {rest:.4})")
    } else {
        format!("{own:.4}")
    }
}

/// The labels file's metadata: provenance and the statistics.
pub(crate) fn labels_meta(args: &Args, settings: &Settings, stats: &AssignStats) -> FileMeta {
    let mut provenance = Provenance::new("sela-assign")
        .round(settings.round)
        .config_hash(settings.config_hash.clone())
        .input(&args.logits);
    for extra in [&args.warm_start, &args.previous].into_iter().flatten() {
        provenance = provenance.input(extra);
    }
    if let Prior::File(p) = &settings.prior {
        provenance = provenance.input(p);
    }
    FileMeta::new(labels::TABLE, labels::VERSION, provenance).with_json(labels::KEY_ASSIGN, stats)
}

/// The directory `--output` lies in, and where the statistics go (`--stats`, or
/// `assign-stats.json` in that directory).
pub(crate) fn output_places(args: &Args) -> (PathBuf, PathBuf) {
    let dir = args
        .output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let stats = args
        .stats
        .clone()
        .unwrap_or_else(|| dir.join("assign-stats.json"));
    (dir, stats)
}

/// Writes the statistics JSON atomically.
pub(crate) fn write_stats(path: &Path, stats: &AssignStats) -> anyhow::Result<()> {
    let mut json = serde_json::to_vec_pretty(stats).expect("stats serialize");
    json.push(b'\n');
    sela_io::atomic::write_bytes(path, &json)?;
    Ok(())
}

/// The summary of a finished run.
pub(crate) fn summary(
    output: &Path,
    stats_path: &Path,
    rows: usize,
    stats: &AssignStats,
) -> Summary {
    Summary {
        output: output.to_path_buf(),
        stats: stats_path.to_path_buf(),
        rows,
        heads: stats
            .heads
            .iter()
            .map(|h| HeadSummary {
                head: h.head,
                k: h.k,
                iterations: h.iterations,
                converged: h.converged,
                col_error: h.col_error,
                path: h.path.clone(),
                warm_started: h.warm_started,
                seconds: h.seconds,
                churn_fraction: h.churn_fraction,
            })
            .collect(),
    }
}

/// Runs the stage in this process alone.
pub fn run(args: &Args) -> anyhow::Result<Summary> {
    if let Some(n) = mpi_launch().filter(|&n| n > 1) {
        bail!(
            "started as one of {n} MPI processes, but this sela-assign was built without MPI \
             support: each copy would solve everything and write the same output; build it \
             with `cargo build --release -p sela-assign --features mpi`, or run one copy"
        );
    }
    let settings = Settings::resolve(args)?;
    let heads = head_columns(&args.logits, args.column.as_deref())?;
    let warm = read_warm(args)?;
    let previous = match &args.previous {
        Some(p) => Some((p.clone(), labels::read(p)?)),
        None => None,
    };
    let quiet = args.out.quiet;

    let mut stats = empty_stats(&settings);
    let neighbours = if settings.neighbours > 0 {
        let start = Instant::now();
        let found = Neighbours::search(&args.logits, features::EMBEDDING, settings.neighbours)?;
        stats.neighbours = found.k();
        stats.neighbour_seconds = start.elapsed().as_secs_f64();
        if !quiet {
            eprintln!(
                "neighbours: {} per row over {} rows, {:.1} s",
                found.k(),
                found.rows(),
                stats.neighbour_seconds
            );
        }
        Some(found)
    } else {
        None
    };
    let is_spectral = |head: u32| {
        settings.spectral > 0
            && settings
                .spectral_heads
                .as_ref()
                .is_none_or(|list| list.contains(&head))
    };
    if let Some(list) = &settings.spectral_heads {
        if let Some(h) = list
            .iter()
            .find(|h| !heads.iter().any(|(head, _)| head == *h))
        {
            let have: Vec<String> = heads.iter().map(|(h, _)| h.to_string()).collect();
            bail!(
                "{}: --spectral-heads names head {h}, but the logits hold heads {}",
                args.logits.display(),
                have.join(", ")
            );
        }
    }
    let mut spectral = if heads.iter().any(|(h, _)| is_spectral(*h)) {
        let max_k = heads
            .iter()
            .filter(|(h, _)| is_spectral(*h))
            .map(|(_, column)| features::read_matrix(&args.logits, column).map(|m| m.cols))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let mut found = SpectralLabels::compute(
            &args.logits,
            settings.spectral,
            max_k,
            settings.spectral_merge.clone(),
            settings.seed,
        )?;
        if settings.spectral_merge.is_some() {
            for (_, column) in &heads {
                let matrix = features::read_matrix(&args.logits, column)?;
                let ctx = format!("{}: column `{column}`", args.logits.display());
                found.add_prediction(&matrix.ids, &matrix.values, matrix.cols, &ctx)?;
            }
        }
        if !quiet {
            let s = found.stats();
            eprintln!(
                "spectral graph: {} neighbours per row, {} edges; {} eigenvectors in {} Lanczos \
                 steps (residual {:.1e}), {:.1} s",
                s.neighbours,
                s.edges,
                s.eigenvalues.len(),
                s.lanczos_steps,
                s.max_residual,
                s.seconds
            );
        }
        stats.spectral = Some(found.stats().clone());
        Some(found)
    } else {
        None
    };
    let mut out: BTreeMap<u32, HeadLabels> = BTreeMap::new();
    let mut rows = 0;
    for (head, column) in &heads {
        let (head, column) = (*head, column.as_str());
        let start = Instant::now();
        let matrix = features::read_matrix(&args.logits, column)?;
        let (n, k) = (matrix.ids.len(), matrix.cols);
        let ctx = || format!("{}: column `{column}`", args.logits.display());
        if let Some(spectral) = spectral.as_mut().filter(|_| is_spectral(head)) {
            let (labels, mut head_stats) =
                spectral.head((head, column), &matrix.ids, &matrix.values, k, &ctx())?;
            if let Some((path, prev)) = &previous {
                if let Some(p) = prev.heads.get(&head) {
                    // Spectral cluster numbers are arbitrary: only the NMI says what changed.
                    let before = p.aligned_to(path, head, &matrix.ids)?;
                    head_stats.churn_nmi = Some(sela_metrics::nmi(&before, &labels.labels));
                }
            }
            head_stats.seconds = start.elapsed().as_secs_f64();
            if !quiet {
                report_head(&head_stats);
            }
            rows = n;
            stats.heads.push(head_stats);
            out.insert(head, labels);
            continue;
        }
        let marginals = settings
            .prior
            .marginals(k)
            .with_context(|| format!("{}: prior for K = {k}", ctx()))?;
        let duals = duals_for(&warm, head, k, settings.lambda)?;
        let values = match &neighbours {
            Some(nb) => nb.averaged_log_probs(&matrix.ids, &matrix.values, k, &ctx())?,
            None => matrix.values,
        };
        let mut solver = Sinkhorn::new(values, k, settings.lambda, duals.as_deref())
            .map_err(|e| anyhow!("{}: {e}", ctx()))?
            .with_acceleration(settings.acceleration);
        let report = Reporting {
            ctx: &ctx(),
            quiet,
            warn: true,
            strict: args.strict,
        };
        let solution = solve_head(&mut solver, &marginals, &settings, (head, column), &report)?;
        let mut assignment = solver.assign().map_err(|e| anyhow!("{}: {e}", ctx()))?;
        if settings.exact_balance {
            solver.balance(&mut assignment, settings.seed);
        }
        let mut head_stats = head_stats(
            head,
            column,
            &solver,
            &solution,
            &assignment,
            duals.is_some(),
        );
        if let Some((path, prev)) = &previous {
            if let Some(p) = prev.heads.get(&head) {
                let before = p.aligned_to(path, head, &matrix.ids)?;
                let changed = before
                    .iter()
                    .zip(&assignment.labels)
                    .filter(|(a, b)| a != b)
                    .count();
                head_stats.churn_fraction = Some(changed as f64 / n as f64);
                head_stats.churn_nmi = Some(sela_metrics::nmi(&before, &assignment.labels));
            }
        }
        head_stats.seconds = start.elapsed().as_secs_f64();
        drop(solver);
        if !quiet {
            report_head(&head_stats);
        }
        rows = n;
        stats.heads.push(head_stats);
        out.insert(
            head,
            HeadLabels {
                ids: matrix.ids,
                labels: assignment.labels,
                confidence: assignment.confidence,
            },
        );
    }

    let meta = labels_meta(args, &settings, &stats);
    let (dir, stats_path) = output_places(args);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create the output directory", dir.display()))?;
    labels::write(&args.output, &out, &meta)?;
    write_stats(&stats_path, &stats)?;
    Ok(summary(&args.output, &stats_path, rows, &stats))
}
