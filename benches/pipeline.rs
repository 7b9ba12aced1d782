//! Pipeline figures: prints them, asserts nothing.
//!
//!     cargo bench --bench pipeline                 # all four
//!     cargo bench --bench pipeline -- throughput   # or saturation, arrival, peer
//!     cargo bench --bench pipeline -- vllm         # only when named
//!
//! 1. End-to-end jobs/s against a simulated server with zero latency, beside
//!    the raw HTTP rate of the same server measured in the same run.
//! 2. Saturation: a server with --max-num-seqs 8 and 200 ms per request;
//!    achieved throughput over the ideal 8 / 0.2 s = 40 jobs/s.
//! 3. Submit → request arrival at the server on an idle system: p50 and p99
//!    for in-process submission and for a row inserted by another connection
//!    (as another program would), with `external_poll_ms = 200`.
//! 4. Processes: `gpu-feeder run` beside the hand-written peer
//!    (`benches/peer_feeder.py`, asyncio + SQLite + aiohttp), each its own
//!    process against `gpu-feeder sim` in another, on the same jobs: jobs/s
//!    and CPU per job (user + system time of the feeder's process, read
//!    from `/proc/PID/stat`, divided by the jobs it finished). See [`peer`].
//! 5. `vllm`, run only when named: the daemon's CPU time beside the real
//!    vLLM's (CPU build) over the same run.

mod common;
#[path = "pipeline/peer.rs"]
mod peer;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::ActorRef;

use feeder_actors::queue::QueueMsg;
use feeder_actors::supervisor::{peers, FeederMsg};
use feeder_actors::{BlockingJobStore, ModelType, Timestamp};
use gpu_feeder::config::{Config, InstanceConfig};
use gpu_feeder::daemon::Pipeline;
use gpu_feeder::sim::{self, SimConfig, SimHandle};
use gpu_feeder::store::SqliteStore;

fn config(dir: &Path, url: &str, window: u32) -> Config {
    let mut c = Config::default();
    c.queue.db_path = dir.join("jobs.db");
    c.queue.results_dir = dir.join("results");
    c.queue.stage_dir = dir.join("stage");
    c.dispatch.window = gpu_feeder::config::WindowSetting::Fixed(window);
    c.dispatch.external_poll_ms = 200;
    c.health.interval_s = 1.0;
    let inst: InstanceConfig = toml::from_str(&format!(
        "name = \"think\"\nmodel_type = \"think\"\nbackend = \"external\"\nurl = \"{url}\"\nserved_model_name = \"sim\"\nmax_tokens = 16\n"
    ))
    .unwrap();
    c.instances = vec![inst];
    c.create_state_dirs(Path::new("bench")).unwrap();
    c
}

