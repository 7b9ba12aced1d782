//! The `JobStore` contract, written once and run against every adapter.
//!
//! An adapter's test file provides a [`StoreFixture`] and expands
//! [`store_contract_tests!`](crate::store_contract_tests), which makes one
//! `#[tokio::test]` per case below.

use std::collections::HashSet;
use std::path::Path;

use crate::results::ResultRef;
use std::sync::Arc;

use std::time::Duration;
use tokio::sync::Barrier;

use crate::fragment::{Place, Tile};
use crate::job::{
    Claim, Completion, FailOutcome, Failure, JobId, JobStatus, ListFilter, ModelType, NewJob,
    Payload,
};
use crate::prefix::{ClaimOrder, Grouping};
use crate::store::{ClaimRequest, JobStore, ParentOutcome, Settle, Settled, StoreError};
use crate::time::Timestamp;

/// A claim of up to `n` think jobs, leased for a minute to "o", in `order`.
fn think_claim(n: usize, order: ClaimOrder) -> ClaimRequest {
    ClaimRequest {
        model: ModelType::Think,
        n,
        lease: secs(60),
        owner: "o".to_string(),
        order,
    }
}

/// Gives handles on one fresh store.
#[async_trait::async_trait]
pub trait StoreFixture: Send + Sync {
    /// A new handle on the same store: for a database, a separate connection,
    /// as a second process would have.
    async fn handle(&self) -> Arc<dyn JobStore>;
}

/// Expands to one `#[tokio::test]` per contract case, each with a fresh fixture
/// from `$fixture` (an expression evaluated once per test).
#[macro_export]
macro_rules! store_contract_tests {
    ($fixture:expr) => {
        $crate::store_contract_tests!(@cases $fixture;
            idempotent_submit, submit_batch_is_idempotent_line_by_line, claim_order,
            claim_respects_run_at_and_model, concurrent_claimers_never_share,
            lease_expiry_reclaims, stale_claim_cannot_complete, backoff_schedule,
            max_attempts_leads_to_failed, permanent_failure_fails_at_once,
            release_keeps_attempts, crashes_quarantine_a_poison_job,
            release_owner_returns_its_claims, a_silent_daemons_claims_are_taken_back,
            daemons_register_renew_and_sign_off, cancel,
            manual_retry, fragments_of_parent, complete_records_result,
            settle_batch_mixes_outcomes, parents_finish_exactly_once,
            change_token_moves_on_foreign_commits, next_due_is_the_earliest_future_run_at,
            follow_ups_are_pending_until_created,
            a_follow_up_is_created_once, stats_per_model_and_status,
            list_filters_and_limit, get_unknown_is_none, resolve_takes_ids_and_unique_prefixes,
            grouped_claims_take_a_prefix_together, grouping_never_starves_an_old_job,
            priority_wins_over_grouping, a_warm_key_is_found_beyond_the_lookahead,
            fragments_share_their_parents_key);
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $fixture;
                $crate::testkit::store_contract::$case(&fixture).await;
            }
        )*
    };
}

/// A fixed point in time for the cases.
pub const T0: Timestamp = Timestamp(1_700_000_000_000);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// An inline job whose payload hash is derived from `tag`.
pub fn job(model: ModelType, tag: &str) -> NewJob {
    NewJob::new(
        model,
        Payload::Inline(format!("{{\"prompt\":\"{tag}\"}}")),
        format!("sha-{tag}"),
    )
}

/// A question about document `doc`: the document's text (longer than a
/// prefix key's lead) followed by question `q`.
pub fn question(doc: &str, q: usize) -> NewJob {
    let text = format!("{} question {q}?", format!("document {doc}. ").repeat(60));
    NewJob::new(
        ModelType::Think,
        Payload::Inline(serde_json::json!({ "prompt": text }).to_string()),
        format!("sha-{doc}-{q}"),
    )
}

fn grouped(warm: &[&str], max_wait: Duration) -> ClaimOrder {
    ClaimOrder::Grouped(Grouping {
        warm: warm.iter().map(|k| k.to_string()).collect(),
        max_wait,
    })
}

fn done(tag: &str) -> Completion {
    Completion {
        result_path: ResultRef::file(Path::new(&format!("/results/{tag}.json"))),
        prompt_tokens: Some(11),
        completion_tokens: Some(22),
        latency: Duration::from_millis(345),
    }
}

fn retryable(msg: &str, after: Duration) -> Failure {
    Failure {
        message: msg.to_string(),
        retry_after: Some(after),
    }
}

async fn status_of(s: &Arc<dyn JobStore>, id: JobId) -> JobStatus {
    s.get(id).await.unwrap().expect("job exists").status
}

async fn claim_one(s: &Arc<dyn JobStore>, model: ModelType, now: Timestamp) -> Option<Claim> {
    let mut got = s.claim(model, 1, secs(60), "owner-a", now).await.unwrap();
    assert!(got.len() <= 1, "claim(1) returned {} jobs", got.len());
    got.pop().map(|c| c.claim)
}

