//! The agent end to end: real `rusty-agent`, `rusty-lb` and `rusty-echo` processes on loopback,
//! with a bounded load loop through the data plane while the agent scales, replaces and rolls
//! instances. Every test asserts zero failed requests where the issue promises it.

use std::process::Command;
use std::time::{Duration, Instant};

use rusty_e2e::*;

const LIMIT: Duration = Duration::from_secs(30);

fn instance<'a>(svc: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    svc["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["id"] == id))
        .unwrap_or_else(|| panic!("no instance {id}: {svc:#}"))
}

fn pid_alive(pid: i64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// An agent running `services`, a data plane on it serving `backends` backends, and a bounded
/// load loop through that data plane.
fn stack_under_load(tag: &str, services: &str, backends: usize) -> (Agent, Lb, LoadLoop) {
    let agent = Agent::start(tag, services);
    let lb = agent.lb();
    wait_backends(&lb, backends, LIMIT);
    let load = LoadLoop::start(lb.port, "localhost", 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    (agent, lb, load)
}

/// `rusty-agent deploy web` to rusty-echo instances answering `v2-<instance>`.
fn deploy_v2(agent: &Agent, echo: &str) -> (bool, String) {
    agent.cli(&[
        "deploy",
        "web",
        "--",
        echo,
        "--listen",
        "{host}:{port}",
        "--id",
        "v2-{instance}",
    ])
}

fn assert_no_failures(report: &LoadReport) {
    assert!(report.ok > 100, "the load loop ran: {report:?}");
    assert!(
        report.failures.is_empty(),
        "failed requests: {:?}",
        report.failures
    );
}

#[test]
fn scaling_2_to_5_to_1_moves_traffic_with_no_failed_requests() {
    let (agent, lb, load) = stack_under_load("scale", &echo_service("web", 2, ""), 2);

    let (ok, out) = agent.cli(&["scale", "web", "5"]);
    assert!(ok, "{out}");
    assert!(out.contains("web: 5 instances in the table"), "{out}");
    wait_backends(&lb, 5, LIMIT);
    let before = lb.served_by_backend("web");
    let seen = backends_seen(lb.port, "localhost", 50);
    assert_eq!(seen.len(), 5, "traffic reaches all five: {seen:?}");
    // Every client shares one round robin, so this client alone may see an uneven share; all
    // traffic together is even, within the requests still in flight when the window closes.
    let after = lb.served_by_backend("web");
    let window: Vec<u64> = after
        .iter()
        .map(|(b, n)| n - before.get(b).copied().unwrap_or(0))
        .collect();
    assert_eq!(window.len(), 5, "{after:?}");
    let (lo, hi) = (window.iter().min(), window.iter().max());
    assert!(
        hi.zip(lo).is_some_and(|(hi, lo)| hi - lo <= 4),
        "round robin over equal weights, all clients: {window:?}"
    );

    let (ok, out) = agent.cli(&["scale", "web", "1"]);
    assert!(ok, "{out}");
    wait_backends(&lb, 1, LIMIT);
    // The drained instances stop after their drain time; traffic keeps flowing meanwhile.
    agent.wait_until("four instances stopped", LIMIT, |st| {
        st["services"][0]["instances"]
            .as_array()
            .is_some_and(|i| i.len() == 1)
    });
    let seen = backends_seen(lb.port, "localhost", 20);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let report = load.finish();
    assert_no_failures(&report);
}

#[test]
fn the_cli_follows_with_lines_off_a_terminal_and_a_progress_bar_on_one() {
    let agent = Agent::start("cliprogress", &echo_service("web", 1, ""));
    agent.wait_serving("web", 1, LIMIT);

    // Piped: the plain lines, no terminal control.
    let (ok, out) = agent.cli(&["drain", "web-1"]);
    assert!(ok, "{out}");
    assert!(out.contains("web-1: draining"), "{out}");
    assert!(out.contains("\n  web: desired 1, "), "{out}");
    assert!(out.contains("web-1: stopped and replaced after"), "{out}");
    assert!(!out.contains('\x1b'), "{out:?}");
    agent.wait_serving("web", 1, LIMIT);
    assert!(agent.service("web")["instances"][0]["id"] != "web-1");

    // On a terminal (a pseudo-terminal from util-linux's `script`): a bar, then the outcome.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!(
            "\n==== SKIPPED: no `script` here (util-linux); the progress bar is untested ====\n"
        );
        return;
    }
    let cli = format!(
        "{} scale --agent 127.0.0.1:{} --token-file {} web 2",
        bin("rusty-agent").display(),
        agent.port,
        agent.token_file.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &cli, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("scale web"),
        "the bar names the operation: {text:?}"
    );
    assert!(
        text.contains('\x1b'),
        "drawn with terminal control: {text:?}"
    );
    assert!(
        !text.contains("\n  web: desired"),
        "no plain lines: {text:?}"
    );
    assert!(
        text.contains("web: 2 instances in the table after"),
        "{text:?}"
    );
    agent.wait_serving("web", 2, LIMIT);
}

