//! The adaptive window (`dispatch.window = "auto"`): how many requests one
//! instance gets at once, found from the server's own signals.
//!
//! The goal: the most generated tokens per second, while the server's own
//! waiting queue stays short (so that gpu-feeder, not the server, decides
//! what runs next: a high-priority job never waits behind a deep queue
//! inside the server) and preemptions stay near zero (past what the KV
//! cache holds, vLLM preempts requests and computes them again).
//!
//! Read from vLLM's `/metrics` about every second (every 250 ms
//! while it probes, every 100 ms while it doubles at the start), the
//! controller:
//! - **backs off on preemptions**: the number running when the cache ran
//!   out (the fuller of the two readings around it), less a tenth, becomes a ceiling for the next minute (once what
//!   is in flight has come down to the window: a cut takes a while);
//! - **backs off on a server queue**: when requests have waited inside the
//!   server (`vllm:num_requests_waiting` above 1/32 of the window) in every
//!   reading for 750 ms, or a request's lifetime if that is longer (and
//!   not before a request has ended: until then the lifetime is unknown,
//!   and the first requests' long prompts wait in the server for their
//!   turn to be prefilled, a queue that goes as it came), the window drops by the part of that queue it did not need: the fewest
//!   seen waiting, less the allowance, less the requests of ours that are
//!   on their way (in flight here but neither running nor waiting there).
//!   One reading may catch only requests that arrived since the server's
//!   last step. And a real server's requests spend time outside its queue
//!   (its front end's work, the answer's way back, our next request's way
//!   out): while they do, the slots they left are refilled from its queue
//!   or stay empty, so a queue as deep as what is on its way keeps the
//!   server busy (Little's law: as many as finish in that time);
//! - **holds** while the KV cache is over 92 % full, and while gpu-feeder
//!   has too little work to fill the window (growing then proves nothing);
//! - **grows** otherwise: doubling at every reading until one of those
//!   limits shows (throughput only rises until then), never past what the
//!   KV cache is projected to hold running (92 % of it, at the most one
//!   request was seen to hold; requests waiting in the server or on their
//!   way hold none; while doubling, requests are young and are taken to
//!   hold 60 % of what they will, and once they have aged a request's
//!   lifetime the rest of that room is taken at once: a server with large
//!   KV blocks, as vLLM's CPU build with 128 tokens, gives a request nearly
//!   all it will hold from the start); then an eighth at a time while each eighth buys 2 %
//!   more tokens per second, each measured over two request lifetimes at
//!   least (requests that start together end together, so a shorter
//!   measure sees a wave or the gap after it), and measured twice before it
//!   is called the knee; then it holds, and every 30 s probes an eighth
//!   higher, in case the work changed.
//!
//! A 429 or 503 halves it at once. A server without `/metrics` (llama.cpp's
//! server, say) gets a latency rule instead: grow by an eighth while the
//! median request latency stays under twice the lowest seen, shrink by an
//! eighth when it is over.
//!
//! The controller is pure: it is fed readings and times, and says what the
//! window is and why; the DispatchActor feeds it.
//!
//! Beside it, the [`PriorityHold`] decides, request by request, whether a
//! send of the bulk waits while a higher-priority request runs (`hold`).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

pub use crate::inference::EngineMetrics;

mod hold;
pub use hold::{PriorityHold, HOLD_AT_LEAST, HOLD_FLOOR, HOLD_LIFETIMES, RECALL_YOUNG};

/// How an instance's window is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowMode {
    /// Always this many (today's `window = 16`).
    Fixed(u32),
    /// Found by the controller, never above `max`.
    Auto {
        /// The most it may reach (`dispatch.window_max`).
        max: u32,
    },
}

impl WindowMode {
    /// The largest window this mode allows.
    pub fn max(&self) -> u32 {
        match *self {
            WindowMode::Fixed(n) => n.max(1),
            WindowMode::Auto { max } => max.max(1),
        }
    }
}

impl From<u32> for WindowMode {
    fn from(n: u32) -> Self {
        WindowMode::Fixed(n)
    }
}

/// The window an auto instance starts at.
pub const AUTO_START: u32 = 16;

