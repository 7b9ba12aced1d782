//! The auto window's preemption back-off, through the controller's public
//! API under paused time: preemptions between two readings cut the window
//! a tenth below what ran and make that a ceiling, which holds for a
//! minute however healthy the server looks meanwhile, and then lifts.
//!
//! The server fed to the controller is an engine with 512 slots whose KV
//! cache holds `KV_SEQS` requests: beyond that, what runs is preempted.

use std::time::Duration;

use feeder_actors::window::{EngineMetrics, WindowController, WindowMode};
use tokio::time::Instant;

/// Requests the KV cache holds at once.
const KV_SEQS: f64 = 100.0;
/// How often the dispatcher reads the server's metrics.
const EVERY: Duration = Duration::from_millis(250);

/// An engine that runs whatever it is sent, one step of 6.5 ms + 0.05 ms
/// per request generating one token per request; past `KV_SEQS` it
/// preempts what does not fit (once per reading), and only `KV_SEQS` run.
struct Engine {
    generated: f64,
    preempted: f64,
    /// Preemptions are reported (else the cache is taken to be endless).
    preempts: bool,
}

impl Engine {
    fn read(&mut self, window: u32, secs: f64) -> EngineMetrics {
        let sent = window as f64;
        let running = if self.preempts {
            sent.min(KV_SEQS)
        } else {
            sent
        };
        if self.preempts && sent > KV_SEQS {
            self.preempted += sent - KV_SEQS;
        }
        self.generated += running / (0.0065 + 0.00005 * running) * secs;
        EngineMetrics {
            running,
            waiting: 0.0,
            kv_usage: (running / KV_SEQS).min(1.0) * 0.5,
            preemptions_total: self.preempted,
            generation_tokens_total: self.generated,
            ..Default::default()
        }
    }
}

/// Feeds one reading `EVERY` later, with the window full of our requests,
/// each ending after half a second; returns the window after it.
async fn step(c: &mut WindowController, engine: &mut Engine) -> u32 {
    tokio::time::advance(EVERY).await;
    let w = c.window();
    let m = engine.read(w, EVERY.as_secs_f64());
    c.on_latency(Instant::now(), Duration::from_millis(500));
    c.on_metrics(Instant::now(), m, w as usize)
}

#[tokio::test(start_paused = true)]
async fn preemptions_set_a_ceiling_that_holds_for_a_minute_then_lifts() {
    let mut c = WindowController::new(WindowMode::Auto { max: 1024 }, 16, Instant::now());
    let mut engine = Engine {
        generated: 0.0,
        preempted: 0.0,
        preempts: true,
    };
    // Growth runs into the KV limit: preemptions show, and the rule fires.
    let mut fired = None;
    for _ in 0..200 {
        let before = c.window();
        step(&mut c, &mut engine).await;
        if let Some(ceiling) = c.signals().ceiling {
            fired = Some((before, ceiling, Instant::now()));
            break;
        }
    }
    let (ran, ceiling, at) = fired.expect("preemptions never set a ceiling");
    assert!(engine.preempted > 0.0, "the engine preempted");
    assert!(
        c.signals().new_preemptions > 0.0,
        "the reading that set the ceiling saw preemptions: {:?}",
        c.signals()
    );
    assert!(
        c.reason().contains("preemptions"),
        "the reason names them: {}",
        c.reason()
    );
    // A tenth below what ran (the KV limit: only that many run).
    let expected = (ran.min(KV_SEQS as u32) as f64 * 0.9).floor() as u32;
    assert_eq!(ceiling, expected, "ran {ran}: {}", c.reason());
    assert!(c.window() <= ceiling, "cut to the ceiling: {}", c.window());

    // From now on the cache is endless and the server healthy: nothing
    // but the ceiling keeps the window down. It holds for its minute.
    engine.preempts = false;
    let mut held = Vec::new();
    while at.elapsed() < Duration::from_secs(59) {
        let w = step(&mut c, &mut engine).await;
        assert_eq!(
            c.signals().ceiling,
            Some(ceiling),
            "the ceiling holds at {:.1} s",
            at.elapsed().as_secs_f64()
        );
        assert!(
            w <= ceiling,
            "window {w} above the ceiling {ceiling} at {:.1} s: {}",
            at.elapsed().as_secs_f64(),
            c.reason()
        );
        held.push(w);
    }
    assert!(held.len() >= 200, "read all along the minute");

    // Then it lifts, and the window grows past it.
    let mut lifted = false;
    while at.elapsed() < Duration::from_secs(180) {
        let w = step(&mut c, &mut engine).await;
        if at.elapsed() > Duration::from_secs(61) {
            assert_eq!(c.signals().ceiling, None, "the ceiling outlived its minute");
        }
        if w > ceiling {
            lifted = true;
            break;
        }
    }
    assert!(
        lifted,
        "the window never grew past the old ceiling {ceiling}: {} ({})",
        c.window(),
        c.reason()
    );
    assert!(
        at.elapsed() >= Duration::from_secs(60),
        "past the ceiling before its minute was up"
    );
}
