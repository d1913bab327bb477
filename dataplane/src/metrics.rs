//! The data plane's Prometheus metrics, kept in atomics and rendered on scrape. Counters live in
//! the [`Registry`] across table swaps; a snapshot holds `Arc` handles to the series its table
//! can produce, so a request does relaxed adds on handles it already has — no lock, no
//! allocation, no label lookup — and series of what left the table are dropped at the next
//! install. Only metrics: connections, the drain flag and the queue render their own series
//! with [`header`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Codes with a slot of their own. The last five slots are the classes `1xx`..`5xx`.
const CODES: [u16; 53] = [
    100, 101, 200, 201, 202, 203, 204, 205, 206, 300, 301, 302, 303, 304, 307, 308, 400, 401, 402,
    403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421, 422, 425, 426,
    428, 429, 431, 451, 499, 500, 501, 502, 503, 504, 505, 506, 507, 508, 511,
];
const SLOTS: usize = CODES.len() + 5;

/// code → slot, computed at compile time.
const SLOT_OF: [u8; 600] = {
    let mut t = [0u8; 600];
    let mut code = 100;
    while code < 600 {
        t[code] = (CODES.len() + code / 100 - 1) as u8;
        code += 1;
    }
    let mut i = 0;
    while i < CODES.len() {
        t[CODES[i] as usize] = i as u8;
        i += 1;
    }
    t
};

fn slot(code: u16) -> usize {
    match code {
        100..=599 => SLOT_OF[code as usize] as usize,
        // Not a valid status; count it as a server error rather than lose it.
        _ => CODES.len() + 4,
    }
}

fn slot_label(slot: usize) -> String {
    match CODES.get(slot) {
        Some(code) => code.to_string(),
        None => format!("{}xx", slot - CODES.len() + 1),
    }
}

/// Why a request to a backend failed, for `rustybalancer_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    ConnectRefused,
    ConnectTimeout,
    ConnectOther,
    /// The TLS handshake with the backend failed (an untrusted or misnamed certificate).
    Tls,
    ReadTimeout,
    Closed,
    Other,
}

impl UpstreamError {
    const ALL: [UpstreamError; 7] = [
        UpstreamError::ConnectRefused,
        UpstreamError::ConnectTimeout,
        UpstreamError::ConnectOther,
        UpstreamError::Tls,
        UpstreamError::ReadTimeout,
        UpstreamError::Closed,
        UpstreamError::Other,
    ];
    fn label(self) -> &'static str {
        match self {
            UpstreamError::ConnectRefused => "connect_refused",
            UpstreamError::ConnectTimeout => "connect_timeout",
            UpstreamError::ConnectOther => "connect_error",
            UpstreamError::Tls => "tls_handshake",
            UpstreamError::ReadTimeout => "read_timeout",
            UpstreamError::Closed => "upstream_closed",
            UpstreamError::Other => "other",
        }
    }
}

/// Counters of one backend (or of a service's "no backend" outcomes, with an empty backend id).
pub struct BackendCounters {
    requests: [AtomicU64; SLOTS],
    errors: [AtomicU64; 7],
    /// Attempts on this backend now under way.
    inflight: AtomicI64,
}

impl Default for BackendCounters {
    fn default() -> Self {
        BackendCounters {
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: Default::default(),
            inflight: AtomicI64::new(0),
        }
    }
}

impl BackendCounters {
    pub fn inflight_add(&self, delta: i64) {
        self.inflight.fetch_add(delta, Relaxed);
    }
    pub fn inflight(&self) -> i64 {
        self.inflight.load(Relaxed)
    }
    /// Responses counted in all, and of those the server errors (5xx, the proxy's own 502,
    /// 503 and 504 included): for the status page.
    pub fn totals(&self) -> (u64, u64) {
        let (mut all, mut server) = (0, 0);
        for (slot, n) in self.requests.iter().enumerate() {
            let n = n.load(Relaxed);
            all += n;
            let code_class = CODES
                .get(slot)
                .map_or_else(|| slot - CODES.len() + 1, |c| usize::from(*c / 100));
            if code_class == 5 {
                server += n;
            }
        }
        (all, server)
    }
    pub fn count_response(&self, code: u16) {
        self.requests[slot(code)].fetch_add(1, Relaxed);
    }
    pub fn count_error(&self, kind: UpstreamError) {
        self.errors[kind as usize].fetch_add(1, Relaxed);
    }
    /// Responses counted with this code's slot (for tests and the status page).
    pub fn responses(&self, code: u16) -> u64 {
        self.requests[slot(code)].load(Relaxed)
    }
    /// Failures of this kind counted.
    pub fn errors(&self, kind: UpstreamError) -> u64 {
        self.errors[kind as usize].load(Relaxed)
    }
}

