//! Helpers shared by the integration tests: a scratch folder with a
//! configuration, and a way to run the real `gpu-feeder` binary in it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch folder holding `feeder.toml`, the database and the state folders.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    /// A scratch folder whose configuration is `[queue]` pointing inside it,
    /// followed by `extra`.
    pub fn new(extra: &str) -> Scratch {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "[queue]\ndb_path = \"jobs.db\"\nresults_dir = \"results\"\nstage_dir = \"stage\"\n\n{extra}"
        );
        std::fs::write(dir.path().join("feeder.toml"), config).expect("write config");
        std::fs::create_dir_all(dir.path().join("stage")).expect("stage dir");
        Scratch { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("feeder.toml")
    }

    pub fn db(&self) -> PathBuf {
        self.path().join("jobs.db")
    }

    pub fn stage(&self) -> PathBuf {
        self.path().join("stage")
    }

    /// Runs `gpu-feeder --config <scratch>/feeder.toml ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(bin())
            .arg("--config")
            .arg(self.config())
            .args(args)
            .current_dir(self.path())
            .env_remove("FEEDER_CONFIG")
            .output()
            .expect("run gpu-feeder");
        Run(out)
    }

    /// Like `run`, expecting success and JSON on stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let r = self.run(args);
        assert_eq!(r.code(), 0, "gpu-feeder {args:?} failed:\n{}", r.stderr());
        serde_json::from_str(&r.stdout()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout()))
    }
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_gpu-feeder")
}

/// A finished run.
pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
}
