//! A latency-distribution plot as a standalone SVG: one panel per function,
//! one cumulative-distribution line per series. Latency is on a log scale
//! (cold and warm starts differ by orders of magnitude), and so is the
//! distance from p100, as in HdrHistogram plots: p90, p99 and p99.9 are
//! equally far apart, so the tail people care about is not squeezed into
//! the top pixel.

use std::fmt::Write;

/// One line of a panel.
pub struct Series<'a> {
    pub label: &'a str,
    /// Latencies in microseconds, any order.
    pub samples: &'a [u64],
}

pub struct Panel<'a> {
    pub title: String,
    pub series: Vec<Series<'a>>,
}

/// Colour-blind-safe colours (Okabe-Ito), one per series in order.
const COLORS: [&str; 4] = ["#D55E00", "#E69F00", "#0072B2", "#009E73"];

const PLOT_WIDTH: f64 = 526.0;
const PANEL_HEIGHT: f64 = 240.0;
const LEFT: f64 = 64.0;
/// The legend's text starts this far right of the plot.
const LEGEND_TEXT: f64 = 38.0;
/// A generous width of one character of the 12 px legend (Helvetica's
/// widest lower-case letters are about 0.6 em): the legend is sized from
/// its longest line, so no label is cut at the edge.
const CHAR_WIDTH: f64 = 7.2;
/// Room right of the longest legend line.
const MARGIN: f64 = 12.0;
const TOP: f64 = 34.0;
/// The y axis ends at p99.9.
const TAIL_DECADES: f64 = 3.0;
const BOTTOM: f64 = 42.0;

