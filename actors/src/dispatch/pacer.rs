//! The pacer: how many requests a dispatcher may have in flight now, and
//! whether it may send at all. It holds the window controller, the thermal
//! cap, the pauses after 429/503 answers or a vanished server, and the
//! priority hold (the bulk's sends wait while a higher-priority request
//! runs).

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::inference::EngineMetrics;
use crate::window::{PriorityHold, WindowController, WindowMode, AUTO_START};

/// The window and the pauses of one dispatcher.
#[derive(Debug)]
pub(crate) struct Pacer {
    /// Requests in flight at most now, and how that is decided.
    ctl: WindowController,
    /// A metrics reading is under way.
    polling: bool,
    /// While a GPU is too hot: the window may not exceed this.
    thermal_cap: Option<u32>,
    /// Successes since a narrowed fixed window last widened.
    successes_at_window: u32,
    /// 429/503 answers (or server absences) in a row: each step lengthens
    /// the pause.
    overload_streak: u32,
    /// No request is sent before this (after an overload or a vanished server).
    paused_until: Option<Instant>,
    /// Whether a send of lower priority waits for a higher one in flight.
    hold: PriorityHold,
}

/// What an overload answer did to the pacing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Narrowed {
    /// The window before.
    pub(crate) before: u32,
    /// The window now.
    pub(crate) after: u32,
    /// How long dispatch pauses.
    pub(crate) pause: Duration,
    /// Worth a log line: the window narrowed, or a streak began.
    pub(crate) news: bool,
}

impl Pacer {
    /// A pacer for `mode`, starting now; `hold`: whether the bulk's sends
    /// wait while a higher-priority request runs (see [`PriorityHold`]).
    pub(crate) fn new(mode: WindowMode, hold: bool, now: Instant) -> Self {
        Pacer {
            ctl: WindowController::new(mode, AUTO_START, now),
            polling: false,
            thermal_cap: None,
            successes_at_window: 0,
            overload_streak: 0,
            paused_until: None,
            hold: if hold {
                PriorityHold::default()
            } else {
                PriorityHold::off()
            },
        }
    }

    /// Whether a job may be sent at `now` with `above` requests of higher
    /// priority than its own in flight and `beside` others (see
    /// [`PriorityHold`]); when not, the latest time to look again.
    pub(crate) fn admits(
        &mut self,
        now: Instant,
        above: usize,
        beside: usize,
    ) -> Result<(), Instant> {
        let window = self.window();
        if self.hold.admits(now, above, beside, window) {
            return Ok(());
        }
        Err(self.hold.ends_at().unwrap_or(now))
    }

    /// Whether a job that `outranks` some request in flight goes past a
    /// full window, with `peers` of its priority or higher in flight (see
    /// [`PriorityHold::jumps`]).
    pub(crate) fn jumps(&self, outranks: bool, peers: usize) -> bool {
        self.hold.jumps(self.window(), outranks, peers)
    }

    /// Which of the bulk requests in flight (job, sent at) to take back as
    /// a higher-priority request is sent (see [`PriorityHold::recall`]).
    pub(crate) fn recall<K>(
        &self,
        now: Instant,
        bulk: impl IntoIterator<Item = (K, Instant)>,
    ) -> Vec<K> {
        self.hold.recall(now, bulk)
    }

    /// Holds begun since the start.
    pub(crate) fn holds(&self) -> u64 {
        self.hold.holds()
    }

    /// The window controller, for what it reports.
    pub(crate) fn ctl(&self) -> &WindowController {
        &self.ctl
    }

    /// Requests in flight at most now: the controller's window, under the
    /// thermal cap.
    pub(crate) fn window(&self) -> u32 {
        self.ctl.window().min(self.thermal_cap.unwrap_or(u32::MAX))
    }

    /// The thermal cap, while a GPU is too hot.
    pub(crate) fn thermal_cap(&self) -> Option<u32> {
        self.thermal_cap
    }

