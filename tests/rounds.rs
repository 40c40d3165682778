//! Two self-labeling rounds on a tiny slice, through `make` and the real stage binaries:
//! the outputs' schemas, determinism, and resumption after a lost output.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{check, make, tiny_pipeline};
use sela_io::table::TableFile;
use sela_io::{cluster_stats, dataset, features, labels, metrics, train_log};

fn round_dir(run: &Path, r: u32) -> std::path::PathBuf {
    run.join(format!("round-{r:03}"))
}

/// Everything a finished run decided, minus wall-clock times.
#[derive(Debug, PartialEq)]
struct Outcome {
    labels: Vec<BTreeMap<u32, labels::HeadLabels>>,
    checkpoints: Vec<Vec<u8>>,
    metrics: Vec<(u32, Option<u32>, String, String, u64)>,
    losses: Vec<Vec<u32>>,
}

fn outcome(run: &Path) -> Outcome {
    let mut o = Outcome {
        labels: vec![],
        checkpoints: vec![],
        metrics: vec![],
        losses: vec![],
    };
    for r in 1..=2 {
        let d = round_dir(run, r);
        o.labels
            .push(labels::read(&d.join("labels.parquet")).unwrap().heads);
        o.checkpoints
            .push(std::fs::read(d.join("checkpoint.safetensors")).unwrap());
        o.losses.push(
            train_log::read(&d.join("train_log.parquet"))
                .unwrap()
                .iter()
                .map(|row| row.loss.to_bits())
                .collect(),
        );
    }
    let mut m: Vec<_> = metrics::read(&run.join("metrics.parquet"))
        .unwrap()
        .into_iter()
        .filter(|row| !row.metric.ends_with("seconds"))
        .map(|row| {
            (
                row.round,
                row.head,
                row.split,
                row.metric,
                row.value.to_bits(),
            )
        })
        .collect();
    m.sort();
    o.metrics = m;
    o
}

#[test]
fn two_rounds_are_complete_deterministic_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = tiny_pipeline(dir.path(), "tiny");
    let run_a = dir.path().join("runs/a");
    let run_b = dir.path().join("runs/b");

    check(
        &make("rounds", &pipeline, &run_a, &["N=2"]),
        "make rounds N=2 (run a)",
    );

    // Every output exists and validates against its contract.
    let layout = features::FeaturesLayout {
        embedding_dim: 16,
        head_sizes: vec![10, 4],
        extra_embeddings: Vec::new(),
    };
    for r in 0..=2 {
        let d = round_dir(&run_a, r);
        assert!(
            d.join("checkpoint.safetensors").exists(),
            "round {r} checkpoint"
        );
        for split in ["features-train", "features-test"] {
            let part = d.join(split).join("part-00000-of-00001.parquet");
            TableFile::open(&part, &features::contract(&layout)).unwrap();
        }
        TableFile::open(d.join("cluster_stats.parquet"), &cluster_stats::contract()).unwrap();
        assert!(d.join("eval.json").exists());
        if r > 0 {
            let l = labels::read(&d.join("labels.parquet")).unwrap();
            assert_eq!(l.heads.len(), 2);
            assert_eq!(l.heads[&0].len(), 80);
            train_log::read(&d.join("train_log.parquet")).unwrap();
            assert!(d.join("assign-stats.json").exists());
        }
    }
    let rows = metrics::read(&run_a.join("metrics.parquet")).unwrap();
    for r in 0..=2 {
        assert!(
            rows.iter().any(|m| m.round == r && m.metric == "nmi"),
            "round {r} has nmi"
        );
    }
    assert!(run_a.join("report.html").exists());

    // `make table` prints one line per round, in order, with the best K = 10 head's metrics.
    let table = make("table", &pipeline, &run_a, &[]);
    check(&table, "make table");
    let text = String::from_utf8_lossy(&table.stdout);
    let rounds: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("round head"))
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(rounds, ["0", "1", "2"], "{text}");
    let acc = rows
        .iter()
        .find(|m| m.round == 2 && m.split == "test" && m.head == Some(0) && m.metric == "acc")
        .unwrap()
        .value;
    assert!(
        text.lines().last().unwrap().contains(&format!("{acc:.3}")),
        "{text}"
    );
    TableFile::open(dir.path().join("train.parquet"), &dataset::contract()).unwrap();

    // A second run from scratch gives the same labels, checkpoints, losses and metrics.
    check(
        &make("rounds", &pipeline, &run_b, &["N=2"]),
        "make rounds N=2 (run b)",
    );
    let a = outcome(&run_a);
    assert_eq!(a, outcome(&run_b), "two runs with one seed differ");

    // An interruption in round 2 after its labels were solved: the stages after assign have
    // not run. Rerunning redoes exactly those, with the same result.
    let r2 = round_dir(&run_b, 2);
    for lost in [
        "checkpoint.safetensors",
        "train_log.parquet",
        "cluster_stats.parquet",
        "eval.json",
    ] {
        std::fs::remove_file(r2.join(lost)).unwrap();
    }
    for lost in ["features-train", "features-test"] {
        std::fs::remove_dir_all(r2.join(lost)).unwrap();
    }
    let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let labels_before = modified(&r2.join("labels.parquet"));
    let round1_before = modified(&round_dir(&run_b, 1).join("checkpoint.safetensors"));
    check(
        &make("round", &pipeline, &run_b, &[]),
        "make round after an interruption",
    );
    assert_eq!(a, outcome(&run_b), "the resumed run differs");
    assert_eq!(
        labels_before,
        modified(&r2.join("labels.parquet")),
        "assign was redone"
    );
    assert_eq!(
        round1_before,
        modified(&round_dir(&run_b, 1).join("checkpoint.safetensors"))
    );
    assert!(
        !round_dir(&run_b, 3).exists(),
        "a new round started instead of finishing round 2"
    );
}

