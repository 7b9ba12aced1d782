//! The engine model behind `gpu-feeder sim --kv-cache-tokens N`: an
//! iteration-level model of vLLM's scheduler, so that a simulated server
//! behaves like a real one under load. Throughput rises with the batch and
//! flattens; the KV cache is finite, and past what fits requests are
//! preempted and recomputed; repeated prompt prefixes hit the prefix cache.
//!
//! The model is pure: [`Engine::step`] runs one iteration and says how long
//! it took in engine time, and the server drives it against the clock. Each
//! step, as vLLM's V1 scheduler does:
//! 1. every running request that has finished its prefill decodes one token
//!    (one token of the step's budget each), in admission order; a request
//!    that needs a new KV block when none is free preempts the most recently
//!    admitted running request (its blocks are freed and it goes back to the
//!    head of the queue, to compute its prompt and its output so far again);
//! 2. running requests still in prefill get the next chunk of it, as far as
//!    the budget (`max_num_batched_tokens`) goes (chunked prefill);
//! 3. waiting requests are admitted first come first served while fewer
//!    than `max_num_seqs` run, the budget lasts and blocks are free for
//!    their first chunk; a full prompt block already in the prefix cache is
//!    not computed again.
//!
//! Step time = `step_ms` + `step_ms_per_seq` × requests in the step +
//! `prefill_ms_per_1k` × prefill tokens in the step / 1000. A request whose
//! prefill completes in a step also samples its first token in that step.
//! Every request generates exactly its `max_tokens`.
//!
//! The defaults model an 8B-parameter model in bf16 (Llama-3.1-8B: 32
//! layers, 8 KV heads of 128 dimensions, so 128 KiB of KV cache per token)
//! on one H100 SXM:
//! - `step_ms` = 6.5: decoding is bound by reading the 16 GB of weights
//!   once per step; at the H100 SXM's 3.35 TB/s that is 4.8 ms, and measured
//!   decode runs at about 77 % of the memory roofline (75 tokens/s at one
//!   request for this model on an A100 40GB, 1.55 TB/s), hence 6.2–6.5 ms.
//! - `step_ms_per_seq` = 0.05: each running request also reads its own KV
//!   cache every step, 128 MiB for a 1,000-token context, 0.05 ms at that
//!   bandwidth; so a batch of 256 steps in about 19 ms (13,500 tokens/s).
//! - `prefill_ms_per_1k` = 32: prefill is bound by compute, 2 × 8·10⁹ FLOP
//!   per token against 989 TFLOP/s of dense bf16 at about half of peak.
//! - `kv_cache_tokens` has no default (it turns the model on): 80 GB ×
//!   `--gpu-memory-utilization` 0.9, less 16 GB of weights and a few GB of
//!   activations, leaves about 50 GB, some 400,000 tokens.
//! - `max_num_batched_tokens` = 8192 and `block_size` = 16 are vLLM's
//!   defaults; `max_num_seqs` is 256 (1024 on an H100 by vLLM's defaults).

use std::collections::{HashMap, VecDeque};

/// The engine's settings (see the module docs for the defaults' sources).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// KV cache capacity in tokens.
    pub kv_cache_tokens: u64,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Requests running at most.
    pub max_num_seqs: usize,
    /// Tokens (decode and prefill) one step may process.
    pub max_num_batched_tokens: u32,
    /// Fixed part of a step, in milliseconds.
    pub step_ms: f64,
    /// Per request in the step, in milliseconds.
    pub step_ms_per_seq: f64,
    /// Per 1,000 prefill tokens in the step, in milliseconds.
    pub prefill_ms_per_1k: f64,
    /// Reuse full prompt blocks already computed.
    pub prefix_caching: bool,
    /// Beyond this many waiting, new requests are refused (503).
    pub max_num_queued_reqs: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kv_cache_tokens: 400_000,
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            step_ms: 6.5,
            step_ms_per_seq: 0.05,
            prefill_ms_per_1k: 32.0,
            prefix_caching: true,
            max_num_queued_reqs: None,
        }
    }
}

/// A request as the engine sees it: its prompt as token ids (only their
/// identity matters, for the prefix cache) and how many tokens to generate.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    /// The caller's handle on it.
    pub id: u64,
    /// The prompt's tokens.
    pub prompt: Vec<u64>,
    /// Tokens to generate (at least 1).
    pub max_tokens: u32,
}

