//! The simulated server's options: `gpu-feeder sim`'s flags, their
//! defaults, and the vLLM command lines it accepts as they are.

use std::path::PathBuf;

pub use crate::config::SchedulingPolicy;

/// How a simulated server behaves.
#[derive(Clone, Debug, clap::Args)]
pub struct SimConfig {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed on stdout)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name the server answers to
    #[arg(long, default_value = "sim")]
    pub served_model_name: String,
    /// Requests that run at once; the rest wait in order
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Time per request, in milliseconds
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Generation speed per request: max_tokens take max_tokens / this seconds (0: instant)
    #[arg(long, default_value_t = 0.0)]
    pub tokens_per_s: f64,
    /// Seconds of "loading" at start, during which /health answers 503
    #[arg(long, default_value_t = 0.0)]
    pub load_s: f64,
    /// Share of requests answered with HTTP 500
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Share of requests never answered
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Exit (as a crash would) when request number N+1 arrives; 0 never does
    #[arg(long, default_value_t = 0)]
    pub crash_after: u64,
    /// Refuse (HTTP 400) every request whose text contains this
    #[arg(long, value_name = "TEXT")]
    pub fail_matching: Option<String>,
    /// Exit (as a crash would) on a request whose text contains this
    #[arg(long, value_name = "TEXT")]
    pub crash_matching: Option<String>,
    /// The weights vLLM would load (recorded; the simulator loads nothing)
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// vLLM's GPU memory share (recorded and shown on /metrics)
    #[arg(long, value_name = "SHARE")]
    pub gpu_memory_utilization: Option<f64>,
    /// Turns on the engine model: a KV cache of this many tokens, with
    /// iteration-level scheduling, preemption and prefix caching (see
    /// `--step-ms`); without it every request takes `--latency-ms`
    #[arg(long, value_name = "TOKENS")]
    pub kv_cache_tokens: Option<u64>,
    /// Turns on the engine model with this many KV blocks of
    /// `--block-size` tokens (vLLM's flag; wins over `--kv-cache-tokens`)
    #[arg(long, value_name = "BLOCKS")]
    pub num_gpu_blocks_override: Option<u64>,
    /// Engine model: tokens per KV block
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Engine model: tokens (decode and prefill) one step may process
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: u32,
    /// Engine model: fixed part of a step, ms (an 8B model on one H100)
    #[arg(long, default_value_t = 6.5)]
    pub step_ms: f64,
    /// Engine model: step time per running request, ms
    #[arg(long, default_value_t = 0.05)]
    pub step_ms_per_seq: f64,
    /// Engine model: step time per 1,000 prefill tokens, ms
    #[arg(long, default_value_t = 32.0)]
    pub prefill_ms_per_1k: f64,
    /// Engine model: step time per 1,000 tokens of context its requests
    /// attend over (their KV cache, read every step), ms
    #[arg(long, default_value_t = 0.0)]
    pub step_ms_per_1k_context: f64,
    /// Engine model: prompt tokens an image part counts for
    #[arg(long, default_value_t = 1200)]
    pub image_tokens: u32,
    /// Count prompt tokens with this Hugging Face tokenizer.json (or the
    /// folder holding it) over the ChatML chat template, as vLLM serving
    /// that model counts them; without it, a token is 4 characters
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// Engine model: turn the prefix cache off
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Engine model: beyond this many waiting requests, answer 503
    #[arg(long, value_name = "N")]
    pub max_num_queued_reqs: Option<usize>,
    /// As vLLM's: `priority` runs waiting requests by their `priority`
    /// (lower first), then arrival; `fcfs` in arrival order, the request's
    /// `priority` ignored
    #[arg(long, value_enum, default_value_t = SchedulingPolicy::Fcfs)]
    pub scheduling_policy: SchedulingPolicy,
    /// Engine model: run the engine's clock this many times faster than the
    /// wall clock (benchmarks); latencies on /metrics are in engine seconds
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Serve vLLM's sleep mode (`/sleep`, `/wake_up`, `/collective_rpc`,
    /// `/is_sleeping`); as with vLLM, only with `VLLM_SERVER_DEV_MODE=1`
    #[arg(long)]
    pub enable_sleep_mode: bool,
    /// Sleep mode: seconds a sleep takes
    #[arg(long, default_value_t = 0.3)]
    pub sleep_s: f64,
    /// Sleep mode: seconds a level-1 wake takes (weights back from host memory)
    #[arg(long, default_value_t = 2.2)]
    pub wake_s: f64,
    /// Sleep mode: seconds the reload after a level-2 wake takes (weights from disk)
    #[arg(long, default_value_t = 6.5)]
    pub wake_l2_s: f64,
    /// Append a line to this file for each chat request received and each
    /// answer given, with its `X-Request-Id` (tests count sends per job)
    #[arg(long, value_name = "FILE")]
    pub request_log: Option<PathBuf>,
    /// Whether `VLLM_SERVER_DEV_MODE=1` holds; `None` reads the environment.
    #[arg(skip)]
    pub dev_mode: Option<bool>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            host: "127.0.0.1".into(),
            port: 0,
            served_model_name: "sim".into(),
            max_num_seqs: 256,
            latency_ms: 0,
            tokens_per_s: 0.0,
            load_s: 0.0,
            fail_rate: 0.0,
            hang_rate: 0.0,
            crash_after: 0,
            fail_matching: None,
            crash_matching: None,
            model: None,
            gpu_memory_utilization: None,
            kv_cache_tokens: None,
            num_gpu_blocks_override: None,
            block_size: 16,
            max_num_batched_tokens: 8192,
            step_ms: 6.5,
            step_ms_per_seq: 0.05,
            prefill_ms_per_1k: 32.0,
            step_ms_per_1k_context: 0.0,
            image_tokens: 1200,
            tokenizer: None,
            no_prefix_caching: false,
            max_num_queued_reqs: None,
            scheduling_policy: SchedulingPolicy::Fcfs,
            time_scale: 1.0,
            enable_sleep_mode: false,
            sleep_s: 0.3,
            wake_s: 2.2,
            wake_l2_s: 6.5,
            request_log: None,
            dev_mode: None,
        }
    }
}

