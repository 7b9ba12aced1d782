//! `SubmitRequest`: what every frontend (the CLI, MCP, `POST /v1/jobs`)
//! parses a submission into, so that one set of rules applies to all: a
//! job without `then` hands its result to the next stage its model's
//! instance names, `max_attempts` lies in 1..=100 (the configured default
//! when not given), and the payload passes the same checks and limits.

use std::path::PathBuf;

use serde_json::{Map, Value};

use feeder_actors::{ModelType, NewJob};

use super::{Submission, SubmitError, Submitter};
use crate::config::Config;

/// The most attempts a submission may ask for.
pub const MAX_ATTEMPTS: u32 = 100;

/// What a submission hands over.
#[derive(Debug, Clone)]
pub enum Input {
    /// A payload given inline: `prompt`, `messages` or `image_path`, with
    /// any other OpenAI field.
    Inline(Map<String, Value>),
    /// A prompt, sent as a user message.
    Prompt(String),
    /// A JSON payload file.
    PayloadFile(PathBuf),
    /// An image to transcribe; a large one is tiled.
    Image(PathBuf),
    /// A text file sent as a prompt; with `chunk`, split into token windows.
    TextFile {
        /// The file.
        path: PathBuf,
        /// Split into `chunk.tokens`-token windows.
        chunk: bool,
    },
    /// A JSONL file: one payload per line, each its own job.
    Jsonl(PathBuf),
}

/// One submission, as any frontend received it.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// The model that runs it.
    pub model: ModelType,
    /// What to run.
    pub input: Input,
    /// Higher runs first.
    pub priority: i64,
    /// Attempts asked for; clamped to 1..=100, `dispatch.max_attempts`
    /// when not given.
    pub max_attempts: Option<u64>,
    /// The model that gets the result next; when not given, the one its
    /// model's instance names (`then` in `[[instances]]`).
    pub then: Option<ModelType>,
}

/// What a request becomes.
#[derive(Debug)]
pub enum Built {
    /// One job, or a parent with its fragments.
    One(Submission),
    /// Independent jobs (a JSONL file), queued in one transaction.
    Many(Vec<NewJob>),
}

fn bad(place: &str, reason: impl Into<String>) -> SubmitError {
    SubmitError::BadPayload {
        place: place.into(),
        reason: reason.into(),
    }
}

fn model_of(value: &Value, key: &str) -> Result<ModelType, SubmitError> {
    value
        .as_str()
        .ok_or_else(|| bad(key, "must be a model: vision or think"))?
        .parse::<ModelType>()
        .map_err(|e| bad(key, e.to_string()))
}

impl SubmitRequest {
    /// A request from a JSON object (`POST /v1/jobs`): `model`, optional
    /// `priority`, `max_attempts` and `then`; every other key is the
    /// inline payload.
    pub fn from_json(body: Value) -> Result<SubmitRequest, SubmitError> {
        let place = "the request body";
        let Value::Object(mut body) = body else {
            return Err(bad(
                place,
                "must be a JSON object with `model` and `prompt`, `messages` or `image_path`",
            ));
        };
        let model = match body.remove("model") {
            Some(m) => model_of(&m, "`model`")?,
            None => return Err(bad(place, "`model` is required: vision or think")),
        };
        let priority = body
            .remove("priority")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let max_attempts = body.remove("max_attempts").and_then(|v| v.as_u64());
        let then = match body.remove("then") {
            None | Some(Value::Null) => None,
            Some(v) => Some(model_of(&v, "`then`")?),
        };
        Ok(SubmitRequest {
            model,
            input: Input::Inline(body),
            priority,
            max_attempts,
            then,
        })
    }

    /// The submitter the rules give this request under `config`.
    pub fn submitter(&self, config: &Config) -> Result<Submitter, SubmitError> {
        let then = self
            .then
            .or_else(|| config.instances_for(self.model).find_map(|i| i.then));
        if then == Some(self.model) {
            return Err(bad(
                "`then`",
                format!(
                    "a {m} job cannot hand its result to {m} again: choose the other model",
                    m = self.model
                ),
            ));
        }
        let max_attempts = self.max_attempts.map_or(config.dispatch.max_attempts, |n| {
            n.clamp(1, MAX_ATTEMPTS as u64) as u32
        });
        Ok(Submitter::new(
            self.model,
            &config.queue.roots(),
            self.priority,
            max_attempts,
        )
        .then(then))
    }

    /// The jobs, checked. Reads, tiles and chunks files: blocking work.
    pub fn build(&self, config: &Config) -> Result<Built, SubmitError> {
        let sub = self.submitter(config)?;
        let one = |job| Ok(Built::One(Submission::Single(job)));
        match &self.input {
            Input::Inline(payload) => {
                let checked = sub.validate(&Value::Object(payload.clone()), "the payload")?;
                one(sub.inline_job(checked))
            }
            Input::Prompt(text) => one(sub.prompt(text)?),
            Input::PayloadFile(p) => one(sub.payload_file(p)?),
            Input::Image(p) => Ok(Built::One(sub.image_or_tiles(
                p,
                &config.chunk,
                &config.queue.stage_dir,
            )?)),
            Input::TextFile { path, chunk: false } => one(sub.text_file(path)?),
            Input::TextFile { path, chunk: true } => {
                let tokenizer = config
                    .instances_for(self.model)
                    .find_map(|i| i.tokenizer.clone())
                    .ok_or_else(|| {
                        bad(
                            "chunk",
                            format!(
                                "chunking counts tokens with the model's tokenizer: set `tokenizer = \"/path/to/tokenizer.json\"` on an instance with model_type = \"{}\"",
                                self.model
                            ),
                        )
                    })?;
                Ok(Built::One(sub.chunked_text(
                    path,
                    &tokenizer,
                    &config.chunk,
                )?))
            }
            Input::Jsonl(p) => Ok(Built::Many(sub.jsonl(p)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(then: &str) -> Config {
        toml::from_str(&format!(
            "[[instances]]\nname = \"v\"\nmodel_type = \"vision\"\nbackend = \"external\"\nurl = \"http://127.0.0.1:1\"\nserved_model_name = \"v\"\n{then}"
        ))
        .unwrap()
    }

    fn job(body: Value, config: &Config) -> Result<NewJob, SubmitError> {
        match SubmitRequest::from_json(body)?.build(config)? {
            Built::One(Submission::Single(job)) => Ok(job),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_frontend_gets_the_same_rules() {
        let c = config("then = \"think\"");
        // `then` falls back to the instance's.
        let j = job(json!({"model": "vision", "prompt": "read"}), &c).unwrap();
        assert_eq!(j.then_model, Some(ModelType::Think));
        assert_eq!(j.max_attempts, Some(c.dispatch.max_attempts));
        // `max_attempts` is clamped.
        let j = job(
            json!({"model": "vision", "prompt": "x", "max_attempts": 1000}),
            &c,
        )
        .unwrap();
        assert_eq!(j.max_attempts, Some(MAX_ATTEMPTS));
        let j = job(
            json!({"model": "vision", "prompt": "x", "max_attempts": 0}),
            &c,
        )
        .unwrap();
        assert_eq!(j.max_attempts, Some(1));
        // The payload is checked; `then` must be the other model.
        assert!(job(json!({"model": "vision"}), &c).is_err());
        assert!(job(
            json!({"model": "vision", "prompt": "x", "then": "vision"}),
            &c
        )
        .is_err());
        assert!(job(json!({"prompt": "x"}), &c).is_err());
        let j = job(json!({"model": "vision", "prompt": "x"}), &config("")).unwrap();
        assert_eq!(j.then_model, None);
    }
}