#[test]
fn a_killed_instance_is_restarted_with_no_failed_requests() {
    let (agent, lb, load) = stack_under_load("kill", &echo_service("web", 3, ""), 3);

    let svc = agent.service("web");
    let victim = instance(&svc, "web-2");
    let pid = victim["pid"].as_i64().expect("a pid");
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    assert!(status.is_ok_and(|s| s.success()), "kill -KILL {pid}");
    agent.wait_until("web-2 restarted and back in the table", LIMIT, |st| {
        let i = instance(&st["services"][0], "web-2");
        i["restarts"].as_u64() >= Some(1) && i["in_table"] == true && i["pid"].as_i64() != Some(pid)
    });
    let replaced = killed.elapsed();
    wait_backends(&lb, 3, LIMIT);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    eprintln!("kill → back in the table: {} ms", replaced.as_millis());
    assert_no_failures(&report);
    assert!(
        report.by_backend.get("web-2").is_some_and(|n| *n > 0),
        "{report:?}"
    );
    let seen = backends_seen(lb.port, "localhost", 30);
    assert_eq!(seen.len(), 3, "web-2 serves again: {seen:?}");
}

#[test]
fn a_rolling_deploy_moves_all_traffic_to_v2_with_no_failed_requests() {
    let (agent, lb, load) = stack_under_load("deploy", &echo_service("web", 3, "v1-"), 3);

    let echo = bin("rusty-echo").display().to_string();
    let started = Instant::now();
    let (ok, out) = deploy_v2(&agent, &echo);
    let took = started.elapsed();
    assert!(ok, "{out}");
    assert!(out.contains("generation 2 serves all traffic"), "{out}");
    eprintln!(
        "deploy start → all traffic on v2: {} ms\n{out}",
        took.as_millis()
    );

    // The agent says so once its table is v2 only; the data plane applies it a moment later.
    let v2: Vec<String> = agent.service("web")["instances"]
        .as_array()
        .map(|i| {
            i.iter()
                .filter(|i| i["generation"] == 2)
                .filter_map(|i| i["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(v2.len(), 3, "{v2:?}");
    let ids: Vec<&str> = v2.iter().map(String::as_str).collect();
    wait_table_backends(&lb, &ids, LIMIT);
    let before = lb.served_by_backend("web");
    let seen = backends_seen(lb.port, "localhost", 30);
    assert!(
        seen.keys().all(|b| b.starts_with("v2-")),
        "only v2 answers: {seen:?}"
    );
    // All clients share one round robin: every v2 instance serves in this window.
    let after = lb.served_by_backend("web");
    for id in &ids {
        let served = after.get(*id).copied().unwrap_or(0) - before.get(*id).copied().unwrap_or(0);
        assert!(served > 0, "{id} served nothing: {before:?} → {after:?}");
    }
    // The v1 instances are stopped once drained.
    agent.wait_until("v1 instances stopped", LIMIT, |st| {
        st["services"][0]["instances"]
            .as_array()
            .is_some_and(|i| i.len() == 3 && i.iter().all(|i| i["generation"] == 2))
    });
    let report = load.finish();
    assert_no_failures(&report);
    assert!(
        report.by_backend.keys().any(|b| b.starts_with("v1-")),
        "{report:?}"
    );
    assert!(
        report.by_backend.keys().any(|b| b.starts_with("v2-")),
        "{report:?}"
    );
}

#[test]
fn a_deploy_that_never_becomes_healthy_leaves_v1_serving() {
    let (agent, lb, load) = stack_under_load("baddeploy", &echo_service("web", 2, "v1-"), 2);

    // A process that runs but never listens: it can never pass its health check.
    let (ok, out) = agent.cli(&["deploy", "web", "--", "/bin/sleep", "600"]);
    assert!(!ok, "the CLI reports the failure: {out}");
    assert!(out.contains("deploy of generation 2 failed"), "{out}");
    assert!(
        out.contains("did not become healthy within 5000ms"),
        "{out}"
    );
    assert!(out.contains("generation 1 keeps serving"), "{out}");

    let svc = agent.service("web");
    assert_eq!(svc["generation"], 1, "{svc:#}");
    assert_eq!(svc["deploy"]["state"], "failed", "{svc:#}");
    agent.wait_until("the failed instance stopped", LIMIT, |st| {
        st["services"][0]["instances"]
            .as_array()
            .is_some_and(|i| i.len() == 2 && i.iter().all(|i| i["generation"] == 1))
    });
    let seen = backends_seen(lb.port, "localhost", 20);
    assert!(seen.keys().all(|b| b.starts_with("v1-")), "{seen:?}");
    let report = load.finish();
    assert_no_failures(&report);
    let metrics = agent.api_get("/metrics").body;
    assert_eq!(
        metric_in(
            &metrics,
            "rusty_agent_deploys_total{service=\"web\",outcome=\"failed\"}"
        ),
        1.0,
        "{metrics}"
    );
}

#[test]
fn the_data_plane_keeps_serving_while_the_agent_is_down_then_takes_a_newer_table() {
    // Static backends: they are not the agent's children, so they live through its death.
    let a = Echo::start("static-a");
    let b = Echo::start("static-b");
    let services = format!(
        "[services.web]\nruntime = \"static\"\naddresses = [\"{}\", \"{}\"]\n[services.web.health]\ninterval = \"100ms\"\nrise = 2\n",
        a.addr(),
        b.addr()
    );
    let mut agent = Agent::start("restart", &services);
    let lb = agent.lb();
    wait_backends(&lb, 2, LIMIT);
    let first = lb.table_version().expect("a table");
    let load = LoadLoop::start(lb.port, "localhost", 2, Duration::from_secs(60));

    agent.kill();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lb.table_version(), Some(first), "the last good table stays");
    let restarted = Instant::now();
    agent.kill_and_restart();
    let deadline = Instant::now() + LIMIT;
    let newer = loop {
        match lb.table_version() {
            Some(v) if v > first => break v,
            _ => assert!(
                Instant::now() < deadline,
                "no newer table after the restart"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "agent restart → data plane on version {newer} (was {first}) after {} ms",
        restarted.elapsed().as_millis()
    );
    wait_backends(&lb, 2, LIMIT);
    let report = load.finish();
    assert_no_failures(&report);
    assert_eq!(report.by_backend.len(), 2, "{report:?}");
}

#[test]
fn a_wrong_token_is_refused_on_the_table_stream_and_the_api() {
    let agent = Agent::start("token", &echo_service("web", 1, ""));
    let raw = |auth: &str| {
        Client::new(agent.port)
            .request(&format!(
                "GET /v1/tables HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
            ))
            .expect("request")
    };
    assert_eq!(raw("Authorization: Bearer wrong\r\n").status, 401);
    assert_eq!(raw("").status, 401);
    let token = std::fs::read_to_string(&agent.token_file).unwrap();
    let r = raw(&format!("Authorization: Bearer {}\r\n", token.trim()));
    assert_eq!(r.status, 101, "the right token is let through");

    // The API too.
    let r = Client::new(agent.port)
        .request("GET /v1/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer nope\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 401);
    let metrics = agent.api_get("/metrics").body;
    assert!(
        metrics.contains("rusty_agent_subscribers_refused_total 2"),
        "{metrics}"
    );

    // A data plane with a wrong token gets no table.
    let dir = TempDir::new("wrongtoken");
    let wrong = dir.path("token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let lb = Lb::start(&[
        "--agent".to_owned(),
        agent.ws_url(),
        "--token-file".to_owned(),
        wrong.display().to_string(),
    ]);
    agent.wait_until("the agent published its table", LIMIT, |st| {
        st["table_version"].is_u64()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lb.table_version(), None, "nothing installed");
    assert_eq!(lb.get("localhost", "/").status, 503);
}

#[test]
fn bad_api_requests_get_clear_4xx_answers() {
    let agent = Agent::start("api4xx", &echo_service("web", 1, ""));
    let token = std::fs::read_to_string(&agent.token_file).unwrap();
    let post = |path: &str, body: &str| {
        Client::new(agent.port)
            .request(&format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
                token.trim(),
                body.len()
            ))
            .expect("request")
    };
    let r = post("/v1/services/nope/scale", r#"{"replicas": 2}"#);
    assert_eq!(
        (r.status, r.body.contains("no service \\\"nope\\\"")),
        (404, true),
        "{}",
        r.body
    );
    let r = post("/v1/services/web/scale", r#"{"replicas": "two"}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("bad JSON body"), "{}", r.body);
    let r = post("/v1/services/web/scale", r#"{"replicas": 2, "extra": 1}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    let r = post("/v1/services/web/deploy", r#"{"weight": 0}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("weight"), "{}", r.body);
    let r = post("/v1/services/web/instances/web-99/drain", "");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = post("/v1/status", "");
    assert_eq!(r.status, 405, "{}", r.body);
}

fn instance_pids(agent: &Agent) -> Vec<i64> {
    agent.service("web")["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_i64().expect("pid"))
        .collect()
}

#[test]
fn instances_outlive_a_crashed_agent_are_adopted_and_traffic_never_notices() {
    let (mut agent, lb, load) = stack_under_load("orphans", &echo_service("web", 2, ""), 2);
    let pids = instance_pids(&agent);
    assert!(pids.iter().all(|p| pid_alive(*p)));
    let first = lb.table_version().expect("a table");

    // SIGKILL: no chance to clean up; the instances keep serving the data plane's last table.
    agent.kill();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "instances {pids:?} died with the agent"
    );
    let restarted = Instant::now();
    agent.kill_and_restart();
    // The new agent adopts the same processes (no restart) and publishes them at once.
    agent.wait_serving("web", 2, LIMIT);
    let mut adopted = instance_pids(&agent);
    adopted.sort();
    let mut before = pids.clone();
    before.sort();
    assert_eq!(adopted, before, "the same processes, adopted");
    let svc = agent.service("web");
    assert!(
        svc["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["restarts"] == 0),
        "{svc:#}"
    );
    let deadline = Instant::now() + LIMIT;
    while lb.table_version().is_none_or(|v| v <= first) {
        assert!(
            Instant::now() < deadline,
            "no table from the restarted agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "agent restart → the data plane has its table after {} ms",
        restarted.elapsed().as_millis()
    );
    let report = load.finish();
    assert_no_failures(&report);
    assert_eq!(report.by_backend.len(), 2, "{report:?}");

    // SIGTERM: the agent stops its instances itself and exits.
    agent.kill_and_restart();
    agent.wait_serving("web", 2, LIMIT);
    let pids = instance_pids(&agent);
    agent.proc.signal("TERM");
    let code = agent.proc.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "clean exit after SIGTERM");
    assert!(
        pids.iter().all(|p| !pid_alive(*p)),
        "instances {pids:?} left behind"
    );
}

#[test]
fn check_validates_configs_like_nginx_t() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
    for env in ["production", "development", "slim"] {
        let out = std::process::Command::new(bin("rusty-agent"))
            .args(["check", "--config"])
            .arg(&examples)
            .args(["--env", env])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{env}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("[services.web]"), "{stdout}");
    }
    let dir = TempDir::new("check");
    let bad = dir.path("bad.toml");
    std::fs::write(
        &bad,
        "[services.web]\ncommand = \"x\"\n[services.web.health]\nrise = 0\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("rusty-agent"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml: services.web.health.rise: 0 is out of range"),
        "{err}"
    );
}

#[test]
fn two_data_planes_follow_the_agent_while_a_third_subscriber_never_reads() {
    let agent = Agent::start("fanout", &echo_service("web", 1, ""));
    let lb1 = agent.lb();
    let lb2 = agent.lb();
    // A subscriber that completes the handshake and then never reads a byte.
    let token = std::fs::read_to_string(&agent.token_file).unwrap();
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    std::io::Write::write_all(
        &mut stalled,
        format!(
            "GET /v1/tables HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {}\r\n\r\n",
            token.trim()
        )
        .as_bytes(),
    )
    .unwrap();
    agent.wait_until("three subscribers", LIMIT, |st| st["subscribers"] == 3);

    // A burst of changes, each accepted without waiting: the planes end on the last one.
    for n in [4, 2, 5, 3] {
        let (ok, out) = agent.cli(&["scale", "web", &n.to_string(), "--no-wait"]);
        assert!(ok, "{out}");
        std::thread::sleep(Duration::from_millis(150));
    }
    agent.wait_serving("web", 3, LIMIT);
    wait_backends(&lb1, 3, LIMIT);
    wait_backends(&lb2, 3, LIMIT);
    let v = agent.status()["table_version"].as_u64();
    assert_eq!(lb1.table_version(), v);
    assert_eq!(lb2.table_version(), v);
    drop(stalled);
}

#[test]
fn scale_and_deploy_survive_an_agent_restart() {
    let mut agent = Agent::start("persist", &echo_service("web", 2, "v1-"));
    agent.wait_serving("web", 2, LIMIT);
    let echo = bin("rusty-echo").display().to_string();
    let (ok, out) = agent.cli(&["scale", "web", "3"]);
    assert!(ok, "{out}");
    let (ok, out) = deploy_v2(&agent, &echo);
    assert!(ok, "{out}");
    agent.proc.signal("TERM");
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(10)), Some(0));
    agent.kill_and_restart();
    agent.wait_serving("web", 3, LIMIT);
    let svc = agent.service("web");
    assert_eq!(svc["replicas"], 3, "{svc:#}");
    assert!(
        svc["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "v2-{instance}"),
        "the deployed version runs after the restart: {svc:#}"
    );
}

#[test]
fn slow_start_ramps_a_new_instance_through_successive_tables() {
    // `slow_start` belongs to [services.web], before its [services.web.health] table.
    let services = echo_service("web", 1, "").replacen(
        "replicas = 1\n",
        "replicas = 1\nslow_start = \"2s\"\n",
        1,
    );
    let agent = Agent::start("slowstart", &services);
    let lb = agent.lb();
    wait_backends(&lb, 1, LIMIT);
    // Let the first instance finish its own ramp.
    std::thread::sleep(Duration::from_millis(2_500));
    let (ok, out) = agent.cli(&["scale", "web", "2"]);
    assert!(ok, "{out}");
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let t: serde_json::Value = serde_json::from_str(&lb.admin_get("/table").body).unwrap();
        if let Some(b) = t["services"][0]["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["id"] == "web-2"))
        {
            seen.insert(b["weight"].as_u64().unwrap_or(0));
            if b["weight"] == 10 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        seen.contains(&10),
        "web-2 reached its full weight: {seen:?}"
    );
    assert!(
        seen.iter().filter(|w| **w < 10).count() >= 3,
        "web-2 went through several lower weights first: {seen:?}"
    );
    assert!(
        seen.iter().next().is_some_and(|w| *w <= 2),
        "it started low: {seen:?}"
    );
}

#[test]
fn status_prints_text_for_people_and_the_api_answer_for_scripts() {
    let agent = Agent::start("status-output", &echo_service("web", 1, ""));
    agent.wait_serving("web", 1, LIMIT);
    let (ok, text) = agent.cli(&["status"]);
    assert!(ok, "{text}");
    assert!(text.contains("web"), "{text}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "text, not JSON: {text}"
    );
    for flags in [&["status", "--output", "json"][..], &["status", "--json"]] {
        let (ok, out) = agent.cli(flags);
        assert!(ok, "{out}");
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["services"][0]["name"], "web", "{flags:?}");
        assert_eq!(v, agent.status(), "the API's answer as it is");
    }
}
