//! The bad-input catalogue: every stage binary, run as a real process on a broken input, exits
//! non-zero (1 for a runtime error, 2 for a usage error), says on stderr which file is wrong and
//! what is wrong with it, prints no summary, and leaves every file as it was: no output created
//! or changed (outputs that exist beforehand stay byte-identical), no temporary file left.
//!
//! The inputs are derived from one real round of the tiny pipeline (`make round`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray, UInt64Array,
};
use arrow::datatypes::{Field, Schema};
use common::{check, make, snapshot, snapshot_diff, stage, temp_files, tiny_pipeline};
use sela_io::dataset::{DatasetFile, DatasetWriter};
use sela_io::features::{self, FeaturesInfo, FeaturesLayout, FeaturesWriter};
use sela_io::labels::{self, HeadLabels};
use sela_io::parts::Shard;
use sela_io::table::TableWriter;
use sela_io::{FileMeta, Provenance};

/// Runtime error (a bad file, a bad config).
const RUNTIME: i32 = 1;
/// Usage error (a bad flag value).
const USAGE: i32 = 2;

/// One real round of the tiny pipeline, the source of every case's inputs.
struct Base {
    dir: PathBuf,
    config: PathBuf,
    train: PathBuf,
    run: PathBuf,
    /// A checkpoint of another architecture (`model.widths = [4, 8]`).
    other_architecture: PathBuf,
}

impl Base {
    fn build(dir: &Path) -> Base {
        std::fs::create_dir_all(dir).unwrap();
        let config = tiny_pipeline(dir, "tiny");
        let run = dir.join("run");
        check(&make("round", &config, &run, &[]), "make round");
        let other_config = dir.join("other.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &other_config,
            text.replace("widths = [8, 16]", "widths = [4, 8]"),
        )
        .unwrap();
        let other_architecture = dir.join("other.safetensors");
        let out = stage("sela-extract")
            .arg("--config")
            .arg(&other_config)
            .arg("--init")
            .arg("--checkpoint")
            .arg(&other_architecture)
            .arg("--quiet")
            .output()
            .unwrap();
        check(&out, "sela-extract --init (other architecture)");
        Base {
            dir: dir.to_path_buf(),
            config,
            train: dir.join("train.parquet"),
            run,
            other_architecture,
        }
    }

    fn round(&self, r: u32) -> PathBuf {
        self.run.join(format!("round-{r:03}"))
    }

    /// Round 0's training features (a directory of one part file).
    fn features(&self) -> PathBuf {
        self.round(0).join("features-train")
    }

    fn labels(&self) -> PathBuf {
        self.round(1).join("labels.parquet")
    }

    /// The rows of the training dataset: (id, image bytes, origin, label).
    fn train_rows(&self) -> Vec<Row> {
        let file = DatasetFile::open(&self.train).unwrap();
        let mut rows = Vec::new();
        for batch in file.batches(1024).unwrap() {
            let b = batch.unwrap();
            for i in 0..b.len() {
                rows.push((
                    b.ids().value(i),
                    b.image_bytes(i).to_vec(),
                    b.image_path(i).map(str::to_string),
                    b.label(i),
                ));
            }
        }
        rows
    }

    /// One valid PNG from the training data.
    fn png(&self) -> Vec<u8> {
        self.train_rows().swap_remove(0).1
    }
}

type Row = (u64, Vec<u8>, Option<String>, Option<i64>);

/// What a case runs and what it must print.
struct Expect {
    stage: &'static str,
    args: Vec<String>,
    exit: i32,
    /// Stderr must contain each of these: the file (or flag) and what is wrong.
    stderr: Vec<String>,
}