/// Latency buckets, in seconds (Prometheus' defaults, which suit an HTTP proxy).
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BUCKET_NANOS: [u64; 11] = {
    let mut t = [0u64; 11];
    let mut i = 0;
    while i < 11 {
        t[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    t
};

/// Per-service request duration histogram and in-flight gauge.
#[derive(Default)]
pub struct ServiceCounters {
    buckets: [AtomicU64; 11],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    inflight: AtomicI64,
    /// Requests shed (503) under overload, by class.
    shed: [AtomicU64; 3],
}

impl ServiceCounters {
    pub fn observe(&self, nanos: u64) {
        // Buckets are stored non-cumulative and summed on scrape: one add per request.
        if let Some(i) = BUCKET_NANOS.iter().position(|&b| nanos <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }
    pub fn inflight_add(&self, delta: i64) {
        self.inflight.fetch_add(delta, Relaxed);
    }
    pub fn inflight(&self) -> i64 {
        self.inflight.load(Relaxed)
    }
    /// Requests observed by the duration histogram.
    pub fn observed(&self) -> u64 {
        self.count.load(Relaxed)
    }
    /// The histogram: upper bounds in seconds with the count of each bucket (not cumulative;
    /// slower requests are the rest of `observed`), and the sum in seconds.
    pub fn histogram(&self) -> (Vec<(f64, u64)>, f64) {
        let buckets = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(le, n)| (*le, n.load(Relaxed)))
            .collect();
        (buckets, self.sum_nanos.load(Relaxed) as f64 / 1e9)
    }
    pub fn count_shed(&self, class: rusty_shared::RequestClass) {
        self.shed[class as usize].fetch_add(1, Relaxed);
    }
}

/// Outcome of offering a table, for `rustybalancer_table_updates_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateResult {
    Applied,
    Rejected,
    Stale,
}

/// What happened to the state dir's table, for `rustybalancer_state_dir_events_total{event}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateEvent {
    /// The saved table was restored at start.
    Restored,
    /// The saved table was unusable and the one before it was restored.
    RestoredPrevious,
    /// A saved table file was unusable (unreadable, truncated, invalid).
    Unusable,
    /// An applied table could not be saved (full disk, read-only dir); it serves anyway.
    SaveFailed,
}

impl StateEvent {
    const ALL: [(StateEvent, &'static str); 4] = [
        (StateEvent::Restored, "restored"),
        (StateEvent::RestoredPrevious, "restored_previous"),
        (StateEvent::Unusable, "unusable"),
        (StateEvent::SaveFailed, "save_failed"),
    ];
}

/// Every metric series the data plane exports.
#[derive(Default)]
pub struct Registry {
    series: Mutex<Series>,
    updates: [AtomicU64; 3],
    state_events: [AtomicU64; 4],
    /// Requests that matched no service (`service=""`).
    unrouted: Arc<BackendCounters>,
}

#[derive(Default)]
struct Series {
    services: BTreeMap<String, Arc<ServiceCounters>>,
    /// (service, backend id); backend "" holds the service's requests answered without a backend.
    backends: BTreeMap<(String, String), Arc<BackendCounters>>,
}

/// What the installed table says at scrape time: its version and which backends are ejected,
/// as (service, backend, ejected).
pub struct Installed<'a> {
    pub table_version: Option<u64>,
    pub ejected: Vec<(&'a str, &'a str, bool)>,
}

impl Registry {
    pub fn count_update(&self, r: UpdateResult) {
        self.updates[r as usize].fetch_add(1, Relaxed);
    }

    pub fn updates(&self, r: UpdateResult) -> u64 {
        self.updates[r as usize].load(Relaxed)
    }

    pub fn count_state(&self, e: StateEvent) {
        self.state_events[e as usize].fetch_add(1, Relaxed);
    }

    pub fn unrouted(&self) -> Arc<BackendCounters> {
        self.unrouted.clone()
    }

