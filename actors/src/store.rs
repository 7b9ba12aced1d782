//! The `JobStore` port: the durable job queue as the actors see it.
//!
//! Nothing here names SQLite. The SQLite adapter lives in the `gpu-feeder`
//! crate; a PostgreSQL adapter (`FOR UPDATE SKIP LOCKED`) can implement the
//! same contract so that several GPU hosts share one queue. The contract is
//! pinned down by `testkit::store_contract`, which every adapter runs.
//!
//! [`JobStore`] is asynchronous, so that an adapter over an asynchronous
//! database client needs no thread of its own per call. An adapter over a
//! synchronous library (SQLite, the in-memory fake) implements
//! [`BlockingJobStore`] instead, and [`Blocking`] makes it a `JobStore`
//! that runs each call on a blocking thread, never on a runtime worker.
//! Everything above the adapters (the actors, the CLI, the MCP server, the
//! admin endpoint, the demo) holds an `Arc<dyn JobStore>`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::job::{
    Claim, ClaimedJob, Completion, FailOutcome, Failure, Job, JobId, JobStatus, ListFilter,
    ModelType, NewJob, QueueStats, Submitted,
};
use crate::prefix::ClaimOrder;
use crate::time::Timestamp;

/// Errors of a job store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No job has this id.
    #[error("no job {0}: check the id with `gpu-feeder list`")]
    NotFound(JobId),
    /// The claim was reclaimed, cancelled or completed already; the caller no
    /// longer owns the job and must drop its result.
    #[error("claim {claim_id} on job {job_id} is no longer current (the lease expired, or the job was cancelled or reclaimed); the result was not recorded")]
    StaleClaim {
        /// The job.
        job_id: JobId,
        /// The stale token.
        claim_id: String,
    },
    /// The operation does not apply to the job's current status.
    #[error("job {id} is {status}: {hint}")]
    InvalidState {
        /// The job.
        id: JobId,
        /// Its status now.
        status: JobStatus,
        /// What the caller can do instead.
        hint: &'static str,
    },
    /// The request itself is malformed (a parent without fragments, a bad limit, …).
    #[error("{0}")]
    Invalid(String),
    /// The database was written by a newer version of gpu-feeder.
    #[error("the database {path} has schema version {found}, newer than this build of gpu-feeder knows ({known}): upgrade gpu-feeder, or point queue.db_path at another file")]
    TooNew {
        /// The database file.
        path: String,
        /// The schema version found.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// A row that breaks the schema contract (written by another program).
    #[error("job row {id} is malformed: {reason}")]
    Corrupt {
        /// The row's id as hex, or its rowid when the id itself is bad.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database holds tables that are not a schema this build knows
    /// (the message names what differs and what to do); nothing was changed.
    #[error("{0}")]
    Schema(String),
    /// The backend failed (I/O, locking, SQL).
    #[error("job store error: {0}")]
    Backend(String),
    /// The store cannot be reached now (its server is down, or the database
    /// stayed locked past the busy timeout): the same call may succeed later.
    #[error("the job store is unavailable: {0}")]
    Unavailable(String),
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// Default number of attempts for a job that does not say.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Declares the port once: each method written here becomes an `async fn`
/// of [`JobStore`], a plain `fn` of [`BlockingJobStore`], and a forwarder
/// in [`Blocking`]'s `JobStore` that runs the blocking one on a blocking
/// thread. A new method is written here and in its adapters, nowhere else.
/// A shortcut (`fn a(..) -> T = b(..);`) is a provided method of both traits
/// that calls another; `async extra` holds what only [`JobStore`] has.
macro_rules! job_store_port {
    (
        shortcuts {
            $(
                $(#[$short_meta:meta])*
                fn $short:ident(&self $(, $short_arg:ident: $short_ty:ty)* $(,)?) -> $short_out:ty
                    = $target:ident($($call:expr),* $(,)?);
            )*
        }
        async extra { $($async_extra:tt)* }
        $(
            $(#[$meta:meta])*
            fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $out:ty;
        )*
    ) => {
        /// The durable job queue.
        ///
        /// Guarantees every adapter keeps (and the contract suite checks):
        /// - `submit` is idempotent on `(model_type, payload_sha256)` for jobs that
        ///   are neither fragments nor follow-ups; fragments are unique per
        ///   `(parent, index)` and follow-ups per `follows`.
        /// - `claim` is atomic: concurrent claimers, in this process or others,
        ///   never receive the same job.
        /// - `complete`, `fail` and `release` take effect only with the current claim.
        #[async_trait]
        pub trait JobStore: Send + Sync + 'static {
            $(
                $(#[$meta])*
                async fn $name(&self $(, $arg: $ty)*) -> StoreResult<$out>;
            )*
            $(
                $(#[$short_meta])*
                async fn $short(&self $(, $short_arg: $short_ty)*) -> StoreResult<$short_out> {
                    self.$target($($call),*).await
                }
            )*
            $($async_extra)*
        }

        /// The durable job queue as an adapter over a synchronous client writes it
        /// (SQLite, the in-memory fake). [`Blocking`] makes it a [`JobStore`]; each
        /// method is the one of the same name there, with the same guarantees.
        /// Calls may block on I/O or locks: never make them on a runtime worker.
        pub trait BlockingJobStore: Send + Sync + 'static {
            $(
                #[doc = concat!("See [`JobStore::", stringify!($name), "`].")]
                fn $name(&self $(, $arg: $ty)*) -> StoreResult<$out>;
            )*
            $(
                #[doc = concat!("See [`JobStore::", stringify!($short), "`].")]
                fn $short(&self $(, $short_arg: $short_ty)*) -> StoreResult<$short_out> {
                    self.$target($($call),*)
                }
            )*
        }

        #[async_trait]
        impl<S: BlockingJobStore> JobStore for Blocking<S> {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> StoreResult<$out> {
                    $( let $arg = <$ty as Carry>::carry($arg); )*
                    self.run(move |s| {
                        $( let mut $arg = $arg; )*
                        s.$name($( <$ty as Carry>::lend(&mut $arg) ),*)
                    })
                    .await
                }
            )*
        }
    };
}

/// What a claimer asks the store for: up to `n` due jobs of `model`, leased
/// for `lease` to `owner`, in `order`.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The kind of jobs.
    pub model: ModelType,
    /// How many at most.
    pub n: usize,
    /// How long the lease lasts before another claimer may take them back.
    pub lease: Duration,
    /// Who holds the lease (a dispatcher's name).
    pub owner: String,
    /// Plain (priority, then age) or grouped by prompt prefix.
    pub order: ClaimOrder,
}

job_store_port! {
    shortcuts {
        /// Claims up to `n` pending jobs of `model` whose `run_at` has come, in
        /// order of priority (highest first) then age (oldest first), setting
        /// them `processing` under a lease of `lease` held by `owner`.
        fn claim(
            &self,
            model: ModelType,
            n: usize,
            lease: Duration,
            owner: &str,
            now: Timestamp,
        ) -> Vec<ClaimedJob> = claim_with(
            &ClaimRequest {
                model,
                n,
                lease,
                owner: owner.to_string(),
                order: ClaimOrder::Plain,
            },
            now,
        );
    }
    async extra {
        /// Why the store cannot be reached right now (its connection is lost
        /// and being re-made), or `None` when it can. Cheap: no I/O.
        fn connection_problem(&self) -> Option<String> {
            None
        }

        /// A job id, or a unique prefix of at least 4 hex digits, as a user
        /// types it; the error says what to give instead.
        async fn resolve(&self, text: &str) -> StoreResult<JobId> {
            let text = text.trim().to_ascii_lowercase();
            if let Ok(id) = text.parse::<JobId>() {
                return Ok(id);
            }
            if text.len() < 4 || text.len() > 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(StoreError::Invalid(format!(
                    "`{text}` is not a job id: give the 32 hex digits printed by `gpu-feeder submit` or `list`, or a unique prefix of at least 4"
                )));
            }
            match self.ids_with_prefix(&text, 2).await?.as_slice() {
                [one] => Ok(*one),
                [] => Err(StoreError::Invalid(format!(
                    "no job id starts with `{text}`: check it with `gpu-feeder list`"
                ))),
                _ => Err(StoreError::Invalid(format!(
                    "more than one job id starts with `{text}`: give more digits"
                ))),
            }
        }
    }
    /// Adds a job, or returns the identical one already there.
    fn submit(&self, job: NewJob, now: Timestamp) -> Submitted;

    /// Adds many jobs in one transaction, each idempotent on its own.
    fn submit_batch(&self, jobs: Vec<NewJob>, now: Timestamp) -> Vec<Submitted>;

    /// Adds a parent and its fragments in one transaction. The parent is
    /// never dispatched itself: it waits in `processing` until fan-in.
    /// Idempotent on the parent: an identical parent returns the existing one
    /// and adds no fragments.
    fn submit_parent(&self, parent: NewJob, fragments: Vec<NewJob>, now: Timestamp) -> Submitted;

    /// Like `claim`, in `order`: with [`ClaimOrder::Grouped`], jobs sharing
    /// a prefix key come together, in the order [`crate::prefix::pick`]
    /// gives over the oldest [`crate::prefix::lookahead`] due jobs and
    /// those of the warm keys. The jobs come back in that order.
    fn claim_with(&self, want: &ClaimRequest, now: Timestamp) -> Vec<ClaimedJob>;

    /// Marks a claimed job `done` with its result.
    fn complete(&self, claim: &Claim, done: Completion, now: Timestamp) -> ();

    /// Settles many claims in one transaction (group commit): each element's
    /// result is that of `complete`, `fail` or `release` for it, and a stale
    /// claim does not abort the others. ([`settle_one`] settles one claim
    /// through the single-claim methods, for an adapter without transactions.)
    fn settle_batch(&self, items: Vec<(Claim, Settle)>, now: Timestamp)
        -> Vec<StoreResult<Settled>>;

    /// Records a failed attempt: back to `pending` after the failure's delay
    /// while attempts remain and the failure is retryable, else `failed`.
    fn fail(&self, claim: &Claim, failure: Failure, now: Timestamp) -> FailOutcome;

    /// Gives a claimed job back to `pending` without counting an attempt
    /// (shutdown, a crashed dispatcher, an instance going down).
    fn release(&self, claim: &Claim, now: Timestamp) -> ();

    /// The earliest `run_at` after `now` among the pending jobs of `model`
    /// (jobs waiting out a retry backoff, or inserted by another program to
    /// run later): when the next of them comes due, whoever scheduled it.
    fn next_due(&self, model: ModelType, now: Timestamp) -> Option<Timestamp>;

    /// Returns every job whose lease has expired to `pending`; the count.
    fn reclaim_expired(&self, now: Timestamp) -> u64;

    /// The job's server went down while the job was in flight: back to
    /// `pending` with `crashes` counted (not `attempts`), or `failed` with
    /// [`poison_error`] once `crashes` reaches `limit`. Only the current
    /// claim may; `Settled::Released` or `Settled::Failed`.
    fn release_crashed(&self, claim: &Claim, instance: &str, limit: u32, now: Timestamp)
        -> Settled;

    /// Returns every job claimed by `owner`, or by an owner whose name starts
    /// with `owner` followed by `/`, to `pending`, leases or not: for a daemon
    /// that restarts after a crash, or a dispatcher that crashed, whose claims
    /// are known to be dead.
    fn release_owner(&self, owner: &str, now: Timestamp) -> u64;

    /// Cancels a pending or processing job (and a parent's unfinished fragments).
    fn cancel(&self, id: JobId, now: Timestamp) -> Job;

    /// Puts a failed or cancelled job back to `pending` with fresh attempts
    /// (for a parent: its failed and cancelled fragments, too).
    fn retry(&self, id: JobId, now: Timestamp) -> Job;

    /// One job.
    fn get(&self, id: JobId) -> Option<Job>;

    /// Jobs matching `filter`, newest first.
    fn list(&self, filter: &ListFilter) -> Vec<Job>;

    /// Counts per model and status, and the oldest pending age.
    fn stats(&self, now: Timestamp) -> QueueStats;

    /// The fragments of `parent`, in fragment order.
    fn fragments(&self, parent: JobId) -> Vec<Job>;

    /// Up to `limit` parents still `processing` whose fragments have all
    /// finished: fan-in work left over (after a crash, say).
    fn ready_parents(&self, limit: usize) -> Vec<JobId>;

    /// Ends a parent waiting in `processing`; `false` if it was not waiting
    /// (already finished by a concurrent fan-in, or cancelled). Exactly one
    /// caller ever gets `true` for a parent.
    fn finish_parent(&self, id: JobId, outcome: ParentOutcome, now: Timestamp) -> bool;

    /// Up to `limit` jobs that are `done` and name a `then_model`, but whose
    /// follow-up job does not exist yet.
    fn pending_follow_ups(&self, limit: usize) -> Vec<JobId>;

    /// A value that changes when another program commits to the store, or
    /// `None` if the store cannot tell. Cheap: polled every few hundred ms.
    fn change_token(&self) -> Option<i64>;

    /// Up to `limit` ids whose hex digits start with `prefix` (lower case).
    fn ids_with_prefix(&self, prefix: &str, limit: usize) -> Vec<JobId>;

    /// Says that daemon `daemon` is alive: registers it, or renews its
    /// heartbeat. Silent for longer than `timeout`, it is taken for dead,
    /// and [`reclaim_expired`](JobStore::reclaim_expired), run by any
    /// daemon, returns its claims (and those of its dispatchers,
    /// `DAEMON/...`) to `pending` without waiting for their leases.
    /// `about` is what it says of itself (host, pid, version), shown by
    /// [`daemons`](JobStore::daemons).
    fn heartbeat(
        &self,
        daemon: &str,
        about: &serde_json::Value,
        timeout: Duration,
        now: Timestamp,
    ) -> ();

    /// Removes daemon `daemon` from the registry (it stops cleanly).
    fn sign_off(&self, daemon: &str) -> ();

    /// The daemons registered, by id.
    fn daemons(&self, now: Timestamp) -> Vec<DaemonInfo>;
}

/// An argument of a port method on its way to a blocking thread: carried
/// there owned, then lent to the blocking method in the form it takes
/// (a reference is carried as a copy of what it points at).
trait Carry<'a>: Sized {
    type Owned: Send + 'static;
    fn carry(self) -> Self::Owned;
    fn lend(owned: &'a mut Self::Owned) -> Self;
}

impl<'a, T: ToOwned + ?Sized> Carry<'a> for &'a T
where
    T::Owned: Send + 'static,
{
    type Owned = T::Owned;
    fn carry(self) -> T::Owned {
        self.to_owned()
    }
    fn lend(owned: &'a mut T::Owned) -> Self {
        std::borrow::Borrow::borrow(&*owned)
    }
}

/// Arguments passed by value move to the blocking thread as they are.
macro_rules! carried_by_value {
    ($($t:ty),* $(,)?) => {$(
        impl<'a> Carry<'a> for $t {
            type Owned = Option<$t>;
            fn carry(self) -> Option<$t> {
                Some(self)
            }
            fn lend(owned: &'a mut Option<$t>) -> Self {
                owned.take().expect("each argument is lent once")
            }
        }
    )*};
}

carried_by_value!(
    NewJob,
    Vec<NewJob>,
    Vec<(Claim, Settle)>,
    Timestamp,
    ModelType,
    JobId,
    Duration,
    Completion,
    Failure,
    ParentOutcome,
    usize,
    u32,
);

/// A daemon registered on a queue.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DaemonInfo {
    /// Its `queue.daemon_id`.
    pub daemon_id: String,
    /// What it says of itself (host, pid, version).
    pub about: serde_json::Value,
    /// When it registered.
    pub started_at: Timestamp,
    /// How long ago its last heartbeat was, by the store's clock.
    #[serde(serialize_with = "secs")]
    pub heartbeat_age: Duration,
    /// Silent longer than this, it is taken for dead.
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
}

