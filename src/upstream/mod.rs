//! The upstream side: backends, pools, the published balancing table and its one writer.
//!
//! [`table::Table`] is the immutable snapshot the request path reads through `ArcSwap`;
//! [`publisher::Publisher`] is the only task that builds and stores new tables; per-backend
//! live counters ([`backend::BackendStats`]) and upstream connection pools outlive tables.

pub mod backend;
pub mod body;
pub mod connections;
pub mod connector;
pub mod http1;
pub mod publisher;
pub mod retry;
pub mod table;
