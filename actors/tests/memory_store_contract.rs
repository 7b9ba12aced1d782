//! The `JobStore` contract suite against the in-memory fake, so that the
//! fake used by message-level tests behaves as the SQLite adapter does.

use std::sync::Arc;

use feeder_actors::testkit::store_contract::StoreFixture;
use feeder_actors::testkit::MemoryStore;
use feeder_actors::JobStore;

struct MemoryFixture(MemoryStore);

#[async_trait::async_trait]
impl StoreFixture for MemoryFixture {
    async fn handle(&self) -> Arc<dyn JobStore> {
        self.0.connect()
    }
}

feeder_actors::store_contract_tests!(MemoryFixture(MemoryStore::new()));
