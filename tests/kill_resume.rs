//! Kill and resume: a round through `make`, with the running stage killed by SIGKILL at several
//! points (extraction mid-write, the label solve, training before and after its resume
//! checkpoints), rerun each time with `make round`, ends with exactly the labels, checkpoints,
//! training losses, features and metrics of an uninterrupted run, and no temporary file.
//!
//! The stage binaries run behind wrappers that record each launch's pid and arguments and then
//! `exec` the real binary. The test freezes a launched stage with SIGSTOP at once and lets it run
//! in short slices (SIGCONT, sleep, SIGSTOP), checking between slices whether the point to kill
//! it at has come (a file appeared, say); there it sends SIGKILL to the frozen process. So a
//! stage is never killed too late, however loaded the machine is. Should a stage still finish
//! before its point comes, the attempt is undone (the run directory restored) and retried with
//! shorter slices.

#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin_dir, check, make, make_command, pipeline, temp_files, PipelineSize};
use sela_io::{cluster_stats, features, labels, metrics, train_log};

/// The stage binaries `make round` runs.
const STAGES: [&str; 5] = [
    "sela-extract",
    "sela-assign",
    "sela-train",
    "sela-eval",
    "sela-report",
];

/// The slice of its run a frozen stage gets before the kill condition is checked again.
const FIRST_SLICE: Duration = Duration::from_millis(4);
/// Longest wait for anything (a stage to start, make to end).
const TIMEOUT: Duration = Duration::from_secs(120);

fn round_dir(run: &Path, r: u32) -> PathBuf {
    run.join(format!("round-{r:03}"))
}

fn signal(target: &str, sig: &str) {
    // The target may be gone already; that is for the caller to find out.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stderr(Stdio::null())
        .status();
}

/// The process state letter from `/proc/<pid>/stat` (`None` when the process is gone).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// Whether `pid` runs the real stage binary `stage` (rather than its wrapper script).
fn runs_binary(pid: u32, stage: &str) -> bool {
    let real = bin_dir().join(stage).canonicalize().unwrap();
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == real)
}

/// Freezes `pid`; true once it is stopped, false if it has exited.
fn freeze(pid: u32) -> bool {
    signal(&pid.to_string(), "STOP");
    let start = Instant::now();
    loop {
        match proc_state(pid) {
            Some('T') | Some('t') => return true,
            None | Some('Z') | Some('X') => return false,
            _ if start.elapsed() > TIMEOUT => panic!("process {pid} does not stop"),
            _ => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// `make round` running in its own process group, killed with everything it started if the
/// test gives up on it.
struct MakeRun {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl MakeRun {
    fn start(env: &Env) -> Self {
        let n = env.makes.get();
        env.makes.set(n + 1);
        let stdout = env.logs.join(format!("make-{n}.stdout"));
        let stderr = env.logs.join(format!("make-{n}.stderr"));
        let child = make_command("round", &env.pipeline, &env.run, &env.wrappers, &[])
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .process_group(0)
            .spawn()
            .expect("make starts");
        MakeRun {
            child,
            stdout,
            stderr,
        }
    }

    fn finished(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits for make to end; its exit status and output.
    fn wait(mut self) -> (bool, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < TIMEOUT, "make round does not finish");
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = format!(
            "--- stdout\n{}\n--- stderr\n{}",
            std::fs::read_to_string(&self.stdout).unwrap(),
            std::fs::read_to_string(&self.stderr).unwrap()
        );
        (status.success(), out)
    }
}

impl Drop for MakeRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(&format!("-{}", self.child.id()), "KILL");
            let _ = self.child.wait();
        }
    }
}

/// Launches of the stage wrappers so far: (stage, pid, arguments).
fn launches(log: &Path) -> Vec<(String, u32, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let stage = parts.next().unwrap().to_string();
            let pid = parts.next().unwrap().parse().unwrap();
            (stage, pid, parts.next().unwrap_or("").to_string())
        })
        .collect()
}