/// The same model and payload hash give the same job; another model does not.
pub async fn idempotent_submit(f: &impl StoreFixture) {
    let s = f.handle().await;
    let a = s.submit(job(ModelType::Vision, "a"), T0).await.unwrap();
    assert!(a.created);
    assert_eq!(a.status, JobStatus::Pending);
    let again = s
        .submit(job(ModelType::Vision, "a"), T0 + secs(1))
        .await
        .unwrap();
    assert!(
        !again.created,
        "a resubmission must return the existing job"
    );
    assert_eq!(again.id, a.id);
    let other_model = s.submit(job(ModelType::Think, "a"), T0).await.unwrap();
    assert!(other_model.created);
    assert_ne!(other_model.id, a.id);
    // The existing job is returned in whatever state it is now.
    let c = claim_one(&s, ModelType::Vision, T0).await.unwrap();
    s.complete(&c, done("a"), T0).await.unwrap();
    let third = s
        .submit(job(ModelType::Vision, "a"), T0 + secs(2))
        .await
        .unwrap();
    assert_eq!(
        (third.id, third.created, third.status),
        (a.id, false, JobStatus::Done)
    );
    let all = s
        .list(&ListFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
}

/// A batch inserts each job once, also when it repeats itself.
pub async fn submit_batch_is_idempotent_line_by_line(f: &impl StoreFixture) {
    let s = f.handle().await;
    s.submit(job(ModelType::Think, "x"), T0).await.unwrap();
    let batch = vec![
        job(ModelType::Think, "x"),
        job(ModelType::Think, "y"),
        job(ModelType::Think, "y"),
        job(ModelType::Think, "z"),
    ];
    let out = s.submit_batch(batch, T0).await.unwrap();
    let created: Vec<bool> = out.iter().map(|o| o.created).collect();
    assert_eq!(created, vec![false, true, false, true]);
    assert_eq!(out[1].id, out[2].id);
    assert_eq!(
        s.stats(T0)
            .await
            .unwrap()
            .model(ModelType::Think)
            .counts
            .pending,
        3
    );
}

/// Claims go by priority (highest first), then age (oldest first).
pub async fn claim_order(f: &impl StoreFixture) {
    let s = f.handle().await;
    let old = s.submit(job(ModelType::Think, "old"), T0).await.unwrap().id;
    let newer = s
        .submit(job(ModelType::Think, "newer"), T0 + secs(10))
        .await
        .unwrap()
        .id;
    let mut urgent = job(ModelType::Think, "urgent");
    urgent.priority = 5;
    let urgent = s.submit(urgent, T0 + secs(20)).await.unwrap().id;
    let newest = s
        .submit(job(ModelType::Think, "newest"), T0 + secs(30))
        .await
        .unwrap()
        .id;
    let mut low = job(ModelType::Think, "low");
    low.priority = -1;
    let low = s.submit(low, T0).await.unwrap().id;

    let first = s
        .claim(ModelType::Think, 2, secs(60), "o", T0 + secs(40))
        .await
        .unwrap();
    let rest = s
        .claim(ModelType::Think, 10, secs(60), "o", T0 + secs(40))
        .await
        .unwrap();
    let order: Vec<JobId> = first.iter().chain(rest.iter()).map(|c| c.job.id).collect();
    assert_eq!(order, vec![urgent, old, newer, newest, low]);
    for c in first.iter().chain(rest.iter()) {
        assert_eq!(c.job.status, JobStatus::Processing);
        assert_eq!(c.job.claim_id.as_deref(), Some(c.claim.claim_id.as_str()));
        assert_eq!(c.job.lease_until, Some(T0 + secs(100)));
        assert_eq!(c.job.claimed_by.as_deref(), Some("o"));
    }
    assert!(s
        .claim(ModelType::Think, 10, secs(60), "o", T0 + secs(40))
        .await
        .unwrap()
        .is_empty());
}

/// A claim takes only its own model's jobs, and none before their `run_at`.
pub async fn claim_respects_run_at_and_model(f: &impl StoreFixture) {
    let s = f.handle().await;
    let v = s.submit(job(ModelType::Vision, "v"), T0).await.unwrap().id;
    s.submit(job(ModelType::Think, "t"), T0).await.unwrap();
    let got = s
        .claim(ModelType::Vision, 10, secs(60), "o", T0)
        .await
        .unwrap();
    assert_eq!(got.iter().map(|c| c.job.id).collect::<Vec<_>>(), vec![v]);
    assert!(s
        .claim(ModelType::Vision, 0, secs(60), "o", T0)
        .await
        .unwrap()
        .is_empty());
    // Back to pending with a run_at 30 s ahead: not claimed a moment
    // before it, claimed at it.
    s.fail(&got[0].claim, retryable("later", secs(30)), T0)
        .await
        .unwrap();
    assert_eq!(s.get(v).await.unwrap().unwrap().run_at, Some(T0 + secs(30)));
    for early in [T0, T0 + secs(29), T0 + Duration::from_millis(29_999)] {
        assert!(
            s.claim(ModelType::Vision, 10, secs(60), "o", early)
                .await
                .unwrap()
                .is_empty(),
            "claimed {:?} before its run_at",
            (T0 + secs(30)).since(early)
        );
    }
    let due = s
        .claim(ModelType::Vision, 10, secs(60), "o", T0 + secs(30))
        .await
        .unwrap();
    assert_eq!(due.iter().map(|c| c.job.id).collect::<Vec<_>>(), vec![v]);
}

/// Two claimers on separate handles never receive the same job and together take all.
pub async fn concurrent_claimers_never_share(f: &impl StoreFixture) {
    const JOBS: usize = 3000;
    let setup = f.handle().await;
    let batch = (0..JOBS)
        .map(|i| job(ModelType::Vision, &format!("c{i}")))
        .collect();
    setup.submit_batch(batch, T0).await.unwrap();

    // Two tasks on a multi-threaded runtime, released together.
    let barrier = Arc::new(Barrier::new(2));
    let mut workers = Vec::new();
    for w in 0..2 {
        let store = f.handle().await;
        let barrier = barrier.clone();
        workers.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut mine = Vec::new();
            let mut n = 1;
            loop {
                let got = store
                    .claim(ModelType::Vision, n, secs(60), &format!("w{w}"), T0)
                    .await
                    .unwrap();
                if got.is_empty() {
                    break;
                }
                for c in got {
                    store.complete(&c.claim, done("c"), T0).await.unwrap();
                    mine.push(c.job.id);
                }
                n = n % 16 + 1;
            }
            mine
        }));
    }
    let mut results: Vec<Vec<JobId>> = Vec::new();
    for w in workers {
        results.push(w.await.unwrap());
    }
    let a: HashSet<JobId> = results[0].iter().copied().collect();
    let b: HashSet<JobId> = results[1].iter().copied().collect();
    assert_eq!(
        a.len(),
        results[0].len(),
        "a claimer received one job twice"
    );
    assert_eq!(
        b.len(),
        results[1].len(),
        "a claimer received one job twice"
    );
    assert!(a.is_disjoint(&b), "two claimers received the same job");
    assert_eq!(a.len() + b.len(), JOBS, "some jobs were never claimed");
    let counts = setup
        .stats(T0)
        .await
        .unwrap()
        .model(ModelType::Vision)
        .counts;
    assert_eq!(counts.done, JOBS as u64);
}

