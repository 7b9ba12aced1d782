//! The admin endpoint keeps the kind of a store failure: a job store that
//! cannot be reached now answers 503 (try again later), not 500.

mod common;

use std::time::Duration;

use common::{external, free_port, wait_for, DaemonProcess, Scratch, SimProcess};

#[test]
fn a_submission_to_a_locked_store_answers_503() {
    let think = SimProcess::start(&[]);
    let port = free_port();
    let s = Scratch::new(&format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n{}",
        external("think", "think", &think.url)
    ));
    let _daemon = DaemonProcess::start(&s, "daemon");
    wait_for("the instance is ready", Duration::from_secs(60), || {
        s.instance_is("think", "ready")
    });
    // Another program holds the database's write lock past the busy timeout.
    let holder = rusqlite::Connection::open(s.db()).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (code, body) = common::http::http(
        "POST",
        &format!("http://127.0.0.1:{port}/v1/jobs"),
        None,
        Some(r#"{"model": "think", "prompt": "hello"}"#),
    );
    holder.execute_batch("ROLLBACK").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("unavailable"), "{body}");
}
