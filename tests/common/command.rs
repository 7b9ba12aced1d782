//! Running a helper program that must succeed. Its own file, so that the
//! helpers the benchmarks include by path (`pg.rs`, `vllm.rs`) can include
//! it too.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `cmd` to completion and asserts that it succeeded: `what` names it
/// when it cannot start or fails.
#[track_caller]
pub fn succeed(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