impl EngineMetrics {
    /// The share of their time that the requests finished since `prev`
    /// spent waiting inside the server, when both readings tell.
    fn queue_share_since(&self, prev: &EngineMetrics) -> Option<f64> {
        let (qs, qc) = self.queue_time?;
        let (ps, pc) = prev.queue_time?;
        let (es, ec) = self.e2e?;
        let (pes, pec) = prev.e2e?;
        let (dq, dqc, de, dec) = (qs - ps, qc - pc, es - pes, ec - pec);
        if dqc <= 0.0 || dec <= 0.0 || de <= 0.0 {
            return None;
        }
        Some(((dq / dqc) / (de / dec)).max(0.0))
    }
}

/// What the controller read last and made of it, for `instances --json`
/// and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowSignals {
    /// The last reading, if the server has metrics.
    pub metrics: Option<EngineMetrics>,
    /// Generated tokens per second between the last two readings.
    pub tokens_per_s: Option<f64>,
    /// Preemptions between the last two readings.
    pub new_preemptions: f64,
    /// The ceiling learnt from preemptions, while it holds.
    pub ceiling: Option<u32>,
    /// The median request latency lately (the fallback rule's signal).
    pub median_latency: Option<Duration>,
    /// The share of their time that requests finished lately waited
    /// inside the server.
    pub queue_share: Option<f64>,
}

/// Where the search stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Doubling.
    SlowStart,
    /// Held where young requests would fill the KV cache, until they have
    /// aged a lifetime and show what they hold.
    Ageing,
    /// Growing by an eighth.
    Probe,
    /// At the knee (or a limit); probes again later.
    Hold,
}

/// Tokens per second measured at one window.
#[derive(Clone, Copy, Debug)]
struct Measured {
    window: u32,
    rate: f64,
}

/// The controller of one instance's window.
#[derive(Debug)]
pub struct WindowController {
    mode: WindowMode,
    window: u32,
    phase: Phase,
    /// The previous reading and when it was taken.
    last: Option<(Instant, EngineMetrics)>,
    /// The rate measured at the window before the last growth.
    before_growth: Option<Measured>,
    /// Readings to skip after a change (the batch settles).
    settle: u32,
    /// The last growth seemed to buy nothing once; it is being measured
    /// again.
    doubted: bool,
    /// Where the measurement of the present window's rate began: time and
    /// generated tokens.
    measure_from: Option<(Instant, f64)>,
    /// The most KV cache one running request held, as a share, since the
    /// window last changed (requests hold the most just before they end).
    kv_per_seq: f64,
    /// A ceiling learnt from preemptions, and until when it holds.
    ceiling: Option<(u32, Instant)>,
    /// When the window last changed, or was last probed upward.
    since: Instant,
    /// Why the window is what it is.
    reason: String,
    /// Recent request latencies (the fallback rule).
    latencies: VecDeque<Duration>,
    /// The lowest latency seen (the fallback rule's baseline).
    base_latency: Option<Duration>,
    /// The server answered `/metrics` with nothing to read.
    no_metrics: bool,
    /// Since when every reading has found requests waiting inside the
    /// server beyond the allowance, and the fewest of them seen since.
    queued: Option<(Instant, f64)>,
    /// Requests of ours on their way, neither running nor waiting inside
    /// the server (a moving average over readings).
    transit: f64,
    /// Requests the server ran, in the last readings: the most of them is
    /// what it runs at this window (one reading may catch a batch between
    /// two waves).
    recent_running: VecDeque<f64>,
    /// How long a request takes lately, as the dispatcher saw it (a moving
    /// average): the time the server's load takes to swing.
    lifetime: Option<Duration>,
    signals: WindowSignals,
}

/// How long a window's rate is measured before it is judged, at least (and
/// two request lifetimes at least).
const MEASURE_FOR: Duration = Duration::from_millis(500);
/// Readings skipped after a change before judging its effect.
const SETTLE_READINGS: u32 = 1;
/// A step of an eighth must buy this much to go on.
const STEP_GAIN: f64 = 1.02;
/// The KV cache share above which the window holds.
const KV_HIGH: f64 = 0.92;
/// After preemptions, the ceiling is this share of what ran.
const PREEMPTION_BACKOFF: f64 = 0.9;
/// How long a ceiling learnt from preemptions holds.
const CEILING_FOR: Duration = Duration::from_secs(60);
/// How often a window at its knee probes higher.
const REPROBE_AFTER: Duration = Duration::from_secs(30);
/// While doubling, the share of its final KV cache a request is assumed
/// to hold yet.
const YOUNG_KV: f64 = 0.6;
/// How long requests must keep waiting inside the server to count as a
/// queue, at least (and a request lifetime at least).
const QUEUE_FOR: Duration = Duration::from_millis(750);
/// The weight of the newest request in the lifetime's moving average.
const LIFETIME_WEIGHT: f64 = 0.05;
/// The weight of the newest reading in the moving average of requests on
/// their way.
const TRANSIT_WEIGHT: f64 = 0.1;
/// Readings whose running count is kept.
const RUNNING_READINGS: usize = 8;
/// Latencies kept for the fallback rule.
const LATENCY_SAMPLES: usize = 64;

