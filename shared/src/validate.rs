//! Wire table → [`ValidTable`]: every check a table must pass before anyone installs it.
//!
//! The agent calls [`validate`] before it sends a table and the data plane calls it (after
//! [`decode`]) before it installs one; [`check_succession`] adds the checks that depend on what is
//! already installed. After this point nothing downstream re-checks or re-parses: the data plane
//! builds its routing snapshot from a [`ValidTable`] alone.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use crate::error::TableError;
use crate::limits::*;
use crate::schedule::{reduce_weights, schedule_cost, smooth_weighted};
use crate::table::{RequestClass, Service, Table};

/// A table that passed [`validate`], in the shape the data plane routes with.
#[derive(Debug, Clone)]
pub struct ValidTable {
    /// The table as received, for `GET /table` and the state dir.
    pub table: Table,
    pub services: Vec<ValidService>,
    pub backend_count: usize,
}

#[derive(Debug, Clone)]
pub struct ValidService {
    pub name: String,
    /// Empty means any host.
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    pub backends: Vec<ValidBackend>,
    /// Non-empty tiers in ascending priority (most preferred first).
    pub tiers: Vec<ValidTier>,
    /// Overprovisioning factor in percent (140 for 1.4).
    pub overprovisioning_pct: u32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub eject_for: Duration,
    pub class: RequestClass,
    /// Lower-cased header name whose value may override `class` per request.
    pub class_header: Option<String>,
    /// Requests in flight per backend address; 0 = unlimited.
    pub max_inflight: u32,
    pub queue_timeout: Duration,
    /// Plain-HTTP requests are redirected to HTTPS.
    pub https_redirect: bool,
    /// The `Strict-Transport-Security` value for HTTPS responses, rendered once.
    pub hsts: Option<String>,
    pub upstream_tls: Option<ValidUpstreamTls>,
    /// `H2` only with `upstream_tls`, `H2c` only without.
    pub upstream_protocol: crate::UpstreamProtocol,
}

/// TLS to a service's backends, checked for shape (the data plane parses the certificates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidUpstreamTls {
    /// Lower-cased; `None`: each backend's address is the name.
    pub server_name: Option<String>,
    pub ca: CaSource,
}

/// Where the CA certificates for a service's backends come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// The data plane's system roots.
    System,
    Pem(String),
    File(String),
}

#[derive(Debug, Clone)]
pub struct ValidBackend {
    pub id: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub priority: u32,
}

/// The backends of one priority and the cycle they are picked in.
#[derive(Debug, Clone)]
pub struct ValidTier {
    pub priority: u32,
    /// Indices into [`ValidService::backends`].
    pub members: Vec<u32>,
    pub total_weight: u64,
    /// The smooth weighted round-robin cycle, as indices into [`ValidService::backends`].
    pub schedule: Vec<u32>,
}