fn expect(stage: &'static str, args: &[&str], exit: i32, stderr: &[&str]) -> Expect {
    Expect {
        stage,
        args: args.iter().map(|s| s.to_string()).collect(),
        exit,
        stderr: stderr.iter().map(|s| s.to_string()).collect(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn copy(from: &Path, to: &Path) {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::copy(from, to).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        copy(&entry.path(), &to.join(entry.file_name()));
    }
}

fn provenance() -> Provenance {
    Provenance::new("bad-input-test")
}

fn write_dataset(path: &Path, rows: &[Row]) {
    let names: Vec<String> = (0..10).map(|c| format!("class {c}")).collect();
    let mut w = DatasetWriter::create(path, &names, provenance()).unwrap();
    for (id, bytes, origin, label) in rows {
        w.push(*id, bytes, origin.as_deref(), *label).unwrap();
    }
    w.finish().unwrap();
}

/// A file with the `table` metadata of a sela table and arbitrary columns.
fn write_table(path: &Path, table: &str, version: u32, columns: Vec<(&str, ArrayRef)>) {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    let meta = FileMeta::new(table, version, provenance());
    let mut w = TableWriter::create(path, schema, &meta, 1024).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
}

/// Round 0's training features with `edit` applied to (ids, embedding, logits per head), written
/// as `dir/part-00000-of-00001.parquet`.
fn write_features(
    base: &Base,
    dir: &Path,
    edit: impl FnOnce(&mut Vec<u64>, &mut Vec<f32>, &mut Vec<Vec<f32>>),
) -> PathBuf {
    let features::Matrix {
        mut ids,
        values: mut embedding,
        ..
    } = features::read_matrix(&base.features(), "embedding").unwrap();
    let mut logits: Vec<Vec<f32>> = ["logits_0", "logits_1"]
        .iter()
        .map(|c| features::read_matrix(&base.features(), c).unwrap().values)
        .collect();
    let dim = embedding.len() / ids.len();
    let ks: Vec<usize> = logits.iter().map(|l| l.len() / ids.len()).collect();
    edit(&mut ids, &mut embedding, &mut logits);
    let n = ids.len();
    embedding.truncate(n * dim);
    for (l, &k) in logits.iter_mut().zip(&ks) {
        l.truncate(n * k);
    }
    let info = FeaturesInfo {
        layout: FeaturesLayout {
            embedding_dim: dim,
            head_sizes: ks,
            extra_embeddings: Vec::new(),
        },
        dataset: p(&base.train).to_string(),
        dataset_rows: n as u64,
        checkpoint: None,
    };
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("part-00000-of-00001.parquet");
    let mut w =
        FeaturesWriter::create(&path, &info, Shard::new(0, 1).unwrap(), provenance()).unwrap();
    let logits: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
    w.push(&ids, &embedding, &logits).unwrap();
    w.finish().unwrap();
    path
}

/// Round 1's labels with `edit` applied, written to `path`.
fn write_labels(base: &Base, path: &Path, edit: impl FnOnce(&mut BTreeMap<u32, HeadLabels>)) {
    let l = labels::read(&base.labels()).unwrap();
    let mut heads = l.heads;
    edit(&mut heads);
    let meta = l.meta.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    labels::write(path, &heads, &meta).unwrap();
}

/// The first half of a file's bytes.
fn truncate(from: &Path, to: &Path) {
    let bytes = std::fs::read(from).unwrap();
    std::fs::write(to, &bytes[..bytes.len() / 2]).unwrap();
}

/// An IDX image file of `n` images of 4×4 (magic `magic`), holding `have` images' bytes.
fn idx_images(path: &Path, magic: u32, n: u32, have: usize) {
    let mut b = Vec::new();
    for v in [magic, n, 4, 4] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend((0..have * 16).map(|i| (i * 7 % 256) as u8));
    std::fs::write(path, b).unwrap();
}

/// An IDX label file of `n` labels.
fn idx_labels(path: &Path, n: u32) {
    let mut b = Vec::new();
    for v in [0x0801, n] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend((0..n).map(|i| (i % 10) as u8));
    std::fs::write(path, b).unwrap();
}

/// A stage's common flags: the case's config, round 1, quiet.
fn pipeline_args(config: &Path) -> Vec<String> {
    vec![
        "--config".into(),
        p(config).into(),
        "--round".into(),
        "1".into(),
        "--quiet".into(),
    ]
}

fn with(mut e: Expect, extra: Vec<String>) -> Expect {
    e.args.extend(extra);
    e
}

// ---- the cases ---------------------------------------------------------------------------------

type Case = (&'static str, fn(&Base, &Path) -> Expect);

const CASES: &[Case] = &[
    // sela-ingest
    ("ingest: IDX file missing", |_, d| {
        let images = d.join("train-images-idx3-ubyte");
        let out = d.join("out.parquet");
        expect(
            "sela-ingest",
            &["idx", "--images", p(&images), "--output", p(&out)],
            RUNTIME,
            &[p(&images), "No such file"],
        )
    }),
    ("ingest: IDX with the wrong magic number", |_, d| {
        let images = d.join("train-images-idx3-ubyte");
        idx_images(&images, 0x0801, 3, 3);
        let out = d.join("out.parquet");
        expect(
            "sela-ingest",
            &["idx", "--images", p(&images), "--output", p(&out)],
            RUNTIME,
            &[p(&images), "magic number 0x00000801"],
        )
    }),
    ("ingest: IDX image and label counts differ", |_, d| {
        let images = d.join("train-images-idx3-ubyte");
        let labels = d.join("train-labels-idx1-ubyte");
        idx_images(&images, 0x0803, 5, 5);
        idx_labels(&labels, 4);
        let out = d.join("out.parquet");
        expect(
            "sela-ingest",
            &[
                "idx",
                "--images",
                p(&images),
                "--labels",
                p(&labels),
                "--output",
                p(&out),
            ],
            RUNTIME,
            &[p(&labels), "4 labels", p(&images), "5 images"],
        )
    }),
    ("ingest: IDX shorter than its header says", |_, d| {
        let images = d.join("train-images-idx3-ubyte");
        idx_images(&images, 0x0803, 5, 4);
        let out = d.join("out.parquet");
        expect(
            "sela-ingest",
            &["idx", "--images", p(&images), "--output", p(&out)],
            RUNTIME,
            &[p(&images), "truncated"],
        )
    }),
    ("ingest: corrupt PNG in an image folder", |base, d| {
        let root = d.join("images");
        std::fs::create_dir_all(root.join("cat")).unwrap();
        std::fs::write(root.join("cat/0.png"), base.png()).unwrap();
        let bad = root.join("cat/1.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let out = d.join("out.parquet");
        expect(
            "sela-ingest",
            &["image-folder", "--root", p(&root), "--output", p(&out)],
            RUNTIME,
            &[p(&bad), "not a decodable PNG/JPEG image"],
        )
    }),
    ("ingest: corrupt PNG inside a Parquet dataset", |base, d| {
        let input = d.join("hf.parquet");
        let mut rows = base.train_rows();
        rows[2].1 = b"garbage".to_vec();
        write_dataset(&input, &rows);
        let out = d.join("out.parquet");
        expect(
            "sela-ingest",
            &["hf-parquet", "--input", p(&input), "--output", p(&out)],
            RUNTIME,
            &[
                p(&input),
                "row 2",
                "column `image`",
                "not a decodable PNG/JPEG image",
            ],
        )
    }),
    ("ingest: input is not a Parquet file", |_, d| {
        let input = d.join("hf.parquet");
        std::fs::write(&input, "id,image\n1,abc\n").unwrap();
        let out = d.join("out.parquet");
        expect(
            "sela-ingest",
            &["hf-parquet", "--input", p(&input), "--output", p(&out)],
            RUNTIME,
            &[p(&input), "not a readable Parquet file"],
        )
    }),
    ("ingest: output directory is not a directory", |_, d| {
        let images = d.join("train-images-idx3-ubyte");
        idx_images(&images, 0x0803, 3, 3);
        let blocker = d.join("data");
        std::fs::write(&blocker, "a file where the output directory should be").unwrap();
        let out = blocker.join("out.parquet");
        expect(
            "sela-ingest",
            &["idx", "--images", p(&images), "--output", p(&out)],
            RUNTIME,
            &[p(&blocker), "Not a directory"],
        )
    }),
    // sela-extract
    ("extract: dataset missing", |base, d| {
        let dataset = d.join("missing.parquet");
        extract(base, d, &dataset, &[p(&dataset), "No such file"])
    }),
    ("extract: truncated dataset Parquet", |base, d| {
        let dataset = d.join("train.parquet");
        truncate(&base.train, &dataset);
        extract(
            base,
            d,
            &dataset,
            &[p(&dataset), "not a readable Parquet file"],
        )
    }),
    ("extract: corrupt PNG inside the dataset", |base, d| {
        let dataset = d.join("train.parquet");
        let mut rows = base.train_rows();
        rows[3].1.truncate(20);
        let id = rows[3].0;
        write_dataset(&dataset, &rows);
        // A complete earlier extraction is in place and must survive.
        copy_dir(&base.features(), &d.join("features"));
        let row = "row 3".to_string();
        let id = format!("id {id}");
        extract(
            base,
            d,
            &dataset,
            &[p(&dataset), &row, &id, "cannot decode image"],
        )
    }),
    ("extract: empty dataset", |base, d| {
        let dataset = d.join("train.parquet");
        write_dataset(&dataset, &[]);
        extract(base, d, &dataset, &[p(&dataset), "no rows"])
    }),
    ("extract: dataset column of the wrong type", |base, d| {
        let dataset = d.join("train.parquet");
        let rows = base.train_rows();
        let image = StructArray::new(
            sela_io::contract::image_fields(),
            vec![
                Arc::new(BinaryArray::from_iter_values(
                    rows.iter().map(|r| r.1.clone()),
                )),
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2.clone()))),
            ],
            None,
        );
        write_table(
            &dataset,
            "dataset",
            1,
            vec![
                (
                    "id",
                    Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.0))),
                ),
                ("image", Arc::new(image)),
                (
                    "label",
                    Arc::new(StringArray::from_iter_values(
                        rows.iter().map(|r| format!("{:?}", r.3)),
                    )),
                ),
            ],
        );
        extract(base, d, &dataset, &[p(&dataset), "column `label`", "Utf8"])
    }),
    ("extract: dataset without its image column", |base, d| {
        let dataset = d.join("train.parquet");
        let rows = base.train_rows();
        write_table(
            &dataset,
            "dataset",
            1,
            vec![
                (
                    "id",
                    Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.0))),
                ),
                (
                    "label",
                    Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.3))),
                ),
            ],
        );
        extract(base, d, &dataset, &[p(&dataset), "missing column `image`"])
    }),
    ("extract: checkpoint of another architecture", |base, d| {
        let checkpoint = d.join("checkpoint.safetensors");
        copy(&base.other_architecture, &checkpoint);
        let out = d.join("features");
        with(
            expect(
                "sela-extract",
                &[],
                RUNTIME,
                &[p(&checkpoint), "checkpoint was made for"],
            ),
            [
                pipeline_args(&base.config),
                args(&["--checkpoint", p(&checkpoint), "--dataset", p(&base.train)]),
                args(&["--output", p(&out)]),
            ]
            .concat(),
        )
    }),
    (
        "extract: config has more heads than the checkpoint",
        |base, d| {
            let checkpoint = d.join("checkpoint.safetensors");
            copy(&base.round(0).join("checkpoint.safetensors"), &checkpoint);
            let out = d.join("features");
            with(
                expect(
                    "sela-extract",
                    &[],
                    RUNTIME,
                    &[p(&checkpoint), "heads [10, 4]", "[10, 4, 3]"],
                ),
                [
                    pipeline_args(&base.config),
                    args(&[
                        "--set",
                        "model.heads=[10, 4, 3]",
                        "--checkpoint",
                        p(&checkpoint),
                    ]),
                    args(&["--dataset", p(&base.train), "--output", p(&out)]),
                ]
                .concat(),
            )
        },
    ),
    ("extract: pipeline config with an unknown key", |base, d| {
        let config = d.join("bad.toml");
        let text = std::fs::read_to_string(&base.config).unwrap();
        std::fs::write(&config, text.replace("epochs_per_round = 1", "epochs = 1")).unwrap();
        let out = d.join("features");
        with(
            expect(
                "sela-extract",
                &[],
                RUNTIME,
                &[p(&config), "unknown field `epochs`"],
            ),
            [
                pipeline_args(&config),
                args(&[
                    "--checkpoint",
                    p(&base.round(0).join("checkpoint.safetensors")),
                ]),
                args(&["--dataset", p(&base.train), "--output", p(&out)]),
            ]
            .concat(),
        )
    }),
    (
        "extract: pipeline config with a value of the wrong type",
        |base, d| {
            let config = d.join("bad.toml");
            let text = std::fs::read_to_string(&base.config).unwrap();
            std::fs::write(&config, text.replace("seed = 11", "seed = \"eleven\"")).unwrap();
            let out = d.join("features");
            with(
                expect(
                    "sela-extract",
                    &[],
                    RUNTIME,
                    &[p(&config), "invalid type", "seed"],
                ),
                [
                    pipeline_args(&config),
                    args(&[
                        "--checkpoint",
                        p(&base.round(0).join("checkpoint.safetensors")),
                    ]),
                    args(&["--dataset", p(&base.train), "--output", p(&out)]),
                ]
                .concat(),
            )
        },
    ),
    ("extract: shard index out of range", |base, d| {
        let out = d.join("features");
        with(
            expect("sela-extract", &[], USAGE, &["shard index 2", "2 shards"]),
            [
                pipeline_args(&base.config),
                args(&[
                    "--checkpoint",
                    p(&base.round(0).join("checkpoint.safetensors")),
                ]),
                args(&["--dataset", p(&base.train), "--output", p(&out)]),
                args(&["--shard", "2", "--num-shards", "2"]),
            ]
            .concat(),
        )
    }),
    // sela-assign
    ("assign: NaN logits", |base, d| {
        let logits = write_features(base, &d.join("features"), |_, _, l| {
            l[0][3 * 10 + 2] = f32::NAN
        });
        assign(
            base,
            d,
            &d.join("features"),
            &[],
            &[p(&logits), "column `logits_0`", "row 3", "NaN"],
        )
    }),
    ("assign: infinite logits", |base, d| {
        let logits = write_features(base, &d.join("features"), |_, _, l| {
            l[1][7 * 4] = f32::INFINITY
        });
        assign(
            base,
            d,
            &d.join("features"),
            &[],
            &[p(&logits), "column `logits_1`", "row 7", "inf"],
        )
    }),
    ("assign: fewer rows than clusters", |base, d| {
        write_features(base, &d.join("features"), |ids, _, _| ids.truncate(6));
        let dir = d.join("features");
        assign(
            base,
            d,
            &dir,
            &[],
            &[
                p(&dir),
                "column `logits_0`",
                "N = 6 rows is fewer than K = 10 clusters",
            ],
        )
    }),
    ("assign: λ = 0 on the command line", |base, d| {
        let mut e = assign(
            base,
            d,
            &base.features(),
            &["--lambda", "0"],
            &["--lambda", "positive"],
        );
        e.exit = USAGE;
        e
    }),
    ("assign: λ < 0 in the pipeline config", |base, d| {
        let config = d.join("bad.toml");
        let text = std::fs::read_to_string(&base.config).unwrap();
        std::fs::write(
            &config,
            text.replace("[train]", "[assign]\nlambda = -5.0\n\n[train]"),
        )
        .unwrap();
        let out = d.join("labels.parquet");
        with(
            expect(
                "sela-assign",
                &[],
                RUNTIME,
                &[p(&config), "assign.lambda must be positive"],
            ),
            [
                pipeline_args(&config),
                args(&["--logits", p(&base.features()), "--output", p(&out)]),
            ]
            .concat(),
        )
    }),
    ("assign: incomplete set of shards", |base, d| {
        let dir = d.join("features");
        let part = base.features().join("part-00000-of-00001.parquet");
        copy(&part, &dir.join("part-00000-of-00003.parquet"));
        copy(&part, &dir.join("part-00002-of-00003.parquet"));
        assign(
            base,
            d,
            &dir,
            &[],
            &[p(&dir), "missing part-00001-of-00003.parquet"],
        )
    }),
    (
        "assign: warm start from statistics with another K",
        |base, d| {
            let stats = d.join("previous-stats.json");
            let mut json: serde_json::Value = serde_json::from_slice(
                &std::fs::read(base.round(1).join("assign-stats.json")).unwrap(),
            )
            .unwrap();
            json["heads"][0]["k"] = 12.into();
            json["heads"][0]["log_beta"] = serde_json::Value::Array(vec![0.0.into(); 12]);
            std::fs::write(&stats, serde_json::to_vec(&json).unwrap()).unwrap();
            assign(
                base,
                d,
                &base.features(),
                &["--warm-start", p(&stats)],
                &[p(&stats), "K = 12", "K = 10"],
            )
        },
    ),
    ("assign: logits column of the wrong type", |base, d| {
        let logits = d.join("mine.parquet");
        write_table(
            &logits,
            "features",
            1,
            vec![
                ("id", Arc::new(UInt64Array::from_iter_values(0..20))),
                (
                    "z",
                    Arc::new(StringArray::from_iter_values(
                        (0..20).map(|i| i.to_string()),
                    )),
                ),
            ],
        );
        assign(
            base,
            d,
            &logits,
            &["--column", "z"],
            &[p(&logits), "column `z`", "Utf8"],
        )
    }),
    ("assign: logits column missing", |base, d| {
        let part = base.features().join("part-00000-of-00001.parquet");
        assign(
            base,
            d,
            &base.features(),
            &["--column", "z"],
            &[p(&part), "missing column `z`", "logits_0"],
        )
    }),
    ("assign: previous labels with a duplicate id", |base, d| {
        let previous = d.join("previous.parquet");
        write_labels(base, &previous, |h| {
            let head = h.get_mut(&0).unwrap();
            head.ids[5] = head.ids[4];
        });
        assign(
            base,
            d,
            &base.features(),
            &["--previous", p(&previous)],
            &[p(&previous), "labelled more than once"],
        )
    }),
    ("assign: output directory is not a directory", |base, d| {
        let blocker = d.join("round-001");
        std::fs::write(&blocker, "a file where the output directory should be").unwrap();
        let out = blocker.join("labels.parquet");
        with(
            expect(
                "sela-assign",
                &[],
                RUNTIME,
                &[p(&blocker), "cannot create the output directory"],
            ),
            [
                pipeline_args(&base.config),
                args(&["--logits", p(&base.features()), "--output", p(&out)]),
            ]
            .concat(),
        )
    }),
    // sela-train
    ("train: labels missing an id of the dataset", |base, d| {
        let labels = d.join("labels.parquet");
        let mut gone = 0;
        write_labels(base, &labels, |h| {
            for head in h.values_mut() {
                gone = head.ids.remove(10);
                head.labels.remove(10);
                head.confidence.remove(10);
            }
        });
        let msg = format!("no label for dataset id {gone}");
        train(base, d, &labels, &[], &[p(&labels), &msg])
    }),
    ("train: labels with an id not in the dataset", |base, d| {
        let labels = d.join("labels.parquet");
        write_labels(base, &labels, |h| {
            for head in h.values_mut() {
                head.ids.push(999_999);
                head.labels.push(0);
                head.confidence.push(1.0);
            }
        });
        train(
            base,
            d,
            &labels,
            &[],
            &[p(&labels), "999999", "not in the dataset"],
        )
    }),
    ("train: labels with a duplicate id", |base, d| {
        let labels = d.join("labels.parquet");
        write_labels(base, &labels, |h| {
            let head = h.get_mut(&1).unwrap();
            head.ids[11] = head.ids[10];
        });
        train(
            base,
            d,
            &labels,
            &[],
            &[p(&labels), "labelled more than once for head 1"],
        )
    }),
    (
        "train: labels solved for another K than the config's",
        |base, d| {
            let labels = d.join("labels.parquet");
            copy(&base.labels(), &labels);
            train(
                base,
                d,
                &labels,
                &["--set", "model.heads=[10, 5]"],
                &[p(&labels), "K = 4", "K = 5"],
            )
        },
    ),
    (
        "train: labels for fewer heads than the config's",
        |base, d| {
            let labels = d.join("labels.parquet");
            copy(&base.labels(), &labels);
            train(
                base,
                d,
                &labels,
                &["--set", "model.heads=[10, 4, 3]"],
                &[p(&labels), "heads [0, 1]", "[0, 1, 2]"],
            )
        },
    ),
    ("train: label out of range for its head", |base, d| {
        let labels = d.join("labels.parquet");
        write_labels(base, &labels, |h| h.get_mut(&1).unwrap().labels[0] = 7);
        train(
            base,
            d,
            &labels,
            &[],
            &[p(&labels), "column `label`", "out of range for K = 4"],
        )
    }),
    ("train: labels file is not Parquet", |base, d| {
        let labels = d.join("labels.parquet");
        std::fs::write(&labels, "id,head,label\n").unwrap();
        train(
            base,
            d,
            &labels,
            &[],
            &[p(&labels), "not a readable Parquet file"],
        )
    }),
    (
        "train: starting checkpoint of another architecture",
        |base, d| {
            let labels = d.join("labels.parquet");
            copy(&base.labels(), &labels);
            let init = d.join("init.safetensors");
            copy(&base.other_architecture, &init);
            train(
                base,
                d,
                &labels,
                &["--init", p(&init)],
                &[p(&init), "checkpoint was made for"],
            )
        },
    ),
    ("train: truncated starting checkpoint", |base, d| {
        let labels = d.join("labels.parquet");
        copy(&base.labels(), &labels);
        let init = d.join("init.safetensors");
        truncate(&base.round(0).join("checkpoint.safetensors"), &init);
        train(
            base,
            d,
            &labels,
            &["--init", p(&init)],
            &[p(&init), "safetensors"],
        )
    }),
    ("train: corrupt PNG inside the dataset", |base, d| {
        let labels = d.join("labels.parquet");
        copy(&base.labels(), &labels);
        let dataset = d.join("train.parquet");
        let mut rows = base.train_rows();
        rows[5].1 = rows[5].1[..30].to_vec();
        write_dataset(&dataset, &rows);
        train(
            base,
            d,
            &labels,
            &["--dataset", p(&dataset)],
            &[p(&dataset), "row 5", "cannot decode image"],
        )
    }),
    ("train: empty dataset", |base, d| {
        let labels = d.join("labels.parquet");
        copy(&base.labels(), &labels);
        let dataset = d.join("train.parquet");
        write_dataset(&dataset, &[]);
        train(
            base,
            d,
            &labels,
            &["--dataset", p(&dataset)],
            &[p(&dataset), "no rows"],
        )
    }),
    // sela-eval
    ("eval: incomplete set of feature shards", |base, d| {
        let dir = d.join("features-train");
        let part = base.features().join("part-00000-of-00001.parquet");
        copy(&part, &dir.join("part-00001-of-00002.parquet"));
        eval(
            base,
            d,
            &dir,
            &[],
            &[p(&dir), "missing part-00000-of-00002.parquet"],
        )
    }),
    (
        "eval: features with another K than the config's",
        |base, d| {
            eval(
                base,
                d,
                &base.features(),
                &["--set", "model.heads=[10, 5]"],
                &[p(&base.features()), "[10, 4]", "[10, 5]"],
            )
        },
    ),
    (
        "eval: labels for a head the config does not have",
        |base, d| {
            let labels = d.join("labels.parquet");
            write_labels(base, &labels, |h| {
                let head = h[&1].clone();
                h.insert(2, head);
            });
            eval(
                base,
                d,
                &base.features(),
                &["--labels", p(&labels)],
                &[p(&labels), "column `head`", "head 2"],
            )
        },
    ),
    ("eval: metrics history that is not Parquet", |base, d| {
        let metrics = d.join("metrics.parquet");
        std::fs::write(&metrics, "round,metric,value\n").unwrap();
        eval(
            base,
            d,
            &base.features(),
            &[],
            &[p(&metrics), "not a readable Parquet file"],
        )
    }),
    ("eval: truncated features", |base, d| {
        let dir = d.join("features-train");
        std::fs::create_dir_all(&dir).unwrap();
        let part = dir.join("part-00000-of-00001.parquet");
        truncate(&base.features().join("part-00000-of-00001.parquet"), &part);
        eval(
            base,
            d,
            &dir,
            &[],
            &[p(&part), "not a readable Parquet file"],
        )
    }),
    ("eval: output directory missing", |base, d| {
        let missing = d.join("round-009");
        let mut e = eval(
            base,
            d,
            &base.features(),
            &[],
            &[p(&missing), "does not exist"],
        );
        let i = e.args.iter().position(|a| a == "--cluster-stats").unwrap();
        e.args[i + 1] = p(&missing.join("cluster_stats.parquet")).to_string();
        e
    }),
    // sela-report
    ("report: run without a metrics history", |base, d| {
        let run = d.join("run");
        std::fs::create_dir_all(run.join("round-000")).unwrap();
        copy(&base.run.join("report.html"), &run.join("report.html"));
        report(base, &run, &[p(&run.join("metrics.parquet")), "no metrics"])
    }),
    ("report: truncated metrics history", |base, d| {
        let run = d.join("run");
        std::fs::create_dir_all(&run).unwrap();
        copy(&base.run.join("report.html"), &run.join("report.html"));
        truncate(
            &base.run.join("metrics.parquet"),
            &run.join("metrics.parquet"),
        );
        report(
            base,
            &run,
            &[
                p(&run.join("metrics.parquet")),
                "not a readable Parquet file",
            ],
        )
    }),
];

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `sela-extract` of round 1's model over `dataset` into `d/features`.
fn extract(base: &Base, d: &Path, dataset: &Path, stderr: &[&str]) -> Expect {
    let out = d.join("features");
    with(
        expect("sela-extract", &[], RUNTIME, stderr),
        [
            pipeline_args(&base.config),
            args(&[
                "--checkpoint",
                p(&base.round(1).join("checkpoint.safetensors")),
            ]),
            args(&["--dataset", p(dataset), "--output", p(&out)]),
        ]
        .concat(),
    )
}

