//! README promises about the PostgreSQL queue that no other test covers: a
//! claim whose reply was lost after it committed is found again by its
//! token, not claimed twice; while the listening connection is down the
//! queue is polled every 5 s, and listening resumes; a migration failing
//! half-way is rolled back. A real PostgreSQL server; the faults are cut
//! connections, made by a TCP proxy between gpu-feeder and the server that
//! reads the PostgreSQL protocol.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use feeder_actors::prefix::{ClaimOrder, Grouping};
use feeder_actors::store::ClaimRequest;
use feeder_actors::{JobStore, ModelType, NewJob, Payload, Timestamp};
use gpu_feeder::store::pg::{Clock, Patience, PgStore};

use common::pg::PgServer;
use common::{external, free_port, wait_for, DaemonProcess, Scratch, SimProcess};

const LIMIT: Duration = Duration::from_secs(90);

fn server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

// ---------------------------------------------------------------------------
// The proxy

/// What the proxy does to the traffic.
const PASS: u8 = 0;
/// Holds back the server's replies up to each `ReadyForQuery`; when one
/// that says no transaction is open (the last one committed) follows an
/// `UPDATE` of at least one row, drops them and cuts that connection: the
/// update was committed, the client never hears so. Once only, then `PASS`.
const CUT_AFTER_UPDATE: u8 = 1;
/// Cuts every connection that sends `LISTEN gpu_jobs`, before the server
/// sees it.
const REFUSE_LISTEN: u8 = 2;

struct ProxyState {
    upstream: u16,
    mode: AtomicU8,
    /// Connections cut after a committed update.
    cuts: AtomicUsize,
    /// `LISTEN` connections refused.
    refused: AtomicUsize,
    /// `LISTEN gpu_jobs` sent through.
    listens: AtomicUsize,
    /// The server process of the connection that last sent `LISTEN gpu_jobs`.
    listener_pid: AtomicI32,
}

/// A TCP proxy on a free loopback port in front of a PostgreSQL server;
/// it runs until the test process ends.
struct PgProxy {
    port: u16,
    state: Arc<ProxyState>,
}

impl PgProxy {
    fn start(upstream: u16) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            upstream,
            mode: AtomicU8::new(PASS),
            cuts: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            listens: AtomicUsize::new(0),
            listener_pid: AtomicI32::new(0),
        });
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || relay(client, state));
            }
        });
        PgProxy { port, state }
    }

    fn set(&self, mode: u8) {
        self.state.mode.store(mode, Ordering::SeqCst);
    }

    fn cuts(&self) -> usize {
        self.state.cuts.load(Ordering::SeqCst)
    }

    fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    fn listens(&self) -> usize {
        self.state.listens.load(Ordering::SeqCst)
    }

    /// The server process of the connection that last sent `LISTEN gpu_jobs`.
    fn listener_pid(&self) -> i32 {
        self.state.listener_pid.load(Ordering::SeqCst)
    }

    /// `url` with the server's port replaced by the proxy's.
    fn url(&self, url: &str) -> String {
        url.replace(
            &format!(":{}/", self.state.upstream),
            &format!(":{}/", self.port),
        )
    }
}

fn cut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Relays one connection both ways until either side closes it or the
/// mode says to cut it.
fn relay(client: TcpStream, state: Arc<ProxyState>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", state.upstream)) else {
        return;
    };
    let (mut from_client, mut to_server) =
        (client.try_clone().unwrap(), server.try_clone().unwrap());
    // This connection's server process, from its BackendKeyData.
    let backend = Arc::new(AtomicI32::new(0));
    let up = state.clone();
    let backend_pid = backend.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if chunk.windows(15).any(|w| w == b"LISTEN gpu_jobs") {
                if up.mode.load(Ordering::SeqCst) == REFUSE_LISTEN {
                    up.refused.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                up.listens.fetch_add(1, Ordering::SeqCst);
                up.listener_pid
                    .store(backend_pid.load(Ordering::SeqCst), Ordering::SeqCst);
            }
            if to_server.write_all(chunk).is_err() {
                break;
            }
        }
        cut(&from_client, &to_server);
    });
    // Server to client, a message at a time (a type byte, then a length
    // that counts itself): the proxy connects without TLS, so every
    // message the server sends has that shape.
    let (mut from_server, mut to_client) = (server, client);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut held: Vec<u8> = Vec::new();
    let mut updated = false;
    loop {
        let n = match from_server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while pending.len() - at >= 5 {
            let len = u32::from_be_bytes(pending[at + 1..at + 5].try_into().unwrap()) as usize;
            if pending.len() - at < 1 + len {
                break;
            }
            let message = &pending[at..at + 1 + len];
            at += 1 + len;
            if message[0] == b'K' && message.len() >= 9 {
                backend.store(
                    i32::from_be_bytes(message[5..9].try_into().unwrap()),
                    Ordering::SeqCst,
                );
            }
            if state.mode.load(Ordering::SeqCst) != CUT_AFTER_UPDATE {
                held.extend_from_slice(message);
                continue;
            }
            match message[0] {
                b'C' => {
                    let tag = &message[5..message.len() - 1];
                    updated |= tag.starts_with(b"UPDATE ") && tag != b"UPDATE 0";
                    held.extend_from_slice(message);
                }
                b'Z' if updated && message.get(5) == Some(&b'I') => {
                    state.mode.store(PASS, Ordering::SeqCst);
                    state.cuts.fetch_add(1, Ordering::SeqCst);
                    cut(&from_server, &to_client);
                    return;
                }
                _ => held.extend_from_slice(message),
            }
            if message[0] == b'Z' {
                if to_client.write_all(&held).is_err() {
                    break;
                }
                held.clear();
            }
        }
        pending.drain(..at);
        if state.mode.load(Ordering::SeqCst) != CUT_AFTER_UPDATE && !held.is_empty() {
            if to_client.write_all(&held).is_err() {
                break;
            }
            held.clear();
        }
    }
    cut(&from_server, &to_client);
}