/// An expired lease goes back to `pending`; an unexpired one stays.
pub async fn lease_expiry_reclaims(f: &impl StoreFixture) {
    let s = f.handle().await;
    let id = s.submit(job(ModelType::Vision, "l"), T0).await.unwrap().id;
    let got = s
        .claim(ModelType::Vision, 1, secs(10), "o", T0)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    // Before its reclaim, a job past its lease is listed as stuck.
    let stuck = |at| ListFilter {
        lease_ended_before: Some(at),
        limit: 10,
        ..Default::default()
    };
    assert!(s.list(&stuck(T0 + secs(9))).await.unwrap().is_empty());
    let listed = s.list(&stuck(T0 + secs(11))).await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(s.reclaim_expired(T0 + secs(9)).await.unwrap(), 0);
    assert_eq!(status_of(&s, id).await, JobStatus::Processing);
    assert_eq!(s.reclaim_expired(T0 + secs(11)).await.unwrap(), 1);
    let job = s.get(id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!(job.claim_id, None);
    assert_eq!(job.lease_until, None);
    assert_eq!(job.attempts, 0, "a reclaim is not an attempt");
    assert!(s.list(&stuck(T0 + secs(11))).await.unwrap().is_empty());
    let again = claim_one(&s, ModelType::Vision, T0 + secs(12))
        .await
        .unwrap();
    assert_eq!(again.job_id, id);
    assert_ne!(again.claim_id, got[0].claim.claim_id);
}

/// After a reclaim, the old claim can neither complete, fail nor release.
pub async fn stale_claim_cannot_complete(f: &impl StoreFixture) {
    let s = f.handle().await;
    s.submit(job(ModelType::Think, "s"), T0).await.unwrap();
    let old = claim_one(&s, ModelType::Think, T0).await.unwrap();
    s.reclaim_expired(T0 + secs(61)).await.unwrap();
    let new = claim_one(&s, ModelType::Think, T0 + secs(62))
        .await
        .unwrap();
    let stale = |r: Result<(), StoreError>| {
        assert!(
            matches!(r, Err(StoreError::StaleClaim { .. })),
            "expected StaleClaim, got {r:?}"
        )
    };
    stale(s.complete(&old, done("old"), T0 + secs(63)).await);
    stale(
        s.fail(&old, retryable("x", secs(1)), T0 + secs(63))
            .await
            .map(|_| ()),
    );
    stale(s.release(&old, T0 + secs(63)).await);
    let job = s.get(old.job_id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Processing);
    assert_eq!(job.claim_id.as_deref(), Some(new.claim_id.as_str()));
    s.complete(&new, done("new"), T0 + secs(64)).await.unwrap();
    let job = s.get(old.job_id).await.unwrap().unwrap();
    assert_eq!(
        job.result_path,
        Some(ResultRef::file(Path::new("/results/new.json")))
    );
    stale(s.complete(&new, done("twice"), T0 + secs(65)).await);
}

/// A retryable failure waits its delay; the job is not claimable before.
pub async fn backoff_schedule(f: &impl StoreFixture) {
    let s = f.handle().await;
    let id = s.submit(job(ModelType::Vision, "b"), T0).await.unwrap().id;
    let mut now = T0;
    for (attempt, delay) in [(1u32, 4u64), (2, 8)] {
        let c = claim_one(&s, ModelType::Vision, now).await.unwrap();
        let out = s
            .fail(&c, retryable(&format!("boom {attempt}"), secs(delay)), now)
            .await
            .unwrap();
        assert_eq!(
            out,
            FailOutcome::Retrying {
                run_at: now + secs(delay),
                attempts: attempt
            }
        );
        let job = s.get(id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!(job.attempts, attempt);
        assert_eq!(
            job.error.as_deref(),
            Some(format!("boom {attempt}").as_str())
        );
        assert_eq!(job.run_at, Some(now + secs(delay)));
        assert!(claim_one(
            &s,
            ModelType::Vision,
            now + secs(delay) - Duration::from_millis(1)
        )
        .await
        .is_none());
        now = now + secs(delay);
    }
    assert!(claim_one(&s, ModelType::Vision, now).await.is_some());
}

/// The last allowed attempt failing leaves the job `failed` with its error.
pub async fn max_attempts_leads_to_failed(f: &impl StoreFixture) {
    let s = f.handle().await;
    let mut j = job(ModelType::Think, "m");
    j.max_attempts = Some(2);
    let id = s.submit(j, T0).await.unwrap().id;
    let c = claim_one(&s, ModelType::Think, T0).await.unwrap();
    assert!(matches!(
        s.fail(&c, retryable("first", secs(0)), T0).await.unwrap(),
        FailOutcome::Retrying { attempts: 1, .. }
    ));
    let c = claim_one(&s, ModelType::Think, T0).await.unwrap();
    assert_eq!(
        s.fail(&c, retryable("second", secs(0)), T0).await.unwrap(),
        FailOutcome::Failed { attempts: 2 }
    );
    let job = s.get(id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.error.as_deref(), Some("second"));
    assert_eq!(job.finished_at, Some(T0));
    assert!(claim_one(&s, ModelType::Think, T0 + secs(1000))
        .await
        .is_none());
}

/// A permanent failure fails the job on its first attempt.
pub async fn permanent_failure_fails_at_once(f: &impl StoreFixture) {
    let s = f.handle().await;
    let id = s.submit(job(ModelType::Think, "p"), T0).await.unwrap().id;
    let c = claim_one(&s, ModelType::Think, T0).await.unwrap();
    let out = s
        .fail(
            &c,
            Failure {
                message: "HTTP 400: bad request".into(),
                retry_after: None,
            },
            T0,
        )
        .await
        .unwrap();
    assert_eq!(out, FailOutcome::Failed { attempts: 1 });
    assert_eq!(status_of(&s, id).await, JobStatus::Failed);
}

/// A release returns the job without counting an attempt.
pub async fn release_keeps_attempts(f: &impl StoreFixture) {
    let s = f.handle().await;
    let id = s.submit(job(ModelType::Vision, "r"), T0).await.unwrap().id;
    for _ in 0..5 {
        let c = claim_one(&s, ModelType::Vision, T0).await.unwrap();
        s.release(&c, T0).await.unwrap();
    }
    let job = s.get(id).await.unwrap().unwrap();
    assert_eq!((job.status, job.attempts), (JobStatus::Pending, 0));
    assert_eq!(job.claim_id, None);
}

/// A crash under a job counts `crashes`, not `attempts`; at the limit the
/// job fails as a poison job; a stale claim is refused; retry starts over.
pub async fn crashes_quarantine_a_poison_job(f: &impl StoreFixture) {
    let s = f.handle().await;
    let id = s
        .submit(job(ModelType::Vision, "poison"), T0)
        .await
        .unwrap()
        .id;
    for n in 1..=2 {
        let c = claim_one(&s, ModelType::Vision, T0).await.unwrap();
        let out = s.release_crashed(&c, "vision", 3, T0).await.unwrap();
        assert_eq!(out, crate::store::Settled::Released);
        let j = s.get(id).await.unwrap().unwrap();
        assert_eq!(
            (j.status, j.attempts, j.crashes),
            (JobStatus::Pending, 0, n)
        );
        assert!(
            s.release_crashed(&c, "vision", 3, T0).await.is_err(),
            "a stale claim"
        );
    }
    let c = claim_one(&s, ModelType::Vision, T0).await.unwrap();
    let out = s
        .release_crashed(&c, "vision", 3, T0 + secs(1))
        .await
        .unwrap();
    assert_eq!(
        out,
        crate::store::Settled::Failed(crate::job::FailOutcome::Failed { attempts: 0 })
    );
    let j = s.get(id).await.unwrap().unwrap();
    assert_eq!((j.status, j.crashes), (JobStatus::Failed, 3));
    let error = j.error.unwrap();
    assert!(
        error.starts_with("poison job") && error.contains("vision"),
        "{error}"
    );
    assert_eq!(j.finished_at, Some(T0 + secs(1)));
    let j = s.retry(id, T0 + secs(2)).await.unwrap();
    assert_eq!(
        (j.status, j.crashes, j.attempts),
        (JobStatus::Pending, 0, 0)
    );
}

/// `release_owner` returns exactly that owner's claims.
pub async fn release_owner_returns_its_claims(f: &impl StoreFixture) {
    let s = f.handle().await;
    for i in 0..4 {
        s.submit(job(ModelType::Vision, &format!("o{i}")), T0)
            .await
            .unwrap();
    }
    let dead = s
        .claim(ModelType::Vision, 3, secs(300), "dead-daemon", T0)
        .await
        .unwrap();
    let alive = s
        .claim(ModelType::Vision, 1, secs(300), "live-daemon", T0)
        .await
        .unwrap();
    assert_eq!((dead.len(), alive.len()), (3, 1));
    assert_eq!(
        s.release_owner("dead-daemon", T0 + secs(1)).await.unwrap(),
        3
    );
    for c in &dead {
        assert_eq!(status_of(&s, c.job.id).await, JobStatus::Pending);
    }
    assert_eq!(status_of(&s, alive[0].job.id).await, JobStatus::Processing);
}

/// A daemon silent past its heartbeat timeout has its claims (its own and
/// its dispatchers', `DAEMON/...`) taken back by `reclaim_expired` long
/// before their leases end; a live daemon's, an unregistered owner's and a
/// daemon's whose name merely starts alike are left alone.
pub async fn a_silent_daemons_claims_are_taken_back(f: &impl StoreFixture) {
    let s = f.handle().await;
    let other = f.handle().await;
    let about = serde_json::json!({"host": "h", "pid": 1});
    for i in 0..5 {
        s.submit(job(ModelType::Think, &format!("hb{i}")), T0)
            .await
            .unwrap();
    }
    let timeout = secs(10);
    s.heartbeat("host-a", &about, timeout, T0).await.unwrap();
    s.heartbeat("host-ab", &about, timeout, T0).await.unwrap();
    other
        .heartbeat("host-b", &about, timeout, T0)
        .await
        .unwrap();
    let lease = secs(300);
    let a = s
        .claim(ModelType::Think, 1, lease, "host-a", T0)
        .await
        .unwrap();
    let a_disp = s
        .claim(ModelType::Think, 1, lease, "host-a/think/0", T0)
        .await
        .unwrap();
    let ab = s
        .claim(ModelType::Think, 1, lease, "host-ab/think/0", T0)
        .await
        .unwrap();
    let b = other
        .claim(ModelType::Think, 1, lease, "host-b/think/0", T0)
        .await
        .unwrap();
    let stray = s
        .claim(ModelType::Think, 1, lease, "unregistered", T0)
        .await
        .unwrap();
    // Within the timeout nothing moves, even with host-a silent.
    other
        .heartbeat("host-b", &about, timeout, T0 + secs(8))
        .await
        .unwrap();
    s.heartbeat("host-ab", &about, timeout, T0 + secs(8))
        .await
        .unwrap();
    assert_eq!(other.reclaim_expired(T0 + secs(9)).await.unwrap(), 0);
    // Past it, host-a's two claims go back; nothing else does.
    assert_eq!(other.reclaim_expired(T0 + secs(12)).await.unwrap(), 2);
    for c in a.iter().chain(&a_disp) {
        let j = s.get(c.job.id).await.unwrap().unwrap();
        assert_eq!((j.status, j.attempts), (JobStatus::Pending, 0), "{j:?}");
        assert_eq!(j.claim_id, None);
    }
    for c in ab.iter().chain(&b).chain(&stray) {
        assert_eq!(status_of(&s, c.job.id).await, JobStatus::Processing);
    }
    // Its late results are stale.
    let late = s.complete(&a[0].claim, done("late"), T0 + secs(13)).await;
    assert!(
        matches!(late, Err(StoreError::StaleClaim { .. })),
        "{late:?}"
    );
    // And it is no longer registered.
    let ids: Vec<String> = other
        .daemons(T0 + secs(12))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.daemon_id)
        .collect();
    assert_eq!(ids, ["host-ab", "host-b"]);
}

/// The registry: a heartbeat registers or renews, `daemons` lists by id with
/// the age of the last heartbeat, `sign_off` removes.
pub async fn daemons_register_renew_and_sign_off(f: &impl StoreFixture) {
    let s = f.handle().await;
    assert!(s.daemons(T0).await.unwrap().is_empty());
    let about = serde_json::json!({"host": "h1", "pid": 42});
    s.heartbeat("d2", &about, secs(30), T0).await.unwrap();
    s.heartbeat("d1", &about, secs(30), T0).await.unwrap();
    s.heartbeat("d1", &about, secs(30), T0 + secs(5))
        .await
        .unwrap();
    let ds = s.daemons(T0 + secs(7)).await.unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds[0].daemon_id, "d1");
    assert_eq!(ds[0].about, about);
    assert_eq!(ds[0].heartbeat_age, secs(2));
    assert_eq!(ds[0].started_at, T0, "a renewal keeps the start");
    assert_eq!(ds[0].timeout, secs(30));
    assert!(ds[0].alive());
    assert_eq!(ds[1].heartbeat_age, secs(7));
    // A restarted daemon (another pid) starts anew.
    let again = serde_json::json!({"host": "h1", "pid": 43});
    s.heartbeat("d1", &again, secs(30), T0 + secs(8))
        .await
        .unwrap();
    let d1 = s.daemons(T0 + secs(8)).await.unwrap().remove(0);
    assert_eq!((d1.started_at, d1.about), (T0 + secs(8), again));
    s.sign_off("d1").await.unwrap();
    let ids: Vec<String> = s
        .daemons(T0 + secs(9))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.daemon_id)
        .collect();
    assert_eq!(ids, ["d2"]);
    assert!(!s.daemons(T0 + secs(40)).await.unwrap()[0].alive());
}