impl WindowController {
    /// A controller for `mode`, starting at `start` (clamped to the mode).
    pub fn new(mode: WindowMode, start: u32, now: Instant) -> Self {
        let window = match mode {
            WindowMode::Fixed(n) => n.max(1),
            WindowMode::Auto { max } => start.clamp(1, max.max(1)),
        };
        WindowController {
            mode,
            window,
            phase: Phase::SlowStart,
            last: None,
            before_growth: None,
            settle: 0,
            doubted: false,
            measure_from: None,
            kv_per_seq: 0.0,
            ceiling: None,
            since: now,
            reason: match mode {
                WindowMode::Fixed(_) => "fixed by the configuration".into(),
                WindowMode::Auto { .. } => "starting".into(),
            },
            latencies: VecDeque::new(),
            base_latency: None,
            no_metrics: false,
            queued: None,
            transit: 0.0,
            recent_running: VecDeque::new(),
            lifetime: None,
            signals: WindowSignals::default(),
        }
    }

    /// The window now.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Whether the controller sets the window (auto), not the configuration.
    pub(crate) fn is_auto(&self) -> bool {
        matches!(self.mode, WindowMode::Auto { .. })
    }

    /// The mode it runs in.
    pub fn mode(&self) -> WindowMode {
        self.mode
    }

    /// Why the window is what it is, in words.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The signals it used last.
    pub fn signals(&self) -> &WindowSignals {
        &self.signals
    }

    /// How long until the next reading is worth taking: faster while the
    /// window moves.
    pub fn poll_interval(&self) -> Duration {
        match self.phase {
            Phase::Hold => Duration::from_secs(1),
            Phase::Probe | Phase::Ageing => Duration::from_millis(250),
            Phase::SlowStart => Duration::from_millis(100),
        }
    }

    /// How long requests must keep waiting inside the server to count as a
    /// queue: long enough for a wave's refill to arrive.
    fn queue_for(&self) -> Duration {
        QUEUE_FOR.max(self.lifetime.unwrap_or_default())
    }

    /// How long a window's rate is measured: long enough to hold waves and
    /// the gaps between them alike.
    fn measure_for(&self) -> Duration {
        MEASURE_FOR.max(self.lifetime.unwrap_or_default() * 2)
    }

    /// The most requests the server ran in the last readings.
    fn most_run(&self) -> f64 {
        self.recent_running.iter().copied().fold(0.0, f64::max)
    }

    fn cap(&mut self, now: Instant) -> u32 {
        if self.ceiling.is_some_and(|(_, until)| now >= until) {
            self.ceiling = None;
        }
        self.signals.ceiling = self.ceiling.map(|(c, _)| c);
        let max = self.mode.max();
        self.ceiling.map_or(max, |(c, _)| c.min(max))
    }

    fn set(&mut self, window: u32, now: Instant, reason: String) {
        let window = window.clamp(1, self.mode.max());
        if window != self.window {
            self.window = window;
            self.since = now;
            self.settle = SETTLE_READINGS;
            self.measure_from = None;
            self.doubted = false;
        }
        self.reason = reason;
    }

    /// Cuts the window to `window` and holds it there: growth starts over.
    fn cut(&mut self, window: u32, now: Instant, reason: String) {
        self.phase = Phase::Hold;
        self.before_growth = None;
        self.set(window, now, reason);
    }

