//! The priority hold: while a request of higher priority than the bulk is
//! under way, new sends of the bulk wait, so that the urgent request runs
//! in a light batch.
//!
//! A full window puts an urgent request beside hundreds of others: every
//! decode step is slower for the batch, the bulk's prompts are prefilled in
//! the same steps, and when the KV cache is full the newest request (the
//! urgent one) is the first to be preempted. The window's size alone cannot
//! help: a window small enough for the urgent request costs the bulk its
//! throughput all the time. The hold costs it only while an urgent request
//! runs: sends of lower priority wait while the requests in flight drain
//! down to a floor (a share of the window), and resume the moment the
//! urgent request ends.
//!
//! Draining is not enough when the requests in flight are still queued in
//! the server or in prefill (long documents, whose chunked prefill fills
//! every step): so as the urgent request is sent, the bulk requests sent
//! less than two request lifetimes ago ([`RECALL_YOUNG`]) are taken back
//! (dropped: the server aborts them, keeping what they computed in its
//! prefix cache; their jobs go back to the queue with no attempt counted)
//! and sent again when the hold ends.
//!
//! The urgent request itself does not wait for a slot: a job that outranks
//! a request in flight may go past a full window (or one cut below what is
//! in flight) while fewer than an eighth of the window (one at least) of
//! its priority or higher are in flight, since the slots of a window of
//! long requests may take seconds to free.
//!
//! It is bounded, so that a steady trickle of priority work cannot starve
//! the bulk: one hold lasts at most a few request lifetimes (a moving
//! average of the latencies seen), and after any hold the bulk sends freely
//! for as long as the hold lasted. So the bulk is held at most half the
//! time, whatever arrives.
//!
//! It can be turned off (`dispatch.priority_hold = false`), for a bulk that
//! is itself a mix of priorities or a user who puts throughput before an
//! urgent job's latency: then no hold ever begins and every job, urgent or
//! not, waits for a slot of the window.

use std::time::Duration;

use tokio::time::Instant;

/// The share of the window that the held bulk keeps in flight.
pub const HOLD_FLOOR: f64 = 0.0;
/// A hold lasts at most this many request lifetimes…
pub const HOLD_LIFETIMES: f64 = 2.0;
/// …and at least this long, whatever the lifetime (a short request's
/// latency says little about a long urgent one).
pub const HOLD_AT_LEAST: Duration = Duration::from_secs(2);
/// A bulk request in flight for less than this many request lifetimes is
/// *young*, and taken back when a hold begins: most likely still queued in
/// the server, in prefill, or early in its output, so taking it back costs
/// little. Chosen on the window benchmark's tuning seeds (100-119, `cargo
/// bench --bench window -- tune`, `BENCH_RECALL=SHARE`): an urgent job's
/// time over its idle time, at worst, 2.87 at 0.5, 2.27 at 1, 1.60 at 2,
/// 1.47 taking back all; the bulk's throughput the same within 1 %. 2 is
/// the least that keeps it under 2 there.
pub const RECALL_YOUNG: f64 = 2.0;
/// The weight of each new latency in the lifetime's moving average.
const LIFETIME_WEIGHT: f64 = 0.05;

/// Holds back sends of lower priority while a higher-priority request runs.
#[derive(Clone, Debug)]
pub struct PriorityHold {
    /// Whether it holds at all (`false`: it admits every send and lets no
    /// job past a full window).
    on: bool,
    /// The share of the window that the held bulk keeps in flight.
    floor_share: f64,
    /// A hold lasts at most this many request lifetimes.
    lifetimes: f64,
    /// When the present hold began.
    since: Option<Instant>,
    /// No hold begins before this: the bulk's turn after one.
    free_until: Option<Instant>,
    /// How long a request takes lately (a moving average).
    lifetime: Option<Duration>,
    /// Holds begun, for the status.
    holds: u64,
    /// Bulk requests younger than this share of a lifetime are taken back
    /// when a hold begins; `None`: none is.
    recall_young: Option<f64>,
}

