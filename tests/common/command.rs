//! Running a helper program that must succeed. Its own file, so that the
//! helpers the benchmarks include by path (`pg.rs`, `vllm.rs`) can include
//! it too.

#![allow(dead_code)]

use std::process::{Child, Command, Output};

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

/// Reads the first line `child` prints on its piped stdout, `listening on
/// URL`, and returns the URL; `what` names the program when it says
/// anything else.
pub fn listening_url(child: &mut Child, what: &str) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("its stdout is piped"))
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{what} prints its address: {e}"));
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{what} said {line:?}"))
        .to_string()
}
