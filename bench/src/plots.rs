//! SVG figures (plotters), one panel per model pair side by side: decode speedup by mode, tokens
//! per step, throughput against concurrent sessions, and verify time against tree nodes next to
//! the memory and compute rooflines (the picture that explains why the pairs differ).
//!
//! Every mode keeps one colour in every figure; modes are named on the axis; legends sit in a
//! strip of their own above the panels, never over data; ticks are at the measured values.

use std::path::Path;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use thiserror::Error;

use crate::calibrate::Calibration;
use crate::report::{FIGURES, ModeSummary, Report};

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

/// Distinct colours (no grey: grey is target-only's).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 128),
];

/// Target-only's colour.
const BASELINE: RGBColor = RGBColor(110, 110, 110);

/// One colour per mode label, the same in every figure.
struct Palette(Vec<String>);

impl Palette {
    fn new(reports: &[&Report]) -> Self {
        let mut labels: Vec<String> = Vec::new();
        for r in reports {
            for s in &r.summaries {
                if !s.mode.is_baseline() && !labels.contains(&s.label) {
                    labels.push(s.label.clone());
                }
            }
        }
        Palette(labels)
    }

    fn color(&self, label: &str) -> RGBColor {
        match self.0.iter().position(|l| l == label) {
            Some(i) => COLORS[i % COLORS.len()],
            None => BASELINE,
        }
    }
}

const FONT: &str = "sans-serif";
const PANEL_W: u32 = 640;
const LEGEND_H: u32 = 44;

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// A root of `panels` panels side by side under a legend strip: (legend, panels).
fn layout(path: &Path, panels: usize, height: u32) -> Result<(Area<'_>, Vec<Area<'_>>), PlotError> {
    let e = err(path);
    let width = PANEL_W * panels.max(1) as u32;
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let (legend, body) = root.split_vertically(LEGEND_H);
    let panels = body.split_evenly((1, panels.max(1)));
    Ok((legend, panels))
}

/// Draws `entries` (label, colour, filled square or line) in a row across the legend strip,
/// after `title`.
fn legend(
    area: &Area<'_>,
    title: &str,
    entries: &[(String, RGBColor, bool)],
    path: &Path,
) -> Result<(), PlotError> {
    let e = err(path);
    area.draw(&Text::new(
        title.to_owned(),
        (12, 6),
        (FONT, 17).into_font(),
    ))
    .map_err(|x| e(x.to_string()))?;
    let mut x = 12i32;
    for (label, color, filled) in entries {
        let y = 32;
        if *filled {
            area.draw(&Rectangle::new(
                [(x, y - 6), (x + 12, y + 6)],
                color.filled(),
            ))
            .map_err(|x| e(x.to_string()))?;
        } else {
            area.draw(&PathElement::new(
                [(x, y), (x + 16, y)],
                color.stroke_width(3),
            ))
            .map_err(|x| e(x.to_string()))?;
        }
        area.draw(&Text::new(
            label.clone(),
            (x + 20, y - 7),
            (FONT, 13).into_font(),
        ))
        .map_err(|x| e(x.to_string()))?;
        x += 34 + 7 * label.len() as i32;
    }
    Ok(())
}

/// A linear axis over `lo..hi` whose ticks are exactly `ticks` (the measured values; every
/// label comes from the chart's label formatter).
struct Ticks {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for Ticks {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let t = (value - self.lo) / (self.hi - self.lo);
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// An axis over `lo..hi` with ticks at `ticks`.
fn keyed(lo: f64, hi: f64, ticks: Vec<f64>) -> Ticks {
    Ticks { lo, hi, ticks }
}

/// Speedup over target-only of every speculative mode at concurrency 1: horizontal bars, modes
/// named on the vertical axis, greedy (solid) and sampled (light) bars per mode.
pub fn speedup_by_mode(reports: &[&Report], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let palette = Palette::new(reports);
    let rows = reports
        .iter()
        .map(|r| modes_at(r, 1).len())
        .max()
        .unwrap_or(1)
        .max(1);
    let (strip, panels) = layout(path, reports.len(), 90 + 46 * rows as u32)?;
    legend(
        &strip,
        "Decode speedup over target-only, one session (solid: greedy; light: sampled); line at 1x = target-only",
        &[],
        path,
    )?;
    for (panel, r) in panels.iter().zip(reports) {
        let modes = modes_at(r, 1);
        let xmax = r
            .summaries
            .iter()
            .filter(|s| s.concurrency == 1)
            .map(|s| s.speedup)
            .filter(|v| v.is_finite())
            .fold(1.0f64, f64::max)
            * 1.18;
        let n = modes.len().max(1);
        let centres: Vec<f64> = (0..n).map(|i| i as f64 + 0.5).collect();
        let names = modes.clone();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("pair `{}`", r.meta.pair), (FONT, 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(150)
            .build_cartesian_2d(0f64..xmax, keyed(0.0, n as f64, centres))
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("speedup (x)")
            .y_label_formatter(&|y| {
                let i = (n as f64 - *y).floor() as usize;
                names.get(i).cloned().unwrap_or_default()
            })
            .draw()
            .map_err(|x| e(x.to_string()))?;
        for (i, mode) in modes.iter().enumerate() {
            // Top to bottom in the order the bench ran them.
            let top = (n - i) as f64;
            let c = palette.color(mode);
            for (k, sampling) in ["greedy", "sampled"].iter().enumerate() {
                let Some(s) = r.summaries.iter().find(|s| {
                    s.concurrency == 1 && s.label == *mode && s.sampling.starts_with(sampling)
                }) else {
                    continue;
                };
                let v = if s.speedup.is_finite() {
                    s.speedup
                } else {
                    0.0
                };
                let y1 = top - 0.1 - 0.4 * k as f64;
                let style = if k == 0 {
                    c.filled()
                } else {
                    c.mix(0.4).filled()
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(0.0, y1), (v, y1 - 0.38)],
                        style,
                    )))
                    .map_err(|x| e(x.to_string()))?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{v:.2}"),
                        (v + xmax * 0.01, y1 - 0.08),
                        (FONT, 12),
                    )))
                    .map_err(|x| e(x.to_string()))?;
            }
        }
        chart
            .draw_series(LineSeries::new(
                [(1.0, 0.0), (1.0, n as f64)],
                BLACK.stroke_width(1),
            ))
            .map_err(|x| e(x.to_string()))?;
    }
    strip.present().map_err(|x| e(x.to_string()))
}

