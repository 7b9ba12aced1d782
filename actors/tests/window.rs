//! The adaptive window at message level: a DispatchActor with
//! `WindowMode::Auto` against `FakeEngine`, whose latency and metrics follow
//! a small engine model, under paused time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;

use common::{feeder_args, spawn_feeder};
use feeder_actors::dispatch::DispatchStatus;
use feeder_actors::handle::FeederHandle;
use feeder_actors::spec::InstanceSpec;
use feeder_actors::supervisor::{FeederMsg, PipelineSettings};
use feeder_actors::testkit::{FakeEngine, FakeEngineShape, MemoryResults, MemoryStore};
use feeder_actors::window::{EngineMetrics, WindowController, WindowMode};
use feeder_actors::{BlockingJobStore, ModelType, NewJob, Payload, Timestamp};

const T0: Timestamp = Timestamp(1_700_000_000_000);

struct Lab {
    feeder: ActorRef<FeederMsg>,
    engine: FakeEngine,
}

impl Lab {
    async fn start(shape: FakeEngineShape, max: u32, jobs: usize) -> Lab {
        let store = MemoryStore::new();
        let batch = (0..jobs)
            .map(|i| {
                NewJob::new(
                    ModelType::Think,
                    Payload::Inline(format!("{{\"prompt\":\"bulk {i}\"}}")),
                    format!("bulk-{i}"),
                )
            })
            .collect();
        store.submit_batch(batch, T0).unwrap();
        let engine = FakeEngine::new(shape, 7);
        let think = InstanceSpec::external(
            "think",
            ModelType::Think,
            WindowMode::Auto { max },
            Arc::new(engine.clone()),
        );
        let settings = PipelineSettings {
            health_interval: Duration::from_secs(1),
            ..PipelineSettings::default()
        };
        let results = Arc::new(MemoryResults::new());
        let args = feeder_args(&store, results, vec![think], "test-host", settings);
        let feeder = spawn_feeder(args).await;
        Lab { feeder, engine }
    }

    async fn dispatch(&self) -> DispatchStatus {
        let st = FeederHandle::new(self.feeder.clone())
            .status()
            .await
            .expect("the supervisor answers");
        st.dispatch
            .into_iter()
            .find(|d| d.instance == "think")
            .expect("the dispatcher runs")
    }

    /// The window each second for `secs` seconds of paused time.
    async fn watch(&self, secs: u64) -> Vec<u32> {
        self.watch_queue(secs).await.0
    }

    /// The window, and the requests waiting inside the server, each second.
    async fn watch_queue(&self, secs: u64) -> (Vec<u32>, Vec<usize>) {
        let (mut ws, mut queued) = (Vec::new(), Vec::new());
        for _ in 0..secs {
            tokio::time::sleep(Duration::from_secs(1)).await;
            ws.push(self.dispatch().await.window);
            queued.push(self.engine.load().1);
        }
        (ws, queued)
    }
}

fn spread(ws: &[u32]) -> (u32, u32) {
    (*ws.iter().min().unwrap(), *ws.iter().max().unwrap())
}

#[tokio::test(start_paused = true)]
async fn converges_from_below_to_the_servers_slots_without_a_queue() {
    let lab = Lab::start(FakeEngineShape::default(), 1024, 30_000).await;
    let first = lab.dispatch().await.window;
    let (ws, mut queued) = lab.watch_queue(40).await;
    // 256 slots: the window ends there, plus the small allowance, and stays
    // (but for a probe an eighth higher every 30 s, which the server's
    // queue sends back).
    let settled = &ws[20..];
    let at_slots = settled.iter().filter(|w| (240..=272).contains(*w)).count();
    assert!(at_slots >= settled.len() - 2, "windows {ws:?}");
    let d = lab.dispatch().await;
    assert!(d.auto_window);
    assert_eq!(lab.engine.preemptions(), 0.0);
    assert!(d.window_signals.metrics.is_some(), "the metrics were read");
    // What waits inside the server is the allowance of 1/32 of the window.
    let settled_queue = &mut queued[20..];
    settled_queue.sort_unstable();
    let median = settled_queue[settled_queue.len() / 2];
    assert!(median <= 9, "the server keeps a queue: {queued:?}");
    assert_eq!(
        first,
        feeder_actors::window::AUTO_START,
        "it starts at 16 and grows"
    );
}

#[tokio::test(start_paused = true)]
async fn converges_from_above_when_the_server_shrinks_and_its_queue_grows() {
    let lab = Lab::start(FakeEngineShape::default(), 1024, 60_000).await;
    let before = lab.watch(30).await;
    assert!(*before.last().unwrap() >= 240, "{before:?}");
    // The server now runs at most 64 at once: the rest queue inside it.
    lab.engine.reshape(|s| s.max_seqs = 64);
    let after = lab.watch(30).await;
    let settled = &after[15..];
    let at_slots = settled.iter().filter(|w| (60..=80).contains(*w)).count();
    assert!(
        at_slots >= settled.len() - 2,
        "windows after the change {after:?}"
    );
    let d = lab.dispatch().await;
    assert!(
        d.window_reason.contains("queues") || d.window_reason.contains("knee"),
        "{}",
        d.window_reason
    );
    let (_, waiting) = lab.engine.load();
    assert!(waiting <= 8, "the server still queues {waiting}");
}

