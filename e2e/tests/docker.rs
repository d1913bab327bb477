//! The Docker runtime and the Compose stack against the real engine: the images built by
//! `scripts/images.sh`, `compose.yaml` brought up under a project of its own (own network, own
//! ports, own state), then scale, a rolling deploy of demo:v1 → demo:v2 under load, a killed
//! container, a killed and restarted agent, label discovery, and `compose down`.
//!
//! Where `docker info` fails the test says so loudly on stderr and returns; `scripts/test.sh`
//! prints the same before the run so the skip is visible in CI. The stack is torn down (and
//! anything the agent labelled removed) even when an assertion fails.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rusty_e2e::engine::{app_serving, docker, engine_answers, images_ready, repo, run, wait_for};
use rusty_e2e::*;

const LIMIT: Duration = Duration::from_secs(60);

/// One Compose project with its own network, ports and state; `down` on drop.
struct Stack {
    project: String,
    network: String,
    state: TempDir,
    lb_port: u16,
    admin_port: u16,
    agent_port: u16,
}

impl Stack {
    fn up() -> Stack {
        let tag = format!("rbtest{}", std::process::id());
        let state = TempDir::new("compose");
        let stack = Stack {
            network: format!("{tag}net"),
            project: tag,
            state,
            lb_port: free_port(),
            admin_port: free_port(),
            agent_port: free_port(),
        };
        let config = format!(
            r#"
[agent]
listen = "0.0.0.0:7070"
state_dir = "/var/lib/rustybalancer"

[docker]
discover = true

[services.app]
runtime = "docker"
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
healthy_timeout = "20s"

[services.extra]
runtime = "discovered"
hosts = ["extra.localhost"]

[services.extra.health]
interval = "200ms"
rise = 1

# compose.yaml runs the agent with --env production.
[env.production]
"#,
            net = stack.network
        );
        std::fs::write(stack.state.path("agent.toml"), config).unwrap();
        stack.compose(&["up", "-d"]);
        stack
    }

    fn compose(&self, args: &[&str]) -> Output {
        run(Command::new("docker-compose")
            .current_dir(repo())
            .args(["-f", "compose.yaml", "-p", &self.project])
            .args(args)
            .env("RUSTY_NETWORK", &self.network)
            .env("RUSTY_AGENT_CONFIG", self.state.path("agent.toml"))
            .env("RUSTY_STATE", self.state.path("state"))
            .env("RUSTY_LB_PORT", self.lb_port.to_string())
            .env("RUSTY_ADMIN_PORT", self.admin_port.to_string())
            .env("RUSTY_AGENT_PORT", self.agent_port.to_string()))
    }

    fn token_file(&self) -> PathBuf {
        self.state.path("state").join("token")
    }

    /// The CLI on the host against the agent in Compose.
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(bin("rusty-agent"))
            .args(args)
            .arg("--agent")
            .arg(format!("127.0.0.1:{}", self.agent_port))
            .arg("--token-file")
            .arg(self.token_file())
            .output()
            .expect("run the CLI");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn wait(&self, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if self.token_file().exists() {
                let (ok, out) = self.cli(&["status", "--output", "json"]);
                if ok {
                    let st: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
                    if check(&st) {
                        return start.elapsed();
                    }
                    assert!(
                        start.elapsed() < LIMIT,
                        "{what}: not within {LIMIT:?}: {st:#}"
                    );
                }
            }
            assert!(
                start.elapsed() < LIMIT,
                "{what}: agent not answering within {LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Containers the agent manages in this project's network, by name.
    fn managed(&self) -> Vec<String> {
        let out = docker(&[
            "ps",
            "--filter",
            "label=rustybalancer.managed-by=rusty-agent",
            "--filter",
            &format!("network={}", self.network),
            "--format",
            "{{.Names}}",
        ]);
        let mut names: Vec<String> = out.lines().map(str::to_owned).collect();
        names.sort();
        names
    }

    /// GET on the data plane's admin port, with the token it requires outside loopback.
    fn admin_get(&self, path: &str) -> Response {
        let token = std::fs::read_to_string(self.token_file()).expect("token");
        Client::new(self.admin_port)
            .request(&format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                token.trim()
            ))
            .unwrap_or_else(|e| panic!("GET {path} on the data plane's admin port: {e}"))
    }

    fn lb_get(&self, host: &str) -> Response {
        get(self.lb_port, host, "/")
    }

    /// Requests counted by the data plane for `service`, per backend id.
    fn backend_counts(&self, service: &str) -> std::collections::BTreeMap<String, f64> {
        served_by_backend(&self.admin_get("/metrics").body, service)
            .into_iter()
            .map(|(backend, n)| (backend, n as f64))
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("docker-compose")
            .current_dir(repo())
            .args([
                "-f",
                "compose.yaml",
                "-p",
                &self.project,
                "down",
                "-v",
                "--remove-orphans",
                "-t",
                "20",
            ])
            .env("RUSTY_NETWORK", &self.network)
            .env("RUSTY_AGENT_CONFIG", self.state.path("agent.toml"))
            .env("RUSTY_STATE", self.state.path("state"))
            .output();
        // Whatever the agent left (it is killed in the middle of this test on purpose).
        if let Ok(out) = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("network={}", self.network),
            ])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
        // The state dir holds root-owned files written by the agent's container.
        let _ = std::fs::remove_dir_all(self.state.path("state"));
    }
}

