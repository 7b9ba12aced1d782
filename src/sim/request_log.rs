//! `--request-log FILE`: one line per chat request received and per answer
//! given, appended as it happens, so that what the server saw outlives a
//! client killed mid-request (and the server itself, up to its last line).
//!
//! Lines are tab-separated:
//!
//! ```text
//! received  N  REQUEST-ID
//! answered  N  STATUS  REQUEST-ID
//! ```
//!
//! `N` numbers the requests in arrival order (the `n` of the answer's
//! `chatcmpl-sim-N` id); `REQUEST-ID` is the request's `X-Request-Id`
//! header, `-` without one. gpu-feeder sends `JOB-ATTEMPT-CLAIM` there.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

/// The open log.
pub struct RequestLog {
    file: Mutex<File>,
}

impl RequestLog {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: &Path) -> std::io::Result<RequestLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(RequestLog {
            file: Mutex::new(file),
        })
    }

    /// Request `n` arrived with this `X-Request-Id`.
    pub fn received(&self, n: u64, id: &str) {
        self.line(&format!("received\t{n}\t{id}\n"));
    }

    /// Request `n` was answered with `status`.
    pub fn answered(&self, n: u64, status: u16, id: &str) {
        self.line(&format!("answered\t{n}\t{status}\t{id}\n"));
    }

    /// One `write` per line on an unbuffered file in append mode: each line
    /// lands whole, and is in the file as soon as it returns.
    fn line(&self, text: &str) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(text.as_bytes()) {
            eprintln!("sim: cannot write to the request log: {e}");
        }
    }
}
