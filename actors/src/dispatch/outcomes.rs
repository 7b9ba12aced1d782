//! How a request's end is settled: its job completed, retried, failed or
//! given back; the window and the pauses adjusted; and what becomes of the
//! jobs in flight when the server goes down.

use std::time::Duration;

use ractor::ActorRef;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::requests::InFlight;
use super::status::RequestOutcome;
use super::{tick, DispatchMode, DispatchMsg, DispatchState, Tick};
use crate::inference::InferenceError;
use crate::job::{Completion, Failure, JobId};
use crate::store::Settle;

impl DispatchState {
    pub(super) fn finished(
        &mut self,
        myself: &ActorRef<DispatchMsg>,
        job_id: JobId,
        outcome: Result<Completion, InferenceError>,
    ) {
        // None: released or aborted meanwhile.
        if let Some(f) = self.requests.finished(job_id) {
            self.request_ended(myself, job_id, f, outcome);
        }
        self.fill(myself);
    }

    /// What a request's end means for its job, the window and the pauses.
    fn request_ended(
        &mut self,
        myself: &ActorRef<DispatchMsg>,
        job_id: JobId,
        f: InFlight,
        outcome: Result<Completion, InferenceError>,
    ) {
        if let Some(o) = &self.args.observer {
            let kind = RequestOutcome::of(&outcome);
            o.request_finished(&self.args.instance, kind, outcome.as_ref().ok());
        }
        match outcome {
            Ok(done) => self.succeeded(f, done),
            Err(InferenceError::Overloaded {
                message,
                retry_after,
            }) => self.overloaded(myself, f, &message, retry_after),
            Err(InferenceError::Unavailable(message)) => {
                self.unavailable(myself, job_id, f, &message)
            }
            Err(InferenceError::Aborted(message)) => {
                // Cut short by the server (a sleep, a stop): nothing was
                // wrong with the job, so no attempt is counted.
                debug!(job = %job_id, instance = %self.args.instance, "{message}; the job goes back");
                self.counts.aborted += 1;
                self.settle(f.claim, Settle::Release, f.parent, f.follow_up);
            }
            Err(InferenceError::Retryable(message)) => {
                debug!(job = %job_id, "attempt failed: {message}");
                let retry_after = Some(self.args.retry.delay(f.attempts + 1));
                self.failed(f, message, retry_after);
            }
            Err(InferenceError::Permanent(message)) => {
                warn!(job = %job_id, instance = %self.args.instance, "job failed: {message}");
                self.failed(f, message, None);
            }
        }
        self.requests.answer_waiters();
    }

    fn succeeded(&mut self, f: InFlight, done: Completion) {
        self.counts.completed += 1;
        // The server answers: what found no server earlier was no crash.
        for parked in self.requests.release_parked() {
            self.settle(
                parked.claim,
                Settle::Release,
                parked.parent,
                parked.follow_up,
            );
        }
        if let Some(p) = done.prompt_tokens {
            self.warm.prompt_used(p);
        }
        if let Some(w) = self.pacer.succeeded(Instant::now(), done.latency) {
            debug!(instance = %self.args.instance, window = w, "widening the window");
        }
        self.settle(f.claim, Settle::Complete(done), f.parent, f.follow_up);
    }

    fn failed(&mut self, f: InFlight, message: String, retry_after: Option<Duration>) {
        self.counts.failed += 1;
        let failure = Failure {
            message,
            retry_after,
        };
        self.settle(f.claim, Settle::Fail(failure), f.parent, f.follow_up);
    }

    fn overloaded(
        &mut self,
        myself: &ActorRef<DispatchMsg>,
        f: InFlight,
        message: &str,
        retry_after: Option<Duration>,
    ) {
        self.counts.overloaded += 1;
        let n = self
            .pacer
            .overloaded(Instant::now(), retry_after, &self.args.overload);
        if n.news {
            info!(
                instance = %self.args.instance,
                "server overloaded ({message}): window {} → {}, pausing {:.1} s",
                n.before,
                n.after,
                n.pause.as_secs_f64()
            );
        }
        myself.send_after(n.pause, || DispatchMsg::Wake);
        self.settle(f.claim, Settle::Release, f.parent, f.follow_up);
    }

    /// The server is not there. Hold the job: if a crash report follows,
    /// the crash is counted against it; if not, it goes back without an
    /// attempt counted. Either way it never fails because its server is
    /// down.
    fn unavailable(
        &mut self,
        myself: &ActorRef<DispatchMsg>,
        job_id: JobId,
        f: InFlight,
        message: &str,
    ) {
        let first = self.requests.none_parked();
        if first {
            info!(instance = %self.args.instance, "the server is not answering ({message}); pausing dispatch");
        }
        let pause = self
            .pacer
            .unavailable(Instant::now(), first, &self.args.overload);
        let round = self.requests.park(job_id, f);
        myself.send_after(pause, || DispatchMsg::Wake);
        if first {
            // Held until the health checks could have noticed a dead
            // server: a crash report then counts the crash against these
            // jobs (poison quarantine), which a shorter hold would miss.
            let hold = pause.max(self.args.crash_grace);
            myself.send_after(hold, move || tick(Tick::Unpark { round }));
        }
    }

    /// The server went down under our requests: every job in flight (or
    /// parked) goes back with the crash counted; buffered jobs go back as
    /// they were.
    pub(super) fn instance_down(&mut self, reason: &str) {
        if self.mode == DispatchMode::Sending {
            self.mode = DispatchMode::Waiting;
        }
        let hit = self.requests.take_all();
        if !hit.is_empty() {
            warn!(
                instance = %self.args.instance,
                "{reason}; {} job(s) in flight go back to pending", hit.len()
            );
        }
        self.counts.crashed += hit.len() as u64;
        for f in hit {
            let crashed = Settle::Crashed {
                instance: self.args.instance.clone(),
                limit: self.args.poison_after.max(1),
            };
            self.settle(f.claim, crashed, f.parent, f.follow_up);
        }
        self.release_buffer();
        self.requests.answer_waiters();
    }

    /// Parked jobs not explained by a crash go back, no attempt counted.
    pub(super) fn unpark(&mut self, myself: &ActorRef<DispatchMsg>, round: u64) {
        if let Some(parked) = self.requests.unpark(round) {
            for f in parked {
                self.settle(f.claim, Settle::Release, f.parent, f.follow_up);
            }
            self.requests.answer_waiters();
        }
        self.fill(myself);
    }
}
