//! `thumbnail`: a blob-triggered function that shrinks binary netpbm images
//! (P6 colour PPM, P5 grey PGM) by 4 in each dimension.
//!
//! The blob arrives as base64 in the event's `Data`; the thumbnail goes to the
//! `thumbnail` blob output binding as `{"base64": ...}`, in the input's
//! format. Netpbm because it needs no codec: the point is the trigger and
//! binding plumbing, not image decoding.

use std::io::Read;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// Each output pixel averages a `FACTOR` x `FACTOR` block of input pixels.
const FACTOR: usize = 4;

fn main() {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        fail(format_args!("reading the event: {e}"));
    }
    let event: Value = match serde_json::from_slice(&input) {
        Ok(event) => event,
        Err(e) => fail(format_args!("the event is not JSON: {e}")),
    };
    // Name the blob in every failure: a poison-queue entry should say which
    // upload was bad without digging through the event.
    let name = event["Metadata"]["Path"]
        .as_str()
        .or_else(|| event["Metadata"]["Name"].as_str())
        .unwrap_or("the blob")
        .to_owned();
    let Some(data) = event["Data"].as_str() else {
        fail(format_args!(
            "{name}: the event's Data is not a base64 string; is this a blob trigger?"
        ));
    };
    let bytes = match STANDARD.decode(data) {
        Ok(bytes) => bytes,
        Err(e) => fail(format_args!("{name}: Data is not valid base64: {e}")),
    };
    let image = match Image::decode(&bytes) {
        Ok(image) => image,
        Err(e) => fail(format_args!("{name}: {e}")),
    };
    let small = image.downscale();
    let envelope = json!({
        "Outputs": {"thumbnail": {"base64": STANDARD.encode(small.encode())}},
        "Logs": [format!(
            "{}x{} -> {}x{}",
            image.width, image.height, small.width, small.height
        )],
    });
    println!("{envelope}");
}

/// Logs why and ends the invocation as failed (Kelvin retries, then moves
/// the event to the poison queue).
fn fail(reason: impl std::fmt::Display) -> ! {
    eprintln!("thumbnail: {reason}");
    std::process::exit(1)
}

/// The two binary netpbm formats handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// P5: one grey sample per pixel.
    Pgm,
    /// P6: red, green, blue samples per pixel.
    Ppm,
}

impl Format {
    fn channels(self) -> usize {
        match self {
            Format::Pgm => 1,
            Format::Ppm => 3,
        }
    }

    fn magic(self) -> &'static str {
        match self {
            Format::Pgm => "P5",
            Format::Ppm => "P6",
        }
    }
}

/// A netpbm header and where its raster starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    format: Format,
    width: usize,
    height: usize,
    maxval: u8,
    /// Offset of the first raster byte.
    raster: usize,
}

/// Netpbm's whitespace is C's `isspace`, which includes vertical tab (unlike
/// `u8::is_ascii_whitespace`).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Parses a binary netpbm header: magic, then width, height and maxval as
/// decimals, each preceded by whitespace and `#` comments, then exactly one
/// whitespace byte (anything after it, even more whitespace, is raster).
fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    let format = match bytes {
        [b'P', b'5', ..] => Format::Pgm,
        [b'P', b'6', ..] => Format::Ppm,
        [b'P', d @ b'1'..=b'7', ..] => {
            return Err(format!(
                "P{} netpbm images are not supported, only binary P5 (PGM) and P6 (PPM)",
                *d as char
            ));
        }
        _ => return Err("not a netpbm image (no P5 or P6 magic number)".into()),
    };
    let mut pos = 2;
    let width = field(bytes, &mut pos, "width")?;
    let height = field(bytes, &mut pos, "height")?;
    let maxval = field(bytes, &mut pos, "maxval")?;
    match bytes.get(pos) {
        Some(&b) if is_space(b) => pos += 1,
        Some(_) => return Err("maxval must be followed by exactly one whitespace byte".into()),
        None => return Err("the header ends before the raster".into()),
    }
    if width == 0 || height == 0 {
        return Err(format!("empty image ({width}x{height})"));
    }
    let maxval = match maxval {
        1..=255 => maxval as u8,
        0 => return Err("maxval 0 is invalid".into()),
        _ => {
            return Err(format!(
                "maxval {maxval} means 16-bit samples, which are not supported (at most 255)"
            ));
        }
    };
    Ok(Header {
        format,
        width,
        height,
        maxval,
        raster: pos,
    })
}

