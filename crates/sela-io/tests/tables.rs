//! Round trips and validation failures of every table.

use std::collections::BTreeMap;
use std::path::Path;

use sela_io::features::{self, FeaturesInfo, FeaturesLayout, FeaturesWriter};
use sela_io::labels::{self, HeadLabels};
use sela_io::metrics::{self, MetricRow};
use sela_io::parts::Shard;
use sela_io::{cluster_stats, prior, train_log, FileMeta, IoError, Provenance};

fn info(rows: u64) -> FeaturesInfo {
    FeaturesInfo {
        layout: FeaturesLayout {
            embedding_dim: 3,
            head_sizes: vec![2, 4],
            extra_embeddings: Vec::new(),
        },
        dataset: "d.parquet".into(),
        dataset_rows: rows,
        checkpoint: None,
    }
}

fn write_part(dir: &Path, ids: &[u64], shard: Shard, rows: u64, poison: bool) {
    let path = dir.join(shard.file_name());
    let mut w = FeaturesWriter::create(&path, &info(rows), shard, Provenance::new("test")).unwrap();
    let n = ids.len();
    let emb: Vec<f32> = (0..n * 3).map(|i| i as f32).collect();
    let mut l0: Vec<f32> = ids
        .iter()
        .flat_map(|&id| [id as f32, -(id as f32)])
        .collect();
    if poison {
        l0[3] = f32::NAN;
    }
    let l1: Vec<f32> = (0..n * 4).map(|i| i as f32 * 0.5).collect();
    w.push(ids, &emb, &[&l0, &l1]).unwrap();
    w.finish().unwrap();
}

#[test]
fn features_parts_read_back_as_one_matrix() {
    let dir = tempfile::tempdir().unwrap();
    for s in 0..3 {
        let shard = Shard::new(s, 3).unwrap();
        let ids: Vec<u64> = (0..10).filter(|&id| shard.contains(id)).collect();
        write_part(dir.path(), &ids, shard, 10, false);
    }
    let m = features::read_matrix(dir.path(), "logits_0").unwrap();
    assert_eq!(m.cols, 2);
    assert_eq!(m.ids.len(), 10);
    for (r, &id) in m.ids.iter().enumerate() {
        assert_eq!(&m.values[r * 2..r * 2 + 2], &[id as f32, -(id as f32)]);
    }
    let emb = features::read_matrix(&dir.path().join("part-*.parquet"), "embedding").unwrap();
    assert_eq!(emb.cols, 3);
}

#[test]
fn incomplete_duplicated_or_poisoned_parts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_part(dir.path(), &[0, 2, 4], Shard::new(0, 2).unwrap(), 6, false);
    let msg = features::read_matrix(dir.path(), "logits_0")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing part-00001-of-00002.parquet"), "{msg}");

    // All parts present, but one id twice and one missing.
    write_part(dir.path(), &[1, 2, 5], Shard::new(1, 2).unwrap(), 6, false);
    let msg = features::read_matrix(dir.path(), "logits_0")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("id 2 occurs more than once"), "{msg}");

    // Rows do not add up to the dataset.
    write_part(dir.path(), &[1, 3], Shard::new(1, 2).unwrap(), 6, false);
    let msg = features::read_matrix(dir.path(), "logits_0")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("5 rows but the dataset has 6"), "{msg}");

    // A NaN names the file, the row and the column.
    write_part(dir.path(), &[1, 3, 5], Shard::new(1, 2).unwrap(), 6, true);
    let msg = features::read_matrix(dir.path(), "logits_0")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("part-00001-of-00002.parquet")
            && msg.contains("`logits_0`, row 1")
            && msg.contains("NaN"),
        "{msg}"
    );
}

