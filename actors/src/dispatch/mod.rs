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
//! [`WindowController`](crate::window::WindowController)'s, fed the server's own metrics (polled about every
//! second) and the latencies seen.
//!
//! While a request of higher priority than the next job is in flight, that
//! job waits (the [`PriorityHold`](crate::window::PriorityHold)): the bulk
//! drains so that the urgent request runs in a light batch, for a bounded
//! time, and is sent again the moment the urgent request ends. A job that
//! outranks a request in flight may go past a full window, while fewer
//! than an eighth of it are of its priority or higher.
//!
//! A job that was in flight when its server went down (`crashes > 0`) is a
//! suspect: it is sent alone, once the requests before it have finished, so
//! a crash it causes is counted against it and not against bystanders.
//!
//! The state comes in groups, each in a file of its own: the `pacer`
//! (window, thermal cap, pauses), the `claims` buffer, the settlement
//! `ledger`, the `requests` under way, the `warm` keys, and what the
//! dispatcher reports (`status`); `outcomes` settles a request's end.

mod claims;
mod ledger;
mod outcomes;
mod pacer;
mod requests;
mod status;
mod warm;

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::container::InstanceEvent;
use crate::inference::{EngineMetrics, InferenceClient, InferenceError};
use crate::instances::InstanceSupMsg;
use crate::job::{Claim, ClaimedJob, Completion, Job, JobId, ModelType};
use crate::queue::{QueueMsg, WorkAvailable};
use crate::results::ResultStore;
use crate::store::Settle;
use crate::tell::tell;
use crate::window::WindowMode;

use claims::ClaimBuffer;
use ledger::Ledger;
use pacer::Pacer;
use requests::{run_request, AbortOnDrop, InFlight, Requests};
use status::Counters;
pub use status::{DispatchMode, DispatchObserver, DispatchStatus, RequestOutcome};
use warm::WarmKeys;

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
    /// The current peers: (re)subscribe to the queue and watch the instance.
    Peers(DispatchPeers),
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
    /// Look for settlements the queue has not acknowledged in time.
    SweepSettlements,
    /// A priority hold runs out: send what it held.
    HoldEnds,
    /// Time to read the server's metrics (auto window).
    PollMetrics,
    /// What the server's metrics said: `Ok(None)` when it has none.
    Metrics(Result<Option<EngineMetrics>, InferenceError>),
}

fn tick(t: Tick) -> DispatchMsg {
    DispatchMsg::Internal(Internal(t))
}

/// The actors a dispatcher talks to (replaced after their restarts).
#[derive(Clone, Debug)]
pub struct DispatchPeers {
    /// The sole owner of the job store: claims, settlements, subscriptions.
    pub queue: ActorRef<QueueMsg>,
    /// The instance supervisor, which tells the dispatcher of its instance.
    pub instances: ActorRef<InstanceSupMsg>,
}

/// How a DispatchActor is started.
#[derive(Clone)]
pub(crate) struct DispatchArgs {
    /// The instance's name.
    pub(crate) instance: String,
    /// The model it serves.
    pub(crate) model: ModelType,
    /// Claim owner id: `<daemon>/<instance>/<incarnation>`.
    pub(crate) owner: String,
    /// Requests in flight at most, fixed or found.
    pub(crate) window: WindowMode,
    /// The instance's server.
    pub(crate) client: Arc<dyn InferenceClient>,
    /// Where results are written.
    pub(crate) results: Arc<dyn ResultStore>,
    /// Retry delays of failed jobs.
    pub(crate) retry: Backoff,
    /// Pauses after 429/503.
    pub(crate) overload: Backoff,
    /// How long a request that found no server is held, at least, for a
    /// crash report to explain it: the time the health checks take to
    /// notice a dead server (`failure_threshold` probes `interval` apart,
    /// plus one probe's timeout). Released sooner if a later request is
    /// answered (the server is there).
    pub(crate) crash_grace: Duration,
    /// Time allowed for a call to the QueueActor.
    pub(crate) call_timeout: Duration,
    /// The peers at start.
    pub(crate) peers: DispatchPeers,
    /// Told of every finished request (metrics), if set.
    pub(crate) observer: Option<Arc<dyn DispatchObserver>>,
    /// A job in flight during this many crashes of the server is failed
    /// as a poison job.
    pub(crate) poison_after: u32,
    /// Claims grouped by prefix key (see [`crate::prefix`]), no group that
    /// has waited longer than this held back by warm ones; `None`: plain
    /// order (`dispatch.prefix_grouping = false`).
    pub(crate) prefix_grouping: Option<Duration>,
    /// Bulk sends wait while a higher-priority request runs, and such a
    /// request may go past a full window (see [`PriorityHold`]); `false`
    /// (`dispatch.priority_hold = false`): neither.
    ///
    /// [`PriorityHold`]: crate::window::PriorityHold
    pub(crate) priority_hold: bool,
}

