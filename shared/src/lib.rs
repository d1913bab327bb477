//! The contract between RustyBalancer's two planes.
//!
//! The agent (`rusty-agent`) builds a [`Table`], validates it with [`validate`] and sends it as
//! JSON; the data plane (`rusty-lb`) decodes it with [`decode`], validates it with the same
//! function and only then installs it. Keeping both checks in one place means the two sides can
//! never disagree about what a good table is.
//!
//! - [`table`]: the wire format (serde types, version 1 of the schema).
//! - [`validate`]: wire table → [`ValidTable`], the domain type the data plane builds from.
//! - [`schedule`]: the smooth weighted round-robin sequence of one tier.
//! - [`spill`]: how traffic spills across priority tiers as backends become unhealthy.
//! - [`limits`]: every size and range limit, in one place.
//! - [`invariants`]: properties for any input, shared by the fuzz targets and corpus tests.
//! - [`hostnames`]: the normal form of a host, and the names a certificate covers.
//! - [`certs`]: a certificate pair checked the same way on both sides, and the bundle message
//!   that carries pairs from the agent to the data planes.
//! - [`civil`]: unix time as a UTC calendar date (for logs and the CLI).
//! - [`exposition`]: the samples of a Prometheus `/metrics` answer (the agent reads the data
//!   planes' load with it).

pub mod auth;
pub mod certs;
pub mod civil;
pub mod error;
pub mod exposition;
pub mod hostnames;
pub mod invariants;
pub mod limits;
pub mod schedule;
pub mod spill;
pub mod table;
pub mod validate;

pub use error::TableError;
pub use table::{Backend, Hsts, RequestClass, Service, Table, UpstreamProtocol, UpstreamTls};
pub use validate::{
    check_succession, decode, validate, CaSource, HostPattern, ValidBackend, ValidService,
    ValidTable, ValidTier, ValidUpstreamTls,
};
