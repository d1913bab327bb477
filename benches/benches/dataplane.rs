//! What our own code costs the data plane, apart from Pingora:
//! - `pick/N`: one backend pick at N backends (the fast path: nobody ejected), and with a
//!   quarter of the backends ejected (the slow path).
//! - `install/…`: decode + validate + build the snapshot of a 10,000-backend table, into an
//!   empty store and over the version before it.
//! - `request_path`: everything our proxy does for one request outside Pingora (snapshot load,
//!   route, pick, peer copy, forwarding headers, metrics). It also copies the request header,
//!   which Pingora does per request anyway, so the figure is an upper bound for our share.
//! - `lane/…`: the fast lane's pure parts per request: reading a client's head and writing the
//!   upstream one, and reading a backend's response head and writing the client's.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pingora::http::RequestHeader;
use rusty_benches::table;
use rusty_lb::attempt::Routed;
use rusty_lb::http1::editor::{self, HeaderOut, Origin, Proto, RequestIds};
use rusty_lb::metrics::Registry;
use rusty_lb::queue::Queue;
use rusty_lb::snapshot::Snapshot;
use rusty_lb::store::TableStore;
use rusty_shared::{validate, RequestClass};

const NOW: u64 = 1_000;

fn snapshot(n: usize, weights: &[u32]) -> Snapshot {
    Snapshot::fresh(validate(table(n, weights)).unwrap(), &Registry::default())
}

/// The table as the agent publishes it: with each tier's schedule computed.
fn with_schedules(mut t: rusty_shared::Table) -> rusty_shared::Table {
    let valid = validate(t.clone()).unwrap();
    for (svc, v) in t.services.iter_mut().zip(&valid.services) {
        svc.schedule = Some(v.tiers.iter().map(|t| t.schedule.clone()).collect());
    }
    t
}

fn store() -> TableStore {
    TableStore::new(
        Arc::new(Registry::default()),
        Arc::new(Queue::default()),
        None,
    )
}