impl Default for PriorityHold {
    fn default() -> Self {
        PriorityHold::new(HOLD_FLOOR, HOLD_LIFETIMES)
    }
}

impl PriorityHold {
    /// A hold that keeps `floor_share` of the window in flight for the bulk
    /// and lasts at most `lifetimes` request lifetimes.
    pub fn new(floor_share: f64, lifetimes: f64) -> Self {
        PriorityHold {
            on: true,
            floor_share,
            lifetimes,
            since: None,
            free_until: None,
            lifetime: None,
            holds: 0,
            recall_young: Some(RECALL_YOUNG),
        }
    }

    /// A hold that never holds: every send is admitted at once, and no job
    /// goes past a full window.
    pub fn off() -> Self {
        PriorityHold {
            on: false,
            ..PriorityHold::default()
        }
    }

    /// The same, taking back the bulk requests younger than `share` of a
    /// lifetime (`None`: none).
    pub fn with_recall(self, share: Option<f64>) -> Self {
        PriorityHold {
            recall_young: share,
            ..self
        }
    }

    /// Which bulk requests in flight (`key`, sent at) to take back as a
    /// higher-priority request is sent at `now`: the young ones (sent less
    /// than [`RECALL_YOUNG`] of a request lifetime ago), unless the bulk has
    /// its free turn after a hold or no lifetime is known yet. Their jobs
    /// go back (no attempt counted) and are sent again when the hold ends;
    /// the server keeps what they computed in its prefix cache.
    pub fn recall<K>(&self, now: Instant, bulk: impl IntoIterator<Item = (K, Instant)>) -> Vec<K> {
        let (Some(lifetime), Some(share)) = (self.lifetime, self.recall_young) else {
            return Vec::new();
        };
        if !self.on || self.free_until.is_some_and(|t| now < t) {
            return Vec::new();
        }
        let young = lifetime.mul_f64(share);
        bulk.into_iter()
            .filter(|(_, sent)| now.saturating_duration_since(*sent) < young)
            .map(|(k, _)| k)
            .collect()
    }

    /// Whether it holds at all.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// A request ended after `latency`: the lifetime that bounds a hold.
    pub fn on_latency(&mut self, latency: Duration) {
        self.lifetime = Some(self.lifetime.map_or(latency, |l| {
            l.mul_f64(1.0 - LIFETIME_WEIGHT) + latency.mul_f64(LIFETIME_WEIGHT)
        }));
    }

    /// How long one hold may last.
    pub fn limit(&self) -> Duration {
        self.lifetime
            .map_or(HOLD_AT_LEAST, |l| l.mul_f64(self.lifetimes))
            .max(HOLD_AT_LEAST)
    }

    /// Whether a job that `outranks` some request in flight goes past a
    /// full window of `window`, with `peers` requests of its priority or
    /// higher in flight: while they are fewer than an eighth of the window,
    /// one at least.
    pub fn jumps(&self, window: u32, outranks: bool, peers: usize) -> bool {
        self.on && outranks && peers < (window / 8).max(1) as usize
    }

    /// Whether a hold is on now.
    pub fn holding(&self) -> bool {
        self.since.is_some()
    }

    /// Holds begun since the start.
    pub fn holds(&self) -> u64 {
        self.holds
    }

    /// When the present hold ends at the latest (a dispatcher with nothing
    /// else to wake it looks again then).
    pub fn ends_at(&self) -> Option<Instant> {
        self.since.map(|s| s + self.limit())
    }

    /// Whether a request may be sent at `now`, when `above` requests of
    /// higher priority than its own are in flight and `beside` others
    /// (its priority or lower), under a window of `window`. Starts, ends
    /// and bounds the hold as it goes.
    pub fn admits(&mut self, now: Instant, above: usize, beside: usize, window: u32) -> bool {
        if !self.on || above == 0 {
            self.end(now);
            return true;
        }
        if self.free_until.is_some_and(|t| now < t) {
            return true;
        }
        let since = *self.since.get_or_insert_with(|| {
            self.holds += 1;
            now
        });
        if now.duration_since(since) >= self.limit() {
            self.end(now);
            return true;
        }
        (beside as f64) < (window as f64 * self.floor_share).floor()
    }

