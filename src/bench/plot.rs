//! Charts of one or more reports: throughput and TTFT against concurrency, and the latency
//! distributions of each report's most loaded run.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::Report;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates = std::env::var("BRAID_PLOT_FONT").into_iter().chain(FONT_PATHS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a usable font"));
            }
        }
        Err("no TTF font found for the plot's text; set BRAID_PLOT_FONT to a .ttf file".into())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn cdf(mut values: Vec<f64>) -> Vec<(f64, f64)> {
    values.sort_by(f64::total_cmp);
    let n = values.len() as f64;
    values.into_iter().enumerate().map(|(i, v)| (v, (i + 1) as f64 / n)).collect()
}

/// One chart: title, axis label, one line of points per report.
type Panel<'a> = (&'a str, &'a str, Vec<Vec<(f64, f64)>>);

pub fn draw(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((2, 2));
    let max_c = reports.iter().flat_map(|r| r.runs.iter().map(|x| x.concurrency)).max().unwrap_or(1).max(2) as f64;
    let color = |i: usize| Palette99::pick(i).to_rgba();

    let series = |f: &dyn Fn(&super::RunReport) -> f64| -> Vec<Vec<(f64, f64)>> {
        reports.iter().map(|r| r.runs.iter().map(|x| (x.concurrency as f64, f(x))).collect()).collect()
    };
    let panels: [Panel; 2] = [
        ("Output throughput", "output tokens/s", series(&|x| x.metrics.output_throughput)),
        ("Time to first token (p90)", "TTFT p90 (ms)", series(&|x| x.metrics.ttft_ms.p90)),
    ];
    for (area, (title, y_label, data)) in areas.iter().zip(panels) {
        let y_max = data.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1f64..max_c).log_scale(), 0f64..y_max)?;
        chart.configure_mesh().x_desc("concurrent requests").y_desc(y_label).draw()?;
        for (i, (report, points)) in reports.iter().zip(&data).enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                .label(report.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }

    // Distributions at each report's most loaded run.
    let loaded: Vec<&super::RunReport> =
        reports.iter().filter_map(|r| r.runs.iter().max_by_key(|x| x.concurrency)).collect();
    let dists: [Panel; 2] = [
        (
            "TTFT distribution (most loaded run)",
            "TTFT (ms)",
            loaded
                .iter()
                .map(|x| cdf(x.requests.iter().filter(|r| r.ok()).filter_map(|r| r.ttft.map(|t| t * 1000.0)).collect()))
                .collect(),
        ),
        (
            "TPOT distribution (most loaded run)",
            "TPOT (ms)",
            loaded
                .iter()
                .map(|x| {
                    cdf(x.requests.iter().filter(|r| r.ok()).filter_map(|r| r.tpot().map(|t| t * 1000.0)).collect())
                })
                .collect(),
        ),
    ];
    for (area, (title, x_label, data)) in areas[2..].iter().zip(dists) {
        let x_max = data.iter().flatten().map(|p| p.0).fold(1.0, f64::max) * 1.05;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, 0f64..1.0)?;
        chart.configure_mesh().x_desc(x_label).y_desc("fraction of requests").draw()?;
        for (i, (run, points)) in loaded.iter().zip(&data).enumerate() {
            let c = color(i);
            let label = format!("{} (c={})", reports[i].label, run.concurrency);
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
