//! The stage end to end: features files in, labels and statistics out.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arrow::array::{RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use clap::Parser;
use sela_assign::{run, Args};
use sela_io::features::{
    vector_array, FeaturesInfo, FeaturesLayout, FeaturesWriter, GridEmbedding,
};
use sela_io::labels::{self, AssignStats, CutChoice, HeadLabels};
use sela_io::parts::Shard;
use sela_io::table::TableWriter;
use sela_io::{FileMeta, Provenance};

fn noise(i: usize, j: usize, seed: u64) -> f32 {
    let mut z = (i as u64) << 20 ^ (j as u64) ^ seed << 50;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// Row i of a head with k clusters: a bump of 2 at cluster (i·7 mod 3k) mod k, plus noise.
fn logits(n: usize, k: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .flat_map(|i| {
            let c = (i * 7 % (3 * k)) % k;
            (0..k).map(move |j| noise(i, j, seed) + if j == c { 2.0 } else { 0.0 })
        })
        .collect()
}

/// A one-part features file with heads of the given sizes.
fn features(path: &Path, n: usize, heads: &[usize], poison: Option<(usize, usize)>) {
    let mut per_head: Vec<Vec<f32>> = heads
        .iter()
        .enumerate()
        .map(|(h, &k)| logits(n, k, h as u64))
        .collect();
    if let Some((row, col)) = poison {
        per_head[0][row * heads[0] + col] = f32::NAN;
    }
    write_features(path, &vec![0f32; 2 * n], 2, heads, &per_head);
}

/// A one-part features file of `embedding` (n×dim) and one logits matrix per head; ids 1000….
fn write_features(path: &Path, emb: &[f32], dim: usize, heads: &[usize], per_head: &[Vec<f32>]) {
    write_features_with_grids(path, (emb, dim), &[], heads, per_head);
}

/// [`write_features`] with extra embeddings `(grid, n×D values, D)` beside `embedding`.
fn write_features_with_grids(
    path: &Path,
    (emb, dim): (&[f32], usize),
    grids: &[(usize, &[f32], usize)],
    heads: &[usize],
    per_head: &[Vec<f32>],
) {
    let n = emb.len() / dim;
    let info = FeaturesInfo {
        layout: FeaturesLayout {
            embedding_dim: dim,
            head_sizes: heads.to_vec(),
            extra_embeddings: grids
                .iter()
                .map(|&(grid, _, dim)| GridEmbedding { grid, dim })
                .collect(),
        },
        dataset: "data.parquet".into(),
        dataset_rows: n as u64,
        checkpoint: None,
    };
    let mut w = FeaturesWriter::create(
        path,
        &info,
        Shard::new(0, 1).unwrap(),
        Provenance::new("test"),
    )
    .unwrap();
    let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + i).collect();
    let refs: Vec<&[f32]> = per_head.iter().map(|v| v.as_slice()).collect();
    let extra: Vec<&[f32]> = grids.iter().map(|&(_, values, _)| values).collect();
    w.push_with_extra(&ids, emb, &extra, &refs).unwrap();
    w.finish().unwrap();
}

