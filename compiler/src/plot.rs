//! Plots written as PNG and SVG (plotters): heatmaps and line charts for analysis and training reports.
//!
//! Text needs a TrueType font; plotters' pure-Rust glyph backend gets DejaVu Sans from `$DLO_FONT` or the
//! usual system locations. Without a font, plots are still drawn, without labels ([`font_warning`] says so).

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Registers a sans-serif font for plot text once; `false` when none could be found.
fn font_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let candidates = [
            std::env::var("DLO_FONT").unwrap_or_default(),
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
            "/usr/share/fonts/TTF/DejaVuSans.ttf".into(),
            "/usr/share/fonts/dejavu/DejaVuSans.ttf".into(),
            "/Library/Fonts/Arial.ttf".into(),
        ];
        for c in candidates.iter().filter(|c| !c.is_empty()) {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// The warning to show when plots have no text for want of a font (`None` when a font was found).
pub fn font_warning() -> Option<&'static str> {
    (!font_available()).then_some("no TrueType font found (set DLO_FONT=path.ttf); plots will have no text")
}

/// A colour map from 0 (dark blue) through 0.5 (yellow-green) to 1 (dark red), perceptually ordered.
pub fn colormap(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let stops = [
        (0.0, (48, 18, 59)),
        (0.25, (40, 140, 230)),
        (0.5, (60, 220, 130)),
        (0.75, (245, 190, 40)),
        (1.0, (180, 20, 10)),
    ];
    for w in stops.windows(2) {
        let ((a, ca), (b, cb)) = (w[0], w[1]);
        if v <= b {
            let t = (v - a) / (b - a);
            let lerp = |x: u8, y: u8| (x as f64 + t * (y as f64 - x as f64)).round() as u8;
            return RGBColor(lerp(ca.0, cb.0), lerp(ca.1, cb.1), lerp(ca.2, cb.2));
        }
    }
    RGBColor(180, 20, 10)
}

/// A heatmap panel plus a per-row bar panel, as drawn by [`heatmap_with_bars`].
pub struct Heatmap<'a> {
    /// Title above the figure.
    pub title: &'a str,
    /// `rows[r][c]`: the value of row r (e.g. layer) at column c (e.g. token), already scaled to [0, 1].
    pub rows: &'a [Vec<f64>],
    /// Label of the row axis.
    pub row_label: &'a str,
    /// Label of the column axis.
    pub col_label: &'a str,
    /// What colour means.
    pub legend: &'a str,
    /// One value per row for the side bars (unscaled), and their label.
    pub bars: &'a [(String, Vec<f64>)],
    /// Axis label of the bar panel.
    pub bar_label: &'a str,
}

/// Writes `stem.png` and `stem.svg`.
pub fn heatmap_with_bars(h: &Heatmap, stem: &Path) -> Result<()> {
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, (1400, 800)).into_drawing_area();
        draw_heatmap(h, &root)?;
        root.present().map_err(|e| anyhow!("{}: {e}", png.display()))?;
    }
    {
        let root = SVGBackend::new(&svg, (1400, 800)).into_drawing_area();
        draw_heatmap(h, &root)?;
        root.present().map_err(|e| anyhow!("{}: {e}", svg.display()))?;
    }
    Ok(())
}

fn draw_heatmap<DB: DrawingBackend>(h: &Heatmap, root: &DrawingArea<DB, Shift>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    let text = font_available();
    root.fill(&WHITE).map_err(err)?;
    let root = if text {
        root.titled(h.title, ("sans-serif", 26)).map_err(err)?
    } else {
        root.clone()
    };
    let (left, right) = root.split_horizontally(1000);
    let n_rows = h.rows.len();
    let n_cols = h.rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    {
        let mut b = ChartBuilder::on(&left);
        b.margin(10);
        if text {
            b.x_label_area_size(40).y_label_area_size(50);
        }
        let mut chart = b.build_cartesian_2d(0..n_cols, 0..n_rows).map_err(err)?;
        if text {
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc(h.col_label)
                .y_desc(h.row_label)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
        }
        chart
            .draw_series(h.rows.iter().enumerate().flat_map(|(r, row)| {
                row.iter()
                    .enumerate()
                    .map(move |(c, v)| Rectangle::new([(c, r), (c + 1, r + 1)], colormap(*v).filled()))
            }))
            .map_err(err)?;
    }
    {
        let (legend_area, bars_area) = right.split_vertically(90);
        // Colour bar.
        let mut b = ChartBuilder::on(&legend_area);
        b.margin(10);
        if text {
            b.caption(h.legend, ("sans-serif", 14)).x_label_area_size(20);
        }
        let mut cb = b.build_cartesian_2d(0.0..1.0f64, 0.0..1.0f64).map_err(err)?;
        if text {
            cb.configure_mesh()
                .disable_mesh()
                .disable_y_axis()
                .x_labels(5)
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(err)?;
        }
        cb.draw_series((0..100).map(|i| {
            let x = i as f64 / 100.0;
            Rectangle::new([(x, 0.0), (x + 0.01, 1.0)], colormap(x).filled())
        }))
        .map_err(err)?;
        // Per-row bars.
        let max = h
            .bars
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let mut b = ChartBuilder::on(&bars_area);
        b.margin(10);
        if text {
            b.x_label_area_size(40).y_label_area_size(40);
        }
        let mut chart = b.build_cartesian_2d(0.0..max * 1.05, 0.0..n_rows as f64).map_err(err)?;
        if text {
            chart
                .configure_mesh()
                .disable_y_mesh()
                .x_desc(h.bar_label)
                .y_desc(h.row_label)
                .x_labels(4)
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(err)?;
        }
        let palette = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];
        let k = h.bars.len().max(1) as f64;
        for (i, (name, vals)) in h.bars.iter().enumerate() {
            let color = palette[i % palette.len()];
            let s = chart
                .draw_series(vals.iter().enumerate().map(|(r, v)| {
                    let y0 = r as f64 + 0.1 + 0.8 * i as f64 / k;
                    Rectangle::new([(0.0, y0), (*v, y0 + 0.8 / k)], color.filled())
                }))
                .map_err(err)?;
            if text {
                s.label(name.as_str())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(err)?;
        }
    }
    Ok(())
}

