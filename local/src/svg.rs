//! Hand-written SVG line charts (no plotting dependency): one series, axes with ticks, and
//! vertical markers for recoveries.

use std::fmt::Write;

/// A vertical marker at `x` with a label.
#[derive(Clone, Debug, PartialEq)]
pub struct Marker {
    /// Position on the x axis.
    pub x: f64,
    /// Text shown beside it.
    pub label: String,
}

/// A line chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The series, in x order.
    pub points: Vec<(f64, f64)>,
    /// Vertical markers.
    pub markers: Vec<Marker>,
}

const W: f64 = 800.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

impl Chart {
    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let (x0, x1) = range(self.points.iter().map(|p| p.0).chain(self.markers.iter().map(|m| m.x)));
        let (y0, y1) = range(self.points.iter().map(|p| p.1));
        let frame = Frame { x0, x1, y0, y1, pw: W - LEFT - RIGHT, ph: H - TOP - BOTTOM };
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
            W / 2.0,
            esc(&self.title)
        );
        self.axes(&frame, &mut out);
        self.series(&frame, &mut out);
        out.push_str("</svg>\n");
        out
    }

    /// Axes, ticks and labels.
    fn axes(&self, f: &Frame, out: &mut String) {
        let (pw, ph) = (f.pw, f.ph);
        let _ = writeln!(
            out,
            r#"<path d="M{LEFT} {TOP} V{} H{}" stroke="black" fill="none"/>"#,
            TOP + ph,
            LEFT + pw
        );
        for i in 0..=4 {
            let t = f64::from(i) / 4.0;
            let (xv, yv) = (f.x0 + t * (f.x1 - f.x0), f.y0 + t * (f.y1 - f.y0));
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                f.sx(xv),
                TOP + ph + 16.0,
                tick(xv)
            );
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><path d="M{LEFT} {:.1} H{}" stroke="#eee"/>"##,
                LEFT - 6.0,
                f.sy(yv) + 4.0,
                tick(yv),
                f.sy(yv),
                LEFT + pw
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 10.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
    }

    /// Recovery markers, then the series over them.
    fn series(&self, f: &Frame, out: &mut String) {
        for m in &self.markers {
            let x = f.sx(m.x);
            let _ = writeln!(
                out,
                r#"<path d="M{x:.1} {TOP} V{:.1}" stroke="crimson" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="crimson" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
                TOP + f.ph,
                x - 3.0,
                TOP + 4.0,
                x - 3.0,
                TOP + 4.0,
                esc(&m.label)
            );
        }
        let mut d = String::new();
        for (i, (x, y)) in self.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).enumerate() {
            let _ = write!(d, "{}{:.1} {:.1} ", if i == 0 { "M" } else { "L" }, f.sx(*x), f.sy(*y));
        }
        if !d.is_empty() {
            let _ = writeln!(
                out,
                r#"<path d="{}" stroke="steelblue" stroke-width="1.5" fill="none"/>"#,
                d.trim_end()
            );
        }
    }
}

/// The data ranges and the plot area they map onto.
struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    pw: f64,
    ph: f64,
}

impl Frame {
    fn sx(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * self.pw
    }

    fn sy(&self, y: f64) -> f64 {
        TOP + self.ph - (y - self.y0) / (self.y1 - self.y0) * self.ph
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_the_series_markers_and_escapes_text() {
        let chart = Chart {
            title: "loss <&>".into(),
            x_label: "s".into(),
            y_label: "loss".into(),
            points: vec![(0.0, 5.0), (1.0, 4.0), (2.0, f64::NAN), (3.0, 3.0)],
            markers: vec![Marker { x: 1.5, label: "node:2 → replace".into() }],
        };
        let svg = chart.to_svg();
        assert!(svg.contains("loss &lt;&amp;&gt;"));
        assert!(svg.contains("node:2 → replace"));
        assert_eq!(svg.matches(" L").count(), 2, "NaN points are skipped");
        assert!(svg.trim_end().ends_with("</svg>"));
        // Degenerate inputs still make a valid document.
        let empty = Chart { points: vec![], markers: vec![], ..chart };
        assert!(empty.to_svg().contains("</svg>"));
    }
}