/// The DispatchActor's state.
pub(crate) struct DispatchState {
    /// How it was started.
    args: DispatchArgs,
    /// The queue and instance supervisor it talks to (replaced after their restarts).
    peers: DispatchPeers,
    /// Sending, waiting for the instance, or draining.
    mode: DispatchMode,
    /// The window and the pauses.
    pacer: Pacer,
    /// Claimed jobs waiting for a slot, and the claim cycle.
    claims: ClaimBuffer,
    /// Requests under way.
    requests: Requests,
    /// Settlements the queue has not acknowledged yet.
    ledger: Ledger,
    /// Prefix keys sent lately.
    warm: WarmKeys,
    /// Requests since start, by how they ended.
    counts: Counters,
    /// When the timer set for the end of the present priority hold fires.
    hold_timer: Option<Instant>,
}

/// Keeps one instance's batch full.
pub(crate) struct DispatchActor;

impl DispatchState {
    fn settle(&mut self, claim: Claim, settle: Settle, parent: Option<JobId>, follow_up: bool) {
        self.ledger
            .settle(&self.peers.queue, claim, settle, parent, follow_up);
    }

    /// Work may be available: claim into free slots.
    fn wake(&mut self, myself: &ActorRef<DispatchMsg>) {
        self.claims.woken();
        self.fill(myself);
    }

    /// Time to read the server's metrics, if it serves us.
    fn poll_due(&mut self, myself: &ActorRef<DispatchMsg>) {
        if self.mode == DispatchMode::Sending {
            self.poll_metrics(myself);
        } else {
            // Nothing to learn from a server that is not serving us.
            myself.send_after(self.pacer.ctl().poll_interval(), || tick(Tick::PollMetrics));
        }
    }

