//! `FakeRuntime`: a scripted `ContainerRuntime` for message-level tests.
//!
//! It pretends to launch servers: each `start` makes a new id (`c1`, `c2`,
//! …) that runs until the test calls [`FakeRuntime::crash`] or the actor
//! stops it. When linked to a [`FakeInference`], it also plays the server's
//! side of the probes: not listening until launched, loading (503) for
//! `load_time`, then ready; not listening again once it exits. Every call is
//! recorded for assertions.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::inference::ProbeError;
use crate::runtime::{ContainerRuntime, Exit, Found, LaunchPlan};
use crate::testkit::FakeInference;

/// A scripted container runtime; clones share state.
#[derive(Clone, Default)]
pub struct FakeRuntime {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    server: Option<FakeInference>,
    load_time: Duration,
    found: Option<Found>,
    start_failures: VecDeque<String>,
    next: u32,
    running: HashMap<String, watch::Sender<Option<Exit>>>,
    current: Option<String>,
    calls: Vec<(tokio::time::Instant, String)>,
    plans: Vec<LaunchPlan>,
}

impl FakeRuntime {
    /// A runtime whose servers answer through `server`, after loading for `load_time`.
    pub fn serving(server: FakeInference, load_time: Duration) -> Self {
        server.set_probe(Err(ProbeError::NotListening("nothing launched yet".into())));
        let rt = FakeRuntime::default();
        {
            let mut i = rt.inner.lock().unwrap();
            i.server = Some(server);
            i.load_time = load_time;
        }
        rt
    }

    /// `find` reports this server, left by an "earlier run"; if it is
    /// running, it can be adopted or crashed like a launched one.
    pub fn leave_behind(&self, found: Found) {
        let mut i = self.inner.lock().unwrap();
        if found.running {
            let (tx, _) = watch::channel(None);
            i.running.insert(found.id.clone(), tx);
            i.current = Some(found.id.clone());
            if let Some(s) = &i.server {
                s.set_probe(Ok(()));
            }
        }
        i.found = Some(found);
    }

    /// The next `start` fails with `error`.
    pub fn fail_next_start(&self, error: impl Into<String>) {
        self.inner
            .lock()
            .unwrap()
            .start_failures
            .push_back(error.into());
    }

    /// The running server exits with `code`, as a crash or `docker kill` would.
    pub fn crash(&self, code: i64) {
        let mut i = self.inner.lock().unwrap();
        let Some(id) = i.current.take() else {
            panic!("crash(): no server is running");
        };
        push(&mut i.calls, format!("crash {id}"));
        if let Some(s) = &i.server {
            s.set_probe(Err(ProbeError::NotListening("connection refused".into())));
        }
        if let Some(tx) = i.running.remove(&id) {
            tx.send_replace(Some(Exit {
                code: Some(code),
                detail: format!("exited with code {code}"),
            }));
        }
    }

    /// The running server's id.
    pub fn current(&self) -> Option<String> {
        self.inner.lock().unwrap().current.clone()
    }

    /// Every call so far: `find`, `start c2`, `stop c1`, `crash c1`.
    pub fn calls(&self) -> Vec<String> {
        self.timed_calls().into_iter().map(|(_, c)| c).collect()
    }

    /// Every call so far, with the (tokio) time it was made.
    pub fn timed_calls(&self) -> Vec<(tokio::time::Instant, String)> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// Whole seconds between each crash and the launch that followed it.
    pub fn restart_delays_s(&self) -> Vec<u64> {
        let calls: Vec<_> = self
            .timed_calls()
            .into_iter()
            .filter(|(_, c)| c != "find")
            .collect();
        calls
            .windows(2)
            .filter(|w| w[0].1.starts_with("crash") && w[1].1.starts_with("start"))
            .map(|w| (w[1].0 - w[0].0).as_secs())
            .collect()
    }

    /// How many servers were launched.
    pub fn starts(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.starts_with("start"))
            .count()
    }

    /// The plans of every launch, in order.
    pub fn plans(&self) -> Vec<LaunchPlan> {
        self.inner.lock().unwrap().plans.clone()
    }
}

fn push(calls: &mut Vec<(tokio::time::Instant, String)>, call: String) {
    calls.push((tokio::time::Instant::now(), call));
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    fn backend(&self) -> &'static str {
        "fake"
    }

    fn config_hash(&self, plan: &LaunchPlan) -> String {
        format!("mem={}", plan.gpu_memory_utilization)
    }

    async fn find(&self) -> Result<Option<Found>, String> {
        let mut i = self.inner.lock().unwrap();
        push(&mut i.calls, "find".into());
        let found = i.found.take();
        Ok(found.map(|mut f| {
            f.running = i.running.contains_key(&f.id);
            f
        }))
    }

    async fn start(&self, plan: &LaunchPlan) -> Result<String, String> {
        let (server, load, generation_id) = {
            let mut i = self.inner.lock().unwrap();
            if let Some(e) = i.start_failures.pop_front() {
                push(&mut i.calls, format!("start failed: {e}"));
                return Err(e);
            }
            i.next += 1;
            let id = format!("c{}", i.next);
            push(&mut i.calls, format!("start {id}"));
            i.plans.push(plan.clone());
            let (tx, _) = watch::channel(None);
            i.running.insert(id.clone(), tx);
            i.current = Some(id.clone());
            (i.server.clone(), i.load_time, id)
        };
        if let Some(server) = server {
            server.set_probe(Err(ProbeError::Loading("503: the model is loading".into())));
            let me = self.clone();
            let id = generation_id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(load).await;
                if me.current().as_deref() == Some(id.as_str()) {
                    server.set_probe(Ok(()));
                }
            });
        }
        Ok(generation_id)
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), String> {
        let mut i = self.inner.lock().unwrap();
        push(&mut i.calls, format!("stop {id}"));
        if i.current.as_deref() == Some(id) {
            i.current = None;
            if let Some(s) = &i.server {
                s.set_probe(Err(ProbeError::NotListening("connection refused".into())));
            }
        }
        if let Some(tx) = i.running.remove(id) {
            tx.send_replace(Some(Exit {
                code: Some(0),
                detail: "stopped".into(),
            }));
        }
        Ok(())
    }

    async fn wait_exit(&self, id: &str) -> Exit {
        let rx = self
            .inner
            .lock()
            .unwrap()
            .running
            .get(id)
            .map(|tx| tx.subscribe());
        let Some(mut rx) = rx else {
            return Exit {
                code: None,
                detail: "is gone".into(),
            };
        };
        loop {
            if let Some(exit) = rx.borrow().clone() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return Exit {
                    code: None,
                    detail: "is gone".into(),
                };
            }
        }
    }

    async fn logs(&self, id: &str, _lines: usize) -> String {
        format!("last words of {id}")
    }
}