    /// Handles for the services and backends of a table being installed. `keep` lists every
    /// (service, [backend ids]) of the new table; series of anything else are dropped.
    pub fn handles_for(&self, keep: &[(&str, Vec<&str>)]) -> Vec<ServiceHandles> {
        let mut s = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let wanted_services: std::collections::HashSet<&str> =
            keep.iter().map(|(svc, _)| *svc).collect();
        s.services
            .retain(|k, _| wanted_services.contains(k.as_str()));
        let mut wanted_backends = std::collections::HashSet::new();
        for (svc, ids) in keep {
            wanted_backends.insert((*svc, ""));
            for id in ids {
                wanted_backends.insert((*svc, *id));
            }
        }
        s.backends
            .retain(|(svc, id), _| wanted_backends.contains(&(svc.as_str(), id.as_str())));
        keep.iter()
            .map(|(svc, ids)| {
                let service = s.services.entry((*svc).to_owned()).or_default().clone();
                let mut backend = |id: &str| {
                    s.backends
                        .entry(((*svc).to_owned(), id.to_owned()))
                        .or_default()
                        .clone()
                };
                let no_backend = backend("");
                let backends = ids.iter().map(|id| backend(id)).collect();
                ServiceHandles {
                    service,
                    no_backend,
                    backends,
                }
            })
            .collect()
    }

    /// Render the request and table series in the Prometheus text exposition format, appended
    /// to `w` (the connection and queue series are rendered by their owners, with [`header`]).
    pub fn render(&self, live: &Installed<'_>, w: &mut String) {
        let s = self.series.lock().unwrap_or_else(|p| p.into_inner());
        w.reserve(4096 + s.backends.len() * 256);

        header(w, "rustybalancer_requests_total", "counter",
            "Requests answered, by service, backend and status code (backend \"\" when none was used).");
        let write_codes = |w: &mut String, svc: &str, id: &str, c: &BackendCounters| {
            for (i, n) in c.requests.iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        w,
                        "rustybalancer_requests_total{{service=\"{}\",backend=\"{}\",code=\"{}\"}} {n}",
                        esc(svc),
                        esc(id),
                        slot_label(i)
                    );
                }
            }
        };
        write_codes(w, "", "", &self.unrouted);
        for ((svc, id), c) in &s.backends {
            write_codes(w, svc, id, c);
        }

        header(
            w,
            "rustybalancer_upstream_errors_total",
            "counter",
            "Failed attempts to reach or read from a backend, by kind.",
        );
        for ((svc, id), c) in &s.backends {
            for kind in UpstreamError::ALL {
                let n = c.errors[kind as usize].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        w,
                        "rustybalancer_upstream_errors_total{{service=\"{}\",backend=\"{}\",kind=\"{}\"}} {n}",
                        esc(svc),
                        esc(id),
                        kind.label()
                    );
                }
            }
        }

        header(
            w,
            "rustybalancer_request_duration_seconds",
            "histogram",
            "Time from routing a request to the end of its response, by service.",
        );
        for (svc, c) in &s.services {
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += c.buckets[i].load(Relaxed);
                let _ = writeln!(
                    w,
                    "rustybalancer_request_duration_seconds_bucket{{service=\"{}\",le=\"{b}\"}} {cumulative}",
                    esc(svc)
                );
            }
            let count = c.count.load(Relaxed);
            let _ = writeln!(
                w,
                "rustybalancer_request_duration_seconds_bucket{{service=\"{}\",le=\"+Inf\"}} {count}",
                esc(svc)
            );
            let _ = writeln!(
                w,
                "rustybalancer_request_duration_seconds_sum{{service=\"{}\"}} {}",
                esc(svc),
                c.sum_nanos.load(Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                w,
                "rustybalancer_request_duration_seconds_count{{service=\"{}\"}} {count}",
                esc(svc)
            );
        }

        header(
            w,
            "rustybalancer_inflight_requests",
            "gauge",
            "Requests being proxied now, by service.",
        );
        for (svc, c) in &s.services {
            let _ = writeln!(
                w,
                "rustybalancer_inflight_requests{{service=\"{}\"}} {}",
                esc(svc),
                c.inflight()
            );
        }

        header(
            w,
            "rustybalancer_backend_ejected",
            "gauge",
            "1 while a backend is ejected locally after failed connects, else 0.",
        );
        for (svc, id, ejected) in &live.ejected {
            let _ = writeln!(
                w,
                "rustybalancer_backend_ejected{{service=\"{}\",backend=\"{}\"}} {}",
                esc(svc),
                esc(id),
                u8::from(*ejected)
            );
        }

        header(
            w,
            "rustybalancer_table_version",
            "gauge",
            "Version of the installed table (absent before the first one).",
        );
        if let Some(v) = live.table_version {
            let _ = writeln!(w, "rustybalancer_table_version {v}");
        }

        header(
            w,
            "rustybalancer_table_updates_total",
            "counter",
            "Tables offered to this data plane, by result.",
        );
        for (r, label) in [
            (UpdateResult::Applied, "applied"),
            (UpdateResult::Rejected, "rejected"),
            (UpdateResult::Stale, "stale"),
        ] {
            let _ = writeln!(
                w,
                "rustybalancer_table_updates_total{{result=\"{label}\"}} {}",
                self.updates(r)
            );
        }
        header(
            w,
            "rustybalancer_state_dir_events_total",
            "counter",
            "The state dir's table: restored at start (the saved one or the one before), files found unusable, saves that failed.",
        );
        for (e, label) in StateEvent::ALL {
            let _ = writeln!(
                w,
                "rustybalancer_state_dir_events_total{{event=\"{label}\"}} {}",
                self.state_events[e as usize].load(Relaxed)
            );
        }
        header(
            w,
            "rustybalancer_requests_shed_total",
            "counter",
            "Requests answered 503 under overload (queue full or queue timeout), by service and class.",
        );
        for (svc, c) in &s.services {
            for class in rusty_shared::RequestClass::ALL {
                let n = c.shed[class as usize].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        w,
                        "rustybalancer_requests_shed_total{{service=\"{}\",class=\"{}\"}} {n}",
                        esc(svc),
                        class.as_str()
                    );
                }
            }
        }
    }
}

