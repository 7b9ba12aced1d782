//! The admin endpoint: the HTTP server inside the daemon ([`server`]), its
//! status page ([`page`]) with the throughput it samples ([`history`]), the
//! state both serve from ([`state`]), and the client other processes use
//! to ask it ([`client`]).

pub mod client;
pub mod history;
pub mod page;
pub mod server;
pub mod state;

pub use client::AdminClient;
pub use server::router;
pub use state::Admin;
