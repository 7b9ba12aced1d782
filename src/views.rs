//! The JSON views of jobs, queue statistics and the running pipeline's
//! status: one rendering that the CLI's `--json`, the admin endpoint and
//! the MCP tools all print, so that they cannot drift apart.

use serde_json::{json, Value};

use feeder_actors::allocator::{AllocatorStatus, GroupStatus};
use feeder_actors::gpu::GpuSnapshot;
use feeder_actors::supervisor::FeederStatus;
use feeder_actors::{Job, QueueStats};

use crate::config::Config;

/// A job as `--json` prints it (the `status --json` contract).
pub fn job_json(job: &Job) -> Value {
    serde_json::to_value(job).expect("a job serializes")
}

/// `stats --json`.
pub fn stats_json(stats: &QueueStats) -> Value {
    let mut jobs = serde_json::Map::new();
    let mut ages = serde_json::Map::new();
    for (model, s) in &stats.models {
        jobs.insert(
            model.to_string(),
            serde_json::to_value(s.counts).expect("counts"),
        );
        ages.insert(
            model.to_string(),
            s.oldest_pending_age
                .map_or(Value::Null, |d| json!(d.as_secs_f64())),
        );
    }
    json!({ "jobs": jobs, "oldest_pending_age_s": ages })
}

/// What the window controller read last, for `instances --json`.
fn window_signals(s: &feeder_actors::window::WindowSignals) -> Value {
    json!({
        "running": s.metrics.map(|m| m.running),
        "waiting": s.metrics.map(|m| m.waiting),
        "kv_cache_usage": s.metrics.map(|m| m.kv_usage),
        "kv_cache_tokens": s.metrics.and_then(|m| m.kv_cache_tokens),
        // Since the server started: vLLM's hits over queries, in tokens.
        "prefix_cache_hit_rate": s
            .metrics
            .and_then(|m| m.prefix_cache)
            .filter(|(_, queries)| *queries > 0.0)
            .map(|(hits, queries)| hits / queries),
        "preemptions_total": s.metrics.map(|m| m.preemptions_total),
        "new_preemptions": s.new_preemptions,
        "generation_tokens_per_s": s.tokens_per_s,
        "ceiling": s.ceiling,
        "median_latency_ms": s.median_latency.map(|d| d.as_secs_f64() * 1000.0),
        "server_queue_share": s.queue_share,
    })
}

