//! What the benchmarks share: the simulator on a thread of its own, the
//! real vLLM beside it ([`engine`]), a scratch folder, a pipeline
//! configuration with one external instance pointing at either, and prompt
//! text.

#![allow(dead_code)]

pub mod engine;
#[path = "../../tests/common/vllm.rs"]
pub mod vllm;

use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};

use feeder_actors::Blocking;
use gpu_feeder::config::{Config, InstanceConfig, WindowSetting};
use gpu_feeder::daemon::Pipeline;
use gpu_feeder::results::FileResults;
use gpu_feeder::sim::{self, SimConfig, SimHandle};
use gpu_feeder::store::SqliteStore;

/// The multi-threaded runtime a benchmark runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The daemon's pipeline for `c`, over `store`, its results in files in
/// the configured folder.
pub async fn start_pipeline(c: &Config, store: Arc<SqliteStore>) -> Pipeline {
    let results = FileResults::new(&c.queue.results_dir).unwrap();
    Pipeline::start(
        c,
        Blocking::port(store),
        Arc::new(results),
        "bench".into(),
        None,
    )
    .await
    .unwrap()
}

/// The engine simulator on a thread and runtime of its own, as a server
/// process would be: the pipeline's work must not slow its clock.
pub async fn engine(cfg: SimConfig) -> SimHandle {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sim = sim::start(cfg).await.unwrap();
            let stop = sim.stopped();
            let _ = tx.send(sim);
            stop.await;
        });
    });
    rx.await.unwrap()
}

/// A scratch folder, in memory where the machine has /dev/shm.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    })
    .unwrap()
}

/// A configuration whose state lies in `dir`, with one external think
/// instance at `url` answering `max_tokens` tokens, its window `window`.
pub fn config(dir: &Path, url: &str, max_tokens: u32, window: WindowSetting) -> Config {
    config_serving(dir, url, "sim", max_tokens, window)
}

/// [`config`] for a server whose model is served as `served_name`.
pub fn config_serving(
    dir: &Path,
    url: &str,
    served_name: &str,
    max_tokens: u32,
    window: WindowSetting,
) -> Config {
    let mut c = Config::default();
    c.queue.db_path = dir.join("jobs.db");
    c.queue.results_dir = dir.join("results");
    c.queue.stage_dir = dir.join("stage");
    c.dispatch.window = window;
    c.dispatch.window_max = Some(1024);
    c.dispatch.external_poll_ms = 200;
    c.dispatch.request_timeout_s = 3_600;
    c.health.interval_s = 1.0;
    let inst: InstanceConfig = toml::from_str(&format!(
        "name = \"think\"\nmodel_type = \"think\"\nbackend = \"external\"\nurl = \"{url}\"\nserved_model_name = \"{served_name}\"\nmax_tokens = {max_tokens}\n",
    ))
    .unwrap();
    c.instances = vec![inst];
    c.create_state_dirs(Path::new("bench")).unwrap();
    c
}

/// A number from the environment, or `default`.
pub fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` inline think prompts tagged `tag`, each its own payload.
pub fn jobs(n: usize, tag: &str) -> Vec<feeder_actors::NewJob> {
    (0..n)
        .map(|i| {
            feeder_actors::NewJob::new(
                feeder_actors::ModelType::Think,
                feeder_actors::Payload::Inline(format!("{{\"prompt\":\"{tag} {i}\"}}")),
                format!("{tag}-{i}"),
            )
        })
        .collect()
}

/// `head`, then words of 3 to 8 random letters drawn from `seed`, cut at
/// `chars` characters: text that shares no prefix with another seed's
/// beyond the head. (A real tokenizer makes about 1.3 characters a token
/// of it; the simulator counts 4.)
pub fn words(seed: u64, head: &str, chars: usize) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut text = head.to_string();
    while text.len() < chars {
        let len = rng.random_range(3..9);
        let word: String = (0..len)
            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
            .collect();
        text.push(' ');
        text.push_str(&word);
    }
    text.truncate(chars);
    text
}

/// User plus system CPU time of process `pid` so far, all its threads, as
/// `/proc/PID/stat` gives it (fields 14 and 15, in clock ticks of 10 ms);
/// `None` once it is gone.
pub fn process_cpu(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let ticks: u64 = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ticks * 10))
}

/// `pid` and every process below it, as `/proc` shows them now.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // Field 4, the parent's pid, follows the state.
        if let Some(ppid) = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|f| f.parse::<u32>().ok())
        {
            parents.push((p, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let here = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == here)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// CPU time of `pid` and every process below it (those alive now).
pub fn tree_cpu(pid: u32) -> std::time::Duration {
    process_tree(pid).into_iter().filter_map(process_cpu).sum()
}
