//! The record of a training run: one row per epoch, written as `metrics.csv` and drawn as
//! `metrics.png` (losses on the left, held-out accuracy on the right).

use crate::commands::{user, write_atomically, Failure};
use std::path::Path;

/// One epoch's numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub epoch: usize,
    /// Optimizer steps taken by the epoch's end.
    pub step: u64,
    /// The mean of the epoch's step losses.
    pub train_loss: f64,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    /// The learning rate of the epoch's last step.
    pub lr: f64,
    /// Wall-clock seconds since training began (resumed runs continue the count).
    pub seconds: f64,
}

pub const HEADER: &str = "epoch,step,train_loss,eval_loss,eval_accuracy,lr,seconds";

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v}")).unwrap_or_default()
}

pub fn csv(rows: &[Row]) -> String {
    let mut out = format!("{HEADER}\n");
    for r in rows {
        out += &format!(
            "{},{},{},{},{},{},{:.3}\n",
            r.epoch,
            r.step,
            r.train_loss,
            opt(r.eval_loss),
            opt(r.eval_accuracy),
            r.lr,
            r.seconds
        );
    }
    out
}

/// The rows of a `metrics.csv` this command wrote; `None` when the text is not one.
pub fn parse_csv(text: &str) -> Option<Vec<Row>> {
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let num = |s: &str| -> Option<Option<f64>> {
        if s.is_empty() {
            Some(None)
        } else {
            s.parse().ok().map(Some)
        }
    };
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() != 7 {
                return None;
            }
            Some(Row {
                epoch: f[0].parse().ok()?,
                step: f[1].parse().ok()?,
                train_loss: f[2].parse().ok()?,
                eval_loss: num(f[3])?,
                eval_accuracy: num(f[4])?,
                lr: f[5].parse().ok()?,
                seconds: f[6].parse().ok()?,
            })
        })
        .collect()
}

/// Writes `metrics.csv` and `metrics.png` into `dir`.
pub fn write(dir: &Path, rows: &[Row]) -> Result<(), Failure> {
    let text = csv(rows);
    let csv_path = dir.join("metrics.csv");
    write_atomically(&csv_path, |tmp| {
        std::fs::write(tmp, text.as_bytes())
            .map_err(|e| user(format!("cannot write {}: {e}", csv_path.display())))
    })?;
    let png_path = dir.join("metrics.png");
    let png = plot(rows)?;
    write_atomically(&png_path, |tmp| {
        std::fs::write(tmp, &png).map_err(|e| user(format!("cannot write {}: {e}", png_path.display())))
    })
}

const WIDTH: usize = 960;
const HEIGHT: usize = 360;
const TRAIN: [u8; 3] = [31, 119, 180];
const EVAL: [u8; 3] = [255, 127, 14];
const ACCURACY: [u8; 3] = [44, 160, 44];
const AXIS: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [225, 225, 225];

/// An RGB image to draw lines and text on.
struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas { px: vec![255; WIDTH * HEIGHT * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line `width` pixels thick between two points.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), width: i64, c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            for dx in 0..width {
                for dy in 0..width {
                    self.set(x + dx - width / 2, y + dy - width / 2, c);
                }
            }
        }
    }

    /// Text in a 5×7 pixel font, scaled by 2, its top left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + k as i64 * 12 + col * 2 + dx, y + r as i64 * 2 + dy, c);
                        }
                    }
                }
            }
        }
    }

    fn png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(&self.px)?;
        w.finish()?;
        Ok(out)
    }
}

/// A panel: its pixel box and the value ranges it maps.
struct Panel {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    epochs: f64,
    lo: f64,
    hi: f64,
}

impl Panel {
    fn at(&self, epoch: f64, v: f64) -> (f64, f64) {
        let x = self.left + self.width * (epoch / self.epochs);
        let y = self.top + self.height * (1.0 - (v - self.lo) / (self.hi - self.lo));
        (x, y)
    }

    fn frame(&self, c: &mut Canvas, title: &str, ticks: &[(f64, String)]) {
        for (v, label) in ticks {
            let (_, y) = self.at(0.0, *v);
            c.line((self.left, y), (self.left + self.width, y), 1, GRID);
            c.text(self.left as i64 - 12 * label.len() as i64 - 6, y as i64 - 7, label, AXIS);
        }
        let (l, t, r, b) = (self.left, self.top, self.left + self.width, self.top + self.height);
        for (p, q) in [((l, t), (r, t)), ((r, t), (r, b)), ((r, b), (l, b)), ((l, b), (l, t))] {
            c.line(p, q, 1, AXIS);
        }
        c.text(l as i64, t as i64 - 22, title, AXIS);
        let last = format!("{}", self.epochs as usize);
        c.text(l as i64 - 6, b as i64 + 8, "0", AXIS);
        c.text(r as i64 - 12 * last.len() as i64 + 6, b as i64 + 8, &last, AXIS);
        c.text(((l + r) / 2.0) as i64 - 30, b as i64 + 8, "epoch", AXIS);
    }

