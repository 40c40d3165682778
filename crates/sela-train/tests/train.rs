//! The training stage end to end on a tiny dataset: round 0, training, resuming an interrupted
//! run bit for bit, continuing into the next round, and the input checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use sela_images::codec::{encode_png, Pixels};
use sela_io::labels::HeadLabels;
use sela_io::{FileMeta, Provenance};
use sela_nn::checkpoint;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: sela_train::Args,
}

const N: u64 = 40;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut w = sela_io::dataset::DatasetWriter::create(
            dir.path().join("train.parquet"),
            &[],
            Provenance::new("test"),
        )
        .unwrap();
        let mut rng = sela_images::Rng::new(1);
        for id in 100..100 + N {
            let p = Pixels {
                width: 8,
                height: 8,
                channels: 1,
                data: (0..64).map(|_| rng.below(256) as u8).collect(),
            };
            w.push(id, &encode_png(&p).unwrap(), None, None).unwrap();
        }
        w.finish().unwrap();
        std::fs::write(
            dir.path().join("p.toml"),
            r#"
[pipeline]
name = "t"
seed = 3
rounds = 3
[data]
train = "train.parquet"
channels = 1
height = 8
width = 8
[model]
widths = [4, 8]
blocks = [1, 1]
heads = [3, 5]
[train]
epochs_per_round = 2
batch_size = 8
lr = 0.05
warmup_epochs = 0.5
"#,
        )
        .unwrap();
        let f = Fixture { dir };
        f.labels("labels.parquet", &[3, 5], N, 0);
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A labels file with `heads` (their K), labelling the first `count` ids.
    fn labels(&self, name: &str, heads: &[u32], count: u64, shift: u32) {
        let mut map = BTreeMap::new();
        for (h, &k) in heads.iter().enumerate() {
            let ids: Vec<u64> = (100..100 + count).collect();
            let labels = ids.iter().map(|&i| (i as u32 * 7 + shift) % k).collect();
            map.insert(
                h as u32,
                HeadLabels {
                    confidence: vec![1.0; ids.len()],
                    ids,
                    labels,
                },
            );
        }
        let meta = FileMeta::new(
            sela_io::labels::TABLE,
            sela_io::labels::VERSION,
            Provenance::new("test"),
        );
        sela_io::labels::write(self.path(name), &map, &meta).unwrap();
    }

    /// Trains round `round` on `labels.parquet` from `init` into `output`, with `sets` as
    /// `--set` overrides.
    fn round(
        &self,
        sets: &[&str],
        round: &str,
        init: &str,
        output: &str,
    ) -> anyhow::Result<sela_train::Summary> {
        let mut argv: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
        argv.extend([
            "--round",
            round,
            "--labels",
            "labels.parquet",
            "--init",
            init,
            "--output",
            output,
        ]);
        self.run(&argv)
    }

    fn run(&self, extra: &[&str]) -> anyhow::Result<sela_train::Summary> {
        let mut argv = vec![
            "sela-train".to_string(),
            "--quiet".into(),
            "--config".into(),
        ];
        argv.push(self.path("p.toml").display().to_string());
        argv.push("--dataset".into());
        argv.push(self.path("train.parquet").display().to_string());
        for a in extra {
            argv.push(if a.ends_with(".safetensors") || a.ends_with(".parquet") {
                self.path(a).display().to_string()
            } else {
                a.to_string()
            });
        }
        sela_train::run(&Cli::parse_from(argv).args)
    }
}

fn log_without_speed(path: &Path) -> Vec<sela_io::train_log::TrainLogRow> {
    let mut rows = sela_io::train_log::read(path).unwrap();
    rows.iter_mut().for_each(|r| r.images_per_sec = 0.0);
    rows
}

