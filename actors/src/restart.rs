//! Restart policy as data: capped exponential backoff between restarts of
//! one child, and an intensity limit (too many restarts within a window)
//! beyond which the supervisor gives up and escalates to its own parent.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

/// How a supervisor restarts a failed child.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RestartPolicy {
    /// Delay before each restart (growing with consecutive failures).
    pub backoff: Backoff,
    /// More than this many restarts within `window` escalates.
    pub max_restarts: usize,
    /// The window of the intensity limit.
    pub window: Duration,
    /// A child that ran this long without failing starts its backoff afresh.
    pub reset_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(10),
                factor: 2.0,
                jitter: 0.1,
            },
            max_restarts: 5,
            window: Duration::from_secs(60),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// What to do about a child that failed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RestartDecision {
    /// Restart it after this delay.
    RestartIn(Duration),
    /// Too many restarts in the window: give up and escalate.
    Escalate {
        /// Restarts within the window.
        restarts: usize,
    },
}

/// One child's restart history: what the CLI can show, what decides the next step.
#[derive(Clone, Debug, Default)]
pub(crate) struct RestartTracker {
    recent: VecDeque<Instant>,
    consecutive: u32,
    last_start: Option<Instant>,
    /// Restarts since the supervisor started.
    pub total: u64,
    /// The last failure's reason.
    pub last_error: Option<String>,
}

impl RestartTracker {
    /// Records that the child (re)started now (for a model server: that it
    /// became ready).
    pub(crate) fn started(&mut self, now: Instant) {
        self.last_start = Some(now);
    }

    /// Forgets the last start: the run that fails next did not get going
    /// (for a model server: it never became ready), so it cannot have lasted.
    pub(crate) fn clear_start(&mut self) {
        self.last_start = None;
    }

    /// Forgets the failures (an operator revived what was given up on);
    /// the total is kept.
    pub(crate) fn forgive(&mut self) {
        self.recent.clear();
        self.consecutive = 0;
        self.last_start = None;
    }

    /// Records a failure at `now` and decides what to do.
    pub(crate) fn failed(
        &mut self,
        policy: &RestartPolicy,
        now: Instant,
        reason: String,
    ) -> RestartDecision {
        self.last_error = Some(reason);
        // A run that lasted `reset_after` starts the backoff afresh; the
        // next run counts from its own `started`.
        if self
            .last_start
            .take()
            .is_some_and(|s| now.duration_since(s) >= policy.reset_after)
        {
            self.consecutive = 0;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= policy.max_restarts {
            return RestartDecision::Escalate {
                restarts: self.recent.len(),
            };
        }
        self.recent.push_back(now);
        self.consecutive += 1;
        self.total += 1;
        RestartDecision::RestartIn(policy.backoff.delay(self.consecutive))
    }
}

/// The child that exited and why, from a supervision event; `None` for
/// events that are not an exit (a child starting, say).
fn child_exit(event: ractor::SupervisionEvent) -> Option<(ractor::ActorCell, String)> {
    match event {
        ractor::SupervisionEvent::ActorFailed(cell, err) => {
            Some((cell, format!("panicked: {err}")))
        }
        ractor::SupervisionEvent::ActorTerminated(cell, _, reason) => Some((
            cell,
            format!(
                "stopped ({})",
                reason.unwrap_or_else(|| "no reason given".into())
            ),
        )),
        _ => None,
    }
}

/// A supervisor's note to itself to start the child of slot `K` again,
/// sent when the backoff has run out. Opaque outside this crate, so that
/// only the supervisor's own timer restarts a child.
#[derive(Debug)]
pub struct Restart<K>(K);

impl<K> Restart<K> {
    /// The slot to fill again.
    pub(crate) fn slot(self) -> K {
        self.0
    }
}

/// A child of a supervisor that exited while it was wanted.
#[derive(Debug)]
pub(crate) struct Exit<K> {
    /// Which child.
    pub key: K,
    /// Why ("panicked: …", "stopped (…)").
    pub reason: String,
}

/// The one-for-one supervision every supervisor here does, written once:
/// which running actor fills which slot (`K`: an instance's index, a child's
/// kind), each slot's restart history, and what happens when a child exits
/// or cannot be started again. The supervisor keeps its children's
/// references (of whatever message types) and its own reactions to an exit
/// (releasing a dispatcher's jobs, telling an instance's watchers); this
/// keeps the rules.
///
/// The rule for a failed respawn is the rule for a failure: it counts
/// against the slot's intensity limit, the next try comes after the backoff,
/// and a child that cannot be started within the limit stops the supervisor
/// so that its own parent sees the failure.
#[derive(Debug)]
pub(crate) struct Supervision<K> {
    /// How children are restarted.
    policy: RestartPolicy,
    /// Which slot each running child fills, for its supervision events.
    by_id: std::collections::HashMap<ractor::ActorId, K>,
    /// Each slot's restart history.
    trackers: std::collections::HashMap<K, RestartTracker>,
    /// A shutdown is under way: exits are expected, nothing is restarted.
    stopping: bool,
}

impl<K: Copy + Eq + std::hash::Hash + std::fmt::Debug> Supervision<K> {
    /// No children yet, restarted by `policy`.
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        Supervision {
            policy,
            by_id: Default::default(),
            trackers: Default::default(),
            stopping: false,
        }
    }

