//! The installed table, in the shape the request paths read it: the router, each service's
//! balancer, a ready-made upstream peer per backend, the metric handles and the slots of capped
//! addresses. Built once per table by the store, immutable apart from atomics, swapped in whole.
//! A new table takes over the ejections of the backends it lists unchanged (same service, id
//! and address), so frequent tables do not forgive a backend that keeps failing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use pingora::protocols::l4::ext::TcpKeepalive;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::{HttpPeer, HttpUpstreamRequestPolicy};
use rusty_shared::{CaSource, RequestClass, Table, TableError, ValidTable};

use crate::admission::Limiter;
use crate::metrics::{BackendCounters, Registry, ServiceCounters};
use crate::router::Router;
use crate::select::Balancer;

/// How long an idle pooled upstream connection is kept (nginx's upstream keepalive_timeout).
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// TCP keepalive on every upstream connection, both request paths: an idle pooled connection
/// whose backend vanished without a reset (a partition, a host gone) is found dead within
/// 15 s + 3 × 5 s, before its 60 s idle time runs out and before a request is sent on it; and
/// a request whose bytes are not acknowledged for 15 s (a blackholed backend) fails its
/// connection then instead of waiting out a long read timeout. nginx (`proxy_socket_keepalive`)
/// and Envoy (`upstream_connection_options.tcp_keepalive`) leave it off by default, so there a
/// partition costs the whole read timeout.
pub const UPSTREAM_KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
pub const UPSTREAM_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const UPSTREAM_KEEPALIVE_PROBES: u32 = 3;
pub const UPSTREAM_USER_TIMEOUT: Duration = Duration::from_secs(15);

/// Streams at once on one HTTP/2 connection to a backend (its own `SETTINGS` may lower it);
/// more requests open another connection. 100 is nginx's and Envoy's usual server default.
const UPSTREAM_H2_STREAMS: usize = 100;

/// Mixed into an HTTP/2 backend's pool key (see its use).
const H2_POOL_KEY: u64 = 0x6832_6832_6832_6832;

pub struct Snapshot {
    pub version: u64,
    /// The table as received, for `GET /table` and the state dir.
    pub table: Table,
    pub backend_count: usize,
    pub router: Router,
    pub services: Box<[Service]>,
    /// Counters for requests no service matched.
    pub unrouted: Arc<BackendCounters>,
    /// When it was installed (`clock::now_ms`), for its age on the status page.
    pub installed_ms: u64,
}

/// One service of the installed table.
pub struct Service {
    pub name: Arc<str>,
    pub backends: Box<[Backend]>,
    pub balancer: Balancer,
    pub retries: u32,
    pub counters: Arc<ServiceCounters>,
    /// Requests of this service answered without a backend (none available).
    pub no_backend: Arc<BackendCounters>,
    pub class: RequestClass,
    pub class_header: Option<HeaderName>,
    /// Some backend has a concurrency limit: picks must take a slot.
    pub limited: bool,
    pub queue_timeout: Duration,
    /// Plain-HTTP requests get a redirect to HTTPS.
    pub https_redirect: bool,
    /// The `Strict-Transport-Security` value set on its HTTPS responses.
    pub hsts: Option<Arc<str>>,
    /// Its backends are reached over TLS (by the pipeline only).
    pub upstream_tls: bool,
    /// Its backends speak HTTP/2 (`h2c` or `h2`; by the pipeline only): requests are streams
    /// of a shared connection, which no request may shut down.
    pub upstream_h2: bool,
}

/// One backend of a service.
pub struct Backend {
    pub id: Arc<str>,
    pub addr: SocketAddr,
    pub peer: HttpPeer,
    pub counters: Arc<BackendCounters>,
    /// The slots of this backend's address, when some service caps it.
    pub limiter: Option<Arc<Limiter>>,
}

impl Service {
    /// Whether the fast lane may take this service's plain requests (`tls`: the request came
    /// over TLS). With no backend there is nothing to attempt; with capped ones, admission
    /// decides; TLS or HTTP/2 to the backends and the redirect to HTTPS are the pipeline's.
    pub fn lane_serves(&self, tls: bool) -> bool {
        !(self.limited
            || self.backends.is_empty()
            || self.upstream_tls
            || self.upstream_h2
            || (self.https_redirect && !tls))
    }

