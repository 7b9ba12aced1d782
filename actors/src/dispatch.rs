//! `DispatchActor`: keeps one instance's continuous batch full.
//!
//! Up to `window` requests are in flight at once; the moment one finishes,
//! its slot is refilled from a small buffer of claimed jobs (a quarter of a
//! window, highest priority first), and the buffer is topped up by a claim
//! running in the background. So a slot never waits for a store round trip, and claims come
//! in batches without any request waiting for a whole batch to finish.
//! The actor sends only while its instance is Ready.
//! 429 and 503 mean the server is saturated: the job goes back without an
//! attempt counted, the window halves and dispatch pauses for a backoff;
//! a fixed window widens again by one after each window's worth of
//! successes. With `window = "auto"` the window is the
//! [`WindowController`]'s, fed the server's own metrics (polled about every
//! second) and the latencies seen.
//!
//! A job that was in flight when its server went down (`crashes > 0`) is a
//! suspect: it is sent alone, once the requests before it have finished, so
//! a crash it causes is counted against it and not against bystanders.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::container::InstanceEvent;
use crate::inference::{InferenceClient, InferenceError};
use crate::instances::InstanceSupMsg;
use crate::job::{Claim, ClaimedJob, Completion, Failure, Job, JobId, ModelType};
use crate::peers::Peers;
use crate::prefix::{ClaimOrder, Grouping};
use crate::queue::{QueueMsg, WorkAvailable};
use crate::results::{JobResult, ResultStore};
use crate::store::Settle;
use crate::tell::tell;
use crate::window::{EngineMetrics, WindowController, WindowMode, WindowSignals, AUTO_START};

/// Messages of a DispatchActor.
#[derive(Debug)]
pub enum DispatchMsg {
    /// Work may be available: claim into free slots.
    Wake,
    /// The instance became Ready (`true`) or stopped being Ready.
    Ready(bool),
    /// The instance's server went down (exited, or failed its probes)
    /// with our requests: each job in flight goes back to `pending` with
    /// the crash counted against it (poison-job quarantine).
    InstanceDown {
        /// What happened, for the log.
        reason: String,
    },
    /// Reply once nothing is in flight (a planned stop of the server waits
    /// for it; the instance is no longer Ready, so nothing new is sent).
    WhenIdle {
        /// Answered when the last request has finished.
        reply: RpcReplyPort<()>,
    },
    /// A GPU the instance uses is too hot (`Some(factor)`: the window is
    /// scaled by it) or cool again (`None`).
    Thermal(Option<f64>),
    /// Stop claiming; reply once nothing is in flight.
    Drain {
        /// Answered when the last request has finished.
        reply: RpcReplyPort<()>,
    },
    /// Abort every request in flight and give its job back; the count.
    ReleaseAll {
        /// How many jobs were released.
        reply: RpcReplyPort<usize>,
    },
    /// A snapshot of the dispatcher.
    Status {
        /// The snapshot.
        reply: RpcReplyPort<DispatchStatus>,
    },
    /// The current peers: (re)subscribe to the queue and to health.
    Peers(Peers),
    /// The actor's own timers and background results; only it makes them.
    Internal(Internal),
    /// Fault injection for tests: fail as a bug in the handler would.
    #[cfg(any(test, feature = "testkit"))]
    InjectPanic,
    /// Fault injection for tests: stop answering for this long, as a
    /// handler stuck on a slow call would.
    #[cfg(any(test, feature = "testkit"))]
    InjectStall(Duration),
}

/// A message the DispatchActor sends itself; opaque outside this module.
#[derive(Debug)]
pub struct Internal(Tick);

#[derive(Debug)]
enum Tick {
    /// Jobs parked after "connection refused" were not explained by a
    /// crash: give them back without an attempt counted.
    Unpark {
        /// The parking round it ends.
        round: u64,
    },
    /// A background claim's answer.
    Claimed {
        /// How many jobs were asked for.
        asked: usize,
        /// The jobs, or why there are none.
        result: Result<Vec<ClaimedJob>, String>,
    },
    /// A request finished (its result already written when it succeeded).
    Finished {
        /// The job.
        job_id: JobId,
        /// The completion, or why there is none.
        outcome: Result<Completion, InferenceError>,
    },
    /// The queue committed this job's settlement.
    Settled(JobId),
    /// This job's settlement did not reach the store (the queue stopped,
    /// or the store failed): it is kept and sent again.
    SettleLost {
        /// The job.
        job: JobId,
        /// What happened.
        why: String,
    },
    /// Send this job's kept settlement again.
    Resettle(JobId),
    /// Time to read the server's metrics (auto window).
    PollMetrics,
    /// What the server's metrics said: `Ok(None)` when it has none.
    Metrics(Result<Option<EngineMetrics>, InferenceError>),
}

fn tick(t: Tick) -> DispatchMsg {
    DispatchMsg::Internal(Internal(t))
}