/// Wrappers for the stage binaries in `dir`: each appends `<stage> <pid> <args>` to `log`, then
/// becomes the real binary (same pid).
fn write_wrappers(dir: &Path, log: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    for stage in STAGES {
        let path = dir.join(stage);
        let script = format!(
            "#!/bin/sh\necho \"{stage} $$ $*\" >> '{log}'\nexec '{real}' \"$@\"\n",
            log = log.display(),
            real = bin_dir().join(stage).display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// What a kill condition says about a frozen stage.
enum Check {
    /// Not yet: let it run another slice.
    Wait,
    /// Now.
    Kill,
    /// Too late: it ran past the point (a slice was too long).
    Overshot,
}

/// A kill condition, given the stage's pid; checked while the stage is frozen, between slices.
type Ready = Box<dyn FnMut(u32) -> Check>;

/// Where to kill a stage: its first launch (after those already logged) whose arguments contain
/// `args`, once the condition made by `ready` (a fresh one for each attempt) holds.
struct Point {
    what: &'static str,
    stage: &'static str,
    args: String,
    ready: Box<dyn Fn() -> Ready>,
}

enum Attempt {
    Killed,
    /// The stage finished or ran past its point before it could be killed there.
    Missed,
}

/// Runs `make round` and kills the stage at `point`; make must then fail.
fn kill_at(point: &Point, env: &Env, slice: Duration) -> Attempt {
    let mut ready = (point.ready)();
    let seen = launches(&env.launches).len();
    let mut make = MakeRun::start(env);
    let start = Instant::now();
    let pid = loop {
        let found = launches(&env.launches)
            .into_iter()
            .skip(seen)
            .find(|(stage, _, args)| stage == point.stage && args.contains(&point.args));
        if let Some((_, pid, _)) = found {
            break pid;
        }
        if make.finished() {
            let (_, out) = make.wait();
            panic!("make ended before {} started:\n{out}", point.what);
        }
        assert!(start.elapsed() < TIMEOUT, "{} never started", point.what);
        std::thread::sleep(Duration::from_micros(500));
    };
    if !freeze(pid) {
        return Attempt::Missed;
    }
    let mut slices = 0;
    loop {
        if runs_binary(pid, point.stage) {
            match ready(pid) {
                Check::Wait => {}
                Check::Kill => break,
                Check::Overshot => return Attempt::Missed,
            }
        }
        assert!(start.elapsed() < TIMEOUT, "{}: never ready", point.what);
        slices += 1;
        signal(&pid.to_string(), "CONT");
        std::thread::sleep(slice);
        if !freeze(pid) {
            return Attempt::Missed;
        }
    }
    signal(&pid.to_string(), "KILL");
    while proc_state(pid).is_some_and(|s| s != 'Z') {
        std::thread::sleep(Duration::from_micros(200));
    }
    let (ok, out) = make.wait();
    assert!(
        !ok,
        "make round succeeded although {} was killed:\n{out}",
        point.what
    );
    eprintln!("killed {} after {slices} slices of {slice:?}", point.what);
    Attempt::Killed
}

/// One run directory driven by `make round` through the stage wrappers.
struct Env {
    pipeline: PathBuf,
    run: PathBuf,
    wrappers: PathBuf,
    launches: PathBuf,
    /// Where each `make round`'s output goes.
    logs: PathBuf,
    /// `make round` invocations so far.
    makes: std::cell::Cell<usize>,
}

/// Kills at `point`; when the stage finishes first, restores the run directory and retries with
/// shorter slices.
fn interrupt(point: &Point, env: &Env) {
    let backup = env.run.with_extension("backup");
    let mut slice = FIRST_SLICE;
    for _ in 0..5 {
        if env.run.exists() {
            let status = Command::new("cp")
                .arg("-a")
                .arg(&env.run)
                .arg(&backup)
                .status();
            assert!(status.unwrap().success());
        }
        let makes = env.makes.get();
        match kill_at(point, env, slice) {
            Attempt::Killed => {
                if backup.exists() {
                    std::fs::remove_dir_all(&backup).unwrap();
                }
                return;
            }
            Attempt::Missed => {
                eprintln!("{} finished before its point; retrying", point.what);
                // The undone attempt's output is overwritten by the next one.
                env.makes.set(makes);
                if env.run.exists() {
                    std::fs::remove_dir_all(&env.run).unwrap();
                }
                if backup.exists() {
                    std::fs::rename(&backup, &env.run).unwrap();
                }
                slice /= 2;
            }
        }
    }
    panic!(
        "{}: the stage always finished before it could be killed",
        point.what
    );
}

/// A condition that holds from the `n`-th check on (the stage has run `n` slices).
fn after_slices(n: usize) -> Ready {
    let mut checks = 0;
    Box::new(move |_| {
        checks += 1;
        if checks > n {
            Check::Kill
        } else {
            Check::Wait
        }
    })
}

/// A condition that holds while `target` is being written by the stage.
fn while_writing(target: &Path) -> Ready {
    let target = target.to_path_buf();
    Box::new(move |pid| {
        if writing(&target, pid) {
            Check::Kill
        } else {
            Check::Wait
        }
    })
}

/// Whether process `pid` is writing `target`: its atomic writer's temporary file exists.
fn writing(target: &Path, pid: u32) -> bool {
    let name = target.file_name().unwrap().to_string_lossy();
    target.with_file_name(format!(".{name}.tmp-{pid}")).exists()
}

/// (round, split, column) of a features column; read as ids and value bits.
type FeatureColumn = (u32, String, String);

/// Everything a finished round decided, minus wall-clock values.
struct Outcome {
    labels: BTreeMap<u32, labels::HeadLabels>,
    /// assign-stats.json without its `seconds` fields.
    assign_stats: serde_json::Value,
    checkpoints: Vec<Vec<u8>>,
    /// (epoch, step, head, loss bits, lr bits) of every training step.
    train_log: Vec<(u32, u64, u32, u32, u64)>,
    features: BTreeMap<FeatureColumn, (Vec<u64>, Vec<u32>)>,
    metrics: Vec<(u32, Option<u32>, String, String, u64)>,
    cluster_stats: Vec<String>,
}

fn without_seconds(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("seconds");
            map.values_mut().for_each(without_seconds);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(without_seconds),
        _ => {}
    }
}

fn outcome(run: &Path) -> Outcome {
    let r1 = round_dir(run, 1);
    let mut assign_stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r1.join("assign-stats.json")).unwrap()).unwrap();
    without_seconds(&mut assign_stats);
    let mut features_out = BTreeMap::new();
    for r in 0..=1 {
        for split in ["features-train", "features-test"] {
            for column in ["embedding", "logits_0", "logits_1"] {
                let m = features::read_matrix(&round_dir(run, r).join(split), column).unwrap();
                features_out.insert(
                    (r, split.to_string(), column.to_string()),
                    (m.ids, m.values.iter().map(|v| v.to_bits()).collect()),
                );
            }
        }
    }
    let mut metric_rows: Vec<_> = metrics::read(&run.join("metrics.parquet"))
        .unwrap()
        .into_iter()
        .filter(|m| !m.metric.ends_with("seconds"))
        .map(|m| (m.round, m.head, m.split, m.metric, m.value.to_bits()))
        .collect();
    metric_rows.sort();
    let stats = (0..=1)
        .flat_map(|r| {
            cluster_stats::read(&round_dir(run, r).join("cluster_stats.parquet")).unwrap()
        })
        .map(|row| format!("{row:?}"))
        .collect();
    Outcome {
        labels: labels::read(&r1.join("labels.parquet")).unwrap().heads,
        assign_stats,
        checkpoints: (0..=1)
            .map(|r| std::fs::read(round_dir(run, r).join("checkpoint.safetensors")).unwrap())
            .collect(),
        train_log: train_log::read(&r1.join("train_log.parquet"))
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row.epoch,
                    row.step,
                    row.head,
                    row.loss.to_bits(),
                    row.lr.to_bits(),
                )
            })
            .collect(),
        features: features_out,
        metrics: metric_rows,
        cluster_stats: stats,
    }
}

