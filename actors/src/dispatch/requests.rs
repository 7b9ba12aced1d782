//! The requests a dispatcher has under way: in flight, parked (they found no
//! server), the suspect that runs alone, and who waits for them all to end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::FutureExt as _;
use ractor::RpcReplyPort;
use tokio::task::AbortHandle;

use crate::inference::{InferenceClient, InferenceError};
use crate::job::{Claim, Completion, Job, JobId};
use crate::results::{JobResult, ResultStore};

/// Aborts a request task when dropped (the actor stopped or crashed).
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One request under way.
#[derive(Debug)]
pub(crate) struct InFlight {
    /// Its job's claim.
    pub(crate) claim: Claim,
    /// Attempts its job had made before.
    pub(crate) attempts: u32,
    /// Its job's parent, if a fragment.
    pub(crate) parent: Option<JobId>,
    /// Its job has a follow-up (`then`).
    pub(crate) follow_up: bool,
    /// Its job's priority (the priority hold counts the requests above a
    /// job's).
    pub(crate) priority: i64,
    /// When it was sent.
    pub(crate) sent: tokio::time::Instant,
    /// The task running it.
    pub(crate) _task: AbortOnDrop,
}

/// Requests under way and those waiting for them to end.
#[derive(Debug, Default)]
pub(crate) struct Requests {
    /// Requests under way, by job.
    in_flight: HashMap<JobId, InFlight>,
    /// How many of those are in flight at each priority.
    by_priority: BTreeMap<i64, usize>,
    /// Requests that found no server ("connection refused"): held until a
    /// crash report explains them, or `Unpark` gives them back.
    parked: HashMap<JobId, InFlight>,
    /// Counts parking episodes, so that an old `Unpark` timer is ignored.
    park_round: u64,
    /// A suspect (a job in flight at an earlier crash) runs alone.
    suspect: Option<JobId>,
    /// Answered once nothing is in flight (a drain, or a planned stop).
    waiters: Vec<RpcReplyPort<()>>,
}

impl Requests {
    /// Requests in flight, parked ones included.
    pub(crate) fn len(&self) -> usize {
        self.in_flight.len() + self.parked.len()
    }

    /// Requests being served (a parked one waits).
    pub(crate) fn sending(&self) -> usize {
        self.in_flight.len()
    }

    /// Requests being served of a priority above `priority`, and the
    /// others.
    pub(crate) fn above_and_beside(&self, priority: i64) -> (usize, usize) {
        let above = self
            .by_priority
            .range(priority.saturating_add(1)..)
            .map(|(_, n)| n)
            .sum::<usize>();
        (above, self.in_flight.len() - above)
    }

    /// Whether a request of a priority below `priority` is being served.
    pub(crate) fn any_below(&self, priority: i64) -> bool {
        self.by_priority
            .first_key_value()
            .is_some_and(|(&lowest, _)| lowest < priority)
    }

    /// The requests being served of a priority below `priority`: each
    /// job and when it was sent.
    pub(crate) fn below(&self, priority: i64) -> Vec<(JobId, tokio::time::Instant)> {
        if !self.any_below(priority) {
            return Vec::new();
        }
        self.in_flight
            .iter()
            .filter(|(_, f)| f.priority < priority)
            .map(|(id, f)| (*id, f.sent))
            .collect()
    }

    /// Whether a suspect runs (nothing else may start meanwhile).
    pub(crate) fn suspect_running(&self) -> bool {
        self.suspect.is_some()
    }

    /// `job` is a suspect and runs alone.
    pub(crate) fn run_alone(&mut self, job: JobId) {
        self.suspect = Some(job);
    }

    /// A request was sent.
    pub(crate) fn started(&mut self, job: JobId, f: InFlight) {
        *self.by_priority.entry(f.priority).or_default() += 1;
        if let Some(old) = self.in_flight.insert(job, f) {
            self.uncount(old.priority);
        }
    }

    fn uncount(&mut self, priority: i64) {
        if let Some(n) = self.by_priority.get_mut(&priority) {
            *n -= 1;
            if *n == 0 {
                self.by_priority.remove(&priority);
            }
        }
    }

    /// A request ended: its entry, unless released or aborted meanwhile.
    pub(crate) fn finished(&mut self, job: JobId) -> Option<InFlight> {
        let f = self.in_flight.remove(&job)?;
        self.uncount(f.priority);
        if self.suspect == Some(job) {
            self.suspect = None;
        }
        Some(f)
    }

    /// Whether nothing is parked (a parking episode begins with the next).
    pub(crate) fn none_parked(&self) -> bool {
        self.parked.is_empty()
    }

    /// Holds a request that found no server; the round its `Unpark` ends.
    pub(crate) fn park(&mut self, job: JobId, f: InFlight) -> u64 {
        self.parked.insert(job, f);
        self.park_round
    }

    /// The parked requests if `round` is the current parking episode (an
    /// older timer finds none); the episode ends.
    pub(crate) fn unpark(&mut self, round: u64) -> Option<Vec<InFlight>> {
        if round != self.park_round {
            return None;
        }
        self.park_round += 1;
        Some(std::mem::take(&mut self.parked).into_values().collect())
    }