/// Line chart of several series over a shared x axis, written as `stem.png` and `stem.svg`.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    stem: &Path,
) -> Result<()> {
    write_lines(title, x_label, y_label, series, false, stem)
}

/// [`lines`] with a marker on every point (for series of a few measured points, one point each included).
pub fn lines_with_points(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    stem: &Path,
) -> Result<()> {
    write_lines(title, x_label, y_label, series, true, stem)
}

fn write_lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    markers: bool,
    stem: &Path,
) -> Result<()> {
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, (1000, 600)).into_drawing_area();
        draw_lines(title, x_label, y_label, series, markers, &root)?;
        root.present().map_err(|e| anyhow!("{}: {e}", png.display()))?;
    }
    let root = SVGBackend::new(&svg, (1000, 600)).into_drawing_area();
    draw_lines(title, x_label, y_label, series, markers, &root)?;
    root.present()
        .map_err(|e| anyhow!("{}: {e}", svg.display()))
        .context("writing SVG")
}

fn draw_lines<DB: DrawingBackend>(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    markers: bool,
    root: &DrawingArea<DB, Shift>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    let text = font_available();
    root.fill(&WHITE).map_err(err)?;
    let pts = series.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = if markers {
        // a few points, perhaps one: keep a readable band around them
        ((y1 - y0) * 0.1).max(0.01 * y0.abs().max(y1.abs()).max(1.0))
    } else {
        ((y1 - y0) * 0.05).max(1e-6)
    };
    // markers at the ends of the x range stay inside the plot
    let xpad = if markers {
        ((x1 - x0) * 0.05).max(x0.abs() * 0.02)
    } else {
        0.0
    };
    let mut b = ChartBuilder::on(root);
    b.margin(15);
    if text {
        b.caption(title, ("sans-serif", 24))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = b
        .build_cartesian_2d((x0 - xpad)..(x1 + xpad).max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
        .map_err(err)?;
    if text {
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(err)?;
        }
        let s = chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(err)?;
        if text {
            s.label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    if text && (series.len() > 1 || markers) {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmap_and_lines_write_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<Vec<f64>> = (0..6)
            .map(|r| (0..40).map(|c| ((r * 7 + c) % 11) as f64 / 10.0).collect())
            .collect();
        let bars = vec![("layer".to_string(), vec![0.1, 0.3, 0.2, 0.05, 0.4, 0.25])];
        let h = Heatmap {
            title: "test",
            rows: &rows,
            row_label: "layer",
            col_label: "token",
            legend: "change",
            bars: &bars,
            bar_label: "BI",
        };
        heatmap_with_bars(&h, &dir.path().join("hm")).unwrap();
        let png = std::fs::read(dir.path().join("hm.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(dir.path().join("hm.svg")).unwrap();
        assert!(
            svg.contains("<svg") && svg.matches("<rect").count() >= 240,
            "one rect per cell"
        );
        lines(
            "t",
            "x",
            "y",
            &[("a".into(), vec![(0.0, 1.0), (1.0, 0.5)])],
            &dir.path().join("l"),
        )
        .unwrap();
        assert!(dir.path().join("l.png").exists() && dir.path().join("l.svg").exists());
        lines_with_points(
            "t",
            "x",
            "y",
            &[("one".into(), vec![(2.0, 0.5)])],
            &dir.path().join("p"),
        )
        .unwrap();
        let svg = std::fs::read_to_string(dir.path().join("p.svg")).unwrap();
        assert!(svg.contains("<circle"), "a one-point series shows its point");
        assert_eq!(colormap(0.0), RGBColor(48, 18, 59));
        assert_eq!(colormap(1.0), RGBColor(180, 20, 10));
    }
}
