//! A real, throwaway PostgreSQL server for the tests: `initdb` in a
//! temporary folder, `pg_ctl start` on a free loopback port, stopped and
//! removed when dropped. The server binaries come from `$FEEDER_PG_BIN`,
//! `/usr/lib/postgresql/*/bin` (the newest), `pg_config --bindir`, or the
//! `PATH`. PostgreSQL refuses to run as root, so as root they run as the
//! `postgres` user (`runuser`, or `su` where there is no `runuser`).
//! Each server has its own folder and port, so several test binaries can run
//! one each at the same time.
//!
//! A server kept in a `static` is never dropped: a small watchdog shell
//! stops it (and removes its folder) once the test process is gone.

// Included by the helpers that the benchmarks take by path too: loaded
// more than once on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "command.rs"]
mod command;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A running PostgreSQL server.
pub struct PgServer {
    /// The temporary folder: the data folder, the log and the Unix socket.
    dir: tempfile::TempDir,
    /// The folder holding `initdb`, `pg_ctl` and `pg_isready`.
    bin: PathBuf,
    /// The loopback port it listens on.
    port: u16,
    /// Whether the server binaries run as the `postgres` user (we are root).
    as_postgres: bool,
}

/// What to install when the server binaries are missing.
const INSTALL: &str = "install PostgreSQL's server (apt-get install postgresql; scripts/test.sh \
     does), or set FEEDER_PG_BIN to the folder with initdb and pg_ctl";

/// The folder holding `initdb` and `pg_ctl`.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FEEDER_PG_BIN") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").exists() && dir.join("pg_ctl").exists(),
            "FEEDER_PG_BIN={} has no initdb and pg_ctl: {INSTALL}",
            dir.display()
        );
        return dir;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort_by_key(|b| {
        b.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(b) = found.pop() {
        return b;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let b = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if b.join("initdb").exists() {
            return b;
        }
    }
    if let Some(b) = on_path("initdb") {
        return b;
    }
    panic!("no PostgreSQL server binaries (initdb, pg_ctl) found: {INSTALL}");
}

/// The `PATH` folder holding `program`, if any.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join(program).is_file())
}

/// `s` quoted for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A port on 127.0.0.1 that nothing listened on a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether this process runs as root (`id -u` says 0).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    /// Starts a fresh server in a new temporary folder on a free 127.0.0.1
    /// port (trying up to three ports). Panics, naming what is missing or
    /// with the end of the server's log, when it cannot.
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("pg")
            .tempdir_in("/tmp")
            .expect("temp dir for PostgreSQL");
        let mut server = PgServer {
            dir,
            bin,
            port: 0,
            as_postgres,
        };
        if as_postgres {
            // tempfile makes the folder 0700 for root: hand it to postgres.
            server.must(
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:")
                    .arg(server.dir.path()),
            );
        }
        let data = server.data();
        let initdb = server.bin.join("initdb");
        let out = server.run(
            &initdb,
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb ({}) failed: {}{}",
            initdb.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut last = String::new();
        for _ in 0..3 {
            server.port = free_port();
            if server.pg_ctl_start() {
                server.watchdog();
                return server;
            }
            // Most often the port was taken meanwhile: try another one,
            // after making sure no half-started server holds the data.
            last = server.log_tail();
            server.kill();
        }
        panic!("PostgreSQL did not start; the end of its log:\n{last}");
    }

    /// The data folder (`initdb -D`).
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file (`pg_ctl -l`).
    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The last 30 lines of the server's log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs a server binary (as `postgres` when we are root).
    fn run(&self, program: &Path, args: &[&str]) -> Output {
        let mut cmd = if !self.as_postgres {
            let mut c = Command::new(program);
            c.args(args);
            c
        } else if on_path("runuser").is_some() {
            let mut c = Command::new("runuser");
            c.arg("-u")
                .arg("postgres")
                .arg("--")
                .arg(program)
                .args(args);
            c
        } else {
            let line = std::iter::once(program.to_str().expect("UTF-8 path"))
                .chain(args.iter().copied())
                .map(sh_quote)
                .collect::<Vec<_>>()
                .join(" ");
            let mut c = Command::new("su");
            c.args(["postgres", "-s", "/bin/sh", "-c", &line]);
            c
        };
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
    }

    /// Runs `cmd` (as we are), panicking with its stderr when it fails.
    fn must(&self, cmd: &mut Command) {
        let out = cmd.output().expect("run");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start` on `self.port`, then waits until it answers; whether
    /// it came up.
    fn pg_ctl_start(&self) -> bool {
        let data = self.data();
        let log = self.log();
        // fsync off: a throwaway server; its data need not survive a power cut.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        let out = self.run(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        // `-w`: pg_ctl returns once the server accepts connections.
        out.status.success()
    }

    /// Stops the server and removes its folder once this process is gone
    /// (for a server held in a `static`, which is never dropped).
    fn watchdog(&self) {
        let stop = format!(
            "{} -D {} -m immediate stop",
            sh_quote(&self.bin.join("pg_ctl").display().to_string()),
            sh_quote(&self.data().display().to_string()),
        );
        let stop = if !self.as_postgres {
            stop
        } else if on_path("runuser").is_some() {
            format!("runuser -u postgres -- {stop}")
        } else {
            format!("su postgres -s /bin/sh -c {}", sh_quote(&stop))
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = sh_quote(&self.dir.path().display().to_string()),
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// `postgresql://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new empty database with a name of its own; its URL.
    pub fn fresh_db(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        self.psql(&self.url(), &format!("CREATE DATABASE {name}"));
        format!("postgresql://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` with `psql` against `url`; its output, unaligned, tuples only.
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let psql = [self.bin.join("psql"), PathBuf::from("/usr/bin/psql")]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let out = command::succeed(
            Command::new(psql)
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    url,
                    "-c",
                    sql,
                ])
                .stdin(Stdio::null()),
            &format!("psql {sql:?}"),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server (fast shutdown: connections are cut), keeping its data.
    pub fn stop(&self) {
        let data = self.data();
        let out = self.run(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}; the end of the server's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// Starts it again on the same port with the same data.
    pub fn start_again(&self) {
        assert!(
            self.pg_ctl_start(),
            "PostgreSQL did not start again; the end of its log:\n{}",
            self.log_tail()
        );
    }

    /// Stops and starts it again.
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }
}

impl PgServer {
    /// `pg_ctl stop -m immediate`, ignoring whether there was a server.
    fn kill(&self) {
        let data = self.data();
        let _ = self.run(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for PgServer {
    /// Stops the server at once; the temporary folder goes with `dir`.
    fn drop(&mut self) {
        self.kill();
    }
}
