//! `FakeEngine`: a model server whose latency and `/metrics` follow a small
//! engine model, so that the adaptive window can be tested at message level
//! under paused time. At most `max_seqs` requests run; the rest wait in
//! order. A running batch of `n` steps in `step + per_seq × n`; each request
//! generates `out_tokens`. Past `kv_seqs` running, each admission is a
//! preemption, and the request takes half again as long (its work is done
//! again). Its metrics are what vLLM would report for that, with optional
//! noise on the generation counter.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::inference::{InferenceClient, InferenceError, InferenceOutput, ProbeError};
use crate::job::Job;
use crate::window::EngineMetrics;

/// The engine's shape.
#[derive(Clone, Copy, Debug)]
pub struct FakeEngineShape {
    /// Requests running at most.
    pub max_seqs: usize,
    /// Requests whose KV fits; more are preempted.
    pub kv_seqs: usize,
    /// Fixed part of a step.
    pub step: Duration,
    /// Per running request, per step.
    pub per_seq: Duration,
    /// Tokens each request generates.
    pub out_tokens: u32,
    /// Relative noise on each reading's generated tokens (0.1: ±10 %).
    pub noise: f64,
    /// Whether it has `/metrics` at all.
    pub metrics: bool,
}

impl Default for FakeEngineShape {
    fn default() -> Self {
        FakeEngineShape {
            max_seqs: 256,
            kv_seqs: 100_000,
            step: Duration::from_micros(6_500),
            per_seq: Duration::from_micros(50),
            out_tokens: 128,
            noise: 0.0,
            metrics: true,
        }
    }
}

struct State {
    shape: FakeEngineShape,
    running: usize,
    queue: VecDeque<oneshot::Sender<()>>,
    /// Generated tokens so far (exact), and as reported (with noise).
    generated: f64,
    reported: f64,
    reported_at: f64,
    last: Instant,
    preemptions: f64,
    queue_time: (f64, f64),
    e2e: (f64, f64),
    rng: rand::rngs::StdRng,
}

impl State {
    fn rate(&self) -> f64 {
        let n = self.running as f64;
        let s = &self.shape;
        n.min(s.kv_seqs as f64) / (s.step.as_secs_f64() + s.per_seq.as_secs_f64() * n)
    }

    fn integrate(&mut self) {
        let now = Instant::now();
        self.generated += self.rate() * now.duration_since(self.last).as_secs_f64();
        self.last = now;
    }
}

/// The fake server.
#[derive(Clone)]
pub struct FakeEngine {
    state: Arc<Mutex<State>>,
}

impl FakeEngine {
    /// An engine of `shape`; `seed` makes its noise repeatable.
    pub fn new(shape: FakeEngineShape, seed: u64) -> Self {
        FakeEngine {
            state: Arc::new(Mutex::new(State {
                shape,
                running: 0,
                queue: VecDeque::new(),
                generated: 0.0,
                reported: 0.0,
                reported_at: 0.0,
                last: Instant::now(),
                preemptions: 0.0,
                queue_time: (0.0, 0.0),
                e2e: (0.0, 0.0),
                rng: rand::rngs::StdRng::seed_from_u64(seed),
            })),
        }
    }

    /// Changes its shape from now on (a smaller KV cache, fewer slots).
    pub fn reshape(&self, f: impl FnOnce(&mut FakeEngineShape)) {
        let mut s = self.state.lock().unwrap();
        s.integrate();
        f(&mut s.shape);
    }

    /// Preemptions so far.
    pub fn preemptions(&self) -> f64 {
        self.state.lock().unwrap().preemptions
    }

    /// Requests running, and waiting.
    pub fn load(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.running, s.queue.len())
    }
}

#[async_trait]
impl InferenceClient for FakeEngine {
    async fn infer(&self, job: &Job) -> Result<InferenceOutput, InferenceError> {
        let arrived = Instant::now();
        let admitted = {
            let mut s = self.state.lock().unwrap();
            if s.running < s.shape.max_seqs {
                s.integrate();
                s.running += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                s.queue.push_back(tx);
                Some(rx)
            }
        };
        if let Some(rx) = admitted {
            let _ = rx.await;
        }
        let start = Instant::now();
        let service = {
            let mut s = self.state.lock().unwrap();
            let step = s.shape.step + s.shape.per_seq * s.running as u32;
            let mut service = step * s.shape.out_tokens;
            if s.running > s.shape.kv_seqs {
                s.preemptions += 1.0;
                service += service / 2;
            }
            service
        };
        tokio::time::sleep(service).await;
        let now = Instant::now();
        {
            let mut s = self.state.lock().unwrap();
            s.integrate();
            s.running -= 1;
            s.queue_time.0 += start.duration_since(arrived).as_secs_f64();
            s.queue_time.1 += 1.0;
            s.e2e.0 += now.duration_since(arrived).as_secs_f64();
            s.e2e.1 += 1.0;
            while s.running < s.shape.max_seqs {
                let Some(next) = s.queue.pop_front() else {
                    break;
                };
                if next.send(()).is_ok() {
                    s.running += 1;
                }
            }
        }
        let content = format!("echo {}", job.id);
        Ok(InferenceOutput {
            response: crate::inference::RawResponse::from_value(
                &serde_json::json!({"choices": [{"message": {"content": content}}]}),
            ),
            content,
            prompt_tokens: Some(100),
            completion_tokens: Some(self.state.lock().unwrap().shape.out_tokens as u64),
            latency: now.duration_since(arrived),
        })
    }

    async fn probe(&self, _deep: bool) -> Result<(), ProbeError> {
        Ok(())
    }

    async fn engine_metrics(&self) -> Result<Option<EngineMetrics>, InferenceError> {
        let mut s = self.state.lock().unwrap();
        if !s.shape.metrics {
            return Ok(None);
        }
        s.integrate();
        let step = s.generated - s.reported_at;
        let noise = if s.shape.noise > 0.0 {
            let n = s.shape.noise;
            1.0 + s.rng.random_range(-n..n)
        } else {
            1.0
        };
        s.reported += step * noise;
        s.reported_at = s.generated;
        Ok(Some(EngineMetrics {
            running: s.running as f64,
            waiting: s.queue.len() as f64,
            kv_usage: (s.running as f64 / s.shape.kv_seqs as f64).min(1.0),
            preemptions_total: s.preemptions,
            generation_tokens_total: s.reported,
            queue_time: Some(s.queue_time),
            e2e: Some(s.e2e),
            ..EngineMetrics::default()
        }))
    }
}
