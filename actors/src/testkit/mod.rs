//! The message-level test harness: in-memory fakes for every port, helpers
//! to drive actors, and the contract suites that every port adapter runs.
//!
//! Enabled by the `testkit` feature; only tests depend on it.

pub mod memory_store;
pub mod store_contract;

pub use memory_store::MemoryStore;