#[test]
fn train_resume_and_continue() {
    let f = Fixture::new();
    f.run(&["--round", "0", "--output", "r0.safetensors"])
        .unwrap();
    let common = [
        "--round",
        "1",
        "--labels",
        "labels.parquet",
        "--init",
        "r0.safetensors",
    ];

    // Uninterrupted.
    let a = f
        .run(
            &[
                &common[..],
                &["--output", "a.safetensors", "--log", "a.parquet"],
            ]
            .concat(),
        )
        .unwrap();
    assert_eq!(a.steps, 10);
    assert!(a.final_loss.unwrap().is_finite());
    assert!(!f.path("a.resume.safetensors").exists());

    // Interrupted twice (mid-epoch, then just past an epoch boundary), resumed each time.
    let b_args = [
        &common[..],
        &[
            "--output",
            "b.safetensors",
            "--log",
            "b.parquet",
            "--resume-every",
            "2",
        ],
    ]
    .concat();
    let first = f
        .run(&[&b_args[..], &["--stop-after-steps", "3"]].concat())
        .unwrap();
    assert!(first.interrupted && !f.path("b.safetensors").exists());
    assert!(f.path("b.resume.safetensors").exists());
    let second = f
        .run(&[&b_args[..], &["--resume", "--stop-after-steps", "4"]].concat())
        .unwrap();
    assert!(second.resumed && second.interrupted);
    let done = f.run(&[&b_args[..], &["--resume"]].concat()).unwrap();
    assert!(done.resumed && !done.interrupted);
    assert_eq!(done.steps, 10);
    assert!(!f.path("b.resume.safetensors").exists());
    assert_eq!(
        std::fs::read(f.path("a.safetensors")).unwrap(),
        std::fs::read(f.path("b.safetensors")).unwrap(),
        "resumed checkpoint differs from the uninterrupted one"
    );
    assert_eq!(
        log_without_speed(&f.path("a.parquet")),
        log_without_speed(&f.path("b.parquet"))
    );

    // Round 2 continues the step count, the schedule and the optimiser state.
    f.labels("labels2.parquet", &[3, 5], N, 1);
    f.run(&[
        "--round",
        "2",
        "--labels",
        "labels2.parquet",
        "--init",
        "a.safetensors",
        "--output",
        "c.safetensors",
        "--log",
        "c.parquet",
    ])
    .unwrap();
    let log = sela_io::train_log::read(&f.path("c.parquet")).unwrap();
    assert_eq!(log.first().unwrap().step, 10);
    assert_eq!(log.first().unwrap().epoch, 2);
    assert_eq!(log.len(), 10 * 2);
    let prev = sela_io::train_log::read(&f.path("a.parquet")).unwrap();
    // The cosine decay goes on from where round 1 left it (a restarted schedule would warm up
    // again from peak/3).
    let last = prev.last().unwrap().lr;
    assert!(
        log[0].lr < last && log[0].lr > 0.8 * last,
        "{} after {last}",
        log[0].lr
    );
    let ck = checkpoint::load_any(&f.path("c.safetensors")).unwrap();
    assert_eq!(ck.state.round, 2);
    assert_eq!(ck.state.step, 20);
    assert_eq!(ck.optimizer.unwrap().steps, 20);
}

/// A per-round list sets each round's length and the schedule runs over its sum: one round of
/// three epochs trains exactly as three rounds of one epoch on the same labels.
#[test]
fn per_round_epochs_train_as_rounds_of_one_epoch_on_fixed_labels() {
    let f = Fixture::new();
    f.labels("labels2.parquet", &[3, 5], N, 1);
    f.run(&["--round", "0", "--output", "r0.safetensors"])
        .unwrap();
    let listed = [
        "--set",
        "pipeline.rounds=2",
        "--set",
        "train.epochs_per_round=[1, 3]",
    ];
    let ones = [
        "--set",
        "pipeline.rounds=4",
        "--set",
        "train.epochs_per_round=1",
    ];
    let round = |set: &[&str], r: &str, labels: &str, init: &str, out: &str| {
        let args = [
            "--round", r, "--labels", labels, "--init", init, "--output", out,
        ];
        f.run(&[set, &args[..]].concat()).unwrap()
    };
    round(
        &listed,
        "1",
        "labels.parquet",
        "r0.safetensors",
        "l1.safetensors",
    );
    let long = round(
        &listed,
        "2",
        "labels2.parquet",
        "l1.safetensors",
        "l2.safetensors",
    );
    assert_eq!(long.steps, 20, "one epoch of 5 steps, then three");

    round(
        &ones,
        "1",
        "labels.parquet",
        "r0.safetensors",
        "o1.safetensors",
    );
    for (r, init, out) in [
        ("2", "o1.safetensors", "o2.safetensors"),
        ("3", "o2.safetensors", "o3.safetensors"),
        ("4", "o3.safetensors", "o4.safetensors"),
    ] {
        round(&ones, r, "labels2.parquet", init, out);
    }
    let weights = |name: &str| {
        let ck = checkpoint::load_any(&f.path(name)).unwrap();
        let bits: Vec<Vec<u32>> = ck
            .network
            .params()
            .iter()
            .map(|p| p.data.iter().map(|v| v.to_bits()).collect())
            .collect();
        (bits, ck.state.step, ck.state.epoch)
    };
    assert_eq!(weights("l2.safetensors"), weights("o4.safetensors"));

    let args = [
        "--round",
        "3",
        "--labels",
        "labels2.parquet",
        "--init",
        "l2.safetensors",
        "--output",
        "l3.safetensors",
    ];
    let msg = f
        .run(&[&listed[..], &args[..]].concat())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("round 3 is past the 2 rounds train.epochs_per_round lists"),
        "{msg}"
    );
    assert!(!f.path("l3.safetensors").exists());
}

