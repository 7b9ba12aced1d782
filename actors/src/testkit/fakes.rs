//! In-memory fakes of the `InferenceClient` and `ResultStore` ports, and a
//! recording stand-in actor.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ractor::{Actor, ActorProcessingErr, ActorRef, Message};
use tokio::sync::{mpsc, Semaphore};

use crate::inference::{InferenceClient, InferenceError, InferenceOutput, ProbeError};
use crate::job::{Job, JobId};
use crate::results::{ResultRef, ResultStore};

/// A scripted model server.
///
/// By default every request succeeds after `latency` (tokio time, so tests
/// can pause it) with the content `"echo <job id>"`. Outcomes queued with
/// [`FakeInference::script`] are used first, in order. With
/// [`FakeInference::gated`], each request waits for a permit that the test
/// hands out with [`FakeInference::release`].
///
/// It also plays vLLM's sleep mode: `sleep` aborts what is in flight (those
/// requests answer [`InferenceError::Aborted`]) unless
/// [`FakeInference::sleep_waits`], takes `sleep_time`, and leaves the model
/// asleep (requests and canaries 503) until `wake_up` (`wake_time`,
/// tokio time). Sleep-mode calls and deep probes are logged in order
/// ([`FakeInference::events`]).
#[derive(Clone)]
pub struct FakeInference {
    inner: Arc<FakeInner>,
}

struct FakeInner {
    latency: Mutex<Duration>,
    script: Mutex<VecDeque<Result<String, InferenceError>>>,
    gate: Option<Semaphore>,
    received: Mutex<Vec<JobId>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    probe: Mutex<Result<(), ProbeError>>,
    deep_probes: AtomicUsize,
    sleep: Mutex<FakeSleep>,
    aborts: tokio::sync::watch::Sender<u64>,
    /// The server's process is gone (killed): nothing listens.
    gone: tokio::sync::watch::Sender<bool>,
    events: Mutex<Vec<(tokio::time::Instant, String)>>,
}

/// The fake's sleep mode.
#[derive(Default)]
struct FakeSleep {
    asleep: bool,
    waits: bool,
    sleep_time: Duration,
    wake_time: Duration,
    on_sleep: Option<Arc<dyn Fn(u8) + Send + Sync>>,
}