/// What a dispatcher may do, one state at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchMode {
    /// Its instance is not Ready: nothing is sent, and claimed jobs that
    /// were not sent go back to the queue.
    Waiting,
    /// Its instance is Ready: jobs are claimed and sent, up to the window.
    Sending,
    /// Stopped claiming for good (a shutdown, or a planned stop): requests
    /// in flight finish; nothing new is sent, whatever the instance does.
    Draining,
}

/// What `Status` reports.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchStatus {
    /// The instance.
    pub instance: String,
    /// Its model.
    pub model: ModelType,
    /// Whether it sends, waits for its instance, or drains.
    pub mode: DispatchMode,
    /// Requests in flight.
    pub in_flight: usize,
    /// Jobs claimed and waiting for a free slot.
    pub buffered: usize,
    /// The window now (narrowed under back-pressure).
    pub window: u32,
    /// The configured window, or the most `auto` may reach.
    pub max_window: u32,
    /// Whether the window is found by the controller (`auto`).
    pub auto_window: bool,
    /// Why the window is what it is.
    pub window_reason: String,
    /// The signals the controller read last.
    pub window_signals: WindowSignals,
    /// The thermal cap on the window, while a GPU it uses is too hot.
    pub thermal_cap: Option<u32>,
    /// Requests sent since start.
    pub sent: u64,
    /// Requests that produced a result.
    pub completed: u64,
    /// Requests that failed (and were retried or failed their job).
    pub failed: u64,
    /// 429/503 answers.
    pub overloaded: u64,
    /// Jobs given back because the server went down under them.
    pub crashed: u64,
    /// Requests the server aborted (their jobs went back, no attempt counted).
    pub aborted: u64,
    /// Prefix keys the dispatcher holds as warm (sent lately; as many as
    /// the server's KV cache holds), which its claims take first.
    pub warm_prefixes: usize,
}

/// How a request ended, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A result was written.
    Done,
    /// Failed in a way worth retrying (connection, timeout, 5xx).
    Retryable,
    /// Failed for good (4xx, bad payload).
    Permanent,
    /// The server was saturated (429, 503).
    Overloaded,
    /// The server was not there (connection refused or dropped).
    Unavailable,
    /// The server aborted it (put to sleep, or stopping).
    Aborted,
}

impl RequestOutcome {
    /// A label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Done => "done",
            RequestOutcome::Retryable => "retryable",
            RequestOutcome::Permanent => "permanent",
            RequestOutcome::Overloaded => "overloaded",
            RequestOutcome::Unavailable => "unavailable",
            RequestOutcome::Aborted => "aborted",
        }
    }
}

/// Watches requests finish: how metrics are fed without the actors knowing
/// any metrics library.
pub trait DispatchObserver: Send + Sync + 'static {
    /// A request to `instance` ended; `done` carries latency and tokens.
    fn request_finished(&self, instance: &str, outcome: RequestOutcome, done: Option<&Completion>);
}

/// How a DispatchActor is started.
#[derive(Clone)]
pub struct DispatchArgs {
    /// The instance's name.
    pub instance: String,
    /// The model it serves.
    pub model: ModelType,
    /// Claim owner id: `<daemon>/<instance>/<incarnation>`.
    pub owner: String,
    /// Requests in flight at most, fixed or found.
    pub window: WindowMode,
    /// The instance's server.
    pub client: Arc<dyn InferenceClient>,
    /// Where results are written.
    pub results: Arc<dyn ResultStore>,
    /// Retry delays of failed jobs.
    pub retry: Backoff,
    /// Pauses after 429/503.
    pub overload: Backoff,
    /// Time allowed for a call to the QueueActor.
    pub call_timeout: Duration,
    /// The peers at start.
    pub peers: Peers,
    /// Told of every finished request (metrics), if set.
    pub observer: Option<Arc<dyn DispatchObserver>>,
    /// A job in flight during this many crashes of the server is failed
    /// as a poison job.
    pub poison_after: u32,
    /// Claims grouped by prefix key (see [`crate::prefix`]), no group that
    /// has waited longer than this held back by warm ones; `None`: plain
    /// order (`dispatch.prefix_grouping = false`).
    pub prefix_grouping: Option<Duration>,
}

/// Prefix keys remembered as warm when the server does not say how much
/// its KV cache holds.
pub const WARM_KEYS_DEFAULT: usize = 32;

/// Prefix keys remembered as warm at most.
pub const WARM_KEYS_MAX: usize = 256;

/// Claimed jobs kept ready beside a window of `window` in flight.
fn buffer_target(window: usize) -> usize {
    (window / 4).max(2)
}

/// Aborts a request task when dropped (the actor stopped or crashed).
#[derive(Debug)]
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct InFlight {
    claim: Claim,
    attempts: u32,
    parent: Option<JobId>,
    follow_up: bool,
    _task: AbortOnDrop,
}

