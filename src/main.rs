//! The `gpu-feeder` binary: parses the command line and maps errors to exit
//! statuses (1 failure, 2 usage, 78 bad configuration).

use clap::Parser;

use gpu_feeder::cli::{self, Cli, EX_CONFIG};
use gpu_feeder::config::ConfigError;

/// The daemon allocates and frees small buffers for every job (rows,
/// request bodies, responses, messages between actors): mimalloc's
/// per-thread free lists serve them with less CPU than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = gpu_feeder::sim::vllm_compatible_args(std::env::args_os().collect());
    let parsed = Cli::parse_from(args);
    let code = match cli::run(parsed) {
        Ok(code) => code,
        Err(e) => {
            if let Some(config) = e.downcast_ref::<ConfigError>() {
                eprintln!("{config}");
                EX_CONFIG
            } else {
                eprintln!("error: {e:#}");
                1
            }
        }
    };
    std::process::exit(code);
}