/// The counters one installed service holds on to.
pub struct ServiceHandles {
    pub service: Arc<ServiceCounters>,
    pub no_backend: Arc<BackendCounters>,
    pub backends: Vec<Arc<BackendCounters>>,
}

/// `# HELP` and `# TYPE` lines of one metric.
pub fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Label values are names validated by `shared` (no quotes or backslashes), but escape anyway:
/// the exposition must stay parseable whatever a future schema allows.
pub fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| matches!(b, b'"' | b'\\' | b'\n')) {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_every_response_and_the_server_errors_among_them() {
        let c = BackendCounters::default();
        for code in [200, 204, 404, 499, 500, 502, 503, 504, 599, 1000] {
            c.count_response(code);
        }
        // 599 lands in the 5xx slot and 1000 (not a status) is counted as a server error.
        assert_eq!(c.totals(), (10, 6));
    }

    #[test]
    fn every_code_lands_in_its_own_slot_or_its_class() {
        assert_eq!(slot_label(slot(200)), "200");
        assert_eq!(slot_label(slot(503)), "503");
        assert_eq!(slot_label(slot(299)), "2xx");
        assert_eq!(slot_label(slot(599)), "5xx");
        assert_eq!(slot_label(slot(42)), "5xx");
    }

    #[test]
    fn counters_survive_a_new_table_and_vanished_series_are_dropped() {
        let r = Registry::default();
        let h = r.handles_for(&[("web", vec!["a", "b"])]);
        h[0].backends[0].count_response(200);
        h[0].backends[1].count_response(502);
        h[0].backends[1].count_error(UpstreamError::ConnectRefused);
        h[0].service.observe(3_000_000);
        let h2 = r.handles_for(&[("web", vec!["a"])]);
        h2[0].backends[0].count_response(200);
        let mut text = String::new();
        r.render(
            &Installed {
                table_version: Some(3),
                ejected: vec![("web", "a", false)],
            },
            &mut text,
        );
        assert!(text.contains(
            "rustybalancer_requests_total{service=\"web\",backend=\"a\",code=\"200\"} 2"
        ));
        assert!(!text.contains("backend=\"b\""), "{text}");
        assert!(text.contains(
            "rustybalancer_request_duration_seconds_bucket{service=\"web\",le=\"0.005\"} 1"
        ));
        assert!(text.contains("rustybalancer_request_duration_seconds_count{service=\"web\"} 1"));
        assert!(text.contains("rustybalancer_table_version 3"));
        assert!(text.contains("rustybalancer_backend_ejected{service=\"web\",backend=\"a\"} 0"));
    }

    #[test]
    fn update_results_are_counted_apart() {
        let r = Registry::default();
        r.count_update(UpdateResult::Applied);
        r.count_update(UpdateResult::Stale);
        r.count_update(UpdateResult::Stale);
        let mut text = String::new();
        r.render(
            &Installed {
                table_version: None,
                ejected: vec![],
            },
            &mut text,
        );
        assert!(text.contains("rustybalancer_table_updates_total{result=\"applied\"} 1"));
        assert!(text.contains("rustybalancer_table_updates_total{result=\"stale\"} 2"));
        assert!(text.contains("rustybalancer_table_updates_total{result=\"rejected\"} 0"));
        assert!(!text.contains("\nrustybalancer_table_version "));
    }
}
