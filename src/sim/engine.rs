//! The engine model behind `gpu-feeder sim --kv-cache-tokens N`: an
//! iteration-level model of vLLM's V1 scheduler, so that a simulated server
//! behaves like a real one under load. Throughput rises with the batch and
//! flattens; the KV cache is finite, and past what fits requests wait or
//! are preempted and recomputed; repeated prompt prefixes hit the prefix
//! cache.
//!
//! The model is pure: [`Engine::step`] runs one iteration and says how long
//! it took in engine time, and the server drives it against the clock. Each
//! step does what `Scheduler.schedule` of vLLM 0.32 does (with its default
//! FCFS policy, no speculative decoding, no KV connector):
//! 1. Running requests, in admission order, are each scheduled for the
//!    tokens they lack, as far as the step's budget
//!    (`max_num_batched_tokens`) goes: one token for a request that decodes,
//!    the next chunk for one in prefill (chunked prefill). A request that
//!    needs a KV block when none is free preempts the most recently admitted
//!    running request (its blocks are freed and it goes back to the head of
//!    the queue, to compute its prompt and its output so far again); when
//!    that is itself, no further running request is scheduled.
//! 2. Unless the step preempted a request, waiting requests are admitted
//!    first come first served while fewer than `max_num_seqs` run and the
//!    budget lasts, each only when blocks for *all* its tokens are free
//!    (vLLM's `scheduler_reserve_full_isl`, on by default), not only for
//!    its first chunk. Its leading full blocks found in the prefix cache are
//!    reused (never its last token, which must be computed to sample).
//! 3. A request whose computed tokens reach its tokens samples one; a
//!    request that has generated its `max_tokens` leaves and frees its blocks.
//!
//! With `--scheduling-policy priority` (vLLM's `SchedulingPolicy.PRIORITY`)
//! the queue is ordered by each request's `priority` (lower first), then
//! its arrival, as vLLM's `PriorityRequestQueue` heap; a preempted request
//! goes back into that order rather than to the head; and the victim of a
//! request short of blocks is the running request of the highest
//! `priority` value (the latest arrived among equals), which may be one
//! scheduled earlier in the same step: its tokens return to the step's
//! budget, as vLLM restores them. Nothing else changes: a waiting request
//! of high priority still waits for a free running slot (vLLM preempts
//! only for blocks, never for `max_num_seqs`).
//!
//! The KV cache is a pool of blocks that reuses and evicts them in vLLM's
//! order (`blocks.rs`): that order decides the prefix hit rate. As in vLLM,
//! one of the blocks is the null block and holds no request's tokens: a
//! cache of 80 blocks of 128 tokens holds 79 × 128. A request
//! that arrives while a step runs waits for it to end before the engine
//! takes it in, as vLLM's engine core takes new requests between steps: its
//! time to first token and its latency count that wait (from its arrival),
//! its queue time does not (from the engine's intake to its first step,
//! as `vllm:request_queue_time_seconds`).
//!
//! Step time = `step_ms` + `step_ms_per_seq` × requests in the step +
//! `prefill_ms_per_1k` × prefill tokens in the step / 1000 (every token a
//! request computes in the step, unless it only decodes one) +
//! `step_ms_per_1k_context` × the context its requests attend over / 1000
//! (their computed tokens, prompt and output: each request's KV cache is
//! read every step, so long contexts slow decoding). Every request
//! generates exactly its `max_tokens`.
//!
//! # Calibrations
//!
//! ## An 8B model on one H100 (the defaults)
//!
//! Llama-3.1-8B in bf16 (32 layers, 8 KV heads of 128 dimensions, so 128 KiB
//! of KV cache per token) on one H100 SXM, derived from published figures:
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
//!   defaults on an H100; `max_num_seqs` is 256 (vLLM's is 1024 there).
//!
//! `step_ms_per_1k_context` is 0: `step_ms_per_seq` stands for a request's
//! KV cache read at a typical context.
//!
//! ## vLLM's CPU build on two cores ([`EngineConfig::cpu`])
//!
//! Fitted by `benches/fidelity.rs` to vLLM 0.32.0's CPU build serving a
//! tiny random-weight Llama (2 layers, hidden 256, bf16) on a machine of
//! two cores, vLLM's model worker bound to one, its API server, its engine
//! core and the benchmark's clients sharing the other (load average 2–6
//! from other work); each figure is the mean of two runs' fits, which
//! differed by 1 to 20 %. The fit makes the simulator's closed-loop
//! throughput match vLLM's as its clients see it, over four sweeps (short
//! and long prompts and outputs, 1 to 64 requests at once), so what vLLM's
//! frontend adds to a request or a token is in the figures too:
//! - `step_ms` = 2.09: a step's fixed cost, mostly Python around a forward
//!   pass that takes little for so small a model (vLLM's mean inter-token
//!   latency of one request alone: 1.9–2.4 ms).
//! - `step_ms_per_seq` = 0.07 per request in the step.
//! - `prefill_ms_per_1k` = 30.6: vLLM's own prefill times of one request
//!   agree (`vllm:request_prefill_time_seconds`: 17.5 ms for 400 tokens,
//!   27.6 ms for 800); past 1,000 tokens attention makes them grow faster.
//! - `step_ms_per_1k_context` = 0.25 per 1,000 tokens of context read (the
//!   CPU's paged attention): twelve requests decoding at ≈500 tokens of
//!   context step 1.2 ms slower than at ≈100; vLLM's inter-token latency in
//!   such a pair of runs rose by 1.3–2 ms more than their extra prefill
//!   explains.
//! - blocks of 128 tokens, `max_num_batched_tokens` 2048 and
//!   `max_num_seqs` 128 are vLLM's defaults on a CPU (its CPU platform's
//!   block size, its API server's batch defaults there).
//!
//! They describe that machine, not CPUs in general: the benchmark refits
//! them wherever it runs and prints both.

