//! `feeder.toml`: the configuration, its defaults, and its errors.
//!
//! Every key has a default where a sensible one exists, so a file holding
//! only a `[queue]` table is valid. Unknown keys and wrong types are errors.
//! Every error names the file, the line, the key, and what is allowed
//! ([`ConfigError`]); cross-checks between keys live in [`check`].
//!
//! Relative paths are taken relative to the configuration file's folder.

mod api;
mod check;
mod database;
mod instance;
mod locate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use feeder_actors::{Backoff, ModelType};

pub use api::{ApiConfig, MAX_FILE_BYTES, MAX_FILE_LINES};
pub use database::DatabaseUrl;
pub use instance::{
    Backend, InstanceConfig, SchedulingPolicy, DEFAULT_OCR_PROMPT, PP_FLAGS, TP_FLAGS,
};

/// Where the configuration is looked for when neither `--config` nor
/// `$FEEDER_CONFIG` names it.
pub const DEFAULT_CONFIG_PATH: &str = "feeder.toml";

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The job store and the folders it uses.
    pub queue: QueueConfig,
    /// How jobs are sent to the model servers.
    pub dispatch: DispatchConfig,
    /// Health checks of the model servers, restarts and crash loops.
    pub health: HealthConfig,
    /// How the feeder launches, adopts and leaves its model servers.
    pub servers: ServersConfig,
    /// The admin HTTP endpoint (metrics, status, submit).
    pub admin: AdminConfig,
    /// The OpenAI-compatible API (Files and Batches).
    pub api: ApiConfig,
    /// Which instances run, with how much GPU memory.
    pub allocator: AllocatorConfig,
    /// GPU monitoring and thermal limits.
    pub gpu: GpuConfig,
    /// Splitting long texts and large images into fragments.
    pub chunk: ChunkConfig,
    /// Log level and format.
    pub logging: LoggingConfig,
    /// Where result documents are kept.
    pub results: ResultsConfig,
    /// The model servers.
    pub instances: Vec<InstanceConfig>,
}

/// `[queue]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// The SQLite database file (`--db` overrides it).
    pub db_path: PathBuf,
    /// A PostgreSQL queue shared by several daemons, instead of `db_path`
    /// (`postgresql://user@host:5432/db`; `--db URL` and
    /// `$FEEDER_DATABASE_URL` override it).
    pub database_url: Option<String>,
    /// This daemon's name on a shared queue, unique among the daemons that
    /// use it (claims carry it); `gpu-feeder@<hostname>` when unset.
    pub daemon_id: Option<String>,
    /// How often a daemon says it is alive on a PostgreSQL queue.
    pub heartbeat_s: u64,
    /// A daemon silent for this long is taken for dead: the others take
    /// its claims back without waiting for their leases.
    pub heartbeat_timeout_s: u64,
    /// Where result files are written.
    pub results_dir: PathBuf,
    /// Where generated payloads and image tiles are written.
    pub stage_dir: PathBuf,
    /// Payload and image paths must lie under one of these; `None` means
    /// `[stage_dir]`. Guards against jobs that read arbitrary files.
    pub payload_roots: Option<Vec<PathBuf>>,
    /// How long a claim lasts before another worker may take the job over.
    pub lease_s: u64,
    /// How often expired leases are reclaimed while the daemon runs.
    pub reclaim_interval_s: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            db_path: "/var/lib/gpu-feeder/jobs.db".into(),
            results_dir: "/var/lib/gpu-feeder/results".into(),
            stage_dir: "/var/lib/gpu-feeder/stage".into(),
            database_url: None,
            daemon_id: None,
            payload_roots: None,
            lease_s: 300,
            reclaim_interval_s: 30,
            heartbeat_s: 5,
            heartbeat_timeout_s: 30,
        }
    }
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `[results]`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResultsConfig {
    /// `files` (one JSON file per job under `queue.results_dir`) or
    /// `database` (a row of `gpu_results` in the job database, readable by
    /// every host that shares it). Unset: `database` with PostgreSQL,
    /// `files` with SQLite.
    pub store: Option<ResultsKind>,
}

/// Where result documents go.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResultsKind {
    /// One file per job under `queue.results_dir`.
    Files,
    /// A row per job in the job database.
    Database,
}

impl Config {
    /// Where results go, with the default for the queue's database filled in.
    pub fn results_kind(&self) -> ResultsKind {
        self.results
            .store
            .unwrap_or(if self.queue.database_url.is_some() {
                ResultsKind::Database
            } else {
                ResultsKind::Files
            })
    }
}

