//! `QueueActor`: the sole owner of the `JobStore`.
//!
//! Store calls run in tasks of their own (the actor never waits on a slow
//! read), except the few whose answer changes its state. Claims are
//! answered as soon as the store answers; settlements
//! (complete, fail, release) are group-committed: while one batch is being
//! written, the next accumulates, so that a busy pipeline pays one
//! transaction for many jobs. The actor also wakes dispatchers when work may
//! be available: on in-process submits, on releases and retries coming due,
//! on expired leases it reclaims, and when another program commits to the
//! store (a cheap poll of the store's change token).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, MessagingErr, RpcReplyPort};
use tracing::{debug, error, info, warn};

use crate::job::{
    Claim, ClaimedJob, FailOutcome, Job, JobId, ModelType, NewJob, QueueStats, Submitted,
};
use crate::prefix::ClaimOrder;
use crate::store::{
    ClaimRequest, JobStore, ParentOutcome, Settle, Settled, StoreError, StoreResult,
};
use crate::time::{Clock, Timestamp};

/// A due timer fires this much after its `run_at`, so that the claim it
/// triggers finds the job due despite the rounding of stored times.
const DUE_SLACK: Duration = Duration::from_millis(2);

/// Published to the subscribers of a model: work for it may be waiting
/// (jobs were submitted, released, came due, or changed by another
/// program); claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkAvailable;

/// Published when a settlement finished a job that has more to start: a
/// parent to check (it is a fragment), or a follow-up to create (it is
/// done and names a next model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobFinished {
    /// The job.
    pub job: JobId,
    /// Its parent, when it is a fragment.
    pub parent: Option<JobId>,
    /// It is done and names a next model.
    pub follow_up: bool,
}

/// Messages of the QueueActor.
#[derive(Debug)]
pub enum QueueMsg {
    /// Claim up to `n` jobs of `model` for `owner`.
    Claim {
        /// Model of the jobs.
        model: ModelType,
        /// At most this many.
        n: usize,
        /// Who holds the claims (a dispatcher's owner id).
        owner: String,
        /// Plain, or grouped by prefix key.
        order: ClaimOrder,
        /// The claimed jobs.
        reply: RpcReplyPort<StoreResult<Vec<ClaimedJob>>>,
    },
    /// Settle a claim (group-committed). `ack`, when given, is answered
    /// once the batch holding it has reached the store: `Ok` when it was
    /// applied or could no longer apply (a stale claim), `Err` when the
    /// store failed and the sender should send it again.
    Settle {
        /// The claim.
        claim: Claim,
        /// How.
        settle: Settle,
        /// The job's model, to wake its dispatchers when it comes back.
        model: ModelType,
        /// The job's parent, to trigger fan-in when it finishes.
        parent: Option<JobId>,
        /// The job names a next model: create its follow-up when it is done.
        follow_up: bool,
        /// Answered when the settlement is committed.
        ack: Option<SettleAck>,
    },
    /// Fault injection for tests: fail as a bug in the handler would.
    #[cfg(any(test, feature = "testkit"))]
    InjectPanic,
    /// Submit jobs in-process and wake their model's dispatchers.
    Submit {
        /// The jobs, inserted in one transaction.
        jobs: Vec<NewJob>,
        /// What happened to each.
        reply: RpcReplyPort<StoreResult<Vec<Submitted>>>,
    },
    /// Submit a parent with its fragments.
    SubmitParent {
        /// The parent.
        parent: NewJob,
        /// Its fragments, in order.
        fragments: Vec<NewJob>,
        /// The parent's submission.
        reply: RpcReplyPort<StoreResult<Submitted>>,
    },
    /// Release every claim of `owner` (and of owners below it).
    ReleaseOwner {
        /// The owner id or prefix.
        owner: String,
        /// How many jobs went back to pending.
        reply: RpcReplyPort<StoreResult<u64>>,
    },
    /// One job.
    Get {
        /// Its id.
        id: JobId,
        /// The job, if any.
        reply: RpcReplyPort<StoreResult<Option<Job>>>,
    },
    /// A parent's fragments.
    Fragments {
        /// The parent.
        parent: JobId,
        /// In fragment order.
        reply: RpcReplyPort<StoreResult<Vec<Job>>>,
    },
    /// Done jobs whose follow-up is still to be created.
    PendingFollowUps {
        /// At most 100 ids.
        reply: RpcReplyPort<StoreResult<Vec<JobId>>>,
    },
    /// Parents whose fragments have all finished.
    ReadyParents {
        /// At most this many ids.
        reply: RpcReplyPort<StoreResult<Vec<JobId>>>,
    },
    /// End a parent (exactly once).
    FinishParent {
        /// The parent.
        id: JobId,
        /// How it ends.
        outcome: ParentOutcome,
        /// Whether this call ended it.
        reply: RpcReplyPort<StoreResult<bool>>,
    },
    /// Queue statistics.
    Stats {
        /// Per model and status.
        reply: RpcReplyPort<StoreResult<QueueStats>>,
    },
    /// `subscriber` wants to hear when `model` work may be available
    /// (`WorkAvailable`); it hears it once at once.
    Subscribe {
        /// The model.
        model: ModelType,
        /// Who hears it (a dispatcher, through its derived reference).
        subscriber: DerivedActorRef<WorkAvailable>,
    },
    /// `subscriber` hears of every job that finished and has a fan-in or a
    /// follow-up to start (`JobFinished`), replacing any earlier one.
    SubscribeFinished(DerivedActorRef<JobFinished>),
    /// Reply once every settlement received so far is committed.
    Flush {
        /// Answered when flushed.
        reply: RpcReplyPort<()>,
    },
    /// The actor's own timers and background results; only it makes them.
    Internal(Internal),
}