use std::collections::VecDeque;

use super::blocks::BlockPool;
pub use super::stats::{EngineStats, Histogram, LATENCY_BUCKETS};

/// The engine's settings (see the module docs for the defaults' sources).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// KV cache in tokens: blocks of `block_size`, one of them vLLM's null
    /// block.
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
    /// Per 1,000 tokens of KV cache the step's requests attend over, in
    /// milliseconds: reading each request's context every step.
    pub step_ms_per_1k_context: f64,
    /// Reuse full blocks already computed.
    pub prefix_caching: bool,
    /// Beyond this many waiting, new requests are refused (503).
    pub max_num_queued_reqs: Option<usize>,
    /// vLLM's `--scheduling-policy priority`: the queue is ordered by each
    /// request's `priority` (lower first), then its arrival, and a request
    /// short of blocks preempts the running request of the lowest priority
    /// (highest value, latest arrival) instead of the latest admitted.
    pub priority_policy: bool,
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
            step_ms_per_1k_context: 0.0,
            prefix_caching: true,
            max_num_queued_reqs: None,
            priority_policy: false,
        }
    }
}

impl EngineConfig {
    /// The profile fitted to vLLM's CPU build serving a tiny model on two
    /// cores (see the module docs for where each figure comes from), with
    /// `num_blocks` KV blocks of 128 tokens.
    pub fn cpu(num_blocks: u64) -> Self {
        EngineConfig {
            kv_cache_tokens: num_blocks * 128,
            block_size: 128,
            max_num_seqs: 128,
            max_num_batched_tokens: 2048,
            step_ms: 2.09,
            step_ms_per_seq: 0.07,
            prefill_ms_per_1k: 30.6,
            step_ms_per_1k_context: 0.25,
            ..EngineConfig::default()
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
    /// Its `priority` (vLLM's: lower runs first); heeded only under
    /// [`EngineConfig::priority_policy`].
    pub priority: i64,
}

/// Why [`Engine::add`] refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// `max_num_queued_reqs` are waiting already (answer 503).
    QueueFull,
    /// Its prompt and output need more tokens than the whole KV cache holds,
    /// so it could never finish (vLLM refuses it for `max_model_len`: 400).
    TooLong {
        /// Prompt plus output tokens.
        tokens: u64,
        /// Tokens the KV cache holds.
        capacity: u64,
    },
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
    /// Taken in (the end of the step it arrived in) to first scheduled,
    /// engine seconds.
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
    /// Tokens of KV cache its requests attend over (their computed tokens).
    pub context_tokens: u64,
    /// Requests preempted in it.
    pub preempted: u32,
    /// Requests admitted from the queue in it.
    pub admitted: u32,
    /// Requests that finished, with their timings.
    pub finished: Vec<Finished>,
    /// Requests that sampled their first token in it.
    pub first_tokens: Vec<u64>,
}

/// A request inside the engine.
#[derive(Debug)]
struct Seq {
    req: EngineRequest,
    /// Hashes of its full blocks (prompt, then output), chained; extended
    /// as its tokens fill blocks.
    hashes: Vec<u64>,
    /// Tokens whose KV is computed (or scheduled to be, in the step under way).
    computed: u32,
    /// Tokens generated so far (kept across a preemption).
    generated: u32,
    /// Its leading blocks already committed to the prefix cache.
    committed: usize,
    /// The blocks it holds, in order.
    blocks: Vec<usize>,
    /// Tokens it computes in the step under way (0: not scheduled).
    scheduled: u32,
    /// In the step under way it only computes the token it sampled last.
    decoding: bool,
    /// When it arrived (time to first token and latency count from here).
    arrived: f64,
    /// When the engine took it in: the end of the step it arrived in
    /// (queue time counts from here).
    taken_in: f64,
    first_scheduled: Option<f64>,
    first_token: Option<f64>,
    cached_tokens: Option<u32>,
    preemptions: u32,
}

impl Seq {
    /// Its tokens so far: the prompt and what it generated.
    fn tokens(&self) -> u32 {
        self.req.prompt.len() as u32 + self.generated
    }