fn args(list: &[&str]) -> Args {
    Args::try_parse_from(std::iter::once("sela-assign").chain(list.iter().copied())).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn read_stats(path: &Path) -> AssignStats {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn without_seconds(mut s: AssignStats) -> AssignStats {
    s.neighbour_seconds = 0.0;
    for h in &mut s.heads {
        h.seconds = 0.0;
    }
    s
}

fn bin(list: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sela-assign"))
        .args(list)
        .output()
        .unwrap()
}

#[test]
fn every_head_is_solved_and_written_with_its_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features.parquet");
    features(&feats, 240, &[4, 6], None);
    let out = dir.path().join("round-001").join("labels.parquet");
    let summary = run(&args(&["--logits", p(&feats), "--output", p(&out), "-q"])).unwrap();
    assert_eq!(summary.heads.len(), 2);
    let stats_path = dir.path().join("round-001/assign-stats.json");
    assert_eq!(summary.stats, stats_path);

    let read = labels::read(&out).unwrap();
    assert_eq!(read.heads.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    for (h, k) in [(0u32, 4usize), (1, 6)] {
        let rows = &read.heads[&h];
        assert_eq!(rows.ids, (1000..1240).collect::<Vec<u64>>());
        assert!(rows.labels.iter().all(|&l| (l as usize) < k));
        assert!(rows.confidence.iter().all(|&c| c > 0.0 && c <= 1.0 + 1e-6));
    }
    let stats = read_stats(&stats_path);
    let in_meta: AssignStats = read.meta.require_json(&out, labels::KEY_ASSIGN).unwrap();
    assert_eq!(stats, in_meta);
    assert_eq!(stats.lambda, 25.0);
    assert_eq!(stats.prior, "uniform");
    for (h, k) in [(0u32, 4usize), (1, 6)] {
        let s = &stats.heads[h as usize];
        assert_eq!(
            (s.head, s.column.as_str(), s.n, s.k),
            (h, format!("logits_{h}").as_str(), 240, k)
        );
        assert!(s.converged && s.col_error < 1e-3, "{s:?}");
        assert!(s.iterations >= 1 && s.log_beta.len() == k);
        assert!(s.min_cluster_size > 0 && s.max_cluster_size < 240);
        assert!(s.entropy >= 0.0 && s.objective < 0.0);
        assert!(!s.warm_started && s.churn_fraction.is_none());
        assert_eq!(s.path, "scaling");
    }
    let prov = read.meta.provenance.unwrap();
    assert_eq!(prov.stage, "sela-assign");
    assert_eq!(prov.inputs, vec![feats.display().to_string()]);
}

#[test]
fn an_analysts_column_is_solved_as_head_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.parquet");
    let (n, k) = (90, 5);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new(
            "z",
            DataType::FixedSizeList(
                Arc::new(Field::new_list_field(DataType::Float32, false)),
                k as i32,
            ),
            false,
        ),
    ]));
    let mut w = TableWriter::create(&file, schema.clone(), &FileMeta::default(), 32).unwrap();
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt64Array::from((0..n as u64).rev().collect::<Vec<_>>())),
            Arc::new(vector_array(&logits(n, k, 9), k)),
        ],
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();

    let out = dir.path().join("labels.parquet");
    let err = run(&args(&["--logits", p(&file), "--output", p(&out), "-q"])).unwrap_err();
    assert!(format!("{err:#}").contains("--column"), "{err:#}");
    run(&args(&[
        "--logits",
        p(&file),
        "--column",
        "z",
        "--output",
        p(&out),
        "-q",
        "--exact-balance",
    ]))
    .unwrap();
    let read = labels::read(&out).unwrap();
    let rows = &read.heads[&0];
    // The file holds the ids in descending order; rows are solved and written in id order.
    assert_eq!(rows.ids, (0..n as u64).collect::<Vec<_>>());
    let mut sizes = vec![0; k];
    for &l in &rows.labels {
        sizes[l as usize] += 1;
    }
    assert_eq!(sizes, vec![18; 5]);
    let stats = read_stats(&dir.path().join("assign-stats.json"));
    assert_eq!(stats.heads[0].column, "z");
    assert!(stats.exact_balance);

    // Neighbours need the embedding column, which this file lacks: a clear error, and the
    // labels already written stay as they were.
    let before = std::fs::read(&out).unwrap();
    let list = ["--logits", p(&file), "--column", "z", "--output", p(&out)];
    let err = run(&args(&[&list[..], &["-q", "--neighbours", "3"]].concat())).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("mine.parquet") && msg.contains("embedding"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn neighbour_averaging_repairs_labels_the_embedding_contradicts() {
    // 400 rows of two hidden classes, c = i mod 2. The embedding separates them (directions
    // near (1, 0) and (0, 1)); the head's logits point to the wrong class on every fifth row.
    // Solved alone those rows are mislabelled (80% agree with c); averaged over 15 embedding
    // neighbours, where their class holds the majority, every row agrees.
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features.parquet");
    let n = 400;
    let class = |i: usize| i % 2;
    let emb: Vec<f32> = (0..n)
        .flat_map(|i| {
            let wobble = 0.3 * noise(i, 0, 5);
            if class(i) == 0 {
                [1.0, wobble]
            } else {
                [wobble, 1.0]
            }
        })
        .collect();
    let head: Vec<f32> = (0..n)
        .flat_map(|i| {
            let said = if i % 5 == 0 { 1 - class(i) } else { class(i) };
            (0..2).map(move |j| if j == said { 1.0 } else { 0.0 } + 0.1 * noise(i, j, 3))
        })
        .collect();
    write_features(&feats, &emb, 2, &[2], &[head]);
    let out = dir.path().join("labels.parquet");
    let agreement = || {
        let labels = &labels::read(&out).unwrap().heads[&0].labels;
        let same = (0..n).filter(|&i| labels[i] as usize == class(i)).count();
        same.max(n - same) as f64 / n as f64
    };
    let base = ["--logits", p(&feats), "--output", p(&out), "-q"];

    run(&args(&base)).unwrap();
    assert_eq!(agreement(), 0.8);
    assert_eq!(
        read_stats(&dir.path().join("assign-stats.json")).neighbours,
        0
    );

    run(&args(&[&base[..], &["--neighbours", "15"]].concat())).unwrap();
    assert_eq!(agreement(), 1.0);
    let s = read_stats(&dir.path().join("assign-stats.json"));
    assert_eq!(s.neighbours, 15);
    assert!(s.heads[0].converged);

    // Past `--neighbours-until-round` the run solves the head's own probabilities, bit for
    // bit as without neighbours (provenance aside: compare the labels).
    let until = ["--neighbours", "15", "--neighbours-until-round", "4"];
    run(&args(&[&base[..], &until, &["--round", "4"]].concat())).unwrap();
    assert_eq!(agreement(), 1.0);
    run(&args(&[&base[..], &until, &["--round", "5"]].concat())).unwrap();
    assert_eq!(
        read_stats(&dir.path().join("assign-stats.json")).neighbours,
        0
    );
    let read = labels::read(&out).unwrap();
    let plain = dir.path().join("plain.parquet");
    run(&args(&["--logits", p(&feats), "--output", p(&plain), "-q"])).unwrap();
    assert_eq!(
        read.heads[&0].labels,
        labels::read(&plain).unwrap().heads[&0].labels
    );

    // The same from the pipeline config, as `make round` runs it.
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        "[pipeline]\nname = \"t\"\n[data]\ntrain = \"x.parquet\"\nchannels = 1\nheight = 8\n\
         width = 8\n[model]\nheads = [2]\n[assign]\nneighbours = 15\nneighbours_until_round = 2\n",
    )
    .unwrap();
    for (round, want) in [("2", 1.0), ("3", 0.8)] {
        run(&args(
            &[&base[..], &["--config", p(&config), "--round", round]].concat(),
        ))
        .unwrap();
        assert_eq!(agreement(), want, "round {round}");
    }
}

