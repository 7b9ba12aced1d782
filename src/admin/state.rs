//! What the admin endpoint's handlers share: the state they serve from,
//! and the shape of an error answer.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use feeder_actors::handle::FeederHandle;
use feeder_actors::supervisor::FeederStatus;
use feeder_actors::{JobStore, QueueStats, Timestamp};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::api::ApiStore;

/// What the endpoint serves from.
#[derive(Clone)]
pub struct Admin {
    /// The root supervisor.
    pub feeder: FeederHandle,
    /// A connection for reads (stats).
    pub reader: Arc<dyn JobStore>,
    /// The queue's result documents.
    pub results: Arc<crate::results::Results>,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The OpenAI API's files and batches, when `api.listen` is set.
    pub api: Option<Arc<dyn ApiStore>>,
}

impl Admin {
    pub(super) async fn status(&self) -> Option<FeederStatus> {
        self.feeder.status().await.ok()
    }

    pub(super) async fn stats(&self) -> Option<QueueStats> {
        self.reader.stats(Timestamp::now()).await.ok()
    }
}

/// A JSON `{"error": msg}` answer with `status`.
pub fn bad(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}