#[test]
fn heads_move_onto_the_embedding_at_their_round() {
    let f = Fixture::new();
    let switch = [
        "model.embedding_stage=0",
        "model.embedding_grid=2",
        "model.embedding_heads=[1]",
        "model.embedding_heads_from_round=2",
    ];
    let round = |r: &str, init: &str, out: &str| f.round(&switch, r, init, out);
    let sets: Vec<&str> = switch.iter().flat_map(|s| ["--set", s]).collect();
    f.run(&[&sets[..], &["--round", "0", "--output", "r0.safetensors"]].concat())
        .unwrap();
    round("1", "r0.safetensors", "r1.safetensors").unwrap();
    round("2", "r1.safetensors", "r2.safetensors").unwrap();
    round("2", "r1.safetensors", "again.safetensors").unwrap();
    let spec = |name: &str| {
        checkpoint::load_any(&f.path(name))
            .unwrap()
            .network
            .spec()
            .clone()
    };
    assert!(spec("r1.safetensors").embedding_heads.is_empty());
    let moved = spec("r2.safetensors");
    assert_eq!(moved.embedding_heads, vec![1]);
    let head_shape = |name: &str| {
        let ck = checkpoint::load_any(&f.path(name)).unwrap();
        let p = ck.network.params();
        let w = p.iter().find(|p| p.name == "heads.1.weight").unwrap();
        (
            w.shape.clone(),
            w.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        )
    };
    // Stage 0 (4 channels, 8×8) on a 2×2 grid: 16 inputs; the same bits on a second run.
    assert_eq!(head_shape("r2.safetensors").0, vec![5, 16]);
    assert_eq!(
        head_shape("r2.safetensors"),
        head_shape("again.safetensors")
    );
    // Round 3 continues on the embedding; round 1's config cannot resume from it.
    round("3", "r2.safetensors", "r3.safetensors").unwrap();
    assert_eq!(spec("r3.safetensors"), moved);
    let msg = round("1", "r2.safetensors", "back.safetensors").unwrap_err();
    let msg = format!("{msg:#}");
    assert!(msg.contains("reading the embedding"), "{msg}");
    assert!(!f.path("back.safetensors").exists());
}

