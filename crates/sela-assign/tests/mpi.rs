//! The stage under `mpirun --oversubscribe -np R` (R = 1..4) against the single-process run on
//! the same part files: identical labels, confidences and statistics; and failures (a bad part
//! file on one rank, a rank that dies) that fail the job, name the rank and the file, and
//! publish nothing. Needs OpenMPI's `mpirun` (`make test-mpi` installs it).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sela_io::features::{FeaturesInfo, FeaturesWriter};
use sela_io::labels::{self, AssignStats};
use sela_io::parts::Shard;
use sela_io::Provenance;

fn noise(i: u64, j: usize, seed: u64) -> f32 {
    let mut z = i << 20 ^ (j as u64) ^ seed << 50;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// Logits of dataset row `id` for a head of `k` clusters: a bump at a skewed cluster, noise,
/// and every eleventh row a copy of row 0's (exact ties).
fn row(id: u64, k: usize, seed: u64) -> Vec<f32> {
    let src = if id % 11 == 5 { 0 } else { id };
    let c = ((src * 7) % (3 * k as u64) % k as u64) as usize;
    (0..k)
        .map(|j| noise(src, j, seed) + if j == c { 2.0 } else { 0.0 })
        .collect()
}

/// The features of `n` rows (ids 100.., in a scrambled order within each part) as `parts`
/// shards (row id in shard id % parts), heads of the given sizes. `nan` poisons one row of one
/// part.
fn features(dir: &Path, n: u64, parts: usize, heads: &[usize], nan: Option<(usize, u64)>) {
    std::fs::create_dir_all(dir).unwrap();
    let info = FeaturesInfo {
        layout: sela_io::features::FeaturesLayout {
            embedding_dim: 2,
            head_sizes: heads.to_vec(),
            extra_embeddings: Vec::new(),
        },
        dataset: "data.parquet".into(),
        dataset_rows: n,
        checkpoint: None,
    };
    for p in 0..parts {
        let shard = Shard::new(p, parts).unwrap();
        let mut ids: Vec<u64> = (100..100 + n).filter(|&id| shard.contains(id)).collect();
        ids.reverse();
        let path = dir.join(shard.file_name());
        let mut w = FeaturesWriter::create(&path, &info, shard, Provenance::new("test")).unwrap();
        let emb = vec![0f32; 2 * ids.len()];
        let mut logits: Vec<Vec<f32>> = heads
            .iter()
            .enumerate()
            .map(|(h, &k)| ids.iter().flat_map(|&id| row(id, k, h as u64)).collect())
            .collect();
        if let Some((part, at)) = nan {
            if part == p {
                logits[0][at as usize * heads[0] + 1] = f32::NAN;
            }
        }
        let refs: Vec<&[f32]> = logits.iter().map(|v| v.as_slice()).collect();
        w.push(&ids, &emb, &refs).unwrap();
        w.finish().unwrap();
    }
}

fn single(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sela-assign"))
        .args(args)
        .env_remove("OMPI_COMM_WORLD_SIZE")
        .output()
        .unwrap()
}

fn mpirun(ranks: usize, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "--bind-to", "none", "-np"])
        .arg(ranks.to_string());
    for (k, v) in envs {
        cmd.args(["-x", &format!("{k}={v}")]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_sela-assign"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun (OpenMPI) must be installed: make test-mpi installs it")
}

fn ok(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn stats(path: &Path) -> AssignStats {
    let mut s: AssignStats = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for h in &mut s.heads {
        h.seconds = 0.0;
    }
    s
}

/// Entries of `dir` other than `keep`.
fn others(dir: &Path, keep: &[&str]) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| !keep.contains(&f.file_name().unwrap().to_str().unwrap()))
        .collect()
}

