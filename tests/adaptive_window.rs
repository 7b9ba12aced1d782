//! `window = "auto"` end to end: the real daemon against the real engine
//! simulator (`gpu-feeder sim --kv-cache-tokens`), both as processes.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, wait_for, DaemonProcess, Scratch, SimProcess};

/// The simulated engine: steps of 2 ms + 0.1 ms per running request, so
/// tokens/s = n / (2 + 0.1 n) per ms, two thirds of its ceiling at n = 40
/// (the knee); a KV cache of 40,000 tokens holds 300 requests of 101
/// prompt tokens halfway through their 64 generated ones: more at once
/// than that cannot run without preemption.
///
/// Its clock runs at the wall clock's pace: a window of 100 to 300 then
/// asks the daemon for 130 to 150 requests a second, a small share of
/// what it does on two cores even while other tests take most of them.
/// (At four times the pace it needed 600 a second: in a full test run the
/// daemon could not keep that many in flight, and the controller said
/// "waiting for work to fill" nearly all the run.)
const ENGINE: &[&str] = &[
    "--kv-cache-tokens",
    "40000",
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
const KNEE: u64 = 40;
const KV_LIMIT: u64 = 300;
const JOBS: usize = 6_000;
/// How often the test reads the daemon's figures (each read is a CLI
/// process of its own, so not in a busy loop).
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

#[test]
fn an_auto_window_settles_between_the_knee_and_the_kv_limit() {
    let sim = SimProcess::start(ENGINE);
    let s = Scratch::new(&format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[dispatch]\nwindow = \"auto\"\n\n[health]\ninterval_s = 0.2\n\n\
         [[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"external\"\nurl = \"{}\"\n\
         served_model_name = \"sim\"\nmax_tokens = 64\n",
        free_port(),
        sim.url
    ));
    // Prompts of about 100 tokens (400 characters).
    let f = s.path().join("bulk.jsonl");
    let lines: String = (0..JOBS)
        .map(|i| format!("{{\"prompt\": \"{i:05} {}\"}}\n", "w".repeat(394)))
        .collect();
    std::fs::write(&f, lines).unwrap();
    let r = s.run(&["submit", "--model", "think", "--jsonl", f.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{}", r.stderr());

    let _d = DaemonProcess::start(&s, "daemon");
    let start = Instant::now();
    let mut seen: Vec<(f64, u64, String)> = Vec::new();
    let limit = Duration::from_secs(240);
    while s.count("done") < JOBS as u64 {
        assert!(
            start.elapsed() < limit,
            "the bulk run did not finish: {seen:?}"
        );
        std::thread::sleep(SAMPLE_EVERY);
        if let Some(i) = s.instance("think") {
            if let Some(w) = i["window"].as_u64() {
                let why = i["window_reason"].as_str().unwrap_or("").to_string();
                seen.push((start.elapsed().as_secs_f64(), w, why));
            }
            assert_eq!(i["window_mode"], "auto", "{i}");
        }
    }
    assert_eq!(s.count("failed"), 0);
    // Once it has found its way (after the first quarter of the run), the
    // window stays between the knee and what the KV cache holds.
    let run = start.elapsed().as_secs_f64();
    let settled: Vec<&(f64, u64, String)> = seen
        .iter()
        .filter(|(t, _, why)| *t > run / 4.0 && !why.contains("waiting for work"))
        .collect();
    assert!(settled.len() >= 5, "too few readings: {seen:?}");
    let ws: Vec<u64> = settled.iter().map(|(_, w, _)| *w).collect();
    println!(
        "{} readings after {:.1} s: window min {} max {} last {} ({})",
        ws.len(),
        run / 4.0,
        ws.iter().min().unwrap(),
        ws.iter().max().unwrap(),
        ws.last().unwrap(),
        settled.last().unwrap().2
    );
    for (t, w, why) in &settled {
        assert!(
            (KNEE..=KV_LIMIT).contains(w),
            "window {w} at {t:.1} s ({why}); all: {seen:?}"
        );
    }
    // Next to no preemption: the controller stayed under the KV limit.
    let preempted = sim.gauge("vllm:num_preemptions_total");
    println!("{preempted} preemptions in {JOBS} requests, run {run:.1} s");
    assert!(
        preempted < JOBS as f64 / 100.0,
        "{preempted} preemptions in {JOBS} requests"
    );
    wait_for(
        "the daemon's log names the window's changes",
        Duration::from_secs(5),
        || _d.log().contains("window 16 → 32"),
    );
}
