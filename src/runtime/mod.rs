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

use crate::config::{InstanceConfig, SchedulingPolicy};

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
/// its served name, the port, the GPU memory share, sleep mode, the
/// scheduling policy when it is `priority`, then `args` as configured
/// (which config check keeps free of the flags its keys own).
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
    if inst.scheduling_policy() == SchedulingPolicy::Priority {
        out.push("--scheduling-policy".into());
        out.push("priority".into());
    }
    if let Some(tp) = inst.tensor_parallel_added() {
        out.push("--tensor-parallel-size".into());
        out.push(tp.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: LaunchPlan = LaunchPlan {
        gpu_memory_utilization: 0.4,
    };

    fn inst(gpus: &str, args: &str) -> InstanceConfig {
        toml::from_str(&format!(
            "name = \"t\"\nmodel_type = \"think\"\nbackend = \"process\"\nport = 8002\n\
             served_model_name = \"m\"\ncommand = [\"vllm\", \"serve\"]\ngpu_ids = [{gpus}]\nargs = [{args}]\n"
        ))
        .expect("a valid instance")
    }

    fn tp(i: &InstanceConfig) -> Option<String> {
        let args = vllm_args(i, &PLAN);
        let at = args.iter().position(|a| a == "--tensor-parallel-size")?;
        Some(args[at + 1].clone())
    }

    #[test]
    fn an_instance_on_several_gpus_spreads_its_model_over_all_of_them() {
        assert_eq!(
            tp(&inst("0", "")),
            None,
            "one GPU: no flag (nor a new hash)"
        );
        assert_eq!(tp(&inst("", "")), None);
        assert_eq!(tp(&inst("2, 3", "")).as_deref(), Some("2"));
        assert_eq!(tp(&inst("0, 1, 2, 3", "")).as_deref(), Some("4"));
        // A pipeline-parallel size divides the GPUs between the two.
        assert_eq!(
            tp(&inst("0, 1, 2, 3", "\"--pipeline-parallel-size\", \"2\"")).as_deref(),
            Some("2")
        );
        assert_eq!(tp(&inst("0, 1, 2, 3", "\"-pp=4\"")).as_deref(), Some("1"));
        // Set in args: left alone, and given once.
        for set in [
            "\"--tensor-parallel-size\", \"2\"",
            "\"-tp\", \"2\"",
            "\"--tensor-parallel-size=2\"",
        ] {
            let i = inst("0, 1", set);
            let args = vllm_args(&i, &PLAN);
            let n = args
                .iter()
                .filter(|a| a.contains("tensor-parallel") || *a == "-tp")
                .count();
            assert_eq!(n, 1, "{args:?}");
        }
    }
}
