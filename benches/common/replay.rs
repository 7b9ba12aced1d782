//! A fast harness for the window: the real `WindowController` against the
//! engine model (`gpu_feeder::sim::engine::Engine`) in virtual time, with
//! no server, daemon or queue between them. What the DispatchActor does
//! for the controller is done here the same way: it keeps as many requests
//! in flight as the window (and the work that has arrived) allows, sends a
//! high-priority job before the bulk, holds the bulk's sends back while it
//! runs (the dispatcher's own `PriorityHold`, unless the run is without
//! it), reads the engine's metrics every `poll_interval`, and tells the
//! controller each request's latency.
//! Requests spend the scenario's `way` between here and the engine, each
//! way. A run of 200 engine seconds takes a fraction of a second.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use feeder_actors::window::{
    EngineMetrics, PriorityHold, WindowController, WindowMode, AUTO_START,
};
use gpu_feeder::sim::engine::{Engine, EngineConfig, EngineRequest};
use tokio::time::Instant;

use super::workload::{GenJob, Scenario};

/// What one run did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Generated tokens per engine second over the whole run.
    pub tokens_per_s: f64,
    /// Preemptions in the engine.
    pub preemptions: u64,
    /// Requests finished.
    pub requests: u64,
    /// The high-priority job's submit → done (answer back here), seconds.
    pub urgent: Option<f64>,
    /// The window at the end.
    pub window: u32,
    /// The median of the engine's waiting queue, sampled every 100 ms.
    pub median_waiting: f64,
    /// Every change of the window: engine seconds, window, reason.
    pub trace: Vec<(f64, u32, String)>,
    /// Where the urgent job's time went.
    pub urgent_detail: String,
    /// Bulk requests taken back when the urgent one was sent.
    pub recalled: usize,
}

/// The id of the urgent job's request.
const URGENT_ID: u64 = u64::MAX;
/// Salt for the prompts' shared prefixes.
const SALT: u64 = 0x5eed;

fn request(j: &GenJob, id: u64) -> EngineRequest {
    EngineRequest {
        id,
        prompt: j.prompt(id, SALT),
        max_tokens: j.max_tokens,
        // As the dispatcher sends it: the urgent job's priority (100),
        // negated; the bulk's 0.
        priority: if id == URGENT_ID { -100 } else { 0 },
    }
}

/// Whether the engine runs vLLM's priority policy, as the servers the
/// feeder launches do (`--scheduling-policy priority`), unless
/// `BENCH_POLICY=fcfs` says first come first served (an external server
/// left at vLLM's default).
pub fn priority_policy() -> bool {
    std::env::var("BENCH_POLICY").as_deref() != Ok("fcfs")
}

/// The scenario's engine under the policy of [`priority_policy`].
fn engine(s: &Scenario) -> Engine {
    Engine::new(EngineConfig {
        priority_policy: priority_policy(),
        ..s.engine.clone()
    })
}

fn metrics(e: &Engine) -> EngineMetrics {
    let s = e.stats();
    EngineMetrics {
        running: e.running() as f64,
        waiting: e.waiting() as f64,
        kv_usage: e.kv_usage(),
        preemptions_total: s.preemptions as f64,
        generation_tokens_total: s.generation_tokens as f64,
        queue_time: Some((s.queue_time.sum, s.queue_time.count as f64)),
        e2e: Some((s.e2e.sum, s.e2e.count as f64)),
        kv_cache_tokens: Some(((e.num_blocks() - 1) as u64 * e.config().block_size as u64) as f64),
        prefix_cache: Some((s.prefix_hits as f64, s.prefix_queries as f64)),
    }
}

/// The urgent job's submit → done on an idle engine of the scenario.
pub fn idle_time(s: &Scenario) -> f64 {
    let mut e = engine(s);
    e.add(request(&s.urgent, URGENT_ID))
        .expect("the generator keeps requests within the KV cache");
    loop {
        let step = e.step().expect("busy until it finishes");
        if let Some(f) = step.finished.first() {
            return f.e2e + 2.0 * s.way;
        }
    }
}

