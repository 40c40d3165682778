//! Assembling the HTML page.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use anyhow::Result;
use sela_io::cluster_stats::ClusterStatRow;
use sela_io::metrics::MetricRow;

use crate::html::{escape, image_data_uri};
use crate::plots::{heat_map, line_chart, size_bars, Line, Reference, PALETTE, REFERENCE};
use crate::rundir::{Assignment, Source, Truth};
use crate::ReportOptions;

/// Everything the page is made from.
pub struct PageInput<'a> {
    pub opts: &'a ReportOptions,
    pub k: usize,
    pub metrics: &'a [MetricRow],
    pub stats: &'a BTreeMap<u32, Vec<ClusterStatRow>>,
    pub losses: &'a BTreeMap<u32, Vec<(f64, f64)>>,
    pub assignment: Option<&'a Assignment>,
    pub truth: &'a Truth,
    pub gallery: &'a GalleryPlan,
    pub pictures: &'a HashMap<u64, Vec<u8>>,
}

/// The page and what it holds.
pub struct Rendered {
    pub html: String,
    pub charts: usize,
    pub images: usize,
    pub notes: Vec<String>,
}

/// One image of a gallery.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: u64,
    pub confidence: f32,
    pub class: Option<i64>,
}

/// One cluster's gallery.
#[derive(Debug, Clone)]
pub struct GalleryCluster {
    pub cluster: u32,
    pub size: usize,
    /// Majority class and its share of the cluster's labelled images.
    pub majority: Option<(i64, f64)>,
    /// Class counts (index = class), empty without ground truth.
    pub class_counts: Vec<u64>,
    /// Most confident first.
    pub top: Vec<Member>,
    /// Least confident first, disjoint from `top`.
    pub bottom: Vec<Member>,
}

/// The clusters shown, in display order (by majority class, then purity).
#[derive(Debug, Clone, Default)]
pub struct GalleryPlan {
    pub clusters: Vec<GalleryCluster>,
    /// Non-empty clusters left out because of the cap.
    pub omitted: usize,
}

impl GalleryPlan {
    /// Every image id the galleries show.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.clusters
            .iter()
            .flat_map(|c| c.top.iter().chain(&c.bottom).map(|m| m.id))
    }
}

/// Chooses the galleries: per non-empty cluster its `per_row` most and least confident images;
/// at most `max_clusters` clusters (the largest).
pub fn gallery_plan(
    assignment: Option<&Assignment>,
    truth: &Truth,
    k: usize,
    per_row: usize,
    max_clusters: usize,
) -> GalleryPlan {
    let Some(a) = assignment else {
        return GalleryPlan::default();
    };
    let mut members: Vec<Vec<(f32, u64)>> = vec![Vec::new(); k];
    for ((&id, &c), &conf) in a.ids.iter().zip(&a.clusters).zip(&a.confidence) {
        members[c as usize].push((conf, id));
    }
    let mut clusters: Vec<GalleryCluster> = members
        .into_iter()
        .enumerate()
        .filter(|(_, m)| !m.is_empty())
        .map(|(c, mut m)| {
            m.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            let mut class_counts = vec![0u64; truth.classes];
            for (_, id) in &m {
                if let Some(&l) = truth.by_id.get(id) {
                    class_counts[l as usize] += 1;
                }
            }
            let labelled: u64 = class_counts.iter().sum();
            let majority = (labelled > 0).then(|| {
                let mut best = 0;
                for (j, &n) in class_counts.iter().enumerate() {
                    if n > class_counts[best] {
                        best = j;
                    }
                }
                (best as i64, class_counts[best] as f64 / labelled as f64)
            });
            let member = |&(confidence, id): &(f32, u64)| Member {
                id,
                confidence,
                class: truth.by_id.get(&id).copied(),
            };
            let n_top = per_row.min(m.len());
            let n_bottom = per_row.min(m.len() - n_top);
            GalleryCluster {
                cluster: c as u32,
                size: m.len(),
                majority,
                class_counts,
                top: m[..n_top].iter().map(member).collect(),
                bottom: m[m.len() - n_bottom..].iter().rev().map(member).collect(),
            }
        })
        .collect();
    let mut omitted = 0;
    if clusters.len() > max_clusters {
        clusters.sort_by(|a, b| b.size.cmp(&a.size).then(a.cluster.cmp(&b.cluster)));
        omitted = clusters.len() - max_clusters;
        clusters.truncate(max_clusters);
    }
    clusters.sort_by(|a, b| {
        let key = |g: &GalleryCluster| g.majority.map(|m| m.0).unwrap_or(i64::MAX);
        let purity = |g: &GalleryCluster| g.majority.map(|m| m.1).unwrap_or(0.0);
        key(a)
            .cmp(&key(b))
            .then(purity(b).total_cmp(&purity(a)))
            .then(a.cluster.cmp(&b.cluster))
    });
    GalleryPlan { clusters, omitted }
}

