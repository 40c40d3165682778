//! Fuzzing the table readers: valid files written by sela-io's own writers are corrupted (bit
//! flips and overwrites anywhere, most of them in the footer, truncation, splices, other tables'
//! bytes) or given garbage metadata, then read with the real readers. Each must answer `Ok` or an
//! `IoError` naming the file: never a panic, a hang or an allocation out of proportion to the
//! file.
//!
//! Cases run from a fixed seed; `PROPTEST_RNG_SEED=<n>` and `PROPTEST_CASES=<n>` explore further.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow::array::{
    ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray, UInt64Array,
};
use parquet::file::metadata::{
    ColumnChunkMetaData, ParquetMetaDataReader, ParquetMetaDataWriter, RowGroupMetaData,
};
use proptest::prelude::*;
use sela_io::contract::image_fields;
use sela_io::dataset::{self, DatasetFile, DatasetWriter};
use sela_io::features::{self, vector_array, FeaturesInfo, FeaturesLayout, FeaturesWriter};
use sela_io::labels::{self, HeadLabels};
use sela_io::meta::KEY_PROVENANCE;
use sela_io::metrics::{self, MetricRow};
use sela_io::parts::{Shard, KEY_SHARD};
use sela_io::table::TableWriter;
use sela_io::train_log::{self, TrainLogRow};
use sela_io::{cluster_stats, prior, FileMeta, IoError, Provenance};

#[global_allocator]
static ALLOC: sela_fuzz::PeakAlloc = sela_fuzz::PeakAlloc;

/// Largest single allocation a reader may make for these (a few KiB) files.
const ALLOC_LIMIT: usize = 64 << 20;

/// Runs `f` on its own thread under [`sela_fuzz::guarded`]'s limits and [`ALLOC_LIMIT`].
fn guarded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    sela_fuzz::guarded(what, ALLOC_LIMIT, f)
}

fn config(cases: u32) -> ProptestConfig {
    sela_fuzz::config(cases, 0x0005_e1a7_ab1e)
}

// ---------------------------------------------------------------------------------------------
// Valid files, written once by sela-io's writers.

/// The tables fuzzed, each with a valid file to start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    /// Written by `DatasetWriter`: one row group.
    Dataset,
    /// The dataset contract through `TableWriter` with two rows per group: several row groups.
    DatasetGroups,
    /// Part 1 of 2 of a features set (`FeaturesWriter`); part 0 stays valid beside it.
    FeaturesPart,
    Labels,
    Metrics,
    Prior,
    TrainLog,
    ClusterStats,
}

const TABLES: [Table; 8] = [
    Table::Dataset,
    Table::DatasetGroups,
    Table::FeaturesPart,
    Table::Labels,
    Table::Metrics,
    Table::Prior,
    Table::TrainLog,
    Table::ClusterStats,
];

fn table() -> impl Strategy<Value = Table> {
    proptest::sample::select(TABLES.to_vec())
}

fn provenance() -> Provenance {
    Provenance::new("fuzz").round(Some(1)).input("in.parquet")
}

fn layout() -> FeaturesLayout {
    FeaturesLayout {
        embedding_dim: 3,
        head_sizes: vec![2, 4],
        extra_embeddings: Vec::new(),
    }
}

fn features_info() -> FeaturesInfo {
    FeaturesInfo {
        layout: layout(),
        dataset: "d.parquet".into(),
        dataset_rows: 7,
        checkpoint: Some("c.safetensors".into()),
    }
}

/// Writes features part `index` of 2 of ids 0..7 (`id % 2 == index`).
fn write_features_part(dir: &Path, index: usize) -> PathBuf {
    let shard = Shard::new(index, 2).unwrap();
    let ids: Vec<u64> = (0..7).filter(|&id| shard.contains(id)).collect();
    let path = dir.join(shard.file_name());
    let mut w = FeaturesWriter::create(&path, &features_info(), shard, provenance()).unwrap();
    let n = ids.len();
    let emb: Vec<f32> = (0..n * 3).map(|i| i as f32 * 0.25).collect();
    let l0: Vec<f32> = (0..n * 2).map(|i| i as f32 - 3.0).collect();
    let l1: Vec<f32> = (0..n * 4).map(|i| (i as f32).sin()).collect();
    w.push(&ids[..2], &emb[..6], &[&l0[..4], &l1[..8]]).unwrap();
    w.push(&ids[2..], &emb[6..], &[&l0[4..], &l1[8..]]).unwrap();
    w.finish().unwrap()
}