/// The group of row `i` in [`write_three_groups`].
fn group(i: usize) -> usize {
    i % 3
}

/// Features of `n` rows in three hidden groups, g = i mod 3, each a circle of directions
/// around one axis of the embedding ([`three_group_embedding`]); heads of K = 3 and K = 6 whose logits are noise.
fn write_three_groups(path: &Path, n: usize) {
    let heads = [3, 6];
    let per_head: Vec<Vec<f32>> = heads
        .iter()
        .map(|&k| (0..n * k).map(|j| noise(j, 7, 9)).collect())
        .collect();
    write_features(path, &three_group_embedding(n), 3, &heads, &per_head);
}

/// `n` rows of three hidden groups (`group(i)`), each a bundle of directions around one
/// axis of a 3-dimensional embedding: a small circle about the axis, so that within a group
/// nearness follows the position on the circle (i / 3 of n / 3).
fn three_group_embedding(n: usize) -> Vec<f32> {
    let per = n.div_ceil(3) as f32;
    (0..n)
        .flat_map(|i| {
            let g = group(i);
            let angle = std::f32::consts::TAU * (i / 3) as f32 / per;
            let mut v = [0.0; 3];
            v[g] = 1.0;
            v[(g + 1) % 3] = 0.2 * angle.cos();
            v[(g + 2) % 3] = 0.2 * angle.sin();
            v
        })
        .collect()
}

/// Whether every one of the `k` clusters of `labels` is used and lies within one group.
fn pure(labels: &[u32], k: usize) -> bool {
    let mut owner = vec![None; k];
    labels
        .iter()
        .enumerate()
        .all(|(i, &l)| *owner[l as usize].get_or_insert(group(i)) == group(i))
        && owner.iter().all(Option::is_some)
}

#[test]
fn spectral_labels_follow_the_embedding_graph() {
    // 300 rows of three hidden groups, g = i mod 3, each a small circle of directions around
    // one axis of the embedding; the heads' logits are noise. Spectral labels recover the
    // groups exactly (K = 3) or split them without mixing (K = 6), whatever the heads say.
    let dir = tempfile::tempdir().unwrap();
    let (feats, n) = (dir.path().join("features.parquet"), 300);
    write_three_groups(&feats, n);
    let out = dir.path().join("labels.parquet");
    let stats_path = dir.path().join("assign-stats.json");
    let base = ["--logits", p(&feats), "--output", p(&out), "-q"];
    let spectral = ["--spectral", "10", "--spectral-from-round", "5"];

    run(&args(&[&base[..], &spectral, &["--round", "5"]].concat())).unwrap();
    let read = labels::read(&out).unwrap();
    assert!(pure(&read.heads[&0].labels, 3));
    assert!(pure(&read.heads[&1].labels, 6));
    let stats = read_stats(&stats_path);
    let graph = stats.spectral.clone().expect("spectral statistics");
    assert_eq!(graph.neighbours, 10);
    // Three separate groups: the eigenvalue 1 three times.
    assert!(graph.eigenvalues[..3]
        .iter()
        .all(|&v| (v - 1.0).abs() < 1e-6));
    assert!(graph.max_residual <= 1e-6);
    for h in &stats.heads {
        assert_eq!(h.path, "spectral");
        assert!(h.log_beta.is_empty() && h.converged);
    }
    assert_eq!(stats.heads[0].min_cluster_size, 100);
    assert!(read.heads[&0]
        .confidence
        .iter()
        .all(|&c| c > 0.0 && c <= 1.0));

    // Deterministic: the same labels again.
    let first = read.heads.clone();
    run(&args(&[&base[..], &spectral, &["--round", "6"]].concat())).unwrap();
    assert_eq!(labels::read(&out).unwrap().heads, first);

    // The next round warm-starts a solve from spectral statistics: no duals, a cold start.
    let next = dir.path().join("next.parquet");
    run(&args(&[
        "--logits",
        p(&feats),
        "--output",
        p(&next),
        "--stats",
        p(&dir.path().join("next-stats.json")),
        "--warm-start",
        p(&stats_path),
        "-q",
    ]))
    .unwrap();
    let solved = read_stats(&dir.path().join("next-stats.json"));
    assert!(solved.spectral.is_none());
    assert!(solved
        .heads
        .iter()
        .all(|h| !h.warm_started && h.path != "spectral"));

    // Before --spectral-from-round the heads are solved.
    run(&args(&[&base[..], &spectral, &["--round", "4"]].concat())).unwrap();
    let stats = read_stats(&stats_path);
    assert!(stats.spectral.is_none() && stats.heads[0].path != "spectral");

    // --spectral-heads labels the heads it names and solves the others.
    run(&args(
        &[&base[..], &["--spectral", "10", "--spectral-heads", "1"]].concat(),
    ))
    .unwrap();
    let stats = read_stats(&stats_path);
    assert_eq!(stats.heads[0].path, "scaling");
    assert_eq!(stats.heads[0].log_beta.len(), 3);
    assert_eq!(stats.heads[1].path, "spectral");
    assert_eq!(stats.spectral.as_ref().unwrap().eigenvalues.len(), 6);
    assert!(pure(&labels::read(&out).unwrap().heads[&1].labels, 6));

    // A head that is not there, or a graph of rows joined only to themselves, is refused,
    // writing nothing.
    let before = std::fs::read(&out).unwrap();
    let err = run(&args(
        &[&base[..], &["--spectral", "10", "--spectral-heads", "0,2"]].concat(),
    ))
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("names head 2, but the logits hold heads 0, 1"),
        "{err:#}"
    );
    let err = run(&args(&[&base[..], &["--spectral", "1"]].concat())).unwrap_err();
    assert!(
        format!("{err:#}").contains("assign.spectral = 1"),
        "{err:#}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn spectral_clusters_take_the_numbers_each_head_predicts() {
    // Two K = 3 heads that already predict the three groups, under different numberings (and
    // with noise); both get the one spectral clustering, each numbered as it predicts.
    let dir = tempfile::tempdir().unwrap();
    let (feats, n) = (dir.path().join("features.parquet"), 300);
    let predicting = |shift: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|i| {
                (0..3).map(move |c| 0.2 * noise(i, c, 4) + f32::from(c == (group(i) + shift) % 3))
            })
            .collect()
    };
    let per_head = [predicting(1), predicting(2)];
    write_features(&feats, &three_group_embedding(n), 3, &[3, 3], &per_head);
    let out = dir.path().join("labels.parquet");
    run(&args(&[
        "--logits",
        p(&feats),
        "--output",
        p(&out),
        "-q",
        "--spectral",
        "10",
    ]))
    .unwrap();
    let read = labels::read(&out).unwrap();
    for (head, shift) in [(0, 1), (1, 2)] {
        let want: Vec<u32> = (0..n).map(|i| ((group(i) + shift) % 3) as u32).collect();
        assert_eq!(read.heads[&head].labels, want, "head {head}");
    }
    let stats = read_stats(&dir.path().join("assign-stats.json"));
    for h in &stats.heads {
        assert_eq!(h.predicted_agreement, Some(1.0), "head {}", h.head);
    }
}