/// A message the QueueActor sends itself; opaque outside this module.
#[derive(Debug)]
pub struct Internal(Tick);

#[derive(Debug)]
enum Tick {
    /// A settlement batch was committed.
    Flushed(Vec<FlushedItem>),
    /// Time to poll the store's change token.
    Poll,
    /// The change token read by a poll.
    Polled(Option<i64>),
    /// Time to reclaim expired leases.
    Reclaim,
    /// Time to renew this daemon's heartbeat.
    Heartbeat,
    /// Wake the dispatchers of one model (`None`: all).
    Wake(Option<ModelType>),
    /// The next `run_at` of a model, as read.
    DueAt {
        /// The model.
        model: ModelType,
        /// Its earliest future `run_at`, if any.
        at: Option<Timestamp>,
    },
    /// A due timer fired.
    Due {
        /// The model whose job came due.
        model: ModelType,
        /// The `run_at` the timer was set for.
        at: Timestamp,
    },
}

fn tick(t: Tick) -> QueueMsg {
    QueueMsg::Internal(Internal(t))
}

/// One settlement's outcome, as committed.
#[derive(Debug)]
pub(crate) struct FlushedItem {
    model: ModelType,
    parent: Option<JobId>,
    follow_up: bool,
    job_id: JobId,
    result: StoreResult<Settled>,
}

/// How the QueueActor is started.
pub struct QueueArgs {
    /// The store it owns.
    pub store: Arc<dyn JobStore>,
    /// Where time comes from.
    pub clock: Arc<dyn Clock>,
    /// Lease of each claim.
    pub lease: Duration,
    /// How often expired leases are reclaimed.
    pub reclaim_interval: Duration,
    /// How often the store's change token is polled (rows from other programs).
    pub poll_interval: Duration,
    /// Claims of this owner (and below it) are released at start: a
    /// previous run of this daemon that died without releasing them.
    pub release_on_start: Option<String>,
    /// This daemon's registration on the queue, renewed every interval
    /// (each renewal also takes back the claims of daemons gone silent).
    pub heartbeat: Option<(String, Heartbeat)>,
    /// Told of every job that ends here, for those waiting on one.
    pub watch: Option<Arc<crate::watch::JobWatch>>,
}

/// How a daemon tells the other daemons on its queue that it is alive.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    /// How often it says so.
    pub interval: Duration,
    /// Silent longer than this, the others take its claims back.
    pub timeout: Duration,
    /// What it says of itself (host, pid, version).
    pub about: serde_json::Value,
}

