//! `FanInActor`: completes parents when their fragments are done.
//!
//! The QueueActor tells it when a fragment finishes; it also scans for
//! parents whose fan-in is due at start and periodically (after a crash,
//! say). When every fragment has finished, the parent's result lists the
//! fragments' results in order with their texts joined, and the parent
//! becomes `done`; if any fragment failed, the parent fails naming them.
//! The store ends a parent exactly once, however many checks race.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{error, info, warn};

use crate::job::{Job, JobId, JobStatus};
use crate::peers::Peers;
use crate::queue::QueueMsg;
use crate::results::{FragmentResult, JobResult, ResultStore};
use crate::store::ParentOutcome;

/// Messages of the FanInActor.
#[derive(Debug)]
pub enum FanInMsg {
    /// A fragment of this parent finished: see whether the parent can complete.
    Check(JobId),
    /// Look for parents whose fragments have all finished.
    Scan,
    /// The current peers.
    Peers(Peers),
}

/// How the FanInActor is started.
pub struct FanInArgs {
    /// The queue.
    pub queue: ActorRef<QueueMsg>,
    /// Where fragment results are read and merged results written.
    pub results: Arc<dyn ResultStore>,
    /// How often to scan for due parents.
    pub scan_interval: Duration,
    /// Time allowed for a call to the queue.
    pub call_timeout: Duration,
}

/// The FanInActor's state.
pub struct FanInState {
    args: FanInArgs,
    /// Parents completed by this actor since start.
    pub completed: u64,
}

/// Completes parents.
pub struct FanInActor;

async fn ask<T: Send + 'static>(
    queue: &ActorRef<QueueMsg>,
    timeout: Duration,
    msg: impl FnOnce(ractor::RpcReplyPort<crate::store::StoreResult<T>>) -> QueueMsg,
) -> Result<T, String> {
    match queue.call(msg, Some(timeout)).await {
        Ok(CallResult::Success(Ok(v))) => Ok(v),
        Ok(CallResult::Success(Err(e))) => Err(e.to_string()),
        Ok(CallResult::Timeout) => Err("the queue did not answer in time".into()),
        Ok(CallResult::SenderError) => Err("the queue dropped the request".into()),
        Err(e) => Err(format!("the queue is gone: {e}")),
    }
}

fn merge(parent: &Job, fragments: &[Job], results: &dyn ResultStore) -> Result<JobResult, String> {
    let mut parts = Vec::with_capacity(fragments.len());
    let (mut prompt, mut completion) = (0u64, 0u64);
    for f in fragments {
        let path = f.result_path.clone().ok_or_else(|| {
            format!(
                "fragment {} ({}) is done but has no result file",
                f.fragment_index.unwrap_or(0),
                f.id
            )
        })?;
        let bytes = results.read(&path).map_err(|e| {
            format!(
                "reading the result of fragment {} ({}): {e}",
                f.fragment_index.unwrap_or(0),
                path.display()
            )
        })?;
        let doc: JobResult = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "the result of fragment {} ({}) is not a result document: {e}",
                f.fragment_index.unwrap_or(0),
                path.display()
            )
        })?;
        prompt += doc.prompt_tokens.unwrap_or(0);
        completion += doc.completion_tokens.unwrap_or(0);
        parts.push(FragmentResult {
            index: f.fragment_index.unwrap_or(0),
            id: f.id,
            result_path: path,
            content: doc.content,
        });
    }
    parts.sort_by_key(|p| p.index);
    let content = parts
        .iter()
        .map(|p| p.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    Ok(JobResult {
        id: parent.id,
        model_type: parent.model_type,
        content,
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        latency_ms: None,
        fragments: parts,
        response: None,
    })
}

impl FanInState {
    async fn check(&mut self, parent_id: JobId) -> Result<(), String> {
        let q = self.args.queue.clone();
        let t = self.args.call_timeout;
        let Some(parent) = ask(&q, t, |reply| QueueMsg::Get {
            id: parent_id,
            reply,
        })
        .await?
        else {
            return Ok(());
        };
        if parent.status != JobStatus::Processing || !parent.is_parent() {
            return Ok(()); // Already finished (or cancelled).
        }
        let fragments = ask(&q, t, |reply| QueueMsg::Fragments {
            parent: parent_id,
            reply,
        })
        .await?;
        if fragments.iter().any(|f| !f.status.is_terminal()) {
            return Ok(());
        }
        let failed: Vec<&Job> = fragments
            .iter()
            .filter(|f| f.status != JobStatus::Done)
            .collect();
        let outcome = if !failed.is_empty() {
            let names: Vec<String> = failed
                .iter()
                .map(|f| {
                    format!(
                        "#{} ({}, {}{})",
                        f.fragment_index.unwrap_or(0),
                        f.id,
                        f.status,
                        f.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            ParentOutcome::Failed {
                error: format!(
                    "{} of {} fragments did not succeed: {}",
                    failed.len(),
                    fragments.len(),
                    names.join("; ")
                ),
            }
        } else {
            let results = self.args.results.clone();
            let merged = tokio::task::spawn_blocking(move || {
                let doc = merge(&parent, &fragments, results.as_ref())?;
                let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
                results
                    .write(parent.id, &bytes)
                    .map_err(|e| format!("writing the merged result: {e}"))
            })
            .await
            .map_err(|e| format!("merging panicked: {e}"))?;
            match merged {
                Ok(result_path) => ParentOutcome::Done { result_path },
                Err(error) => ParentOutcome::Failed { error },
            }
        };
        let done = matches!(outcome, ParentOutcome::Done { .. });
        let finished = ask(&q, t, |reply| QueueMsg::FinishParent {
            id: parent_id,
            outcome,
            reply,
        })
        .await?;
        if finished {
            self.completed += 1;
            if done {
                info!(parent = %parent_id, "parent done: fragments merged");
            } else {
                warn!(parent = %parent_id, "parent failed: some fragments did not succeed");
            }
        }
        Ok(())
    }
}

impl Actor for FanInActor {
    type Msg = FanInMsg;
    type State = FanInState;
    type Arguments = FanInArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<FanInMsg>,
        args: FanInArgs,
    ) -> Result<FanInState, ActorProcessingErr> {
        let _ = myself.cast(FanInMsg::Scan);
        myself.send_interval(args.scan_interval, || FanInMsg::Scan);
        Ok(FanInState { args, completed: 0 })
    }

    async fn handle(
        &self,
        myself: ActorRef<FanInMsg>,
        msg: FanInMsg,
        state: &mut FanInState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FanInMsg::Check(parent) => {
                if let Err(e) = state.check(parent).await {
                    error!(parent = %parent, "fan-in failed: {e}; it is tried again at the next scan");
                }
            }
            FanInMsg::Scan => {
                let q = state.args.queue.clone();
                match ask(&q, state.args.call_timeout, |reply| {
                    QueueMsg::ReadyParents { reply }
                })
                .await
                {
                    Ok(ids) => {
                        for id in ids {
                            let _ = myself.cast(FanInMsg::Check(id));
                        }
                    }
                    Err(e) => warn!("scanning for parents to complete failed: {e}"),
                }
            }
            FanInMsg::Peers(peers) => state.args.queue = peers.queue,
        }
        Ok(())
    }
}
