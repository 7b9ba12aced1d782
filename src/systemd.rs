//! systemd integration (`Type=notify`): `READY=1` once the store is open and
//! the actors run; `STATUS=` lines saying what is happening; `WATCHDOG=1`
//! only while the supervisor confirms that its children answer; and
//! `STOPPING=1` when a shutdown begins. Without `$NOTIFY_SOCKET` (not under
//! systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

/// Talks to systemd's notification socket.
#[derive(Clone, Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`).
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut usec = 0u64;
        let watchdog = (enabled && sd_notify::watchdog_enabled(false, &mut usec))
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Notifier { enabled, watchdog }
    }

    fn send(&self, state: &[NotifyState<'_>]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(false, state) {
                debug!("systemd notification failed: {e}");
            }
        }
    }

    /// `READY=1`.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// `STATUS=<line>`.
    pub fn status(&self, line: &str) {
        self.send(&[NotifyState::Status(line)]);
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// How often to confirm liveness: half the watchdog timeout, if there is one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Whether systemd listens.
    pub fn enabled(&self) -> bool {
        self.enabled
    }
}
