//! Adapters of the `ContainerRuntime` port: Docker containers (bollard) and
//! local processes. Both launch the same vLLM command line, built here from
//! an instance's configuration, and both label what they launch with a hash
//! of that configuration so that a restarted daemon adopts a server only
//! when it is the one the configuration asks for.

pub mod docker;
pub mod process;

use feeder_actors::runtime::LaunchPlan;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::InstanceConfig;

/// Label (Docker) or pid-file field naming who manages a server.
pub const MANAGED_BY: &str = "gpu-feeder";
/// Docker label keys.
pub const LABEL_MANAGED_BY: &str = "io.gpu-feeder.managed-by";
/// The instance's name.
pub const LABEL_INSTANCE: &str = "io.gpu-feeder.instance";
/// The configuration hash.
pub const LABEL_CONFIG_HASH: &str = "io.gpu-feeder.config-hash";

/// The Docker container name of an instance.
pub fn container_name(instance: &str) -> String {
    format!("gpu-feeder-{instance}")
}

/// The vLLM server flags of an instance launched with `plan`: the model,
/// its served name, the port, the GPU memory share, then `args` as
/// configured (which config check keeps free of the first four).
pub fn vllm_args(inst: &InstanceConfig, plan: &LaunchPlan) -> Vec<String> {
    let mut out = vec![
        "--model".to_string(),
        inst.model
            .clone()
            .unwrap_or_else(|| inst.served_model_name.clone()),
        "--served-model-name".to_string(),
        inst.served_model_name.clone(),
    ];
    if let Some(port) = inst.port {
        out.push("--port".into());
        out.push(port.to_string());
    }
    out.push("--gpu-memory-utilization".into());
    out.push(format!("{}", plan.gpu_memory_utilization));
    if inst.sleep_mode {
        out.push("--enable-sleep-mode".into());
    }
    out.extend(inst.args.iter().cloned());
    out
}

/// The server's environment: as configured, plus `VLLM_SERVER_DEV_MODE=1`
/// with sleep mode (vLLM serves `/sleep` and `/wake_up` only then).
pub fn server_env(inst: &InstanceConfig) -> std::collections::BTreeMap<String, String> {
    let mut env = inst.env.clone();
    if inst.sleep_mode {
        env.insert("VLLM_SERVER_DEV_MODE".into(), "1".into());
    }
    env
}

/// A short hash of everything that shapes the launched server.
pub fn config_hash(inst: &InstanceConfig, plan: &LaunchPlan) -> String {
    let doc = json!({
        "backend": inst.backend.to_string(),
        "image": inst.image,
        "command": inst.command,
        "args": vllm_args(inst, plan),
        "env": server_env(inst),
        "volumes": inst.volumes,
        "gpu_ids": inst.gpu_ids,
        "shm_size": inst.shm_size,
        "network": inst.docker_network,
    });
    let digest = Sha256::digest(doc.to_string().as_bytes());
    hex::encode(&digest[..8])
}
