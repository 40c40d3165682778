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
    let dir = exe
        .parent()
        .expect("deps dir")
        .parent()
        .expect("profile dir")
        .to_path_buf();
    for stage in [
        "sela-extract",
        "sela-assign",
        "sela-train",
        "sela-eval",
        "sela-report",
    ] {
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
                w.push(
                    b.ids().value(i),
                    b.image_bytes(i),
                    b.image_path(i),
                    Some(label),
                )
                .unwrap();
            }
        }
    }
    w.finish().unwrap();
}

/// The data and training size of a generated pipeline.
#[derive(Debug, Clone, Copy)]
pub struct PipelineSize {
    /// Training images per class.
    pub train_per_class: usize,
    /// Test images per class.
    pub test_per_class: usize,
    /// `train.epochs_per_round`.
    pub epochs_per_round: u32,
    /// `train.batch_size`.
    pub batch_size: usize,
}

impl PipelineSize {
    /// 8 images per class to train on, 4 to test, one epoch of batches of 16 per round.
    pub const TINY: PipelineSize = PipelineSize {
        train_per_class: 8,
        test_per_class: 4,
        epochs_per_round: 1,
        batch_size: 16,
    };
}

/// A tiny pipeline in `dir`: 8 images per class to train on, 4 to test, a small network, one
/// epoch per round. Returns the config path.
pub fn tiny_pipeline(dir: &Path, name: &str) -> PathBuf {
    pipeline(dir, name, PipelineSize::TINY)
}

/// A pipeline with the tiny pipeline's network on slices of the embedded data of `size`, in
/// `dir` (`train.parquet`, `test.parquet`, `<name>.toml`). Returns the config path.
pub fn pipeline(dir: &Path, name: &str, size: PipelineSize) -> PathBuf {
    slice(
        "train.parquet",
        size.train_per_class,
        &dir.join("train.parquet"),
    );
    slice(
        "test.parquet",
        size.test_per_class,
        &dir.join("test.parquet"),
    );
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
epochs_per_round = {epochs}
batch_size = {batch}
lr = 0.05

[eval]
knn_k = [5]
probe_epochs = 20
gallery_size = 2
"#,
        train = dir.join("train.parquet").display(),
        test = dir.join("test.parquet").display(),
        epochs = size.epochs_per_round,
        batch = size.batch_size,
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

/// Runs `make <target>` in the repository for `pipeline`, with outputs under `run`, using this
/// build's binaries (no cargo invocation from inside the test).
pub fn make(target: &str, pipeline: &Path, run: &Path, extra: &[&str]) -> Output {
    make_command(target, pipeline, run, &bin_dir(), extra)
        .output()
        .expect("make runs")
}

/// The `make <target>` command of [`make`], with the stage binaries taken from `bin`.
pub fn make_command(
    target: &str,
    pipeline: &Path,
    run: &Path,
    bin: &Path,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(repo())
        .arg("--no-print-directory")
        .arg(target)
        .arg(format!("PIPELINE={}", pipeline.display()))
        .arg(format!("RUN={}", run.display()))
        .arg(format!("BIN={}", bin.display()))
        .arg("CARGO=true")
        .arg("QUIET=--quiet")
        .args(extra);
    cmd
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

/// Every temporary file of an atomic writer (`.<name>.tmp-<pid>`) under `dir`, recursively.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| sela_io::atomic::is_temp_path(p))
        .collect()
}

/// Every file under `dir`, recursively, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// What a directory tree holds: every directory below it, and every file with its bytes and
/// modification time. (A directory's own time is left out: an atomic writer's temporary file
/// changes it even when the writer fails and removes that file.)
pub type Snapshot = std::collections::BTreeMap<PathBuf, Option<(Vec<u8>, std::time::SystemTime)>>;

/// Takes a [`Snapshot`] of `dir`.
pub fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
                out.insert(path, None);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(path, Some((bytes, meta.modified().unwrap())));
            }
        }
    }
    out
}

/// The differences between two snapshots, one line each (empty when equal).
pub fn snapshot_diff(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (path, state) in before {
        match (state, after.get(path)) {
            (_, None) => out.push(format!("removed: {}", path.display())),
            (Some((bytes, _)), Some(Some((b, _)))) if b != bytes => {
                out.push(format!("changed: {}", path.display()))
            }
            (Some((_, time)), Some(Some((_, t)))) if t != time => {
                out.push(format!("touched: {}", path.display()))
            }
            (Some(_), Some(None)) | (None, Some(Some(_))) => {
                out.push(format!("replaced: {}", path.display()))
            }
            _ => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        out.push(format!("created: {}", path.display()));
    }
    out
}