/// Skips the whitespace and comments before a header number (at least one
/// byte of them: `P65` or `3x2` are not headers), then parses it.
fn field(bytes: &[u8], pos: &mut usize, what: &str) -> Result<usize, String> {
    let start = *pos;
    while let Some(&b) = bytes.get(*pos) {
        if is_space(b) {
            *pos += 1;
        } else if b == b'#' {
            // A comment runs to the end of its line; the line end itself is
            // whitespace, skipped on the next turn.
            while bytes.get(*pos).is_some_and(|&b| b != b'\n' && b != b'\r') {
                *pos += 1;
            }
        } else {
            break;
        }
    }
    match bytes.get(*pos) {
        None => return Err(format!("the header ends before the {what}")),
        Some(_) if *pos == start => {
            return Err(format!("no whitespace before the {what}"));
        }
        Some(b) if !b.is_ascii_digit() => {
            return Err(format!("the {what} is not a decimal number"));
        }
        Some(_) => {}
    }
    let mut n: usize = 0;
    while let Some(&b) = bytes.get(*pos).filter(|b| b.is_ascii_digit()) {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(b - b'0')))
            .ok_or_else(|| format!("the {what} is too large"))?;
        *pos += 1;
    }
    Ok(n)
}

/// A decoded image: `pixels` holds `width * height * channels` samples, row
/// by row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Image {
    format: Format,
    width: usize,
    height: usize,
    maxval: u8,
    pixels: Vec<u8>,
}

impl Image {
    /// Decodes the first image in `bytes`. Trailing bytes are ignored: netpbm
    /// files may hold several images back to back.
    fn decode(bytes: &[u8]) -> Result<Image, String> {
        let h = parse_header(bytes)?;
        let len = h
            .width
            .checked_mul(h.height)
            .and_then(|n| n.checked_mul(h.format.channels()))
            .ok_or_else(|| format!("{}x{} is too large", h.width, h.height))?;
        let raster = &bytes[h.raster..];
        if raster.len() < len {
            return Err(format!(
                "truncated raster: a {}x{} {} needs {len} bytes, found {}",
                h.width,
                h.height,
                h.format.magic(),
                raster.len()
            ));
        }
        Ok(Image {
            format: h.format,
            width: h.width,
            height: h.height,
            maxval: h.maxval,
            pixels: raster[..len].to_vec(),
        })
    }

    /// Shrinks by `FACTOR` in each dimension with a box filter: each output
    /// sample is the rounded mean of its block. Blocks at the right and
    /// bottom edges may be smaller and average what they hold, so every
    /// input pixel counts and the output is at least 1x1.
    fn downscale(&self) -> Image {
        let c = self.format.channels();
        let width = self.width.div_ceil(FACTOR);
        let height = self.height.div_ceil(FACTOR);
        let mut pixels = Vec::with_capacity(width * height * c);
        for by in 0..height {
            let rows = by * FACTOR..((by + 1) * FACTOR).min(self.height);
            for bx in 0..width {
                let cols = bx * FACTOR..((bx + 1) * FACTOR).min(self.width);
                let n = (rows.len() * cols.len()) as u32;
                for ch in 0..c {
                    let mut sum = 0u32;
                    for y in rows.clone() {
                        for x in cols.clone() {
                            sum += u32::from(self.pixels[(y * self.width + x) * c + ch]);
                        }
                    }
                    // Round half up; the mean never exceeds maxval.
                    pixels.push(((sum + n / 2) / n) as u8);
                }
            }
        }
        Image {
            format: self.format,
            width,
            height,
            maxval: self.maxval,
            pixels,
        }
    }