    /// A reading of the server's metrics at `now`, with `in_flight` requests
    /// of ours there; returns the window (changed or not).
    pub fn on_metrics(&mut self, now: Instant, m: EngineMetrics, in_flight: usize) -> u32 {
        if !self.is_auto() {
            return self.window;
        }
        self.no_metrics = false;
        let Some((t0, prev)) = self.last.replace((now, m)) else {
            self.signals.metrics = Some(m);
            return self.window;
        };
        let dt = now.duration_since(t0).as_secs_f64();
        if dt <= 0.0 {
            return self.window;
        }
        let preempted = (m.preemptions_total - prev.preemptions_total).max(0.0);
        // A counter that went back: the server restarted; start afresh.
        if m.generation_tokens_total < prev.generation_tokens_total {
            self.before_growth = None;
            self.signals.metrics = Some(m);
            return self.window;
        }
        let rate = (m.generation_tokens_total - prev.generation_tokens_total) / dt;
        let queue_share = m.queue_share_since(&prev);
        self.signals = WindowSignals {
            metrics: Some(m),
            tokens_per_s: Some(rate),
            new_preemptions: preempted,
            ceiling: self.signals.ceiling,
            median_latency: self.signals.median_latency,
            queue_share,
        };
        // Requests hold the most just before they end, whatever the window:
        // the most seen is kept, fading slowly (the work may change).
        self.kv_per_seq *= 0.999;
        if m.running >= 1.0 {
            self.kv_per_seq = self.kv_per_seq.max(m.kv_usage / m.running);
        }
        let cap = self.cap(now);
        let w = self.window;
        let allowance = (w / 32).max(1) as f64;

        if preempted > 0.0 && in_flight as u32 > w {
            // Still coming down to the last cut: its effect is not in yet.
            return self.window;
        }
        if preempted > 0.0 {
            // The cache ran out between the last two readings: as many
            // ran then as in the fuller of them (a reading taken late, once
            // the batch has drained, would set the ceiling far too low).
            let running = m.running.max(prev.running).min(w as f64).max(1.0);
            let back = ((running * PREEMPTION_BACKOFF).floor() as u32).max(1);
            self.ceiling = Some((back, now + CEILING_FOR));
            self.signals.ceiling = Some(back);
            self.cut(
                back.min(w),
                now,
                format!(
                    "{preempted:.0} preemptions with {running:.0} running: the KV cache is full; at most {back} for a minute"
                ),
            );
            return self.window;
        }
        // A queue is requests waiting in every reading for a while, beyond
        // the allowance and beyond what is on its way to refill the slots
        // that requests leave (see the module's docs). Readings taken while
        // more than the window is in flight (a cut not yet in) say nothing
        // of the window.
        if self.recent_running.len() == RUNNING_READINGS {
            self.recent_running.pop_front();
        }
        self.recent_running.push_back(m.running);
        let on_the_way = (in_flight as f64 - m.running - m.waiting).max(0.0);
        self.transit = self.transit * (1.0 - TRANSIT_WEIGHT) + on_the_way * TRANSIT_WEIGHT;
        if m.waiting <= allowance || in_flight as u32 > w {
            self.queued = None;
        } else {
            let queue_for = self.queue_for();
            let (since, least) = self.queued.get_or_insert((now, m.waiting));
            *least = least.min(m.waiting);
            if now.duration_since(*since) < queue_for || self.lifetime.is_none() {
                // Perhaps only arrivals since the server's last step, a
                // wave's refill, or the first requests' prompts waiting for
                // their turn to be prefilled (a queue that lasts less than
                // a request's lifetime, unknown until one has ended): wait
                // and see.
                return self.window;
            }
            let least = *least;
            self.queued = None;
            let excess = (least - allowance - self.transit).floor();
            if excess >= 1.0 {
                let excess = excess as u32;
                self.cut(
                    w.saturating_sub(excess),
                    now,
                    format!(
                        "the server queues {:.0} requests and runs {:.0}; {least:.0} or more waited all along, {:.0} on their way: {excess} fewer",
                        m.waiting, m.running, self.transit
                    ),
                );
                return self.window;
            }
            // A queue that the requests on their way need: not too many.
        }
        if w > cap {
            self.set(cap, now, format!("back under the ceiling of {cap}"));
            return self.window;
        }
        if self.settle > 0 && self.phase != Phase::SlowStart {
            self.settle -= 1;
            return self.window;
        }
        if (in_flight as f64) < w as f64 * 0.8 {
            // Not enough work to fill the window: its rate says nothing.
            self.measure_from = None;
            self.reason = format!("{in_flight} in flight: waiting for work to fill {w}");
            return self.window;
        }
        if m.kv_usage >= KV_HIGH {
            self.phase = Phase::Hold;
            self.reason = format!("the KV cache is {:.0} % full: holding", m.kv_usage * 100.0);
            return self.window;
        }
        if self.phase == Phase::SlowStart {
            // Doubling until a limit shows: the server queues, preempts, or
            // its cache would not hold more. Throughput only rises until then.
            return self.grow(now, &m, rate, cap);
        }
        if self.phase == Phase::Ageing {
            return self.fill(now, &m, cap);
        }
        // The present window's rate, over at least MEASURE_FOR and two
        // request lifetimes (a single interval is noisy: requests that
        // started together finish together).
        let (since, tokens) = *self
            .measure_from
            .get_or_insert((t0, prev.generation_tokens_total));
        let span = now.duration_since(since);
        if span < self.measure_for() {
            return self.window;
        }
        let rate = (m.generation_tokens_total - tokens) / span.as_secs_f64();
        // Judge the last growth, then grow again or hold.
        if let Some(before) = self.before_growth {
            let gain = if before.rate > 0.0 {
                rate / before.rate
            } else {
                f64::INFINITY
            };
            if gain < STEP_GAIN && !self.doubted {
                // One span may have held more of a wave's gap than the
                // other: measure again before calling it the knee.
                self.doubted = true;
                self.measure_from = Some((now, m.generation_tokens_total));
                self.reason = format!(
                    "measuring {w} again: {} → {w} gained {:.1} %",
                    before.window,
                    (gain - 1.0) * 100.0
                );
                return self.window;
            }
            if gain < STEP_GAIN {
                self.before_growth = None;
                self.phase = Phase::Hold;
                let reason = format!(
                    "at the knee: {} → {w} gained {:.1} %",
                    before.window,
                    (gain - 1.0) * 100.0
                );
                if w > before.window + (before.window / 8).max(1) {
                    // More than an eighth (the KV cache's room taken at
                    // once) for nothing: back to where it was.
                    self.set(before.window, now, reason);
                } else {
                    self.since = now;
                    self.reason = reason;
                }
                return self.window;
            }
        }
        if self.phase == Phase::Hold {
            if now.duration_since(self.since) < REPROBE_AFTER {
                self.measure_from = Some((now, m.generation_tokens_total));
                return self.window;
            }
            self.phase = Phase::Probe;
        }
        self.grow(now, &m, rate, cap)
    }

