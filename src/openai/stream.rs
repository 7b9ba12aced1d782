//! Streamed answers. A chat completion asked for with `stream: true`
//! through the API is relayed as the server writes it: the API opens a
//! [`Relay`] under the job's `payload_sha256` before it queues the job, and
//! the client that sends the job finds it there, asks its server for
//! `stream: true` (with the usage), forwards each chunk and keeps a whole
//! completion of them for the job's result, as if it had not streamed.
//!
//! A job nobody listens to (a batch line, a job of another daemon's API on
//! a shared queue) is not streamed, unless its payload says `stream: true`:
//! then the chunks are only gathered into the completion.
//!
//! Once a chunk has reached a listener, a failure cannot be retried (the
//! listener already holds part of an answer): the job fails, the listener
//! gets the error as the stream's last event. A listener that goes away
//! mid-stream ends the request at its server, as vLLM frees a request whose
//! client disconnects.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

/// What a listener receives.
#[derive(Debug)]
pub enum Relayed {
    /// One `chat.completion.chunk`, as the server wrote it (the JSON after
    /// `data: `); `usage_only` when it carries the usage and no choice.
    Chunk {
        /// The chunk's JSON text.
        data: Bytes,
        /// A usage chunk (`choices: []`), which a client that did not ask
        /// for `stream_options.include_usage` does not get.
        usage_only: bool,
    },
    /// The server's stream ended whole (its `data: [DONE]`).
    End,
    /// The stream broke after chunks were relayed: why.
    Broken(String),
}

/// The listeners, by the `payload_sha256` of the job they wait for.
#[derive(Debug, Default)]
pub struct Relays {
    open: Mutex<HashMap<String, mpsc::UnboundedSender<Relayed>>>,
}

impl Relays {
    /// Listens to the job whose `payload_sha256` is `key`, until the
    /// returned relay is dropped. Open it before the job is queued, so
    /// that no chunk can come before it.
    pub fn listen(self: &Arc<Self>, key: &str) -> Relay {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(key.to_string(), tx);
        Relay {
            rx,
            relays: self.clone(),
            key: key.to_string(),
        }
    }

    /// The listener of the job whose `payload_sha256` is `key`, if any.
    pub fn listener(&self, key: &str) -> Option<Listener> {
        self.lock().get(key).map(|tx| Listener {
            tx: tx.clone(),
            relayed: 0,
            finished: false,
        })
    }

    /// How many listen now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nobody listens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Relayed>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The receiving end: what the server streams for one job.
#[derive(Debug)]
pub struct Relay {
    rx: mpsc::UnboundedReceiver<Relayed>,
    relays: Arc<Relays>,
    key: String,
}

impl Relay {
    /// The next event; `None` never comes while the relay is open (the
    /// registry keeps a sender), so a waiter also watches the job.
    pub async fn recv(&mut self) -> Option<Relayed> {
        self.rx.recv().await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.relays.lock().remove(&self.key);
    }
}

/// The sending end, held by the request to the server.
#[derive(Debug)]
pub struct Listener {
    tx: mpsc::UnboundedSender<Relayed>,
    relayed: usize,
    finished: bool,
}

impl Listener {
    /// Forwards one chunk; false when the listener has gone away.
    pub fn chunk(&mut self, data: &str, usage_only: bool) -> bool {
        let sent = self
            .tx
            .send(Relayed::Chunk {
                data: Bytes::copy_from_slice(data.as_bytes()),
                usage_only,
            })
            .is_ok();
        self.relayed += usize::from(sent);
        sent
    }

    /// How many chunks reached the listener.
    pub fn relayed(&self) -> usize {
        self.relayed
    }

    /// The stream ended whole.
    pub fn end(mut self) {
        self.finished = true;
        let _ = self.tx.send(Relayed::End);
    }

    /// The stream broke: the listener's last event, when it has had chunks.
    pub fn broken(mut self, why: &str) {
        self.finished = true;
        if self.relayed > 0 {
            let _ = self.tx.send(Relayed::Broken(why.to_string()));
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The request was dropped half-way (the daemon stopping it): the
        // listener must not wait for an end that will never come.
        if !self.finished && self.relayed > 0 {
            let _ = self.tx.send(Relayed::Broken(
                "the daemon stopped the request before its answer was complete".into(),
            ));
        }
    }
}

/// Server-sent events, read from a body that arrives in pieces of any
/// size: the `data` of each whole event (its `data:` lines joined).
#[derive(Debug, Default)]
pub struct SseReader {
    pending: Vec<u8>,
    data: Option<String>,
}

impl SseReader {
    /// Takes the next piece of the body; the data of the events it ended.
    pub fn feed(&mut self, piece: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(piece);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(n) = self.pending[start..].iter().position(|b| *b == b'\n') {
            let line = &self.pending[start..start + n];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            start += n + 1;
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    events.push(d);
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                let text = String::from_utf8_lossy(rest);
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&text);
                    }
                    None => self.data = Some(text.into_owned()),
                }
            }
            // Comments (`:`), `event:`, `id:` and `retry:` lines carry
            // nothing a chat completion needs.
        }
        self.pending.drain(..start);
        events
    }

    /// The data of an event the body ended without its blank line.
    pub fn finish(&mut self) -> Option<String> {
        if !self.pending.is_empty() {
            // The last line, ended; any event it completes is returned.
            let mut ended = self.feed(b"\n");
            if let Some(d) = ended.pop() {
                return Some(d);
            }
        }
        self.data.take()
    }
}

