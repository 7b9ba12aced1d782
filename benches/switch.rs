//! Model switches by vLLM's sleep mode against switches by relaunching:
//! prints figures, asserts nothing.
//!
//!     cargo bench --bench switch
//!     BENCH_SWITCHES=4 cargo bench --bench switch     # fewer sleep-mode switches
//!
//! Two `gpu-feeder sim` processes, as the process backend launches them
//! (`--load-s 30 --wake-s 1.5 --sleep-s 0.3 --latency-ms 200`), one vision
//! and one think instance on the same GPU share, the allocator deciding
//! every 0.2 s with `min_dwell_s = 1`. Work comes in phases of one kind:
//! vision, then think, then vision again, and so on; each phase's 40 jobs
//! are done before the next arrives. For every switch that brings a model
//! in, the time from the allocator's decision (the strategy change) to the
//! first job of the incoming model answered (its `finished_at`). The same
//! run twice: with `sleep_mode = true` (the outgoing model is drained and put
//! to sleep, the incoming one woken and canaried), `BENCH_SWITCHES` (10)
//! switches; and without (the outgoing server stopped, the incoming one
//! launched: a 30 s load), 2 switches. Then the jobs failed and lost (not
//! done) over each run, and the switch costs the allocator learnt.
//!
//! Then a cold start, with sleep mode: vision work queued before the
//! daemon starts, so that the allocator chooses vision while think still
//! loads; once the vision work is done, think work. Printed: decision →
//! first think answer, and how many times think was launched (1: loaded
//! once, parked by a sleep; 2: stopped while it loaded, loaded again).
//!
//!     BENCH_ONLY=cold cargo bench --bench switch    # the cold start alone

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use feeder_actors::handle::FeederHandle;
use feeder_actors::{BlockingJobStore, JobStatus, ListFilter, ModelType, Timestamp};
use gpu_feeder::config::Config;
use gpu_feeder::store::SqliteStore;

const PER_PHASE: usize = 40;
const LIMIT: Duration = Duration::from_secs(180);

fn config(dir: &std::path::Path, sleep: bool) -> Config {
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let instance = |name: &str| {
        format!(
            "[[instances]]\nname = \"{name}\"\nmodel_type = \"{name}\"\nbackend = \"process\"\n\
             port = {}\nserved_model_name = \"sim-{name}\"\n\
             command = [\"{}\", \"sim\", \"--load-s\", \"30\", \"--wake-s\", \"1.5\", \
             \"--sleep-s\", \"0.3\", \"--latency-ms\", \"200\"]\n\
             gpu_ids = []\ngpu_memory_utilization = 0.4\nmax_tokens = 8\n\
             sleep_mode = {sleep}\nsleep_level = 1\n\n",
            port(),
            env!("CARGO_BIN_EXE_gpu-feeder"),
        )
    };
    let text = format!(
        "[queue]\ndb_path = \"{d}/jobs.db\"\nresults_dir = \"{d}/results\"\nstage_dir = \"{d}/stage\"\n\n\
         [dispatch]\nexternal_poll_ms = 50\n\n\
         [health]\ninterval_s = 0.2\nrestart_backoff_s = 0.2\n\n\
         [servers]\nstate_dir = \"{d}/servers\"\nstop_grace_s = 2\nkeep_servers_on_exit = false\n\n\
         [gpu]\nenabled = false\n\n\
         [allocator]\ninterval_s = 0.2\nmin_dwell_s = 1\n\
         shared_memory_utilization = 0.4\nsolo_memory_utilization = 0.4\n\n{}{}",
        instance("vision"),
        instance("think"),
        d = dir.display(),
    );
    let c = Config::parse(&text, &dir.join("feeder.toml")).unwrap();
    c.create_state_dirs(std::path::Path::new("bench")).unwrap();
    c
}

fn jobs(model: ModelType, tag: &str) -> Vec<feeder_actors::NewJob> {
    (0..PER_PHASE)
        .map(|i| {
            let payload = serde_json::json!({ "prompt": format!("{tag} job {i}") });
            feeder_actors::NewJob::new(
                model,
                feeder_actors::Payload::Inline(payload.to_string()),
                format!("{tag}-{i}"),
            )
        })
        .collect()
}

