//! Benchmarks users run on their own functions (`kelvin bench`): cold and
//! warm start latencies per phase, and HTTP serving under load. The
//! measurements are the product's, so they live in the library.
//!
//! - [`cold`]: the three temperatures of a start, per phase.
//! - [`load`]: a closed-loop HTTP load generator over keep-alive connections.
//! - [`svg`]: a latency-distribution plot.

use std::fmt::Write;

use serde::Serialize;

pub mod cold;
pub mod load;
pub mod svg;

/// Percentiles of a set of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Summary {
    /// Nearest-rank percentiles; `None` for no samples.
    pub fn of(samples: &[u64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted[i.clamp(1, sorted.len()) - 1]
        };
        Some(Summary {
            n: sorted.len(),
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<u64>() as f64 / sorted.len() as f64,
        })
    }
}

/// `850 µs`, `1.27 ms`, `3.4 s`: three significant digits, a unit a person
/// reads at a glance.
pub fn human_us(us: u64) -> String {
    let us_f = us as f64;
    let (value, unit) = if us < 1_000 {
        return format!("{us} µs");
    } else if us < 1_000_000 {
        (us_f / 1e3, "ms")
    } else {
        (us_f / 1e6, "s")
    };
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {unit}")
}

/// A plain-text table: a header row, then rows; the first `left` columns
/// are aligned left, the others right (numbers).
pub fn table(header: &[&str], rows: &[Vec<String>], left: usize) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            let pad = w - cell.chars().count();
            if i > 0 {
                text.push_str("  ");
            }
            if i < left {
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', pad));
            } else {
                text.extend(std::iter::repeat_n(' ', pad));
                text.push_str(cell);
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A progress bar on stderr, hidden when stderr is not a terminal (logs and
/// CI stay clean).
pub fn progress(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {msg:<28} [{bar:30}] {pos}/{len} ({eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50, 90, 99, 100));
        let one = Summary::of(&[7]).unwrap();
        assert_eq!((one.p50, one.p99, one.max), (7, 7, 7));
        assert_eq!(Summary::of(&[]), None);
        // Unsorted input.
        let s = Summary::of(&[30, 10, 20]).unwrap();
        assert_eq!((s.p50, s.max), (20, 30));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_us(850), "850 µs");
        assert_eq!(human_us(1_270), "1.27 ms");
        assert_eq!(human_us(73_013), "73.0 ms");
        assert_eq!(human_us(3_400_000), "3.40 s");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["name", "p50"],
            &[
                vec!["a".into(), "1 µs".into()],
                vec!["long".into(), "10 ms".into()],
            ],
            1,
        );
        assert_eq!(t, "name    p50\na      1 µs\nlong  10 ms\n");
    }
}