impl DaemonInfo {
    /// Whether its heartbeat is recent enough.
    pub fn alive(&self) -> bool {
        self.heartbeat_age <= self.timeout
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// A [`BlockingJobStore`] as a [`JobStore`]: every call runs on one of
/// tokio's blocking threads, so a slow disk or a held lock never stalls a
/// runtime worker (and with it every actor on it).
pub struct Blocking<S>(Arc<S>);

impl<S: BlockingJobStore> Blocking<S> {
    /// The port over `store`, for the actors and frontends to share.
    pub fn port(store: Arc<S>) -> Arc<dyn JobStore> {
        Arc::new(Blocking(store))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&S) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or_else(|e| Err(StoreError::Backend(format!("store call panicked: {e}"))))
    }
}

/// How many fragments a parent gets: at least one, and no more than the
/// schema's integer columns hold.
pub fn fragment_count(fragments: &[NewJob]) -> StoreResult<u32> {
    if fragments.is_empty() {
        return Err(StoreError::Invalid(
            "a parent job needs at least one fragment".into(),
        ));
    }
    u32::try_from(fragments.len())
        .ok()
        .filter(|&n| n <= i32::MAX as u32)
        .ok_or_else(|| StoreError::Invalid("too many fragments".into()))
}

/// The error of a job quarantined as a poison job.
pub fn poison_error(crashes: u32, instance: &str) -> String {
    format!(
        "poison job: its server ({instance}) went down {crashes} times while it was in flight, \
         so it is quarantined instead of crash-looping the server; inspect its payload, \
         then `gpu-feeder retry` it"
    )
}

/// How a claim is settled.
#[derive(Clone, Debug, PartialEq)]
pub enum Settle {
    /// The attempt succeeded.
    Complete(Completion),
    /// The attempt failed.
    Fail(Failure),
    /// The job goes back to `pending`, no attempt counted.
    Release,
    /// The job's server went down while it was in flight: it goes back to
    /// `pending` with the crash counted (no attempt), or, at the `limit`th
    /// crash, fails as a poison job.
    Crashed {
        /// The instance that went down.
        instance: String,
        /// Crashes that make it a poison job.
        limit: u32,
    },
}

/// What settling a claim did.
#[derive(Clone, Debug, PartialEq)]
pub enum Settled {
    /// The job is `done`.
    Done,
    /// The failure left the job retrying or failed.
    Failed(FailOutcome),
    /// The job is `pending` again.
    Released,
}

/// How a parent ends.
#[derive(Clone, Debug, PartialEq)]
pub enum ParentOutcome {
    /// Every fragment (or enough of them) succeeded; the merged result is here.
    Done {
        /// The merged result file.
        result_path: crate::results::ResultRef,
    },
    /// Fragments failed; `error` names them.
    Failed {
        /// Which fragments failed, and why.
        error: String,
    },
}

/// Applies one settlement through the single-claim methods.
pub fn settle_one<S: BlockingJobStore + ?Sized>(
    store: &S,
    claim: &Claim,
    settle: Settle,
    now: Timestamp,
) -> StoreResult<Settled> {
    match settle {
        Settle::Complete(done) => store.complete(claim, done, now).map(|()| Settled::Done),
        Settle::Fail(failure) => store.fail(claim, failure, now).map(Settled::Failed),
        Settle::Release => store.release(claim, now).map(|()| Settled::Released),
        Settle::Crashed { instance, limit } => store.release_crashed(claim, &instance, limit, now),
    }
}

/// Where a fragment is inserted: its parent, its index, and how many
/// fragments the parent has.
pub type FragmentAt = (JobId, u32, u32);

/// Where a submitted job goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A job of its own, `pending`.
    Single,
    /// A parent of `total` fragments, waiting in `processing` for fan-in.
    Parent {
        /// How many fragments it has.
        total: u32,
    },
    /// A fragment of a parent, `pending`.
    Fragment(FragmentAt),
}

