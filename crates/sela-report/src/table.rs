//! A plain-text table of a run's headline metrics per round, for terminals and benchmark logs.

use std::collections::BTreeMap;
use std::fmt::Write;

use sela_io::metrics::MetricRow;

/// One round's line: the best head of size `k` (by accuracy) and the representation metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundLine {
    /// The round (0: the untrained model).
    pub round: u32,
    /// The head with the highest accuracy among the heads with K = `k`.
    pub head: Option<u32>,
    /// That head's accuracy (best one-to-one matching).
    pub acc: Option<f64>,
    /// That head's normalised mutual information.
    pub nmi: Option<f64>,
    /// That head's adjusted Rand index.
    pub ari: Option<f64>,
    /// Weighted 20-NN accuracy on the embeddings.
    pub knn20: Option<f64>,
    /// Linear-probe accuracy on the embeddings.
    pub probe: Option<f64>,
    /// Minutes from round 0's evaluation to this round's.
    pub minutes: f64,
}

/// The split a table reports: `test` where the run has one, else `train`.
fn split_of(metrics: &[MetricRow]) -> &'static str {
    if metrics.iter().any(|m| m.split == "test") {
        "test"
    } else {
        "train"
    }
}

/// Per round, the best of the heads listed in `heads` (their indices; those with K = `k`) and
/// the embedding metrics, on the test split (the train split for runs without one).
pub fn round_lines(metrics: &[MetricRow], heads: &[u32]) -> Vec<RoundLine> {
    let split = split_of(metrics);
    let mut by_round: BTreeMap<u32, Vec<&MetricRow>> = BTreeMap::new();
    for m in metrics.iter().filter(|m| m.split == split) {
        by_round.entry(m.round).or_default().push(m);
    }
    let start = by_round
        .values()
        .next()
        .and_then(|rows| rows.iter().map(|m| m.time_ms).max())
        .unwrap_or(0);
    by_round
        .into_iter()
        .map(|(round, rows)| {
            let value = |head: Option<u32>, metric: &str| {
                rows.iter()
                    .find(|m| m.head == head && m.metric == metric)
                    .map(|m| m.value)
            };
            let head = heads
                .iter()
                .copied()
                .filter_map(|h| value(Some(h), "acc").map(|a| (h, a)))
                .fold(None, |best: Option<(u32, f64)>, (h, a)| match best {
                    Some((_, b)) if b >= a => best,
                    _ => Some((h, a)),
                })
                .map(|(h, _)| h);
            let end = rows.iter().map(|m| m.time_ms).max().unwrap_or(start);
            RoundLine {
                round,
                head,
                acc: head.and_then(|h| value(Some(h), "acc")),
                nmi: head.and_then(|h| value(Some(h), "nmi")),
                ari: head.and_then(|h| value(Some(h), "ari")),
                knn20: value(None, "knn20_acc"),
                probe: value(None, "linear_probe_acc"),
                minutes: (end - start) as f64 / 60_000.0,
            }
        })
        .collect()
}

/// A metric to three decimals, `-` where there is none.
fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

/// The columns every table ends with: head, ACC, NMI, ARI, 20-NN, probe, minutes.
fn metric_columns(head: &str, line: [Option<f64>; 5], minutes: Option<f64>) -> String {
    let [acc, nmi, ari, knn20, probe] = line.map(cell);
    let minutes = minutes.map_or_else(|| "-".to_string(), |m| format!("{m:.1}"));
    format!("{head:>4} {acc:>6} {nmi:>6} {ari:>6} {knn20:>6} {probe:>6} {minutes:>7}")
}

/// The header of [`metric_columns`].
const METRIC_HEADER: &str = "head    ACC    NMI    ARI  20-NN  probe minutes";

impl RoundLine {
    /// The line's metric values in table order.
    fn values(&self) -> [Option<f64>; 5] {
        [self.acc, self.nmi, self.ari, self.knn20, self.probe]
    }

    /// [`metric_columns`] of this line.
    fn columns(&self) -> String {
        let head = self.head.map_or_else(|| "-".to_string(), |h| h.to_string());
        metric_columns(&head, self.values(), Some(self.minutes))
    }
}

/// The indices of the heads of size `k` among `head_sizes` (the config's `model.heads`).
fn heads_of_size(head_sizes: &[usize], k: usize) -> Vec<u32> {
    head_sizes
        .iter()
        .enumerate()
        .filter(|&(_, &size)| size == k)
        .map(|(h, _)| h as u32)
        .collect()
}