/// A request that finished in a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    /// The caller's handle.
    pub id: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens (its `max_tokens`).
    pub generated: u32,
    /// Arrival to first token, engine seconds.
    pub ttft: f64,
    /// Arrival to last token, engine seconds.
    pub e2e: f64,
    /// Arrival to first scheduled, engine seconds.
    pub queued: f64,
    /// Prompt tokens served from the prefix cache (at its first admission).
    pub cached_tokens: u32,
    /// Times it was preempted.
    pub preemptions: u32,
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    /// How long it took, engine seconds.
    pub duration: f64,
    /// Requests that ran in it.
    pub batch: usize,
    /// Prefill tokens computed in it.
    pub prefill_tokens: u32,
    /// Requests that finished, with their timings.
    pub finished: Vec<Finished>,
    /// Requests that sampled their first token in it.
    pub first_tokens: Vec<u64>,
}

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
    /// `vllm:prefix_cache_queries_total`, in tokens.
    pub prefix_queries: u64,
    /// `vllm:prefix_cache_hits_total`, in tokens.
    pub prefix_hits: u64,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e: Histogram,
    /// `vllm:request_queue_time_seconds`.
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

/// One physical KV block.
#[derive(Clone, Debug, Default)]
struct Block {
    /// Requests holding it.
    refs: u32,
    /// The hash of the full prompt block it holds, once computed.
    hash: Option<u64>,
    /// Bumped whenever it leaves the free queue, so stale entries are skipped.
    generation: u64,
}

/// What a request does in the step under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Not scheduled.
    Idle,
    /// Computes a chunk of its prefill, not the last.
    Prefill,
    /// Computes the last chunk of its prefill and samples its first token.
    LastPrefill,
    /// Decodes: computes the token sampled last and samples the next.
    Decode,
}

/// A request inside the engine.
#[derive(Debug)]
struct Seq {
    req: EngineRequest,
    /// Hashes of the prompt's full blocks, chained.
    block_hashes: Vec<u64>,
    /// Tokens whose KV is in the cache (prompt, then output).
    computed: u32,
    /// Tokens its prefill must compute: the prompt and, after a
    /// preemption, the output so far.
    target: u32,
    /// Its prefill is done: it decodes.
    prefilled: bool,
    /// Tokens generated so far (kept across a preemption).
    generated: u32,
    /// The blocks it holds, in order.
    blocks: Vec<usize>,
    /// Its part in the step under way.
    role: Role,
    arrived: f64,
    first_scheduled: Option<f64>,
    first_token: Option<f64>,
    cached_tokens: Option<u32>,
    preemptions: u32,
}

