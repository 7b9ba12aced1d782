//! Random workloads and engines for the window benchmark, drawn from a
//! seed, so that the adaptive window is judged on work it was not tuned
//! on: the same seed always gives the same scenario.
//!
//! A scenario is an engine (`EngineConfig`: KV cache, block size, slots,
//! step budget and step times) and a stream of jobs that arrive in bursts.
//! Each job belongs to one of one to three classes drawn for the seed:
//! - **chat**: log-normal prompt (median 100–600 tokens) and output
//!   (median 40–300), often behind a shared system prompt (the prefix cache
//!   serves it);
//! - **document**: long log-normal prompts (median 1,000–6,000 tokens),
//!   outputs of 100–500;
//! - **image**: one image part (the seed's image size, 256–1,600 tokens)
//!   and a short prompt, outputs of 100–600.
//!
//! Outputs have a Pareto tail besides (one in twenty is 2–10 times as long
//! as its class's draw), as real traffic has, and a request never needs
//! more than a quarter of the KV cache. Jobs arrive in bursts of one class
//! (the mix shifts as the run goes), a backlog first, at an offered load of
//! 0.8–2 times what the engine roughly does at its best, so some runs have
//! gaps where the work runs out.
//!
//! The engine's ranges span a GPU-like server and vLLM's CPU build: step
//! 3–20 ms, 0.01–0.1 ms per running request, 10–150 ms per 1,000 prefill
//! tokens, 0–0.05 ms per 1,000 tokens of context, blocks of 16, 32 or 128
//! tokens, 64–1,024 slots, 2,048–16,384 tokens a step, and a KV cache that
//! holds 30–600 of the seed's mean requests; a request spends 0–20 ms each
//! way between the feeder and the engine.

use gpu_feeder::sim::engine::EngineConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One job of a scenario.
#[derive(Clone, Debug, Default)]
pub struct GenJob {
    /// When it is submitted, engine seconds after the start.
    pub arrival: f64,
    /// Its class's name.
    pub class: &'static str,
    /// A shared prefix: which of the class's prefixes, and its tokens.
    pub prefix: Option<(u32, u32)>,
    /// Tokens of its image part, if it has one.
    pub image: Option<u32>,
    /// Tokens of its own text.
    pub text: u32,
    /// Tokens it generates.
    pub max_tokens: u32,
}

impl GenJob {
    /// Its prompt's tokens in all.
    pub fn prompt_tokens(&self) -> u32 {
        self.prefix.map_or(0, |(_, t)| t) + self.image.unwrap_or(0) + self.text
    }

    /// Its prompt as token ids for the engine model: the shared prefix's
    /// tokens are the same for every job behind it (`salt` tells one
    /// class's prefixes from another's); the rest are its own (`id`).
    pub fn prompt(&self, id: u64, salt: u64) -> Vec<u64> {
        let mut p = Vec::with_capacity(self.prompt_tokens() as usize);
        if let Some((k, t)) = self.prefix {
            p.extend((0..t as u64).map(|i| mix(mix(salt, k as u64 + 1), i)));
        }
        let own = self.image.unwrap_or(0) + self.text;
        p.extend((0..own as u64).map(|i| mix(mix(u64::MAX - id, 7), i)));
        p
    }
}

/// A stable hash of two numbers (splitmix64 of their mix).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A class of jobs: how its lengths are drawn.
#[derive(Clone, Debug)]
pub struct Class {
    /// Its name.
    pub name: &'static str,
    /// Its share of the jobs.
    pub weight: f64,
    /// Median and log-normal sigma of its own prompt text, tokens.
    pub prompt: (f64, f64),
    /// Median and log-normal sigma of its output, tokens.
    pub out: (f64, f64),
    /// Tokens of an image part, if its jobs have one.
    pub image: Option<u32>,
    /// Shared prefixes: how many different ones, and their tokens.
    pub prefix: Option<(u32, u32)>,
}

/// An engine and the work it is given.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// What it was drawn from (0 for the long-document example).
    pub seed: u64,
    /// The engine.
    pub engine: EngineConfig,
    /// Seconds a request spends between the feeder and the engine, each
    /// way.
    pub way: f64,
    /// Tokens of every image part (the simulator's `--image-tokens`).
    pub image_tokens: u32,
    /// The classes its jobs come from.
    pub classes: Vec<Class>,
    /// The bulk jobs, in the order they arrive.
    pub jobs: Vec<GenJob>,
    /// The high-priority job submitted halfway.
    pub urgent: GenJob,
    /// Engine seconds of a run.
    pub seconds: f64,
}

/// Engine seconds of each run of a scenario.
pub const RUN_SECONDS: f64 = 200.0;

/// A log-normal draw with this median and sigma (Box–Muller).
fn log_normal(rng: &mut StdRng, median: f64, sigma: f64) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (sigma * z).exp()
}

/// Log-uniform between `lo` and `hi`.
fn log_uniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    (rng.random_range(lo.ln()..hi.ln())).exp()
}

