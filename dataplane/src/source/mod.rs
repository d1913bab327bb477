//! Where tables come from. Each source feeds bytes to [`crate::store::TableStore::offer`] and
//! never waits for the request path; the store decides what gets installed.
//!
//! - [`file`]: a JSON file, loaded at start and again on SIGHUP.
//! - [`agent`]: a WebSocket subscription to `rusty-agent`.
//! - [`cert_dir`]: not tables but the TLS listener's certificates, from a directory.
//!
//! (The state dir is not a source of its own: the store restores from it once, at start.)

pub mod agent;
pub mod cert_dir;
pub mod file;
