//! The Slurm recipe (pipelines/slurm/), run with a stand-in `sbatch` that executes each job at
//! submission: round 0 and one round with three extraction shards per split give exactly the
//! labels, checkpoints and metrics of the unsharded `make` run.

mod common;

use std::path::Path;
use std::process::Command;

use common::{check, make, repo, tiny_pipeline};
use sela_io::{labels, metrics};

fn submit(pipeline: &Path, round: u32, run: &Path, state: &Path, seed: Option<&str>) {
    let path = format!(
        "{}:{}",
        repo().join("tests/fake-slurm").display(),
        std::env::var("PATH").unwrap()
    );
    let mut cmd = Command::new("bash");
    if let Some(seed) = seed {
        cmd.env("SEED", seed);
    }
    let out = cmd
        .arg(repo().join("pipelines/slurm/submit-round.sh"))
        .arg(pipeline)
        .arg(round.to_string())
        .arg("3")
        .env("PATH", path)
        .env("FAKE_SLURM_DIR", state)
        .env("RUN_DIR", run)
        .env("SELA_BIN", common::bin_dir())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(state.join("log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "submit-round.sh {round} failed:\n{}\n{}\n--- job log\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn slurm_recipe_with_shards_matches_make() {
    recipe_matches_make(None);
}

#[test]
fn slurm_recipe_with_another_seed_matches_make() {
    recipe_matches_make(Some("12"));
}

/// Round 0 and round 1 through the Slurm recipe with three shards, against `make round` (both
/// with `SEED=seed` where given).
fn recipe_matches_make(seed: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = tiny_pipeline(dir.path(), "slurm");
    let via_make = dir.path().join("runs/make");
    let seed_arg = seed.map(|s| format!("SEED={s}"));
    let extra: Vec<&str> = seed_arg.iter().map(String::as_str).collect();
    check(&make("round", &pipeline, &via_make, &extra), "make round");

    let via_slurm = dir.path().join("runs/slurm");
    let state = dir.path().join("fake-slurm");
    submit(&pipeline, 0, &via_slurm, &state, seed);
    submit(&pipeline, 1, &via_slurm, &state, seed);

    let parts = std::fs::read_dir(via_slurm.join("round-001/features-train"))
        .unwrap()
        .count();
    assert_eq!(parts, 3, "three extraction shards");
    assert_eq!(
        labels::read(&via_make.join("round-001/labels.parquet"))
            .unwrap()
            .heads,
        labels::read(&via_slurm.join("round-001/labels.parquet"))
            .unwrap()
            .heads
    );
    assert_eq!(
        std::fs::read(via_make.join("round-001/checkpoint.safetensors")).unwrap(),
        std::fs::read(via_slurm.join("round-001/checkpoint.safetensors")).unwrap()
    );
    let values = |run: &Path| {
        let mut v: Vec<_> = metrics::read(&run.join("metrics.parquet"))
            .unwrap()
            .into_iter()
            .filter(|m| !m.metric.ends_with("seconds"))
            .map(|m| (m.round, m.head, m.split, m.metric, m.value.to_bits()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(values(&via_make), values(&via_slurm));
    let hashes = |run: &Path| -> Vec<String> {
        let mut h: Vec<String> = metrics::read(&run.join("metrics.parquet"))
            .unwrap()
            .into_iter()
            .map(|m| m.config_hash)
            .collect();
        h.dedup();
        h
    };
    assert_eq!(hashes(&via_make), hashes(&via_slurm));
    assert_eq!(hashes(&via_slurm).len(), 1, "one config hash per run");
    assert!(via_slurm.join("report.html").exists());
}
