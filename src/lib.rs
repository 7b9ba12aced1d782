//! # gpu-feeder
//!
//! A daemon that keeps GPUs busy: persistent vLLM servers fed from a durable
//! SQLite job queue. This crate holds the adapters that connect the actors of
//! [`feeder_actors`] to the world, the configuration, and the command line.
//!
//! Modules:
//! - [`chunk`]: token windows of long texts, tiles of large images, overlap merging.
//! - [`config`]: `feeder.toml`, its defaults, and errors that name the key and line.
//! - [`store`]: the SQLite `JobStore` adapter and the schema migrations.
//! - [`submit`]: turning CLI input (payload files, prompts, images, JSONL) into jobs.
//! - [`openai`]: the OpenAI-compatible HTTP adapter of the `InferenceClient` port.
//! - [`results`]: the file adapter of the `ResultStore` port (atomic writes).
//! - [`sim`]: `gpu-feeder sim`, a simulated vLLM server with continuous batching.
//! - [`daemon`]: `gpu-feeder run`: wiring, the database lock, signals, shutdown.
//! - [`demo`]: `gpu-feeder demo`: simulated servers, sample jobs, a summary.
//! - [`systemd`]: `Type=notify` readiness, status lines, watchdog, stopping.
//! - [`admin`]: the admin HTTP endpoint (metrics, health, status, job submission)
//!   and `AdminClient`, its client for the CLI and MCP.
//! - [`views`]: the JSON views of jobs, statistics and status that every frontend prints.
//! - [`mcp`]: `gpu-feeder mcp`, the MCP server over stdio (job tools, instances).
//! - [`metrics`]: Prometheus metrics, fed by the dispatchers and read at scrape time.
//! - [`logging`]: `tracing` to stderr, human or JSON.
//! - [`cli`]: the command line (`gpu-feeder …`) and its human and `--json` output.

pub mod admin;
pub mod api;
pub mod chunk;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod gpu;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod openai;
pub mod results;
pub mod runtime;
pub mod sim;
pub mod store;
pub mod submit;
pub mod systemd;
pub mod views;

pub use feeder_actors as actors;
