//! `tessera plot`: a run's loss, smoothed noise scale B_simple and global batch against the
//! examples seen, from its `metrics.jsonl`, as one PNG of three panels.
//!
//! Drawn without a plotting library or a font file: lines on an RGB buffer, and axis labels in
//! a small built-in 5×7 pixel font (digits, the letters the labels use, a few signs).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A run's output directory (its metrics.jsonl is read) or a metrics file.
    #[arg(value_name = "RUN_DIR_OR_METRICS")]
    pub input: PathBuf,
    /// The PNG to write (default: plot.png beside the metrics file).
    #[arg(long, short = 'o', value_name = "PNG")]
    pub out: Option<PathBuf>,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1000)]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 900)]
    pub height: u32,
    /// Draw the loss on a log scale (for losses that approach 0, e.g. a classifier's).
    #[arg(long)]
    pub log_loss: bool,
}

/// The three curves of a run, each as (examples seen, value) points in step order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub loss: Vec<(f64, f64)>,
    pub b_simple: Vec<(f64, f64)>,
    pub batch: Vec<(f64, f64)>,
}

/// Reads the curves from the text of a metrics file. The examples seen at every step follow
/// from the global batch of each step: the first logged step's `batch` (or its `samples` over
/// its step, for files without `batch`) and the `batch_change` lines.
pub fn read_series(text: &str) -> Result<Series> {
    let mut loss_lines = Vec::new();
    let mut gns_lines = Vec::new();
    let mut changes: BTreeMap<u64, f64> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("line {} is not JSON; pass a tessera metrics.jsonl", i + 1))?;
        let Some(step) = v.get("step").and_then(|s| s.as_u64()) else { continue };
        if v.get("eval").is_some() {
            continue;
        }
        if let Some(c) = v.get("batch_change") {
            if let (Some(first), Some(to)) =
                (c.get("first_step").and_then(|x| x.as_u64()), c.get("to").and_then(|x| x.as_f64()))
            {
                changes.insert(first, to);
            }
        } else if let Some(g) = v.get("gns") {
            if let Some(b) = g.get("b_simple").and_then(|x| x.as_f64()) {
                gns_lines.push((step, b));
            }
        } else if let Some(l) = v.get("loss").and_then(|x| x.as_f64()) {
            let samples = v.get("samples").and_then(|x| x.as_f64());
            let batch = v.get("batch").and_then(|x| x.as_f64());
            loss_lines.push((step, l, samples, batch));
        }
    }
    if loss_lines.is_empty() {
        bail!("no loss lines (with \"step\" and \"loss\"); is this a tessera metrics.jsonl?");
    }
    loss_lines.sort_by_key(|l| l.0);
    loss_lines.dedup_by_key(|l| l.0);
    // The batch of step 1: logged, or the samples after step 1.
    let first = loss_lines[0];
    let initial = first
        .3
        .or(if first.0 == 1 { first.2 } else { None })
        .or_else(|| first.2.map(|s| s / first.0 as f64));
    let last_step =
        loss_lines.iter().map(|l| l.0).chain(gns_lines.iter().map(|g| g.0)).max().unwrap_or(1);
    // examples[s] = examples after step s (1-based), from the per-step batch.
    let Some(b0) = initial.filter(|b| *b > 0.0) else {
        bail!("the first loss line has neither \"batch\" nor \"samples\"");
    };
    // examples[s] = examples after step s (1-based).
    let mut examples = Vec::with_capacity(last_step as usize + 1);
    examples.push(0.0);
    let mut b = b0;
    for s in 1..=last_step {
        if let Some(&to) = changes.get(&s) {
            b = to;
        }
        examples.push(examples[s as usize - 1] + b);
    }
    let examples_at = |step: u64| examples[(step as usize).min(examples.len() - 1)];
    let mut s = Series::default();
    for &(step, l, _, _) in &loss_lines {
        s.loss.push((examples_at(step), l));
    }
    for &(step, b) in &gns_lines {
        s.b_simple.push((examples_at(step), b));
    }
    s.b_simple.sort_by(|a, b| a.0.total_cmp(&b.0));
    // The batch as a step function: its value at the start, before and after every change.
    s.batch.push((0.0, b0));
    let mut cur = b0;
    for (&first, &to) in changes.range(..=last_step) {
        let x = examples_at(first - 1);
        s.batch.push((x, cur));
        s.batch.push((x, to));
        cur = to;
    }
    s.batch.push((examples_at(last_step), cur));
    Ok(s)
}

/// An RGB image.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