/// The lines as an aligned text table; `k` names the head size in the header.
pub fn render(lines: &[RoundLine], k: usize, split: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{split} split; ACC/NMI/ARI of the best head with K = {k}; minutes since round 0's evaluation"
    );
    let _ = writeln!(out, "round {METRIC_HEADER}");
    for l in lines {
        let _ = writeln!(out, "{:>5} {}", l.round, l.columns());
    }
    out
}

/// The table of a run's metrics for the heads of size `k` among `head_sizes` (the config's
/// `model.heads`).
pub fn table(metrics: &[MetricRow], head_sizes: &[usize], k: usize) -> String {
    let heads = heads_of_size(head_sizes, k);
    render(&round_lines(metrics, &heads), k, split_of(metrics))
}

/// One run of a comparison: a name for it and its metrics.
#[derive(Debug, Clone)]
pub struct Run {
    /// What the table calls the run (its directory).
    pub name: String,
    /// Its `metrics.parquet` rows.
    pub metrics: Vec<MetricRow>,
}

/// Mean and sample standard deviation of the values present; the deviation needs two values.
fn mean_sd(values: impl Iterator<Item = Option<f64>>) -> (Option<f64>, Option<f64>) {
    let v: Vec<f64> = values.flatten().collect();
    if v.is_empty() {
        return (None, None);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = (v.len() > 1)
        .then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (Some(mean), sd)
}

/// The runs side by side at the latest round every one of them has evaluated: per run the best
/// head of size `k` among `head_sizes` and the embedding metrics, then their mean and sample
/// standard deviation over the runs. Errors when the runs share no evaluated round, or a run has
/// more heads than `head_sizes` (a run of another pipeline).
pub fn compare(runs: &[Run], head_sizes: &[usize], k: usize) -> Result<String, String> {
    if let Some((run, head)) = runs.iter().find_map(|r| {
        let last = r.metrics.iter().filter_map(|m| m.head).max()?;
        (last as usize >= head_sizes.len()).then_some((r, last))
    }) {
        return Err(format!(
            "{}: its metrics have head {head}, the config's model.heads {head_sizes:?} has {} heads; compare runs of the pipeline given with --config",
            run.name,
            head_sizes.len()
        ));
    }
    let heads = heads_of_size(head_sizes, k);
    let split = if runs.iter().all(|r| split_of(&r.metrics) == "test") {
        "test"
    } else {
        "train"
    };
    let per_run: Vec<Vec<RoundLine>> = runs
        .iter()
        .map(|r| {
            let on_split: Vec<MetricRow> = r
                .metrics
                .iter()
                .filter(|m| m.split == split)
                .cloned()
                .collect();
            round_lines(&on_split, &heads)
        })
        .collect();
    let mut shared = per_run
        .first()
        .into_iter()
        .flatten()
        .map(|l| l.round)
        .filter(|r| {
            per_run
                .iter()
                .all(|lines| lines.iter().any(|l| l.round == *r))
        });
    let Some(round) = shared.next_back() else {
        let reached: Vec<String> = runs
            .iter()
            .zip(&per_run)
            .map(|(r, lines)| {
                let rounds: Vec<u32> = lines.iter().map(|l| l.round).collect();
                format!("{}: rounds {rounds:?}", r.name)
            })
            .collect();
        return Err(format!(
            "the runs share no evaluated round on the {split} split ({})",
            reached.join("; ")
        ));
    };
    let at: Vec<&RoundLine> = per_run
        .iter()
        .map(|lines| {
            lines
                .iter()
                .find(|l| l.round == round)
                .expect("checked above")
        })
        .collect();
    let hash = |r: &Run| {
        r.metrics.iter().find(|m| m.round == round).map_or_else(
            || "-".to_string(),
            |m| m.config_hash.chars().take(12).collect(),
        )
    };
    let width = runs
        .iter()
        .map(|r| r.name.chars().count())
        .chain([4])
        .max()
        .unwrap_or(4);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{split} split, round {round} (the latest every run has); ACC/NMI/ARI of the best head with K = {k}"
    );
    let _ = writeln!(out, "{:<width$} {:>12} {METRIC_HEADER}", "run", "config");
    for (r, l) in runs.iter().zip(&at) {
        let _ = writeln!(out, "{:<width$} {:>12} {}", r.name, hash(r), l.columns());
    }
    let values: Vec<[Option<f64>; 6]> = at
        .iter()
        .map(|l| {
            let [a, b, c, d, e] = l.values();
            [a, b, c, d, e, Some(l.minutes)]
        })
        .collect();
    let (means, sds): (Vec<Option<f64>>, Vec<Option<f64>>) =
        (0..6).map(|c| mean_sd(values.iter().map(|v| v[c]))).unzip();
    let line = |v: &[Option<f64>]| metric_columns("", [v[0], v[1], v[2], v[3], v[4]], v[5]);
    let n = format!("n = {}", runs.len());
    let _ = writeln!(out, "{:<width$} {n:>12} {}", "mean", line(&means));
    let _ = writeln!(out, "{:<width$} {:>12} {}", "sd", "", line(&sds));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(round: u32, head: Option<u32>, metric: &str, value: f64, t: i64) -> MetricRow {
        MetricRow {
            round,
            head,
            split: "test".into(),
            metric: metric.into(),
            value,
            config_hash: "h".into(),
            time_ms: t,
        }
    }

    #[test]
    fn picks_the_best_head_of_the_size_and_times_from_round_zero() {
        let m = vec![
            row(0, Some(0), "acc", 0.10, 1_000),
            row(0, None, "knn20_acc", 0.60, 1_000),
            row(1, Some(0), "acc", 0.40, 61_000),
            row(1, Some(0), "nmi", 0.30, 61_000),
            row(1, Some(1), "acc", 0.50, 61_000),
            row(1, Some(1), "nmi", 0.45, 61_000),
            row(1, Some(1), "ari", 0.35, 61_000),
            // A head of another size is never picked, however good.
            row(1, Some(2), "acc", 0.90, 61_000),
            row(1, None, "knn20_acc", 0.70, 61_000),
            row(1, None, "linear_probe_acc", 0.75, 121_000),
        ];
        let lines = round_lines(&m, &[0, 1]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].head, Some(0));
        assert_eq!(lines[0].minutes, 0.0);
        let l = &lines[1];
        assert_eq!(
            (l.head, l.acc, l.nmi, l.ari, l.knn20, l.probe),
            (
                Some(1),
                Some(0.50),
                Some(0.45),
                Some(0.35),
                Some(0.70),
                Some(0.75)
            )
        );
        assert_eq!(l.minutes, 2.0);
        let text = table(&m, &[10, 10, 50], 10);
        assert!(
            text.contains("    1    1  0.500  0.450  0.350  0.700  0.750     2.0"),
            "{text}"
        );
    }

    #[test]
    fn compares_runs_at_their_latest_shared_round_with_mean_and_sd() {
        let run = |name: &str, accs: &[f64]| Run {
            name: name.into(),
            metrics: accs
                .iter()
                .enumerate()
                .flat_map(|(r, &a)| {
                    let t = r as i64 * 60_000;
                    [
                        row(r as u32, Some(0), "acc", a, t),
                        row(r as u32, None, "knn20_acc", a + 0.1, t),
                    ]
                })
                .collect(),
        };
        // Run b stopped a round early: both are compared at round 1.
        let runs = [run("a", &[0.1, 0.5, 0.9]), run("b", &[0.1, 0.7])];
        let text = compare(&runs, &[10], 10).unwrap();
        assert!(text.starts_with("test split, round 1 "), "{text}");
        let cells = |prefix: &str| -> Vec<String> {
            let line = text.lines().find(|l| l.starts_with(prefix)).unwrap();
            line.split_whitespace().map(str::to_string).collect()
        };
        assert_eq!(cells("a ")[3..], ["0.500", "-", "-", "0.600", "-", "1.0"]);
        assert_eq!(cells("b ")[3..], ["0.700", "-", "-", "0.800", "-", "1.0"]);
        assert_eq!(cells("mean")[4..], ["0.600", "-", "-", "0.700", "-", "1.0"]);
        // Sample standard deviation: |0.5 - 0.7| / sqrt(2).
        assert_eq!(cells("sd")[1..], ["0.141", "-", "-", "0.141", "-", "0.0"]);

        // One run alone has no deviation; runs without a shared round are an error.
        let one = compare(&runs[..1], &[10], 10).unwrap();
        assert!(one.contains("round 2 "), "{one}");
        let sd_line = one.lines().find(|l| l.starts_with("sd")).unwrap();
        assert_eq!(sd_line.split_whitespace().nth(1), Some("-"));
        let late = Run {
            name: "late".into(),
            metrics: vec![row(5, Some(0), "acc", 0.3, 0)],
        };
        let err = compare(&[run("a", &[0.1]), late], &[10], 10).unwrap_err();
        assert!(
            err.contains("late: rounds [5]") && err.contains("a: rounds [0]"),
            "{err}"
        );

        // A run with more heads than the config is a run of another pipeline.
        let wide = Run {
            name: "wide".into(),
            metrics: vec![row(0, Some(3), "acc", 0.3, 0)],
        };
        let err = compare(&[run("a", &[0.1]), wide], &[10, 10], 10).unwrap_err();
        assert!(err.starts_with("wide: its metrics have head 3"), "{err}");
    }
}
