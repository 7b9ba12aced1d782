//! The allocator switching by vLLM's sleep mode, end to end: the real
//! daemon and real `gpu-feeder sim` processes launched with
//! `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`. Work of one kind,
//! then of the other, four times over: each switch drains the outgoing
//! model, puts it to sleep and wakes the incoming one, never relaunching a
//! server; every job is sent once and done once. And from a cold start
//! with work of one kind queued: the other model, parked while it still
//! loads, finishes its load and sleeps, and the first switch to it is a
//! wake.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    bin, free_port, process_servers_config, start_think_and_vision, wait_for, DaemonProcess,
    ProcessServers, Scratch,
};

const LIMIT: Duration = Duration::from_secs(90);
const PER_PHASE: usize = 150;

/// Quick decisions, a 1 s dwell, and the same memory share alone or
/// shared: a switch only sleeps and wakes.
const ALLOCATOR: &str = "interval_s = 0.2\nmin_dwell_s = 1\nshared_memory_utilization = 0.4\nsolo_memory_utilization = 0.4\n";

fn instance(name: &str, model: &str, port: u16) -> String {
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"process\"\n\
         port = {port}\nserved_model_name = \"sim-{name}\"\n\
         command = [\"{}\", \"sim\", \"--load-s\", \"0.5\", \"--latency-ms\", \"100\", \
         \"--sleep-s\", \"0.1\", \"--wake-s\", \"0.3\"]\n\
         gpu_ids = []\ngpu_memory_utilization = 0.4\nmax_tokens = 8\n\
         sleep_mode = true\nsleep_level = 1\n\n",
        bin()
    )
}

fn strategy(s: &Scratch) -> Option<String> {
    s.instances()
        .and_then(|v| v["strategy"].as_str().map(String::from))
}

/// Each instance's server pid and the states it has been through since
/// `since` (unix seconds).
fn servers(s: &Scratch, since: f64) -> HashMap<String, (String, Vec<(String, String)>)> {
    let all = s.instances().expect("the daemon answers");
    all["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let states = i["history"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|h| h["at"].as_f64().unwrap() > since)
                .map(|h| {
                    let state = |k: &str| h[k].as_str().unwrap().to_string();
                    (state("from"), state("to"))
                })
                .collect();
            (
                i["name"].as_str().unwrap().to_string(),
                (i["container_id"].as_str().unwrap_or("").to_string(), states),
            )
        })
        .collect()
}

/// Work of `model` alone: the allocator wakes it and puts the other model
/// to sleep; the phase's jobs are all done before the next phase starts.
fn phase(s: &Scratch, model: &str, other: &str, tag: &str, done_before: u64) {
    s.submit_prompts(model, tag, PER_PHASE);
    wait_for(&format!("strategy {model}"), LIMIT, || {
        strategy(s).as_deref() == Some(model)
    });
    wait_for(&format!("{other} asleep, {model} ready"), LIMIT, || {
        s.instance_is(other, "sleeping") && s.instance_is(model, "ready")
    });
    let total = done_before + PER_PHASE as u64;
    wait_for(&format!("{tag} done"), LIMIT, || s.count("done") == total);
}