impl SimConfig {
    /// The engine model's KV cache in tokens, when it is on: vLLM's
    /// `--num-gpu-blocks-override` blocks, else `--kv-cache-tokens`.
    pub fn engine_kv_tokens(&self) -> Option<u64> {
        self.num_gpu_blocks_override
            .map(|n| n * self.block_size.max(1) as u64)
            .or(self.kv_cache_tokens)
    }

    /// The tokenizer file `--tokenizer` names (a folder names its
    /// `tokenizer.json`, as vLLM's `--tokenizer` takes a model folder).
    pub(super) fn tokenizer_file(&self) -> Option<PathBuf> {
        let t = self.tokenizer.as_ref()?;
        Some(if t.is_dir() {
            t.join("tokenizer.json")
        } else {
            t.clone()
        })
    }
}

/// Flags of `gpu-feeder sim` (and the global ones) that take a value.
const SIM_FLAGS: &[&str] = &[
    "--host",
    "--port",
    "--served-model-name",
    "--max-num-seqs",
    "--latency-ms",
    "--tokens-per-s",
    "--load-s",
    "--fail-rate",
    "--hang-rate",
    "--crash-after",
    "--fail-matching",
    "--crash-matching",
    "--model",
    "--gpu-memory-utilization",
    "--kv-cache-tokens",
    "--block-size",
    "--max-num-batched-tokens",
    "--step-ms",
    "--step-ms-per-seq",
    "--prefill-ms-per-1k",
    "--step-ms-per-1k-context",
    "--image-tokens",
    "--tokenizer",
    "--num-gpu-blocks-override",
    "--max-num-queued-reqs",
    "--scheduling-policy",
    "--time-scale",
    "--sleep-s",
    "--wake-s",
    "--wake-l2-s",
    "--request-log",
    "--config",
    "--db",
    "--log-format",
];

/// The command line with vLLM's flags made acceptable to `sim`: flags the
/// simulator knows pass through; a bare positional (`vllm serve MODEL`)
/// becomes `--model MODEL`; `--model` without `--served-model-name` also
/// serves under the model's name, as vLLM does; any other flag is dropped
/// with its value (a note on stderr says which). Other commands' arguments
/// are returned unchanged.
pub fn vllm_compatible_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let Some(at) = sim_position(&args) else {
        return args;
    };
    let mut out: Vec<std::ffi::OsString> = args[..=at].to_vec();
    let rest: Vec<String> = args[at + 1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut ignored = Vec::new();
    let mut model = None;
    let mut served = false;
    let mut i = 0;
    while i < rest.len() {
        let arg = &rest[i];
        let name = arg.split('=').next().unwrap_or(arg);
        if arg == "-h" || arg == "--help" || arg == "-V" || arg == "--version" {
            out.push(arg.into());
            i += 1;
        } else if arg == "--no-prefix-caching" || arg == "--no-enable-prefix-caching" {
            // vLLM's spelling, or the simulator's.
            out.push("--no-prefix-caching".into());
            i += 1;
        } else if arg == "--enable-sleep-mode" {
            out.push(arg.into());
            i += 1;
        } else if arg == "--enable-prefix-caching" {
            i += 1; // on by default
        } else if SIM_FLAGS.contains(&name) {
            served |= name == "--served-model-name";
            let value = if arg.contains('=') {
                arg.split_once('=').map(|(_, v)| v.to_string())
            } else {
                i += 1;
                rest.get(i).cloned()
            };
            if name == "--model" {
                model = value.clone();
            }
            out.push(name.into());
            if let Some(v) = value {
                out.push(v.into());
            }
            i += 1;
        } else if arg.starts_with('-') {
            ignored.push(arg.clone());
            i += 1;
            if !arg.contains('=') && rest.get(i).is_some_and(|v| !v.starts_with("--")) {
                ignored.push(rest[i].clone());
                i += 1;
            }
        } else {
            // `vllm serve MODEL`: the positional model.
            model = Some(arg.clone());
            out.push("--model".into());
            out.push(arg.into());
            i += 1;
        }
    }
    if let (Some(m), false) = (model, served) {
        out.push("--served-model-name".into());
        out.push(m.into());
    }
    if !ignored.is_empty() {
        eprintln!(
            "sim: accepting and ignoring vLLM flags it does not simulate: {}",
            ignored.join(" ")
        );
    }
    out
}

