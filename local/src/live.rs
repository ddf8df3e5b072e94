//! The live view of a local run: a pure function from [`LiveState`] to text, redrawn by the demo.

use std::fmt::Write;

use ninelives_core::keyspace::ChipState;

/// What a chip looks like in the chip map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChipCell {
    /// Healthy (`#`).
    Healthy,
    /// Degraded but used (`~`).
    Degraded,
    /// Failed (`X`).
    Failed,
    /// Quarantined (`Q`).
    Quarantined,
    /// Its node is down or unknown (`.`).
    Down,
}

impl ChipCell {
    /// The cell of a published chip state.
    pub fn of(state: ChipState) -> Self {
        match state {
            ChipState::Healthy => ChipCell::Healthy,
            ChipState::Degraded => ChipCell::Degraded,
            ChipState::Failed => ChipCell::Failed,
            ChipState::Quarantined => ChipCell::Quarantined,
        }
    }

    fn glyph(self) -> char {
        match self {
            ChipCell::Healthy => '#',
            ChipCell::Degraded => '~',
            ChipCell::Failed => 'X',
            ChipCell::Quarantined => 'Q',
            ChipCell::Down => '.',
        }
    }
}

/// One row of the chip map.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeRow {
    /// Node name.
    pub name: String,
    /// Its role: `rank 2`, `spare`, `dropped`.
    pub role: String,
    /// Its chips, by index.
    pub chips: Vec<ChipCell>,
}

/// Everything the live view shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveState {
    /// Job name.
    pub job: String,
    /// Brain phase (`running`, `recovering`, ...).
    pub phase: String,
    /// Last completed step.
    pub step: u64,
    /// Steps of the run.
    pub steps: u64,
    /// Loss of the last step.
    pub loss: Option<f64>,
    /// Throughput of the last step.
    pub tokens_per_s: Option<f64>,
    /// Seconds since start.
    pub elapsed_s: f64,
    /// Placement generation in force.
    pub generation: u64,
    /// Chip map rows.
    pub nodes: Vec<NodeRow>,
    /// Recent events, oldest first (faults injected, recoveries).
    pub events: Vec<String>,
}

/// Events shown (the newest).
pub const EVENT_LINES: usize = 8;

/// Renders the view, `width` columns wide (at least 40).
pub fn render(s: &LiveState, width: usize) -> String {
    let width = width.max(40);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ninelives demo · {} · {} · generation {} · {:.1} s",
        s.job, s.phase, s.generation, s.elapsed_s
    );
    let label = format!(" {}/{}", s.step, s.steps);
    let bar_width = width.saturating_sub(label.len() + 2).max(10);
    let filled = if s.steps == 0 { 0 } else { (s.step.min(s.steps) as usize * bar_width) / s.steps as usize };
    let _ = writeln!(out, "[{}{}]{label}", "=".repeat(filled), " ".repeat(bar_width - filled));
    let loss = s.loss.map_or("-".to_string(), |l| format!("{l:.4}"));
    let tps = s.tokens_per_s.map_or("-".to_string(), |t| format!("{t:.0}"));
    let _ = writeln!(out, "step {}  loss {loss}  tokens/s {tps}", s.step);
    let _ = writeln!(out, "chips  (# healthy  ~ degraded  X failed  Q quarantined  . node down)");
    let name_width = s.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
    for n in &s.nodes {
        let cells: String = n.chips.iter().map(|c| c.glyph()).collect();
        let _ = writeln!(out, "  {:<name_width$}  {cells}  {}", n.name, n.role);
    }
    let _ = writeln!(out, "events");
    let skip = s.events.len().saturating_sub(EVENT_LINES);
    if s.events.is_empty() {
        let _ = writeln!(out, "  (none yet)");
    }
    for e in &s.events[skip..] {
        let line: String = e.chars().take(width.saturating_sub(2)).collect();
        let _ = writeln!(out, "  {line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> LiveState {
        LiveState {
            job: "tiny".into(),
            phase: "recovering".into(),
            step: 150,
            steps: 300,
            loss: Some(2.34567),
            tokens_per_s: Some(10234.4),
            elapsed_s: 42.0,
            generation: 3,
            nodes: vec![
                NodeRow { name: "node-0".into(), role: "rank 0".into(), chips: vec![ChipCell::Healthy; 8] },
                NodeRow {
                    name: "node-1".into(),
                    role: "rank 1".into(),
                    chips: vec![
                        ChipCell::Healthy,
                        ChipCell::Failed,
                        ChipCell::Quarantined,
                        ChipCell::Degraded,
                        ChipCell::Healthy,
                        ChipCell::Healthy,
                        ChipCell::Healthy,
                        ChipCell::Healthy,
                    ],
                },
                NodeRow { name: "node-2".into(), role: "rank 2".into(), chips: vec![ChipCell::Down; 8] },
            ],
            events: (0..10).map(|i| format!("event {i}")).collect(),
        }
    }

    #[test]
    fn shows_progress_metrics_chip_map_and_recent_events() {
        let text = render(&state(), 60);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("tiny") && lines[0].contains("recovering") && lines[0].contains("generation 3")
        );
        assert!(lines[1].starts_with('[') && lines[1].ends_with(" 150/300"));
        assert_eq!(lines[1].len(), 60);
        let bar = &lines[1][1..lines[1].find(']').unwrap_or(0)];
        assert_eq!(bar.matches('=').count() * 2, bar.len(), "half done, half the bar");
        assert!(lines[2].contains("loss 2.3457") && lines[2].contains("tokens/s 10234"));
        assert!(text.contains("node-1  #XQ~####  rank 1"));
        assert!(text.contains("node-2  ........"));
        assert!(!text.contains("event 1\n") && text.contains("event 2") && text.contains("event 9"));
    }

    #[test]
    fn degenerate_states_render() {
        let text = render(&LiveState::default(), 0);
        assert!(text.contains("(none yet)") && text.contains("0/0"));
    }
}
