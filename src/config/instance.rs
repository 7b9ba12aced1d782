//! `[[instances]]`: one model server's configuration, and what its
//! settings mean (its URL, window, sleep, and the vLLM flags its args set).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use feeder_actors::ModelType;

use super::{DispatchConfig, SleepLevelSetting, WindowSetting};

/// vLLM's spellings of the tensor-parallel size.
pub const TP_FLAGS: &[&str] = &["--tensor-parallel-size", "-tp"];
/// vLLM's spellings of the pipeline-parallel size.
pub const PP_FLAGS: &[&str] = &["--pipeline-parallel-size", "-pp"];

/// How an instance's server is run.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A Docker container the feeder creates and supervises.
    #[default]
    Docker,
    /// A local process the feeder starts and supervises.
    Process,
    /// A server someone else runs, at `url`; only health-checked.
    External,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Docker => "docker",
            Backend::Process => "process",
            Backend::External => "external",
        })
    }
}

/// vLLM's `--scheduling-policy`: the order its queue runs requests in.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// First come first served (vLLM's default).
    #[default]
    Fcfs,
    /// By each request's `priority` (lower first), then arrival.
    Priority,
}

impl fmt::Display for SchedulingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SchedulingPolicy::Fcfs => "fcfs",
            SchedulingPolicy::Priority => "priority",
        })
    }
}

/// The OCR instruction sent with an image when the payload gives none.
pub const DEFAULT_OCR_PROMPT: &str = "Transcribe all text in this image exactly as written, \
preserving reading order and line breaks. Output only the text.";

/// `[[instances]]`: one model server.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Unique name; the Docker container is `gpu-feeder-<name>`.
    pub name: String,
    /// The kind of jobs it serves.
    pub model_type: ModelType,
    /// How it is run.
    #[serde(default)]
    pub backend: Backend,
    /// Port the server listens on (docker and process backends).
    #[serde(default)]
    pub port: Option<u16>,
    /// Base URL (external backend only; derived from `port` otherwise).
    #[serde(default)]
    pub url: Option<String>,
    /// The model name in requests (vLLM's `--served-model-name`).
    pub served_model_name: String,
    /// The weights the server loads (path or hub name); defaults to `served_model_name`.
    #[serde(default)]
    pub model: Option<String>,
    /// Docker image.
    #[serde(default = "default_image")]
    pub image: String,
    /// Program and leading arguments (process backend).
    #[serde(default)]
    pub command: Vec<String>,
    /// Further server arguments (vLLM flags).
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables for the server.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Docker bind mounts, `host:container[:ro]`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// GPUs the server may use (Docker device request, or
    /// `CUDA_VISIBLE_DEVICES` for a process); empty for none.
    #[serde(default = "default_gpu_ids")]
    pub gpu_ids: Vec<u32>,
    /// Share of GPU memory vLLM may take (`--gpu-memory-utilization`), in (0, 1].
    #[serde(default = "default_gpu_memory_utilization")]
    pub gpu_memory_utilization: f64,
    /// Time allowed from start to Ready (model loads take minutes).
    #[serde(default = "default_startup_timeout_s")]
    pub startup_timeout_s: u64,
    /// Docker shared-memory size (vLLM needs more than Docker's 64 MB).
    #[serde(default = "default_shm_size")]
    pub shm_size: String,
    /// Docker network: `host` (the server listens on the host's `port`), or
    /// another network, with `port` published on the host.
    #[serde(default = "default_docker_network")]
    pub docker_network: String,
    /// The model's `tokenizer.json`, for chunking text by tokens.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Requests in flight (`"auto"` or a number); overrides `dispatch.window`.
    #[serde(default)]
    pub window: Option<WindowSetting>,
    /// Default `max_tokens` of a request.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Default `temperature` of a request.
    #[serde(default)]
    pub temperature: f64,
    /// System prompt put before the payload's messages, if any.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Instruction sent with an image that comes without one.
    #[serde(default = "default_ocr_prompt")]
    pub ocr_prompt: String,
    /// Next stage: when a job of this instance's model is done, a job for
    /// this model is created from its result.
    #[serde(default)]
    pub then: Option<ModelType>,
    /// Launch with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`; the
    /// allocator then switches it by sleep and wake instead of stop and launch.
    #[serde(default)]
    pub sleep_mode: bool,
    /// How deep it sleeps: 1, 2 or `"auto"`.
    #[serde(default)]
    pub sleep_level: SleepLevelSetting,
    /// vLLM's `--scheduling-policy`. `priority` (the default of the
    /// servers the feeder launches) makes the server run each request by
    /// its job's priority (sent as the request's `priority`, negated: vLLM
    /// runs lower values first), so that an urgent job passes the bulk
    /// already waiting inside the server. An `external` server's policy
    /// is its own: the default there is `fcfs`, and `priority` only when
    /// it was started with `--scheduling-policy priority`.
    #[serde(default)]
    pub scheduling_policy: Option<SchedulingPolicy>,
    /// Size of the model's weights, GiB, for `sleep_level = "auto"`;
    /// without it, measured from the model's directory when it is on this host.
    #[serde(default)]
    pub weights_gib: Option<f64>,
}