struct Run {
    /// Decision → first answer of the incoming model, per switch.
    switches: Vec<(ModelType, Duration)>,
    failed: usize,
    lost: usize,
    costs: String,
}

async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{what} did not happen within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(sleep: bool, switches: usize) -> Run {
    let dir = common::scratch();
    let c = config(dir.path(), sleep);
    let store = Arc::new(SqliteStore::open(&c.queue.db_path).unwrap());
    let p = common::start_pipeline(&c, store.clone()).await;
    let feeder = FeederHandle::new(p.feeder.clone());
    poll("both servers ready", async || {
        let st = feeder.status().await.ok()?;
        (st.instances.len() == 2
            && st
                .instances
                .iter()
                .all(|i| i.state == feeder_actors::container::InstanceState::Ready))
        .then_some(())
    })
    .await;
    let mut measured = Vec::new();
    for phase in 0..=switches {
        let model = if phase % 2 == 0 {
            ModelType::Vision
        } else {
            ModelType::Think
        };
        let submitted = SystemTime::now();
        feeder
            .submit(jobs(model, &format!("p{phase}")))
            .await
            .unwrap();
        // The decision: the strategy that serves this model alone.
        let decided: SystemTime = poll("the switch", async || {
            let a = feeder.status().await.ok()?.allocator?;
            (a.strategy.as_str() == model.as_str() && a.since >= submitted).then_some(a.since)
        })
        .await;
        let first = poll("the first answer", async || {
            let done = store
                .list(&ListFilter {
                    status: Some(JobStatus::Done),
                    model_type: Some(model),
                    parent_id: None,
                    lease_ended_before: None,
                    limit: 1_000_000,
                })
                .ok()?;
            let at = Timestamp::from_secs_f64(
                decided
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64(),
            );
            done.iter()
                .filter_map(|j| j.finished_at)
                .filter(|f| *f >= at)
                .min()
                .map(|f| f.since(at))
        })
        .await;
        if phase > 0 {
            measured.push((model, first));
        }
        poll("the phase's jobs done", async || {
            let s = store.stats(Timestamp::now()).ok()?.model(model);
            (s.counts.done as usize >= PER_PHASE * (phase / 2 + 1)).then_some(())
        })
        .await;
    }
    let a = feeder.status().await.unwrap().allocator.unwrap();
    let costs = a
        .costs
        .iter()
        .map(|c| {
            format!(
                "{}: load {}, wake {}",
                c.model,
                c.load
                    .map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
                c.wake
                    .map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    p.shutdown(Duration::from_secs(5)).await;
    let all = store
        .list(&ListFilter {
            status: None,
            model_type: None,
            parent_id: None,
            lease_ended_before: None,
            limit: 1_000_000,
        })
        .unwrap();
    Run {
        switches: measured,
        failed: all.iter().filter(|j| j.status == JobStatus::Failed).count(),
        lost: (switches + 1) * PER_PHASE
            - all.iter().filter(|j| j.status == JobStatus::Done).count(),
        costs,
    }
}

/// What the cold start measured.
struct Cold {
    /// Decision → first think answer.
    first: Duration,
    /// Launches of think's server over the run.
    launches: usize,
    /// Think's states, in order.
    states: Vec<String>,
}

/// The cold start: vision work waits when the daemon starts, think work
/// comes once it is done.
async fn cold() -> Cold {
    let dir = common::scratch();
    let c = config(dir.path(), true);
    let store = Arc::new(SqliteStore::open(&c.queue.db_path).unwrap());
    store
        .submit_batch(jobs(ModelType::Vision, "cold-v"), Timestamp::now())
        .unwrap();
    let p = common::start_pipeline(&c, store.clone()).await;
    let feeder = FeederHandle::new(p.feeder.clone());
    poll("the vision work done", async || {
        let s = store.stats(Timestamp::now()).ok()?.model(ModelType::Vision);
        (s.counts.done as usize >= PER_PHASE).then_some(())
    })
    .await;
    poll("think parked", async || {
        use feeder_actors::container::InstanceState;
        let st = feeder.status().await.ok()?;
        let think = st.instances.iter().find(|i| i.name == "think")?;
        let asleep = think.state == InstanceState::Sleeping && think.reason.starts_with("asleep");
        (asleep || think.state == InstanceState::Stopped).then_some(())
    })
    .await;
    let submitted = SystemTime::now();
    feeder
        .submit(jobs(ModelType::Think, "cold-t"))
        .await
        .unwrap();
    let decided: SystemTime = poll("the switch", async || {
        let a = feeder.status().await.ok()?.allocator?;
        (a.strategy == feeder_actors::allocator::Strategy::Think && a.since >= submitted)
            .then_some(a.since)
    })
    .await;
    let at = Timestamp::from_secs_f64(
        decided
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64(),
    );
    let first = poll("the first think answer", async || {
        let done = store
            .list(&ListFilter {
                status: Some(JobStatus::Done),
                model_type: Some(ModelType::Think),
                parent_id: None,
                lease_ended_before: None,
                limit: 1_000_000,
            })
            .ok()?;
        done.iter()
            .filter_map(|j| j.finished_at)
            .min()
            .map(|f| f.since(at))
    })
    .await;
    let st = feeder.status().await.unwrap();
    let think = st.instances.iter().find(|i| i.name == "think").unwrap();
    let states: Vec<String> = think.history.iter().map(|t| t.to.to_string()).collect();
    let launches = states.iter().filter(|s| *s == "starting").count();
    p.shutdown(Duration::from_secs(5)).await;
    Cold {
        first,
        launches,
        states,
    }
}

fn print_cold(c: &Cold) {
    println!(
        "cold start with sleep mode (vision work queued at start, then think work): \
         decision → first think answer {:.2} s; think launched {} time{}",
        c.first.as_secs_f64(),
        c.launches,
        if c.launches == 1 { "" } else { "s" }
    );
    println!("  think's states: {}", c.states.join(" → "));
}

fn main() {
    let switches = common::env_f64("BENCH_SWITCHES", 10.0) as usize;
    let rt = common::runtime();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("cold") {
        print_cold(&rt.block_on(cold()));
        return;
    }
    println!(
        "two sim processes (--load-s 30 --wake-s 1.5 --sleep-s 0.3 --latency-ms 200), \
         phases of {PER_PHASE} jobs of one kind; decision → first answer of the incoming model"
    );
    let by_sleep = rt.block_on(run(true, switches));
    let by_relaunch = rt.block_on(run(false, 2));
    println!(
        "  {:<8} {:<10} {:>22} {:>22}",
        "switch", "incoming", "sleep mode", "relaunching"
    );
    for (i, (model, t)) in by_sleep.switches.iter().enumerate() {
        let other = by_relaunch
            .switches
            .get(i)
            .map_or("-".to_string(), |(_, r)| {
                format!("{:.2} s", r.as_secs_f64())
            });
        println!(
            "  {:<8} {:<10} {:>20.2} s {:>22}",
            i + 1,
            model.as_str(),
            t.as_secs_f64(),
            other
        );
    }
    let worst = |r: &Run| {
        r.switches
            .iter()
            .map(|(_, t)| t.as_secs_f64())
            .fold(0.0, f64::max)
    };
    println!(
        "  {:<19} {:>20.2} s {:>20.2} s",
        "worst",
        worst(&by_sleep),
        worst(&by_relaunch)
    );
    println!(
        "  {:<19} {:>22} {:>22}",
        "jobs failed / lost",
        format!("{} / {}", by_sleep.failed, by_sleep.lost),
        format!("{} / {}", by_relaunch.failed, by_relaunch.lost)
    );
    println!("  learnt, sleep mode:  {}", by_sleep.costs);
    println!("  learnt, relaunching: {}", by_relaunch.costs);
    print_cold(&rt.block_on(cold()));
}