    /// Token `i`: the prompt's, or a generated one (an id of its own, as
    /// no other request generates the same text).
    fn token(&self, i: usize) -> u64 {
        match self.req.prompt.get(i) {
            Some(t) => *t,
            None => chain(self.req.id, &[i as u64]),
        }
    }

    /// Makes sure the hashes of its first `n` full blocks are known.
    fn hash_blocks(&mut self, n: usize, block_size: usize) {
        while self.hashes.len() < n {
            let k = self.hashes.len();
            let prev = self.hashes.last().copied().unwrap_or(0);
            let tokens: Vec<u64> = (k * block_size..(k + 1) * block_size)
                .map(|i| self.token(i))
                .collect();
            self.hashes.push(chain(prev, &tokens));
        }
    }
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
    pool: BlockPool,
    /// Blocks in all, the null block among them (`num_gpu_blocks`).
    num_blocks: usize,
    waiting: VecDeque<Seq>,
    /// In admission order.
    running: Vec<Seq>,
    stats: EngineStats,
}

impl Engine {
    /// An idle engine at engine time 0.
    pub fn new(cfg: EngineConfig) -> Self {
        let n = (cfg.kv_cache_tokens / cfg.block_size.max(1) as u64).max(2) as usize;
        Engine {
            // vLLM keeps its first block as the null block (a placeholder
            // that never holds a request's tokens): one block less to use.
            pool: BlockPool::new(n - 1, cfg.prefix_caching),
            num_blocks: n,
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

    /// Engine time now, seconds: the end of the last step.
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Moves engine time forward to `t` (an idle engine follows the clock).
    pub fn advance_to(&mut self, t: f64) {
        self.now = self.now.max(t);
    }

    /// Requests running (`vllm:num_requests_running`: those in prefill too).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting (preempted ones among them).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether a step would do anything.
    pub fn busy(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// KV blocks in all (vLLM's `num_gpu_blocks`), the null block among them.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Share of the usable KV blocks held by requests, 0 to 1.
    pub fn kv_usage(&self) -> f64 {
        self.pool.usage()
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
        self.pool.clear();
        ids
    }

    /// Drops request `id`, waiting or running, as vLLM aborts a request
    /// whose client went away: its blocks are freed, the full ones it
    /// computed staying in the prefix cache until evicted. Whether it was
    /// there.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            let seq = self.waiting.remove(i).expect("found above");
            self.pool.release(&seq.blocks);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            let seq = self.running.remove(i);
            self.pool.release(&seq.blocks);
            return true;
        }
        false
    }

    /// Forgets the prefix cache, as vLLM's `POST /reset_prefix_cache`
    /// does; `false` (and nothing done) while requests hold blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset_prefix_cache()
    }