impl QueueConfig {
    /// The payload roots in force.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.payload_roots
            .clone()
            .unwrap_or_else(|| vec![self.stage_dir.clone()])
    }

    /// This daemon's name on the queue (`daemon_id`, or `gpu-feeder@<hostname>`).
    pub fn owner(&self) -> String {
        self.daemon_id
            .clone()
            .unwrap_or_else(|| format!("gpu-feeder@{}", hostname()))
    }

    /// Where the queue is, for messages: the PostgreSQL server (without
    /// its password) or the SQLite file.
    pub fn location(&self) -> String {
        match &self.database_url {
            Some(url) => DatabaseUrl::redact(url),
            None => self.db_path.display().to_string(),
        }
    }

    /// The lease as a duration.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_s)
    }
}

/// How many requests an instance gets at once: `"auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSetting {
    /// Found from the server's own metrics (see `feeder_actors::window`).
    Auto,
    /// Always this many.
    Fixed(u32),
}

impl<'de> Deserialize<'de> for WindowSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_word(
            d,
            "\"auto\" or a number of requests (1 to 4096)",
            |v| {
                u32::try_from(v).map(WindowSetting::Fixed).map_err(|_| {
                    format!(
                        "{v} is not a window: give \"auto\" or a number of requests from 1 to 4096"
                    )
                })
            },
            |v| {
                match v {
                "auto" => Ok(WindowSetting::Auto),
                other => Err(format!(
                    "`{other}` is not a window: give \"auto\" (found from the server's metrics) or a number of requests"
                )),
            }
            },
        )
    }
}

impl fmt::Display for WindowSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowSetting::Auto => f.write_str("auto"),
            WindowSetting::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// How deep an instance with sleep mode sleeps: `1`, `2` or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SleepLevelSetting {
    /// Weights kept in host memory: wakes in seconds.
    #[default]
    One,
    /// Weights dropped, reloaded from disk on wake.
    Two,
    /// 1 when the host has the memory for the weights, else 2.
    Auto,
}

impl<'de> Deserialize<'de> for SleepLevelSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_word(
            d,
            "1, 2 or \"auto\"",
            |v| {
                match v {
                1 => Ok(SleepLevelSetting::One),
                2 => Ok(SleepLevelSetting::Two),
                _ => Err(format!(
                    "{v} is not a sleep level: give 1 (weights kept in host memory), 2 (weights dropped) or \"auto\""
                )),
            }
            },
            |v| {
                match v {
                "auto" => Ok(SleepLevelSetting::Auto),
                "1" => Ok(SleepLevelSetting::One),
                "2" => Ok(SleepLevelSetting::Two),
                other => Err(format!(
                    "`{other}` is not a sleep level: give 1, 2 or \"auto\" (1 when the host has memory for the weights)"
                )),
            }
            },
        )
    }
}

/// Reads a setting written either as a number or as a word: `number` and
/// `word` give the value each means, or why it is refused; `expecting`
/// says what may be written.
fn number_or_word<'de, D: serde::Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    number: fn(i64) -> Result<T, String>,
    word: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    struct Visitor<T> {
        expecting: &'static str,
        number: fn(i64) -> Result<T, String>,
        word: fn(&str) -> Result<T, String>,
    }
    impl<T> serde::de::Visitor<'_> for Visitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
            (self.number)(v).map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
            self.visit_i64(i64::try_from(v).unwrap_or(-1))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            (self.word)(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor {
        expecting,
        number,
        word,
    })
}

/// `[dispatch]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Requests in flight per instance (an instance may override it):
    /// `"auto"` or a number.
    pub window: WindowSetting,
    /// The most an `auto` window may reach; `None`: the instance's
    /// `--max-num-seqs` when its args carry one, else 1024.
    pub window_max: Option<u32>,
    /// Attempts per job before it fails for good.
    pub max_attempts: u32,
    /// Time allowed for one chat-completion request.
    pub request_timeout_s: u64,
    /// How soon rows inserted by other programs are noticed.
    pub external_poll_ms: u64,
    /// First retry delay; each further retry doubles it.
    pub retry_base_s: f64,
    /// Longest retry delay.
    pub retry_max_s: f64,
    /// On shutdown, how long in-flight requests may finish before their jobs are released.
    pub shutdown_grace_s: u64,
    /// Claims take jobs that share a prompt prefix together, so that the
    /// server's prefix cache is hit; `false`: priority, then age.
    pub prefix_grouping: bool,
    /// A job pending longer than this is claimed before any grouping
    /// (within its priority): grouping never starves a job.
    pub prefix_max_wait_s: f64,
    /// While a request of higher priority than the bulk is in flight, the
    /// bulk's sends wait (bounded) and the urgent job may go past a full
    /// window; `false`: no hold, every job waits for a slot.
    pub priority_hold: bool,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            window: WindowSetting::Auto,
            window_max: None,
            max_attempts: 3,
            request_timeout_s: 120,
            external_poll_ms: 200,
            retry_base_s: 2.0,
            retry_max_s: 300.0,
            shutdown_grace_s: 30,
            prefix_grouping: true,
            prefix_max_wait_s: 60.0,
            priority_hold: true,
        }
    }
}

