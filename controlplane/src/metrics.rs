//! The agent's Prometheus metrics, on the `prometheus` crate: typed metrics in one registry,
//! rendered by its text encoder. Nothing here is on a hot path (a few events per second). Gauges
//! that describe the current state (instances by state, desired replicas, certificates) are set
//! from a status snapshot at scrape time.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};

use prometheus::core::Collector;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::api::Status;

/// State files found damaged, and replaced by their previous version: counted wherever a state
/// dir is read, so process-wide.
static STATE_FILES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "rusty_agent_state_files_total",
        "State files found damaged (unusable) and replaced by their previous version (fell_back).",
        &["event"],
    )
});
pub static UNUSABLE: LazyLock<IntCounter> =
    LazyLock::new(|| STATE_FILES.with_label_values(&["unusable"]));
pub static FELL_BACK: LazyLock<IntCounter> =
    LazyLock::new(|| STATE_FILES.with_label_values(&["fell_back"]));

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a constant metric name")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("a constant metric name")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("a constant metric name")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("a constant metric name")
}

pub struct Metrics {
    registry: prometheus::Registry,
    checks: IntCounterVec,
    deploys: IntCounterVec,
    restarts: IntCounterVec,
    autoscales: IntCounterVec,
    outliers: IntCounterVec,
    acme_orders: IntCounterVec,
    instances: IntGaugeVec,
    desired: IntGaugeVec,
    observed_inflight: GaugeVec,
    acme_expiry: IntGaugeVec,
    acme_failures: IntGaugeVec,
    table_version: IntGauge,
    pub tables_published: IntCounter,
    pub table_frames_sent: IntCounter,
    pub subscribers: IntGauge,
    pub subscribers_refused: IntCounter,
    pub cert_bundles_sent: IntCounter,
    /// Bundles not sent: the subscriber asked over plain `ws://` from off loopback.
    pub cert_bundles_withheld: IntCounter,
    /// Scrapes set the state gauges one at a time.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: prometheus::Registry::new(),
            instances: gauge_vec(
                "rusty_agent_instances",
                "Instances by service and state.",
                &["service", "state"],
            ),
            desired: gauge_vec(
                "rusty_agent_desired_replicas",
                "Desired instances by service.",
                &["service"],
            ),
            checks: counter_vec(
                "rusty_agent_health_checks_total",
                "Health checks by service and result.",
                &["service", "result"],
            ),
            restarts: counter_vec(
                "rusty_agent_instance_restarts_total",
                "Instances restarted after they exited on their own.",
                &["service"],
            ),
            deploys: counter_vec(
                "rusty_agent_deploys_total",
                "Finished deploys by service and outcome.",
                &["service", "outcome"],
            ),
            autoscales: counter_vec(
                "rusty_agent_autoscale_decisions_total",
                "Autoscaling decisions by service and direction (out, in).",
                &["service", "direction"],
            ),
            outliers: counter_vec(
                "rusty_agent_outlier_replacements_total",
                "Instances replaced because the data planes kept ejecting them.",
                &["service"],
            ),
            observed_inflight: GaugeVec::new(
                Opts::new(
                    "rusty_agent_observed_inflight",
                    "Requests in flight the data planes last reported, by autoscaled service.",
                ),
                &["service"],
            )
            .expect("a constant metric name"),
            acme_orders: counter_vec(
                "rusty_agent_acme_orders_total",
                "ACME orders by name and result (issued, failed).",
                &["host", "result"],
            ),
            acme_expiry: gauge_vec(
                "rusty_agent_acme_certificate_expiry_timestamp_seconds",
                "End of validity of the ACME certificate serving each name.",
                &["host"],
            ),
            acme_failures: gauge_vec(
                "rusty_agent_acme_failures",
                "Orders failed in a row, by name (0 once one succeeds).",
                &["host"],
            ),
            table_version: gauge(
                "rusty_agent_table_version",
                "Version of the last published table.",
            ),
            tables_published: counter(
                "rusty_agent_tables_published_total",
                "Table versions published.",
            ),
            table_frames_sent: counter(
                "rusty_agent_table_pushes_total",
                "Tables sent to subscribers (one per subscriber and version it received).",
            ),
            subscribers: gauge(
                "rusty_agent_subscribers",
                "Data planes subscribed to the table stream.",
            ),
            subscribers_refused: counter(
                "rusty_agent_subscribers_refused_total",
                "Table stream requests refused (bad or missing token).",
            ),
            cert_bundles_sent: counter(
                "rusty_agent_cert_bundles_sent_total",
                "Certificate bundles sent to data planes.",
            ),
            cert_bundles_withheld: counter(
                "rusty_agent_cert_bundles_withheld_total",
                "Subscriptions that asked for certificates over plain ws:// from off loopback, and got none.",
            ),
            scrape: Mutex::new(()),
        };
        let all: Vec<Box<dyn Collector>> = vec![
            Box::new(m.instances.clone()),
            Box::new(m.desired.clone()),
            Box::new(m.checks.clone()),
            Box::new(m.restarts.clone()),
            Box::new(m.deploys.clone()),
            Box::new(m.autoscales.clone()),
            Box::new(m.outliers.clone()),
            Box::new(m.observed_inflight.clone()),
            Box::new(m.acme_orders.clone()),
            Box::new(m.acme_expiry.clone()),
            Box::new(m.acme_failures.clone()),
            Box::new(STATE_FILES.clone()),
            Box::new(m.table_version.clone()),
            Box::new(m.tables_published.clone()),
            Box::new(m.table_frames_sent.clone()),
            Box::new(m.subscribers.clone()),
            Box::new(m.subscribers_refused.clone()),
            Box::new(m.cert_bundles_sent.clone()),
            Box::new(m.cert_bundles_withheld.clone()),
        ];
        for c in all {
            m.registry
                .register(c)
                .expect("the agent's metrics have distinct names");
        }
        // Both state-file events are shown from the start, at 0.
        LazyLock::force(&UNUSABLE);
        LazyLock::force(&FELL_BACK);
        m
    }
}

