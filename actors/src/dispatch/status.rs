//! What a dispatcher reports: its mode, its counters, the status snapshot,
//! and how each request ended (for the metrics observer).

use crate::inference::InferenceError;
use crate::job::{Completion, ModelType};
use crate::window::WindowSignals;

/// What a dispatcher may do, one state at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchMode {
    /// Its instance is not Ready: nothing is sent, and claimed jobs that
    /// were not sent go back to the queue.
    Waiting,
    /// Its instance is Ready: jobs are claimed and sent, up to the window.
    Sending,
    /// Stopped claiming for good (a shutdown, or a planned stop): requests
    /// in flight finish; nothing new is sent, whatever the instance does.
    Draining,
}

/// What `Status` reports.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchStatus {
    /// The instance.
    pub instance: String,
    /// Its model.
    pub model: ModelType,
    /// Whether it sends, waits for its instance, or drains.
    pub mode: DispatchMode,
    /// Requests in flight.
    pub in_flight: usize,
    /// Jobs claimed and waiting for a free slot.
    pub buffered: usize,
    /// The window now (narrowed under back-pressure).
    pub window: u32,
    /// The configured window, or the most `auto` may reach.
    pub max_window: u32,
    /// Whether the window is found by the controller (`auto`).
    pub auto_window: bool,
    /// Why the window is what it is.
    pub window_reason: String,
    /// The signals the controller read last.
    pub window_signals: WindowSignals,
    /// The thermal cap on the window, while a GPU it uses is too hot.
    pub thermal_cap: Option<u32>,
    /// Requests sent since start.
    pub sent: u64,
    /// Requests that produced a result.
    pub completed: u64,
    /// Requests that failed (and were retried or failed their job).
    pub failed: u64,
    /// 429/503 answers.
    pub overloaded: u64,
    /// Jobs given back because the server went down under them.
    pub crashed: u64,
    /// Requests the server aborted (their jobs went back, no attempt counted).
    pub aborted: u64,
    /// Prefix keys the dispatcher holds as warm (sent lately; as many as
    /// the server's KV cache holds), which its claims take first.
    pub warm_prefixes: usize,
    /// Priority holds begun since the dispatcher started (0 with
    /// `dispatch.priority_hold = false`).
    pub holds: u64,
    /// Young requests of lower priority taken back for a higher-priority
    /// one (their jobs went back, no attempt counted).
    pub recalled: u64,
}

/// A dispatcher's counts of requests since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Requests sent.
    pub(crate) sent: u64,
    /// Requests that produced a result.
    pub(crate) completed: u64,
    /// Requests that failed (retried, or failing their job).
    pub(crate) failed: u64,
    /// 429/503 answers.
    pub(crate) overloaded: u64,
    /// Requests in flight when the server went down.
    pub(crate) crashed: u64,
    /// Requests the server aborted.
    pub(crate) aborted: u64,
    /// Requests taken back for a higher-priority one.
    pub(crate) recalled: u64,
}

/// How a request ended, for metrics (its name is a label value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A result was written.
    Done,
    /// Failed in a way worth retrying (connection, timeout, 5xx).
    Retryable,
    /// Failed for good (4xx, bad payload).
    Permanent,
    /// The server was saturated (429, 503).
    Overloaded,
    /// The server was not there (connection refused or dropped).
    Unavailable,
    /// The server aborted it (put to sleep, or stopping).
    Aborted,
}

named!(RequestOutcome {
    Done = "done", Retryable = "retryable", Permanent = "permanent", Overloaded = "overloaded",
    Unavailable = "unavailable", Aborted = "aborted",
});

impl RequestOutcome {
    /// How a request that ended so ended.
    pub(crate) fn of(outcome: &Result<Completion, InferenceError>) -> Self {
        match outcome {
            Ok(_) => RequestOutcome::Done,
            Err(InferenceError::Retryable(_)) => RequestOutcome::Retryable,
            Err(InferenceError::Permanent(_)) => RequestOutcome::Permanent,
            Err(InferenceError::Overloaded { .. }) => RequestOutcome::Overloaded,
            Err(InferenceError::Unavailable(_)) => RequestOutcome::Unavailable,
            Err(InferenceError::Aborted(_)) => RequestOutcome::Aborted,
        }
    }
}

/// Watches requests finish: how metrics are fed without the actors knowing
/// any metrics library.
pub trait DispatchObserver: Send + Sync + 'static {
    /// A request to `instance` ended; `done` carries latency and tokens.
    fn request_finished(&self, instance: &str, outcome: RequestOutcome, done: Option<&Completion>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_outcome() {
        let cases = [
            (InferenceError::Retryable(String::new()), "retryable"),
            (InferenceError::Permanent(String::new()), "permanent"),
            (InferenceError::Unavailable(String::new()), "unavailable"),
            (InferenceError::Aborted(String::new()), "aborted"),
            (
                InferenceError::Overloaded {
                    message: String::new(),
                    retry_after: None,
                },
                "overloaded",
            ),
        ];
        for (e, label) in cases {
            assert_eq!(RequestOutcome::of(&Err(e)).as_str(), label);
        }
    }
}
