//! `gpu-feeder sim` with the engine model on (`--kv-cache-tokens`): a real
//! HTTP server in this process, asked as gpu-feeder and Prometheus ask it.

mod common;

use gpu_feeder::sim::{self, SimConfig, SimHandle};
use serde_json::Value;

use common::promtool;
use common::sim::{chat, poll_until};

fn engine(kv: u64) -> SimConfig {
    SimConfig {
        kv_cache_tokens: Some(kv),
        ..SimConfig::default()
    }
}

async fn metrics(sim: &SimHandle) -> String {
    reqwest::get(format!("{}/metrics", sim.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `name{…}` (the first one matching `name` and
/// then `{` or a space).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[tokio::test]
async fn every_request_generates_its_max_tokens_and_the_metrics_count_them() {
    let sim = sim::start(SimConfig {
        time_scale: 20.0,
        ..engine(100_000)
    })
    .await
    .unwrap();
    let text = "a".repeat(400); // 100 tokens of text, and the role
    let asks = (0..8).map(|_| chat(&sim.url(), &text, 50));
    let answers = futures_util::future::join_all(asks).await;
    for a in answers {
        assert_eq!(a.status(), 200);
        let body: Value = a.json().await.unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["usage"]["completion_tokens"], 50);
        assert_eq!(body["usage"]["prompt_tokens"], 101);
        assert!(body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("echo: aaaa"));
    }
    let m = metrics(&sim).await;
    assert_eq!(sample(&m, "vllm:generation_tokens_total"), 400.0);
    assert_eq!(sample(&m, "vllm:request_success_total"), 8.0);
    assert_eq!(sample(&m, "vllm:prompt_tokens_total"), 808.0);
    assert_eq!(sample(&m, "vllm:num_requests_running"), 0.0);
    assert_eq!(sample(&m, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(sample(&m, "vllm:num_preemptions_total"), 0.0);
    assert_eq!(sample(&m, "vllm:time_to_first_token_seconds_count"), 8.0);
    assert_eq!(sample(&m, "vllm:e2e_request_latency_seconds_count"), 8.0);
    assert_eq!(sample(&m, "vllm:request_queue_time_seconds_count"), 8.0);
    // The same prompt eight times: all but the first hit the prefix cache
    // (whole blocks of 16 tokens, never the last prompt token).
    assert_eq!(sample(&m, "vllm:prefix_cache_queries_total"), 808.0);
    assert!(sample(&m, "vllm:prefix_cache_hits_total") >= 7.0 * 96.0 - 96.0);
    // What gpu-feeder reads from the same text: the prefix counters, and
    // the KV cache's size from `vllm:cache_config_info` (100,000 tokens
    // are 6,250 blocks of 16), which sizes a dispatcher's warm prefixes.
    let read = gpu_feeder::openai::parse_engine_metrics(&m).expect("vLLM metrics");
    assert_eq!(read.kv_cache_tokens, Some(100_000.0));
    assert_eq!(
        read.prefix_cache,
        Some((sample(&m, "vllm:prefix_cache_hits_total"), 808.0))
    );
    assert_eq!(read.generation_tokens_total, 400.0);
    // Each request decoded 50 tokens at 6.5 ms and more (engine time).
    let e2e = sample(&m, "vllm:e2e_request_latency_seconds_sum") / 8.0;
    assert!(e2e > 50.0 * 0.0065, "mean e2e {e2e} s");

    let (passed, said) = promtool(&m);
    // vLLM's names carry a colon, which promtool's lint flags (as it does
    // for vLLM itself); anything else it says is a real problem.
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.ends_with("metric names should not contain ':'"))
        .collect();
    assert!(
        problems.is_empty() && (passed || !said.is_empty()),
        "promtool check metrics:\n{said}\n{m}"
    );
    assert!(
        said.lines().count() >= 10,
        "each vLLM metric was read: {said}"
    );
}

#[tokio::test]
async fn beyond_max_num_queued_reqs_the_server_answers_503() {
    let sim = sim::start(SimConfig {
        max_num_seqs: 1,
        max_num_queued_reqs: Some(2),
        ..engine(100_000)
    })
    .await
    .unwrap();
    let url = sim.url();
    // One runs (for minutes of decoding), so that the queue is what counts;
    // it fits in the KV cache (one that could not would be refused).
    let long = tokio::spawn(chat(&url, "long", 90_000));
    poll_until("the long request runs", async || {
        sample(&metrics(&sim).await, "vllm:num_requests_running") == 1.0
    })
    .await;
    let url = sim.url();
    let mut waiting = Vec::new();
    for i in 0..2 {
        waiting.push(tokio::spawn(chat(&url, &format!("w{i}"), 1)));
    }
    poll_until("two wait", async || {
        sample(&metrics(&sim).await, "vllm:num_requests_waiting") == 2.0
    })
    .await;
    for _ in 0..3 {
        let refused = chat(&sim.url(), "one more", 1).await;
        assert_eq!(refused.status(), 503);
        let body: Value = refused.json().await.unwrap();
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("--max-num-queued-reqs"), "{msg}");
    }
    long.abort();
    for w in waiting {
        w.abort();
    }
}

#[tokio::test]
async fn without_the_engine_model_a_request_takes_its_fixed_latency() {
    let sim = sim::start(SimConfig {
        latency_ms: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let a = chat(&sim.url(), "hello", 50).await;
    let body: Value = a.json().await.unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() < 50);
    assert!(!metrics(&sim).await.contains("vllm:num_preemptions_total"));
}

/// A tokenizer.json of whole words (anything else is `[UNK]`), with
/// ChatML's markers as special tokens and a BOS its post-processor puts in
/// front, as a Llama-3-style tokenizer does.
const WORDS_TOKENIZER: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 5, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 6, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 7, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [7], "tokens": ["<s>"]}}
  },
  "decoder": null,
  "model": {
    "type": "WordLevel",
    "vocab": {"[UNK]": 0, "user": 1, "hello": 2, "world": 3, "assistant": 4, "<|im_start|>": 5, "<|im_end|>": 6, "<s>": 7, "system": 8},
    "unk_token": "[UNK]"
  }
}"#;