/// `sela-assign` of round 1 on `logits`, into `d/round-001/` where last round's outputs
/// already are (and must stay).
fn assign(base: &Base, d: &Path, logits: &Path, extra: &[&str], stderr: &[&str]) -> Expect {
    let out = d.join("round-001");
    copy(&base.labels(), &out.join("labels.parquet"));
    copy(
        &base.round(1).join("assign-stats.json"),
        &out.join("assign-stats.json"),
    );
    with(
        expect("sela-assign", &[], RUNTIME, stderr),
        [
            pipeline_args(&base.config),
            args(&[
                "--logits",
                p(logits),
                "--output",
                p(&out.join("labels.parquet")),
            ]),
            args(&["--stats", p(&out.join("assign-stats.json"))]),
            args(extra),
        ]
        .concat(),
    )
}

/// `sela-train` of round 1 against `labels`, into `d/round-001/` where an earlier checkpoint and
/// log already are (and must stay). It starts from round 0's checkpoint unless `extra` names
/// another or changes the heads (which that checkpoint could not serve).
fn train(base: &Base, d: &Path, labels: &Path, extra: &[&str], stderr: &[&str]) -> Expect {
    let out = d.join("round-001");
    copy(
        &base.round(1).join("checkpoint.safetensors"),
        &out.join("checkpoint.safetensors"),
    );
    copy(
        &base.round(1).join("train_log.parquet"),
        &out.join("train_log.parquet"),
    );
    let init = base.round(0).join("checkpoint.safetensors");
    let mut a = pipeline_args(&base.config);
    if !extra
        .iter()
        .any(|x| *x == "--init" || x.starts_with("model.heads"))
    {
        a.extend(args(&["--init", p(&init)]));
    }
    with(
        expect("sela-train", &[], RUNTIME, stderr),
        [
            a,
            args(&["--labels", p(labels)]),
            args(&["--output", p(&out.join("checkpoint.safetensors"))]),
            args(&["--log", p(&out.join("train_log.parquet")), "--resume"]),
            args(extra),
        ]
        .concat(),
    )
}