/// A settlement sent to the queue and not yet acknowledged.
struct Unsettled {
    claim: Claim,
    settle: Settle,
    parent: Option<JobId>,
    follow_up: bool,
    /// Times sent.
    tries: u32,
}

/// The longest wait before a lost settlement is sent again.
const RESETTLE_MAX: Duration = Duration::from_secs(5);

/// Where a dispatcher's claim cycle stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClaimCycle {
    /// No claim under way; one may be made.
    Idle,
    /// A background claim is under way. `woken`: a Wake came meanwhile, so
    /// its answer may predate the new work and a short one does not mean
    /// the queue is dry.
    Asking { woken: bool },
    /// The last claim found fewer jobs than asked: wait for a Wake.
    Dry,
}

/// The DispatchActor's state.
pub struct DispatchState {
    /// How it was started.
    args: DispatchArgs,
    /// The queue and instance supervisor it talks to (replaced after their restarts).
    peers: Peers,
    /// This actor, for the acknowledgements of its settlements.
    me: ActorRef<DispatchMsg>,
    /// Settlements the queue has not acknowledged yet: kept until it has,
    /// so that one the queue loses (it restarted) is sent again rather
    /// than redone after its lease expires.
    unsettled: HashMap<JobId, Unsettled>,
    /// Requests under way, by job.
    in_flight: HashMap<JobId, InFlight>,
    /// Requests that found no server ("connection refused"): held until a
    /// crash report explains them, or `Unpark` gives them back.
    parked: HashMap<JobId, InFlight>,
    /// Counts parking episodes, so that an old `Unpark` timer is ignored.
    park_round: u64,
    /// A suspect (a job in flight at an earlier crash) runs alone.
    suspect_in_flight: Option<JobId>,
    /// Claimed jobs waiting for a slot (about a quarter of a window),
    /// highest priority first.
    buffer: VecDeque<ClaimedJob>,
    /// Where the claim cycle stands.
    claim: ClaimCycle,
    /// Sending, waiting for the instance, or draining.
    mode: DispatchMode,
    /// Answered once nothing is in flight (a drain, or a planned stop).
    drain_waiters: Vec<RpcReplyPort<()>>,
    /// Requests in flight at most now, and how that is decided.
    ctl: WindowController,
    /// A metrics reading is under way.
    polling: bool,
    /// While a GPU is too hot: the window may not exceed this.
    thermal_cap: Option<u32>,
    /// Successes since a narrowed fixed window last widened.
    successes_at_window: u32,
    /// 429/503 answers in a row (each step lengthens the pause).
    overload_streak: u32,
    /// No request is sent before this (after an overload or a vanished server).
    paused_until: Option<Instant>,
    /// Requests sent since start.
    sent: u64,
    /// Requests that produced a result.
    completed: u64,
    /// Requests that failed (retried, or failing their job).
    failed: u64,
    /// 429/503 answers.
    overloaded: u64,
    /// Requests in flight when the server went down.
    crashed: u64,
    /// Requests the server aborted.
    aborted: u64,
    /// Prefix keys sent lately, most recent first: those the server's
    /// prefix cache most likely holds, as many as it can.
    warm: VecDeque<String>,
    /// Prompt tokens per request lately (moving average), to size `warm`.
    prompt_tokens: Option<f64>,
}

/// Keeps one instance's batch full.
pub struct DispatchActor;

impl DispatchState {
    /// How many prompt prefixes the server's KV cache holds: its capacity
    /// (from `vllm:cache_config_info`) over the prompt tokens of a request
    /// lately, or [`WARM_KEYS_DEFAULT`] when either is unknown.
    fn warm_slots(&self) -> usize {
        let kv = self.ctl.signals().metrics.and_then(|m| m.kv_cache_tokens);
        match (kv, self.prompt_tokens) {
            (Some(kv), Some(p)) if p >= 1.0 => ((kv / p) as usize).clamp(1, WARM_KEYS_MAX),
            _ => WARM_KEYS_DEFAULT,
        }
    }

    /// Remembers that a job of `key` was just sent.
    fn warmed(&mut self, key: &str) {
        if self.warm.front().map(String::as_str) != Some(key) {
            self.warm.retain(|k| k != key);
            self.warm.push_front(key.to_string());
        }
        self.warm.truncate(self.warm_slots());
    }

    /// The order of the next claim.
    fn claim_order(&self) -> ClaimOrder {
        match self.args.prefix_grouping {
            Some(max_wait) => ClaimOrder::Grouped(Grouping {
                warm: self.warm.iter().cloned().collect(),
                max_wait,
            }),
            None => ClaimOrder::Plain,
        }
    }

    /// Requests in flight at most now: the controller's window, under the
    /// thermal cap.
    fn window(&self) -> u32 {
        self.ctl.window().min(self.thermal_cap.unwrap_or(u32::MAX))
    }

