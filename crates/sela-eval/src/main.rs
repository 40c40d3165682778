//! `sela-eval`: the evaluation stage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sela-eval",
    version,
    about = "Evaluate one round: clustering vs ground truth, kNN and linear probe on the \
             embeddings, cluster statistics; appends to the run's metrics table",
    after_help = "Example:\n  \
        sela-eval --config pipelines/fashion-mnist.toml --round 3 \\\n      \
            --features-train runs/fashion-mnist/round-003/features-train \\\n      \
            --features-test runs/fashion-mnist/round-003/features-test \\\n      \
            --labels runs/fashion-mnist/round-003/labels.parquet \\\n      \
            --assign-stats runs/fashion-mnist/round-003/assign-stats.json \\\n      \
            --metrics runs/fashion-mnist/metrics.parquet \\\n      \
            --cluster-stats runs/fashion-mnist/round-003/cluster_stats.parquet"
)]
struct Args {
    #[command(flatten)]
    pipeline: sela_cli::PipelineArgs,
    /// Features of the training split: a Parquet file, a directory of part files, or a glob.
    #[arg(long, value_name = "PATH")]
    features_train: PathBuf,
    /// Features of the held-out split (ground truth from the config's data.test); enables the
    /// test-split clustering metrics, kNN and the linear probe.
    #[arg(long, value_name = "PATH")]
    features_test: Option<PathBuf>,
    /// The round's Sinkhorn labels (labels.parquet), scored as split `labels`; their clusters
    /// and confidences give the cluster statistics (else the heads' argmax does).
    #[arg(long, value_name = "PATH")]
    labels: Option<PathBuf>,
    /// The assign stage's statistics (assign-stats.json): iterations, time, label churn.
    #[arg(long, value_name = "PATH")]
    assign_stats: Option<PathBuf>,
    /// The run's metrics table; created if absent, rows of this round replaced.
    #[arg(long, value_name = "PATH")]
    metrics: PathBuf,
    /// The round's cluster-statistics table to write.
    #[arg(long, value_name = "PATH")]
    cluster_stats: PathBuf,
    #[command(flatten)]
    output: sela_cli::OutputArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    sela_cli::run(|| {
        let opts = sela_eval::EvalOptions {
            config: args.pipeline.load()?,
            round: args.pipeline.round,
            features_train: args.features_train,
            features_test: args.features_test,
            labels: args.labels,
            assign_stats: args.assign_stats,
            metrics: args.metrics,
            cluster_stats: args.cluster_stats,
            quiet: args.output.quiet,
        };
        sela_eval::run(&opts)
    })
}
