//! Monitoring with the real tools: `promtool` checks the shipped rules (`monitoring/rules.yml`),
//! runs their unit tests and lints both planes' `/metrics`; a real Prometheus (Debian's
//! `prometheus`) scrapes an agent and a data plane under load and answers PromQL through its
//! HTTP API — request rate by backend, a latency quantile from the histogram, an ejected
//! backend, the queue — with the shipped rules loaded and alerts pending, and evaluates every
//! panel of the Grafana dashboard (`monitoring/grafana/rustybalancer.json`). Without
//! Prometheus (`scripts/setup.sh` installs it) the tests say so loudly and check nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use rusty_e2e::*;

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("monitoring")
}

fn missing(tool: &str) -> bool {
    let missing = Command::new(tool).arg("--version").output().is_err();
    if missing {
        eprintln!("\n==== SKIPPED: no {tool} here (scripts/setup.sh installs Debian's prometheus); monitoring is untested ====\n");
    }
    missing
}

/// Run promtool; panics with its output unless it succeeds.
fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> String {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("feed promtool");
    drop(input);
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_shipped_rules_and_config_pass_promtool_and_their_unit_tests() {
    if missing("promtool") {
        return;
    }
    let dir = monitoring_dir();
    let out = promtool(&["check", "rules", "rules.yml"], &dir, None);
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");
    let out = promtool(&["test", "rules", "rules.test.yml"], &dir, None);
    assert!(out.contains("SUCCESS"), "{out}");
    promtool(&["check", "config", "prometheus.yml"], &dir, None);
}

/// `GET path` on Prometheus, as HTTP/1.0 so the answer is delimited by the close.
fn prom_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to prometheus");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("prometheus answers");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query: the result vector, or panics with Prometheus' error.
fn query(port: u16, promql: &str) -> Vec<Value> {
    let (status, body) = prom_get(port, &format!("/api/v1/query?query={}", urlencode(promql)));
    let v: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{promql}: {e}: {status} {body}"));
    assert_eq!(v["status"], "success", "{promql}: {body}");
    match &v["data"]["result"] {
        Value::Array(a) => a.clone(),
        // A scalar query: one pseudo-sample.
        other => vec![serde_json::json!({ "metric": {}, "value": other })],
    }
}

fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Query until `check` holds for the result, for at most `limit`.
fn wait_query(
    port: u16,
    promql: &str,
    limit: Duration,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let r = query(port, promql);
        if check(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{promql} never held: {r:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A real Prometheus on a fresh port, scraping the given jobs every second with the shipped
/// rules, its data in a scratch directory.
struct Prometheus {
    _proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    fn start(jobs: &[(&str, u16)]) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let port = free_port();
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
            monitoring_dir().join("rules.yml").display()
        );
        for (job, target) in jobs {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ));
        }
        let file = dir.path("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let proc = Proc::spawn(
            "prometheus",
            Path::new("prometheus"),
            &[
                format!("--config.file={}", file.display()),
                format!("--storage.tsdb.path={}", dir.path("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--log.level=warn".to_owned(),
            ],
        );
        wait_for_port(port, Duration::from_secs(30));
        // It listens before its storage is ready, answering 503 meanwhile.
        let deadline = Instant::now() + Duration::from_secs(30);
        while prom_get(port, "/-/ready").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "prometheus never got ready: {}",
                proc.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Prometheus {
            _proc: proc,
            port,
            _dir: dir,
        }
    }
}

/// The dashboard's panel queries as (panel title, PromQL), its variables substituted the way
/// Grafana would for "All" services and a 15 s rate interval.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(monitoring_dir().join("grafana/rustybalancer.json"))
        .expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(p) = panels.pop() {
        // Rows hold their panels when collapsed.
        panels.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has an expr");
            let expr = expr
                .replace("$__rate_interval", "15s")
                .replace("$__interval", "15s")
                .replace("$__range", "5m")
                .replace("$service", ".*");
            assert!(
                !expr.contains('$'),
                "a variable the test does not know: {expr}"
            );
            out.push((p["title"].as_str().unwrap_or("?").to_owned(), expr));
        }
    }
    out
}