/// The headers the editor adds, as the pipeline collects them before inserting them.
struct Added(Vec<(&'static str, Vec<u8>)>);

impl HeaderOut for Added {
    fn start(&mut self, name: &'static str) {
        self.0.push((name, Vec::new()));
    }
    fn value(&mut self, value: &[u8]) {
        if let Some((_, v)) = self.0.last_mut() {
            v.extend_from_slice(value);
        }
    }
    fn finish(&mut self) {}
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in [3usize, 100, 10_000] {
        let snap = snapshot(n, &[5, 3, 1]);
        let svc = &snap.services[0];
        g.bench_with_input(BenchmarkId::new("healthy", n), &n, |b, _| {
            b.iter(|| black_box(svc.pick(black_box(&[]), NOW)))
        });
    }
    let snap = snapshot(100, &[1]);
    let svc = &snap.services[0];
    for i in (0..100).step_by(4) {
        svc.balancer.eject(i, NOW);
    }
    g.bench_function("quarter_ejected/100", |b| {
        b.iter(|| black_box(svc.pick(black_box(&[]), NOW)))
    });
    g.finish();
}

fn install(c: &mut Criterion) {
    let mut g = c.benchmark_group("install");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    for (name, weights) in [
        ("equal_weights", &[1u32][..]),
        ("weights_1_to_4", &[1, 2, 3, 4][..]),
    ] {
        let json = table(10_000, weights).to_json();
        g.bench_function(BenchmarkId::new(name, 10_000), |b| {
            // A fresh store each time so the version check passes; building it is negligible.
            b.iter(|| black_box(store().offer(json.as_bytes(), "bench").unwrap()))
        });
    }
    // What the agent sends most: the next version of the installed table with one backend's
    // weight changed (a slow-start step), so every backend is matched against the old table.
    // It carries the schedules the agent computed, as the agent's tables do.
    for n in [10_000, 100_000] {
        let first = with_schedules(table(n, &[1, 2, 3, 4])).to_json();
        let mut next = table(n, &[1, 2, 3, 4]);
        next.version = 2;
        next.services[0].backends[17].weight = 3;
        let next = with_schedules(next).to_json();
        g.bench_function(BenchmarkId::new("next_version", n), |b| {
            b.iter_batched(
                || {
                    let s = store();
                    s.offer(first.as_bytes(), "bench").unwrap();
                    s
                },
                |s| black_box(s.offer(next.as_bytes(), "bench").unwrap()),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn request_path(c: &mut Criterion) {
    // Uncapped (the default), and with every backend capped high enough never to be full: the
    // cost of taking and giving back a slot when no limit is reached.
    for (name, cap) in [
        ("request_path/3_backends", 0),
        ("request_path/3_backends_capped", 1_000_000),
    ] {
        let mut t = table(3, &[5, 3, 1]);
        t.services[0].max_inflight = cap;
        t.services[0].class_header = Some("x-priority".into());
        let queue = Arc::new(Queue::default());
        let store = TableStore::new(Arc::new(Registry::default()), queue.clone(), None);
        store.offer(t.to_json().as_bytes(), "bench").unwrap();
        let ids = RequestIds::new();
        let origin = Origin {
            client: Some(b"127.0.0.1"),
            trusted: false,
            proto: Proto::Http,
        };
        let mut req = RequestHeader::build("GET", b"/api/users?id=7", None).unwrap();
        req.insert_header("host", "www.example.com").unwrap();
        c.bench_function(name, |b| {
            b.iter(|| {
                let snap = store.current().unwrap();
                let svc_idx = snap
                    .router
                    .route(b"www.example.com", req.uri.path().as_bytes())
                    .unwrap();
                let svc = &snap.services[svc_idx as usize];
                let class = svc
                    .class_header
                    .as_ref()
                    .and_then(|h| req.headers.get(h))
                    .and_then(|v| RequestClass::from_bytes(v.as_bytes()))
                    .unwrap_or(svc.class);
                let limited = svc.limited;
                let mut routed = Routed::new(snap, svc_idx, Instant::now());
                let i = routed.next(NOW).unwrap();
                let backend = &routed.service().backends[i as usize];
                let limiter = backend.limiter.as_ref();
                if limited {
                    assert!(queue.queued() == 0 && limiter.is_some_and(|l| l.try_acquire()));
                }
                let peer = Box::new(backend.peer.clone());
                // The pipeline's header edit: the downstream head copied, read, trimmed and added to.
                let mut upstream = req.clone();
                let lines = upstream
                    .headers
                    .iter()
                    .map(|(n, v)| editor::Line::new(n.as_str().as_bytes(), v.as_bytes()));
                let edit = editor::read_request(lines, true, false).unwrap();
                let mut added = Added(Vec::new());
                edit.add_headers(&origin, &ids, None, &mut added);
                for (n, v) in added.0 {
                    upstream.insert_header(n, v.as_slice()).unwrap();
                }
                if let Some(l) = limiter {
                    queue.release(l, NOW);
                }
                routed.end(200);
                black_box((peer, upstream, class))
            })
        });
    }
}

fn lane(c: &mut Criterion) {
    use rusty_lb::http1::head::{plain_request, response_head};
    use rusty_lb::http1::Limits;
    let limits = Limits::default();
    let ids = RequestIds::with_prefix(7);
    let origin = Origin {
        client: Some(b"127.0.0.1"),
        trusted: false,
        proto: Proto::Http,
    };
    // What wrk and a typical backend send.
    let request = b"GET /api/users?id=7 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 26 Nov 2026 00:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n";
    let mut out = Vec::with_capacity(1024);
    c.bench_function("lane/request_head", |b| {
        b.iter(|| {
            let plain = plain_request(black_box(request), &limits, &origin, &ids, &mut out);
            black_box(plain.is_ok_and(|p| p.is_some()))
        })
    });
    c.bench_function("lane/response_head", |b| {
        b.iter(|| {
            black_box(response_head(black_box(response), false, false, None, &mut out).is_ok())
        })
    });
}

/// What one request does to the metrics (a service's and a backend's in-flight gauges up and
/// down, a response counted, the duration observed), and what a scrape of a 1,000-backend
/// table costs.
fn metrics(c: &mut Criterion) {
    let registry = Registry::default();
    let ids: Vec<String> = (0..1000).map(|i| format!("b{i}")).collect();
    let handles = registry.handles_for(&[("web", ids.iter().map(String::as_str).collect())]);
    let (svc, backend) = (&handles[0].service, &handles[0].backends[0]);
    c.bench_function("metrics/one_request", |b| {
        b.iter(|| {
            svc.inflight_add(1);
            backend.inflight_add(1);
            backend.count_response(black_box(200));
            svc.observe(black_box(1_234_567));
            backend.inflight_add(-1);
            svc.inflight_add(-1);
        })
    });
    for (i, b) in handles[0].backends.iter().enumerate() {
        b.count_response(if i % 10 == 0 { 503 } else { 200 });
    }
    c.bench_function("metrics/scrape_1000_backends", |b| {
        b.iter(|| {
            for backend in &handles[0].backends {
                backend.set_ejected(false);
            }
            let mut text = String::new();
            registry.render(Some(1), &mut text);
            black_box(text)
        })
    });
}

/// One access log line of a wrk request, in each format.
fn access_log(c: &mut Criterion) {
    use rusty_lb::access_log::{render, Entry, Format};
    let e = Entry {
        client: Some("127.0.0.1".parse().unwrap()),
        method: b"GET",
        host: b"www.example.com",
        target: b"/api/users?id=7",
        version: "HTTP/1.1",
        status: 200,
        bytes: 187,
        duration: std::time::Duration::from_micros(1_234),
        backend: "web-2",
        request_id: b"7f3a9c2e0000002a",
        service: "web",
        attempts: 1,
        class: RequestClass::Normal,
        user_agent: b"wrk",
        referer: b"",
        https: false,
    };
    let now = std::time::SystemTime::now();
    for (name, format) in [
        ("access_log/json", Format::Json),
        ("access_log/combined", Format::Combined),
    ] {
        let mut out = Vec::with_capacity(1024);
        c.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                render(black_box(&e), now, format, &mut out);
                black_box(out.len())
            })
        });
    }
}

criterion_group!(
    benches,
    pick,
    install,
    request_path,
    lane,
    metrics,
    access_log
);
criterion_main!(benches);
