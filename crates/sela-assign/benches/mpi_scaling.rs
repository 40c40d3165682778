//! The distributed Sinkhorn solve under `mpirun -np R` for R = 1 and 2 on this machine: seconds
//! per iteration and the share of it spent in the collective operations (the all-reduce of the
//! K exact column sums, waiting for the slowest rank included).
//!
//! `cargo bench -p sela-assign --features mpi --bench mpi_scaling` (or `make bench-mpi`) runs the
//! driver, which starts itself under `mpirun` once per R and size and prints one table. Each rank
//! generates its own rows of the same clustered logits (no files), builds the kernel, runs a
//! fixed number of sweeps and reports; the driver checks that every R reached the same duals.
//! Ranks × threads per rank = the machine's cores (`RAYON_NUM_THREADS`), so every R uses the
//! same cores and memory bandwidth.
//! `-- --ranks 1,2,4 --iters 20 --sizes 20000x100,200000x1000` change the defaults.

use std::cell::Cell;
use std::process::Command;
use std::time::Instant;

use mpi::traits::*;
use rayon::prelude::*;
use sela_assign::mpi::MpiReduce;
use sela_sinkhorn::{split_rows, uniform_marginals, Reduce, Rows, Sinkhorn};

const LAMBDA: f64 = 25.0;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Global rows `rows` of clustered logits: cluster i·7 mod K gets 3 on top of uniform noise.
fn logits(rows: std::ops::Range<usize>, k: usize) -> Vec<f32> {
    let mut z = vec![0f32; rows.len() * k];
    z.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
        let i = rows.start + r;
        let c = i * 7 % k;
        for (j, x) in row.iter_mut().enumerate() {
            let u = (mix((i * k + j) as u64) >> 40) as f32 / (1u64 << 24) as f32;
            *x = 2.0 * u - 1.0 + if j == c { 3.0 } else { 0.0 };
        }
    });
    z
}

/// [`Reduce`] that times its calls.
struct Timed<'a> {
    inner: MpiReduce<'a>,
    seconds: Cell<f64>,
    calls: Cell<usize>,
}

impl Timed<'_> {
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.seconds
            .set(self.seconds.get() + t.elapsed().as_secs_f64());
        self.calls.set(self.calls.get() + 1);
        out
    }
}

impl Reduce for Timed<'_> {
    fn ranks(&self) -> usize {
        self.inner.ranks()
    }
    fn sum_i64(&self, values: &mut [i64]) {
        self.time(|| self.inner.sum_i64(values))
    }
    fn max_f64(&self, values: &mut [f64]) {
        self.time(|| self.inner.max_f64(values))
    }
}

/// One rank: solve `iters` sweeps of an n×k problem; rank 0 prints one line of results.
fn rank_main(n: usize, k: usize, iters: usize) {
    let (universe, _) =
        mpi::initialize_with_threading(mpi::Threading::Funneled).expect("MPI initialises");
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let bounds = split_rows(n, ranks);
    let z = logits(bounds[rank]..bounds[rank + 1], k);
    let comm = Timed {
        inner: MpiReduce::new(&world),
        seconds: Cell::new(0.0),
        calls: Cell::new(0),
    };
    world.barrier();
    let rows = Rows {
        first: bounds[rank],
        total: n,
    };
    let mut s = Sinkhorn::distributed(z, k, LAMBDA, None, rows, &comm).expect("valid problem");
    let (before, calls_before) = (comm.seconds.get(), comm.calls.get());
    world.barrier();
    let t = Instant::now();
    let sol = s
        .solve(&uniform_marginals(k), 1e-12, iters, |_| {})
        .expect("solves");
    let solve = t.elapsed().as_secs_f64();
    let reduce = comm.seconds.get() - before;
    let calls = comm.calls.get() - calls_before;
    // The slowest rank's share, so that a rank idling in the all-reduce for another shows.
    let mut worst = [reduce / solve, solve];
    comm.inner.max_f64(&mut worst);
    let checksum = s.log_beta().iter().fold(0u64, |h, x| mix(h ^ x.to_bits()));
    if rank == 0 {
        println!(
            "RESULT {ranks} {} {:.6} {:.4} {:.4} {} {checksum:016x}",
            sol.iterations,
            worst[1] / sol.iterations as f64,
            reduce / solve,
            worst[0],
            calls
        );
    }
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(spec) = arg(&args, "--rank") {
        let v: Vec<usize> = spec
            .split(',')
            .map(|x| x.parse().expect("n,k,iters"))
            .collect();
        rank_main(v[0], v[1], v[2]);
        return;
    }
    let ranks: Vec<usize> = arg(&args, "--ranks")
        .unwrap_or("1,2")
        .split(',')
        .map(|x| x.parse().expect("--ranks 1,2"))
        .collect();
    let iters: usize = arg(&args, "--iters").map_or(30, |x| x.parse().expect("--iters N"));
    let sizes: Vec<(usize, usize)> = arg(&args, "--sizes")
        .unwrap_or("20000x100,200000x1000")
        .split(',')
        .map(|s| {
            let (n, k) = s.split_once('x').expect("NxK");
            (n.parse().expect("N"), k.parse().expect("K"))
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let exe = std::env::current_exe().expect("own path");
    println!(
        "mpi_scaling: λ {LAMBDA}, {iters} sweeps per solve, {cores} cores shared by the ranks \
         (threads per rank = cores / R)"
    );
    println!(
        "{:>14} {:>3} {:>8} {:>10} {:>9} {:>12} {:>9} {:>13} {:>8}",
        "N×K",
        "R",
        "threads",
        "s/iter",
        "vs R=1",
        "reduce share",
        "(worst)",
        "reduces/iter",
        "same β"
    );
    for (n, k) in sizes {
        let mut base: Option<(f64, String)> = None;
        for &r in &ranks {
            let threads = (cores / r).max(1);
            let out = Command::new("mpirun")
                .args([
                    "--oversubscribe",
                    "--bind-to",
                    "none",
                    "-np",
                    &r.to_string(),
                ])
                .arg("-x")
                .arg(format!("RAYON_NUM_THREADS={threads}"))
                .arg(&exe)
                .args(["--rank", &format!("{n},{k},{iters}")])
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
                .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
                .output()
                .expect("mpirun (OpenMPI) runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let Some(line) = text.lines().find(|l| l.starts_with("RESULT ")) else {
                panic!(
                    "R = {r}: no result\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iterations, per_iter): (usize, f64) =
                (f[2].parse().unwrap(), f[3].parse().unwrap());
            let (share, worst, calls, sum) = (f[4], f[5], f[6].parse::<usize>().unwrap(), f[7]);
            let (ratio, same) = match &base {
                None => {
                    base = Some((per_iter, sum.to_string()));
                    ("1.00×".to_string(), "-")
                }
                Some((b, s)) => (
                    format!("{:.2}×", per_iter / b),
                    if s == sum { "yes" } else { "NO" },
                ),
            };
            let share_pct = |x: &str| format!("{:.1}%", x.parse::<f64>().unwrap() * 100.0);
            println!(
                "{:>14} {:>3} {:>8} {:>10.5} {:>9} {:>12} {:>9} {:>13.1} {:>8}",
                format!("{n}×{k}"),
                r,
                threads,
                per_iter,
                ratio,
                share_pct(share),
                share_pct(worst),
                calls as f64 / iterations as f64,
                same
            );
        }
    }
    println!(
        "reduce share: time in all-reduces over the solve's time, rank 0 (worst rank in \
         parentheses); bytes all-reduced per iteration: 8·(9K + 1) per rank"
    );
}
