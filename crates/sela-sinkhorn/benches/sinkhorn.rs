//! Sinkhorn benchmark: solves clustered logits at several sizes and prints, per size, total
//! seconds, iterations, seconds per iteration and the ratio of one iteration to one plain
//! streaming read of the same matrix (the memory-bandwidth floor), cold and warm-started, with
//! plain updates and with Anderson acceleration, beside the float64 numpy implementation of
//! the same schemes (`numpy_baseline.py`) on the same data. Two speed-ups are printed: over
//! numpy with the same updates and start, and over numpy's plain cold solve (the reference the
//! goals are stated against). The peak resident memory of the whole run is printed at the end.
//!
//! `cargo bench -p sela-sinkhorn --bench sinkhorn` runs 20k×100 and 200k×1,000;
//! `-- --imagenet` adds 1,281,167×3,000 (about 16 GB; numpy is skipped there, it would need
//! twice that in float64). `-- --no-numpy` skips the baseline.
//!
//! The data: each row belongs to a cluster drawn with shares 1..5 (cycling over clusters); its
//! logits are 3.0 at its cluster plus noise of standard deviation 1. The warm-start case is the
//! next round: the same rows with 5% fresh noise added, started from the first solve's duals.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use rayon::prelude::*;
use sela_sinkhorn::{uniform_marginals, Acceleration, Sinkhorn};

const LAMBDA: f64 = 25.0;
const TOL: f64 = 1e-3;
const MAX_ITERS: usize = 1000;
const PEAK: f32 = 3.0;
const DRIFT: f32 = 0.05;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An approximately standard normal number from one hash (Irwin–Hall of four 16-bit uniforms).
fn normal(h: u64) -> f32 {
    let s: u64 = (0..4).map(|i| (h >> (16 * i)) & 0xffff).sum();
    (s as f32 / 65536.0 - 2.0) * 3f32.sqrt()
}

/// Row-major clustered logits; `round` > 0 adds that round's drift noise on top of round 0.
fn logits(n: usize, k: usize, round: u64) -> Vec<f32> {
    let cum: Vec<f64> = {
        let shares: Vec<f64> = (0..k).map(|j| 1.0 + (j % 5) as f64).collect();
        let total: f64 = shares.iter().sum();
        let mut acc = 0.0;
        shares
            .iter()
            .map(|s| {
                acc += s / total;
                acc
            })
            .collect()
    };
    let mut z = vec![0f32; n * k];
    z.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        let u = (mix(i as u64 ^ 0xc1u64 << 56) >> 11) as f64 / (1u64 << 53) as f64;
        let c = cum.partition_point(|&x| x <= u).min(k - 1);
        let base = (i * k) as u64;
        for (j, x) in row.iter_mut().enumerate() {
            let mut v = normal(mix(base + j as u64)) + if j == c { PEAK } else { 0.0 };
            if round > 0 {
                v += DRIFT * normal(mix((base + j as u64) ^ (round << 58)));
            }
            *x = v;
        }
    });
    z
}

struct Run {
    total: f64,
    build: f64,
    finish: f64,
    iterations: usize,
    per_iter: f64,
    stream: f64,
    absorptions: usize,
    converged: bool,
}

/// Builds, solves and assigns; times the streaming read of the built matrix in between.
fn run(z: Vec<f32>, k: usize, warm: Option<&[f64]>, acceleration: Acceleration) -> (Run, Vec<f64>) {
    let start = Instant::now();
    let mut s = Sinkhorn::new(z, k, LAMBDA, warm)
        .expect("valid problem")
        .with_acceleration(acceleration);
    let build = start.elapsed().as_secs_f64();
    let mut reads: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(s.stream_read());
            t.elapsed().as_secs_f64()
        })
        .collect();
    reads.sort_by(f64::total_cmp);
    let t = Instant::now();
    let sol = s
        .solve(&uniform_marginals(k), TOL, MAX_ITERS, |_| {})
        .expect("solves");
    let solve = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let a = s.assign().unwrap();
    std::hint::black_box(&a.labels);
    let assign = t.elapsed().as_secs_f64();
    let run = Run {
        total: build + solve + assign,
        build,
        finish: assign,
        iterations: sol.iterations,
        per_iter: solve / sol.iterations as f64,
        stream: reads[reads.len() / 2],
        absorptions: sol.absorptions,
        converged: sol.converged,
    };
    (run, s.log_beta())
}

fn write_raw(path: &Path, bytes: impl Iterator<Item = [u8; 4]>) {
    let data: Vec<u8> = bytes.flatten().collect();
    std::fs::write(path, data).expect("write benchmark data");
}

