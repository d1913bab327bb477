//! Agent faults with the data plane on a network of its own: `rusty-lb` runs in a network
//! namespace this test creates (a veth pair with a /30 between it and the host, nothing else),
//! the load comes from inside that namespace, and the agent and its instances are on the host
//! side. Each fault is injected while the load runs; for each the test reports failed
//! requests, the time until the data plane has the agent's newest table, and the data plane's
//! memory before and after, and asserts the targets: no failed request for an agent
//! SIGKILL or hang with healthy backends, and the newest table within about a second of the
//! agent or the link coming back.
//!
//! Creating a namespace needs root (`ip netns add`); without it the test says so loudly and
//! checks nothing. Everything it creates is removed at the end, also when it fails.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusty_e2e::*;

const LIMIT: Duration = Duration::from_secs(30);
/// The bound for "converged", with room for the 1 s reconnect delay's jitter and a
/// busy 2-core machine.
const CONVERGED: Duration = Duration::from_millis(2500);

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace joined to the host by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

impl Netns {
    fn create() -> Option<Netns> {
        let id = std::process::id() % 250;
        let name = format!("rbfault{}", std::process::id());
        let host_if = format!("rbfh{id}");
        let ns_if = format!("rbfn{id}");
        let (host_ip, ns_ip) = (format!("10.201.{id}.1"), format!("10.201.{id}.2"));
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
        };
        let ok = ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]) && ip(&["link", "set", &ns_if, "netns", &name])
            && ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ns_ip}/30"),
                "dev",
                &ns_if,
            ])
            && ip(&["-n", &name, "link", "set", &ns_if, "up"])
            && ip(&["-n", &name, "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }

    fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" }
        ]));
    }

    /// Run `f` on a thread that lives in the namespace: its sockets are the namespace's.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .expect("thread in the namespace")
        })
    }

    fn enter(&self) {
        let file = std::fs::File::open(Path::new("/var/run/netns").join(&self.name))
            .expect("the namespace's file");
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a descriptor we hold; it moves only the calling thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_if]);
        ip(&["netns", "del", &self.name]);
    }
}

