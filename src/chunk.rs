//! Chunking: long texts into overlapping token windows, large images into
//! overlapping tiles. Each window or tile becomes a fragment of one parent
//! job, completed by fan-in.
//!
//! Both use the same arithmetic along one axis ([`windows`]): windows of
//! `size` at a stride of `size - overlap`, the last one aligned to the end,
//! so every position is covered and neighbours overlap by at least
//! `overlap`.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Why a text or image could not be chunked.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The tokenizer file could not be loaded or used.
    #[error("tokenizer {path}: {message} (check the instance's `tokenizer` key; it must be the model's tokenizer.json)")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The image could not be read, decoded or written.
    #[error("{path}: {message}")]
    Image {
        /// The image (or tile) file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// The `[start, end)` spans covering `len` positions with windows of `size`
/// overlapping by `overlap`: starts at multiples of `size - overlap`, and a
/// last window aligned to the end. A length that fits in one window gives
/// one span `[0, len)`; zero gives none.
pub fn windows(len: usize, size: usize, overlap: usize) -> Vec<(usize, usize)> {
    assert!(
        size > 0 && overlap < size,
        "a window must be larger than its overlap"
    );
    if len == 0 {
        return Vec::new();
    }
    if len <= size {
        return vec![(0, len)];
    }
    let stride = size - overlap;
    let mut out: Vec<(usize, usize)> = (0..)
        .map(|k| k * stride)
        .take_while(|start| start + size < len)
        .map(|start| (start, start + size))
        .collect();
    out.push((len - size, len));
    out
}

/// One tile of an image: its place in the grid and its pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tile {
    /// Row in the grid, from the top.
    pub row: u32,
    /// Column in the grid, from the left.
    pub col: u32,
    /// Left edge in pixels.
    pub x: u32,
    /// Top edge in pixels.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// The tiles covering a `width × height` image, by row then column.
pub fn tiles(width: u32, height: u32, tile: u32, overlap: u32) -> Vec<Tile> {
    let cols = windows(width as usize, tile as usize, overlap as usize);
    let rows = windows(height as usize, tile as usize, overlap as usize);
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    for (r, &(y0, y1)) in rows.iter().enumerate() {
        for (c, &(x0, x1)) in cols.iter().enumerate() {
            out.push(Tile {
                row: r as u32,
                col: c as u32,
                x: x0 as u32,
                y: y0 as u32,
                width: (x1 - x0) as u32,
                height: (y1 - y0) as u32,
            });
        }
    }
    out
}

/// One window of a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextWindow {
    /// First token (inclusive).
    pub token_start: usize,
    /// Last token (exclusive).
    pub token_end: usize,
    /// The window's text.
    pub text: String,
}

/// Splits `text` into windows of `size` tokens overlapping by `overlap`,
/// counted by the tokenizer at `tokenizer`. Windows cut on token boundaries;
/// each window's text is the span of the original text its tokens came
/// from (or, where the tokenizer reports no usable offsets, its tokens
/// decoded).
pub fn text_windows(
    tokenizer: &Path,
    text: &str,
    size: usize,
    overlap: usize,
) -> Result<Vec<TextWindow>, ChunkError> {
    let err = |message: String| ChunkError::Tokenizer {
        path: tokenizer.to_path_buf(),
        message,
    };
    let tk = tokenizers::Tokenizer::from_file(tokenizer)
        .map_err(|e| err(format!("cannot load it: {e}")))?;
    let enc = tk
        .encode(text, false)
        .map_err(|e| err(format!("cannot encode the text: {e}")))?;
    let ids = enc.get_ids();
    let offsets = enc.get_offsets();
    let mut out = Vec::new();
    for (start, end) in windows(ids.len(), size, overlap) {
        let (a, b) = (offsets[start].0, offsets[end - 1].1);
        let sliced =
            (a < b && b <= text.len() && text.is_char_boundary(a) && text.is_char_boundary(b))
                .then(|| text[a..b].to_string());
        let text = match sliced {
            Some(t) => t,
            None => tk
                .decode(&ids[start..end], true)
                .map_err(|e| err(format!("cannot decode tokens {start}..{end}: {e}")))?,
        };
        out.push(TextWindow {
            token_start: start,
            token_end: end,
            text,
        });
    }
    Ok(out)
}

/// The image's dimensions, read from its header.
pub fn image_size(path: &Path) -> Result<(u32, u32), ChunkError> {
    image::image_dimensions(path).map_err(|e| ChunkError::Image {
        path: path.to_path_buf(),
        message: format!("not a readable image ({e}); use PNG, JPEG, WebP or GIF"),
    })
}