// ---------------------------------------------------------------------------
// A claim cut off after its commit

fn job(tag: &str) -> NewJob {
    NewJob::new(
        ModelType::Think,
        Payload::Inline(format!("{{\"prompt\":\"{tag}\"}}")),
        format!("sha-{tag}"),
    )
}

/// README, "Many hosts" (PostgreSQL restarts): a claim cut off after
/// committing is found again by its token, not claimed twice. The claim
/// commits; the connection is cut before the store hears so; the store,
/// which waits for the server, tries again on a new connection and must
/// return the rows it took, and take no others. Both kinds of claim: one
/// statement (plain order), and a transaction of two (prefix groups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_cut_off_after_its_commit_is_found_again_by_its_token() {
    claim_cut_off_after_commit(ClaimOrder::Plain).await;
    claim_cut_off_after_commit(ClaimOrder::Grouped(Grouping {
        warm: Vec::new(),
        max_wait: Duration::from_secs(60),
    }))
    .await;
}

async fn claim_cut_off_after_commit(order: ClaimOrder) {
    let pg = server();
    let url = pg.fresh_db();
    let proxy = PgProxy::start(pg.port());
    let store = PgStore::connect(&proxy.url(&url), Clock::Database, Patience::Reconnect)
        .await
        .expect("connect through the proxy");
    for tag in ["a", "b", "c"] {
        store.submit(job(tag), Timestamp::now()).await.unwrap();
    }
    proxy.set(CUT_AFTER_UPDATE);
    let claimed = tokio::time::timeout(
        LIMIT,
        store.claim_with(
            &ClaimRequest {
                model: ModelType::Think,
                n: 1,
                lease: Duration::from_secs(600),
                owner: "host-a".into(),
                order: order.clone(),
            },
            Timestamp::now(),
        ),
    )
    .await
    .expect("the claim returns once the server can be reached")
    .expect("the claim succeeds on a new connection");
    assert_eq!(
        proxy.cuts(),
        1,
        "the claim's reply was cut off after its commit ({order:?})"
    );
    assert_eq!(claimed.len(), 1, "{order:?}: {claimed:?}");
    let processing = pg.psql(
        &url,
        "SELECT encode(id, 'hex') || ' ' || claim_id FROM gpu_jobs WHERE status = 'processing'",
    );
    let rows: Vec<&str> = processing.lines().collect();
    assert_eq!(
        rows,
        vec![format!(
            "{} {}",
            claimed[0].job.id, claimed[0].claim.claim_id
        )],
        "{order:?}: one job taken, the one returned, under the returned token"
    );
    assert_eq!(
        pg.psql(
            &url,
            "SELECT count(*) FROM gpu_jobs WHERE status = 'pending'"
        )
        .trim(),
        "2"
    );
}

// ---------------------------------------------------------------------------
// The slow poll while the listening connection is down

/// Whether the log says the listening connection is back.
fn listens_again(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("listening for new jobs on") && l.ends_with(" again"))
}

