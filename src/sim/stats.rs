//! The engine model's counters and histograms, each with the meaning of the
//! vLLM metric it is served as, so that whatever reads a real server's
//! `/metrics` reads the simulator's the same way.

/// Counters and histograms, with vLLM's meanings.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    /// `vllm:num_preemptions_total`.
    pub preemptions: u64,
    /// `vllm:prompt_tokens_total`: prompt tokens of requests that started.
    pub prompt_tokens: u64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: u64,
    /// `vllm:request_success_total`.
    pub successes: u64,
    /// `vllm:prefix_cache_queries_total`, in tokens: the tokens of each
    /// request at its first admission (not again after a preemption).
    pub prefix_queries: u64,
    /// `vllm:prefix_cache_hits_total`, in tokens, counted as the queries.
    pub prefix_hits: u64,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e: Histogram,
    /// `vllm:request_queue_time_seconds`: arrival to first scheduled.
    pub queue_time: Histogram,
}

/// A Prometheus histogram with fixed buckets (seconds).
#[derive(Clone, Debug)]
pub struct Histogram {
    /// Upper bounds.
    pub bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative).
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

/// The buckets vLLM uses for its latency histograms (a subset).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            bounds: LATENCY_BUCKETS,
            counts: vec![0; LATENCY_BUCKETS.len()],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}