    /// Queues a request arriving now. See [`Engine::add_at`].
    pub fn add(&mut self, req: EngineRequest) -> Result<(), (EngineRequest, Rejected)> {
        self.add_at(req, self.now)
    }

    /// Queues a request that arrived at engine time `arrived`: earlier than
    /// [`Engine::now`] when it came in while the step that ends then ran;
    /// the engine takes it in at [`Engine::now`], between steps.
    /// Refused when `max_num_queued_reqs` are waiting, or when it could not
    /// fit in the KV cache even alone.
    pub fn add_at(
        &mut self,
        req: EngineRequest,
        arrived: f64,
    ) -> Result<(), (EngineRequest, Rejected)> {
        if self
            .cfg
            .max_num_queued_reqs
            .is_some_and(|n| self.waiting.len() >= n)
        {
            return Err((req, Rejected::QueueFull));
        }
        let tokens = req.prompt.len() as u64 + req.max_tokens.max(1) as u64;
        let capacity = self.pool.len() as u64 * self.cfg.block_size.max(1) as u64;
        if tokens > capacity {
            return Err((req, Rejected::TooLong { tokens, capacity }));
        }
        self.enqueue(Seq {
            req,
            hashes: Vec::new(),
            computed: 0,
            generated: 0,
            committed: 0,
            blocks: Vec::new(),
            scheduled: 0,
            decoding: false,
            arrived: arrived.min(self.now),
            taken_in: self.now,
            first_scheduled: None,
            first_token: None,
            cached_tokens: None,
            preemptions: 0,
        });
        Ok(())
    }

    /// Puts `seq` in the queue: at its end first come first served; under
    /// the priority policy after every request of a lower (or the same)
    /// `priority` value that arrived before it, as vLLM's heap orders them.
    fn enqueue(&mut self, seq: Seq) {
        if !self.cfg.priority_policy {
            self.waiting.push_back(seq);
            return;
        }
        let key = (seq.req.priority, seq.arrived);
        let at = self
            .waiting
            .partition_point(|w| (w.req.priority, w.arrived) <= key);
        self.waiting.insert(at, seq);
    }

    /// Blocks needed to hold `tokens` tokens.
    fn blocks_for(&self, tokens: u32) -> usize {
        tokens.div_ceil(self.cfg.block_size.max(1)) as usize
    }

    /// Commits the full blocks of running request `r` computed so far.
    fn commit(&mut self, r: usize) {
        let b = self.cfg.block_size.max(1) as usize;
        let seq = &mut self.running[r];
        let full = (seq.computed as usize / b).min(seq.blocks.len());
        seq.hash_blocks(full, b);
        for k in seq.committed..full {
            self.pool.commit(seq.blocks[k], seq.hashes[k]);
        }
        seq.committed = seq.committed.max(full);
    }

