//! SVG figures (plotters): speedup by mode, accepted-length histogram, throughput vs concurrency.

use std::path::Path;

use plotters::prelude::*;
use thiserror::Error;

use crate::report::ModeSummary;

/// A figure could not be drawn or written.
#[derive(Debug, Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

fn err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError {
        path: path.display().to_string(),
        message,
    }
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Bar chart of decode speedup over target-only for every mode at concurrency 1, one group of
/// bars per sampling setting.
pub fn speedup_by_mode(summaries: &[ModeSummary], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let cells: Vec<&ModeSummary> = summaries.iter().filter(|s| s.concurrency == 1).collect();
    let mut samplings: Vec<&str> = Vec::new();
    let mut modes: Vec<&str> = Vec::new();
    for c in &cells {
        if !samplings.contains(&c.sampling.as_str()) {
            samplings.push(&c.sampling);
        }
        if !modes.contains(&c.label.as_str()) {
            modes.push(&c.label);
        }
    }
    let ymax = cells
        .iter()
        .map(|c| c.speedup)
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.2;
    let n = modes.len().max(1);
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Decode speedup over target-only (concurrency 1)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..(samplings.len() * (n + 1)) as f64, 0f64..ymax)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("speedup (x)")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (si, samp) in samplings.iter().enumerate() {
        for (mi, mode) in modes.iter().enumerate() {
            let Some(c) = cells
                .iter()
                .find(|c| c.sampling == *samp && c.label == *mode)
            else {
                continue;
            };
            let x0 = (si * (n + 1) + mi) as f64 + 0.1;
            let v = if c.speedup.is_finite() {
                c.speedup
            } else {
                0.0
            };
            let anno = chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x0 + 0.8, v)],
                    color(mi).filled(),
                )))
                .map_err(|x| e(x.to_string()))?;
            if si == 0 {
                anno.label(mode.to_string()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color(mi).filled())
                });
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{v:.2}"),
                    (x0 + 0.1, v + ymax * 0.02),
                    ("sans-serif", 12),
                )))
                .map_err(|x| e(x.to_string()))?;
        }
        chart
            .draw_series(std::iter::once(Text::new(
                samp.to_string(),
                ((si * (n + 1)) as f64 + 0.1, ymax * 0.95),
                ("sans-serif", 14),
            )))
            .map_err(|x| e(x.to_string()))?;
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), ((samplings.len() * (n + 1)) as f64, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}

/// Distribution of tokens emitted per verification step for each speculative mode (greedy,
/// concurrency 1): fraction of steps emitting n tokens.
pub fn accepted_length_histogram(summaries: &[ModeSummary], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let cells: Vec<&ModeSummary> = summaries
        .iter()
        .filter(|s| s.concurrency == 1 && s.sampling == "greedy" && !s.mode.is_baseline())
        .collect();
    let max_n = cells
        .iter()
        .map(|c| c.tokens_per_step_histogram.len())
        .max()
        .unwrap_or(2)
        .max(2);
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Tokens emitted per step (greedy, concurrency 1)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5f64..(max_n as f64 - 0.5), 0f64..1f64)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("tokens emitted in a step (accepted + 1)")
        .y_desc("fraction of steps")
        .x_labels(max_n)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let width = 0.8 / cells.len().max(1) as f64;
    for (ci, c) in cells.iter().enumerate() {
        let total: u64 = c.tokens_per_step_histogram.iter().sum();
        if total == 0 {
            continue;
        }
        let bars = c
            .tokens_per_step_histogram
            .iter()
            .enumerate()
            .skip(1)
            .map(|(n, &k)| {
                let x0 = n as f64 - 0.4 + ci as f64 * width;
                Rectangle::new(
                    [(x0, 0.0), (x0 + width, k as f64 / total as f64)],
                    color(ci).filled(),
                )
            });
        chart
            .draw_series(bars)
            .map_err(|x| e(x.to_string()))?
            .label(c.label.clone())
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 10, y + 5)], color(ci).filled())
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}

/// End-to-end throughput against concurrent sessions, one line per mode (greedy).
pub fn throughput_vs_concurrency(summaries: &[ModeSummary], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let cells: Vec<&ModeSummary> = summaries
        .iter()
        .filter(|s| s.sampling == "greedy")
        .collect();
    let mut modes: Vec<&str> = Vec::new();
    for c in &cells {
        if !modes.contains(&c.label.as_str()) {
            modes.push(&c.label);
        }
    }
    let xmax = cells
        .iter()
        .map(|c| c.concurrency)
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let ymax = cells
        .iter()
        .map(|c| c.throughput_tok_s)
        .fold(1.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput vs concurrent sessions (greedy)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..xmax * 1.1).log_scale(), 0f64..ymax)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("concurrent sessions")
        .y_desc("tokens / s (all sessions)")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (mi, mode) in modes.iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = cells
            .iter()
            .filter(|c| c.label == *mode)
            .map(|c| (c.concurrency as f64, c.throughput_tok_s))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pts.len() < 2 {
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.clone(), color(mi).stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(mode.to_string())
            .legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 14, y)], color(mi).stroke_width(2))
            });
        chart
            .draw_series(
                pts.into_iter()
                    .map(|p| Circle::new(p, 4, color(mi).filled())),
            )
            .map_err(|x| e(x.to_string()))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}
