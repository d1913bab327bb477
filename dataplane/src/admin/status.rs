//! The admin listener's status: what the installed table routes to and how it is doing, as
//! JSON for `/status` and for the live page at `/` (which polls it and works out the rates).
//! Reads the plane; called by the admin listener only.

use serde_json::{json, Value};

use crate::plane::Plane;

/// The status at `now` (`clock::now_ms`).
pub fn status(plane: &Plane, now: u64) -> Value {
    let Some(snap) = plane.store.current() else {
        return json!({
            "now_ms": now,
            "version": null,
            "table_age_s": null,
            "connections": plane.connections.open(),
            "services": [],
        });
    };
    let services: Vec<Value> = snap
        .services
        .iter()
        .zip(&snap.table.services)
        .map(|(svc, wire)| {
            let backends: Vec<Value> = svc
                .backends
                .iter()
                .zip(&wire.backends)
                .enumerate()
                .map(|(i, (b, w))| {
                    let (requests, errors) = b.counters.totals();
                    json!({
                        "id": &*b.id,
                        "addr": b.addr.to_string(),
                        "weight": w.weight,
                        "tier": w.priority,
                        "ejected": svc.balancer.ejected(i as u32, now),
                        "in_flight": b.counters.inflight(),
                        "requests": requests,
                        "errors": errors,
                    })
                })
                .collect();
            let (no_backend, _) = svc.no_backend.totals();
            let (buckets, sum) = svc.counters.histogram();
            json!({
                "name": &*svc.name,
                "hosts": &wire.hosts,
                "path_prefix": &wire.path_prefix,
                "in_flight": svc.counters.inflight(),
                "no_backend": no_backend,
                "latency": {
                    "count": svc.counters.observed(),
                    "sum_s": sum,
                    "buckets": buckets,
                },
                "backends": backends,
            })
        })
        .collect();
    json!({
        "now_ms": now,
        "version": snap.version,
        "table_age_s": now.saturating_sub(snap.installed_ms) as f64 / 1000.0,
        "connections": plane.connections.open(),
        "services": services,
    })
}
