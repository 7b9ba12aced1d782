//! Asking an in-process simulated server as gpu-feeder does.

use std::future::Future;
use std::time::Duration;

use serde_json::json;

/// A chat completion of `text` with `max_tokens`, sent to the server at
/// `url`; the future owns what it needs, so it can be awaited or spawned.
pub fn chat(
    url: &str,
    text: &str,
    max_tokens: u32,
) -> impl Future<Output = reqwest::Response> + Send + 'static {
    let req = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({
            "model": "sim",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
        }));
    async move { req.send().await.expect("the sim answers") }
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after 30 s.
pub async fn poll_until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
