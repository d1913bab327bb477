//! The swarm runtime and `stack.yaml` against the real engine: a single-node swarm (made here
//! only when the engine is in none, and left at the end only then), the images built by
//! `scripts/images.sh`, the stack deployed under a name of its own (own overlay, ports, token),
//! then under a request loop through the data plane: scale 1 → 3, a rolling deploy v1 → v2, a
//! killed task, a killed agent task that Swarm replaces (the new one adopts everything from
//! Swarm alone), and `docker stack rm`, which must leave nothing behind.
//!
//! Where `docker info` fails the test says so loudly on stderr and returns, as the Docker test
//! does; the stack and the swarm are cleaned up even when an assertion fails.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rusty_e2e::engine::{app_serving, docker, engine_answers, images_ready, repo, run, wait_for};
use rusty_e2e::*;

const LIMIT: Duration = Duration::from_secs(90);

/// The engine in a swarm for the test; `leave` on drop only if this made it.
struct Swarm {
    made: bool,
}

impl Swarm {
    fn join() -> Swarm {
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        let made = match state.trim() {
            "active" => false,
            "inactive" => {
                docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
                true
            }
            other => panic!("the engine's swarm is {other:?}: neither in one nor out of one"),
        };
        eprintln!(
            "swarm: {}",
            if made {
                "made for this test"
            } else {
                "already active; left as found"
            }
        );
        Swarm { made }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.made {
            let _ = Command::new("docker")
                .args(["swarm", "leave", "--force"])
                .output();
        }
    }
}

/// One stack with its own name, overlay, ports, token and agent config; removed on drop.
struct Stack {
    name: String,
    network: String,
    dir: TempDir,
    lb_port: u16,
    admin_port: u16,
}

impl Stack {
    fn deploy() -> Stack {
        let name = format!("rbsw{}", std::process::id());
        let stack = Stack {
            network: format!("{name}net"),
            dir: TempDir::new("swarm"),
            lb_port: free_port(),
            admin_port: free_port(),
            name,
        };
        let config = format!(
            r#"
[agent]
listen = "127.0.0.1:7070"
tls_listen = "0.0.0.0:7443"
tls_cert = "/run/secrets/agent.crt"
tls_key = "/run/secrets/agent.key"
token_file = "/run/secrets/rustybalancer-token"
require_token_file = true
data_planes = ["tasks.lb:9100"]
data_plane_token_file = "/run/secrets/rustybalancer-admin-token"
scrape_interval = "500ms"

[swarm]
prefix = "{name}"

[services.app]
runtime = "swarm"
image = "rustybalancer-demo:v1"
port = 8000
network = "{net}"
hosts = ["localhost"]
replicas = 1
stop_grace = "2s"

[services.app.health]
interval = "200ms"
rise = 2
fall = 2

[services.app.rollout]
drain = "1s"
healthy_timeout = "60s"

[env.production]
"#,
            name = stack.name,
            net = stack.network
        );
        std::fs::write(stack.dir.path("agent.toml"), config).unwrap();
        run(Command::new(repo().join("scripts/swarm-secrets.sh")).arg(stack.secrets()));
        stack.stack(&["deploy", "--resolve-image", "never", "-c", "stack.yaml"]);
        stack
    }

    fn stack(&self, args: &[&str]) {
        run(Command::new("docker")
            .current_dir(repo())
            .arg("stack")
            .args(args)
            .arg(&self.name)
            .env("RUSTY_STACK", &self.name)
            .env("RUSTY_NETWORK", &self.network)
            .env("RUSTY_AGENT_CONFIG", self.dir.path("agent.toml"))
            .env("RUSTY_SECRETS", self.secrets())
            .env("RUSTY_LB_PORT", self.lb_port.to_string())
            .env("RUSTY_ADMIN_PORT", self.admin_port.to_string()));
    }

