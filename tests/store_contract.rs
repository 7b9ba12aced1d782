//! The `JobStore` contract suite against the SQLite adapter, on a real
//! database file; each "handle" is a separate connection, as a second
//! process would have.

use feeder_actors::testkit::store_contract::StoreFixture;
use gpu_feeder::store::SqliteStore;

struct SqliteFixture {
    dir: tempfile::TempDir,
}

impl SqliteFixture {
    fn new() -> Self {
        SqliteFixture {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

impl StoreFixture for SqliteFixture {
    type Store = SqliteStore;

    fn handle(&self) -> SqliteStore {
        SqliteStore::open(&self.dir.path().join("jobs.db")).expect("open store")
    }
}

feeder_actors::store_contract_tests!(SqliteFixture::new());
