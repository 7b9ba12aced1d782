//! # feeder-actors
//!
//! The core of gpu-feeder, free of any database, HTTP, Docker or NVML code:
//! the domain types, the port traits through which the actors reach the
//! world, and (as the pipeline grows) the actors themselves with their typed
//! messages. The `gpu-feeder` crate implements the ports; tests implement
//! them with in-memory fakes.
//!
//! Modules:
//! - [`job`]: jobs, their ids, statuses, payloads, claims and outcomes.
//! - [`store`]: the `JobStore` port, the durable queue's contract (async),
//!   and `Blocking`, which serves it from a synchronous `BlockingJobStore`.
//! - [`inference`]: the `InferenceClient` port, one model server.
//! - [`results`]: the `ResultStore` port and the result document.
//! - [`fragment`]: splitting texts and images into overlapping fragments,
//!   each fragment's [`fragment::Place`], and merging their answers.
//! - [`prefix`]: prefix keys, and the grouped order in which claims take
//!   jobs that share a prompt prefix.
//! - [`backoff`]: capped exponential backoff with jitter (retries, restarts).
//! - [`time`]: `Timestamp`, the unit of every stored time, and `Clock`.
//! - [`restart`]: restart policy as data (backoff, intensity limit), and
//!   `Supervision`, the one-for-one bookkeeping every supervisor shares.
//! - [`gpu`]: the `GpuProbe` port and the GPU snapshot.
//! - [`window`]: the adaptive window's controller (`dispatch.window = "auto"`).
//! - [`runtime`]: the `ContainerRuntime` port: launching, adopting, watching
//!   and stopping a model server (Docker, local process).
//!
//! Actors, one per file, each with its messages, arguments and state:
//! - [`supervisor`]: `FeederSupervisor`, the root; restarts its children and
//!   runs the graceful shutdown.
//! - [`queue`]: `QueueActor`, sole owner of the job store; group-commits
//!   outcomes. It publishes events it owns: `WorkAvailable` to the
//!   subscribers of a model (the dispatchers, which hear it as `Wake`) and
//!   `JobFinished` to the fan-in (heard as `Check` or `FollowUp`); each
//!   subscriber converts them into its own messages through ractor's derived
//!   references, so the queue names neither.
//! - [`handle`]: `FeederHandle`, the frontends' typed way into the pipeline.
//! - [`dispatch_supervisor`]: `DispatchSupervisor`, one dispatcher per instance.
//! - [`dispatch`]: `DispatchActor`, keeps one instance's window of requests full.
//! - [`fanin`]: `FanInActor`, completes parents when their fragments are done.
//! - [`health`]: `HealthActor`, probes every instance and publishes
//!   `ProbeOutcome`s (the instance supervisor hears them as `Probed`).
//! - [`instances`]: `InstanceSupervisor`, one ContainerActor per instance;
//!   routes probe outcomes and dispatcher watches to them.
//! - [`gpu_monitor`]: `GpuMonitorActor`, reads the GPUs every second; temperature
//!   alerts with hysteresis; publishes each `GpuSnapshot` (the supervisor
//!   hears it as `Gpu`).
//! - [`allocator`]: `AllocatorActor`, chooses the strategy (which instances run,
//!   with which memory share) from the durable backlog.
//! - [`container`]: `ContainerActor`, one model server's lifecycle: launch,
//!   adopt, Loading → Ready → Unhealthy → Restarting, crash loop → Failed.
//! - [`peers`]: the references actors hold to one another.
//! - [`spec`]: `InstanceSpec`, one instance as the supervisors see it.
//! - `testkit` (feature `testkit`): the store contract suite run by every adapter.

pub mod allocator;
pub mod backoff;
pub mod container;
pub mod dispatch;
pub mod dispatch_supervisor;
pub mod fanin;
pub mod fragment;
pub mod gpu;
pub mod gpu_monitor;
pub mod handle;
pub mod health;
pub mod inference;
pub mod instances;
pub mod job;
pub mod peers;
pub mod prefix;
pub mod queue;
pub mod restart;
pub mod results;
pub mod runtime;
pub mod spec;
pub mod store;
pub mod supervisor;
pub mod tell;
pub mod time;
pub mod window;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use backoff::Backoff;
pub use inference::{InferenceClient, InferenceError, InferenceOutput};
pub use job::{
    Claim, ClaimedJob, Completion, FailOutcome, Failure, Job, JobId, JobStatus, ListFilter,
    ModelStats, ModelType, NewJob, Payload, QueueStats, StatusCounts, Submitted,
};
pub use prefix::{ClaimOrder, Grouping};
pub use results::{FragmentResult, JobResult, ResultRef, ResultStore};
pub use store::{
    Blocking, BlockingJobStore, DaemonInfo, JobStore, ParentOutcome, Settle, Settled, StoreError,
    StoreResult, DEFAULT_MAX_ATTEMPTS,
};
pub use time::{Clock, SystemClock, Timestamp, TokioClock};
