//! The report of a small but real run directory (tables written by sela-io's writers and by the
//! evaluation stage itself), checked in a headless Chromium.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sela_config::PipelineConfig;
use sela_images::codec::{encode_png, Pixels};
use sela_images::Rng;
use sela_io::dataset::DatasetWriter;
use sela_io::features::{FeaturesInfo, FeaturesLayout, FeaturesWriter};
use sela_io::labels::{AssignStats, HeadLabels, HeadStats};
use sela_io::parts::Shard;
use sela_io::train_log::TrainLogRow;
use sela_io::{FileMeta, Provenance};
use sela_report::{run, ReportOptions};

const CLASSES: usize = 3;
const TRAIN: usize = 60;
const TEST: usize = 30;
const DIM: usize = 8;
const HEADS: [usize; 2] = [3, 5];
const GALLERY: usize = 4;
const ROUNDS: u32 = 3;

/// A 28×28 picture of the class's shape: a disc, a square or a triangle, shifted a little.
fn picture(class: usize, i: usize) -> Vec<u8> {
    let (dx, dy) = ((i % 5) as f64 - 2.0, (i / 5 % 5) as f64 - 2.0);
    let data = (0..28 * 28)
        .map(|p| {
            let x = (p % 28) as f64 - 14.0 - dx;
            let y = (p / 28) as f64 - 14.0 - dy;
            let inside = match class {
                0 => x * x + y * y < 81.0,
                1 => x.abs() < 8.0 && y.abs() < 8.0,
                _ => y < 8.0 && y > -9.0 && x.abs() < (y + 9.0) * 0.5,
            };
            if inside {
                230
            } else {
                20
            }
        })
        .collect();
    encode_png(&Pixels {
        width: 28,
        height: 28,
        channels: 1,
        data,
    })
    .unwrap()
}

fn write_dataset(path: &Path, n: usize, first_id: u64, labelled: bool) {
    let names: Vec<String> = ["Disc", "Square", "Triangle"].map(String::from).to_vec();
    let mut w = DatasetWriter::create(path, &names, Provenance::new("test")).unwrap();
    for i in 0..n {
        let c = i % CLASSES;
        let label = labelled.then_some(c as i64);
        w.push(first_id + i as u64, &picture(c, i), None, label)
            .unwrap();
    }
    w.finish().unwrap();
}

/// Model outputs that get better with the round: class signal of strength `round`.
fn write_features(dir: &Path, n: usize, first_id: u64, round: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let info = FeaturesInfo {
        layout: FeaturesLayout {
            embedding_dim: DIM,
            head_sizes: HEADS.to_vec(),
            extra_embeddings: Vec::new(),
        },
        dataset: "dataset.parquet".into(),
        dataset_rows: n as u64,
        checkpoint: None,
    };
    let mut w = FeaturesWriter::create(
        dir.join(Shard::WHOLE.file_name()),
        &info,
        Shard::WHOLE,
        Provenance::new("test"),
    )
    .unwrap();
    let mut rng = Rng::new(u64::from(round) * 1000 + n as u64);
    let s = round as f32;
    for i in 0..n {
        let c = i % CLASSES;
        let e: Vec<f32> = (0..DIM)
            .map(|d| if d == c { s } else { 0.0 } + rng.normal() as f32)
            .collect();
        let l0: Vec<f32> = (0..3)
            .map(|k| if k == (c + 2) % 3 { 1.5 * s } else { 0.0 } + rng.normal() as f32)
            .collect();
        let l1: Vec<f32> = (0..5).map(|_| rng.normal() as f32).collect();
        w.push(&[first_id + i as u64], &e, &[&l0, &l1]).unwrap();
    }
    w.finish().unwrap();
}

