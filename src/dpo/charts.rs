//! Learning curves as PNG (plotters' bitmap backend, DejaVu Sans for text): loss and reward
//! margins, train and eval on one chart each. The train curve is drawn raw (faint) and smoothed
//! as TensorBoard smooths it (a debiased exponential moving average, weight 0.6); eval is drawn
//! from step 0, the baseline before the first update; step ticks are whole numbers.
//!
//! The eval stage's score distributions are drawn here too ([`plot_distributions`]).
//!
//! Charts are a convenience: [`plot_curves`] never fails a finished training. Without a usable
//! font (or with any other drawing error) it skips them with a warning. `REVIEWER2_FONT` names
//! the TTF file to use instead of the DejaVu Sans paths below.

use crate::error::{Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let custom = std::env::var("REVIEWER2_FONT")
            .ok()
            .filter(|p| !p.is_empty());
        let paths: Vec<&str> = match &custom {
            Some(p) => vec![p.as_str()],
            None => FONT_PATHS.to_vec(),
        };
        for p in &paths {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a usable font"));
            }
        }
        Err(format!(
            "no DejaVu Sans font found (looked in {}); install fonts-dejavu-core or set \
             REVIEWER2_FONT to a .ttf file",
            paths.join(", ")
        ))
    })
    .clone()
    .map_err(|e| crate::error::err!("{e}"))
}

fn series(log: &[Value], key: &str) -> Vec<(f64, f64)> {
    log.iter()
        .filter_map(|m| Some((m.get("step")?.as_f64()?, m.get(key)?.as_f64()?)))
        .collect()
}

/// Draw an 800x480 PNG into `out` atomically (a temp file renamed into place when drawn).
fn png(
    out: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font()?;
    // The encoder reads the format from the extension: the temporary name ends in `.png` too.
    let mut tmp = crate::fsutil::tmp_sibling(out).into_os_string();
    tmp.push(".png");
    crate::fsutil::in_place(out, Path::new(&tmp), |tmp, _| {
        let root = BitMapBackend::new(tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present().context("writing chart")?;
        Ok(())
    })
}

/// The legend box, the same on every chart.
fn legend<'a, 'b>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> Result<()>
where
    'b: 'a,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// Charts never fail the work they show: a chart that cannot be drawn is skipped, with a warning.
fn or_skip(out: &Path, r: Result<()>) {
    if let Err(e) = r {
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        tracing::warn!("skipped the chart {name}: {e:#}");
    }
}

/// TensorBoard's smoothing: an exponential moving average, debiased so it starts at the first
/// value instead of at zero.
fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    let mut out = Vec::with_capacity(points.len());
    for (i, (x, y)) in points.iter().enumerate() {
        last = last * weight + (1.0 - weight) * y;
        let debias = 1.0 - weight.powi(i as i32 + 1);
        out.push((*x, last / debias));
    }
    out
}

/// The loss and reward-margin charts into `dir` (`loss.png`, `margins.png`). A chart that cannot
/// be drawn is skipped with a warning: the training it shows is done and kept either way.
pub(crate) fn plot_curves(log: &[Value], dir: &Path) {
    for (metric, title, file) in [
        ("loss", "DPO loss", "loss.png"),
        ("rewards/margins", "Reward margins", "margins.png"),
    ] {
        let out = dir.join(file);
        or_skip(&out, plot(log, metric, title, &out));
    }
}

/// Draw `metric` and `eval_{metric}` against the step into `out`.
fn plot(log: &[Value], metric: &str, title: &str, out: &Path) -> Result<()> {
    let train = series(log, metric);
    let eval = series(log, &format!("eval_{metric}"));
    let smoothed = smooth(&train, 0.6);
    let all: Vec<&(f64, f64)> = train.iter().chain(eval.iter()).collect();
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::MAX, f64::MIN);
    for (x, y) in &all {
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if all.is_empty() {
        y0 = 0.0;
        y1 = 1.0;
    }
    let pad = ((y1 - y0) * 0.1).max(1e-3);
    png(out, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))?;
        // At most one label per step: plotters then picks round steps (1, 2, 5, 10, ...), all
        // whole numbers.
        let labels = (x1 as usize).clamp(1, 10) + 1;
        chart
            .configure_mesh()
            .x_labels(labels)
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .x_desc("step")
            .y_desc(metric)
            .label_style(("sans-serif", 14))
            .draw()?;
        let faint = RGBColor(150, 170, 230);
        chart.draw_series(LineSeries::new(
            train.iter().copied(),
            faint.stroke_width(1),
        ))?;
        chart
            .draw_series(LineSeries::new(smoothed, BLUE.stroke_width(2)))?
            .label("train (smoothed)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart.draw_series(eval.iter().map(|p| Circle::new(*p, 3, RED.filled())))?;
        }
        legend(&mut chart)
    })
}