/// Merge flags of the merged-spectral tests: 9 fragments cut 3 times from 6 eigenvectors,
/// then 5 propagation steps.
const MERGED: [&str; 8] = [
    "--spectral-fragments",
    "9",
    "--spectral-eigenvectors",
    "6",
    "--spectral-smoothing",
    "5",
    "--spectral-cuts",
    "3",
];

#[test]
fn merged_spectral_labels_rejoin_the_fragments_of_each_group() {
    // The three groups of `write_three_groups`, cut into 9 fragments from 6
    // eigenvectors and merged: K = 3 recovers the groups, K = 6 splits them without mixing.
    let dir = tempfile::tempdir().unwrap();
    let (feats, n) = (dir.path().join("features.parquet"), 300);
    write_three_groups(&feats, n);
    let out = dir.path().join("labels.parquet");
    let stats_path = dir.path().join("assign-stats.json");
    let base = [
        "--logits",
        p(&feats),
        "--output",
        p(&out),
        "-q",
        "--spectral",
        "10",
    ];
    let merged = MERGED;
    run(&args(&[&base[..], &merged].concat())).unwrap();
    let read = labels::read(&out).unwrap();
    assert!(pure(&read.heads[&0].labels, 3));
    assert!(pure(&read.heads[&1].labels, 6));
    let stats = read_stats(&stats_path);
    let graph = stats.spectral.clone().expect("spectral statistics");
    assert_eq!(graph.eigenvalues.len(), 6);
    let settings = graph.merge.expect("merge settings");
    assert_eq!(
        (
            settings.fragments,
            settings.eigenvectors,
            settings.smoothing_steps
        ),
        (9, 6, 5)
    );
    assert_eq!(settings.size_cap, 1.2);
    assert_eq!(stats.heads[0].min_cluster_size, 100);
    for h in &stats.heads {
        let report = h.merge.as_ref().expect("merge report");
        assert!(report.smoothing_steps >= 1 && report.smoothing_steps <= 5);
        assert!((0.0..=1.0).contains(&report.smoothing_changed));
        assert!(report.kept_cut < 3 && (0.0..=1.0).contains(&report.agreement));
        assert!(report.modularity > 0.0 && report.modularity < 1.0);
        assert_eq!(report.cut_modularities.len(), 3);
        assert_eq!(report.cut_modularities[report.kept_cut], report.modularity);
        assert!(report
            .cut_modularities
            .iter()
            .all(|&q| q <= report.modularity));
        assert!(report.final_cap >= 1.2 * n as f64 / h.k as f64);
        let predicted = h.predicted_agreement.expect("spectral heads are aligned");
        assert!((0.0..=1.0).contains(&predicted));
        assert_eq!(report.cut_agreements.len(), 3);
        assert!(report
            .cut_agreements
            .iter()
            .all(|a| (0.0..=1.0).contains(a)));
    }
    assert_eq!(settings.keep, CutChoice::Modularity);
    // Deterministic.
    run(&args(&[&base[..], &merged].concat())).unwrap();
    assert_eq!(labels::read(&out).unwrap().heads, read.heads);

    // Kept by agreement with the heads' own clusterings instead.
    let by_agreement = [&base[..], &merged, &["--spectral-keep", "agreement"]].concat();
    run(&args(&by_agreement)).unwrap();
    assert!(pure(&labels::read(&out).unwrap().heads[&0].labels, 3));
    let stats = read_stats(&stats_path);
    assert_eq!(
        stats.spectral.unwrap().merge.unwrap().keep,
        CutChoice::Agreement
    );
    for h in &stats.heads {
        let report = h.merge.as_ref().expect("merge report");
        let best = report.cut_agreements[report.kept_cut];
        assert!(
            report.cut_agreements.iter().all(|&a| a <= best),
            "head {}",
            h.head
        );
    }
    // Refined towards the heads' own clusterings: the score never falls, and is reported.
    let refined = [&base[..], &merged, &["--spectral-refine", "3"]].concat();
    run(&args(&refined)).unwrap();
    assert!(pure(&labels::read(&out).unwrap().heads[&0].labels, 3));
    let stats = read_stats(&stats_path);
    assert_eq!(stats.spectral.unwrap().merge.unwrap().refine, Some(3.0));
    for h in &stats.heads {
        let r = h
            .merge
            .as_ref()
            .unwrap()
            .refinement
            .clone()
            .expect("refined");
        let score = |agreement: f64, modularity: f64| agreement + 3.0 * modularity;
        assert!(
            score(r.agreement_after, r.modularity_after)
                >= score(r.agreement_before, r.modularity_before) - 1e-12,
            "head {}: {r:?}",
            h.head
        );
        assert_eq!(r.moves == 0, r.changed == 0.0, "{r:?}");
    }
    // Several fragment counts: each is refined, and the most modular refined partition is kept.
    let mut refined_modularity = Vec::new();
    for fragments in ["9", "12"] {
        let alone = [
            &base[..],
            &merged[2..],
            &["--spectral-refine", "3", "--spectral-fragments", fragments],
        ]
        .concat();
        run(&args(&alone)).unwrap();
        let report = read_stats(&stats_path).heads[0].merge.clone().unwrap();
        assert_eq!(report.kept_fragments, None);
        refined_modularity.push(report.refinement.unwrap().modularity_after);
    }
    let both = [
        &base[..],
        &merged,
        &["--spectral-refine", "3", "--spectral-extra-fragments", "12"],
    ]
    .concat();
    run(&args(&both)).unwrap();
    assert!(pure(&labels::read(&out).unwrap().heads[&0].labels, 3));
    let stats = read_stats(&stats_path);
    assert_eq!(stats.spectral.unwrap().merge.unwrap().extra_fragments, [12]);
    let report = stats.heads[0].merge.clone().unwrap();
    let kept = report.kept_fragments.expect("two counts were tried");
    let best = if refined_modularity[1] > refined_modularity[0] {
        12
    } else {
        9
    };
    assert_eq!(kept, best, "{refined_modularity:?}");
    assert_eq!(
        report.refinement.unwrap().modularity_after,
        refined_modularity[usize::from(kept == 12)]
    );
    let unrefined = [&base[..], &merged, &["--spectral-extra-fragments", "12"]].concat();
    let err = run(&args(&unrefined)).unwrap_err();
    assert!(
        format!("{err:#}").contains("needs --spectral-refine"),
        "{err:#}"
    );
    // One cut leaves nothing to choose, whichever the choice.
    let one_cut = [
        &base[..],
        &merged[..6],
        &["--spectral-cuts", "1", "--spectral-keep", "agreement"],
    ]
    .concat();
    run(&args(&one_cut)).unwrap();
    let report = read_stats(&stats_path).heads[0].merge.clone().unwrap();
    assert_eq!((report.kept_cut, report.cut_agreements.len()), (0, 1));
    let central = [&base[..], &merged, &["--spectral-keep", "central"]].concat();
    let Err(err) = Args::try_parse_from(std::iter::once("sela-assign").chain(central)) else {
        panic!("an unknown cut choice is refused");
    };
    assert!(err.to_string().contains("not a cut choice"), "{err}");

    // Fragments no more than a head's K are refused, writing nothing.
    let before = std::fs::read(&out).unwrap();
    let err = run(&args(&[&base[..], &["--spectral-fragments", "6"]].concat())).unwrap_err();
    assert!(
        format!("{err:#}").contains("6 fragments cannot be merged into 6 groups"),
        "{err:#}"
    );
    let err = run(&args(
        &[
            &base[..],
            &["--spectral-fragments", "9", "--spectral-size-cap", "0.9"],
        ]
        .concat(),
    ))
    .unwrap_err();
    assert!(format!("{err:#}").contains("at least 1"), "{err:#}");
    let err = run(&args(
        &[&base[..], &merged, &["--spectral-refine=-1"]].concat(),
    ))
    .unwrap_err();
    assert!(format!("{err:#}").contains("finite number ≥ 0"), "{err:#}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn of_several_readouts_the_graph_whose_labels_score_highest_is_kept() {
    // One readout holds the three groups, the other noise; the heads predict the groups. Each
    // graph is labelled as it would be alone, and the group readout's labels are kept, whichever
    // column holds it.
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    let (groups, noisy): (Vec<f32>, Vec<f32>) = (
        three_group_embedding(n),
        (0..n * 3).map(|j| noise(j, 3, 11)).collect(),
    );
    let heads = [3, 6];
    let per_head: Vec<Vec<f32>> = heads
        .iter()
        .map(|&k| {
            (0..n)
                .flat_map(|i| {
                    let c = if k == 3 {
                        group(i)
                    } else {
                        group(i) + 3 * (i % 2)
                    };
                    (0..k).map(move |j| noise(i, j, 5) + if j == c { 2.0 } else { 0.0 })
                })
                .collect()
        })
        .collect();
    let out = dir.path().join("labels.parquet");
    let stats_path = dir.path().join("assign-stats.json");
    let label = |file: &Path, extra: &[&str]| {
        let inputs = ["--logits", p(file), "--output", p(&out), "-q"];
        let refined = ["--spectral", "10", "--spectral-refine", "3"];
        let list = [&inputs[..], &refined, &MERGED, extra].concat();
        run(&args(&list)).map(|_| labels::read(&out).unwrap().heads)
    };
    for (main, grid2, kept) in [
        (&noisy, &groups, "embedding_grid2"),
        (&groups, &noisy, "embedding"),
    ] {
        let both = dir.path().join(format!("both-{kept}.parquet"));
        write_features_with_grids(&both, (main, 3), &[(2, grid2, 3)], &heads, &per_head);
        let alone = dir.path().join(format!("alone-{kept}.parquet"));
        write_features(&alone, &groups, 3, &heads, &per_head);
        let expected = label(&alone, &[]).unwrap();
        let read = label(&both, &["--spectral-extra-grids", "2"]).unwrap();
        assert_eq!(read, expected, "{kept}");
        assert!(pure(&read[&0].labels, 3) && pure(&read[&1].labels, 6));
        let stats = read_stats(&stats_path);
        let graph = stats.spectral.unwrap();
        assert_eq!(graph.merge.unwrap().extra_grids, [2]);
        assert_eq!(graph.extra_graphs.len(), 1);
        assert_eq!(
            graph.extra_graphs[0].column.as_deref(),
            Some("embedding_grid2")
        );
        for h in &stats.heads {
            let report = h.merge.as_ref().unwrap();
            assert_eq!(
                report.kept_embedding.as_deref(),
                Some(kept),
                "head {}",
                h.head
            );
            let s = &report.embedding_scores;
            let best = usize::from(kept != "embedding");
            assert!(s.len() == 2 && s[best] > s[1 - best], "{s:?}");
        }
    }
    // A grid the features do not hold is named, and nothing is written.
    std::fs::remove_file(&out).unwrap();
    let both = dir.path().join("both-embedding.parquet");
    let err = label(&both, &["--spectral-extra-grids", "2,5"]).unwrap_err();
    assert!(format!("{err:#}").contains("embedding_grid5"), "{err:#}");
    assert!(!out.exists());
    let unrefined = args(&[
        "--logits",
        p(&both),
        "--output",
        p(&out),
        "--spectral",
        "10",
        "--spectral-fragments",
        "9",
        "--spectral-extra-grids",
        "2",
    ]);
    let err = run(&unrefined).unwrap_err();
    assert!(
        format!("{err:#}").contains("--spectral-extra-grids needs --spectral-refine"),
        "{err:#}"
    );
}

#[test]
fn warm_start_and_churn_against_the_previous_round() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features.parquet");
    features(&feats, 300, &[5, 3], None);
    let first = dir.path().join("r1/labels.parquet");
    run(&args(&["--logits", p(&feats), "--output", p(&first), "-q"])).unwrap();
    let stats1 = dir.path().join("r1/assign-stats.json");

    let second = dir.path().join("r2/labels.parquet");
    run(&args(&[
        "--logits",
        p(&feats),
        "--output",
        p(&second),
        "-q",
        "--warm-start",
        p(&stats1),
        "--previous",
        p(&first),
    ]))
    .unwrap();
    let s2 = read_stats(&dir.path().join("r2/assign-stats.json"));
    let s1 = read_stats(&stats1);
    for (a, b) in s1.heads.iter().zip(&s2.heads) {
        assert!(b.warm_started);
        assert!(
            b.iterations <= 2 && a.iterations > 5,
            "cold {} warm {}",
            a.iterations,
            b.iterations
        );
        assert_eq!(b.churn_fraction, Some(0.0));
        assert!((b.churn_nmi.unwrap() - 1.0).abs() < 1e-12);
    }
    let provenance = labels::read(&second).unwrap().meta.provenance.unwrap();
    assert_eq!(provenance.inputs.len(), 3);

    // Previous labels for head 0 only: head 1 has no churn.
    let prev = labels::read(&first).unwrap();
    let only0 = dir.path().join("only0.parquet");
    let mut heads = std::collections::BTreeMap::new();
    let mut h0: HeadLabels = prev.heads[&0].clone();
    h0.labels
        .iter_mut()
        .take(30)
        .for_each(|l| *l = (*l + 1) % 5);
    heads.insert(0u32, h0);
    labels::write(
        &only0,
        &heads,
        &FileMeta::new(labels::TABLE, labels::VERSION, Provenance::new("test")),
    )
    .unwrap();
    let third = dir.path().join("r3/labels.parquet");
    run(&args(&[
        "--logits",
        p(&feats),
        "--output",
        p(&third),
        "-q",
        "--previous",
        p(&only0),
    ]))
    .unwrap();
    let s3 = read_stats(&dir.path().join("r3/assign-stats.json"));
    assert!((s3.heads[0].churn_fraction.unwrap() - 0.1).abs() < 1e-12);
    assert!(s3.heads[0].churn_nmi.unwrap() < 1.0);
    assert_eq!(s3.heads[1].churn_fraction, None);
    assert_eq!(s3.heads[1].churn_nmi, None);

    // Duals for another K are refused.
    let other = dir.path().join("other.parquet");
    features(&other, 300, &[4], None);
    let err = run(&args(&[
        "--logits",
        p(&other),
        "--output",
        p(&third),
        "-q",
        "--warm-start",
        p(&stats1),
    ]))
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("K = 5") && msg.contains("K = 4") && msg.contains("assign-stats.json"),
        "{msg}"
    );
}

