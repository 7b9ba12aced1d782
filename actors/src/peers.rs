//! `Peers`: the references actors hold to one another.
//!
//! The FeederSupervisor hands the dispatchers the current `Peers` when it
//! starts them and again whenever it restarts one, so nobody keeps talking
//! to a dead actor and nobody looks another up by name. An actor that needs
//! fewer gets only those (the allocator: `allocator::AllocatorPeers`).

use ractor::ActorRef;

use crate::fanin::FanInMsg;
use crate::health::HealthMsg;
use crate::instances::InstanceSupMsg;
use crate::queue::QueueMsg;

/// The long-lived actors everyone may need to reach.
#[derive(Clone, Debug)]
pub struct Peers {
    /// The sole owner of the job store.
    pub queue: ActorRef<QueueMsg>,
    /// Fan-in of fragment results into parents.
    pub fanin: ActorRef<FanInMsg>,
    /// Probes of the model servers.
    pub health: ActorRef<HealthMsg>,
    /// The model servers' lifecycles (ContainerActors).
    pub instances: ActorRef<InstanceSupMsg>,
}