impl Scenario {
    /// The scenario of `seed`.
    pub fn draw(seed: u64) -> Scenario {
        let mut rng = StdRng::seed_from_u64(seed);
        // The classes.
        let image_tokens = rng.random_range(256..=1_600);
        let mut classes = Vec::new();
        let n = rng.random_range(1..=3);
        let mut kinds = vec![0u8, 1, 2];
        while classes.len() < n {
            let k = kinds.remove(rng.random_range(0..kinds.len()));
            let weight = rng.random_range(0.2..1.0);
            classes.push(match k {
                0 => Class {
                    name: "chat",
                    weight,
                    prompt: (log_uniform(&mut rng, 100.0, 600.0), 0.8),
                    out: (log_uniform(&mut rng, 40.0, 300.0), 0.7),
                    image: None,
                    prefix: rng
                        .random_bool(0.6)
                        .then(|| (rng.random_range(1..=4), rng.random_range(200..=1_500))),
                },
                1 => Class {
                    name: "document",
                    weight,
                    prompt: (log_uniform(&mut rng, 1_000.0, 6_000.0), 0.5),
                    out: (log_uniform(&mut rng, 100.0, 500.0), 0.5),
                    image: None,
                    prefix: rng
                        .random_bool(0.3)
                        .then(|| (1, rng.random_range(100..=600))),
                },
                _ => Class {
                    name: "image",
                    weight,
                    prompt: (log_uniform(&mut rng, 20.0, 100.0), 0.4),
                    out: (log_uniform(&mut rng, 100.0, 600.0), 0.4),
                    image: Some(image_tokens),
                    prefix: None,
                },
            });
        }
        // The engine.
        let mean_tokens = mean_request(&classes);
        let block_size = [16, 16, 32, 128][rng.random_range(0..4)];
        let holds = log_uniform(&mut rng, 30.0, 600.0);
        let engine = EngineConfig {
            kv_cache_tokens: (holds * mean_tokens) as u64,
            block_size,
            max_num_seqs: [64, 128, 256, 512, 1024][rng.random_range(0..5)],
            max_num_batched_tokens: [2_048, 4_096, 8_192, 16_384][rng.random_range(0..4)],
            step_ms: log_uniform(&mut rng, 3.0, 20.0),
            step_ms_per_seq: log_uniform(&mut rng, 0.01, 0.1),
            prefill_ms_per_1k: log_uniform(&mut rng, 10.0, 150.0),
            step_ms_per_1k_context: if rng.random_bool(0.5) {
                rng.random_range(0.0..0.05)
            } else {
                0.0
            },
            ..EngineConfig::default()
        };
        let way = rng.random_range(0.0..0.02);
        let mut s = Scenario {
            seed,
            engine,
            way,
            image_tokens,
            classes,
            jobs: Vec::new(),
            urgent: GenJob::default(),
            seconds: RUN_SECONDS,
        };
        let load = rng.random_range(0.8..2.0);
        s.fill(&mut rng, load, true);
        s
    }

    /// A long-document workload that an earlier controller fell short on:
    /// ≈270 prompt tokens, 200 out, a KV cache that holds about 125 such
    /// requests, steps of 10 ms + 0.06 ms per request, prefill 0.15 ms a
    /// token; a backlog, no bursts.
    pub fn example() -> Scenario {
        let mut rng = StdRng::seed_from_u64(0);
        let classes = vec![Class {
            name: "document",
            weight: 1.0,
            prompt: (270.0, 0.0),
            out: (200.0, 0.0),
            image: None,
            prefix: None,
        }];
        let mut s = Scenario {
            seed: 0,
            engine: EngineConfig {
                kv_cache_tokens: 125 * 470,
                max_num_seqs: 1024,
                step_ms: 10.0,
                step_ms_per_seq: 0.06,
                prefill_ms_per_1k: 150.0,
                ..EngineConfig::default()
            },
            way: 0.002,
            image_tokens: 0,
            classes,
            jobs: Vec::new(),
            urgent: GenJob::default(),
            seconds: RUN_SECONDS,
        };
        s.fill(&mut rng, 3.0, false);
        s
    }

    /// Draws the jobs: an offered load of `load` times the engine's rough
    /// best, in bursts of one class (`bursts`) or as one backlog.
    fn fill(&mut self, rng: &mut StdRng, load: f64, bursts: bool) {
        let mean_out = self
            .classes
            .iter()
            .map(|c| c.weight * c.out.0 * (c.out.1 * c.out.1 / 2.0).exp())
            .sum::<f64>()
            / self.classes.iter().map(|c| c.weight).sum::<f64>();
        let jobs_per_s = self.rough_tokens_per_s() / mean_out;
        let total = (jobs_per_s * self.seconds * load).ceil() as usize;
        let mut t = 0.0;
        // A backlog of a fifth of the work (all of it without bursts), then
        // bursts every 2–20 s, each of one class.
        let backlog = if bursts { total / 5 } else { total };
        while self.jobs.len() < backlog {
            let c = self.pick(rng);
            let j = self.job(rng, c, 0.0);
            self.jobs.push(j);
        }
        while self.jobs.len() < total {
            t += rng.random_range(2.0..20.0);
            let c = self.pick(rng);
            let n = ((jobs_per_s * load * rng.random_range(2.0..20.0)) as usize).max(1);
            for _ in 0..n.min(total - self.jobs.len()) {
                let j = self.job(rng, c, t);
                self.jobs.push(j);
            }
        }
        let c = 0;
        self.urgent = self.job(rng, c, self.seconds / 2.0);
        self.urgent.class = "urgent";
    }