/// Renders `panels` stacked vertically under `title`.
pub fn render(title: &str, panels: &[Panel<'_>]) -> String {
    let height = 40.0 + PANEL_HEIGHT * panels.len().max(1) as f64;
    // The longest legend line: a label, or its `p50 ... (n=...)` line.
    let longest = panels
        .iter()
        .flat_map(|p| &p.series)
        .map(|s| s.label.chars().count().max(legend_note(s).chars().count()))
        .max()
        .unwrap_or(0);
    let width = (LEFT + PLOT_WIDTH + LEGEND_TEXT + CHAR_WIDTH * longest as f64 + MARGIN).ceil();
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>
<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"##,
        width / 2.0,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        panel_svg(&mut out, panel, 40.0 + PANEL_HEIGHT * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

/// The second line of a series' legend entry.
fn legend_note(s: &Series<'_>) -> String {
    let mut sorted = s.samples.to_vec();
    sorted.sort_unstable();
    let p50 = super::Summary::of(&sorted).map_or(0, |s| s.p50);
    format!("p50 {} (n={})", super::human_us(p50), sorted.len())
}

fn panel_svg(out: &mut String, panel: &Panel<'_>, y0: f64) {
    let plot_w = PLOT_WIDTH;
    let plot_h = PANEL_HEIGHT - TOP - BOTTOM;
    let (x0, top) = (LEFT, y0 + TOP);
    let all = panel.series.iter().flat_map(|s| s.samples.iter().copied());
    let (lo, hi) = all.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi == 0 {
        return;
    }
    // Whole decades around the data, at least one.
    let lo_dec = (lo.max(1) as f64).log10().floor();
    let hi_dec = (hi.max(1) as f64).log10().ceil().max(lo_dec + 1.0);
    let x = |us: f64| x0 + (us.max(1.0).log10() - lo_dec) / (hi_dec - lo_dec) * plot_w;
    // -log10(1 - q): p0 -> 0, p90 -> 1, p99 -> 2, p99.9 -> 3 (the top).
    let y = |pct: f64| {
        let tail = (-(1.0 - pct / 100.0).max(1e-3).log10()).min(TAIL_DECADES);
        top + plot_h - tail / TAIL_DECADES * plot_h
    };

    let _ = writeln!(
        out,
        r#"<text x="{x0}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        y0 + 20.0,
        escape(&panel.title)
    );
    // Grid: decades (with 2x and 5x ticks), and the percentiles people quote.
    let mut d = lo_dec;
    while d <= hi_dec + 1e-9 {
        for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            let us = m * 10f64.powf(d);
            let gx = x(us);
            if gx > x0 + plot_w + 0.5 {
                continue;
            }
            let stroke = if major { "#bbbbbb" } else { "#e5e5e5" };
            let _ = writeln!(
                out,
                r#"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{:.1}" stroke="{stroke}"/>"#,
                top + plot_h
            );
            if major {
                let _ = writeln!(
                    out,
                    r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    top + plot_h + 16.0,
                    decade_label(us as u64)
                );
            }
        }
        d += 1.0;
    }
    for pct in [0.0, 50.0, 90.0, 99.0, 99.9] {
        let gy = y(pct);
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#dddddd" stroke-dasharray="{}"/>
<text x="{:.1}" y="{:.1}" text-anchor="end">p{pct}</text>"##,
            x0 + plot_w,
            if pct == 0.0 || pct == 99.9 {
                "none"
            } else {
                "4 3"
            },
            x0 - 6.0,
            gy + 4.0,
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{x0}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#555555"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555555">latency (log scale)</text>"##,
        x0 + plot_w / 2.0,
        top + plot_h + 32.0
    );
    // Cumulative distributions as steps, and the legend with each p50.
    for (i, s) in panel.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut sorted = s.samples.to_vec();
        sorted.sort_unstable();
        if let Some(&first) = sorted.first() {
            let mut points = format!("{:.1},{:.1}", x(first as f64), y(0.0));
            let n = sorted.len() as f64;
            for (k, v) in sorted.iter().enumerate() {
                let vx = x(*v as f64);
                let _ = write!(
                    points,
                    " {vx:.1},{:.1} {vx:.1},{:.1}",
                    y(k as f64 / n * 100.0),
                    y((k + 1) as f64 / n * 100.0)
                );
            }
            let _ = writeln!(
                out,
                r#"<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>"#
            );
        }
        let ly = top + 10.0 + 34.0 * i as f64;
        let lx = x0 + plot_w + 14.0;
        let _ = writeln!(
            out,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/>
<text x="{}" y="{}">{}</text>
<text x="{}" y="{}" fill="#555555">{}</text>"##,
            lx + 18.0,
            x0 + plot_w + LEGEND_TEXT,
            ly + 4.0,
            escape(s.label),
            x0 + plot_w + LEGEND_TEXT,
            ly + 18.0,
            escape(&legend_note(s)),
        );
    }
}

/// `100 µs`, `1 ms`, `10 s`: powers of ten need no decimals.
fn decade_label(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{} ms", us / 1_000),
        _ => format!("{} s", us / 1_000_000),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_every_series_on_a_log_axis() {
        let cold = [70_000, 72_000, 90_000];
        let warm = [40, 50, 60, 900];
        let svg = render(
            "Cold starts",
            &[Panel {
                title: "hello <module>".into(),
                series: vec![
                    Series {
                        label: "cold",
                        samples: &cold,
                    },
                    Series {
                        label: "warm",
                        samples: &warm,
                    },
                ],
            }],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // Decades from 10 µs to 100 ms are labelled.
        for label in [">10 µs<", ">1 ms<", ">100 ms<", ">p99.9<"] {
            assert!(svg.contains(label), "{label} missing");
        }
        assert!(svg.contains("hello &lt;module&gt;"));
        assert!(svg.contains("p50 72.0 ms (n=3)"));
    }

    /// Every legend line ends inside the picture, however long: the
    /// labels `kelvin bench cold-start` uses were cut at the right edge.
    #[test]
    fn the_legend_fits_its_longest_label() {
        let samples = [697, 700, 1_200_000];
        let labels = [
            "cold from scratch",
            "cold from cache, restart",
            "cold from cache, evicted",
            "warm, a queue message with its metadata",
        ];
        let svg = render(
            "Cold starts",
            &[Panel {
                title: "a".into(),
                series: labels
                    .iter()
                    .map(|label| Series {
                        label,
                        samples: &samples,
                    })
                    .collect(),
            }],
        );
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        for line in svg.lines().filter(|l| l.starts_with("<text x=")) {
            let x: f64 = line.split('"').nth(1).unwrap().parse().unwrap();
            let text = line.split('>').nth(1).unwrap().split('<').next().unwrap();
            let anchored_start = !line.contains("text-anchor");
            if anchored_start {
                // Helvetica's widest characters at 12 px are under 7 px.
                let end = x + 7.0 * text.chars().count() as f64;
                assert!(
                    end <= width,
                    "{text:?} ends at {end}, the picture at {width}"
                );
            }
        }
    }
}
