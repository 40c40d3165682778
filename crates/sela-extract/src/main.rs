//! `sela-extract`: embeddings and head logits of every image to Parquet.

use std::path::PathBuf;

use clap::Parser;
use sela_extract::{ExtractOptions, PretrainedKind, PretrainedOptions};
use sela_io::parts::Shard;

#[derive(Parser)]
#[command(
    name = "sela-extract",
    version,
    about = "Run the model (inference mode, clean view) over a dataset and write embeddings and logits",
    after_help = "Examples:\n  \
        # round 0: write the seeded initial model\n  \
        sela-extract --config pipelines/default.toml --init --checkpoint runs/default/round-000/checkpoint.safetensors\n  \
        # shard 3 of 16 of a Slurm array job\n  \
        sela-extract --config pipelines/fashion-mnist.toml --round 2 \\\n      \
            --checkpoint runs/fashion-mnist/round-002/checkpoint.safetensors \\\n      \
            --dataset data/fashion-mnist/train.parquet --output runs/fashion-mnist/round-002/features-train \\\n      \
            --shard 3 --num-shards 16\n  \
        # frozen features of a pretrained ResNet-50 (torchvision weights saved as safetensors)\n  \
        sela-extract --config pipelines/fashion-mnist.toml --backbone resnet50 --weights resnet50.safetensors \\\n      \
            --image-size 112 --dataset data/fashion-mnist/test.parquet --output features-resnet50-test"
)]
struct Args {
    #[command(flatten)]
    pipeline: sela_cli::PipelineArgs,
    /// The model checkpoint (safetensors) to run; with --init, where the initial model is written.
    #[arg(long, required_unless_present = "weights")]
    checkpoint: Option<PathBuf>,
    /// The backbone: `sela` (the pipeline's own network, from --checkpoint) or a frozen pretrained
    /// candle-transformers model, `resnet18`, `resnet34` or `resnet50`, from --weights.
    #[arg(long, default_value = "sela")]
    backbone: String,
    /// The pretrained backbone's safetensors weights (torchvision layout).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The side images are resized to for a pretrained backbone.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Write the pipeline's seeded initial model to --checkpoint first (round 0).
    #[arg(long)]
    init: bool,
    /// The dataset Parquet to run over.
    #[arg(long, requires = "output")]
    dataset: Option<PathBuf>,
    /// Output directory for part files (or a .parquet file when unsharded).
    #[arg(long, requires = "dataset")]
    output: Option<PathBuf>,
    /// This process's shard, 0-based: it handles the rows with id % num-shards == shard.
    #[arg(long, default_value_t = 0)]
    shard: usize,
    /// The number of shards.
    #[arg(long, default_value_t = 1)]
    num_shards: usize,
    /// Images per inference batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[command(flatten)]
    output_args: sela_cli::OutputArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let backbone =
        PretrainedKind::parse(&args.backbone).unwrap_or_else(|e| sela_cli::usage_error(e));
    let pretrained = match (backbone, &args.weights) {
        (Some(kind), Some(weights)) => Some(PretrainedOptions {
            kind,
            weights: weights.clone(),
            image_size: args.image_size,
        }),
        (Some(kind), None) => sela_cli::usage_error(format!(
            "--backbone {kind:?} needs --weights FILE.safetensors"
        )),
        (None, Some(_)) => sela_cli::usage_error(
            "--weights needs a pretrained --backbone (resnet18, resnet34, resnet50)",
        ),
        (None, None) => None,
    };
    let shard =
        Shard::new(args.shard, args.num_shards).unwrap_or_else(|e| sela_cli::usage_error(e));
    sela_cli::run(|| {
        let config = args.pipeline.load()?;
        sela_extract::run(
            &config,
            &ExtractOptions {
                round: args.pipeline.round,
                checkpoint: args.checkpoint.clone().unwrap_or_default(),
                pretrained: pretrained.clone(),
                init: args.init,
                dataset: args.dataset.clone(),
                output: args.output.clone(),
                shard,
                batch_size: args.batch_size,
                quiet: args.output_args.quiet,
            },
        )
    })
}
