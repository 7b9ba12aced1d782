//! The test harness: contract suites that every port adapter runs, and (with
//! the actor pipeline) in-memory fakes and helpers for message-level tests.
//!
//! Enabled by the `testkit` feature; only tests depend on it.

pub mod store_contract;
