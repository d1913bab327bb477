//! The table wire format, schema version 1.
//!
//! A table is one JSON document describing every service a data plane routes and the backends
//! behind it. Unknown fields are rejected everywhere, so every addition to the schema is a named,
//! documented field with a default that keeps older tables valid. These types only describe the
//! shape; [`crate::validate`] decides whether the content is acceptable.
//!
//! Field reference (defaults in brackets):
//! - `schema` [1]: the schema version of this document.
//! - `version`: the table's own version; a data plane only installs a table newer than its own.
//! - `allow_empty` [false]: set to install a table with no backend at all over one that has some.
//! - `services[].name`, `hosts` [any host], `path_prefix` ["/"], `backends`.
//! - `services[].schedule` [computed]: the precomputed round-robin sequence per tier, in
//!   ascending priority order, as indices into `backends`.
//! - `services[].overprovisioning` [1.4]: Envoy's factor for spilling traffic across tiers.
//! - `services[].connect_timeout_ms` [1000], `read_timeout_ms` [60000], `retries` [2],
//!   `eject_ms` [10000]: upstream policy of the data plane for this service.
//! - `services[].class` ["normal"]: the request priority class, `critical`, `normal` or `bulk`;
//!   `class_header` [none]: a request header whose value (one of the three) overrides it.
//! - `services[].max_inflight` [0 = unlimited]: requests in flight per backend address; over it a
//!   request waits in the data plane's queue, by class, for at most `queue_timeout_ms` [1000].
//! - `services[].https_redirect` [false]: plain-HTTP requests get `308` to the same URL over
//!   HTTPS (ACME challenges excepted); `hsts` [none]: `{"max_age_s", "include_subdomains",
//!   "preload"}`, the `Strict-Transport-Security` header set on HTTPS responses.
//! - `services[].upstream_tls` [none = plain HTTP]: TLS to the backends, `{"server_name"}` (SNI
//!   and the name verified; default: the backend's address) and a CA, `"ca_pem"` (the PEM text)
//!   or `"ca_file"` (a path on the data plane's machine); default: the system's roots.
//! - `services[].upstream_protocol` ["http1"]: what the data plane speaks to the backends:
//!   `http1`, `h2c` (HTTP/2 with prior knowledge, plain) or `h2` (HTTP/2 over TLS, ALPN; needs
//!   `upstream_tls`). gRPC backends need `h2c` or `h2` (HTTP/1 cannot carry trailers).
//! - `acme_challenges` [none]: `{"TOKEN": "KEY_AUTHORIZATION"}`, the answers to ACME HTTP-01
//!   challenges the agent has open; a data plane answers `GET /.well-known/acme-challenge/TOKEN`
//!   with the key authorization, on any host, before routing.
//! - `backends[].id`, `addr` ("ip:port"), `weight` [1] in 1..=1000, `priority` [0], 0 = most
//!   preferred.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A whole routing table, as sent by the agent or read from a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    #[serde(default = "default_schema")]
    pub schema: u32,
    pub version: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_empty: bool,
    #[serde(default)]
    pub services: Vec<Service>,
    /// ACME HTTP-01 answers the agent is waiting for: token → key authorization.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub acme_challenges: BTreeMap<String, String>,
}

/// One routable service: which requests it takes and the backends that serve them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Vec<Vec<u32>>>,
    #[serde(default = "default_overprovisioning")]
    pub overprovisioning: f64,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
    #[serde(default, skip_serializing_if = "RequestClass::is_default")]
    pub class: RequestClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_header: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_inflight: u32,
    #[serde(default = "default_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub https_redirect: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<Hsts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<UpstreamTls>,
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_default")]
    pub upstream_protocol: UpstreamProtocol,
}

/// The protocol from the data plane to a service's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP.
    H2c,
    /// HTTP/2 over TLS, negotiated with ALPN.
    H2,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
        }
    }

    /// Whether requests travel as HTTP/2 streams.
    pub fn is_h2(self) -> bool {
        self != UpstreamProtocol::Http1
    }

    fn is_default(&self) -> bool {
        *self == UpstreamProtocol::Http1
    }
}

/// `Strict-Transport-Security` for a service's HTTPS responses (RFC 6797).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hsts {
    pub max_age_s: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub include_subdomains: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub preload: bool,
}

/// TLS from the data plane to a service's backends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name sent as SNI and verified in the backend's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The CA certificates the backend's chain must lead to, as PEM text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The same, as a file on the data plane's machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// How much a request matters when there is not capacity for everyone: under overload a
/// higher class is served first and a lower one is shed first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RequestClass {
    Bulk = 0,
    #[default]
    Normal = 1,
    Critical = 2,
}

impl RequestClass {
    pub const ALL: [RequestClass; 3] = [
        RequestClass::Bulk,
        RequestClass::Normal,
        RequestClass::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestClass::Bulk => "bulk",
            RequestClass::Normal => "normal",
            RequestClass::Critical => "critical",
        }
    }

    /// A class named in a request header (ASCII case-insensitive).
    pub fn from_bytes(b: &[u8]) -> Option<RequestClass> {
        RequestClass::ALL
            .into_iter()
            .find(|c| c.as_str().as_bytes().eq_ignore_ascii_case(b))
    }

    fn is_default(&self) -> bool {
        *self == RequestClass::Normal
    }
}

/// One upstream address of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub id: String,
    pub addr: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub priority: u32,
}

impl Service {
    /// A service with the schema's defaults, for code that builds tables (the agent, tests).
    pub fn new(name: impl Into<String>, backends: Vec<Backend>) -> Self {
        Service {
            name: name.into(),
            hosts: Vec::new(),
            path_prefix: default_path_prefix(),
            backends,
            schedule: None,
            overprovisioning: default_overprovisioning(),
            connect_timeout_ms: default_connect_timeout_ms(),
            read_timeout_ms: default_read_timeout_ms(),
            retries: default_retries(),
            eject_ms: default_eject_ms(),
            class: RequestClass::Normal,
            class_header: None,
            max_inflight: 0,
            queue_timeout_ms: default_queue_timeout_ms(),
            https_redirect: false,
            hsts: None,
            upstream_tls: None,
            upstream_protocol: UpstreamProtocol::Http1,
        }
    }
}

impl Backend {
    pub fn new(id: impl Into<String>, addr: impl Into<String>, weight: u32, priority: u32) -> Self {
        Backend {
            id: id.into(),
            addr: addr.into(),
            weight,
            priority,
        }
    }
}

impl Table {
    pub fn new(version: u64, services: Vec<Service>) -> Self {
        Table {
            schema: default_schema(),
            version,
            allow_empty: false,
            services,
            acme_challenges: BTreeMap::new(),
        }
    }

    /// The JSON text of this table, as the agent sends it and the state dir stores it.
    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail; NaN cannot occur because
        // `overprovisioning` is range-checked before any table is installed or sent.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

fn default_schema() -> u32 {
    crate::limits::SCHEMA
}
fn default_path_prefix() -> String {
    "/".to_owned()
}
fn default_overprovisioning() -> f64 {
    1.4
}
fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_read_timeout_ms() -> u64 {
    60_000
}
fn default_retries() -> u32 {
    2
}
fn default_eject_ms() -> u64 {
    10_000
}
fn default_queue_timeout_ms() -> u64 {
    1_000
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}
fn default_weight() -> u32 {
    1
}
fn is_false(b: &bool) -> bool {
    !*b
}