impl Placement {
    /// The status the job starts in.
    pub fn status(self) -> JobStatus {
        match self {
            Placement::Parent { .. } => JobStatus::Processing,
            Placement::Single | Placement::Fragment(_) => JobStatus::Pending,
        }
    }

    /// Its parent, index and fragment count, for a fragment.
    pub fn fragment(self) -> Option<FragmentAt> {
        match self {
            Placement::Fragment(at) => Some(at),
            _ => None,
        }
    }

    /// The fragment count, for a parent or a fragment.
    pub fn total_fragments(self) -> Option<u32> {
        match self {
            Placement::Single => None,
            Placement::Parent { total } | Placement::Fragment((_, _, total)) => Some(total),
        }
    }
}

/// The two statements of a submission, as an adapter writes them inside
/// its transaction; [`submit_in`] and [`submit_parent_in`] make every
/// submission of them, the same way in every adapter. The methods are
/// `async` for an adapter over an asynchronous client; a synchronous one
/// writes them without awaiting anything and runs the submission with
/// [`run_now`].
// Callers name a concrete adapter, whose futures keep their auto traits.
#[allow(async_fn_in_trait)]
pub trait SubmitTx {
    /// The adapter's error: a [`StoreError`], or one that carries it.
    type Error: From<StoreError>;

