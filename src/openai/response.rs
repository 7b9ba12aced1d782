//! Reading what the server answers: a completion, its error bodies, the
//! sleep routes' answers and the engine's `/metrics`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use feeder_actors::window::EngineMetrics;
use feeder_actors::{InferenceError, InferenceOutput, RawResponse};
/// The start of a body, for error messages.
pub(super) fn excerpt(body: &str) -> String {
    let one_line = body.trim().replace('\n', " ");
    if one_line.chars().count() > 300 {
        format!("{}…", one_line.chars().take(300).collect::<String>())
    } else {
        one_line
    }
}

/// The server's own words from an error body (`{"error": {"message": …}}`,
/// `{"message": …}`, `{"detail": …}`, or the text itself).
pub(super) fn server_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let found = v
            .pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .or_else(|| v.get("error"));
        if let Some(m) = found {
            return match m {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
        }
    }
    excerpt(body)
}

/// Sends a sleep-mode request: the body of a 2xx answer, else why not.
pub(super) async fn sleep_answer(
    url: &str,
    req: reqwest::RequestBuilder,
) -> Result<String, String> {
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    if (200..300).contains(&code) {
        Ok(text)
    } else {
        Err(sleep_refused(url, code, &text))
    }
}

/// Why a sleep-mode call was refused, with what to do about a 404.
pub(super) fn sleep_refused(url: &str, code: u16, text: &str) -> String {
    if code == 404 {
        format!(
            "{url} answers 404: the server was not launched with --enable-sleep-mode and \
             VLLM_SERVER_DEV_MODE=1 (set sleep_mode = true on the instance)"
        )
    } else {
        format!("{url} answers HTTP {code}: {}", server_message(text))
    }
}

/// Turns a chat-completion response into an output.
///
/// Servers other than vLLM differ in small ways, each accepted: `content`
/// as a list of text parts; no `content` but `reasoning_content` (a
/// reasoning model cut short by `max_tokens`: the content is empty, the
/// whole response is kept); `usage` counted as `input_tokens` /
/// `output_tokens`, as a number with a fraction or in a string, or absent.
pub fn parse_completion(body: &str, latency: Duration) -> Result<InferenceOutput, InferenceError> {
    let missing = || {
        InferenceError::Retryable(format!(
            "HTTP 200 without choices[0].message.content: {}",
            excerpt(body)
        ))
    };
    // Only what is read is parsed into values; the rest is skipped, and the
    // body is kept as its text.
    let v: CompletionBody = serde_json::from_str(body).map_err(|_| missing())?;
    let first = v.choices.as_ref().and_then(|c| c.first());
    if first
        .and_then(|c| c.finish_reason.as_ref())
        .and_then(Value::as_str)
        == Some("abort")
    {
        return Err(InferenceError::Aborted(
            "the server aborted the request (finish_reason \"abort\": put to sleep or stopping)"
                .into(),
        ));
    }
    let message = first.and_then(|c| c.message.as_ref()).ok_or_else(missing)?;
    let content = match &message.content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ if [&message.reasoning_content, &message.reasoning]
            .iter()
            .any(|r| r.as_ref().is_some_and(Value::is_string)) =>
        {
            String::new()
        }
        _ => return Err(missing()),
    };
    let count = |keys: &[&str]| {
        keys.iter().find_map(|k| {
            let u = v.usage.as_ref()?.get(*k)?;
            u.as_u64()
                .or_else(|| u.as_f64().filter(|f| *f >= 0.0).map(|f| f.round() as u64))
                .or_else(|| u.as_str()?.trim().parse().ok())
        })
    };
    Ok(InferenceOutput {
        content,
        prompt_tokens: count(&["prompt_tokens", "input_tokens"]),
        completion_tokens: count(&["completion_tokens", "output_tokens"]),
        latency,
        response: RawResponse::new(body.to_owned()).map_err(|_| missing())?,
    })
}

/// The parts of a chat completion that are read (any other field is
/// skipped without being built).
#[derive(Deserialize)]
struct CompletionBody {
    #[serde(default)]
    choices: Option<Vec<CompletionChoice>>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    #[serde(default)]
    message: Option<CompletionMessage>,
    #[serde(default)]
    finish_reason: Option<Value>,
}

#[derive(Deserialize)]
struct CompletionMessage {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    reasoning_content: Option<Value>,
    #[serde(default)]
    reasoning: Option<Value>,
}

/// vLLM's engine metrics from its Prometheus text, summed over label sets
/// (one per model or engine); `None` when the text lacks the generation
/// counter, which the adaptive window cannot do without (another server's
/// metrics, or none).
pub fn parse_engine_metrics(text: &str) -> Option<EngineMetrics> {
    fn add(h: &mut Option<(f64, f64)>, sum: f64, count: f64) {
        let (s, c) = h.get_or_insert((0.0, 0.0));
        *s += sum;
        *c += count;
    }
    let mut m = EngineMetrics::default();
    let mut generation = false;
    let mut kv_v1 = false;
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(value) = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        match name {
            "vllm:num_requests_running" => m.running += value,
            "vllm:num_requests_waiting" => m.waiting += value,
            "vllm:kv_cache_usage_perc" => {
                // The newer name wins over the older one.
                if !kv_v1 {
                    m.kv_usage = 0.0;
                }
                kv_v1 = true;
                m.kv_usage = m.kv_usage.max(value);
            }
            "vllm:gpu_cache_usage_perc" if !kv_v1 => m.kv_usage = m.kv_usage.max(value),
            "vllm:num_preemptions_total" => m.preemptions_total += value,
            "vllm:generation_tokens_total" => {
                generation = true;
                m.generation_tokens_total += value;
            }
            "vllm:request_queue_time_seconds_sum" => add(&mut m.queue_time, value, 0.0),
            "vllm:request_queue_time_seconds_count" => add(&mut m.queue_time, 0.0, value),
            "vllm:e2e_request_latency_seconds_sum" => add(&mut m.e2e, value, 0.0),
            "vllm:e2e_request_latency_seconds_count" => add(&mut m.e2e, 0.0, value),
            "vllm:prefix_cache_hits_total" => add(&mut m.prefix_cache, value, 0.0),
            "vllm:prefix_cache_queries_total" => add(&mut m.prefix_cache, 0.0, value),
            "vllm:cache_config_info" => {
                let label = |key: &str| -> Option<f64> {
                    let start = line.find(&format!("{key}=\""))? + key.len() + 2;
                    let rest = &line[start..];
                    rest[..rest.find('"')?].parse().ok()
                };
                if let (Some(blocks), Some(size)) = (label("num_gpu_blocks"), label("block_size")) {
                    *m.kv_cache_tokens.get_or_insert(0.0) += blocks * size;
                }
            }
            _ => {}
        }
    }
    generation.then_some(m)
}