/// A load from inside the namespace: keep-alive clients, every outcome counted.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<(Instant, String)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(ns: &Arc<Netns>, port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (ns, stop, ok, failures) =
                    (ns.clone(), stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    ns.enter();
                    let mut client = Client::new(port);
                    let deadline = Instant::now() + Duration::from_secs(240);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match client.get("localhost", "/") {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push((Instant::now(), format!("status {}", r.status))),
                            Err(e) => {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push((Instant::now(), e.to_string()));
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    /// Requests served and failures so far.
    fn counts(&self) -> (u64, usize) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().len(),
        )
    }

    fn finish(self) -> (u64, Vec<(Instant, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

struct Plane {
    proc: Proc,
    admin: u16,
}

impl Plane {
    fn version(&self, ns: &Netns) -> Option<u64> {
        let admin = self.admin;
        ns.run(move || {
            let body = Client::new(admin)
                .request("GET /table HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .ok()?
                .body;
            serde_json::from_str::<serde_json::Value>(&body).ok()?["version"].as_u64()
        })
    }

    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The agent's newest table version.
fn newest(agent: &Agent) -> u64 {
    agent.status()["table_version"].as_u64().unwrap_or(0)
}

/// How long until the data plane has at least the agent's newest table, from `since` or from
/// when the agent published a table newer than `older` (whichever is later): the delay the
/// data plane adds, not the agent's own work.
fn converge(
    plane: &Plane,
    ns: &Netns,
    agent: &Agent,
    since: Instant,
    older: u64,
    what: &str,
) -> Duration {
    let deadline = Instant::now() + LIMIT;
    let mut published: Option<Instant> = None;
    loop {
        let want = newest(agent);
        if want > older && published.is_none() {
            published = Some(Instant::now().max(since));
        }
        if let Some(t0) = published {
            if plane.version(ns).is_some_and(|v| v >= want) {
                let took = t0.elapsed();
                eprintln!("{what}: the data plane has the agent's table {want} {took:?} after it was there to take");
                return took;
            }
        }
        assert!(Instant::now() < deadline, "{what}: never converged");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn agent_faults_with_the_data_plane_in_its_own_network_namespace() {
    let Some(ns) = Netns::create() else {
        eprintln!("\n==== SKIPPED: cannot create a network namespace (ip netns add needs root); the fault suite did not run ====\n");
        return;
    };
    let ns = Arc::new(ns);
    let host_ip = ns.host_ip.clone();
    // The agent's instances listen on the host's end of the veth, which the data plane reaches.
    let agent_lines = format!("instance_host = \"{host_ip}\"\n");
    let mut agent = Agent::start_on(
        "0.0.0.0",
        "faults",
        &agent_lines,
        &echo_service("web", 2, ""),
    );
    agent.wait_serving("web", 2, LIMIT);

    let (port, admin) = (free_port(), free_port());
    let plane = Plane {
        proc: Proc::spawn(
            "rusty-lb",
            Path::new("/usr/bin/env"),
            &[
                "ip".into(),
                "netns".into(),
                "exec".into(),
                ns.name.clone(),
                bin("rusty-lb").display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--admin".into(),
                format!("127.0.0.1:{admin}"),
                "--agent".into(),
                format!("ws://{host_ip}:{}/v1/tables", agent.port),
                "--token-file".into(),
                agent.token_file.display().to_string(),
                "--state-dir".into(),
                agent.dir.path("lb-state").display().to_string(),
            ],
        ),
        admin,
    };
    converge(&plane, &ns, &agent, Instant::now(), 0, "start");
    let load = Load::start(&ns, port, 3);
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = plane.rss_kb();
    let mut report = Vec::new();

    // 1. SIGKILL for 10 s, then a restart: the instances keep serving, nothing fails.
    let before = load.counts();
    let old = newest(&agent);
    agent.kill();
    std::thread::sleep(Duration::from_secs(10));
    let back = Instant::now();
    agent.kill_and_restart();
    let took = converge(&plane, &ns, &agent, back, old, "SIGKILL 10 s");
    agent.wait_serving("web", 2, LIMIT);
    let after = load.counts();
    report.push((
        "agent SIGKILL 10 s",
        after.1 - before.1,
        after.0 - before.0,
        took,
    ));
    assert!(took < CONVERGED, "{took:?}");

    // 2. SIGSTOP past the data plane's dead-peer timeout (15 s), then SIGCONT and a scale: the
    //    last table serves meanwhile; the scaled table arrives within a second or so.
    let before = load.counts();
    let old = newest(&agent);
    agent.proc.signal("STOP");
    std::thread::sleep(Duration::from_secs(17));
    agent.proc.signal("CONT");
    let back = Instant::now();
    let (ok, out) = agent.cli(&["scale", "web", "3", "--no-wait"]);
    assert!(ok, "{out}");
    agent.wait_serving("web", 3, LIMIT);
    let took = converge(&plane, &ns, &agent, back, old, "SIGSTOP 17 s");
    let after = load.counts();
    report.push((
        "agent SIGSTOP 17 s, then scale 2→3",
        after.1 - before.1,
        after.0 - before.0,
        took,
    ));
    assert!(took < CONVERGED, "{took:?}");

    // 3. The link down for 20 s while the agent scales: the backends are out of reach too, so
    //    requests fail meanwhile (counted, not a target); the newest table arrives soon after
    //    the link is back.
    let before = load.counts();
    let old = newest(&agent);
    ns.link(false);
    let (ok, out) = agent.cli(&["scale", "web", "2", "--no-wait"]);
    assert!(ok, "{out}");
    agent.wait_serving("web", 2, LIMIT);
    assert!(
        newest(&agent) > old,
        "the agent published while the link was down"
    );
    std::thread::sleep(Duration::from_secs(20));
    ns.link(true);
    let back = Instant::now();
    let took = converge(&plane, &ns, &agent, back, old, "link down 20 s");
    let after = load.counts();
    report.push((
        "link down 20 s, scale 3→2",
        after.1 - before.1,
        after.0 - before.0,
        took,
    ));
    assert!(took < CONVERGED, "{took:?}");

    // 4. Many tables fast: a scale every 100 ms, twenty times.
    let before = load.counts();
    let old = newest(&agent);
    let started = Instant::now();
    for i in 0..20 {
        let n = if i % 2 == 0 { "3" } else { "2" };
        let (ok, out) = agent.cli(&["scale", "web", n, "--no-wait"]);
        assert!(ok, "{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.wait_serving("web", 2, LIMIT);
    let settled = Instant::now();
    let took = converge(&plane, &ns, &agent, settled, old, "20 scales");
    let after = load.counts();
    report.push((
        "20 scales in 2 s",
        after.1 - before.1,
        after.0 - before.0,
        took,
    ));
    eprintln!("20 scales took {:?}", started.elapsed());

    let (served, failures) = load.finish();
    let rss_after = plane.rss_kb();
    eprintln!("\n| fault | failed requests | served | newest table after |\n|---|---:|---:|---:|");
    for (fault, failed, ok, took) in &report {
        eprintln!("| {fault} | {failed} | {ok} | {} ms |", took.as_millis());
    }
    eprintln!(
        "\ndata plane RSS {:.1} MB before, {:.1} MB after; {served} requests served in all",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    // The targets: nothing failed but while the link was down, and memory did not run away.
    let outside_partition: usize = report
        .iter()
        .filter(|(fault, ..)| !fault.starts_with("link down"))
        .map(|(_, failed, ..)| *failed)
        .sum();
    assert_eq!(
        outside_partition,
        0,
        "failures outside the partition: {:?}",
        failures.iter().map(|(_, e)| e).collect::<Vec<_>>()
    );
    assert!(
        rss_after < rss_before * 2 + 8 * 1024,
        "{rss_before} kB → {rss_after} kB"
    );
    drop(plane);
}