    /// The backend for the next attempt (see [`Balancer::pick`]).
    pub fn pick(&self, tried: &[u32], now: u64) -> Option<u32> {
        self.balancer.pick(tried, now)
    }
}

/// Largest CA file read for `upstream_tls.ca_file`.
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// The CA certificates a service's backends are verified against.
#[derive(Clone)]
pub struct UpstreamCa {
    pub certs: Arc<CaType>,
    /// A digest of the certificates: pooled connections verified against one CA are never
    /// reused for a table that names another (Pingora's pool key does not see the CA).
    pub pool_key: u64,
}

/// The CA certificates each service's backends are verified against, parsed once per table:
/// `None` for plain backends and for the system's roots. A CA that does not parse, or a file
/// that cannot be read, rejects the table with the service and field named.
pub fn upstream_cas(valid: &ValidTable) -> Result<Vec<Option<UpstreamCa>>, TableError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    valid
        .services
        .iter()
        .map(|s| {
            let Some(tls) = &s.upstream_tls else {
                return Ok(None);
            };
            let bad = |field, reason: String| TableError::BadTls {
                service: s.name.clone(),
                field,
                reason,
            };
            let (field, pem) = match &tls.ca {
                CaSource::System => return Ok(None),
                CaSource::Pem(pem) => ("upstream_tls.ca_pem", pem.as_bytes().to_vec()),
                CaSource::File(path) => {
                    use std::io::Read;
                    let mut bytes = Vec::new();
                    std::fs::File::open(path)
                        .and_then(|f| f.take(MAX_CA_FILE_BYTES).read_to_end(&mut bytes))
                        .map_err(|e| bad("upstream_tls.ca_file", format!("{path}: {e}")))?;
                    ("upstream_tls.ca_file", bytes)
                }
            };
            let mut cas = Vec::new();
            let mut digest = std::hash::DefaultHasher::new();
            for der in CertificateDer::pem_slice_iter(&pem) {
                let der = der.map_err(|e| bad(field, e.to_string()))?;
                // Pingora's wrapper panics on a certificate it cannot parse: check first.
                x509_parser::parse_x509_certificate(&der)
                    .map_err(|e| bad(field, format!("a certificate does not parse: {e}")))?;
                std::hash::Hash::hash(der.as_ref(), &mut digest);
                cas.push(pingora::utils::tls::WrappedX509::new(
                    der.to_vec(),
                    pingora::utils::tls::parse_x509,
                ));
            }
            if cas.is_empty() {
                return Err(bad(field, "no PEM certificate in it".to_owned()));
            }
            Ok(Some(UpstreamCa {
                certs: Arc::from(cas.into_boxed_slice()),
                pool_key: std::hash::Hasher::finish(&digest) | 1,
            }))
        })
        .collect()
}

/// The concurrency cap of every capped address in `valid`: the smallest of the services that
/// list it.
pub fn caps(valid: &ValidTable) -> HashMap<SocketAddr, u32> {
    let mut caps: HashMap<SocketAddr, u32> = HashMap::new();
    for s in valid.services.iter().filter(|s| s.max_inflight > 0) {
        for b in &s.backends {
            let cap = caps.entry(b.addr).or_insert(s.max_inflight);
            *cap = (*cap).min(s.max_inflight);
        }
    }
    caps
}