#[test]
fn killed_stages_resume_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    // Enough images and epochs that training writes resume checkpoints (one per epoch but the
    // last) and every stage runs a while.
    let size = PipelineSize {
        train_per_class: 24,
        test_per_class: 8,
        epochs_per_round: 3,
        batch_size: 16,
    };
    let pipeline = pipeline(dir.path(), "kill", size);

    let uninterrupted = dir.path().join("runs/uninterrupted");
    check(
        &make("round", &pipeline, &uninterrupted, &[]),
        "uninterrupted make round",
    );
    let expected = outcome(&uninterrupted);

    let env = Env {
        pipeline,
        run: dir.path().join("runs/killed"),
        wrappers: dir.path().join("wrappers"),
        launches: dir.path().join("launches.log"),
        logs: dir.path().join("make-logs"),
        makes: Default::default(),
    };
    std::fs::create_dir_all(&env.logs).unwrap();
    write_wrappers(&env.wrappers, &env.launches);
    let run = env.run.clone();
    let r0_train = round_dir(&run, 0).join("features-train/part-00000-of-00001.parquet");
    let r1_test = round_dir(&run, 1).join("features-test/part-00000-of-00001.parquet");
    let resume = round_dir(&run, 1).join("checkpoint.resume.safetensors");

    let train = "round-001/checkpoint.safetensors";

    interrupt(
        &Point {
            what: "extraction of round 0's training features, mid-write",
            stage: "sela-extract",
            args: "round-000/features-train".into(),
            ready: Box::new(move || while_writing(&r0_train)),
        },
        &env,
    );
    let left = temp_files(&run);
    assert_eq!(
        left.len(),
        1,
        "the killed extraction left no temporary file: {left:?}"
    );
    interrupt(
        &Point {
            what: "the label solve of round 1, a few slices in",
            stage: "sela-assign",
            args: "round-001/labels.parquet".into(),
            ready: Box::new(|| after_slices(2)),
        },
        &env,
    );
    interrupt(
        &Point {
            what: "training, before its first resume checkpoint",
            stage: "sela-train",
            args: train.into(),
            ready: Box::new({
                let resume = resume.clone();
                move || {
                    let resume = resume.clone();
                    let mut slices = after_slices(4);
                    Box::new(move |pid| match resume.exists() {
                        true => Check::Overshot,
                        false => slices(pid),
                    })
                }
            }),
        },
        &env,
    );
    assert!(
        !resume.exists(),
        "training was killed after its first resume checkpoint"
    );
    interrupt(
        &Point {
            what: "training, a while after its first resume checkpoint",
            stage: "sela-train",
            args: train.into(),
            ready: Box::new({
                let resume = resume.clone();
                move || {
                    let resume = resume.clone();
                    let mut first: Option<Vec<u8>> = None;
                    let mut slices_since = 0;
                    Box::new(move |_| {
                        let Ok(now) = std::fs::read(&resume) else {
                            return Check::Wait;
                        };
                        if first.get_or_insert_with(|| now.clone()) != &now {
                            // A second resume checkpoint: past the point.
                            return Check::Overshot;
                        }
                        slices_since += 1;
                        if slices_since > 3 {
                            Check::Kill
                        } else {
                            Check::Wait
                        }
                    })
                }
            }),
        },
        &env,
    );
    let first_resume = std::fs::read(&resume).expect("the resume checkpoint is left");
    interrupt(
        &Point {
            what: "resumed training, after a newer resume checkpoint",
            stage: "sela-train",
            args: train.into(),
            ready: Box::new({
                let resume = resume.clone();
                let first = first_resume.clone();
                move || {
                    let (resume, first) = (resume.clone(), first.clone());
                    Box::new(move |_| match std::fs::read(&resume) {
                        Ok(now) if now != first => Check::Kill,
                        _ => Check::Wait,
                    })
                }
            }),
        },
        &env,
    );
    assert!(std::fs::read(&resume).is_ok_and(|now| now != first_resume));
    interrupt(
        &Point {
            what: "extraction of round 1's test features, mid-write",
            stage: "sela-extract",
            args: "round-001/features-test".into(),
            ready: Box::new(move || while_writing(&r1_test)),
        },
        &env,
    );

    assert_eq!(
        temp_files(&round_dir(&run, 1).join("features-test")).len(),
        1
    );
    let final_run = MakeRun::start(&env);
    let (ok, out) = final_run.wait();
    assert!(ok, "make round after the interruptions failed:\n{out}");

    // The one training run that finished had resumed from a resume checkpoint.
    let summaries: Vec<String> = (0..env.makes.get())
        .flat_map(|n| {
            let out = std::fs::read_to_string(env.logs.join(format!("make-{n}.stdout"))).unwrap();
            out.lines()
                .filter(|l| l.contains(r#""stage":"sela-train""#))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert!(
        summaries[0].contains(r#""resumed":true"#),
        "{}",
        summaries[0]
    );
    let trains = launches(&env.launches)
        .iter()
        .filter(|(stage, _, _)| stage == "sela-train")
        .count();
    assert!(trains >= 4, "training ran {trains} times");
    assert_eq!(
        temp_files(&run),
        Vec::<PathBuf>::new(),
        "temporary files left behind"
    );
    let got = outcome(&run);
    let differ: Vec<&str> = [
        ("labels", expected.labels == got.labels),
        (
            "assign-stats.json",
            expected.assign_stats == got.assign_stats,
        ),
        (
            "round 0 checkpoint",
            expected.checkpoints[0] == got.checkpoints[0],
        ),
        (
            "round 1 checkpoint",
            expected.checkpoints[1] == got.checkpoints[1],
        ),
        ("training log", expected.train_log == got.train_log),
        ("features", expected.features == got.features),
        ("metrics", expected.metrics == got.metrics),
        (
            "cluster statistics",
            expected.cluster_stats == got.cluster_stats,
        ),
    ]
    .into_iter()
    .filter_map(|(what, same)| (!same).then_some(what))
    .collect();
    assert!(
        differ.is_empty(),
        "the interrupted run differs from the uninterrupted one in: {differ:?}"
    );
    assert!(!resume.exists(), "the resume checkpoint was not removed");
    assert!(run.join("report.html").exists());
    assert!(!round_dir(&run, 2).exists());
}
