//! Benchmark results: samples per phase, their summary (min, p50, p90,
//! p99, max), the table, the JSON report (with the machine and settings),
//! the comparison with an earlier report, and the CDF plot.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::commands::human;

/// The samples of one phase, in nanoseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    /// What the phase measures, for the table's reader.
    pub about: String,
    pub samples_ns: Vec<u64>,
    pub summary: Summary,
}

/// A phase's distribution, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: u64,
}

impl Summary {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &[u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Self {
            count: sorted.len(),
            min: sorted[0],
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: sorted[sorted.len() - 1],
            mean: (sorted.iter().map(|&v| u128::from(v)).sum::<u128>() / sorted.len() as u128) as u64,
        }
    }
}

impl Phase {
    pub fn new(name: &str, about: &str, samples: Vec<Duration>) -> Self {
        let samples_ns: Vec<u64> = samples.iter().map(|d| d.as_nanos() as u64).collect();
        Self {
            name: name.to_owned(),
            about: about.to_owned(),
            summary: Summary::of(&samples_ns),
            samples_ns,
        }
    }
}

/// Where and how a benchmark ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub hostname: String,
    pub cpu: String,
    pub cpus: usize,
    pub os: String,
}

impl Machine {
    pub fn here() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            hostname,
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS.to_owned(),
        }
    }
}

/// A whole benchmark run, as written by `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub fnrunner: String,
    pub wasmtime: String,
    /// `in-process` or `http`.
    pub mode: String,
    pub machine: Machine,
    pub module: ModuleInfo,
    /// The options the run used (iterations, engine, targets...).
    pub settings: serde_json::Value,
    pub phases: Vec<Phase>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleInfo {
    pub path: String,
    pub digest: String,
    pub kind: String,
    pub size: usize,
}

impl Report {
    pub fn new(mode: &str, module: ModuleInfo, settings: serde_json::Value, phases: Vec<Phase>) -> Self {
        Self {
            fnrunner: env!("CARGO_PKG_VERSION").to_owned(),
            wasmtime: env!("FNRUNNER_WASMTIME_VERSION").to_owned(),
            mode: mode.to_owned(),
            machine: Machine::here(),
            module,
            settings,
            phases,
        }
    }

    /// The table: one row per phase, durations in readable units.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let width = self.phases.iter().map(|p| p.name.len()).max().unwrap_or(5).max(5);
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}",
            "phase", "n", "min", "p50", "p90", "p99", "max"
        );
        for phase in &self.phases {
            let s = phase.summary;
            let d = |ns: u64| human(Duration::from_nanos(ns));
            let _ = writeln!(
                out,
                "{:<width$}  {:>6}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}",
                phase.name,
                s.count,
                d(s.min),
                d(s.p50),
                d(s.p90),
                d(s.p99),
                d(s.max)
            );
        }
        out
    }

    /// The change of each phase's p50 and p99 against `old`.
    pub fn compare(&self, old: &Report) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<28}  {:>21}  {:>21}", "phase (old → new)", "p50", "p99");
        for phase in &self.phases {
            let Some(before) = old.phases.iter().find(|p| p.name == phase.name) else {
                let _ = writeln!(out, "{:<28}  (not in the old run)", phase.name);
                continue;
            };
            let cell = |old: u64, new: u64| {
                let change = if old == 0 {
                    0.0
                } else {
                    (new as f64 - old as f64) / old as f64 * 100.0
                };
                format!(
                    "{} → {} {:+.1}%",
                    human(Duration::from_nanos(old)),
                    human(Duration::from_nanos(new)),
                    change
                )
            };
            let _ = writeln!(
                out,
                "{:<28}  {:>21}  {:>21}",
                phase.name,
                cell(before.summary.p50, phase.summary.p50),
                cell(before.summary.p99, phase.summary.p99)
            );
        }
        out
    }

    /// Draws each phase's latency distribution as a CDF on a log scale.
    pub fn plot(&self, path: &Path, title: &str) -> Result<(), String> {
        use plotters::prelude::*;
        let phases: Vec<&Phase> = self.phases.iter().filter(|p| !p.samples_ns.is_empty()).collect();
        let all = phases.iter().flat_map(|p| p.samples_ns.iter().copied());
        let (low, high) = all.fold((u64::MAX, 0u64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if phases.is_empty() {
            return Err("no samples to plot".into());
        }
        // Microseconds, with a margin so the extremes are not on the frame.
        let x_min = (low.max(1) as f64 / 1000.0) / 1.5;
        let x_max = (high.max(1) as f64 / 1000.0) * 1.5;
        let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
        let draw = |e: &dyn std::fmt::Display| e.to_string();
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..1.0)
            .map_err(|e| draw(&e))?;
        chart
            .configure_mesh()
            .x_desc("latency (µs, log scale)")
            .y_desc("fraction of samples ≤ latency")
            .x_label_formatter(&|v| format_us(*v))
            .draw()
            .map_err(|e| draw(&e))?;
        for (index, phase) in phases.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            let mut sorted = phase.samples_ns.clone();
            sorted.sort_unstable();
            let n = sorted.len() as f64;
            let points: Vec<(f64, f64)> = sorted
                .iter()
                .enumerate()
                .map(|(i, &ns)| (ns.max(1) as f64 / 1000.0, (i + 1) as f64 / n))
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| draw(&e))?
                .label(format!(
                    "{} (p50 {})",
                    phase.name,
                    human(Duration::from_nanos(phase.summary.p50))
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw(&e))?;
        root.present().map_err(|e| draw(&e))?;
        Ok(())
    }
}

fn format_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else if us >= 1.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).collect();
        let s = Summary::of(&samples);
        assert_eq!((s.min, s.p50, s.p90, s.p99, s.max), (1, 50, 90, 99, 100));
        assert_eq!(s.count, 100);
        assert_eq!(s.mean, 50);
        assert_eq!(Summary::of(&[7]).p99, 7);
        assert_eq!(Summary::of(&[]), Summary::default());
    }

    #[test]
    fn comparison_shows_the_change_per_phase() {
        let module = ModuleInfo {
            path: "m".into(),
            digest: "d".into(),
            kind: "cgi".into(),
            size: 1,
        };
        let old = Report::new(
            "in-process",
            module.clone(),
            serde_json::Value::Null,
            vec![Phase::new("instantiate", "", vec![Duration::from_micros(10); 3])],
        );
        let new = Report::new(
            "in-process",
            module,
            serde_json::Value::Null,
            vec![
                Phase::new("instantiate", "", vec![Duration::from_micros(5); 3]),
                Phase::new("other", "", vec![Duration::from_micros(1)]),
            ],
        );
        let text = new.compare(&old);
        assert!(text.contains("instantiate") && text.contains("-50.0%"), "{text}");
        assert!(text.contains("(not in the old run)"), "{text}");
    }
}