    fn pick(&self, rng: &mut StdRng) -> usize {
        let total: f64 = self.classes.iter().map(|c| c.weight).sum();
        let mut x = rng.random_range(0.0..total);
        for (i, c) in self.classes.iter().enumerate() {
            if x < c.weight {
                return i;
            }
            x -= c.weight;
        }
        self.classes.len() - 1
    }

    fn job(&self, rng: &mut StdRng, c: usize, arrival: f64) -> GenJob {
        let class = &self.classes[c];
        let fits = (self.engine.kv_cache_tokens / 4).max(64) as f64;
        let prefix = class
            .prefix
            .map(|(n, t)| (rng.random_range(0..n), t.min(fits as u32 / 4)));
        let image = class.image;
        let fixed = prefix.map_or(0, |(_, t)| t) + image.unwrap_or(0);
        let mut out = log_normal(rng, class.out.0, class.out.1);
        if rng.random_bool(0.05) {
            // The Pareto tail (shape 1.5, from 2×).
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            out *= (2.0 * u.powf(-1.0 / 1.5)).min(10.0);
        }
        let room = (fits - fixed as f64).max(32.0);
        let out = out.clamp(1.0, room / 2.0) as u32;
        let text = log_normal(rng, class.prompt.0, class.prompt.1)
            .clamp(8.0, (room - out as f64).max(8.0)) as u32;
        GenJob {
            arrival,
            class: class.name,
            prefix,
            image,
            text,
            max_tokens: out.max(1),
        }
    }

    /// Tokens per second the engine roughly makes at its best: as many
    /// running as its slots and its KV cache allow, each step's time with
    /// their share of prefill.
    pub fn rough_tokens_per_s(&self) -> f64 {
        let e = &self.engine;
        let per = mean_request(&self.classes);
        let out = self.classes.iter().map(|c| c.weight * c.out.0).sum::<f64>()
            / self.classes.iter().map(|c| c.weight).sum::<f64>();
        let n = (e.max_num_seqs as f64).min(e.kv_cache_tokens as f64 / per * 0.8);
        // A step decodes n and prefills n / out requests' prompts.
        let prefill = n / out * (per - out);
        let step = e.step_ms
            + e.step_ms_per_seq * n
            + e.prefill_ms_per_1k * prefill / 1000.0
            + e.step_ms_per_1k_context * n * per / 2.0 / 1000.0;
        n / (step / 1000.0)
    }

    /// One line that says what it is.
    pub fn describe(&self) -> String {
        let e = &self.engine;
        let classes: Vec<String> = self
            .classes
            .iter()
            .map(|c| {
                format!(
                    "{} {:.0}%: prompt ~{:.0}{}{} → ~{:.0}",
                    c.name,
                    100.0 * c.weight / self.classes.iter().map(|c| c.weight).sum::<f64>(),
                    c.prompt.0,
                    c.image.map_or(String::new(), |t| format!(" + image {t}")),
                    c.prefix
                        .map_or(String::new(), |(n, t)| format!(" + {n}×{t} shared")),
                    c.out.0
                )
            })
            .collect();
        format!(
            "KV {} tokens (blocks of {}), {} seqs, {} tokens/step, step {:.1} ms + {:.3}/seq + {:.0}/1k prefill + {:.3}/1k ctx, way {:.0} ms; {} jobs; {}",
            e.kv_cache_tokens,
            e.block_size,
            e.max_num_seqs,
            e.max_num_batched_tokens,
            e.step_ms,
            e.step_ms_per_seq,
            e.prefill_ms_per_1k,
            e.step_ms_per_1k_context,
            self.way * 1000.0,
            self.jobs.len(),
            classes.join("; ")
        )
    }
}

/// The mean tokens (prompt and output) of a request of these classes.
fn mean_request(classes: &[Class]) -> f64 {
    let w: f64 = classes.iter().map(|c| c.weight).sum();
    classes
        .iter()
        .map(|c| {
            let ln = |(m, s): (f64, f64)| m * (s * s / 2.0).exp();
            c.weight
                * (ln(c.prompt)
                    + ln(c.out)
                    + c.image.unwrap_or(0) as f64
                    + c.prefix.map_or(0.0, |(_, t)| t as f64))
        })
        .sum::<f64>()
        / w
}