    /// Reads the server's metrics in the background (one reading at a time).
    fn poll_metrics(&mut self, myself: &ActorRef<DispatchMsg>) {
        if self.polling || self.mode == DispatchMode::Draining {
            return;
        }
        self.polling = true;
        let client = self.args.client.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let read = client.engine_metrics().await;
            let _ = me.cast(tick(Tick::Metrics(read)));
        });
    }

    /// Feeds a metrics reading to the controller; schedules the next.
    fn metrics_read(
        &mut self,
        myself: &ActorRef<DispatchMsg>,
        read: Result<Option<EngineMetrics>, InferenceError>,
    ) {
        self.polling = false;
        let before = self.ctl.window();
        let now = Instant::now();
        let in_flight = self.in_flight.len() + self.parked.len();
        match read {
            Ok(Some(m)) => {
                self.ctl.on_metrics(now, m, in_flight);
            }
            Ok(None) => {
                self.ctl.on_no_metrics(now, in_flight);
            }
            // A server that is down or busy says nothing about the window.
            Err(e) => {
                debug!(instance = %self.args.instance, "reading the server's metrics failed: {e}")
            }
        }
        let after = self.ctl.window();
        if after != before {
            info!(
                instance = %self.args.instance,
                "window {before} → {after}: {}",
                self.ctl.reason()
            );
        }
        if self.mode != DispatchMode::Draining {
            myself.send_after(self.ctl.poll_interval(), || tick(Tick::PollMetrics));
        }
    }

    fn settle(&mut self, claim: Claim, settle: Settle, parent: Option<JobId>, follow_up: bool) {
        let job = claim.job_id;
        self.unsettled.insert(
            job,
            Unsettled {
                claim,
                settle,
                parent,
                follow_up,
                tries: 0,
            },
        );
        self.send_settlement(job);
    }

    /// Sends a kept settlement to the current queue; its acknowledgement
    /// (or its loss) comes back as a message.
    fn send_settlement(&mut self, job: JobId) {
        let Some(u) = self.unsettled.get_mut(&job) else {
            return;
        };
        u.tries += 1;
        let (tx, rx) = ractor::concurrency::oneshot();
        let msg = QueueMsg::Settle {
            claim: u.claim.clone(),
            settle: u.settle.clone(),
            model: self.args.model,
            parent: u.parent,
            follow_up: u.follow_up,
            ack: Some(tx.into()),
        };
        let me = self.me.clone();
        if let Err(e) = self.peers.queue.cast(msg) {
            let _ = me.cast(tick(Tick::SettleLost {
                job,
                why: format!("the queue is not running ({e})"),
            }));
            return;
        }
        let timeout = self.args.call_timeout;
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(Ok(()))) => Tick::Settled(job),
                Ok(Ok(Err(e))) => Tick::SettleLost {
                    job,
                    why: format!("the store failed: {e}"),
                },
                Ok(Err(_)) => Tick::SettleLost {
                    job,
                    why: "the queue stopped before committing it".into(),
                },
                Err(_) => Tick::SettleLost {
                    job,
                    why: format!("the queue did not commit it within {} s", timeout.as_secs()),
                },
            };
            let _ = me.cast(tick(outcome));
        });
    }

    /// A lost settlement: sent again after a short pause, growing with
    /// each loss (the queue is being restarted).
    fn settle_lost(&mut self, job: JobId, why: &str) {
        let Some(u) = self.unsettled.get(&job) else {
            return;
        };
        let pause =
            Duration::from_millis(100 * 2u64.saturating_pow(u.tries.min(10))).min(RESETTLE_MAX);
        if u.tries == 1 {
            warn!(instance = %self.args.instance, %job, "the outcome of job {job} did not reach the store: {why}; kept and sent again in {} ms", pause.as_millis());
        } else {
            debug!(%job, tries = u.tries, "settlement lost again: {why}");
        }
        self.me.send_after(pause, move || tick(Tick::Resettle(job)));
    }

    fn subscribe(&self, myself: &ActorRef<DispatchMsg>) {
        tell(
            &self.peers.queue,
            "a dispatcher's subscription to its model's work",
            QueueMsg::Subscribe {
                model: self.args.model,
                subscriber: myself.get_derived(),
            },
        );
        tell(
            &self.peers.instances,
            "a dispatcher's watch of its instance",
            InstanceSupMsg::Watch {
                instance: self.args.instance.clone(),
                dispatcher: myself.get_derived(),
            },
        );
    }

    fn paused(&self) -> bool {
        self.paused_until.is_some_and(|t| Instant::now() < t)
    }

    fn start_request(&mut self, myself: &ActorRef<DispatchMsg>, job: Job, claim: Claim) {
        if let Some(key) = &job.prefix_key {
            self.warmed(key);
        }
        let job_id = job.id;
        let parent = job.parent_id;
        let follow_up = job.then_model.is_some();
        let attempts = job.attempts;
        let client = self.args.client.clone();
        let results = self.args.results.clone();
        let me = myself.clone();
        let task = tokio::spawn(async move {
            let run = async {
                let out = client.infer(&job).await?;
                let doc = JobResult {
                    missing: Vec::new(),
                    id: job.id,
                    model_type: job.model_type,
                    content: out.content,
                    prompt_tokens: out.prompt_tokens,
                    completion_tokens: out.completion_tokens,
                    latency_ms: Some(out.latency.as_millis() as u64),
                    fragments: Vec::new(),
                    response: Some(out.response),
                };
                let bytes = serde_json::to_vec_pretty(&doc).expect("a result serializes");
                let id = job.id;
                match results.write(id, bytes).await {
                    Ok(result_path) => Ok(Completion {
                        result_path,
                        prompt_tokens: out.prompt_tokens,
                        completion_tokens: out.completion_tokens,
                        latency: out.latency,
                    }),
                    Err(e) => Err(InferenceError::Retryable(format!(
                        "writing the result failed: {e}"
                    ))),
                }
            };
            let outcome = std::panic::AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(InferenceError::Retryable(format!(
                        "the request panicked: {what}"
                    )))
                });
            let _ = me.cast(tick(Tick::Finished { job_id, outcome }));
        });
        self.sent += 1;
        self.in_flight.insert(
            job_id,
            InFlight {
                claim,
                attempts,
                parent,
                follow_up,
                _task: AbortOnDrop(task.abort_handle()),
            },
        );
    }

    /// Starts buffered jobs in free slots, and tops the buffer up with a
    /// background claim when it runs low.
    fn fill(&mut self, myself: &ActorRef<DispatchMsg>) {
        if self.mode != DispatchMode::Sending || self.paused() {
            return;
        }
        let window = self.window() as usize;
        while self.in_flight.len() < window && self.suspect_in_flight.is_none() {
            let Some(front) = self.buffer.front() else {
                break;
            };
            if front.job.crashes > 0 {
                if !self.in_flight.is_empty() || !self.parked.is_empty() {
                    break; // Let the others finish first.
                }
                self.suspect_in_flight = Some(front.job.id);
                debug!(job = %front.job.id, crashes = front.job.crashes, "sending a suspect alone");
            }
            let c = self.buffer.pop_front().expect("checked above");
            self.start_request(myself, c.job, c.claim);
        }
        // Keep a window in flight and a quarter of one buffered (enough to
        // refill slots while a claim is under way, few enough that a job
        // submitted with a higher priority is claimed soon); claim when half
        // the buffer (or anything, if slots are idle) is missing.
        let spare = buffer_target(window);
        let held = self.in_flight.len() + self.buffer.len();
        let want = (window + spare).saturating_sub(held);
        let slots_idle = self.in_flight.len() < window;
        if self.claim != ClaimCycle::Idle || want == 0 || (want < spare.div_ceil(2) && !slots_idle)
        {
            return;
        }
        self.claim = ClaimCycle::Asking { woken: false };
        let queue = self.peers.queue.clone();
        let owner = self.args.owner.clone();
        let model = self.args.model;
        let timeout = self.args.call_timeout;
        let order = self.claim_order();
        let me = myself.clone();
        tokio::spawn(async move {
            let answer = queue
                .call(
                    |reply| QueueMsg::Claim {
                        model,
                        n: want,
                        owner,
                        order,
                        reply,
                    },
                    Some(timeout),
                )
                .await;
            let result = match answer {
                Ok(CallResult::Success(Ok(jobs))) => Ok(jobs),
                Ok(CallResult::Success(Err(e))) => Err(e.to_string()),
                Ok(CallResult::Timeout) => Err("the queue did not answer in time".into()),
                Ok(CallResult::SenderError) => Err("the queue dropped the request".into()),
                Err(e) => Err(format!("the queue is gone: {e}")),
            };
            let _ = me.cast(tick(Tick::Claimed {
                asked: want,
                result,
            }));
        });
    }

    fn claimed(
        &mut self,
        myself: &ActorRef<DispatchMsg>,
        asked: usize,
        result: Result<Vec<ClaimedJob>, String>,
    ) {
        let woken = matches!(self.claim, ClaimCycle::Asking { woken: true });
        match result {
            Ok(jobs) => {
                self.claim = if jobs.len() < asked && !woken {
                    ClaimCycle::Dry
                } else {
                    ClaimCycle::Idle
                };
                if self.mode == DispatchMode::Draining {
                    // Claimed while a shutdown began: give them straight back.
                    for c in jobs {
                        self.settle(c.claim, Settle::Release, c.job.parent_id, false);
                    }
                } else {
                    // Highest priority first (the queue hands each claim
                    // out in that order; a later claim may bring higher).
                    self.buffer.extend(jobs);
                    self.buffer
                        .make_contiguous()
                        .sort_by_key(|c| std::cmp::Reverse(c.job.priority));
                }
            }
            Err(e) => {
                warn!(instance = %self.args.instance, "claiming jobs failed: {e}; trying again in 1 s");
                self.claim = ClaimCycle::Dry;
                myself.send_after(Duration::from_secs(1), || DispatchMsg::Wake);
            }
        }
    }

    /// Gives every buffered job back to the queue.
    fn release_buffer(&mut self) -> usize {
        let n = self.buffer.len();
        for c in std::mem::take(&mut self.buffer) {
            self.settle(c.claim, Settle::Release, c.job.parent_id, false);
        }
        n
    }

    fn finished(
        &mut self,
        myself: &ActorRef<DispatchMsg>,
        job_id: JobId,
        outcome: Result<Completion, InferenceError>,
    ) {
        let Some(f) = self.in_flight.remove(&job_id) else {
            return; // Released or aborted meanwhile.
        };
        if self.suspect_in_flight == Some(job_id) {
            self.suspect_in_flight = None;
        }
        if let Some(o) = &self.args.observer {
            let kind = match &outcome {
                Ok(_) => RequestOutcome::Done,
                Err(InferenceError::Retryable(_)) => RequestOutcome::Retryable,
                Err(InferenceError::Permanent(_)) => RequestOutcome::Permanent,
                Err(InferenceError::Overloaded { .. }) => RequestOutcome::Overloaded,
                Err(InferenceError::Unavailable(_)) => RequestOutcome::Unavailable,
                Err(InferenceError::Aborted(_)) => RequestOutcome::Aborted,
            };
            o.request_finished(&self.args.instance, kind, outcome.as_ref().ok());
        }
        match outcome {
            Ok(done) => {
                self.completed += 1;
                self.overload_streak = 0;
                if let Some(p) = done.prompt_tokens {
                    let p = p as f64;
                    self.prompt_tokens = Some(self.prompt_tokens.map_or(p, |m| 0.9 * m + 0.1 * p));
                }
                self.ctl.on_latency(Instant::now(), done.latency);
                self.successes_at_window += 1;
                if self.successes_at_window >= self.ctl.window() {
                    self.successes_at_window = 0;
                    if let Some(w) = self.ctl.fixed_recovery(Instant::now()) {
                        debug!(instance = %self.args.instance, window = w, "widening the window");
                    }
                }
                self.settle(f.claim, Settle::Complete(done), f.parent, f.follow_up);
            }
            Err(InferenceError::Overloaded {
                message,
                retry_after,
            }) => {
                self.overloaded += 1;
                self.overload_streak += 1;
                let before = self.ctl.window();
                let narrowed = self.ctl.on_overload(Instant::now());
                let pause =
                    retry_after.unwrap_or_else(|| self.args.overload.delay(self.overload_streak));
                if narrowed < before || self.overload_streak == 1 {
                    info!(
                        instance = %self.args.instance,
                        "server overloaded ({message}): window {before} → {narrowed}, pausing {:.1} s",
                        pause.as_secs_f64()
                    );
                }
                self.successes_at_window = 0;
                self.paused_until = Some(Instant::now() + pause);
                myself.send_after(pause, || DispatchMsg::Wake);
                self.settle(f.claim, Settle::Release, f.parent, f.follow_up);
            }
            Err(InferenceError::Unavailable(message)) => {
                // The server is not there. Hold the job: if a crash report
                // follows, the crash is counted against it; if not, it goes
                // back without an attempt counted. Either way it never fails
                // because its server is down.
                if self.parked.is_empty() {
                    info!(instance = %self.args.instance, "the server is not answering ({message}); pausing dispatch");
                    // One step of backoff per episode, not per request that
                    // found the server gone.
                    self.overload_streak += 1;
                }
                let pause = self.args.overload.delay(self.overload_streak);
                self.paused_until = Some(Instant::now() + pause);
                self.parked.insert(job_id, f);
                let round = self.park_round;
                myself.send_after(pause, move || tick(Tick::Unpark { round }));
            }
            Err(InferenceError::Aborted(message)) => {
                // Cut short by the server (a sleep, a stop): nothing was
                // wrong with the job, so no attempt is counted.
                debug!(job = %job_id, instance = %self.args.instance, "{message}; the job goes back");
                self.aborted += 1;
                self.settle(f.claim, Settle::Release, f.parent, f.follow_up);
            }
            Err(InferenceError::Retryable(message)) => {
                self.failed += 1;
                let retry_after = Some(self.args.retry.delay(f.attempts + 1));
                debug!(job = %job_id, "attempt failed: {message}");
                self.settle(
                    f.claim,
                    Settle::Fail(Failure {
                        message,
                        retry_after,
                    }),
                    f.parent,
                    f.follow_up,
                );
            }
            Err(InferenceError::Permanent(message)) => {
                self.failed += 1;
                warn!(job = %job_id, instance = %self.args.instance, "job failed: {message}");
                self.settle(
                    f.claim,
                    Settle::Fail(Failure {
                        message,
                        retry_after: None,
                    }),
                    f.parent,
                    f.follow_up,
                );
            }
        }
        self.answer_drain_waiters();
    }

    fn answer_drain_waiters(&mut self) {
        if self.in_flight.is_empty() && self.parked.is_empty() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// The server went down under our requests: every job in flight (or
    /// parked) goes back with the crash counted; buffered jobs go back as
    /// they were.
    fn instance_down(&mut self, reason: &str) {
        if self.mode == DispatchMode::Sending {
            self.mode = DispatchMode::Waiting;
        }
        self.suspect_in_flight = None;
        let hit: Vec<InFlight> = self
            .in_flight
            .drain()
            .chain(self.parked.drain())
            .map(|(_, f)| f)
            .collect();
        self.park_round += 1;
        if !hit.is_empty() {
            warn!(
                instance = %self.args.instance,
                "{reason}; {} job(s) in flight go back to pending", hit.len()
            );
        }
        self.crashed += hit.len() as u64;
        for f in hit {
            self.settle(
                f.claim,
                Settle::Crashed {
                    instance: self.args.instance.clone(),
                    limit: self.args.poison_after.max(1),
                },
                f.parent,
                f.follow_up,
            );
        }
        self.release_buffer();
        self.answer_drain_waiters();
    }

    /// Parked jobs not explained by a crash go back, no attempt counted.
    fn unpark(&mut self, round: u64) {
        if round != self.park_round {
            return;
        }
        self.park_round += 1;
        for (_, f) in std::mem::take(&mut self.parked) {
            self.settle(f.claim, Settle::Release, f.parent, f.follow_up);
        }
        self.answer_drain_waiters();
    }
}

