//! The report's plots: lines over the number of services (log scale), as SVG so they diff and
//! render anywhere without fonts installed.
use std::path::Path;

use plotters::{
    coord::{Shift, ranged1d::ValueFormatter},
    prelude::*,
};

/// One line of a plot: its legend and (services, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Plot<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    /// Values spanning orders of magnitude (programming times) read better on a log axis.
    pub log_y: bool,
    pub series: Vec<Series>,
}

const SIZE: (u32, u32) = (760, 440);

/// The same colour for the same setup in every plot; its IPv6 line in a lighter shade.
fn colour(name: &str) -> RGBColor {
    let RGBColor(r, g, b) = setup_colour(name);
    if name.contains("IPv6") {
        let lighter = |c: u8| c + (255 - c) / 2;
        RGBColor(lighter(r), lighter(g), lighter(b))
    } else {
        RGBColor(r, g, b)
    }
}

fn setup_colour(name: &str) -> RGBColor {
    let lower = name.to_lowercase();
    if lower.starts_with("switchboard") {
        RGBColor(31, 119, 180)
    } else if lower.starts_with("direct") {
        RGBColor(40, 40, 40)
    } else if lower.contains("legacy") {
        RGBColor(255, 127, 14)
    } else if lower.starts_with("iptables") {
        RGBColor(214, 39, 40)
    } else if lower.starts_with("nft") {
        RGBColor(44, 160, 44)
    } else if lower.contains("new") {
        RGBColor(148, 103, 189)
    } else if lower.contains("non-service") {
        RGBColor(140, 86, 75)
    } else {
        RGBColor(31, 119, 180)
    }
}

pub fn draw(path: &Path, plot: &Plot<'_>) -> anyhow::Result<()> {
    let points = || {
        plot.series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|(_, y)| y.is_finite())
    };
    let x_max = points().map(|p| p.0).fold(1.0, f64::max) * 1.5;
    let x_min = points()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .min(x_max / 2.0)
        / 1.5;
    let y_max = points().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let y_min = points().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(to_anyhow)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(plot.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let x = (x_min..x_max).log_scale();
    if plot.log_y {
        let y = (y_min.max(1e-6) / 2.0..y_max.max(1e-6) * 2.0).log_scale();
        lines(&root, builder.build_cartesian_2d(x, y).map_err(to_anyhow)?, plot)
    } else {
        lines(
            &root,
            builder
                .build_cartesian_2d(x, 0.0..y_max.max(1e-9))
                .map_err(to_anyhow)?,
            plot,
        )
    }
}

type LogX = LogCoord<f64>;

fn lines<'a, Y>(
    root: &DrawingArea<SVGBackend<'a>, Shift>,
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<LogX, Y>>,
    plot: &Plot<'_>,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("services programmed")
        .y_desc(plot.y_label)
        .x_label_formatter(&|x| count_label(*x))
        .y_label_formatter(&|y| crate::stats::short(*y))
        .draw()
        .map_err(to_anyhow)?;
    for series in &plot.series {
        let style = colour(&series.name).stroke_width(2);
        let points: Vec<(f64, f64)> = series
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(to_anyhow)?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, style.filled())))
            .map_err(to_anyhow)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        // Rates sit high on a linear axis from zero; times climb on a log one.
        .position(if plot.log_y {
            SeriesLabelPosition::UpperLeft
        } else {
            SeriesLabelPosition::LowerRight
        })
        .draw()
        .map_err(to_anyhow)?;
    root.present().map_err(to_anyhow)
}

/// 1, 1k, 10k, 100k.
fn count_label(x: f64) -> String {
    if x >= 1000.0 {
        format!("{}k", (x / 1000.0).round())
    } else {
        format!("{}", x.round())
    }
}

fn to_anyhow(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {error}")
}