/// The QueueActor's state.
pub struct QueueState {
    /// How it was started.
    args: QueueArgs,
    /// Who hears of finished jobs (the fan-in).
    finished: Option<DerivedActorRef<JobFinished>>,
    /// Who hears of available work, per model (the dispatchers).
    subscribers: HashMap<ModelType, Vec<DerivedActorRef<WorkAvailable>>>,
    /// Settlements waiting for the next group commit.
    pending: Vec<Pending>,
    /// A group commit is under way (one at a time).
    flushing: bool,
    /// Answered once everything received so far is committed.
    flush_waiters: Vec<RpcReplyPort<()>>,
    /// A change-token poll is under way.
    polling: bool,
    /// The change token last read (another program committed when it moves).
    last_token: Option<i64>,
    /// Per model, the `run_at` its due timer is set for (the earliest known).
    due: HashMap<ModelType, Timestamp>,
}

/// Who hears whether a settlement reached the store: called once, from
/// the task that committed its batch, with `Ok` when it was applied (or
/// could no longer apply: a stale claim) and `Err(why)` when the sender
/// should send it again: the store failed, or the queue stopped before
/// committing it (dropped unanswered). A call rather than a reply port, so
/// that a dispatcher hears of each settlement by one message of its own,
/// with no task waiting on it.
pub struct SettleAck(Option<Tell>);

/// What a [`SettleAck`] calls with the outcome.
type Tell = Box<dyn FnOnce(Result<(), String>) + Send>;

impl SettleAck {
    /// Calls `tell` with the outcome.
    pub fn new(tell: impl FnOnce(Result<(), String>) + Send + 'static) -> Self {
        SettleAck(Some(Box::new(tell)))
    }

    /// Drops it without telling anyone (its sender says what happened).
    pub fn cancel(mut self) {
        self.0.take();
    }

    fn answer(mut self, outcome: Result<(), String>) {
        if let Some(tell) = self.0.take() {
            tell(outcome);
        }
    }
}

impl Drop for SettleAck {
    fn drop(&mut self) {
        if let Some(tell) = self.0.take() {
            tell(Err("the queue stopped before committing it".into()));
        }
    }
}

impl std::fmt::Debug for SettleAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SettleAck")
    }
}

/// A settlement waiting for the next group commit.
struct Pending {
    claim: Claim,
    settle: Settle,
    model: ModelType,
    parent: Option<JobId>,
    follow_up: bool,
    ack: Option<SettleAck>,
}

/// The sole owner of the job store.
pub struct QueueActor;

/// Sends what `out` comes to to `reply` from a task of its own, without
/// holding up the actor.
fn answer<T: Send + 'static>(
    reply: RpcReplyPort<StoreResult<T>>,
    out: impl std::future::Future<Output = StoreResult<T>> + Send + 'static,
) {
    tokio::spawn(async move {
        let _ = reply.send(out.await);
    });
}

impl QueueState {
    fn wake(&mut self, model: Option<ModelType>) {
        for (m, subs) in self.subscribers.iter_mut() {
            if model.is_none_or(|x| x == *m) {
                subs.retain(|d| d.send_message(WorkAvailable).is_ok());
            }
        }
    }

    /// Sets `model`'s due timer for `at`, unless one is set for earlier.
    fn schedule_due(&mut self, myself: &ActorRef<QueueMsg>, model: ModelType, at: Timestamp) {
        if self.due.get(&model).is_some_and(|t| *t <= at) {
            return;
        }
        self.due.insert(model, at);
        let delay = at.since(self.args.clock.now()) + DUE_SLACK;
        myself.send_after(delay, move || tick(Tick::Due { model, at }));
    }

    /// Reads, in the background, when the next job of `models` comes due.
    fn refresh_due(&self, myself: &ActorRef<QueueMsg>, models: Vec<ModelType>) {
        let store = self.args.store.clone();
        let now = self.args.clock.now();
        let me = myself.clone();
        tokio::spawn(async move {
            for model in models {
                match store.next_due(model, now).await {
                    Ok(at) => {
                        let _ = me.cast(tick(Tick::DueAt { model, at }));
                    }
                    Err(e) => warn!("reading when the next {model} job comes due failed: {e}"),
                }
            }
        });
    }