    /// Grows the window a step (doubling in slow start, else an eighth),
    /// or holds at a limit: the cap, or what the KV cache would hold.
    fn grow(&mut self, now: Instant, m: &EngineMetrics, rate: f64, cap: u32) -> u32 {
        let w = self.window;
        if w >= cap {
            self.phase = Phase::Hold;
            self.since = now;
            self.reason = if self.ceiling.is_some() {
                format!("at the ceiling of {cap} learnt from preemptions")
            } else {
                format!("at dispatch.window_max ({cap})")
            };
            return w;
        }
        // No further than the KV cache is projected to hold running, at
        // the most one request was seen to hold. While doubling, requests
        // are young and hold less than they will: a doubling stops short of
        // that, and the rest is taken once they have aged (`fill`). Only
        // requests that run hold blocks: where the server runs fewer than
        // the window (the rest wait there or are on their way), the window
        // may pass the projection by as many.
        let running = self.most_run().min(w as f64).floor() as u32;
        let room_at =
            |share: f64| (self.kv_per_seq > 0.0).then(|| (share / self.kv_per_seq).floor() as u32);
        if let Some(r) =
            room_at(KV_HIGH * YOUNG_KV).filter(|r| self.phase == Phase::SlowStart && *r <= running)
        {
            self.phase = Phase::Ageing;
            self.since = now;
            self.measure_from = Some((now, m.generation_tokens_total));
            self.reason = format!(
                "young requests would fill the KV cache at {r} running: seeing what they hold when they end"
            );
            return w;
        }
        let room = match self.phase {
            Phase::SlowStart => room_at(KV_HIGH * YOUNG_KV),
            _ => room_at(KV_HIGH),
        };
        if let Some(r) = room.filter(|r| *r <= running) {
            self.phase = Phase::Hold;
            self.since = now;
            self.reason = format!(
                "the KV cache would hold no more than {r} running ({:.0} % full now): holding",
                m.kv_usage * 100.0
            );
            return w;
        }
        let mut next = match self.phase {
            Phase::SlowStart => w.saturating_mul(2),
            _ => w + (w / 8).max(1),
        }
        .min(cap);
        if let Some(r) = room {
            next = next.min(w + (r - running));
        }
        self.before_growth = Some(Measured { window: w, rate });
        self.set(
            next,
            now,
            format!(
                "growing: {rate:.0} tokens/s at {w}, {:.0} waiting, no preemptions",
                m.waiting
            ),
        );
        self.window
    }

