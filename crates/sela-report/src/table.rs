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

/// The lines as an aligned text table; `k` names the head size in the header.
pub fn render(lines: &[RoundLine], k: usize, split: &str) -> String {
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{split} split; ACC/NMI/ARI of the best head with K = {k}; minutes since round 0's evaluation"
    );
    let _ = writeln!(
        out,
        "{:>5} {:>4} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7}",
        "round", "head", "ACC", "NMI", "ARI", "20-NN", "probe", "minutes"
    );
    for l in lines {
        let _ = writeln!(
            out,
            "{:>5} {:>4} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7.1}",
            l.round,
            l.head.map_or_else(|| "-".to_string(), |h| h.to_string()),
            cell(l.acc),
            cell(l.nmi),
            cell(l.ari),
            cell(l.knn20),
            cell(l.probe),
            l.minutes
        );
    }
    out
}

/// The table of a run's metrics for the heads of size `k` among `head_sizes` (the config's
/// `model.heads`).
pub fn table(metrics: &[MetricRow], head_sizes: &[usize], k: usize) -> String {
    let heads: Vec<u32> = head_sizes
        .iter()
        .enumerate()
        .filter(|&(_, &size)| size == k)
        .map(|(h, _)| h as u32)
        .collect();
    render(&round_lines(metrics, &heads), k, split_of(metrics))
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
}
