//! The simulator's sleep mode (`--enable-sleep-mode`, served only with
//! `VLLM_SERVER_DEV_MODE=1`): a real HTTP server in this process, asked as
//! gpu-feeder asks vLLM. Timings are checked from below only: a sleep or a
//! wake takes at least what it was told to.

mod common;

use std::time::{Duration, Instant};

use gpu_feeder::sim::{self, SimConfig, SimHandle};
use serde_json::{json, Value};

use common::sim::{chat, poll_until};

fn sleepy(cfg: SimConfig) -> SimConfig {
    SimConfig {
        enable_sleep_mode: true,
        dev_mode: Some(true),
        sleep_s: 0.2,
        wake_s: 0.4,
        wake_l2_s: 0.6,
        ..cfg
    }
}

async fn post(sim: &SimHandle, path: &str, body: Option<Value>) -> reqwest::Response {
    let req = reqwest::Client::new().post(format!("{}{path}", sim.url()));
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    req.send().await.expect("the sim answers")
}

/// Asks the sim to run `method` on its workers (`POST /collective_rpc`).
async fn collective_rpc(sim: &SimHandle, method: &str) -> reqwest::Response {
    post(sim, "/collective_rpc", Some(json!({ "method": method }))).await
}

async fn sleeping(sim: &SimHandle) -> bool {
    let r = reqwest::get(format!("{}/is_sleeping", sim.url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["is_sleeping"].as_bool().expect("is_sleeping is a bool")
}

async fn content(r: reqwest::Response) -> (String, String) {
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["choices"][0]["finish_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// Waits until the sim has `n` requests admitted.
async fn wait_in_flight(sim: &SimHandle, n: usize) {
    let in_flight = &sim.counters.in_flight;
    poll_until("requests in flight", async || {
        in_flight.load(std::sync::atomic::Ordering::Relaxed) >= n
    })
    .await;
}

/// A sim that answers every request after `ms` (no engine model).
fn fixed_latency(ms: u64) -> SimConfig {
    SimConfig {
        latency_ms: ms,
        ..SimConfig::default()
    }
}

/// A sim with sleep mode, started with `cfg`, once a chat of `text` asking
/// `max_tokens` is admitted; the chat's answer comes through the handle.
async fn one_in_flight(
    cfg: SimConfig,
    text: &str,
    max_tokens: u32,
) -> (SimHandle, tokio::task::JoinHandle<reqwest::Response>) {
    let sim = sim::start(sleepy(cfg)).await.unwrap();
    let request = tokio::spawn(chat(&sim.url(), text, max_tokens));
    wait_in_flight(&sim, 1).await;
    (sim, request)
}

#[tokio::test]
async fn without_the_dev_mode_variable_the_endpoints_are_not_served() {
    for cfg in [
        SimConfig {
            enable_sleep_mode: true,
            dev_mode: Some(false),
            ..SimConfig::default()
        },
        SimConfig {
            dev_mode: Some(true),
            ..SimConfig::default()
        },
    ] {
        let sim = sim::start(cfg).await.unwrap();
        assert_eq!(post(&sim, "/sleep?level=1", None).await.status(), 404);
        assert_eq!(post(&sim, "/wake_up", None).await.status(), 404);
        let r = reqwest::get(format!("{}/is_sleeping", sim.url()))
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(
            content(chat(&sim.url(), "still awake", 4).await).await.1,
            "stop"
        );
    }
}

#[tokio::test]
async fn level_one_sleeps_answers_503_and_wakes_in_its_times() {
    let sim = sim::start(sleepy(SimConfig::default())).await.unwrap();
    assert!(!sleeping(&sim).await);
    let t = Instant::now();
    assert_eq!(post(&sim, "/sleep?level=1", None).await.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(200), "--sleep-s");
    assert!(sleeping(&sim).await);
    let r = chat(&sim.url(), "while asleep", 4).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("asleep"),
        "{body}"
    );
    // /health still answers: the server is up, its model asleep.
    let h = reqwest::get(format!("{}/health", sim.url())).await.unwrap();
    assert_eq!(h.status(), 200);
    let t = Instant::now();
    assert_eq!(post(&sim, "/wake_up", None).await.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(400), "--wake-s");
    assert!(!sleeping(&sim).await);
    let (text, why) = content(chat(&sim.url(), "awake again", 4).await).await;
    assert_eq!(why, "stop");
    assert!(text.contains("awake again"), "{text}");
}

#[tokio::test]
async fn a_sleep_aborts_requests_in_flight_unless_told_to_wait() {
    // Fixed-latency mode: a request of 60 s is answered `abort` at the sleep.
    let (sim, long) = one_in_flight(fixed_latency(60_000), "long", 16).await;
    assert_eq!(post(&sim, "/sleep?level=1", None).await.status(), 200);
    let (text, why) = content(long.await.unwrap()).await;
    assert_eq!(why, "abort");
    assert!(text.is_empty(), "{text}");

    // The engine model: its requests are dropped with the KV cache.
    let (sim, long) = one_in_flight(
        SimConfig {
            kv_cache_tokens: Some(10_000),
            ..SimConfig::default()
        },
        "long",
        9_000,
    )
    .await;
    assert_eq!(post(&sim, "/sleep?mode=abort", None).await.status(), 200);
    assert_eq!(content(long.await.unwrap()).await.1, "abort");
    assert_eq!(sim.engine().unwrap().running, 0);

    // mode=wait: the request in flight finishes first.
    let (sim, short) = one_in_flight(fixed_latency(300), "short", 16).await;
    assert_eq!(
        post(&sim, "/sleep?level=1&mode=wait", None).await.status(),
        200
    );
    let (text, why) = content(short.await.unwrap()).await;
    assert_eq!(why, "stop");
    assert!(text.contains("short"));
}

#[tokio::test]
async fn level_two_answers_garbage_until_its_weights_are_reloaded() {
    let sim = sim::start(sleepy(SimConfig::default())).await.unwrap();
    assert_eq!(post(&sim, "/sleep?level=2", None).await.status(), 200);
    // Reloading weights that are still asleep is refused.
    let r = collective_rpc(&sim, "reload_weights").await;
    assert_eq!(r.status(), 400);
    // The weights alone: the KV cache is still asleep, so 503.
    assert_eq!(
        post(&sim, "/wake_up?tags=weights", None).await.status(),
        200
    );
    assert_eq!(chat(&sim.url(), "half awake", 4).await.status(), 503);
    assert!(sleeping(&sim).await);
    assert_eq!(
        post(&sim, "/wake_up?tags=kv_cache", None).await.status(),
        200
    );
    assert!(!sleeping(&sim).await);
    let (text, _) = content(chat(&sim.url(), "what is written here", 4).await).await;
    assert!(
        !text.contains("what is written here"),
        "a level-2 wake without reload_weights answers garbage, not: {text}"
    );
    let r = collective_rpc(&sim, "other").await;
    assert_eq!(r.status(), 400);
    let t = Instant::now();
    let r = collective_rpc(&sim, "reload_weights").await;
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(600), "--wake-l2-s");
    let (text, _) = content(chat(&sim.url(), "what is written here", 4).await).await;
    assert!(text.contains("what is written here"), "{text}");
    // Bad arguments are named.
    let r = post(&sim, "/sleep?level=3", None).await;
    assert_eq!(r.status(), 400);
    let r = post(&sim, "/wake_up?tags=everything", None).await;
    assert_eq!(r.status(), 400);
}

#[test]
fn the_program_serves_sleep_mode_only_with_the_variable() {
    let with = common::SimProcess::start_env(
        &["--enable-sleep-mode", "--wake-s", "0"],
        &[("VLLM_SERVER_DEV_MODE", "1")],
    );
    let without = common::SimProcess::start_env(&["--enable-sleep-mode"], &[]);
    assert_eq!(with.post("/sleep?level=1"), 200);
    assert_eq!(with.post("/wake_up"), 200);
    assert_eq!(without.post("/sleep?level=1"), 404);
}

/// The OpenAI adapter's sleep-mode calls, against the simulator over HTTP.
#[tokio::test]
async fn the_openai_adapter_sleeps_and_wakes_the_sim() {
    use feeder_actors::inference::{InferenceClient, InferenceError, ProbeError};
    use gpu_feeder::openai::{parse_completion, OpenAiClient, RequestDefaults};
    let sim = sim::start(sleepy(SimConfig::default())).await.unwrap();
    let make = |url: &str| {
        let defaults = RequestDefaults {
            instance: "think".into(),
            served_model_name: "sim".into(),
            max_tokens: 4,
            temperature: 0.0,
            system_prompt: None,
            ocr_prompt: String::new(),
            payload_roots: Vec::new(),
            vision: false,
            send_priority: false,
        };
        OpenAiClient::new(url, defaults, Duration::from_secs(10), 4)
    };
    let client = make(&sim.url());
    assert_eq!(client.is_sleeping().await, Ok(false));
    client.probe(true).await.expect("awake, the canary answers");
    client.sleep(2).await.unwrap();
    assert_eq!(client.is_sleeping().await, Ok(true));
    assert!(matches!(
        client.probe(true).await,
        Err(ProbeError::Loading(_))
    ));
    // Level 2: weights, reload, KV cache — as the ContainerActor wakes it.
    client.wake_up(Some("weights")).await.unwrap();
    client.reload_weights().await.unwrap();
    client.wake_up(Some("kv_cache")).await.unwrap();
    assert_eq!(client.is_sleeping().await, Ok(false));
    client.probe(true).await.expect("awake again");
    // An aborted answer is not a completion: the job goes back.
    let aborted = r#"{"choices":[{"message":{"content":""},"finish_reason":"abort"}]}"#;
    assert!(matches!(
        parse_completion(aborted, Duration::ZERO),
        Err(InferenceError::Aborted(_))
    ));
    // A server without sleep mode: the error says what to set.
    let plain = sim::start(SimConfig::default()).await.unwrap();
    let c = make(&plain.url());
    let e = c.sleep(1).await.unwrap_err();
    assert!(e.contains("sleep_mode = true"), "{e}");
}