fn default_image() -> String {
    "vllm/vllm-openai:latest".into()
}
fn default_gpu_ids() -> Vec<u32> {
    vec![0]
}
fn default_gpu_memory_utilization() -> f64 {
    0.75
}
fn default_startup_timeout_s() -> u64 {
    900
}
fn default_shm_size() -> String {
    "16g".into()
}
fn default_docker_network() -> String {
    "host".into()
}
fn default_max_tokens() -> u32 {
    1024
}
fn default_ocr_prompt() -> String {
    DEFAULT_OCR_PROMPT.into()
}

impl InstanceConfig {
    /// The scheduling policy of its server: as set, else `priority` for a
    /// server the feeder launches and `fcfs` for an external one.
    pub fn scheduling_policy(&self) -> SchedulingPolicy {
        self.scheduling_policy.unwrap_or(match self.backend {
            Backend::External => SchedulingPolicy::Fcfs,
            Backend::Docker | Backend::Process => SchedulingPolicy::Priority,
        })
    }

    /// The `--max-num-seqs` its args give the server, if they give one.
    pub fn max_num_seqs(&self) -> Option<u32> {
        self.flag(&["--max-num-seqs"])??.parse().ok()
    }

    /// The value its args give a vLLM flag (`--flag V` or `--flag=V`, any
    /// of `names`): `Some(None)` when the flag is there without a value.
    pub fn flag(&self, names: &[&str]) -> Option<Option<&str>> {
        let args = &self.args;
        args.iter().enumerate().find_map(|(i, a)| {
            if names.contains(&a.as_str()) {
                return Some(args.get(i + 1).map(String::as_str));
            }
            let (name, value) = a.split_once('=')?;
            names.contains(&name).then_some(Some(value))
        })
    }

    /// The `--tensor-parallel-size` gpu-feeder adds: an instance on several
    /// GPUs spreads its model over all of them (divided by a pipeline-parallel
    /// size its args set), unless its args set the size themselves.
    pub fn tensor_parallel_added(&self) -> Option<usize> {
        let n = self.gpu_ids.len();
        if n < 2 || self.flag(TP_FLAGS).is_some() {
            return None;
        }
        let pp = self
            .flag(PP_FLAGS)
            .flatten()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        Some((n / pp).max(1))
    }

    /// How its dispatcher sets the window: this instance's `window`, else
    /// `dispatch.window`; an `auto` window reaches at most
    /// `dispatch.window_max`, else the server's `--max-num-seqs`, else 1024.
    pub fn window_mode(&self, dispatch: &DispatchConfig) -> feeder_actors::window::WindowMode {
        use feeder_actors::window::WindowMode;
        match self.window.unwrap_or(dispatch.window) {
            WindowSetting::Fixed(n) => WindowMode::Fixed(n),
            WindowSetting::Auto => WindowMode::Auto {
                max: dispatch
                    .window_max
                    .or_else(|| self.max_num_seqs())
                    .unwrap_or(1024),
            },
        }
    }

    /// How its model sleeps, with sleep mode on (`None`: off); `auto` weighs
    /// the weights against what `host_available` reads of the host's memory.
    pub fn sleep(
        &self,
        host_available: fn() -> Option<u64>,
    ) -> Option<feeder_actors::spec::SleepLevel> {
        use feeder_actors::spec::SleepLevel;
        if !self.sleep_mode {
            return None;
        }
        Some(match self.sleep_level {
            SleepLevelSetting::One => SleepLevel::One,
            SleepLevelSetting::Two => SleepLevel::Two,
            SleepLevelSetting::Auto => SleepLevel::Auto {
                weights_bytes: self
                    .weights_gib
                    .map(|g| (g * (1u64 << 30) as f64) as u64)
                    .or_else(|| self.model_dir().and_then(|d| weights_size(&d))),
                host_available,
            },
        })
    }

    /// The model's directory, when the weights it names are on this host.
    fn model_dir(&self) -> Option<PathBuf> {
        let m = self.model.as_deref().unwrap_or(&self.served_model_name);
        let p = PathBuf::from(m);
        (self.backend == Backend::Process && p.is_dir()).then_some(p)
    }

    /// The server's base URL.
    pub fn base_url(&self) -> String {
        match (&self.url, self.port) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(port)) => format!("http://127.0.0.1:{port}"),
            (None, None) => String::new(),
        }
    }
}

/// Bytes of weight files (`*.safetensors`, `*.bin`, `*.pt`) in `dir`.
fn weights_size(dir: &std::path::Path) -> Option<u64> {
    let total: u64 = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            [".safetensors", ".bin", ".pt"]
                .iter()
                .any(|x| name.ends_with(x))
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    (total > 0).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_are_read_in_both_spellings() {
        let mut inst: InstanceConfig =
            toml::from_str("name = \"a\"\nmodel_type = \"think\"\nserved_model_name = \"m\"")
                .unwrap();
        inst.args = ["--max-num-seqs=8", "--x", "1", "-tp=4", "--bare"]
            .map(String::from)
            .to_vec();
        assert_eq!(inst.flag(&["--x"]), Some(Some("1")));
        assert_eq!(inst.flag(TP_FLAGS), Some(Some("4")));
        assert_eq!(inst.flag(&["--bare"]), Some(None));
        assert_eq!(inst.flag(PP_FLAGS), None);
        assert_eq!(inst.max_num_seqs(), Some(8));
    }
}