#[test]
fn switches_by_sleep_and_wake_lose_nothing_and_relaunch_nothing() {
    let (s, _servers, d) = start_think_and_vision(ALLOCATOR, instance, LIMIT);
    let started = common::unix_now();
    let before = servers(&s, started);

    phase(&s, "vision", "think", "v1", 0);
    phase(&s, "think", "vision", "t1", PER_PHASE as u64);
    phase(&s, "vision", "think", "v2", 2 * PER_PHASE as u64);
    phase(&s, "think", "vision", "t2", 3 * PER_PHASE as u64);
    let total = 4 * PER_PHASE as u64;

    // Every job done, none failed, none retried.
    assert_eq!(s.count("done"), total);
    assert_eq!(s.count("failed"), 0, "no job failed across the switches");
    let jobs = s.jobs();
    assert_eq!(jobs.len() as u64, total);
    assert!(
        jobs.iter().all(|j| j["attempts"].as_u64() == Some(1)),
        "every job took exactly one attempt"
    );
    // Sent once each: the dispatchers completed exactly as many requests
    // as there are jobs, and none failed or was aborted.
    let all = s.instances().unwrap();
    let instances = all["instances"].as_array().unwrap();
    let completed: u64 = instances
        .iter()
        .map(|i| i["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(completed, total, "{all}");
    for i in instances {
        assert_eq!(i["aborted"], 0, "{i}");
    }

    // The same server processes throughout: parked by sleep, never relaunched.
    let after = servers(&s, started);
    for name in ["think", "vision"] {
        let (pid, states) = &after[name];
        assert!(!pid.is_empty());
        assert_eq!(
            pid, &before[name].0,
            "{name} kept its server process across the switches"
        );
        let into = |state: &str| {
            states
                .iter()
                .filter(|(from, to)| to == state && from != state)
                .count()
        };
        // Vision runs first and think last: vision sleeps twice and wakes
        // once, think sleeps twice and wakes twice.
        let wakes = if name == "think" { 2 } else { 1 };
        assert_eq!(
            (into("sleeping"), into("waking")),
            (2, wakes),
            "{name}: {states:?}"
        );
        assert!(
            !states
                .iter()
                .any(|(_, to)| to == "starting" || to == "stopping"),
            "{name} was never stopped or launched again: {states:?}"
        );
        let restarts = instances.iter().find(|i| i["name"] == name).unwrap()["restarts"].clone();
        assert_eq!(restarts, 0, "{name}");
    }

    // The wake times were learnt, for the allocator to weigh.
    let costs = &all["allocator"]["switch_costs"];
    for model in ["think", "vision"] {
        assert!(
            costs[model]["wake_s"].as_f64().is_some_and(|w| w > 0.0),
            "a {model} wake was measured: {costs}"
        );
    }
    let log = d.log();
    assert!(log.contains("strategy vision → think"), "{log}");
    assert!(log.contains("strategy think → vision"), "{log}");
}

/// Loads for `LOAD_S` (the allocator decides within about a second), sleeps
/// in 0.3 s and wakes in 1.5 s.
const LOAD_S: f64 = 5.0;

fn slow_loading(name: &str, model: &str, port: u16) -> String {
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"process\"\n\
         port = {port}\nserved_model_name = \"sim-{name}\"\n\
         command = [\"{}\", \"sim\", \"--load-s\", \"{LOAD_S}\", \"--latency-ms\", \"100\", \
         \"--sleep-s\", \"0.3\", \"--wake-s\", \"1.5\"]\n\
         gpu_ids = []\ngpu_memory_utilization = 0.4\nmax_tokens = 8\n\
         sleep_mode = true\nsleep_level = 1\n\n",
        bin()
    )
}

/// The states `name` entered, in order, from `instances --json`.
fn entered(s: &Scratch, name: &str) -> Vec<String> {
    s.instance(name).expect("the daemon answers")["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_model_parked_while_it_loads_is_loaded_once_and_brought_in_by_a_wake() {
    let s = Scratch::new(&format!(
        "{}[allocator]\n{ALLOCATOR}\n{}{}",
        process_servers_config(free_port()),
        slow_loading("think", "think", free_port()),
        slow_loading("vision", "vision", free_port()),
    ));
    let _servers = ProcessServers(s.path().join("servers"));
    // Only vision work waits when the daemon starts.
    s.submit_prompts("vision", "v", 40);
    let d = DaemonProcess::start(&s, "daemon");
    wait_for("strategy vision", LIMIT, || {
        strategy(&s).as_deref() == Some("vision")
    });
    wait_for("the vision work done, think asleep", LIMIT, || {
        s.count("done") == 40 && s.instance_is("think", "sleeping")
    });
    let think = s.instance("think").unwrap();
    let pid = think["container_id"].as_str().unwrap().to_string();
    let states = entered(&s, "think");
    // Parked while it loaded: loaded once, then put to sleep at once.
    assert_eq!(
        states.iter().filter(|t| *t == "starting").count(),
        1,
        "{states:?}"
    );
    assert!(
        !states.iter().any(|t| t == "ready" || t == "stopping"),
        "{states:?}"
    );
    let loaded = states.iter().position(|t| t == "loading").expect("loaded");
    assert_eq!(states[loaded + 1], "sleeping", "{states:?}");

    // Think work: decided at once (think first), answered after a wake.
    s.submit_prompts("think", "t", 40);
    wait_for("strategy think", LIMIT, || {
        strategy(&s).as_deref() == Some("think")
    });
    let decided = s.instances().unwrap()["allocator"]["since"]
        .as_f64()
        .unwrap();
    wait_for("think work done", LIMIT, || s.count("done") == 80);
    let first = s
        .jobs()
        .iter()
        .filter(|j| j["model_type"] == "think")
        .filter_map(|j| j["finished_at"].as_f64())
        .fold(f64::INFINITY, f64::min);
    let think = s.instance("think").unwrap();
    let states = entered(&s, "think");
    assert_eq!(
        think["container_id"].as_str(),
        Some(pid.as_str()),
        "think kept its server process: {states:?}"
    );
    assert_eq!(
        states.iter().filter(|t| *t == "starting").count(),
        1,
        "never launched again: {states:?}"
    );
    assert!(!states.iter().any(|t| t == "stopping"), "{states:?}");
    let n = states.len();
    assert_eq!(states[n - 2..], ["waking", "ready"], "{states:?}");
    assert_eq!(think["restarts"], 0);
    assert_eq!(s.count("failed"), 0);
    assert!(first >= decided);
    // The figure (a test asserts no wall-clock time): the sim loads in
    // LOAD_S and wakes in 1.5 s.
    println!(
        "decision → first think answer: {:.2} s (load {LOAD_S} s, wake 1.5 s)",
        first - decided
    );
    drop(d);
}
