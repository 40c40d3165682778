//! The training stage: trains the network of the pipeline config (backbone and every head) with
//! the mean over heads of each head's cross-entropy against that head's labels for the current
//! round, on augmented views prepared by a prefetching loader (the images as they are from
//! `augment.off_from_round` on).
//!
//! - The learning-rate schedule spans the whole pipeline: round R trains the global epochs that
//!   follow rounds 1..R−1's, of all rounds' epochs (`train.epochs_per_round`: one count E gives
//!   `(R−1)·E .. R·E` of `rounds·E`; a per-round list, its prefix sums), and the step counter
//!   continues from the previous round.
//! - The optimiser state (momentum, or AdamW's moments) travels in the checkpoint, so round R+1
//!   continues round R's momentum rather than restarting it (a changed `train.optimizer` starts
//!   fresh state).
//! - Round 0 trains nothing: it writes the seeded initial network.
//! - Every `--resume-every` steps and at each epoch's end a resume checkpoint
//!   (`<output stem>.resume.safetensors`) records everything needed to continue; `--resume` picks
//!   it up and the run finishes bit-identical to an uninterrupted one. It is deleted once the
//!   final checkpoint is written.
//! - Every input is checked before anything is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sela_cli::{OutputArgs, PipelineArgs, Progress};
use sela_config::PipelineConfig;
use sela_images::loader::{batches_per_epoch, Prefetcher, View};
use sela_images::{ImageSet, Normalize};
use sela_io::labels::AssignStats;
use sela_io::train_log::TrainLogRow;
use sela_io::{FileMeta, Provenance};
use sela_nn::checkpoint::{self, TrainState};
use sela_nn::{LrSchedule, ModelSpec, Network, Optimizer, OptimizerKind};
use serde::Serialize;

/// The stage's name, as stamped into its outputs.
pub const STAGE: &str = "sela-train";
/// Key of the training log carried by a resume checkpoint.
const KEY_LOG: &str = "train_log";

/// Command-line arguments of `sela-train`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Training dataset Parquet [default: the config's data.train].
    #[arg(long, value_name = "TRAIN.parquet")]
    pub dataset: Option<PathBuf>,
    /// This round's labels (every head, every image of the dataset); required from round 1 on.
    #[arg(long, value_name = "LABELS.parquet")]
    pub labels: Option<PathBuf>,
    /// Checkpoint to start from (the previous round's) [default: a fresh network from the seed].
    #[arg(long, value_name = "CHECKPOINT.safetensors")]
    pub init: Option<PathBuf>,
    /// Where to write the trained checkpoint.
    #[arg(long, value_name = "CHECKPOINT.safetensors")]
    pub output: PathBuf,
    /// Where to write the training log (Parquet) [default: none].
    #[arg(long, value_name = "TRAIN_LOG.parquet")]
    pub log: Option<PathBuf>,
    /// Continue an interrupted run from its resume checkpoint (if there is one).
    #[arg(long)]
    pub resume: bool,
    /// Write a resume checkpoint every this many steps (and at the end of every epoch).
    #[arg(long, value_name = "STEPS", default_value_t = 100)]
    pub resume_every: u64,
    /// Epochs of every round (shorthand for --set train.epochs_per_round=N; replaces a per-round
    /// list, so the schedule's length and the config hash change with it).
    #[arg(long, value_name = "N")]
    pub epochs: Option<u32>,
    /// Threads for training and augmentation [default: train.threads; 0 = all cores].
    #[arg(long, value_name = "T")]
    pub threads: Option<usize>,
    /// Stop (as if killed) after this many steps of this invocation; for testing --resume.
    #[arg(long, hide = true)]
    pub stop_after_steps: Option<u64>,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// The one-line JSON summary printed on success.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub stage: &'static str,
    pub round: u32,
    pub output: PathBuf,
    pub log: Option<PathBuf>,
    /// Whether training stopped early on purpose (`--stop-after-steps`) with only a resume checkpoint.
    pub interrupted: bool,
    pub resumed: bool,
    pub epochs: u32,
    pub steps: u64,
    pub images: u64,
    /// Mean loss of the last epoch's steps (every head's rows alike: the mean over heads).
    pub final_loss: Option<f32>,
    pub seconds: f64,
    pub images_per_sec: f64,
    /// Share of the training time the step spent waiting for the loader.
    pub loader_wait_share: f64,
}

