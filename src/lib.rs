//! gatehouse — a layer-4/7 reverse-proxy load balancer for citizen-service web applications.
//!
//! ```text
//! client ─► listener (accept, limits) ─► tls (acceptor from the table) ─┬─ l4: copy both ways
//!                                                                        └─ l7: own HTTP/1 loop or hyper session → request
//!        ─► table.load(): route → pool → balancer.pick() → backend ─► pooled HTTP/1.1 client (own)
//! health checker ──┐
//! config reloader ─┼─► publisher (the one writer) ── build new Table ──► ArcSwap<Table>.store()
//! admin API ───────┘                          admin / metrics / dashboard read table.load()
//! ```
//!
//! The request path reads one immutable [`upstream::table::Table`] through `ArcSwap` and
//! takes no lock; every change (health, reload, admin) goes through
//! [`upstream::publisher`], which builds the next table and stores it. Configuration is
//! parsed and validated in [`config`], the same code for `check`, start-up and reload.
//! Each [`workers`] thread accepts on every listener and serves what it accepted to the end;
//! the admin API, reloads and health checks run beside them.

pub mod access_log;
pub mod admin;
pub mod audit;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod demo;
pub mod health;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod open_files;
pub mod proxy;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod reload;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod waiting_room;
pub mod watch;
pub mod workers;
