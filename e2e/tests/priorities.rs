//! Request priority classes under overload, through the real `rusty-lb` and a real backend that
//! serves at most 4 requests at a time, 20 ms each (200 requests/s at most).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rusty_e2e::*;

/// Send `rate` requests per second to `path` for `duration`, open loop: the send times are fixed
/// in advance and spread over `rate` keep-alive clients (one request a second each), so an
/// answer that takes up to a second (the queue timeout) does not slow the offered load down.
/// Returns (status or 0 for an I/O error, latency) per request.
fn open_loop(
    port: u16,
    path: &str,
    header: &str,
    rate: u32,
    duration: Duration,
) -> Vec<(u16, Duration)> {
    let clients = rate.max(1);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(50);
    let total = (duration.as_secs_f64() * f64::from(rate)) as u32;
    let head: Arc<str> = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{header}\r\n").into();
    let handles: Vec<_> = (0..clients)
        .map(|k| {
            let head = head.clone();
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                let mut out = Vec::new();
                let mut n = k;
                while n < total {
                    let due = start + interval * n;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let t0 = Instant::now();
                    let status = client.request(&head).map_or(0, |r| r.status);
                    out.push((status, t0.elapsed()));
                    n += clients;
                }
                out
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect()
}

struct Outcome {
    sent: usize,
    ok: usize,
    shed: usize,
    other: usize,
    p99: Duration,
}

fn outcome(results: &[(u16, Duration)]) -> Outcome {
    let mut ok_latencies: Vec<Duration> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, d)| *d)
        .collect();
    ok_latencies.sort();
    let p99 = ok_latencies
        .get((ok_latencies.len() * 99 / 100).min(ok_latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    Outcome {
        sent: results.len(),
        ok: ok_latencies.len(),
        shed: results.iter().filter(|(s, _)| *s == 503).count(),
        other: results
            .iter()
            .filter(|(s, _)| *s != 200 && *s != 503)
            .count(),
        p99,
    }
}

fn describe(name: &str, o: &Outcome) -> String {
    format!(
        "{name}: {} sent, {} ok ({:.1} %), {} shed, {} other, p99 of the served {:?}",
        o.sent,
        o.ok,
        100.0 * o.ok as f64 / o.sent.max(1) as f64,
        o.shed,
        o.other,
        o.p99
    )
}

/// Offer two streams at once, each (path, extra header line); their outcomes.
fn offer(
    port: u16,
    (c_path, c_header, c_rate): (&'static str, &'static str, u32),
    (b_path, b_header, b_rate): (&'static str, &'static str, u32),
    duration: Duration,
) -> (Outcome, Outcome) {
    let c = std::thread::spawn(move || open_loop(port, c_path, c_header, c_rate, duration));
    let b = std::thread::spawn(move || open_loop(port, b_path, b_header, b_rate, duration));
    (outcome(&c.join().unwrap()), outcome(&b.join().unwrap()))
}

/// A `rusty-lb` serving `table`.
fn serving(dir: &TempDir, table: &serde_json::Value) -> Lb {
    let path = dir.path("table.json");
    write_atomic(&path, &table.to_string());
    let lb = Lb::start(&["--table".to_owned(), path.display().to_string()]);
    lb.wait_version(1, Duration::from_secs(10));
    lb
}

#[test]
fn critical_traffic_keeps_its_share_under_twice_the_capacity_and_nobody_is_shed_below_it() {
    let backend = Echo::start_with("shared", &["--max-concurrent", "4", "--delay-ms", "20"]);
    let dir = TempDir::new("priorities");
    let service = |name: &str, class: &str| {
        serde_json::json!({
            "name": name,
            "path_prefix": format!("/{name}"),
            "class": class,
            "max_inflight": 4,
            "backends": [{"id": "shared", "addr": backend.addr()}],
        })
    };
    let table = serde_json::json!({
        "version": 1,
        "services": [service("crit", "critical"), service("bulk", "bulk")],
    });
    let lb = serving(&dir, &table);

    // 2x the backend's capacity together: critical 0.6x, bulk 1.4x.
    let (crit, bulk) = offer(
        lb.port,
        ("/crit", "", 120),
        ("/bulk", "", 280),
        Duration::from_secs(4),
    );
    eprintln!("2x capacity: {}", describe("critical", &crit));
    eprintln!("2x capacity: {}", describe("bulk", &bulk));
    assert_eq!(crit.other + bulk.other, 0, "only 200 or a 503 shed");
    assert!(
        crit.ok * 100 >= crit.sent * 95,
        "{}",
        describe("critical", &crit)
    );
    // The documented bound: critical requests never wait behind bulk ones, only for one of the
    // four slots to free (at most one service time) and then their own, so p99 stays within a
    // few service times; 250 ms leaves room for the scheduler of a 2-core machine running the
    // clients, the proxy and the backend.
    assert!(crit.p99 < Duration::from_millis(250), "{:?}", crit.p99);
    assert!(
        bulk.shed > bulk.sent / 4,
        "bulk absorbs the shedding: {}",
        describe("bulk", &bulk)
    );
    // Bulk is not starved: it keeps at least its minimum share of the capacity.
    assert!(bulk.ok * 10 >= bulk.sent, "{}", describe("bulk", &bulk));
    assert!(
        lb.metric(r#"rustybalancer_requests_shed_total{service="bulk",class="bulk"}"#)
            >= bulk.shed as f64
    );
    assert!(lb.metric(r#"rustybalancer_queue_wait_seconds_count{class="critical"}"#) > 0.0);

    // Under the backend's capacity (3/4 of the nominal 200/s; its real one is a little lower,
    // 20 ms plus the round trip per slot): bursts queue within the default 1 s queue timeout,
    // nobody is shed. At the nominal capacity itself the queue grows for the whole run on a
    // busy 2-core machine and its last requests time out, which is right but not this test.
    std::thread::sleep(Duration::from_millis(700));
    let (crit, bulk) = offer(
        lb.port,
        ("/crit", "", 45),
        ("/bulk", "", 105),
        Duration::from_secs(4),
    );
    eprintln!("3/4 capacity: {}", describe("critical", &crit));
    eprintln!("3/4 capacity: {}", describe("bulk", &bulk));
    assert_eq!(crit.ok, crit.sent, "{}", describe("critical", &crit));
    assert_eq!(bulk.ok, bulk.sent, "{}", describe("bulk", &bulk));
}

#[test]
fn a_class_header_sorts_the_requests_of_one_service() {
    let backend = Echo::start_with("shared", &["--max-concurrent", "4", "--delay-ms", "20"]);
    let dir = TempDir::new("class-header");
    let table = serde_json::json!({
        "version": 1,
        "services": [{
            "name": "mixed",
            "class_header": "x-priority",
            "max_inflight": 4,
            "backends": [{"id": "shared", "addr": backend.addr()}],
        }],
    });
    let lb = serving(&dir, &table);

    // The same service at 2x capacity: interactive clients mark themselves critical, batch
    // clients bulk; an unknown value would keep the service's class (normal).
    let (crit, bulk) = offer(
        lb.port,
        ("/", "X-Priority: critical\r\n", 120),
        ("/", "x-priority: BULK\r\n", 280),
        Duration::from_secs(3),
    );
    eprintln!("class header: {}", describe("critical", &crit));
    eprintln!("class header: {}", describe("bulk", &bulk));
    assert!(
        crit.ok * 100 >= crit.sent * 95,
        "{}",
        describe("critical", &crit)
    );
    assert!(bulk.shed > bulk.sent / 4, "{}", describe("bulk", &bulk));
    assert_eq!(
        lb.metric(r#"rustybalancer_requests_shed_total{service="mixed",class="critical"}"#),
        crit.shed as f64
    );
    assert_eq!(
        lb.metric(r#"rustybalancer_requests_shed_total{service="mixed",class="bulk"}"#),
        bulk.shed as f64
    );
}