    /// The parked requests, whatever the episode (the server answered
    /// another request, so they were no crash's); the episode ends.
    pub(crate) fn release_parked(&mut self) -> Vec<InFlight> {
        if self.parked.is_empty() {
            return Vec::new();
        }
        self.park_round += 1;
        std::mem::take(&mut self.parked).into_values().collect()
    }

    /// Every request, in flight or parked (the server went down, or all
    /// are released); any parking episode ends.
    pub(crate) fn take_all(&mut self) -> Vec<InFlight> {
        self.suspect = None;
        self.park_round += 1;
        self.by_priority.clear();
        self.in_flight
            .drain()
            .chain(self.parked.drain())
            .map(|(_, f)| f)
            .collect()
    }

    /// `reply` is answered once nothing is in flight.
    pub(crate) fn when_idle(&mut self, reply: RpcReplyPort<()>) {
        self.waiters.push(reply);
        self.answer_waiters();
    }

    /// Answers the waiters if nothing is in flight.
    pub(crate) fn answer_waiters(&mut self) {
        if self.len() == 0 {
            self.answer_all();
        }
    }

    /// Answers the waiters whatever is in flight.
    pub(crate) fn answer_all(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Runs `job` on `client` and writes its result to `results`: the
/// completion, or why there is none (a panic included).
pub(crate) async fn run_request(
    client: Arc<dyn InferenceClient>,
    results: Arc<dyn ResultStore>,
    job: Job,
) -> Result<Completion, InferenceError> {
    let run = async {
        let out = client.infer(&job).await?;
        let doc = JobResult {
            missing: Vec::new(),
            id: job.id,
            model_type: job.model_type,
            content: out.content,
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.completion_tokens,
            latency_ms: Some(out.latency.as_millis() as u64),
            fragments: Vec::new(),
            response: Some(out.response),
        };
        let bytes = serde_json::to_vec_pretty(&doc).expect("a result serializes");
        match results.write(job.id, bytes).await {
            Ok(result_path) => Ok(Completion {
                result_path,
                prompt_tokens: out.prompt_tokens,
                completion_tokens: out.completion_tokens,
                latency: out.latency,
            }),
            Err(e) => Err(InferenceError::Retryable(format!(
                "writing the result failed: {e}"
            ))),
        }
    };
    std::panic::AssertUnwindSafe(run)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(InferenceError::Retryable(format!(
                "the request panicked: {what}"
            )))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: u8) -> (JobId, InFlight) {
        let job = JobId([n; 16]);
        let task = tokio::spawn(std::future::pending::<()>());
        let f = InFlight {
            claim: Claim {
                job_id: job,
                claim_id: format!("c{n}"),
            },
            attempts: 0,
            parent: None,
            follow_up: false,
            priority: n as i64 % 2,
            sent: tokio::time::Instant::now(),
            _task: AbortOnDrop(task.abort_handle()),
        };
        (job, f)
    }

    #[tokio::test]
    async fn an_old_unpark_timer_finds_nothing() {
        let mut r = Requests::default();
        let (a, fa) = request(1);
        r.started(a, fa);
        let fa = r.finished(a).unwrap();
        assert!(r.none_parked());
        let round = r.park(a, fa);
        assert_eq!((r.len(), r.sending()), (1, 0));
        assert!(r.unpark(round + 1).is_none(), "not this episode");
        assert_eq!(r.unpark(round).map(|v| v.len()), Some(1));
        assert!(r.unpark(round).is_none(), "the episode is over");
        assert_eq!(r.len(), 0);
    }

    #[tokio::test]
    async fn a_suspect_runs_until_it_finishes_or_all_are_taken() {
        let mut r = Requests::default();
        let (a, fa) = request(1);
        r.run_alone(a);
        r.started(a, fa);
        assert!(r.suspect_running());
        assert!(r.finished(a).is_some());
        assert!(!r.suspect_running());
        assert!(r.finished(a).is_none(), "already gone");
        let (b, fb) = request(2);
        r.run_alone(b);
        r.started(b, fb);
        let (c, fc) = request(3);
        let round = r.park(c, fc);
        assert_eq!(r.take_all().len(), 2);
        assert!(!r.suspect_running());
        assert!(r.unpark(round).is_none(), "taking all ends the episode");
    }

    #[tokio::test]
    async fn requests_are_counted_by_priority_until_they_end() {
        let mut r = Requests::default();
        for n in 1..=5 {
            let (j, f) = request(n);
            r.started(j, f);
        }
        // Odd ids have priority 1, even ones 0.
        assert_eq!(r.above_and_beside(0), (3, 2));
        assert_eq!(r.above_and_beside(1), (0, 5));
        assert!(r.any_below(1) && !r.any_below(0));
        r.finished(JobId([1; 16]));
        assert_eq!(r.above_and_beside(0), (2, 2));
        let (j, f) = request(3);
        r.started(j, f);
        assert_eq!(r.above_and_beside(0), (2, 2), "started again, counted once");
        r.take_all();
        assert_eq!(r.above_and_beside(-1), (0, 0));
    }

    #[tokio::test]
    async fn waiters_are_answered_once_nothing_is_in_flight() {
        let mut r = Requests::default();
        let (a, fa) = request(1);
        r.started(a, fa);
        let (tx, mut rx) = ractor::concurrency::oneshot();
        r.when_idle(tx.into());
        assert!(rx.try_recv().is_err());
        r.finished(a);
        r.answer_waiters();
        assert!(rx.try_recv().is_ok());
    }
}