    /// The actor `child` now fills `key` (started or restarted).
    pub(crate) fn started(&mut self, key: K, child: ractor::ActorId) {
        self.by_id.insert(child, key);
        self.trackers
            .entry(key)
            .or_default()
            .started(Instant::now());
    }

    /// From here on, exits are expected and nothing is restarted.
    pub(crate) fn stop(&mut self) {
        self.stopping = true;
    }

    /// Whether a shutdown is under way.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping
    }

    /// Each slot's restart history that has one (for status).
    pub(crate) fn trackers(&self) -> impl Iterator<Item = (&K, &RestartTracker)> {
        self.trackers.iter()
    }

    /// The child that `event` says exited, and why; `None` for other
    /// events and for actors that are not (or no longer) a child. The
    /// exited actor no longer fills its slot; during a shutdown
    /// ([`Supervision::stopping`]) it is not to be restarted.
    pub(crate) fn exited(&mut self, event: ractor::SupervisionEvent) -> Option<Exit<K>> {
        let (cell, reason) = child_exit(event)?;
        let key = self.by_id.remove(&cell.get_id())?;
        Some(Exit { key, reason })
    }

    /// A child failed: schedule `restart` after the backoff, or give up and
    /// stop `myself` when it keeps failing. `what` names the child in the
    /// log ("the dispatcher of vision"); `note` adds what was already done.
    pub(crate) fn failed<M: ractor::Message>(
        &mut self,
        myself: &ractor::ActorRef<M>,
        key: K,
        what: &str,
        reason: String,
        note: &str,
        restart: impl FnOnce(Restart<K>) -> M + Send + 'static,
    ) where
        K: Send + 'static,
    {
        let tracker = self.trackers.entry(key).or_default();
        match tracker.failed(&self.policy, Instant::now(), reason.clone()) {
            RestartDecision::RestartIn(delay) => {
                tracing::warn!(
                    "{what} {reason}{note}; restarting it in {:.1} s",
                    delay.as_secs_f64()
                );
                myself.send_after(delay, move || restart(Restart(key)));
            }
            RestartDecision::Escalate { restarts } => {
                tracing::error!(
                    "{what} {reason}; it restarted {restarts} times within {} s: giving up and escalating",
                    self.policy.window.as_secs()
                );
                myself.stop(Some(format!("{what} keeps failing: {reason}")));
            }
        }
    }

    /// Starting a child again failed (`error`): the same as a failure of
    /// the child itself, so the next try comes after the backoff.
    pub(crate) fn respawn_failed<M: ractor::Message>(
        &mut self,
        myself: &ractor::ActorRef<M>,
        key: K,
        what: &str,
        error: &ractor::ActorProcessingErr,
        restart: impl FnOnce(Restart<K>) -> M + Send + 'static,
    ) where
        K: Send + 'static,
    {
        self.trackers.entry(key).or_default().clear_start();
        let reason = format!("could not be started again: {error}");
        self.failed(myself, key, what, reason, "", restart);
    }
}