/// The headline numbers of `run`'s round 1: head 0's test ACC (the tiny pipeline's only K = 10
/// head) and the config hash stamped with it.
fn round_one(run: &Path) -> (f64, String) {
    let row = metrics::read(&run.join("metrics.parquet"))
        .unwrap()
        .into_iter()
        .find(|m| m.round == 1 && m.split == "test" && m.head == Some(0) && m.metric == "acc")
        .unwrap();
    (row.value, row.config_hash)
}

#[test]
fn another_seed_is_its_own_run_and_runs_compare_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = tiny_pipeline(dir.path(), "tiny");
    let config_seed = dir.path().join("runs/config-seed");
    let seed_12 = dir.path().join("runs/seed-12");
    check(
        &make("round", &pipeline, &config_seed, &[]),
        "make round (the config's seed)",
    );
    check(
        &make("round", &pipeline, &seed_12, &["SEED=12"]),
        "make round SEED=12",
    );

    // The seed reaches every stage: another initial network, other labels, another config hash.
    let (acc_a, hash_a) = round_one(&config_seed);
    let (acc_b, hash_b) = round_one(&seed_12);
    assert_ne!(hash_a, hash_b);
    assert_ne!(
        std::fs::read(round_dir(&config_seed, 0).join("checkpoint.safetensors")).unwrap(),
        std::fs::read(round_dir(&seed_12, 0).join("checkpoint.safetensors")).unwrap()
    );
    assert_ne!(
        labels::read(&round_dir(&config_seed, 1).join("labels.parquet"))
            .unwrap()
            .heads,
        labels::read(&round_dir(&seed_12, 1).join("labels.parquet"))
            .unwrap()
            .heads
    );

    // Without RUN, a seed gets its own run directory beside the config's, and SEEDS names those
    // directories for `make compare`.
    let dry_run = |args: &[&str]| {
        let out = std::process::Command::new("make")
            .arg("-C")
            .arg(common::repo())
            .args(["-n", "--no-print-directory", "CARGO=true"])
            .args(args)
            .arg(format!("PIPELINE={}", pipeline.display()))
            .output()
            .unwrap();
        check(&out, &format!("make -n {args:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plan = dry_run(&["round", "SEED=5"]);
    assert!(
        plan.contains("runs/tiny-seed5/round-000/checkpoint.safetensors")
            && plan.contains("--set pipeline.seed=5"),
        "{plan}"
    );
    let plan = dry_run(&["compare", "SEEDS=5 6"]);
    assert!(
        plan.contains("--compare runs/tiny-seed5 runs/tiny-seed6"),
        "{plan}"
    );

    // `make compare` prints both runs at round 1 with their mean and standard deviation.
    let runs = format!("RUNS={} {}", config_seed.display(), seed_12.display());
    let out = make("compare", &pipeline, &config_seed, &[&runs]);
    check(&out, "make compare");
    let text = String::from_utf8_lossy(&out.stdout);
    let acc_of = |prefix: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line for {prefix}:\n{text}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        cells[cells.len() - 6].parse().unwrap()
    };
    assert!(text.contains("round 1"), "{text}");
    assert_eq!(
        acc_of(&config_seed.display().to_string()),
        (acc_a * 1000.0).round() / 1000.0
    );
    assert_eq!(
        acc_of(&seed_12.display().to_string()),
        (acc_b * 1000.0).round() / 1000.0
    );
    let mean = format!("{:.3}", (acc_a + acc_b) / 2.0);
    assert_eq!(format!("{:.3}", acc_of("mean")), mean, "{text}");
    let sd = format!("{:.3}", (acc_a - acc_b).abs() / 2f64.sqrt());
    assert_eq!(format!("{:.3}", acc_of("sd")), sd, "{text}");
}

#[test]
fn pruned_features_leave_the_run_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = tiny_pipeline(dir.path(), "tiny");
    let pruned = dir.path().join("runs/pruned");
    let kept = dir.path().join("runs/kept");
    for run in [&pruned, &kept] {
        check(&make("rounds", &pipeline, run, &["N=2"]), "make rounds N=2");
    }
    check(&make("prune", &pipeline, &pruned, &[]), "make prune");
    for r in 0..=2 {
        for split in ["features-train", "features-test"] {
            assert_eq!(
                round_dir(&pruned, r).join(split).exists(),
                r == 2,
                "round {r} {split}: only the latest round's features are kept"
            );
        }
    }

    // The next round starts from the latest features and extracts nothing for the pruned rounds.
    check(
        &make("round", &pipeline, &pruned, &[]),
        "make round after prune",
    );
    check(&make("round", &pipeline, &kept, &[]), "make round");
    for r in 0..=1 {
        assert!(!round_dir(&pruned, r).join("features-train").exists());
    }
    let round3 = |run: &Path| {
        let d = round_dir(run, 3);
        (
            labels::read(&d.join("labels.parquet")).unwrap().heads,
            std::fs::read(d.join("checkpoint.safetensors")).unwrap(),
        )
    };
    assert_eq!(round3(&pruned), round3(&kept), "pruning changed round 3");
}