fn extra_backends(stack: &Stack) -> usize {
    let r = stack.admin_get("/table");
    serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|t| {
            t["services"].as_array().and_then(|s| {
                s.iter()
                    .find(|s| s["name"] == "extra")
                    .and_then(|s| s["backends"].as_array().map(|b| b.len()))
            })
        })
        .unwrap_or(0)
}

#[test]
fn the_compose_stack_deploys_scales_rolls_heals_adopts_discovers_and_cleans_up() {
    if !engine_answers() {
        return;
    }
    if !images_ready("DOCKER STACK TEST") {
        return;
    }

    // Up: the agent runs one app container; Compose runs one discovered `extra`.
    let stack = Stack::up();
    stack.wait("app serving on 1 container", |st| app_serving(st, 1, 1));
    wait_for("the data plane on the agent's table", LIMIT, || {
        stack.lb_get("localhost").status == 200
    });
    assert_eq!(stack.lb_get("localhost").body.trim(), "hello from demo-v1");
    wait_for("the discovered container in the table", LIMIT, || {
        extra_backends(&stack) == 1
    });
    assert_eq!(
        stack.lb_get("extra.localhost").body.trim(),
        "hello from extra"
    );
    assert_eq!(
        get(stack.admin_port, "localhost", "/metrics").status,
        401,
        "the published admin port wants the token"
    );

    // Scale 1 → 3 through the CLI; the data plane counts requests on all three.
    let (ok, out) = stack.cli(&["scale", "app", "3"]);
    assert!(ok, "{out}");
    assert_eq!(stack.managed().len(), 3, "{:?}", stack.managed());
    wait_for("three app backends in the data plane", LIMIT, || {
        let r = stack.admin_get("/table");
        r.body.matches("\"app-").count() == 3
    });
    let before = stack.backend_counts("app");
    for _ in 0..30 {
        assert_eq!(stack.lb_get("localhost").status, 200);
    }
    let after = stack.backend_counts("app");
    let answered: Vec<_> = after
        .iter()
        .filter(|(b, n)| **n > before.get(*b).copied().unwrap_or(0.0))
        .collect();
    assert_eq!(answered.len(), 3, "all three answer: {after:?}");

    // Roll v1 → v2 under load: no failed request, all traffic on v2 at the end.
    let load = LoadLoop::start(stack.lb_port, "localhost", 2, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (ok, out) = stack.cli(&["deploy", "app", "--image", "rustybalancer-demo:v2"]);
    let deploy_took = started.elapsed();
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let report = load.finish();
    eprintln!(
        "docker deploy v1 → v2 (3 containers): {} ms\n{out}",
        deploy_took.as_millis()
    );
    assert!(report.ok > 50, "{report:?}");
    assert!(
        report.failures.is_empty(),
        "failed requests: {:?}",
        report.failures
    );
    for _ in 0..10 {
        assert_eq!(stack.lb_get("localhost").body.trim(), "hello from demo-v2");
    }
    stack.wait("v1 containers removed", |st| app_serving(st, 3, 2));
    wait_for("three containers after the drain", LIMIT, || {
        stack.managed().len() == 3
    });

    // Kill one container: it is replaced and serves again.
    let victim = stack.managed()[0].clone();
    docker(&["kill", &victim]);
    let healed = stack.wait("the killed container replaced", |st| {
        app_serving(st, 3, 2)
            && st["services"][0]["instances"]
                .as_array()
                .is_some_and(|i| i.iter().any(|i| i["restarts"].as_u64() >= Some(1)))
    });
    eprintln!(
        "docker kill → replacement in the table: {} ms",
        healed.as_millis()
    );
    assert!(
        !stack.managed().contains(&victim),
        "the dead container was removed"
    );
    assert_eq!(stack.managed().len(), 3);

    // Kill the agent for 10 s under load and start it again: no request fails meanwhile (the
    // containers outlive it and the data plane keeps its table), and it adopts the three
    // containers, no duplicates, and keeps v2 (the deploy is part of its saved desired state).
    let containers = stack.managed();
    let agent_container = String::from_utf8_lossy(&stack.compose(&["ps", "-q", "agent"]).stdout)
        .trim()
        .to_owned();
    let load = LoadLoop::start(stack.lb_port, "localhost", 2, Duration::from_secs(120));
    docker(&["kill", &agent_container]);
    std::thread::sleep(Duration::from_secs(10));
    stack.compose(&["up", "-d", "agent"]);
    stack.wait("the restarted agent serving its adopted containers", |st| {
        app_serving(st, 3, 1) || app_serving(st, 3, 2)
    });
    std::thread::sleep(Duration::from_secs(2));
    let report = load.finish();
    eprintln!(
        "docker runtime, agent SIGKILL 10 s then restarted: {} requests served, {} failed",
        report.ok,
        report.failures.len()
    );
    assert!(report.ok > 100, "{report:?}");
    assert!(
        report.failures.is_empty(),
        "failed requests while the agent was down: {:?}",
        report.failures
    );
    assert_eq!(
        stack.managed(),
        containers,
        "adopted, not duplicated or replaced"
    );
    assert_eq!(stack.lb_get("localhost").body.trim(), "hello from demo-v2");

    // Discovery: Compose scales `extra`; the table follows both ways.
    stack.compose(&["up", "-d", "--scale", "extra=2", "extra"]);
    wait_for("two discovered backends", LIMIT, || {
        extra_backends(&stack) == 2
    });
    stack.compose(&["up", "-d", "--scale", "extra=1", "extra"]);
    wait_for("one discovered backend", LIMIT, || {
        extra_backends(&stack) == 1
    });

    // Down: nothing of the project is left.
    stack.compose(&["down", "-v", "-t", "20"]);
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("network={}", stack.network),
    ]);
    assert!(left.trim().is_empty(), "containers left: {left}");
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=com.docker.compose.project={}", stack.project),
    ]);
    assert!(left.trim().is_empty(), "containers left: {left}");
    let networks = docker(&["network", "ls", "--format", "{{.Name}}"]);
    assert!(!networks.lines().any(|n| n == stack.network), "{networks}");
    let volumes = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={}", stack.project),
    ]);
    assert!(volumes.trim().is_empty(), "volumes left: {volumes}");
}