    /// After a lifetime held at what young requests would fill, the KV
    /// cache's room is known (requests hold the most just before they end;
    /// a server that allocates large blocks gives a request its all at
    /// once): the window takes it in one step, then probes on.
    fn fill(&mut self, now: Instant, m: &EngineMetrics, cap: u32) -> u32 {
        let aged = self
            .lifetime
            .is_some_and(|l| now.duration_since(self.since) >= l.max(MEASURE_FOR));
        if !aged || self.kv_per_seq <= 0.0 {
            return self.window;
        }
        self.phase = Phase::Probe;
        let w = self.window;
        let rate = self.measure_from.map(|(since, tokens)| {
            (m.generation_tokens_total - tokens) / now.duration_since(since).as_secs_f64()
        });
        let running = self.most_run().min(w as f64).floor() as u32;
        let room = (KV_HIGH / self.kv_per_seq).floor() as u32;
        if room <= running {
            self.phase = Phase::Hold;
            self.reason = format!(
                "the KV cache would hold no more than {room} running ({:.0} % full now): holding",
                m.kv_usage * 100.0
            );
            return w;
        }
        // Judged as any growth is, and taken back if it buys nothing.
        self.before_growth = rate.map(|rate| Measured { window: w, rate });
        self.set(
            (w + (room - running)).min(cap),
            now,
            format!(
                "a request holds {:.1} % of the KV cache: room for {room} running",
                self.kv_per_seq * 100.0
            ),
        );
        self.window
    }

    /// The server has no `/metrics` to read: the latency rule decides.
    pub(crate) fn on_no_metrics(&mut self, now: Instant, in_flight: usize) -> u32 {
        if !self.is_auto() {
            return self.window;
        }
        self.no_metrics = true;
        self.last = None;
        self.signals.metrics = None;
        self.signals.tokens_per_s = None;
        let cap = self.cap(now);
        if self.latencies.len() < 8 {
            self.reason = "no /metrics on the server: waiting for latencies".into();
            return self.window;
        }
        let mut sorted: Vec<Duration> = self.latencies.iter().copied().collect();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        self.signals.median_latency = Some(median);
        let base = self.base_latency.unwrap_or(median);
        let w = self.window;
        if median > base * 2 {
            self.latencies.clear();
            let next = (w - (w / 8).max(1)).max(1);
            self.set(
                next,
                now,
                format!(
                    "no /metrics: median latency {:.0} ms is over twice the lowest ({:.0} ms)",
                    median.as_secs_f64() * 1000.0,
                    base.as_secs_f64() * 1000.0
                ),
            );
        } else if (in_flight as f64) >= w as f64 * 0.8 && w < cap {
            self.latencies.clear();
            self.set(
                w + (w / 8).max(1),
                now,
                format!(
                    "no /metrics: growing while the median latency ({:.0} ms) stays under twice the lowest",
                    median.as_secs_f64() * 1000.0
                ),
            );
        }
        self.window
    }

    /// A request finished at `now` after `latency`: the lifetime that
    /// measurements span, and the fallback rule's signal, for which only
    /// requests sent since the window last changed count.
    pub fn on_latency(&mut self, now: Instant, latency: Duration) {
        if !self.is_auto() {
            return;
        }
        self.lifetime = Some(self.lifetime.map_or(latency, |l| {
            l.mul_f64(1.0 - LIFETIME_WEIGHT) + latency.mul_f64(LIFETIME_WEIGHT)
        }));
        if now
            .checked_sub(latency)
            .is_none_or(|sent| sent < self.since)
        {
            return;
        }
        self.base_latency = Some(self.base_latency.map_or(latency, |b| b.min(latency)));
        if self.latencies.len() == LATENCY_SAMPLES {
            self.latencies.pop_front();
        }
        self.latencies.push_back(latency);
    }

