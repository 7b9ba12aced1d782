//! What a simulated server saw, read from its `--request-log`: each chat
//! request it received, the job and attempt its `X-Request-Id` names, and
//! the status it answered (none when the server or the client died first).
//! The crash tests count the sends of each job there, where duplicates
//! would cost GPU time, rather than in the daemon's own records.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Send {
    /// The server's request number (`chatcmpl-sim-N`).
    pub n: u64,
    /// The job it was for.
    pub job: String,
    /// Which attempt of the job (1 for the first).
    pub attempt: u32,
    /// The claim it was sent under.
    pub claim: String,
    /// The HTTP status answered, if any.
    pub status: Option<u16>,
}

/// A `--request-log` file, and the flags that ask a sim to write it.
pub struct RequestLog {
    pub path: PathBuf,
}

impl RequestLog {
    /// A log at `dir/name.requests`.
    pub fn new(dir: &Path, name: &str) -> RequestLog {
        RequestLog {
            path: dir.join(format!("{name}.requests")),
        }
    }

    /// `--request-log PATH`, for the sim's command line.
    pub fn flags(&self) -> [&str; 2] {
        ["--request-log", self.path.to_str().expect("a UTF-8 path")]
    }

    /// `gpu-feeder sim ARGS` writing this log.
    pub fn sim(&self, args: &[&str]) -> super::SimProcess {
        super::SimProcess::start(&[args, &self.flags()].concat())
    }

    /// Every request for a job received so far, in arrival order (requests
    /// that name no job, such as the health checks' canary, are left out).
    pub fn sends(&self) -> Vec<Send> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut sends: BTreeMap<u64, Send> = BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f.as_slice() {
                ["received", _, "-"] => {}
                ["received", n, id] => {
                    let mut parts = id.splitn(3, '-');
                    let (Some(job), Some(attempt), Some(claim)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        panic!("request {n}'s X-Request-Id is not JOB-ATTEMPT-CLAIM: `{id}`");
                    };
                    let n: u64 = n.parse().unwrap();
                    sends.insert(
                        n,
                        Send {
                            n,
                            job: job.to_string(),
                            attempt: attempt.parse().unwrap(),
                            claim: claim.to_string(),
                            status: None,
                        },
                    );
                }
                ["answered", n, status, _] => {
                    let n: u64 = n.parse().unwrap();
                    if let Some(s) = sends.get_mut(&n) {
                        s.status = Some(status.parse().unwrap());
                    }
                }
                _ => panic!("not a request log line: `{line}`"),
            }
        }
        sends.into_values().collect()
    }
}

/// The server-side view of a run, with what the daemon's kills stranded.
#[derive(Default)]
pub struct Served {
    /// Every request the servers received.
    pub sends: Vec<Send>,
    /// For each job, how many kills found it claimed (`processing`).
    pub stranded: HashMap<String, u32>,
}

impl Served {
    /// Notes the jobs a kill found claimed; how many there were.
    pub fn kill_found(&mut self, claimed: Vec<String>) -> usize {
        let n = claimed.len();
        for id in claimed {
            *self.stranded.entry(id).or_default() += 1;
        }
        n
    }

    /// Reads what the servers behind `logs` received.
    pub fn read(&mut self, logs: &[&RequestLog]) {
        self.sends = logs.iter().flat_map(|l| l.sends()).collect();
    }

    /// Sends of the same job and attempt beyond the first, by job.
    pub fn duplicates(&self) -> HashMap<String, u32> {
        let mut per: HashMap<(&str, u32), u32> = HashMap::new();
        for s in &self.sends {
            *per.entry((&s.job, s.attempt)).or_default() += 1;
        }
        let mut out = HashMap::new();
        for ((job, _), k) in per {
            if k > 1 {
                *out.entry(job.to_string()).or_default() += k - 1;
            }
        }
        out
    }

    /// Exactly once, as the server saw it: a job was sent again for the
    /// same attempt only as often as a kill found it claimed, and answered
    /// 200 more than once only then; each `done` job in `jobs` (with a
    /// server response; parents have none) holds the answer the server
    /// gave to a request for that job. Returns (sends, duplicates).
    pub fn assert_exactly_once(&self, jobs: &[serde_json::Value]) -> (usize, u32) {
        let answers: Vec<(String, Option<String>)> = jobs
            .iter()
            .map(|j| {
                let id = j["id"].as_str().unwrap().to_string();
                if j["status"] != "done" {
                    return (id, None);
                }
                let path = j["result_path"].as_str().expect("a done job has a result");
                let doc: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
                // A parent: merged from its fragments, never sent.
                let answer = doc["response"]["id"].as_str().map(str::to_string);
                (id, answer)
            })
            .collect();
        self.assert_answers(&answers)
    }

    /// [`Self::assert_exactly_once`] for jobs given as (id, the server's
    /// answer id their result holds, if done and sent): for a queue whose
    /// results are not files.
    pub fn assert_answers(&self, jobs: &[(String, Option<String>)]) -> (usize, u32) {
        let dups = self.duplicates();
        for (job, d) in &dups {
            let stranded = self.stranded.get(job).copied().unwrap_or(0);
            assert!(
                *d <= stranded,
                "job {job} was sent {d} time(s) again for the same attempt, but kills found it claimed {stranded} time(s): {:?}",
                self.sends.iter().filter(|s| &s.job == job).collect::<Vec<_>>()
            );
        }
        let mut ok: HashMap<&str, u32> = HashMap::new();
        for s in &self.sends {
            if s.status == Some(200) {
                *ok.entry(&s.job).or_default() += 1;
            }
        }
        for (id, answer) in jobs {
            let stranded = self.stranded.get(id).copied().unwrap_or(0);
            let answers = ok.get(id.as_str()).copied().unwrap_or(0);
            assert!(
                answers <= 1 + stranded,
                "job {id} was answered 200 {answers} times with {stranded} kill(s) finding it claimed"
            );
            let Some(rid) = answer else { continue };
            let n: u64 = rid
                .strip_prefix("chatcmpl-sim-")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("job {id}: not the sim's answer id: {rid}"));
            let send = self
                .sends
                .iter()
                .find(|s| s.n == n && &s.job == id)
                .unwrap_or_else(|| panic!("job {id}'s result is answer {n}, which the server never gave to a request for it"));
            assert_eq!(send.status, Some(200), "job {id} holds {send:?}");
        }
        (self.sends.len(), dups.values().sum())
    }
}

impl super::Scratch {
    /// The jobs claimed now (`processing`), read straight from the SQLite
    /// file (the daemon is dead when a crash test asks).
    pub fn claimed(&self) -> Vec<String> {
        super::sqlite3(
            &self.db(),
            "SELECT lower(hex(id)) FROM gpu_jobs WHERE status = 'processing';",
        )
        .lines()
        .map(str::to_string)
        .collect()
    }
}
