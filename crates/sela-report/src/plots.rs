//! The report's charts, drawn with plotters' SVG backend and inlined into the page.

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Chart size in pixels.
pub const WIDTH: u32 = 560;
pub const HEIGHT: u32 = 320;

/// Series colours (colour-blind-safe, Okabe–Ito).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(240, 228, 66),
];

const FONT: &str = "sans-serif";
const GRID: RGBColor = RGBColor(232, 232, 232);
/// Colour of neutral reference lines.
pub const REFERENCE: RGBColor = RGBColor(150, 150, 150);

/// One line of a line chart: (x, y) points in increasing x.
#[derive(Debug, Clone)]
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub dashed: bool,
}

/// A horizontal reference line (e.g. a pixel-space floor).
#[derive(Debug, Clone)]
pub struct Reference {
    pub label: String,
    pub value: f64,
    pub color: RGBColor,
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// The value range to show: `unit` pins it to [0, 1] (widened if values fall outside);
/// otherwise the data's range with 8% padding (and 0 when all values are non-negative and near).
fn y_range(values: &[f64], unit: bool) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if unit {
        return (lo.min(0.0), hi.max(1.0));
    }
    let lo = if lo >= 0.0 { 0.0 } else { lo };
    let span = (hi - lo).max(hi.abs() * 0.1).max(1e-9);
    (lo, hi + 0.08 * span)
}

