//! SVG charts (plotters, SVG backend only): stacked panels of line series
//! sharing one x axis, written next to a scenario's JSON.

use std::path::Path;

use plotters::prelude::*;

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points }
    }
}

/// One chart of the stack: its title, y-axis label and lines.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(title: impl Into<String>, y_label: impl Into<String>, series: Vec<Series>) -> Panel {
        Panel { title: title.into(), y_label: y_label.into(), series }
    }
}

/// How the shared x axis is labelled.
#[derive(Debug, Clone, Copy)]
pub enum XAxis {
    /// Seconds since the start; `marks` draws a vertical line at each phase
    /// boundary.
    Time,
    /// Percentiles on a "nines" scale: x = log10(1 / (1 - q)).
    Nines,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Writes `panels` stacked vertically into one SVG file at `path`, with
/// vertical marks (e.g. phase boundaries) at the x positions in `marks`.
pub fn write(path: &Path, title: &str, x: XAxis, marks: &[(f64, &str)], panels: &[Panel]) -> anyhow::Result<()> {
    draw(path, title, x, marks, panels).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

fn draw(
    path: &Path,
    title: &str,
    x: XAxis,
    marks: &[(f64, &str)],
    panels: &[Panel],
) -> Result<(), Box<dyn std::error::Error>> {
    const PANEL_HEIGHT: u32 = 260;
    let height = 40 + PANEL_HEIGHT * u32::try_from(panels.len().max(1))?;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    let all = panels.iter().flat_map(|p| p.series.iter()).flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(px, _) in all {
        x0 = x0.min(px);
        x1 = x1.max(px);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if matches!(x, XAxis::Time) {
        // Room for the last mark's label.
        x1 += (x1 - x0) * 0.04;
    }
    for (area, panel) in areas.iter().zip(panels) {
        let top = panel.series.iter().flat_map(|s| s.points.iter()).map(|p| p.1).filter(|y| y.is_finite());
        let y1 = top.fold(0.0f64, f64::max);
        let y1 = if y1 > 0.0 { y1 * 1.08 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 15))
            .margin(8)
            .margin_right(24)
            .x_label_area_size(32)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0.0..y1)?;
        let nines = |v: &f64| {
            let q = 100.0 - 100.0 / 10f64.powf(*v);
            format!("{q:.*}%", (v.round() as usize).saturating_sub(2))
        };
        let y_fmt = |v: &f64| {
            if y1 >= 100.0 {
                format!("{v:.0}")
            } else if y1 >= 1.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.3}")
            }
        };
        let mut mesh = chart.configure_mesh();
        mesh.y_desc(panel.y_label.as_str()).y_label_formatter(&y_fmt).light_line_style(WHITE.mix(0.0));
        match x {
            XAxis::Time => mesh.x_desc("time (s)"),
            XAxis::Nines => mesh.x_desc("percentile").x_labels(5).x_label_formatter(&nines),
        };
        mesh.draw()?;
        for &(at, label) in marks {
            let style = BLACK.mix(0.35).stroke_width(1);
            chart.draw_series(LineSeries::new([(at, 0.0), (at, y1)], style))?;
            chart.draw_series(std::iter::once(Text::new(
                label.to_owned(),
                (at, y1 * 0.98),
                ("sans-serif", 12).into_font().color(&BLACK.mix(0.6)),
            )))?;
        }
        for (i, series) in panel.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points = series.points.iter().copied().filter(|p| p.1.is_finite());
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(series.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        if panel.series.len() > 1 || panel.series.first().is_some_and(|s| !s.name.is_empty()) {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 12))
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

/// Points of a latency distribution for an [`XAxis::Nines`] chart, in ms.
pub fn percentile_curve(h: &hdrhistogram::Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    // Up to the quantile the sample count supports (no 99.99% of 100 values).
    let max_x = (h.len() as f64).log10().clamp(1.0, 5.0);
    (0..=500)
        .map(|k| f64::from(k) / 100.0)
        .take_while(|&x| x <= max_x)
        .map(|x| (x, h.value_at_quantile(1.0 - 10f64.powf(-x)) as f64 / 1000.0))
        .collect()
}