#[test]
fn reruns_are_identical_except_for_timings() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features.parquet");
    features(&feats, 200, &[4, 7], None);
    let mut all = Vec::new();
    for r in ["a", "b"] {
        let out = dir.path().join(r).join("labels.parquet");
        run(&args(&[
            "--logits",
            p(&feats),
            "--output",
            p(&out),
            "-q",
            "--exact-balance",
        ]))
        .unwrap();
        all.push((
            labels::read(&out).unwrap().heads,
            without_seconds(read_stats(&dir.path().join(r).join("assign-stats.json"))),
        ));
    }
    assert_eq!(all[0], all[1]);
}

#[test]
fn config_gives_defaults_and_flags_override() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features.parquet");
    features(&feats, 120, &[3], None);
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        "[pipeline]\nname = \"t\"\nseed = 4\n[data]\ntrain = \"x.parquet\"\nchannels = 1\nheight = 8\nwidth = 8\n\
         [model]\nheads = [3]\n[assign]\nlambda = 10.0\ntol = 1e-4\nexact_balance = true\nprior = \"power:0.5\"\n",
    )
    .unwrap();
    let out = dir.path().join("labels.parquet");
    let base = [
        "--logits",
        p(&feats),
        "--output",
        p(&out),
        "-q",
        "--config",
        p(&config),
        "--round",
        "3",
    ];
    run(&args(&base)).unwrap();
    let s = read_stats(&dir.path().join("assign-stats.json"));
    assert_eq!(
        (s.lambda, s.tol, s.exact_balance, s.prior.as_str()),
        (10.0, 1e-4, true, "power:0.5")
    );
    let prov = labels::read(&out).unwrap().meta.provenance.unwrap();
    assert_eq!(prov.round, Some(3));
    assert_eq!(prov.config_hash.as_ref().map(String::len), Some(16));
    // power:0.5 over 120 rows: shares ∝ 1, 1/√2, 1/√3 → targets 52.5, 37.1, 30.3; exactly
    // balanced sizes are their floors or ceilings.
    let h = &s.heads[0];
    assert_eq!(h.min_cluster_size, 30);
    assert!((52..=53).contains(&h.max_cluster_size), "{h:?}");

    let mut with_flags = base.to_vec();
    with_flags.extend([
        "--lambda",
        "20",
        "--prior",
        "uniform",
        "--set",
        "assign.tol=1e-3",
    ]);
    run(&args(&with_flags)).unwrap();
    let s = read_stats(&dir.path().join("assign-stats.json"));
    assert_eq!((s.lambda, s.tol, s.prior.as_str()), (20.0, 1e-3, "uniform"));
    assert_eq!(s.acceleration, "anderson:5");
    let mut plain = with_flags.clone();
    plain.extend(["--set", "assign.acceleration=none"]);
    run(&args(&plain)).unwrap();
    let s = read_stats(&dir.path().join("assign-stats.json"));
    assert_eq!(s.acceleration, "none");
    with_flags.extend(["--acceleration", "anderson:2"]);
    run(&args(&with_flags)).unwrap();
    let s = read_stats(&dir.path().join("assign-stats.json"));
    assert_eq!(s.acceleration, "anderson:2");
    assert!(s.heads[0].converged);
}

