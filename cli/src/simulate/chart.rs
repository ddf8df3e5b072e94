//! The simulator's chart: one horizontal bar per policy, its wall time split into kept training
//! and each kind of loss, so the dominant cost is visible at a glance.

use std::fmt::Write as _;

use ninelives_core::simulate::Report;

const W: f64 = 980.0;
const LEFT: f64 = 330.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BAR: f64 = 26.0;
const GAP: f64 = 12.0;

/// The parts of a bar: label, colour, and the share of wall time of one outcome.
const PARTS: [(&str, &str); 6] = [
    ("kept training", "#4c9f70"),
    ("lost work", "#d1495b"),
    ("recovery", "#edae49"),
    ("detection", "#00798c"),
    ("checkpoint pauses", "#8d6a9f"),
    ("dead", "#555555"),
];

/// The SVG document: bars from 0 to 100 % of wall time, the ETTR written at the end of each.
pub fn losses(title: &str, report: &Report) -> String {
    let h = report.params.horizon_s;
    let rows = report.outcomes.len() as f64;
    let height = TOP + rows * (BAR + GAP) + 70.0;
    let plot = W - LEFT - RIGHT;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{height}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    for (i, o) in report.outcomes.iter().enumerate() {
        let y = TOP + i as f64 * (BAR + GAP);
        let shares = [
            o.steps_kept * report.params.costs.step_s,
            o.lost_work_s,
            o.recovery_s(),
            o.detection_s,
            o.checkpoint_pause_s,
            o.dead_s,
        ];
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            y + BAR / 2.0 + 4.0,
            esc(&o.policy.name)
        );
        let mut x = LEFT;
        for (share, (label, colour)) in shares.iter().zip(PARTS) {
            let w = plot * (share / h).clamp(0.0, 1.0);
            let _ = writeln!(
                out,
                r#"<rect x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{BAR}" fill="{colour}"><title>{}: {:.2}%</title></rect>"#,
                esc(label),
                100.0 * share / h
            );
            x += w;
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" fill="white" text-anchor="end">ETTR {:.4}</text>"#,
            LEFT + plot * (shares[0] / h).clamp(0.0, 1.0) - 6.0,
            y + BAR / 2.0 + 4.0,
            o.ettr
        );
    }
    legend(&mut out, height - 30.0);
    out.push_str("</svg>\n");
    out
}

fn legend(out: &mut String, y: f64) {
    let mut x = LEFT;
    for (label, colour) in PARTS {
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{colour}"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            y - 10.0,
            x + 16.0,
            esc(label)
        );
        x += 20.0 + 7.0 * label.len() as f64 + 16.0;
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
