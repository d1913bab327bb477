//! The agent's Prometheus metrics. Nothing here is on a hot path (a few events per second), so a
//! mutex around labelled counters is the simple and sufficient choice. Gauges that describe the
//! current state (instances by state) are computed from a status snapshot at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::api::Status;

#[derive(Default)]
pub struct Metrics {
    checks: Mutex<BTreeMap<(String, &'static str), u64>>,
    deploys: Mutex<BTreeMap<(String, &'static str), u64>>,
    restarts: Mutex<BTreeMap<String, u64>>,
    autoscales: Mutex<BTreeMap<(String, &'static str), u64>>,
    outliers: Mutex<BTreeMap<String, u64>>,
    acme_orders: Mutex<BTreeMap<(String, &'static str), u64>>,
    pub tables_published: AtomicU64,
    pub table_frames_sent: AtomicU64,
    pub subscribers: AtomicI64,
    pub subscribers_refused: AtomicU64,
    pub cert_bundles_sent: AtomicU64,
    /// Bundles not sent: the subscriber asked over plain `ws://` from off loopback.
    pub cert_bundles_withheld: AtomicU64,
}

fn bump(map: &Mutex<BTreeMap<(String, &'static str), u64>>, service: &str, label: &'static str) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry((service.to_owned(), label)).or_default() += 1;
}

fn bump_service(map: &Mutex<BTreeMap<String, u64>>, service: &str) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry(service.to_owned()).or_default() += 1;
}

impl Metrics {
    pub fn check(&self, service: &str, ok: bool) {
        bump(&self.checks, service, if ok { "pass" } else { "fail" });
    }

    pub fn deploy(&self, service: &str, outcome: &'static str) {
        bump(&self.deploys, service, outcome);
    }

    /// An autoscaling decision, `direction` = `out` or `in`.
    pub fn autoscale(&self, service: &str, direction: &'static str) {
        bump(&self.autoscales, service, direction);
    }

    /// An instance replaced because the data planes kept ejecting it.
    pub fn outlier(&self, service: &str) {
        bump_service(&self.outliers, service);
    }

    /// An ACME order for `host` ended, `result` = `issued` or `failed`.
    pub fn acme_order(&self, host: &str, result: &'static str) {
        bump(&self.acme_orders, host, result);
    }

    pub fn restart(&self, service: &str) {
        bump_service(&self.restarts, service);
    }

    /// The text exposition format, with the state gauges taken from `status`.
    pub fn render(&self, status: &Status) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# HELP rusty_agent_instances Instances by service and state.\n# TYPE rusty_agent_instances gauge\n");
        for s in &status.services {
            let mut by_state: BTreeMap<&str, u64> =
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
                let _ = writeln!(
                    out,
                    "rusty_agent_instances{{service=\"{}\",state=\"{state}\"}} {n}",
                    s.name
                );
            }
        }
        out.push_str("# HELP rusty_agent_desired_replicas Desired instances by service.\n# TYPE rusty_agent_desired_replicas gauge\n");
        for s in &status.services {
            let _ = writeln!(
                out,
                "rusty_agent_desired_replicas{{service=\"{}\"}} {}",
                s.name, s.replicas
            );
        }
        counters(
            &mut out,
            "rusty_agent_health_checks_total",
            "Health checks by service and result.",
            "result",
            &self.checks,
        );
        service_counters(
            &mut out,
            "rusty_agent_instance_restarts_total",
            "Instances restarted after they exited on their own.",
            &self.restarts,
        );
        counters(
            &mut out,
            "rusty_agent_deploys_total",
            "Finished deploys by service and outcome.",
            "outcome",
            &self.deploys,
        );
        counters(
            &mut out,
            "rusty_agent_autoscale_decisions_total",
            "Autoscaling decisions by service and direction (out, in).",
            "direction",
            &self.autoscales,
        );
        service_counters(
            &mut out,
            "rusty_agent_outlier_replacements_total",
            "Instances replaced because the data planes kept ejecting them.",
            &self.outliers,
        );
        out.push_str("# HELP rusty_agent_observed_inflight Requests in flight the data planes last reported, by autoscaled service.\n# TYPE rusty_agent_observed_inflight gauge\n");
        for s in &status.services {
            if let Some(load) = s.autoscale.as_ref().and_then(|a| a.load) {
                let _ = writeln!(
                    out,
                    "rusty_agent_observed_inflight{{service=\"{}\"}} {load}",
                    s.name
                );
            }
        }
        let _ = writeln!(out, "# HELP rusty_agent_acme_orders_total ACME orders by name and result (issued, failed).\n# TYPE rusty_agent_acme_orders_total counter");
        for ((host, result), n) in self
            .acme_orders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "rusty_agent_acme_orders_total{{host=\"{host}\",result=\"{result}\"}} {n}"
            );
        }
        out.push_str("# HELP rusty_agent_acme_certificate_expiry_timestamp_seconds End of validity of the ACME certificate serving each name.\n# TYPE rusty_agent_acme_certificate_expiry_timestamp_seconds gauge\n");
        for c in &status.acme {
            if let Some(t) = c.not_after {
                let _ = writeln!(
                    out,
                    "rusty_agent_acme_certificate_expiry_timestamp_seconds{{host=\"{}\"}} {t}",
                    c.host
                );
            }
        }
        out.push_str("# HELP rusty_agent_acme_failures Orders failed in a row, by name (0 once one succeeds).\n# TYPE rusty_agent_acme_failures gauge\n");
        for c in &status.acme {
            let _ = writeln!(
                out,
                "rusty_agent_acme_failures{{host=\"{}\"}} {}",
                c.host, c.failures
            );
        }
        let _ = writeln!(
            out,
            "# HELP rusty_agent_state_files_total State files found damaged (unusable) and replaced by their previous version (fell_back).\n# TYPE rusty_agent_state_files_total counter\nrusty_agent_state_files_total{{event=\"unusable\"}} {}\nrusty_agent_state_files_total{{event=\"fell_back\"}} {}",
            crate::state::UNUSABLE.load(Ordering::Relaxed),
            crate::state::FELL_BACK.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rusty_agent_table_version Version of the last published table.\n# TYPE rusty_agent_table_version gauge\nrusty_agent_table_version {}",
            status.table_version.unwrap_or(0)
        );
        let _ = writeln!(
            out,
            "# HELP rusty_agent_tables_published_total Table versions published.\n# TYPE rusty_agent_tables_published_total counter\nrusty_agent_tables_published_total {}",
            self.tables_published.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rusty_agent_table_pushes_total Tables sent to subscribers (one per subscriber and version it received).\n# TYPE rusty_agent_table_pushes_total counter\nrusty_agent_table_pushes_total {}",
            self.table_frames_sent.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rusty_agent_subscribers Data planes subscribed to the table stream.\n# TYPE rusty_agent_subscribers gauge\nrusty_agent_subscribers {}",
            self.subscribers.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rusty_agent_subscribers_refused_total Table stream requests refused (bad or missing token).\n# TYPE rusty_agent_subscribers_refused_total counter\nrusty_agent_subscribers_refused_total {}",
            self.subscribers_refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rusty_agent_cert_bundles_sent_total Certificate bundles sent to data planes.\n# TYPE rusty_agent_cert_bundles_sent_total counter\nrusty_agent_cert_bundles_sent_total {}",
            self.cert_bundles_sent.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rusty_agent_cert_bundles_withheld_total Subscriptions that asked for certificates over plain ws:// from off loopback, and got none.\n# TYPE rusty_agent_cert_bundles_withheld_total counter\nrusty_agent_cert_bundles_withheld_total {}",
            self.cert_bundles_withheld.load(Ordering::Relaxed)
        );
        out
    }
}

/// A counter labelled by service and one more label, from its map.
fn counters(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    map: &Mutex<BTreeMap<(String, &'static str), u64>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for ((svc, value), n) in map.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "{name}{{service=\"{svc}\",{label}=\"{value}\"}} {n}");
    }
}

/// A counter labelled by service only.
fn service_counters(out: &mut String, name: &str, help: &str, map: &Mutex<BTreeMap<String, u64>>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (svc, n) in map.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "{name}{{service=\"{svc}\"}} {n}");
    }
}