impl DispatchConfig {
    /// The retry schedule.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: Duration::from_secs_f64(self.retry_base_s),
            max: Duration::from_secs_f64(self.retry_max_s),
            ..Backoff::default()
        }
    }
}

/// `[health]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds between probes of each instance.
    pub interval_s: f64,
    /// Consecutive failed probes that make a Ready instance Unhealthy.
    pub failure_threshold: u32,
    /// Time allowed for one probe.
    pub timeout_s: f64,
    /// First delay before an unhealthy or exited server is restarted; each
    /// further restart doubles it.
    pub restart_backoff_s: f64,
    /// Longest delay between restarts.
    pub restart_backoff_max_s: f64,
    /// After this long Ready, the restart delay starts from the beginning again.
    pub restart_reset_s: f64,
    /// This many restarts within `crash_loop_window_s` mark the instance Failed.
    pub crash_loop_restarts: u32,
    /// The window of `crash_loop_restarts`.
    pub crash_loop_window_s: f64,
    /// A job in flight during this many consecutive crashes of its server
    /// is failed as a poison job instead of being sent again.
    pub poison_after_crashes: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_s: 5.0,
            failure_threshold: 3,
            timeout_s: 5.0,
            restart_backoff_s: 10.0,
            restart_backoff_max_s: 300.0,
            restart_reset_s: 600.0,
            crash_loop_restarts: 5,
            crash_loop_window_s: 1800.0,
            poison_after_crashes: 3,
        }
    }
}

/// `[servers]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServersConfig {
    /// Leave the model servers running when the daemon exits, so the next
    /// start adopts them with their models still loaded.
    pub keep_servers_on_exit: bool,
    /// Pid files and output of `process` servers.
    pub state_dir: PathBuf,
    /// Time a server gets to stop after SIGTERM before it is killed.
    pub stop_grace_s: f64,
    /// The Docker engine: `unix:///path`, `tcp://host:port`, or empty for
    /// `$DOCKER_HOST` or the local socket.
    pub docker_host: String,
}

impl Default for ServersConfig {
    fn default() -> Self {
        ServersConfig {
            keep_servers_on_exit: true,
            state_dir: "/var/lib/gpu-feeder/servers".into(),
            stop_grace_s: 30.0,
            docker_host: String::new(),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin HTTP endpoint; loopback by default.
    pub listen: String,
    /// When set, required as a bearer token on every endpoint but `/healthz`.
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9400".into(),
            token: String::new(),
        }
    }
}

/// `[allocator]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AllocatorConfig {
    /// Choose the strategy from the backlog; off keeps every instance as configured.
    pub enabled: bool,
    /// Seconds between decisions.
    pub interval_s: f64,
    /// Least time a strategy holds before another may replace it.
    pub min_dwell_s: u64,
    /// Stop every instance after this long without work; 0 never does.
    pub idle_ttl_s: u64,
    /// GPU memory share of each instance when both kinds of work wait.
    pub shared_memory_utilization: f64,
    /// GPU memory share of an instance running alone.
    pub solo_memory_utilization: f64,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            enabled: true,
            interval_s: 5.0,
            min_dwell_s: 600,
            idle_ttl_s: 0,
            shared_memory_utilization: 0.40,
            solo_memory_utilization: 0.75,
        }
    }
}

/// `[gpu]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Read the GPUs through NVML; off on machines without a GPU.
    pub enabled: bool,
    /// Milliseconds between samples.
    pub interval_ms: u64,
    /// A temperature alert starts above this (°C).
    pub temp_alert_c: u32,
    /// and clears below this (°C).
    pub temp_clear_c: u32,
    /// While a GPU is over the limit, its instances' windows shrink by this factor.
    pub thermal_window_factor: f64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            interval_ms: 1000,
            temp_alert_c: 80,
            temp_clear_c: 75,
            thermal_window_factor: 0.5,
        }
    }
}

