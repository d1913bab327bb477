//! `rusty-agent`: RustyBalancer's deployment agent.
//!
//! The agent owns the desired state of every service, makes the actual state match it, health
//! checks every instance and pushes round-robin-with-priorities tables to the data planes over a
//! one-way WebSocket.
//!
//! Layout, from pure logic to I/O:
//! - [`config`] reads and validates the TOML file into the domain types of [`spec`];
//! - [`reconcile`] decides what to start, drain and stop (no I/O, fake clock in tests), using the
//!   rise/fall rule of [`health`];
//! - [`publish`] turns healthy instances into versioned tables, [`certs`] the `[tls]`
//!   certificate files into versioned bundles;
//! - [`runtime`] runs instances (local processes, static addresses) behind one trait;
//! - [`autoscale`] decides replica counts from load (pure), which [`scrape`] reads from the
//!   data planes' `/metrics`;
//! - [`outlier`] spots instances the data planes keep ejecting (pure);
//! - [`core`] is the single task that owns the state and drives the others;
//! - [`server`] is the listener: admin API, metrics, and the table stream;
//! - [`client`] and [`cli`] are the command line, [`progress`] how it shows what it follows;
//! - [`wiring`] builds all of it for `rusty-agent run` and owns the shutdown.
//!
//! The validated spec types ([`spec`]) sit below everything that uses them; no module imports
//! one above it in a cycle (`e2e/tests/layers.rs` checks).

pub mod acme;
pub mod api;
pub mod auth;
pub mod autoscale;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod health;
pub mod metrics;
pub mod outlier;
pub mod progress;
pub mod publish;
pub mod reconcile;
pub mod runtime;
pub mod scrape;
pub mod server;
pub mod spec;
pub mod state;
pub mod wiring;