    fn start_flush(&mut self, myself: &ActorRef<QueueMsg>) {
        if self.flushing || self.pending.is_empty() {
            return;
        }
        self.flushing = true;
        let batch = std::mem::take(&mut self.pending);
        let store = self.args.store.clone();
        let now = self.args.clock.now();
        let myself = myself.clone();
        tokio::spawn(async move {
            let meta: Vec<(ModelType, Option<JobId>, bool, JobId)> = batch
                .iter()
                .map(|p| (p.model, p.parent, p.follow_up, p.claim.job_id))
                .collect();
            let mut acks = Vec::with_capacity(batch.len());
            let items: Vec<(Claim, Settle)> = batch
                .into_iter()
                .map(|p| {
                    acks.push(p.ack);
                    (p.claim, p.settle)
                })
                .collect();
            let n = items.len();
            let results = store.settle_batch(items, now).await;
            let results: Vec<StoreResult<Settled>> = match results {
                Ok(r) => r,
                Err(e) => {
                    let msg = e.to_string();
                    (0..n)
                        .map(|_| Err(StoreError::Backend(msg.clone())))
                        .collect()
                }
            };
            // Answered from here, not from the actor: a settlement that
            // reached the store is acknowledged even if the actor has
            // died meanwhile.
            for (ack, result) in acks.into_iter().zip(&results) {
                if let Some(ack) = ack {
                    ack.answer(match result {
                        Err(StoreError::Backend(e) | StoreError::Unavailable(e)) => {
                            Err(format!("the store failed: {e}"))
                        }
                        _ => Ok(()),
                    });
                }
            }
            let flushed = meta
                .into_iter()
                .zip(results)
                .map(|((model, parent, follow_up, job_id), result)| FlushedItem {
                    model,
                    parent,
                    follow_up,
                    job_id,
                    result,
                })
                .collect();
            let _ = myself.cast(tick(Tick::Flushed(flushed)));
        });
    }