/// A run of `rounds` rounds after round 0, evaluated by the real evaluation stage.
fn build_run(root: &Path, rounds: u32, labelled: bool) -> PipelineConfig {
    write_dataset(&root.join("train.parquet"), TRAIN, 1000, labelled);
    write_dataset(&root.join("test.parquet"), TEST, 5000, labelled);
    let toml = format!(
        "[pipeline]\nname = \"tiny <run>\"\n[data]\ntrain = \"{}\"\ntest = \"{}\"\nchannels = 1\n\
         height = 28\nwidth = 28\n[model]\nheads = [3, 5]\n[eval]\nknn_k = [5, 20]\n\
         probe_epochs = 30\ngallery_size = {GALLERY}\n",
        root.join("train.parquet").display(),
        root.join("test.parquet").display()
    );
    std::fs::write(root.join("p.toml"), toml).unwrap();
    let config = PipelineConfig::load(&root.join("p.toml")).unwrap();
    let run_dir = root.join("runs/tiny");
    for round in 0..=rounds {
        let dir = run_dir.join(format!("round-{round:03}"));
        write_features(&dir.join("features-train"), TRAIN, 1000, round);
        write_features(&dir.join("features-test"), TEST, 5000, round);
        if round > 0 {
            // Labels: right for all but a shrinking number of images; confidence lowest on
            // the wrong ones.
            let wrong = (rounds - round + 1) as usize * 4;
            let mut heads = BTreeMap::new();
            let ids: Vec<u64> = (0..TRAIN as u64).map(|i| 1000 + i).collect();
            let labels0: Vec<u32> = (0..TRAIN)
                .map(|i| ((i % CLASSES + usize::from(i < wrong)) % CLASSES) as u32)
                .collect();
            let conf0: Vec<f32> = (0..TRAIN)
                .map(|i| {
                    if i < wrong {
                        0.4
                    } else {
                        0.6 + 0.005 * i as f32
                    }
                })
                .collect();
            heads.insert(
                0u32,
                HeadLabels {
                    ids: ids.clone(),
                    labels: labels0,
                    confidence: conf0,
                },
            );
            heads.insert(
                1u32,
                HeadLabels {
                    ids: ids.clone(),
                    labels: (0..TRAIN).map(|i| (i % 5) as u32).collect(),
                    confidence: vec![0.5; TRAIN],
                },
            );
            let meta = FileMeta::new(
                sela_io::labels::TABLE,
                sela_io::labels::VERSION,
                Provenance::new("test"),
            );
            sela_io::labels::write(dir.join("labels.parquet"), &heads, &meta).unwrap();
            let stats = AssignStats {
                heads: (0..2)
                    .map(|h| HeadStats {
                        head: h,
                        iterations: 40 - 5 * round as usize + h as usize,
                        seconds: 0.01 * f64::from(round),
                        churn_fraction: (round > 1).then(|| 0.3 / f64::from(round)),
                        churn_nmi: (round > 1).then(|| 1.0 - 0.3 / f64::from(round)),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            std::fs::write(
                dir.join("assign-stats.json"),
                serde_json::to_vec(&stats).unwrap(),
            )
            .unwrap();
            let log: Vec<TrainLogRow> = (0..10u64)
                .flat_map(|step| {
                    (0..2u32).map(move |head| TrainLogRow {
                        round,
                        epoch: round,
                        step: u64::from(round) * 10 + step,
                        head,
                        loss: 2.0 / (f32::from(round as u8) + step as f32 * 0.1),
                        lr: 0.05,
                        images_per_sec: 1000.0,
                    })
                })
                .collect();
            let meta = FileMeta::new(
                sela_io::train_log::TABLE,
                sela_io::train_log::VERSION,
                Provenance::new("test"),
            );
            sela_io::train_log::write(dir.join("train_log.parquet"), &log, &meta).unwrap();
        }
        let opts = sela_eval::EvalOptions {
            config: config.clone(),
            round,
            features_train: dir.join("features-train"),
            features_test: Some(dir.join("features-test")),
            labels: (round > 0).then(|| dir.join("labels.parquet")),
            assign_stats: (round > 0).then(|| dir.join("assign-stats.json")),
            metrics: run_dir.join("metrics.parquet"),
            cluster_stats: dir.join("cluster_stats.parquet"),
            quiet: true,
        };
        sela_eval::run(&opts).unwrap();
    }
    config
}

fn options(config: PipelineConfig, root: &Path) -> ReportOptions {
    let run_dir = root.join("runs/tiny");
    ReportOptions {
        config,
        output: run_dir.join("report.html"),
        run_dir,
        head: 0,
        floors: vec![("nmi".into(), 0.5), ("knn5_acc".into(), 0.9)],
        floor_label: "pixel-space floor".into(),
        max_clusters: 60,
    }
}

/// Head 0 has 3 clusters of 20 images: 4 most and 4 least confident each.
const GALLERY_IMAGES: usize = 3 * 2 * GALLERY;

#[test]
fn report_of_a_real_run_is_complete_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let config = build_run(dir.path(), ROUNDS, true);
    let opts = options(config, dir.path());
    let summary = run(&opts).unwrap();
    assert_eq!(summary.rounds, vec![0, 1, 2, 3]);
    assert_eq!(summary.gallery_clusters, 3);
    assert_eq!(summary.gallery_images, GALLERY_IMAGES);
    let html = std::fs::read_to_string(&opts.output).unwrap();
    for heading in [
        "Is it learning?",
        "Metrics over rounds",
        "Clusters",
        "Cluster galleries",
        "Clustering vs ground truth (head 0, test)",
        "Embedding quality (test)",
        "Label churn",
        "Sinkhorn iterations",
        "Training loss",
        "Clusters × classes",
        "Cluster sizes (head 0, K=3, round 3)",
        "tiny &lt;run&gt;",
        "majority <b>Square</b>",
    ] {
        assert!(html.contains(heading), "missing {heading}");
    }
    assert_eq!(html.matches("<img class=\"g").count(), GALLERY_IMAGES);
    assert_eq!(html.matches("<svg").count(), summary.charts);
    // Self-contained: no reference to anything outside the file.
    // (The only URL is the SVG namespace, which is a name, not a fetch.)
    let without_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for outside in [
        "http:", "https:", "src=\"/", "url(", "@import", "<script", "<link",
    ] {
        assert!(!without_ns.contains(outside), "{outside}");
    }
    // Same inputs, same bytes.
    let first = std::fs::read(&opts.output).unwrap();
    run(&opts).unwrap();
    assert_eq!(std::fs::read(&opts.output).unwrap(), first);
}

#[test]
fn round_zero_only_uses_the_heads_argmax_and_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = build_run(dir.path(), 0, true);
    let mut opts = options(config.clone(), dir.path());
    let summary = run(&opts).unwrap();
    let html = std::fs::read_to_string(&opts.output).unwrap();
    assert!(html.contains("argmax on round 0"), "argmax source");
    assert!(html.contains("Only round 0 is evaluated so far"));
    assert_eq!(
        summary.gallery_images,
        html.matches("<img class=\"g").count()
    );

    opts.head = 7;
    let err = format!("{:#}", run(&opts).unwrap_err());
    assert!(err.contains("--head 7") && err.contains("2 heads"), "{err}");

    let mut opts = options(config, dir.path());
    opts.run_dir = dir.path().join("runs/none");
    std::fs::create_dir_all(&opts.run_dir).unwrap();
    opts.output = opts.run_dir.join("report.html");
    let err = format!("{:#}", run(&opts).unwrap_err());
    assert!(
        err.contains("metrics.parquet") && err.contains("sela-eval"),
        "{err}"
    );
    assert!(!opts.output.exists());
}

#[test]
fn without_ground_truth_the_page_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = build_run(dir.path(), 1, false);
    let opts = options(config, dir.path());
    let summary = run(&opts).unwrap();
    let html = std::fs::read_to_string(&opts.output).unwrap();
    assert!(html.contains("no ground truth in the metrics"));
    assert!(html.contains("no cluster × class heat map"));
    assert!(!html.contains("Clusters × classes"));
    assert!(!html.contains("majority <b>") && !html.contains("red frame"));
    assert_eq!(summary.gallery_images, GALLERY_IMAGES);
    assert!(html.contains("Sinkhorn iterations"));
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("SELA_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "headless Chromium not found at {} (set SELA_CHROMIUM, or install it: \
         `apt-get install chromium`; `make test` does this)",
        path.display()
    );
    path
}

