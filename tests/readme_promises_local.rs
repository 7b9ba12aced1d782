//! README promises that need no PostgreSQL: the `gpu_*` metrics and
//! temperature alerts from what NVML reads (through a fake NVML library,
//! loaded by the daemon exactly as the driver's would be), request timeouts
//! against a server that takes a request and never answers, and a SQLite
//! migration failing half-way rolled back. The real binary throughout.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bin, external, free_port, promtool, sqlite3, wait_for, Scratch, SimProcess};

const LIMIT: Duration = Duration::from_secs(60);

/// `GET path` on a local port: the status and the body.
fn get(port: u16, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `gpu-feeder --config … run` with `env` added, logging to `<scratch>/<name>.log`.
struct Daemon {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Daemon {
    fn start(s: &Scratch, name: &str, env: &[(&str, &str)]) -> Daemon {
        let log = s.path().join(format!("{name}.log"));
        let child = Command::new(bin())
            .arg("--config")
            .arg(s.config())
            .args(["--log-format", "human", "run"])
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the daemon");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// NVML readings → `gpu_*` metrics and temperature alerts

/// A stand-in for `libnvidia-ml.so.1`: two GPUs whose temperatures are read
/// from the file `$FAKE_NVML_TEMPS` ("T0 T1") at every call, every other
/// figure distinct per GPU so that a reading put in the wrong place shows.
/// It exports the NVML entry points the daemon's adapter calls; the others
/// are absent, as an older driver's would be.
const FAKE_NVML: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct { unsigned version; unsigned long long total, reserved, free, used; } mem_v2;
typedef struct { unsigned pid; unsigned long long used; unsigned gpu_instance, compute_instance; } proc_v2;
typedef struct { unsigned gpu, memory; } util;

int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int r) { return "fake NVML error"; }
int nvmlSystemGetDriverVersion(char *v, unsigned n) { snprintf(v, n, "550.54.15"); return 0; }
int nvmlDeviceGetCount_v2(unsigned *n) { *n = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **d) {
    if (i > 1) return 2; /* NVML_ERROR_INVALID_ARGUMENT */
    *d = (void *)(unsigned long)(i + 1);
    return 0;
}
static unsigned gpu(void *d) { return (unsigned)(unsigned long)d - 1; }
int nvmlDeviceGetName(void *d, char *s, unsigned n) { snprintf(s, n, "Fake H100 %u", gpu(d)); return 0; }
int nvmlDeviceGetUUID(void *d, char *s, unsigned n) { snprintf(s, n, "GPU-fake-%u", gpu(d)); return 0; }
int nvmlDeviceGetTemperature(void *d, int sensor, unsigned *t) {
    unsigned temps[2] = {0, 0};
    FILE *f = fopen(getenv("FAKE_NVML_TEMPS"), "r");
    if (!f) return 999; /* NVML_ERROR_UNKNOWN */
    int read = fscanf(f, "%u %u", &temps[0], &temps[1]);
    fclose(f);
    if (read != 2 || sensor != 0) return 999;
    *t = temps[gpu(d)];
    return 0;
}
int nvmlDeviceGetUtilizationRates(void *d, util *u) { u->gpu = 41 + gpu(d); u->memory = 7; return 0; }
int nvmlDeviceGetMemoryInfo_v2(void *d, mem_v2 *m) {
    m->total = 85899345920ULL;                           /* 80 GiB */
    m->used = (gpu(d) + 1) * 3221225472ULL;              /* 3 GiB, 6 GiB */
    m->reserved = 0;
    m->free = m->total - m->used;
    return 0;
}
int nvmlDeviceGetPowerUsage(void *d, unsigned *mw) { *mw = 312500 + 1000 * gpu(d); return 0; }
/* GPU 0 idles; GPU 1 is held back by its power cap and a hardware slowdown. */
int nvmlDeviceGetCurrentClocksThrottleReasons(void *d, unsigned long long *r) {
    *r = gpu(d) == 1 ? 0x4 | 0x8 : 0x1;
    return 0;
}
/* One compute process on GPU 0, the caller itself, holding 2 GiB; none on
   GPU 1. Asked with too small a list, it says how many (as NVML does). */
int nvmlDeviceGetComputeRunningProcesses_v3(void *d, unsigned *n, proc_v2 *p) {
    unsigned have = gpu(d) == 0 ? 1 : 0;
    if (*n < have || (have && !p)) { *n = have; return 7; } /* NVML_ERROR_INSUFFICIENT_SIZE */
    *n = have;
    if (have) {
        p[0].pid = (unsigned)getpid();
        p[0].used = 2147483648ULL;
        p[0].gpu_instance = p[0].compute_instance = 0xFFFFFFFF;
    }
    return 0;
}
int nvmlDeviceGetClockInfo(void *d, int type, unsigned *mhz) {
    *mhz = type == 1 ? 1980 : type == 2 ? 2619 : 1755;   /* SM, memory, graphics */
    return 0;
}
"#;

/// Builds the fake NVML into `dir` as `libnvidia-ml.so.1`, the name the
/// adapter asks the dynamic loader for.
fn build_fake_nvml(dir: &Path) {
    let src = dir.join("fake_nvml.c");
    std::fs::write(&src, FAKE_NVML).unwrap();
    common::succeed(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.join("libnvidia-ml.so.1"))
            .arg(&src),
        "cc builds the fake NVML library",
    );
}

/// The value of the series `line_start` (name and labels) in a metrics text.
fn series(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// README, "GPUs, temperature and the allocator" and "Admin endpoint": the
/// monitor reads every GPU through NVML, loaded at run time from the
/// driver, and `/metrics` shows each reading as a `gpu_*` gauge by `gpu`;
/// above `gpu.temp_alert_c` a GPU is in alert (one warning, its alert gauge
/// at 1) until it cools below `gpu.temp_clear_c`, and meanwhile the
/// instances on that GPU keep `gpu.thermal_window_factor` of their window.
#[test]
fn nvml_readings_become_gpu_metrics_and_temperature_alerts() {
    let lib = tempfile::tempdir().unwrap();
    build_fake_nvml(lib.path());
    let temps = lib.path().join("temps");
    std::fs::write(&temps, "64 70\n").unwrap();

    // `gpu-feeder gpu --json`: the adapter's reading, no daemon.
    let out = Command::new(bin())
        .args(["gpu", "--json"])
        .env("LD_LIBRARY_PATH", lib.path())
        .env("FAKE_NVML_TEMPS", &temps)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&said).unwrap();
    let gpus = v["gpus"].as_array().unwrap_or_else(|| panic!("{said}"));
    assert_eq!(gpus.len(), 2, "{said}");
    assert_eq!(gpus[1]["name"], "Fake H100 1", "{said}");
    assert_eq!(gpus[1]["uuid"], "GPU-fake-1", "{said}");
    assert_eq!(gpus[1]["temperature_c"], 70, "{said}");
    assert_eq!(gpus[1]["utilization_pct"], 42, "{said}");
    assert_eq!(gpus[1]["memory_used_bytes"], 6442450944u64, "{said}");
    assert_eq!(gpus[1]["memory_total_bytes"], 85899345920u64, "{said}");
    assert_eq!(gpus[1]["power_w"], 313.5, "{said}");
    assert_eq!(gpus[1]["sm_clock_mhz"], 1980, "{said}");
    assert_eq!(gpus[1]["memory_clock_mhz"], 2619, "{said}");
    // Throttle reasons by name (an idle GPU's is no reason), and the
    // processes holding memory: the reader itself, as `[pid, bytes]`.
    assert_eq!(
        gpus[1]["throttle_reasons"],
        serde_json::json!(["sw_power_cap", "hw_slowdown"]),
        "{said}"
    );
    assert_eq!(gpus[0]["throttle_reasons"], serde_json::json!([]), "{said}");
    let reader = gpus[0]["processes"][0][0].as_u64().unwrap_or(0);
    assert!(reader > 0, "{said}");
    assert_eq!(
        gpus[0]["processes"],
        serde_json::json!([[reader, 2147483648u64]]),
        "{said}"
    );
    assert_eq!(gpus[1]["processes"], serde_json::json!([]), "{said}");

    // The daemon, with the same library found where the driver's would be.
    let think = SimProcess::start(&[]);
    let admin = free_port();
    let s = Scratch::new(
        &(format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[dispatch]\nwindow = 8\n\n[gpu]\ninterval_ms = 100\ntemp_alert_c = 80\ntemp_clear_c = 75\nthermal_window_factor = 0.5\n\n"
        ) + &external("think", "think", &think.url)
            + "gpu_ids = [1]\n"),
    );
    let window = || s.instance("think").map(|i| i["window"].clone());
    let lib_dir = lib.path().to_str().unwrap();
    let temps_path = temps.to_str().unwrap();
    let d = Daemon::start(
        &s,
        "daemon",
        &[
            ("LD_LIBRARY_PATH", lib_dir),
            ("FAKE_NVML_TEMPS", temps_path),
        ],
    );
    let metrics = || get(admin, "/metrics").1;
    wait_for("/metrics says the GPUs are read", LIMIT, || {
        series(&metrics(), "gpu_feeder_gpu_available") == Some(1.0)
    });
    let text = metrics();
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool: {said}\n{text}");
    let expect = [
        ("gpu_feeder_gpu_temperature_celsius{gpu=\"0\"}", 64.0),
        ("gpu_feeder_gpu_temperature_celsius{gpu=\"1\"}", 70.0),
        ("gpu_feeder_gpu_utilization_percent{gpu=\"0\"}", 41.0),
        ("gpu_feeder_gpu_utilization_percent{gpu=\"1\"}", 42.0),
        ("gpu_feeder_gpu_memory_used_bytes{gpu=\"0\"}", 3221225472.0),
        ("gpu_feeder_gpu_memory_used_bytes{gpu=\"1\"}", 6442450944.0),
        (
            "gpu_feeder_gpu_memory_total_bytes{gpu=\"1\"}",
            85899345920.0,
        ),
        ("gpu_feeder_gpu_power_watts{gpu=\"0\"}", 312.5),
        ("gpu_feeder_gpu_power_watts{gpu=\"1\"}", 313.5),
        ("gpu_feeder_gpu_temperature_alert{gpu=\"0\"}", 0.0),
        ("gpu_feeder_gpu_temperature_alert{gpu=\"1\"}", 0.0),
        ("gpu_feeder_gpu_temperature_alerts", 0.0),
    ];
    for (name, value) in expect {
        assert_eq!(series(&text, name), Some(value), "{name}:\n{text}");
    }

    wait_for("think runs with its whole window", LIMIT, || {
        window() == Some(serde_json::json!(8))
    });

    // GPU 1 heats past the alert level: in alert, one episode, one warning.
    std::fs::write(&temps, "64 86\n").unwrap();
    wait_for("GPU 1 is in alert", LIMIT, || {
        series(&metrics(), "gpu_feeder_gpu_temperature_alert{gpu=\"1\"}") == Some(1.0)
    });
    // Thermal back-off: the instance on GPU 1 keeps half its window.
    wait_for("think's window is halved", LIMIT, || {
        window() == Some(serde_json::json!(4))
    });
    let text = metrics();
    assert_eq!(
        series(&text, "gpu_feeder_gpu_temperature_celsius{gpu=\"1\"}"),
        Some(86.0),
        "{text}"
    );
    assert_eq!(
        series(&text, "gpu_feeder_gpu_temperature_alert{gpu=\"0\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        series(&text, "gpu_feeder_gpu_temperature_alerts"),
        Some(1.0),
        "{text}"
    );
    // Between the two levels: still in alert (hysteresis).
    std::fs::write(&temps, "64 77\n").unwrap();
    wait_for("GPU 1 reads 77 °C", LIMIT, || {
        series(&metrics(), "gpu_feeder_gpu_temperature_celsius{gpu=\"1\"}") == Some(77.0)
    });
    let text = metrics();
    assert_eq!(
        series(&text, "gpu_feeder_gpu_temperature_alert{gpu=\"1\"}"),
        Some(1.0),
        "still in alert above gpu.temp_clear_c:\n{text}"
    );
    // Below the clear level: the episode is over; the count stays.
    std::fs::write(&temps, "64 72\n").unwrap();
    wait_for("GPU 1's alert is over", LIMIT, || {
        series(&metrics(), "gpu_feeder_gpu_temperature_alert{gpu=\"1\"}") == Some(0.0)
    });
    wait_for("think's window is whole again", LIMIT, || {
        window() == Some(serde_json::json!(8))
    });
    assert_eq!(
        series(&metrics(), "gpu_feeder_gpu_temperature_alerts"),
        Some(1.0)
    );
    let log = d.log();
    assert_eq!(
        log.matches("GPU 1 (Fake H100 1) is at 86 °C, above gpu.temp_alert_c = 80")
            .count(),
        1,
        "one warning for the episode:\n{log}"
    );
    assert!(
        log.contains("GPU 1 cooled to 72 °C, below gpu.temp_clear_c = 75"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// Request timeouts

/// What the hanging server saw: each chat request's `X-Request-Id` and when.
type Seen = Arc<Mutex<Vec<(String, Instant)>>>;

/// An OpenAI-compatible server that takes every request whose text contains
/// `hang` and never answers it (the connection stays open), and answers the
/// others at once. Stopped on drop.
struct HangingServer {
    url: String,
    seen: Seen,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HangingServer {
    fn start() -> HangingServer {
        use axum::routing::{get, post};
        use axum::Json;
        use serde_json::{json, Value};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let url = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let chat = move |headers: axum::http::HeaderMap, Json(body): Json<Value>| {
                let record = record.clone();
                async move {
                    let id = headers
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    let text = body["messages"].to_string();
                    if text.contains("hang") {
                        record.lock().unwrap().push((id, Instant::now()));
                        std::future::pending::<()>().await;
                    }
                    Json(json!({
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "model": "sim",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "answered"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                    }))
                }
            };
            let app = axum::Router::new()
                .route(
                    "/v1/models",
                    get(|| async { Json(json!({"object": "list", "data": [{"id": "sim"}]})) }),
                )
                .route("/v1/chat/completions", post(chat));
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            format!("http://{addr}")
        });
        HangingServer {
            url,
            seen,
            runtime: Some(runtime),
        }
    }

    /// The requests it took and never answered, in arrival order.
    fn hung(&self) -> Vec<(String, Instant)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for HangingServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// README, "Retries and back-pressure": a request that gets no answer
/// within `dispatch.request_timeout_s` is a timeout, retried up to
/// `max_attempts`, then the job fails saying so; the slot it held is freed,
/// so with a window of one the job queued behind it still runs.
#[test]
fn a_request_without_an_answer_times_out_is_retried_and_frees_its_slot() {
    let server = HangingServer::start();
    let s = Scratch::new(
        &(format!(
            "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[dispatch]\nwindow = 1\nmax_attempts = 2\nrequest_timeout_s = 1\nretry_base_s = 0.1\nretry_max_s = 0.2\nexternal_poll_ms = 100\n\n[health]\ninterval_s = 0.2\n\n",
            free_port()
        ) + &external("think", "think", &server.url)),
    );
    let _d = common::DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    // The hanging job first (higher priority), the answerable one behind it.
    let hang = s.json(&[
        "submit",
        "--model",
        "think",
        "--prompt",
        "hang here",
        "--priority",
        "5",
        "--json",
    ]);
    let fine = s.json(&["submit", "--model", "think", "--prompt", "fine", "--json"]);
    let (hang_id, fine_id) = (
        hang["id"].as_str().unwrap().to_string(),
        fine["id"].as_str().unwrap().to_string(),
    );
    let job = |id: &str| s.json(&["status", id, "--json"]);
    wait_for("both jobs are settled", LIMIT, || {
        job(&hang_id)["status"] == "failed" && job(&fine_id)["status"] == "done"
    });
    let failed = job(&hang_id);
    assert_eq!(failed["attempts"], 2, "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no answer within 1 s"),
        "the error names the timeout: {failed}"
    );
    // The server took both attempts, and nothing else hung; the second
    // came only after the first had had its full second.
    let hung = server.hung();
    assert_eq!(hung.len(), 2, "{hung:?}");
    assert!(
        hung.iter().all(|(id, _)| id.starts_with(&hang_id)),
        "{hung:?}"
    );
    assert!(
        hung[1].1 - hung[0].1 >= Duration::from_secs(1),
        "the first attempt was given up before its timeout: {:?}",
        hung[1].1 - hung[0].1
    );
}

// ---------------------------------------------------------------------------
// A migration failing half-way

/// README, "The job database": the whole upgrade runs in one transaction,
/// so a migration that fails part-way leaves the database as it was, and
/// the error names the migration. Here a database at version 5 holds a
/// table of the same name as one 0007 makes: 0006 applies, 0007 makes its
/// first table, then fails on the second.
#[test]
fn a_sqlite_migration_failing_half_way_leaves_the_database_as_it_was() {
    let s = Scratch::new("");
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "0001_gpu_jobs",
        "0002_follow_ups",
        "0003_crashes",
        "0004_due",
        "0005_place",
    ] {
        let sql = std::fs::read_to_string(format!("{root}/migrations/sqlite/{file}.sql")).unwrap();
        sqlite3(&s.db(), &sql);
    }
    sqlite3(
        &s.db(),
        "CREATE TABLE gpu_results (note TEXT); INSERT INTO gpu_results VALUES ('mine');",
    );
    let schema = || {
        sqlite3(
            &s.db(),
            "SELECT type, name, sql FROM sqlite_master ORDER BY type, name;",
        )
    };
    let versions = || {
        sqlite3(
            &s.db(),
            "SELECT group_concat(version) FROM schema_migrations;",
        )
    };
    let (schema_before, versions_before) = (schema(), versions());
    assert_eq!(versions_before.trim(), "1,2,3,4,5");

    let r = s.run(&["migrate"]);
    assert_ne!(r.code(), 0, "the migration should fail: {}", r.stdout());
    assert!(
        r.stderr().contains("migration 0007_daemons_results failed"),
        "the error names the migration: {}",
        r.stderr()
    );
    assert_eq!(versions(), versions_before, "no version was recorded");
    assert_eq!(
        schema(),
        schema_before,
        "neither 0006 nor the part of 0007 before the failure stayed"
    );
    assert_eq!(
        sqlite3(&s.db(), "SELECT note FROM gpu_results;").trim(),
        "mine"
    );
    // Without the obstacle the same upgrade goes through.
    sqlite3(&s.db(), "DROP TABLE gpu_results;");
    let r = s.run(&["migrate"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let shipped = common::shipped_migrations("sqlite");
    let all: Vec<String> = (1..=shipped).map(|v| v.to_string()).collect();
    assert_eq!(
        versions().trim(),
        all.join(","),
        "every shipped migration applied"
    );
}

// ---------------------------------------------------------------------------
// systemd notifications

/// README, "Running under systemd": through the socket `$NOTIFY_SOCKET`
/// names, `READY=1` once the daemon runs, then `WATCHDOG=1` every half of
/// `$WATCHDOG_USEC` with `STATUS=` lines, and `STOPPING=1` when SIGTERM
/// starts the shutdown. (That pings stop while the supervision tree does
/// not answer is tested beside the heartbeat, in `src/daemon.rs`.)
#[test]
fn under_systemd_the_daemon_says_ready_pings_the_watchdog_and_says_stopping() {
    use std::os::unix::net::UnixDatagram;
    let think = SimProcess::start(&[]);
    let s = Scratch::new(
        &(format!(
            "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[health]\ninterval_s = 0.2\n\n",
            free_port()
        ) + &external("think", "think", &think.url)),
    );
    let path = s.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(LIMIT)).unwrap();
    // systemd names the main process in `WATCHDOG_PID`: a shell that
    // becomes the daemon (`exec`) knows its pid beforehand.
    let log = s.path().join("daemon.log");
    let child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\" --log-format human run")
        .arg(bin())
        .arg(s.config())
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the daemon");
    let d = Daemon { child, log };
    let mut buf = vec![0u8; 4096];
    let mut next = || -> Vec<String> {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}):\n{}", d.log()));
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect()
    };
    let first = next();
    assert!(
        first.iter().any(|l| l == "READY=1"),
        "READY=1 comes first: {first:?}"
    );
    let (mut pings, mut ready_status) = (0, false);
    while pings < 3 || !ready_status {
        let lines = next();
        pings += lines.iter().filter(|l| *l == "WATCHDOG=1").count();
        ready_status |= lines.iter().any(|l| l.starts_with("STATUS=think: ready"));
    }
    let ok = Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    while !next().iter().any(|l| l == "STOPPING=1") {}
}