/// The priority hold of a run as the dispatcher has it, unless
/// `BENCH_HOLD` says otherwise: `off`, or `FLOOR,LIFETIMES` (the share of
/// the window the held bulk keeps, and how many request lifetimes a hold
/// lasts at most).
pub fn hold() -> Option<PriorityHold> {
    let hold = match std::env::var("BENCH_HOLD").as_deref() {
        Err(_) | Ok("") => PriorityHold::default(),
        Ok("off") => return None,
        Ok(spec) => {
            let (floor, lifetimes) = spec
                .split_once(',')
                .expect("BENCH_HOLD is off or FLOOR,LIFETIMES");
            PriorityHold::new(
                floor.trim().parse().expect("a share of the window"),
                lifetimes.trim().parse().expect("a number of lifetimes"),
            )
        }
    };
    // `BENCH_RECALL=off`: the hold without taking young bulk back;
    // `BENCH_RECALL=SHARE`: taking back what is younger than that share of
    // a lifetime.
    Some(match std::env::var("BENCH_RECALL").as_deref() {
        Err(_) | Ok("") => hold,
        Ok("off") => hold.with_recall(None),
        Ok(share) => hold.with_recall(Some(share.parse().expect("off or a share of a lifetime"))),
    })
}

/// Runs scenario `s` for its seconds at window `mode`, with the
/// dispatcher's priority hold (as [`hold`] says).
pub fn run(s: &Scenario, mode: WindowMode) -> Outcome {
    run_with(s, mode, hold())
}

