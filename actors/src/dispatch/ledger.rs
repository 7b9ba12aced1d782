//! The settlement ledger: outcomes sent to the queue and not yet committed.
//! Each is kept until the queue acknowledges it, so that one the queue
//! loses (it restarted, or its store failed) is sent again rather than
//! redone after its lease expires.

use std::collections::HashMap;
use std::time::Duration;

use ractor::ActorRef;
use tracing::{debug, warn};

use super::{tick, DispatchMsg, Tick};
use crate::job::{Claim, JobId, ModelType};
use crate::queue::QueueMsg;
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
}

impl Ledger {
    /// An empty ledger for the dispatcher `me`.
    pub(crate) fn new(me: ActorRef<DispatchMsg>, model: ModelType, timeout: Duration) -> Self {
        Ledger {
            me,
            model,
            timeout,
            unsettled: HashMap::new(),
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
        let (tx, rx) = ractor::concurrency::oneshot();
        let msg = QueueMsg::Settle {
            claim: u.claim.clone(),
            settle: u.settle.clone(),
            model: self.model,
            parent: u.parent,
            follow_up: u.follow_up,
            ack: Some(tx.into()),
        };
        let me = self.me.clone();
        if let Err(e) = queue.cast(msg) {
            let _ = me.cast(tick(Tick::SettleLost {
                job,
                why: format!("the queue is not running ({e})"),
            }));
            return;
        }
        let timeout = self.timeout;
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

    /// The queue committed this job's settlement.
    pub(crate) fn settled(&mut self, job: JobId) {
        self.unsettled.remove(&job);
    }

    /// A lost settlement of `instance`'s: sent again after a pause.
    pub(crate) fn lost(&mut self, instance: &str, job: JobId, why: &str) {
        let Some(u) = self.unsettled.get(&job) else {
            return;
        };
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