    fn flushed(&mut self, myself: &ActorRef<QueueMsg>, items: Vec<FlushedItem>) {
        self.flushing = false;
        let now = self.args.clock.now();
        let mut wake: Vec<ModelType> = Vec::new();
        if let Some(watch) = &self.args.watch {
            let ended: Vec<JobId> = items
                .iter()
                .filter(|i| {
                    matches!(
                        i.result,
                        Ok(Settled::Done) | Ok(Settled::Failed(FailOutcome::Failed { .. }))
                    )
                })
                .map(|i| i.job_id)
                .collect();
            watch.ended(&ended);
        }
        for item in items {
            match item.result {
                Ok(Settled::Done) | Ok(Settled::Failed(FailOutcome::Failed { .. })) => {
                    let done = matches!(item.result, Ok(Settled::Done));
                    let follow_up = done && item.follow_up && item.parent.is_none();
                    if item.parent.is_some() || follow_up {
                        let event = JobFinished {
                            job: item.job_id,
                            parent: item.parent,
                            follow_up,
                        };
                        match &self.finished {
                            Some(to) => {
                                if let Err(e) = to.send_message(event) {
                                    warn!(job = %item.job_id, "the fan-in did not take the news of a finished job ({e}); its next scan finds it");
                                }
                            }
                            None => {
                                debug!(job = %item.job_id, "no fan-in subscribed yet; its first scan finds the job")
                            }
                        }
                    }
                }
                Ok(Settled::Failed(FailOutcome::Retrying { run_at, .. })) => {
                    if run_at > now {
                        self.schedule_due(myself, item.model, run_at);
                    } else {
                        wake.push(item.model);
                    }
                }
                Ok(Settled::Released) => wake.push(item.model),
                Err(StoreError::StaleClaim { .. }) => {
                    debug!(job = %item.job_id, "settlement of a stale claim dropped (the job was reclaimed or cancelled)");
                }
                Err(e) => {
                    error!(job = %item.job_id, "could not record the job's outcome: {e}; it will run again when its lease expires");
                }
            }
        }
        wake.sort();
        wake.dedup();
        for m in wake {
            self.wake(Some(m));
        }
        self.start_flush(myself);
        if !self.flushing {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

impl Actor for QueueActor {
    type Msg = QueueMsg;
    type State = QueueState;
    type Arguments = QueueArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<QueueMsg>,
        args: QueueArgs,
    ) -> Result<QueueState, ActorProcessingErr> {
        let now = args.clock.now();
        if let Some((daemon, beat)) = &args.heartbeat {
            args.store
                .heartbeat(daemon, &beat.about, beat.timeout, now)
                .await?;
            myself.send_interval(beat.interval, || tick(Tick::Heartbeat));
        }
        if let Some(owner) = args.release_on_start.clone() {
            let n = args.store.release_owner(&owner, now).await?;
            if n > 0 {
                info!("released {n} jobs claimed by a previous run of this daemon");
            }
        }
        let n = args.store.reclaim_expired(now).await?;
        if n > 0 {
            info!("reclaimed {n} jobs whose lease had expired");
        }
        let last_token = args.store.change_token().await?;
        myself.send_interval(args.poll_interval, || tick(Tick::Poll));
        myself.send_interval(args.reclaim_interval, || tick(Tick::Reclaim));
        let state = QueueState {
            args,
            finished: None,
            subscribers: HashMap::new(),
            pending: Vec::new(),
            flushing: false,
            flush_waiters: Vec::new(),
            polling: false,
            last_token,
            due: HashMap::new(),
        };
        // Jobs a previous run left in backoff, or others scheduled ahead.
        state.refresh_due(&myself, ModelType::ALL.to_vec());
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<QueueMsg>,
        msg: QueueMsg,
        state: &mut QueueState,
    ) -> Result<(), ActorProcessingErr> {
        let store = &state.args.store;
        let now = state.args.clock.now();
        match msg {
            QueueMsg::Claim {
                model,
                n,
                owner,
                order,
                reply,
            } => {
                let lease = state.args.lease;
                let store = store.clone();
                let me = myself.clone();
                tokio::spawn(async move {
                    // A short claim: what is left may be waiting for its
                    // run_at, read in the same trip to the store.
                    // (Its failure never costs the claim, which is committed.)
                    let out = store
                        .claim_with(
                            &ClaimRequest {
                                model,
                                n,
                                lease,
                                owner: owner.clone(),
                                order,
                            },
                            now,
                        )
                        .await;
                    let short = out.as_ref().is_ok_and(|jobs| jobs.len() < n);
                    if let Err(MessagingErr::SendErr(Ok(jobs))) = reply.send(out) {
                        // The claimer stopped waiting (its call timed out
                        // while the store was slow, or it stopped): give
                        // the jobs back now, not when their leases end.
                        let mut back = 0;
                        for job in &jobs {
                            if store.release(&job.claim, now).await.is_ok() {
                                back += 1;
                            }
                        }
                        if back > 0 {
                            warn!("{back} {model} jobs claimed for {owner} went back to pending: it no longer waited for them");
                            let _ = me.cast(tick(Tick::Wake(Some(model))));
                        }
                    }
                    if short {
                        match store.next_due(model, now).await {
                            Ok(at) => {
                                let _ = me.cast(tick(Tick::DueAt { model, at }));
                            }
                            Err(e) => {
                                warn!("reading when the next {model} job comes due failed: {e}")
                            }
                        }
                    }
                });
            }
            QueueMsg::Settle {
                claim,
                settle,
                model,
                parent,
                follow_up,
                ack,
            } => {
                state.pending.push(Pending {
                    claim,
                    settle,
                    model,
                    parent,
                    follow_up,
                    ack,
                });
                state.start_flush(&myself);
            }
            #[cfg(any(test, feature = "testkit"))]
            QueueMsg::InjectPanic => panic!("injected fault in the queue"),
            QueueMsg::Submit { jobs, reply } => {
                let models: Vec<ModelType> = jobs.iter().map(|j| j.model_type).collect();
                let out = store.submit_batch(jobs, now).await;
                if out.is_ok() {
                    for m in ModelType::ALL.into_iter().filter(|m| models.contains(m)) {
                        state.wake(Some(m));
                    }
                }
                let _ = reply.send(out);
            }
            QueueMsg::SubmitParent {
                parent,
                fragments,
                reply,
            } => {
                let model = fragments.first().map(|f| f.model_type);
                let out = store.submit_parent(parent, fragments, now).await;
                if out.is_ok() {
                    if let Some(m) = model {
                        state.wake(Some(m));
                    }
                }
                let _ = reply.send(out);
            }
            QueueMsg::ReleaseOwner { owner, reply } => {
                let out = store.release_owner(&owner, now).await;
                if matches!(out, Ok(n) if n > 0) {
                    state.wake(None);
                }
                let _ = reply.send(out);
            }
            QueueMsg::Get { id, reply } => {
                let store = store.clone();
                answer(reply, async move { store.get(id).await })
            }
            QueueMsg::Fragments { parent, reply } => {
                let store = store.clone();
                answer(reply, async move { store.fragments(parent).await })
            }
            QueueMsg::ReadyParents { reply } => {
                let store = store.clone();
                answer(reply, async move { store.ready_parents(100).await })
            }
            QueueMsg::PendingFollowUps { reply } => {
                let store = store.clone();
                answer(reply, async move { store.pending_follow_ups(100).await })
            }
            QueueMsg::FinishParent { id, outcome, reply } => {
                let store = store.clone();
                answer(
                    reply,
                    async move { store.finish_parent(id, outcome, now).await },
                )
            }
            QueueMsg::Stats { reply } => {
                let store = store.clone();
                answer(reply, async move { store.stats(now).await })
            }
            QueueMsg::Subscribe { model, subscriber } => {
                let subs = state.subscribers.entry(model).or_default();
                subs.retain(|d| d.get_id() != subscriber.get_id());
                if subscriber.send_message(WorkAvailable).is_ok() {
                    subs.push(subscriber);
                }
            }
            QueueMsg::SubscribeFinished(to) => state.finished = Some(to),
            QueueMsg::Flush { reply } => {
                if state.flushing || !state.pending.is_empty() {
                    state.flush_waiters.push(reply);
                    state.start_flush(&myself);
                } else {
                    let _ = reply.send(());
                }
            }
            QueueMsg::Internal(Internal(Tick::Flushed(items))) => state.flushed(&myself, items),
            QueueMsg::Internal(Internal(Tick::Poll)) => {
                if !state.polling {
                    state.polling = true;
                    let store = store.clone();
                    let me = myself.clone();
                    tokio::spawn(async move {
                        let token = store.change_token().await.unwrap_or(None);
                        let _ = me.cast(tick(Tick::Polled(token)));
                    });
                }
            }
            QueueMsg::Internal(Internal(Tick::Polled(token))) => {
                state.polling = false;
                if token.is_some() && token != state.last_token {
                    state.last_token = token;
                    state.wake(None);
                    // Another program may have scheduled work ahead.
                    state.refresh_due(&myself, ModelType::ALL.to_vec());
                }
            }
            QueueMsg::Internal(Internal(Tick::Reclaim)) => {
                let store = store.clone();
                let me = myself.clone();
                tokio::spawn(async move {
                    match store.reclaim_expired(now).await {
                        Ok(0) => {}
                        Ok(n) => {
                            warn!("reclaimed {n} jobs whose lease expired (their holder died or stalled)");
                            let _ = me.cast(tick(Tick::Wake(None)));
                        }
                        Err(e) => error!("reclaiming expired leases failed: {e}"),
                    }
                });
            }
            QueueMsg::Internal(Internal(Tick::Heartbeat)) => {
                let Some((daemon, beat)) = state.args.heartbeat.clone() else {
                    return Ok(());
                };
                let store = store.clone();
                let me = myself.clone();
                tokio::spawn(async move {
                    if let Err(e) = store
                        .heartbeat(&daemon, &beat.about, beat.timeout, now)
                        .await
                    {
                        warn!("renewing this daemon's heartbeat failed: {e}");
                        return;
                    }
                    // Daemons gone silent: their claims come back now,
                    // not when their leases end.
                    match store.reclaim_expired(now).await {
                        Ok(0) => {}
                        Ok(_) => {
                            let _ = me.cast(tick(Tick::Wake(None)));
                        }
                        Err(e) => error!("taking back the claims of silent daemons failed: {e}"),
                    }
                });
            }
            QueueMsg::Internal(Internal(Tick::Wake(model))) => state.wake(model),
            QueueMsg::Internal(Internal(Tick::DueAt { model, at })) => {
                if let Some(at) = at {
                    state.schedule_due(&myself, model, at);
                }
            }
            QueueMsg::Internal(Internal(Tick::Due { model, at })) => {
                if state.due.get(&model) == Some(&at) {
                    state.due.remove(&model);
                }
                debug!(%model, "a job scheduled for later came due");
                state.wake(Some(model));
                // The next one after it, if any.
                state.refresh_due(&myself, vec![model]);
            }
        }
        Ok(())
    }
}