#[test]
fn bad_inputs_fail_clearly_and_write_nothing() {
    let f = Fixture::new();
    f.run(&["--round", "0", "--output", "r0.safetensors"])
        .unwrap();
    let before: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let attempt = |labels: &str, init: &str, extra: &[&str]| -> String {
        let mut args = vec![
            "--round",
            "1",
            "--labels",
            labels,
            "--output",
            "out/x.safetensors",
            "--log",
            "out/x.parquet",
        ];
        if !init.is_empty() {
            args.extend(["--init", init]);
        }
        args.extend(extra);
        let err = f.run(&args).unwrap_err();
        format!("{err:#}")
    };
    // Labels that miss ids of the dataset.
    f.labels("short.parquet", &[3, 5], N - 1, 0);
    let msg = attempt("short.parquet", "", &[]);
    assert!(
        msg.contains("short.parquet") && msg.contains("no label for dataset id 139"),
        "{msg}"
    );
    // Fewer heads than the config.
    f.labels("onehead.parquet", &[3], N, 0);
    let msg = attempt("onehead.parquet", "", &[]);
    assert!(msg.contains("heads [0]") && msg.contains("[3, 5]"), "{msg}");
    // A label beyond K.
    f.labels("wide.parquet", &[3, 9], N, 0);
    let msg = attempt("wide.parquet", "", &[]);
    assert!(msg.contains("out of range for K = 5"), "{msg}");
    // An init checkpoint made for other heads, or another architecture.
    let msg = attempt(
        "labels.parquet",
        "r0.safetensors",
        &["--set", "model.heads=[3, 6]"],
    );
    assert!(
        msg.contains("r0.safetensors") && msg.contains("heads [3, 5], the config asks for [3, 6]"),
        "{msg}"
    );
    let msg = attempt(
        "labels.parquet",
        "r0.safetensors",
        &["--set", "model.widths=[4, 16]"],
    );
    assert!(msg.contains("widths [4, 8]"), "{msg}");
    std::fs::write(f.path("junk.safetensors"), b"junk").unwrap();
    let msg = attempt("labels.parquet", "junk.safetensors", &[]);
    assert!(msg.contains("junk.safetensors"), "{msg}");
    let after: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".parquet") || before.contains(n))
        .filter(|n| n != "junk.safetensors")
        .collect();
    assert_eq!(before.len(), after.len(), "{after:?}");
    assert!(!f.path("out").exists());
}

#[test]
fn binary_exit_codes() {
    let f = Fixture::new();
    let bin = env!("CARGO_BIN_EXE_sela-train");
    let out = std::process::Command::new(bin)
        .args([
            "--config",
            f.path("p.toml").to_str().unwrap(),
            "--round",
            "1",
            "--quiet",
        ])
        .args(["--output", f.path("x.safetensors").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--labels is required"));
    let out = std::process::Command::new(bin)
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(bin)
        .current_dir(f.dir.path())
        .args([
            "--config",
            "p.toml",
            "--round",
            "0",
            "--output",
            "r0.safetensors",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["round"], 0);
}

#[test]
fn augmentation_stops_at_its_round() {
    let f = Fixture::new();
    f.run(&["--round", "0", "--output", "r0.safetensors"])
        .unwrap();
    let round = |r: &str, init: &str, out: &str, sets: &[&str]| {
        f.round(sets, r, init, out).unwrap();
    };
    let off = ["augment.off_from_round=2"];
    let identity = [
        "augment.crop_scale=[1.0, 1.0]",
        "augment.crop_ratio=[1.0, 1.0]",
        "augment.rotation_deg=0.0",
        "augment.translate=0.0",
        "augment.brightness=0.0",
        "augment.contrast=0.0",
    ];
    round("1", "r0.safetensors", "r1.safetensors", &[]);
    round("1", "r0.safetensors", "r1-off.safetensors", &off);
    round("2", "r1.safetensors", "r2.safetensors", &[]);
    round("2", "r1.safetensors", "r2-off.safetensors", &off);
    round("2", "r1.safetensors", "r2-identity.safetensors", &identity);
    let weights = |name: &str| -> Vec<f32> {
        let ck = checkpoint::load_any(&f.path(name)).unwrap();
        ck.network
            .params()
            .iter()
            .flat_map(|p| p.data.clone())
            .collect()
    };
    let distance = |a: &str, b: &str| {
        let (a, b) = (weights(a), weights(b));
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    // Before its round the switch changes nothing; from it on, training sees the clean images,
    // which an augmentation of strength zero reproduces up to resampling error.
    assert_eq!(weights("r1.safetensors"), weights("r1-off.safetensors"));
    let to_identity = distance("r2-off.safetensors", "r2-identity.safetensors");
    let to_augmented = distance("r2-off.safetensors", "r2.safetensors");
    assert!(
        to_identity * 10.0 < to_augmented,
        "clean vs identity {to_identity}, clean vs augmented {to_augmented}"
    );
}