async fn chat_messages(url: &str, messages: Value, max_tokens: u32) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "sim", "messages": messages, "max_tokens": max_tokens}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn with_the_models_tokenizer_prompt_tokens_are_counted_over_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), WORDS_TOKENIZER).unwrap();
    for kv in [Some(10_000), None] {
        let sim = sim::start(SimConfig {
            kv_cache_tokens: kv,
            time_scale: 20.0,
            // A folder names its tokenizer.json, as vLLM's --tokenizer does.
            tokenizer: Some(dir.path().to_path_buf()),
            ..SimConfig::default()
        })
        .await
        .unwrap();
        // <s> <|im_start|> user hello world <|im_end|> <|im_start|> assistant
        let a = chat(&sim.url(), "hello world", 3).await;
        let body: Value = a.json().await.unwrap();
        assert_eq!(body["usage"]["prompt_tokens"], 8, "engine model {kv:?}");
        // Each message adds its markers and its role; unknown words count.
        let a = chat_messages(
            &sim.url(),
            serde_json::json!([
                {"role": "system", "content": "hello there"},
                {"role": "user", "content": [{"type": "text", "text": "world"}]},
            ]),
            3,
        )
        .await;
        let body: Value = a.json().await.unwrap();
        assert_eq!(
            body["usage"]["prompt_tokens"],
            1 + 5 + 4 + 2,
            "engine model {kv:?}"
        );
    }
    let missing = sim::start(SimConfig {
        tokenizer: Some(dir.path().join("absent.json")),
        ..SimConfig::default()
    })
    .await;
    let e = missing.err().expect("a missing tokenizer is an error");
    assert!(e.to_string().contains("absent.json"), "{e}");
}

#[tokio::test]
async fn vllms_block_count_flag_sizes_the_kv_cache() {
    let sim = sim::start(SimConfig {
        num_gpu_blocks_override: Some(80),
        block_size: 128,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let m = metrics(&sim).await;
    let info = m
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))
        .unwrap();
    assert!(info.contains("block_size=\"128\""), "{info}");
    assert!(info.contains("num_gpu_blocks=\"80\""), "{info}");
    // A request that could never fit in the 79 blocks vLLM would use (one
    // is its null block) is refused at once.
    let a = chat(&sim.url(), "short", 20_000).await;
    assert_eq!(a.status(), 400);
    let body: Value = a.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&(79 * 128).to_string()), "{msg}");
}

