//! `FanInActor`: completes parents when their fragments are done.
//!
//! The QueueActor tells it when a fragment finishes; it also scans for
//! parents whose fan-in is due at start and periodically (after a crash,
//! say). When every fragment has finished, the parent's result lists the
//! fragments' results in order with their texts joined, and the parent
//! becomes `done`; if any fragment failed, the parent fails naming them.
//! A parent is merged only while it is still `processing`, so repeated
//! checks write its result once; the store ends it exactly once.
//!
//! It also starts next stages: when a job (or a parent) that names a
//! `then_model` is done, it creates the follow-up job for that model with
//! the result's text as its prompt, recording the job it follows. It asks
//! once per job (it remembers the jobs it has followed up); the scan that
//! finds follow-ups left to create after a crash lists only jobs without
//! one, and the store's one-follow-up-per-job rule guards the rest.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{error, info, warn};

use crate::fragment::{self, Place};
use crate::job::{Job, JobId, JobStatus, NewJob, Payload};
use crate::queue::{JobFinished, QueueMsg};
use crate::results::{FragmentResult, JobResult, MissingFragment, ResultStore};
use crate::store::ParentOutcome;

/// Messages of the FanInActor.
#[derive(Debug)]
pub enum FanInMsg {
    /// A fragment of this parent finished: see whether the parent can complete.
    Check(JobId),
    /// This job is done and names a next model: create its follow-up.
    FollowUp(JobId),
    /// The queue's news of a finished job: a `Check` of its parent, or
    /// its `FollowUp`.
    Finished(JobFinished),
    /// Look for parents whose fragments have all finished, and follow-ups
    /// left to create: its own timer (tests may ask with [`Scan::now`]).
    Scan(Scan),
    /// The queue to ask from now on (after it restarted).
    Queue(ActorRef<QueueMsg>),
}

/// A scan of the store for fan-in work left over; only the actor's timer
/// makes one, and tests.
#[derive(Debug)]
pub struct Scan(());

#[cfg(any(test, feature = "testkit"))]
impl Scan {
    /// A scan now, for a test that cannot wait for the timer.
    pub fn now() -> Self {
        Scan(())
    }
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
    /// Share of fragments that must succeed for a parent to be `done`.
    pub min_success_ratio: f64,
}

/// The FanInActor's state.
pub struct FanInState {
    /// How it was started (with the current queue).
    args: FanInArgs,
    /// Parents completed by this actor since start.
    pub completed: u64,
    /// Jobs whose follow-up this actor has created or found, so that a
    /// repeated request (a scan overtaking a completion, say) is answered
    /// here rather than refused by the store. Bounded: past
    /// `FOLLOWED_CAP` it starts over, and the store's one-follow-up-per-job
    /// rule still holds.
    followed: std::collections::HashSet<JobId>,
}

/// How many jobs `FanInState::followed` remembers at most.
const FOLLOWED_CAP: usize = 100_000;

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

async fn read_result(results: &dyn ResultStore, f: &Job) -> Result<JobResult, String> {
    let index = f.fragment_index.unwrap_or(0);
    let at = f
        .result_path
        .clone()
        .ok_or_else(|| format!("fragment {index} ({}) is done but has no result", f.id))?;
    let bytes = results
        .read(&at)
        .await
        .map_err(|e| format!("reading the result of fragment {index} ({at}): {e}"))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("the result of fragment {index} ({at}) is not a result document: {e}"))
}

/// The parent's result: its done fragments in order, their texts merged
/// (text windows without their repeated overlap; tiles by row then column).
async fn merge(
    parent: &Job,
    fragments: &[Job],
    results: &dyn ResultStore,
) -> Result<JobResult, String> {
    let mut parts = Vec::with_capacity(fragments.len());
    let mut missing = Vec::new();
    let (mut prompt, mut completion) = (0u64, 0u64);
    for f in fragments {
        let index = f.fragment_index.unwrap_or(0);
        if f.status != JobStatus::Done {
            missing.push(MissingFragment {
                index,
                id: f.id,
                error: f.error.clone().unwrap_or_else(|| f.status.to_string()),
            });
            continue;
        }
        let doc = read_result(results, f).await?;
        prompt += doc.prompt_tokens.unwrap_or(0);
        completion += doc.completion_tokens.unwrap_or(0);
        parts.push((
            f.place,
            FragmentResult {
                index,
                id: f.id,
                result_path: f.result_path.clone().unwrap_or_default(),
                content: doc.content,
                tokens: match f.place {
                    Some(Place::Tokens(t)) => Some(t),
                    _ => None,
                },
                tile: match f.place {
                    Some(Place::Tile(t)) => Some(t),
                    _ => None,
                },
            },
        ));
    }
    parts.sort_by_key(|(_, p)| p.index);
    let texts: Vec<(Option<Place>, &str)> = parts
        .iter()
        .map(|(place, p)| (*place, p.content.as_str()))
        .collect();
    let content = fragment::merge(&texts);
    let parts: Vec<FragmentResult> = parts.into_iter().map(|(_, p)| p).collect();
    Ok(JobResult {
        id: parent.id,
        model_type: parent.model_type,
        content,
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        latency_ms: None,
        fragments: parts,
        missing,
        response: None,
    })
}

