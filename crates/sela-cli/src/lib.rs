//! The conventions every stage binary shares, so a user who knows one stage knows them all:
//!
//! - `--config PIPELINE.toml` where a pipeline applies, `--set section.key=value` to override one
//!   value, explicit input and output paths as flags;
//! - a progress bar on stderr for anything longer than a second (plain periodic lines when stderr
//!   is not a terminal, as under a batch scheduler), silenced by `--quiet`;
//! - a one-line JSON summary on stdout at the end;
//! - exit status 0 on success, 1 on a runtime error, 2 on a usage error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sela_config::PipelineConfig;
use serde::Serialize;

/// Exit status of a runtime error (clap exits with 2 for usage errors).
pub const EXIT_RUNTIME_ERROR: u8 = 1;
/// Exit status of a usage error.
pub const EXIT_USAGE_ERROR: u8 = 2;

/// Flags shared by stages that read a pipeline config.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// The pipeline config (TOML) every stage of a run reads.
    #[arg(long, value_name = "PIPELINE.toml")]
    pub config: PathBuf,
    /// Override one config value, e.g. `--set assign.lambda=50` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The self-labeling round this invocation belongs to (stamped into outputs).
    #[arg(long, default_value_t = 0)]
    pub round: u32,
}

impl PipelineArgs {
    /// Loads the config with the overrides applied.
    pub fn load(&self) -> anyhow::Result<PipelineConfig> {
        Ok(PipelineConfig::load_with(&self.config, &self.overrides)?)
    }
}

/// Pipeline flags for stages that can also run without a pipeline (an analyst's own files).
#[derive(Debug, Clone, clap::Args)]
pub struct OptionalPipelineArgs {
    /// The pipeline config (TOML); when given, its values are the defaults of the other flags.
    #[arg(long, value_name = "PIPELINE.toml")]
    pub config: Option<PathBuf>,
    /// Override one config value, e.g. `--set assign.lambda=50` (repeatable; needs --config).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", requires = "config")]
    pub overrides: Vec<String>,
    /// The self-labeling round this invocation belongs to (stamped into outputs).
    #[arg(long)]
    pub round: Option<u32>,
}

impl OptionalPipelineArgs {
    /// Loads the config, if one was given, with the overrides applied.
    pub fn load(&self) -> anyhow::Result<Option<PipelineConfig>> {
        match &self.config {
            Some(path) => Ok(Some(PipelineConfig::load_with(path, &self.overrides)?)),
            None => Ok(None),
        }
    }
}

/// Flags shared by every stage.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArgs {
    /// No progress output on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Runs a stage's body: prints its summary as one JSON line on stdout and returns exit status 0,
/// or prints the error chain on stderr and returns 1.
pub fn run<S: Serialize>(body: impl FnOnce() -> anyhow::Result<S>) -> ExitCode {
    finish(body(), |summary| {
        println!(
            "{}",
            serde_json::to_string(&summary).expect("summaries serialize")
        )
    })
}

/// [`run`] for a command whose output is text for people (a table): prints it as it is.
pub fn run_text(body: impl FnOnce() -> anyhow::Result<String>) -> ExitCode {
    finish(body(), |text| print!("{text}"))
}

/// Prints a body's output with `print` and returns 0, or its error chain on stderr and 1.
fn finish<T>(result: anyhow::Result<T>, print: impl FnOnce(T)) -> ExitCode {
    match result {
        Ok(out) => {
            print(out);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME_ERROR)
        }
    }
}

/// Reports a usage error (a flag combination clap cannot express) and exits with status 2.
pub fn usage_error(message: impl std::fmt::Display) -> ! {
    eprintln!("error: {message}");
    std::process::exit(EXIT_USAGE_ERROR as i32)
}

/// Progress of a long operation: an animated bar on a terminal, a line every ten seconds
/// otherwise, nothing when quiet.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: Option<PlainProgress>,
}

struct PlainProgress {
    label: String,
    unit: String,
    total: Option<u64>,
    done: u64,
    message: String,
    started: Instant,
    last: Instant,
}

impl Progress {
    /// A progress display for `total` items (unknown when `None`) of `unit`, e.g. "images".
    pub fn new(label: &str, total: Option<u64>, unit: &str, quiet: bool) -> Self {
        if quiet {
            return Progress {
                bar: None,
                plain: None,
            };
        }
        if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let template = if total.is_some() {
                format!("{label:>8} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}} {{msg}}")
            } else {
                format!("{label:>8} {{spinner}} {{pos}} {unit} {{per_sec}} {{elapsed}} {{msg}}")
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(&template)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
            Progress {
                bar: Some(bar),
                plain: None,
            }
        } else {
            let now = Instant::now();
            Progress {
                bar: None,
                plain: Some(PlainProgress {
                    label: label.to_string(),
                    unit: unit.to_string(),
                    total,
                    done: 0,
                    message: String::new(),
                    started: now,
                    last: now,
                }),
            }
        }
    }

    /// Advances by `n` items.
    pub fn inc(&mut self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        if let Some(p) = &mut self.plain {
            p.done += n;
            p.maybe_print(false);
        }
    }

    /// Sets the trailing message (e.g. the current loss).
    pub fn message(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        } else if let Some(p) = &mut self.plain {
            p.message = msg;
        }
    }

    /// Ends the display.
    pub fn finish(mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(p) = &mut self.plain {
            p.maybe_print(true);
        }
    }
}

impl PlainProgress {
    fn maybe_print(&mut self, last: bool) {
        let now = Instant::now();
        if !last && now.duration_since(self.last) < Duration::from_secs(10) {
            return;
        }
        self.last = now;
        let secs = now.duration_since(self.started).as_secs_f64().max(1e-9);
        let rate = self.done as f64 / secs;
        let of = self.total.map(|t| format!("/{t}")).unwrap_or_default();
        eprintln!(
            "{}: {}{} {} ({:.1}/s, {:.1}s) {}",
            self.label, self.done, of, self.unit, rate, secs, self.message
        );
    }
}
