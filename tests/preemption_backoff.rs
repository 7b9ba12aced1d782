//! The auto window's preemption back-off end to end: the real daemon
//! against the real engine simulator (`gpu-feeder sim --kv-cache-tokens`),
//! both as processes. The daemon's window settles under the KV cache; then
//! another client of the same server (the test, sending long generations
//! straight to it) fills the cache, and the server preempts. The daemon
//! reads `vllm:num_preemptions_total` move, cuts its window a tenth below
//! what ran and keeps that as a ceiling for a minute, long after the other
//! client has gone (README, "Running the daemon": "backs off a tenth below
//! what ran when `vllm:num_preemptions_total` moves, and keeps that as a
//! ceiling for a minute").

mod common;

use std::time::{Duration, Instant};

use common::http::http;
use common::{free_port, wait_for, DaemonProcess, Scratch, SimProcess};

/// Steps of 2 ms + 0.1 ms per running request at the wall clock's pace; a
/// KV cache of 16,000 tokens: about 90 of the daemon's requests (100
/// prompt tokens, 64 generated) at once.
const ENGINE: &[&str] = &[
    "--kv-cache-tokens",
    "16000",
    "--max-num-seqs",
    "512",
    "--step-ms",
    "2",
    "--step-ms-per-seq",
    "0.1",
    "--prefill-ms-per-1k",
    "10",
    "--time-scale",
    "1",
];
const JOBS: usize = 40_000;
/// The other client's requests: short prompts, long generations, so that
/// they are admitted at once and then need more and more of the cache.
const OTHERS: usize = 40;
const LIMIT: Duration = Duration::from_secs(120);

/// What `instances --json` says of the think instance's window: the
/// window, and its ceiling if one holds.
fn window(s: &Scratch) -> Option<(u64, Option<u64>)> {
    let i = s.instance("think")?;
    Some((
        i["window"].as_u64()?,
        i["window_signals"]["ceiling"].as_u64(),
    ))
}

#[test]
fn preemptions_at_the_server_set_a_ceiling_that_holds_for_a_minute() {
    let sim = SimProcess::start(ENGINE);
    let s = Scratch::new(&format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[dispatch]\nwindow = \"auto\"\n\n[health]\ninterval_s = 0.2\n\n\
         [[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"external\"\nurl = \"{}\"\n\
         served_model_name = \"sim\"\nmax_tokens = 64\n",
        free_port(),
        sim.url
    ));
    let f = s.path().join("bulk.jsonl");
    let lines: String = (0..JOBS)
        .map(|i| format!("{{\"prompt\": \"{i:05} {}\"}}\n", "w".repeat(394)))
        .collect();
    std::fs::write(&f, lines).unwrap();
    let r = s.run(&["submit", "--model", "think", "--jsonl", f.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let d = DaemonProcess::start(&s, "daemon");

    // The window grows under the cache, with no preemption.
    wait_for("the window grows past 32", LIMIT, || {
        window(&s).is_some_and(|(w, _)| w > 32)
    });
    let before = sim.gauge("vllm:num_preemptions_total");

    // Another client fills the cache.
    let url = format!("{}/v1/chat/completions", sim.url);
    let others: Vec<std::thread::JoinHandle<()>> = (0..OTHERS)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = format!(
                    "{{\"model\": \"sim\", \"max_tokens\": 1500, \"messages\": [{{\"role\": \"user\", \"content\": \"another client {i}\"}}]}}"
                );
                let _ = http("POST", &url, None, Some(&body));
            })
        })
        .collect();

    // The back-off fires: a ceiling, set once the server preempted.
    let mut seen: Vec<(f64, u64, Option<u64>)> = Vec::new();
    let start = Instant::now();
    let fired = loop {
        assert!(
            start.elapsed() < LIMIT,
            "no ceiling was set: {seen:?}\n{}",
            d.log()
        );
        if let Some((w, c)) = window(&s) {
            seen.push((start.elapsed().as_secs_f64(), w, c));
            if let Some(c) = c {
                break (Instant::now(), c);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let preempted = sim.gauge("vllm:num_preemptions_total") - before;
    assert!(preempted > 0.0, "the server never preempted: {seen:?}");
    println!(
        "{preempted} preemptions; ceiling {} after {:.1} s",
        fired.1,
        start.elapsed().as_secs_f64()
    );
    for t in others {
        t.join().unwrap();
    }
    println!(
        "the other client done {:.1} s after the ceiling was set",
        fired.0.elapsed().as_secs_f64()
    );

    // It holds for its minute, and the window stays under it, though the
    // cache is the daemon's alone again. (A later preemption may renew it.)
    let mut held = Vec::new();
    while fired.0.elapsed() < Duration::from_secs(55) {
        let (w, c) = window(&s).expect("the daemon answers");
        let at = fired.0.elapsed().as_secs_f64();
        let c = c.unwrap_or_else(|| panic!("the ceiling lifted after {at:.1} s: {held:?}"));
        assert!(
            w <= c,
            "window {w} above its ceiling {c} at {at:.1} s: {held:?}"
        );
        held.push((at, w, c));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(held.len() >= 20, "{held:?}");
    assert!(
        d.log().contains("the KV cache is full"),
        "the daemon logged why: {}",
        d.log()
    );
}