    /// Grows running request `r` to `need` blocks, preempting the most
    /// recently admitted running requests while blocks are short. `false`
    /// when `r` itself had to be preempted.
    ///
    /// Under the priority policy the victim may be a request scheduled
    /// earlier in this step: `r` then moves down with the requests after
    /// it, and the tokens the victim had been given return to `budget`.
    fn grow(&mut self, r: &mut usize, need: usize, budget: &mut u32) -> bool {
        while self.running[*r].blocks.len() < need {
            match self.pool.allocate() {
                Some(b) => self.running[*r].blocks.push(b),
                None => {
                    let victim = self.victim();
                    *budget += self.preempt(victim);
                    if victim == *r {
                        return false;
                    }
                    if victim < *r {
                        *r -= 1;
                    }
                }
            }
        }
        true
    }

    /// The running request a request short of blocks preempts: the latest
    /// admitted, or under the priority policy the one of the highest
    /// `priority` value, the latest arrived among equals.
    fn victim(&self) -> usize {
        if !self.cfg.priority_policy {
            return self.running.len() - 1;
        }
        let mut worst = 0;
        for (i, s) in self.running.iter().enumerate() {
            let w = &self.running[worst];
            if (s.req.priority, s.arrived) >= (w.req.priority, w.arrived) {
                worst = i;
            }
        }
        worst
    }

