//! Cross-checks: what serde cannot see by itself (ranges, duplicates,
//! what each backend needs, keys that contradict each other).

use std::collections::HashMap;
use std::net::SocketAddr;

use super::locate::{line_of, Seg};
use super::{Backend, Config, InstanceConfig, Problem, WindowSetting};
use feeder_actors::ModelType;

/// Flags the vLLM command line must not carry, because a key owns them.
const OWNED_FLAGS: &[(&str, &str)] = &[
    ("--port", "port"),
    ("--gpu-memory-utilization", "gpu_memory_utilization"),
    ("--served-model-name", "served_model_name"),
    ("--scheduling-policy", "scheduling_policy"),
];

struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn at(&mut self, path: &[Seg<'_>], message: impl Into<String>) {
        let key = path.iter().fold(String::new(), |mut acc, seg| {
            match seg {
                Seg::Key(k) if acc.is_empty() => acc.push_str(k),
                Seg::Key(k) => {
                    acc.push('.');
                    acc.push_str(k);
                }
                Seg::Index(i) => acc.push_str(&format!("[{i}]")),
            }
            acc
        });
        let line = line_of(self.text, path);
        self.problems.push(Problem {
            key,
            line,
            message: message.into(),
        });
    }

    fn range_u64(&mut self, path: &[Seg<'_>], v: u64, lo: u64, hi: u64) {
        if v < lo || v > hi {
            self.at(path, format!("{v} is out of range: allowed {lo} to {hi}"));
        }
    }

    /// A share, in (0, 1]; `message` says what it is a share of.
    fn share(&mut self, path: &[Seg<'_>], v: f64, message: impl Into<String>) {
        if !(v > 0.0 && v <= 1.0) {
            self.at(path, message);
        }
    }

    /// An overlap, less than what it overlaps (`limit`, the key `of`).
    fn overlap(&mut self, path: &[Seg<'_>], v: u32, limit: u32, of: &str) {
        if v >= limit {
            self.at(path, format!("{v} must be less than {of} ({limit})"));
        }
    }

    fn range_f64(&mut self, path: &[Seg<'_>], v: f64, lo: f64, hi: f64) {
        if !(v >= lo && v <= hi) {
            self.at(path, format!("{v} is out of range: allowed {lo} to {hi}"));
        }
    }
}

fn key(k: &str) -> Seg<'_> {
    Seg::Key(k)
}

/// Every problem in `config` (already parsed from `text`).
pub(crate) fn check(config: &Config, text: &str) -> Vec<Problem> {
    let mut c = Checker {
        text,
        problems: Vec::new(),
    };
    let q = &config.queue;
    c.range_u64(&[key("queue"), key("lease_s")], q.lease_s, 1, 86_400);
    c.range_u64(
        &[key("queue"), key("reclaim_interval_s")],
        q.reclaim_interval_s,
        1,
        3_600,
    );
    c.range_u64(&[key("queue"), key("heartbeat_s")], q.heartbeat_s, 1, 600);
    c.range_u64(
        &[key("queue"), key("heartbeat_timeout_s")],
        q.heartbeat_timeout_s,
        2,
        3_600,
    );
    if q.heartbeat_timeout_s <= q.heartbeat_s.saturating_mul(2) {
        c.at(
            &[key("queue"), key("heartbeat_timeout_s")],
            format!(
                "is {} s, not more than two heartbeats (queue.heartbeat_s = {} s): a daemon that is only slow would be taken for dead; make it at least three heartbeats",
                q.heartbeat_timeout_s, q.heartbeat_s
            ),
        );
    }
    if let Some(url) = &q.database_url {
        if let Err(e) = super::DatabaseUrl::parse(url) {
            c.at(&[key("queue"), key("database_url")], e);
        }
    }
    if let Some(id) = &q.daemon_id {
        if id.is_empty() || id.len() > 200 || id.contains('/') || id.chars().any(char::is_control) {
            c.at(
                &[key("queue"), key("daemon_id")],
                format!("is {id:?}: give a name of 1 to 200 characters without `/` (claims are named `DAEMON/instance/n`), unique among the daemons on this queue"),
            );
        }
    }
    if q.payload_roots.as_ref().is_some_and(|r| r.is_empty()) {
        c.at(
            &[key("queue"), key("payload_roots")],
            "is empty, so no payload could be submitted: list the folders payloads live in, or remove the key to use queue.stage_dir",
        );
    }

    let d = &config.dispatch;
    if let WindowSetting::Fixed(n) = d.window {
        c.range_u64(&[key("dispatch"), key("window")], n.into(), 1, 4096);
    }
    if let Some(n) = d.window_max {
        c.range_u64(&[key("dispatch"), key("window_max")], n.into(), 1, 4096);
    }
    c.range_u64(
        &[key("dispatch"), key("max_attempts")],
        d.max_attempts.into(),
        1,
        100,
    );
    c.range_u64(
        &[key("dispatch"), key("request_timeout_s")],
        d.request_timeout_s,
        1,
        86_400,
    );
    c.range_u64(
        &[key("dispatch"), key("external_poll_ms")],
        d.external_poll_ms,
        10,
        60_000,
    );
    c.range_u64(
        &[key("dispatch"), key("shutdown_grace_s")],
        d.shutdown_grace_s,
        0,
        3_600,
    );
    if !(d.prefix_max_wait_s > 0.0 && d.prefix_max_wait_s <= 86_400.0) {
        c.at(
            &[key("dispatch"), key("prefix_max_wait_s")],
            "must be more than 0 and at most 86400 seconds (one day): how long a job may wait while jobs of other prefixes are grouped ahead of it",
        );
    }
    if !(d.retry_base_s > 0.0 && d.retry_base_s <= 3600.0) {
        c.at(
            &[key("dispatch"), key("retry_base_s")],
            "must be more than 0 and at most 3600 seconds",
        );
    }
    if !(d.retry_max_s >= d.retry_base_s && d.retry_max_s <= 86_400.0) {
        c.at(
            &[key("dispatch"), key("retry_max_s")],
            format!(
                "must be at least dispatch.retry_base_s ({}) and at most 86400 seconds",
                d.retry_base_s
            ),
        );
    }

    let h = &config.health;
    c.range_f64(
        &[key("health"), key("interval_s")],
        h.interval_s,
        0.05,
        3_600.0,
    );
    c.range_u64(
        &[key("health"), key("failure_threshold")],
        h.failure_threshold.into(),
        1,
        100,
    );
    c.range_f64(&[key("health"), key("timeout_s")], h.timeout_s, 0.05, 600.0);
    c.range_f64(
        &[key("health"), key("restart_backoff_s")],
        h.restart_backoff_s,
        0.01,
        3_600.0,
    );
    if !(h.restart_backoff_max_s >= h.restart_backoff_s && h.restart_backoff_max_s <= 86_400.0) {
        c.at(
            &[key("health"), key("restart_backoff_max_s")],
            format!(
                "must be at least health.restart_backoff_s ({}) and at most 86400 seconds",
                h.restart_backoff_s
            ),
        );
    }
    c.range_f64(
        &[key("health"), key("restart_reset_s")],
        h.restart_reset_s,
        0.0,
        86_400.0,
    );
    c.range_u64(
        &[key("health"), key("crash_loop_restarts")],
        h.crash_loop_restarts.into(),
        1,
        1_000,
    );
    c.range_f64(
        &[key("health"), key("crash_loop_window_s")],
        h.crash_loop_window_s,
        1.0,
        86_400.0,
    );
    c.range_u64(
        &[key("health"), key("poison_after_crashes")],
        h.poison_after_crashes.into(),
        1,
        100,
    );
    c.range_f64(
        &[key("servers"), key("stop_grace_s")],
        config.servers.stop_grace_s,
        0.0,
        3_600.0,
    );

    if let Some((name, message)) = config.api.problem() {
        c.at(&[key("api"), key(name)], message);
    }
    let admin_port = match config.admin.listen.parse::<SocketAddr>() {
        Ok(addr) => Some(addr.port()),
        Err(_) => {
            c.at(
                &[key("admin"), key("listen")],
                format!(
                    "`{}` is not an address: write IP:PORT, e.g. \"127.0.0.1:9400\"",
                    config.admin.listen
                ),
            );
            None
        }
    };

    let a = &config.allocator;
    for (name, v) in [
        ("shared_memory_utilization", a.shared_memory_utilization),
        ("solo_memory_utilization", a.solo_memory_utilization),
    ] {
        c.share(
            &[key("allocator"), key(name)],
            v,
            format!("{v} is out of range: a share of GPU memory in (0, 1]"),
        );
    }

    c.range_f64(
        &[key("allocator"), key("interval_s")],
        a.interval_s,
        0.05,
        3_600.0,
    );
    if a.shared_memory_utilization * 2.0 > 1.0 {
        c.at(
            &[key("allocator"), key("shared_memory_utilization")],
            format!(
                "{} is too much: under `shared`, two servers each take this share of one GPU, so it must be at most 0.5",
                a.shared_memory_utilization
            ),
        );
    }

    let g = &config.gpu;
    c.range_u64(
        &[key("gpu"), key("interval_ms")],
        g.interval_ms,
        100,
        60_000,
    );
    if g.temp_clear_c >= g.temp_alert_c {
        c.at(
            &[key("gpu"), key("temp_clear_c")],
            format!(
                "{} °C must be below gpu.temp_alert_c ({} °C), or alerts could never clear",
                g.temp_clear_c, g.temp_alert_c
            ),
        );
    }
    c.share(
        &[key("gpu"), key("thermal_window_factor")],
        g.thermal_window_factor,
        "must be in (0, 1]: the share of the window kept while hot",
    );

    let ch = &config.chunk;
    c.range_u64(
        &[key("chunk"), key("tokens")],
        ch.tokens.into(),
        16,
        1_000_000,
    );
    c.overlap(
        &[key("chunk"), key("overlap")],
        ch.overlap,
        ch.tokens,
        "chunk.tokens",
    );
    c.range_u64(
        &[key("chunk"), key("tile_px")],
        ch.tile_px.into(),
        32,
        16_384,
    );
    c.overlap(
        &[key("chunk"), key("tile_overlap_px")],
        ch.tile_overlap_px,
        ch.tile_px,
        "chunk.tile_px",
    );
    c.share(
        &[key("chunk"), key("min_success_ratio")],
        ch.min_success_ratio,
        "must be in (0, 1]: the share of fragments that must succeed",
    );

    if config.logging.level.trim().is_empty() {
        c.at(
            &[key("logging"), key("level")],
            "is empty: use trace, debug, info, warn or error",
        );
    }

    check_instances(&mut c, config, admin_port);
    check_gpu_layout(&mut c, config);
    c.problems
}

/// Each launched instance's GPUs and parallel sizes, and GPUs whose memory
/// no strategy can share out among the instances on them.
fn check_gpu_layout(c: &mut Checker<'_>, config: &Config) {
    let launched: Vec<(usize, &InstanceConfig)> = config
        .instances
        .iter()
        .enumerate()
        .filter(|(_, i)| i.backend != Backend::External)
        .collect();
    for &(i, inst) in &launched {
        let at = |k: &'static str| [key("instances"), Seg::Index(i), key(k)];
        let mut seen = Vec::new();
        for g in &inst.gpu_ids {
            if seen.contains(g) {
                c.at(
                    &at("gpu_ids"),
                    format!("GPU {g} is listed twice: list each GPU once"),
                );
            }
            seen.push(*g);
        }
        let n = inst.gpu_ids.len();
        let size = |c: &mut Checker<'_>, names: &[&str]| -> Option<usize> {
            match inst.flag(names)? {
                Some(v) => {
                    match v.parse::<usize>() {
                        Ok(k) if k >= 1 => Some(k),
                        _ => {
                            c.at(&at("args"), format!("{} `{v}` is not a size: give a whole number of GPUs, at least 1", names[0]));
                            None
                        }
                    }
                }
                None => {
                    c.at(
                        &at("args"),
                        format!("{} has no value: give a whole number of GPUs", names[0]),
                    );
                    None
                }
            }
        };
        let tp_set = size(c, super::TP_FLAGS);
        let pp = size(c, super::PP_FLAGS).unwrap_or(1);
        if n == 0 {
            continue;
        }
        let tp = tp_set.unwrap_or((n / pp).max(1));
        if tp * pp != n {
            c.at(
                &at("gpu_ids"),
                format!(
                    "lists {n} GPU{} but the server would use {tp} × {pp} = {} (tensor-parallel × pipeline-parallel size): \
                     list exactly the GPUs it runs on, or leave --tensor-parallel-size out of args (gpu-feeder sets it to the number of GPUs)",
                    if n == 1 { "" } else { "s" },
                    tp * pp
                ),
            );
        } else if let Some(heads) = inst.model.as_deref().and_then(attention_heads) {
            if tp > 1 && heads % tp as u64 != 0 {
                c.at(
                    &at("gpu_ids"),
                    format!(
                        "tensor-parallel size {tp} does not divide the model's {heads} attention heads (num_attention_heads in {}/config.json): \
                         vLLM would refuse to start; use a number of GPUs that divides {heads}",
                        inst.model.as_deref().unwrap_or_default()
                    ),
                );
            }
        }
    }
    // Memory on each GPU: at the start every instance runs as configured;
    // with the allocator, a GPU group with both kinds runs them all at the
    // shared share, or one kind's at the solo share.
    let gpus: std::collections::BTreeSet<u32> = launched
        .iter()
        .flat_map(|(_, i)| i.gpu_ids.iter().copied())
        .collect();
    let ids: Vec<&[u32]> = launched.iter().map(|(_, i)| i.gpu_ids.as_slice()).collect();
    let groups = feeder_actors::allocator::gpu_groups(&ids);
    let staggered: std::collections::HashSet<usize> = staggered_starts(config)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    let mut reported: std::collections::HashSet<(usize, usize)> = Default::default();
    for g in gpus {
        let on: Vec<(usize, &InstanceConfig)> = launched
            .iter()
            .filter(|(_, i)| i.gpu_ids.contains(&g))
            .copied()
            .collect();
        let mut layouts: Vec<(String, Vec<Share<'_>>)> = vec![(
            "as configured (strategy static, at the start)".into(),
            on.iter()
                .map(|&(k, i)| (k, i, i.gpu_memory_utilization))
                .collect(),
        )];
        if config.allocator.enabled {
            // The group of GPU `g`: those on it, and those whose GPUs
            // overlap theirs, transitively.
            let group = groups
                .iter()
                .find(|grp| grp.iter().any(|&k| launched[k].1.gpu_ids.contains(&g)))
                .map_or(&[][..], Vec::as_slice);
            let both = [ModelType::Think, ModelType::Vision]
                .iter()
                .all(|m| group.iter().any(|&k| launched[k].1.model_type == *m));
            if both {
                let a = &config.allocator;
                layouts.push((
                    format!(
                        "under strategy shared (allocator.shared_memory_utilization = {})",
                        a.shared_memory_utilization
                    ),
                    on.iter()
                        .map(|&(k, i)| (k, i, a.shared_memory_utilization))
                        .collect(),
                ));
                for m in [ModelType::Think, ModelType::Vision] {
                    layouts.push((
                        format!(
                            "under strategy {m} (allocator.solo_memory_utilization = {})",
                            a.solo_memory_utilization
                        ),
                        on.iter()
                            .filter(|(_, i)| i.model_type == m)
                            .map(|&(k, i)| (k, i, a.solo_memory_utilization))
                            .collect(),
                    ));
                }
            }
        }
        for (k, (when, shares)) in layouts.into_iter().enumerate() {
            let total: f64 = shares.iter().map(|s| s.2).sum();
            if total <= 1.0 + 1e-9 || shares.len() < 2 {
                continue;
            }
            // As configured, sleepers that take turns are launched one
            // after the other (see `staggered_starts`), with the allocator
            // to wake them in turn.
            let turns = shares.iter().all(|(i, _, _)| staggered.contains(i));
            if k == 0 && turns && config.allocator.enabled {
                continue;
            }
            if k == 0 && turns {
                let (a, b) = (shares[0].0, shares[1].0);
                if reported.insert((a, b)) {
                    c.at(
                        &[key("allocator"), key("enabled")],
                        format!(
                            "is false, but `{}` and `{}` on GPU {g} ({total:.2} of its memory) can only run in turns: \
                             with sleep mode they would launch one after the other, and only the allocator wakes the one asleep; \
                             enable the allocator, or lower their gpu_memory_utilization",
                            config.instances[a].name, config.instances[b].name
                        ),
                    );
                }
                continue;
            }
            let (a, b) = (shares[0].0, shares[1].0);
            if !reported.insert((a, b)) {
                continue;
            }
            let list: Vec<String> = shares
                .iter()
                .map(|(k, i, u)| format!("instances[{k}] `{}` {u}", i.name))
                .collect();
            c.at(
                &[key("instances"), Seg::Index(shares[1].0), key("gpu_ids")],
                format!(
                    "GPU {g} is shared by `{}` and `{}` {when}: {} = {total:.2} of its memory, more than it has; \
                     lower their gpu_memory_utilization (or the allocator's shares), or put them on GPUs of their own",
                    config.instances[a].name,
                    config.instances[b].name,
                    list.join(" + ")
                ),
            );
        }
    }
}

/// The staggered starts of `config` (sleep-mode instances whose configured
/// memory shares cannot all be resident on their GPUs at once): each
/// group's steps, as indices into `config.instances`, think first.
pub(crate) fn staggered_starts(config: &Config) -> Vec<Vec<Vec<usize>>> {
    let launched: Vec<usize> = (0..config.instances.len())
        .filter(|&i| config.instances[i].backend != Backend::External)
        .collect();
    let footprints: Vec<feeder_actors::allocator::Footprint<'_>> = launched
        .iter()
        .map(|&i| {
            let inst = &config.instances[i];
            feeder_actors::allocator::Footprint {
                model: inst.model_type,
                gpu_ids: &inst.gpu_ids,
                share: inst.gpu_memory_utilization,
                sleep: inst.sleep_mode,
            }
        })
        .collect();
    feeder_actors::allocator::launch_turns_as(&footprints, &launched)
}

/// What `config check` says of each staggered start, in words: which
/// instances share which GPU, and in what order they load.
pub(crate) fn staggered_notes(config: &Config) -> Vec<String> {
    let names = |step: &[usize]| -> String {
        step.iter()
            .map(|&i| config.instances[i].name.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
    };
    staggered_starts(config)
        .into_iter()
        .map(|steps| {
            let all: Vec<usize> = steps.iter().flatten().copied().collect();
            let gpus = feeder_actors::allocator::group_gpus(
                &all.iter()
                    .map(|&i| config.instances[i].gpu_ids.as_slice())
                    .collect::<Vec<_>>(),
                &(0..all.len()).collect::<Vec<_>>(),
            );
            // The first GPU whose shares do not fit, for the sum shown.
            let (gpu, shares) = gpus
                .iter()
                .map(|&g| {
                    let on: Vec<f64> = all
                        .iter()
                        .map(|&i| &config.instances[i])
                        .filter(|x| x.gpu_ids.contains(&g))
                        .map(|x| x.gpu_memory_utilization)
                        .collect();
                    (g, on)
                })
                .find(|(_, on)| on.iter().sum::<f64>() > 1.0 + 1e-9)
                .unwrap_or_default();
            let sum: Vec<String> = shares.iter().map(f64::to_string).collect();
            let order: Vec<String> = steps
                .iter()
                .enumerate()
                .map(|(k, step)| {
                    let who = names(step);
                    let verb = if step.len() == 1 { "loads" } else { "load" };
                    if k + 1 < steps.len() {
                        let rest = if step.len() == 1 { "sleeps" } else { "sleep" };
                        format!("{who} {verb}, {rest}")
                    } else {
                        format!("then {who} {verb}")
                    }
                })
                .collect();
            let mut note = format!(
                "{} share GPU {gpu} ({} > 1): they launch one after the other; {}",
                names(&all),
                sum.join(" + "),
                order.join(", ")
            );
            let solo = config.allocator.solo_memory_utilization;
            let differ: Vec<&str> = all
                .iter()
                .map(|&i| &config.instances[i])
                .filter(|x| (x.gpu_memory_utilization - solo).abs() > 1e-9)
                .map(|x| x.name.as_str())
                .collect();
            if differ.is_empty() {
                note.push_str(", and every switch after is a sleep and a wake");
            } else {
                note.push_str(&format!(
                    "; allocator.solo_memory_utilization = {solo} differs from the share of {}, \
                     so the first switch to each relaunches it at {solo} (set it to their share to switch by wakes only)",
                    differ.join(" and ")
                ));
            }
            note
        })
        .collect()
}

/// An instance's share of a GPU's memory: its index, itself, the share.
type Share<'a> = (usize, &'a InstanceConfig, f64);

/// `num_attention_heads` of a model in a local directory (its
/// `config.json`, or the `text_config` of a vision-language model).
fn attention_heads(model: &str) -> Option<u64> {
    let text = std::fs::read_to_string(std::path::Path::new(model).join("config.json")).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    doc["num_attention_heads"]
        .as_u64()
        .or_else(|| doc["text_config"]["num_attention_heads"].as_u64())
}

fn check_instances(c: &mut Checker<'_>, config: &Config, admin_port: Option<u16>) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut ports: HashMap<u16, usize> = HashMap::new();
    for (i, inst) in config.instances.iter().enumerate() {
        let at = |k: &'static str| [key("instances"), Seg::Index(i), key(k)];
        let valid_name = !inst.name.is_empty()
            && inst
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid_name {
            c.at(&at("name"), format!("`{}` is not a valid name: use letters, digits, '-', '_' or '.' (it names the container gpu-feeder-<name>)", inst.name));
        } else if let Some(first) = names.insert(&inst.name, i) {
            c.at(
                &at("name"),
                format!(
                    "`{}` is also the name of instances[{first}]: names must be unique",
                    inst.name
                ),
            );
        }
        if inst.served_model_name.trim().is_empty() {
            c.at(
                &at("served_model_name"),
                "is empty: give the model name the server answers to",
            );
        }
        if inst.sleep_mode && inst.backend == Backend::External {
            c.at(
                &at("sleep_mode"),
                "is for servers gpu-feeder launches (docker or process): an external server is never switched",
            );
        }
        if inst.sleep_mode && inst.args.iter().any(|a| a == "--enable-sleep-mode") {
            c.at(
                &at("args"),
                "--enable-sleep-mode is added by sleep_mode = true: remove it from args",
            );
        }
        if inst
            .weights_gib
            .is_some_and(|g| !(g > 0.0 && g.is_finite()))
        {
            c.at(&at("weights_gib"), "must be a size in GiB above 0");
        }
        match inst.backend {
            Backend::External => {
                match &inst.url {
                    None => c.at(&at("url"), "backend = \"external\" needs url = \"http://HOST:PORT\" (the server's base URL)"),
                    Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() < 10 => {
                        c.at(&at("url"), format!("`{u}` is not an http:// or https:// URL"))
                    }
                    Some(_) => {}
                }
            }
            backend => {
                if inst.url.is_some() {
                    c.at(&at("url"), format!("is only for backend = \"external\"; a {backend} instance's URL is derived from its port"));
                }
                match inst.port {
                    None => c.at(&at("port"), format!("backend = \"{backend}\" needs a port (the server listens on it)")),
                    Some(0) => c.at(&at("port"), "0 is not a port the server can be reached on: choose 1 to 65535"),
                    Some(_) => {}
                }
                if backend == Backend::Process && inst.command.is_empty() {
                    c.at(&at("command"), "backend = \"process\" needs a command, e.g. command = [\"vllm\", \"serve\"]");
                }
                if backend == Backend::Docker && inst.image.trim().is_empty() {
                    c.at(&at("image"), "backend = \"docker\" needs an image, e.g. \"vllm/vllm-openai:latest\"");
                }
            }
        }
        if let Some(port) = inst.port {
            if let Some(first) = ports.insert(port, i) {
                c.at(&at("port"), format!("port {port} is also used by instances[{first}]: every instance needs its own port"));
            } else if Some(port) == admin_port {
                c.at(
                    &at("port"),
                    format!("port {port} is the admin endpoint's (admin.listen): choose another"),
                );
            }
        }
        let g = inst.gpu_memory_utilization;
        c.share(
            &at("gpu_memory_utilization"),
            g,
            format!("{g} is out of range: a share of GPU memory in (0, 1], e.g. 0.75"),
        );
        for (flag, owner) in OWNED_FLAGS {
            if inst
                .args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
            {
                c.at(&at("args"), format!("contains {flag}: set the key `{owner}` instead (gpu-feeder passes the flag itself)"));
            }
        }
        if let Some(WindowSetting::Fixed(n)) = inst.window {
            if !(1..=4096).contains(&n) {
                c.at(
                    &at("window"),
                    format!("{n} is out of range: allowed \"auto\" or 1 to 4096"),
                );
            }
        }
        if inst.max_tokens == 0 {
            c.at(&at("max_tokens"), "must be at least 1");
        }
        if !(0.0..=2.0).contains(&inst.temperature) {
            c.at(
                &at("temperature"),
                format!("{} is out of range: 0 to 2", inst.temperature),
            );
        }
        if inst.then == Some(inst.model_type) {
            c.at(
                &at("then"),
                format!(
                    "a {} instance cannot hand its results to {} again: that would loop",
                    inst.model_type, inst.model_type
                ),
            );
        }
        if inst.startup_timeout_s == 0 {
            c.at(
                &at("startup_timeout_s"),
                "must be at least 1 second (model loads take minutes: 900 is typical)",
            );
        }
    }
}