/// Cuts the image at `path` into `tiles`, written as PNG files under
/// `out_dir` (`r<row>-c<col>.png`); returns each tile with its file.
pub fn write_tiles(
    path: &Path,
    tiles: &[Tile],
    out_dir: &Path,
) -> Result<Vec<(Tile, PathBuf)>, ChunkError> {
    let img = image::open(path).map_err(|e| ChunkError::Image {
        path: path.to_path_buf(),
        message: format!(
            "cannot decode the image ({e}); it may be corrupt or of an unsupported kind"
        ),
    })?;
    std::fs::create_dir_all(out_dir).map_err(|e| ChunkError::Image {
        path: out_dir.to_path_buf(),
        message: format!("cannot create the tile folder: {e}"),
    })?;
    let mut out = Vec::with_capacity(tiles.len());
    for t in tiles {
        let file = out_dir.join(format!("r{}-c{}.png", t.row, t.col));
        let tmp = out_dir.join(format!(".r{}-c{}.png.tmp", t.row, t.col));
        img.crop_imm(t.x, t.y, t.width, t.height)
            .save_with_format(&tmp, image::ImageFormat::Png)
            .and_then(|()| std::fs::rename(&tmp, &file).map_err(image::ImageError::IoError))
            .map_err(|e| ChunkError::Image {
                path: file.clone(),
                message: format!("cannot write the tile: {e}"),
            })?;
        out.push((*t, file));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_windows(len: usize, size: usize, overlap: usize) {
        let w = windows(len, size, overlap);
        if len == 0 {
            assert!(w.is_empty());
            return;
        }
        let stride = size - overlap;
        // Exactly the windows of the stride, then one aligned to the end.
        if len <= size {
            assert_eq!(w, vec![(0, len)]);
            return;
        }
        let (regular, last) = w.split_at(w.len() - 1);
        for (k, &(s, e)) in regular.iter().enumerate() {
            assert_eq!((s, e), (k * stride, k * stride + size), "len {len}");
            assert!(e < len);
        }
        assert_eq!(
            last[0],
            (len - size, len),
            "the last window is aligned to the end"
        );
        assert_eq!(regular.len(), (len - size).div_ceil(stride), "len {len}");
        // Every position covered; neighbours overlap by at least `overlap`.
        let mut covered = vec![false; len];
        for &(s, e) in &w {
            assert_eq!(e - s, size);
            covered[s..e].iter_mut().for_each(|c| *c = true);
        }
        assert!(covered.iter().all(|&c| c), "len {len}");
        for pair in w.windows(2) {
            assert!(pair[0].1 >= pair[1].0 + overlap, "len {len}: {pair:?}");
            assert!(pair[1].0 > pair[0].0, "len {len}: windows advance");
        }
    }

    #[test]
    fn every_length_up_to_5000_has_the_windows_of_stride_392() {
        for len in 0..=5000 {
            check_windows(len, 512, 120);
        }
    }

    #[test]
    fn random_lengths_and_shapes_keep_the_window_properties() {
        use rand::{Rng, SeedableRng};
        // Shown when the test fails; CHUNK_SEED=N replays a run.
        let seed = std::env::var("CHUNK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        println!("seed {seed} (CHUNK_SEED={seed} replays it)");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..2_000 {
            let size = rng.random_range(2..2000usize);
            let overlap = rng.random_range(0..size);
            let len = rng.random_range(0..20_000usize);
            check_windows(len, size, overlap);
        }
    }

    #[test]
    fn tiles_cover_every_pixel_with_enough_overlap() {
        let sizes = [
            (1, 1),
            (511, 300),
            (512, 512),
            (513, 512),
            (904, 904),
            (905, 1000),
            (1000, 3000),
            (4096, 2731),
            (6000, 17),
        ];
        for (w, h) in sizes {
            let ts = tiles(w, h, 512, 120);
            let cols = windows(w as usize, 512, 120).len();
            let rows = windows(h as usize, 512, 120).len();
            assert_eq!(ts.len(), rows * cols, "{w}x{h}");
            let mut covered = vec![false; (w * h) as usize];
            for t in &ts {
                assert!(t.width <= 512 && t.height <= 512, "{w}x{h}: {t:?}");
                assert!(t.x + t.width <= w && t.y + t.height <= h);
                for y in t.y..t.y + t.height {
                    for x in t.x..t.x + t.width {
                        covered[(y * w + x) as usize] = true;
                    }
                }
            }
            assert!(
                covered.iter().all(|&c| c),
                "{w}x{h}: a pixel is not covered"
            );
            // Row-major order, and neighbours overlap by at least 120 px.
            for pair in ts.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                assert!((a.row, a.col) < (b.row, b.col));
                if a.row == b.row {
                    assert!(a.x + a.width >= b.x + 120);
                }
            }
        }
    }
}
