//! Prometheus metrics (`GET /metrics`), every name prefixed `gpu_feeder_`.
//!
//! Request counts, latencies and tokens are recorded as requests finish
//! (the dispatchers' observer); queue, dispatcher and instance state are
//! read fresh at each scrape.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use feeder_actors::dispatch::{DispatchObserver, RequestOutcome};
use feeder_actors::supervisor::FeederStatus;
use feeder_actors::{Completion, JobStatus, ModelType, QueueStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Instance {
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceOutcome {
    instance: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceKind {
    instance: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceState {
    instance: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Gpu {
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StrategyLabel {
    strategy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupStrategyLabel {
    group: String,
    strategy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    model_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStatus {
    model_type: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelOutcome {
    model_type: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActorLabel {
    actor: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The daemon's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<InstanceOutcome, Counter>,
    latency: Family<Instance, Histogram>,
    tokens: Family<InstanceKind, Counter>,
    jobs: Family<ModelStatus, Gauge>,
    depth: Family<Model, Gauge>,
    oldest: Family<Model, FloatGauge>,
    in_flight: Family<Instance, Gauge>,
    buffered: Family<Instance, Gauge>,
    window: Family<Instance, Gauge>,
    max_window: Family<Instance, Gauge>,
    window_auto: Family<Instance, Gauge>,
    server_running: Family<Instance, FloatGauge>,
    server_waiting: Family<Instance, FloatGauge>,
    server_kv_usage: Family<Instance, FloatGauge>,
    server_tokens_per_s: Family<Instance, FloatGauge>,
    prefix_hits: Family<Instance, FloatGauge>,
    prefix_queries: Family<Instance, FloatGauge>,
    ready: Family<Instance, Gauge>,
    state: Family<InstanceState, Gauge>,
    health_failures: Family<Instance, Gauge>,
    restarts: Family<ActorLabel, Gauge>,
    server_restarts: Family<Instance, Gauge>,
    crashed_jobs: Family<Instance, Gauge>,
    priority_holds: Family<Instance, Counter>,
    stream_first_chunk: Family<Model, Histogram>,
    streams: Family<ModelOutcome, Counter>,
    /// Each dispatcher's hold count at the last refresh: the counter grows
    /// by the difference (a restarted dispatcher counts from 0 again).
    holds_seen: Mutex<HashMap<String, u64>>,
    gpu_temp: Family<Gpu, Gauge>,
    gpu_util: Family<Gpu, Gauge>,
    gpu_mem_used: Family<Gpu, Gauge>,
    gpu_mem_total: Family<Gpu, Gauge>,
    gpu_power: Family<Gpu, FloatGauge>,
    gpu_hot: Family<Gpu, Gauge>,
    gpu_alerts: Gauge,
    gpu_available: Gauge,
    strategy: Family<StrategyLabel, Gauge>,
    group_strategy: Family<GroupStrategyLabel, Gauge>,
    strategy_switches: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("gpu_feeder");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 16))
            }),
            tokens: Family::default(),
            jobs: Family::default(),
            depth: Family::default(),
            oldest: Family::default(),
            in_flight: Family::default(),
            buffered: Family::default(),
            window: Family::default(),
            max_window: Family::default(),
            window_auto: Family::default(),
            server_running: Family::default(),
            server_waiting: Family::default(),
            server_kv_usage: Family::default(),
            server_tokens_per_s: Family::default(),
            prefix_hits: Family::default(),
            prefix_queries: Family::default(),
            ready: Family::default(),
            state: Family::default(),
            health_failures: Family::default(),
            restarts: Family::default(),
            server_restarts: Family::default(),
            crashed_jobs: Family::default(),
            priority_holds: Family::default(),
            stream_first_chunk: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 16))
            }),
            streams: Family::default(),
            holds_seen: Mutex::default(),
            gpu_temp: Family::default(),
            gpu_util: Family::default(),
            gpu_mem_used: Family::default(),
            gpu_mem_total: Family::default(),
            gpu_power: Family::default(),
            gpu_hot: Family::default(),
            gpu_alerts: Gauge::default(),
            gpu_available: Gauge::default(),
            strategy: Family::default(),
            group_strategy: Family::default(),
            strategy_switches: Gauge::default(),
        };
        // Each metric: its field, its name, and its help text.
        macro_rules! register {
            ($($field:ident: $name:literal, $help:literal;)*) => {
                $(r.register($name, $help, m.$field.clone());)*
            };
        }
        register! {
            requests: "requests", "Chat-completion requests finished, by instance and outcome (done, retryable, permanent, overloaded)";
            latency: "request_duration_seconds", "Latency of successful requests";
            tokens: "tokens", "Tokens reported by the servers, by kind (prompt, completion)";
            jobs: "jobs", "Jobs in the queue, by model and status";
            depth: "queue_depth", "Pending jobs, by model";
            oldest: "queue_oldest_pending_seconds", "Age of the oldest pending job, by model (0 when none)";
            in_flight: "in_flight", "Requests in flight, by instance";
            buffered: "buffered", "Jobs claimed and waiting for a free slot, by instance";
            window: "window", "Requests allowed in flight now (narrowed under back-pressure), by instance";
            max_window: "window_max", "Configured window, or the most an auto window may reach, by instance";
            window_auto: "window_auto", "1 when the window is found from the server's metrics (window = \"auto\")";
            server_running: "server_running", "Requests running inside the server, as its /metrics said last (auto window)";
            server_waiting: "server_waiting", "Requests waiting inside the server, as its /metrics said last (auto window)";
            server_kv_usage: "server_kv_cache_usage", "The server's KV cache usage, 0 to 1, as its /metrics said last (auto window)";
            server_tokens_per_s: "server_generation_tokens_per_second", "Tokens the server generated per second between its last two readings (auto window)";
            prefix_hits: "server_prefix_cache_hit_tokens", "Prompt tokens the server found in its prefix cache since it started, as its /metrics said last (auto window; the hit rate is its rate over that of server_prefix_cache_query_tokens)";
            prefix_queries: "server_prefix_cache_query_tokens", "Prompt tokens the server looked up in its prefix cache since it started, as its /metrics said last (auto window)";
            ready: "instance_ready", "1 when the instance answers its health check";
            state: "instance_state", "1 for the instance's current state";
            health_failures: "health_consecutive_failures", "Consecutive failed health probes, by instance";
            restarts: "actor_restarts", "Restarts of the supervisor's children since start";
            server_restarts: "server_restarts", "Restarts of the instance's model server since the daemon started";
            crashed_jobs: "crashed_jobs", "Jobs given back because the instance's server went down under them";
            priority_holds: "priority_holds", "Priority holds begun (the bulk's sends held while a higher-priority request ran), by instance";
            stream_first_chunk: "api_stream_first_chunk_seconds", "Streamed chat completions of the OpenAI API: from the request to its first relayed chunk, by model type";
            streams: "api_streams", "Streamed chat completions of the OpenAI API, by how they ended: relayed (to data: [DONE]), broken (an error event after chunks), gone (the client left mid-stream), replayed (no chunk came: made from the finished answer)";
            gpu_temp: "gpu_temperature_celsius", "GPU core temperature";
            gpu_util: "gpu_utilization_percent", "Share of time a kernel ran";
            gpu_mem_used: "gpu_memory_used_bytes", "GPU memory in use";
            gpu_mem_total: "gpu_memory_total_bytes", "GPU memory in all";
            gpu_power: "gpu_power_watts", "GPU power draw";
            gpu_hot: "gpu_temperature_alert", "1 while the GPU is in a temperature alert (above gpu.temp_alert_c, not yet below gpu.temp_clear_c)";
            gpu_alerts: "gpu_temperature_alerts", "Temperature alerts (episodes) since start";
            gpu_available: "gpu_available", "1 when the GPUs can be read through NVML";
            strategy: "strategy", "1 for the allocator's strategy in force (with several GPU groups: the first group's)";
            group_strategy: "group_strategy", "1 for the strategy in force in each GPU group (instances whose gpu_ids overlap)";
            strategy_switches: "strategy_switches", "Strategy switches since start";
        }
        *m.registry.lock().expect("fresh lock") = r;
        m
    }

    /// A streamed chat completion's first chunk was relayed `secs` after
    /// its request came.
    pub fn stream_first_chunk(&self, model: ModelType, secs: f64) {
        let m = Model {
            model_type: model.to_string(),
        };
        self.stream_first_chunk.get_or_create(&m).observe(secs);
    }

    /// A streamed chat completion ended: `relayed`, `broken`, `gone` or
    /// `replayed`.
    pub fn stream_ended(&self, model: ModelType, outcome: &str) {
        let labels = ModelOutcome {
            model_type: model.to_string(),
            outcome: outcome.to_string(),
        };
        self.streams.get_or_create(&labels).inc();
    }

    /// Refreshes the state metrics from a queue and pipeline snapshot.
    pub fn refresh(&self, stats: Option<&QueueStats>, status: Option<&FeederStatus>) {
        if let Some(stats) = stats {
            for model in ModelType::ALL {
                let s = stats.model(model);
                for st in JobStatus::ALL {
                    let labels = ModelStatus {
                        model_type: model.to_string(),
                        status: st.to_string(),
                    };
                    self.jobs
                        .get_or_create(&labels)
                        .set(s.counts.get(st) as i64);
                }
                let m = Model {
                    model_type: model.to_string(),
                };
                self.depth.get_or_create(&m).set(s.counts.pending as i64);
                self.oldest
                    .get_or_create(&m)
                    .set(s.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
            }
        }
        if let Some(status) = status {
            for d in &status.dispatch {
                let i = Instance {
                    instance: d.instance.clone(),
                };
                self.in_flight.get_or_create(&i).set(d.in_flight as i64);
                self.buffered.get_or_create(&i).set(d.buffered as i64);
                self.window.get_or_create(&i).set(d.window as i64);
                self.max_window.get_or_create(&i).set(d.max_window as i64);
                self.window_auto.get_or_create(&i).set(d.auto_window as i64);
                if let Some(m) = d.window_signals.metrics {
                    self.server_running.get_or_create(&i).set(m.running);
                    self.server_waiting.get_or_create(&i).set(m.waiting);
                    if let Some((hits, queries)) = m.prefix_cache {
                        self.prefix_hits.get_or_create(&i).set(hits);
                        self.prefix_queries.get_or_create(&i).set(queries);
                    }
                    self.server_kv_usage.get_or_create(&i).set(m.kv_usage);
                }
                if let Some(r) = d.window_signals.tokens_per_s {
                    self.server_tokens_per_s.get_or_create(&i).set(r);
                }
            }
            for d in &status.dispatch {
                let i = Instance {
                    instance: d.instance.clone(),
                };
                self.crashed_jobs.get_or_create(&i).set(d.crashed as i64);
                let mut seen = self.holds_seen.lock().expect("holds_seen lock");
                let last = seen.insert(d.instance.clone(), d.holds).unwrap_or(0);
                // Fewer than last time: the dispatcher restarted from 0.
                let new = d.holds.checked_sub(last).unwrap_or(d.holds);
                self.priority_holds.get_or_create(&i).inc_by(new);
            }
            for h in &status.health {
                let i = Instance {
                    instance: h.instance.clone(),
                };
                self.health_failures
                    .get_or_create(&i)
                    .set(h.consecutive_failures as i64);
            }
            for s in &status.instances {
                let i = Instance {
                    instance: s.name.clone(),
                };
                let ready = s.state == feeder_actors::container::InstanceState::Ready;
                self.ready.get_or_create(&i).set(ready as i64);
                self.server_restarts
                    .get_or_create(&i)
                    .set(s.restarts as i64);
                for state in feeder_actors::container::InstanceState::ALL {
                    let l = InstanceState {
                        instance: s.name.clone(),
                        state: state.as_str().into(),
                    };
                    self.state.get_or_create(&l).set((state == s.state) as i64);
                }
            }
            if let Some(g) = &status.gpus {
                self.gpu_available.set(g.unavailable.is_none() as i64);
                self.gpu_alerts.set(g.alerts as i64);
                for r in &g.gpus {
                    let l = Gpu {
                        gpu: r.index.to_string(),
                    };
                    self.gpu_temp.get_or_create(&l).set(r.temperature_c.into());
                    self.gpu_util
                        .get_or_create(&l)
                        .set(r.utilization_pct.into());
                    self.gpu_mem_used
                        .get_or_create(&l)
                        .set(r.memory_used_bytes as i64);
                    self.gpu_mem_total
                        .get_or_create(&l)
                        .set(r.memory_total_bytes as i64);
                    self.gpu_power
                        .get_or_create(&l)
                        .set(r.power_w.unwrap_or(0.0));
                    self.gpu_hot
                        .get_or_create(&l)
                        .set(g.hot.contains(&r.index) as i64);
                }
            }
            let current = status
                .allocator
                .as_ref()
                .map_or(feeder_actors::allocator::Strategy::Static, |a| a.strategy);
            for s in feeder_actors::allocator::Strategy::ALL {
                self.strategy
                    .get_or_create(&StrategyLabel {
                        strategy: s.as_str().into(),
                    })
                    .set((s == current) as i64);
            }
            for g in status.allocator.iter().flat_map(|a| &a.groups) {
                for s in feeder_actors::allocator::Strategy::ALL {
                    self.group_strategy
                        .get_or_create(&GroupStrategyLabel {
                            group: g.name.clone(),
                            strategy: s.as_str().into(),
                        })
                        .set((s == g.strategy) as i64);
                }
            }
            self.strategy_switches.set(
                status
                    .allocator
                    .as_ref()
                    .map_or(0, |a| a.groups.iter().map(|g| g.switches).sum::<u64>())
                    as i64,
            );
            for (actor, restarts, _) in &status.restarts {
                self.restarts
                    .get_or_create(&ActorLabel {
                        actor: actor.clone(),
                    })
                    .set(*restarts as i64);
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("encoding to a String");
        openmetrics_to_prometheus(&out)
    }
}

impl DispatchObserver for Metrics {
    fn request_finished(&self, instance: &str, outcome: RequestOutcome, done: Option<&Completion>) {
        let labels = InstanceOutcome {
            instance: instance.to_string(),
            outcome: outcome.as_str().to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        if let Some(d) = done {
            let i = Instance {
                instance: instance.to_string(),
            };
            self.latency
                .get_or_create(&i)
                .observe(d.latency.as_secs_f64());
            for (kind, n) in [
                ("prompt", d.prompt_tokens),
                ("completion", d.completion_tokens),
            ] {
                if let Some(n) = n {
                    let l = InstanceKind {
                        instance: instance.to_string(),
                        kind: kind.into(),
                    };
                    self.tokens.get_or_create(&l).inc_by(n);
                }
            }
        }
    }
}

/// Turns OpenMetrics text into the Prometheus text format that `promtool`
/// and every Prometheus version read: a counter family `x` is exposed as
/// `x_total`, so its `# HELP` and `# TYPE` lines take that name; `# EOF` goes.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::with_capacity(text.len());
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" {
            continue;
        }
        let counter_family = |name: &str| {
            lines[i..]
                .iter()
                .take(3)
                .any(|l| *l == format!("# TYPE {name} counter"))
        };
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            (counter_family(name) && !name.ends_with("_total"))
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line).trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(n: u64) -> FeederStatus {
        FeederStatus {
            dispatch: vec![feeder_actors::dispatch::DispatchStatus {
                instance: "think".into(),
                model: ModelType::Think,
                mode: feeder_actors::dispatch::DispatchMode::Sending,
                in_flight: 0,
                buffered: 0,
                window: 8,
                max_window: 8,
                auto_window: false,
                window_reason: String::new(),
                window_signals: Default::default(),
                thermal_cap: None,
                sent: 0,
                completed: 0,
                failed: 0,
                overloaded: 0,
                crashed: 0,
                aborted: 0,
                warm_prefixes: 0,
                holds: n,
                recalled: 0,
            }],
            health: vec![],
            instances: vec![],
            restarts: vec![],
            children_answered: true,
            gpus: None,
            allocator: None,
        }
    }

    #[test]
    fn priority_holds_count_on_across_a_dispatcher_restart() {
        let m = Metrics::new();
        for n in [2, 5, 1] {
            m.refresh(None, Some(&holds(n)));
        }
        // 2, then 3 more, then a restarted dispatcher's first.
        let text = m.encode();
        assert!(
            text.contains("gpu_feeder_priority_holds_total{instance=\"think\"} 6"),
            "{text}"
        );
    }

    #[test]
    fn counters_are_named_with_total_in_help_and_type() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 2\n# HELP a_jobs Jobs.\n# TYPE a_jobs gauge\na_jobs 3\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 2\n# HELP a_jobs Jobs.\n# TYPE a_jobs gauge\na_jobs 3\n"
        );
    }
}
