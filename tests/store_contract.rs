//! The `JobStore` contract suite against the SQLite adapter, on a real
//! database file; each "handle" is a separate connection, as a second
//! process would have.

use std::sync::Arc;

use feeder_actors::testkit::store_contract::StoreFixture;
use feeder_actors::{Blocking, JobStore};
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

#[async_trait::async_trait]
impl StoreFixture for SqliteFixture {
    async fn handle(&self) -> Arc<dyn JobStore> {
        let path = self.dir.path().join("jobs.db");
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
            .await
            .expect("open store")
            .expect("open store");
        Blocking::port(Arc::new(store))
    }
}

feeder_actors::store_contract_tests!(SqliteFixture::new());