#[tokio::test]
async fn the_prefix_cache_is_reset_on_request_in_dev_mode_only() {
    let text = "a".repeat(2_000); // 500 tokens of text: 31 full blocks
    for dev in [true, false] {
        let sim = sim::start(SimConfig {
            time_scale: 20.0,
            dev_mode: Some(dev),
            ..engine(100_000)
        })
        .await
        .unwrap();
        let hits = async || sample(&metrics(&sim).await, "vllm:prefix_cache_hits_total");
        assert_eq!(chat(&sim.url(), &text, 2).await.status(), 200);
        assert_eq!(hits().await, 0.0);
        assert_eq!(chat(&sim.url(), &text, 2).await.status(), 200);
        let after_repeat = hits().await;
        assert!(after_repeat >= 480.0, "{after_repeat}");
        let reset = reqwest::Client::new()
            .post(format!("{}/reset_prefix_cache", sim.url()))
            .send()
            .await
            .unwrap();
        if !dev {
            assert_eq!(reset.status(), 404, "as vLLM without VLLM_SERVER_DEV_MODE");
            continue;
        }
        let body: Value = reset.json().await.unwrap();
        assert_eq!(body["success"], true);
        assert_eq!(chat(&sim.url(), &text, 2).await.status(), 200);
        assert_eq!(hits().await, after_repeat, "nothing hit after the reset");
    }
}

#[tokio::test]
async fn a_streamed_answer_starts_at_its_first_token_while_the_engine_still_runs_it() {
    // 400 tokens of about 6.5 ms each: the answer takes seconds of steps.
    let sim = sim::start(engine(100_000)).await.unwrap();
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .json(&serde_json::json!({
            "model": "sim",
            "messages": [{"role": "user", "content": "stream me"}],
            "max_tokens": 400,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = String::new();
    let mut running_at_first_words = None;
    while let Some(piece) = resp.chunk().await.unwrap() {
        body.push_str(std::str::from_utf8(&piece).unwrap());
        if running_at_first_words.is_none() && body.contains("\"content\":\"echo: \"") {
            running_at_first_words = Some(sim.engine().unwrap().running);
        }
    }
    // The first words came with the first token, not with the answer.
    assert_eq!(running_at_first_words, Some(1), "{body}");
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/content")?.as_str())
        .collect();
    assert_eq!(text, "echo: stream me");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 400, "{usage}");
    assert_eq!(sim.engine().unwrap().running, 0);
}

/// `POST /v1/chat/completions` to a sim process with curl, giving up after
/// `max_s`: curl's exit code and the HTTP status it read (0 for none).
fn curl_chat(sim: &common::SimProcess, max_s: u32) -> (i32, u16) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time"])
        .arg(max_s.to_string())
        .args(["-H", "Content-Type: application/json", "-d"])
        .arg(
            r#"{"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}"#,
        )
        .arg(format!("{}/v1/chat/completions", sim.url))
        .output()
        .expect("curl runs");
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (out.status.code().unwrap_or(-1), code)
}

/// The README's fault flags for the simulator: `--hang-rate 1` never
/// answers a request (while its health check still does), and
/// `--crash-after N` answers N requests, then exits.
#[test]
fn the_simulators_hang_and_crash_flags_do_what_the_readme_says() {
    let hang = common::SimProcess::start(&["--hang-rate", "1"]);
    let (curl, status) = curl_chat(&hang, 2);
    assert_eq!((curl, status), (28, 0), "curl timed out with no answer");
    let health = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/health", hang.url))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&health.stdout), "200");

    let mut crash = common::SimProcess::start(&["--crash-after", "2"]);
    assert_eq!(curl_chat(&crash, 30).1, 200);
    assert_eq!(curl_chat(&crash, 30).1, 200);
    let (curl, status) = curl_chat(&crash, 30);
    assert_eq!(status, 0, "the third request is not answered (curl {curl})");
    let exit = crash.child.wait().unwrap();
    assert_eq!(exit.code(), Some(3), "--crash-after exits with 3");
}