fn dataset_batch(ids: &[u64]) -> RecordBatch {
    let image = StructArray::new(
        image_fields(),
        vec![
            Arc::new(BinaryArray::from_iter_values(
                ids.iter().map(|&i| vec![i as u8; 3 + i as usize]),
            )) as ArrayRef,
            Arc::new(StringArray::from_iter(
                ids.iter()
                    .map(|&i| (i % 2 == 0).then(|| format!("img{i}.png"))),
            )),
        ],
        None,
    );
    RecordBatch::try_new(
        Arc::new(dataset::contract().schema()),
        vec![
            Arc::new(UInt64Array::from(ids.to_vec())),
            Arc::new(image),
            Arc::new(Int64Array::from_iter(
                ids.iter().map(|&i| (i != 3).then_some(i as i64 % 3)),
            )),
        ],
    )
    .unwrap()
}

fn write_table(dir: &Path, table: Table) -> PathBuf {
    let path = dir.join(format!("{table:?}.parquet"));
    let meta = |name: &str, version: u32| FileMeta::new(name, version, provenance());
    match table {
        Table::Dataset => {
            let names = ["zero", "one", "two"].map(String::from);
            let mut w = DatasetWriter::create(&path, &names, provenance()).unwrap();
            for id in 0..6u64 {
                let bytes = vec![id as u8; 5 + id as usize];
                let origin = format!("raw/{id}.png");
                let label = (id != 2).then_some(id as i64 % 3);
                w.push(id, &bytes, (id % 2 == 1).then_some(&origin), label)
                    .unwrap();
            }
            w.finish().unwrap()
        }
        Table::DatasetGroups => {
            let meta = dataset::file_meta(&["a".into(), "b".into()], provenance());
            let schema = Arc::new(dataset::contract().schema());
            let mut w = TableWriter::create(&path, schema, &meta, 2).unwrap();
            w.write(&dataset_batch(&[0, 1, 2])).unwrap();
            w.write(&dataset_batch(&[3, 4, 5, 6])).unwrap();
            w.finish().unwrap()
        }
        Table::FeaturesPart => {
            write_features_part(dir, 0);
            write_features_part(dir, 1)
        }
        Table::Labels => {
            let mut heads = BTreeMap::new();
            for h in 0..2u32 {
                heads.insert(
                    h,
                    HeadLabels {
                        ids: (0..5).collect(),
                        labels: (0..5).map(|i| (i + h) % 3).collect(),
                        confidence: (0..5).map(|i| 0.5 + i as f32 / 10.0).collect(),
                    },
                );
            }
            let meta = meta(labels::TABLE, labels::VERSION)
                .with_json(labels::KEY_ASSIGN, &labels::AssignStats::default());
            labels::write(&path, &heads, &meta).unwrap()
        }
        Table::Metrics => {
            let rows: Vec<MetricRow> = (0..4)
                .map(|i| MetricRow {
                    round: i / 2,
                    head: (i % 2 == 0).then_some(i),
                    split: "test".into(),
                    metric: ["acc", "nmi"][i as usize % 2].into(),
                    value: i as f64 / 7.0,
                    config_hash: "0123456789abcdef".into(),
                    time_ms: 1_700_000_000_000 + i as i64,
                })
                .collect();
            metrics::write(&path, &rows, &meta(metrics::TABLE, metrics::VERSION)).unwrap()
        }
        Table::Prior => prior::write(
            &path,
            &[1.0, 2.0, 3.0, 4.0],
            &meta(prior::TABLE, prior::VERSION),
        )
        .unwrap(),
        Table::TrainLog => {
            let rows: Vec<TrainLogRow> = (0..3)
                .map(|i| TrainLogRow {
                    round: 1,
                    epoch: i,
                    step: i as u64 * 10,
                    head: i % 2,
                    loss: 2.0 / (i + 1) as f32,
                    lr: 0.05,
                    images_per_sec: 1000.0,
                })
                .collect();
            train_log::write(&path, &rows, &meta(train_log::TABLE, train_log::VERSION)).unwrap()
        }
        Table::ClusterStats => {
            let rows: Vec<cluster_stats::ClusterStatRow> = (0..3)
                .map(|c| cluster_stats::ClusterStatRow {
                    round: 1,
                    head: 0,
                    cluster: c,
                    size: 10 + c as u64,
                    purity: (c != 1).then_some(0.5),
                    majority_class: (c != 2).then_some(c as i64),
                    mean_confidence: 0.75,
                })
                .collect();
            cluster_stats::write(
                &path,
                &rows,
                &meta(cluster_stats::TABLE, cluster_stats::VERSION),
            )
            .unwrap()
        }
    }
}

