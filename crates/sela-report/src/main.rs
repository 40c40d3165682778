//! `sela-report`: the run's HTML report.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sela-report",
    version,
    about = "Write one self-contained HTML report of a run: headline numbers, metrics over \
             rounds, cluster sizes, a cluster × class heat map and cluster galleries",
    after_help = "Example:\n  \
        sela-report --config pipelines/fashion-mnist.toml --run-dir runs/fashion-mnist \\\n      \
            --output runs/fashion-mnist/report.html \\\n      \
            --floor acc=0.559 --floor nmi=0.530 --floor ari=0.388 \\\n      \
            --floor knn20_acc=0.842 --floor linear_probe_acc=0.834\n  \
        sela-report --config pipelines/fashion-mnist.toml \\\n      \
            --compare runs/fashion-mnist-seed0 runs/fashion-mnist-seed1 runs/fashion-mnist-seed2"
)]
struct Args {
    #[command(flatten)]
    pipeline: sela_cli::PipelineArgs,
    /// The run directory: metrics.parquet and the round-RRR/ folders.
    #[arg(long, value_name = "DIR", required_unless_present = "compare")]
    run_dir: Option<PathBuf>,
    /// The HTML file to write.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["table", "compare"])]
    output: Option<PathBuf>,
    /// Print a per-round text table instead (test split: ACC/NMI/ARI of the best head with the K
    /// of `--head`, 20-NN and linear-probe accuracy, minutes since round 0's evaluation).
    #[arg(long)]
    table: bool,
    /// Print runs of this pipeline side by side instead (seeds, `--set` overrides): per run the
    /// table's line at the latest round every run has evaluated, then their mean and sample
    /// standard deviation.
    #[arg(long, value_name = "DIR", num_args = 1.., conflicts_with_all = ["run_dir", "table", "output"])]
    compare: Vec<PathBuf>,
    /// The head whose clusters the heat map and galleries show (`--table` and `--compare`: the
    /// best head with its K).
    #[arg(long, default_value_t = 0)]
    head: u32,
    /// A reference value drawn with a metric, e.g. `--floor knn20_acc=0.842` (repeatable;
    /// metrics: acc, nmi, ari, purity, knn<k>_acc, linear_probe_acc).
    #[arg(long = "floor", value_name = "METRIC=VALUE", value_parser = parse_floor)]
    floors: Vec<(String, f64)>,
    /// What the floor values are [default: the config's eval.floor_label].
    #[arg(long)]
    floor_label: Option<String>,
    /// Most clusters given a gallery and a heat-map row (the largest are kept).
    #[arg(long, default_value_t = 60)]
    max_clusters: usize,
    #[command(flatten)]
    output_args: sela_cli::OutputArgs,
}

fn parse_floor(s: &str) -> Result<(String, f64), String> {
    let (metric, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected METRIC=VALUE, got `{s}`"))?;
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|e| format!("`{value}` is not a number: {e}"))?;
    Ok((metric.trim().to_string(), value))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.compare.is_empty() {
        return sela_cli::run_text(|| {
            let config = args.pipeline.load()?;
            sela_report::compare_table(&config, &args.compare, args.head)
        });
    }
    let run_dir = args
        .run_dir
        .expect("clap requires --run-dir without --compare");
    if args.table {
        return sela_cli::run_text(|| {
            let config = args.pipeline.load()?;
            sela_report::text_table(&config, &run_dir, args.head)
        });
    }
    sela_cli::run(|| {
        let config = args.pipeline.load()?;
        // The config's eval.floors, each overridden by a --floor of the same metric.
        let mut floors = config.eval.floors.clone();
        floors.extend(args.floors);
        let opts = sela_report::ReportOptions {
            floor_label: args
                .floor_label
                .unwrap_or_else(|| config.eval.floor_label.clone()),
            floors: floors.into_iter().collect(),
            config,
            run_dir,
            output: args.output.expect("clap requires --output without --table"),
            head: args.head,
            max_clusters: args.max_clusters,
        };
        sela_report::run(&opts)
    })
}