#[test]
fn priors_from_specs_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features.parquet");
    features(&feats, 200, &[4], None);
    let out = dir.path().join("labels.parquet");
    let prior = dir.path().join("prior.parquet");
    sela_io::prior::write(
        &prior,
        &[4.0, 3.0, 2.0, 1.0],
        &FileMeta::new(
            sela_io::prior::TABLE,
            sela_io::prior::VERSION,
            Provenance::new("test"),
        ),
    )
    .unwrap();
    run(&args(&[
        "--logits",
        p(&feats),
        "--output",
        p(&out),
        "-q",
        "--prior",
        p(&prior),
        "--exact-balance",
    ]))
    .unwrap();
    let sizes: Vec<usize> = {
        let mut s = vec![0; 4];
        for &l in &labels::read(&out).unwrap().heads[&0].labels {
            s[l as usize] += 1;
        }
        s
    };
    assert_eq!(sizes, vec![80, 60, 40, 20]);

    let err = run(&args(&[
        "--logits",
        p(&feats),
        "--output",
        p(&out),
        "-q",
        "--prior",
        "zipf",
    ]))
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("neither `uniform`, `power:<a>`"),
        "{err:#}"
    );
    let err = run(&args(&[
        "--logits",
        p(&feats),
        "--output",
        p(&out),
        "-q",
        "--prior",
        "power:x",
    ]))
    .unwrap_err();
    assert!(format!("{err:#}").contains("power:0.5"), "{err:#}");
    let wrong_k = dir.path().join("prior3.parquet");
    sela_io::prior::write(&wrong_k, &[1.0, 1.0, 1.0], &FileMeta::default()).unwrap();
    let err = run(&args(&[
        "--logits",
        p(&feats),
        "--output",
        p(&out),
        "-q",
        "--prior",
        p(&wrong_k),
    ]))
    .unwrap_err();
    assert!(format!("{err:#}").contains("prior3.parquet"), "{err:#}");
}

