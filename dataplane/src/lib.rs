//! `rusty-lb`, RustyBalancer's data plane: a Pingora reverse proxy that routes each request by
//! an immutable table, swapped atomically whenever a new one arrives.
//!
//! The modules are layers, and each imports only from the layers below it (a test, `e2e/tests/
//! layers.rs`, keeps it so):
//! 1. pure pieces, no I/O: [`http1`] (limits, byte scan, request checks, heads, the header
//!    editor), [`answers`] (the proxy's own responses), [`hostnames`], [`router`], [`select`],
//!    [`admission`], [`clock`];
//! 2. state that outlives a request: [`metrics`], [`connections`], [`shutdown`], [`snapshot`],
//!    [`queue`], [`state_dir`], [`store`], [`certs`] (what the TLS listener serves),
//!    [`access_log`], and [`plane`], which bundles them for the paths;
//! 3. the attempt core every request path drives: [`attempt`];
//! 4. I/O edges: [`front`] (which may call [`lane`], the one edge-to-edge import), [`lane`],
//!    [`pipeline`], [`admin`], [`source`];
//! 5. wiring: [`cli`], [`server`].
//!
//! `docs/request-path.md` walks a request through both paths. The modules benches, the fuzz
//! target and the end-to-end tests use are public; the rest are the crate's own.

pub mod access_log;
pub mod admission;
pub mod answers;
pub mod attempt;
pub mod certs;
pub mod clock;
pub mod connections;
pub mod hostnames;
pub mod http1;
pub mod metrics;
pub mod plane;
pub mod queue;
pub mod router;
pub mod select;
pub mod shutdown;
pub mod snapshot;
pub mod state_dir;
pub mod store;

pub(crate) mod admin;
pub(crate) mod front;
pub(crate) mod lane;
pub(crate) mod pipeline;
pub(crate) mod source;

pub mod cli;
pub mod server;
