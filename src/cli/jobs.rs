//! The queue commands: migrate, submit, status, list, stats, cancel, retry.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use feeder_actors::{JobId, JobStatus, JobStore, ListFilter, ModelType, Timestamp};

use super::output;
use super::{Context, SubmitArgs};
use crate::submit::{Built, Input, SubmitRequest};
use crate::views;

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON"));
}

pub(super) async fn migrate(ctx: &Context, json: bool) -> anyhow::Result<i32> {
    ctx.config.create_state_dirs(&ctx.config_path)?;
    let queue = &ctx.config.queue;
    let place = queue.location();
    let report = crate::store::migrate_queue(queue)
        .await
        .with_context(|| format!("migrating {place}"))?;
    if json {
        let mut v = json!({
            "from_version": report.from,
            "version": report.to,
            "applied": report.applied,
            "adopted": report.adopted,
        });
        match &queue.database_url {
            Some(_) => v["database_url"] = json!(place),
            None => v["db_path"] = json!(queue.db_path),
        }
        print_json(&v);
    } else {
        if !report.adopted.is_empty() {
            println!(
                "{place}: found a schema made without gpu-feeder at {}; recorded it as applied",
                report.adopted.join(", ")
            );
        }
        if report.applied.is_empty() {
            println!("{place}: up to date (schema version {})", report.to);
        } else {
            println!(
                "{place}: schema version {} → {} (applied {})",
                report.from,
                report.to,
                report.applied.join(", ")
            );
        }
    }
    Ok(0)
}

/// `gpu-feeder result JOB`: the job's result document (from a file or the
/// database, wherever the job says), or its answer's text alone.
pub(super) async fn result(ctx: &Context, job: &str, text: bool) -> anyhow::Result<i32> {
    let queue = ctx.open_queue().await?;
    let id = queue.jobs.resolve(job).await?;
    let job = queue
        .jobs
        .get(id)
        .await?
        .with_context(|| format!("no job {id}: check the id with `gpu-feeder list`"))?;
    let Some(at) = &job.result_path else {
        anyhow::bail!(
            "job {id} is {} and has no result yet{}",
            job.status,
            match &job.error {
                Some(e) => format!(" (its error: {e})"),
                None => String::new(),
            }
        );
    };
    let doc = queue
        .results
        .document(at)
        .await
        .with_context(|| format!("reading the result of job {id} ({at})"))?;
    if text {
        println!("{}", doc["content"].as_str().unwrap_or_default());
    } else {
        print_json(&doc);
    }
    Ok(0)
}

pub(super) async fn submit(ctx: &Context, args: SubmitArgs) -> anyhow::Result<i32> {
    let store = ctx.open_store().await?;
    let cfg = &ctx.config;
    if cfg.instances_for(args.model).next().is_none() && !cfg.instances.is_empty() {
        eprintln!(
            "warning: no instance in {} serves `{}`; the job waits until one does",
            ctx.config_path.display(),
            args.model
        );
    }
    let input = if let Some(p) = &args.jsonl {
        Input::Jsonl(p.clone())
    } else if let Some(p) = &args.payload {
        Input::PayloadFile(p.clone())
    } else if let Some(t) = &args.prompt {
        Input::Prompt(t.clone())
    } else if let Some(i) = &args.image {
        Input::Image(i.clone())
    } else if let Some(f) = &args.text_file {
        Input::TextFile {
            path: f.clone(),
            chunk: args.chunk,
        }
    } else {
        unreachable!("clap requires one input");
    };
    let request = SubmitRequest {
        model: args.model,
        input,
        priority: args.priority,
        max_attempts: args.max_attempts.map(u64::from),
        then: args.then,
    };
    let now = Timestamp::now();
    let submission = match request.build(cfg)? {
        Built::One(s) => s,
        Built::Many(jobs) => {
            let path = args.jsonl.as_deref().unwrap_or(std::path::Path::new(""));
            let out = store.submit_batch(jobs, now).await?;
            let created = out.iter().filter(|s| s.created).count();
            if args.json {
                let jobs: Vec<_> = out
                    .iter()
                    .map(|s| json!({"id": s.id, "created": s.created, "status": s.status}))
                    .collect();
                print_json(
                    &json!({"created": created, "existing": out.len() - created, "jobs": jobs}),
                );
            } else {
                println!(
                    "{} jobs from {}: {created} new, {} already queued",
                    out.len(),
                    path.display(),
                    out.len() - created
                );
            }
            return Ok(0);
        }
    };
    let (s, fragments) = submission.store(store.as_ref(), now).await?;
    if args.wait {
        if !args.json {
            let verb = if s.created {
                "submitted"
            } else {
                "already queued"
            };
            eprintln!("{verb} {} ({}); waiting…", s.id, args.model);
        }
        return wait(
            store.as_ref(),
            s.id,
            args.timeout_s.map(Duration::from_secs),
            args.json,
        )
        .await;
    }
    let what = match fragments {
        Some(n) => format!("{}, parent of {n} fragments, {}", args.model, s.status),
        None => format!("{}, {}", args.model, s.status),
    };
    if args.json {
        print_json(
            &json!({"id": s.id, "created": s.created, "status": s.status, "fragments": fragments}),
        );
    } else if s.created {
        println!("submitted {} ({what})", s.id);
    } else {
        println!("already queued: {} ({what})", s.id);
    }
    Ok(0)
}