fn numpy_available() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the numpy baseline on `logits_file`: (seconds, iterations) cold and warm.
fn numpy(
    logits_file: &Path,
    beta_file: &Path,
    n: usize,
    k: usize,
    acceleration: Acceleration,
) -> Vec<(f64, usize)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/numpy_baseline.py");
    let out = Command::new("python3")
        .arg(script)
        .arg("--logits")
        .arg(logits_file)
        .args(["--n", &n.to_string(), "--k", &k.to_string()])
        .args(["--lambda", &LAMBDA.to_string(), "--tol", &TOL.to_string()])
        .args(["--max-iters", &MAX_ITERS.to_string()])
        .arg("--warm-log-beta")
        .arg(beta_file)
        .args(["--acceleration", &acceleration.to_string()])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "numpy baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let field = |name: &str| -> f64 {
                let at = l.find(&format!("\"{name}\": ")).expect("field") + name.len() + 4;
                l[at..]
                    .split([',', '}'])
                    .next()
                    .unwrap()
                    .trim()
                    .parse()
                    .expect("number")
            };
            (field("seconds"), field("iterations") as usize)
        })
        .collect()
}

fn peak_rss_gib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|x| x.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kib| kib / (1024.0 * 1024.0))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut sizes = vec![(20_000usize, 100usize), (200_000, 1_000)];
    if args.iter().any(|a| a == "--imagenet") {
        sizes.push((1_281_167, 3_000));
    }
    let with_numpy = !args.iter().any(|a| a == "--no-numpy") && numpy_available();
    if !with_numpy {
        println!("numpy baseline: skipped (python3 with numpy not found, or --no-numpy)");
    }
    println!(
        "sinkhorn bench: lambda {LAMBDA}, tol {TOL}, {} threads",
        rayon::current_num_threads()
    );
    println!(
        "{:>17} {:>10} {:>5} {:>8} {:>7} {:>7} {:>6} {:>9} {:>9} {:>7} {:>6} | {:>8} {:>6} {:>7} {:>7}",
        "N×K",
        "updates",
        "start",
        "total s",
        "build s",
        "final s",
        "iters",
        "s/iter",
        "read s",
        "iter/rd",
        "absorb",
        "numpy s",
        "iters",
        "×same",
        "×plain"
    );
    let tmp = std::env::temp_dir().join(format!("sela-sinkhorn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let methods = [Acceleration::None, Acceleration::default()];
    for (n, k) in sizes {
        // Round 0 solved gives the duals; round 1 is solved cold and warm from them.
        let (_, duals) = run(logits(n, k, 0), k, None, Acceleration::default());
        let with_base = with_numpy && n * k <= 400_000_000;
        let base: Option<Vec<Vec<(f64, usize)>>> = with_base.then(|| {
            let lf = tmp.join("logits.f32");
            let bf = tmp.join("log_beta.f64");
            write_raw(&lf, logits(n, k, 1).iter().map(|x| x.to_le_bytes()));
            let data: Vec<u8> = duals.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(&bf, data).expect("write duals");
            let r = methods.iter().map(|&m| numpy(&lf, &bf, n, k, m)).collect();
            let _ = std::fs::remove_file(lf);
            let _ = std::fs::remove_file(bf);
            r
        });
        for (mi, &method) in methods.iter().enumerate() {
            let cold = run(logits(n, k, 1), k, None, method).0;
            let warm = run(logits(n, k, 1), k, Some(&duals), method).0;
            for (i, (start, r)) in [("cold", &cold), ("warm", &warm)].into_iter().enumerate() {
                let np = match &base {
                    Some(b) => format!(
                        "{:>8.2} {:>6} {:>6.1}× {:>6.1}×",
                        b[mi][i].0,
                        b[mi][i].1,
                        b[mi][i].0 / r.total,
                        b[0][0].0 / r.total
                    ),
                    None => format!("{:>8} {:>6} {:>7} {:>7}", "-", "-", "-", "-"),
                };
                println!(
                    "{:>17} {:>10} {:>5} {:>8.3} {:>7.3} {:>7.3} {:>6} {:>9.5} {:>9.5} {:>7.2} {:>6} | {np}{}",
                    format!("{n}×{k}"),
                    method.to_string(),
                    start,
                    r.total,
                    r.build,
                    r.finish,
                    r.iterations,
                    r.per_iter,
                    r.stream,
                    r.per_iter / r.stream,
                    r.absorptions,
                    if r.converged { "" } else { "  NOT CONVERGED" }
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "×same: numpy's seconds with the same updates and start over ours; ×plain: numpy's plain \
         cold seconds over ours"
    );
    println!("peak resident memory: {:.2} GiB", peak_rss_gib());
}
