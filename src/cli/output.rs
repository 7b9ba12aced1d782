//! Human and JSON renderings of jobs, statistics and configurations.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use feeder_actors::fragment::Place;
use feeder_actors::{Job, JobStatus, ModelType, QueueStats, Timestamp};

use crate::config::{Backend, Config};

/// "3s", "4m 10s", "2h 5m", "3d 4h".
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn ago(t: Option<Timestamp>, now: Timestamp) -> String {
    t.map_or_else(|| "-".into(), |t| format!("{} ago", age(now.since(t))))
}

fn clip(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        format!("{}…", one_line.chars().take(n).collect::<String>())
    }
}

/// `status` without `--json`.
pub fn job_human(job: &Job, now: Timestamp) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<10} {v}");
    };
    line("job", job.id.to_hex());
    line("status", job.status.to_string());
    line("model", job.model_type.to_string());
    line(
        "attempts",
        format!("{} of {}", job.attempts, job.max_attempts),
    );
    if job.crashes > 0 {
        line(
            "crashes",
            format!(
                "{} (its server went down while it was in flight)",
                job.crashes
            ),
        );
    }
    line("priority", job.priority.to_string());
    line("created", ago(Some(job.created_at), now));
    if let Some(p) = &job.payload_path {
        line("payload", p.display().to_string());
    } else if let Some(inline) = &job.payload_inline {
        line("payload", clip(inline, 100));
    }
    if job.status == JobStatus::Pending {
        if let Some(run_at) = job.run_at.filter(|t| *t > now) {
            line("retry in", age(run_at.since(now)));
        }
    }
    if job.status == JobStatus::Processing {
        if let Some(by) = &job.claimed_by {
            line("claimed by", by.clone());
        }
        if let Some(lease) = job.lease_until {
            line("lease", format!("{} left", age(lease.since(now))));
        }
    }
    if let Some(r) = &job.result_path {
        line("result", r.to_string());
    }
    if let Some(e) = &job.error {
        line("error", e.clone());
    }
    if job.prompt_tokens.is_some() || job.completion_tokens.is_some() {
        line(
            "tokens",
            format!(
                "{} prompt, {} completion",
                job.prompt_tokens.unwrap_or(0),
                job.completion_tokens.unwrap_or(0)
            ),
        );
    }
    if let Some(l) = job.latency_ms {
        line("latency", format!("{l} ms"));
    }
    if let (Some(p), Some(i), Some(n)) = (job.parent_id, job.fragment_index, job.total_fragments) {
        line("parent", format!("{p} (fragment {} of {n})", i + 1));
        match job.place {
            Some(Place::Tokens([a, b])) => line("place", format!("tokens {a}–{b}")),
            Some(Place::Tile(t)) => line(
                "place",
                format!(
                    "tile row {}, column {} ({}×{} px at {}, {})",
                    t.row, t.col, t.width, t.height, t.x, t.y
                ),
            ),
            None => {}
        }
    } else if let Some(n) = job.total_fragments {
        line("fragments", n.to_string());
    }
    if let Some(f) = job.follows {
        line("follows", f.to_hex());
    }
    if let Some(m) = job.then_model {
        line("then", m.to_string());
    }
    if job.status.is_terminal() {
        line("finished", ago(job.finished_at, now));
    }
    out
}

/// `list` without `--json`.
pub fn jobs_table(jobs: &[Job], now: Timestamp) -> String {
    if jobs.is_empty() {
        return "no jobs\n".into();
    }
    let mut out = format!(
        "{:<32}  {:<10}  {:<6}  {:>4}  {:>5}  {:>8}  {}\n",
        "ID", "STATUS", "MODEL", "PRI", "TRIES", "AGE", "RESULT / ERROR"
    );
    for j in jobs {
        let detail = match (&j.result_path, &j.error, j.total_fragments, j.parent_id) {
            (Some(r), _, _, _) => r.to_string(),
            (None, Some(e), _, _) => clip(e, 60),
            (None, None, Some(n), None) => format!("parent of {n} fragments"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<32}  {:<10}  {:<6}  {:>4}  {:>5}  {:>8}  {}",
            j.id.to_hex(),
            j.status.as_str(),
            j.model_type.as_str(),
            j.priority,
            format!("{}/{}", j.attempts, j.max_attempts),
            age(now.since(j.created_at)),
            detail
        );
    }
    out
}

/// `stats` without `--json`.
pub fn stats_table(stats: &QueueStats) -> String {
    let mut out = format!(
        "{:<7} {:>9} {:>11} {:>9} {:>8} {:>10}  {}\n",
        "MODEL", "PENDING", "PROCESSING", "DONE", "FAILED", "CANCELLED", "OLDEST PENDING"
    );
    for model in ModelType::ALL {
        let s = stats.model(model);
        let c = s.counts;
        let _ = writeln!(
            out,
            "{:<7} {:>9} {:>11} {:>9} {:>8} {:>10}  {}",
            model.as_str(),
            c.pending,
            c.processing,
            c.done,
            c.failed,
            c.cancelled,
            s.oldest_pending_age.map_or("-".into(), age)
        );
    }
    out
}