impl Metrics {
    pub fn check(&self, service: &str, ok: bool) {
        let result = if ok { "pass" } else { "fail" };
        self.checks.with_label_values(&[service, result]).inc();
    }

    pub fn deploy(&self, service: &str, outcome: &'static str) {
        self.deploys.with_label_values(&[service, outcome]).inc();
    }

    /// An autoscaling decision, `direction` = `out` or `in`.
    pub fn autoscale(&self, service: &str, direction: &'static str) {
        self.autoscales
            .with_label_values(&[service, direction])
            .inc();
    }

    /// An instance replaced because the data planes kept ejecting it.
    pub fn outlier(&self, service: &str) {
        self.outliers.with_label_values(&[service]).inc();
    }

    /// An ACME order for `host` ended, `result` = `issued` or `failed`.
    pub fn acme_order(&self, host: &str, result: &'static str) {
        self.acme_orders.with_label_values(&[host, result]).inc();
    }

    pub fn restart(&self, service: &str) {
        self.restarts.with_label_values(&[service]).inc();
    }

    /// The text exposition format, with the state gauges taken from `status`.
    pub fn render(&self, status: &Status) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.instances.reset();
        self.desired.reset();
        self.observed_inflight.reset();
        for s in &status.services {
            let mut by_state: BTreeMap<&str, i64> =
                ["starting", "healthy", "unhealthy", "draining", "stopping"]
                    .into_iter()
                    .map(|k| (k, 0))
                    .collect();
            for i in &s.instances {
                let state = match i.phase.as_str() {
                    "running" if i.in_table => "healthy",
                    "running" => "unhealthy",
                    other => other,
                };
                *by_state.entry(state).or_default() += 1;
            }
            for (state, n) in by_state {
                self.instances.with_label_values(&[&s.name, state]).set(n);
            }
            self.desired
                .with_label_values(&[&s.name])
                .set(i64::from(s.replicas));
            if let Some(load) = s.autoscale.as_ref().and_then(|a| a.load) {
                self.observed_inflight
                    .with_label_values(&[&s.name])
                    .set(load);
            }
        }
        self.acme_expiry.reset();
        self.acme_failures.reset();
        for c in &status.acme {
            if let Some(t) = c.not_after {
                self.acme_expiry.with_label_values(&[&c.host]).set(t);
            }
            self.acme_failures
                .with_label_values(&[&c.host])
                .set(i64::from(c.failures));
        }
        self.table_version.set(
            status
                .table_version
                .map_or(0, |v| v.min(i64::MAX as u64) as i64),
        );
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# cannot render the metrics: {e}\n"))
    }
}