/// `[chunk]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkConfig {
    /// Tokens per text window.
    pub tokens: u32,
    /// Tokens shared by consecutive windows.
    pub overlap: u32,
    /// Images larger than this many bytes are tiled.
    pub image_max_bytes: u64,
    /// Images with a side longer than this many pixels are tiled.
    pub image_max_px: u32,
    /// Side of a tile in pixels.
    pub tile_px: u32,
    /// Pixels shared by neighbouring tiles.
    pub tile_overlap_px: u32,
    /// Share of fragments that must succeed for their parent to be `done`.
    pub min_success_ratio: f64,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        ChunkConfig {
            tokens: 512,
            overlap: 120,
            image_max_bytes: 4 * 1024 * 1024,
            image_max_px: 4096,
            tile_px: 512,
            tile_overlap_px: 120,
            min_success_ratio: 1.0,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// `[logging]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A level (`info`) or filter directives (`info,gpu_feeder=debug`); `RUST_LOG` overrides it.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The key, dotted (`dispatch.window`, `instances[1].port`).
    pub key: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// A configuration that cannot be used: every problem found, each with its place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(f, "{}:{line}: ", self.path.display())?,
                None => write!(f, "{}: ", self.path.display())?,
            }
            if p.key.is_empty() {
                write!(f, "{}", p.message)?;
            } else {
                write!(f, "{}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl ConfigError {
    pub(crate) fn single(
        path: &Path,
        key: &str,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            problems: vec![Problem {
                key: key.to_string(),
                line,
                message: message.into(),
            }],
        }
    }
}

impl Config {
    /// Reads, parses and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                "no such file: pass --config PATH, set FEEDER_CONFIG, or create ./feeder.toml \
                 (the repository's feeder.toml is the documented default)"
                    .to_string()
            } else {
                format!("cannot read it: {e}")
            };
            ConfigError::single(path, "", None, hint)
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text`, which was read from `path` (for messages and
    /// for resolving relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (key, line) = match e.span() {
                Some(span) => locate::key_at(text, span.start),
                None => (String::new(), None),
            };
            ConfigError::single(path, &key, line, locate::tidy_message(e.message()))
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        config.resolve_paths(base);
        let problems = check::check(&config, text);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.servers.state_dir);
        let q = &mut self.queue;
        abs(&mut q.db_path);
        abs(&mut q.results_dir);
        abs(&mut q.stage_dir);
        for p in [&mut self.api.keys_file, &mut self.api.files_dir]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(roots) = &mut q.payload_roots {
            roots.iter_mut().for_each(abs);
        }
        for inst in &mut self.instances {
            if let Some(t) = &mut inst.tokenizer {
                abs(t);
            }
        }
    }

    /// Creates the state folders (the database's, results, stage) when
    /// missing. `path` is the configuration file, for messages.
    pub fn create_state_dirs(&self, path: &Path) -> Result<(), ConfigError> {
        let q = &self.queue;
        let db_dir = q.db_path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();
        for (key, dir) in [
            ("queue.db_path", db_dir),
            ("queue.results_dir", q.results_dir.as_path()),
            ("queue.stage_dir", q.stage_dir.as_path()),
        ] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                problems.push(Problem {
                    key: key.into(),
                    line: None,
                    message: format!(
                        "cannot create the folder {}: {e} (choose a writable place, or create it for this user)",
                        dir.display()
                    ),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// What happens at the start where sleep-mode instances' memory shares
    /// cannot all be resident at once: they launch one after the other
    /// (one line per GPU group, for `config check`).
    pub fn staggered_starts(&self) -> Vec<String> {
        check::staggered_notes(self)
    }

    /// The instances serving `model`.
    pub fn instances_for(&self, model: ModelType) -> impl Iterator<Item = &InstanceConfig> {
        self.instances.iter().filter(move |i| i.model_type == model)
    }
}

/// Where the configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// Named by `--config`.
    Flag(PathBuf),
    /// Named by `$FEEDER_CONFIG`.
    Env(PathBuf),
    /// `./feeder.toml`.
    Default(PathBuf),
}

impl ConfigSource {
    /// `--config`, else `$FEEDER_CONFIG`, else `./feeder.toml`.
    pub fn resolve(flag: Option<&Path>) -> ConfigSource {
        if let Some(p) = flag {
            return ConfigSource::Flag(p.to_path_buf());
        }
        match std::env::var_os("FEEDER_CONFIG") {
            Some(p) if !p.is_empty() => ConfigSource::Env(PathBuf::from(p)),
            _ => ConfigSource::Default(PathBuf::from(DEFAULT_CONFIG_PATH)),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        match self {
            ConfigSource::Flag(p) | ConfigSource::Env(p) | ConfigSource::Default(p) => p,
        }
    }
}