    /// Preemption by recompute: the request's blocks go back to the pool
    /// (its committed ones stay cached until evicted) and it goes to the
    /// head of the queue, to compute its prompt and its output so far again.
    /// The tokens it had been scheduled for in the step under way.
    fn preempt(&mut self, r: usize) -> u32 {
        let mut seq = self.running.remove(r);
        let scheduled = seq.scheduled;
        self.pool.release(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
        seq.committed = 0;
        seq.scheduled = 0;
        seq.preemptions += 1;
        self.stats.preemptions += 1;
        if self.cfg.priority_policy {
            self.enqueue(seq);
        } else {
            self.waiting.push_front(seq);
        }
        scheduled
    }

    /// Schedules running request `r` for the tokens it lacks, as far as
    /// `budget` goes (taking them from it); `false` when it was preempted
    /// for want of blocks. `r` moves down when a request before it was
    /// preempted (see [`Engine::grow`]).
    fn schedule_running(&mut self, r: &mut usize, budget: &mut u32) -> bool {
        let seq = &self.running[*r];
        let new = (seq.tokens() - seq.computed).min(*budget);
        let need = self.blocks_for(seq.computed + new);
        if !self.grow(r, need, budget) {
            return false;
        }
        // Tokens given back by a preempted request are for later requests.
        *budget -= new;
        let seq = &mut self.running[*r];
        seq.decoding = new == 1 && seq.generated > 0 && seq.computed + 1 == seq.tokens();
        seq.computed += new;
        seq.scheduled = new;
        self.commit(*r);
        true
    }

    /// Admits the head of the queue if it fits; how many tokens it takes
    /// from `budget`. A hit in the prefix cache is reused (never the last
    /// token: it must be computed to sample). As vLLM does by default
    /// (`scheduler_reserve_full_isl`), the request is admitted only when
    /// blocks for all its tokens are free, not only for its first chunk.
    fn admit(&mut self, budget: u32) -> Option<u32> {
        let b = self.cfg.block_size.max(1);
        let head = self.waiting.front_mut()?;
        let tokens = head.tokens();
        let usable = ((tokens - 1) / b) as usize;
        head.hash_blocks(usable, b as usize);
        let hits = self.pool.lookup(&head.hashes[..usable]);
        let cached = hits.len() as u32 * b;
        let new = (tokens - cached).min(budget);
        let evictable = self.pool.evictable(&hits);
        let whole = self.blocks_for(tokens) - hits.len() + evictable;
        if whole > self.pool.free() {
            return None;
        }
        let mut seq = self.waiting.pop_front().expect("checked above");
        for &i in &hits {
            self.pool.reuse(i);
        }
        seq.committed = hits.len();
        seq.blocks = hits;
        let fresh = self.blocks_for(cached + new) - seq.blocks.len();
        for _ in 0..fresh {
            let i = self.pool.allocate().expect("counted above");
            seq.blocks.push(i);
        }
        if seq.preemptions == 0 {
            seq.cached_tokens = Some(cached);
            self.stats.prefix_queries += tokens as u64;
            self.stats.prefix_hits += cached as u64;
            self.stats.prompt_tokens += seq.req.prompt.len() as u64;
        }
        seq.first_scheduled.get_or_insert(self.now);
        seq.computed = cached + new;
        seq.scheduled = new;
        seq.decoding = false;
        self.running.push(seq);
        self.commit(self.running.len() - 1);
        Some(new)
    }

    /// Runs one iteration; `None` when there is nothing to do.
    pub fn step(&mut self) -> Option<Step> {
        if !self.busy() {
            return None;
        }
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        for seq in &mut self.running {
            seq.scheduled = 0;
            seq.decoding = false;
        }
        let preempted_before = self.stats.preemptions;

        // 1. Running requests in admission order, each for the tokens it
        //    lacks: one to decode, or the next chunk of its prefill.
        let mut r = 0;
        while r < self.running.len() && budget > 0 {
            if !self.schedule_running(&mut r, &mut budget) {
                break; // it preempted itself: nothing left to free
            }
            r += 1;
        }
        let preempted = (self.stats.preemptions - preempted_before) as u32;
        // 2. Waiting requests, first come first served, unless this step
        //    had to preempt (vLLM admits none then).
        let mut admitted = 0;
        while preempted == 0 && self.running.len() < self.cfg.max_num_seqs && budget > 0 {
            let Some(n) = self.admit(budget) else {
                break;
            };
            budget -= n;
            admitted += 1;
        }

        let scheduled = self.running.iter().filter(|s| s.scheduled > 0);
        let batch = scheduled.clone().count();
        let context: u64 = scheduled.clone().map(|s| s.computed as u64).sum();
        let prefill: u32 = scheduled.filter(|s| !s.decoding).map(|s| s.scheduled).sum();
        let duration = (self.cfg.step_ms
            + self.cfg.step_ms_per_seq * batch as f64
            + self.cfg.prefill_ms_per_1k * prefill as f64 / 1000.0
            + self.cfg.step_ms_per_1k_context * context as f64 / 1000.0)
            / 1000.0;
        self.now += duration;
        let now = self.now;

        // A request whose computed tokens caught up with its tokens samples
        // one at the end of the step; finished requests leave.
        let mut finished = Vec::new();
        let mut first_tokens = Vec::new();
        let mut r = 0;
        while r < self.running.len() {
            let seq = &mut self.running[r];
            if seq.scheduled == 0 || seq.computed < seq.tokens() {
                r += 1;
                continue;
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
            let seq = self.running.remove(r);
            self.pool.release(&seq.blocks);
            let out = Finished {
                id: seq.req.id,
                prompt_tokens: seq.req.prompt.len() as u32,
                generated: seq.generated,
                ttft: first - seq.arrived,
                e2e: now - seq.arrived,
                queued: seq.first_scheduled.unwrap_or(now) - seq.taken_in,
                cached_tokens: seq.cached_tokens.unwrap_or(0),
                preemptions: seq.preemptions,
            };
            self.stats.successes += 1;
            self.stats.ttft.observe(out.ttft);
            self.stats.e2e.observe(out.e2e);
            self.stats.queue_time.observe(out.queued);
            finished.push(out);
        }
        Some(Step {
            duration,
            batch,
            prefill_tokens: prefill,
            context_tokens: context,
            preempted,
            admitted,
            finished,
            first_tokens,
        })
    }
}

#[cfg(test)]
mod tests;