/// Cancel: pending and processing jobs end `cancelled`; finished ones are refused.
pub async fn cancel(f: &impl StoreFixture) {
    let s = f.handle().await;
    let pending = s.submit(job(ModelType::Think, "cp"), T0).await.unwrap().id;
    let job = s.cancel(pending, T0).await.unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.finished_at, Some(T0));
    assert!(claim_one(&s, ModelType::Think, T0).await.is_none());

    let running = s.submit(job_of("cr"), T0).await.unwrap().id;
    let c = claim_one(&s, ModelType::Think, T0).await.unwrap();
    assert_eq!(c.job_id, running);
    assert_eq!(
        s.cancel(running, T0).await.unwrap().status,
        JobStatus::Cancelled
    );
    assert!(matches!(
        s.complete(&c, done("late"), T0).await,
        Err(StoreError::StaleClaim { .. })
    ));
    assert_eq!(status_of(&s, running).await, JobStatus::Cancelled);

    let finished = s.submit(job_of("cd"), T0).await.unwrap().id;
    let c = claim_one(&s, ModelType::Think, T0).await.unwrap();
    s.complete(&c, done("cd"), T0).await.unwrap();
    assert!(matches!(
        s.cancel(finished, T0).await,
        Err(StoreError::InvalidState { .. })
    ));
    assert!(matches!(
        s.cancel(JobId([7; 16]), T0).await,
        Err(StoreError::NotFound(_))
    ));
}

