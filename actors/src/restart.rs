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
pub enum RestartDecision {
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
pub struct RestartTracker {
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
    pub fn started(&mut self, now: Instant) {
        self.last_start = Some(now);
    }

    /// Forgets the last start: the run that fails next did not get going
    /// (for a model server: it never became ready), so it cannot have lasted.
    pub fn clear_start(&mut self) {
        self.last_start = None;
    }

    /// Forgets the failures (an operator revived what was given up on);
    /// the total is kept.
    pub fn forgive(&mut self) {
        self.recent.clear();
        self.consecutive = 0;
        self.last_start = None;
    }

    /// Records a failure at `now` and decides what to do.
    pub fn failed(
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
pub fn child_exit(event: ractor::SupervisionEvent) -> Option<(ractor::ActorCell, String)> {
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

/// What every supervisor does when a child fails: count the failure, then
/// schedule `restart` after the backoff, or give up and stop `myself` (so
/// its own parent sees the failure) when the child keeps failing. `what`
/// names the child in the log ("the dispatcher of vision"); `note` adds what
/// was already done about it.
pub fn restart_or_escalate<M: ractor::Message>(
    myself: &ractor::ActorRef<M>,
    tracker: &mut RestartTracker,
    policy: &RestartPolicy,
    what: &str,
    reason: String,
    note: &str,
    restart: impl FnOnce() -> M + Send + 'static,
) {
    match tracker.failed(policy, Instant::now(), reason.clone()) {
        RestartDecision::RestartIn(delay) => {
            tracing::warn!(
                "{what} {reason}{note}; restarting it in {:.1} s",
                delay.as_secs_f64()
            );
            myself.send_after(delay, restart);
        }
        RestartDecision::Escalate { restarts } => {
            tracing::error!(
                "{what} {reason}; it restarted {restarts} times within {} s: giving up and escalating",
                policy.window.as_secs()
            );
            myself.stop(Some(format!("{what} keeps failing: {reason}")));
        }
    }
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

    #[tokio::test(start_paused = true)]
    async fn backs_off_then_escalates_within_the_window() {
        let p = policy();
        let mut t = RestartTracker::default();
        let now = Instant::now();
        t.started(now);
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
        let p = policy();
        let mut t = RestartTracker::default();
        let start = Instant::now();
        t.started(start);
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
}