    /// Reads the server's metrics in the background (one reading at a time).
    fn poll_metrics(&mut self, myself: &ActorRef<DispatchMsg>) {
        if !self.pacer.start_poll(self.mode == DispatchMode::Draining) {
            return;
        }
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
        self.pacer.polled();
        match read {
            Ok(m) => {
                let (before, after) = self.pacer.metrics(Instant::now(), m, self.requests.len());
                if after != before {
                    info!(
                        instance = %self.args.instance,
                        "window {before} → {after}: {}",
                        self.pacer.ctl().reason()
                    );
                }
            }
            // A server that is down or busy says nothing about the window.
            Err(e) => {
                debug!(instance = %self.args.instance, "reading the server's metrics failed: {e}")
            }
        }
        if self.mode != DispatchMode::Draining {
            myself.send_after(self.pacer.ctl().poll_interval(), || tick(Tick::PollMetrics));
        }
        self.fill(myself);
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

    /// The peers were restarted: subscribe to the new ones.
    fn new_peers(&mut self, myself: &ActorRef<DispatchMsg>, peers: DispatchPeers) {
        self.peers = peers;
        self.subscribe(myself);
    }

    fn start_request(&mut self, myself: &ActorRef<DispatchMsg>, job: Job, claim: Claim) {
        if let Some(key) = &job.prefix_key {
            self.warm.warmed(key, self.kv_cache_tokens());
        }
        let job_id = job.id;
        let entry = InFlight {
            priority: job.priority,
            sent: Instant::now(),
            claim,
            attempts: job.attempts,
            parent: job.parent_id,
            follow_up: job.then_model.is_some(),
            _task: AbortOnDrop(self.spawn_request(myself, job)),
        };
        self.counts.sent += 1;
        self.requests.started(job_id, entry);
    }

    /// Runs a request in a task of its own, which reports how it finished.
    fn spawn_request(&self, myself: &ActorRef<DispatchMsg>, job: Job) -> AbortHandle {
        let client = self.args.client.clone();
        let results = self.args.results.clone();
        let me = myself.clone();
        let job_id = job.id;
        tokio::spawn(async move {
            let outcome = run_request(client, results, job).await;
            let _ = me.cast(tick(Tick::Finished { job_id, outcome }));
        })
        .abort_handle()
    }

    /// What the server's KV cache holds, in tokens, when it says.
    fn kv_cache_tokens(&self) -> Option<f64> {
        self.pacer
            .ctl()
            .signals()
            .metrics
            .and_then(|m| m.kv_cache_tokens)
    }

    /// A request of `priority` is about to be sent: the young requests of
    /// lower priority in flight (most likely still queued in the server or
    /// in prefill) are taken back, so that it runs in a light batch. Their
    /// requests are dropped (the server aborts a request whose client went
    /// away, keeping what it computed in its prefix cache) and their jobs
    /// go back to pending, no attempt counted, to be sent again when the
    /// hold ends.
    fn recall_young_bulk(&mut self, priority: i64) {
        let back = self
            .pacer
            .recall(Instant::now(), self.requests.below(priority));
        if back.is_empty() {
            return;
        }
        info!(instance = %self.args.instance, priority, "taking back {} young request(s) of lower priority for a higher-priority one", back.len());
        for job in back {
            if let Some(f) = self.requests.finished(job) {
                self.counts.recalled += 1;
                self.settle(f.claim, Settle::Release, f.parent, f.follow_up);
            }
        }
    }

    /// Starts buffered jobs in free slots, and tops the buffer up with a
    /// background claim when it runs low.
    fn fill(&mut self, myself: &ActorRef<DispatchMsg>) {
        if self.mode != DispatchMode::Sending || self.pacer.paused(Instant::now()) {
            return;
        }
        let window = self.pacer.window() as usize;
        while !self.requests.suspect_running() {
            let Some(front) = self.claims.front() else {
                break;
            };
            let p = front.job.priority;
            if self.requests.sending() >= window {
                let outranks = self.requests.any_below(p);
                // Those above `p - 1`: its priority or higher.
                let peers = self.requests.above_and_beside(p.saturating_sub(1)).0;
                if !self.pacer.jumps(outranks, peers) {
                    break;
                }
            }
            let (above, beside) = self.requests.above_and_beside(front.job.priority);
            let holds = self.pacer.holds();
            if let Err(until) = self.pacer.admits(Instant::now(), above, beside) {
                if self.pacer.holds() > holds {
                    debug!(instance = %self.args.instance, above, beside, "holding the bulk while higher-priority requests run");
                }
                if self.hold_timer != Some(until) {
                    self.hold_timer = Some(until);
                    myself.send_after(until.saturating_duration_since(Instant::now()), || {
                        tick(Tick::HoldEnds)
                    });
                }
                break;
            }
            if front.job.crashes > 0 {
                if self.requests.len() > 0 {
                    break; // Let the others finish first.
                }
                debug!(job = %front.job.id, crashes = front.job.crashes, "sending a suspect alone");
                self.requests.run_alone(front.job.id);
            }
            let c = self.claims.pop().expect("checked above");
            self.recall_young_bulk(c.job.priority);
            self.start_request(myself, c.job, c.claim);
        }
        let Some(want) = self.claims.next_claim(window, self.requests.sending()) else {
            return;
        };
        let queue = self.peers.queue.clone();
        let owner = self.args.owner.clone();
        let model = self.args.model;
        let timeout = self.args.call_timeout;
        let order = self.warm.claim_order(self.args.prefix_grouping);
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
        match result {
            Ok(jobs) => {
                debug!(instance = %self.args.instance, asked, got = jobs.len(), "claimed");
                self.claims.answered(asked, jobs.len());
                if self.args.prefix_grouping.is_some() && !jobs.is_empty() {
                    self.warm
                        .claimed(jobs.iter().map(|c| c.job.prefix_key.as_deref()));
                }
                if self.mode == DispatchMode::Draining {
                    // Claimed while a shutdown began: give them straight back.
                    for c in jobs {
                        self.settle(c.claim, Settle::Release, c.job.parent_id, false);
                    }
                } else {
                    self.claims.keep(jobs);
                }
            }
            Err(e) => {
                warn!(instance = %self.args.instance, "claiming jobs failed: {e}; trying again in 1 s");
                self.claims.failed();
                myself.send_after(Duration::from_secs(1), || DispatchMsg::Wake);
            }
        }
        self.fill(myself);
    }

    /// Gives every buffered job back to the queue.
    fn release_buffer(&mut self) -> usize {
        let jobs = self.claims.take_all();
        let n = jobs.len();
        for c in jobs {
            self.settle(c.claim, Settle::Release, c.job.parent_id, false);
        }
        n
    }

    /// The instance became Ready (`true`) or stopped being Ready.
    fn ready(&mut self, myself: &ActorRef<DispatchMsg>, ready: bool) {
        // A draining dispatcher stays draining, whatever its instance does.
        if self.mode == DispatchMode::Draining {
            return;
        }
        let was_ready = self.mode == DispatchMode::Sending;
        if ready != was_ready {
            debug!(instance = %self.args.instance, ready, "dispatch readiness changed");
        }
        if !ready {
            self.mode = DispatchMode::Waiting;
            // Claimed jobs not yet sent go back for others (or later).
            self.release_buffer();
            return;
        }
        self.mode = DispatchMode::Sending;
        if !was_ready {
            self.pacer.fresh_server();
        }
        self.claims.retry_dry();
        self.fill(myself);
    }

    /// A GPU the instance uses is too hot (`Some(factor)`) or cool again.
    fn thermal(&mut self, myself: &ActorRef<DispatchMsg>, factor: Option<f64>) {
        match self.pacer.thermal(factor) {
            Some(Some(c)) => {
                warn!(instance = %self.args.instance, "its GPU is too hot: window at most {c} until it cools")
            }
            Some(None) => {
                info!(instance = %self.args.instance, "its GPU cooled: window back to {}", self.pacer.ctl().window())
            }
            None => {}
        }
        self.fill(myself);
    }

    /// Stops claiming for good; `reply` once nothing is in flight.
    fn drain(&mut self, reply: RpcReplyPort<()>) {
        self.mode = DispatchMode::Draining;
        self.release_buffer();
        self.requests.when_idle(reply);
    }

    /// Gives back every job held, in flight or buffered; how many.
    fn release_all(&mut self) -> usize {
        let buffered = self.release_buffer();
        let held = self.requests.take_all();
        let n = held.len() + buffered;
        for f in held {
            self.settle(f.claim, Settle::Release, f.parent, false);
        }
        self.requests.answer_all();
        n
    }

    fn status(&self) -> DispatchStatus {
        let ctl = self.pacer.ctl();
        DispatchStatus {
            instance: self.args.instance.clone(),
            model: self.args.model,
            mode: self.mode,
            in_flight: self.requests.len(),
            buffered: self.claims.len(),
            warm_prefixes: self.warm.len(),
            window: self.pacer.window(),
            max_window: self.args.window.max(),
            auto_window: ctl.is_auto(),
            window_reason: ctl.reason().to_string(),
            window_signals: ctl.signals().clone(),
            thermal_cap: self.pacer.thermal_cap(),
            sent: self.counts.sent,
            completed: self.counts.completed,
            failed: self.counts.failed,
            overloaded: self.counts.overloaded,
            crashed: self.counts.crashed,
            aborted: self.counts.aborted,
            recalled: self.counts.recalled,
            holds: self.pacer.holds(),
        }
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
            mode: DispatchMode::Waiting,
            pacer: Pacer::new(args.window, args.priority_hold, Instant::now()),
            claims: ClaimBuffer::default(),
            requests: Requests::default(),
            ledger: Ledger::new(myself.clone(), args.model, args.call_timeout),
            warm: WarmKeys::default(),
            counts: Counters::default(),
            hold_timer: None,
            args,
        };
        state.subscribe(&myself);
        if state.pacer.ctl().is_auto() {
            myself.send_after(state.pacer.ctl().poll_interval(), || {
                tick(Tick::PollMetrics)
            });
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
            DispatchMsg::Wake => state.wake(&myself),
            DispatchMsg::Ready(ready) => state.ready(&myself, ready),
            DispatchMsg::InstanceDown { reason } => state.instance_down(&reason),
            DispatchMsg::WhenIdle { reply } => state.requests.when_idle(reply),
            DispatchMsg::Thermal(factor) => state.thermal(&myself, factor),
            DispatchMsg::Drain { reply } => state.drain(reply),
            DispatchMsg::ReleaseAll { reply } => {
                let _ = reply.send(state.release_all());
            }
            DispatchMsg::Status { reply } => {
                let _ = reply.send(state.status());
            }
            DispatchMsg::Peers(peers) => state.new_peers(&myself, peers),
            DispatchMsg::Internal(Internal(t)) => match t {
                Tick::PollMetrics => state.poll_due(&myself),
                Tick::Metrics(read) => state.metrics_read(&myself, read),
                Tick::Claimed { asked, result } => state.claimed(&myself, asked, result),
                Tick::Unpark { round } => state.unpark(&myself, round),
                Tick::Finished { job_id, outcome } => state.finished(&myself, job_id, outcome),
                Tick::Settled(job) => state.ledger.settled(job),
                Tick::SettleLost { job, why } => state.ledger.lost(&state.args.instance, job, &why),
                Tick::Resettle(job) => state.ledger.send(&state.peers.queue, job),
                Tick::SweepSettlements => state.ledger.sweep(&state.args.instance),
                Tick::HoldEnds => state.fill(&myself),
            },
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