fn job_of(tag: &str) -> NewJob {
    job(ModelType::Think, tag)
}

/// A manual retry gives a failed or cancelled job fresh attempts.
pub async fn manual_retry(f: &impl StoreFixture) {
    let s = f.handle().await;
    let id = s.submit(job_of("mr"), T0).await.unwrap().id;
    let c = claim_one(&s, ModelType::Think, T0).await.unwrap();
    s.fail(
        &c,
        Failure {
            message: "HTTP 400".into(),
            retry_after: None,
        },
        T0,
    )
    .await
    .unwrap();
    let job = s.retry(id, T0 + secs(5)).await.unwrap();
    assert_eq!((job.status, job.attempts), (JobStatus::Pending, 0));
    assert!(claim_one(&s, ModelType::Think, T0 + secs(5))
        .await
        .is_some());
    assert!(matches!(
        s.retry(id, T0).await,
        Err(StoreError::InvalidState { .. })
    ));
    let cancelled = s.submit(job_of("mr2"), T0).await.unwrap().id;
    s.cancel(cancelled, T0).await.unwrap();
    assert_eq!(
        s.retry(cancelled, T0).await.unwrap().status,
        JobStatus::Pending
    );
    assert!(matches!(
        s.retry(JobId([9; 16]), T0).await,
        Err(StoreError::NotFound(_))
    ));
}

/// A token window and an image tile: the places fragments are given in
/// tests.
pub fn sample_places() -> [Place; 2] {
    [
        Place::Tokens([392, 904]),
        Place::Tile(Tile {
            row: 1,
            col: 2,
            x: 784,
            y: 392,
            width: 512,
            height: 300,
        }),
    ]
}

/// A parent waits in `processing`; its fragments are claimable and listed
/// in order, each with the place it was given.
pub async fn fragments_of_parent(f: &impl StoreFixture) {
    let s = f.handle().await;
    // The first fragment has no place, the others one each.
    let places = sample_places();
    let place = |i: usize| i.checked_sub(1).map(|k| places[k]);
    let frags: Vec<NewJob> = (0..3)
        .map(|i| {
            let mut j = job(ModelType::Think, &format!("frag{i}"));
            j.place = place(i);
            j
        })
        .collect();
    let parent = s
        .submit_parent(job(ModelType::Think, "parent"), frags.clone(), T0)
        .await
        .unwrap();
    assert!(parent.created);
    assert_eq!(parent.status, JobStatus::Processing);
    let p = s.get(parent.id).await.unwrap().unwrap();
    assert!(p.is_parent());
    assert_eq!(p.total_fragments, Some(3));

    let listed = s.fragments(parent.id).await.unwrap();
    assert_eq!(listed.len(), 3);
    for (i, fr) in listed.iter().enumerate() {
        assert_eq!(fr.parent_id, Some(parent.id));
        assert_eq!(fr.fragment_index, Some(i as u32));
        assert_eq!(fr.total_fragments, Some(3));
        assert_eq!(fr.status, JobStatus::Pending);
        assert_eq!(fr.place, place(i), "fragment {i} keeps its place");
    }
    // The parent itself is never claimed; its fragments are, in order.
    let claimed = s
        .claim(ModelType::Think, 10, secs(60), "o", T0)
        .await
        .unwrap();
    let ids: Vec<JobId> = claimed.iter().map(|c| c.job.id).collect();
    assert_eq!(ids, listed.iter().map(|j| j.id).collect::<Vec<_>>());

    // Resubmitting the parent returns it and adds nothing.
    let again = s
        .submit_parent(job(ModelType::Think, "parent"), frags, T0)
        .await
        .unwrap();
    assert_eq!((again.id, again.created), (parent.id, false));
    assert_eq!(s.fragments(parent.id).await.unwrap().len(), 3);
    // A fragment whose payload equals a standalone job's is still its own job.
    let standalone = s.submit(job(ModelType::Think, "frag0"), T0).await.unwrap();
    assert!(standalone.created);

    assert!(matches!(
        s.submit_parent(job(ModelType::Think, "empty"), vec![], T0)
            .await,
        Err(StoreError::Invalid(_))
    ));
    // Cancelling the parent cancels its unfinished fragments.
    s.cancel(parent.id, T0).await.unwrap();
    assert!(s
        .fragments(parent.id)
        .await
        .unwrap()
        .iter()
        .all(|j| j.status == JobStatus::Cancelled));
}

/// `complete` records the result, usage and latency.
pub async fn complete_records_result(f: &impl StoreFixture) {
    let s = f.handle().await;
    let id = s.submit(job(ModelType::Vision, "cr"), T0).await.unwrap().id;
    let c = claim_one(&s, ModelType::Vision, T0).await.unwrap();
    s.complete(&c, done("cr"), T0 + secs(2)).await.unwrap();
    let j = s.get(id).await.unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Done);
    assert_eq!(
        j.result_path,
        Some(ResultRef::file(Path::new("/results/cr.json")))
    );
    assert_eq!((j.prompt_tokens, j.completion_tokens), (Some(11), Some(22)));
    assert_eq!(j.latency_ms, Some(345));
    assert_eq!(j.attempts, 1);
    assert_eq!(j.started_at, Some(T0));
    assert_eq!(j.finished_at, Some(T0 + secs(2)));
    assert_eq!((j.claim_id, j.lease_until), (None, None));
}

/// A settle batch applies completes, failures and releases, and refuses a stale claim
/// without aborting the others.
pub async fn settle_batch_mixes_outcomes(f: &impl StoreFixture) {
    let s = f.handle().await;
    for i in 0..4 {
        s.submit(job(ModelType::Vision, &format!("cb{i}")), T0)
            .await
            .unwrap();
    }
    let claimed = s
        .claim(ModelType::Vision, 4, secs(60), "o", T0)
        .await
        .unwrap();
    let mut stale = claimed[1].claim.clone();
    stale.claim_id = "not-the-claim".into();
    let items = vec![
        (claimed[0].claim.clone(), Settle::Complete(done("cb0"))),
        (stale, Settle::Complete(done("cb1"))),
        (
            claimed[2].claim.clone(),
            Settle::Fail(retryable("flaky", secs(5))),
        ),
        (claimed[3].claim.clone(), Settle::Release),
    ];
    let out = s.settle_batch(items, T0).await.unwrap();
    assert_eq!(out[0].as_ref().unwrap(), &Settled::Done);
    assert!(matches!(out[1], Err(StoreError::StaleClaim { .. })));
    assert_eq!(
        out[2].as_ref().unwrap(),
        &Settled::Failed(FailOutcome::Retrying {
            run_at: T0 + secs(5),
            attempts: 1
        })
    );
    assert_eq!(out[3].as_ref().unwrap(), &Settled::Released);
    assert_eq!(status_of(&s, claimed[0].job.id).await, JobStatus::Done);
    assert_eq!(
        status_of(&s, claimed[1].job.id).await,
        JobStatus::Processing
    );
    assert_eq!(status_of(&s, claimed[2].job.id).await, JobStatus::Pending);
    assert_eq!(s.get(claimed[3].job.id).await.unwrap().unwrap().attempts, 0);
}

