//! Reading the data planes' load for autoscaling: each data plane's `/metrics` (its admin
//! listener), fetched by the agent. The control channel stays one-way: data planes never talk
//! back on it; the agent asks them over plain HTTP like any Prometheus server would.
//!
//! One sample is the sum over every data plane that answered of
//! `rustybalancer_inflight_requests{service="…"}` (for autoscaling), and the backends any of them
//! reports in `rustybalancer_backend_ejected` (for outliers). When none answers there is no
//! sample at all (missing data is not a zero load, so it must not scale anything in).
//!
//! A data plane named `tasks.SERVICE:PORT` is Swarm's DNS name for every task of a service (the
//! data planes' global service): it is resolved each round and every address is scraped as one
//! data plane, so data planes on nodes that join or leave are followed without a config change.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rusty_shared::exposition::samples;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// One reading of the data planes: requests in flight per service (summed), and the backends
/// any of them reports ejected. Sent to the core on its own channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub inflight: HashMap<String, f64>,
    pub ejected: HashSet<(String, String)>,
    /// Every data plane answered.
    pub complete: bool,
}

/// How long one scrape of one data plane may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest `/metrics` answer read.
const MAX_BODY: usize = 16 << 20;

/// The backends one data plane's metrics text reports ejected, as (service, backend id).
pub fn ejected_backends(text: &str) -> HashSet<(String, String)> {
    samples(text)
        .filter(|s| s.name == "rustybalancer_backend_ejected" && s.value == 1.0)
        .filter_map(|s| {
            Some((
                s.label("service")?.to_owned(),
                s.label("backend")?.to_owned(),
            ))
        })
        .collect()
}

/// The requests in flight per service in one data plane's metrics text.
pub fn inflight_by_service(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for s in samples(text) {
        if s.name != "rustybalancer_inflight_requests" || !s.value.is_finite() || s.value < 0.0 {
            continue;
        }
        if let Some(service) = s.label("service") {
            *out.entry(service.to_owned()).or_insert(0.0) += s.value;
        }
    }
    out
}

/// GET `http://{addr}/metrics`, with the bearer token if the data plane needs one.
async fn fetch(addr: &str, token: Option<&str>) -> Result<String, String> {
    let run = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let head =
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        s.take(MAX_BODY as u64)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(head.lines().next().unwrap_or("").to_owned());
        }
        Ok(body.to_owned())
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, run)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// The data planes to scrape this round: `tasks.` names expanded to every address they resolve
/// to (sorted, so the order and the log are stable); others as written. A `tasks.` name that
/// does not resolve stays as written, to fail (and be logged) like an unreachable data plane.
async fn expand(planes: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(planes.len());
    for plane in planes {
        if !plane.starts_with("tasks.") {
            out.push(plane.clone());
            continue;
        }
        match tokio::net::lookup_host(plane.as_str()).await {
            Ok(addrs) => {
                let mut addrs: Vec<String> = addrs.map(|a| a.to_string()).collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    out.push(plane.clone());
                }
                out.extend(addrs);
            }
            Err(e) => {
                debug!(data_plane = %plane, "does not resolve: {e}");
                out.push(plane.clone());
            }
        }
    }
    out
}

/// Scrape every data plane each `interval` and hand the summed load to the core, until shutdown.
pub async fn run(
    planes: Vec<String>,
    token: Option<String>,
    interval: Duration,
    samples: mpsc::Sender<Sample>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Data planes whose last scrape failed, and those whose last one answered: a change either
    // way, and the first answer of each (one found through `tasks.`, say), is logged once.
    let mut failing: HashSet<String> = HashSet::new();
    let mut answering: HashSet<String> = HashSet::new();
    // Each data plane's last ejected set, kept while it does not answer: a failed scrape must
    // not look like its ejections ended (and then began again).
    let mut last_ejected: HashMap<String, HashSet<(String, String)>> = HashMap::new();
    loop {
        let mut total: HashMap<String, f64> = HashMap::new();
        let mut answered = 0;
        let targets = expand(&planes).await;
        // Data planes that left (a node gone from the swarm) take their ejections with them.
        last_ejected.retain(|plane, _| targets.contains(plane));
        failing.retain(|plane| targets.contains(plane));
        answering.retain(|plane| {
            let stays = targets.contains(plane);
            if !stays {
                info!(data_plane = %plane, "data plane gone from the names resolved");
            }
            stays
        });
        for plane in &targets {
            match fetch(plane, token.as_deref()).await {
                Ok(text) => {
                    answered += 1;
                    if failing.remove(plane) {
                        warn!(data_plane = %plane, "metrics answer again");
                    } else if !answering.contains(plane) {
                        info!(data_plane = %plane, "metrics answer");
                    }
                    answering.insert(plane.clone());
                    for (svc, v) in inflight_by_service(&text) {
                        *total.entry(svc).or_insert(0.0) += v;
                    }
                    last_ejected.insert(plane.clone(), ejected_backends(&text));
                }
                Err(e) => {
                    answering.remove(plane);
                    if failing.insert(plane.clone()) {
                        warn!(data_plane = %plane, error = %e,
                            "cannot read the data plane's metrics; autoscaling uses the others");
                    }
                }
            }
        }
        if answered > 0 {
            debug!(?total, answered, "load sampled");
            let sample = Sample {
                inflight: total,
                ejected: last_ejected.values().flatten().cloned().collect(),
                complete: answered == targets.len(),
            };
            if samples.send(sample).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tasks_name_is_every_address_it_resolves_to_and_others_stay_as_written() {
        // `tasks.localhost` is no Swarm name here, and resolves to nothing: it stays as written
        // (to fail like an unreachable data plane) rather than vanish from `complete`.
        let planes = vec![
            "127.0.0.1:9100".to_owned(),
            "localhost:9100".to_owned(),
            "tasks.rustybalancer-no-such-service.invalid:9100".to_owned(),
        ];
        let got = expand(&planes).await;
        assert_eq!(got, planes);
    }

    #[test]
    fn inflight_is_read_per_service_and_other_series_are_ignored() {
        let text = "# HELP rustybalancer_inflight_requests x\n\
            # TYPE rustybalancer_inflight_requests gauge\n\
            rustybalancer_inflight_requests{service=\"web\"} 7\n\
            rustybalancer_inflight_requests{service=\"api\"} 0\n\
            rustybalancer_inflight_requests_other{service=\"web\"} 99\n\
            rustybalancer_requests_total{service=\"web\",backend=\"a\",code=\"200\"} 5\n\
            rustybalancer_inflight_requests{service=\"bad\"} x\n";
        let m = inflight_by_service(text);
        assert_eq!(m.get("web"), Some(&7.0));
        assert_eq!(m.get("api"), Some(&0.0));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn ejected_backends_are_those_reported_at_1_whatever_the_label_order() {
        let text = "rustybalancer_backend_ejected{service=\"web\",backend=\"web-2\"} 1\n\
            rustybalancer_backend_ejected{service=\"web\",backend=\"web-3\"} 0\n\
            rustybalancer_backend_ejected{backend=\"api-1\",service=\"api\"} 1\n";
        let e = ejected_backends(text);
        assert!(e.contains(&("web".to_owned(), "web-2".to_owned())));
        assert!(e.contains(&("api".to_owned(), "api-1".to_owned())));
        assert_eq!(e.len(), 2);
    }
}
