//! Moving traffic: the HTTP (layer 7) proxy and the pieces it is made of.
//!
//! `l7` owns a client HTTP connection's life: gatehouse's own HTTP/1 loop `h1` or a hyper
//! `session` serves its requests, and `request` checks, routes and forwards each one to a
//! backend chosen from the published table; `headers` owns header rewriting; `body` the
//! response body type; `error` the mapping from failures to statuses; `framing` the
//! independent check of HTTP/1 request framing; `h2_resets` counts the HTTP/2 requests the h2
//! crate refused; `park` lets idle keep-alive connections give a session's state back;
//! `stall` finds the clients that stop taking their responses; `l4` the TCP proxy, whose
//! tunnels (and WebSockets) copy both ways through `relay`. None of these take a lock.

pub mod body;
pub mod error;
pub mod framing;
pub mod h1;
pub mod h2_resets;
pub mod headers;
pub mod l4;
pub mod l7;
pub mod park;
pub mod relay;
pub mod request;
pub mod session;
pub mod stall;