    /// The higher-priority work is over (or the hold ran out): the bulk
    /// sends freely for as long as it was held.
    fn end(&mut self, now: Instant) {
        if let Some(since) = self.since.take() {
            // Noticed late (nothing was waiting to be sent): no longer than
            // a hold may last.
            self.free_until = Some(now + now.duration_since(since).min(self.limit()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn holds_the_bulk_while_a_higher_priority_request_runs_and_releases_it_after() {
        let t = Instant::now();
        let mut h = PriorityHold::default();
        assert!(h.admits(t, 0, 50, 64), "nothing urgent: no hold");
        assert!(!h.admits(t, 1, 50, 64), "urgent in flight: held");
        assert!(h.holding());
        assert!(!h.admits(t + S, 1, 3, 64), "held down to the floor");
        assert!(h.admits(t + S, 0, 3, 64), "the urgent one ended");
        assert!(!h.holding());
        assert_eq!(h.holds(), 1);
    }

    #[test]
    fn an_urgent_job_may_go_past_a_full_window_by_an_eighth() {
        let h = PriorityHold::default();
        assert!(!h.jumps(64, false, 0), "the bulk waits for a slot");
        assert!(h.jumps(64, true, 7));
        assert!(!h.jumps(64, true, 8), "an eighth of the window at most");
        assert!(h.jumps(4, true, 0), "one at least");
        assert!(!h.jumps(4, true, 1));
    }

    #[test]
    fn off_it_never_holds_and_lets_no_job_past_a_full_window() {
        let t = Instant::now();
        let mut h = PriorityHold::off();
        assert!(!h.is_on());
        for i in 0..100 {
            assert!(h.admits(t + S * i, 1, 50, 64), "the bulk is never held");
        }
        assert!(!h.holding());
        assert_eq!(h.holds(), 0);
        assert_eq!(h.ends_at(), None);
        assert!(!h.jumps(64, true, 0), "an urgent job waits for a slot too");
    }

    #[test]
    fn the_bulk_keeps_its_floor() {
        let t = Instant::now();
        let mut h = PriorityHold::new(0.25, HOLD_LIFETIMES);
        assert!(!h.admits(t, 1, 16, 64));
        assert!(h.admits(t, 1, 15, 64), "below a quarter of the window");
    }

    #[test]
    fn a_hold_is_bounded_and_the_bulk_then_gets_its_turn() {
        let t = Instant::now();
        let mut h = PriorityHold::default();
        for _ in 0..100 {
            h.on_latency(S);
        }
        assert_eq!(h.limit(), 2 * S);
        assert!(!h.admits(t, 1, 0, 64));
        assert_eq!(h.ends_at(), Some(t + 2 * S));
        assert!(!h.admits(t + S, 1, 0, 64));
        assert!(h.admits(t + 2 * S, 1, 0, 64), "the limit is reached");
        assert!(
            h.admits(t + 3 * S, 1, 40, 64),
            "still urgent, but the bulk's turn"
        );
        assert!(!h.admits(t + 4 * S, 1, 40, 64), "the bulk had its turn");
        assert_eq!(h.holds(), 2);
    }

    #[test]
    fn a_trickle_of_urgent_work_holds_the_bulk_at_most_half_the_time() {
        let t = Instant::now();
        let mut h = PriorityHold::default();
        let step = Duration::from_millis(100);
        let (mut held, mut steps) = (0, 0);
        // An urgent request always in flight, for a minute.
        for i in 0..600 {
            steps += 1;
            if !h.admits(t + step * i, 1, 0, 64) {
                held += 1;
            }
        }
        assert!(held * 2 <= steps + 20, "held {held} of {steps}");
    }
}