    /// Inserts `job` where `placement` says unless an identical one
    /// exists: its new id, or `None` when it conflicted.
    async fn insert(&mut self, job: &NewJob, to: Placement) -> Result<Option<JobId>, Self::Error>;

    /// The existing job that an insert of `job` conflicted with.
    async fn existing(&mut self, job: &NewJob) -> Result<Job, Self::Error>;
}

/// Submits one job: inserted `pending`, or the identical one already there.
pub async fn submit_in<T: SubmitTx>(tx: &mut T, job: &NewJob) -> Result<Submitted, T::Error> {
    match tx.insert(job, Placement::Single).await? {
        Some(id) => Ok(Submitted {
            id,
            created: true,
            status: JobStatus::Pending,
        }),
        None => Ok(found(&tx.existing(job).await?)),
    }
}

/// Submits a parent, waiting in `processing`, and its fragments; an
/// identical parent already there is returned as it is, without fragments.
pub async fn submit_parent_in<T: SubmitTx>(
    tx: &mut T,
    parent: &NewJob,
    fragments: &[NewJob],
) -> Result<Submitted, T::Error> {
    let total = fragment_count(fragments)?;
    let Some(id) = tx.insert(parent, Placement::Parent { total }).await? else {
        return Ok(found(&tx.existing(parent).await?));
    };
    for (i, frag) in fragments.iter().enumerate() {
        let at = Placement::Fragment((id, i as u32, total));
        if tx.insert(frag, at).await?.is_none() {
            return Err(StoreError::Invalid(format!(
                "fragment {i} of parent {id} conflicts with an existing row"
            ))
            .into());
        }
    }
    Ok(Submitted {
        id,
        created: true,
        status: JobStatus::Processing,
    })
}