/// A host a service answers for, lower-cased, without port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `api.example.com`
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`; matches any name that ends with it.
    Suffix(String),
}

impl HostPattern {
    fn as_written(&self) -> String {
        match self {
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Suffix(s) => format!("*{s}"),
        }
    }
}

/// Parse a table, enforcing the size limit before the parser sees a byte.
pub fn decode(bytes: &[u8]) -> Result<Table, TableError> {
    if bytes.len() > MAX_TABLE_BYTES {
        return Err(TableError::TooLarge {
            size: bytes.len(),
            limit: MAX_TABLE_BYTES,
        });
    }
    Ok(serde_json::from_slice(bytes)?)
}

/// Everything that can be checked about a table on its own.
pub fn validate(table: Table) -> Result<ValidTable, TableError> {
    if table.schema != SCHEMA {
        return Err(TableError::UnsupportedSchema(table.schema));
    }
    too_many("services", table.services.len(), MAX_SERVICES)?;
    let backend_count: usize = table.services.iter().map(|s| s.backends.len()).sum();
    too_many("backends", backend_count, MAX_BACKENDS)?;

    let mut names = HashSet::new();
    let mut routes: HashMap<(Option<HostPattern>, &str), &str> = HashMap::new();
    let mut services = Vec::with_capacity(table.services.len());
    for svc in &table.services {
        check_name(&svc.name).map_err(|reason| TableError::BadServiceName {
            name: svc.name.clone(),
            reason,
        })?;
        if !names.insert(svc.name.as_str()) {
            return Err(TableError::DuplicateService(svc.name.clone()));
        }
        let valid = validate_service(svc)?;
        // Two services with the same host and prefix would make routing depend on their order.
        let keys: Vec<Option<HostPattern>> = if valid.hosts.is_empty() {
            vec![None]
        } else {
            valid.hosts.iter().cloned().map(Some).collect()
        };
        for key in keys {
            if let Some(first) = routes.insert((key.clone(), &svc.path_prefix), &svc.name) {
                return Err(TableError::DuplicateRoute {
                    first: first.to_owned(),
                    second: svc.name.clone(),
                    host: key.map_or_else(|| "(any)".to_owned(), |h| h.as_written()),
                    prefix: svc.path_prefix.clone(),
                });
            }
        }
        services.push(valid);
    }
    too_many(
        "acme_challenges",
        table.acme_challenges.len(),
        MAX_ACME_CHALLENGES,
    )?;
    for (token, key_auth) in &table.acme_challenges {
        check_acme_challenge(token, key_auth).map_err(|reason| TableError::BadAcmeChallenge {
            token: token.chars().take(MAX_ACME_TOKEN_LEN).collect(),
            reason,
        })?;
    }
    Ok(ValidTable {
        table,
        services,
        backend_count,
    })
}

/// RFC 8555 §8.3: the token is base64url, the key authorization `token.thumbprint`. Both end up
/// in a URL path and a response body, so nothing else may pass.
fn check_acme_challenge(token: &str, key_auth: &str) -> Result<(), &'static str> {
    let base64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if token.is_empty() || token.len() > MAX_ACME_TOKEN_LEN || !base64url(token) {
        return Err("a token is 1 to 128 base64url characters");
    }
    let thumbprint = key_auth
        .strip_prefix(token)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or("the key authorization must be the token, a dot and the thumbprint")?;
    if thumbprint.is_empty() || key_auth.len() > MAX_ACME_KEY_AUTH_LEN || !base64url(thumbprint) {
        return Err("the thumbprint is 1 to 127 base64url characters");
    }
    Ok(())
}

/// The checks that depend on the installed table: versions only grow, and a table that removes
/// every backend must say so. `installed` is `(version, backend_count)` of the installed table.
pub fn check_succession(
    installed: Option<(u64, usize)>,
    next: &ValidTable,
) -> Result<(), TableError> {
    let Some((version, installed_backends)) = installed else {
        return Ok(());
    };
    if next.table.version <= version {
        return Err(TableError::Stale {
            version: next.table.version,
            installed: version,
        });
    }
    if next.backend_count == 0 && installed_backends > 0 && !next.table.allow_empty {
        return Err(TableError::WouldEmpty {
            version: next.table.version,
            installed_backends,
        });
    }
    Ok(())
}

fn too_many(what: &'static str, count: usize, limit: usize) -> Result<(), TableError> {
    if count > limit {
        return Err(TableError::TooMany { what, count, limit });
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("it is longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err("only ASCII letters, digits and - _ . : are allowed");
    }
    Ok(())
}

fn validate_service(svc: &Service) -> Result<ValidService, TableError> {
    let name = &svc.name;
    if svc.hosts.len() > MAX_HOSTS_PER_SERVICE {
        return Err(TableError::TooMany {
            what: "hosts in one service",
            count: svc.hosts.len(),
            limit: MAX_HOSTS_PER_SERVICE,
        });
    }
    let mut hosts = Vec::with_capacity(svc.hosts.len());
    for h in &svc.hosts {
        let pattern = parse_host(h).map_err(|reason| TableError::BadHost {
            service: name.clone(),
            host: h.clone(),
            reason,
        })?;
        if !hosts.contains(&pattern) {
            hosts.push(pattern);
        }
    }
    check_path_prefix(&svc.path_prefix).map_err(|reason| TableError::BadPathPrefix {
        service: name.clone(),
        prefix: svc.path_prefix.clone(),
        reason,
    })?;
    let ov = svc.overprovisioning;
    if !(OVERPROVISIONING_MIN..=OVERPROVISIONING_MAX).contains(&ov) {
        return Err(out_of_range(name, "overprovisioning", ov, "1.0..=100.0"));
    }
    for (field, ms) in [
        ("connect_timeout_ms", svc.connect_timeout_ms),
        ("read_timeout_ms", svc.read_timeout_ms),
        ("eject_ms", svc.eject_ms),
        ("queue_timeout_ms", svc.queue_timeout_ms),
    ] {
        if ms == 0 || ms > TIMEOUT_MS_MAX {
            return Err(out_of_range(name, field, ms, "1..=3600000"));
        }
    }
    if svc.retries > RETRIES_MAX {
        return Err(out_of_range(name, "retries", svc.retries, "0..=10"));
    }
    if svc.max_inflight > MAX_INFLIGHT_MAX {
        return Err(out_of_range(
            name,
            "max_inflight",
            svc.max_inflight,
            "0..=1000000",
        ));
    }
    let class_header = match &svc.class_header {
        None => None,
        Some(h) => {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if h.is_empty() || h.len() > MAX_CLASS_HEADER_LEN || !h.bytes().all(token) {
                return Err(TableError::PolicyOutOfRange {
                    service: name.clone(),
                    field: "class_header",
                    value: format!("{h:?}"),
                    range: "a header name of 1 to 64 token characters",
                });
            }
            Some(h.to_ascii_lowercase())
        }
    };

    let hsts = svc.hsts.as_ref().map(|h| hsts_value(name, h)).transpose()?;
    let upstream_tls = svc
        .upstream_tls
        .as_ref()
        .map(|t| check_upstream_tls(name, t))
        .transpose()?;
    let upstream_protocol = svc.upstream_protocol;
    let protocol_error = match (upstream_protocol, upstream_tls.is_some()) {
        (crate::UpstreamProtocol::H2, false) => Some("h2 is HTTP/2 over TLS: set upstream_tls too"),
        (crate::UpstreamProtocol::H2c, true) => {
            Some("h2c is plain HTTP/2: with upstream_tls use h2")
        }
        _ => None,
    };
    if let Some(reason) = protocol_error {
        return Err(TableError::BadTls {
            service: name.clone(),
            field: "upstream_protocol",
            reason: reason.to_owned(),
        });
    }

    let mut ids = HashSet::new();
    let mut backends = Vec::with_capacity(svc.backends.len());
    for b in &svc.backends {
        check_name(&b.id).map_err(|reason| TableError::BadBackendId {
            service: name.clone(),
            id: b.id.clone(),
            reason,
        })?;
        if !ids.insert(b.id.as_str()) {
            return Err(TableError::DuplicateBackend {
                service: name.clone(),
                id: b.id.clone(),
            });
        }
        let addr: SocketAddr = b.addr.parse().map_err(|_| TableError::BadAddress {
            service: name.clone(),
            id: b.id.clone(),
            addr: b.addr.clone(),
        })?;
        if !(WEIGHT_MIN..=WEIGHT_MAX).contains(&b.weight) {
            return Err(TableError::WeightOutOfRange {
                service: name.clone(),
                id: b.id.clone(),
                weight: b.weight,
            });
        }
        if b.priority > PRIORITY_MAX {
            return Err(TableError::PriorityOutOfRange {
                service: name.clone(),
                id: b.id.clone(),
                priority: b.priority,
            });
        }
        backends.push(crate::ValidBackend {
            id: b.id.clone(),
            addr,
            weight: b.weight,
            priority: b.priority,
        });
    }

    let tiers = build_tiers(name, &backends, svc.schedule.as_deref())?;
    Ok(ValidService {
        name: name.clone(),
        hosts,
        path_prefix: svc.path_prefix.clone(),
        backends,
        tiers,
        overprovisioning_pct: (ov * 100.0).round() as u32,
        connect_timeout: Duration::from_millis(svc.connect_timeout_ms),
        read_timeout: Duration::from_millis(svc.read_timeout_ms),
        retries: svc.retries,
        eject_for: Duration::from_millis(svc.eject_ms),
        class: svc.class,
        class_header,
        max_inflight: svc.max_inflight,
        queue_timeout: Duration::from_millis(svc.queue_timeout_ms),
        https_redirect: svc.https_redirect,
        hsts,
        upstream_tls,
        upstream_protocol,
    })
}

/// The header value of an HSTS policy; `preload` only with what the preload list requires.
fn hsts_value(service: &str, h: &crate::table::Hsts) -> Result<String, TableError> {
    if h.max_age_s > HSTS_MAX_AGE_MAX {
        return Err(out_of_range(
            service,
            "hsts.max_age_s",
            h.max_age_s,
            "0..=63072000",
        ));
    }
    if h.preload && !(h.include_subdomains && h.max_age_s >= HSTS_PRELOAD_MIN) {
        return Err(TableError::BadTls {
            service: service.to_owned(),
            field: "hsts.preload",
            reason: "preload needs include_subdomains and a max_age_s of at least 31536000".into(),
        });
    }
    let mut v = format!("max-age={}", h.max_age_s);
    if h.include_subdomains {
        v.push_str("; includeSubDomains");
    }
    if h.preload {
        v.push_str("; preload");
    }
    Ok(v)
}

fn check_upstream_tls(
    service: &str,
    t: &crate::table::UpstreamTls,
) -> Result<ValidUpstreamTls, TableError> {
    let bad = |field, reason: &str| TableError::BadTls {
        service: service.to_owned(),
        field,
        reason: reason.to_owned(),
    };
    let server_name = match &t.server_name {
        None => None,
        Some(n) => {
            let name = n.to_ascii_lowercase();
            let ip = name.parse::<std::net::IpAddr>().is_ok();
            let dns = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !ip && !dns {
                return Err(bad(
                    "upstream_tls.server_name",
                    "not a DNS name or an IP address",
                ));
            }
            Some(name)
        }
    };
    let ca = match (&t.ca_pem, &t.ca_file) {
        (Some(_), Some(_)) => return Err(bad("upstream_tls", "give ca_pem or ca_file, not both")),
        (Some(pem), None) => {
            if pem.len() > MAX_CA_PEM_BYTES {
                return Err(bad("upstream_tls.ca_pem", "over 65536 bytes"));
            }
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(bad("upstream_tls.ca_pem", "holds no PEM certificate"));
            }
            CaSource::Pem(pem.clone())
        }
        (None, Some(path)) => {
            if !path.starts_with('/') {
                return Err(bad("upstream_tls.ca_file", "not an absolute path"));
            }
            CaSource::File(path.clone())
        }
        (None, None) => CaSource::System,
    };
    Ok(ValidUpstreamTls { server_name, ca })
}

fn out_of_range(
    service: &str,
    field: &'static str,
    value: impl ToString,
    range: &'static str,
) -> TableError {
    TableError::PolicyOutOfRange {
        service: service.to_owned(),
        field,
        value: value.to_string(),
        range,
    }
}

/// Group backends into tiers and attach each tier's cycle: the one the table carries, after
/// checking it, or the one [`smooth_weighted`] computes.
fn build_tiers(
    service: &str,
    backends: &[ValidBackend],
    given: Option<&[Vec<u32>]>,
) -> Result<Vec<ValidTier>, TableError> {
    let mut priorities: Vec<u32> = backends.iter().map(|b| b.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let bad = |reason: String| TableError::BadSchedule {
        service: service.to_owned(),
        reason,
    };
    if let Some(given) = given {
        if given.len() != priorities.len() {
            return Err(bad(format!(
                "it has {} tiers but the backends have {} priorities",
                given.len(),
                priorities.len()
            )));
        }
    }
    let mut tiers = Vec::with_capacity(priorities.len());
    for (t, &priority) in priorities.iter().enumerate() {
        let members: Vec<u32> = (0..backends.len() as u32)
            .filter(|&i| backends[i as usize].priority == priority)
            .collect();
        let weights: Vec<u32> = members
            .iter()
            .map(|&i| backends[i as usize].weight)
            .collect();
        let (len, groups) = schedule_cost(&weights);
        if len > MAX_SCHEDULE_LEN || len * groups > MAX_SCHEDULE_WORK {
            return Err(TableError::ScheduleTooLong {
                service: service.to_owned(),
                priority,
                len,
                weights: groups,
                max_len: MAX_SCHEDULE_LEN,
                max_work: MAX_SCHEDULE_WORK,
            });
        }
        let schedule = match given {
            Some(given) => {
                check_given_schedule(&given[t], priority, backends, &members, &weights)
                    .map_err(bad)?;
                given[t].clone()
            }
            None => smooth_weighted(&weights)
                .into_iter()
                .map(|k| members[k as usize])
                .collect(),
        };
        tiers.push(ValidTier {
            priority,
            total_weight: weights.iter().map(|&w| u64::from(w)).sum(),
            members,
            schedule,
        });
    }
    Ok(tiers)
}

/// A schedule from the table must be a cycle of this tier's backends, each appearing exactly its
/// reduced weight times. The order is the sender's business (it used the same function).
fn check_given_schedule(
    seq: &[u32],
    priority: u32,
    backends: &[ValidBackend],
    members: &[u32],
    weights: &[u32],
) -> Result<(), String> {
    let mut count = vec![0u32; backends.len()];
    for &i in seq {
        let Some(b) = backends.get(i as usize) else {
            return Err(format!(
                "tier {priority}: index {i} is out of range (the service has {} backends)",
                backends.len()
            ));
        };
        if b.priority != priority {
            return Err(format!(
                "tier {priority}: index {i} is backend {:?} of priority {}",
                b.id, b.priority
            ));
        }
        count[i as usize] += 1;
    }
    for (&m, want) in members.iter().zip(reduce_weights(weights)) {
        if count[m as usize] != want {
            return Err(format!(
                "tier {priority}: backend {:?} appears {} times, its weight needs {want}",
                backends[m as usize].id, count[m as usize]
            ));
        }
    }
    Ok(())
}

fn parse_host(host: &str) -> Result<HostPattern, &'static str> {
    if host.is_empty() {
        return Err("it is empty");
    }
    if host.len() > MAX_HOST_LEN {
        return Err("it is longer than 253 bytes");
    }
    let lower = host.to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    if name.starts_with('[') {
        // An IPv6 literal as clients send it in Host: [::1]
        let ok = wild
            || name.ends_with(']')
                && name[1..name.len() - 1]
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok();
        return if ok && !wild {
            Ok(HostPattern::Exact(lower))
        } else {
            Err("an IPv6 host must be a bracketed address such as [::1]")
        };
    }
    if name.is_empty() || name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err("labels must not be empty");
    }
    if name.contains(':') {
        return Err("hosts match without a port; drop the :port");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err("only letters, digits, - _ . and a leading *. are allowed");
    }
    Ok(if wild {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(lower)
    })
}

fn check_path_prefix(prefix: &str) -> Result<(), &'static str> {
    if !prefix.starts_with('/') {
        return Err("it must start with /");
    }
    if prefix.len() > MAX_PATH_PREFIX_LEN {
        return Err("it is longer than 1024 bytes");
    }
    if prefix
        .bytes()
        .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
    {
        return Err("it must not contain spaces, control bytes, ? or #");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Backend;

    const EXAMPLE: &str = r#"{"version": 7,
     "services": [
       {"name": "web", "hosts": ["localhost", "*.example.com"], "path_prefix": "/",
        "backends": [
          {"id": "web-a", "addr": "127.0.0.1:9001", "weight": 5, "priority": 0},
          {"id": "web-b", "addr": "127.0.0.1:9002", "weight": 3, "priority": 0},
          {"id": "web-c", "addr": "127.0.0.1:9003", "weight": 1, "priority": 0},
          {"id": "web-spare", "addr": "127.0.0.1:9004", "weight": 1, "priority": 1}]}]}"#;

    fn example() -> Table {
        decode(EXAMPLE.as_bytes()).expect("the issue's example decodes")
    }

    fn rejected(t: Table) -> String {
        validate(t)
            .expect_err("table should be rejected")
            .to_string()
    }

    #[test]
    fn the_example_table_is_valid_with_defaults() {
        let v = validate(example()).unwrap();
        let s = &v.services[0];
        assert_eq!(v.backend_count, 4);
        assert_eq!(
            s.hosts,
            vec![
                HostPattern::Exact("localhost".into()),
                HostPattern::Suffix(".example.com".into())
            ]
        );
        assert_eq!(s.tiers.len(), 2);
        assert_eq!(s.tiers[0].schedule, vec![0, 1, 0, 2, 0, 1, 0, 1, 0]);
        assert_eq!(s.tiers[1].schedule, vec![3]);
        assert_eq!(s.overprovisioning_pct, 140);
        assert_eq!(s.connect_timeout, Duration::from_secs(1));
        assert_eq!(s.retries, 2);
    }

    #[test]
    fn malformed_json_is_rejected() {
        let e = decode(b"{\"version\": 1, \"services\": [").unwrap_err();
        assert!(matches!(e, TableError::Malformed(_)), "{e}");
    }

    #[test]
    fn unknown_fields_are_rejected_and_named() {
        let text = EXAMPLE.replace("\"priority\": 1}", "\"priority\": 1, \"colour\": \"red\"}");
        let e = decode(text.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = decode(br#"{"version": 1, "extra": true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn hsts_renders_once_and_preload_needs_what_the_list_requires() {
        let with = |max_age_s, include_subdomains, preload| {
            let mut t = example();
            t.services[0].hsts = Some(crate::table::Hsts {
                max_age_s,
                include_subdomains,
                preload,
            });
            validate(t).map(|v| v.services[0].hsts.clone())
        };
        assert_eq!(
            with(300, false, false).unwrap().as_deref(),
            Some("max-age=300")
        );
        assert_eq!(
            with(31_536_000, true, true).unwrap().as_deref(),
            Some("max-age=31536000; includeSubDomains; preload")
        );
        let e = with(300, true, true).unwrap_err().to_string();
        assert!(e.contains("hsts.preload is invalid"), "{e}");
        let e = with(HSTS_MAX_AGE_MAX + 1, false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hsts.max_age_s = 63072001 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn h2_to_backends_needs_upstream_tls_and_h2c_refuses_it() {
        use crate::UpstreamProtocol::{H2c, Http1, H2};
        let with = |protocol, tls: bool| {
            let mut t = example();
            t.services[0].upstream_protocol = protocol;
            t.services[0].upstream_tls = tls.then(crate::table::UpstreamTls::default);
            validate(t).map(|v| v.services[0].upstream_protocol)
        };
        assert_eq!(with(H2, true).unwrap(), H2);
        assert_eq!(with(H2c, false).unwrap(), H2c);
        assert_eq!(with(Http1, true).unwrap(), Http1);
        for (protocol, tls, says) in [(H2, false, "set upstream_tls"), (H2c, true, "use h2")] {
            let e = with(protocol, tls).unwrap_err().to_string();
            assert!(e.contains("upstream_protocol") && e.contains(says), "{e}");
        }
        let json = r#"{"version": 1, "services": [{"name": "g", "upstream_protocol": "h3"}]}"#;
        let e = serde_json::from_str::<Table>(json).unwrap_err().to_string();
        assert!(e.contains("h3"), "{e}");
    }

    #[test]
    fn upstream_tls_names_one_ca_source_and_a_valid_name() {
        let with = |tls: crate::table::UpstreamTls| {
            let mut t = example();
            t.services[0].upstream_tls = Some(tls);
            validate(t).map(|v| v.services[0].upstream_tls.clone())
        };
        let pem = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".to_owned();
        let ok = with(crate::table::UpstreamTls {
            server_name: Some("API.internal".into()),
            ca_pem: Some(pem.clone()),
            ca_file: None,
        })
        .unwrap()
        .unwrap();
        assert_eq!(ok.server_name.as_deref(), Some("api.internal"));
        assert_eq!(ok.ca, CaSource::Pem(pem.clone()));
        let system = with(crate::table::UpstreamTls::default()).unwrap().unwrap();
        assert_eq!(system.ca, CaSource::System);
        for (tls, says) in [
            (
                crate::table::UpstreamTls {
                    ca_pem: Some(pem.clone()),
                    ca_file: Some("/ca.pem".into()),
                    ..Default::default()
                },
                "not both",
            ),
            (
                crate::table::UpstreamTls {
                    ca_file: Some("ca.pem".into()),
                    ..Default::default()
                },
                "not an absolute path",
            ),
            (
                crate::table::UpstreamTls {
                    server_name: Some("a..b".into()),
                    ..Default::default()
                },
                "not a DNS name",
            ),
            (
                crate::table::UpstreamTls {
                    ca_pem: Some("x".repeat(MAX_CA_PEM_BYTES + 1)),
                    ..Default::default()
                },
                "over 65536 bytes",
            ),
        ] {
            let e = with(tls).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn oversized_documents_are_refused_before_parsing() {
        let big = vec![b' '; MAX_TABLE_BYTES + 1];
        assert!(matches!(decode(&big), Err(TableError::TooLarge { .. })));
    }

    #[test]
    fn unsupported_schema_is_rejected() {
        let mut t = example();
        t.schema = 2;
        assert!(rejected(t).contains("schema 2"));
    }

    #[test]
    fn stale_versions_are_told_apart_from_errors() {
        let v = validate(example()).unwrap();
        let e = check_succession(Some((7, 4)), &v).unwrap_err();
        assert!(e.is_stale(), "{e}");
        assert!(check_succession(Some((8, 4)), &v).unwrap_err().is_stale());
        assert!(check_succession(Some((6, 4)), &v).is_ok());
        assert!(check_succession(None, &v).is_ok());
    }

    #[test]
    fn repeated_service_names_are_rejected() {
        let mut t = example();
        let mut again = t.services[0].clone();
        again.path_prefix = "/other".into();
        t.services.push(again);
        assert_eq!(rejected(t), "service \"web\" appears more than once");
    }

    #[test]
    fn repeated_backend_ids_are_rejected() {
        let mut t = example();
        t.services[0].backends[1].id = "web-a".into();
        assert!(rejected(t).contains("backend id \"web-a\" appears more than once"));
    }

    #[test]
    fn unparsable_addresses_are_rejected_with_the_backend_named() {
        for addr in ["localhost:80", "127.0.0.1", "127.0.0.1:99999", ""] {
            let mut t = example();
            t.services[0].backends[2].addr = addr.into();
            let e = rejected(t);
            assert!(
                e.contains("backend \"web-c\"") && e.contains("ip:port"),
                "{e}"
            );
        }
    }

    #[test]
    fn weights_outside_1_to_1000_are_rejected() {
        for w in [0, 1001] {
            let mut t = example();
            t.services[0].backends[0].weight = w;
            assert!(rejected(t).contains(&format!("weight {w} is out of range")));
        }
    }

    #[test]
    fn priorities_over_127_are_rejected() {
        let mut t = example();
        t.services[0].backends[3].priority = 128;
        assert!(rejected(t).contains("priority 128 is out of range"));
    }

    #[test]
    fn schedule_indices_out_of_range_are_rejected() {
        let mut t = example();
        t.services[0].schedule = Some(vec![vec![0, 1, 0, 2, 0, 1, 0, 1, 9], vec![3]]);
        assert!(rejected(t).contains("index 9 is out of range"));
    }

    #[test]
    fn schedules_that_do_not_match_the_weights_are_rejected() {
        let mut t = example();
        t.services[0].schedule = Some(vec![vec![0, 1, 2], vec![3]]);
        let e = rejected(t);
        assert!(
            e.contains("\"web-a\" appears 1 times, its weight needs 5"),
            "{e}"
        );

        let mut t = example();
        t.services[0].schedule = Some(vec![vec![0, 1, 0, 2, 0, 1, 0, 1, 3], vec![3]]);
        assert!(rejected(t).contains("backend \"web-spare\" of priority 1"));

        let mut t = example();
        t.services[0].schedule = Some(vec![vec![0, 1, 0, 2, 0, 1, 0, 1, 0]]);
        assert!(rejected(t).contains("1 tiers but the backends have 2 priorities"));
    }

    #[test]
    fn a_correct_precomputed_schedule_is_kept_as_given() {
        let mut t = example();
        let given = vec![vec![0, 0, 0, 0, 0, 1, 1, 1, 2], vec![3]];
        t.services[0].schedule = Some(given.clone());
        let v = validate(t).unwrap();
        assert_eq!(v.services[0].tiers[0].schedule, given[0]);
    }

    #[test]
    fn too_many_backends_are_rejected() {
        let backends = (0..MAX_BACKENDS + 1)
            .map(|i| Backend::new(format!("b{i}"), "127.0.0.1:1", 1, 0))
            .collect();
        let t = Table::new(1, vec![Service::new("big", backends)]);
        let want = format!(
            "{} backends, over the limit of {MAX_BACKENDS}",
            MAX_BACKENDS + 1
        );
        assert!(rejected(t).contains(&want));
    }

    #[test]
    fn schedules_too_long_to_build_are_rejected() {
        // Coprime weights defeat the gcd reduction: 2,000 backends x ~1,000 = 2M entries.
        let backends = (0..2000u32)
            .map(|i| Backend::new(format!("b{i}"), "127.0.0.1:1", 999 + i % 2, 0))
            .collect();
        let t = Table::new(1, vec![Service::new("huge", backends)]);
        assert!(rejected(t).contains("tier 0: schedule would have"));
    }

    #[test]
    fn schedules_of_too_many_distinct_weights_are_rejected_for_their_work() {
        // Weights 1..=1000: 500,500 entries (under the length limit) over 1,000 groups.
        let distinct = (1..=1000u32)
            .map(|w| Backend::new(format!("b{w}"), "127.0.0.1:1", w, 0))
            .collect();
        let t = Table::new(1, vec![Service::new("many", distinct)]);
        assert!(rejected(t).contains("500500 entries over 1000 distinct weights, over the limit"));
        // Nearly as long but two weights: cheap to build, so accepted.
        let two = (0..1000u32)
            .map(|i| Backend::new(format!("b{i}"), "127.0.0.1:1", 999 + i % 2, 0))
            .collect();
        let v = validate(Table::new(1, vec![Service::new("two", two)])).unwrap();
        assert_eq!(v.services[0].tiers[0].schedule.len(), 999_500);
    }

    #[test]
    fn a_table_that_empties_a_serving_plane_needs_allow_empty() {
        let mut t = Table::new(9, vec![Service::new("web", vec![])]);
        let v = validate(t.clone()).unwrap();
        let e = check_succession(Some((7, 4)), &v).unwrap_err().to_string();
        assert!(e.contains("allow_empty"), "{e}");
        t.allow_empty = true;
        let v = validate(t).unwrap();
        assert!(check_succession(Some((7, 4)), &v).is_ok());
        // An empty table over an empty table is no loss.
        let v = validate(Table::new(9, vec![])).unwrap();
        assert!(check_succession(Some((7, 0)), &v).is_ok());
    }

    #[test]
    fn bad_hosts_and_prefixes_are_rejected() {
        for (host, why) in [
            ("", "empty"),
            ("a..b", "labels"),
            ("example.com:8080", "port"),
            ("ex ample.com", "only letters"),
            ("[::1", "IPv6"),
        ] {
            let mut t = example();
            t.services[0].hosts = vec![host.into()];
            let e = rejected(t);
            assert!(e.contains("host") && e.contains(why), "{host:?}: {e}");
        }
        for prefix in ["api", "/a b", "/a?b"] {
            let mut t = example();
            t.services[0].path_prefix = prefix.into();
            assert!(rejected(t).contains("path_prefix"));
        }
    }

    #[test]
    fn hosts_are_lowercased_and_ipv6_literals_accepted() {
        let mut t = example();
        t.services[0].hosts = vec!["API.Example.COM".into(), "[::1]".into()];
        let v = validate(t).unwrap();
        assert_eq!(
            v.services[0].hosts,
            vec![
                HostPattern::Exact("api.example.com".into()),
                HostPattern::Exact("[::1]".into())
            ]
        );
    }

    #[test]
    fn two_services_with_the_same_host_and_prefix_are_rejected() {
        let mut t = example();
        let mut other = Service::new("api", vec![]);
        other.hosts = vec!["LOCALHOST".into()];
        t.services.push(other);
        let e = rejected(t);
        assert!(
            e.contains("\"web\" and \"api\" both claim host \"localhost\""),
            "{e}"
        );
    }

    #[test]
    fn policy_fields_out_of_range_are_rejected_and_named() {
        let mut t = example();
        t.services[0].overprovisioning = 0.5;
        assert!(rejected(t).contains("overprovisioning = 0.5"));
        let mut t = example();
        t.services[0].connect_timeout_ms = 0;
        assert!(rejected(t).contains("connect_timeout_ms = 0"));
        let mut t = example();
        t.services[0].retries = 11;
        assert!(rejected(t).contains("retries = 11"));
    }

    #[test]
    fn bad_names_are_rejected() {
        let mut t = example();
        t.services[0].name = "web app".into();
        assert!(rejected(t).contains("service name \"web app\" is invalid"));
        let mut t = example();
        t.services[0].backends[0].id = String::new();
        assert!(rejected(t).contains("backend id \"\" is invalid"));
    }

    #[test]
    fn a_table_round_trips_through_json() {
        let t = example();
        let again = decode(t.to_json().as_bytes()).unwrap();
        assert_eq!(t, again);
    }

    #[test]
    fn acme_challenges_must_be_token_dot_thumbprint_in_base64url() {
        let with = |token: &str, key_auth: &str| {
            let mut t = example();
            t.acme_challenges
                .insert(token.to_owned(), key_auth.to_owned());
            validate(t).map(|_| ()).map_err(|e| e.to_string())
        };
        with("evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA", "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI")
            .expect("RFC 8555's example");
        let e = with("a/../b", "a/../b.x").unwrap_err();
        assert!(e.contains("token \"a/../b\" is invalid"), "{e}");
        let e = with("tok", "other.x").unwrap_err();
        assert!(e.contains("the token, a dot and the thumbprint"), "{e}");
        let e = with("tok", "tok.a<script>").unwrap_err();
        assert!(e.contains("thumbprint"), "{e}");
        let e = with("tok", &format!("tok.{}", "a".repeat(300))).unwrap_err();
        assert!(e.contains("thumbprint"), "{e}");
        let mut t = example();
        for i in 0..=MAX_ACME_CHALLENGES {
            t.acme_challenges.insert(format!("t{i}"), format!("t{i}.x"));
        }
        let e = validate(t).unwrap_err().to_string();
        assert!(e.contains("acme_challenges"), "{e}");
    }
}