#[tokio::test(start_paused = true)]
async fn backs_off_on_preemptions_and_stays_under_the_kv_limit() {
    let shape = FakeEngineShape {
        kv_seqs: 100,
        ..FakeEngineShape::default()
    };
    let lab = Lab::start(shape, 1024, 30_000).await;
    let ws = lab.watch(30).await;
    // The KV cache's reading keeps the window under what it holds.
    assert!(spread(&ws[20..]).1 <= 100, "past the KV limit: {ws:?}");
    assert_eq!(lab.engine.preemptions(), 0.0, "{ws:?}");
    // The cache shrinks under the window (another process took memory):
    // what runs no longer fits, and the server preempts.
    lab.engine.reshape(|s| s.kv_seqs = 60);
    let mut seen = Vec::new();
    for _ in 0..90 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let d = lab.dispatch().await;
        seen.push((d.window, d.window_signals.ceiling, lab.engine.preemptions()));
    }
    let preempted = lab.engine.preemptions();
    assert!(preempted > 0.0, "the engine never preempted: {seen:?}");
    // The back-off fired: a ceiling, and the window under it while it held.
    let first = seen
        .iter()
        .position(|(_, c, _)| c.is_some())
        .unwrap_or_else(|| panic!("no ceiling was set: {seen:?}"));
    for (w, c, _) in &seen {
        if let Some(c) = c {
            assert!(w <= c, "window {w} above its ceiling {c}: {seen:?}");
        }
    }
    // Held for its minute (a later preemption may renew it, never shorten it).
    assert!(
        seen[first..(first + 55).min(seen.len())]
            .iter()
            .all(|(_, c, _)| c.is_some()),
        "the ceiling did not hold for a minute: {seen:?}"
    );
    // It settled under the smaller cache, and the preemptions stopped.
    let last = &seen[60..];
    assert!(
        last.iter().all(|(w, _, _)| *w <= 60),
        "the window stayed past the KV limit: {seen:?}"
    );
    assert!(
        last.iter().all(|(w, _, _)| *w >= 40),
        "it backed off too far: {seen:?}"
    );
    assert_eq!(last[0].2, preempted, "still preempting: {seen:?}");
}

#[tokio::test(start_paused = true)]
async fn holds_steady_under_noisy_metrics() {
    let shape = FakeEngineShape {
        noise: 0.15,
        max_seqs: 1024,
        ..FakeEngineShape::default()
    };
    let lab = Lab::start(shape, 400, 60_000).await;
    lab.watch(30).await;
    let ws = lab.watch(40).await;
    let (lo, hi) = spread(&ws);
    assert!(
        hi as f64 <= lo as f64 * 1.15,
        "the window wandered under noise: {ws:?}"
    );
    let changes = ws.windows(2).filter(|p| p[0] != p[1]).count();
    assert!(changes <= 4, "{changes} changes in 40 s: {ws:?}");
    assert!(lo >= 100, "noise kept it low: {ws:?}");
}

#[tokio::test(start_paused = true)]
async fn without_metrics_a_latency_rule_sizes_the_window() {
    let shape = FakeEngineShape {
        metrics: false,
        max_seqs: 64,
        ..FakeEngineShape::default()
    };
    let lab = Lab::start(shape, 1024, 30_000).await;
    let ws = lab.watch(60).await;
    let d = lab.dispatch().await;
    assert!(
        d.window_reason.contains("no /metrics"),
        "{}",
        d.window_reason
    );
    assert!(d.window_signals.metrics.is_none());
    assert!(d.window_signals.median_latency.is_some());
    // It grew from 16, and stopped where requests started to queue inside
    // the server (64 slots): latency doubles not far past that.
    let (lo, hi) = spread(&ws[30..]);
    assert!(lo >= 48 && hi <= 160, "windows {ws:?}");
    assert!(ws[0] <= 20, "{ws:?}");
}

/// A server as the real vLLM on a few CPU cores looks from here: `slots`
/// requests run at once, each for `service`, all of the same length, so
/// that those that start together end together (waves); a request takes
/// `way` to get from here into the server's queue (its front end's work)
/// and its answer as long to come back and be replaced. Each running
/// request makes `tokens_per_s`. Driven by the controller alone (no actors),
/// in steps of 5 ms.
struct WavyServer {
    slots: usize,
    service: f64,
    way: f64,
    tokens_per_s: f64,
    /// When each request on its way in arrives.
    coming: std::collections::VecDeque<(f64, f64)>,
    waiting: std::collections::VecDeque<f64>,
    /// When each running request ends, and when it was sent.
    running: Vec<(f64, f64)>,
    /// When each answer on its way back arrives, and when it was sent.
    going: Vec<(f64, f64)>,
    generated: f64,
}