type Color = [u8; 3];
const WHITE: Color = [255, 255, 255];
const BLACK: Color = [30, 30, 30];
const GRID: Color = [225, 225, 225];
const BLUE: Color = [31, 119, 180];
const ORANGE: Color = [230, 120, 20];
const GREEN: Color = [44, 160, 44];

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas { width, height, rgb: WHITE.repeat(width * height) }
    }

    fn set(&mut self, x: i64, y: i64, c: Color) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Color) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A line `thick` pixels wide (Bresenham, with a square pen).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, c: Color) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let h = thick / 2;
        loop {
            self.rect(x - h, y - h, x - h + thick - 1, y - h + thick - 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the built-in font, `scale` pixels per font pixel; returns its width.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Color) -> i64 {
        let mut cx = x;
        for ch in s.chars() {
            if let Some(rows) = glyph(ch) {
                for (r, row) in rows.iter().enumerate() {
                    for (k, b) in row.bytes().enumerate() {
                        if b == b'#' {
                            let (px, py) = (cx + k as i64 * scale, y + r as i64 * scale);
                            self.rect(px, py, px + scale - 1, py + scale - 1, c);
                        }
                    }
                }
            }
            cx += 6 * scale;
        }
        cx - x
    }
}

fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 6 * scale
}

/// 5×7 glyphs, '#' on.
fn glyph(c: char) -> Option<[&'static str; 7]> {
    Some(match c.to_ascii_uppercase() {
        '0' => [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
        '1' => ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
        '2' => [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
        '3' => ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
        '4' => ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
        '5' => ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
        '6' => ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
        '7' => ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
        '8' => [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
        '9' => [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
        '.' => [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."],
        ',' => [".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."],
        '-' => [".....", ".....", ".....", ".###.", ".....", ".....", "....."],
        '+' => [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."],
        '_' => [".....", ".....", ".....", ".....", ".....", ".....", "#####"],
        '(' => ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."],
        ')' => [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."],
        'A' => [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
        'B' => ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."],
        'C' => [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."],
        'D' => ["####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."],
        'E' => ["#####", "#....", "#....", "####.", "#....", "#....", "#####"],
        'G' => [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"],
        'H' => ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
        'I' => [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."],
        'K' => ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"],
        'L' => ["#....", "#....", "#....", "#....", "#....", "#....", "#####"],
        'M' => ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"],
        'N' => ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"],
        'O' => [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
        'P' => ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."],
        'R' => ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"],
        'S' => [".####", "#....", "#....", ".###.", "....#", "....#", "####."],
        'T' => ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
        'X' => ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"],
        _ => return None,
    })
}

/// A number for a tick label: 1500 as 1.5K, 2e6 as 2M, 0.0001 as 1E-4.
pub fn format_tick(v: f64) -> String {
    fn trim(s: String) -> String {
        if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if a >= 1e3 {
        format!("{}K", trim(format!("{:.2}", v / 1e3)))
    } else if a >= 1e-3 {
        trim(format!("{v:.4}"))
    } else {
        let e = a.log10().floor() as i32;
        format!("{}E{e}", trim(format!("{:.1}", v / 10f64.powi(e))))
    }
}

/// An axis: linear, or log10 (positive values only).
#[derive(Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn fit(values: impl Iterator<Item = f64>, log: bool) -> Option<Axis> {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            let v = if log { v.log10() } else { v };
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            return None;
        }
        if hi - lo < 1e-12 {
            let pad = if log { 0.5 } else { lo.abs().max(1.0) * 0.5 };
            lo -= pad;
            hi += pad;
        } else {
            let pad = (hi - lo) * 0.05;
            lo -= pad;
            hi += pad;
        }
        Some(Axis { lo, hi, log })
    }

    fn frac(&self, v: f64) -> f64 {
        let v = if self.log { v.max(1e-300).log10() } else { v };
        (v - self.lo) / (self.hi - self.lo)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (self.lo.ceil() as i32, self.hi.floor() as i32);
            let mut t: Vec<f64> = (a..=b).map(|e| 10f64.powi(e)).collect();
            if t.len() < 3 {
                // Under two decades: also 2× and 5×.
                let mut more = Vec::new();
                for e in (self.lo.floor() as i32)..=(self.hi.ceil() as i32) {
                    for m in [1.0, 2.0, 5.0] {
                        let v = m * 10f64.powi(e);
                        let l = v.log10();
                        if l >= self.lo && l <= self.hi {
                            more.push(v);
                        }
                    }
                }
                t = more;
            }
            t
        } else {
            let raw = (self.hi - self.lo) / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step =
                [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(raw);
            let mut t = Vec::new();
            let mut v = (self.lo / step).ceil() * step;
            while v <= self.hi + step * 1e-9 {
                t.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
                v += step;
            }
            t
        }
    }
}

struct Panel<'a> {
    title: &'a str,
    points: &'a [(f64, f64)],
    color: Color,
    log: bool,
}

/// Draws the three panels into an image of `width` × `height` pixels (the loss on a log scale
/// with `log_loss`).
pub fn render(series: &Series, width: usize, height: usize, log_loss: bool) -> Result<Canvas> {
    if !(300..=10_000).contains(&width) || !(300..=10_000).contains(&height) {
        bail!("the image must be 300 to 10000 pixels each way, not {width} x {height}");
    }
    if series.loss.is_empty() {
        bail!("no loss points to plot");
    }
    let mut cv = Canvas::new(width, height);
    let xs = series.loss.iter().chain(&series.b_simple).chain(&series.batch).map(|p| p.0);
    let xaxis = Axis::fit(xs.chain(std::iter::once(0.0)), false).context("no points to plot")?;
    let xaxis = Axis { lo: xaxis.lo.max(0.0), ..xaxis };
    let panels = [
        Panel {
            title: if log_loss { "LOSS (LOG)" } else { "LOSS" },
            points: &series.loss,
            color: BLUE,
            log: log_loss,
        },
        Panel {
            title: "B_SIMPLE (SMOOTHED, LOG)",
            points: &series.b_simple,
            color: ORANGE,
            log: true,
        },
        Panel { title: "GLOBAL BATCH (LOG)", points: &series.batch, color: GREEN, log: true },
    ];
    let scale = if width >= 700 { 2 } else { 1 };
    let (left, right) = (12 * 6 * scale / 2 + 30, 24i64);
    let bottom_label = 14 * scale + 16;
    let ph = (height as i64 - bottom_label) / 3;
    for (i, p) in panels.iter().enumerate() {
        let top = i as i64 * ph + 10 * scale + 10;
        let (x0, x1) = (left, width as i64 - right);
        let (y0, y1) = (top, (i as i64 + 1) * ph - 8 * scale - 14);
        cv.text(x0, top - 8 * scale - 4, p.title, scale, BLACK);
        let to_px = |x: f64, y: f64, yax: &Axis| {
            let px = x0 as f64 + xaxis.frac(x) * (x1 - x0) as f64;
            let py = y1 as f64 - yax.frac(y) * (y1 - y0) as f64;
            (px.round() as i64, py.round() as i64)
        };
        let yaxis = Axis::fit(p.points.iter().map(|q| q.1), p.log);
        // Grid and ticks.
        for t in xaxis.ticks() {
            let px = x0 + (xaxis.frac(t) * (x1 - x0) as f64).round() as i64;
            cv.line((px, y0), (px, y1), 1, GRID);
            let label = format_tick(t);
            cv.text(px - text_width(&label, scale) / 2, y1 + 5, &label, scale, BLACK);
        }
        match &yaxis {
            Some(ya) => {
                for t in ya.ticks() {
                    let py = y1 - (ya.frac(t) * (y1 - y0) as f64).round() as i64;
                    cv.line((x0, py), (x1, py), 1, GRID);
                    let label = format_tick(t);
                    let w = text_width(&label, scale);
                    cv.text(x0 - 6 - w, py - 7 * scale / 2, &label, scale, BLACK);
                }
                let pts: Vec<(i64, i64)> = p
                    .points
                    .iter()
                    .filter(|q| q.0.is_finite() && q.1.is_finite() && (!p.log || q.1 > 0.0))
                    .map(|q| to_px(q.0, q.1, ya))
                    .collect();
                if pts.len() == 1 {
                    let (x, y) = pts[0];
                    cv.rect(x - 2, y - 2, x + 2, y + 2, p.color);
                }
                for w in pts.windows(2) {
                    cv.line(w[0], w[1], 2, p.color);
                }
            }
            None => {
                let msg = "NO DATA";
                let (cx, cy) = ((x0 + x1) / 2, (y0 + y1) / 2);
                cv.text(cx - text_width(msg, scale) / 2, cy, msg, scale, BLACK);
            }
        }
        // Frame.
        for (a, b) in
            [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))]
        {
            cv.line(a, b, 1, BLACK);
        }
    }
    let label = "EXAMPLES SEEN";
    cv.text(
        (width as i64 - text_width(label, scale)) / 2,
        height as i64 - 7 * scale - 6,
        label,
        scale,
        BLACK,
    );
    Ok(cv)
}

/// PNG bytes of a canvas.
pub fn encode_png(cv: &Canvas) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, cv.width as u32, cv.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().context("writing the PNG header")?;
        w.write_image_data(&cv.rgb).context("writing the PNG image")?;
    }
    Ok(out)
}

fn metrics_path(input: &Path) -> PathBuf {
    if input.is_dir() { input.join("metrics.jsonl") } else { input.to_path_buf() }
}

pub fn plot(args: &PlotArgs) -> Result<ExitCode> {
    let metrics = metrics_path(&args.input);
    let text = fs::read_to_string(&metrics).with_context(|| {
        format!(
            "reading {}; pass a run's output directory (with metrics.jsonl) or a metrics file",
            metrics.display()
        )
    })?;
    let series = read_series(&text)
        .with_context(|| format!("reading the curves of {}", metrics.display()))?;
    let cv = render(&series, args.width as usize, args.height as usize, args.log_loss)?;
    let bytes = encode_png(&cv)?;
    let out = args.out.clone().unwrap_or_else(|| match metrics.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join("plot.png"),
        _ => PathBuf::from("plot.png"),
    });
    fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} x {}; {} loss, {} B_simple, {} batch points)",
        out.display(),
        cv.width,
        cv.height,
        series.loss.len(),
        series.b_simple.len(),
        series.batch.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"{"step":1,"loss":4.0,"lr":0.1,"samples":64,"batch":64}
{"step":2,"loss":3.5,"lr":0.1,"samples":128,"batch":64}
{"step":2,"gns":{"step":2,"b_simple":150.0}}
{"step":2,"batch_change":{"from":64,"to":128,"first_step":3,"b_simple":150.0,"lr_factor":1.5}}
{"step":3,"loss":3.0,"lr":0.15,"samples":256,"batch":128}
{"step":3,"eval":true,"recall@1":0.5}
{"step":4,"gns":{"step":4,"b_simple":300.0}}
{"step":4,"loss":2.5,"lr":0.15,"samples":384,"batch":128}
"#;

    #[test]
    fn series_follow_the_batch_schedule() {
        let s = read_series(METRICS).unwrap();
        assert_eq!(s.loss, vec![(64.0, 4.0), (128.0, 3.5), (256.0, 3.0), (384.0, 2.5)]);
        assert_eq!(s.b_simple, vec![(128.0, 150.0), (384.0, 300.0)]);
        assert_eq!(s.batch, vec![(0.0, 64.0), (128.0, 64.0), (128.0, 128.0), (384.0, 128.0)]);
        // No batch field (older files): step 1's samples are the batch.
        let old = "{\"step\":1,\"loss\":2.0,\"samples\":10}\n{\"step\":3,\"loss\":1.0,\"samples\":30}\n\
                   {\"step\":2,\"gns\":{\"b_simple\":7.0}}\n";
        let s = read_series(old).unwrap();
        assert_eq!(s.b_simple, vec![(20.0, 7.0)]);
        assert!(read_series("{\"step\":1}\n").is_err());
        assert!(read_series("not json\n").is_err());
    }

    #[test]
    fn renders_three_panels_with_curves() {
        let cv = render(&read_series(METRICS).unwrap(), 640, 480, false).unwrap();
        assert_eq!((cv.width, cv.height, cv.rgb.len()), (640, 480, 640 * 480 * 3));
        let count = |c: Color| cv.rgb.chunks_exact(3).filter(|p| *p == c).count();
        for c in [BLUE, ORANGE, GREEN, BLACK] {
            assert!(count(c) > 100, "{c:?}: {} pixels", count(c));
        }
        let png = encode_png(&cv).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
        assert_eq!((dec.info().width, dec.info().height), (640, 480));
        let log = render(&read_series(METRICS).unwrap(), 640, 480, true).unwrap();
        assert!(log.rgb.chunks_exact(3).filter(|p| *p == BLUE).count() > 100);
        assert_ne!(log.rgb, cv.rgb, "the log-scale loss panel differs");
        assert!(render(&Series::default(), 640, 480, true).is_err());
        assert!(render(&read_series(METRICS).unwrap(), 10, 480, false).is_err());
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(format_tick(1500.0), "1.5K");
        assert_eq!(format_tick(2e6), "2M");
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(0.0001), "1E-4");
        assert_eq!(format_tick(-3.0), "-3");
        assert_eq!(format_tick(0.0), "0");
        for s in
            ["1.5K", "2M", "1E-4", "B_SIMPLE (SMOOTHED, LOG)", "EXAMPLES SEEN", "NO DATA", "LOSS"]
        {
            assert!(s.chars().all(|c| c == ' ' || glyph(c).is_some()), "{s}");
        }
    }
}