/// The valid bytes of every table (and of features part 0), written once.
struct Bases {
    files: BTreeMap<String, Vec<u8>>,
}

impl Bases {
    fn get(&self, table: Table) -> &[u8] {
        &self.files[&format!("{table:?}")]
    }

    fn features_part0(&self) -> &[u8] {
        &self.files["FeaturesPart0"]
    }
}

fn bases() -> &'static Bases {
    static BASES: OnceLock<Bases> = OnceLock::new();
    BASES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut files = BTreeMap::new();
        for table in TABLES {
            let path = write_table(dir.path(), table);
            files.insert(format!("{table:?}"), std::fs::read(path).unwrap());
        }
        let part0 = dir.path().join(Shard::new(0, 2).unwrap().file_name());
        files.insert("FeaturesPart0".into(), std::fs::read(part0).unwrap());
        Bases { files }
    })
}

// ---------------------------------------------------------------------------------------------
// Reading with the real readers.

/// Reads `path` (or, for a features part, the directory of parts it lies in) as `table` with
/// every reader that table has, touching every value. Returns the first error.
fn read_table(table: Table, path: &Path) -> Result<(), IoError> {
    match table {
        Table::Dataset | Table::DatasetGroups => {
            let file = DatasetFile::open(path)?;
            let mut rows = 0;
            for batch in file.batches(2)? {
                let b = batch?;
                for i in 0..b.len() {
                    let _ = b.ids().value(i);
                    if !b.image_missing(i) {
                        let _ = b.image_bytes(i);
                    }
                    let _ = (b.image_path(i), b.label(i));
                }
                rows += b.len();
            }
            let (ids, labels) = DatasetFile::open(path)?.ids_and_labels()?;
            assert_eq!((ids.len(), labels.len()), (rows, rows));
        }
        Table::FeaturesPart => {
            let dir = path.parent().unwrap();
            for column in ["embedding", "logits_0", "logits_1"] {
                let m = features::read_matrix(dir, column)?;
                assert_eq!(m.values.len(), m.ids.len() * m.cols);
            }
            features::open_parts(&dir.join("part-*.parquet"))?;
        }
        Table::Labels => {
            let l = labels::read(path)?;
            for (&head, rows) in &l.heads {
                let aligned = rows.aligned_to(path, head, &rows.ids)?;
                assert_eq!(aligned, rows.labels);
            }
            l.meta
                .json::<labels::AssignStats>(path, labels::KEY_ASSIGN)?;
        }
        Table::Metrics => {
            metrics::read(path)?;
        }
        Table::Prior => {
            let w = prior::read(path, 4)?;
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{w:?}");
        }
        Table::TrainLog => {
            train_log::read(path)?;
        }
        Table::ClusterStats => {
            cluster_stats::read(path)?;
        }
    }
    Ok(())
}

