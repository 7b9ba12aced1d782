//! The engine model served: one task runs [`Engine`] steps back to back
//! while there is work, keeping engine time in step with the wall clock
//! (`--time-scale` times faster), and hands each finished request its
//! answer. Also the text of `/metrics` in engine mode, with vLLM's names.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::engine::{Engine, EngineConfig, EngineRequest, Finished, Histogram, Rejected};
use super::prompt::Prompts;
use super::{SchedulingPolicy, SimConfig};

/// The engine and the requests waiting for it.
pub struct Served {
    engine: Mutex<Engine>,
    waiters: Mutex<HashMap<u64, oneshot::Sender<Finished>>>,
    work: Notify,
    /// Wall time at engine time 0.
    t0: Instant,
    scale: f64,
    image_tokens: u32,
    prompts: Arc<Prompts>,
    /// Requests whose text contains this are watched (benchmarks).
    needle: Mutex<Option<String>>,
    /// Watched requests: engine time of arrival and of the first token.
    watched: Mutex<HashMap<u64, (f64, Option<f64>)>>,
    /// Streamed requests, told when their first token is made.
    first_token: Mutex<HashMap<u64, oneshot::Sender<()>>>,
}

/// Why the engine did not run a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `--max-num-queued-reqs` are waiting already.
    QueueFull,
    /// A sleep aborted it.
    Aborted,
    /// It could not fit in the KV cache even alone (answer 400).
    TooLong {
        /// Its prompt and `max_tokens`.
        tokens: u64,
        /// What the KV cache holds.
        capacity: u64,
    },
}

/// Engine-side figures, for benchmarks.
#[derive(Clone, Debug)]
pub struct EngineView {
    /// Engine time now, seconds.
    pub now: f64,
    /// Requests waiting inside the engine.
    pub waiting: usize,
    /// Requests running.
    pub running: usize,
    /// Counters and histograms.
    pub stats: super::engine::EngineStats,
}

impl Served {
    /// The engine `cfg` asks for, if it asks for one, with its driving task
    /// started on the current runtime (abort it to stop the engine);
    /// `prompts` counts the requests' tokens.
    pub fn start(
        cfg: &SimConfig,
        prompts: Arc<Prompts>,
    ) -> Option<(Arc<Served>, tokio::task::JoinHandle<()>)> {
        let kv = cfg.engine_kv_tokens()?;
        let engine = Engine::new(EngineConfig {
            kv_cache_tokens: kv,
            block_size: cfg.block_size.max(1),
            max_num_seqs: cfg.max_num_seqs.max(1),
            max_num_batched_tokens: cfg.max_num_batched_tokens.max(1),
            step_ms: cfg.step_ms.max(0.0),
            step_ms_per_seq: cfg.step_ms_per_seq.max(0.0),
            prefill_ms_per_1k: cfg.prefill_ms_per_1k.max(0.0),
            step_ms_per_1k_context: cfg.step_ms_per_1k_context.max(0.0),
            prefix_caching: !cfg.no_prefix_caching,
            max_num_queued_reqs: cfg.max_num_queued_reqs,
            priority_policy: cfg.scheduling_policy == SchedulingPolicy::Priority,
        });
        let served = Arc::new(Served {
            engine: Mutex::new(engine),
            waiters: Mutex::new(HashMap::new()),
            work: Notify::new(),
            t0: Instant::now(),
            scale: if cfg.time_scale > 0.0 {
                cfg.time_scale
            } else {
                1.0
            },
            image_tokens: cfg.image_tokens,
            prompts,
            needle: Mutex::new(None),
            watched: Mutex::new(HashMap::new()),
            first_token: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(drive(served.clone()));
        Some((served, task))
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Engine time that corresponds to the wall clock now.
    fn engine_now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * self.scale
    }

    /// Watches requests whose text contains `needle` from now on.
    pub fn watch(&self, needle: &str) {
        *self.needle.lock().unwrap_or_else(|e| e.into_inner()) = Some(needle.to_string());
    }

    /// Watched requests: (arrival, first token), engine seconds.
    pub fn watched(&self) -> Vec<(f64, Option<f64>)> {
        let w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        w.values().copied().collect()
    }

    /// The engine's figures now.
    pub fn view(&self) -> EngineView {
        let e = self.engine();
        EngineView {
            now: e.now().max(self.engine_now()),
            waiting: e.waiting(),
            running: e.running(),
            stats: e.stats().clone(),
        }
    }

    /// Runs `messages` through the engine; refused when its queue is full
    /// (`--max-num-queued-reqs`: answer 503), when it could never fit in
    /// the KV cache, or when a sleep aborts it. `first_token` is told when
    /// the request's first token is made (at the end of its step, on the
    /// wall clock), for a streamed answer.
    pub async fn run(
        &self,
        id: u64,
        messages: &[Value],
        max_tokens: u32,
        priority: i64,
        first_token: Option<oneshot::Sender<()>>,
    ) -> Result<Finished, Refused> {
        let prompt = self.prompts.tokens(messages, self.image_tokens);
        if let Some(first) = first_token {
            self.first_token
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, first);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let watch = self
            .needle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|n| serde_json::to_string(messages).is_ok_and(|t| t.contains(n.as_str())));
        let added = {
            let mut e = self.engine();
            let now = self.engine_now();
            if !e.busy() {
                // An idle engine's clock follows the wall clock.
                e.advance_to(now);
            }
            // A busy engine's clock is at the end of the step under way:
            // the request came in during it.
            let arrived = now.min(e.now());
            if watch {
                self.watched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, (arrived, None));
            }
            let req = EngineRequest {
                id,
                prompt,
                max_tokens: max_tokens.max(1),
                priority,
            };
            e.add_at(req, arrived)
        };
        if let Err((_, why)) = added {
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            self.forget_first_token(id);
            return Err(match why {
                Rejected::QueueFull => Refused::QueueFull,
                Rejected::TooLong { tokens, capacity } => Refused::TooLong { tokens, capacity },
            });
        }
        self.work.notify_one();
        // A client that goes away aborts its request, as vLLM does.
        let mut gone = ClientGone {
            served: self,
            id,
            armed: true,
        };
        let done = rx.await.map_err(|_| Refused::Aborted);
        gone.armed = false;
        self.forget_first_token(id);
        done
    }

