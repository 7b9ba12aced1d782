//! # gpu-feeder
//!
//! A daemon that keeps GPUs busy: persistent vLLM servers fed from a durable
//! SQLite job queue. This crate holds the adapters that connect the actors of
//! [`feeder_actors`] to the world, the configuration, and the command line.
//!
//! Modules:
//! - [`config`]: `feeder.toml`, its defaults, and errors that name the key and line.
//! - [`store`]: the SQLite `JobStore` adapter and the schema migrations.
//! - [`submit`]: turning CLI input (payload files, prompts, images, JSONL) into jobs.
//! - [`cli`]: the command line (`gpu-feeder …`) and its human and `--json` output.

pub mod cli;
pub mod config;
pub mod store;
pub mod submit;

pub use feeder_actors as actors;
