//! Turning what a user hands to `submit` (a payload file, a prompt, an image,
//! a JSONL file) into jobs, with the checks that keep bad input out of the
//! queue: payloads are JSON objects the dispatcher can send, and every file
//! the daemon will read lies under one of `queue.payload_roots`. Every
//! frontend parses into one [`SubmitRequest`], under one set of rules.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use feeder_actors::fragment::Place;
use feeder_actors::{ModelType, NewJob, Payload};

use crate::chunk::{self, image_mime, ChunkError, IMAGE_TYPES};

mod request;

use crate::config::ChunkConfig;
pub use request::{Built, Input, SubmitRequest, MAX_ATTEMPTS};

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file lies outside every payload root.
    #[error("{path} is outside the payload roots ({roots}): move it under one of them, or add its folder to queue.payload_roots")]
    OutsideRoots {
        /// The file (resolved).
        path: PathBuf,
        /// The roots in force.
        roots: String,
    },
    /// A payload that the dispatcher could not turn into a request.
    #[error("{place}: {reason}")]
    BadPayload {
        /// The file, or the file and line.
        place: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A text or image that could not be chunked.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

/// What a submission becomes: one job, or a parent with its fragments.
#[derive(Debug, Clone)]
pub enum Submission {
    /// An ordinary job.
    Single(NewJob),
    /// A parent that completes by fan-in, and its fragments in order.
    Parent {
        /// The parent.
        parent: NewJob,
        /// The fragments.
        fragments: Vec<NewJob>,
    },
}

impl Submission {
    /// Queues it in one transaction: the job, or the parent with its
    /// fragments. The one way the CLI and the MCP server store what they
    /// were given (the admin endpoint goes through the running queue
    /// actor, which also wakes the dispatchers). Also says how many
    /// fragments there are, for a parent.
    pub async fn store(
        self,
        store: &dyn feeder_actors::JobStore,
        now: feeder_actors::Timestamp,
    ) -> feeder_actors::StoreResult<(feeder_actors::Submitted, Option<usize>)> {
        match self {
            Submission::Single(job) => Ok((store.submit(job, now).await?, None)),
            Submission::Parent { parent, fragments } => {
                let n = fragments.len();
                Ok((store.submit_parent(parent, fragments, now).await?, Some(n)))
            }
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Builds jobs for one model, checking paths against the payload roots.
#[derive(Debug, Clone)]
pub struct Submitter {
    model: ModelType,
    roots: Vec<PathBuf>,
    priority: i64,
    max_attempts: u32,
    then: Option<ModelType>,
}

impl Submitter {
    /// A submitter for `model` whose files must lie under `roots`
    /// (folders that do not exist are ignored).
    pub fn new(model: ModelType, roots: &[PathBuf], priority: i64, max_attempts: u32) -> Self {
        let roots = roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .collect();
        Submitter {
            model,
            roots,
            priority,
            max_attempts,
            then: None,
        }
    }

    /// Jobs (or parents) made by this submitter create a follow-up job for
    /// `then` when they are done.
    pub fn then(mut self, then: Option<ModelType>) -> Self {
        self.then = then;
        self
    }

    fn job(&self, payload: Payload, sha: String) -> NewJob {
        let mut job = NewJob::new(self.model, payload, sha);
        job.priority = self.priority;
        job.max_attempts = Some(self.max_attempts);
        job.then_model = self.then;
        job
    }

    /// A fragment: like a job, but never the one that starts a next stage.
    fn fragment(&self, payload: serde_json::Value, place: Place) -> NewJob {
        let mut job = self.inline(payload);
        job.then_model = None;
        job.place = Some(place);
        job
    }

    /// The text file at `path` split into windows of `chunk.tokens` tokens
    /// overlapping by `chunk.overlap`, counted by the tokenizer at
    /// `tokenizer`: a parent with one fragment per window, or a single job
    /// when the text fits in one window.
    pub fn chunked_text(
        &self,
        path: &Path,
        tokenizer: &Path,
        chunk: &ChunkConfig,
    ) -> Result<Submission, SubmitError> {
        let text = std::fs::read_to_string(path).map_err(|source| SubmitError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if text.trim().is_empty() {
            return Err(SubmitError::BadPayload {
                place: path.display().to_string(),
                reason: "the file is empty".into(),
            });
        }
        let windows = chunk::text_windows(
            tokenizer,
            &text,
            chunk.tokens as usize,
            chunk.overlap as usize,
        )?;
        if windows.len() <= 1 {
            return self.prompt(&text).map(Submission::Single);
        }
        let tokens = windows.last().map_or(0, |w| w.token_end);
        let mut hasher = Sha256::new();
        hasher.update(format!("text\0{}\0{}\0", chunk.tokens, chunk.overlap));
        hasher.update(text.as_bytes());
        let parent_payload = serde_json::json!({
            "chunked_text": {
                "path": std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
                "tokens": tokens,
                "windows": windows.len(),
                "window_tokens": chunk.tokens,
                "overlap_tokens": chunk.overlap,
            }
        });
        let parent = self.job(
            Payload::Inline(parent_payload.to_string()),
            hex::encode(hasher.finalize()),
        );
        let fragments = windows
            .iter()
            .map(|w| {
                let tokens = [w.token_start as u64, w.token_end as u64];
                self.fragment(
                    serde_json::json!({ "prompt": w.text }),
                    Place::Tokens(tokens),
                )
            })
            .collect();
        Ok(Submission::Parent { parent, fragments })
    }

    /// The image at `path` for a vision model: a single job, or — when its
    /// file is larger than `chunk.image_max_bytes` or a side is longer than
    /// `chunk.image_max_px` — a parent with one fragment per tile, the tiles
    /// written as PNG under `stage_dir/tiles/`.
    pub fn image_or_tiles(
        &self,
        path: &Path,
        chunk: &ChunkConfig,
        stage_dir: &Path,
    ) -> Result<Submission, SubmitError> {
        let (real, bytes) = self.read_image(path)?;
        let (width, height) = chunk::image_size(&real)?;
        let big = bytes.len() as u64 > chunk.image_max_bytes
            || width > chunk.image_max_px
            || height > chunk.image_max_px;
        if !big {
            return self.image(&real).map(Submission::Single);
        }
        let image_sha = hex::encode(Sha256::digest(&bytes));
        let tiles = chunk::tiles(width, height, chunk.tile_px, chunk.tile_overlap_px);
        let out_dir = stage_dir.join("tiles").join(&image_sha[..24]);
        let written = chunk::write_tiles(&real, &tiles, &out_dir)?;
        if let Some((_, first)) = written.first() {
            self.check_root(first).map_err(|_| SubmitError::BadPayload {
                place: "--image".into(),
                reason: format!(
                    "tiles are written under queue.stage_dir ({}), which is not one of queue.payload_roots: add it to them",
                    stage_dir.display()
                ),
            })?;
        }
        let parent_payload = serde_json::json!({
            "tiled_image": {
                "image_path": real,
                "width": width,
                "height": height,
                "tiles": written.len(),
                "tile_px": chunk.tile_px,
                "overlap_px": chunk.tile_overlap_px,
            }
        });
        let sha = hex::encode(Sha256::digest(format!(
            "tiles\0{}\0{}\0{image_sha}",
            chunk.tile_px, chunk.tile_overlap_px
        )));
        let parent = self.job(Payload::Inline(parent_payload.to_string()), sha);
        let fragments = written
            .iter()
            .map(|(t, file)| {
                self.fragment(serde_json::json!({ "image_path": file }), Place::Tile(*t))
            })
            .collect();
        Ok(Submission::Parent { parent, fragments })
    }

    /// Resolves `path` and checks that it lies under a payload root.
    pub fn check_root(&self, path: &Path) -> Result<PathBuf, SubmitError> {
        let real = std::fs::canonicalize(path).map_err(|source| SubmitError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if self.roots.iter().any(|root| real.starts_with(root)) {
            Ok(real)
        } else {
            let roots = if self.roots.is_empty() {
                "none of them exists".to_string()
            } else {
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Err(SubmitError::OutsideRoots { path: real, roots })
        }
    }

    /// A job whose payload is the JSON file at `path` (read by the daemon
    /// when it sends the job; hashed now for idempotence).
    pub fn payload_file(&self, path: &Path) -> Result<NewJob, SubmitError> {
        let real = self.check_root(path)?;
        let bytes = std::fs::read(&real).map_err(|source| SubmitError::Read {
            path: real.clone(),
            source,
        })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| SubmitError::BadPayload {
            place: real.display().to_string(),
            reason: format!("not valid JSON ({e})"),
        })?;
        self.validate(&value, &real.display().to_string())?;
        let mut job = self.job(Payload::File(real), sha256_hex(&bytes));
        job.prefix_key = feeder_actors::prefix::prefix_key(&value);
        Ok(job)
    }

    /// A job asking `text` as a user message.
    pub fn prompt(&self, text: &str) -> Result<NewJob, SubmitError> {
        if text.trim().is_empty() {
            return Err(SubmitError::BadPayload {
                place: "--prompt".into(),
                reason: "the prompt is empty".into(),
            });
        }
        let mut obj = Map::new();
        obj.insert("prompt".into(), Value::String(text.to_string()));
        Ok(self.inline(Value::Object(obj)))
    }

    /// A job asking for the text of the file at `path` as a prompt.
    pub fn text_file(&self, path: &Path) -> Result<NewJob, SubmitError> {
        let text = std::fs::read_to_string(path).map_err(|source| SubmitError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.prompt(&text).map_err(|_| SubmitError::BadPayload {
            place: path.display().to_string(),
            reason: "the file is empty".into(),
        })
    }

    /// A vision job for the image at `path`, with the model's OCR prompt.
    /// Idempotent on the image's content, wherever it lies.
    pub fn image(&self, path: &Path) -> Result<NewJob, SubmitError> {
        let (real, bytes) = self.read_image(path)?;
        let mut obj = Map::new();
        obj.insert(
            "image_path".into(),
            Value::String(real.to_string_lossy().into_owned()),
        );
        let mut hasher = Sha256::new();
        hasher.update(b"image\0");
        hasher.update(&bytes);
        let sha = hex::encode(hasher.finalize());
        let mut job = self.job(Payload::Inline(Value::Object(obj).to_string()), sha);
        // Questions about one image share it, wherever its file lies.
        job.prefix_key = Some(feeder_actors::prefix::image_key(&bytes));
        Ok(job)
    }

    /// One job per non-empty line of the JSONL file at `path`, each line a
    /// payload object. Any bad line refuses the whole file, naming the line.
    pub fn jsonl(&self, path: &Path) -> Result<Vec<NewJob>, SubmitError> {
        let file = std::fs::File::open(path).map_err(|source| SubmitError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut jobs = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| SubmitError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let place = format!("{} line {}", path.display(), i + 1);
            let value: Value =
                serde_json::from_str(&line).map_err(|e| SubmitError::BadPayload {
                    place: place.clone(),
                    reason: format!("not valid JSON ({e})"),
                })?;
            let value = self.validate(&value, &place)?;
            jobs.push(self.inline(value));
        }
        if jobs.is_empty() {
            return Err(SubmitError::BadPayload {
                place: path.display().to_string(),
                reason: "holds no payload lines".into(),
            });
        }
        Ok(jobs)
    }

    /// An inline job from a payload already checked by `validate`.
    pub fn inline_job(&self, payload: Value) -> NewJob {
        self.inline(payload)
    }

    /// An inline job, hashed over its canonical JSON (keys sorted).
    fn inline(&self, value: Value) -> NewJob {
        let text = value.to_string();
        let sha = sha256_hex(text.as_bytes());
        self.job(Payload::Inline(text), sha)
    }

    fn require_vision(&self, what: &str) -> Result<(), SubmitError> {
        if self.model == ModelType::Vision {
            Ok(())
        } else {
            Err(SubmitError::BadPayload {
                place: what.into(),
                reason: format!(
                    "images need a vision model, and this job is for `{}`: use --model vision",
                    self.model
                ),
            })
        }
    }

    /// The image at `path` (for a vision model, of a known type, under
    /// the roots), resolved, and its bytes.
    fn read_image(&self, path: &Path) -> Result<(PathBuf, Vec<u8>), SubmitError> {
        self.require_vision("--image")?;
        let real = self.check_image(path, "--image")?;
        let bytes = std::fs::read(&real).map_err(|source| SubmitError::Read {
            path: real.clone(),
            source,
        })?;
        Ok((real, bytes))
    }

    fn check_image(&self, path: &Path, place: &str) -> Result<PathBuf, SubmitError> {
        if image_mime(path).is_none() {
            return Err(SubmitError::BadPayload {
                place: place.into(),
                reason: format!(
                    "{} is not a supported image: use one of {}",
                    path.display(),
                    IMAGE_TYPES
                        .iter()
                        .map(|(e, _)| *e)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        self.check_root(path)
    }

    /// Checks that `value` is a payload the dispatcher can send; returns it
    /// with `image_path` made absolute.
    pub fn validate(&self, value: &Value, place: &str) -> Result<Value, SubmitError> {
        let bad = |reason: String| SubmitError::BadPayload {
            place: place.to_string(),
            reason,
        };
        let Value::Object(obj) = value else {
            return Err(bad(format!(
                "a payload must be a JSON object with `messages`, `prompt` or `image_path`, not {}",
                kind(value)
            )));
        };
        let mut out = obj.clone();
        let mut has_input = false;
        if let Some(m) = obj.get("messages") {
            let ok = m.as_array().is_some_and(|a| {
                !a.is_empty()
                    && a.iter()
                        .all(|msg| msg.get("role").is_some_and(Value::is_string))
            });
            if !ok {
                return Err(bad(
                    "`messages` must be a non-empty array of objects, each with a string `role`"
                        .into(),
                ));
            }
            has_input = true;
        }
        if let Some(p) = obj.get("prompt") {
            if p.as_str().is_none_or(|s| s.trim().is_empty()) {
                return Err(bad("`prompt` must be a non-empty string".into()));
            }
            has_input = true;
        }
        if let Some(img) = obj.get("image_path") {
            let Some(p) = img.as_str() else {
                return Err(bad(format!(
                    "`image_path` must be a string, not {}",
                    kind(img)
                )));
            };
            self.require_vision(place)?;
            let real = self.check_image(Path::new(p), place)?;
            out.insert(
                "image_path".into(),
                Value::String(real.to_string_lossy().into_owned()),
            );
            has_input = true;
        }
        if !has_input {
            return Err(bad(
                "a payload needs `messages`, `prompt` or `image_path`".into()
            ));
        }
        if let Some(t) = obj.get("max_tokens") {
            if t.as_u64().is_none_or(|n| n < 1) {
                return Err(bad(
                    "`max_tokens` must be a whole number of at least 1".into()
                ));
            }
        }
        if let Some(t) = obj.get("temperature") {
            if !t.as_f64().is_some_and(|x| (0.0..=2.0).contains(&x)) {
                return Err(bad("`temperature` must be a number from 0 to 2".into()));
            }
        }
        Ok(Value::Object(out))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sub(model: ModelType, root: &Path) -> Submitter {
        Submitter::new(model, &[root.to_path_buf()], 0, 3)
    }

    #[test]
    fn payloads_must_be_sendable() {
        let dir = tempfile::tempdir().unwrap();
        let s = sub(ModelType::Think, dir.path());
        assert!(s.validate(&json!({"prompt": "hi"}), "x").is_ok());
        assert!(s
            .validate(
                &json!({"messages": [{"role": "user", "content": "hi"}]}),
                "x"
            )
            .is_ok());
        for bad in [
            json!([1, 2]),
            json!({}),
            json!({"prompt": ""}),
            json!({"messages": []}),
            json!({"messages": [{"content": "no role"}]}),
            json!({"prompt": "x", "max_tokens": 0}),
            json!({"prompt": "x", "temperature": "hot"}),
        ] {
            let err = s.validate(&bad, "p.json").unwrap_err().to_string();
            assert!(err.starts_with("p.json: "), "{err}");
        }
    }

    #[test]
    fn images_need_vision_and_a_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let inside = root.path().join("a.png");
        std::fs::write(&inside, b"png").unwrap();
        let far = outside.path().join("b.png");
        std::fs::write(&far, b"png").unwrap();
        let v = sub(ModelType::Vision, root.path());
        assert!(v.image(&inside).is_ok());
        assert!(matches!(
            v.image(&far),
            Err(SubmitError::OutsideRoots { .. })
        ));
        let t = sub(ModelType::Think, root.path());
        let err = t.image(&inside).unwrap_err().to_string();
        assert!(err.contains("--model vision"), "{err}");
        let txt = root.path().join("a.txt");
        std::fs::write(&txt, b"x").unwrap();
        assert!(v
            .image(&txt)
            .unwrap_err()
            .to_string()
            .contains("not a supported image"));
    }

    #[test]
    fn same_content_same_hash() {
        let root = tempfile::tempdir().unwrap();
        let s = sub(ModelType::Vision, root.path());
        let a = root.path().join("a.png");
        let b = root.path().join("b.png");
        std::fs::write(&a, b"same").unwrap();
        std::fs::write(&b, b"same").unwrap();
        assert_eq!(
            s.image(&a).unwrap().payload_sha256,
            s.image(&b).unwrap().payload_sha256
        );
        assert_eq!(
            s.prompt("q").unwrap().payload_sha256,
            s.prompt("q").unwrap().payload_sha256
        );
        assert_ne!(
            s.prompt("q").unwrap().payload_sha256,
            s.prompt("r").unwrap().payload_sha256
        );
    }

    #[test]
    fn a_bad_jsonl_line_is_named() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("jobs.jsonl");
        std::fs::write(
            &f,
            "{\"prompt\":\"a\"}\n\n{\"prompt\":\"b\"}\n{\"nothing\":1}\n",
        )
        .unwrap();
        let err = sub(ModelType::Think, root.path())
            .jsonl(&f)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4"), "{err}");
    }
}