#[test]
fn wrong_table_version_column_and_garbage_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let labels_path = dir.path().join("labels.parquet");
    let mut heads = BTreeMap::new();
    heads.insert(
        0,
        HeadLabels {
            ids: vec![5, 6],
            labels: vec![1, 0],
            confidence: vec![0.9, 0.8],
        },
    );
    let meta = FileMeta::new(labels::TABLE, labels::VERSION, Provenance::new("test"));
    labels::write(&labels_path, &heads, &meta).unwrap();
    let back = labels::read(&labels_path).unwrap();
    assert_eq!(back.heads, heads);

    let err = features::read_matrix(&labels_path, "logits_0").unwrap_err();
    assert!(matches!(err, IoError::WrongTable { .. }), "{err}");

    let future = FileMeta::new(labels::TABLE, labels::VERSION + 1, Provenance::new("test"));
    let newer = dir.path().join("newer.parquet");
    labels::write(&newer, &heads, &future).unwrap();
    let msg = labels::read(&newer).unwrap_err().to_string();
    assert!(
        msg.contains("schema version 2") && msg.contains("reads version 1"),
        "{msg}"
    );

    let bytes = std::fs::read(&labels_path).unwrap();
    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let msg = labels::read(&truncated).unwrap_err().to_string();
    assert!(
        msg.contains("truncated.parquet") && msg.contains("not a readable Parquet file"),
        "{msg}"
    );

    let msg = labels::read(&dir.path().join("absent.parquet"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent.parquet"), "{msg}");
}

#[test]
fn metrics_append_replaces_same_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.parquet");
    let meta = FileMeta::new(metrics::TABLE, metrics::VERSION, Provenance::new("test"));
    let row = |round, head, metric: &str, value| MetricRow {
        round,
        head,
        split: "test".into(),
        metric: metric.into(),
        value,
        config_hash: "abc".into(),
        time_ms: 1_700_000_000_000,
    };
    metrics::append(
        &path,
        &[row(1, Some(0), "nmi", 0.5), row(1, None, "knn20_acc", 0.7)],
        &meta,
    )
    .unwrap();
    metrics::append(&path, &[row(0, Some(0), "nmi", 0.1)], &meta).unwrap();
    metrics::append(&path, &[row(1, Some(0), "nmi", 0.6)], &meta).unwrap();
    let rows = metrics::read(&path).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].round, 0);
    assert!(rows.contains(&row(1, Some(0), "nmi", 0.6)));
    assert!(!rows.contains(&row(1, Some(0), "nmi", 0.5)));
}

#[test]
fn small_tables_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let log = vec![train_log::TrainLogRow {
        round: 1,
        epoch: 2,
        step: 3,
        head: 0,
        loss: 1.5,
        lr: 0.1,
        images_per_sec: 900.0,
    }];
    let p = dir.path().join("log.parquet");
    train_log::write(
        &p,
        &log,
        &FileMeta::new(train_log::TABLE, train_log::VERSION, Provenance::new("t")),
    )
    .unwrap();
    assert_eq!(train_log::read(&p).unwrap(), log);

    let stats = vec![cluster_stats::ClusterStatRow {
        round: 1,
        head: 0,
        cluster: 3,
        size: 10,
        purity: None,
        majority_class: Some(2),
        mean_confidence: 0.5,
    }];
    let p = dir.path().join("cs.parquet");
    cluster_stats::write(
        &p,
        &stats,
        &FileMeta::new(
            cluster_stats::TABLE,
            cluster_stats::VERSION,
            Provenance::new("t"),
        ),
    )
    .unwrap();
    assert_eq!(cluster_stats::read(&p).unwrap(), stats);

    let p = dir.path().join("prior.parquet");
    prior::write(
        &p,
        &[1.0, 3.0],
        &FileMeta::new(prior::TABLE, prior::VERSION, Provenance::new("t")),
    )
    .unwrap();
    assert_eq!(prior::read(&p, 2).unwrap(), vec![0.25, 0.75]);
    let msg = prior::read(&p, 3).unwrap_err().to_string();
    assert!(msg.contains("cluster 2 of K = 3 has no weight"), "{msg}");
}