impl FanInState {
    /// Creates the follow-up of `id` if it is done, names a next model, and
    /// has none yet.
    async fn follow_up(&mut self, id: JobId) -> Result<(), String> {
        if self.followed.contains(&id) {
            return Ok(());
        }
        let q = self.args.queue.clone();
        let t = self.args.call_timeout;
        let Some(job) = ask(&q, t, |reply| QueueMsg::Get { id, reply }).await? else {
            return Ok(());
        };
        let Some(next) = job.then_model else {
            return Ok(());
        };
        if job.status != JobStatus::Done {
            return Ok(());
        }
        let at = job
            .result_path
            .clone()
            .ok_or("the job is done but has no result")?;
        let bytes = self
            .args
            .results
            .read(&at)
            .await
            .map_err(|e| format!("reading {at}: {e}"))?;
        let doc = serde_json::from_slice::<JobResult>(&bytes)
            .map_err(|e| format!("{at} is not a result document: {e}"))?;
        let mut follow = NewJob::new(
            next,
            Payload::Inline(serde_json::json!({ "prompt": doc.content }).to_string()),
            format!("follow-up-of-{id}"),
        );
        follow.follows = Some(id);
        follow.priority = job.priority;
        follow.max_attempts = Some(job.max_attempts);
        let created = ask(&q, t, |reply| QueueMsg::Submit {
            jobs: vec![follow],
            reply,
        })
        .await?;
        if let Some(s) = created.first().filter(|s| s.created) {
            info!(job = %id, follow_up = %s.id, "next stage: {next} job created from the result");
        }
        if self.followed.len() >= FOLLOWED_CAP {
            self.followed.clear();
        }
        self.followed.insert(id);
        Ok(())
    }

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
        let succeeded = fragments.len() - failed.len();
        let enough = succeeded > 0
            && succeeded as f64 >= self.args.min_success_ratio * fragments.len() as f64 - 1e-9;
        let parent_then = parent.then_model.is_some();
        let outcome = if !enough {
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
            let merged = async {
                let doc = merge(&parent, &fragments, results.as_ref()).await?;
                let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
                results
                    .write(parent.id, bytes)
                    .await
                    .map_err(|e| format!("writing the merged result: {e}"))
            }
            .await;
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
                if parent_then {
                    self.follow_up(parent_id).await?;
                }
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
        let _ = myself.cast(FanInMsg::Scan(Scan(())));
        myself.send_interval(args.scan_interval, || FanInMsg::Scan(Scan(())));
        Ok(FanInState {
            args,
            completed: 0,
            followed: Default::default(),
        })
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
            FanInMsg::FollowUp(id) => {
                if let Err(e) = state.follow_up(id).await {
                    error!(job = %id, "creating the follow-up failed: {e}; it is tried again at the next scan");
                }
            }
            FanInMsg::Finished(e) => {
                let next = match e.parent {
                    Some(parent) => FanInMsg::Check(parent),
                    None => FanInMsg::FollowUp(e.job),
                };
                if e.parent.is_some() || e.follow_up {
                    let _ = myself.cast(next);
                }
            }
            FanInMsg::Scan(_) => {
                let q = state.args.queue.clone();
                let t = state.args.call_timeout;
                match ask(&q, t, |reply| QueueMsg::ReadyParents { reply }).await {
                    Ok(ids) => {
                        for id in ids {
                            let _ = myself.cast(FanInMsg::Check(id));
                        }
                    }
                    Err(e) => warn!("scanning for parents to complete failed: {e}"),
                }
                match ask(&q, t, |reply| QueueMsg::PendingFollowUps { reply }).await {
                    Ok(ids) => {
                        for id in ids {
                            let _ = myself.cast(FanInMsg::FollowUp(id));
                        }
                    }
                    Err(e) => warn!("scanning for follow-ups to create failed: {e}"),
                }
            }
            FanInMsg::Queue(queue) => state.args.queue = queue,
        }
        Ok(())
    }
}

// The queue's news of a finished job.
crate::heard_as!(JobFinished => FanInMsg::Finished);
