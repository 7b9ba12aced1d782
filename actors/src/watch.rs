//! Who waits for a job to end: a caller that answers a client with the
//! job's result (the OpenAI API's chat completions) registers the job and
//! is woken when the QueueActor commits its last settlement, instead of
//! polling the store.
//!
//! Only this daemon's settlements are seen: a job settled by another
//! daemon on a shared queue is found by the waiter's own slow re-read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::job::JobId;

/// The jobs being waited for.
#[derive(Debug, Default)]
pub struct JobWatch {
    waiting: Mutex<HashMap<JobId, Arc<Notify>>>,
}

impl JobWatch {
    /// Starts watching `job`: the returned `Notify` is notified once it
    /// ends (register before reading its status, so that an end between
    /// the read and the wait is not missed).
    pub fn watch(&self, job: JobId) -> Arc<Notify> {
        self.waiting
            .lock()
            .unwrap()
            .entry(job)
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Stops watching `job` (its waiter is done).
    pub fn forget(&self, job: JobId) {
        self.waiting.lock().unwrap().remove(&job);
    }

    /// `jobs` ended (done or failed for good).
    pub(crate) fn ended(&self, jobs: &[JobId]) {
        let waiting = self.waiting.lock().unwrap();
        if waiting.is_empty() {
            return;
        }
        for job in jobs {
            if let Some(n) = waiting.get(job) {
                n.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_end_before_the_wait_is_not_missed() {
        let watch = JobWatch::default();
        let job = JobId::random();
        let n = watch.watch(job);
        watch.ended(&[job]);
        tokio::time::timeout(std::time::Duration::from_secs(5), n.notified())
            .await
            .expect("the stored permit wakes the waiter");
        watch.forget(job);
        assert!(watch.waiting.lock().unwrap().is_empty());
    }
}