/// One `chat.completion.chunk`, as far as it is read.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    created: Option<Value>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    #[serde(default)]
    usage: Option<Value>,
    /// An error sent in the stream (`{"error": {…}}`, or vLLM's older
    /// `{"object": "error", "message": …}`).
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    object: Option<String>,
    #[serde(default)]
    message: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<Value>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// One choice, as its deltas have built it so far.
#[derive(Default)]
struct Choice {
    role: Option<String>,
    content: Option<String>,
    reasoning: Option<String>,
    tool_calls: BTreeMap<usize, ToolCall>,
    finish_reason: Option<Value>,
}

#[derive(Default)]
struct ToolCall {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

/// What one chunk was.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A chunk with choices (or nothing read).
    Chunk,
    /// The usage alone, with no choice.
    UsageOnly,
}

/// A whole chat completion, put together from its chunks.
#[derive(Default)]
pub struct Gathered {
    id: Option<String>,
    created: Option<Value>,
    model: Option<String>,
    choices: BTreeMap<usize, Choice>,
    usage: Option<Value>,
    chunks: usize,
}

impl Gathered {
    /// Adds one event's data (not `[DONE]`); an error when it is not a
    /// chunk, or the server sent an error in the stream (its words).
    pub fn add(&mut self, data: &str) -> Result<Read, String> {
        let c: Chunk = serde_json::from_str(data).map_err(|e| {
            format!(
                "a streamed event is not a chat.completion.chunk ({e}): {}",
                super::response::excerpt(data)
            )
        })?;
        if let Some(e) = &c.error {
            let words = e
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| e.to_string(), str::to_string);
            return Err(format!("the server sent an error in the stream: {words}"));
        }
        if c.object.as_deref() == Some("error") {
            let words = c.message.as_ref().map_or_else(
                || data.to_string(),
                |m| m.as_str().map_or_else(|| m.to_string(), str::to_string),
            );
            return Err(format!("the server sent an error in the stream: {words}"));
        }
        self.chunks += 1;
        self.id = self.id.take().or(c.id);
        self.created = self.created.take().or(c.created);
        self.model = self.model.take().or(c.model);
        if c.usage.as_ref().is_some_and(|u| !u.is_null()) {
            self.usage = c.usage;
        }
        let choices = c.choices.unwrap_or_default();
        if choices.is_empty() && self.usage.is_some() {
            return Ok(Read::UsageOnly);
        }
        for (n, ch) in choices.into_iter().enumerate() {
            let into = self.choices.entry(ch.index.unwrap_or(n)).or_default();
            if ch.finish_reason.as_ref().is_some_and(|f| !f.is_null()) {
                into.finish_reason = ch.finish_reason;
            }
            let Some(d) = ch.delta else { continue };
            if d.role.is_some() {
                into.role = d.role;
            }
            if let Some(t) = d.content {
                into.content.get_or_insert_with(String::new).push_str(&t);
            }
            if let Some(t) = d.reasoning_content.or(d.reasoning) {
                into.reasoning.get_or_insert_with(String::new).push_str(&t);
            }
            for (k, call) in d.tool_calls.unwrap_or_default().into_iter().enumerate() {
                let at = into.tool_calls.entry(call.index.unwrap_or(k)).or_default();
                if call.id.is_some() {
                    at.id = call.id;
                }
                if call.kind.is_some() {
                    at.kind = call.kind;
                }
                if let Some(f) = call.function {
                    at.name.push_str(f.name.as_deref().unwrap_or(""));
                    at.arguments.push_str(f.arguments.as_deref().unwrap_or(""));
                }
            }
        }
        Ok(Read::Chunk)
    }

    /// How many chunks were read.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// The completion the chunks make, as the server would have answered
    /// without streaming.
    pub fn completion(self) -> String {
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                let mut message = Map::new();
                message.insert(
                    "role".into(),
                    json!(c.role.unwrap_or_else(|| "assistant".into())),
                );
                let content = match c.content {
                    Some(t) => json!(t),
                    None if c.reasoning.is_some() || !c.tool_calls.is_empty() => Value::Null,
                    None => json!(""),
                };
                message.insert("content".into(), content);
                if let Some(r) = c.reasoning {
                    message.insert("reasoning_content".into(), json!(r));
                }
                if !c.tool_calls.is_empty() {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .into_values()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "type": t.kind.unwrap_or_else(|| "function".into()),
                                "function": {"name": t.name, "arguments": t.arguments},
                            })
                        })
                        .collect();
                    message.insert("tool_calls".into(), json!(calls));
                }
                json!({
                    "index": index,
                    "message": message,
                    "finish_reason": c.finish_reason,
                })
            })
            .collect();
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        ": a comment\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hel\"},\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo é\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
        "data: [DONE]\n\n",
    );

    /// The events, fed in pieces of `size` bytes (cutting lines, CRLFs and
    /// characters in two).
    fn events_in_pieces(size: usize) -> Vec<String> {
        let mut r = SseReader::default();
        let mut out = Vec::new();
        for piece in STREAM.as_bytes().chunks(size) {
            out.extend(r.feed(piece));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn events_are_whole_however_the_body_is_cut() {
        let whole = events_in_pieces(STREAM.len());
        assert_eq!(whole.len(), 5);
        assert_eq!(whole.last().map(String::as_str), Some("[DONE]"));
        for size in [1, 2, 3, 7, 64] {
            assert_eq!(events_in_pieces(size), whole, "pieces of {size} bytes");
        }
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_read() {
        let mut r = SseReader::default();
        assert!(r.feed(b"data: {\"a\":1}\n\ndata: [DONE]").len() == 1);
        assert_eq!(r.finish().as_deref(), Some("[DONE]"));
        assert_eq!(r.finish(), None);
    }

    #[test]
    fn chunks_make_the_completion_the_server_would_have_sent() {
        let mut g = Gathered::default();
        let mut kinds = Vec::new();
        for e in events_in_pieces(5) {
            if e != "[DONE]" {
                kinds.push(g.add(&e).unwrap());
            }
        }
        assert_eq!(kinds.last(), Some(&Read::UsageOnly));
        let done: Value = serde_json::from_str(&g.completion()).unwrap();
        assert_eq!(done["id"], "c1");
        assert_eq!(done["created"], 5);
        assert_eq!(done["choices"][0]["message"]["content"], "hello é");
        assert_eq!(done["choices"][0]["message"]["role"], "assistant");
        assert_eq!(done["choices"][0]["finish_reason"], "stop");
        assert_eq!(done["usage"]["total_tokens"], 5);
        let out = super::super::parse_completion(&done.to_string(), Default::default()).unwrap();
        assert_eq!(out.content, "hello é");
        assert_eq!(out.completion_tokens, Some(2));
    }

    #[test]
    fn tool_calls_and_reasoning_are_put_back_together() {
        let mut g = Gathered::default();
        for e in [
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"think"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","type":"function","function":{"name":"get","arguments":"{\"a\""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"finish_reason":"tool_calls"}]}"#,
        ] {
            g.add(e).unwrap();
        }
        let done: Value = serde_json::from_str(&g.completion()).unwrap();
        let m = &done["choices"][0]["message"];
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["reasoning_content"], "think");
        assert_eq!(m["tool_calls"][0]["id"], "t1");
        assert_eq!(m["tool_calls"][0]["function"]["name"], "get");
        assert_eq!(m["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
    }

    #[test]
    fn an_error_in_the_stream_is_the_servers_words() {
        let mut g = Gathered::default();
        let e = g
            .add(r#"{"error":{"message":"out of KV cache","code":500}}"#)
            .unwrap_err();
        assert!(e.contains("out of KV cache"), "{e}");
        let e = g.add(r#"{"object":"error","message":"boom"}"#).unwrap_err();
        assert!(e.contains("boom"), "{e}");
        let e = g.add("not json").unwrap_err();
        assert!(e.contains("not a chat.completion.chunk"), "{e}");
    }

    #[tokio::test]
    async fn a_relay_gets_what_is_sent_and_leaves_no_trace() {
        let relays = Arc::new(Relays::default());
        assert!(relays.listener("k").is_none(), "nobody listens yet");
        let mut relay = relays.listen("k");
        let mut l = relays.listener("k").unwrap();
        assert!(l.chunk("{}", false));
        l.end();
        assert!(matches!(relay.recv().await, Some(Relayed::Chunk { .. })));
        assert!(matches!(relay.recv().await, Some(Relayed::End)));
        drop(relay);
        assert!(relays.is_empty());
    }

    #[tokio::test]
    async fn a_request_dropped_half_way_breaks_its_stream() {
        let relays = Arc::new(Relays::default());
        let mut relay = relays.listen("k");
        let mut l = relays.listener("k").unwrap();
        assert!(l.chunk("{}", false));
        drop(l);
        assert!(matches!(relay.recv().await, Some(Relayed::Chunk { .. })));
        assert!(matches!(relay.recv().await, Some(Relayed::Broken(_))));
        // Gone: the sender sees it.
        let mut l = relays.listener("k").unwrap();
        drop(relay);
        assert!(!l.chunk("{}", false), "the listener went away");
    }
}
