//! Helpers shared by the end-to-end tests: where the binaries are, a tiny pipeline, running Make.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sela_io::dataset::{DatasetFile, DatasetWriter};
use sela_io::Provenance;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding the stage binaries of this build (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("deps dir").parent().expect("profile dir").to_path_buf();
    for stage in ["sela-extract", "sela-assign", "sela-train", "sela-eval", "sela-report"] {
        assert!(
            dir.join(stage).exists(),
            "{} is missing: build the stage binaries first (`cargo build --workspace --bins`, as `make test` does)",
            dir.join(stage).display()
        );
    }
    dir
}

/// A command for one stage binary.
pub fn stage(name: &str) -> Command {
    Command::new(bin_dir().join(name))
}

/// Writes the first `per_class` images of each class of an embedded split to `out`.
pub fn slice(split: &str, per_class: usize, out: &Path) {
    let src = repo().join("data/fashion-mnist-mini").join(split);
    let file = DatasetFile::open(&src).unwrap();
    let names = file.class_names.clone();
    let mut w = DatasetWriter::create(out, &names, Provenance::new("e2e-test")).unwrap();
    let mut taken = vec![0usize; names.len().max(10)];
    for batch in file.batches(4096).unwrap() {
        let b = batch.unwrap();
        for i in 0..b.len() {
            let label = b.label(i).unwrap();
            if taken[label as usize] < per_class {
                taken[label as usize] += 1;
                w.push(b.ids().value(i), b.image_bytes(i), b.image_path(i), Some(label)).unwrap();
            }
        }
    }
    w.finish().unwrap();
}

/// A tiny pipeline in `dir`: 8 images per class to train on, 4 to test, a small network, one
/// epoch per round. Returns the config path.
pub fn tiny_pipeline(dir: &Path, name: &str) -> PathBuf {
    slice("train.parquet", 8, &dir.join("train.parquet"));
    slice("test.parquet", 4, &dir.join("test.parquet"));
    let config = format!(
        r#"[pipeline]
name = "{name}"
seed = 11
rounds = 2

[data]
train = "{train}"
test = "{test}"
channels = 1
height = 28
width = 28
mean = [0.286]
std = [0.353]

[model]
widths = [8, 16]
blocks = [1, 1]
heads = [10, 4]

[train]
epochs_per_round = 1
batch_size = 16
lr = 0.05

[eval]
knn_k = [5]
probe_epochs = 20
gallery_size = 2
"#,
        train = dir.join("train.parquet").display(),
        test = dir.join("test.parquet").display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

/// Runs `make <target>` in the repository for `pipeline`, with outputs under `run`, using this
/// build's binaries (no cargo invocation from inside the test).
pub fn make(target: &str, pipeline: &Path, run: &Path, extra: &[&str]) -> Output {
    let out = Command::new("make")
        .arg("-C")
        .arg(repo())
        .arg("--no-print-directory")
        .arg(target)
        .arg(format!("PIPELINE={}", pipeline.display()))
        .arg(format!("RUN={}", run.display()))
        .arg(format!("BIN={}", bin_dir().display()))
        .arg("CARGO=true")
        .arg("QUIET=--quiet")
        .args(extra)
        .output()
        .expect("make runs");
    out
}

/// Panics with make's output unless it succeeded.
pub fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
