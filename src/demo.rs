//! `gpu-feeder demo`: the whole pipeline on the embedded default, with no
//! GPU and no Docker. Two simulated vLLM servers (a vision one with 8
//! sequences at a time, a think one with 16) run in this process; a
//! temporary database receives page images it generates, prompts, and one
//! parent split into fragments; the real actors dispatch them over HTTP; a
//! progress bar follows; a summary reports throughput, latency and the
//! fan-in result. With `--serve`, the admin endpoint and its status page
//! run from the start, and stay up after the jobs finish until Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use feeder_actors::{JobStatus, ListFilter, ModelType, NewJob, Payload, Timestamp};

use feeder_actors::dispatch::DispatchObserver;
use feeder_actors::handle::FeederHandle;

use crate::admin::Admin;
use crate::config::{Backend, Config, InstanceConfig};
use crate::daemon::Pipeline;
use crate::metrics::Metrics;
use crate::sim::{self, SimConfig};
use crate::submit::Submitter;

/// `gpu-feeder demo` options.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// How many jobs to run (a third of them images)
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub jobs: u64,
    /// Keep the database and results in this folder instead of a temporary one
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Serve the admin endpoint and its status page while the demo runs,
    /// and keep them (and the simulated servers) up after the jobs finish,
    /// until Ctrl-C
    #[arg(long)]
    pub serve: bool,
    /// Where `--serve` listens (port 0: any free port; the address is printed)
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:9400",
        requires = "serve"
    )]
    pub listen: String,
}

fn instance(name: &str, model: ModelType, url: String, served: &str) -> InstanceConfig {
    let mut inst: InstanceConfig = toml::from_str(&format!(
        "name = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"external\"\nurl = \"{url}\"\nserved_model_name = \"{served}\"\nmax_tokens = 64\n"
    ))
    .expect("a valid instance");
    inst.backend = Backend::External;
    inst
}