/// A parent is ready for fan-in once every fragment has finished, and is
/// finished exactly once.
pub async fn parents_finish_exactly_once(f: &impl StoreFixture) {
    let s = f.handle().await;
    let frags: Vec<NewJob> = (0..2)
        .map(|i| job(ModelType::Think, &format!("pf{i}")))
        .collect();
    let parent = s
        .submit_parent(job(ModelType::Think, "pp"), frags, T0)
        .await
        .unwrap()
        .id;
    assert!(s.ready_parents(10).await.unwrap().is_empty());
    let claimed = s
        .claim(ModelType::Think, 2, secs(60), "o", T0)
        .await
        .unwrap();
    s.complete(&claimed[0].claim, done("pf0"), T0)
        .await
        .unwrap();
    assert!(
        s.ready_parents(10).await.unwrap().is_empty(),
        "one fragment is still running"
    );
    s.fail(
        &claimed[1].claim,
        Failure {
            message: "bad".into(),
            retry_after: None,
        },
        T0,
    )
    .await
    .unwrap();
    assert_eq!(s.ready_parents(10).await.unwrap(), vec![parent]);
    let outcome = ParentOutcome::Done {
        result_path: ResultRef::file(Path::new("/results/pp.json")),
    };
    assert!(s
        .finish_parent(parent, outcome.clone(), T0 + secs(1))
        .await
        .unwrap());
    assert!(
        !s.finish_parent(parent, outcome, T0 + secs(2))
            .await
            .unwrap(),
        "finished twice"
    );
    let p = s.get(parent).await.unwrap().unwrap();
    assert_eq!(p.status, JobStatus::Done);
    assert_eq!(
        p.result_path,
        Some(ResultRef::file(Path::new("/results/pp.json")))
    );
    assert_eq!(p.finished_at, Some(T0 + secs(1)));
    assert!(s.ready_parents(10).await.unwrap().is_empty());

    let frags = vec![job(ModelType::Think, "qf0")];
    let failing = s
        .submit_parent(job(ModelType::Think, "qp"), frags, T0)
        .await
        .unwrap()
        .id;
    let c = claim_one(&s, ModelType::Think, T0).await.unwrap();
    s.fail(
        &c,
        Failure {
            message: "x".into(),
            retry_after: None,
        },
        T0,
    )
    .await
    .unwrap();
    let outcome = ParentOutcome::Failed {
        error: "fragment 0 failed: x".into(),
    };
    assert!(s.finish_parent(failing, outcome, T0).await.unwrap());
    let p = s.get(failing).await.unwrap().unwrap();
    assert_eq!(
        (p.status, p.error.as_deref()),
        (JobStatus::Failed, Some("fragment 0 failed: x"))
    );
}

/// A done job naming a next model waits for its follow-up until one exists.
pub async fn follow_ups_are_pending_until_created(f: &impl StoreFixture) {
    let s = f.handle().await;
    let mut first = job(ModelType::Vision, "stage1");
    first.then_model = Some(ModelType::Think);
    let id = s.submit(first, T0).await.unwrap().id;
    s.submit(job(ModelType::Vision, "plain"), T0).await.unwrap();
    let claimed = s
        .claim(ModelType::Vision, 2, secs(60), "o", T0)
        .await
        .unwrap();
    assert!(
        s.pending_follow_ups(10).await.unwrap().is_empty(),
        "not done yet"
    );
    for c in &claimed {
        s.complete(&c.claim, done("x"), T0).await.unwrap();
    }
    assert_eq!(s.pending_follow_ups(10).await.unwrap(), vec![id]);
    let mut next = job(ModelType::Think, "stage2");
    next.follows = Some(id);
    s.submit(next, T0).await.unwrap();
    assert!(s.pending_follow_ups(10).await.unwrap().is_empty());
}

/// Follow-ups are unique per job they follow, whatever their payload.
pub async fn a_follow_up_is_created_once(f: &impl StoreFixture) {
    let s = f.handle().await;
    let first = s
        .submit(job(ModelType::Vision, "origin"), T0)
        .await
        .unwrap()
        .id;
    let mut a = job(ModelType::Think, "one payload");
    a.follows = Some(first);
    let mut b = job(ModelType::Think, "another payload");
    b.follows = Some(first);
    let x = s.submit(a, T0).await.unwrap();
    let y = s.submit(b, T0).await.unwrap();
    assert!(x.created && !y.created);
    assert_eq!(x.id, y.id);
    let j = s.get(x.id).await.unwrap().unwrap();
    assert_eq!(j.follows, Some(first));
    // A follow-up with a payload equal to a standalone job's is still its own job.
    let standalone = s
        .submit(job(ModelType::Think, "one payload"), T0)
        .await
        .unwrap();
    assert!(standalone.created);
}

/// The change token moves when another handle commits, and only then: a
/// handle's own writes leave its token as it was (SQLite's `data_version`
/// rule), so a daemon learns of its own work from itself, never from a poll.
pub async fn change_token_moves_on_foreign_commits(f: &impl StoreFixture) {
    let watcher = f.handle().await;
    let writer = f.handle().await;
    let Some(before) = watcher.change_token().await.unwrap() else {
        return; // This store cannot tell; callers poll by claiming.
    };
    writer
        .submit(job(ModelType::Think, "ct"), T0)
        .await
        .unwrap();
    let after = watcher.change_token().await.unwrap().unwrap();
    assert_ne!(before, after, "another handle's commit moves the token");
    // The watcher's own writes of every kind do not.
    let own = watcher
        .submit(job(ModelType::Think, "own"), T0)
        .await
        .unwrap();
    let c = claim_one(&watcher, ModelType::Think, T0).await.unwrap();
    watcher.complete(&c, done("own"), T0).await.unwrap();
    watcher.cancel(own.id, T0).await.ok();
    watcher.reclaim_expired(T0).await.unwrap();
    assert_eq!(
        watcher.change_token().await.unwrap().unwrap(),
        after,
        "a handle's own commits must not move its token"
    );
    writer
        .submit(job(ModelType::Vision, "ct2"), T0)
        .await
        .unwrap();
    assert_ne!(watcher.change_token().await.unwrap().unwrap(), after);
}

