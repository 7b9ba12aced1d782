//! What the SQLite and PostgreSQL adapters do alike, written once.
