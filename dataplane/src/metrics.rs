//! The data plane's Prometheus metrics, on the `prometheus` crate: typed metrics in one
//! [`prometheus::Registry`], rendered by its text encoder on scrape. A snapshot holds handles to
//! the series its table can produce, so a request does relaxed adds on handles it already has —
//! no lock, no allocation, no label lookup. Per-service series are resolved when a table is
//! installed; a backend's series by status code and error kind on their first use (a backend
//! sees a few of the 60 codes, and a series of zeros for each of the others would bloat every
//! scrape), once. The request durations are plain atomics rendered by a collector of their
//! own ([`Latency`]). Series of what left the table are removed at the next install. Connections,
//! the queue, the certificates and the access log own their metrics and register them here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

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

/// An unlabelled counter (a metric's name and help are constants, so they are valid).
pub fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("a constant metric name")
}

/// An unlabelled gauge.
pub fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("a constant metric name")
}

/// A counter family with labels.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a constant metric name")
}

/// A gauge family with labels.
pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("a constant metric name")
}

/// A histogram family with labels and these bucket bounds (seconds).
pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("a constant metric name")
}

/// The families a backend creates its series in, on first use.
struct Families {
    requests: IntCounterVec,
    errors: IntCounterVec,
    /// Held while a backend's series is created or the backend retired, so a request still on
    /// an old table never brings back the series of a backend that left.
    creating: Mutex<()>,
}

impl Families {
    fn new() -> Families {
        Families {
            requests: counter_vec(
                "rustybalancer_requests_total",
                "Requests answered, by service, backend and status code (backend \"\" when none was used).",
                &["service", "backend", "code"],
            ),
            errors: counter_vec(
                "rustybalancer_upstream_errors_total",
                "Failed attempts to reach or read from a backend, by kind.",
                &["service", "backend", "kind"],
            ),
            creating: Mutex::new(()),
        }
    }
}

/// Counters of one backend (or of a service's "no backend" outcomes, with an empty backend id).
pub struct BackendCounters {
    families: Arc<Families>,
    service: String,
    backend: String,
    requests: [OnceLock<IntCounter>; SLOTS],
    errors: [OnceLock<IntCounter>; 7],
    /// Attempts on this backend now under way (for the status page; not a series).
    inflight: AtomicI64,
    /// `rustybalancer_backend_ejected` of a backend of the table (none for "no backend"), set
    /// from the table's balancer at each scrape.
    ejected: Option<IntGauge>,
    retired: AtomicBool,
}

impl Default for BackendCounters {
    /// Counters in families of their own, registered nowhere (for tests).
    fn default() -> Self {
        BackendCounters::new(Arc::new(Families::new()), "", "", None)
    }
}

impl BackendCounters {
    fn new(
        families: Arc<Families>,
        service: &str,
        backend: &str,
        ejected: Option<IntGauge>,
    ) -> BackendCounters {
        BackendCounters {
            ejected,
            families,
            service: service.to_owned(),
            backend: backend.to_owned(),
            requests: std::array::from_fn(|_| OnceLock::new()),
            errors: std::array::from_fn(|_| OnceLock::new()),
            inflight: AtomicI64::new(0),
            retired: AtomicBool::new(false),
        }
    }