#[test]
fn a_spectral_round_reads_its_labels_off_the_embedding_graph() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = tiny_pipeline(dir.path(), "tiny");
    let mut config = std::fs::read_to_string(&pipeline).unwrap();
    config.push_str("\n[assign]\nspectral = 5\nspectral_from_round = 2\n");
    std::fs::write(&pipeline, config).unwrap();
    let run = dir.path().join("runs/spectral");
    check(
        &make("rounds", &pipeline, &run, &["N=2"]),
        "make rounds N=2",
    );

    let stats = |r: u32| -> labels::AssignStats {
        let text = std::fs::read(round_dir(&run, r).join("assign-stats.json")).unwrap();
        serde_json::from_slice(&text).unwrap()
    };
    // Round 1 solves the heads; round 2 reads every head's labels off the graph.
    let first = stats(1);
    assert!(first.spectral.is_none());
    assert!(first.heads.iter().all(|h| h.path != "spectral"));
    let second = stats(2);
    let graph = second.spectral.as_ref().expect("round 2 is spectral");
    assert_eq!(graph.neighbours, 5);
    assert_eq!(graph.eigenvalues.len(), 10, "the largest head has K = 10");
    for h in &second.heads {
        assert_eq!(h.path, "spectral");
        assert!(h.log_beta.is_empty() && h.churn_fraction.is_none());
        assert!(h.churn_nmi.is_some(), "churn NMI against round 1");
    }
    let read = labels::read(&round_dir(&run, 2).join("labels.parquet")).unwrap();
    for (head, k) in [(0u32, 10u32), (1, 4)] {
        let l = &read.heads[&head].labels;
        assert!(l.iter().all(|&c| c < k));
        let used: std::collections::BTreeSet<_> = l.iter().collect();
        assert_eq!(used.len(), k as usize, "head {head} uses all its clusters");
    }

    // The round trains and evaluates on those labels like any other; the metrics carry no
    // Sinkhorn iteration count for it.
    let rows = metrics::read(&run.join("metrics.parquet")).unwrap();
    let of = |round: u32, name: &str| {
        rows.iter()
            .filter(|m| m.round == round && m.metric == name)
            .count()
    };
    assert_eq!(of(2, "sinkhorn_iterations"), 0);
    assert_eq!(of(1, "sinkhorn_iterations"), 2);
    assert_eq!(of(2, "label_churn_nmi"), 2);
    assert!(of(2, "acc") > 0 && run.join("report.html").is_file());
}
