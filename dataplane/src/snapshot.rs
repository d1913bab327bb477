//! The installed table, in the shape the request path reads it.
//!
//! A [`Snapshot`] is built once per table from a validated table: the router, each service's
//! tiers and schedules, a ready-made upstream peer per backend and the metric handles of every
//! series the table can produce. It is immutable apart from atomics (round-robin counters and
//! local ejection deadlines) and is swapped in whole with `arc-swap`, so a request sees either the
//! old table or the new one, never a mix. Ejections live in the snapshot, and a new table takes
//! them over for the backends it lists unchanged (same service, id and address): agents publish
//! often (every slow-start step, every health change), and a backend that keeps refusing
//! connections must not be forgiven by each of those tables.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;
use pingora::upstreams::peer::HttpPeer;
use rusty_shared::{RequestClass, Table, ValidTable};

use crate::admission::Limiter;

use crate::metrics::{BackendCounters, Registry, ServiceCounters};
use crate::router::Router;
use crate::select::Spill;

/// How long an idle pooled upstream connection is kept (nginx's upstream keepalive_timeout).
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

pub struct Snapshot {
    pub version: u64,
    /// The table as received, for `GET /table` and the state dir.
    pub table: Table,
    pub backend_count: usize,
    pub router: Router,
    pub services: Box<[ServiceState]>,
    /// Counters for requests no service matched.
    pub unrouted: Arc<BackendCounters>,
}

pub struct ServiceState {
    pub name: Arc<str>,
    pub backends: Box<[BackendState]>,
    /// Non-empty tiers, most preferred first.
    pub tiers: Box<[TierState]>,
    pub overprovisioning_pct: u32,
    pub retries: u32,
    pub eject_for_ms: u64,
    /// Current tier loads given local ejections; replaced only when ejections change.
    pub(crate) spill: ArcSwap<Spill>,
    /// Drives the choice of tier when traffic is split across tiers.
    pub(crate) tier_turn: AtomicU64,
    pub counters: Arc<ServiceCounters>,
    /// Requests of this service answered without a backend (none available).
    pub no_backend: Arc<BackendCounters>,
    pub class: RequestClass,
    pub class_header: Option<HeaderName>,
    /// Some backend has a concurrency limit: picks must take a slot.
    pub limited: bool,
    pub queue_timeout: Duration,
}

pub struct BackendState {
    pub id: Arc<str>,
    pub addr: SocketAddr,
    pub peer: HttpPeer,
    pub weight: u32,
    pub tier: u32,
    /// `clock::now_ms()` until which the backend is skipped; 0 when in good standing.
    pub(crate) ejected_until_ms: AtomicU64,
    pub counters: Arc<BackendCounters>,
    /// The slots of this backend's address, when some service caps it.
    pub limiter: Option<Arc<Limiter>>,
}

pub struct TierState {
    pub priority: u32,
    pub schedule: Box<[u32]>,
    /// The tier's backends, each once (for scans that must not loop over a long schedule).
    pub members: Box<[u32]>,
    pub total_weight: u64,
    /// Position in `schedule`: one relaxed `fetch_add` per pick.
    pub(crate) next: AtomicUsize,
}

impl Snapshot {
    pub fn build(valid: ValidTable, registry: &Registry) -> Snapshot {
        Snapshot::build_after(valid, registry, None)
    }

    /// Build the snapshot that replaces `previous`, keeping its ejections where they apply.
    pub fn build_after(
        valid: ValidTable,
        registry: &Registry,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let now = crate::clock::now_ms();
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
        // An address's cap is the smallest of the services that list it.
        let mut caps: HashMap<SocketAddr, u32> = HashMap::new();
        for s in valid.services.iter().filter(|s| s.max_inflight > 0) {
            for b in &s.backends {
                let cap = caps.entry(b.addr).or_insert(s.max_inflight);
                *cap = (*cap).min(s.max_inflight);
            }
        }
        let limiters = registry.admission.limiters_for(&caps);
        let router = Router::new(&valid.services);
        let services = valid
            .services
            .iter()
            .zip(handles)
            .map(|(s, h)| {
                let before = previous.and_then(|p| p.services.iter().find(|o| *o.name == *s.name));
                let ejected_until = |id: &str, addr: SocketAddr| {
                    before
                        .and_then(|o| o.backends.iter().find(|b| &*b.id == id))
                        .filter(|b| b.addr == addr)
                        .map_or(0, |b| {
                            b.ejected_until_ms
                                .load(std::sync::atomic::Ordering::Relaxed)
                        })
                };
                let mut backends: Box<[BackendState]> = s
                    .backends
                    .iter()
                    .zip(h.backends)
                    .map(|(b, counters)| {
                        let mut peer = HttpPeer::new(b.addr, false, String::new());
                        peer.options.connection_timeout = Some(s.connect_timeout);
                        peer.options.total_connection_timeout = Some(s.connect_timeout);
                        peer.options.read_timeout = Some(s.read_timeout);
                        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
                        BackendState {
                            id: b.id.as_str().into(),
                            addr: b.addr,
                            peer,
                            weight: b.weight,
                            tier: 0,
                            ejected_until_ms: AtomicU64::new(ejected_until(&b.id, b.addr)),
                            counters,
                            limiter: limiters.get(&b.addr).cloned(),
                        }
                    })
                    .collect();
                let tiers: Box<[TierState]> = s
                    .tiers
                    .iter()
                    .enumerate()
                    .map(|(t, tier)| {
                        for &m in &tier.members {
                            backends[m as usize].tier = t as u32;
                        }
                        TierState {
                            priority: tier.priority,
                            schedule: tier.schedule.clone().into(),
                            members: tier.members.clone().into(),
                            total_weight: tier.total_weight,
                            next: AtomicUsize::new(0),
                        }
                    })
                    .collect();
                let spill = Spill::all_healthy(tiers.len());
                let carried = backends.iter().any(|b| {
                    b.ejected_until_ms
                        .load(std::sync::atomic::Ordering::Relaxed)
                        > now
                });
                let limited = backends.iter().any(|b| b.limiter.is_some());
                let svc = ServiceState {
                    name: s.name.as_str().into(),
                    backends,
                    tiers,
                    overprovisioning_pct: s.overprovisioning_pct,
                    retries: s.retries,
                    eject_for_ms: s.eject_for.as_millis() as u64,
                    spill: ArcSwap::from_pointee(spill),
                    tier_turn: AtomicU64::new(0),
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
                };
                if carried {
                    svc.refresh_spill(now);
                }
                svc
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
}