    /// The series in `cell`, created in `family` with `label` last on first use.
    fn series<'a>(
        &self,
        cell: &'a OnceLock<IntCounter>,
        family: &IntCounterVec,
        label: impl FnOnce() -> String,
    ) -> &'a IntCounter {
        cell.get_or_init(|| {
            let _creating = self
                .families
                .creating
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if self.retired.load(Relaxed) {
                // Counted, but into a series no scrape shows: the backend has left the table.
                counter("rustybalancer_retired", "a retired backend's counter")
            } else {
                family.with_label_values(&[&self.service, &self.backend, &label()])
            }
        })
    }

    /// The backend left the table: remove its series, and create none after this.
    fn retire(&self, ejected: &IntGaugeVec) {
        let _creating = self
            .families
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.retired.store(true, Relaxed);
        if self.ejected.is_some() {
            let _ = ejected.remove_label_values(&[&self.service, &self.backend]);
        }
        for (i, cell) in self.requests.iter().enumerate() {
            if cell.get().is_some() {
                let _ = self.families.requests.remove_label_values(&[
                    &self.service,
                    &self.backend,
                    &slot_label(i),
                ]);
            }
        }
        for kind in UpstreamError::ALL {
            if self.errors[kind as usize].get().is_some() {
                let _ = self.families.errors.remove_label_values(&[
                    &self.service,
                    &self.backend,
                    kind.label(),
                ]);
            }
        }
    }

    pub fn inflight_add(&self, delta: i64) {
        self.inflight.fetch_add(delta, Relaxed);
    }
    pub fn inflight(&self) -> i64 {
        self.inflight.load(Relaxed)
    }
    /// Whether the table's balancer has this backend ejected now (set before a scrape).
    pub fn set_ejected(&self, ejected: bool) {
        if let Some(g) = &self.ejected {
            g.set(i64::from(ejected));
        }
    }
    /// Responses counted in all, and of those the server errors (5xx, the proxy's own 502,
    /// 503 and 504 included): for the status page.
    pub fn totals(&self) -> (u64, u64) {
        let (mut all, mut server) = (0, 0);
        for (slot, cell) in self.requests.iter().enumerate() {
            let n = cell.get().map_or(0, IntCounter::get);
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
        let slot = slot(code);
        self.series(&self.requests[slot], &self.families.requests, || {
            slot_label(slot)
        })
        .inc();
    }
    pub fn count_error(&self, kind: UpstreamError) {
        self.series(&self.errors[kind as usize], &self.families.errors, || {
            kind.label().to_owned()
        })
        .inc();
    }
    /// Responses counted with this code's slot (for tests and the status page).
    pub fn responses(&self, code: u16) -> u64 {
        self.requests[slot(code)].get().map_or(0, IntCounter::get)
    }
    /// Failures of this kind counted.
    pub fn errors(&self, kind: UpstreamError) -> u64 {
        self.errors[kind as usize].get().map_or(0, IntCounter::get)
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

/// One service's request durations: three relaxed adds a request (its bucket, the count, the
/// sum in nanoseconds). The crate's `Histogram` does two more atomic operations a request (a
/// hot/cold shard count and a floating-point compare-and-swap loop), which the harness measured
/// as 6–9 % fewer requests per second at 200 connections (`loadtest/TUNING.md`); these are
/// rendered through the crate's registry and encoder by [`Durations`] instead.
#[derive(Default)]
pub struct Latency {
    /// Not cumulative: summed on scrape.
    buckets: [AtomicU64; 11],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Latency {
    fn observe(&self, nanos: u64) {
        if let Some(i) = BUCKET_NANOS.iter().position(|&b| nanos <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }
}

/// `rustybalancer_request_duration_seconds{service}`: every installed service's [`Latency`], as
/// one histogram family for the registry, read from the registry's series.
#[derive(Clone)]
struct Durations {
    desc: Desc,
    series: Arc<Mutex<Series>>,
}

impl Durations {
    fn new(series: Arc<Mutex<Series>>) -> Durations {
        Durations {
            desc: Desc::new(
                "rustybalancer_request_duration_seconds".into(),
                "Time from routing a request to the end of its response, by service.".into(),
                vec!["service".into()],
                Default::default(),
            )
            .expect("a constant metric name"),
            series,
        }
    }
}

impl Collector for Durations {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let metrics = series
            .services
            .iter()
            .map(|(service, c)| {
                let l = &c.duration;
                let mut label = proto::LabelPair::default();
                label.set_name("service".into());
                label.set_value(service.clone());
                let mut cumulative = 0;
                let buckets = BUCKETS
                    .iter()
                    .zip(&l.buckets)
                    .map(|(le, n)| {
                        cumulative += n.load(Relaxed);
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(*le);
                        b.set_cumulative_count(cumulative);
                        b
                    })
                    .collect();
                let mut h = proto::Histogram::default();
                h.set_bucket(buckets);
                h.set_sample_count(l.count.load(Relaxed));
                h.set_sample_sum(l.sum_nanos.load(Relaxed) as f64 / 1e9);
                let mut m = proto::Metric::default();
                m.set_label(vec![label]);
                m.set_histogram(h);
                m
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(metrics);
        vec![family]
    }
}

/// Per-service request duration histogram, in-flight gauge and requests shed.
pub struct ServiceCounters {
    duration: Latency,
    inflight: IntGauge,
    /// Requests shed (503) under overload, by class.
    shed: [IntCounter; 3],
    /// gRPC answers by `grpc-status`, made on first use: most services never see one.
    grpc: [std::sync::OnceLock<IntCounter>; GRPC_CODES],
    grpc_family: IntCounterVec,
    name: Arc<str>,
}

/// gRPC status codes, 0 (OK) to 16 (UNAUTHENTICATED); anything else is counted as 2 (UNKNOWN).
const GRPC_CODES: usize = 17;

impl ServiceCounters {
    pub fn observe(&self, nanos: u64) {
        self.duration.observe(nanos);
    }
    pub fn inflight_add(&self, delta: i64) {
        self.inflight.add(delta);
    }
    pub fn inflight(&self) -> i64 {
        self.inflight.get()
    }
    /// Requests observed by the duration histogram.
    pub fn observed(&self) -> u64 {
        self.duration.count.load(Relaxed)
    }
    /// The histogram: upper bounds in seconds with the count of each bucket (not cumulative;
    /// slower requests are the rest of `observed`), and the sum in seconds.
    pub fn histogram(&self) -> (Vec<(f64, u64)>, f64) {
        let l = &self.duration;
        let buckets = BUCKETS
            .iter()
            .zip(&l.buckets)
            .map(|(le, n)| (*le, n.load(Relaxed)))
            .collect();
        (buckets, l.sum_nanos.load(Relaxed) as f64 / 1e9)
    }
    pub fn count_shed(&self, class: rusty_shared::RequestClass) {
        self.shed[class as usize].inc();
    }

    /// A gRPC call of this service ended with `grpc-status` `code` (from the backend's
    /// trailers, or our own answer).
    pub fn count_grpc(&self, code: u32) {
        let code = if (code as usize) < GRPC_CODES {
            code
        } else {
            2
        };
        self.grpc[code as usize]
            .get_or_init(|| {
                let label = code.to_string();
                self.grpc_family
                    .with_label_values(&[&*self.name, label.as_str()])
            })
            .inc();
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

/// Every metric series the data plane exports.
pub struct Registry {
    prom: prometheus::Registry,
    families: Arc<Families>,
    durations: Durations,
    inflight: IntGaugeVec,
    shed: IntCounterVec,
    grpc: IntCounterVec,
    ejected: IntGaugeVec,
    table_version: IntGaugeVec,
    updates: [IntCounter; 3],
    state_events: [IntCounter; 4],
    series: Arc<Mutex<Series>>,
    /// Requests that matched no service (`service=""`).
    unrouted: Arc<BackendCounters>,
    /// Scrapes set the gauges of the installed table one at a time.
    scrape: Mutex<()>,
}

#[derive(Default)]
struct Series {
    services: BTreeMap<String, Arc<ServiceCounters>>,
    /// (service, backend id); backend "" holds the service's requests answered without a backend.
    backends: BTreeMap<(String, String), Arc<BackendCounters>>,
}

impl Default for Registry {
    fn default() -> Self {
        let families = Arc::new(Families::new());
        let series: Arc<Mutex<Series>> = Arc::default();
        let updates = counter_vec(
            "rustybalancer_table_updates_total",
            "Tables offered to this data plane, by result.",
            &["result"],
        );
        let state_events = counter_vec(
            "rustybalancer_state_dir_events_total",
            "The state dir's table: restored at start (the saved one or the one before), files found unusable, saves that failed.",
            &["event"],
        );
        let r = Registry {
            prom: prometheus::Registry::new(),
            durations: Durations::new(series.clone()),
            inflight: gauge_vec(
                "rustybalancer_inflight_requests",
                "Requests being proxied now, by service.",
                &["service"],
            ),
            shed: counter_vec(
                "rustybalancer_requests_shed_total",
                "Requests answered 503 under overload (queue full or queue timeout), by service and class.",
                &["service", "class"],
            ),
            grpc: counter_vec(
                "rustybalancer_grpc_responses_total",
                "gRPC calls by service and grpc-status (the backend's, or ours when the proxy answered).",
                &["service", "code"],
            ),
            ejected: gauge_vec(
                "rustybalancer_backend_ejected",
                "1 while a backend is ejected locally after failed connects, else 0.",
                &["service", "backend"],
            ),
            table_version: gauge_vec(
                "rustybalancer_table_version",
                "Version of the installed table (absent before the first one).",
                &[],
            ),
            updates: ["applied", "rejected", "stale"].map(|r| updates.with_label_values(&[r])),
            state_events: ["restored", "restored_previous", "unusable", "save_failed"]
                .map(|e| state_events.with_label_values(&[e])),
            unrouted: Arc::new(BackendCounters::new(families.clone(), "", "", None)),
            families,
            series,
            scrape: Mutex::default(),
        };
        let own: Vec<Box<dyn Collector>> = vec![
            Box::new(r.families.requests.clone()),
            Box::new(r.families.errors.clone()),
            Box::new(r.durations.clone()),
            Box::new(r.inflight.clone()),
            Box::new(r.ejected.clone()),
            Box::new(r.table_version.clone()),
            Box::new(updates),
            Box::new(state_events),
            Box::new(r.shed.clone()),
            Box::new(r.grpc.clone()),
        ];
        r.register(own)
            .expect("the registry's own metrics have distinct names");
        r
    }
}

impl Registry {
    /// Add metrics owned elsewhere (connections, the queue, …) to what a scrape renders.
    pub fn register(&self, collectors: Vec<Box<dyn Collector>>) -> Result<(), prometheus::Error> {
        collectors
            .into_iter()
            .try_for_each(|c| self.prom.register(c))
    }

    pub fn count_update(&self, r: UpdateResult) {
        self.updates[r as usize].inc();
    }

    pub fn updates(&self, r: UpdateResult) -> u64 {
        self.updates[r as usize].get()
    }

    pub fn count_state(&self, e: StateEvent) {
        self.state_events[e as usize].inc();
    }

    pub fn unrouted(&self) -> Arc<BackendCounters> {
        self.unrouted.clone()
    }

    /// Handles for the services and backends of a table being installed. `keep` lists every
    /// (service, [backend ids]) of the new table; series of anything else are removed.
    pub fn handles_for(&self, keep: &[(&str, Vec<&str>)]) -> Vec<ServiceHandles> {
        let mut s = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let wanted_services: std::collections::HashSet<&str> =
            keep.iter().map(|(svc, _)| *svc).collect();
        s.services.retain(|name, _| {
            let keep = wanted_services.contains(name.as_str());
            if !keep {
                let _ = self.inflight.remove_label_values(&[name]);
                for class in rusty_shared::RequestClass::ALL {
                    let _ = self.shed.remove_label_values(&[name, class.as_str()]);
                }
                for code in 0..GRPC_CODES {
                    let _ = self.grpc.remove_label_values(&[name, &code.to_string()]);
                }
            }
            keep
        });
        let mut wanted_backends = std::collections::HashSet::new();
        for (svc, ids) in keep {
            wanted_backends.insert((*svc, ""));
            for id in ids {
                wanted_backends.insert((*svc, *id));
            }
        }
        s.backends.retain(|(svc, id), c| {
            let keep = wanted_backends.contains(&(svc.as_str(), id.as_str()));
            if !keep {
                c.retire(&self.ejected);
            }
            keep
        });
        keep.iter()
            .map(|(svc, ids)| {
                let service = s
                    .services
                    .entry((*svc).to_owned())
                    .or_insert_with(|| Arc::new(self.service_counters(svc)))
                    .clone();
                let mut backend = |id: &str| {
                    s.backends
                        .entry(((*svc).to_owned(), id.to_owned()))
                        .or_insert_with(|| {
                            let ejected = (!id.is_empty())
                                .then(|| self.ejected.with_label_values(&[svc, id]));
                            Arc::new(BackendCounters::new(
                                self.families.clone(),
                                svc,
                                id,
                                ejected,
                            ))
                        })
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

    fn service_counters(&self, svc: &str) -> ServiceCounters {
        ServiceCounters {
            duration: Latency::default(),
            inflight: self.inflight.with_label_values(&[svc]),
            shed: rusty_shared::RequestClass::ALL
                .map(|class| self.shed.with_label_values(&[svc, class.as_str()])),
            grpc: Default::default(),
            grpc_family: self.grpc.clone(),
            name: svc.into(),
        }
    }

    /// Every registered series in the Prometheus text exposition format, appended to `w`, with
    /// the installed table's version (`None` before the first). The caller sets each backend's
    /// ejected gauge first ([`BackendCounters::set_ejected`]).
    pub fn render(&self, table_version: Option<u64>, w: &mut String) {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.table_version.reset();
        if let Some(v) = table_version {
            self.table_version
                .with_label_values::<&str>(&[])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&self.prom.gather(), w) {
            tracing::warn!(error = %e, "cannot render the metrics");
        }
    }
}

/// The text exposition of these metrics alone (for the tests of their owners).
#[cfg(test)]
pub(crate) fn text_of(collectors: Vec<Box<dyn Collector>>) -> String {
    let registry = prometheus::Registry::new();
    for c in collectors {
        registry.register(c).expect("distinct names");
    }
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encodable")
}

/// The counters one installed service holds on to.
pub struct ServiceHandles {
    pub service: Arc<ServiceCounters>,
    pub no_backend: Arc<BackendCounters>,
    pub backends: Vec<Arc<BackendCounters>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusty_shared::exposition::{samples, value_of};

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
        r.render(Some(3), &mut text);
        let v = |name, labels: &[(&str, &str)]| value_of(&text, name, labels);
        assert_eq!(
            v(
                "rustybalancer_requests_total",
                &[("service", "web"), ("backend", "a"), ("code", "200")]
            ),
            Some(2.0),
            "{text}"
        );
        assert!(!text.contains("backend=\"b\""), "{text}");
        assert_eq!(
            v(
                "rustybalancer_request_duration_seconds_bucket",
                &[("service", "web"), ("le", "0.005")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "rustybalancer_request_duration_seconds_count",
                &[("service", "web")]
            ),
            Some(1.0)
        );
        assert_eq!(v("rustybalancer_table_version", &[]), Some(3.0));
        assert_eq!(
            v(
                "rustybalancer_backend_ejected",
                &[("service", "web"), ("backend", "a")]
            ),
            Some(0.0)
        );
    }

    #[test]
    fn a_request_still_on_an_old_table_never_brings_back_a_removed_backend() {
        let r = Registry::default();
        let old = r.handles_for(&[("web", vec!["a", "b"])]);
        old[0].backends[1].count_response(200);
        r.handles_for(&[("web", vec!["a"])]);
        // Counted after the install, on a code and a kind it had not used before.
        old[0].backends[1].count_response(503);
        old[0].backends[1].count_error(UpstreamError::Closed);
        old[0].backends[1].count_response(200);
        let mut text = String::new();
        r.render(Some(2), &mut text);
        assert!(
            samples(&text).all(|s| s.label("backend") != Some("b")),
            "{text}"
        );
        assert!(!text.contains("rustybalancer_retired"), "{text}");
    }

    #[test]
    fn label_values_are_escaped_and_the_histogram_reads_back() {
        let r = Registry::default();
        let h = r.handles_for(&[("we\"b", vec!["x"])]);
        h[0].backends[0].count_response(200);
        h[0].service.observe(2_000_000);
        h[0].service.observe(20_000_000_000);
        let mut text = String::new();
        r.render(None, &mut text);
        assert_eq!(
            value_of(
                &text,
                "rustybalancer_requests_total",
                &[("service", "we\"b"), ("backend", "x"), ("code", "200")]
            ),
            Some(1.0),
            "{text}"
        );
        let (buckets, sum) = h[0].service.histogram();
        assert_eq!(buckets[0], (0.005, 1));
        assert_eq!(
            buckets.iter().map(|b| b.1).sum::<u64>(),
            1,
            "20 s is over every bound"
        );
        assert_eq!(h[0].service.observed(), 2);
        assert!((sum - 20.002).abs() < 1e-9);
    }

    #[test]
    fn update_results_are_counted_apart() {
        let r = Registry::default();
        r.count_update(UpdateResult::Applied);
        r.count_update(UpdateResult::Stale);
        r.count_update(UpdateResult::Stale);
        let mut text = String::new();
        r.render(None, &mut text);
        for (result, n) in [("applied", 1.0), ("stale", 2.0), ("rejected", 0.0)] {
            assert_eq!(
                value_of(
                    &text,
                    "rustybalancer_table_updates_total",
                    &[("result", result)]
                ),
                Some(n)
            );
        }
        assert_eq!(value_of(&text, "rustybalancer_table_version", &[]), None);
    }
}