    fn secrets(&self) -> PathBuf {
        self.dir.path("secrets")
    }

    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.secrets().join("admin-token"))
            .expect("admin token")
            .trim()
            .to_owned()
    }

    /// The CLI inside the agent's container, where the agent listens (loopback, not published).
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let Some(agent) = self.agent_container() else {
            return (false, "no agent container runs".to_owned());
        };
        let out = Command::new("docker")
            .args(["exec", &agent, "/usr/local/bin/rusty-agent"])
            .args(args)
            .args(["--token-file", "/run/secrets/rustybalancer-token"])
            .output()
            .expect("docker exec the CLI");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn status(&self) -> Option<serde_json::Value> {
        let (ok, out) = self.cli(&["status", "--output", "json"]);
        ok.then(|| serde_json::from_str(&out).expect("status JSON"))
    }

    fn wait(&self, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> Duration {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Some(st) = self.status() {
                if check(&st) {
                    return start.elapsed();
                }
                last = Some(st);
            }
            assert!(
                start.elapsed() < LIMIT,
                "{what}: not within {LIMIT:?}; last status: {last:#?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The agent's and the data plane's logs, for a failure message.
    fn logs(&self) -> String {
        self.service_logs(&["agent", "lb"], "60")
    }

    fn service_logs(&self, services: &[&str], tail: &str) -> String {
        let mut text = String::new();
        for service in services {
            let out = Command::new("docker")
                .args(["service", "logs", "--raw", "--tail", tail])
                .arg(format!("{}_{service}", self.name))
                .output();
            if let Ok(o) = out {
                text.push_str(&format!(
                    "--- {service}:\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
        text
    }

    fn agent_container(&self) -> Option<String> {
        let out = Command::new("docker")
            .args(["ps", "-q", "--filter"])
            .arg(format!(
                "label=com.docker.swarm.service.name={}_agent",
                self.name
            ))
            .output()
            .ok()?;
        let ids = String::from_utf8_lossy(&out.stdout);
        ids.split_whitespace().next().map(str::to_owned)
    }

    fn admin_get(&self, path: &str) -> Response {
        Client::new(self.admin_port)
            .request(&format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                self.admin_token()
            ))
            .unwrap_or_else(|e| panic!("GET {path} on the data plane's admin port: {e}"))
    }

    /// The version of the data plane's table (0 before any).
    fn table_version(&self) -> u64 {
        let r = self.admin_get("/table");
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap_or_default()["version"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Requests the data plane counted for `app`, per backend.
    fn served(&self) -> std::collections::BTreeMap<String, u64> {
        served_by_backend(&self.admin_get("/metrics").body, "app")
    }

    /// The data plane's `app` backends, as (id, address), sorted.
    fn table_backends(&self) -> Vec<(String, String)> {
        let r = self.admin_get("/table");
        let table: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        let mut out: Vec<(String, String)> = table["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "app")
            .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
            .map(|b| {
                (
                    b["id"].as_str().unwrap_or_default().to_owned(),
                    b["addr"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// The Swarm services the agent made for `app` (by name), sorted.
    fn app_services(&self) -> Vec<String> {
        let out = docker(&[
            "service",
            "ls",
            "--filter",
            &format!("label=rustybalancer.agent={}", self.name),
            "--format",
            "{{.Name}}",
        ]);
        let mut names: Vec<String> = out
            .lines()
            .filter(|n| n.starts_with(&format!("{}-app-", self.name)))
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// The running container of a Swarm service's task on this node.
    /// (Waits for one while the service's task starts.)
    fn container_of(&self, service: &str) -> String {
        let start = Instant::now();
        loop {
            let out = docker(&[
                "ps",
                "-q",
                "--filter",
                &format!("label=com.docker.swarm.service.name={service}"),
            ]);
            if let Some(id) = out.split_whitespace().next() {
                return id.to_owned();
            }
            assert!(
                start.elapsed() < LIMIT,
                "no running container of {service} within {LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The overlay address of the running task of a Swarm service on this node.
    fn task_ip(&self, service: &str) -> String {
        docker(&[
            "inspect",
            "--format",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.network
            ),
            &self.container_of(service),
        ])
        .trim()
        .to_owned()
    }

    /// Everything of the stack and its agent the engine still has, by kind.
    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.stack.namespace={}", self.name);
        let mut left = Vec::new();
        for (kind, args) in [
            ("service", vec!["service", "ls", "-q", "--filter", &label]),
            ("network", vec!["network", "ls", "-q", "--filter", &label]),
            ("secret", vec!["secret", "ls", "-q", "--filter", &label]),
            ("config", vec!["config", "ls", "-q", "--filter", &label]),
        ] {
            for id in docker(&args).split_whitespace() {
                left.push(format!("{kind} {id}"));
            }
        }
        let agent = format!("label=rustybalancer.agent={}", self.name);
        for id in docker(&["service", "ls", "-q", "--filter", &agent]).split_whitespace() {
            left.push(format!("agent service {id}"));
        }
        left.sort();
        left.dedup();
        left
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["stack", "rm", &self.name])
            .output();
        let agent = format!("label=rustybalancer.agent={}", self.name);
        if let Ok(o) = Command::new("docker")
            .args(["service", "ls", "-q", "--filter", &agent])
            .output()
        {
            for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["service", "rm", id]).output();
            }
        }
        // The overlay goes once its last task is gone.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let out = Command::new("docker")
                .args(["network", "rm", &self.network])
                .output();
            let gone = Command::new("docker")
                .args(["network", "inspect", &self.network])
                .output()
                .is_ok_and(|o| !o.status.success());
            if gone || out.is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn the_swarm_stack_scales_rolls_heals_moves_its_agent_and_cleans_up() {
    if !engine_answers() || !images_ready("SWARM STACK TEST") {
        return;
    }
    let _swarm = Swarm::join();
    let deployed = Instant::now();
    let stack = Stack::deploy();
    stack.wait("app serving on 1 task", |st| app_serving(st, 1, 1));
    wait_for("the data plane on the agent's table", LIMIT, || {
        std::net::TcpStream::connect(("127.0.0.1", stack.lb_port)).is_ok()
            && get(stack.lb_port, "localhost", "/").status == 200
    });
    eprintln!(
        "swarm: stack deploy -> first request served: {} ms",
        deployed.elapsed().as_millis()
    );
    assert_eq!(
        get(stack.lb_port, "localhost", "/").body.trim(),
        "hello from demo-v1"
    );
    assert_eq!(
        get(stack.admin_port, "localhost", "/metrics").status,
        401,
        "the published admin port wants the token"
    );

    // Scale 1 → 3 under load: three Swarm services, all three serve, nothing fails.
    let load = LoadLoop::start(stack.lb_port, "localhost", 2, Duration::from_secs(300));
    let started = Instant::now();
    let (ok, out) = stack.cli(&["scale", "app", "3"]);
    assert!(ok, "{out}");
    eprintln!(
        "swarm: scale 1 -> 3 (followed by the CLI until done): {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(stack.app_services().len(), 3, "{:?}", stack.app_services());
    wait_for("three app backends in the data plane", LIMIT, || {
        stack.table_backends().len() == 3
    });
    let before = stack.served();
    std::thread::sleep(Duration::from_secs(1));
    let report = load.finish();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let after = stack.served();
    let answered: Vec<_> = after
        .iter()
        .filter(|(b, n)| **n > before.get(*b).copied().unwrap_or(0))
        .collect();
    assert_eq!(answered.len(), 3, "all three answer: {after:?}");

    // Roll v1 → v2 under load: no failed request, all traffic on v2 at the end.
    let load = LoadLoop::start(stack.lb_port, "localhost", 2, Duration::from_secs(300));
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (ok, out) = stack.cli(&["deploy", "app", "--image", "rustybalancer-demo:v2"]);
    let deploy_took = started.elapsed();
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    eprintln!(
        "swarm deploy v1 -> v2 (3 tasks): {} ms, {} requests served",
        deploy_took.as_millis(),
        report.ok
    );
    assert!(report.ok > 50, "{report:?}");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    for _ in 0..10 {
        assert_eq!(
            get(stack.lb_port, "localhost", "/").body.trim(),
            "hello from demo-v2"
        );
    }
    stack.wait("v1 services removed", |st| app_serving(st, 3, 2));
    wait_for("three app services after the drain", LIMIT, || {
        stack.app_services().len() == 3
    });

    // Kill one task's container under load: out of the table at once, Swarm starts another
    // task (a new address), the agent checks it and puts it back; no request fails.
    let before = stack.table_backends();
    let victim = stack.app_services()[0].clone();
    let load = LoadLoop::start(stack.lb_port, "localhost", 2, Duration::from_secs(300));
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    docker(&["kill", &stack.container_of(&victim)]);
    wait_for("the killed task out of the table", LIMIT, || {
        stack.table_backends().len() == 2
    });
    let out_after = killed.elapsed();
    stack.wait("the killed task replaced and serving", |st| {
        app_serving(st, 3, 2)
            && st["services"][0]["instances"]
                .as_array()
                .is_some_and(|i| i.iter().any(|i| i["restarts"].as_u64() >= Some(1)))
    });
    wait_for("three backends in the data plane again", LIMIT, || {
        stack.table_backends().len() == 3
    });
    let back = killed.elapsed();
    let report = load.finish();
    eprintln!(
        "swarm: task killed -> out of the table {} ms, replaced and serving {} ms after the kill ({} requests, {} failed)",
        out_after.as_millis(),
        back.as_millis(),
        report.ok,
        report.failures.len()
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let after = stack.table_backends();
    assert_eq!(
        before.iter().map(|b| &b.0).collect::<Vec<_>>(),
        after.iter().map(|b| &b.0).collect::<Vec<_>>(),
        "the same instances"
    );
    // The instance is in the table at the address of the task Swarm started in its place.
    let new_ip = stack.task_ip(&victim);
    let moved: Vec<_> = after.iter().filter(|b| !before.contains(b)).collect();
    assert!(
        after
            .iter()
            .any(|(_, addr)| addr == &format!("{new_ip}:8000")),
        "the new task's address {new_ip} is in the table: {after:?}"
    );
    eprintln!("swarm: the killed task's instance moved: {moved:?}");
    assert_eq!(stack.app_services().len(), 3);

    // An operator removes an instance's Swarm service: the agent creates it again.
    let before_removal = stack.app_services();
    let removed = before_removal[1].clone();
    docker(&["service", "rm", &removed]);
    wait_for("the removed service created again", LIMIT, || {
        let now = stack.app_services();
        now.len() == 3 && !now.contains(&removed)
    });
    let recreated = stack
        .app_services()
        .into_iter()
        .find(|n| !before_removal.contains(n))
        .expect("the new service");
    let ip = stack.task_ip(&recreated);
    wait_for("the recreated service's task in the table", LIMIT, || {
        let table = stack.table_backends();
        table.len() == 3 && table.iter().any(|(_, a)| a == &format!("{ip}:8000"))
    });

    // Kill the agent's task under load: Swarm starts another, which finds its desired state
    // (3 instances of v2, not the config's 1 of v1) and the services in Swarm alone (no state
    // dir: a new container), adopts them, and sends the same table; no request fails.
    let table_before = stack.table_backends();
    let version_before = stack.table_version();
    let services_before = stack.app_services();
    let agent_service = format!("{}_agent", stack.name);
    let old_agent = stack.container_of(&agent_service);
    let load = LoadLoop::start(stack.lb_port, "localhost", 2, Duration::from_secs(300));
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    docker(&["kill", &old_agent]);
    wait_for("a new agent task", LIMIT, || {
        Command::new("docker")
            .args([
                "ps",
                "-q",
                "--filter",
                &format!("label=com.docker.swarm.service.name={agent_service}"),
            ])
            .output()
            .is_ok_and(|o| {
                let ids = String::from_utf8_lossy(&o.stdout);
                ids.split_whitespace().any(|id| !old_agent.starts_with(id))
            })
    });
    stack.wait("the new agent serving the adopted services", |st| {
        app_serving(st, 3, 2) || app_serving(st, 3, 1)
    });
    let adopted = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let report = load.finish();
    eprintln!(
        "swarm: agent task killed -> new agent with the services adopted: {} ms ({} requests, {} failed)",
        adopted.as_millis(),
        report.ok,
        report.failures.len()
    );
    assert!(report.ok > 50, "{report:?}");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        stack.app_services(),
        services_before,
        "adopted, not replaced"
    );
    wait_for("the new agent's table in the data plane", LIMIT, || {
        stack.table_version() > version_before
    });
    assert_eq!(
        stack.table_backends(),
        table_before,
        "the same backends at the same addresses"
    );
    let st = stack.status().expect("status");
    let app = st["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "app"))
        .expect("app in status");
    assert_eq!(app["replicas"], 3, "the scale kept in Swarm: {app:#}");
    assert_eq!(
        get(stack.lb_port, "localhost", "/").body.trim(),
        "hello from demo-v2",
        "the deploy kept in Swarm"
    );

    // The agent reads the data planes' metrics at `tasks.lb` (Swarm's DNS for the tasks of the
    // data-plane service): each address it resolves to is logged when it first answers.
    let logs = stack.service_logs(&["agent"], "all");
    let found: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("metrics answer"))
        .filter_map(|l| l.split("data_plane=").nth(1)?.split_whitespace().next())
        .collect();
    assert!(
        !found.is_empty()
            && found
                .iter()
                .all(|a| a.parse::<std::net::SocketAddr>().is_ok()),
        "the agent reads no data plane found through tasks.lb: {found:?}\n{logs}"
    );
    let starts: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("swarm task running"))
        .filter_map(|l| l.split("took_ms=").nth(1)?.split_whitespace().next())
        .collect();
    assert!(!starts.is_empty(), "no task start logged:\n{logs}");
    eprintln!("swarm: service create -> task running, ms: {starts:?}");

    // `docker stack rm`: the agent's services go with the stack; nothing is left.
    let removed = Instant::now();
    stack.stack(&["rm"]);
    let start = Instant::now();
    loop {
        let left = stack.leftovers();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "left after docker stack rm: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "swarm: stack rm -> nothing left: {} ms",
        removed.elapsed().as_millis()
    );
}