/// What `config check` prints after `OK`.
pub fn config_summary(c: &Config) -> String {
    let mut out = String::new();
    let q = &c.queue;
    let _ = writeln!(out, "  database   {}", q.db_path.display());
    let _ = writeln!(out, "  results    {}", q.results_dir.display());
    let _ = writeln!(out, "  stage      {}", q.stage_dir.display());
    let roots: Vec<String> = q.roots().iter().map(|r| r.display().to_string()).collect();
    let _ = writeln!(out, "  roots      {}", roots.join(", "));
    let _ = writeln!(out, "  admin      {}", c.admin.listen);
    if c.instances.is_empty() {
        let _ = writeln!(
            out,
            "  instances  none (`run` needs at least one [[instances]] table)"
        );
    }
    for i in &c.instances {
        let place = match i.backend {
            Backend::External => i.base_url(),
            Backend::Docker => format!("{} on port {}", i.image, i.port.unwrap_or(0)),
            Backend::Process => {
                format!("`{}` on port {}", i.command.join(" "), i.port.unwrap_or(0))
            }
        };
        let tp = i
            .tensor_parallel_added()
            .map(|n| format!(" · --tensor-parallel-size {n}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  instance   {} ({}, {}): {} · model {} · GPU {:?} at {:.2}{tp}",
            i.name,
            i.model_type,
            i.backend,
            place,
            i.served_model_name,
            i.gpu_ids,
            i.gpu_memory_utilization
        );
    }
    // The GPU groups the allocator decides, each on its own.
    let managed: Vec<_> = c
        .instances
        .iter()
        .filter(|i| i.backend != Backend::External)
        .collect();
    if c.allocator.enabled && !managed.is_empty() {
        let ids: Vec<&[u32]> = managed.iter().map(|i| i.gpu_ids.as_slice()).collect();
        let groups: Vec<String> = feeder_actors::allocator::gpu_groups(&ids)
            .into_iter()
            .map(|g| {
                let gpus = feeder_actors::allocator::group_gpus(&ids, &g);
                let names: Vec<&str> = g.iter().map(|&k| managed[k].name.as_str()).collect();
                let both = g
                    .iter()
                    .any(|&k| managed[k].model_type != managed[g[0]].model_type);
                format!(
                    "{}: {} ({})",
                    feeder_actors::allocator::group_name(&gpus),
                    names.join(", "),
                    if both {
                        "switched by the backlog"
                    } else {
                        "one model: as configured, or idle"
                    }
                )
            })
            .collect();
        let _ = writeln!(out, "  groups     {}", groups.join(" · "));
    }
    for note in c.staggered_starts() {
        let _ = writeln!(out, "  start      {note}");
    }
    if c.api.listen.is_some() && c.queue.database_url.is_some() {
        let _ = writeln!(
            out,
            "  api        files and batches are shared with every daemon on this PostgreSQL queue: api.files_dir ({}) must be one folder they all mount",
            c.api.files_dir(&c.queue.results_dir).display()
        );
    }
    out
}

/// `gpu` without `--json`: one line per GPU.
pub fn gpu_table(gpus: &[feeder_actors::gpu::GpuReading]) -> String {
    let mut out = format!(
        "{:<4} {:<28} {:>6} {:>6} {:>17} {:>8} {:>9}  {}\n",
        "GPU", "NAME", "TEMP", "UTIL", "MEMORY", "POWER", "SM CLOCK", "THROTTLE"
    );
    for g in gpus {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let _ = writeln!(
            out,
            "{:<4} {:<28} {:>6} {:>6} {:>17} {:>8} {:>9}  {}",
            g.index,
            clip(&g.name, 28),
            format!("{} °C", g.temperature_c),
            format!("{} %", g.utilization_pct),
            format!(
                "{:.1}/{:.1} GiB",
                gib(g.memory_used_bytes),
                gib(g.memory_total_bytes)
            ),
            g.power_w.map_or("-".into(), |w| format!("{w:.0} W")),
            g.sm_clock_mhz.map_or("-".into(), |c| format!("{c} MHz")),
            if g.throttle_reasons.is_empty() {
                "-".to_string()
            } else {
                g.throttle_reasons.join(",")
            }
        );
    }
    out
}

/// `strategy show` without `--json`.
pub fn strategy_text(doc: &Value) -> String {
    let groups = groups_text(doc);
    if !groups.is_empty() {
        return format!("strategy per GPU group:\n{groups}");
    }
    let mut out = format!(
        "strategy: {}{}\n",
        doc["strategy"].as_str().unwrap_or("?"),
        doc["pinned"]
            .as_str()
            .map(|p| format!(" (pinned to {p})"))
            .unwrap_or_default()
    );
    if let Some(why) = doc["why"].as_str() {
        let _ = writeln!(out, "why:      {why}");
    }
    let _ = writeln!(out, "switches: {}", doc["switches"]);
    out
}

/// One line per GPU group, when there are several (one group is the
/// strategy line itself).
pub fn groups_text(allocator: &Value) -> String {
    let mut out = String::new();
    let groups = allocator["groups"].as_array().map_or(&[][..], |g| g);
    if groups.len() < 2 {
        return out;
    }
    for g in groups {
        let names: Vec<&str> = g["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "  {:<10} {:<7}{} ({}){}",
            g["group"].as_str().unwrap_or("?"),
            g["strategy"].as_str().unwrap_or("?"),
            g["pinned"]
                .as_str()
                .map(|p| format!(" (pinned to {p})"))
                .unwrap_or_default(),
            names.join(", "),
            g["why"]
                .as_str()
                .map(|w| format!(": {}", clip(w, 120)))
                .unwrap_or_default()
        );
    }
    out
}

/// `instances` without `--json`, from the `/v1/status` document: one line
/// per instance, then why it is in its state (with the server's last output
/// when it failed).
pub fn instances_table(status: &Value) -> String {
    let mut out = format!(
        "{:<12} {:<7} {:<9} {:<10} {:>8} {:>9} {:>9}  {}\n",
        "INSTANCE", "MODEL", "BACKEND", "STATE", "RESTARTS", "IN FLIGHT", "WINDOW", "SERVER"
    );
    let mut notes = String::new();
    for i in status["instances"].as_array().into_iter().flatten() {
        let name = i["name"].as_str().unwrap_or("");
        let state = i["state"].as_str().unwrap_or("");
        let server = match i["container_id"].as_str() {
            Some(id) => {
                let short: String = id.chars().take(12).collect();
                let adopted = if i["adopted"] == true {
                    ", adopted"
                } else {
                    ""
                };
                format!("{short}{adopted} · {}", i["url"].as_str().unwrap_or(""))
            }
            None => i["url"].as_str().unwrap_or("").to_string(),
        };
        let _ = writeln!(
            out,
            "{:<12} {:<7} {:<9} {:<10} {:>8} {:>9} {:>9}  {}",
            name,
            i["model_type"].as_str().unwrap_or(""),
            i["backend"].as_str().unwrap_or(""),
            state,
            i["restarts"].to_string(),
            i["in_flight"].to_string(),
            match i["window_mode"].as_str() {
                Some("auto") => format!("{} auto", i["window"]),
                _ => i["window"].to_string(),
            },
            server
        );
        if let Some(why) = i["window_reason"]
            .as_str()
            .filter(|_| i["window_mode"] == "auto")
        {
            let _ = writeln!(notes, "{name}: window {}: {}", i["window"], clip(why, 200));
        }
        if state != "ready" {
            if let Some(reason) = i["reason"].as_str() {
                let _ = writeln!(notes, "{name}: {state}: {}", clip(reason, 200));
            }
        }
        if let Some(e) = i["last_error"].as_str().filter(|_| state != "ready") {
            let _ = writeln!(notes, "{name}: last error: {e}");
        }
        // Said only for servers that are not probed as vLLM is.
        if let Some(p) = i["probes"]
            .as_str()
            .filter(|p| p.contains("not a vLLM server"))
        {
            let _ = writeln!(notes, "{name}: probed with {p}");
        }
    }
    out.push_str(&notes);
    let alloc = &status["allocator"];
    let groups = groups_text(alloc);
    if groups.is_empty() {
        let _ = writeln!(
            out,
            "strategy: {}{}{}",
            status["strategy"].as_str().unwrap_or("-"),
            alloc["pinned"]
                .as_str()
                .map(|p| format!(" (pinned to {p})"))
                .unwrap_or_default(),
            alloc["why"]
                .as_str()
                .map(|w| format!(": {}", clip(w, 160)))
                .unwrap_or_default()
        );
    } else {
        let _ = write!(out, "strategy per GPU group:\n{groups}");
    }
    for g in status["gpus"].as_array().into_iter().flatten() {
        let gib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
        let _ = writeln!(
            out,
            "gpu {}: {} °C{} · {} % · {:.1}/{:.1} GiB",
            g["index"],
            g["temperature_c"],
            if g["hot"] == true { " (alert)" } else { "" },
            g["utilization_pct"],
            gib(&g["memory_used_bytes"]),
            gib(&g["memory_total_bytes"])
        );
    }
    if let Some(why) = status["gpu_unavailable"].as_str() {
        let _ = writeln!(out, "gpus: {}", clip(why, 160));
    }
    out
}
