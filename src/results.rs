//! Result documents: the file adapter of the `ResultStore` port (one JSON
//! file per job under `queue.results_dir/<first two hex digits>/<id>.json`,
//! written to a temporary file and renamed into place, so a reader never
//! sees half a result), the database rows (`gpu_results`, which every host
//! sharing a PostgreSQL queue can read), and [`Results`], which writes to
//! the one `results.store` names and reads whatever a job's reference
//! points at.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use feeder_actors::{JobId, ResultRef, ResultStore, StoreResult};

use crate::config::ResultsKind;

/// Result files under one folder.
///
/// Files are written by one thread of their own, fed by a channel: while
/// results keep coming it writes them one after another without sleeping,
/// so a busy feeder pays no thread hop per result (as a blocking task per
/// write would). Each write still completes (temporary file renamed into
/// place) before its caller hears back, and its error goes to that caller.
#[derive(Clone, Debug)]
pub struct FileResults {
    dir: PathBuf,
    writer: Arc<std::sync::mpsc::Sender<WriteRequest>>,
}

/// One result for the writer thread, and where to answer.
#[derive(Debug)]
struct WriteRequest {
    id: JobId,
    doc: Vec<u8>,
    done: tokio::sync::oneshot::Sender<std::io::Result<PathBuf>>,
}

impl FileResults {
    /// Results under `dir` (created when missing, with its 256 shard
    /// folders, so that a write never has to create one).
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        for shard in 0..=255u8 {
            std::fs::create_dir_all(dir.join(format!("{shard:02x}")))?;
        }
        let (tx, rx) = std::sync::mpsc::channel::<WriteRequest>();
        let dir = dir.to_path_buf();
        let writer_dir = dir.clone();
        // The thread ends when the last clone of this store is dropped.
        std::thread::Builder::new()
            .name("result-writer".into())
            .spawn(move || {
                for req in rx {
                    let written = write_file(&writer_dir, req.id, &req.doc);
                    // The caller may have given up waiting: nothing to tell.
                    let _ = req.done.send(written);
                }
            })?;
        Ok(FileResults {
            dir,
            writer: Arc::new(tx),
        })
    }

    /// Where the result of `id` is (or will be) written.
    pub fn path_of(&self, id: JobId) -> PathBuf {
        path_in(&self.dir, id)
    }
}

fn path_in(dir: &Path, id: JobId) -> PathBuf {
    let hex = id.to_hex();
    dir.join(&hex[..2]).join(format!("{hex}.json"))
}

/// Writes the result of `id` under `dir`: a temporary file renamed into place.
fn write_file(dir: &Path, id: JobId, doc: &[u8]) -> std::io::Result<PathBuf> {
    let path = path_in(dir, id);
    let shard = path.parent().expect("sharded path");
    let tmp = shard.join(format!(
        ".{}.{}.tmp",
        id.to_hex(),
        hex::encode(rand::random::<[u8; 4]>())
    ));
    if let Err(e) = std::fs::write(&tmp, doc) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e);
        }
        // The shard folder was removed behind our back: make it again.
        std::fs::create_dir_all(shard)?;
        std::fs::write(&tmp, doc)?;
    }
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(path)
}

#[async_trait]
impl ResultStore for FileResults {
    async fn write(&self, id: JobId, doc: Vec<u8>) -> std::io::Result<ResultRef> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let gone = || std::io::Error::other("the result writer thread has stopped");
        self.writer
            .send(WriteRequest { id, doc, done })
            .map_err(|_| gone())?;
        answer
            .await
            .map_err(|_| gone())?
            .map(|p| ResultRef::file(&p))
    }

    async fn read(&self, at: &ResultRef) -> std::io::Result<Vec<u8>> {
        match at.as_file() {
            Some(path) => tokio::fs::read(path).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{at} is kept in the job database, not in a file"),
            )),
        }
    }
}

/// Result documents kept as rows of the job database (`gpu_results`).
#[async_trait]
pub trait ResultRows: Send + Sync + 'static {
    /// Writes (or rewrites) the document of job `id`.
    async fn put_result(&self, id: JobId, doc: Vec<u8>) -> StoreResult<()>;
    /// The document of job `id`, if one was written.
    async fn get_result(&self, id: JobId) -> StoreResult<Option<Vec<u8>>>;
}

/// The results of one queue: written where `results.store` says, read from
/// wherever a job's reference points (a queue may hold both kinds, when
/// the setting changed).
#[derive(Clone)]
pub struct Results {
    files: FileResults,
    rows: Arc<dyn ResultRows>,
    kind: ResultsKind,
}

impl std::fmt::Debug for Results {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Results")
            .field("files", &self.files)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Results {
    /// Results written to `kind`, in `files` or `rows`.
    pub fn new(files: FileResults, rows: Arc<dyn ResultRows>, kind: ResultsKind) -> Self {
        Results { files, rows, kind }
    }

    /// Where new results go.
    pub fn kind(&self) -> ResultsKind {
        self.kind
    }

    /// The result document at `at`, parsed.
    pub async fn document(&self, at: &ResultRef) -> std::io::Result<serde_json::Value> {
        let bytes = self.read(at).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{at} is not a result document: {e}"),
            )
        })
    }
}

#[async_trait]
impl ResultStore for Results {
    async fn write(&self, id: JobId, doc: Vec<u8>) -> std::io::Result<ResultRef> {
        match self.kind {
            ResultsKind::Files => self.files.write(id, doc).await,
            ResultsKind::Database => {
                self.rows
                    .put_result(id, doc)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok(ResultRef::database(id))
            }
        }
    }

    async fn read(&self, at: &ResultRef) -> std::io::Result<Vec<u8>> {
        match at.database_id() {
            Some(id) => self
                .rows
                .get_result(id)
                .await
                .map_err(std::io::Error::other)?
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no row for {at} in gpu_results"),
                    )
                }),
            None => self.files.read(at).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_atomically_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let r = FileResults::new(&dir.path().join("results")).unwrap();
        let id = JobId([0xab; 16]);
        let at = r.write(id, b"{\"a\":1}".to_vec()).await.unwrap();
        let p = at.as_file().unwrap().to_path_buf();
        assert!(p.starts_with(dir.path().join("results").join("ab")));
        assert_eq!(r.read(&at).await.unwrap(), b"{\"a\":1}");
        assert_eq!(r.write(id, b"{\"a\":2}".to_vec()).await.unwrap(), at);
        assert_eq!(r.read(&at).await.unwrap(), b"{\"a\":2}");
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        let elsewhere = ResultRef::database(id);
        assert!(r.read(&elsewhere).await.is_err());
    }
}
