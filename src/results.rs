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
        let mut writer = Writer::open(&dir)?;
        // The thread ends when the last clone of this store is dropped.
        std::thread::Builder::new()
            .name("result-writer".into())
            .spawn(move || {
                for req in rx {
                    let written = writer.write(req.id, &req.doc);
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
    dir.join(relative_path(id))
}

/// `<first two hex digits>/<id>.json`.
fn relative_path(id: JobId) -> PathBuf {
    let hex = id.to_hex();
    Path::new(&hex[..2]).join(format!("{hex}.json"))
}

/// How a written file is given its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Naming {
    /// An unnamed file (`O_TMPFILE`) linked into place through its
    /// descriptor (`AT_EMPTY_PATH`): one directory entry made, none
    /// removed.
    LinkEmptyPath,
    /// The same, linked through `/proc/self/fd` (where `AT_EMPTY_PATH`
    /// needs a capability the process lacks).
    LinkProc,
    /// A named temporary file renamed into place (file systems without
    /// `O_TMPFILE`, and any result written again).
    Rename,
}

/// The writer thread's side: the results folder held open, so that each
/// write walks two path components rather than the whole path.
struct Writer {
    dir: PathBuf,
    root: std::os::fd::OwnedFd,
    naming: Naming,
}

impl Writer {
    fn open(dir: &Path) -> std::io::Result<Self> {
        let root = std::fs::File::open(dir)?.into();
        Ok(Writer {
            dir: dir.to_path_buf(),
            root,
            naming: Naming::LinkEmptyPath,
        })
    }

    /// Writes the result of `id`: the whole file appears under its name at
    /// once, or not at all.
    fn write(&mut self, id: JobId, doc: &[u8]) -> std::io::Result<PathBuf> {
        let rel = relative_path(id);
        match self.write_once(&rel, doc) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The shard folder was removed behind our back: make it again.
                std::fs::create_dir_all(self.dir.join(rel.parent().expect("sharded path")))?;
                self.write_once(&rel, doc)?;
            }
            other => other?,
        }
        Ok(self.dir.join(rel))
    }

    fn write_once(&mut self, rel: &Path, doc: &[u8]) -> std::io::Result<()> {
        if self.naming != Naming::Rename {
            match self.link_unnamed(rel, doc) {
                Ok(true) => return Ok(()),
                // Already there (the job ran before): replaced by a rename.
                Ok(false) => {}
                Err(e) => return Err(e),
            }
        }
        self.rename_into_place(rel, doc)
    }

    /// Writes an unnamed file in `rel`'s folder and links it as `rel`;
    /// false when `rel` exists already. Falls back to the next way of
    /// naming (for good) where the system refuses this one.
    fn link_unnamed(&mut self, rel: &Path, doc: &[u8]) -> std::io::Result<bool> {
        use nix::errno::Errno;
        use nix::fcntl::{openat, OFlag, AT_FDCWD};
        use nix::sys::stat::Mode;
        use nix::unistd::linkat;
        use std::os::fd::AsRawFd;

        let shard = rel.parent().expect("sharded path");
        let fd = match openat(
            &self.root,
            shard,
            OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        ) {
            Ok(fd) => fd,
            Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {
                self.naming = Naming::Rename;
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let mut file = std::fs::File::from(fd);
        std::io::Write::write_all(&mut file, doc)?;
        loop {
            let linked = match self.naming {
                Naming::LinkEmptyPath => linkat(
                    &file,
                    "",
                    &self.root,
                    rel,
                    nix::fcntl::AtFlags::AT_EMPTY_PATH,
                ),
                _ => linkat(
                    AT_FDCWD,
                    format!("/proc/self/fd/{}", file.as_raw_fd()).as_str(),
                    &self.root,
                    rel,
                    nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
                ),
            };
            match linked {
                Ok(()) => return Ok(true),
                Err(Errno::EEXIST) => return Ok(false),
                // Without CAP_DAC_READ_SEARCH, AT_EMPTY_PATH is refused.
                Err(Errno::ENOENT | Errno::EPERM) if self.naming == Naming::LinkEmptyPath => {
                    self.naming = Naming::LinkProc;
                }
                // No /proc, or a file system that cannot link: rename.
                Err(Errno::ENOENT | Errno::EPERM | Errno::EXDEV | Errno::EOPNOTSUPP) => {
                    self.naming = Naming::Rename;
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes a named temporary file beside `rel` and renames it over `rel`.
    fn rename_into_place(&self, rel: &Path, doc: &[u8]) -> std::io::Result<()> {
        use nix::fcntl::{openat, renameat, OFlag};
        use nix::sys::stat::Mode;

        let shard = rel.parent().expect("sharded path");
        let name = rel.file_name().expect("a file name").to_string_lossy();
        let tmp = shard.join(format!(
            ".{}.{}.tmp",
            name.trim_end_matches(".json"),
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let fd = openat(
            &self.root,
            &tmp,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )?;
        let written = std::io::Write::write_all(&mut std::fs::File::from(fd), doc)
            .and_then(|()| Ok(renameat(&self.root, &tmp, &self.root, rel)?));
        if written.is_err() {
            let _ =
                nix::unistd::unlinkat(&self.root, &tmp, nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
        written
    }
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

    /// Each way of naming a file (the one a system allows is found at the
    /// first write) leaves the whole document under its name, replaces an
    /// earlier one, leaves no temporary file, and survives a shard folder
    /// removed behind its back.
    #[test]
    fn every_way_of_naming_writes_whole_files() {
        for naming in [Naming::LinkEmptyPath, Naming::LinkProc, Naming::Rename] {
            let dir = tempfile::tempdir().unwrap();
            let results = dir.path().join("results");
            FileResults::new(&results).unwrap();
            let mut w = Writer::open(&results).unwrap();
            w.naming = naming;
            let id = JobId([0xcd; 16]);
            let p = w.write(id, b"first").unwrap();
            assert_eq!(p, path_in(&results, id));
            assert_eq!(std::fs::read(&p).unwrap(), b"first", "{naming:?}");
            w.write(id, b"second").unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"second", "{naming:?}");
            let shard = p.parent().unwrap();
            assert_eq!(std::fs::read_dir(shard).unwrap().count(), 1, "{naming:?}");
            std::fs::remove_dir_all(shard).unwrap();
            w.write(id, b"third").unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"third", "{naming:?}");
            assert_eq!(std::fs::read_dir(shard).unwrap().count(), 1, "{naming:?}");
        }
    }
}
