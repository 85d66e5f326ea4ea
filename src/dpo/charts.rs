//! Learning curves as PNG (plotters' bitmap backend, DejaVu Sans for text): loss and reward
//! margins, train and eval, like the charts of the original post.
//!
//! Charts are a convenience: [`plot_curves`] never fails a finished training. Without a usable
//! font (or with any other drawing error) it skips them with a warning. `REVIEWER2_FONT` names
//! the TTF file to use instead of the DejaVu Sans paths below.

use crate::error::{Context, Result};
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

/// The loss and reward-margin charts into `dir` (`loss.png`, `margins.png`). A chart that cannot
/// be drawn is skipped with a warning: the training it shows is done and kept either way.
pub fn plot_curves(log: &[Value], dir: &Path) {
    for (metric, title, file) in [
        ("loss", "DPO loss", "loss.png"),
        ("rewards/margins", "Reward margins", "margins.png"),
    ] {
        let out = dir.join(file);
        if let Err(e) = plot(log, metric, title, &out) {
            let _ = std::fs::remove_file(crate::fsutil::tmp_sibling(&out).with_extension("png"));
            tracing::warn!("skipped the chart {file}: {e:#}");
        }
    }
}

/// Draw `metric` and `eval_{metric}` against the step into `out`.
pub fn plot(log: &[Value], metric: &str, title: &str, out: &Path) -> Result<()> {
    register_font()?;
    let train = series(log, metric);
    let eval = series(log, &format!("eval_{metric}"));
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
    let tmp = crate::fsutil::tmp_sibling(out).with_extension("png");
    {
        let root = BitMapBackend::new(&tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(metric)
            .label_style(("sans-serif", 14))
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart.draw_series(eval.iter().map(|p| Circle::new(*p, 3, RED.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present().context("writing chart")?;
    }
    crate::fsutil::commit_tmp(&tmp, out)
}