/// README, "Many hosts" (Wake-ups): while the listening connection is down
/// the daemon looks every 5 s instead, so a row inserted with plain SQL is
/// still claimed; once the connection is back it listens again. The
/// listening backend is terminated on the server and the proxy refuses its
/// reconnections until the row is done.
#[test]
fn while_the_listening_connection_is_down_the_queue_is_polled() {
    let pg = server();
    let url = pg.fresh_db();
    let proxy = PgProxy::start(pg.port());
    let think = SimProcess::start(&[]);
    let queue = format!(
        "database_url = \"{}\"\ndaemon_id = \"listen-test\"\n",
        proxy.url(&url)
    );
    let s = Scratch::with_queue(
        &queue,
        &(format!(
            "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[health]\ninterval_s = 0.2\n\n[dispatch]\nexternal_poll_ms = 100\n\n",
            free_port()
        ) + &external("think", "think", &think.url)),
    );
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let alive = |pid: i32| {
        pg.psql(
            &url,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        )
        .trim()
            == "1"
    };
    wait_for("the daemon listens", LIMIT, || {
        proxy.listens() == 1 && alive(proxy.listener_pid())
    });
    let first = proxy.listener_pid();

    proxy.set(REFUSE_LISTEN);
    pg.psql(&url, &format!("SELECT pg_terminate_backend({first})"));
    wait_for("the daemon says it polls instead", LIMIT, || {
        d.log()
            .contains("until it is back, the queue is polled every 5 s")
    });
    wait_for("a reconnection was refused", LIMIT, || proxy.refused() > 0);

    pg.psql(
        &url,
        "INSERT INTO gpu_jobs (payload_sha256, model_type, payload_inline) VALUES ('by-sql-1', 'think', '{\"prompt\": \"inserted while nobody listens\"}')",
    );
    let status = |sha: &str| {
        pg.psql(
            &url,
            &format!("SELECT status FROM gpu_jobs WHERE payload_sha256 = '{sha}'"),
        )
        .trim()
        .to_string()
    };
    wait_for("the row inserted by SQL is done", LIMIT, || {
        status("by-sql-1") == "done"
    });
    assert_eq!(proxy.listens(), 1, "it was found without listening");
    assert!(
        !listens_again(&d.log()),
        "the listening connection was still down:\n{}",
        d.log()
    );

    proxy.set(PASS);
    wait_for("the daemon listens again", LIMIT, || {
        proxy.listens() == 2 && alive(proxy.listener_pid()) && listens_again(&d.log())
    });
    pg.psql(
        &url,
        "INSERT INTO gpu_jobs (payload_sha256, model_type, payload_inline) VALUES ('by-sql-2', 'think', '{\"prompt\": \"inserted once it listens again\"}')",
    );
    wait_for("the second row is done", LIMIT, || {
        status("by-sql-2") == "done"
    });
}

// ---------------------------------------------------------------------------
// A migration failing half-way

/// README, "Many hosts" and "The job database": migrations run in one
/// transaction, so one that fails part-way leaves the database as it was,
/// and the error names it. The database is at version 2 and holds a table
/// named as the one 0004 makes: 0003 (a function and triggers) applies,
/// then 0004 fails.
#[test]
fn a_postgres_migration_failing_half_way_leaves_the_database_as_it_was() {
    let pg = server();
    let url = pg.fresh_db();
    let root = env!("CARGO_MANIFEST_DIR");
    pg.psql(
        &url,
        "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, name text NOT NULL, \
         applied_at double precision NOT NULL DEFAULT extract(epoch FROM now()))",
    );
    for (version, file) in [(1, "gpu_jobs"), (2, "daemons")] {
        let sql = std::fs::read_to_string(format!(
            "{root}/migrations/postgres/{version:04}_{file}.sql"
        ))
        .unwrap();
        pg.psql(&url, &sql);
        pg.psql(
            &url,
            &format!("INSERT INTO schema_migrations (version, name) VALUES ({version}, '{file}')"),
        );
    }
    pg.psql(
        &url,
        "CREATE TABLE gpu_results (note text); INSERT INTO gpu_results VALUES ('mine')",
    );
    let schema = || {
        pg.psql(
            &url,
            "SELECT (SELECT string_agg(relname || ':' || relkind::text, ',' ORDER BY relname) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE nspname = 'public') \
             || ' / ' || (SELECT coalesce(string_agg(proname, ',' ORDER BY proname), '') FROM pg_proc p \
               JOIN pg_namespace n ON n.oid = p.pronamespace WHERE nspname = 'public') \
             || ' / ' || (SELECT coalesce(string_agg(tgname, ',' ORDER BY tgname), '') FROM pg_trigger \
               WHERE NOT tgisinternal)",
        )
    };
    let versions = || {
        pg.psql(
            &url,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations",
        )
    };
    let (schema_before, versions_before) = (schema(), versions());
    assert_eq!(versions_before.trim(), "1,2");

    let s = Scratch::with_queue(&format!("database_url = \"{url}\"\n"), "");
    let r = s.run(&["migrate"]);
    assert_ne!(r.code(), 0, "the migration should fail: {}", r.stdout());
    assert!(
        r.stderr().contains("migration 0004_results failed"),
        "the error names the migration: {}",
        r.stderr()
    );
    assert_eq!(versions(), versions_before, "no version was recorded");
    assert_eq!(
        schema(),
        schema_before,
        "0003's function and triggers did not stay"
    );
    assert_eq!(pg.psql(&url, "SELECT note FROM gpu_results").trim(), "mine");
    pg.psql(&url, "DROP TABLE gpu_results");
    let r = s.run(&["migrate"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let shipped = common::shipped_migrations("postgres");
    let all: Vec<String> = (1..=shipped).map(|v| v.to_string()).collect();
    assert_eq!(
        versions().trim(),
        all.join(","),
        "every shipped migration applied"
    );
}