fn found(existing: &Job) -> Submitted {
    Submitted {
        id: existing.id,
        created: false,
        status: existing.status,
    }
}

/// Runs a submission over a synchronous adapter's [`SubmitTx`], whose
/// statements never wait, to its end on this thread.
pub fn run_now<T>(submission: impl std::future::Future<Output = T>) -> T {
    futures_util::FutureExt::now_or_never(submission)
        .expect("a synchronous adapter's statements never wait")
}

/// The rows a claim took, each with its insertion order (`seq`), as the
/// caller gets them: in the order `picked` gives their `seq`s when the
/// claim chose one (a grouped claim), else by priority (highest first),
/// age, then insertion, which an `UPDATE … RETURNING` does not keep; each
/// with the claim's token.
pub fn in_claim_order(
    mut rows: Vec<(i64, Job)>,
    picked: Option<&[i64]>,
    claim_id: &str,
) -> Vec<ClaimedJob> {
    match picked {
        Some(seqs) => rows.sort_by_key(|(seq, _)| seqs.iter().position(|s| s == seq)),
        None => rows.sort_by_key(|(seq, j)| (std::cmp::Reverse(j.priority), j.created_at, *seq)),
    }
    rows.into_iter()
        .map(|(_, job)| ClaimedJob {
            claim: Claim {
                job_id: job.id,
                claim_id: claim_id.to_string(),
            },
            job,
        })
        .collect()
}

/// The error of a claim that is no longer current.
pub fn stale(claim: &Claim) -> StoreError {
    StoreError::StaleClaim {
        job_id: claim.job_id,
        claim_id: claim.claim_id.clone(),
    }
}

/// What a settling statement guarded by the claim did, from the rows it
/// changed: its one row with the current claim, or none for a stale one.
pub fn one_row(changed: u64, claim: &Claim) -> StoreResult<()> {
    if changed == 1 {
        Ok(())
    } else {
        Err(stale(claim))
    }
}

/// The payload of `job` as a store keeps it: a file's path, or the text
/// itself.
pub fn payload_columns(job: &NewJob) -> (Option<&std::path::Path>, Option<&str>) {
    match &job.payload {
        crate::job::Payload::File(p) => (Some(p.as_path()), None),
        crate::job::Payload::Inline(s) => (None, Some(s.as_str())),
    }
}

/// The prefix key `job` is stored with: a fragment shares its parent's
/// (see [`crate::prefix`]).
pub fn stored_prefix_key(job: &NewJob, fragment: Option<FragmentAt>) -> Option<String> {
    match fragment {
        Some((parent, _, _)) => Some(parent.to_string()),
        None => job.prefix_key.clone(),
    }
}
