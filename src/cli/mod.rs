//! The command line: `gpu-feeder [--config PATH] [--db PATH] COMMAND`.
//!
//! Exit status: 0 on success, 1 on failure, 2 on a usage error, 78
//! (EX_CONFIG) on a bad configuration. `--json` output is stable (README,
//! "JSON output").

mod jobs;
pub mod output;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use feeder_actors::{JobStatus, ModelType};

use crate::config::{Config, ConfigError, ConfigSource, LogFormat};
use crate::demo::DemoArgs;
use crate::sim::SimConfig;
use std::sync::Arc;

use feeder_actors::JobStore;

/// Exit status for a bad configuration (sysexits' EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

/// gpu-feeder keeps GPUs busy: persistent vLLM servers fed from a durable job queue.
#[derive(Debug, Parser)]
#[command(name = "gpu-feeder", version, about, max_term_width = 100)]
pub struct Cli {
    /// Configuration file [default: $FEEDER_CONFIG, else ./feeder.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Job queue: a SQLite file (overrides queue.db_path) or a
    /// postgresql:// URL (overrides queue.database_url and $FEEDER_DATABASE_URL)
    #[arg(long, global = true, value_name = "PATH|URL")]
    pub db: Option<PathBuf>,
    /// Log format on stderr: auto, human or json; overrides logging.format
    #[arg(long, global = true, value_name = "FORMAT", value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,
    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "auto" => Ok(LogFormat::Auto),
        "human" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        other => Err(format!(
            "`{other}` is not a log format: use auto, human or json"
        )),
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: dispatch jobs to the configured instances until SIGTERM
    Run,
    /// The whole pipeline on simulated servers and a temporary database (no GPU)
    Demo(DemoArgs),
    /// A simulated vLLM OpenAI-compatible server (tests, demo, capacity planning)
    Sim(Box<SimConfig>),
    /// Create or upgrade the job database
    Migrate {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Print the full schema as SQL (for sqlite3 and other programs)
    Schema,
    /// Queue a job (or many, with --jsonl)
    Submit(SubmitArgs),
    /// Print a job's result document (from its file or the database)
    Result {
        /// Job id (or a unique prefix of at least 4 hex digits)
        job: String,
        /// Print only the answer's text
        #[arg(long)]
        text: bool,
    },
    /// Show one job
    Status {
        /// Job id (or a unique prefix of at least 4 hex digits)
        job: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first
    List {
        /// Only jobs in this status (pending, processing, done, failed, cancelled)
        #[arg(long)]
        status: Option<JobStatus>,
        /// Only jobs for this model (vision, think)
        #[arg(long)]
        model: Option<ModelType>,
        /// At most this many
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Job counts per model and status, and the oldest pending job's age
    Stats {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Cancel a pending or processing job
    Cancel {
        /// Job id (or a unique prefix)
        job: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Put a failed or cancelled job back in the queue with fresh attempts
    Retry {
        /// Job id (or a unique prefix)
        job: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// MCP server over stdio (JSON-RPC): submit and inspect jobs from an agent
    Mcp,
    /// Live instance state from the running daemon (its admin endpoint)
    Instances {
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// What to do (default: show them)
        #[command(subcommand)]
        action: Option<InstancesCommand>,
    },
    /// One reading of every GPU, through NVML (no daemon needed)
    Gpu {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// The allocator's strategy in the running daemon: show, pin or unpin
    #[command(subcommand)]
    Strategy(StrategyCommand),
    /// Configuration tools
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `gpu-feeder instances …`
#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// Launch a failed (or stopped) instance again, its crash-loop count started over
    Restart {
        /// The instance's name
        name: String,
    },
}

/// `gpu-feeder strategy …`
#[derive(Debug, Subcommand)]
pub enum StrategyCommand {
    /// The strategy in force, since when and why
    Show {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Hold a strategy (static, shared, think, vision, idle) until unpinned
    Pin {
        /// The strategy
        name: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Release the pin: the backlog decides again
    Unpin {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

/// `gpu-feeder config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration and explain every error
    Check {
        /// The file [default: --config, $FEEDER_CONFIG, ./feeder.toml]
        path: Option<PathBuf>,
    },
}

/// `gpu-feeder submit`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(false)
    .args(["payload", "prompt", "image", "text_file", "jsonl"])))]
pub struct SubmitArgs {
    /// The model the job is for (vision, think)
    #[arg(long)]
    pub model: ModelType,
    /// A JSON payload file (with `messages`, `prompt` or `image_path`); must lie under queue.payload_roots
    #[arg(long, value_name = "FILE")]
    pub payload: Option<PathBuf>,
    /// A prompt, sent as a user message
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// An image to transcribe (vision); must lie under queue.payload_roots
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// A text file, sent as a user message (with --chunk: in token windows)
    #[arg(long, value_name = "FILE")]
    pub text_file: Option<PathBuf>,
    /// With --text-file: split the text into chunk.tokens-token windows
    /// overlapping by chunk.overlap, one fragment each, merged by fan-in
    #[arg(long, requires = "text_file")]
    pub chunk: bool,
    /// When the job (or its parent) is done, create a job for this model
    /// from its result [default: the instance's `then`]
    #[arg(long, value_name = "MODEL")]
    pub then: Option<ModelType>,
    /// One payload object per line, all queued in one transaction
    #[arg(long, value_name = "FILE")]
    pub jsonl: Option<PathBuf>,
    /// Higher runs first
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i64,
    /// Attempts before the job fails for good [default: dispatch.max_attempts]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: Option<u32>,
    /// Wait until the job has finished, then print it; exit 1 unless it is done
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds
    #[arg(long, value_name = "S", requires = "wait")]
    pub timeout_s: Option<u64>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// What every command starts from: the configuration and where it came from.
pub struct Context {
    /// The configuration in force (`--db` applied).
    pub config: Config,
    /// The file it was read from (for messages).
    pub config_path: PathBuf,
}

impl Context {
    /// The running daemon's admin endpoint, as this configuration names it.
    pub fn admin(&self) -> crate::admin::AdminClient {
        crate::admin::AdminClient::new(&self.config, &self.config_path)
    }

    /// Loads the configuration named by `--config`, `$FEEDER_CONFIG` or
    /// `./feeder.toml`. When that last default is missing, built-in defaults
    /// are used, so that `--db` alone is enough for the queue commands.
    pub fn load(config: Option<&Path>, db: Option<&Path>) -> Result<Context, ConfigError> {
        let source = ConfigSource::resolve(config);
        let path = source.path().to_path_buf();
        let mut config = match source {
            ConfigSource::Default(p) if !p.exists() => Config::default(),
            _ => Config::load(&path)?,
        };
        if let Ok(url) = std::env::var("FEEDER_DATABASE_URL") {
            if !url.trim().is_empty() {
                config.queue.database_url = Some(url.trim().to_string());
            }
        }
        if let Some(db) = db {
            match db
                .to_str()
                .filter(|s| crate::config::DatabaseUrl::is_url(s))
            {
                Some(url) => config.queue.database_url = Some(url.to_string()),
                None => {
                    config.queue.db_path = db.to_path_buf();
                    config.queue.database_url = None;
                }
            }
        }
        if let Some(url) = &config.queue.database_url {
            if let Err(e) = crate::config::DatabaseUrl::parse(url) {
                return Err(ConfigError::single(&path, "queue.database_url", None, e));
            }
        }
        Ok(Context {
            config,
            config_path: path,
        })
    }

    /// Opens the queue with its results, creating the state folders first.
    pub async fn open_queue(&self) -> anyhow::Result<crate::store::Opened> {
        self.config.create_state_dirs(&self.config_path)?;
        crate::store::open(&self.config, crate::store::Patience::FailFast).await
    }

    /// Opens the job store, creating the state folders first.
    pub async fn open_store(&self) -> anyhow::Result<Arc<dyn JobStore>> {
        self.config.create_state_dirs(&self.config_path)?;
        crate::store::connect(&self.config.queue, crate::store::Patience::FailFast).await
    }
}

/// Runs the command line; returns the process exit status.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Command::Config(ConfigCommand::Check { path }) = &cli.command {
        return Ok(config_check(path.as_deref().or(cli.config.as_deref())));
    }
    if let Command::Schema = cli.command {
        print!("{}", crate::store::full_schema());
        return Ok(0);
    }
    if let Command::Sim(cfg) = cli.command {
        crate::logging::init(&Default::default(), cli.log_format);
        return runtime()?.block_on(crate::sim::serve(*cfg)).map(|()| 0);
    }
    if let Command::Demo(args) = cli.command {
        let logging = crate::config::LoggingConfig {
            level: "warn".into(),
            ..Default::default()
        };
        crate::logging::init(&logging, cli.log_format);
        return runtime()?.block_on(crate::demo::run(args));
    }
    let ctx = Context::load(cli.config.as_deref(), cli.db.as_deref())?;
    match cli.command {
        Command::Run => {
            crate::logging::init(&ctx.config.logging, cli.log_format);
            runtime()?.block_on(crate::daemon::run(ctx.config, &ctx.config_path))
        }
        Command::Demo(_) | Command::Sim(_) | Command::Schema => unreachable!("handled above"),
        Command::Instances {
            action: Some(InstancesCommand::Restart { name }),
            ..
        } => runtime()?.block_on(restart_instance(&ctx, &name)),
        Command::Instances { json, action: None } => runtime()?.block_on(instances(&ctx, json)),
        Command::Gpu { json } => gpu(json),
        Command::Strategy(cmd) => runtime()?.block_on(strategy(&ctx, cmd)),
        Command::Mcp => {
            // stdout carries the protocol only; logs go to stderr.
            crate::logging::init(
                &ctx.config.logging,
                Some(cli.log_format.unwrap_or(LogFormat::Human)),
            );
            runtime()?.block_on(async {
                let queue = ctx.open_queue().await?;
                crate::mcp::serve(queue, ctx.config, ctx.config_path).await?;
                Ok(0)
            })
        }
        Command::Migrate { json } => runtime()?.block_on(jobs::migrate(&ctx, json)),
        Command::Result { job, text } => runtime()?.block_on(jobs::result(&ctx, &job, text)),
        Command::Submit(args) => runtime()?.block_on(jobs::submit(&ctx, args)),
        Command::Status { job, json } => runtime()?.block_on(jobs::status(&ctx, &job, json)),
        Command::List {
            status,
            model,
            limit,
            json,
        } => runtime()?.block_on(jobs::list(&ctx, status, model, limit, json)),
        Command::Stats { json } => runtime()?.block_on(jobs::stats(&ctx, json)),
        Command::Cancel { job, json } => {
            runtime()?.block_on(jobs::change(&ctx, &job, json, jobs::Change::Cancel))
        }
        Command::Retry { job, json } => {
            runtime()?.block_on(jobs::change(&ctx, &job, json, jobs::Change::Retry))
        }
        Command::Config(_) => unreachable!("handled above"),
    }
}

/// `instances`: asks the daemon's admin endpoint for `/v1/status`.
async fn instances(ctx: &Context, json: bool) -> anyhow::Result<i32> {
    let body = ctx.admin().status().await.map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", output::instances_table(&body));
    }
    Ok(0)
}

/// `instances restart NAME`, through the admin endpoint.
async fn restart_instance(ctx: &Context, name: &str) -> anyhow::Result<i32> {
    ctx.admin()
        .restart(name)
        .await
        .map_err(anyhow::Error::msg)?;
    println!("{name}: restarting (follow it with `gpu-feeder instances`)");
    Ok(0)
}

/// `gpu`: one NVML reading, printed.
fn gpu(json: bool) -> anyhow::Result<i32> {
    use feeder_actors::gpu::GpuProbe as _;
    let probe = crate::gpu::NvmlProbe::init().map_err(anyhow::Error::msg)?;
    let gpus = probe.read().map_err(anyhow::Error::msg)?;
    if json {
        let snapshot = feeder_actors::gpu::GpuSnapshot {
            at: std::time::SystemTime::now(),
            gpus,
            unavailable: None,
            hot: Vec::new(),
            alerts: 0,
        };
        let mut doc = serde_json::json!({"gpus": crate::views::gpus_json(&snapshot)});
        doc["driver_version"] = serde_json::json!(probe.driver_version());
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", output::gpu_table(&gpus));
    }
    Ok(0)
}

/// `strategy show|pin NAME|unpin`, through the admin endpoint.
async fn strategy(ctx: &Context, cmd: StrategyCommand) -> anyhow::Result<i32> {
    let (pin, json) = match cmd {
        StrategyCommand::Show { json } => {
            let status = ctx.admin().status().await.map_err(anyhow::Error::msg)?;
            let doc = status["allocator"].clone();
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else if doc.is_null() {
                println!("strategy: static (the allocator is off: allocator.enabled = false, or no docker/process instance)");
            } else {
                print!("{}", output::strategy_text(&doc));
            }
            return Ok(0);
        }
        StrategyCommand::Pin { name, json } => {
            let s = feeder_actors::allocator::Strategy::parse(&name).map_err(anyhow::Error::msg)?;
            (Some(s), json)
        }
        StrategyCommand::Unpin { json } => (None, json),
    };
    let unpin = pin.is_none();
    let doc = ctx.admin().pin(pin).await.map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else if doc["groups"].as_array().is_some_and(|g| g.len() > 1) {
        println!(
            "{}",
            if unpin {
                "unpinned: the backlog decides again in every GPU group"
            } else {
                "pinned in the GPU groups it applies to, until `gpu-feeder strategy unpin`"
            }
        );
        print!("{}", output::groups_text(&doc));
    } else {
        match doc["pinned"].as_str() {
            Some(p) => println!(
                "pinned to {p}{} until `gpu-feeder strategy unpin`",
                if doc["switching"] == true {
                    " (switching now)"
                } else {
                    ""
                }
            ),
            None => println!(
                "unpinned: the backlog decides again (now {})",
                doc["strategy"].as_str().unwrap_or("?")
            ),
        }
    }
    Ok(0)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `config check`: prints `OK` and a summary, or every problem; the exit status.
fn config_check(path: Option<&Path>) -> i32 {
    let source = ConfigSource::resolve(path);
    let path = source.path();
    let checked = Config::load(path).and_then(|c| c.create_state_dirs(path).map(|()| c));
    match checked {
        Ok(config) => {
            println!("OK {}", path.display());
            print!("{}", output::config_summary(&config));
            0
        }
        Err(e) => {
            eprintln!("{e}");
            let n = e.problems.len();
            eprintln!(
                "{} problem{} in {}",
                n,
                if n == 1 { "" } else { "s" },
                path.display()
            );
            EX_CONFIG
        }
    }
}
