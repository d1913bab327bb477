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
use pingora::upstreams::peer::{HttpPeer, HttpUpstreamRequestPolicy};
use rusty_shared::{RequestClass, Table, ValidTable};

use crate::admission::Limiter;
use crate::metrics::{BackendCounters, Registry, ServiceCounters};
use crate::router::Router;
use crate::select::Balancer;

/// How long an idle pooled upstream connection is kept (nginx's upstream keepalive_timeout).
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

pub struct Snapshot {
    pub version: u64,
    /// The table as received, for `GET /table` and the state dir.
    pub table: Table,
    pub backend_count: usize,
    pub router: Router,
    pub services: Box<[Service]>,
    /// Counters for requests no service matched.
    pub unrouted: Arc<BackendCounters>,
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
    /// The backend for the next attempt (see [`Balancer::pick`]).
    pub fn pick(&self, tried: &[u32], now: u64) -> Option<u32> {
        self.balancer.pick(tried, now)
    }
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
    /// they apply. `limiters` holds the slots of every address in [`caps`]; `now` is the
    /// balancers' clock reading.
    pub fn build(
        valid: ValidTable,
        registry: &Registry,
        limiters: &HashMap<SocketAddr, Arc<Limiter>>,
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
        let services = valid
            .services
            .iter()
            .zip(handles)
            .map(|(s, h)| {
                let before = previous.and_then(|p| p.services.iter().find(|o| *o.name == *s.name));
                let ejected_until = |id: &str, addr: SocketAddr| {
                    before
                        .and_then(|o| {
                            let i = o.backends.iter().position(|b| &*b.id == id)?;
                            (o.backends[i].addr == addr).then(|| o.balancer.ejected_until(i as u32))
                        })
                        .unwrap_or(0)
                };
                let backends: Box<[Backend]> = s
                    .backends
                    .iter()
                    .zip(h.backends)
                    .map(|(b, counters)| {
                        let mut peer = HttpPeer::new(b.addr, false, String::new());
                        peer.options.connection_timeout = Some(s.connect_timeout);
                        peer.options.total_connection_timeout = Some(s.connect_timeout);
                        peer.options.read_timeout = Some(s.read_timeout);
                        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
                        // The editor decides which headers go upstream, on every path.
                        peer.options.http_upstream_request_policy =
                            HttpUpstreamRequestPolicy::preserve();
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
        }
    }

    /// A snapshot of `valid` with no table before it and no capped address: for tests and
    /// benchmarks.
    pub fn fresh(valid: ValidTable, registry: &Registry) -> Snapshot {
        Snapshot::build(valid, registry, &HashMap::new(), None, 1)
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
        Snapshot::build(valid, registry, &HashMap::new(), previous, NOW)
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
