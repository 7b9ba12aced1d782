//! `FeederHandle`: the running pipeline behind typed async methods.
//!
//! The frontends (admin endpoint, daemon, demo) talk to the actors through
//! it, so that none of them builds messages, picks timeouts or matches
//! `CallResult`s: each method says in its error what did not answer.

use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, MessagingErr, RpcReplyPort};

use crate::allocator::{AllocatorStatus, Strategy};
use crate::instances::InstanceSupMsg;
use crate::job::{NewJob, Submitted};
use crate::queue::QueueMsg;
use crate::store::StoreError;
use crate::supervisor::{peers, FeederMsg, FeederStatus, ShutdownReport};

/// Why a call through the handle did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The actor did not answer in time, or is not running.
    #[error("{0} did not answer")]
    NotAnswering(&'static str),
    /// The actor answered with a refusal (an unknown instance, no allocator).
    #[error("{0}")]
    Refused(String),
    /// The job store failed; its kind tells an unreachable store
    /// ([`StoreError::Unavailable`]) from a failed call.
    #[error("the job store failed: {0}")]
    Store(#[source] StoreError),
}

/// Time allowed for the calls that only read state.
const READ: Duration = Duration::from_secs(3);
/// Time allowed for the calls that change something.
const CHANGE: Duration = Duration::from_secs(15);
/// Time allowed for a submission (a large batch is one transaction).
const SUBMIT: Duration = Duration::from_secs(30);
/// Time allowed for a shutdown beyond its grace (committing outcomes,
/// stopping servers).
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(60);

/// A cheap, cloneable reference to the running pipeline.
#[derive(Clone, Debug)]
pub struct FeederHandle {
    feeder: ActorRef<FeederMsg>,
}

async fn call<M, T>(
    actor: &ActorRef<M>,
    who: &'static str,
    limit: Duration,
    msg: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, HandleError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    let answer: Result<CallResult<T>, MessagingErr<M>> = actor.call(msg, Some(limit)).await;
    match answer {
        Ok(CallResult::Success(v)) => Ok(v),
        _ => Err(HandleError::NotAnswering(who)),
    }
}

impl FeederHandle {
    /// A handle on the supervisor of a running pipeline.
    pub fn new(feeder: ActorRef<FeederMsg>) -> Self {
        FeederHandle { feeder }
    }

    /// The supervisor itself (for joining or stopping it).
    pub fn actor(&self) -> &ActorRef<FeederMsg> {
        &self.feeder
    }

    /// The whole pipeline's state, within `limit`.
    pub async fn status_within(&self, limit: Duration) -> Result<FeederStatus, HandleError> {
        call(&self.feeder, "the supervisor", limit, |reply| {
            FeederMsg::Status { reply }
        })
        .await
    }

    /// The whole pipeline's state.
    pub async fn status(&self) -> Result<FeederStatus, HandleError> {
        self.status_within(READ).await
    }

    /// Queues jobs in one transaction and wakes their models' dispatchers.
    pub async fn submit(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>, HandleError> {
        let queue = peers(&self.feeder, READ)
            .await
            .ok_or(HandleError::NotAnswering("the supervisor"))?
            .queue;
        call(&queue, "the queue", SUBMIT, |reply| QueueMsg::Submit {
            jobs,
            reply,
        })
        .await?
        .map_err(HandleError::Store)
    }

    /// Launches a failed instance again, its crash-loop count started over.
    pub async fn restart_instance(&self, name: &str) -> Result<(), HandleError> {
        let instances = peers(&self.feeder, READ)
            .await
            .ok_or(HandleError::NotAnswering("the supervisor"))?
            .instances;
        let instance = name.to_string();
        call(&instances, "the instance supervisor", CHANGE, |reply| {
            InstanceSupMsg::Revive { instance, reply }
        })
        .await?
        .map_err(HandleError::Refused)
    }

    /// Pins a strategy (`Some`) or releases the pin (`None`); the
    /// allocator's status after it.
    pub async fn pin(&self, strategy: Option<Strategy>) -> Result<AllocatorStatus, HandleError> {
        call(&self.feeder, "the supervisor", CHANGE, |reply| {
            FeederMsg::Pin { strategy, reply }
        })
        .await?
        .map_err(HandleError::Refused)
    }

    /// Stops claiming, lets requests finish within `grace`, releases the
    /// rest and commits every outcome.
    pub async fn shutdown(&self, grace: Duration) -> Result<ShutdownReport, HandleError> {
        call(
            &self.feeder,
            "the supervisor",
            grace + SHUTDOWN_MARGIN,
            |reply| FeederMsg::Shutdown { grace, reply },
        )
        .await
    }
}
