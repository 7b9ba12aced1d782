//! The Docker engine and the simulated server's image, for the tests that
//! launch containers: they fail (never skip) when the engine is missing.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The simulated server's image (`scripts/sim-image.sh`).
pub const IMAGE: &str = "gpu-feeder-sim:test";

/// Runs the docker CLI.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `docker {}`: {e}", args.join(" ")))
}

/// Runs the docker CLI, expecting success; returns its stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "`docker {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The engine is up and the simulated server's image holds the current
/// code: checked (and the image rebuilt if needed) once for all the tests
/// of this binary.
pub fn prepared() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let info = Command::new("docker").arg("info").output();
        match info {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Err(format!(
                    "the Docker engine does not answer (`docker info` failed: {}); these tests \
                     need a running dockerd: start it (systemctl start docker, or dockerd &) and \
                     check $DOCKER_HOST",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "cannot run the docker CLI ({e}); these tests need Docker: install docker.io \
                     and start dockerd"
                ))
            }
        }
        // Always through the script: it rebuilds the static binary when the
        // code changed (a no-op otherwise) and re-imports the image only
        // when the binary differs, so the tests never run a stale server.
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/sim-image.sh");
        eprintln!(
            "making sure {IMAGE} holds the current gpu-feeder ({})",
            script.display()
        );
        let mut cmd = Command::new(&script);
        // What cargo sets for test processes (the library path of build
        // outputs, package variables) would make the script's cargo build
        // see a changed environment and rebuild for nothing.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if (k.starts_with("CARGO") && k != "CARGO_HOME")
                || k == "LD_LIBRARY_PATH"
                || k == "RUST_RECURSION_COUNT"
            {
                cmd.env_remove(&key);
            }
        }
        let status = cmd
            .arg(IMAGE)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({status}), so the image {IMAGE} is missing",
                script.display()
            ))
        }
    });
    if let Err(e) = ready {
        panic!("{e}");
    }
}
