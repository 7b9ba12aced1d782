//! gpu-feeder against the hand-written peer, each its own process.
//!
//! One `gpu-feeder sim` process (zero latency) serves every contestant in
//! turn. Each contestant gets a fresh scratch folder holding `PEER_JOBS`
//! (default 40,000) one-line prompt jobs, inserted before it starts, and
//! runs with a window of 64 and its results on the scratch folder's file
//! system (tmpfs where the machine has /dev/shm):
//!
//! - `gpu-feeder run` (this build's release binary) with an external
//!   instance at the sim, once with `prefix_grouping` on (the default) and
//!   once off;
//! - the same with other builds when `PIPELINE_BASELINE_BIN` names their
//!   binaries (`LABEL=PATH,LABEL=PATH`: say, the commits before each change,
//!   built into other folders), so that a before and an after come from one
//!   run (`PIPELINE_FEEDER_BIN` replaces this build's binary);
//! - `benches/peer_feeder.py run`, if python3 can import aiohttp (otherwise
//!   it is left out, saying how to get it).
//!
//! The clock and the CPU readings start when the first job is done (so a
//! start-up, the daemon's first health probe included, counts for neither)
//! and stop when the last is. CPU is user + system time of the feeder's
//! process, all threads, from `/proc/PID/stat` (10 ms ticks) at those two
//! moments; the sim's is shown beside it. The bench reads the done count
//! from the database every 20 ms through a connection of its own.
//! `PEER_ROUNDS` (default 1) runs the contestants that many times, in turn.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use feeder_actors::{BlockingJobStore, Timestamp};
use gpu_feeder::store::SqliteStore;

use crate::common;

/// One feeder to measure.
struct Contestant {
    name: String,
    kind: Kind,
}

enum Kind {
    /// `gpu-feeder run` from this binary, prefix grouping on or off.
    Daemon { bin: PathBuf, prefix_grouping: bool },
    /// `benches/peer_feeder.py`.
    Peer,
}

/// The server the feeders send to.
struct Server {
    /// Its process (with those below it, for vLLM's engine process).
    pid: u32,
    url: String,
    /// The model name it serves.
    name: String,
    /// Tokens each job asks for.
    max_tokens: u32,
}

/// What one run measured, from the first job done to the last.
struct Figures {
    jobs: u64,
    secs: f64,
    cpu: Duration,
    /// The server's CPU time over the same span.
    sim_cpu: Duration,
}

impl Figures {
    fn per_job_us(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.jobs as f64
    }
}

const WINDOW: u32 = 64;

/// The binary measured as "gpu-feeder": this build's, or
/// `PIPELINE_FEEDER_BIN`.
fn feeder_bin() -> PathBuf {
    std::env::var_os("PIPELINE_FEEDER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gpu-feeder")))
}

/// Other builds to measure beside it: `PIPELINE_BASELINE_BIN`, a
/// comma-separated list of `LABEL=PATH` (or one bare path, "baseline").
fn baselines() -> Vec<(String, PathBuf)> {
    let Ok(list) = std::env::var("PIPELINE_BASELINE_BIN") else {
        return Vec::new();
    };
    list.split(',')
        .filter(|b| !b.is_empty())
        .map(|b| match b.split_once('=') {
            Some((label, path)) => (label.to_string(), PathBuf::from(path)),
            None => ("baseline".to_string(), PathBuf::from(b)),
        })
        .collect()
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer_feeder.py")
}

/// Whether python3 can run the peer; why not when it cannot.
fn peer_available() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import aiohttp"])
        .output()
        .map_err(|e| format!("python3 does not run ({e})"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err("python3 cannot import aiohttp: `pip install aiohttp` to include it".into())
    }
}