/// Writes `bytes` as `table`'s file in a fresh directory, reads it under the guard, and checks
/// that an error names the file (or the directory of parts it is in).
fn check(table: Table, bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = match table {
        Table::FeaturesPart => {
            let part0 = dir.path().join(Shard::new(0, 2).unwrap().file_name());
            std::fs::write(part0, bases().features_part0()).unwrap();
            dir.path().join(Shard::new(1, 2).unwrap().file_name())
        }
        _ => dir.path().join("fuzzed.parquet"),
    };
    std::fs::write(&path, bytes).unwrap();
    let p = path.clone();
    let result = guarded(&format!("reading {table:?}"), move || read_table(table, &p));
    if let Err(e) = result {
        let msg = e.to_string();
        prop_assert!(
            msg.contains(&dir.path().display().to_string()),
            "{:?}: the error does not name the file: {}",
            table,
            msg
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Byte mutations.

/// One edit of a file's bytes. `back` positions count from the end, where the Parquet footer
/// (metadata, its length and the closing magic) lies; `Data` edits fall between the leading magic
/// and the footer (page headers and values); other positions wrap around the length.
#[derive(Debug, Clone)]
enum Mutation {
    FlipData {
        at: usize,
        bit: u8,
    },
    SetData {
        at: usize,
        byte: u8,
    },
    Flip {
        at: usize,
        bit: u8,
    },
    FlipBack {
        back: usize,
        bit: u8,
    },
    SetBack {
        back: usize,
        byte: u8,
    },
    /// Overwrites the little-endian footer length (the 4 bytes before the closing `PAR1`).
    FooterLen(u32),
    Truncate {
        at: usize,
    },
    TruncateBack {
        back: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    /// Copies `len` bytes from `from` over the bytes at `to`.
    Splice {
        from: usize,
        to: usize,
        len: usize,
    },
    /// Copies `len` bytes of another table's file (from its end) over this one's end.
    Transplant {
        other: Table,
        back: usize,
        len: usize,
    },
}

/// The footer of these files is under a KiB or a few; most back positions fall in it, a few on
/// its length and the closing magic (the last 8 bytes, whose corruption is caught at once).
fn back() -> impl Strategy<Value = usize> {
    prop_oneof![1 => 0usize..8, 6 => 8usize..4096, 1 => any::<usize>()]
}

/// One to three edits: most real corruption is a single one.
fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..3)
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        3 => (back(), 0u8..8).prop_map(|(back, bit)| Mutation::FlipBack { back, bit }),
        2 => (back(), any::<u8>()).prop_map(|(back, byte)| Mutation::SetBack { back, byte }),
        1 => prop_oneof![any::<u32>(), 0u32..8192, Just(u32::MAX)].prop_map(Mutation::FooterLen),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => back().prop_map(|back| Mutation::TruncateBack { back }),
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipData { at, bit }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::SetData { at, byte }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (any::<usize>(), any::<usize>(), 1usize..256)
            .prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
        1 => (table(), back(), 1usize..512)
            .prop_map(|(other, back, len)| Mutation::Transplant { other, back, len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    if n == 0 {
        if let Mutation::Insert { bytes: new, .. } = m {
            bytes.extend_from_slice(new);
        }
        return;
    }
    let from_back = |back: usize| n - 1 - back % n;
    // Between the leading magic and the footer, as far as the footer length says.
    let footer = match bytes.get(n.saturating_sub(8)..n.saturating_sub(4)) {
        Some(len) if n >= 12 => u32::from_le_bytes(len.try_into().unwrap()) as usize,
        _ => 0,
    };
    let data_end = n.saturating_sub(8).saturating_sub(footer).max(5).min(n);
    let in_data = |at: usize| (4 + at % data_end.saturating_sub(4).max(1)).min(n - 1);
    match m {
        Mutation::Flip { at, bit } => bytes[at % n] ^= 1 << bit,
        Mutation::FlipBack { back, bit } => bytes[from_back(*back)] ^= 1 << bit,
        Mutation::FlipData { at, bit } => bytes[in_data(*at)] ^= 1 << bit,
        Mutation::SetData { at, byte } => bytes[in_data(*at)] = *byte,
        Mutation::SetBack { back, byte } => bytes[from_back(*back)] = *byte,
        Mutation::FooterLen(len) => {
            if n >= 8 {
                bytes[n - 8..n - 4].copy_from_slice(&len.to_le_bytes());
            }
        }
        Mutation::Truncate { at } => bytes.truncate(at % n),
        Mutation::TruncateBack { back } => bytes.truncate(from_back(*back)),
        Mutation::Insert { at, bytes: new } => {
            let at = at % (n + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at % n;
            bytes.drain(at..(at + len).min(n));
        }
        Mutation::Splice { from, to, len } => {
            let (from, to) = (from % n, to % n);
            let len = (*len).min(n - from).min(n - to);
            bytes.copy_within(from..from + len, to);
        }
        Mutation::Transplant { other, back, len } => {
            let src = bases().get(*other);
            let len = (*len).min(src.len()).min(n);
            let src_end = src.len() - back % (src.len() - len + 1);
            let dst_end = n - back % (n - len + 1);
            bytes[dst_end - len..dst_end].copy_from_slice(&src[src_end - len..src_end]);
        }
    }
}

fn mutated(table: Table, mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = bases().get(table).to_vec();
    for m in mutations {
        apply(&mut bytes, m);
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// Garbage metadata, written through the writers' `FileMeta`.

fn number() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("4611686018427387904".to_string()),
        Just("1e400".to_string()),
        Just("0.5".to_string()),
        Just("null".to_string()),
        Just("\"7\"".to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
        (0u64..4).prop_map(|v| v.to_string()),
    ]
}

fn list() -> impl Strategy<Value = String> + Clone {
    proptest::collection::vec(prop_oneof![number(), Just("\"a\"".to_string())], 0..4)
        .prop_map(|v| format!("[{}]", v.join(",")))
}

/// Values of no particular shape: random text and JSON of every type.
fn garbage_json() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        Just(String::new()),
        Just("{}".to_string()),
        Just("{\"index\":0}".to_string()),
        number(),
        list(),
    ]
}

/// Which key gets a garbage value.
#[derive(Debug, Clone, Copy)]
enum Key {
    Table,
    SchemaVersion,
    Provenance,
    FeaturesInfo,
    Shard,
    ClassNames,
    HuggingFace,
    Assign,
}

/// Values close to what `key` holds, with wrong, huge, negative, fractional or missing fields.
fn near_miss(key: Key) -> BoxedStrategy<String> {
    match key {
        Key::Table => prop_oneof![
            proptest::sample::select(vec!["dataset", "features", "labels", "prior", ""])
                .prop_map(String::from),
            ".*",
        ]
        .boxed(),
        Key::SchemaVersion => number().boxed(),
        Key::Provenance => (number(), number(), list())
            .prop_map(|(s, r, i)| {
                format!(
                    "{{\"stage\":{s},\"sela_version\":\"0\",\"round\":{r},\
                     \"config_hash\":null,\"inputs\":{i}}}"
                )
            })
            .boxed(),
        Key::FeaturesInfo => (number(), list(), number())
            .prop_map(|(d, h, r)| {
                format!(
                    "{{\"layout\":{{\"embedding_dim\":{d},\"head_sizes\":{h}}},\
                     \"dataset\":\"d.parquet\",\"dataset_rows\":{r},\"checkpoint\":null}}"
                )
            })
            .boxed(),
        Key::Shard => (number(), number())
            .prop_map(|(i, c)| format!("{{\"index\":{i},\"count\":{c}}}"))
            .boxed(),
        Key::ClassNames => list().boxed(),
        Key::HuggingFace => prop_oneof![list(), number(), Just("{}".to_string())]
            .prop_map(|n| format!("{{\"info\":{{\"features\":{{\"label\":{{\"names\":{n}}}}}}}}}"))
            .boxed(),
        Key::Assign => (number(), number(), list())
            .prop_map(|(l, m, h)| {
                format!(
                    "{{\"lambda\":{l},\"tol\":1e-3,\"max_iters\":{m},\"prior\":\"uniform\",\
                         \"exact_balance\":false,\"heads\":{h}}}"
                )
            })
            .boxed(),
    }
}

/// One of `keys` with a value for it: a near miss or plain garbage.
fn garbage(keys: &[Key]) -> impl Strategy<Value = (Key, String)> {
    proptest::sample::select(keys.to_vec()).prop_flat_map(|key| {
        (
            Just(key),
            prop_oneof![3 => near_miss(key), 1 => garbage_json()],
        )
    })
}

/// The keys every sela file has.
const STANDARD_KEYS: [Key; 3] = [Key::Table, Key::SchemaVersion, Key::Provenance];

fn with_garbage(mut meta: FileMeta, key: Key, value: &str) -> FileMeta {
    match key {
        Key::Table => meta.table = Some(value.to_string()),
        Key::SchemaVersion => meta.schema_version = Some(value.to_string()),
        Key::Provenance => {
            meta.provenance = None;
            meta.extra.insert(KEY_PROVENANCE.into(), value.to_string());
        }
        Key::FeaturesInfo => {
            meta.extra
                .insert(features::KEY_INFO.into(), value.to_string());
        }
        Key::Shard => {
            meta.extra.insert(KEY_SHARD.into(), value.to_string());
        }
        Key::ClassNames => {
            meta.extra
                .insert(dataset::KEY_CLASS_NAMES.into(), value.to_string());
        }
        Key::HuggingFace => {
            meta.extra
                .insert(dataset::KEY_HUGGINGFACE.into(), value.to_string());
        }
        Key::Assign => {
            meta.extra
                .insert(labels::KEY_ASSIGN.into(), value.to_string());
        }
    }
    meta
}

/// Writes features part `index` of 2 like [`write_features_part`] but through `TableWriter`, so
/// its metadata can be anything.
fn write_features_part_with(dir: &Path, index: usize, meta: &FileMeta) {
    let shard = Shard::new(index, 2).unwrap();
    let ids: Vec<u64> = (0..7).filter(|&id| shard.contains(id)).collect();
    let n = ids.len();
    let schema = Arc::new(features::contract(&layout()).schema());
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(UInt64Array::from(ids)),
            Arc::new(vector_array(&vec![0.5; n * 3], 3)),
            Arc::new(vector_array(&vec![1.0; n * 2], 2)),
            Arc::new(vector_array(&vec![-1.0; n * 4], 4)),
        ],
    )
    .unwrap();
    let mut w = TableWriter::create(dir.join(shard.file_name()), schema, meta, 1024).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
}

/// Writes `table` with one metadata key set to `value` (features: both parts), then reads it.
fn check_metadata(
    table: Table,
    key: Key,
    value: &str,
    both_parts: bool,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.parquet");
    let base = |name: &str, version: u32| FileMeta::new(name, version, provenance());
    match table {
        Table::Dataset | Table::DatasetGroups => {
            let meta = with_garbage(dataset::file_meta(&["a".into()], provenance()), key, value);
            let schema = Arc::new(dataset::contract().schema());
            let mut w = TableWriter::create(&path, schema, &meta, 2).unwrap();
            w.write(&dataset_batch(&[0, 1, 2])).unwrap();
            w.finish().unwrap();
        }
        Table::FeaturesPart => {
            let meta = |index| {
                base(features::TABLE, features::VERSION)
                    .with_json(features::KEY_INFO, &features_info())
                    .with_json(KEY_SHARD, &Shard::new(index, 2).unwrap())
            };
            write_features_part_with(
                dir.path(),
                0,
                &if both_parts {
                    with_garbage(meta(0), key, value)
                } else {
                    meta(0)
                },
            );
            write_features_part_with(dir.path(), 1, &with_garbage(meta(1), key, value));
        }
        Table::Labels => {
            let heads = BTreeMap::from([(
                0,
                HeadLabels {
                    ids: vec![1, 2],
                    labels: vec![0, 1],
                    confidence: vec![0.5, 0.5],
                },
            )]);
            let meta = with_garbage(base(labels::TABLE, labels::VERSION), key, value);
            labels::write(&path, &heads, &meta).unwrap();
        }
        Table::Metrics => {
            let meta = with_garbage(base(metrics::TABLE, metrics::VERSION), key, value);
            metrics::write(&path, &[], &meta).unwrap();
        }
        Table::Prior => {
            let meta = with_garbage(base(prior::TABLE, prior::VERSION), key, value);
            prior::write(&path, &[1.0, 1.0, 1.0, 1.0], &meta).unwrap();
        }
        Table::TrainLog => {
            let meta = with_garbage(base(train_log::TABLE, train_log::VERSION), key, value);
            train_log::write(&path, &[], &meta).unwrap();
        }
        Table::ClusterStats => {
            let meta = with_garbage(
                base(cluster_stats::TABLE, cluster_stats::VERSION),
                key,
                value,
            );
            cluster_stats::write(&path, &[], &meta).unwrap();
        }
    }
    let read_path = match table {
        Table::FeaturesPart => dir.path().join(Shard::new(1, 2).unwrap().file_name()),
        _ => path,
    };
    let p = read_path.clone();
    let result = guarded(
        &format!("reading {table:?} with {key:?} = {value:?}"),
        move || read_table(table, &p),
    );
    if let Err(e) = result {
        let msg = e.to_string();
        prop_assert!(
            msg.contains(&dir.path().display().to_string()),
            "the error does not name the file: {}",
            msg
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(192))]

    #[test]
    fn mutated_dataset_files(
        groups in any::<bool>(),
        mutations in mutations(),
    ) {
        let table = if groups { Table::DatasetGroups } else { Table::Dataset };
        check(table, &mutated(table, &mutations))?;
    }

    #[test]
    fn mutated_features_parts(mutations in mutations()) {
        check(Table::FeaturesPart, &mutated(Table::FeaturesPart, &mutations))?;
    }

    #[test]
    fn mutated_labels_files(mutations in mutations()) {
        check(Table::Labels, &mutated(Table::Labels, &mutations))?;
    }

    #[test]
    fn mutated_metrics_files(mutations in mutations()) {
        check(Table::Metrics, &mutated(Table::Metrics, &mutations))?;
    }

    #[test]
    fn mutated_prior_files(mutations in mutations()) {
        check(Table::Prior, &mutated(Table::Prior, &mutations))?;
    }

    #[test]
    fn mutated_small_tables(
        stats in any::<bool>(),
        mutations in mutations(),
    ) {
        let table = if stats { Table::ClusterStats } else { Table::TrainLog };
        check(table, &mutated(table, &mutations))?;
    }

    /// Arbitrary bytes, with and without Parquet's magic at both ends.
    #[test]
    fn arbitrary_bytes(
        table in table(),
        body in proptest::collection::vec(any::<u8>(), 0..512),
        magic in any::<bool>(),
    ) {
        let bytes = if magic {
            [b"PAR1".as_slice(), &body, b"PAR1"].concat()
        } else {
            body
        };
        check(table, &bytes)?;
    }

}

proptest! {
    // Each case writes its files through the atomic (fsyncing) writers: fewer cases.
    #![proptest_config(config(96))]

    #[test]
    fn garbage_features_metadata(
        (key, value) in garbage(&[STANDARD_KEYS.as_slice(), &[Key::FeaturesInfo, Key::Shard]].concat()),
        both_parts in any::<bool>(),
    ) {
        check_metadata(Table::FeaturesPart, key, &value, both_parts)?;
    }

    #[test]
    fn garbage_dataset_metadata(
        (key, value) in garbage(&[STANDARD_KEYS.as_slice(), &[Key::ClassNames, Key::HuggingFace]].concat()),
    ) {
        check_metadata(Table::Dataset, key, &value, false)?;
    }

    #[test]
    fn garbage_metadata_of_other_tables(
        table in proptest::sample::select(TABLES[3..].to_vec()),
        (key, value) in garbage(&[STANDARD_KEYS.as_slice(), &[Key::Assign]].concat()),
    ) {
        check_metadata(table, key, &value, false)?;
    }
}

/// Every prefix of every valid file is refused with an error naming the file.
#[test]
fn every_truncation_is_an_error() {
    for table in TABLES {
        let bytes = bases().get(table);
        // Every length near the end, every 101st before.
        let lengths = (0..bytes.len()).filter(|&l| l % 101 == 0 || l + 16 >= bytes.len());
        for len in lengths {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("truncated.parquet");
            std::fs::write(&path, &bytes[..len]).unwrap();
            let p = path.clone();
            let result = guarded(&format!("{table:?} truncated to {len}"), move || {
                read_table(table, &p)
            });
            let msg = result
                .expect_err("a truncated file was accepted")
                .to_string();
            assert!(msg.contains("truncated.parquet"), "{msg}");
        }
    }
}

/// The valid files read back, so the mutations start from files the readers accept.
#[test]
fn bases_are_valid() {
    for table in TABLES {
        check(table, bases().get(table)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = match table {
            Table::FeaturesPart => {
                std::fs::write(
                    dir.path().join(Shard::new(0, 2).unwrap().file_name()),
                    bases().features_part0(),
                )
                .unwrap();
                dir.path().join(Shard::new(1, 2).unwrap().file_name())
            }
            _ => dir.path().join("valid.parquet"),
        };
        std::fs::write(&path, bases().get(table)).unwrap();
        read_table(table, &path).unwrap_or_else(|e| panic!("{table:?}: {e}"));
    }
}

/// `bytes` (a valid Parquet file) with its footer re-encoded after `edit` changed the metadata of
/// its first row group (the footer's row count follows the row groups').
fn with_group_edited(
    bytes: &[u8],
    edit: impl FnOnce(RowGroupMetaData) -> RowGroupMetaData,
) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("valid.parquet");
    std::fs::write(&path, bytes).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&file)
        .unwrap();
    let mut groups = metadata.row_groups().to_vec();
    groups[0] = edit(groups[0].clone());
    let metadata = metadata.into_builder().set_row_groups(groups).build();
    let n = bytes.len();
    let footer = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
    let mut out = bytes[..n - 8 - footer].to_vec();
    ParquetMetaDataWriter::new(&mut out, &metadata)
        .finish()
        .unwrap();
    out
}

/// Like [`with_group_edited`], editing the first column chunk of the first row group.
fn with_chunk_edited(
    bytes: &[u8],
    edit: impl FnOnce(ColumnChunkMetaData) -> ColumnChunkMetaData,
) -> Vec<u8> {
    with_group_edited(bytes, |group| {
        let mut chunks = group.columns().to_vec();
        chunks[0] = edit(chunks[0].clone());
        group
            .into_builder()
            .set_column_metadata(chunks)
            .build()
            .unwrap()
    })
}

/// Reads `bytes` as a prior file and returns the error message.
fn prior_error(bytes: &[u8]) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prior.parquet");
    std::fs::write(&path, bytes).unwrap();
    guarded("reading a prior", move || read_table(Table::Prior, &path))
        .err()
        .map(|e| e.to_string())
}

