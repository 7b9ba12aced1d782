//! # feeder-actors
//!
//! The core of gpu-feeder, free of any database, HTTP, Docker or NVML code:
//! the domain types, the port traits through which the actors reach the
//! world, and (as the pipeline grows) the actors themselves with their typed
//! messages. The `gpu-feeder` crate implements the ports; tests implement
//! them with in-memory fakes.
//!
//! Its public surface is what the `gpu-feeder` binary, the tests and the
//! benchmarks use: the modules marked *(public)* below and the types
//! re-exported at the root. The rest is the crate's own.
//!
//! Domain types and ports:
//! - [`Job`] and its kin (`job`): jobs, their ids, statuses, payloads,
//!   claims and outcomes, re-exported at the root.
//! - [`Timestamp`] and [`Clock`] (`time`): the unit of every stored time,
//!   and the clock, re-exported at the root.
//! - [`store`] *(public)*: the `JobStore` port, the durable queue's contract
//!   (async), and `Blocking`, which serves it from a synchronous
//!   `BlockingJobStore`.
//! - [`inference`] *(public)*: the `InferenceClient` port, one model server,
//!   and the metrics reading it answers with.
//! - [`results`] *(public)*: the `ResultStore` port and the result document.
//! - [`runtime`] *(public)*: the `ContainerRuntime` port: launching,
//!   adopting, watching and stopping a model server (Docker, local process).
//! - [`gpu`] *(public)*: the `GpuProbe` port and the GPU snapshot.
//!
//! Pure logic:
//! - [`fragment`] *(public)*: splitting texts and images into overlapping
//!   fragments, each fragment's [`fragment::Place`], and merging their answers.
//! - [`prefix`] *(public)*: prefix keys, and the grouped order in which
//!   claims take jobs that share a prompt prefix.
//! - [`backoff`] *(public)*: capped exponential backoff with jitter
//!   (retries, restarts).
//! - [`window`] *(public)*: the adaptive window's controller
//!   (`dispatch.window = "auto"`).
//! - `restart`: restart policy as data (backoff, intensity limit),
//!   `Supervision`, the one-for-one bookkeeping every supervisor shares, and
//!   the restart rules of the supervisors with one child per instance.
//! - `tell`: casting to an actor, or publishing to a subscriber, without
//!   dropping a failure silently.
//! - `named`: `named!`, the names of the variants of an enum
//!   (statuses, model types, strategies, states), in one table each.
//!
//! Actors, one per file or folder, each with its messages, arguments and state:
//! - [`supervisor`] *(public)*: `FeederSupervisor`, the root; restarts its
//!   children and runs the graceful shutdown.
//! - [`queue`] *(public)*: `QueueActor`, sole owner of the job store;
//!   group-commits outcomes. It publishes events it owns: `WorkAvailable` to
//!   the subscribers of a model (the dispatchers, which hear it as `Wake`)
//!   and `JobFinished` to the fan-in (heard as `Check` or `FollowUp`); each
//!   subscriber converts them into its own messages through ractor's derived
//!   references, so the queue names neither.
//! - [`handle`] *(public)*: `FeederHandle`, the frontends' typed way into the
//!   pipeline.
//! - `dispatch_supervisor`: `DispatchSupervisor`, one dispatcher per instance.
//! - [`dispatch`] *(public)*: `DispatchActor`, keeps one instance's window of
//!   requests full; a folder of its state groups (pacer, claim buffer,
//!   settlement ledger, requests under way, warm keys, status).
//! - [`fanin`] *(public)*: `FanInActor`, completes parents when their
//!   fragments are done.
//! - [`health`] *(public)*: `HealthActor`, probes every instance and publishes
//!   `ProbeOutcome`s (the instance supervisor hears them as `Probed`).
//! - [`instances`] *(public)*: `InstanceSupervisor`, one ContainerActor per
//!   instance; routes probe outcomes and dispatcher watches to them.
//! - [`gpu_monitor`] *(public)*: `GpuMonitorActor`, reads the GPUs every
//!   second; temperature alerts with hysteresis; publishes each `GpuSnapshot`
//!   (the supervisor hears it as `Gpu`).
//! - [`allocator`] *(public)*: `AllocatorActor`, chooses the strategy (which
//!   instances run, with which memory share) from the durable backlog.
//! - [`container`] *(public)*: `ContainerActor`, one model server's
//!   lifecycle: launch, adopt, Loading → Ready → Unhealthy → Restarting,
//!   crash loop → Failed.
//! - `peers`: the references actors hold to one another.
//! - [`spec`] *(public)*: `InstanceSpec`, one instance as the supervisors see it.
//! - `testkit` (feature `testkit`): fakes of every port and the store
//!   contract suite run by every adapter.
#![warn(unreachable_pub)]

#[macro_use]
mod named;

pub mod allocator;
pub mod backoff;
pub mod container;
pub mod dispatch;
mod dispatch_supervisor;
pub mod fanin;
pub mod fragment;
pub mod gpu;
pub mod gpu_monitor;
pub mod handle;
pub mod health;
pub mod inference;
pub mod instances;
mod job;
mod peers;
pub mod prefix;
pub mod queue;
mod restart;
pub mod results;
pub mod runtime;
pub mod spec;
pub mod store;
pub mod supervisor;
mod tell;
mod time;
pub mod watch;
pub mod window;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use backoff::Backoff;
pub use inference::{InferenceClient, InferenceError, InferenceOutput, RawResponse};
pub use job::{
    BadJobId, BadJobStatus, BadModelType, Claim, ClaimedJob, Completion, FailOutcome, Failure, Job,
    JobId, JobStatus, ListFilter, ModelStats, ModelType, NewJob, Payload, QueueStats, StatusCounts,
    Submitted,
};
pub use prefix::{ClaimOrder, Grouping};
pub use results::{FragmentResult, JobResult, ResultRef, ResultStore};
pub use store::{
    Blocking, BlockingJobStore, ClaimRequest, DaemonInfo, JobStore, ParentOutcome, Settle, Settled,
    StoreError, StoreResult, DEFAULT_MAX_ATTEMPTS,
};
pub use time::{Clock, SystemClock, Timestamp, TokioClock};