    /// The server answered 429 or 503: halve the window at once.
    pub(crate) fn on_overload(&mut self, now: Instant) -> u32 {
        let half = (self.window / 2).max(1);
        if self.is_auto() {
            self.phase = Phase::Hold;
            self.before_growth = None;
            self.ceiling = Some((half.max(1), now + CEILING_FOR));
        }
        self.set(half, now, "the server answered 429/503: halved".into());
        self.window
    }

    /// A fixed window that was narrowed by overload widens by one after
    /// this many successes in a row (its window's worth); `None` for auto.
    pub(crate) fn fixed_recovery(&mut self, now: Instant) -> Option<u32> {
        match self.mode {
            WindowMode::Fixed(n) if self.window < n => {
                self.set(self.window + 1, now, "recovering after overload".into());
                if self.window == n {
                    self.reason = "fixed by the configuration".into();
                }
                Some(self.window)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that reports what an engine with `max_seqs` slots and room
    /// in its KV cache for `kv_seqs` requests reports when `window`
    /// requests are in it: step time 6.5 ms + 0.05 ms per request.
    fn reading(window: u32, max_seqs: u32, kv_seqs: u32, t: f64, total: &mut f64) -> EngineMetrics {
        let running = window.min(max_seqs) as f64;
        let waiting = window.saturating_sub(max_seqs) as f64;
        let rate = running / (0.0065 + 0.00005 * running);
        *total += rate * t;
        EngineMetrics {
            running,
            waiting,
            kv_usage: (running / kv_seqs as f64).min(1.0),
            preemptions_total: 0.0,
            generation_tokens_total: *total,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_to_the_servers_slots_and_stops_there() {
        let mut c = WindowController::new(WindowMode::Auto { max: 1024 }, 16, Instant::now());
        let mut total = 0.0;
        for _ in 0..200 {
            tokio::time::advance(Duration::from_millis(250)).await;
            let w = c.window();
            let m = reading(w, 256, 100_000, 0.25, &mut total);
            // Requests end all along, as the dispatcher reports them: a
            // queue counts once one has (its lifetime is known).
            c.on_latency(Instant::now(), Duration::from_millis(500));
            c.on_metrics(Instant::now(), m, w as usize);
        }
        let w = c.window();
        assert!((256..=264).contains(&w), "window {w}: {}", c.reason());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_counts_only_once_a_request_has_ended() {
        let mut c = WindowController::new(WindowMode::Auto { max: 1024 }, 16, Instant::now());
        // The first 16 long prompts: half of them wait their turn to be
        // prefilled for seconds, before any request has ended.
        let queued = |total: f64| EngineMetrics {
            running: 8.0,
            waiting: 8.0,
            kv_usage: 0.1,
            generation_tokens_total: total,
            ..Default::default()
        };
        for i in 0..30 {
            tokio::time::advance(Duration::from_millis(100)).await;
            c.on_metrics(Instant::now(), queued(i as f64), 16);
        }
        assert_eq!(c.window(), 16, "{}", c.reason());
        // Once requests end (a lifetime of a second), a queue that lasts
        // that long is one: the window comes down by what it did not need.
        for i in 30..60 {
            tokio::time::advance(Duration::from_millis(100)).await;
            c.on_latency(Instant::now(), Duration::from_secs(1));
            c.on_metrics(Instant::now(), queued(i as f64), 16);
        }
        assert!(c.window() < 16, "{}", c.reason());
        assert!(c.reason().contains("queues"), "{}", c.reason());
    }

    #[test]
    fn a_fixed_window_never_moves_but_for_overload() {
        let now = Instant::now();
        let mut c = WindowController::new(WindowMode::Fixed(8), 16, now);
        let m = EngineMetrics {
            waiting: 100.0,
            ..Default::default()
        };
        c.on_metrics(now, m, 8);
        c.on_metrics(now + Duration::from_secs(1), m, 8);
        assert_eq!(c.window(), 8);
        assert_eq!(c.on_overload(now), 4);
        for _ in 0..10 {
            c.fixed_recovery(now);
        }
        assert_eq!(c.window(), 8);
    }
}
