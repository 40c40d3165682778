//! Training speed of the default backbone: images/s of a full step (forward, backward, optimiser
//! update) at batch 256 for candle's autograd graph with candle's convolution, the same graph with
//! the gemm convolution op, and sela-nn's fused engine; the share of time the engine's step waits
//! on the augmenting loader; the time of a 60,000-image epoch; inference images/s (the forward
//! `sela-extract` runs); and, when Python has torch, the same network in PyTorch on the same
//! number of threads.
//!
//! `cargo bench -p sela-nn --bench train_speed`
//!
//! Environment: SELA_BENCH_THREADS (2), SELA_BENCH_BATCH (256), SELA_BENCH_WIDTHS (16,32,64),
//! SELA_BENCH_BLOCKS (1,1,1), SELA_BENCH_STEPS (engine steps, 20), SELA_BENCH_CANDLE_STEPS (3),
//! SELA_BENCH_SKIP_CANDLE (set to skip the candle graphs), SELA_BENCH_SKIP_TORCH.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use sela_config::AugmentSection;
use sela_images::loader::{Prefetcher, View};
use sela_images::{ImageSet, Normalize, Rng};
use sela_nn::reference::{ConvImpl, Reference};
use sela_nn::{ModelSpec, Network, Optimizer, OptimizerKind, Readout};

fn env_list(key: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(key)
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().parse().expect(key)).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn env_num(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .map(|v| v.parse().expect(key))
        .unwrap_or(default)
}

fn sgd() -> OptimizerKind {
    OptimizerKind::Sgd {
        momentum: 0.9,
        weight_decay: 5e-4,
    }
}

fn synthetic_set(n: usize, c: usize, side: usize) -> ImageSet {
    let mut rng = Rng::new(5);
    ImageSet {
        ids: (0..n as u64).collect(),
        labels: vec![None; n],
        class_names: vec![],
        channels: c,
        height: side,
        width: side,
        pixels: (0..n * c * side * side)
            .map(|_| rng.below(256) as u8)
            .collect(),
    }
}

/// Timed repetitions of the engine's and PyTorch's runs; the best counts, since other load on the
/// machine only ever slows a run down.
const REPEATS: usize = 3;

struct Row {
    name: &'static str,
    img_s: f64,
}