/// The `/v1/status` document.
pub fn status_json(config: &Config, status: &FeederStatus, stats: Option<&QueueStats>) -> Value {
    let instances: Vec<Value> = config
        .instances
        .iter()
        .map(|inst| {
            let s = status.instances.iter().find(|s| s.name == inst.name);
            let d = status.dispatch.iter().find(|d| d.instance == inst.name);
            let h = status.health.iter().find(|h| h.instance == inst.name);
            let history: Vec<Value> = s
                .map(|s| {
                    s.history
                        .iter()
                        .map(|t| {
                            json!({
                                "from": t.from.as_str(),
                                "to": t.to.as_str(),
                                "reason": t.reason,
                                "at": t.at
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0.0, |d| d.as_secs_f64()),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "name": inst.name,
                "model_type": inst.model_type,
                "state": s.map_or("starting", |s| s.state.as_str()),
                "reason": s.map(|s| s.reason.clone()),
                "in_state_s": s.map(|s| s.in_state_for.as_secs_f64()),
                "backend": inst.backend.to_string(),
                "model": inst.model.clone().unwrap_or_else(|| inst.served_model_name.clone()),
                "gpu_ids": inst.gpu_ids,
                "url": inst.base_url(),
                "container_id": s.and_then(|s| s.container_id.clone()),
                "adopted": s.is_some_and(|s| s.adopted),
                "restarts": s.map_or(0, |s| s.restarts),
                "gpu_memory_utilization": s.and_then(|s| s.plan.as_ref()).map(|p| p.gpu_memory_utilization),
                "last_error": s.and_then(|s| s.last_error.clone()),
                "probes": h.map(|h| h.checks.clone()),
                "history": history,
                "crashed": d.map_or(0, |d| d.crashed),
                "aborted": d.map_or(0, |d| d.aborted),
                "warm_prefixes": d.map_or(0, |d| d.warm_prefixes),
                "priority_holds": d.map_or(0, |d| d.holds),
                "recalled": d.map_or(0, |d| d.recalled),
                "in_flight": d.map_or(0, |d| d.in_flight),
                "buffered": d.map_or(0, |d| d.buffered),
                "window": d.map_or(0, |d| d.window),
                "window_mode": d.map(|d| if d.auto_window { "auto" } else { "fixed" }),
                "window_max": d.map(|d| d.max_window),
                "window_reason": d.map(|d| d.window_reason.clone()),
                "window_signals": d.map(|d| window_signals(&d.window_signals)),
                "sent": d.map_or(0, |d| d.sent),
                "completed": d.map_or(0, |d| d.completed),
            })
        })
        .collect();
    let allocator = status.allocator.as_ref();
    json!({
        "strategy": allocator.map_or("static", |a| a.strategy.as_str()),
        "allocator": allocator.map(|a| json!({
            "strategy": a.strategy.as_str(),
            "since": unix(a.since),
            "why": a.why,
            "pinned": a.pinned.map(|p| p.as_str()),
            "switching": a.switching,
            "switches": a.switches,
            "problems": a.problems,
            "switch_costs": a.costs.iter().map(|c| (c.model.as_str().to_string(), json!({
                "load_s": c.load.map(|d| d.as_secs_f64()),
                "wake_s": c.wake.map(|d| d.as_secs_f64()),
            }))).collect::<serde_json::Map<_, _>>(),
            "groups": groups_json(&a.groups),
        })),
        "instances": instances,
        "gpus": status.gpus.as_ref().map_or_else(Vec::new, gpus_json),
        "gpu_unavailable": status.gpus.as_ref().and_then(|g| g.unavailable.clone()),
        "gpu_alerts": status.gpus.as_ref().map_or(0, |g| g.alerts),
        "queue": stats.map(stats_json),
    })
}

/// Each GPU group's strategy, as `instances --json` and `strategy show
/// --json` show it.
pub fn groups_json(groups: &[GroupStatus]) -> Vec<Value> {
    groups
        .iter()
        .map(|g| {
            json!({
                "group": g.name,
                "gpu_ids": g.gpu_ids,
                "instances": g.instances,
                "strategy": g.strategy.as_str(),
                "since": unix(g.since),
                "why": g.why,
                "pinned": g.pinned.map(|p| p.as_str()),
                "switching": g.switching,
                "switches": g.switches,
                "problems": g.problems,
                "recent": g.recent.iter().map(|r| json!({
                    "from": r.from.as_str(),
                    "to": r.to.as_str(),
                    "at": unix(r.at),
                    "took_s": r.took.map(|d| d.as_secs_f64()),
                    "problems": r.problems,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn unix(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The GPUs of a snapshot, as `/v1/status`, `gpu --json` and MCP show them.
pub fn gpus_json(g: &GpuSnapshot) -> Vec<Value> {
    g.gpus
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).expect("a reading serializes");
            v["hot"] = json!(g.hot.contains(&r.index));
            v["read_at"] = json!(unix(g.at));
            v
        })
        .collect()
}

/// The allocator's answer to a pin (`POST /v1/strategy`).
pub fn pinned_json(s: &AllocatorStatus) -> Value {
    json!({
        "strategy": s.strategy.as_str(),
        "pinned": s.pinned.map(|p| p.as_str()),
        "switching": s.switching,
        "why": s.why,
        "groups": groups_json(&s.groups),
    })
}

/// The recently failed jobs, newest first, with why, for the status page.
pub fn failures_json(failed: &[Job]) -> Vec<Value> {
    failed
        .iter()
        .map(|j| {
            json!({
                "id": j.id,
                "model_type": j.model_type,
                "error": j.error,
                "attempts": j.attempts,
                "finished_at": j.finished_at.map(|t| t.0 as f64 / 1000.0),
            })
        })
        .collect()
}

/// The jobs the store found stuck past their lease (its clock decides, the
/// database's where it keeps time), with how long overdue by `now`, for
/// the status page.
pub fn stuck_json(stuck: &[Job], now: feeder_actors::Timestamp) -> Vec<Value> {
    stuck
        .iter()
        .map(|j| {
            json!({
                "id": j.id,
                "model_type": j.model_type,
                "claimed_by": j.claimed_by,
                "attempts": j.attempts,
                "overdue_s": j.lease_until.map(|u| (now.0 - u.0).max(0) as f64 / 1000.0),
            })
        })
        .collect()
}