#[test]
fn every_rank_count_gives_the_single_process_labels() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features");
    features(&feats, 1003, 5, &[4, 7], None);
    let base = |out: &Path| -> Vec<String> {
        ["--logits", p(&feats), "--output", p(out), "-q"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    // A plain run, then the next round: warm-started, churn against it, a prior, exact balance.
    let first = dir.path().join("one/labels.parquet");
    let a = base(&first);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    ok(&single(&a), "single-process run");
    let next = dir.path().join("two/labels.parquet");
    let warm = dir.path().join("one/assign-stats.json");
    let mut b = base(&next);
    b.extend(
        [
            "--warm-start",
            p(&warm),
            "--previous",
            p(&first),
            "--prior",
            "power:0.5",
            "--lambda",
            "40",
            "--exact-balance",
            "--seed",
            "7",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    ok(&single(&b), "single-process second round");
    let s2 = stats(&dir.path().join("two/assign-stats.json"));
    assert!(s2.exact_balance && s2.heads.iter().all(|h| h.warm_started));
    assert!(s2.heads.iter().all(|h| h.churn_nmi.is_some()));

    for (args, out, label) in [(&a, &first, "plain"), (&b, &next, "second round")] {
        let want = labels::read(out).unwrap();
        let want_stats = stats(&out.parent().unwrap().join("assign-stats.json"));
        for ranks in 1..=4 {
            let mdir = dir.path().join(format!("mpi-{ranks}-{}", label.len()));
            let mout = mdir.join("labels");
            let margs: Vec<&str> = args
                .iter()
                .map(|&x| if x == p(out) { p(&mout) } else { x })
                .collect();
            let run = mpirun(ranks, &margs, &[]);
            ok(&run, &format!("{label}, {ranks} ranks"));
            let summary = String::from_utf8_lossy(&run.stdout);
            assert_eq!(summary.lines().count(), 1, "one summary line: {summary}");
            let parts: Vec<String> = (0..ranks)
                .map(|r| Shard::new(r, ranks).unwrap().file_name())
                .collect();
            let mut found: Vec<String> = std::fs::read_dir(&mout)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            found.sort();
            assert_eq!(found, parts, "{label}, {ranks} ranks");
            let got = labels::read(&mout).unwrap();
            assert_eq!(got.heads, want.heads, "{label}, {ranks} ranks: labels");
            let got_stats = stats(&mdir.join("assign-stats.json"));
            assert_eq!(got_stats, want_stats, "{label}, {ranks} ranks: statistics");
            let in_meta: AssignStats = got.meta.require_json(&mout, labels::KEY_ASSIGN).unwrap();
            assert_eq!(in_meta.heads.len(), 2);
            assert!(others(&mdir, &["labels", "assign-stats.json"]).is_empty());
        }
    }
}

#[test]
fn a_bad_part_fails_the_job_naming_rank_and_file() {
    let dir = tempfile::tempdir().unwrap();
    // A NaN logit in part 2 of 4: read by rank 2 % R.
    let feats = dir.path().join("nan");
    features(&feats, 400, 4, &[5], Some((2, 17)));
    let out = dir.path().join("out/labels");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    for ranks in [2usize, 3] {
        let run = mpirun(
            ranks,
            &["--logits", p(&feats), "--output", p(&out), "-q"],
            &[],
        );
        assert!(!run.status.success());
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            err.contains(&format!("rank {}: ", 2 % ranks))
                && err.contains("part-00002-of-00004.parquet")
                && err.contains("column `logits_0`, row 17")
                && err.contains("non-finite"),
            "{ranks} ranks: {err}"
        );
        assert!(
            others(out.parent().unwrap(), &[]).is_empty(),
            "nothing published"
        );
    }
    // A truncated part: the whole-set check (rank 0) refuses it.
    let feats = dir.path().join("cut");
    features(&feats, 400, 4, &[5], None);
    let victim = feats.join("part-00003-of-00004.parquet");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let run = mpirun(2, &["--logits", p(&feats), "--output", p(&out), "-q"], &[]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("rank 0: ") && err.contains("part-00003-of-00004.parquet"),
        "{err}"
    );
    assert!(
        others(out.parent().unwrap(), &[]).is_empty(),
        "nothing published"
    );
}

#[test]
fn a_dying_rank_publishes_nothing_and_reruns_replace_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features");
    // Two parts for three ranks: one rank reads no file, and still holds rows.
    features(&feats, 300, 2, &[3], None);
    let out = dir.path().join("run/labels.parquet");
    let args = ["--logits", p(&feats), "--output", p(&out), "-q"];
    let alone = dir.path().join("alone/labels.parquet");
    ok(
        &single(&["--logits", p(&feats), "--output", p(&alone), "-q"]),
        "single-process run",
    );
    let run = mpirun(3, &args, &[(sela_assign::mpi::ABORT_RANK, "1")]);
    assert!(!run.status.success(), "the job must fail");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("rank 1"), "mpirun names the dead rank: {err}");
    assert!(!out.exists(), "no labels published");
    assert!(!dir.path().join("run/assign-stats.json").exists());
    // The dead job left its hidden staging directory; the next run removes it.
    let run_dir = dir.path().join("run");
    assert_eq!(
        others(&run_dir, &[]).len(),
        1,
        "{:?}",
        others(&run_dir, &[])
    );
    ok(&mpirun(3, &args, &[]), "rerun");
    let left = others(&run_dir, &["labels.parquet", "assign-stats.json"]);
    assert!(left.is_empty(), "{left:?}");
    let first = labels::read(&out).unwrap();
    assert_eq!(first.heads, labels::read(&alone).unwrap().heads);
    // A run with another rank count replaces the whole set of parts.
    ok(&mpirun(2, &args, &[]), "rerun with 2 ranks");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
    assert_eq!(labels::read(&out).unwrap().heads, first.heads);
}