/// Hash of a block given the hash of the block before it.
fn chain(prev: u64, tokens: &[u64]) -> u64 {
    // FNV-1a over the previous hash and the tokens: stable and cheap.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ prev;
    for t in std::iter::once(prev).chain(tokens.iter().copied()) {
        for b in t.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The simulated engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    /// Engine time now, seconds.
    now: f64,
    blocks: Vec<Block>,
    /// Blocks with no holder, least recently freed first (with the
    /// generation they were freed at; stale entries are skipped).
    free: VecDeque<(usize, u64)>,
    free_count: usize,
    /// Full prompt blocks computed, by hash.
    cached: HashMap<u64, usize>,
    waiting: VecDeque<Seq>,
    /// In admission order.
    running: Vec<Seq>,
    stats: EngineStats,
}

impl Engine {
    /// An idle engine at engine time 0.
    pub fn new(cfg: EngineConfig) -> Self {
        let n = (cfg.kv_cache_tokens / cfg.block_size.max(1) as u64).max(1) as usize;
        Engine {
            blocks: vec![Block::default(); n],
            free: (0..n).map(|i| (i, 0)).collect(),
            free_count: n,
            cached: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: EngineStats::default(),
            now: 0.0,
            cfg,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Engine time now, seconds.
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Moves engine time forward to `t` (an idle engine follows the clock).
    pub fn advance_to(&mut self, t: f64) {
        self.now = self.now.max(t);
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether a step would do anything.
    pub fn busy(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Share of the KV blocks held by requests, 0 to 1.
    pub fn kv_usage(&self) -> f64 {
        1.0 - self.free_count as f64 / self.blocks.len() as f64
    }

    /// The counters and histograms so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Drops every request and the whole KV cache, prefix cache included,
    /// as vLLM's sleep does; returns the ids of the requests dropped (they
    /// are answered `abort`). The clock and the counters stay.
    pub fn discard(&mut self) -> Vec<u64> {
        let ids = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .map(|s| s.req.id)
            .collect();
        let n = self.blocks.len();
        self.blocks = vec![Block::default(); n];
        self.free = (0..n).map(|i| (i, 0)).collect();
        self.free_count = n;
        self.cached.clear();
        ids
    }

    /// Queues a request at engine time now; `Err` (to answer 503) when
    /// `max_num_queued_reqs` are waiting already.
    pub fn add(&mut self, req: EngineRequest) -> Result<(), EngineRequest> {
        if self
            .cfg
            .max_num_queued_reqs
            .is_some_and(|n| self.waiting.len() >= n)
        {
            return Err(req);
        }
        let b = self.cfg.block_size.max(1) as usize;
        let mut prev = 0;
        let block_hashes = req
            .prompt
            .chunks_exact(b)
            .map(|c| {
                prev = chain(prev, c);
                prev
            })
            .collect();
        self.waiting.push_back(Seq {
            target: req.prompt.len() as u32,
            req,
            block_hashes,
            computed: 0,
            prefilled: false,
            generated: 0,
            blocks: Vec::new(),
            role: Role::Idle,
            arrived: self.now,
            first_scheduled: None,
            first_token: None,
            cached_tokens: None,
            preemptions: 0,
        });
        Ok(())
    }

    /// A free block, evicting the least recently freed cached one.
    fn allocate(&mut self) -> Option<usize> {
        while let Some((i, generation)) = self.free.pop_front() {
            let block = &mut self.blocks[i];
            if block.refs > 0 || block.generation != generation {
                continue; // taken again from the cache since it was freed
            }
            if let Some(h) = block.hash.take() {
                if self.cached.get(&h) == Some(&i) {
                    self.cached.remove(&h);
                }
            }
            block.refs = 1;
            block.generation += 1;
            self.free_count -= 1;
            return Some(i);
        }
        None
    }

    fn release(&mut self, i: usize) {
        let block = &mut self.blocks[i];
        block.refs -= 1;
        if block.refs == 0 {
            block.generation += 1;
            self.free.push_back((i, block.generation));
            self.free_count += 1;
        }
    }

    /// Takes a cached block for another holder.
    fn reuse(&mut self, i: usize) {
        let block = &mut self.blocks[i];
        if block.refs == 0 {
            block.generation += 1; // its free-queue entry is now stale
            self.free_count -= 1;
        }
        block.refs += 1;
    }

    /// Frees every block of `seq` and resets its progress.
    fn free_seq(&mut self, seq: &mut Seq) {
        for i in std::mem::take(&mut seq.blocks) {
            self.release(i);
        }
        seq.computed = 0;
    }

    /// Blocks `seq` needs to hold `tokens` tokens.
    fn blocks_for(&self, tokens: u32) -> usize {
        tokens.div_ceil(self.cfg.block_size.max(1)) as usize
    }

    /// Grows running request `r` to hold `tokens`, preempting the most
    /// recently admitted running requests while blocks are short. `false`
    /// when `r` itself had to be preempted.
    fn grow(&mut self, r: usize, tokens: u32) -> bool {
        let need = self.blocks_for(tokens);
        while self.running[r].blocks.len() < need {
            match self.allocate() {
                Some(b) => self.running[r].blocks.push(b),
                None => {
                    let victim = self.running.len() - 1;
                    self.preempt(victim);
                    if victim == r {
                        return false;
                    }
                }
            }
        }
        true
    }

    fn preempt(&mut self, r: usize) {
        let mut seq = self.running.remove(r);
        self.free_seq(&mut seq);
        // Recomputed from scratch: its prompt and what it generated so far.
        seq.prefilled = false;
        seq.target = seq.req.prompt.len() as u32 + seq.generated;
        seq.role = Role::Idle;
        seq.preemptions += 1;
        self.stats.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Registers the full prompt blocks of running request `r` computed so far.
    fn register_blocks(&mut self, r: usize) {
        if !self.cfg.prefix_caching {
            return;
        }
        let b = self.cfg.block_size.max(1);
        let seq = &self.running[r];
        let full = (seq.computed.min(seq.req.prompt.len() as u32) / b) as usize;
        let pairs: Vec<(u64, usize)> = (0..full.min(seq.blocks.len()))
            .map(|k| (seq.block_hashes[k], seq.blocks[k]))
            .collect();
        for (h, i) in pairs {
            if self.blocks[i].hash.is_none() {
                self.blocks[i].hash = Some(h);
                self.cached.entry(h).or_insert(i);
            }
        }
    }

    /// Admits the head of the queue if it fits; how many prefill tokens
    /// it takes from `budget`.
    fn admit(&mut self, budget: u32) -> Option<u32> {
        let b = self.cfg.block_size.max(1);
        let head = self.waiting.front()?;
        // Leading full prompt blocks already cached (the last prompt token
        // is always computed, so a whole cached prompt still samples).
        let mut hits = Vec::new();
        if self.cfg.prefix_caching {
            let usable = (head.req.prompt.len() as u32).saturating_sub(1) / b;
            for h in head.block_hashes.iter().take(usable as usize) {
                match self.cached.get(h) {
                    Some(&i) => hits.push(i),
                    None => break,
                }
            }
        }
        let cached = hits.len() as u32 * b;
        let chunk = (head.target - cached).min(budget);
        let need = self.blocks_for(cached + chunk) - hits.len();
        let reusable_free = hits.iter().filter(|i| self.blocks[**i].refs == 0).count();
        if need + reusable_free > self.free_count {
            return None;
        }
        let mut seq = self.waiting.pop_front().expect("checked above");
        for i in hits {
            self.reuse(i);
            seq.blocks.push(i);
        }
        for _ in 0..need {
            let i = self.allocate().expect("counted above");
            seq.blocks.push(i);
        }
        if seq.cached_tokens.is_none() {
            seq.cached_tokens = Some(cached);
            self.stats.prefix_queries += seq.req.prompt.len() as u64;
            self.stats.prefix_hits += cached as u64;
            self.stats.prompt_tokens += seq.req.prompt.len() as u64;
        }
        seq.first_scheduled.get_or_insert(self.now);
        seq.computed = cached + chunk;
        seq.role = if seq.computed == seq.target {
            seq.prefilled = true;
            Role::LastPrefill
        } else {
            Role::Prefill
        };
        self.running.push(seq);
        let r = self.running.len() - 1;
        self.register_blocks(r);
        Some(chunk)
    }

    /// Runs one iteration; `None` when there is nothing to do.
    pub fn step(&mut self) -> Option<Step> {
        if !self.busy() {
            return None;
        }
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        let mut prefill = 0u32;
        for seq in &mut self.running {
            seq.role = Role::Idle;
        }

        // 1. Decodes, in admission order.
        let mut r = 0;
        while r < self.running.len() && budget > 0 {
            if !self.running[r].prefilled {
                r += 1;
                continue;
            }
            let tokens = self.running[r].computed + 1;
            if !self.grow(r, tokens) {
                continue; // r itself was preempted; the next one moved to r
            }
            budget -= 1;
            self.running[r].role = Role::Decode;
            r += 1;
        }
        // 2. Chunks of running prefills.
        let mut r = 0;
        while r < self.running.len() && budget > 0 {
            let seq = &self.running[r];
            if seq.prefilled || seq.role != Role::Idle {
                r += 1;
                continue;
            }
            let chunk = (seq.target - seq.computed).min(budget);
            let tokens = seq.computed + chunk;
            if !self.grow(r, tokens) {
                continue;
            }
            let seq = &mut self.running[r];
            seq.computed = tokens;
            seq.role = if tokens == seq.target {
                seq.prefilled = true;
                Role::LastPrefill
            } else {
                Role::Prefill
            };
            budget -= chunk;
            prefill += chunk;
            self.register_blocks(r);
            r += 1;
        }
        // 3. Admissions, first come first served.
        while self.running.len() < self.cfg.max_num_seqs && budget > 0 {
            let Some(chunk) = self.admit(budget) else {
                break;
            };
            budget -= chunk;
            prefill += chunk;
        }

        let batch = self.running.iter().filter(|s| s.role != Role::Idle).count();
        let duration = (self.cfg.step_ms
            + self.cfg.step_ms_per_seq * batch as f64
            + self.cfg.prefill_ms_per_1k * prefill as f64 / 1000.0)
            / 1000.0;
        self.now += duration;
        let now = self.now;

        // Tokens sampled at the end of the step; finished requests leave.
        let mut finished = Vec::new();
        let mut first_tokens = Vec::new();
        let mut r = 0;
        while r < self.running.len() {
            let seq = &mut self.running[r];
            match seq.role {
                Role::Idle | Role::Prefill => {
                    r += 1;
                    continue;
                }
                Role::Decode => seq.computed += 1,
                Role::LastPrefill => {}
            }
            seq.generated += 1;
            self.stats.generation_tokens += 1;
            if seq.first_token.is_none() {
                first_tokens.push(seq.req.id);
            }
            let first = *seq.first_token.get_or_insert(now);
            if seq.generated < seq.req.max_tokens.max(1) {
                r += 1;
                continue;
            }
            let mut seq = self.running.remove(r);
            let out = Finished {
                id: seq.req.id,
                prompt_tokens: seq.req.prompt.len() as u32,
                generated: seq.generated,
                ttft: first - seq.arrived,
                e2e: now - seq.arrived,
                queued: seq.first_scheduled.unwrap_or(now) - seq.arrived,
                cached_tokens: seq.cached_tokens.unwrap_or(0),
                preemptions: seq.preemptions,
            };
            self.stats.successes += 1;
            self.stats.ttft.observe(out.ttft);
            self.stats.e2e.observe(out.e2e);
            self.stats.queue_time.observe(out.queued);
            self.free_seq(&mut seq);
            finished.push(out);
        }
        Some(Step {
            duration,
            batch,
            prefill_tokens: prefill,
            finished,
            first_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EngineConfig {
        EngineConfig {
            kv_cache_tokens: 1_000_000,
            max_num_seqs: 1024,
            ..EngineConfig::default()
        }
    }

    /// A prompt of `n` tokens unique to `tag`.
    fn prompt(tag: u64, n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| tag << 32 | i).collect()
    }

    /// Keeps `concurrency` requests in the engine until `total` have run;
    /// generated tokens per engine second, and the engine.
    fn run_closed_loop(
        cfg: EngineConfig,
        concurrency: usize,
        total: u64,
        prompt_len: usize,
        out_len: u32,
    ) -> (f64, Engine) {
        let mut e = Engine::new(cfg);
        let mut next = 0u64;
        let mut done = 0u64;
        let submit = |e: &mut Engine, next: &mut u64| {
            e.add(EngineRequest {
                id: *next,
                prompt: prompt(*next, prompt_len),
                max_tokens: out_len,
            })
            .unwrap();
            *next += 1;
        };
        for _ in 0..concurrency.min(total as usize) {
            submit(&mut e, &mut next);
        }
        while done < total {
            let step = e.step().expect("work is left");
            for _ in &step.finished {
                done += 1;
                if next < total {
                    submit(&mut e, &mut next);
                }
            }
        }
        (e.stats().generation_tokens as f64 / e.now(), e)
    }

    #[test]
    fn throughput_rises_with_concurrency_then_flattens() {
        let rates: Vec<f64> = [1, 4, 16, 64, 256, 1024]
            .iter()
            .map(|&c| run_closed_loop(cfg(), c, (c as u64 * 4).max(64), 200, 64).0)
            .collect();
        for pair in rates.windows(2) {
            assert!(pair[1] > pair[0], "throughput falls: {rates:?}");
        }
        // One request decodes at about 1 / 6.55 ms (plus its prefill).
        assert!(rates[0] > 120.0 && rates[0] < 160.0, "{rates:?}");
        // Quadrupling the batch gains less and less: the curve flattens.
        let gains: Vec<f64> = rates.windows(2).map(|p| p[1] / p[0]).collect();
        assert!(gains[0] > 3.0, "{gains:?}");
        assert!(gains[4] < 1.6, "{gains:?}");
        assert!(gains.windows(2).all(|g| g[1] < g[0]), "{gains:?}");
    }

    #[test]
    fn requests_beyond_the_kv_cache_are_preempted_and_counted() {
        // 64 requests of 100 + 400 tokens need 32,000 tokens at the end;
        // the cache holds 8,000: they cannot all run to the end together.
        let small = EngineConfig {
            kv_cache_tokens: 8_000,
            ..cfg()
        };
        let (_, e) = run_closed_loop(small, 64, 64, 100, 400);
        assert!(e.stats().preemptions > 0, "no preemption");
        assert_eq!(e.stats().successes, 64, "every request still finishes");
        assert_eq!(e.stats().generation_tokens, 64 * 400);
        assert_eq!(e.kv_usage(), 0.0, "every block is freed at the end");
        // With room for all of them, none is preempted.
        let (_, e) = run_closed_loop(cfg(), 64, 64, 100, 400);
        assert_eq!(e.stats().preemptions, 0);
    }

    #[test]
    fn a_repeated_prefix_hits_the_cache_and_skips_its_prefill() {
        for caching in [true, false] {
            let mut e = Engine::new(EngineConfig {
                prefix_caching: caching,
                ..cfg()
            });
            let shared = prompt(7, 2_000);
            e.add(EngineRequest {
                id: 1,
                prompt: shared.clone(),
                max_tokens: 4,
            })
            .unwrap();
            let mut first = Vec::new();
            while let Some(s) = e.step() {
                first.extend(s.finished);
            }
            let mut again = shared.clone();
            again.extend(prompt(8, 40));
            e.add(EngineRequest {
                id: 2,
                prompt: again,
                max_tokens: 4,
            })
            .unwrap();
            let mut prefill = 0;
            let mut second = Vec::new();
            while let Some(s) = e.step() {
                prefill += s.prefill_tokens;
                second.extend(s.finished);
            }
            let hit = second[0].cached_tokens;
            if caching {
                assert_eq!(hit, 2_000, "the whole shared prefix is cached");
                assert_eq!(prefill, 40, "only the new tokens are computed");
                assert!(second[0].ttft < first[0].ttft / 5.0);
                assert_eq!(e.stats().prefix_hits, 2_000);
                assert_eq!(e.stats().prefix_queries, 4_040);
            } else {
                assert_eq!(hit, 0);
                assert_eq!(prefill, 2_040);
            }
        }
    }

    #[test]
    fn cached_blocks_are_evicted_least_recently_freed_first() {
        // Room for two 1,600-token prompts: a third evicts the oldest.
        let mut e = Engine::new(EngineConfig {
            kv_cache_tokens: 3_400,
            ..cfg()
        });
        let run = |e: &mut Engine, id: u64, p: Vec<u64>| -> u32 {
            e.add(EngineRequest {
                id,
                prompt: p,
                max_tokens: 1,
            })
            .unwrap();
            let mut hit = 0;
            while let Some(s) = e.step() {
                hit += s.finished.iter().map(|f| f.cached_tokens).sum::<u32>();
            }
            hit
        };
        assert_eq!(run(&mut e, 1, prompt(1, 1_600)), 0);
        assert_eq!(run(&mut e, 2, prompt(2, 1_600)), 0);
        assert_eq!(run(&mut e, 3, prompt(2, 1_600)), 1_584, "2 is still cached");
        assert_eq!(run(&mut e, 4, prompt(3, 1_600)), 0);
        assert_eq!(run(&mut e, 5, prompt(1, 1_600)), 0, "1 was evicted first");
    }

    #[test]
    fn a_full_queue_refuses_new_requests() {
        let mut e = Engine::new(EngineConfig {
            max_num_queued_reqs: Some(2),
            ..cfg()
        });
        let req = |id| EngineRequest {
            id,
            prompt: prompt(id, 10),
            max_tokens: 1,
        };
        assert!(e.add(req(1)).is_ok());
        assert!(e.add(req(2)).is_ok());
        assert!(e.add(req(3)).is_err());
        e.step();
        assert!(e.add(req(3)).is_ok(), "room again once they run");
    }

    #[test]
    fn chunked_prefill_shares_the_step_budget_with_decodes() {
        let mut e = Engine::new(cfg());
        e.add(EngineRequest {
            id: 1,
            prompt: prompt(1, 100),
            max_tokens: 1_000,
        })
        .unwrap();
        e.step();
        e.add(EngineRequest {
            id: 2,
            prompt: prompt(2, 20_000),
            max_tokens: 1,
        })
        .unwrap();
        let s = e.step().unwrap();
        // One decode, then as much of the long prompt as the budget allows.
        assert_eq!(s.batch, 2);
        assert_eq!(s.prefill_tokens, 8_191);
        let expected = (6.5 + 0.05 * 2.0 + 32.0 * 8.191) / 1000.0;
        assert!((s.duration - expected).abs() < 1e-9, "{}", s.duration);
    }
}