impl WavyServer {
    fn new(slots: usize, service: f64, way: f64) -> Self {
        WavyServer {
            slots,
            service,
            way,
            tokens_per_s: 60.0,
            coming: Default::default(),
            waiting: Default::default(),
            running: Vec::new(),
            going: Vec::new(),
            generated: 0.0,
        }
    }

    fn in_flight(&self) -> usize {
        self.coming.len() + self.waiting.len() + self.running.len() + self.going.len()
    }

    fn metrics(&self) -> EngineMetrics {
        EngineMetrics {
            running: self.running.len() as f64,
            waiting: self.waiting.len() as f64,
            kv_usage: self.running.len() as f64 / (self.slots as f64 * 2.0),
            generation_tokens_total: self.generated,
            ..EngineMetrics::default()
        }
    }

    /// Runs `secs` at `window` (or the controller's), returning the tokens
    /// per second over the last half, and the server's median queue then.
    fn run(
        &mut self,
        mut ctl: Option<&mut WindowController>,
        window: u32,
        secs: f64,
    ) -> (f64, f64) {
        let t0 = tokio::time::Instant::now();
        let dt = 0.005;
        let (mut t, mut next_poll) = (0.0, 0.0);
        let mut half = None;
        let mut queues = Vec::new();
        while t < secs {
            t += dt;
            // Answers back; their latencies to the controller.
            let now = t0 + Duration::from_secs_f64(t);
            let back: Vec<f64> = self
                .going
                .iter()
                .filter(|(at, _)| *at <= t)
                .map(|(_, sent)| *sent)
                .collect();
            self.going.retain(|(at, _)| *at > t);
            if let Some(c) = ctl.as_deref_mut() {
                for sent in back {
                    c.on_latency(now, Duration::from_secs_f64(t - sent));
                }
            }
            // Arrivals into the queue, admissions, ends.
            while self.coming.front().is_some_and(|(at, _)| *at <= t) {
                let (_, sent) = self.coming.pop_front().unwrap();
                self.waiting.push_back(sent);
            }
            let ended: Vec<(f64, f64)> = self
                .running
                .iter()
                .copied()
                .filter(|(end, _)| *end <= t)
                .collect();
            self.running.retain(|(end, _)| *end > t);
            for (_, sent) in ended {
                self.going.push((t + self.way, sent));
            }
            while self.running.len() < self.slots {
                let Some(sent) = self.waiting.pop_front() else {
                    break;
                };
                self.running.push((t + self.service, sent));
            }
            self.generated += self.running.len() as f64 * self.tokens_per_s * dt;
            // The window, refilled at once.
            let w = ctl.as_deref().map_or(window, |c| c.window()) as usize;
            while self.in_flight() < w {
                self.coming.push_back((t + self.way, t));
            }
            if t >= next_poll {
                let m = self.metrics();
                if let Some(c) = ctl.as_deref_mut() {
                    c.on_metrics(now, m, self.in_flight());
                    next_poll = t + c.poll_interval().as_secs_f64();
                } else {
                    next_poll = t + 0.25;
                }
                if t >= secs / 2.0 {
                    queues.push(m.waiting);
                }
            }
            if half.is_none() && t >= secs / 2.0 {
                half = Some((t, self.generated));
            }
        }
        let (th, gh) = half.unwrap();
        queues.sort_by(f64::total_cmp);
        ((self.generated - gh) / (t - th), queues[queues.len() / 2])
    }
}

#[test]
fn keeps_a_server_whose_requests_end_in_waves_busy_with_a_short_queue() {
    // 64 slots, 0.5 s a request, 60 ms each way: a tenth of a request's
    // life is spent outside the server, where the sim's requests spend none.
    let (slots, service, way) = (64, 0.5, 0.06);
    let fixed: Vec<(u32, f64)> = [64, 72, 80, 96, 128, 192]
        .into_iter()
        .map(|w| (w, WavyServer::new(slots, service, way).run(None, w, 60.0).0))
        .collect();
    let best = fixed.iter().map(|(_, r)| *r).fold(0.0, f64::max);
    let mut c = WindowController::new(
        WindowMode::Auto { max: 1024 },
        16,
        tokio::time::Instant::now(),
    );
    let (rate, queue) = WavyServer::new(slots, service, way).run(Some(&mut c), 0, 60.0);
    assert!(
        rate >= 0.95 * best,
        "auto made {rate:.0} tokens/s at {} ({}), the best fixed window {best:.0}: {fixed:?}",
        c.window(),
        c.reason()
    );
    // Its queue inside the server stays short: under half of what it
    // runs (the controller keeps one as deep as what is on its way).
    assert!(
        queue < slots as f64 / 2.0,
        "the server queued {queue} at {}: {}",
        c.window(),
        c.reason()
    );
}
