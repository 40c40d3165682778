//! The evaluation stage end to end on tiny tables written with sela-io's writers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sela_config::PipelineConfig;
use sela_eval::{run, EvalOptions};
use sela_images::codec::{encode_png, Pixels};
use sela_images::Rng;
use sela_io::dataset::DatasetWriter;
use sela_io::features::{FeaturesInfo, FeaturesLayout, FeaturesWriter};
use sela_io::labels::{AssignStats, HeadLabels, HeadStats};
use sela_io::metrics::MetricRow;
use sela_io::parts::Shard;
use sela_io::{FileMeta, Provenance};

const CLASSES: usize = 3;
const TRAIN: usize = 30;
const TEST: usize = 12;
const DIM: usize = 4;
const HEADS: [usize; 2] = [3, 2];

fn class_of(i: usize) -> usize {
    i % CLASSES
}

fn train_id(i: usize) -> u64 {
    100 + i as u64
}

fn test_id(i: usize) -> u64 {
    500 + i as u64
}

fn png(class: usize) -> Vec<u8> {
    let data = (0..64)
        .map(|p| {
            if (p / 8 + p % 8) % (class + 2) == 0 {
                255
            } else {
                30
            }
        })
        .collect();
    encode_png(&Pixels {
        width: 8,
        height: 8,
        channels: 1,
        data,
    })
    .unwrap()
}

fn write_dataset(path: &Path, n: usize, id: fn(usize) -> u64, labelled: bool) {
    let names: Vec<String> = ["circle", "square", "triangle"].map(String::from).to_vec();
    let mut w = DatasetWriter::create(path, &names, Provenance::new("test")).unwrap();
    for i in 0..n {
        let label = labelled.then_some(class_of(i) as i64);
        w.push(id(i), &png(class_of(i)), None, label).unwrap();
    }
    w.finish().unwrap();
}

/// One row's outputs: an embedding near the class's axis, head 0 a perfect clustering with
/// permuted names, head 1 separating class 0 from the rest.
fn row(i: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = class_of(i);
    let emb = (0..DIM)
        .map(|d| if d == c { 2.0 } else { 0.0 } + 0.3 * rng.normal() as f32 + 1.0)
        .collect();
    let l0 = (0..3)
        .map(|k| if k == (c + 1) % 3 { 3.0 } else { 0.0 })
        .collect();
    let l1 = if c == 0 {
        vec![2.0, 0.0]
    } else {
        vec![0.0, 2.0]
    };
    (emb, l0, l1)
}