/// Start `rusty-agent run` on the host with one docker service; returns (exit code, stderr).
fn agent_fails_with(
    image: &str,
    network: &str,
    docker_host: Option<&str>,
) -> (Option<i32>, String) {
    let dir = TempDir::new("dockererr");
    let config = dir.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n[services.app]\nruntime = \"docker\"\nimage = \"{image}\"\nport = 8000\nnetwork = \"{network}\"\n",
            free_port(),
            dir.path("state").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("rusty-agent"));
    cmd.args(["run", "--config"]).arg(&config);
    if let Some(h) = docker_host {
        cmd.env("DOCKER_HOST", h);
    }
    let out = cmd.output().expect("run the agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn docker_errors_say_what_to_do() {
    let (code, err) = agent_fails_with("x:1", "bridge", Some("unix:///tmp/rusty-no-such.sock"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot reach the Docker engine at unix:///tmp/rusty-no-such.sock"),
        "{err}"
    );
    if !engine_answers() {
        return;
    }
    let (code, err) = agent_fails_with("rustybalancer-demo:nope", "bridge", None);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("services.app.image: image \"rustybalancer-demo:nope\" is not present locally and this machine cannot pull"),
        "{err}"
    );
    let has_demo = Command::new("docker")
        .args(["image", "inspect", "rustybalancer-demo:v1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_demo {
        let (code, err) = agent_fails_with("rustybalancer-demo:v1", "rusty-no-such-net", None);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(
                "services.app.network: Docker network \"rusty-no-such-net\" does not exist"
            ),
            "{err}"
        );
    }
}
