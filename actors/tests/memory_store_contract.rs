//! The `JobStore` contract suite against the in-memory fake, so that the
//! fake used by message-level tests behaves as the SQLite adapter does.

use feeder_actors::testkit::store_contract::StoreFixture;
use feeder_actors::testkit::MemoryStore;

struct MemoryFixture(MemoryStore);

impl StoreFixture for MemoryFixture {
    type Store = MemoryStore;

    fn handle(&self) -> MemoryStore {
        self.0.clone()
    }
}

feeder_actors::store_contract_tests!(MemoryFixture(MemoryStore::new()));