    /// Whether sending waits for a pause to end.
    pub(crate) fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|t| now < t)
    }

    /// A (re)started server: a pause for the old one's absence no longer
    /// applies.
    pub(crate) fn fresh_server(&mut self) {
        self.paused_until = None;
        self.overload_streak = 0;
    }

    /// A GPU is too hot (`Some(factor)`: the window is scaled by it) or
    /// cool again; the new cap when it changed.
    pub(crate) fn thermal(&mut self, factor: Option<f64>) -> Option<Option<u32>> {
        let cap = factor.map(|f| ((self.ctl.window() as f64 * f).floor() as u32).max(1));
        let changed = cap != self.thermal_cap;
        self.thermal_cap = cap;
        changed.then_some(cap)
    }

    /// A request succeeded after `latency`; the new window when a fixed
    /// window narrowed by overload widened again.
    pub(crate) fn succeeded(&mut self, now: Instant, latency: Duration) -> Option<u32> {
        self.overload_streak = 0;
        self.ctl.on_latency(now, latency);
        self.hold.on_latency(latency);
        self.successes_at_window += 1;
        if self.successes_at_window < self.ctl.window() {
            return None;
        }
        self.successes_at_window = 0;
        self.ctl.fixed_recovery(now)
    }

    /// The server answered 429/503: the window narrows, and dispatch pauses
    /// for `retry_after` or the next step of `backoff`.
    pub(crate) fn overloaded(
        &mut self,
        now: Instant,
        retry_after: Option<Duration>,
        backoff: &Backoff,
    ) -> Narrowed {
        self.overload_streak += 1;
        let before = self.ctl.window();
        let after = self.ctl.on_overload(now);
        let pause = retry_after.unwrap_or_else(|| backoff.delay(self.overload_streak));
        self.successes_at_window = 0;
        self.paused_until = Some(now + pause);
        Narrowed {
            before,
            after,
            pause,
            news: after < before || self.overload_streak == 1,
        }
    }

    /// The server did not answer: dispatch pauses. One step of backoff per
    /// episode (`first`), not per request that found the server gone.
    pub(crate) fn unavailable(&mut self, now: Instant, first: bool, backoff: &Backoff) -> Duration {
        if first {
            self.overload_streak += 1;
        }
        let pause = backoff.delay(self.overload_streak);
        self.paused_until = Some(now + pause);
        pause
    }

    /// Whether to start a metrics reading now (one at a time, none while
    /// draining); marks one under way.
    pub(crate) fn start_poll(&mut self, draining: bool) -> bool {
        if self.polling || draining {
            return false;
        }
        self.polling = true;
        true
    }

    /// A metrics reading came back (`None`: the server has none) with
    /// `in_flight` requests under way; the window before and after.
    pub(crate) fn metrics(
        &mut self,
        now: Instant,
        read: Option<EngineMetrics>,
        in_flight: usize,
    ) -> (u32, u32) {
        let before = self.ctl.window();
        match read {
            Some(m) => {
                self.ctl.on_metrics(now, m, in_flight);
            }
            None => {
                self.ctl.on_no_metrics(now, in_flight);
            }
        }
        (before, self.ctl.window())
    }

    /// The reading under way is over.
    pub(crate) fn polled(&mut self) {
        self.polling = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            factor: 2.0,
            jitter: 0.0,
        }
    }

    #[test]
    fn a_thermal_cap_bounds_the_window_until_it_is_lifted() {
        let now = Instant::now();
        let mut p = Pacer::new(WindowMode::Fixed(16), true, now);
        assert_eq!(p.thermal(Some(0.5)), Some(Some(8)));
        assert_eq!(p.window(), 8);
        assert_eq!(p.thermal(Some(0.5)), None, "no change, no news");
        assert_eq!(p.thermal(Some(0.01)), Some(Some(1)), "never below one");
        assert_eq!(p.thermal(None), Some(None));
        assert_eq!(p.window(), 16);
    }

    #[test]
    fn an_overload_halves_the_window_and_pauses_longer_each_time() {
        let now = Instant::now();
        let b = backoff();
        let mut p = Pacer::new(WindowMode::Fixed(16), true, now);
        let first = p.overloaded(now, None, &b);
        assert_eq!((first.before, first.after), (16, 8));
        assert_eq!(first.pause, Duration::from_secs(1));
        assert!(first.news);
        assert!(p.paused(now));
        assert!(!p.paused(now + first.pause));
        let second = p.overloaded(now, None, &b);
        assert_eq!(second.pause, Duration::from_secs(2));
        let told = p.overloaded(now, Some(Duration::from_millis(300)), &b);
        assert_eq!(
            told.pause,
            Duration::from_millis(300),
            "the server's word wins"
        );
        p.fresh_server();
        assert!(!p.paused(now));
    }

    #[test]
    fn a_narrowed_fixed_window_widens_after_a_window_of_successes() {
        let now = Instant::now();
        let mut p = Pacer::new(WindowMode::Fixed(4), true, now);
        p.overloaded(now, None, &backoff());
        assert_eq!(p.window(), 2);
        let ms = Duration::from_millis(10);
        assert_eq!(p.succeeded(now, ms), None);
        assert_eq!(p.succeeded(now, ms), Some(3));
        for _ in 0..2 {
            assert_eq!(p.succeeded(now, ms), None);
        }
        assert_eq!(p.succeeded(now, ms), Some(4));
    }

    #[test]
    fn a_vanished_server_steps_the_backoff_once_per_episode() {
        let now = Instant::now();
        let b = backoff();
        let mut p = Pacer::new(WindowMode::Fixed(4), true, now);
        assert_eq!(p.unavailable(now, true, &b), Duration::from_secs(1));
        assert_eq!(p.unavailable(now, false, &b), Duration::from_secs(1));
        assert_eq!(p.unavailable(now, true, &b), Duration::from_secs(2));
    }

    #[test]
    fn one_metrics_reading_at_a_time_and_none_while_draining() {
        let mut p = Pacer::new(WindowMode::Fixed(4), true, Instant::now());
        assert!(!p.start_poll(true));
        assert!(p.start_poll(false));
        assert!(!p.start_poll(false));
        p.polled();
        assert!(p.start_poll(false));
    }
}
