//! PNG snapshots of dashboard panels, drawn from Prometheus query results.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::Error;

/// Fonts tried in order (Debian's fonts-dejavu-core ships the first).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Image size of one panel snapshot.
pub const SIZE: (u32, u32) = (960, 360);

/// One line of a panel.
#[derive(Clone, Debug)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// `(seconds since the start of the run, value)`; non-finite values break the line.
    pub points: Vec<(f64, f64)>,
}

/// What to draw.
#[derive(Clone, Debug)]
pub struct PanelImage {
    /// Dashboard and panel title.
    pub title: String,
    /// Y axis unit (Grafana unit name: `s`, `Bps`, `percentunit`, …; empty for none).
    pub unit: String,
    /// The lines.
    pub lines: Vec<Line>,
    /// Vertical markers: `(seconds since start, text)` — the injected faults.
    pub markers: Vec<(f64, String)>,
}

fn register_font() -> Result<(), Error> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = FONT_PATHS.iter().find(|p| Path::new(p).is_file()).ok_or_else(|| {
            format!("no TrueType font found (tried {FONT_PATHS:?}); install Debian's fonts-dejavu-core")
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable font"))
    })
    .clone()
    .map_err(Error::Render)
}

fn unit_suffix(unit: &str) -> &str {
    match unit {
        "s" => "seconds",
        "Bps" => "bytes/s",
        "reqps" => "requests/s",
        "percentunit" => "ratio",
        other => other,
    }
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Draws `panel` and writes it as a PNG to `path`.
pub fn write_png(panel: &PanelImage, path: &Path) -> Result<(), Error> {
    register_font()?;
    let (w, h) = SIZE;
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    draw(panel, &mut buffer).map_err(|e| Error::Render(format!("{}: {e}", panel.title)))?;
    let file = std::fs::File::create(path).map_err(|e| Error::Read(path.display().to_string(), e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header().map_err(|e| Error::Render(format!("{}: {e}", path.display())))?;
    writer.write_image_data(&buffer).map_err(|e| Error::Render(format!("{}: {e}", path.display())))?;
    writer.finish().map_err(|e| Error::Render(format!("{}: {e}", path.display())))
}

fn draw<'a>(panel: &PanelImage, buffer: &'a mut [u8]) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let root = BitMapBackend::with_buffer(buffer, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let finite =
        || panel.lines.iter().flat_map(|l| l.points.iter()).filter(|(t, v)| t.is_finite() && v.is_finite());
    let (mut t0, mut t1, mut lo, mut hi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (t, v) in finite() {
        t0 = t0.min(*t);
        t1 = t1.max(*t);
        lo = lo.min(*v);
        hi = hi.max(*v);
    }
    for (t, _) in &panel.markers {
        t0 = t0.min(*t);
        t1 = t1.max(*t);
    }
    if t0 > t1 {
        (t0, t1) = (0.0, 1.0);
    }
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    }
    // Start counts, rates and durations at 0, like Grafana's panels here.
    if lo >= 0.0 {
        lo = 0.0;
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    // Headroom above the data for the marker labels (three staggered rows).
    let pad = (hi - lo) * 0.25;
    let mut chart = ChartBuilder::on(&root)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(t0..t1.max(t0 + 1.0), lo..hi + pad)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the run started")
        .y_desc(unit_suffix(&panel.unit))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, (t, text)) in panel.markers.iter().enumerate() {
        let red = RGBColor(200, 30, 30);
        // Three staggered rows so labels of close events do not overlap.
        let row = hi + pad * (0.85 - 0.3 * (i % 3) as f64);
        chart.draw_series(LineSeries::new([(*t, lo), (*t, row)], red.stroke_width(1)))?;
        chart.draw_series(std::iter::once(Text::new(
            format!(" {text}"),
            (*t, row),
            ("sans-serif", 12).into_font().color(&red),
        )))?;
    }
    for (i, line) in panel.lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // Split at gaps (non-finite values, or no sample for over 3 steps) like Grafana does.
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        let mut last_t: Option<f64> = None;
        let step = median_step(&line.points);
        for (t, v) in &line.points {
            let gap = last_t.is_some_and(|lt| t - lt > step * 3.5);
            if !v.is_finite() || gap {
                segments.push(Vec::new());
            }
            if v.is_finite() {
                if let Some(segment) = segments.last_mut() {
                    segment.push((*t, *v));
                }
                last_t = Some(*t);
            }
        }
        let mut labelled = false;
        for segment in segments.into_iter().filter(|s| !s.is_empty()) {
            let series = if segment.len() == 1 {
                let (t, v) = segment[0];
                chart.draw_series(std::iter::once(Circle::new((t, v), 3, color.filled())))?
            } else {
                chart.draw_series(LineSeries::new(segment, color.stroke_width(2)))?
            };
            if !labelled {
                series
                    .label(line.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
                labelled = true;
            }
        }
    }
    if !panel.lines.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn median_step(points: &[(f64, f64)]) -> f64 {
    let mut steps: Vec<f64> = points.windows(2).map(|w| w[1].0 - w[0].0).filter(|d| *d > 0.0).collect();
    steps.sort_by(f64::total_cmp);
    steps.get(steps.len() / 2).copied().unwrap_or(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_decodable_png_with_lines_gaps_and_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("panel.png");
        let panel = PanelImage {
            title: "Loss".into(),
            unit: "".into(),
            lines: vec![
                Line {
                    label: "tiny".into(),
                    points: (0..50).map(|i| (f64::from(i), 5.5 - f64::from(i) * 0.05)).collect(),
                },
                Line {
                    label: "gap".into(),
                    points: vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 2.0), (40.0, 3.0)],
                },
            ],
            markers: vec![(20.0, "chip fault".into())],
        };
        write_png(&panel, &path).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        // Something besides the white background was drawn: the lines' blue and the marker's red.
        assert!(pixels.chunks(3).any(|p| p == [31, 119, 180]), "no line drawn");
        assert!(pixels.chunks(3).any(|p| p == [200, 30, 30]), "no marker drawn");
    }
}