#[test]
fn bad_inputs_fail_clearly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out/labels.parquet");
    let stats = dir.path().join("out/assign-stats.json");

    let nan = dir.path().join("nan.parquet");
    features(&nan, 50, &[3], Some((17, 2)));
    let o = bin(&["--logits", p(&nan), "--output", p(&out), "-q"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("nan.parquet") && err.contains("logits_0") && err.contains("row 17"),
        "{err}"
    );

    let few = dir.path().join("few.parquet");
    features(&few, 3, &[5], None);
    let o = bin(&["--logits", p(&few), "--output", p(&out), "-q"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("N = 3 rows is fewer than K = 5"), "{err}");

    let ok = dir.path().join("ok.parquet");
    features(&ok, 300, &[6], None);
    for bad in ["0", "-1", "nan"] {
        let o = bin(&["--logits", p(&ok), "--output", p(&out), "--lambda", bad]);
        assert_eq!(o.status.code(), Some(2), "lambda {bad}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("--lambda"));
    }
    for bad in ["fast", "anderson:0", "anderson:99"] {
        let o = bin(&[
            "--logits",
            p(&ok),
            "--output",
            p(&out),
            "--acceleration",
            bad,
        ]);
        assert_eq!(o.status.code(), Some(2), "acceleration {bad}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--acceleration") && err.contains(bad), "{err}");
    }

    let o = bin(&[
        "--logits",
        p(&ok),
        "--output",
        p(&out),
        "-q",
        "--max-iters",
        "1",
        "--tol",
        "1e-9",
        "--strict",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("did not converge") && err.contains("--strict"),
        "{err}"
    );
    assert!(!out.exists() && !stats.exists());

    // Without --strict the same run succeeds, warns, and records the failure.
    let o = bin(&[
        "--logits",
        p(&ok),
        "--output",
        p(&out),
        "-q",
        "--max-iters",
        "1",
        "--tol",
        "1e-9",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: head 0"));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["heads"][0]["converged"], false);
    assert!(!read_stats(&stats).heads[0].converged);
}

/// Started by an MPI launcher as one of several copies, a build without MPI refuses to run
/// instead of letting every copy solve everything and write the same output.
#[cfg(not(feature = "mpi"))]
#[test]
fn without_mpi_support_many_launched_copies_refuse_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features.parquet");
    features(&feats, 60, &[3], None);
    let out = dir.path().join("labels.parquet");
    let run = |size: &str| {
        Command::new(env!("CARGO_BIN_EXE_sela-assign"))
            .args(["--logits", p(&feats), "--output", p(&out), "-q"])
            .env("OMPI_COMM_WORLD_SIZE", size)
            .output()
            .unwrap()
    };
    let o = run("4");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("one of 4 MPI processes") && err.contains("--features mpi"),
        "{err}"
    );
    assert!(!out.exists());
    // One copy (`mpirun -np 1`) is an ordinary run.
    assert!(run("1").status.success());
    assert!(out.is_file());
}

#[test]
fn help_names_the_flags() {
    let o = bin(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--logits",
        "--output",
        "--column",
        "--lambda",
        "--tol",
        "--max-iters",
        "--prior",
        "--previous",
        "--warm-start",
        "--exact-balance",
        "--neighbours",
        "--neighbours-until-round",
        "--strict",
        "--seed",
        "--stats",
        "--config",
        "--quiet",
        "N ≥ K",
    ] {
        assert!(help.contains(flag), "{flag} missing from help");
    }
}