/// `next_due` finds the earliest future `run_at` of one model's pending
/// jobs: retry backoffs, and rows scheduled ahead; not jobs due already,
/// jobs of the other model, or jobs no longer pending.
pub async fn next_due_is_the_earliest_future_run_at(f: &impl StoreFixture) {
    let s = f.handle().await;
    assert_eq!(s.next_due(ModelType::Think, T0).await.unwrap(), None);
    for (tag, delay) in [("a", 30u64), ("b", 10), ("c", 20)] {
        s.submit(job(ModelType::Think, tag), T0).await.unwrap();
        let c = claim_one(&s, ModelType::Think, T0).await.unwrap();
        s.fail(&c, retryable(tag, secs(delay)), T0).await.unwrap();
    }
    let v = s.submit(job(ModelType::Vision, "v"), T0).await.unwrap().id;
    let c = claim_one(&s, ModelType::Vision, T0).await.unwrap();
    s.fail(&c, retryable("v", secs(5)), T0).await.unwrap();
    assert_eq!(
        s.next_due(ModelType::Think, T0).await.unwrap(),
        Some(T0 + secs(10))
    );
    assert_eq!(
        s.next_due(ModelType::Vision, T0).await.unwrap(),
        Some(T0 + secs(5))
    );
    // Past its run_at a job is due, no longer "next".
    assert_eq!(
        s.next_due(ModelType::Think, T0 + secs(10)).await.unwrap(),
        Some(T0 + secs(20))
    );
    // Claimed or cancelled jobs do not count.
    let c = claim_one(&s, ModelType::Think, T0 + secs(15))
        .await
        .unwrap();
    assert_eq!(
        s.next_due(ModelType::Think, T0 + secs(15)).await.unwrap(),
        Some(T0 + secs(20))
    );
    s.release(&c, T0 + secs(15)).await.unwrap();
    s.cancel(v, T0).await.unwrap();
    assert_eq!(s.next_due(ModelType::Vision, T0).await.unwrap(), None);
    // Another handle sees the same.
    assert_eq!(
        f.handle()
            .await
            .next_due(ModelType::Think, T0)
            .await
            .unwrap(),
        Some(T0 + secs(10))
    );
}

/// Stats count per model and status and age the oldest pending job.
pub async fn stats_per_model_and_status(f: &impl StoreFixture) {
    let s = f.handle().await;
    s.submit(job(ModelType::Vision, "s1"), T0).await.unwrap();
    s.submit(job(ModelType::Vision, "s2"), T0 + secs(30))
        .await
        .unwrap();
    s.submit(job(ModelType::Vision, "s3"), T0 + secs(40))
        .await
        .unwrap();
    s.submit(job(ModelType::Think, "s4"), T0).await.unwrap();
    let c = claim_one(&s, ModelType::Vision, T0 + secs(50))
        .await
        .unwrap();
    s.complete(&c, done("s1"), T0 + secs(50)).await.unwrap();
    claim_one(&s, ModelType::Think, T0 + secs(50))
        .await
        .unwrap();

    let st = s.stats(T0 + secs(100)).await.unwrap();
    let v = st.model(ModelType::Vision);
    assert_eq!(
        (v.counts.pending, v.counts.done, v.counts.processing),
        (2, 1, 0)
    );
    assert_eq!(v.oldest_pending_age, Some(secs(70)));
    let t = st.model(ModelType::Think);
    assert_eq!((t.counts.pending, t.counts.processing), (0, 1));
    assert_eq!(t.oldest_pending_age, None);
    assert_eq!(st.models.len(), ModelType::ALL.len());
}