/// Runs headless Chromium on `page` with `extra` flags, returning its stdout (written to a file,
/// so that a large DOM cannot fill a pipe and stall the browser).
fn headless(page: &Path, profile: &Path, extra: &[String]) -> String {
    let stdout_path = profile.with_extension("stdout");
    let stdout = std::fs::File::create(&stdout_path).unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
            "--window-size=1200,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdout(stdout)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromium");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "chromium failed: {status:?}");
    std::fs::read_to_string(&stdout_path).unwrap()
}

#[test]
fn report_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let config = build_run(dir.path(), ROUNDS, true);
    let opts = options(config, dir.path());
    run(&opts).unwrap();
    let profile = dir.path().join("chromium-profile");

    // What the browser made of the page: a copy with a probe script that records, once loaded,
    // how many images decoded and how many charts got a layout box.
    let html = std::fs::read_to_string(&opts.output).unwrap();
    let probe = "<script>window.addEventListener('load',function(){\
        var imgs=[].slice.call(document.querySelectorAll('img.g'));\
        var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth===28;}).length;\
        var svgs=[].slice.call(document.querySelectorAll('svg'));\
        var drawn=svgs.filter(function(s){var r=s.getBoundingClientRect();\
        return r.width>200&&r.height>150;}).length;\
        var p=document.createElement('pre');p.id='probe';\
        p.textContent='images '+ok+'/'+imgs.length+' charts '+drawn+'/'+svgs.length;\
        document.body.appendChild(p);});</script></body>";
    let probed = dir.path().join("probed.html");
    std::fs::write(&probed, html.replace("</body>", probe)).unwrap();
    let dom = headless(&probed, &profile, &["--dump-dom".to_string()]);
    assert!(
        dom.contains("Is it learning?"),
        "DOM: {}",
        &dom[..dom.len().min(500)]
    );
    let charts = html.matches("<svg").count();
    let want = format!("images {GALLERY_IMAGES}/{GALLERY_IMAGES} charts {charts}/{charts}");
    assert!(
        dom.contains(&want),
        "expected `{want}` in the probe output: {:?}",
        dom.split("id=\"probe\">")
            .nth(1)
            .map(|s| &s[..s.len().min(80)])
    );

    // And what it looks like: a screenshot of the report itself that is not blank.
    let shot = dir.path().join("shot.png");
    headless(
        &opts.output,
        &profile,
        &[format!("--screenshot={}", shot.display())],
    );
    // For a look by eye: SELA_KEEP_REPORT_DIR=/some/dir keeps the page and the screenshot.
    if let Some(keep) = std::env::var_os("SELA_KEEP_REPORT_DIR") {
        let keep = PathBuf::from(keep);
        std::fs::copy(&shot, keep.join("report.png")).unwrap();
        std::fs::copy(&opts.output, keep.join("report.html")).unwrap();
    }
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (1200, 2000));
    let lum: Vec<f64> = img
        .pixels()
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect();
    let mean = lum.iter().sum::<f64>() / lum.len() as f64;
    let var = lum.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / lum.len() as f64;
    let dark = lum.iter().filter(|&&l| l < 128.0).count() as f64 / lum.len() as f64;
    assert!(
        var > 100.0,
        "screenshot looks blank: luminance variance {var}"
    );
    assert!(dark > 0.005, "almost no dark pixels (text, lines): {dark}");
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(
        colours.len() > 50,
        "only {} distinct colours",
        colours.len()
    );
}