fn main() {
    let threads = env_num("SELA_BENCH_THREADS", 2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");
    let batch = env_num("SELA_BENCH_BATCH", 256);
    let widths = env_list("SELA_BENCH_WIDTHS", &[16, 32, 64]);
    let blocks = env_list("SELA_BENCH_BLOCKS", &[1, 1, 1]);
    let steps = env_num("SELA_BENCH_STEPS", 20);
    let candle_steps = env_num("SELA_BENCH_CANDLE_STEPS", 3);
    let skip_candle = std::env::var_os("SELA_BENCH_SKIP_CANDLE").is_some();
    let skip_torch = std::env::var_os("SELA_BENCH_SKIP_TORCH").is_some();
    let heads = vec![10];
    println!(
        "sela-nn train_speed: batch {batch}, {threads} threads, widths {widths:?}, blocks {blocks:?}, heads {heads:?}, SGD momentum"
    );
    for (c, side) in [(1usize, 28usize), (3, 32)] {
        let spec = ModelSpec {
            backbone: "resnet".into(),
            channels: c,
            height: side,
            width: side,
            widths: widths.clone(),
            blocks: blocks.clone(),
            heads: heads.clone(),
            embedding_heads: Vec::new(),
            embedding_readout: None,
        };
        let net0 = Network::init(&spec, 1).expect("network");
        println!(
            "\ninput {c}×{side}×{side}: {} parameters",
            net0.parameter_count()
        );
        let mut rng = Rng::new(3);
        let x: Vec<f32> = (0..batch * spec.image_len())
            .map(|_| rng.normal() as f32)
            .collect();
        let labels: Vec<u32> = (0..batch).map(|_| rng.below(10) as u32).collect();
        let mut rows = Vec::new();

        if !skip_candle {
            for (name, conv) in [
                ("candle graph, candle conv2d", ConvImpl::Candle),
                ("candle graph, gemm conv op", ConvImpl::Gemm),
            ] {
                let mut r = Reference::new(&net0, conv).expect("graph");
                let mut opt = Optimizer::new(sgd(), net0.params());
                r.train_step(&x, batch, &[&labels], &mut opt, 0.01)
                    .expect("step");
                let t = Instant::now();
                for _ in 0..candle_steps {
                    r.train_step(&x, batch, &[&labels], &mut opt, 0.01)
                        .expect("step");
                }
                let img_s = (candle_steps * batch) as f64 / t.elapsed().as_secs_f64();
                rows.push(Row { name, img_s });
            }
        }

        // The engine on a fixed batch (compute only).
        let mut net = net0.clone();
        let mut opt = Optimizer::new(sgd(), net.params());
        net.train_step(&x, batch, &[&labels], &mut opt, 0.01)
            .expect("step");
        let mut engine = 0.0f64;
        for _ in 0..REPEATS {
            let t = Instant::now();
            for _ in 0..steps {
                net.train_step(&x, batch, &[&labels], &mut opt, 0.01)
                    .expect("step");
            }
            engine = engine.max((steps * batch) as f64 / t.elapsed().as_secs_f64());
        }
        rows.push(Row {
            name: "sela-nn engine (fixed batch, best of 3)",
            img_s: engine,
        });

        // The engine fed by the augmenting, prefetching loader.
        let set = Arc::new(synthetic_set(batch * (steps + 1), c, side));
        let norm = Normalize {
            mean: vec![0.5; c],
            std: vec![0.25; c],
        };
        let aug = AugmentSection {
            hflip: c == 3,
            grayscale_p: if c == 3 { 0.2 } else { 0.0 },
            ..AugmentSection::default()
        };
        let mut loader = Prefetcher::start(set, batch, View::Augmented(aug), norm, 1, 0, 0, 2);
        let first = loader.next().expect("batch");
        net.train_step(&first.images, batch, &[&labels], &mut opt, 0.01)
            .expect("step");
        let waited0 = loader.waited();
        let t = Instant::now();
        let mut done = 0;
        for b in loader.by_ref() {
            net.train_step(&b.images, batch, &[&labels], &mut opt, 0.01)
                .expect("step");
            done += batch;
        }
        let total = t.elapsed().as_secs_f64();
        let waited = (loader.waited() - waited0).as_secs_f64();
        let loaded = done as f64 / total;
        rows.push(Row {
            name: "sela-nn engine + augmenting loader",
            img_s: loaded,
        });

        // Inference as `sela-extract` runs it: BatchNorm folded, no backward (best of 3).
        let mut infer = 0.0f64;
        for _ in 0..REPEATS {
            let t = Instant::now();
            for _ in 0..steps {
                net.infer(&x, batch, Readout::heads_input(&spec))
                    .expect("infer");
            }
            infer = infer.max((steps * batch) as f64 / t.elapsed().as_secs_f64());
        }

        let torch = (!skip_torch)
            .then(|| torch_img_s(c, side, batch, threads, &widths, &blocks))
            .flatten();
        let base = rows.first().map(|r| r.img_s).unwrap_or(engine);
        println!("  {:<42} {:>10} {:>10}", "", "images/s", "× first");
        for r in &rows {
            println!(
                "  {:<42} {:>10.0} {:>9.2}×",
                r.name,
                r.img_s,
                r.img_s / base
            );
        }
        if let Some(t) = torch {
            println!(
                "  {:<42} {:>10.0} {:>9.2}×",
                "PyTorch (same network, best of 3)",
                t,
                t / base
            );
            println!("  engine / PyTorch: {:.2}×", engine / t);
        }
        println!(
            "  inference (sela-extract's forward, best of 3): {infer:.0} images/s; 70,000 images ≈ {:.0} s",
            70_000.0 / infer
        );
        println!(
            "  loader wait: {:.1}% of the loaded run; 60,000-image epoch ≈ {:.0} s",
            100.0 * waited / total,
            60_000.0 / loaded
        );
    }
}

/// Images/s of `torch_reference.py`, when Python has torch.
fn torch_img_s(
    c: usize,
    side: usize,
    batch: usize,
    threads: usize,
    widths: &[usize],
    blocks: &[usize],
) -> Option<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_reference.py");
    let ok = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        println!("  (PyTorch: python3 cannot import torch; skipped)");
        return None;
    }
    let join = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let out = Command::new("python3")
        .arg(script)
        .args(["--channels", &c.to_string(), "--size", &side.to_string()])
        .args([
            "--batch",
            &batch.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .args(["--widths", &join(widths), "--blocks", &join(blocks)])
        .args(["--repeats", &REPEATS.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("images_per_sec "))
        .and_then(|v| v.trim().parse().ok());
    if v.is_none() {
        println!(
            "  (PyTorch run failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    v
}