impl Actor for DispatchActor {
    type Msg = DispatchMsg;
    type State = DispatchState;
    type Arguments = DispatchArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DispatchMsg>,
        args: DispatchArgs,
    ) -> Result<DispatchState, ActorProcessingErr> {
        let state = DispatchState {
            peers: args.peers.clone(),
            me: myself.clone(),
            unsettled: HashMap::new(),
            ctl: WindowController::new(args.window, AUTO_START, Instant::now()),
            polling: false,
            args,
            in_flight: HashMap::new(),
            parked: HashMap::new(),
            park_round: 0,
            suspect_in_flight: None,
            buffer: VecDeque::new(),
            claim: ClaimCycle::Idle,
            mode: DispatchMode::Waiting,
            drain_waiters: Vec::new(),
            thermal_cap: None,
            successes_at_window: 0,
            overload_streak: 0,
            paused_until: None,
            sent: 0,
            completed: 0,
            failed: 0,
            overloaded: 0,
            crashed: 0,
            aborted: 0,
            warm: VecDeque::new(),
            prompt_tokens: None,
        };
        state.subscribe(&myself);
        if state.ctl.is_auto() {
            myself.send_after(state.ctl.poll_interval(), || tick(Tick::PollMetrics));
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<DispatchMsg>,
        msg: DispatchMsg,
        state: &mut DispatchState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DispatchMsg::Wake => {
                state.claim = match state.claim {
                    ClaimCycle::Asking { .. } => ClaimCycle::Asking { woken: true },
                    ClaimCycle::Idle | ClaimCycle::Dry => ClaimCycle::Idle,
                };
                state.fill(&myself);
            }
            DispatchMsg::Internal(Internal(Tick::PollMetrics)) => {
                if state.mode == DispatchMode::Sending {
                    state.poll_metrics(&myself);
                } else {
                    // Nothing to learn from a server that is not serving us.
                    myself.send_after(state.ctl.poll_interval(), || tick(Tick::PollMetrics));
                }
            }
            DispatchMsg::Internal(Internal(Tick::Metrics(read))) => {
                state.metrics_read(&myself, read);
                state.fill(&myself);
            }
            DispatchMsg::Internal(Internal(Tick::Claimed { asked, result })) => {
                state.claimed(&myself, asked, result);
                state.fill(&myself);
            }
            // A draining dispatcher stays draining, whatever its instance does.
            DispatchMsg::Ready(_) if state.mode == DispatchMode::Draining => {}
            DispatchMsg::Ready(ready) => {
                let was_ready = state.mode == DispatchMode::Sending;
                if ready != was_ready {
                    debug!(instance = %state.args.instance, ready, "dispatch readiness changed");
                }
                let became_ready = ready && !was_ready;
                state.mode = if ready {
                    DispatchMode::Sending
                } else {
                    DispatchMode::Waiting
                };
                if ready {
                    if became_ready {
                        // A (re)started server: a pause for the old one's
                        // absence no longer applies.
                        state.paused_until = None;
                        state.overload_streak = 0;
                    }
                    if state.claim == ClaimCycle::Dry {
                        state.claim = ClaimCycle::Idle;
                    }
                    state.fill(&myself);
                } else {
                    // Claimed jobs not yet sent go back for others (or later).
                    state.release_buffer();
                }
            }
            DispatchMsg::InstanceDown { reason } => {
                state.instance_down(&reason);
            }
            DispatchMsg::Internal(Internal(Tick::Unpark { round })) => {
                state.unpark(round);
                state.fill(&myself);
            }
            DispatchMsg::Internal(Internal(Tick::Finished { job_id, outcome })) => {
                state.finished(&myself, job_id, outcome);
                state.fill(&myself);
            }
            DispatchMsg::WhenIdle { reply } => {
                state.drain_waiters.push(reply);
                state.answer_drain_waiters();
            }
            DispatchMsg::Thermal(factor) => {
                let cap = factor.map(|f| ((state.ctl.window() as f64 * f).floor() as u32).max(1));
                if cap != state.thermal_cap {
                    match cap {
                        Some(c) => {
                            warn!(instance = %state.args.instance, "its GPU is too hot: window at most {c} until it cools")
                        }
                        None => {
                            info!(instance = %state.args.instance, "its GPU cooled: window back to {}", state.ctl.window())
                        }
                    }
                }
                state.thermal_cap = cap;
                state.fill(&myself);
            }
            DispatchMsg::Drain { reply } => {
                state.mode = DispatchMode::Draining;
                state.release_buffer();
                state.drain_waiters.push(reply);
                state.answer_drain_waiters();
            }
            DispatchMsg::ReleaseAll { reply } => {
                state.suspect_in_flight = None;
                let n = state.in_flight.len() + state.parked.len() + state.release_buffer();
                let parked = std::mem::take(&mut state.parked);
                for (_, f) in std::mem::take(&mut state.in_flight)
                    .into_iter()
                    .chain(parked)
                {
                    state.settle(f.claim, Settle::Release, f.parent, false);
                }
                for w in state.drain_waiters.drain(..) {
                    let _ = w.send(());
                }
                let _ = reply.send(n);
            }
            DispatchMsg::Status { reply } => {
                let _ = reply.send(DispatchStatus {
                    instance: state.args.instance.clone(),
                    model: state.args.model,
                    mode: state.mode,
                    in_flight: state.in_flight.len() + state.parked.len(),
                    buffered: state.buffer.len(),
                    warm_prefixes: state.warm.len(),
                    window: state.window(),
                    max_window: state.args.window.max(),
                    auto_window: state.ctl.is_auto(),
                    window_reason: state.ctl.reason().to_string(),
                    window_signals: state.ctl.signals().clone(),
                    thermal_cap: state.thermal_cap,
                    sent: state.sent,
                    completed: state.completed,
                    failed: state.failed,
                    overloaded: state.overloaded,
                    crashed: state.crashed,
                    aborted: state.aborted,
                });
            }
            DispatchMsg::Peers(peers) => {
                state.peers = peers;
                state.subscribe(&myself);
            }
            DispatchMsg::Internal(Internal(Tick::Settled(job))) => {
                state.unsettled.remove(&job);
            }
            DispatchMsg::Internal(Internal(Tick::SettleLost { job, why })) => {
                state.settle_lost(job, &why)
            }
            DispatchMsg::Internal(Internal(Tick::Resettle(job))) => state.send_settlement(job),
            #[cfg(any(test, feature = "testkit"))]
            DispatchMsg::InjectStall(pause) => tokio::time::sleep(pause).await,
            #[cfg(any(test, feature = "testkit"))]
            DispatchMsg::InjectPanic => {
                panic!("injected fault in dispatcher {}", state.args.instance)
            }
        }
        Ok(())
    }
}