/// Two score distributions (base and adapter) as overlaid histograms into `out`; skipped with a
/// warning when it cannot be drawn, like the learning curves.
pub(crate) fn plot_distributions(base: &[f64], adapter: &[f64], title: &str, out: &Path) {
    or_skip(out, histograms(base, adapter, title, out));
}

/// Grouped bars of shares in [0, 1], base against the adapter: `(label, base, adapter)` each.
pub(crate) fn plot_shares(bars: &[(&str, f64, f64)], title: &str, out: &Path) {
    or_skip(out, shares(bars, title, out));
}

fn shares(bars: &[(&str, f64, f64)], title: &str, out: &Path) -> Result<()> {
    let n = bars.len() as f64;
    png(out, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..n, 0f64..1.05)?;
        let labels: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 1e-6 && i < labels.len() {
                    labels[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc("share of reviews")
            .label_style(("sans-serif", 14))
            .draw()?;
        for (k, color, name) in [(0, BLUE, "base"), (1, RED, "Reviewer #2")] {
            chart
                .draw_series(bars.iter().enumerate().map(|(i, b)| {
                    let v = if k == 0 { b.1 } else { b.2 };
                    let x0 = i as f64 + 0.12 + 0.38 * k as f64;
                    Rectangle::new([(x0, 0.0), (x0 + 0.36, v)], color.mix(0.55).filled())
                }))?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.mix(0.5).filled())
                });
        }
        legend(&mut chart)
    })
}

/// Lines over the rounds (x: round 0, 1, ...), each a share or rate in [0, 1]; NaN points (a
/// value a round does not have) are left out.
pub(crate) fn plot_rounds(series: &[(String, Vec<f64>)], title: &str, out: &Path) {
    or_skip(out, rounds(series, title, out));
}

fn rounds(series: &[(String, Vec<f64>)], title: &str, out: &Path) -> Result<()> {
    let last = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(2) - 1;
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    png(out, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.2f64..last as f64 + 0.2, 0f64..1.05)?;
        chart
            .configure_mesh()
            .x_labels(last + 1)
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .x_desc("round")
            .y_desc("rate or share")
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (name, ys)) in series.iter().enumerate() {
            let color = palette[i % palette.len()];
            let pts: Vec<(f64, f64)> = ys
                .iter()
                .enumerate()
                .filter(|(_, y)| y.is_finite())
                .map(|(x, y)| (x as f64, *y))
                .collect();
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        legend(&mut chart)
    })
}

fn histograms(base: &[f64], adapter: &[f64], title: &str, out: &Path) -> Result<()> {
    let all = base.iter().chain(adapter);
    let lo = all.clone().fold(f64::MAX, |a, b| a.min(*b)).min(0.0);
    let hi = all.fold(f64::MIN, |a, b| a.max(*b)).max(lo + 1e-9);
    const BINS: usize = 20;
    let w = (hi - lo) / BINS as f64;
    let count = |v: &[f64]| {
        let mut c = [0usize; BINS];
        for x in v {
            c[(((x - lo) / w) as usize).min(BINS - 1)] += 1;
        }
        c
    };
    let (cb, ca) = (count(base), count(adapter));
    let top = cb.iter().chain(&ca).copied().max().unwrap_or(1).max(1) as f64;
    png(out, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(lo..hi, 0f64..top * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("negativity (judge score)")
            .y_desc("reviews")
            .label_style(("sans-serif", 14))
            .draw()?;
        for (c, color, name) in [(&cb, BLUE, "base"), (&ca, RED, "Reviewer #2")] {
            chart
                .draw_series(c.iter().enumerate().map(|(i, &n)| {
                    let x0 = lo + i as f64 * w;
                    Rectangle::new([(x0, 0.0), (x0 + w, n as f64)], color.mix(0.35).filled())
                }))?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.mix(0.5).filled())
                });
        }
        legend(&mut chart)
    })
}