    fn curve(&self, c: &mut Canvas, points: &[(f64, f64)], color: [u8; 3]) {
        let pts: Vec<(f64, f64)> =
            points.iter().filter(|(_, v)| v.is_finite()).map(|&(e, v)| self.at(e, v)).collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], 2, color);
        }
        for &(x, y) in &pts {
            c.line((x - 2.0, y), (x + 2.0, y), 2, color);
        }
    }
}

/// The plot as PNG bytes: training and held-out loss per epoch on the left, held-out
/// accuracy (0 to 100 %) on the right.
fn plot(rows: &[Row]) -> Result<Vec<u8>, Failure> {
    let mut c = Canvas::new();
    let epochs = rows.iter().map(|r| r.epoch).max().unwrap_or(1).max(1) as f64;
    let train: Vec<(f64, f64)> = rows.iter().map(|r| (r.epoch as f64, r.train_loss)).collect();
    let eval: Vec<(f64, f64)> =
        rows.iter().filter_map(|r| r.eval_loss.map(|v| (r.epoch as f64, v))).collect();
    let acc: Vec<(f64, f64)> =
        rows.iter().filter_map(|r| r.eval_accuracy.map(|v| (r.epoch as f64, v))).collect();
    let hi = train.iter().chain(&eval).map(|p| p.1).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let hi = if hi > 0.0 { hi * 1.05 } else { 1.0 };
    let loss = Panel { left: 90.0, top: 40.0, width: 360.0, height: 270.0, epochs, lo: 0.0, hi };
    let ticks: Vec<(f64, String)> =
        (0..=4).map(|i| (hi * i as f64 / 4.0, short(hi * i as f64 / 4.0))).collect();
    loss.frame(&mut c, "loss", &ticks);
    loss.curve(&mut c, &train, TRAIN);
    loss.curve(&mut c, &eval, EVAL);
    c.text(250, 18, "train", TRAIN);
    c.text(330, 18, "eval", EVAL);
    let accuracy = Panel { left: 570.0, top: 40.0, width: 360.0, height: 270.0, epochs, lo: 0.0, hi: 1.0 };
    let ticks: Vec<(f64, String)> = (0..=4).map(|i| (i as f64 / 4.0, format!("{}%", i * 25))).collect();
    accuracy.frame(&mut c, "eval accuracy", &ticks);
    accuracy.curve(&mut c, &acc, ACCURACY);
    c.png().map_err(|e| user(format!("cannot encode the metrics plot: {e}")))
}

/// A tick label of at most five characters.
fn short(v: f64) -> String {
    match v {
        0.0 => "0".into(),
        v if v >= 100.0 => format!("{v:.0}"),
        v if v >= 10.0 => format!("{v:.1}"),
        v if v >= 0.01 => format!("{v:.2}"),
        v => format!("{v:.0e}"),
    }
}

/// The 5×7 glyph of `ch` (rows top to bottom, bit 4 the leftmost pixel); characters
/// the plot does not use draw as blanks.
fn glyph(ch: char) -> [u8; 7] {
    match ch {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        '.' => [0, 0, 0, 0, 0, 0x0c, 0x0c],
        '-' => [0, 0, 0, 0x1f, 0, 0, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        'a' => [0, 0, 0x0e, 0x01, 0x0f, 0x11, 0x0f],
        'c' => [0, 0, 0x0e, 0x10, 0x10, 0x11, 0x0e],
        'e' => [0, 0, 0x0e, 0x11, 0x1f, 0x10, 0x0e],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0c, 0x04, 0x04, 0x04, 0x0e],
        'l' => [0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0e, 0x11, 0x11, 0x11, 0x0e],
        'p' => [0, 0, 0x1e, 0x11, 0x1e, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0e, 0x10, 0x0e, 0x01, 0x1e],
        't' => [0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0d],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0a, 0x04],
        'y' => [0, 0, 0x11, 0x11, 0x0f, 0x01, 0x0e],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_the_csv() {
        let rows = vec![
            Row {
                epoch: 1,
                step: 44,
                train_loss: 0.5,
                eval_loss: Some(0.25),
                eval_accuracy: Some(0.9),
                lr: 1e-3,
                seconds: 1.25,
            },
            Row {
                epoch: 2,
                step: 88,
                train_loss: 0.125,
                eval_loss: None,
                eval_accuracy: None,
                lr: 5e-4,
                seconds: 2.5,
            },
        ];
        let text = csv(&rows);
        assert_eq!(
            text,
            "epoch,step,train_loss,eval_loss,eval_accuracy,lr,seconds\n1,44,0.5,0.25,0.9,0.001,1.250\n2,88,0.125,,,0.0005,2.500\n"
        );
        assert_eq!(parse_csv(&text), Some(rows));
        assert_eq!(parse_csv("a,b\n"), None);
    }
}
