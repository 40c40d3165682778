use clap::Parser;

/// Trains the backbone and heads against one round's labels.
#[derive(Parser)]
#[command(
    name = "sela-train",
    version,
    after_help = "Example (round 2 of the default pipeline):\n  sela-train --config pipelines/default.toml --round 2 \\\n    --labels runs/default/round-002/labels.parquet \\\n    --init runs/default/round-001/checkpoint.safetensors \\\n    --output runs/default/round-002/checkpoint.safetensors \\\n    --log runs/default/round-002/train_log.parquet\n\nRound 0 (the seeded initial model, no training):\n  sela-train --config pipelines/default.toml --round 0 \\\n    --output runs/default/round-000/checkpoint.safetensors"
)]
struct Cli {
    #[command(flatten)]
    args: sela_train::Args,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sela_cli::run(|| sela_train::run(&cli.args))
}
