//! The file adapter of the `ResultStore` port: one JSON file per job under
//! `queue.results_dir/<first two hex digits of the id>/<id>.json`, written to
//! a temporary file and renamed into place, so a reader never sees half a
//! result.

use std::path::{Path, PathBuf};

use feeder_actors::{JobId, ResultStore};

/// Result files under one folder.
#[derive(Clone, Debug)]
pub struct FileResults {
    dir: PathBuf,
}

impl FileResults {
    /// Results under `dir` (created when missing, with its 256 shard
    /// folders, so that a write never has to create one).
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        for shard in 0..=255u8 {
            std::fs::create_dir_all(dir.join(format!("{shard:02x}")))?;
        }
        Ok(FileResults {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the result of `id` is (or will be) written.
    pub fn path_of(&self, id: JobId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(format!("{hex}.json"))
    }
}

impl ResultStore for FileResults {
    fn write(&self, id: JobId, doc: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.path_of(id);
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

    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let r = FileResults::new(&dir.path().join("results")).unwrap();
        let id = JobId([0xab; 16]);
        let p = r.write(id, b"{\"a\":1}").unwrap();
        assert!(p.starts_with(dir.path().join("results").join("ab")));
        assert_eq!(r.read(&p).unwrap(), b"{\"a\":1}");
        assert_eq!(r.write(id, b"{\"a\":2}").unwrap(), p);
        assert_eq!(r.read(&p).unwrap(), b"{\"a\":2}");
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}
