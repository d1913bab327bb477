//! Why a table was refused. Every variant names where the problem is (service, backend id,
//! tier) so the one log line a data plane prints is enough to fix the table.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TableError {
    #[error("table is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("table is not valid JSON for schema 1: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("table schema {0} is not supported (this build speaks schema 1)")]
    UnsupportedSchema(u32),
    #[error("table version {version} is not newer than the installed version {installed}")]
    Stale { version: u64, installed: u64 },
    #[error("table has {count} {what}, over the limit of {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("service name {name:?} is invalid: {reason}")]
    BadServiceName { name: String, reason: &'static str },
    #[error("service {0:?} appears more than once")]
    DuplicateService(String),
    #[error("service {service:?}: host {host:?} is invalid: {reason}")]
    BadHost {
        service: String,
        host: String,
        reason: &'static str,
    },
    #[error("service {service:?}: path_prefix {prefix:?} is invalid: {reason}")]
    BadPathPrefix {
        service: String,
        prefix: String,
        reason: &'static str,
    },
    #[error(
        "services {first:?} and {second:?} both claim host {host:?} with path_prefix {prefix:?}"
    )]
    DuplicateRoute {
        first: String,
        second: String,
        host: String,
        prefix: String,
    },
    #[error("service {service:?}: {field} = {value} is out of range ({range})")]
    PolicyOutOfRange {
        service: String,
        field: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("service {service:?}: backend id {id:?} is invalid: {reason}")]
    BadBackendId {
        service: String,
        id: String,
        reason: &'static str,
    },
    #[error("service {service:?}: backend id {id:?} appears more than once")]
    DuplicateBackend { service: String, id: String },
    #[error("service {service:?}, backend {id:?}: addr {addr:?} is not an ip:port address")]
    BadAddress {
        service: String,
        id: String,
        addr: String,
    },
    #[error("service {service:?}, backend {id:?}: weight {weight} is out of range 1..=1000")]
    WeightOutOfRange {
        service: String,
        id: String,
        weight: u32,
    },
    #[error("service {service:?}, backend {id:?}: priority {priority} is out of range 0..=127")]
    PriorityOutOfRange {
        service: String,
        id: String,
        priority: u32,
    },
    #[error("service {service:?}, tier {priority}: schedule would have {len} entries over {weights} distinct weights, over the limit (length {max_len}, length x distinct weights {max_work}); use weights with a larger common divisor")]
    ScheduleTooLong {
        service: String,
        priority: u32,
        len: u64,
        weights: u64,
        max_len: u64,
        max_work: u64,
    },
    #[error("service {service:?}: {field} is invalid: {reason}")]
    BadTls {
        service: String,
        field: &'static str,
        reason: String,
    },
    #[error("acme_challenges: token {token:?} is invalid: {reason}")]
    BadAcmeChallenge { token: String, reason: &'static str },
    #[error("service {service:?}: schedule is invalid: {reason}")]
    BadSchedule { service: String, reason: String },
    #[error("table {version} has no backend at all while the installed table has {installed_backends}; set \"allow_empty\": true if that is intended")]
    WouldEmpty {
        version: u64,
        installed_backends: usize,
    },
}

impl TableError {
    /// True when the table was merely old news (a resend of the installed version, or an older
    /// one): not an error in the sender, and counted apart from rejections.
    pub fn is_stale(&self) -> bool {
        matches!(self, TableError::Stale { .. })
    }
}