/// Polls the job until it finishes; exit 0 if done, 1 otherwise.
async fn wait(
    store: &dyn JobStore,
    id: JobId,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<i32> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(50);
    let mut hinted = false;
    loop {
        let job = store
            .get(id)
            .await?
            .with_context(|| format!("job {id} disappeared"))?;
        if job.status.is_terminal() {
            if json {
                print_json(&views::job_json(&job));
            } else {
                print!("{}", output::job_human(&job, Timestamp::now()));
            }
            return Ok(if job.status == JobStatus::Done { 0 } else { 1 });
        }
        let waited = start.elapsed();
        if timeout.is_some_and(|t| waited >= t) {
            eprintln!(
                "job {id} is still {} after {}s; it stays queued",
                job.status,
                waited.as_secs()
            );
            return Ok(1);
        }
        if !hinted && waited > Duration::from_secs(10) && job.status == JobStatus::Pending {
            eprintln!("job {id} is still pending after 10 s: is `gpu-feeder run` running?");
            hinted = true;
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}

pub(super) async fn status(ctx: &Context, job: &str, json: bool) -> anyhow::Result<i32> {
    let store = ctx.open_store().await?;
    let id = store.resolve(job).await?;
    let job = store
        .get(id)
        .await?
        .with_context(|| format!("no job {id}: check the id with `gpu-feeder list`"))?;
    if json {
        print_json(&views::job_json(&job));
    } else {
        print!("{}", output::job_human(&job, Timestamp::now()));
    }
    Ok(0)
}

pub(super) async fn list(
    ctx: &Context,
    status: Option<JobStatus>,
    model: Option<ModelType>,
    limit: usize,
    json: bool,
) -> anyhow::Result<i32> {
    let store = ctx.open_store().await?;
    let jobs = store
        .list(&ListFilter {
            status,
            model_type: model,
            parent_id: None,
            lease_ended_before: None,
            limit,
        })
        .await?;
    if json {
        let jobs: Vec<_> = jobs.iter().map(views::job_json).collect();
        print_json(&json!({ "jobs": jobs }));
    } else {
        print!("{}", output::jobs_table(&jobs, Timestamp::now()));
    }
    Ok(0)
}

pub(super) async fn stats(ctx: &Context, json: bool) -> anyhow::Result<i32> {
    let store = ctx.open_store().await?;
    let stats = store.stats(Timestamp::now()).await?;
    if json {
        print_json(&views::stats_json(&stats));
    } else {
        print!("{}", output::stats_table(&stats));
    }
    Ok(0)
}

/// What `cancel` and `retry` do to a job.
#[derive(Clone, Copy, Debug)]
pub(super) enum Change {
    /// Cancel it (a parent's unfinished fragments too).
    Cancel,
    /// Put it back in the queue with fresh attempts.
    Retry,
}

pub(super) async fn change(
    ctx: &Context,
    job: &str,
    json: bool,
    what: Change,
) -> anyhow::Result<i32> {
    let store = ctx.open_store().await?;
    let id = store.resolve(job).await?;
    let now = Timestamp::now();
    let job = match what {
        Change::Cancel => store.cancel(id, now).await?,
        Change::Retry => store.retry(id, now).await?,
    };
    if json {
        print_json(&views::job_json(&job));
    } else if let Change::Cancel = what {
        println!("cancelled {id}");
    } else {
        println!("{id} is {} again", job.status);
    }
    Ok(0)
}