/// A watched instance's news.
impl From<InstanceEvent> for DispatchMsg {
    fn from(e: InstanceEvent) -> Self {
        match e {
            InstanceEvent::Ready(ready) => DispatchMsg::Ready(ready),
            InstanceEvent::Down { reason } => DispatchMsg::InstanceDown { reason },
            InstanceEvent::Stopping { idle } => DispatchMsg::WhenIdle { reply: idle },
        }
    }
}

impl TryFrom<DispatchMsg> for InstanceEvent {
    type Error = DispatchMsg;

    fn try_from(msg: DispatchMsg) -> Result<Self, DispatchMsg> {
        match msg {
            DispatchMsg::Ready(ready) => Ok(InstanceEvent::Ready(ready)),
            DispatchMsg::InstanceDown { reason } => Ok(InstanceEvent::Down { reason }),
            DispatchMsg::WhenIdle { reply } => Ok(InstanceEvent::Stopping { idle: reply }),
            other => Err(other),
        }
    }
}

/// The queue's news of available work is a `Wake`.
impl From<WorkAvailable> for DispatchMsg {
    fn from(_: WorkAvailable) -> Self {
        DispatchMsg::Wake
    }
}

impl TryFrom<DispatchMsg> for WorkAvailable {
    type Error = DispatchMsg;

    fn try_from(msg: DispatchMsg) -> Result<Self, DispatchMsg> {
        match msg {
            DispatchMsg::Wake => Ok(WorkAvailable),
            other => Err(other),
        }
    }
}