/// `list` filters by status and model, returns newest first, and honours the limit.
pub async fn list_filters_and_limit(f: &impl StoreFixture) {
    let s = f.handle().await;
    let mut ids = Vec::new();
    for i in 0..5u64 {
        ids.push(
            s.submit(job(ModelType::Vision, &format!("l{i}")), T0 + secs(i))
                .await
                .unwrap()
                .id,
        );
    }
    s.submit(job(ModelType::Think, "lt"), T0).await.unwrap();
    s.cancel(ids[1], T0).await.unwrap();
    let all_vision = s
        .list(&ListFilter {
            model_type: Some(ModelType::Vision),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let order: Vec<JobId> = all_vision.iter().map(|j| j.id).collect();
    assert_eq!(order, ids.iter().rev().copied().collect::<Vec<_>>());
    let limited = s
        .list(&ListFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(limited.len(), 2);
    let cancelled = s
        .list(&ListFilter {
            status: Some(JobStatus::Cancelled),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        cancelled.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[1]]
    );
}

/// An unknown id is `None`, not an error.
pub async fn get_unknown_is_none(f: &impl StoreFixture) {
    let s = f.handle().await;
    assert!(s.get(JobId([1; 16])).await.unwrap().is_none());
}

/// `resolve` takes a whole id, or a unique prefix of at least 4 hex digits
/// in either case; anything else is refused saying what to give.
pub async fn resolve_takes_ids_and_unique_prefixes(f: &impl StoreFixture) {
    let s = f.handle().await;
    let mut ids: Vec<JobId> = Vec::new();
    for i in 0..40 {
        let job = job(ModelType::Think, &format!("r{i}"));
        ids.push(s.submit(job, T0).await.unwrap().id);
    }
    let first = ids[0];
    assert_eq!(s.resolve(&first.to_hex()).await.unwrap(), first);
    assert_eq!(
        s.resolve(&format!(" {} ", first.to_hex().to_uppercase()))
            .await
            .unwrap(),
        first
    );
    // The shortest prefix of each id that no other id shares resolves to it.
    for id in &ids {
        let hex = id.to_hex();
        let n = (4..=32)
            .find(|n| {
                ids.iter()
                    .filter(|o| o.to_hex().starts_with(&hex[..*n]))
                    .count()
                    == 1
            })
            .unwrap();
        assert_eq!(
            s.resolve(&hex[..n]).await.unwrap(),
            *id,
            "prefix {}",
            &hex[..n]
        );
    }
    let err = async |text: &str| s.resolve(text).await.unwrap_err().to_string();
    let short = err("abc").await;
    assert!(short.contains("at least 4"), "{short}");
    let not_hex = err("zzzz").await;
    assert!(not_hex.contains("is not a job id"), "{not_hex}");
    let unknown = (0..u16::MAX)
        .map(|n| format!("{n:04x}"))
        .find(|p| !ids.iter().any(|i| i.to_hex().starts_with(p.as_str())))
        .unwrap();
    let none = err(&unknown).await;
    assert!(none.contains("no job id starts with"), "{none}");
}

/// Submits `jobs`, one second apart from `start`; their ids.
async fn submit_spaced(s: &Arc<dyn JobStore>, jobs: Vec<NewJob>, start: Timestamp) -> Vec<JobId> {
    let mut ids = Vec::new();
    for (i, j) in jobs.into_iter().enumerate() {
        ids.push(s.submit(j, start + secs(i as u64)).await.unwrap().id);
    }
    ids
}

/// A grouped claim takes the questions about one document together, in
/// order of the oldest; a plain claim keeps arrival order. The key is
/// stored with the job.
pub async fn grouped_claims_take_a_prefix_together(f: &impl StoreFixture) {
    let s = f.handle().await;
    // a1 b1 c1 a2 b2 c2 a3 b3 c3, interleaved as they arrived.
    let jobs: Vec<NewJob> = (1..=3)
        .flat_map(|q| ["a", "b", "c"].map(|d| question(d, q)))
        .collect();
    let key_a = jobs[0]
        .prefix_key
        .clone()
        .expect("a prompt has a prefix key");
    assert_eq!(
        jobs[3].prefix_key.as_ref(),
        Some(&key_a),
        "a1 and a2 share a prefix"
    );
    assert_ne!(jobs[1].prefix_key.as_ref(), Some(&key_a));
    let ids = submit_spaced(&s, jobs, T0).await;
    let stored = s.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(
        stored.prefix_key.as_ref(),
        Some(&key_a),
        "the key is stored"
    );

    let now = T0 + secs(20);
    let order = grouped(&[], secs(600));
    let first = s.claim_with(&think_claim(4, order), now).await.unwrap();
    let got: Vec<JobId> = first.iter().map(|c| c.job.id).collect();
    assert_eq!(
        got,
        vec![ids[0], ids[3], ids[6], ids[1]],
        "all of a, then b's oldest"
    );
    // The instance was just sent b: the rest of b comes before c.
    let b = first[3].job.prefix_key.clone().unwrap();
    let next = s
        .claim_with(&think_claim(3, grouped(&[&b], secs(600))), now)
        .await
        .unwrap();
    let got: Vec<JobId> = next.iter().map(|c| c.job.id).collect();
    assert_eq!(got, vec![ids[4], ids[7], ids[2]]);
    // Plain order is arrival order.
    let plain = s
        .claim_with(&think_claim(1, ClaimOrder::Plain), now)
        .await
        .unwrap();
    assert_eq!(plain[0].job.id, ids[5], "the oldest left (c2)");
    for c in first.iter().chain(&next) {
        assert_eq!(c.job.status, JobStatus::Processing);
        assert_eq!(c.job.claim_id.as_deref(), Some(c.claim.claim_id.as_str()));
    }
}

/// A job that has waited longer than `max_wait` goes before the warm
/// group, however many jobs of it there are; before that, the warm group
/// goes first.
pub async fn grouping_never_starves_an_old_job(f: &impl StoreFixture) {
    let s = f.handle().await;
    let old = s.submit(question("lonely", 1), T0).await.unwrap().id;
    let hot: Vec<NewJob> = (1..=5).map(|q| question("hot", q)).collect();
    let key = hot[0].prefix_key.clone().unwrap();
    let hot = submit_spaced(&s, hot, T0 + secs(100)).await;
    let now = T0 + secs(110);
    let patient = s
        .claim_with(&think_claim(2, grouped(&[&key], secs(600))), now)
        .await
        .unwrap();
    assert_eq!(
        patient.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        vec![hot[0], hot[1]],
        "within max_wait, the warm key first"
    );
    let impatient = s
        .claim_with(&think_claim(2, grouped(&[&key], secs(60))), now)
        .await
        .unwrap();
    assert_eq!(
        impatient.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        vec![old, hot[2]],
        "a job older than max_wait goes first"
    );
}

/// Priority comes before any grouping: an urgent job of a cold key goes
/// before the warm group.
pub async fn priority_wins_over_grouping(f: &impl StoreFixture) {
    let s = f.handle().await;
    let warm: Vec<NewJob> = (1..=3).map(|q| question("warm", q)).collect();
    let key = warm[0].prefix_key.clone().unwrap();
    let warm = submit_spaced(&s, warm, T0).await;
    let mut urgent = question("cold", 1);
    urgent.priority = 9;
    let urgent = s.submit(urgent, T0 + secs(50)).await.unwrap().id;
    let got = s
        .claim_with(&think_claim(2, grouped(&[&key], secs(600))), T0 + secs(51))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        vec![urgent, warm[0]]
    );
}

/// Jobs of a warm key are found however deep in the backlog they lie:
/// beyond the oldest jobs a grouped claim reads.
pub async fn a_warm_key_is_found_beyond_the_lookahead(f: &impl StoreFixture) {
    let s = f.handle().await;
    let depth = crate::prefix::lookahead(2) + 10;
    let backlog: Vec<NewJob> = (0..depth).map(|i| question(&format!("d{i}"), 1)).collect();
    s.submit_batch(backlog, T0).await.unwrap();
    let late: Vec<NewJob> = (1..=2).map(|q| question("late", q)).collect();
    let key = late[0].prefix_key.clone().unwrap();
    let late = submit_spaced(&s, late, T0 + secs(10)).await;
    let got = s
        .claim_with(&think_claim(2, grouped(&[&key], secs(600))), T0 + secs(20))
        .await
        .unwrap();
    assert_eq!(got.iter().map(|c| c.job.id).collect::<Vec<_>>(), late);
}

/// A fragment's prefix key is its parent's id, so that a parent's
/// fragments are claimed together.
pub async fn fragments_share_their_parents_key(f: &impl StoreFixture) {
    let s = f.handle().await;
    let other = s
        .submit(job(ModelType::Think, "before"), T0)
        .await
        .unwrap()
        .id;
    let frags: Vec<NewJob> = (0..3)
        .map(|i| job(ModelType::Think, &format!("w{i}")))
        .collect();
    let parent = s
        .submit_parent(job(ModelType::Think, "doc"), frags, T0 + secs(1))
        .await
        .unwrap()
        .id;
    let later = s
        .submit(job(ModelType::Think, "after"), T0 + secs(1))
        .await
        .unwrap()
        .id;
    let fragments = s.fragments(parent).await.unwrap();
    assert!(fragments
        .iter()
        .all(|f| f.prefix_key.as_deref() == Some(parent.to_string().as_str())));
    let got = s
        .claim_with(&think_claim(5, grouped(&[], secs(600))), T0 + secs(2))
        .await
        .unwrap();
    let ids: Vec<JobId> = got.iter().map(|c| c.job.id).collect();
    let frag_ids: Vec<JobId> = fragments.iter().map(|f| f.id).collect();
    assert_eq!(ids[0], other);
    assert_eq!(ids[1..4], frag_ids[..], "the fragments together, in order");
    assert_eq!(ids[4], later);
}
