//! The settlement ledger: outcomes sent to the queue and not yet committed.
//! Each is kept until the queue acknowledges it, so that one the queue
//! loses (it restarted, or its store failed) is sent again rather than
//! redone after its lease expires.
//!
//! The queue's acknowledgement comes as a message of the dispatcher's own
//! (`Settled` or `SettleLost`), sent by the task that committed the batch:
//! nothing waits on each settlement. One not acknowledged within the
//! call timeout is found by a sweep, every timeout while anything is
//! unsettled (so within one to two timeouts), and sent again.

use std::collections::HashMap;
use std::time::Duration;

use ractor::ActorRef;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{tick, DispatchMsg, Tick};
use crate::job::{Claim, JobId, ModelType};
use crate::queue::{QueueMsg, SettleAck};
use crate::store::Settle;

/// The longest wait before a lost settlement is sent again.
const RESETTLE_MAX: Duration = Duration::from_secs(5);

/// The wait before a settlement lost after `tries` sends is sent again:
/// growing with each loss (the queue is being restarted), capped.
fn resettle_pause(tries: u32) -> Duration {
    Duration::from_millis(100 * 2u64.saturating_pow(tries.min(10))).min(RESETTLE_MAX)
}

/// A settlement sent to the queue and not yet acknowledged.
#[derive(Debug)]
struct Unsettled {
    claim: Claim,
    settle: Settle,
    parent: Option<JobId>,
    follow_up: bool,
    /// Times sent.
    tries: u32,
    /// When it was last sent, while it waits for its acknowledgement
    /// (`None` once it is known lost, until it is sent again).
    sent_at: Option<Instant>,
}

/// The settlements of one dispatcher that the queue has not acknowledged.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// The dispatcher, told of each acknowledgement or loss.
    me: ActorRef<DispatchMsg>,
    /// The model its jobs are of.
    model: ModelType,
    /// How long the queue may take to commit one.
    timeout: Duration,
    /// By job.
    unsettled: HashMap<JobId, Unsettled>,
    /// A sweep for settlements past their time is due.
    sweep_armed: bool,
}

impl Ledger {
    /// An empty ledger for the dispatcher `me`.
    pub(crate) fn new(me: ActorRef<DispatchMsg>, model: ModelType, timeout: Duration) -> Self {
        Ledger {
            me,
            model,
            timeout,
            unsettled: HashMap::new(),
            sweep_armed: false,
        }
    }

    /// Keeps the settlement of `claim` and sends it to `queue`.
    pub(crate) fn settle(
        &mut self,
        queue: &ActorRef<QueueMsg>,
        claim: Claim,
        settle: Settle,
        parent: Option<JobId>,
        follow_up: bool,
    ) {
        let job = claim.job_id;
        self.unsettled.insert(
            job,
            Unsettled {
                claim,
                settle,
                parent,
                follow_up,
                tries: 0,
                sent_at: None,
            },
        );
        self.send(queue, job);
    }

    /// Sends a kept settlement to `queue`; its acknowledgement (or its
    /// loss) comes back as a message.
    pub(crate) fn send(&mut self, queue: &ActorRef<QueueMsg>, job: JobId) {
        let Some(u) = self.unsettled.get_mut(&job) else {
            return;
        };
        u.tries += 1;
        u.sent_at = Some(Instant::now());
        let me = self.me.clone();
        let ack = SettleAck::new(move |outcome| {
            let _ = me.cast(tick(match outcome {
                Ok(()) => Tick::Settled(job),
                Err(why) => Tick::SettleLost { job, why },
            }));
        });
        let msg = QueueMsg::Settle {
            claim: u.claim.clone(),
            settle: u.settle.clone(),
            model: self.model,
            parent: u.parent,
            follow_up: u.follow_up,
            ack: Some(ack),
        };
        if let Err(e) = queue.cast(msg) {
            // The message (its acknowledgement with it) came back unsent:
            // say why here rather than as "stopped before committing".
            if let ractor::MessagingErr::SendErr(QueueMsg::Settle { ack: Some(ack), .. }) = e {
                ack.cancel();
            }
            let _ = self.me.cast(tick(Tick::SettleLost {
                job,
                why: "the queue is not running".into(),
            }));
            return;
        }
        self.arm_sweep();
    }

    /// Arms the sweep for settlements past their time, unless it is armed.
    fn arm_sweep(&mut self) {
        if !self.sweep_armed {
            self.sweep_armed = true;
            self.me
                .send_after(self.timeout, || tick(Tick::SweepSettlements));
        }
    }

    /// Settlements sent longer ago than the timeout and not acknowledged
    /// are lost: each is sent again after a pause.
    pub(crate) fn sweep(&mut self, instance: &str) {
        self.sweep_armed = false;
        let now = Instant::now();
        let late: Vec<JobId> = self
            .unsettled
            .iter()
            .filter(|(_, u)| {
                u.sent_at
                    .is_some_and(|t| now.duration_since(t) >= self.timeout)
            })
            .map(|(&job, _)| job)
            .collect();
        let why = format!(
            "the queue did not commit it within {} s",
            self.timeout.as_secs()
        );
        for job in late {
            self.lost(instance, job, &why);
        }
        if self.unsettled.values().any(|u| u.sent_at.is_some()) {
            self.arm_sweep();
        }
    }

    /// The queue committed this job's settlement.
    pub(crate) fn settled(&mut self, job: JobId) {
        self.unsettled.remove(&job);
    }

    /// A lost settlement of `instance`'s: sent again after a pause.
    pub(crate) fn lost(&mut self, instance: &str, job: JobId, why: &str) {
        let Some(u) = self.unsettled.get_mut(&job) else {
            return;
        };
        if u.sent_at.take().is_none() {
            return; // Already known lost: its resend is on its way.
        }
        let pause = resettle_pause(u.tries);
        if u.tries == 1 {
            warn!(instance, %job, "the outcome of job {job} did not reach the store: {why}; kept and sent again in {} ms", pause.as_millis());
        } else {
            debug!(%job, tries = u.tries, "settlement lost again: {why}");
        }
        self.me.send_after(pause, move || tick(Tick::Resettle(job)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_settlement_waits_longer_each_time_up_to_a_cap() {
        assert_eq!(resettle_pause(1), Duration::from_millis(200));
        assert_eq!(resettle_pause(2), Duration::from_millis(400));
        assert_eq!(resettle_pause(5), Duration::from_millis(3_200));
        assert_eq!(resettle_pause(6), RESETTLE_MAX);
        assert_eq!(resettle_pause(u32::MAX), RESETTLE_MAX);
    }
}