/// Speculative modes measured at `concurrency` (greedy), in run order.
fn modes_at(r: &Report, concurrency: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in &r.summaries {
        if s.concurrency == concurrency && !s.mode.is_baseline() && !out.contains(&s.label) {
            out.push(s.label.clone());
        }
    }
    out
}

/// Verify time against tree nodes (one session), each pair next to its memory roofline
/// (weights + KV over bandwidth) and compute roofline (FLOPs over the FMA peak).
pub fn verify_vs_nodes(reports: &[&Report], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let cals: Vec<(&Report, &Calibration)> = reports
        .iter()
        .filter_map(|r| r.calibration.as_ref().map(|c| (*r, c)))
        .collect();
    let (strip, panels) = layout(path, cals.len(), 460)?;
    let measured = RGBColor(31, 119, 180);
    let memory = RGBColor(44, 160, 44);
    let compute = RGBColor(214, 39, 40);
    legend(
        &strip,
        "Target verify time vs tree nodes (one session)",
        &[
            ("measured".into(), measured, false),
            ("memory roofline".into(), memory, false),
            ("compute roofline".into(), compute, false),
        ],
        path,
    )?;
    for (panel, (r, c)) in panels.iter().zip(&cals) {
        let pts: Vec<(usize, f64)> = c
            .verify
            .iter()
            .filter(|p| p.batch == 1)
            .map(|p| (p.nodes, p.measured_ns / 1e6))
            .collect();
        let Some(rates) = c.rates else { continue };
        let cost = &c.target_cost;
        let prefix = c.plan.prefix_len;
        let mem: Vec<(f64, f64)> = pts
            .iter()
            .map(|&(n, _)| ((n as f64).log2(), 1e3 * cost.memory_s(&rates, n, 1, prefix)))
            .collect();
        let comp: Vec<(f64, f64)> = pts
            .iter()
            .map(|&(n, _)| {
                (
                    (n as f64).log2(),
                    1e3 * cost.compute_s(&rates, n, 1, prefix),
                )
            })
            .collect();
        let meas: Vec<(f64, f64)> = pts.iter().map(|&(n, t)| ((n as f64).log2(), t)).collect();
        let ymax = meas
            .iter()
            .chain(&mem)
            .chain(&comp)
            .map(|p| p.1)
            .fold(0.0f64, f64::max)
            * 1.08;
        let xs: Vec<f64> = meas.iter().map(|p| p.0).collect();
        let xmax = xs.last().copied().unwrap_or(1.0).max(1.0);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "pair `{}`: {:.0} MB of weights per forward",
                    r.meta.pair,
                    cost.weight_bytes / 1e6
                ),
                (FONT, 16),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(keyed(-0.2, xmax + 0.2, xs), 0f64..ymax)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("tree nodes")
            .y_desc("ms per forward")
            .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        for (series, color, width) in [(&mem, memory, 2), (&comp, compute, 2), (&meas, measured, 3)]
        {
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(width)))
                .map_err(|x| e(x.to_string()))?;
        }
        chart
            .draw_series(meas.iter().map(|&p| Circle::new(p, 4, measured.filled())))
            .map_err(|x| e(x.to_string()))?;
    }
    strip.present().map_err(|x| e(x.to_string()))
}

