//! `rusty-lb`, RustyBalancer's data plane.
//!
//! A Pingora reverse proxy that routes each request by an immutable table, swapped atomically
//! whenever a new one arrives. Module map, from the request path outwards:
//! - [`router`]: host + path → service.
//! - [`select`]: service → backend (round robin in tiers, spill, local ejection).
//! - [`admission`]: per-backend concurrency limits and the overload queue by request class.
//! - [`snapshot`]: the installed table, prepared for the two above.
//! - [`proxy`]: the Pingora `ProxyHttp` that ties them to real connections.
//! - [`lane`]: the fast lane: plain requests proxied without the pipeline's phases.
//! - [`front`]: client connections before and between requests: cap, head deadline, drain.
//! - [`store`]: validates, installs and persists tables; the only writer of the snapshot.
//! - [`source`]: table file (SIGHUP) and agent WebSocket, feeding the store.
//! - [`metrics`], [`admin`]: what operators scrape and query.
//! - [`server`]: wires it all into a Pingora server with explicit shutdown.

pub mod admin;
pub mod admission;
pub mod check;
pub mod cli;
pub mod clock;
pub mod front;
pub mod lane;
pub mod metrics;
pub mod proxy;
pub mod router;
pub mod select;
pub mod server;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod store;
