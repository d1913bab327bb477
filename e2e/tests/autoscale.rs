//! Autoscaling end to end: a real agent reads the real data plane's `/metrics` and scales a
//! service of real processes out under a rising load and back in after it, with no failed request.

use std::time::{Duration, Instant};

use rusty_e2e::*;

#[test]
fn a_rising_load_scales_out_before_anything_fails_and_back_in_after() {
    let admin = free_port();
    let services = format!(
        r#"
[services.web]
command = "{echo}"
args = ["--listen", "{{host}}:{{port}}", "--id", "web{{instance}}", "--delay-ms", "50"]
replicas = 1

[services.web.autoscale]
min_replicas = 1
max_replicas = 4
target_inflight = 2
window = "1s"
cooldown = "3s"

[services.web.health]
interval = "100ms"
timeout = "1s"
rise = 2
fall = 3

[services.web.rollout]
drain = "500ms"
healthy_timeout = "5s"
"#,
        echo = bin("rusty-echo").display()
    );
    let agent = Agent::start_with(
        "autoscale",
        &format!("data_planes = [\"127.0.0.1:{admin}\"]\nscrape_interval = \"200ms\""),
        &services,
    );
    let lb = agent.lb_on(admin);
    agent.wait_until("one instance in the table", Duration::from_secs(15), |st| {
        st["services"][0]["healthy"] == 1
    });
    // The agent counts an instance healthy before every data plane has the table with it.
    wait_backends(&lb, 1, Duration::from_secs(10));

    // A light load (about one request in flight, under the target of 2 per instance).
    let light = LoadLoop::start(lb.port, "localhost", 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent.service("web")["replicas"],
        1,
        "a light load must not scale"
    );

    // Ramp up: 6 clients keep about 6 requests in flight, 6 per instance.
    let breach = Instant::now();
    let heavy = LoadLoop::start(lb.port, "localhost", 5, Duration::from_secs(60));
    agent.wait_until("a scale-out decision", Duration::from_secs(10), |st| {
        st["services"][0]["replicas"].as_u64() > Some(1)
    });
    let decided = breach.elapsed();
    let first = agent.service("web");
    let decision = &first["autoscale"]["last_decision"];
    assert_eq!(decision["from"], 1);
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("over the target"),
        "{decision}"
    );
    // 6 in flight at a target of 2 need 3 instances: the first decision sizes for the load of
    // its sample (which may still be ramping up), a later one for what remains over the target.
    agent.wait_until("3 instances in the table", Duration::from_secs(15), |st| {
        st["services"][0]["healthy"].as_u64() >= Some(3)
    });
    let serving = breach.elapsed();
    let target = agent.service("web")["replicas"].as_u64().unwrap();
    // The operator's view says the same.
    let (ok, text) = agent.cli(&["status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("autoscale: 1..4 instances, target 2 in flight each"),
        "{text}"
    );
    // The last decision may be the first (1 -> 3) or a second one (2 -> 3): either way out.
    let last = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("last autoscale: "))
        .unwrap_or_else(|| panic!("no last decision shown:\n{text}"));
    let sizes: Vec<u64> = last
        .split(" instances")
        .next()
        .unwrap_or_default()
        .split(" -> ")
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        sizes.len() == 2 && sizes[0] < sizes[1],
        "a scale-out decision shown: {last}"
    );
    std::thread::sleep(Duration::from_secs(1));

    // The load ends: after the cooldown the service goes back to its minimum, draining first.
    let heavy = heavy.finish();
    let light = light.finish();
    let ended = Instant::now();
    agent.wait_until("scale-in to 1", Duration::from_secs(20), |st| {
        st["services"][0]["replicas"] == 1 && st["services"][0]["healthy"] == 1
    });
    let scaled_in = ended.elapsed();
    eprintln!(
        "autoscale: first breach -> decision {decided:?}, -> {target} instances serving {serving:?}; load end -> back to 1 {scaled_in:?}"
    );
    for report in [&heavy, &light] {
        assert!(report.failures.is_empty(), "{:?}", report.failures);
    }
    assert!(
        heavy.by_backend.len() >= 3,
        "the new instances served: {:?}",
        heavy.by_backend
    );
    let metrics = agent.api_get("/metrics").body;
    for direction in ["out", "in"] {
        let series = format!(
            "rusty_agent_autoscale_decisions_total{{service=\"web\",direction=\"{direction}\"}}"
        );
        assert!(
            metric_in(&metrics, &series) >= 1.0,
            "{series} missing:\n{metrics}"
        );
    }
    drop(lb);
}

#[test]
fn an_instance_the_data_plane_keeps_ejecting_is_replaced_with_no_failed_request() {
    let admin = free_port();
    let services = format!(
        r#"
[services.web]
command = "{echo}"
args = ["--listen", "{{host}}:{{port}}", "--id", "web{{instance}}"]
replicas = 3
eject = "300ms"
replace_after_ejections = 3
ejection_window = "10s"

[services.web.health]
interval = "200ms"
timeout = "1s"
rise = 2
fall = 3

[services.web.rollout]
drain = "300ms"
healthy_timeout = "5s"
"#,
        echo = bin("rusty-echo").display()
    );
    let agent = Agent::start_with(
        "outliers",
        &format!("data_planes = [\"127.0.0.1:{admin}\"]\nscrape_interval = \"100ms\""),
        &services,
    );
    let lb = agent.lb_on(admin);
    agent.wait_until("3 instances in the table", Duration::from_secs(15), |st| {
        st["services"][0]["healthy"] == 3
    });
    // The agent counts instances healthy before every data plane has the table with them.
    wait_backends(&lb, 3, Duration::from_secs(10));
    let load = LoadLoop::start(lb.port, "localhost", 4, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));

    // web-2 starts flapping: its listener is gone for 150 ms every 700 ms. The agent's probes
    // (every 200 ms, 3 failures to fall) keep passing; the data plane's connects in the gaps
    // fail, are retried on the others, and eject it each time.
    let web = agent.service("web");
    let victim = web["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "web-2")
        .expect("web-2");
    let pid = victim["pid"].as_i64().expect("a pid");
    let flapping = Instant::now();
    assert_eq!(send_signal(pid, "USR1"), 0);
    agent.wait_until("web-2 replaced", Duration::from_secs(15), |st| {
        let instances = st["services"][0]["instances"].as_array().unwrap();
        let ids: Vec<&str> = instances.iter().filter_map(|i| i["id"].as_str()).collect();
        !ids.contains(&"web-2") && st["services"][0]["healthy"] == 3
    });
    let replaced = flapping.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let report = load.finish();
    eprintln!(
        "outlier: flapping -> replaced and 3 serving {replaced:?}; {} requests",
        report.ok
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);

    let web = agent.service("web");
    let ids: Vec<&str> = web["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"web-1") && ids.contains(&"web-3"),
        "only the outlier goes: {ids:?}"
    );
    let note = web["outlier_replaced"].as_str().unwrap_or("");
    assert!(
        note.starts_with("web-2") && note.contains("ejected"),
        "{note}"
    );
    let (ok, text) = agent.cli(&["status"]);
    assert!(
        ok && text.contains("last outlier replaced: web-2"),
        "{text}"
    );
    assert_eq!(
        metric_in(
            &agent.api_get("/metrics").body,
            "rusty_agent_outlier_replacements_total{service=\"web\"}"
        ),
        1.0
    );
}

/// `kill -SIG pid`, through the command so the test needs no libc binding.
fn send_signal(pid: i64, sig: &str) -> i32 {
    std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .map_or(-1, |s| s.code().unwrap_or(-1))
}