impl Default for FakeInference {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeInference {
    fn build(gate: Option<Semaphore>) -> Self {
        FakeInference {
            inner: Arc::new(FakeInner {
                latency: Mutex::new(Duration::ZERO),
                script: Mutex::new(VecDeque::new()),
                gate,
                received: Mutex::new(Vec::new()),
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                probe: Mutex::new(Ok(())),
                deep_probes: AtomicUsize::new(0),
                sleep: Mutex::new(FakeSleep::default()),
                aborts: tokio::sync::watch::channel(0).0,
                gone: tokio::sync::watch::channel(false).0,
                events: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A healthy server that answers at once.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A server whose requests each wait for a permit from `release`.
    pub fn gated() -> Self {
        Self::build(Some(Semaphore::new(0)))
    }

    /// Sets the latency of every request.
    pub fn with_latency(self, latency: Duration) -> Self {
        *self.inner.latency.lock().unwrap() = latency;
        self
    }

    /// Queues outcomes for the next requests: `Ok(content)` or an error.
    pub fn script(&self, outcomes: impl IntoIterator<Item = Result<String, InferenceError>>) {
        self.inner.script.lock().unwrap().extend(outcomes);
    }

    /// Lets `n` gated requests finish.
    pub fn release(&self, n: usize) {
        if let Some(g) = &self.inner.gate {
            g.add_permits(n);
        }
    }

    /// Plays a server killed without an exit its runtime could see (an
    /// adopted process's `kill -9`): requests in flight and new ones end
    /// "connection refused", probes find nothing listening, until
    /// `gone(false)`.
    pub fn gone(&self, gone: bool) {
        self.inner.gone.send_replace(gone);
    }

    /// Makes health checks pass or fail.
    pub fn set_healthy(&self, healthy: bool) {
        self.set_probe(if healthy {
            Ok(())
        } else {
            Err(ProbeError::Broken("fake server marked unhealthy".into()))
        });
    }

    /// What the next probes find.
    pub fn set_probe(&self, outcome: Result<(), ProbeError>) {
        *self.inner.probe.lock().unwrap() = outcome;
    }

    /// Deep probes (with a canary completion) made so far.
    pub fn deep_probes(&self) -> usize {
        self.inner.deep_probes.load(Ordering::SeqCst)
    }

    /// The jobs received, in arrival order.
    pub fn received(&self) -> Vec<JobId> {
        self.inner.received.lock().unwrap().clone()
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests ever served at once.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    /// How long a sleep and a wake take (tokio time).
    pub fn sleep_timings(&self, sleep: Duration, wake: Duration) {
        let mut s = self.inner.sleep.lock().unwrap();
        s.sleep_time = sleep;
        s.wake_time = wake;
    }

    /// A sleep lets requests in flight finish instead of aborting them.
    pub fn sleep_waits(&self) {
        self.inner.sleep.lock().unwrap().waits = true;
    }

    /// Runs `f(level)` at each sleep (a fake GPU's memory falling, say).
    pub fn on_sleep(&self, f: impl Fn(u8) + Send + Sync + 'static) {
        self.inner.sleep.lock().unwrap().on_sleep = Some(Arc::new(f));
    }

    /// Whether the model is asleep.
    pub fn is_asleep(&self) -> bool {
        self.inner.sleep.lock().unwrap().asleep
    }

    /// Sleep-mode calls and deep probes, in order: `sleep 1 (2 in flight)`,
    /// `wake_up`, `wake_up weights`, `reload_weights`, `canary`.
    pub fn events(&self) -> Vec<String> {
        self.timed_events().into_iter().map(|(_, e)| e).collect()
    }

    /// `events`, each with when it began (tokio time).
    pub fn timed_events(&self) -> Vec<(tokio::time::Instant, String)> {
        self.inner.events.lock().unwrap().clone()
    }

    fn log(&self, event: String) {
        let now = tokio::time::Instant::now();
        self.inner.events.lock().unwrap().push((now, event));
    }
}

struct InFlightGuard<'a>(&'a AtomicUsize);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl InferenceClient for FakeInference {
    async fn infer(&self, job: &Job) -> Result<InferenceOutput, InferenceError> {
        let inner = &self.inner;
        if inner.sleep.lock().unwrap().asleep {
            return Err(InferenceError::Overloaded {
                message: "HTTP 503: the engine is asleep".into(),
                retry_after: None,
            });
        }
        let refused =
            || InferenceError::Unavailable("connection refused (the server is gone)".into());
        let mut gone = inner.gone.subscribe();
        if *gone.borrow() {
            return Err(refused());
        }
        inner.received.lock().unwrap().push(job.id);
        let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _guard = InFlightGuard(&inner.in_flight);
        let latency = *inner.latency.lock().unwrap();
        let mut aborted = inner.aborts.subscribe();
        let work = async {
            if let Some(g) = &inner.gate {
                g.acquire().await.expect("gate open").forget();
            }
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
        };
        tokio::select! {
            () = work => {}
            Ok(()) = aborted.changed() => {
                return Err(InferenceError::Aborted(
                    "the server aborted the request (finish_reason \"abort\")".into(),
                ));
            }
            Ok(_) = gone.wait_for(|g| *g) => return Err(refused()),
        }
        let scripted = inner.script.lock().unwrap().pop_front();
        let content = match scripted {
            Some(Err(e)) => return Err(e),
            Some(Ok(content)) => content,
            None => format!("echo {}", job.id),
        };
        Ok(InferenceOutput {
            response: crate::inference::RawResponse::from_value(
                &serde_json::json!({"choices": [{"message": {"content": content}}]}),
            ),
            content,
            prompt_tokens: Some(3),
            completion_tokens: Some(5),
            latency,
        })
    }

    async fn probe(&self, deep: bool) -> Result<(), ProbeError> {
        if deep {
            self.inner.deep_probes.fetch_add(1, Ordering::SeqCst);
            self.log("canary".into());
        }
        if *self.inner.gone.borrow() {
            return Err(ProbeError::NotListening("the server is gone".into()));
        }
        // As vLLM: /health and /v1/models answer while the model sleeps;
        // only a completion (the canary) is refused.
        if deep && self.is_asleep() {
            return Err(ProbeError::Loading("the model is asleep".into()));
        }
        self.inner.probe.lock().unwrap().clone()
    }

    async fn sleep(&self, level: u8) -> Result<(), String> {
        let (waits, time, hook) = {
            let s = self.inner.sleep.lock().unwrap();
            (s.waits, s.sleep_time, s.on_sleep.clone())
        };
        self.log(format!("sleep {level} ({} in flight)", self.in_flight()));
        if waits {
            while self.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } else {
            self.inner.aborts.send_modify(|n| *n += 1);
        }
        tokio::time::sleep(time).await;
        self.inner.sleep.lock().unwrap().asleep = true;
        if let Some(f) = hook {
            f(level);
        }
        Ok(())
    }

    async fn wake_up(&self, tags: Option<&str>) -> Result<(), String> {
        self.log(match tags {
            Some(t) => format!("wake_up {t}"),
            None => "wake_up".into(),
        });
        let time = self.inner.sleep.lock().unwrap().wake_time;
        if tags != Some("kv_cache") {
            tokio::time::sleep(time).await;
        }
        if tags != Some("weights") {
            self.inner.sleep.lock().unwrap().asleep = false;
        }
        Ok(())
    }

    async fn reload_weights(&self) -> Result<(), String> {
        self.log("reload_weights".into());
        Ok(())
    }

    async fn is_sleeping(&self) -> Result<bool, String> {
        Ok(self.is_asleep())
    }
}

/// Result documents kept in memory, at paths `/results/<id>.json`.
#[derive(Clone, Default)]
pub struct MemoryResults {
    docs: Arc<Mutex<HashMap<ResultRef, Vec<u8>>>>,
    writes: Arc<AtomicUsize>,
}

impl MemoryResults {
    /// An empty result store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The document at `path`, parsed.
    pub fn doc(&self, at: &ResultRef) -> Option<serde_json::Value> {
        let docs = self.docs.lock().unwrap();
        docs.get(at)
            .map(|b| serde_json::from_slice(b).expect("JSON result"))
    }

    /// How many writes happened (rewrites included).
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl ResultStore for MemoryResults {
    async fn write(&self, id: JobId, doc: Vec<u8>) -> std::io::Result<ResultRef> {
        let at = ResultRef::file(Path::new(&format!("/results/{id}.json")));
        self.docs.lock().unwrap().insert(at.clone(), doc);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(at)
    }

    async fn read(&self, at: &ResultRef) -> std::io::Result<Vec<u8>> {
        self.docs
            .lock()
            .unwrap()
            .get(at)
            .cloned()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such result"))
    }
}

/// A stand-in peer: an actor that records every message it receives.
pub struct Recorder<M>(std::marker::PhantomData<fn() -> M>);

impl<M: Message> Recorder<M> {
    /// Spawns a recorder; the receiver yields what it got.
    pub async fn spawn() -> (ActorRef<M>, mpsc::UnboundedReceiver<M>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(None, Recorder::<M>(std::marker::PhantomData), tx)
            .await
            .expect("recorder starts");
        (actor, rx)
    }
}

impl<M: Message> Actor for Recorder<M> {
    type Msg = M;
    type State = mpsc::UnboundedSender<M>;
    type Arguments = mpsc::UnboundedSender<M>;

    async fn pre_start(
        &self,
        _myself: ActorRef<M>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _myself: ActorRef<M>,
        msg: M,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = tx.send(msg);
        Ok(())
    }
}

/// Waits (in tokio time, which tests usually pause) until `cond` holds;
/// panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Submits `jobs` through the running pipeline's QueueActor (as the CLI's
/// in-process callers do); their ids, in order.
pub async fn submit(
    feeder: &ActorRef<crate::supervisor::FeederMsg>,
    jobs: Vec<crate::job::NewJob>,
) -> Vec<JobId> {
    match crate::handle::FeederHandle::new(feeder.clone())
        .submit(jobs)
        .await
    {
        Ok(s) => s.into_iter().map(|s| s.id).collect(),
        Err(e) => panic!("submit failed: {e}"),
    }
}
