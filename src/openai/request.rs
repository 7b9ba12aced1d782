//! The request a job becomes: its payload, the instance's defaults, and
//! an image turned into a base64 data URL.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};

use feeder_actors::{InferenceError, Job, ModelType};

use crate::chunk::image_mime;
use crate::config::{InstanceConfig, SchedulingPolicy};
/// Keys of a payload that are gpu-feeder's, not OpenAI's (`chunk` and
/// `tile` placed a fragment in its parent before the `place` column; rows
/// written then may still carry them).
pub(super) const OWN_KEYS: &[&str] = &["prompt", "image_path", "chunk", "tile"];

/// What a request for one instance is built from.
#[derive(Clone, Debug)]
pub struct RequestDefaults {
    /// The instance's name (for messages).
    pub instance: String,
    /// `model` in the request.
    pub served_model_name: String,
    /// Default `max_tokens`.
    pub max_tokens: u32,
    /// Default `temperature`.
    pub temperature: f64,
    /// Prepended as a system message when the payload has none.
    pub system_prompt: Option<String>,
    /// Sent with an image that comes without a prompt.
    pub ocr_prompt: String,
    /// Files a payload may name lie under one of these (canonical paths).
    pub payload_roots: Vec<PathBuf>,
    /// A vision model: its canary completion carries an image.
    pub vision: bool,
    /// The server runs requests by priority (`--scheduling-policy
    /// priority`): each request carries its job's, negated.
    pub send_priority: bool,
}

impl RequestDefaults {
    /// The defaults of a configured instance.
    pub fn from_instance(inst: &InstanceConfig, payload_roots: &[PathBuf]) -> Self {
        RequestDefaults {
            instance: inst.name.clone(),
            served_model_name: inst.served_model_name.clone(),
            max_tokens: inst.max_tokens,
            temperature: inst.temperature,
            system_prompt: inst.system_prompt.clone(),
            ocr_prompt: inst.ocr_prompt.clone(),
            vision: inst.model_type == ModelType::Vision,
            send_priority: inst.scheduling_policy() == SchedulingPolicy::Priority,
            payload_roots: payload_roots
                .iter()
                .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
                .collect(),
        }
    }

    fn check_root(&self, path: &Path, what: &str) -> Result<PathBuf, InferenceError> {
        let real = std::fs::canonicalize(path).map_err(|e| {
            InferenceError::Permanent(format!("cannot read the {what} {}: {e}", path.display()))
        })?;
        if self.payload_roots.iter().any(|r| real.starts_with(r)) {
            Ok(real)
        } else {
            Err(InferenceError::Permanent(format!(
                "the {what} {} is outside queue.payload_roots; move it under one of them",
                real.display()
            )))
        }
    }
}

/// Reads a job's payload and builds the chat-completion body.
pub async fn build_body(job: &Job, d: &RequestDefaults) -> Result<Value, InferenceError> {
    let (text, place) = match (&job.payload_inline, &job.payload_path) {
        (Some(inline), _) => (inline.clone(), "the inline payload".to_string()),
        (None, Some(path)) => {
            let d2 = d.clone();
            let p2 = path.clone();
            let real = tokio::task::spawn_blocking(move || d2.check_root(&p2, "payload file"))
                .await
                .map_err(|e| InferenceError::Retryable(e.to_string()))??;
            let text = tokio::fs::read_to_string(&real).await.map_err(|e| {
                InferenceError::Permanent(format!(
                    "cannot read the payload file {}: {e}",
                    real.display()
                ))
            })?;
            (text, format!("payload file {}", real.display()))
        }
        (None, None) => {
            return Err(InferenceError::Permanent(
                "the job has neither payload_path nor payload_inline".into(),
            ))
        }
    };
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| InferenceError::Permanent(format!("{place} is not valid JSON: {e}")))?;
    let Value::Object(mut body) = value else {
        return Err(InferenceError::Permanent(format!(
            "{place} must be a JSON object with `messages`, `prompt` or `image_path`"
        )));
    };
    // gpu-feeder's own keys are taken out; everything else is sent as is.
    let prompt = body.remove("prompt");
    let prompt = prompt.as_ref().and_then(Value::as_str);
    let image_path = body.remove("image_path");
    for k in OWN_KEYS {
        body.remove(*k);
    }
    let messages = if let Some(m) = body.remove("messages") {
        if m.as_array().is_none_or(|a| a.is_empty()) {
            return Err(InferenceError::Permanent(format!(
                "{place}: `messages` must be a non-empty array"
            )));
        }
        m
    } else if let Some(img) = image_path {
        let Some(path) = img.as_str() else {
            return Err(InferenceError::Permanent(format!(
                "{place}: `image_path` must be a string"
            )));
        };
        let url = image_data_url(Path::new(path), d).await?;
        json!([{
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": prompt.unwrap_or(&d.ocr_prompt)},
            ],
        }])
    } else if let Some(p) = prompt {
        json!([{"role": "user", "content": p}])
    } else {
        return Err(InferenceError::Permanent(format!(
            "{place} has no `messages`, `prompt` or `image_path`"
        )));
    };
    let mut messages = match messages {
        Value::Array(a) => a,
        _ => unreachable!("built as arrays"),
    };
    if let Some(system) = &d.system_prompt {
        let has_system = messages
            .iter()
            .any(|m| m.get("role").and_then(Value::as_str) == Some("system"));
        if !has_system {
            messages.insert(0, json!({"role": "system", "content": system}));
        }
    }
    body.insert("messages".into(), Value::Array(messages));
    body.entry("model")
        .or_insert_with(|| json!(d.served_model_name));
    body.entry("max_tokens")
        .or_insert_with(|| json!(d.max_tokens));
    body.entry("temperature")
        .or_insert_with(|| json!(d.temperature));
    body.insert("stream".into(), json!(false));
    if d.send_priority {
        // The job's priority runs higher first; vLLM's, lower first.
        body.insert("priority".into(), json!(job.priority.saturating_neg()));
    }
    Ok(Value::Object(body))
}

pub(super) async fn image_data_url(
    path: &Path,
    d: &RequestDefaults,
) -> Result<String, InferenceError> {
    let Some(mime) = image_mime(path) else {
        return Err(InferenceError::Permanent(format!(
            "{} is not a supported image (png, jpg, jpeg, webp, gif)",
            path.display()
        )));
    };
    let (d2, p2) = (d.clone(), path.to_path_buf());
    let real = tokio::task::spawn_blocking(move || d2.check_root(&p2, "image"))
        .await
        .map_err(|e| InferenceError::Retryable(e.to_string()))??;
    let bytes = tokio::fs::read(&real).await.map_err(|e| {
        InferenceError::Permanent(format!("cannot read the image {}: {e}", real.display()))
    })?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    Ok(format!("data:{mime};base64,{b64}"))
}
