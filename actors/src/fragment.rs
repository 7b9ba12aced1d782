//! Fragments: how a long text or a large image is split into overlapping
//! pieces, where each piece sits in the whole ([`Place`]), and how the
//! pieces' answers are merged back. Splitting and merging live side by
//! side so that they cannot drift apart; reading files and counting tokens
//! (I/O) stay with the submitter.
//!
//! Both axes use the same arithmetic ([`windows`]): windows of `size` at a
//! stride of `size - overlap`, the last one aligned to the end, so every
//! position is covered and neighbours overlap by at least `overlap`.

use serde::{Deserialize, Serialize};

/// Where a fragment sits in its parent: a typed field of the job, stored in
/// its own column, so that fan-in never reads it out of a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    /// A window of a text: its tokens, `[start, end)`.
    Tokens([u64; 2]),
    /// A tile of an image.
    Tile(Tile),
}

impl Place {
    /// As stored: `{"tokens":[0,512]}` or `{"tile":{"row":0,…}}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a place serialises")
    }

    /// From its stored form; the error says what is wrong.
    pub fn from_json(text: &str) -> Result<Place, String> {
        serde_json::from_str(text).map_err(|e| {
            format!("`{text}` is not a fragment place ({{\"tokens\":[start,end]}} or {{\"tile\":{{row,col,x,y,width,height}}}}): {e}")
        })
    }
}

/// One tile of an image: its place in the grid and its pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// Overlapping text windows agree on at least this many words where they meet
/// before the repeat is dropped.
pub(crate) const MIN_AGREEING_WORDS: usize = 3;

/// The parent's text from its fragments' answers, given in fragment order
/// (tiles come by row then column, as [`tiles`] makes them): text windows
/// are joined without the words their overlap repeats; tiles and other
/// fragments are joined line by line.
pub(crate) fn merge(parts: &[(Option<Place>, &str)]) -> String {
    let texts: Vec<&str> = parts.iter().map(|(_, t)| *t).collect();
    if parts
        .iter()
        .any(|(p, _)| matches!(p, Some(Place::Tokens(_))))
    {
        merge_overlapping(&texts, MIN_AGREEING_WORDS)
    } else {
        texts.join("\n")
    }
}

/// Joins texts whose ends overlap: where the end of what is merged so far
/// and the start of the next part agree on at least `min_words` words (the
/// longest such run), the repeat is dropped; parts that do not agree are
/// kept whole. Words are split on whitespace and joined by one space.
pub(crate) fn merge_overlapping(parts: &[&str], min_words: usize) -> String {
    let mut merged: Vec<&str> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let words: Vec<&str> = part.split_whitespace().collect();
        let mut skip = 0;
        if i > 0 {
            let max = merged.len().min(words.len());
            for k in (min_words.max(1)..=max).rev() {
                if merged[merged.len() - k..] == words[..k] {
                    skip = k;
                    break;
                }
            }
        }
        merged.extend_from_slice(&words[skip..]);
    }
    merged.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_merged_where_outputs_agree() {
        let parts = [
            "the quick brown fox jumps over",
            "fox jumps over the lazy dog",
            "lazy dog sleeps",
        ];
        assert_eq!(
            merge_overlapping(&parts, 2),
            "the quick brown fox jumps over the lazy dog sleeps"
        );
        // Outputs that do not agree are kept whole.
        assert_eq!(merge_overlapping(&["a b c", "x y z"], 2), "a b c x y z");
    }

    #[test]
    fn text_windows_merge_tiles_join() {
        let w = |a, b| Some(Place::Tokens([a, b]));
        let merged = merge(&[
            (w(0, 6), "one two three four five"),
            (w(3, 9), "three four five six seven"),
        ]);
        assert_eq!(merged, "one two three four five six seven");
        let t = |row, col| {
            Some(Place::Tile(Tile {
                row,
                col,
                x: 0,
                y: 0,
                width: 1,
                height: 1,
            }))
        };
        assert_eq!(
            merge(&[(t(0, 0), "a b c"), (t(0, 1), "a b c")]),
            "a b c\na b c"
        );
    }

    #[test]
    fn a_place_round_trips_through_its_stored_form() {
        for p in crate::testkit::store_contract::sample_places() {
            assert_eq!(Place::from_json(&p.to_json()), Ok(p));
        }
        assert_eq!(Place::Tokens([1, 2]).to_json(), r#"{"tokens":[1,2]}"#);
        let err = Place::from_json(r#"{"tokens":"x"}"#).unwrap_err();
        assert!(err.contains("is not a fragment place"), "{err}");
    }

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