/// A supervisor with one child per slot (an instance's index), restarted
/// one for one: what [`spawn_all`], [`restart_slot`], [`slot_exited`] and
/// [`child_failed`] need of it, so that the rules of a restart are written
/// once for every such supervisor.
pub(crate) trait OneForOne: Send + Sized + 'static {
    /// The supervisor's messages.
    type Msg: ractor::Message;
    /// What its children are called in logs ("dispatcher").
    const CHILD: &'static str;
    /// Its supervision bookkeeping.
    fn supervision(&mut self) -> &mut Supervision<usize>;
    /// How many slots it has.
    fn slots(&self) -> usize;
    /// The instance slot `i` serves.
    fn instance(&self, i: usize) -> &str;
    /// Whether slot `i`'s child runs.
    fn running(&self, i: usize) -> bool;
    /// Slot `i`'s child exited.
    fn vacate(&mut self, i: usize);
    /// Starts slot `i`'s child.
    fn spawn(
        &mut self,
        myself: &ractor::ActorRef<Self::Msg>,
        i: usize,
    ) -> impl std::future::Future<Output = Result<(), ractor::ActorProcessingErr>> + Send;
    /// The message its restart timer sends.
    fn restart_msg(r: Restart<usize>) -> Self::Msg;
}

/// Writes the bookkeeping half of a [`OneForOne`] impl for the usual
/// shape of state: `sup`, its `Supervision<usize>`, and `slots`, each with
/// its instance's `spec` and its child's `actor` while it runs. `$restart`
/// wraps a [`Restart`] into the supervisor's message `$msg`.
macro_rules! one_for_one_slots {
    ($msg:ty, $restart:path) => {
        type Msg = $msg;

        fn supervision(&mut self) -> &mut $crate::restart::Supervision<usize> {
            &mut self.sup
        }

        fn slots(&self) -> usize {
            self.slots.len()
        }

        fn instance(&self, i: usize) -> &str {
            &self.slots[i].spec.name
        }

        fn running(&self, i: usize) -> bool {
            self.slots[i].actor.is_some()
        }

        fn vacate(&mut self, i: usize) {
            self.slots[i].actor = None;
        }

        fn restart_msg(r: $crate::restart::Restart<usize>) -> $msg {
            $restart(r)
        }
    };
}
pub(crate) use one_for_one_slots;

/// How slot `i`'s child is named in logs.
fn child_of<S: OneForOne>(state: &S, i: usize) -> String {
    format!("the {} of {}", S::CHILD, state.instance(i))
}

/// Starts every slot's child (in `pre_start`).
pub(crate) async fn spawn_all<S: OneForOne>(
    state: &mut S,
    myself: &ractor::ActorRef<S::Msg>,
) -> Result<(), ractor::ActorProcessingErr> {
    for i in 0..state.slots() {
        state.spawn(myself, i).await?;
    }
    Ok(())
}

/// A restart timer ran out: starts the slot's child again, unless a
/// shutdown is under way or it runs already. One that cannot be started
/// counts as a failure.
pub(crate) async fn restart_slot<S: OneForOne>(
    state: &mut S,
    myself: &ractor::ActorRef<S::Msg>,
    r: Restart<usize>,
) {
    let i = r.slot();
    if state.supervision().stopping() || state.running(i) {
        return;
    }
    match state.spawn(myself, i).await {
        Ok(()) => tracing::info!(instance = %state.instance(i), "{} restarted", S::CHILD),
        Err(e) => {
            let what = child_of(state, i);
            state
                .supervision()
                .respawn_failed(myself, i, &what, &e, S::restart_msg);
        }
    }
}