/// Distribution of tokens emitted per verification step for each speculative mode (greedy,
/// concurrency 1): fraction of steps emitting n tokens.
pub fn accepted_length_histogram(reports: &[&Report], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let palette = Palette::new(reports);
    let (strip, panels) = layout(path, reports.len(), 420)?;
    let labels: Vec<(String, RGBColor, bool)> = palette
        .0
        .iter()
        .map(|l| (l.clone(), palette.color(l), true))
        .collect();
    legend(
        &strip,
        "Tokens emitted per step (greedy, one session)",
        &labels,
        path,
    )?;
    for (panel, r) in panels.iter().zip(reports) {
        let cells: Vec<&ModeSummary> = r
            .summaries
            .iter()
            .filter(|s| s.concurrency == 1 && s.sampling == "greedy" && !s.mode.is_baseline())
            .collect();
        let max_n = cells
            .iter()
            .map(|c| c.tokens_per_step_histogram.len())
            .max()
            .unwrap_or(2)
            .max(2);
        let ticks: Vec<f64> = (1..max_n).map(|n| n as f64).collect();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("pair `{}`", r.meta.pair), (FONT, 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(keyed(0.5, max_n as f64 - 0.5, ticks), 0f64..1f64)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .disable_x_mesh()
            .x_desc("tokens emitted in a step (accepted + 1)")
            .y_desc("fraction of steps")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let width = 0.8 / cells.len().max(1) as f64;
        for (ci, c) in cells.iter().enumerate() {
            let total: u64 = c.tokens_per_step_histogram.iter().sum();
            if total == 0 {
                continue;
            }
            let color = palette.color(&c.label);
            let bars = c
                .tokens_per_step_histogram
                .iter()
                .enumerate()
                .skip(1)
                .map(|(n, &k)| {
                    let x0 = n as f64 - 0.4 + ci as f64 * width;
                    Rectangle::new(
                        [(x0, 0.0), (x0 + width, k as f64 / total as f64)],
                        color.filled(),
                    )
                });
            chart.draw_series(bars).map_err(|x| e(x.to_string()))?;
        }
    }
    strip.present().map_err(|x| e(x.to_string()))
}

/// End-to-end throughput against concurrent sessions, one line per mode (greedy), ticks at the
/// measured concurrencies.
pub fn throughput_vs_concurrency(reports: &[&Report], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let palette = Palette::new(reports);
    let (strip, panels) = layout(path, reports.len(), 440)?;
    let mut labels = vec![("target-only".to_owned(), BASELINE, false)];
    for r in reports {
        for l in modes_at(r, 4) {
            if !labels.iter().any(|x| x.0 == l) {
                labels.push((l.clone(), palette.color(&l), false));
            }
        }
    }
    legend(
        &strip,
        "Throughput vs concurrent sessions (greedy, all sessions together)",
        &labels,
        path,
    )?;
    for (panel, r) in panels.iter().zip(reports) {
        let cells: Vec<&ModeSummary> = r
            .summaries
            .iter()
            .filter(|s| s.sampling == "greedy")
            .collect();
        let mut concs: Vec<usize> = cells.iter().map(|c| c.concurrency).collect();
        concs.sort_unstable();
        concs.dedup();
        // Evenly spaced positions, labelled with the concurrency measured there.
        let pos = |c: usize| concs.iter().position(|&x| x == c).unwrap_or(0) as f64;
        let ticks: Vec<f64> = (0..concs.len()).map(|i| i as f64).collect();
        let ymax = cells
            .iter()
            .map(|c| c.throughput_tok_s)
            .fold(1.0f64, f64::max)
            * 1.1;
        let names = concs.clone();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("pair `{}`", r.meta.pair), (FONT, 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                keyed(-0.2, concs.len().saturating_sub(1) as f64 + 0.2, ticks),
                0f64..ymax,
            )
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("concurrent sessions")
            .y_desc("tokens / s")
            .x_label_formatter(&|x| {
                names
                    .get(x.round() as usize)
                    .map_or(String::new(), ToString::to_string)
            })
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let mut modes = vec!["target-only".to_owned()];
        modes.extend(modes_at(r, 4));
        for mode in &modes {
            let mut pts: Vec<(f64, f64)> = cells
                .iter()
                .filter(|c| c.label == *mode)
                .map(|c| (pos(c.concurrency), c.throughput_tok_s))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if pts.len() < 2 {
                continue;
            }
            let color = palette.color(mode);
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?;
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(|x| e(x.to_string()))?;
        }
    }
    strip.present().map_err(|x| e(x.to_string()))
}

/// Writes every figure of [`FIGURES`] into `dir`.
pub fn draw_all(reports: &[&Report], dir: &Path) -> Result<(), PlotError> {
    speedup_by_mode(reports, &dir.join(FIGURES[0].1))?;
    verify_vs_nodes(reports, &dir.join(FIGURES[1].1))?;
    accepted_length_histogram(reports, &dir.join(FIGURES[2].1))?;
    throughput_vs_concurrency(reports, &dir.join(FIGURES[3].1))
}
