//! The admin endpoint: the HTTP server inside the daemon ([`server`]) and
//! the client other processes use to ask it ([`client`]).

pub mod client;
pub mod server;

pub use client::AdminClient;
pub use server::{router, Admin};