/// `sela-eval` of round 0's training features, appending to `d/metrics.parquet` (a copy of the
/// run's history unless the case wrote its own).
fn eval(base: &Base, d: &Path, features: &Path, extra: &[&str], stderr: &[&str]) -> Expect {
    let metrics = d.join("metrics.parquet");
    if !metrics.exists() {
        copy(&base.run.join("metrics.parquet"), &metrics);
    }
    let stats = d.join("cluster_stats.parquet");
    copy(&base.round(0).join("cluster_stats.parquet"), &stats);
    with(
        expect("sela-eval", &[], RUNTIME, stderr),
        [
            pipeline_args(&base.config),
            args(&["--features-train", p(features), "--metrics", p(&metrics)]),
            args(&["--cluster-stats", p(&stats)]),
            args(extra),
        ]
        .concat(),
    )
}

/// `sela-report` of `run` into `run/report.html`.
fn report(base: &Base, run: &Path, stderr: &[&str]) -> Expect {
    with(
        expect("sela-report", &[], RUNTIME, stderr),
        [
            pipeline_args(&base.config),
            args(&["--run-dir", p(run), "--output", p(&run.join("report.html"))]),
        ]
        .concat(),
    )
}

#[test]
fn every_bad_input_fails_cleanly() {
    assert!(CASES.len() >= 20);
    let dir = tempfile::tempdir().unwrap();
    let base = Base::build(&dir.path().join("base"));
    let base_before = snapshot(&base.dir);
    let mut failures = Vec::new();
    for (i, (name, setup)) in CASES.iter().enumerate() {
        let case_dir = dir.path().join(format!("case-{i:02}"));
        std::fs::create_dir_all(&case_dir).unwrap();
        let e = setup(&base, &case_dir);
        let before = snapshot(&case_dir);
        let out = stage(e.stage)
            .args(&e.args)
            .current_dir(&case_dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut problems = Vec::new();
        if out.status.code() != Some(e.exit) {
            problems.push(format!(
                "exit status {:?}, expected {}",
                out.status.code(),
                e.exit
            ));
        }
        for want in &e.stderr {
            if !stderr.contains(want.as_str()) {
                problems.push(format!("stderr lacks `{want}`"));
            }
        }
        if !out.stdout.is_empty() {
            problems.push(format!(
                "printed a summary: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        problems.extend(snapshot_diff(&before, &snapshot(&case_dir)));
        problems.extend(
            temp_files(&case_dir)
                .iter()
                .map(|t| format!("left {}", t.display())),
        );
        if !problems.is_empty() {
            failures.push(format!(
                "{name}: {}\n    {} {}\n    stderr: {}",
                problems.join("; "),
                e.stage,
                e.args.join(" "),
                stderr.trim()
            ));
        }
    }
    let base_changes = snapshot_diff(&base_before, &snapshot(&base.dir));
    assert!(
        base_changes.is_empty(),
        "the shared inputs changed: {base_changes:?}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} bad-input cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}