/// Writes a small page-like PNG, different for each `i` (its top row
/// spells `i` in binary, so no two pages are the same job).
fn page_png(path: &Path, i: u64) -> anyhow::Result<()> {
    let (w, h) = (96u32, 64u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let line = (y / 8) % 2 == 0 && x > 8 && x < w - 8 - ((i as u32 * 7 + y) % 30);
        let bit = y == 0 && x < 64 && (i >> x) & 1 == 1;
        if line || bit {
            image::Rgb([30, 30, 40])
        } else {
            image::Rgb([250, 248, 240 - (i % 16) as u8])
        }
    });
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Waits for Ctrl-C or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Runs the demo; the exit status.
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let temp;
    let dir = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary folder")?;
            temp.path().to_path_buf()
        }
    };
    let vision_sim = sim::start(SimConfig {
        served_model_name: "demo-vision".into(),
        max_num_seqs: 8,
        latency_ms: 40,
        ..SimConfig::default()
    })
    .await?;
    let think_sim = sim::start(SimConfig {
        served_model_name: "demo-think".into(),
        max_num_seqs: 16,
        latency_ms: 20,
        tokens_per_s: 2000.0,
        ..SimConfig::default()
    })
    .await?;

    let mut config = Config::default();
    config.queue.db_path = dir.join("jobs.db");
    config.queue.results_dir = dir.join("results");
    config.queue.stage_dir = dir.join("stage");
    config.health.interval_s = 1.0;
    config.dispatch.window = crate::config::WindowSetting::Fixed(16);
    config.instances = vec![
        instance("vision", ModelType::Vision, vision_sim.url(), "demo-vision"),
        instance("think", ModelType::Think, think_sim.url(), "demo-think"),
    ];
    config.create_state_dirs(Path::new("demo"))?;
    let stage = config.queue.stage_dir.clone();

    println!("gpu-feeder demo");
    println!(
        "  servers   vision {} (8 at a time, 40 ms) · think {} (16 at a time, ~50 ms)",
        vision_sim.url(),
        think_sim.url()
    );
    println!("  database  {}", config.queue.db_path.display());

    // The jobs: page images for the vision model, prompts for the think
    // model, and one parent whose fragments fan in.
    let n_vision = args.jobs / 3;
    let n_think = args.jobs - n_vision;
    let opened = crate::store::open(&config, crate::store::Patience::FailFast).await?;
    let submit_store = opened.jobs.clone();
    let vision = Submitter::new(ModelType::Vision, &config.queue.roots(), 0, 3);
    let think = Submitter::new(ModelType::Think, &config.queue.roots(), 0, 3);
    let mut jobs: Vec<NewJob> = Vec::new();
    for i in 0..n_vision {
        let path = stage.join(format!("page-{i:05}.png"));
        page_png(&path, i)?;
        jobs.push(vision.image(&path)?);
    }
    for i in 0..n_think {
        jobs.push(think.prompt(&format!(
            "Summarize record {i} of the demo ledger in one sentence."
        ))?);
    }
    let now = Timestamp::now();
    submit_store.submit_batch(jobs, now).await?;
    let chapters = [
        "The feeder claims jobs.",
        "Each job is one request.",
        "Batches stay full.",
        "Fragments fan in.",
        "Results are atomic.",
        "Nothing is lost.",
    ];
    let fragments: Vec<NewJob> = chapters
        .iter()
        .map(|c| think.prompt(c))
        .collect::<Result<_, _>>()?;
    let whole = chapters.join(" ");
    let parent_job = NewJob::new(
        ModelType::Think,
        Payload::Inline(serde_json::json!({ "prompt": whole }).to_string()),
        format!("demo-parent-{}", now.0),
    );
    let parent = submit_store
        .submit_parent(parent_job, fragments, now)
        .await?
        .id;
    // Everything in the database, whatever was there before (with --keep).
    let total: u64 = submit_store
        .stats(Timestamp::now())
        .await?
        .models
        .iter()
        .map(|(_, m)| {
            let c = m.counts;
            c.pending + c.processing + c.done + c.failed + c.cancelled
        })
        .sum();
    println!(
        "  jobs      {n_vision} images, {n_think} prompts, 1 parent of {} fragments",
        chapters.len()
    );

    let listener = match args.serve {
        true => Some(
            tokio::net::TcpListener::bind(&args.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} for the status page (is a daemon using it? pass --listen 127.0.0.1:0)",
                        args.listen
                    )
                })?,
        ),
        false => None,
    };
    let metrics = Arc::new(Metrics::new());

    let store = crate::store::connect(&config.queue, crate::store::Patience::FailFast).await?;
    let results = opened.results.clone();
    let start = Instant::now();
    let pipeline = Pipeline::start(
        &config,
        store,
        results.clone(),
        format!("{}/demo", config.queue.owner()),
        Some(metrics.clone() as Arc<dyn DispatchObserver>),
    )
    .await?;
    let page = match listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            let admin = Admin {
                feeder: FeederHandle::new(pipeline.feeder.clone()),
                reader: crate::store::connect(&config.queue, crate::store::Patience::FailFast)
                    .await?,
                results: opened.results.clone(),
                config: Arc::new(config.clone()),
                metrics,
                api: None,
            };
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, crate::admin::router(admin)).await {
                    tracing::error!("the status page stopped: {e}");
                }
            });
            let url = format!("http://{addr}/");
            println!("  status    {url} (the status page, live)");
            Some(url)
        }
        None => None,
    };

    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("  {bar:40.cyan/blue} {pos:>6}/{len} jobs  {msg}")
            .expect("a valid template")
            .progress_chars("█▉▊▋▌▍▎▏ "),
    );
    let deadline = Duration::from_secs(60 + args.jobs / 20);
    let finished = loop {
        let stats = submit_store.stats(Timestamp::now()).await?;
        let mut finished = 0;
        let mut parts = Vec::new();
        for (model, s) in &stats.models {
            let c = s.counts;
            finished += c.done + c.failed + c.cancelled;
            parts.push(format!(
                "{model} {}/{}",
                c.done + c.failed,
                c.pending + c.processing + c.done + c.failed + c.cancelled
            ));
        }
        bar.set_position(finished);
        let rate = finished as f64 / start.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!("{rate:>6.0} jobs/s  {}", parts.join(" · ")));
        if finished >= total || start.elapsed() > deadline {
            break finished;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish();
    let elapsed = start.elapsed();
    // Serving, the pipeline stays up so that the page shows it live.
    let pipeline = match page {
        Some(_) => Some(pipeline),
        None => {
            pipeline.shutdown(Duration::from_secs(5)).await;
            None
        }
    };

    let all = submit_store
        .list(&ListFilter {
            limit: usize::MAX,
            ..Default::default()
        })
        .await?;
    let done = all.iter().filter(|j| j.status == JobStatus::Done).count();
    let failed = all.iter().filter(|j| j.status == JobStatus::Failed).count();
    let mut latencies: Vec<u64> = all.iter().filter_map(|j| j.latency_ms).collect();
    latencies.sort_unstable();
    println!();
    println!("summary");
    println!(
        "  finished  {finished} of {total} jobs in {:.2} s: {done} done, {failed} failed",
        elapsed.as_secs_f64()
    );
    println!(
        "  rate      {:.0} jobs/s",
        finished as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency   p50 {} ms · p99 {} ms (request round trip)",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );
    println!(
        "  servers   vision served {} requests · think served {}",
        vision_sim
            .counters
            .completed
            .load(std::sync::atomic::Ordering::Relaxed),
        think_sim
            .counters
            .completed
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let p = submit_store
        .get(parent)
        .await?
        .context("the parent job vanished")?;
    println!(
        "  fan-in    parent {} is {} ({} fragments)",
        p.id,
        p.status,
        p.total_fragments.unwrap_or(0)
    );
    if let Some(at) = &p.result_path {
        let doc = results.document(at).await?;
        for line in doc["content"].as_str().unwrap_or("").lines().take(6) {
            println!("            │ {line}");
        }
        println!("            result: {at}");
    }
    if let Some(j) = all
        .iter()
        .find(|j| j.model_type == ModelType::Vision && j.status == JobStatus::Done)
    {
        if let Some(at) = &j.result_path {
            let doc = results.document(at).await?;
            let text: String = doc["content"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(90)
                .collect();
            println!("  a page    {text}…");
        }
    }
    match &args.keep {
        Some(d) => println!(
            "  kept      {} (try: gpu-feeder --db {}/jobs.db stats)",
            d.display(),
            d.display()
        ),
        None if args.serve => println!(
            "  (the temporary database is removed when the demo stops; pass --keep DIR to keep it)"
        ),
        None => println!("  (the temporary database is removed; pass --keep DIR to keep it)"),
    }
    if let (Some(url), Some(pipeline)) = (page, pipeline) {
        println!();
        println!("status page {url}");
        println!("  serving until Ctrl-C (or SIGTERM); submit more with the admin endpoint's POST /v1/jobs");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        stop_signal().await;
        pipeline.shutdown(Duration::from_secs(5)).await;
        println!("stopped");
    }
    Ok(if done as u64 == total { 0 } else { 1 })
}