    fn forget_first_token(&self, id: u64) {
        self.first_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Drops every request (each is answered `abort`) and the KV cache:
    /// the engine side of a sleep.
    pub fn discard(&self) -> usize {
        let ids = self.engine().discard();
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for id in &ids {
            waiters.remove(id);
        }
        ids.len()
    }

    /// Forgets the prefix cache (`POST /reset_prefix_cache`); `false`
    /// while requests hold KV blocks, as vLLM answers then.
    pub fn reset_prefix_cache(&self) -> bool {
        self.engine().reset_prefix_cache()
    }

    /// `/metrics` in engine mode.
    pub fn metrics(&self, model: &str, gpu_memory_utilization: f64) -> String {
        let e = self.engine();
        let st = e.stats();
        let l = format!("model_name=\"{model}\"");
        let mut out = String::new();
        // vLLM's name, help, type and value of each plain series.
        let series = [
            (
                "num_requests_running",
                "Number of requests in model execution batches.",
                "gauge",
                e.running().to_string(),
            ),
            (
                "num_requests_waiting",
                "Number of requests waiting to be processed.",
                "gauge",
                e.waiting().to_string(),
            ),
            (
                "kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                "gauge",
                format!("{:.6}", e.kv_usage()),
            ),
            (
                "num_preemptions_total",
                "Cumulative number of preemption from the engine.",
                "counter",
                st.preemptions.to_string(),
            ),
            (
                "prompt_tokens_total",
                "Number of prefill tokens processed.",
                "counter",
                st.prompt_tokens.to_string(),
            ),
            (
                "generation_tokens_total",
                "Number of generation tokens processed.",
                "counter",
                st.generation_tokens.to_string(),
            ),
            (
                "prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                "counter",
                st.prefix_queries.to_string(),
            ),
            (
                "prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                "counter",
                st.prefix_hits.to_string(),
            ),
        ];
        for (name, help, kind, value) in series {
            let _ = writeln!(out, "# HELP vllm:{name} {help}");
            let _ = writeln!(out, "# TYPE vllm:{name} {kind}");
            let _ = writeln!(out, "vllm:{name}{{{l}}} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP vllm:request_success_total Count of successfully processed requests.\n\
             # TYPE vllm:request_success_total counter\n\
             vllm:request_success_total{{{l},finished_reason=\"length\"}} {}",
            st.successes
        );
        histogram(
            &mut out,
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &l,
            &st.ttft,
        );
        histogram(
            &mut out,
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &l,
            &st.e2e,
        );
        histogram(
            &mut out,
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &l,
            &st.queue_time,
        );
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig.\n\
             # TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{{l},gpu_memory_utilization=\"{gpu_memory_utilization}\",block_size=\"{}\",num_gpu_blocks=\"{}\"}} 1",
            e.config().block_size,
            e.num_blocks(),
        );
        out
    }
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP vllm:{name} {help}");
    let _ = writeln!(out, "# TYPE vllm:{name} histogram");
    let mut cumulative = 0;
    for (bound, n) in h.bounds.iter().zip(&h.counts) {
        cumulative += n;
        let _ = writeln!(
            out,
            "vllm:{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "vllm:{name}_bucket{{{labels},le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(out, "vllm:{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "vllm:{name}_count{{{labels}}} {}", h.count);
}

/// Aborts its request in the engine if dropped before the answer came:
/// the client went away (vLLM aborts such a request; what it computed
/// stays in the prefix cache).
struct ClientGone<'a> {
    served: &'a Served,
    id: u64,
    armed: bool,
}

impl Drop for ClientGone<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.served
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.id);
            self.served.forget_first_token(self.id);
            self.served.engine().abort(self.id);
        }
    }
}

/// Steps the engine while it has work; sleeps until the wall clock has
/// caught up with a step's end before answering the requests it finished.
async fn drive(served: Arc<Served>) {
    loop {
        let step = served.engine().step();
        let Some(step) = step else {
            served.work.notified().await;
            continue;
        };
        let end = served.engine().now();
        if !step.first_tokens.is_empty() {
            let mut w = served.watched.lock().unwrap_or_else(|e| e.into_inner());
            for id in &step.first_tokens {
                if let Some(entry) = w.get_mut(id) {
                    entry.1 = Some(end);
                }
            }
        }
        let due = served.t0 + Duration::from_secs_f64(end / served.scale);
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        if !step.first_tokens.is_empty() {
            let mut first = served.first_token.lock().unwrap_or_else(|e| e.into_inner());
            for id in &step.first_tokens {
                if let Some(tx) = first.remove(id) {
                    let _ = tx.send(());
                }
            }
        }
        if !step.finished.is_empty() {
            let mut waiters = served.waiters.lock().unwrap_or_else(|e| e.into_inner());
            for f in step.finished {
                if let Some(tx) = waiters.remove(&f.id) {
                    let _ = tx.send(f);
                }
            }
        }
    }
}
