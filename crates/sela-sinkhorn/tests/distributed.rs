//! Solves with the rows split among R "processes" (threads joined by an in-memory all-reduce)
//! give the same bits as one process holding every row: the same iterations and errors, labels,
//! confidences, plan rows, measures and duals, with and without exact balancing.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sela_sinkhorn::{
    power_marginals, split_rows, uniform_marginals, Assignment, Reduce, Rows, Sinkhorn,
    SinkhornError,
};

/// An all-reduce among threads: each posts its values, all wait, each combines every post. A
/// thread that panics wakes the others, which then panic too (instead of waiting forever).
struct Threads {
    rank: usize,
    ranks: usize,
    shared: Arc<(Mutex<State>, Condvar)>,
}

#[derive(Default)]
struct State {
    posts: Vec<Vec<u64>>,
    arrived: usize,
    generation: u64,
    failed: bool,
}

impl Threads {
    fn group(ranks: usize) -> Vec<Threads> {
        let state = State {
            posts: vec![Vec::new(); ranks],
            ..State::default()
        };
        let shared = Arc::new((Mutex::new(state), Condvar::new()));
        (0..ranks)
            .map(|rank| Threads {
                rank,
                ranks,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every thread has arrived.
    fn barrier<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.ranks {
            st.arrived = 0;
            st.generation += 1;
            self.shared.1.notify_all();
        }
        while st.generation == generation && !st.failed {
            st = self.shared.1.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        assert!(!st.failed, "another thread of the group failed");
        st
    }

    fn combine(&self, mine: Vec<u64>, f: impl Fn(&[Vec<u64>]) -> Vec<u64>) -> Vec<u64> {
        let mut st = self.lock();
        st.posts[self.rank] = mine;
        let st = self.barrier(st);
        let out = f(&st.posts);
        drop(self.barrier(st));
        out
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.lock().failed = true;
            self.shared.1.notify_all();
        }
    }
}

impl Reduce for Threads {
    fn ranks(&self) -> usize {
        self.ranks
    }
    fn sum_i64(&self, values: &mut [i64]) {
        let out = self.combine(values.iter().map(|&x| x as u64).collect(), |posts| {
            (0..values.len())
                .map(|i| posts.iter().map(|p| p[i] as i64).sum::<i64>() as u64)
                .collect()
        });
        for (v, o) in values.iter_mut().zip(out) {
            *v = o as i64;
        }
    }
    fn max_f64(&self, values: &mut [f64]) {
        let out = self.combine(values.iter().map(|x| x.to_bits()).collect(), |posts| {
            (0..values.len())
                .map(|i| {
                    posts
                        .iter()
                        .map(|p| f64::from_bits(p[i]))
                        .fold(f64::NEG_INFINITY, f64::max)
                        .to_bits()
                })
                .collect()
        });
        for (v, o) in values.iter_mut().zip(out) {
            *v = f64::from_bits(o);
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Noise, a bump at a skewed cluster, and every seventh row a copy of row 0 (exact ties).
fn clustered(n: usize, k: usize, peak: f64, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    let mut z: Vec<f32> = (0..n)
        .flat_map(|_| {
            let c = ((r.next() * r.next()) * k as f64) as usize;
            (0..k)
                .map(|j| (r.next() * 2.0 - 1.0 + if j == c { peak } else { 0.0 }) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    for i in (7..n).step_by(7) {
        let row0 = z[..k].to_vec();
        z[i * k..(i + 1) * k].copy_from_slice(&row0);
    }
    z
}

/// Coarse logits on a 0.5 grid: ties in scores and confidences everywhere.
fn coarse(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n * k)
        .map(|_| ((r.next() * 6.0).round() / 2.0) as f32)
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    iterations: usize,
    error: u64,
    path: &'static str,
    absorptions: usize,
    log_beta: Vec<u64>,
    assignment: Assignment,
    balanced: Option<Assignment>,
    plan: Vec<Vec<f64>>,
}

struct Case {
    z: Vec<f32>,
    k: usize,
    lambda: f64,
    marginals: Vec<f64>,
    warm: Option<Vec<f64>>,
    tol: f64,
    max_iters: usize,
    balance: Option<u64>,
}

/// Solves `case` with its rows split among `ranks` threads; returns every thread's outcome
/// (local rows) stitched into one, after checking the global parts agree among threads.
fn solve_split(case: &Case, ranks: usize) -> Result<Outcome, SinkhornError> {
    let n = case.z.len() / case.k;
    let bounds = split_rows(n, ranks);
    let outcomes: Vec<Result<Outcome, SinkhornError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = Threads::group(ranks)
            .into_iter()
            .map(|comm| {
                let (a, b) = (bounds[comm.rank], bounds[comm.rank + 1]);
                let z = case.z[a * case.k..b * case.k].to_vec();
                scope.spawn(move || -> Result<Outcome, SinkhornError> {
                    let rows = Rows { first: a, total: n };
                    let mut s = Sinkhorn::distributed(
                        z,
                        case.k,
                        case.lambda,
                        case.warm.as_deref(),
                        rows,
                        comm,
                    )?;
                    assert_eq!(s.local_rows(), b - a);
                    let sol = s.solve(&case.marginals, case.tol, case.max_iters, |_| {})?;
                    let assignment = s.assign()?;
                    let balanced = case.balance.map(|seed| {
                        let mut x = assignment.clone();
                        s.balance(&mut x, seed);
                        x
                    });
                    Ok(Outcome {
                        iterations: sol.iterations,
                        error: sol.error.to_bits(),
                        path: s.path(),
                        absorptions: s.absorptions(),
                        log_beta: s.log_beta().iter().map(|x| x.to_bits()).collect(),
                        plan: (0..s.local_rows()).map(|i| s.plan_row(i)).collect(),
                        assignment,
                        balanced,
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut parts = Vec::new();
    for o in outcomes {
        parts.push(o?);
    }
    let mut whole = parts[0].clone();
    let stitch = |a: &mut Assignment, b: &Assignment| {
        a.labels.extend(&b.labels);
        a.confidence.extend(&b.confidence);
    };
    for p in &parts[1..] {
        // Everything but the rows is global: every process must hold the same bits.
        let global = |o: &Outcome| {
            let strip = |a: &Assignment| Assignment {
                labels: vec![],
                confidence: vec![],
                ..a.clone()
            };
            (
                o.iterations,
                o.error,
                o.path,
                o.absorptions,
                o.log_beta.clone(),
                strip(&o.assignment),
                o.balanced.as_ref().map(strip),
            )
        };
        assert_eq!(global(p), global(&parts[0]));
        stitch(&mut whole.assignment, &p.assignment);
        if let (Some(a), Some(b)) = (&mut whole.balanced, &p.balanced) {
            stitch(a, b);
        }
        whole.plan.extend(p.plan.iter().cloned());
    }
    Ok(whole)
}

fn check(case: &Case, name: &str) -> Outcome {
    let one = solve_split(case, 1).unwrap();
    for ranks in 2..=4 {
        let split = solve_split(case, ranks).unwrap();
        assert_eq!(split, one, "{name}: {ranks} processes");
    }
    one
}

fn case(z: Vec<f32>, k: usize, lambda: f64) -> Case {
    Case {
        z,
        k,
        lambda,
        marginals: uniform_marginals(k),
        warm: None,
        tol: 1e-4,
        max_iters: 10_000,
        balance: Some(3),
    }
}

#[test]
fn split_solves_equal_the_single_process_solve() {
    // N not a multiple of the chunk size nor of R; K below and above the 256-column block.
    for (n, k, seed) in [(1001usize, 7usize, 1u64), (2077, 12, 2), (333, 300, 3)] {
        let one = check(&case(clustered(n, k, 2.5, seed), k, 25.0), "clustered");
        assert!(one.iterations > 3);
        let mut c = case(coarse(n, k, seed + 10), k, 10.0);
        c.marginals = power_marginals(k, 0.5).unwrap();
        let one = check(&c, "coarse, power prior");
        let b = one.balanced.unwrap();
        assert_ne!(b.labels, one.assignment.labels, "balancing moved rows");
    }
    // Fewer blocks than processes: some processes hold no rows.
    check(&case(clustered(70, 3, 1.0, 4), 3, 25.0), "tiny");
    // The plain sequential reading of the single solve agrees with `Sinkhorn::new`.
    let c = case(clustered(500, 5, 2.0, 5), 5, 25.0);
    let mut s = Sinkhorn::new(c.z.clone(), 5, 25.0, None).unwrap();
    let sol = s.solve(&c.marginals, c.tol, c.max_iters, |_| {}).unwrap();
    let one = solve_split(&c, 1).unwrap();
    assert_eq!(
        (sol.iterations, sol.error.to_bits()),
        (one.iterations, one.error)
    );
    assert_eq!(s.assign().unwrap(), one.assignment);
}

#[test]
fn absorption_lifts_and_warm_starts_split_the_same() {
    // λ = 100 with peaked logits and a column no row favours: absorptions and a lift, whose
    // column maxima come from every process.
    let (n, k) = (1500, 8);
    let mut z = clustered(n, k, 8.0, 21);
    for i in 0..n {
        z[i * k + 5] = -60.0;
    }
    let one = check(&case(z.clone(), k, 100.0), "stabilized");
    assert_eq!(one.path, "stabilized");
    assert!(one.absorptions >= 2, "{}", one.absorptions);
    // The next round, warm-started from these duals.
    let duals: Vec<f64> = one.log_beta.iter().map(|&b| f64::from_bits(b)).collect();
    let mut r = Rng(22);
    let next: Vec<f32> = z.iter().map(|x| x + (r.next() * 0.1) as f32).collect();
    let mut c = case(next, k, 100.0);
    c.warm = Some(duals);
    c.balance = Some(11);
    check(&c, "warm start");
    // Not converged within the cap: stopped at the same iteration with the same error.
    let mut c = case(clustered(900, 6, 3.0, 23), 6, 25.0);
    c.max_iters = 3;
    c.tol = 1e-9;
    let one = check(&c, "capped");
    assert_eq!(one.iterations, 3);
}

#[test]
fn errors_are_the_same_on_every_process() {
    let (n, k) = (1000, 4);
    let mut z = clustered(n, k, 2.0, 31);
    z[900 * k + 3] = f32::NAN;
    z[950 * k] = f32::INFINITY;
    for ranks in 1..=4 {
        let e = solve_split(&case(z.clone(), k, 25.0), ranks).unwrap_err();
        assert!(
            matches!(e, SinkhornError::NonFinite { row: 900, col: 3, value } if value.is_nan()),
            "{ranks}: {e:?}"
        );
    }
    // Rows that are not whole blocks are refused by the process holding them, and the others
    // are told.
    let results: Vec<Result<(), SinkhornError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = Threads::group(2)
            .into_iter()
            .map(|comm| {
                // Process 0 holds rows 0..256 of 300 (one block: fine); process 1 claims 50
                // rows from 256.
                let (first, len) = [(0, 256), (256, 50)][comm.rank];
                let z = clustered(len, 4, 1.0, 32);
                scope.spawn(move || {
                    Sinkhorn::distributed(z, 4, 25.0, None, Rows { first, total: 300 }, comm)
                        .map(|_| ())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let text: Vec<String> = results
        .iter()
        .map(|r| r.as_ref().unwrap_err().to_string())
        .collect();
    assert!(
        text[0].contains("another process's rows are unusable"),
        "{text:?}"
    );
    assert!(
        text[1].contains("rows 256..306 of 300 are not whole blocks of 256 rows"),
        "{text:?}"
    );
}