    /// The netpbm file: a minimal header, then the raster.
    fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "{}\n{} {}\n{}\n",
            self.format.magic(),
            self.width,
            self.height,
            self.maxval
        )
        .into_bytes();
        out.extend_from_slice(&self.pixels);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> Header {
        parse_header(bytes).unwrap()
    }

    #[test]
    fn parses_a_plain_header() {
        let h = header(b"P6\n3 2\n255\nrest");
        assert_eq!(
            h,
            Header {
                format: Format::Ppm,
                width: 3,
                height: 2,
                maxval: 255,
                raster: 11,
            }
        );
        assert_eq!(header(b"P5 1 1 15 x").format, Format::Pgm);
    }

    #[test]
    fn skips_comments_and_any_whitespace_between_fields() {
        let bytes = b"P5# made by hand\r\n\t4#w\n\x0b 4 # h\n\x0c255\n";
        let h = header(bytes);
        assert_eq!((h.width, h.height, h.maxval), (4, 4, 255));
        assert_eq!(h.raster, bytes.len());
    }

    #[test]
    fn exactly_one_whitespace_byte_ends_the_header() {
        // The second newline is the first raster byte (a sample of 10).
        let image = Image::decode(b"P5 1 1 255\n\n").unwrap();
        assert_eq!(image.pixels, vec![b'\n']);
    }

    #[test]
    fn rejects_bad_headers() {
        let err = |bytes: &[u8]| parse_header(bytes).unwrap_err();
        assert!(err(b"GIF89a").contains("not a netpbm"));
        assert!(err(b"").contains("not a netpbm"));
        assert!(err(b"P3\n1 1\n255\n").contains("P3"));
        assert!(err(b"P61 1 255\n").contains("whitespace"));
        assert!(err(b"P6 1x1 255\n").contains("whitespace"));
        assert!(err(b"P6 1 -1 255\n").contains("height"));
        assert!(err(b"P6 1 1 256\n").contains("maxval 256"));
        assert!(err(b"P5 1 1 65535\n").contains("16-bit"));
        assert!(err(b"P5 1 1 0\n").contains("maxval 0"));
        assert!(err(b"P5 0 1 255\n").contains("empty"));
        assert!(err(b"P5 1 1 255").contains("ends before the raster"));
        assert!(err(b"P5 1 1 255#c\n").contains("exactly one whitespace"));
        assert!(err(b"P5 1 # no end").contains("height"));
        assert!(err(b"P5 99999999999999999999999 1 255\n").contains("too large"));
    }

    #[test]
    fn rejects_a_truncated_raster() {
        let mut bytes = b"P6 2 2 255\n".to_vec();
        bytes.extend_from_slice(&[0; 11]);
        let err = Image::decode(&bytes).unwrap_err();
        assert!(err.contains("needs 12 bytes, found 11"), "{err}");
        bytes.extend_from_slice(&[0; 2]);
        assert_eq!(Image::decode(&bytes).unwrap().pixels.len(), 12);
    }

    fn pgm(width: usize, height: usize, pixel: impl Fn(usize, usize) -> u8) -> Image {
        let pixels = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .map(|(x, y)| pixel(x, y))
            .collect();
        Image {
            format: Format::Pgm,
            width,
            height,
            maxval: 255,
            pixels,
        }
    }

    #[test]
    fn an_8x8_image_averages_into_2x2() {
        let image = pgm(8, 8, |x, y| match (x / 4, y / 4) {
            (0, 0) => 10,
            // Alternating 0 and 255: a mean of 127.5 rounds up.
            (1, 0) => {
                if (x + y) % 2 == 0 {
                    0
                } else {
                    255
                }
            }
            // 0..=15 once each: a mean of 7.5.
            (0, 1) => ((y - 4) * 4 + x) as u8,
            _ => 200,
        });
        let small = image.downscale();
        assert_eq!((small.width, small.height), (2, 2));
        assert_eq!(small.pixels, vec![10, 128, 8, 200]);
    }

    #[test]
    fn a_5x5_image_gives_2x2_from_its_edge_blocks() {
        // PPM: red is the value, green half of it, blue its complement.
        let value = |x: usize, y: usize| match (x, y) {
            (4, 4) => 7u8,
            (4, _) => 50,
            (_, 4) => 30,
            _ => 100,
        };
        let pixels = (0..5)
            .flat_map(|y| (0..5).map(move |x| value(x, y)))
            .flat_map(|v| [v, v / 2, 255 - v])
            .collect();
        let image = Image {
            format: Format::Ppm,
            width: 5,
            height: 5,
            maxval: 255,
            pixels,
        };
        let small = image.downscale();
        assert_eq!((small.width, small.height), (2, 2));
        assert_eq!(
            small.pixels,
            vec![100, 50, 155, 50, 25, 205, 30, 15, 225, 7, 3, 248]
        );
    }

    #[test]
    fn tiny_images_still_give_one_pixel() {
        let small = pgm(3, 1, |x, _| x as u8 * 3).downscale();
        assert_eq!((small.width, small.height, small.pixels), (1, 1, vec![3]));
    }

    #[test]
    fn encodes_in_the_input_format_and_decodes_back() {
        let image = Image {
            format: Format::Ppm,
            width: 2,
            height: 1,
            maxval: 100,
            pixels: vec![1, 2, 3, 4, 5, 6],
        };
        let bytes = image.encode();
        assert!(bytes.starts_with(b"P6\n2 1\n100\n"));
        assert_eq!(Image::decode(&bytes).unwrap(), image);
    }
}