/// Where the `sim` subcommand is, skipping global options and their values.
fn sim_position(args: &[std::ffi::OsString]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "sim" {
            return Some(i);
        }
        if !a.starts_with('-') {
            return None; // Another command.
        }
        if ["--config", "--db", "--log-format"].contains(&a.as_ref()) {
            i += 1;
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        let v = line.split_whitespace().map(Into::into).collect();
        vllm_compatible_args(v)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn vllm_flags_are_understood_or_ignored() {
        assert_eq!(
            args("gpu-feeder sim --host 0.0.0.0 --model /m/q --served-model-name q --port 8001 \
                  --gpu-memory-utilization 0.4 --dtype bfloat16 --max-model-len=16384 --enforce-eager --max-num-seqs 8"),
            args("gpu-feeder sim --host 0.0.0.0 --model /m/q --served-model-name q --port 8001 --gpu-memory-utilization 0.4 --max-num-seqs 8")
        );
        assert_eq!(
            args("gpu-feeder --log-format json sim /m/q --port=9 --trust-remote-code"),
            [
                "gpu-feeder",
                "--log-format",
                "json",
                "sim",
                "--model",
                "/m/q",
                "--port",
                "9",
                "--served-model-name",
                "/m/q"
            ]
        );
        assert_eq!(
            args("gpu-feeder list --limit 3"),
            ["gpu-feeder", "list", "--limit", "3"]
        );
        // The engine model's flags, vLLM's spellings of them among them.
        assert_eq!(
            args("gpu-feeder sim --kv-cache-tokens 1000 --block-size 32 --max-num-batched-tokens=2048 \
                  --enable-prefix-caching --no-enable-prefix-caching --max-num-queued-reqs 5"),
            args("gpu-feeder sim --kv-cache-tokens 1000 --block-size 32 --max-num-batched-tokens 2048 \
                  --no-prefix-caching --max-num-queued-reqs 5")
        );
    }

    #[test]
    fn the_parsed_command_line_is_a_sim_config() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::parse_from(vllm_compatible_args(
            "gpu-feeder sim --model /m/q --port 0 --dtype half --max-num-seqs 4"
                .split_whitespace()
                .map(Into::into)
                .collect(),
        ));
        match cli.command {
            crate::cli::Command::Sim(c) => {
                assert_eq!(c.served_model_name, "/m/q");
                assert_eq!(c.max_num_seqs, 4);
                assert_eq!(c.model.as_deref(), Some("/m/q"));
                assert_eq!(c.engine_kv_tokens(), None, "no engine model asked for");
            }
            _ => panic!("not sim"),
        }
        // vLLM's own engine flags turn the engine model on with its cache.
        let cli = crate::cli::Cli::parse_from(vllm_compatible_args(
            "gpu-feeder sim /m/q --block-size 128 --num-gpu-blocks-override 80 \
             --kv-cache-tokens 5 --max-num-batched-tokens 2048 --tokenizer /m/q"
                .split_whitespace()
                .map(Into::into)
                .collect(),
        ));
        match cli.command {
            crate::cli::Command::Sim(c) => {
                assert_eq!(c.engine_kv_tokens(), Some(80 * 128));
                assert_eq!(c.max_num_batched_tokens, 2048);
                assert_eq!(c.tokenizer.as_deref(), Some(std::path::Path::new("/m/q")));
            }
            _ => panic!("not sim"),
        }
    }
}
