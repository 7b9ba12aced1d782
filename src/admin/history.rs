//! How many jobs each model finished lately, for the status page's
//! throughput chart and time-to-drain estimate: a sampler reads the queue's
//! counts every few seconds (one cheap `stats` query, whatever the queue's
//! size) and keeps ten minutes of them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{json, Value};

use feeder_actors::{JobStore, ModelType, QueueStats, Timestamp};

/// Seconds between samples.
const EVERY: Duration = Duration::from_secs(5);
/// The chart: this many slices…
pub const SLICES: usize = 20;
/// …of this many seconds (ten minutes in all).
pub const SLICE_S: i64 = 30;

/// Finished jobs (done or failed) per model at one time.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    at: Timestamp,
    finished: Vec<(ModelType, u64)>,
}

/// The samples of the last ten minutes, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Adds what `stats` says at `at`, forgetting samples older than the
    /// chart.
    pub fn record(&self, stats: &QueueStats, at: Timestamp) {
        let finished = stats
            .models
            .iter()
            .map(|(m, s)| (*m, s.counts.done + s.counts.failed))
            .collect();
        let mut samples = self.samples.lock().expect("history lock");
        samples.push_back(Sample { at, finished });
        // One sample older than the chart stays, as the base of its first slice.
        let horizon = at.0 - SLICES as i64 * SLICE_S * 1000;
        while samples.len() > 2 && samples[1].at.0 <= horizon {
            samples.pop_front();
        }
    }

    /// Per model, the jobs finished in each slice up to `now`, oldest
    /// first, and how many seconds the samples cover (less than the chart
    /// while the daemon is young): `{"slice_s", "covered_s", "models":
    /// {"think": [n, …]}}`.
    pub fn json(&self, now: Timestamp) -> Value {
        let samples = self.samples.lock().expect("history lock");
        let slice_ms = SLICE_S * 1000;
        let mut models = serde_json::Map::new();
        for model in ModelType::ALL {
            let count = |s: &Sample| {
                s.finished
                    .iter()
                    .find(|(m, _)| *m == model)
                    .map_or(0, |(_, n)| *n)
            };
            let mut slices = vec![0u64; SLICES];
            for pair in samples.iter().collect::<Vec<_>>().windows(2) {
                let (before, after) = (pair[0], pair[1]);
                let back = (now.0 - after.at.0).max(0) / slice_ms;
                if let Some(slot) = (back as usize)
                    .checked_add(1)
                    .and_then(|b| SLICES.checked_sub(b))
                {
                    // A retried failure counts down: no negative slice.
                    slices[slot] += count(after).saturating_sub(count(before));
                }
            }
            models.insert(model.to_string(), json!(slices));
        }
        let covered_s = match (samples.front(), samples.back()) {
            (Some(first), Some(last)) => (last.at.0 - first.at.0) as f64 / 1000.0,
            _ => 0.0,
        };
        json!({ "slice_s": SLICE_S, "covered_s": covered_s, "models": models })
    }
}

/// Starts sampling `reader` every few seconds; the task ends once the
/// returned history is dropped.
pub fn sample(reader: Arc<dyn JobStore>) -> Arc<History> {
    let history = Arc::new(History::default());
    let weak: Weak<History> = Arc::downgrade(&history);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            let Some(history) = weak.upgrade() else {
                return;
            };
            let now = Timestamp::now();
            // A queue that cannot be read leaves a gap; the page says why.
            if let Ok(stats) = reader.stats(now).await {
                history.record(&stats, now);
            }
        }
    });
    history
}

#[cfg(test)]
mod tests {
    use super::*;
    use feeder_actors::{ModelStats, StatusCounts};

    fn stats(think_done: u64, think_failed: u64) -> QueueStats {
        QueueStats {
            models: vec![(
                ModelType::Think,
                ModelStats {
                    counts: StatusCounts {
                        done: think_done,
                        failed: think_failed,
                        ..Default::default()
                    },
                    oldest_pending_age: None,
                },
            )],
        }
    }

    #[test]
    fn finished_jobs_land_in_the_slice_of_the_sample_that_saw_them() {
        let h = History::default();
        let t0 = 1_000_000_000;
        h.record(&stats(0, 0), Timestamp(t0));
        h.record(&stats(10, 1), Timestamp(t0 + 5_000));
        h.record(&stats(30, 1), Timestamp(t0 + 40_000));
        // A retried failure makes the count go down: nothing negative.
        h.record(&stats(30, 0), Timestamp(t0 + 45_000));
        let v = h.json(Timestamp(t0 + 45_000));
        let think: Vec<u64> = serde_json::from_value(v["models"]["think"].clone()).unwrap();
        assert_eq!(think.len(), SLICES);
        assert_eq!(think[SLICES - 1], 20, "the last 30 s: {think:?}");
        assert_eq!(think[SLICES - 2], 11, "the 30 s before: {think:?}");
        assert_eq!(think.iter().sum::<u64>(), 31);
        assert_eq!(v["covered_s"], 45.0);
        assert_eq!(v["models"]["vision"].as_array().unwrap().len(), SLICES);
    }

    #[test]
    fn samples_older_than_the_chart_are_forgotten_but_one() {
        let h = History::default();
        let minute = 60_000;
        for i in 0..30 {
            h.record(&stats(i, 0), Timestamp(i as i64 * minute));
        }
        let kept = h.samples.lock().unwrap().len();
        assert_eq!(
            kept, 11,
            "ten minutes of samples a minute apart, and a base"
        );
        let v = h.json(Timestamp(29 * minute));
        let think: Vec<u64> = serde_json::from_value(v["models"]["think"].clone()).unwrap();
        assert_eq!(think.iter().sum::<u64>(), 10);
    }
}