/// The resume checkpoint that belongs to `output`: `dir/stem.resume.safetensors`.
pub fn resume_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".to_string());
    output.with_file_name(format!("{stem}.resume.safetensors"))
}

/// Runs the stage.
pub fn run(args: &Args) -> Result<Summary> {
    let mut overrides = args.pipeline.overrides.clone();
    if let Some(e) = args.epochs {
        overrides.push(format!("train.epochs_per_round={e}"));
    }
    let config = PipelineConfig::load_with(&args.pipeline.config, &overrides)?;
    let threads = args.threads.unwrap_or(config.train.threads);
    if threads > 0 {
        // Only the first call in a process sets the pool; later ones keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    let round = args.pipeline.round;
    let spec = ModelSpec::from_config(&config, round);
    spec.validate()?;
    if round == 0 {
        return write_initial(args, &config, &spec);
    }
    let Some(labels_path) = &args.labels else {
        bail!("--labels is required for round {round} (round 0 alone trains nothing)");
    };
    if args.resume_every == 0 {
        bail!("--resume-every must be at least 1");
    }
    let hash = config.hash();
    let round_epochs = &config.train.epochs_per_round;
    let (Some(epochs), Some(first_epoch)) = (
        round_epochs.of_round(round),
        round_epochs.before_round(round),
    ) else {
        bail!(
            "round {round} is past the {} rounds train.epochs_per_round lists",
            config.pipeline.rounds
        );
    };
    let (Ok(first_epoch), Some(end_epoch)) = (
        u32::try_from(first_epoch),
        u32::try_from(first_epoch + epochs as u64).ok(),
    ) else {
        bail!(
            "train.epochs_per_round: round {round} ends past epoch {}",
            u32::MAX
        );
    };

    // Everything is read and checked before anything is written.
    let start_net = match &args.init {
        Some(p) => Some(
            checkpoint::load_carrying_heads(p, &spec, config.pipeline.seed)
                .with_context(|| "loading --init")?,
        ),
        None => None,
    };
    let dataset = args
        .dataset
        .clone()
        .unwrap_or_else(|| config.data.train.clone());
    let set = ImageSet::load(&dataset, spec.channels, spec.height, spec.width)?;
    let head_labels = read_labels(labels_path, &config, &set.ids)?;
    let kind = OptimizerKind::from_config(&config.train)?;
    let resume_file = resume_path(&args.output);
    let resumed = if args.resume && resume_file.exists() {
        let ck = checkpoint::load(&resume_file, &spec).context("loading the resume checkpoint")?;
        if ck.state.config_hash.as_deref() != Some(hash.as_str()) || ck.state.round != round {
            bail!(
                "{}: the resume checkpoint belongs to round {} with config {}, this run is round {round} with config {hash}; delete it or drop --resume",
                resume_file.display(),
                ck.state.round,
                ck.state.config_hash.as_deref().unwrap_or("?")
            );
        }
        Some(ck)
    } else {
        None
    };

    let n = set.len();
    let batch = config.train.batch_size;
    let steps_per_epoch = batches_per_epoch(n, batch) as u64;
    let total_epochs = round_epochs.total(config.pipeline.rounds.max(round));
    let schedule = LrSchedule::from_config(&config.train, steps_per_epoch, total_epochs)?;

    let (mut net, mut opt, mut state, mut log): (Network, Optimizer, TrainState, Vec<TrainLogRow>) =
        match resumed {
            Some(ck) => {
                let log = match ck.state.extra.get(KEY_LOG) {
                    Some(raw) => serde_json::from_str(raw).context("resume checkpoint's log")?,
                    None => Vec::new(),
                };
                let opt = ck
                    .optimizer
                    .context("the resume checkpoint has no optimiser state")?;
                (ck.network, opt, ck.state, log)
            }
            None => {
                let (net, opt) = match start_net {
                    Some(ck) => {
                        let opt = match ck.optimizer {
                            Some(o) if o.kind == kind => o,
                            _ => Optimizer::new(kind.clone(), ck.network.params()),
                        };
                        (ck.network, opt)
                    }
                    None => {
                        let net = Network::init(&spec, config.pipeline.seed)?;
                        let opt = Optimizer::new(kind.clone(), net.params());
                        (net, opt)
                    }
                };
                let state = TrainState {
                    round,
                    epoch: first_epoch,
                    step: first_epoch as u64 * steps_per_epoch,
                    batch: 0,
                    seed: config.pipeline.seed,
                    rng_state: 0,
                    config_hash: Some(hash.clone()),
                    extra: Default::default(),
                };
                (net, opt, state, Vec::new())
            }
        };
    let resumed = args.resume && state.step > first_epoch as u64 * steps_per_epoch;

    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let set = Arc::new(set);
    let norm = Normalize {
        mean: config.mean(),
        std: config.std(),
    };
    let view = if config.augment.applies_at(round) {
        View::Augmented(config.augment.clone())
    } else {
        View::Clean
    };
    let remaining = (end_epoch - state.epoch) as u64 * steps_per_epoch - state.batch;
    let mut progress = Progress::new(
        "train",
        Some(remaining * batch.min(n) as u64),
        "images",
        args.out.quiet,
    );
    let started = Instant::now();
    let mut waited = 0.0f64;
    let mut images_done = 0u64;
    let mut steps_this_call = 0u64;
    let heads = spec.heads.len();
    let mut batch_labels: Vec<Vec<u32>> = vec![Vec::new(); heads];
    while state.epoch < end_epoch {
        let mut loader = Prefetcher::start(
            set.clone(),
            batch,
            view.clone(),
            norm.clone(),
            config.pipeline.seed,
            state.epoch as u64,
            state.batch as usize,
            2,
        );
        loop {
            if args.stop_after_steps.is_some_and(|s| steps_this_call >= s) {
                drop(loader);
                return Ok(summary(
                    args,
                    round,
                    true,
                    resumed,
                    &state,
                    &log,
                    images_done,
                    started,
                    waited,
                ));
            }
            let Some(b) = loader.next() else { break };
            let t = Instant::now();
            for (h, bl) in batch_labels.iter_mut().enumerate() {
                bl.clear();
                bl.extend(b.rows.iter().map(|&r| head_labels[h][r]));
            }
            let refs: Vec<&[u32]> = batch_labels.iter().map(Vec::as_slice).collect();
            let lr = schedule.lr(state.step);
            let m = b.rows.len();
            let stats = net.train_step(&b.images, m, &refs, &mut opt, lr)?;
            if !stats.loss.is_finite() {
                bail!(
                    "the loss became {} at step {} (learning rate {lr}); lower train.lr",
                    stats.loss,
                    state.step
                );
            }
            let ips = (m as f64 / t.elapsed().as_secs_f64()) as f32;
            for (h, &loss) in stats.head_losses.iter().enumerate() {
                log.push(TrainLogRow {
                    round,
                    epoch: state.epoch,
                    step: state.step,
                    head: h as u32,
                    loss,
                    lr,
                    images_per_sec: ips,
                });
            }
            state.step += 1;
            state.batch += 1;
            steps_this_call += 1;
            images_done += m as u64;
            progress.inc(m as u64);
            progress.message(format!("loss {:.4} lr {lr:.4} {ips:.0} img/s", stats.loss));
            if state.batch < steps_per_epoch && state.step % args.resume_every == 0 {
                save_resume(&resume_file, &net, &opt, &state, &log)?;
            }
        }
        waited += loader.waited().as_secs_f64();
        state.epoch += 1;
        state.batch = 0;
        if state.epoch < end_epoch {
            save_resume(&resume_file, &net, &opt, &state, &log)?;
        }
    }
    progress.finish();

    if let Some(log_path) = &args.log {
        let mut prov = Provenance::new(STAGE)
            .round(Some(round))
            .config_hash(Some(hash.clone()))
            .input(labels_path)
            .input(&dataset);
        if let Some(i) = &args.init {
            prov = prov.input(i);
        }
        let meta = FileMeta::new(sela_io::train_log::TABLE, sela_io::train_log::VERSION, prov);
        sela_io::train_log::write(log_path, &log, &meta)?;
    }
    state.extra.clear();
    checkpoint::save(&args.output, &net, Some(&opt), &state)?;
    if resume_file.exists() {
        std::fs::remove_file(&resume_file)
            .with_context(|| format!("removing {}", resume_file.display()))?;
    }
    // A run killed while writing a resume checkpoint leaves that write's temporary behind.
    sela_io::atomic::remove_stale_temps(&resume_file);
    Ok(summary(
        args,
        round,
        false,
        resumed,
        &state,
        &log,
        images_done,
        started,
        waited,
    ))
}

#[allow(clippy::too_many_arguments)]
fn summary(
    args: &Args,
    round: u32,
    interrupted: bool,
    resumed: bool,
    state: &TrainState,
    log: &[TrainLogRow],
    images: u64,
    started: Instant,
    waited: f64,
) -> Summary {
    let seconds = started.elapsed().as_secs_f64();
    let last_epoch = state.epoch.saturating_sub(1);
    let last: Vec<f32> = log
        .iter()
        .filter(|r| r.epoch == last_epoch)
        .map(|r| r.loss)
        .collect();
    Summary {
        stage: STAGE,
        round,
        output: if interrupted {
            resume_path(&args.output)
        } else {
            args.output.clone()
        },
        log: if interrupted { None } else { args.log.clone() },
        interrupted,
        resumed,
        epochs: state.epoch,
        steps: state.step,
        images,
        final_loss: (!last.is_empty())
            .then(|| (last.iter().map(|&l| l as f64).sum::<f64>() / last.len() as f64) as f32),
        seconds,
        images_per_sec: images as f64 / seconds.max(1e-9),
        loader_wait_share: if seconds > 0.0 { waited / seconds } else { 0.0 },
    }
}

fn save_resume(
    path: &Path,
    net: &Network,
    opt: &Optimizer,
    state: &TrainState,
    log: &[TrainLogRow],
) -> Result<()> {
    let mut s = state.clone();
    s.extra.insert(
        KEY_LOG.to_string(),
        serde_json::to_string(log).expect("log rows serialise"),
    );
    checkpoint::save(path, net, Some(opt), &s)?;
    Ok(())
}

/// Round 0: the seeded initial network, untrained, without optimiser state.
fn write_initial(args: &Args, config: &PipelineConfig, spec: &ModelSpec) -> Result<Summary> {
    if args.labels.is_some() || args.init.is_some() || args.resume {
        bail!(
            "round 0 writes the seeded initial network: --labels, --init and --resume do not apply"
        );
    }
    let started = Instant::now();
    let net = Network::init(spec, config.pipeline.seed)?;
    let state = TrainState {
        round: 0,
        seed: config.pipeline.seed,
        config_hash: Some(config.hash()),
        ..Default::default()
    };
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    checkpoint::save(&args.output, &net, None, &state)?;
    Ok(Summary {
        stage: STAGE,
        round: 0,
        output: args.output.clone(),
        log: None,
        interrupted: false,
        resumed: false,
        epochs: 0,
        steps: 0,
        images: 0,
        final_loss: None,
        seconds: started.elapsed().as_secs_f64(),
        images_per_sec: 0.0,
        loader_wait_share: 0.0,
    })
}

/// Each head's labels in the dataset's row order, checked against the config's heads.
fn read_labels(path: &Path, config: &PipelineConfig, ids: &[u64]) -> Result<Vec<Vec<u32>>> {
    let labels = sela_io::labels::read(path)?;
    let heads = &config.model.heads;
    let found: Vec<u32> = labels.heads.keys().copied().collect();
    let wanted: Vec<u32> = (0..heads.len() as u32).collect();
    if found != wanted {
        bail!(
            "{}: the labels cover heads {found:?}, the config's model.heads {heads:?} needs heads {wanted:?}",
            path.display()
        );
    }
    if let Some(stats) = labels
        .meta
        .json::<AssignStats>(path, sela_io::labels::KEY_ASSIGN)?
    {
        for h in &stats.heads {
            if let Some(&k) = heads.get(h.head as usize) {
                if h.k != k {
                    bail!(
                        "{}: head {} was solved with K = {}, the config's model.heads says K = {k}",
                        path.display(),
                        h.head,
                        h.k
                    );
                }
            }
        }
    }
    let mut out = Vec::with_capacity(heads.len());
    for (h, &k) in heads.iter().enumerate() {
        let aligned = labels.heads[&(h as u32)].aligned_to(path, h as u32, ids)?;
        if let Some((row, &bad)) = aligned.iter().enumerate().find(|(_, &l)| l as usize >= k) {
            bail!(
                "{}: column `label`: head {h} labels id {} as {bad}, out of range for K = {k}",
                path.display(),
                ids[row]
            );
        }
        out.push(aligned);
    }
    Ok(out)
}
