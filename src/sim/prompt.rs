//! How the simulator turns a chat request into prompt tokens: the tokens'
//! count is what `usage.prompt_tokens` answers and what the engine model
//! computes, and their identity is what its prefix cache matches, so both
//! should be what the real server would see.
//!
//! Without a tokenizer a token is 4 characters of text (rounded up, per
//! part) plus one per message for its role: close enough for the demo and
//! for tests that only need a count that grows with the text.
//!
//! With `--tokenizer tokenizer.json` (the model's own Hugging Face
//! tokenizer) the messages are rendered as the ChatML chat template renders
//! them (`<|im_start|>{role}\n{content}<|im_end|>\n` per message, then the
//! generation prompt `<|im_start|>assistant\n`: the template of the Qwen
//! family and of the test models) and the text is encoded with the
//! tokenizer's special tokens, so that a BOS appears exactly where the
//! model's post-processor puts one — which is where templates that start
//! with `{{ bos_token }}` put it. For the test models this gives vLLM's
//! `usage.prompt_tokens` exactly (`benches/fidelity.rs` checks it). An
//! image part becomes `--image-tokens` tokens of its own between
//! `<|vision_start|>` and `<|vision_end|>`, as Qwen2-VL's template places
//! it; equal images give equal tokens.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Counts prompt tokens, by estimate or with the model's tokenizer.
pub enum Prompts {
    /// A token per 4 characters.
    Estimate,
    /// The model's tokenizer, over the ChatML rendering.
    Tokenizer(Box<tokenizers::Tokenizer>),
}

/// Why `--tokenizer` could not be used.
#[derive(Debug, thiserror::Error)]
#[error("--tokenizer {path}: {message} (give the model's tokenizer.json)")]
pub struct TokenizerError {
    /// The file given.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// A piece of the rendered prompt.
enum Piece<'a> {
    Text(String),
    /// An image part's data URL or address.
    Image(&'a str),
}

impl Prompts {
    /// The tokenizer at `path`, or the estimate without one.
    pub fn load(path: Option<&Path>) -> Result<Prompts, TokenizerError> {
        let Some(path) = path else {
            return Ok(Prompts::Estimate);
        };
        tokenizers::Tokenizer::from_file(path)
            .map(|t| Prompts::Tokenizer(Box::new(t)))
            .map_err(|e| TokenizerError {
                path: path.to_path_buf(),
                message: format!("cannot load it: {e}"),
            })
    }

    /// The prompt of `messages`, each image part counting `image_tokens`.
    pub fn tokens(&self, messages: &[Value], image_tokens: u32) -> Vec<u64> {
        match self {
            Prompts::Estimate => estimate(messages, image_tokens),
            Prompts::Tokenizer(t) => encode(t, &chatml(messages), image_tokens),
        }
    }
}

/// A stable id for a piece of text (estimated tokens and image tokens).
fn token_id(bytes: &[u8], salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `image_tokens` ids standing for the image at `url`.
fn image(url: &str, image_tokens: u32) -> impl Iterator<Item = u64> {
    let image = token_id(url.as_bytes(), 3);
    (0..image_tokens as u64).map(move |i| token_id(&i.to_le_bytes(), image))
}

/// A token per 4 characters of `t`.
fn text(t: &str, out: &mut Vec<u64>) {
    out.extend(t.as_bytes().chunks(4).map(|c| token_id(c, 1)));
}

/// A token per 4 characters of text (per part), one per role.
fn estimate(messages: &[Value], image_tokens: u32) -> Vec<u64> {
    let mut out = Vec::new();
    for m in messages {
        if let Some(role) = m.get("role").and_then(Value::as_str) {
            out.push(token_id(role.as_bytes(), 2));
        }
        match m.get("content") {
            Some(Value::String(s)) => text(s, &mut out),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        text(t, &mut out);
                    }
                    if let Some(u) = p.pointer("/image_url/url").and_then(Value::as_str) {
                        out.extend(image(u, image_tokens));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The messages as ChatML renders them, with the generation prompt.
fn chatml(messages: &[Value]) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut text = String::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        text.push_str("<|im_start|>");
        text.push_str(role);
        text.push('\n');
        match m.get("content") {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                    if let Some(u) = p.pointer("/image_url/url").and_then(Value::as_str) {
                        text.push_str("<|vision_start|>");
                        out.push(Piece::Text(std::mem::take(&mut text)));
                        out.push(Piece::Image(u));
                        text.push_str("<|vision_end|>");
                    }
                }
            }
            _ => {}
        }
        text.push_str("<|im_end|>\n");
    }
    text.push_str("<|im_start|>assistant\n");
    out.push(Piece::Text(text));
    out
}

/// The pieces' tokens: text by the tokenizer (its special tokens, a BOS
/// among them, only in front), images as `image_tokens` ids each.
fn encode(t: &tokenizers::Tokenizer, pieces: &[Piece<'_>], image_tokens: u32) -> Vec<u64> {
    let mut out = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(s) => match t.encode(s.as_str(), out.is_empty()) {
                Ok(enc) => out.extend(enc.get_ids().iter().map(|&i| i as u64)),
                // A text the tokenizer refuses still takes room.
                Err(_) => text(s, &mut out),
            },
            Piece::Image(u) => out.extend(image(u, image_tokens)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_estimate_is_a_token_per_four_characters_and_one_per_role() {
        let m = [json!({"role": "user", "content": "a".repeat(400)})];
        assert_eq!(Prompts::Estimate.tokens(&m, 0).len(), 101);
        let m = [json!({"role": "user", "content": [
            {"type": "text", "text": "abcde"},
            {"type": "image_url", "image_url": {"url": "data:x"}},
        ]})];
        assert_eq!(Prompts::Estimate.tokens(&m, 10).len(), 1 + 2 + 10);
    }

    #[test]
    fn chatml_puts_each_message_between_its_markers() {
        let m = [
            json!({"role": "system", "content": "S"}),
            json!({"role": "user", "content": [
                {"type": "text", "text": "T"},
                {"type": "image_url", "image_url": {"url": "u"}},
                {"type": "text", "text": "V"},
            ]}),
        ];
        let pieces = chatml(&m);
        let shown: Vec<String> = pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.clone(),
                Piece::Image(u) => format!("[{u}]"),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nT<|vision_start|>",
                "[u]",
                "<|vision_end|>V<|im_end|>\n<|im_start|>assistant\n",
            ]
        );
    }
}
