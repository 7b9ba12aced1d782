//! The message-level test harness: in-memory fakes for every port, a
//! recording stand-in actor, helpers to drive actors under paused tokio
//! time, and the contract suites that every port adapter runs.
//!
//! Enabled by the `testkit` feature; only tests depend on it.

pub mod engine;
pub mod fakes;
pub mod gpu;
pub mod memory_store;
pub mod runtime;
pub mod store_contract;

pub use engine::{FakeEngine, FakeEngineShape};
pub use fakes::{submit, wait_until, FakeInference, MemoryResults, Recorder};
pub use gpu::FakeGpu;
pub use memory_store::MemoryStore;
pub use runtime::FakeRuntime;