/// Formats an axis value without trailing noise.
fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A line chart over rounds.
pub fn line_chart(
    title: &str,
    y_label: &str,
    lines: &[Line],
    references: &[Reference],
    unit: bool,
) -> Result<String> {
    let xs: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .collect();
    let x_lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let x_hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (x_lo, x_hi) = if x_lo.is_finite() {
        (x_lo, x_hi.max(x_lo + 1.0))
    } else {
        (0.0, 1.0)
    };
    let mut ys: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .collect();
    ys.extend(references.iter().map(|r| r.value));
    let (y_lo, y_hi) = y_range(&ys, unit);
    let rounds = (x_hi - x_lo).round() as usize;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 17))
            .margin(12)
            .x_label_area_size(38)
            .y_label_area_size(52)
            .build_cartesian_2d(x_lo - 0.15..x_hi + 0.15, y_lo..y_hi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(y_label)
            .x_labels((rounds + 1).min(12))
            .y_labels(6)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 {
                    format!("{:.0}", x)
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| tick(*y))
            .light_line_style(TRANSPARENT)
            .bold_line_style(GRID)
            .axis_desc_style((FONT, 13))
            .label_style((FONT, 12))
            .draw()
            .map_err(err)?;
        for r in references {
            let style = ShapeStyle::from(r.color).stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x_lo - 0.15, r.value), (x_hi + 0.15, r.value)],
                    6,
                    4,
                    style,
                ))
                .map_err(err)?
                .label(r.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        for line in lines {
            let style = ShapeStyle::from(line.color).stroke_width(2);
            let anno = if line.dashed {
                chart
                    .draw_series(DashedLineSeries::new(line.points.clone(), 7, 4, style))
                    .map_err(err)?
            } else {
                chart
                    .draw_series(LineSeries::new(line.points.clone(), style))
                    .map_err(err)?
            };
            anno.label(line.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|&p| Circle::new(p, 3, line.color.filled())),
                )
                .map_err(err)?;
        }
        if !lines.is_empty() || !references.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .label_font((FONT, 12))
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Bars of cluster sizes in decreasing order, with the balanced size N/K as a reference line.
pub fn size_bars(title: &str, sizes: &[u64]) -> Result<String> {
    let mut sorted = sizes.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let k = sorted.len().max(1);
    let total: u64 = sorted.iter().sum();
    let balanced = total as f64 / k as f64;
    let top = (sorted.first().copied().unwrap_or(0) as f64).max(balanced) * 1.1 + 1.0;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 17))
            .margin(12)
            .x_label_area_size(38)
            .y_label_area_size(58)
            .build_cartesian_2d(0f64..k as f64, 0f64..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("clusters, largest first")
            .y_desc("images")
            .x_labels(0)
            .y_labels(6)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(TRANSPARENT)
            .bold_line_style(GRID)
            .axis_desc_style((FONT, 13))
            .label_style((FONT, 12))
            .draw()
            .map_err(err)?;
        let gap = if k > 60 { 0.0 } else { 0.12 };
        chart
            .draw_series(sorted.iter().enumerate().map(|(i, &s)| {
                Rectangle::new(
                    [(i as f64 + gap, 0.0), (i as f64 + 1.0 - gap, s as f64)],
                    PALETTE[0].filled(),
                )
            }))
            .map_err(err)?;
        let style = ShapeStyle::from(PALETTE[1]).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, balanced), (k as f64, balanced)],
                6,
                4,
                style,
            ))
            .map_err(err)?
            .label(format!("balanced N/K = {balanced:.0}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font((FONT, 12))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A heat map of row-normalised shares: `rows × cols` values in [0, 1], row-major.
pub fn heat_map(
    title: &str,
    shares: &[f64],
    row_labels: &[String],
    col_labels: &[String],
    x_desc: &str,
    y_desc: &str,
) -> Result<String> {
    let (rows, cols) = (row_labels.len(), col_labels.len());
    assert_eq!(shares.len(), rows * cols, "heat map shape");
    assert!(rows > 0 && cols > 0, "heat map without cells");
    let cell_h = if rows > 40 { 12 } else { 20 };
    let width = 900u32;
    let height = (rows as u32 * cell_h + 150).max(260);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 17))
            .margin(12)
            .x_label_area_size(70)
            .y_label_area_size(90)
            // An integer range's segments include its end: 0..n - 1 gives n cells.
            .build_cartesian_2d(
                (0..cols as u32 - 1).into_segmented(),
                (0..rows as u32 - 1).into_segmented(),
            )
            .map_err(err)?;
        let row_label = |v: &SegmentValue<u32>| match v {
            SegmentValue::CenterOf(i) => rows
                .checked_sub(1 + *i as usize)
                .and_then(|r| row_labels.get(r))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        };
        let col_label = |v: &SegmentValue<u32>| match v {
            SegmentValue::CenterOf(j) => col_labels.get(*j as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(cols)
            .y_labels(rows)
            .x_label_formatter(&col_label)
            .y_label_formatter(&row_label)
            .axis_desc_style((FONT, 13))
            .label_style((FONT, 11))
            .draw()
            .map_err(err)?;
        chart
            .draw_series((0..rows).flat_map(|i| {
                (0..cols).map(move |j| {
                    // Row 0 at the top.
                    let y = (rows - 1 - i) as u32;
                    Rectangle::new(
                        [
                            (SegmentValue::Exact(j as u32), SegmentValue::Exact(y)),
                            (
                                SegmentValue::Exact(j as u32 + 1),
                                SegmentValue::Exact(y + 1),
                            ),
                        ],
                        shade(shares[i * cols + j]).filled(),
                    )
                })
            }))
            .map_err(err)?;
        if rows <= 40 && cols <= 20 {
            let centre = Pos::new(HPos::Center, VPos::Center);
            chart
                .draw_series((0..rows).flat_map(|i| {
                    (0..cols).filter_map(move |j| {
                        let v = shares[i * cols + j];
                        (v >= 0.005).then(|| {
                            let colour = if v > 0.5 { WHITE } else { BLACK };
                            Text::new(
                                format!("{:.0}%", 100.0 * v),
                                (
                                    SegmentValue::CenterOf(j as u32),
                                    SegmentValue::CenterOf((rows - 1 - i) as u32),
                                ),
                                (FONT, 11).into_font().color(&colour).pos(centre),
                            )
                        })
                    })
                }))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// White (0) to dark blue (1).
fn shade(v: f64) -> RGBColor {
    let t = v.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(mix(255.0, 8.0), mix(255.0, 48.0), mix(255.0, 107.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_text() {
        let lines = [Line {
            label: "NMI".into(),
            points: vec![(0.0, 0.1), (1.0, 0.3), (2.0, 0.45)],
            color: PALETTE[0],
            dashed: false,
        }];
        let refs = [Reference {
            label: "floor".into(),
            value: 0.53,
            color: REFERENCE,
        }];
        let svg = line_chart("Clustering", "score", &lines, &refs, true).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for text in ["Clustering", "NMI", "floor", "round"] {
            assert!(svg.contains(text), "{text}");
        }
        let svg = size_bars("Sizes", &[5, 9, 1]).unwrap();
        assert!(svg.contains("balanced N/K = 5"));
        let svg = heat_map(
            "Heat",
            &[1.0, 0.0, 0.25, 0.75],
            &["c0".into(), "c1".into()],
            &["Trouser".into(), "Bag".into()],
            "class",
            "cluster",
        )
        .unwrap();
        assert!(svg.contains("Trouser") && svg.contains("c1"));
        assert_eq!(shade(0.0), RGBColor(255, 255, 255));
    }

    #[test]
    fn ranges() {
        assert_eq!(y_range(&[0.2, 0.5], true), (0.0, 1.0));
        let (lo, hi) = y_range(&[10.0, 20.0], false);
        assert_eq!(lo, 0.0);
        assert!(hi > 20.0);
        assert_eq!(y_range(&[], false), (0.0, 1.0));
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(1500.0), "1500");
    }
}