/// A supervision event: the child that exited, its slot now vacant, when
/// it was wanted (no shutdown under way). The supervisor reacts, then
/// passes it to [`child_failed`].
pub(crate) fn slot_exited<S: OneForOne>(
    state: &mut S,
    event: ractor::SupervisionEvent,
) -> Option<Exit<usize>> {
    let exit = state.supervision().exited(event)?;
    state.vacate(exit.key);
    (!state.supervision().stopping()).then_some(exit)
}

/// Schedules the restart of a child that exited (`note` adds what the
/// supervisor did about it), or escalates.
pub(crate) fn child_failed<S: OneForOne>(
    state: &mut S,
    myself: &ractor::ActorRef<S::Msg>,
    exit: Exit<usize>,
    note: &str,
) {
    let what = child_of(state, exit.key);
    state
        .supervision()
        .failed(myself, exit.key, &what, exit.reason, note, S::restart_msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(8),
                factor: 2.0,
                jitter: 0.0,
            },
            max_restarts: 3,
            window: Duration::from_secs(60),
            reset_after: Duration::from_secs(30),
        }
    }

    /// The test policy, and a tracker whose child started now.
    fn started_now() -> (RestartPolicy, RestartTracker, Instant) {
        let mut t = RestartTracker::default();
        let now = Instant::now();
        t.started(now);
        (policy(), t, now)
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_then_escalates_within_the_window() {
        let (p, mut t, now) = started_now();
        let d: Vec<_> = (0..3).map(|_| t.failed(&p, now, "boom".into())).collect();
        assert_eq!(
            d,
            vec![
                RestartDecision::RestartIn(Duration::from_secs(1)),
                RestartDecision::RestartIn(Duration::from_secs(2)),
                RestartDecision::RestartIn(Duration::from_secs(4)),
            ]
        );
        assert_eq!(
            t.failed(&p, now, "boom".into()),
            RestartDecision::Escalate { restarts: 3 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_healthy_run_resets_the_backoff_and_old_restarts_expire() {
        let (p, mut t, start) = started_now();
        t.failed(&p, start, "a".into());
        t.failed(&p, start, "b".into());
        let later = start + Duration::from_secs(100);
        t.started(later - Duration::from_secs(40));
        assert_eq!(
            t.failed(&p, later, "c".into()),
            RestartDecision::RestartIn(Duration::from_secs(1))
        );
        assert_eq!(t.total, 3);
        assert_eq!(t.last_error.as_deref(), Some("c"));
    }

    /// A supervisor of one child, through `Supervision`, as the real ones.
    mod one_child {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

        use super::super::*;

        /// Refuses to start while `refusals` is above zero; panics on any message.
        pub(crate) struct Child;

        pub(crate) struct ChildArgs {
            pub refusals: Arc<AtomicUsize>,
            pub starts: Arc<AtomicUsize>,
        }

        impl Actor for Child {
            type Msg = ();
            type State = ();
            type Arguments = ChildArgs;

            async fn pre_start(
                &self,
                _: ActorRef<()>,
                args: ChildArgs,
            ) -> Result<(), ActorProcessingErr> {
                args.starts.fetch_add(1, Ordering::SeqCst);
                let refused = args
                    .refusals
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if refused {
                    return Err("refused to start".into());
                }
                Ok(())
            }

            async fn handle(
                &self,
                _: ActorRef<()>,
                _: (),
                _: &mut (),
            ) -> Result<(), ActorProcessingErr> {
                panic!("boom");
            }
        }

        pub(crate) enum Msg {
            Restart(Restart<usize>),
            Crash,
            Running(RpcReplyPort<bool>),
        }

        pub(crate) struct Sup;

        /// A supervisor whose child started, then refuses `refusals` starts
        /// and crashes: the supervisor, its end, and the child's starts.
        pub(crate) async fn crashed(
            refusals: usize,
        ) -> (
            ActorRef<Msg>,
            ractor::concurrency::JoinHandle<()>,
            Arc<AtomicUsize>,
        ) {
            let refused = Arc::new(AtomicUsize::new(0));
            let starts = Arc::new(AtomicUsize::new(0));
            let args = (super::policy(), refused.clone(), starts.clone());
            let (sup, done) = Actor::spawn(None, Sup, args).await.unwrap();
            refused.store(refusals, Ordering::SeqCst);
            sup.cast(Msg::Crash).unwrap();
            (sup, done, starts)
        }

        pub(crate) struct State {
            sup: Supervision<usize>,
            child: Option<ActorRef<()>>,
            refusals: Arc<AtomicUsize>,
            starts: Arc<AtomicUsize>,
        }

        impl State {
            async fn spawn(&mut self, myself: &ActorRef<Msg>) -> Result<(), ActorProcessingErr> {
                let args = ChildArgs {
                    refusals: self.refusals.clone(),
                    starts: self.starts.clone(),
                };
                let (child, _) = Child::spawn_linked(None, Child, args, myself.get_cell()).await?;
                self.sup.started(0, child.get_id());
                self.child = Some(child);
                Ok(())
            }
        }

        impl Actor for Sup {
            type Msg = Msg;
            type State = State;
            type Arguments = (RestartPolicy, Arc<AtomicUsize>, Arc<AtomicUsize>);

            async fn pre_start(
                &self,
                myself: ActorRef<Msg>,
                (policy, refusals, starts): Self::Arguments,
            ) -> Result<State, ActorProcessingErr> {
                let mut state = State {
                    sup: Supervision::new(policy),
                    child: None,
                    refusals,
                    starts,
                };
                state.spawn(&myself).await?;
                Ok(state)
            }

            async fn handle(
                &self,
                myself: ActorRef<Msg>,
                msg: Msg,
                state: &mut State,
            ) -> Result<(), ActorProcessingErr> {
                match msg {
                    Msg::Restart(r) => {
                        let slot = r.slot();
                        if let Err(e) = state.spawn(&myself).await {
                            state
                                .sup
                                .respawn_failed(&myself, slot, "the child", &e, Msg::Restart);
                        }
                    }
                    Msg::Crash => {
                        if let Some(c) = &state.child {
                            let _ = c.cast(());
                        }
                    }
                    Msg::Running(reply) => {
                        let _ = reply.send(state.child.is_some());
                    }
                }
                Ok(())
            }

            async fn handle_supervisor_evt(
                &self,
                myself: ActorRef<Msg>,
                event: SupervisionEvent,
                state: &mut State,
            ) -> Result<(), ActorProcessingErr> {
                if let Some(exit) = state.sup.exited(event) {
                    state.child = None;
                    state.sup.failed(
                        &myself,
                        exit.key,
                        "the child",
                        exit.reason,
                        "",
                        Msg::Restart,
                    );
                }
                Ok(())
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_respawn_is_retried_after_the_backoff() {
        use std::sync::atomic::Ordering;
        let (sup, _done, starts) = one_child::crashed(2).await;
        // Polled in paused time: each pause lets the backoff run out.
        let running = async {
            loop {
                let up = sup.call(one_child::Msg::Running, None).await.unwrap();
                if matches!(up, ractor::rpc::CallResult::Success(true))
                    && starts.load(Ordering::SeqCst) > 1
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), running)
            .await
            .expect("the child runs again once it can start");
        // The first start, two refused, one that worked.
        assert_eq!(starts.load(Ordering::SeqCst), 4);
        sup.stop(None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_child_that_cannot_be_started_again_escalates_within_the_limit() {
        use std::sync::atomic::Ordering;
        let (_sup, done, starts) = one_child::crashed(usize::MAX).await;
        tokio::time::timeout(Duration::from_secs(600), done)
            .await
            .expect("the supervisor gives up and stops")
            .unwrap();
        // The crash and two refused starts fill the limit of 3; the third
        // refusal escalates.
        assert_eq!(starts.load(Ordering::SeqCst), 4);
    }
}