/// The values of one metric by round.
fn series(metrics: &[MetricRow], head: Option<u32>, split: &str, metric: &str) -> Vec<(f64, f64)> {
    let by_round: BTreeMap<u32, f64> = metrics
        .iter()
        .filter(|r| r.head == head && r.split == split && r.metric == metric)
        .map(|r| (r.round, r.value))
        .collect();
    by_round.into_iter().map(|(r, v)| (r as f64, v)).collect()
}

fn has(metrics: &[MetricRow], head: Option<u32>, split: &str, metric: &str) -> bool {
    metrics
        .iter()
        .any(|r| r.head == head && r.split == split && r.metric == metric)
}

/// A headline number.
struct Card {
    name: String,
    scope: String,
    values: Vec<(f64, f64)>,
    floor: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Good,
    Mid,
    Bad,
    Unknown,
}

impl Card {
    fn status(&self) -> Status {
        let (Some(first), Some(last)) = (self.values.first(), self.values.last()) else {
            return Status::Unknown;
        };
        let improved = last.1 > first.1 + 1e-3 || self.values.len() == 1;
        match self.floor {
            Some(f) if last.1 >= f => Status::Good,
            Some(_) if improved && self.values.len() > 1 => Status::Mid,
            Some(_) => Status::Bad,
            None if self.values.len() == 1 => Status::Unknown,
            None if improved => Status::Good,
            None => Status::Bad,
        }
    }

    fn html(&self, floor_label: &str) -> String {
        let class = match self.status() {
            Status::Good => "good",
            Status::Mid => "mid",
            Status::Bad => "bad",
            Status::Unknown => "unknown",
        };
        let mut out = format!(
            "<div class=\"card {class}\"><div class=\"name\">{} <span class=\"scope\">{}</span></div>",
            escape(&self.name),
            escape(&self.scope)
        );
        match (self.values.first(), self.values.last()) {
            (Some(first), Some(last)) => {
                let _ = write!(
                    out,
                    "<div class=\"value\" title=\"round {:.0}\">{:.3}</div>",
                    last.0, last.1
                );
                if self.values.len() > 1 {
                    let _ = write!(
                        out,
                        "<div class=\"detail\">round {:.0}: {:.3} <b>{}</b></div>",
                        first.0,
                        first.1,
                        signed(last.1 - first.1)
                    );
                }
                if let Some(f) = self.floor {
                    let _ = write!(
                        out,
                        "<div class=\"detail\">{}: {:.3} <b>{}</b></div>",
                        escape(floor_label),
                        f,
                        signed(last.1 - f)
                    );
                }
            }
            _ => {
                out.push_str("<div class=\"value\">–</div><div class=\"detail\">not measured</div>")
            }
        }
        out.push_str("</div>");
        out
    }
}

fn signed(v: f64) -> String {
    if v >= 0.0 {
        format!("+{v:.3}")
    } else {
        format!("−{:.3}", -v)
    }
}

fn figure(svg: &str, caption: &str, wide: bool) -> String {
    format!(
        "<figure class=\"{}\">{svg}<figcaption>{}</figcaption></figure>",
        if wide { "chart wide" } else { "chart" },
        escape(caption)
    )
}