/// Runs scenario `s` for its seconds at window `mode`, with `hold` or
/// without one.
pub fn run_with(s: &Scenario, mode: WindowMode, mut hold: Option<PriorityHold>) -> Outcome {
    let mut e = engine(s);
    let t0 = Instant::now();
    let at = |t: f64| t0 + Duration::from_secs_f64(t);
    let mut ctl = WindowController::new(mode, AUTO_START, t0);
    let mut next_job = 0;
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut urgent_ready = false;
    let mut urgent_sent = false;
    let mut urgent_in_flight = false;
    // The urgent job: when sent, with how many in flight; engine steps
    // while it was there, their seconds and the requests they ran.
    let mut urgent_sent_at = (0.0, 0usize);
    let mut urgent_steps = (0usize, 0.0f64, 0usize);
    let mut urgent_done = None;
    // Requests on their way in (arrival, request) and their answers on
    // their way back (arrival here, sent, id): each in time order, as the
    // way is the same for all.
    let mut going: VecDeque<(f64, EngineRequest)> = VecDeque::new();
    let mut coming: VecDeque<(f64, f64, u64)> = VecDeque::new();
    let mut sent_at: HashMap<u64, f64> = HashMap::new();
    let mut in_flight = 0usize;
    let mut next_poll = 0.0;
    let mut next_sample = 0.0;
    let mut waiting = Vec::new();
    let mut out = Outcome::default();
    let mut last_window = (ctl.window(), ctl.reason().to_string());
    let tracing = std::env::var("BENCH_TRACE").is_ok();
    while e.now() < s.seconds {
        let now = e.now();
        while s.jobs.get(next_job).is_some_and(|j| j.arrival <= now) {
            queue.push_back(next_job);
            next_job += 1;
        }
        if !urgent_sent && now >= s.urgent.arrival {
            urgent_ready = true;
        }
        while coming.front().is_some_and(|(back, _, _)| *back <= now) {
            let (back, sent, id) = coming.pop_front().unwrap();
            in_flight -= 1;
            let latency = Duration::from_secs_f64(back - sent);
            ctl.on_latency(at(back), latency);
            if let Some(h) = hold.as_mut() {
                h.on_latency(latency);
            }
            if id == URGENT_ID {
                urgent_done = Some(back - s.urgent.arrival);
                urgent_in_flight = false;
            }
        }
        if now >= next_poll {
            ctl.on_metrics(at(now), metrics(&e), in_flight);
            next_poll = now + ctl.poll_interval().as_secs_f64();
            if tracing && (ctl.window(), ctl.reason()) != (last_window.0, &last_window.1) {
                out.trace
                    .push((now, ctl.window(), ctl.reason().to_string()));
                last_window = (ctl.window(), ctl.reason().to_string());
            }
        }
        if now >= next_sample {
            waiting.push(e.waiting() as f64);
            next_sample += 0.1;
        }
        let urgent_jumps = hold
            .as_ref()
            .is_some_and(|h| h.jumps(ctl.window(), in_flight > 0, 0));
        while in_flight < ctl.window() as usize || (urgent_ready && !urgent_sent && urgent_jumps) {
            let (job, id) = if urgent_ready && !urgent_sent {
                urgent_sent = true;
                urgent_in_flight = true;
                // The young bulk requests are taken back, as the
                // dispatcher does: out of the way, or out of the engine.
                if let Some(h) = hold.as_ref() {
                    let mut back = h.recall(at(now), sent_at.iter().map(|(&id, &t)| (id, at(t))));
                    back.sort_unstable();
                    for &id in back.iter().rev() {
                        if let Some(i) = going.iter().position(|(_, r)| r.id == id) {
                            going.remove(i);
                        } else {
                            e.abort(id);
                        }
                        sent_at.remove(&id);
                        in_flight -= 1;
                        queue.push_front(id as usize);
                    }
                    out.recalled += back.len();
                }
                urgent_sent_at = (now - s.urgent.arrival, in_flight);
                (&s.urgent, URGENT_ID)
            } else if let Some(i) = queue.front().copied() {
                let above = usize::from(urgent_in_flight);
                if let Some(h) = hold.as_mut() {
                    if !h.admits(at(now), above, in_flight - above, ctl.window()) {
                        break;
                    }
                }
                queue.pop_front();
                (&s.jobs[i], i as u64)
            } else {
                break;
            };
            in_flight += 1;
            sent_at.insert(id, now);
            going.push_back((now + s.way, request(job, id)));
        }
        while going.front().is_some_and(|(arrive, _)| *arrive <= now) {
            let (arrive, r) = going.pop_front().unwrap();
            if let Err((r, _)) = e.add_at(r, arrive) {
                // Never for the generator's jobs: answered at once.
                let sent = sent_at.remove(&r.id).unwrap_or(now);
                coming.push_back((now + s.way, sent, r.id));
            }
        }
        let urgent_inside = urgent_in_flight && sent_at.contains_key(&URGENT_ID);
        if let Some(step) = e.step() {
            if urgent_inside {
                urgent_steps.0 += 1;
                urgent_steps.1 += step.duration;
                urgent_steps.2 += e.running();
            }
            for f in step.finished {
                if f.id == URGENT_ID {
                    out.urgent_detail = format!(
                        "urgent: sent after {:.2}s beside {} in flight ({} young taken back); in the engine {:.2}s (queued {:.2}s, first token {:.2}s, {} preemptions, {} tokens in, {} out); {} steps of {:.1} ms running {:.0} on average",
                        urgent_sent_at.0,
                        urgent_sent_at.1,
                        out.recalled,
                        f.e2e,
                        f.queued,
                        f.ttft,
                        f.preemptions,
                        f.prompt_tokens,
                        f.generated,
                        urgent_steps.0,
                        1000.0 * urgent_steps.1 / urgent_steps.0.max(1) as f64,
                        urgent_steps.2 as f64 / urgent_steps.0.max(1) as f64,
                    );
                }
                let sent = sent_at.remove(&f.id).unwrap_or(now);
                coming.push_back((e.now() + s.way, sent, f.id));
            }
            continue;
        }
        // Idle: on to the next thing that happens.
        let next = [
            s.jobs.get(next_job).map(|j| j.arrival),
            (!urgent_sent).then_some(s.urgent.arrival),
            going.front().map(|(t, _)| *t),
            coming.front().map(|(t, _, _)| *t),
            Some(next_poll),
            hold.as_ref()
                .and_then(|h| h.ends_at())
                .map(|t| t.duration_since(t0).as_secs_f64()),
            Some(s.seconds),
        ]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
        e.advance_to(next.max(now + 1e-6));
    }
    let st = e.stats();
    out.tokens_per_s = st.generation_tokens as f64 / e.now();
    out.preemptions = st.preemptions;
    out.requests = st.successes;
    out.urgent = urgent_done;
    out.window = ctl.window();
    waiting.sort_by(f64::total_cmp);
    out.median_waiting = waiting.get(waiting.len() / 2).copied().unwrap_or(0.0);
    out
}