/// The sim as a process of its own; its URL.
fn start_sim(bin: &Path) -> (Child, String) {
    let mut child = Command::new(bin)
        .args(["sim", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("gpu-feeder sim starts");
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("the sim prints its address");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the sim said {line:?}"))
        .to_string();
    (child, url)
}

fn daemon_config(dir: &Path, server: &Server, prefix_grouping: bool) -> PathBuf {
    let text = format!(
        "[queue]\ndb_path = \"{d}/jobs.db\"\nresults_dir = \"{d}/results\"\nstage_dir = \"{d}/stage\"\n\
         payload_roots = [\"{d}/stage\"]\n\n\
         [dispatch]\nwindow = {WINDOW}\nprefix_grouping = {prefix_grouping}\n\n\
         [health]\ninterval_s = 1\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [allocator]\nenabled = false\n\n\
         [gpu]\nenabled = false\n\n\
         [logging]\nlevel = \"warn\"\n\n\
         [[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"external\"\n\
         url = \"{url}\"\nserved_model_name = \"{name}\"\nmax_tokens = {max_tokens}\n",
        d = dir.display(),
        url = server.url,
        name = server.name,
        max_tokens = server.max_tokens,
    );
    let path = dir.join("feeder.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `who` on `n` fresh jobs in `dir`; the child and the query that
/// counts its finished jobs.
fn launch(who: &Contestant, dir: &Path, server: &Server, n: usize) -> (Child, &'static str) {
    let db = dir.join("jobs.db");
    let log = std::fs::File::create(dir.join("feeder.log")).unwrap();
    match &who.kind {
        Kind::Daemon {
            bin,
            prefix_grouping,
        } => {
            let config = daemon_config(dir, server, *prefix_grouping);
            let store = SqliteStore::open(&db).unwrap();
            store
                .submit_batch(common::jobs(n, "peer"), Timestamp::now())
                .unwrap();
            drop(store);
            let child = Command::new(bin)
                .arg("--config")
                .arg(&config)
                .arg("run")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("gpu-feeder run starts");
            (
                child,
                "SELECT count(*) FROM gpu_jobs WHERE status IN ('done', 'failed')",
            )
        }
        Kind::Peer => {
            let db_arg = db.to_str().unwrap();
            let ok = Command::new("python3")
                .arg(peer_script())
                .args(["submit", "--db", db_arg, "--jobs", &n.to_string()])
                .status()
                .unwrap();
            assert!(ok.success(), "the peer's submit failed");
            let child = Command::new("python3")
                .arg(peer_script())
                .args(["run", "--db", db_arg, "--url", &server.url])
                .args(["--model", &server.name])
                .args(["--max-tokens", &server.max_tokens.to_string()])
                .arg("--results")
                .arg(dir.join("results"))
                .args(["--window", &WINDOW.to_string()])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("the peer starts");
            (child, "SELECT count(*) FROM jobs WHERE status = 'done'")
        }
    }
}

/// Runs `who` on `n` jobs against the sim `sim`; its figures.
fn measure(who: &Contestant, server: &Server, n: usize) -> Figures {
    let dir = common::scratch();
    let (mut child, count_sql) = launch(who, dir.path(), server, n);
    let pid = child.id();
    let db = rusqlite::Connection::open(dir.path().join("jobs.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let done = || -> u64 {
        db.query_row(count_sql, [], |r| r.get::<_, i64>(0))
            .unwrap_or(0) as u64
    };
    let limit = Instant::now() + Duration::from_secs(1800);
    let mut start = None;
    loop {
        assert!(
            Instant::now() < limit,
            "{} did not finish in 30 minutes; its log: {}",
            who.name,
            dir.path().join("feeder.log").display()
        );
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.path().join("feeder.log")).unwrap_or_default();
            panic!("{} exited ({status}) before finishing: {log}", who.name);
        }
        let d = done();
        if start.is_none() && d > 0 {
            start = Some((
                Instant::now(),
                d,
                common::process_cpu(pid).unwrap(),
                common::tree_cpu(server.pid),
            ));
        }
        if d >= n as u64 {
            let (t0, d0, cpu0, sim0) = start.expect("set above");
            let figures = Figures {
                jobs: d - d0,
                secs: t0.elapsed().as_secs_f64(),
                cpu: common::process_cpu(pid).unwrap() - cpu0,
                sim_cpu: common::tree_cpu(server.pid).saturating_sub(sim0),
            };
            stop(&mut child);
            return figures;
        }
        std::thread::sleep(Duration::from_millis(if start.is_some() { 20 } else { 2 }));
    }
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Section 4 of the pipeline bench.
pub fn run() {
    let n = common::env_f64("PEER_JOBS", 40_000.0) as usize;
    let rounds = common::env_f64("PEER_ROUNDS", 1.0) as usize;
    println!(
        "\n4. processes: feeders against `gpu-feeder sim` (zero latency) in its own process, {n} one-line jobs, window {WINDOW}"
    );
    let bin = feeder_bin();
    let mut who = vec![
        Contestant {
            name: "gpu-feeder".into(),
            kind: Kind::Daemon {
                bin: bin.clone(),
                prefix_grouping: true,
            },
        },
        Contestant {
            name: "gpu-feeder, prefix_grouping off".into(),
            kind: Kind::Daemon {
                bin: bin.clone(),
                prefix_grouping: false,
            },
        },
    ];
    for (label, base) in baselines() {
        who.push(Contestant {
            name: format!("gpu-feeder {label}"),
            kind: Kind::Daemon {
                bin: base,
                prefix_grouping: true,
            },
        });
    }
    match peer_available() {
        Ok(()) => who.push(Contestant {
            name: "peer (asyncio + SQLite + aiohttp)".into(),
            kind: Kind::Peer,
        }),
        Err(why) => println!("   the hand-written peer is left out: {why}"),
    }
    let (mut sim, url) = start_sim(&bin);
    let server = Server {
        pid: sim.id(),
        url,
        name: "sim".into(),
        max_tokens: 16,
    };
    let mut all: Vec<(usize, Figures)> = Vec::new();
    for _ in 0..rounds {
        for (i, w) in who.iter().enumerate() {
            let f = measure(w, &server, n);
            println!(
                "   {:<34} {:>8.0} jobs/s   CPU {:>6.1} µs/job   (sim {:>5.1} µs/job; {} jobs in {:.2} s)",
                w.name,
                f.jobs as f64 / f.secs,
                f.per_job_us(f.cpu),
                f.per_job_us(f.sim_cpu),
                f.jobs,
                f.secs
            );
            all.push((i, f));
        }
    }
    stop(&mut sim);
    let mean = |i: usize| -> Option<(f64, f64)> {
        let mine: Vec<&Figures> = all
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, f)| f)
            .collect();
        if mine.is_empty() {
            return None;
        }
        let rate = mine.iter().map(|f| f.jobs as f64 / f.secs).sum::<f64>() / mine.len() as f64;
        let cpu = mine.iter().map(|f| f.per_job_us(f.cpu)).sum::<f64>() / mine.len() as f64;
        Some((rate, cpu))
    };
    if rounds > 1 {
        println!("   means over {rounds} rounds:");
        for (i, w) in who.iter().enumerate() {
            if let Some((rate, cpu)) = mean(i) {
                println!(
                    "   {:<34} {rate:>8.0} jobs/s   CPU {cpu:>6.1} µs/job",
                    w.name
                );
            }
        }
    }
    let peer = who.iter().position(|w| matches!(w.kind, Kind::Peer));
    if let (Some((rate, cpu)), Some((peer_rate, peer_cpu))) = (mean(0), peer.and_then(mean)) {
        println!(
            "   gpu-feeder ÷ peer: {:.2}× the jobs/s, {:.2}× the CPU per job",
            rate / peer_rate,
            cpu / peer_cpu
        );
    }
}

/// Section 5 of the pipeline bench: `gpu-feeder run` against the real vLLM
/// (its CPU build serving the tiny Llama of `tests/common/vllm.rs`,
/// `--max-num-seqs 64`): the daemon's CPU time beside that of vLLM's
/// processes (its API server and its engine process, all below the one it
/// started) over the same span. `VLLM_JOBS` jobs (default 500) of 16 tokens.
pub fn vllm() {
    let n = common::env_f64("VLLM_JOBS", 500.0) as usize;
    println!("\n5. the feeder's CPU beside the real vLLM's (CPU build, tiny Llama), {n} jobs of 16 tokens, window {WINDOW}");
    let scratch = common::scratch();
    let model = common::vllm::vllm().llama();
    let server = common::vllm::VllmServer::start(
        &model,
        "tiny",
        &["--max-num-seqs", "64"],
        &[],
        &scratch.path().join("vllm.log"),
    );
    let bin = feeder_bin();
    let who = Contestant {
        name: "gpu-feeder".into(),
        kind: Kind::Daemon {
            bin,
            prefix_grouping: true,
        },
    };
    let s = Server {
        pid: server.pid(),
        url: server.url.clone(),
        name: "tiny".into(),
        max_tokens: 16,
    };
    let f = measure(&who, &s, n);
    println!(
        "   {} jobs in {:.2} s = {:.1} jobs/s; CPU: gpu-feeder {:.2} s ({:.0} µs/job), vLLM {:.2} s ({} processes); gpu-feeder ÷ vLLM = {:.2} %",
        f.jobs,
        f.secs,
        f.jobs as f64 / f.secs,
        f.cpu.as_secs_f64(),
        f.per_job_us(f.cpu),
        f.sim_cpu.as_secs_f64(),
        common::process_tree(server.pid()).len(),
        100.0 * f.cpu.as_secs_f64() / f.sim_cpu.as_secs_f64()
    );
}