/// Found by fuzzing: a footer placing a column chunk at a negative offset made the Parquet reader
/// panic ("column start and length should not be negative") while decoding the first batch.
#[test]
fn chunks_outside_the_file_are_refused_at_open() {
    let valid = bases().get(Table::Prior);
    assert_eq!(prior_error(&with_chunk_edited(valid, |c| c)), None);
    let size = valid.len() as i64;
    for (offset, len) in [(-8, 10), (4, -1), (size - 4, 100), (i64::MAX, 10)] {
        let bytes = with_chunk_edited(valid, |c| {
            c.into_builder()
                .set_dictionary_page_offset(None)
                .set_data_page_offset(offset)
                .set_total_compressed_size(len)
                .build()
                .unwrap()
        });
        let msg = prior_error(&bytes).expect("a chunk outside the file was accepted");
        assert!(
            msg.contains("prior.parquet")
                && msg.contains("row group 0, column `cluster`")
                && msg.contains(&format!("at offset {offset}")),
            "{msg}"
        );
    }
}

/// Found by fuzzing: a dictionary-encoded data page whose dictionary page is missing made the
/// Parquet decoder panic ("Decoder for dict should have been set"); the panic is now an error.
#[test]
fn decoder_panics_become_errors() {
    let valid = bases().get(Table::Prior);
    let bytes = with_chunk_edited(valid, |c| {
        let dictionary = c.dictionary_page_offset().expect("a dictionary page");
        let skipped = c.data_page_offset() - dictionary;
        let size = c.compressed_size() - skipped;
        c.into_builder()
            .set_dictionary_page_offset(None)
            .set_total_compressed_size(size)
            .build()
            .unwrap()
    });
    let msg = prior_error(&bytes).expect("a page without its dictionary was accepted");
    assert!(
        msg.contains("prior.parquet") && msg.contains("the decoder failed on corrupt data"),
        "{msg}"
    );
}