/// The pipeline for `c` once its instance is ready, a second connection to
/// its store, and its QueueActor.
async fn start(c: &Config) -> (Pipeline, SqliteStore, ActorRef<QueueMsg>) {
    let store = SqliteStore::open(&c.queue.db_path).unwrap();
    let p = common::start_pipeline(c, Arc::new(store)).await;
    // Wait until the instance is Ready.
    loop {
        if let Ok(CallResult::Success(s)) = p
            .feeder
            .call(|r| FeederMsg::Status { reply: r }, None)
            .await
        {
            if s.health.iter().all(|h| h.ready) && !s.health.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peers = peers(&p.feeder, Duration::from_secs(5))
        .await
        .expect("the supervisor answers");
    (p, SqliteStore::open(&c.queue.db_path).unwrap(), peers.queue)
}

async fn wait_done(store: &SqliteStore, n: u64) {
    loop {
        let s = store
            .stats(Timestamp::now())
            .unwrap()
            .model(ModelType::Think)
            .counts;
        if s.done + s.failed >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(if n > 1000 { 100 } else { 5 })).await;
    }
}

async fn raw_http_rate(sim: &SimHandle, total: usize, concurrency: usize) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let url = format!("{}/v1/chat/completions", sim.url());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..total).step_by(concurrency) {
                let body = serde_json::json!({"model": "sim", "max_tokens": 16, "messages": [{"role": "user", "content": format!("raw {i}")}]});
                let r = client.post(&url).json(&body).send().await.unwrap();
                assert!(r.status().is_success());
                let _ = r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn throughput() {
    println!("\n1. end-to-end throughput, zero-latency sim");
    let sim = sim::start(SimConfig::default()).await.unwrap();
    let raw = raw_http_rate(&sim, 20_000, 64).await;
    println!("   raw HTTP to the sim (64 concurrent, keep-alive): {raw:>8.0} requests/s");
    // Results on the working disk, then on tmpfs (/dev/shm) to separate the
    // feeder's own cost from the file system's cost of creating a file per job.
    let shm = Path::new("/dev/shm");
    for (window, on) in [(16u32, "disk"), (64, "disk"), (16, "tmpfs"), (64, "tmpfs")] {
        if on == "tmpfs" && !shm.is_dir() {
            continue;
        }
        let dir = if on == "tmpfs" {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let c = config(dir.path(), &sim.url(), window);
        let n = 20_000;
        let (p, store, queue) = start(&c).await;
        let t0 = Instant::now();
        let batch = common::jobs(n, &format!("w{window}"));
        queue
            .call(
                |r| QueueMsg::Submit {
                    jobs: batch,
                    reply: r,
                },
                None,
            )
            .await
            .unwrap();
        let submitted = t0.elapsed();
        wait_done(&store, n as u64).await;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "   gpu-feeder, window {window:>2}, results on {on:<5}: {n} jobs in {secs:.2} s = {:>8.0} jobs/s (submission {:.2} s of it)",
            n as f64 / secs,
            submitted.as_secs_f64()
        );
        p.shutdown(Duration::from_secs(5)).await;
    }
}

async fn saturation() {
    println!("\n2. saturation: sim --max-num-seqs 8 --latency-ms 200 (ideal 40 jobs/s)");
    let sim = sim::start(SimConfig {
        max_num_seqs: 8,
        latency_ms: 200,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &sim.url(), 16);
    let (p, store, queue) = start(&c).await;
    let n = 400;
    let t0 = Instant::now();
    queue
        .call(
            |r| QueueMsg::Submit {
                jobs: common::jobs(n, "sat"),
                reply: r,
            },
            None,
        )
        .await
        .unwrap();
    wait_done(&store, n as u64).await;
    let secs = t0.elapsed().as_secs_f64();
    let achieved = n as f64 / secs;
    let ideal = 8.0 / 0.2;
    println!(
        "   {n} jobs in {secs:.2} s = {achieved:.2} jobs/s; achieved / ideal = {:.4}",
        achieved / ideal
    );
    p.shutdown(Duration::from_secs(5)).await;
}

async fn arrival() {
    println!("\n3. submit → arrival at the server, idle system");
    let sim = sim::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &sim.url(), 16);
    let (p, store, queue) = start(&c).await;
    let arrived_after = |t0: Instant, before: u64| {
        let counters = sim.counters.clone();
        async move {
            while counters.requests.load(Ordering::SeqCst) == before {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let at = counters.last_arrival.lock().unwrap().expect("an arrival");
            at.duration_since(t0).as_secs_f64() * 1000.0
        }
    };
    let mut inproc = Vec::new();
    for i in 0..300 {
        let before = sim.counters.requests.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let job = common::jobs(1, &format!("in-{i}"));
        let queue = queue.clone();
        tokio::spawn(async move {
            queue
                .call(
                    |r| QueueMsg::Submit {
                        jobs: job,
                        reply: r,
                    },
                    None,
                )
                .await
        });
        inproc.push(arrived_after(t0, before).await);
        wait_done(&store, i + 1).await;
    }
    println!(
        "   in-process submit:            p50 {:>7.2} ms   p99 {:>7.2} ms   ({} jobs)",
        percentile(&mut inproc, 0.5),
        percentile(&mut inproc, 0.99),
        inproc.len()
    );
    let other = SqliteStore::open(&c.queue.db_path).unwrap();
    let mut external = Vec::new();
    for i in 0..60u64 {
        let before = sim.counters.requests.load(Ordering::SeqCst);
        let t0 = Instant::now();
        other
            .submit(
                common::jobs(1, &format!("ext-{i}")).pop().unwrap(),
                Timestamp::now(),
            )
            .unwrap();
        external.push(arrived_after(t0, before).await);
        wait_done(&store, 300 + i + 1).await;
    }
    println!(
        "   row inserted by another conn: p50 {:>7.2} ms   p99 {:>7.2} ms   ({} jobs, external_poll_ms = 200)",
        percentile(&mut external, 0.5),
        percentile(&mut external, 0.99),
        external.len()
    );
    p.shutdown(Duration::from_secs(5)).await;
}

fn main() {
    let rt = common::runtime();
    println!(
        "pipeline benchmark ({} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    rt.block_on(async {
        if run("throughput") {
            throughput().await;
        }
        if run("saturation") {
            saturation().await;
        }
        if run("arrival") {
            arrival().await;
        }
    });
    if run("peer") {
        peer::run();
    }
    // Not in the default set: vLLM takes minutes to start on a CPU.
    if only.iter().any(|o| o == "vllm") {
        peer::vllm();
    }
}