/// Writes features for rows `0..n` as `parts` part files (by id modulo) into `dir`, or as one
/// file when `dir` ends in `.parquet`. Rows are written in reverse order, so that nothing
/// relies on the dataset's order.
fn write_features(dir: &Path, n: usize, id: fn(usize) -> u64, parts: usize, heads: &[usize]) {
    let info = FeaturesInfo {
        layout: FeaturesLayout {
            embedding_dim: DIM,
            head_sizes: heads.to_vec(),
            extra_embeddings: Vec::new(),
        },
        dataset: "dataset.parquet".into(),
        dataset_rows: n as u64,
        checkpoint: None,
    };
    let single = dir.extension().is_some_and(|e| e == "parquet");
    if !single {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut rng = Rng::new(n as u64);
    let rows: Vec<_> = (0..n).map(|i| (id(i), row(i, &mut rng))).collect();
    for p in 0..parts {
        let shard = Shard::new(p, parts).unwrap();
        let target = if single {
            dir.to_path_buf()
        } else {
            dir.join(shard.file_name())
        };
        let mut w = FeaturesWriter::create(&target, &info, shard, Provenance::new("test")).unwrap();
        for (rid, (e, l0, l1)) in rows.iter().rev().filter(|r| shard.contains(r.0)) {
            let logits: Vec<&[f32]> = [&l0[..], &l1[..]][..heads.len()].to_vec();
            w.push(&[*rid], e, &logits).unwrap();
        }
        w.finish().unwrap();
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PipelineConfig,
}

impl Fixture {
    fn new(labelled: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        write_dataset(&root.join("train.parquet"), TRAIN, train_id, labelled);
        write_dataset(&root.join("test.parquet"), TEST, test_id, labelled);
        std::fs::create_dir_all(root.join("round-001")).unwrap();
        write_features(
            &root.join("round-001/features-train"),
            TRAIN,
            train_id,
            2,
            &HEADS,
        );
        write_features(
            &root.join("round-001/features-test.parquet"),
            TEST,
            test_id,
            1,
            &HEADS,
        );

        // Sinkhorn labels: head 0 right except ids 100, 101, 102; head 1 as its argmax.
        let mut heads = BTreeMap::new();
        let ids: Vec<u64> = (0..TRAIN).map(train_id).collect();
        let l0 = (0..TRAIN)
            .map(|i| {
                let c = class_of(i) as u32;
                if i < 3 {
                    (c + 1) % 3
                } else {
                    c
                }
            })
            .collect();
        let l1 = (0..TRAIN).map(|i| u32::from(class_of(i) != 0)).collect();
        for (h, labels) in [(0u32, l0), (1, l1)] {
            heads.insert(
                h,
                HeadLabels {
                    ids: ids.clone(),
                    labels,
                    confidence: vec![0.9; TRAIN],
                },
            );
        }
        let meta = FileMeta::new(
            sela_io::labels::TABLE,
            sela_io::labels::VERSION,
            Provenance::new("test"),
        );
        sela_io::labels::write(root.join("round-001/labels.parquet"), &heads, &meta).unwrap();
        let stats = AssignStats {
            heads: vec![
                HeadStats {
                    head: 0,
                    iterations: 17,
                    seconds: 0.25,
                    churn_fraction: Some(0.1),
                    churn_nmi: Some(0.8),
                    ..Default::default()
                },
                HeadStats {
                    head: 1,
                    iterations: 9,
                    seconds: 0.125,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        std::fs::write(
            root.join("round-001/assign-stats.json"),
            serde_json::to_vec(&stats).unwrap(),
        )
        .unwrap();

        let toml = format!(
            "[pipeline]\nname = \"t\"\n[data]\ntrain = \"{}\"\ntest = \"{}\"\nchannels = 1\n\
             height = 8\nwidth = 8\n[model]\nheads = [3, 2]\n[eval]\nknn_k = [1, 5]\n\
             probe_epochs = 50\n",
            root.join("train.parquet").display(),
            root.join("test.parquet").display()
        );
        std::fs::write(root.join("p.toml"), toml).unwrap();
        let config = PipelineConfig::load(&root.join("p.toml")).unwrap();
        Fixture {
            _dir: dir,
            root,
            config,
        }
    }

    fn options(&self, round: u32) -> EvalOptions {
        let r = self.root.join("round-001");
        EvalOptions {
            config: self.config.clone(),
            round,
            features_train: r.join("features-train"),
            features_test: Some(r.join("features-test.parquet")),
            labels: (round > 0).then(|| r.join("labels.parquet")),
            assign_stats: (round > 0).then(|| r.join("assign-stats.json")),
            metrics: self.root.join("metrics.parquet"),
            cluster_stats: r.join("cluster_stats.parquet"),
            quiet: true,
        }
    }
}

fn metric_map(rows: &[MetricRow], round: u32) -> BTreeMap<(Option<u32>, String, String), f64> {
    rows.iter()
        .filter(|r| r.round == round)
        .map(|r| ((r.head, r.split.clone(), r.metric.clone()), r.value))
        .collect()
}

fn key(head: Option<u32>, split: &str, metric: &str) -> (Option<u32>, String, String) {
    (head, split.to_string(), metric.to_string())
}

#[test]
fn round_metrics_are_exact_and_reruns_replace_them() {
    let f = Fixture::new(true);
    let opts = f.options(1);
    let summary = run(&opts).unwrap();
    assert!(summary.skipped.is_empty(), "{:?}", summary.skipped);
    assert_eq!((summary.train_rows, summary.test_rows), (TRAIN, Some(TEST)));
    assert_eq!(summary.classes, CLASSES);

    let rows = sela_io::metrics::read(&opts.metrics).unwrap();
    let m = metric_map(&rows, 1);
    let hash = f.config.hash();
    assert!(rows.iter().all(|r| r.config_hash == hash));

    // Head 0: a perfect clustering under other names, on both splits.
    for split in ["train", "test"] {
        for metric in ["acc", "nmi", "ari", "purity", "size_entropy"] {
            let v = m[&key(Some(0), split, metric)];
            assert!((v - 1.0).abs() < 1e-12, "{split} {metric} = {v}");
        }
    }
    // Head 1 (K = 2 ≠ 3 classes, so no `acc`): clusters {class 0} and {classes 1, 2}.
    // ARI: Σ C(n_ij,2) = 135, Σ C(a_i,2) = 45 + 190 = 235, Σ C(b_j,2) = 135, C(30,2) = 435:
    // 2(135·435 − 235·135) / ((235 + 135)·435 − 2·235·135) = 54000 / 97500 = 36/65.
    // NMI: the clustering is a function of the class, so MI = H(clusters) = ln 3 − (2/3) ln 2
    // and NMI = 2·H(clusters) / (H(clusters) + ln 3).
    assert!(!m.contains_key(&key(Some(1), "train", "acc")));
    assert!((m[&key(Some(1), "train", "ari")] - 36.0 / 65.0).abs() < 1e-12);
    let hk = 3f64.ln() - 2.0 / 3.0 * 2f64.ln();
    assert!((m[&key(Some(1), "train", "nmi")] - 2.0 * hk / (hk + 3f64.ln())).abs() < 1e-12);
    assert!((m[&key(Some(1), "train", "purity")] - 2.0 / 3.0).abs() < 1e-12);
    assert!((m[&key(Some(1), "train", "size_entropy")] - hk / 2f64.ln()).abs() < 1e-12);
    // Sinkhorn labels: 3 of 30 wrong on head 0.
    assert!((m[&key(Some(0), "labels", "acc")] - 0.9).abs() < 1e-12);
    assert!((m[&key(Some(1), "labels", "purity")] - 2.0 / 3.0).abs() < 1e-12);
    // Representation: separable classes.
    for metric in ["knn1_acc", "knn5_acc", "linear_probe_acc"] {
        assert_eq!(m[&key(None, "test", metric)], 1.0, "{metric}");
    }
    // Solver statistics.
    assert_eq!(m[&key(Some(0), "train", "sinkhorn_iterations")], 17.0);
    assert_eq!(m[&key(Some(1), "train", "sinkhorn_seconds")], 0.125);
    assert_eq!(m[&key(Some(0), "train", "label_churn")], 0.1);
    assert_eq!(m[&key(Some(0), "train", "label_churn_nmi")], 0.8);
    assert!(!m.contains_key(&key(Some(1), "train", "label_churn")));

    // Cluster statistics of the Sinkhorn labels.
    let stats = sela_io::cluster_stats::read(&opts.cluster_stats).unwrap();
    assert_eq!(stats.len(), 5);
    let s = &stats[0];
    assert_eq!((s.round, s.head, s.cluster, s.size), (1, 0, 0, 10));
    assert_eq!(s.majority_class, Some(0));
    assert!((s.purity.unwrap() - 0.9).abs() < 1e-12);
    assert!((s.mean_confidence - 0.9).abs() < 1e-6);
    let s = &stats[4];
    assert_eq!(
        (s.head, s.cluster, s.size, s.majority_class),
        (1, 1, 20, Some(1))
    );
    assert_eq!(s.purity, Some(0.5));

    // Re-running the round replaces its rows; round 0 adds its own.
    let before = rows.len();
    run(&opts).unwrap();
    let again = sela_io::metrics::read(&opts.metrics).unwrap();
    assert_eq!(again.len(), before);
    assert_eq!(metric_map(&again, 1), m);
    let mut round0 = f.options(0);
    round0.cluster_stats = f.root.join("round-001/cluster_stats_0.parquet");
    run(&round0).unwrap();
    let all = sela_io::metrics::read(&opts.metrics).unwrap();
    let m0 = metric_map(&all, 0);
    assert!(m0
        .keys()
        .all(|k| k.1 != "labels" && !k.2.starts_with("sinkhorn")));
    assert_eq!(m0[&key(Some(0), "test", "acc")], 1.0);
    assert_eq!(all.len(), before + m0.len());
    assert_eq!(all[0].round, 0);
    // Round 0's cluster statistics come from the heads' argmax and softmax confidence:
    // head 0's logits (3, 0, 0) give exp(3) / (exp(3) + 2).
    let stats0 = sela_io::cluster_stats::read(&round0.cluster_stats).unwrap();
    let want = 3f64.exp() / (3f64.exp() + 2.0);
    assert!((stats0[0].mean_confidence - want).abs() < 1e-6);
    assert_eq!(stats0[0].purity, Some(1.0));
}

#[test]
fn without_ground_truth_cluster_statistics_are_still_written() {
    let f = Fixture::new(false);
    let opts = f.options(1);
    let summary = run(&opts).unwrap();
    assert!(
        summary
            .skipped
            .iter()
            .any(|s| s.contains("no ground-truth labels")),
        "{:?}",
        summary.skipped
    );
    let m = metric_map(&sela_io::metrics::read(&opts.metrics).unwrap(), 1);
    assert!(m
        .keys()
        .all(|k| !["acc", "nmi", "ari", "purity"].contains(&k.2.as_str())));
    assert!(!m.contains_key(&key(None, "test", "linear_probe_acc")));
    assert!((m[&key(Some(0), "train", "size_entropy")] - 1.0).abs() < 1e-12);
    assert_eq!(m[&key(Some(0), "train", "sinkhorn_iterations")], 17.0);
    let stats = sela_io::cluster_stats::read(&opts.cluster_stats).unwrap();
    assert_eq!(stats.iter().map(|s| s.size).sum::<u64>(), 2 * TRAIN as u64);
    assert!(stats
        .iter()
        .all(|s| s.purity.is_none() && s.majority_class.is_none()));
}

/// Runs `opts` expecting an error that mentions every one of `needles`, and checks that no
/// output was written.
fn expect_error(opts: &EvalOptions, needles: &[&str]) {
    let err = format!("{:#}", run(opts).unwrap_err());
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(!opts.metrics.exists(), "metrics written despite: {err}");
    assert!(
        !opts.cluster_stats.exists(),
        "cluster stats written despite: {err}"
    );
}

#[test]
fn bad_input_is_named_and_writes_nothing() {
    let f = Fixture::new(true);

    // Features whose heads disagree with the config.
    let mut opts = f.options(1);
    let one_head = f.root.join("one-head.parquet");
    write_features(&one_head, TRAIN, train_id, 1, &[3]);
    opts.features_train = one_head;
    expect_error(&opts, &["one-head.parquet", "[3]", "[3, 2]", "model.heads"]);

    // A table that is not a features table at all (no `embedding` column).
    let mut opts = f.options(1);
    opts.features_train = f.root.join("round-001/labels.parquet");
    expect_error(&opts, &["labels.parquet", "features"]);

    // Features of ids the dataset does not have.
    let mut opts = f.options(1);
    opts.features_test = Some(f.root.join("round-001/features-train"));
    expect_error(
        &opts,
        &[
            "features-train",
            "id 1",
            "not in the dataset",
            "test.parquet",
        ],
    );

    // Test features without a test dataset in the config.
    let mut opts = f.options(1);
    opts.config.data.test = None;
    expect_error(&opts, &["--features-test", "data.test"]);

    // Labels for a head the pipeline does not have.
    let mut opts = f.options(1);
    opts.config.model.heads = vec![3];
    let three = f.root.join("three.parquet");
    write_features(&three, TRAIN, train_id, 1, &[3]);
    opts.features_train = three;
    opts.features_test = None;
    expect_error(&opts, &["labels.parquet", "head 1", "1 heads"]);

    // A missing output directory is reported before any work.
    let mut opts = f.options(1);
    opts.cluster_stats = f.root.join("nowhere/cluster_stats.parquet");
    expect_error(&opts, &["nowhere", "does not exist"]);

    // An existing metrics history is left untouched by a failing run.
    let opts = f.options(1);
    run(&opts).unwrap();
    let before = std::fs::read(&opts.metrics).unwrap();
    let mut bad = f.options(1);
    bad.assign_stats = Some(f.root.join("p.toml"));
    let err = format!("{:#}", run(&bad).unwrap_err());
    assert!(
        err.contains("p.toml") && err.contains("statistics JSON"),
        "{err}"
    );
    assert_eq!(std::fs::read(&opts.metrics).unwrap(), before);
}

#[test]
fn the_binary_prints_a_summary_and_exits_nonzero_on_error() {
    let f = Fixture::new(true);
    let r = f.root.join("round-001");
    let bin = env!("CARGO_BIN_EXE_sela-eval");
    let out = std::process::Command::new(bin)
        .arg("--config")
        .arg(f.root.join("p.toml"))
        .args(["--round", "1", "--quiet"])
        .arg("--features-train")
        .arg(r.join("features-train"))
        .arg("--features-test")
        .arg(r.join("features-test.parquet"))
        .arg("--labels")
        .arg(r.join("labels.parquet"))
        .arg("--metrics")
        .arg(f.root.join("metrics.parquet"))
        .arg("--cluster-stats")
        .arg(r.join("cluster_stats.parquet"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["metrics"]["h0.labels.acc"], 0.9);
    assert_eq!(summary["round"], 1);

    let out = std::process::Command::new(bin)
        .arg("--config")
        .arg(f.root.join("p.toml"))
        .arg("--features-train")
        .arg(f.root.join("missing"))
        .arg("--metrics")
        .arg(f.root.join("m2.parquet"))
        .arg("--cluster-stats")
        .arg(f.root.join("c2.parquet"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));
    assert!(!f.root.join("m2.parquet").exists());
}
