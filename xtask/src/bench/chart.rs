//! The report as a PNG: one bar panel per kind of figure, contenders side by
//! side, each bar labelled with its value.

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use super::contender::Contender;
use super::figure::{Better, Figure, Value};
use super::protocol::Mode;
use super::report::Report;

/// DejaVu Sans, from Debian's fonts-dejavu-core; plotters' bitmap backend
/// draws text only with a font it is given.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FAMILY: &str = "sans-serif";
const WIDTH: u32 = 2000;
const HEIGHT: u32 = 1000;
const HEADER: u32 = 100;
const COLUMNS: usize = 4;

/// A panel: figures of one kind, in one unit.
struct Panel {
    title: String,
    figures: Vec<Figure>,
}

pub fn draw(report: &Report, path: &Path) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (header, body) = root.split_vertically(HEADER);
    header
        .draw(&Text::new(
            format!(
                "yensid benchmark, one run side by side: {}",
                report.conditions()
            ),
            (24, 14),
            (FAMILY, 24).into_font(),
        ))
        .map_err(plot_error)?;
    let mut x = 24;
    for (index, results) in report.results.iter().enumerate() {
        let color = colour(index);
        header
            .draw(&Rectangle::new([(x, 60), (x + 22, 82)], color.filled()))
            .map_err(plot_error)?;
        let name = results.contender.name();
        header
            .draw(&Text::new(name, (x + 30, 62), (FAMILY, 20).into_font()))
            .map_err(plot_error)?;
        x += 50 + 11 * name.len() as i32;
    }
    header
        .draw(&Text::new(
            "up ×8: upload (client to builder), 8 parallel streams; down: download",
            (x + 40, 62),
            (FAMILY, 18).into_font(),
        ))
        .map_err(plot_error)?;
    let panels = panels(&report.figures);
    let rows = panels.len().div_ceil(COLUMNS);
    let areas = body.split_evenly((rows, COLUMNS));
    for (panel, area) in panels.iter().zip(&areas) {
        draw_panel(report, panel, area, &root)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    report: &Report,
    panel: &Panel,
    area: &DrawingArea<DB, Shift>,
    root: &DrawingArea<DB, Shift>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let contenders: Vec<Contender> = report.results.iter().map(|r| r.contender).collect();
    let groups = panel.figures.len();
    let highest = panel
        .figures
        .iter()
        .flat_map(|&f| contenders.iter().filter_map(move |&c| report.value(c, f)))
        .fold(0.0, f64::max);
    // Headroom for the labels above the bars.
    let top = if highest > 0.0 { highest * 1.2 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 19))
        .margin(14)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..groups as f64, 0f64..top)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups)
        .x_label_formatter(&|_| String::new())
        .y_labels(6)
        .y_label_formatter(&|v| {
            if top >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .label_style((FAMILY, 14))
        .draw()
        .map_err(plot_error)?;
    let slot = 0.84 / contenders.len() as f64;
    for (group, &figure) in panel.figures.iter().enumerate() {
        for (index, results) in report.results.iter().enumerate() {
            let x0 = group as f64 + 0.08 + slot * index as f64;
            let (x1, centre) = (x0 + slot * 0.9, x0 + slot * 0.45);
            let label = match results.values[value_index(report, figure)] {
                Value::Measured(v) => {
                    chart
                        .draw_series(std::iter::once(Rectangle::new(
                            [(x0, 0.0), (x1, v)],
                            colour(index).filled(),
                        )))
                        .map_err(plot_error)?;
                    (figure.format(v), v)
                }
                Value::Failed(_) => ("failed".to_owned(), 0.0),
                Value::NotApplicable => ("n/a".to_owned(), 0.0),
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    label.0,
                    (centre, label.1),
                    (FAMILY, 13)
                        .into_font()
                        .into_text_style(area)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )))
                .map_err(plot_error)?;
        }
        // Under the axis, where the chart's own labels would be.
        let (px, py) = chart.backend_coord(&(group as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            group_label(figure),
            (px, py + 8),
            (FAMILY, 15)
                .into_font()
                .into_text_style(root)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(plot_error)?;
    }
    Ok(())
}

fn value_index(report: &Report, figure: Figure) -> usize {
    report
        .figures
        .iter()
        .position(|f| *f == figure)
        .expect("panels hold the report's figures")
}

/// The report's figures, one panel per kind, in the report's order.
fn panels(figures: &[Figure]) -> Vec<Panel> {
    let mut panels: Vec<Panel> = Vec::new();
    for &figure in figures {
        let title = panel_title(figure);
        match panels.iter_mut().find(|p| p.title == title) {
            Some(panel) => panel.figures.push(figure),
            None => panels.push(Panel {
                title,
                figures: vec![figure],
            }),
        }
    }
    panels
}

fn panel_title(figure: Figure) -> String {
    // Short enough for a quarter of the width.
    let what = match figure {
        Figure::Throughput { .. } => "Throughput, GB/s",
        Figure::CpuPerGib { .. } => "Whole machine's CPU s per GiB",
        Figure::BannerLatency { .. } => "Connect to SSH banner, µs",
        Figure::RefusalLatency { .. } => "Refusal (build locally), µs",
        Figure::ConnectionRate => "Connection rate, conn/s",
        Figure::ConnectionCpu => "Middlebox CPU per connection, µs",
        Figure::IdleRss => "RSS with idle connections, MiB",
        Figure::NixBuilds => "Uncached Nix builds, s",
    };
    let better = match figure.better() {
        Better::Higher => "higher is better",
        Better::Lower => "lower is better",
    };
    format!("{what} ({better})")
}

fn group_label(figure: Figure) -> String {
    match figure {
        // Direction and streams, short enough for a quarter of a panel.
        Figure::Throughput { mode, streams } | Figure::CpuPerGib { mode, streams } => {
            let way = if mode == Mode::Upload { "up" } else { "down" };
            format!("{way} ×{streams}")
        }
        Figure::BannerLatency { percentile } | Figure::RefusalLatency { percentile } => {
            format!("p{percentile}")
        }
        Figure::ConnectionRate | Figure::ConnectionCpu | Figure::IdleRss | Figure::NixBuilds => {
            String::new()
        }
    }
}

/// One colour per column, in the report's order.
fn colour(index: usize) -> RGBColor {
    const COLOURS: [RGBColor; 4] = [
        RGBColor(140, 140, 140),
        RGBColor(230, 120, 30),
        RGBColor(40, 100, 200),
        RGBColor(60, 160, 80),
    ];
    COLOURS[index % COLOURS.len()]
}

/// Registers [`FONT`] with plotters, once per process.
fn load_font() -> Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = fs::read(FONT)
                .with_context(|| format!("read {FONT}"))
                .map_err(|e| format!("{e:#}"))?;
            // plotters keeps fonts for the life of the process.
            register_font(
                FAMILY,
                FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            )
            .map_err(|_| format!("{FONT} is not a font plotters can use"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// plotters' errors borrow nothing but are not all `Send + Sync`.
fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_panel_per_kind_of_figure() {
        let panels = panels(&Figure::all(8));
        let sizes: Vec<usize> = panels.iter().map(|p| p.figures.len()).collect();
        assert_eq!(sizes, [4, 4, 2, 2, 1, 1, 1, 1]);
        assert_eq!(
            panels[0].title,
            "Throughput, GB/s (higher is better)".to_owned()
        );
        assert_eq!(
            group_label(Figure::CpuPerGib {
                mode: Mode::Download,
                streams: 8
            }),
            "down ×8"
        );
    }
}
