//! `InstanceSpec`: one model server instance as the actors see it, from
//! the configuration: its name, model, window, client, and how it is
//! launched. Shared by the instance and dispatch supervisors.

use std::sync::Arc;
use std::time::Duration;

use crate::inference::InferenceClient;
use crate::job::ModelType;
use crate::runtime::{ContainerRuntime, LaunchPlan};
use crate::window::WindowMode;

/// One instance, as the supervisors and its actors see it.
#[derive(Clone)]
pub struct InstanceSpec {
    /// Unique name.
    pub name: String,
    /// The model it serves.
    pub model: ModelType,
    /// Requests in flight at most: fixed, or found by the controller.
    pub window: WindowMode,
    /// Its server, as requests see it.
    pub client: Arc<dyn InferenceClient>,
    /// How its server is launched; `None` for an external server.
    pub runtime: Option<Arc<dyn ContainerRuntime>>,
    /// The launch plan at start.
    pub plan: LaunchPlan,
    /// Time allowed from launch to Ready.
    pub startup_timeout: Duration,
    /// The GPUs its server uses (thermal back-off).
    pub gpu_ids: Vec<u32>,
}

impl InstanceSpec {
    /// An instance whose server someone else runs: only probed.
    pub fn external(
        name: impl Into<String>,
        model: ModelType,
        window: impl Into<WindowMode>,
        client: Arc<dyn InferenceClient>,
    ) -> Self {
        InstanceSpec {
            name: name.into(),
            model,
            window: window.into(),
            client,
            runtime: None,
            plan: LaunchPlan {
                gpu_memory_utilization: 0.9,
            },
            startup_timeout: Duration::from_secs(900),
            gpu_ids: Vec::new(),
        }
    }
}