/// Renders the page.
pub fn render(input: &PageInput<'_>) -> Result<Rendered> {
    let opts = input.opts;
    let cfg = &opts.config;
    let m = input.metrics;
    let head = opts.head;
    let heads = cfg.model.heads.len() as u32;
    let floors: BTreeMap<&str, f64> = opts.floors.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let floor_ref = |metric: &str, name: &str, color| {
        floors.get(metric).map(|&value| Reference {
            label: format!("{} {name} {value:.3}", opts.floor_label),
            value,
            color,
        })
    };
    let mut notes = Vec::new();
    let mut charts = Vec::new();

    let split = if has(m, Some(head), "test", "nmi") {
        "test"
    } else {
        "train"
    };
    let rounds: Vec<u32> = {
        let mut r: Vec<u32> = m.iter().map(|r| r.round).collect();
        r.sort_unstable();
        r.dedup();
        r
    };
    let acc_metric = if has(m, Some(head), split, "acc") {
        "acc"
    } else {
        "purity"
    };
    let acc_name = if acc_metric == "acc" { "ACC" } else { "Purity" };
    let has_truth = has(m, Some(head), split, "nmi");
    if !has_truth {
        notes.push("no ground truth in the metrics: clustering scores are not shown".to_string());
    }

    // Headline cards.
    let scope = format!("head {head} · {split}");
    let mut cards = Vec::new();
    for (metric, name) in [(acc_metric, acc_name), ("nmi", "NMI"), ("ari", "ARI")] {
        cards.push(Card {
            name: name.to_string(),
            scope: scope.clone(),
            values: series(m, Some(head), split, metric),
            floor: floors.get(metric).copied(),
        });
    }
    for &kk in &cfg.eval.knn_k {
        let metric = format!("knn{kk}_acc");
        cards.push(Card {
            name: format!("{kk}-NN"),
            scope: "embedding · test".to_string(),
            values: series(m, None, "test", &metric),
            floor: floors.get(metric.as_str()).copied(),
        });
    }
    cards.push(Card {
        name: "Linear probe".to_string(),
        scope: "embedding · test".to_string(),
        values: series(m, None, "test", "linear_probe_acc"),
        floor: floors.get("linear_probe_acc").copied(),
    });
    let measured: Vec<&Card> = cards.iter().filter(|c| !c.values.is_empty()).collect();
    let improved = measured
        .iter()
        .filter(|c| c.values.len() > 1 && c.values.last().unwrap().1 > c.values[0].1 + 1e-3)
        .count();
    let with_floor: Vec<&&Card> = measured.iter().filter(|c| c.floor.is_some()).collect();
    let above_floor = with_floor
        .iter()
        .filter(|c| c.values.last().unwrap().1 >= c.floor.unwrap())
        .count();
    let mut verdict = match rounds.last() {
        Some(&last) if rounds.len() > 1 => format!(
            "After round {last}: {improved} of {} headline numbers improved on round {}.",
            measured.len(),
            rounds[0]
        ),
        Some(&last) => format!("Only round {last} is evaluated so far."),
        None => "No evaluated rounds yet.".to_string(),
    };
    if !with_floor.is_empty() {
        let _ = write!(
            verdict,
            " {above_floor} of {} are at or above the {}.",
            with_floor.len(),
            opts.floor_label
        );
    }

    // Metrics over rounds.
    let scored = |metric: &str, name: &str, i: usize, dashed: bool, split: &str, h: Option<u32>| {
        let points = series(m, h, split, metric);
        (!points.is_empty()).then(|| Line {
            label: name.to_string(),
            points,
            color: PALETTE[i % PALETTE.len()],
            dashed,
        })
    };
    if has_truth {
        let mut lines: Vec<Line> = [(acc_metric, acc_name), ("nmi", "NMI"), ("ari", "ARI")]
            .iter()
            .enumerate()
            .filter_map(|(i, (metric, name))| scored(metric, name, i, false, split, Some(head)))
            .collect();
        if let Some(l) = scored(
            acc_metric,
            &format!("Sinkhorn labels {acc_name} (train)"),
            0,
            true,
            "labels",
            Some(head),
        ) {
            lines.push(l);
        }
        let refs: Vec<Reference> = [(acc_metric, acc_name), ("nmi", "NMI"), ("ari", "ARI")]
            .iter()
            .enumerate()
            .filter_map(|(i, (metric, name))| floor_ref(metric, name, PALETTE[i]))
            .collect();
        charts.push(figure(
            &line_chart(
                &format!("Clustering vs ground truth (head {head}, {split})"),
                "score",
                &lines,
                &refs,
                true,
            )?,
            "The head's argmax clustering scored against the true classes; dashed: the \
             Sinkhorn labels the round trained on.",
            false,
        ));
    }
    let mut repr: Vec<Line> = cfg
        .eval
        .knn_k
        .iter()
        .enumerate()
        .filter_map(|(i, kk)| {
            scored(
                &format!("knn{kk}_acc"),
                &format!("{kk}-NN"),
                i,
                false,
                "test",
                None,
            )
        })
        .collect();
    if let Some(l) = scored("linear_probe_acc", "linear probe", 2, false, "test", None) {
        repr.push(l);
    }
    if !repr.is_empty() {
        let mut refs: Vec<Reference> = cfg
            .eval
            .knn_k
            .iter()
            .enumerate()
            .filter_map(|(i, kk)| {
                floor_ref(&format!("knn{kk}_acc"), &format!("{kk}-NN"), PALETTE[i])
            })
            .collect();
        refs.extend(floor_ref("linear_probe_acc", "probe", PALETTE[2]));
        charts.push(figure(
            &line_chart("Embedding quality (test)", "accuracy", &repr, &refs, true)?,
            "Weighted kNN (cosine) and a linear probe on the frozen embeddings, trained on the \
             training split and scored on the test split.",
            false,
        ));
    } else {
        notes.push("no kNN or linear-probe results in the metrics".to_string());
    }
    let per_head = |metric: &str, split: &str| -> Vec<Line> {
        (0..heads)
            .filter_map(|h| {
                scored(
                    metric,
                    &format!("head {h} (K={})", cfg.model.heads[h as usize]),
                    h as usize,
                    false,
                    split,
                    Some(h),
                )
            })
            .collect()
    };
    if heads > 1 && has_truth {
        charts.push(figure(
            &line_chart(
                &format!("NMI of every head ({split})"),
                "NMI",
                &per_head("nmi", split),
                &[],
                true,
            )?,
            "Each head's argmax clustering against the true classes.",
            false,
        ));
    }
    let churn = per_head("label_churn", "train");
    if !churn.is_empty() {
        charts.push(figure(
            &line_chart("Label churn", "share changed", &churn, &[], true)?,
            "Share of training images whose Sinkhorn label changed from the previous round.",
            false,
        ));
    }
    let iters = per_head("sinkhorn_iterations", "train");
    if !iters.is_empty() {
        charts.push(figure(
            &line_chart("Sinkhorn iterations", "iterations", &iters, &[], false)?,
            "Iterations the label solver ran before meeting its tolerance (or its cap).",
            false,
        ));
    }
    let secs = per_head("sinkhorn_seconds", "train");
    if !secs.is_empty() {
        charts.push(figure(
            &line_chart("Sinkhorn time", "seconds", &secs, &[], false)?,
            "Wall time of each label solve.",
            false,
        ));
    }
    let losses: Vec<Line> = input
        .losses
        .iter()
        .map(|(&h, points)| Line {
            label: format!("head {h}"),
            points: points.clone(),
            color: PALETTE[h as usize % PALETTE.len()],
            dashed: false,
        })
        .collect();
    if !losses.is_empty() {
        charts.push(figure(
            &line_chart("Training loss", "mean cross-entropy", &losses, &[], false)?,
            "Mean training loss of each round against that round's labels.",
            false,
        ));
    }
    let balance: Vec<(f64, f64, f64)> = input
        .stats
        .iter()
        .filter_map(|(&r, rows)| {
            let sizes: Vec<u64> = rows
                .iter()
                .filter(|s| s.head == head)
                .map(|s| s.size)
                .collect();
            let total: u64 = sizes.iter().sum();
            (total > 0).then(|| {
                let even = total as f64 / sizes.len() as f64;
                let max = *sizes.iter().max().unwrap() as f64 / even;
                let min = *sizes.iter().min().unwrap() as f64 / even;
                (r as f64, max, min)
            })
        })
        .collect();
    if !balance.is_empty() {
        let lines = [
            Line {
                label: "largest cluster".into(),
                points: balance.iter().map(|b| (b.0, b.1)).collect(),
                color: PALETTE[1],
                dashed: false,
            },
            Line {
                label: "smallest cluster".into(),
                points: balance.iter().map(|b| (b.0, b.2)).collect(),
                color: PALETTE[0],
                dashed: false,
            },
        ];
        let even = [Reference {
            label: "balanced".into(),
            value: 1.0,
            color: REFERENCE,
        }];
        charts.push(figure(
            &line_chart(
                &format!("Cluster balance (head {head})"),
                "size ÷ (N/K)",
                &lines,
                &even,
                false,
            )?,
            "Largest and smallest cluster relative to a perfectly balanced one, per round.",
            false,
        ));
    }

    // Clusters of the latest assignment.
    let mut cluster_section = String::new();
    let source_text = |a: &Assignment| match a.source {
        Source::Labels => format!("Sinkhorn labels of round {}", a.round),
        Source::Argmax => format!("the heads' argmax on round {}'s features", a.round),
    };
    if let Some(a) = input.assignment {
        let mut sizes = vec![0u64; input.k];
        for &c in &a.clusters {
            sizes[c as usize] += 1;
        }
        let empty = sizes.iter().filter(|&&s| s == 0).count();
        cluster_section.push_str(&figure(
            &size_bars(
                &format!(
                    "Cluster sizes (head {head}, K={}, round {})",
                    input.k, a.round
                ),
                &sizes,
            )?,
            &format!(
                "Images per cluster in the {}; {empty} of {} clusters are empty.",
                source_text(a),
                input.k
            ),
            false,
        ));
        let g = input.gallery;
        if !input.truth.by_id.is_empty() && !g.clusters.is_empty() {
            let cols = input.truth.classes;
            let mut shares = Vec::with_capacity(g.clusters.len() * cols);
            for c in &g.clusters {
                let total: u64 = c.class_counts.iter().sum();
                shares.extend(c.class_counts.iter().map(|&n| {
                    if total > 0 {
                        n as f64 / total as f64
                    } else {
                        0.0
                    }
                }));
            }
            let row_labels: Vec<String> = g
                .clusters
                .iter()
                .map(|c| format!("{} ({})", c.cluster, c.size))
                .collect();
            let col_labels: Vec<String> = (0..cols as i64).map(|c| input.truth.name(c)).collect();
            cluster_section.push_str(&figure(
                &heat_map(
                    &format!("Clusters × classes (head {head}, round {})", a.round),
                    &shares,
                    &row_labels,
                    &col_labels,
                    "true class",
                    "cluster (size)",
                )?,
                "Share of each cluster's images in each true class (darker = more); clusters \
                 ordered by their majority class, so a learnt clustering shows a diagonal.",
                true,
            ));
        } else if input.truth.by_id.is_empty() {
            notes.push("the training dataset has no labels: no cluster × class heat map".into());
        }
    } else {
        notes.push("no labels or training features in the run yet: no cluster views".into());
    }

    // Galleries.
    let mut images = 0usize;
    let mut galleries = String::new();
    let g = input.gallery;
    if let Some(a) = input.assignment {
        if g.omitted > 0 {
            notes.push(format!(
                "galleries and heat map show the {} largest of {} non-empty clusters",
                g.clusters.len(),
                g.clusters.len() + g.omitted
            ));
        }
        let frames = if input.truth.by_id.is_empty() {
            ""
        } else {
            " A red frame marks an image outside the cluster's majority class."
        };
        let _ = write!(
            galleries,
            "<p class=\"lead\">Head {head}, {}. Each cluster: its most confident images, then \
             its least confident.{frames}</p>",
            escape(&source_text(a))
        );
        for c in &g.clusters {
            let title = match c.majority {
                Some((class, purity)) => format!(
                    "{} images · majority <b>{}</b> ({:.0}%)",
                    c.size,
                    escape(&input.truth.name(class)),
                    100.0 * purity
                ),
                None => format!("{} images", c.size),
            };
            let _ = write!(
                galleries,
                "<div class=\"cluster\"><h3>Cluster {} <span>{title}</span></h3>",
                c.cluster
            );
            for (label, members) in [("most confident", &c.top), ("least confident", &c.bottom)] {
                if members.is_empty() {
                    continue;
                }
                let _ = write!(
                    galleries,
                    "<div class=\"row\"><span class=\"lbl\">{label}</span>"
                );
                for mem in members {
                    let off =
                        matches!((c.majority, mem.class), (Some((maj, _)), Some(cl)) if cl != maj);
                    let class_text = mem
                        .class
                        .map(|cl| format!(" · {}", input.truth.name(cl)))
                        .unwrap_or_default();
                    let tip = escape(&format!(
                        "id {}{class_text} · confidence {:.3}",
                        mem.id, mem.confidence
                    ));
                    match input.pictures.get(&mem.id).and_then(|b| image_data_uri(b)) {
                        Some(uri) => {
                            images += 1;
                            let _ = write!(
                                galleries,
                                "<img class=\"g{}\" src=\"{uri}\" alt=\"{tip}\" title=\"{tip}\">",
                                if off { " off" } else { "" }
                            );
                        }
                        None => {
                            let _ =
                                write!(galleries, "<span class=\"noimg\" title=\"{tip}\">?</span>");
                        }
                    }
                }
                galleries.push_str("</div>");
            }
            galleries.push_str("</div>");
        }
    }

    // The page.
    let last_round = rounds.last().copied();
    let mut html = String::with_capacity(1 << 20);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>sela report: {name}</title><style>{CSS}</style></head><body>\
         <header><h1>sela run <q>{name}</q></h1><p class=\"sub\">{rounds} · heads {heads:?} · \
         config {hash} · training data {data} · {classes} classes</p></header>",
        name = escape(&cfg.pipeline.name),
        rounds = match last_round {
            Some(r) => format!("rounds {}–{r} evaluated", rounds[0]),
            None => "no round evaluated".to_string(),
        },
        heads = cfg.model.heads,
        hash = escape(&cfg.hash()),
        data = escape(&cfg.data.train.display().to_string()),
        classes = input.truth.classes,
    );
    let _ = write!(
        html,
        "<section id=\"headline\"><h2>Is it learning?</h2><p class=\"verdict\">{}</p><div class=\"cards\">",
        escape(&verdict)
    );
    for c in &cards {
        html.push_str(&c.html(&opts.floor_label));
    }
    html.push_str("</div>");
    if !notes.is_empty() {
        html.push_str("<ul class=\"notes\">");
        for n in &notes {
            let _ = write!(html, "<li>{}</li>", escape(n));
        }
        html.push_str("</ul>");
    }
    html.push_str("</section>");
    let _ = write!(
        html,
        "<section id=\"curves\"><h2>Metrics over rounds</h2><div class=\"grid\">{}</div></section>",
        charts.concat()
    );
    if !cluster_section.is_empty() {
        let _ = write!(
            html,
            "<section id=\"clusters\"><h2>Clusters</h2><div class=\"grid\">{cluster_section}</div></section>"
        );
    }
    if !galleries.is_empty() {
        let _ = write!(
            html,
            "<section id=\"galleries\"><h2>Cluster galleries</h2>{galleries}</section>"
        );
    }
    html.push_str(
        "<footer>Written by sela-report. Metrics: <code>metrics.parquet</code> (long format: \
         round, head, split, metric, value); per-round cluster statistics: \
         <code>round-RRR/cluster_stats.parquet</code>.</footer></body></html>\n",
    );
    let chart_count = charts.len() + cluster_section.matches("<figure").count();
    Ok(Rendered {
        html,
        charts: chart_count,
        images,
        notes,
    })
}