/// Found by fuzzing: `sela.shard` metadata is trusted by the completeness check of features
/// parts; an index past the count indexed out of bounds, a huge count allocated a counter per
/// shard (and aborted).
#[test]
fn impossible_shards_in_metadata_are_refused() {
    for shard in [
        r#"{"index":5,"count":2}"#,
        r#"{"index":0,"count":0}"#,
        r#"{"index":18446744073709551615,"count":3}"#,
    ] {
        let dir = tempfile::tempdir().unwrap();
        for index in 0..2 {
            let meta = FileMeta::new(features::TABLE, features::VERSION, provenance())
                .with_json(features::KEY_INFO, &features_info())
                .with(KEY_SHARD, shard);
            write_features_part_with(dir.path(), index, &meta);
        }
        let p = dir.path().to_path_buf();
        let msg = guarded("reading parts", move || {
            features::read_matrix(&p, "embedding")
        })
        .expect_err("an impossible shard was accepted")
        .to_string();
        assert!(
            msg.contains("part-00000-of-00002.parquet") && msg.contains("metadata `sela.shard`"),
            "{msg}"
        );
    }
    // A large but possible count is reported without a counter per shard.
    let dir = tempfile::tempdir().unwrap();
    for index in 0..2 {
        let shard = Shard {
            index,
            count: usize::MAX,
        };
        let meta = FileMeta::new(features::TABLE, features::VERSION, provenance())
            .with_json(features::KEY_INFO, &features_info())
            .with_json(KEY_SHARD, &shard);
        write_features_part_with(dir.path(), index, &meta);
    }
    let p = dir.path().to_path_buf();
    let msg = guarded("reading parts", move || {
        features::read_matrix(&p, "embedding")
    })
    .expect_err("an incomplete set was accepted")
    .to_string();
    assert!(
        msg.contains(&format!("shard 2 of {} appears 0 times", usize::MAX)),
        "{msg}"
    );
}

/// Found by fuzzing: a features file without `sela.features` (nothing to check its footer
/// against) whose footer claims 2^40 rows made `read_matrix` reserve memory for them all and
/// abort. The claim is now only a hint bounded by the file's size, and a footer promising rows
/// the pages do not hold is an error.
#[test]
fn row_counts_the_pages_do_not_hold_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let meta = FileMeta::new(features::TABLE, features::VERSION, provenance());
    write_features_part_with(dir.path(), 0, &meta);
    let part = dir.path().join(Shard::new(0, 2).unwrap().file_name());
    let valid = std::fs::read(&part).unwrap();
    for rows in [5, 1 << 40, i64::MAX] {
        let bytes = with_group_edited(&valid, |g| {
            g.into_builder().set_num_rows(rows).build().unwrap()
        });
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("features.parquet");
        std::fs::write(&path, bytes).unwrap();
        let p = path.clone();
        let msg = guarded("reading a matrix", move || {
            features::read_matrix(&p, "embedding")
        })
        .expect_err("a footer promising missing rows was accepted")
        .to_string();
        assert!(
            msg.contains("features.parquet")
                && msg.contains(&format!(
                    "the footer promises {rows} rows, the pages hold 4"
                )),
            "{msg}"
        );
    }
}
