//! Chunking: long texts into overlapping token windows, large images into
//! overlapping tiles. Each window or tile becomes a fragment of one parent
//! job, completed by fan-in.
//!
//! The arithmetic (windows, tiles) and the merging of the answers live in
//! `feeder_actors::fragment`, side by side; this module does the I/O:
//! counting tokens with the model's tokenizer, reading and cutting images.

use std::path::{Path, PathBuf};

pub use feeder_actors::fragment::{tiles, windows, Tile};

/// Image types a vision payload may carry, by extension, with their MIME type.
pub const IMAGE_TYPES: &[(&str, &str)] = &[
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("webp", "image/webp"),
    ("gif", "image/gif"),
];

/// The MIME type of an image path, by extension.
pub fn image_mime(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    IMAGE_TYPES.iter().find(|(e, _)| *e == ext).map(|(_, m)| *m)
}

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