const CSS: &str = "\
:root{--fg:#1d2329;--muted:#5f6b76;--line:#e3e7eb;--good:#0a7d4f;--mid:#b36b00;--bad:#b3261e}\
*{box-sizing:border-box}\
body{margin:0;padding:24px 32px 48px;font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,\
'Helvetica Neue',Arial,sans-serif;color:var(--fg);background:#f6f7f9}\
header h1{margin:0;font-size:26px}header q{font-weight:600}\
.sub{margin:4px 0 0;color:var(--muted)}\
h2{font-size:20px;margin:32px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--line)}\
.verdict{font-size:16px;margin:0 0 14px}\
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}\
.card{background:#fff;border:1px solid var(--line);border-left:6px solid #9aa5b1;border-radius:8px;\
padding:10px 14px}\
.card.good{border-left-color:var(--good)}.card.mid{border-left-color:var(--mid)}\
.card.bad{border-left-color:var(--bad)}\
.card .name{font-weight:600}.card .scope{font-weight:400;color:var(--muted);font-size:13px}\
.card .value{font-size:32px;font-weight:700;font-variant-numeric:tabular-nums;margin:2px 0}\
.card .detail{font-size:13px;color:var(--muted);font-variant-numeric:tabular-nums}\
.card.good b{color:var(--good)}.card.bad b{color:var(--bad)}.card.mid b{color:var(--mid)}\
.notes{color:var(--muted);font-size:14px}\
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:16px}\
figure.chart{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px}\
figure.chart.wide{grid-column:1/-1}figure.chart.wide svg{margin:0 auto}\
figure.chart svg{display:block;max-width:100%;height:auto}\
figcaption{font-size:13px;color:var(--muted);padding:4px 6px 2px}\
.lead{color:var(--muted)}\
.cluster{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 12px;\
margin:0 0 10px}\
.cluster h3{margin:0 0 6px;font-size:15px}.cluster h3 span{font-weight:400;color:var(--muted)}\
.row{display:flex;align-items:center;flex-wrap:wrap;gap:4px;margin:2px 0}\
.lbl{width:118px;font-size:12px;color:var(--muted)}\
img.g{width:56px;height:56px;object-fit:contain;image-rendering:pixelated;background:#000;\
border:2px solid #fff;border-radius:3px}\
img.g.off{border-color:#d93025}\
.noimg{display:inline-block;width:56px;height:56px;line-height:56px;text-align:center;\
background:#eee;color:#999}\
footer{margin-top:32px;color:var(--muted);font-size:13px}\
code{font-size:12px}";
