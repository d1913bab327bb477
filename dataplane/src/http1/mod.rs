//! HTTP/1 without I/O: pure functions and state machines over bytes and parsed heads.
//!
//! Every request path reads requests through these pieces, so they answer alike: [`limits`]
//! (the sizes a head may have), [`path`] (the normal form a path is routed by), [`editor`] (which headers cross the proxy, and what it
//! adds), [`scan`] (request boundaries and the request line as sent),
//! [`request`] (the checks a proxy must make before forwarding), [`trust`] (whose
//! forwarding headers are believed), [`head`] (the fast lane's
//! parsing and writing of heads) and [`invariants`] (what the fuzz target checks). Nothing here
//! reads a socket, a clock or the installed table.

pub mod editor;
pub mod head;
pub mod invariants;
pub mod limits;
pub mod path;
pub mod request;
pub mod scan;
pub mod trust;

pub use limits::Limits;
pub use request::Refused;