#[test]
fn a_real_prometheus_scrapes_both_planes_and_answers_the_dashboard() {
    if missing("prometheus") || missing("promtool") {
        return;
    }
    // `web`: two backends the test owns, checked every 5 s and removed only after 10 failed
    // checks, so one that dies stays in the table long enough for the data plane to eject it.
    // `slow`: one instance the agent runs, 300 ms a request, one at a time: the rest queue.
    let (a, b) = (Echo::start("web-a"), Echo::start("web-b"));
    let services = format!(
        r#"
[services.web]
runtime = "static"
hosts = ["web.test"]
addresses = ["{}", "{}"]

[services.web.health]
interval = "5s"
timeout = "1s"
rise = 1
fall = 10

[services.slow]
command = "{echo}"
args = ["--listen", "{{host}}:{{port}}", "--id", "slow{{instance}}", "--delay-ms", "300"]
hosts = ["slow.test"]
replicas = 1
max_inflight = 1
queue_timeout = "10s"

[services.slow.health]
interval = "100ms"
timeout = "1s"
rise = 2
fall = 3
"#,
        a.addr(),
        b.addr(),
        echo = bin("rusty-echo").display()
    );
    let agent = Agent::start("monitoring", &services);
    let lb = agent.lb();
    agent.wait_serving("web", 2, Duration::from_secs(20));
    agent.wait_serving("slow", 1, Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while lb.get("slow.test", "/").status != 200 || lb.get("web.test", "/").status != 200 {
        assert!(
            Instant::now() < deadline,
            "the data plane never served both"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Both planes' expositions pass promtool's lint.
    let dir = monitoring_dir();
    promtool(
        &["check", "metrics"],
        &dir,
        Some(&lb.admin_get("/metrics").body),
    );
    promtool(
        &["check", "metrics"],
        &dir,
        Some(&agent.api_get("/metrics").body),
    );

    let prom = Prometheus::start(&[
        ("rustybalancer-dataplane", lb.admin),
        ("rustybalancer-agent", agent.port),
    ]);
    let web = LoadLoop::start(lb.port, "web.test", 2, Duration::from_secs(90));
    // Four clients on `slow`: one is served while the others wait in the queue.
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let (stop, port) = (stop.clone(), lb.port);
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                let deadline = Instant::now() + Duration::from_secs(90);
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    statuses.push(client.get("slow.test", "/").map_or(0, |r| r.status));
                }
                statuses
            })
        })
        .collect();

    let p = prom.port;
    wait_query(p, "up", Duration::from_secs(30), |r| {
        r.len() == 2 && r.iter().all(|s| value(s) == 1.0)
    });

    // Request rate by backend: both of web's backends are serving.
    let rates = wait_query(
        p,
        r#"sum by (backend) (rate(rustybalancer_requests_total{service="web",code="200"}[10s]))"#,
        Duration::from_secs(30),
        |r| r.len() == 2 && r.iter().all(|s| value(s) > 1.0),
    );
    eprintln!("request rate by backend: {rates:?}");

    // The queue: `slow` serves one request at a time; three wait for it.
    let waiting = wait_query(
        p,
        r#"sum(rustybalancer_queue_waiting{class="normal"})"#,
        Duration::from_secs(30),
        |r| r.first().is_some_and(|s| value(s) >= 1.0),
    );
    eprintln!("queue waiting: {waiting:?}");
    let wait_p50 = wait_query(
        p,
        r#"histogram_quantile(0.5, sum by (le) (rate(rustybalancer_queue_wait_seconds_bucket{class="normal"}[15s])))"#,
        Duration::from_secs(30),
        |r| r.first().is_some_and(|s| value(s) > 0.1),
    );
    eprintln!("queue wait p50: {wait_p50:?}");

    // Latency quantiles from the histogram: `slow` takes its 300 ms (and its wait), `web` not.
    let slow_p50 = wait_query(
        p,
        r#"histogram_quantile(0.5, sum by (le) (rate(rustybalancer_request_duration_seconds_bucket{service="slow"}[15s])))"#,
        Duration::from_secs(30),
        |r| r.first().is_some_and(|s| value(s) >= 0.25),
    );
    let web_p50 = query(
        p,
        r#"histogram_quantile(0.5, sum by (le) (rate(rustybalancer_request_duration_seconds_bucket{service="web"}[15s])))"#,
    );
    eprintln!("p50 slow {slow_p50:?}, web {web_p50:?}");
    assert!(
        web_p50.first().is_some_and(|s| value(s) < 0.1),
        "{web_p50:?}"
    );
    // And the recorded rule says the same.
    wait_query(
        p,
        r#"service:rustybalancer_request_duration_seconds:p50_rate1m{service="slow"}"#,
        Duration::from_secs(30),
        |r| r.first().is_some_and(|s| value(s) >= 0.25),
    );

    // An ejected backend: web-b dies; the data plane ejects it on its failed connects long
    // before the agent's checks take it out of the table.
    let table: Value = serde_json::from_str(&lb.admin_get("/table").body).unwrap();
    let b_id = table["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["backends"].as_array().into_iter().flatten())
        .find(|be| be["addr"] == b.addr())
        .and_then(|be| be["id"].as_str())
        .unwrap_or_else(|| panic!("web-b in the table: {table}"))
        .to_owned();
    drop(b);
    let ejected = wait_query(
        p,
        r#"max by (backend) (rustybalancer_backend_ejected{service="web"}) == 1"#,
        Duration::from_secs(30),
        |r| !r.is_empty(),
    );
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert_eq!(
        ejected[0]["metric"]["backend"],
        b_id.as_str(),
        "{ejected:?}"
    );
    wait_query(
        p,
        r#"sum(rustybalancer_upstream_errors_total{service="web",kind="connect_refused"})"#,
        Duration::from_secs(30),
        |r| r.first().is_some_and(|s| value(s) >= 1.0),
    );

    // The shipped rules loaded and evaluate without error; the alerts of what is going on are
    // on their way to firing.
    let (_, rules) = prom_get(p, "/api/v1/rules");
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let all: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert!(all.len() >= 20, "{rules}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, alerts) = prom_get(p, "/api/v1/alerts");
        let alerts: Value = serde_json::from_str(&alerts).unwrap();
        let names: Vec<&str> = alerts["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["labels"]["alertname"].as_str())
            .collect();
        if names.contains(&"RustyBalancerBackendEjected")
            && names.contains(&"RustyBalancerSaturated")
        {
            break;
        }
        assert!(Instant::now() < deadline, "alerts: {alerts}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, rules) = prom_get(p, "/api/v1/rules");
    let rules: Value = serde_json::from_str(&rules).unwrap();
    for r in rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed: {}",
            r["name"], r["lastError"]
        );
    }

    // Every dashboard panel evaluates, and shows data where this stack has some.
    // Panels with nothing to show here: no TLS listener or ACME, no autoscaling, no deploy, no
    // instance that exited by itself, no outlier replaced.
    let empty_here = [
        "Certificate expiry (days left)",
        "ACME certificate expiry (days left)",
        "Autoscale decisions",
        "Restarts, deploys and outlier replacements",
    ];
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    // A series born a moment ago (the errors of the backend just killed, the agent's first
    // failed check of it, every 5 s) needs two scrapes in a rate's window: wait for that.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let expected = !empty_here.contains(&title.as_str());
        while expected && query(p, expr).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
        }
        if expected && query(p, expr).is_empty() {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "panels without data: {empty:#?}");

    stop.store(true, Ordering::Relaxed);
    let report = web.finish();
    let slow_statuses: Vec<u16> = slow.into_iter().flat_map(|h| h.join().unwrap()).collect();
    // web's clients were retried off the dead backend; slow's waited their turn.
    assert!(report.ok > 100, "{report:?}");
    assert!(
        slow_statuses.iter().filter(|s| **s == 200).count() >= 10,
        "{slow_statuses:?}"
    );
    drop(a);
}