impl Snapshot {
    /// Build the snapshot of `valid` that replaces `previous`, keeping its ejections where
    /// they apply. `limiters` holds the slots of every address in [`caps`], `cas` the CAs of
    /// [`upstream_cas`]; `now` is the balancers' clock reading.
    pub fn build(
        valid: ValidTable,
        registry: &Registry,
        limiters: &HashMap<SocketAddr, Arc<Limiter>>,
        cas: &[Option<UpstreamCa>],
        previous: Option<&Snapshot>,
        now: u64,
    ) -> Snapshot {
        let keep: Vec<(&str, Vec<&str>)> = valid
            .services
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.backends.iter().map(|b| b.id.as_str()).collect(),
                )
            })
            .collect();
        let handles = registry.handles_for(&keep);
        let router = Router::new(&valid.services);
        let previous_services: HashMap<&str, &Service> = previous
            .map(|p| p.services.iter().map(|o| (&*o.name, o)).collect())
            .unwrap_or_default();
        let services = valid
            .services
            .iter()
            .zip(handles)
            .enumerate()
            .map(|(si, (s, h))| {
                // Matched by name and id through maps: 10,000 backends are matched in a
                // millisecond, where a scan per backend took 10,000 × 10,000 comparisons.
                let before = previous_services.get(s.name.as_str()).copied();
                let before_ids: HashMap<&str, u32> = before.map_or_else(HashMap::new, |o| {
                    (0..)
                        .zip(o.backends.iter())
                        .map(|(i, b)| (&*b.id, i))
                        .collect()
                });
                let ejected_until = |id: &str, addr: SocketAddr| {
                    before
                        .zip(before_ids.get(id))
                        .and_then(|(o, &i)| {
                            (o.backends[i as usize].addr == addr)
                                .then(|| o.balancer.ejected_until(i))
                        })
                        .unwrap_or(0)
                };
                let backends: Box<[Backend]> = s
                    .backends
                    .iter()
                    .zip(h.backends)
                    .map(|(b, counters)| {
                        let mut peer = match &s.upstream_tls {
                            None => HttpPeer::new(b.addr, false, String::new()),
                            // Without a name the address is verified (an IP SAN); rustls then
                            // sends no SNI, as none may name an address.
                            Some(tls) => {
                                let name = tls
                                    .server_name
                                    .clone()
                                    .unwrap_or_else(|| b.addr.ip().to_string());
                                let mut peer = HttpPeer::new(b.addr, true, name);
                                if let Some(ca) = cas.get(si).cloned().flatten() {
                                    peer.options.ca = Some(ca.certs);
                                    peer.group_key = ca.pool_key;
                                }
                                peer.options.verify_cert = true;
                                peer.options.verify_hostname = true;
                                peer
                            }
                        };
                        peer.options.connection_timeout = Some(s.connect_timeout);
                        peer.options.total_connection_timeout = Some(s.connect_timeout);
                        peer.options.read_timeout = Some(s.read_timeout);
                        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
                        peer.options.tcp_keepalive = Some(TcpKeepalive {
                            idle: UPSTREAM_KEEPALIVE_IDLE,
                            interval: UPSTREAM_KEEPALIVE_INTERVAL,
                            count: UPSTREAM_KEEPALIVE_PROBES as usize,
                            user_timeout: UPSTREAM_USER_TIMEOUT,
                        });
                        // The editor decides which headers go upstream, on every path.
                        peer.options.http_upstream_request_policy =
                            HttpUpstreamRequestPolicy::preserve();
                        if s.upstream_protocol.is_h2() {
                            // HTTP/2 only: over TLS by ALPN, plain with prior knowledge.
                            peer.options.set_http_version(2, 2);
                            peer.options.max_h2_streams = UPSTREAM_H2_STREAMS;
                            // Pingora's pool key does not see the protocol: an address that is
                            // HTTP/1 in one service and HTTP/2 in another keeps two pools.
                            peer.group_key ^= H2_POOL_KEY;
                        }
                        Backend {
                            id: b.id.as_str().into(),
                            addr: b.addr,
                            peer,
                            counters,
                            limiter: limiters.get(&b.addr).cloned(),
                        }
                    })
                    .collect();
                let balancer = Balancer::new(
                    &s.tiers,
                    s.backends.iter().map(|b| b.weight).collect(),
                    s.backends.iter().map(|b| ejected_until(&b.id, b.addr)),
                    s.overprovisioning_pct,
                    s.eject_for.as_millis() as u64,
                    now,
                );
                let limited = backends.iter().any(|b| b.limiter.is_some());
                Service {
                    name: s.name.as_str().into(),
                    backends,
                    balancer,
                    retries: s.retries,
                    counters: h.service,
                    no_backend: h.no_backend,
                    class: s.class,
                    // Validated as a token, so it always parses.
                    class_header: s
                        .class_header
                        .as_deref()
                        .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                    limited,
                    queue_timeout: s.queue_timeout,
                    https_redirect: s.https_redirect,
                    hsts: s.hsts.as_deref().map(Arc::from),
                    upstream_tls: s.upstream_tls.is_some(),
                    upstream_h2: s.upstream_protocol.is_h2(),
                }
            })
            .collect();
        Snapshot {
            version: valid.table.version,
            table: valid.table,
            backend_count: valid.backend_count,
            router,
            services,
            unrouted: registry.unrouted(),
            installed_ms: now,
        }
    }

    /// A snapshot of `valid` with no table before it and no capped address: for tests and
    /// benchmarks.
    pub fn fresh(valid: ValidTable, registry: &Registry) -> Snapshot {
        let cas = upstream_cas(&valid).expect("the CAs of a test table load");
        Snapshot::build(valid, registry, &HashMap::new(), &cas, None, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusty_shared::{validate, Backend as WireBackend, Service as WireService};

    const NOW: u64 = 1_000;

    fn table(version: u64, b_addr: &str) -> ValidTable {
        let backends = vec![
            WireBackend::new("a", "127.0.0.1:9000", 1, 0),
            WireBackend::new("b", b_addr, 1, 0),
            WireBackend::new("c", "127.0.0.1:9002", 1, 0),
        ];
        validate(Table::new(version, vec![WireService::new("web", backends)])).unwrap()
    }

    fn build(valid: ValidTable, registry: &Registry, previous: Option<&Snapshot>) -> Snapshot {
        Snapshot::build(valid, registry, &HashMap::new(), &[], previous, NOW)
    }

    fn counts(s: &Service, n: usize) -> Vec<u32> {
        let mut c = vec![0; s.backends.len()];
        for _ in 0..n {
            c[s.pick(&[], NOW).unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn a_new_table_keeps_the_ejections_of_backends_it_lists_unchanged() {
        let registry = Registry::default();
        let old = build(table(1, "127.0.0.1:9001"), &registry, None);
        old.services[0].balancer.eject(0, NOW);
        old.services[0].balancer.eject(1, NOW);
        // Version 2 lists `a` unchanged and `b` at a new address.
        let new = build(table(2, "127.0.0.1:9011"), &registry, Some(&old));
        let s = &new.services[0];
        assert!(
            s.balancer.ejected(0, NOW),
            "a is still failing as far as we know"
        );
        assert!(
            !s.balancer.ejected(1, NOW),
            "b moved: a new backend in good standing"
        );
        let c = counts(s, 10);
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1] > 0 && c[2] > 0, "{c:?}");
        // Without a previous table nothing is ejected.
        let fresh = build(table(3, "127.0.0.1:9001"), &registry, None);
        assert_eq!(counts(&fresh.services[0], 9), vec![3, 3, 3]);
    }

    #[test]
    fn an_address_listed_by_two_capped_services_takes_the_smaller_cap() {
        let text = br#"{"version": 1, "services": [
            {"name": "a", "hosts": ["a"], "max_inflight": 5,
             "backends": [{"id": "x", "addr": "127.0.0.1:1"}]},
            {"name": "b", "hosts": ["b"], "max_inflight": 3,
             "backends": [{"id": "x", "addr": "127.0.0.1:1"}, {"id": "y", "addr": "127.0.0.1:2"}]},
            {"name": "c", "hosts": ["c"],
             "backends": [{"id": "z", "addr": "127.0.0.1:3"}]}]}"#;
        let valid = validate(rusty_shared::decode(text).unwrap()).unwrap();
        let caps = caps(&valid);
        assert_eq!(caps.len(), 2);
        assert_eq!(caps[&"127.0.0.1:1".parse().unwrap()], 3);
        assert_eq!(caps[&"127.0.0.1:2".parse().unwrap()], 3);
    }

    #[test]
    fn peers_leave_header_editing_to_the_editor() {
        let snap = build(table(1, "127.0.0.1:9001"), &Registry::default(), None);
        let b = &snap.services[0].backends[0];
        assert_eq!(
            b.peer.options.http_upstream_request_policy,
            HttpUpstreamRequestPolicy::preserve()
        );
    }
}
