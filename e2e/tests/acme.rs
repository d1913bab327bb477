//! ACME end to end, offline: Debian's `pebble` (a real ACME CA for tests) with
//! `pebble-challtestsrv` resolving the test names, the real agent ordering over HTTP-01, the
//! real data plane answering the challenge on its plain listener and then serving the issued
//! certificate to curl; a renewal under load; a name the CA cannot reach; a restart that does
//! not order again. `scripts/setup.sh` installs pebble.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rusty_e2e::tls::{curl, https_codes, https_requests, Pki};
use rusty_e2e::{echo_service, free_port, metric_in, wait_for_port, Agent, Lb, Proc, TempDir};

/// A pebble CA and its DNS server, on fresh ports.
struct Pebble {
    _dns: Proc,
    _ca: Proc,
    directory: String,
    dns_admin: u16,
    admin: u16,
    /// The CA pebble's own HTTPS listeners present (ours, made for the test).
    tls_ca: PathBuf,
}

fn need(tool: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(tool);
    assert!(
        path.exists(),
        "{tool} is missing: scripts/setup.sh installs Debian's pebble package"
    );
    path
}

impl Pebble {
    /// Validation of HTTP-01 challenges goes to `http_port` of whatever the names resolve to
    /// (127.0.0.1 unless told otherwise).
    fn start(dir: &TempDir, http_port: u16) -> Pebble {
        let pki = Pki::new(&dir.path("pebble-ca"));
        let certs = dir.path("pebble-certs");
        pki.issue(&certs, "pebble", &["DNS:localhost", "IP:127.0.0.1"], 10);
        let (dns_port, dns_admin, port, admin) =
            (free_port(), free_port(), free_port(), free_port());
        let dns = Proc::spawn(
            "challtestsrv",
            &need("pebble-challtestsrv"),
            &[
                "-dns01".into(),
                format!("127.0.0.1:{dns_port}"),
                "-http01".into(),
                String::new(),
                "-https01".into(),
                String::new(),
                "-tlsalpn01".into(),
                String::new(),
                "-management".into(),
                format!("127.0.0.1:{dns_admin}"),
                "-defaultIPv4".into(),
                "127.0.0.1".into(),
                "-defaultIPv6".into(),
                String::new(),
            ],
        );
        let config = dir.path("pebble.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"pebble": {{"listenAddress": "127.0.0.1:{port}", "managementListenAddress": "127.0.0.1:{admin}",
                "certificate": "{0}/pebble.crt", "privateKey": "{0}/pebble.key",
                "httpPort": {http_port}, "tlsPort": {tls_port}, "ocspResponderURL": "",
                "externalAccountBindingRequired": false}}}}"#,
                certs.display(),
                tls_port = free_port(),
            ),
        )
        .unwrap();
        let ca = Proc::spawn(
            "pebble",
            Path::new("/usr/bin/env"),
            &[
                // Validate at once, never reject a good nonce, always prove control anew.
                "PEBBLE_VA_NOSLEEP=1".into(),
                "PEBBLE_WFE_NONCEREJECT=0".into(),
                "PEBBLE_AUTHZREUSE=0".into(),
                need("pebble").display().to_string(),
                "-config".into(),
                config.display().to_string(),
                "-dnsserver".into(),
                format!("127.0.0.1:{dns_port}"),
            ],
        );
        wait_for_port(dns_admin, Duration::from_secs(10));
        wait_for_port(port, Duration::from_secs(10));
        wait_for_port(admin, Duration::from_secs(10));
        Pebble {
            _dns: dns,
            _ca: ca,
            directory: format!("https://127.0.0.1:{port}/dir"),
            dns_admin,
            admin,
            tls_ca: pki.ca(),
        }
    }

    /// The root pebble issues under (made fresh by each pebble), saved to `out`.
    fn root(&self, out: &Path) -> PathBuf {
        let got = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&self.tls_ca)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.admin))
            .output()
            .unwrap();
        assert!(
            got.status.success(),
            "{}",
            String::from_utf8_lossy(&got.stderr)
        );
        std::fs::write(out, &got.stdout).unwrap();
        out.to_owned()
    }

    /// Make `host` resolve to `ip` for the CA.
    fn resolve(&self, host: &str, ip: &str) {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "-d"])
            .arg(format!(r#"{{"host": "{host}", "addresses": ["{ip}"]}}"#))
            .arg(format!("http://127.0.0.1:{}/add-a", self.dns_admin))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The ACME entry of `name` in the agent's status.
fn acme_of(agent: &Agent, host: &str) -> serde_json::Value {
    agent.status()["acme"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["host"] == host)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

fn wait_acme(
    agent: &Agent,
    host: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let c = acme_of(agent, host);
        if done(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{host}: {what} never happened; last status {c}\nagent log:\n{}",
            agent.proc.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One batch of HTTPS requests, each on a new connection: the status codes curl got.
fn https_batch(port: u16, host: &str, root: &Path, n: usize) -> Vec<String> {
    https_codes(&https_requests(port, host, root, n).output().unwrap())
}

#[test]
fn the_agent_orders_over_http01_the_data_plane_answers_and_serves_and_renews() {
    let dir = TempDir::new("acme");
    let http_port = free_port();
    let pebble = Pebble::start(&dir, http_port);
    // bad.test resolves where nothing listens: its orders fail, shop.test's do not.
    pebble.resolve("bad.test", "127.0.0.2");

    let services = echo_service("web", 1, "").replacen(
        "replicas = 1\n",
        "replicas = 1\nhosts = [\"shop.test\"]\ntls = \"acme\"\n",
        1,
    ) + &format!(
        "\n[tls.acme]\ndirectory = \"{}\"\ncontact = [\"mailto:ops@shop.test\"]\nhosts = [\"bad.test\"]\nca_file = \"{}\"\n",
        pebble.directory,
        pebble.tls_ca.display()
    );
    let mut agent = Agent::start("acme", &services);
    // Nothing is ordered while no data plane could answer.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(acme_of(&agent, "shop.test")["state"], "waiting");

    let tls_port = free_port();
    let lb = Lb::start_on(
        http_port,
        free_port(),
        &[
            "--agent".into(),
            agent.ws_url(),
            "--token-file".into(),
            agent.token_file.display().to_string(),
            "--tls-listen".into(),
            format!("127.0.0.1:{tls_port}"),
            "--state-dir".into(),
            dir.path("lb-state").display().to_string(),
        ],
    );
    wait_for_port(tls_port, Duration::from_secs(20));
    let first = wait_acme(
        &agent,
        "shop.test",
        "the first certificate",
        Duration::from_secs(60),
        |c| c["state"] == "valid",
    );
    let root = pebble.root(&dir.path("pebble-root.pem"));

    // The issued certificate serves, verified against pebble's root.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = curl(tls_port, "shop.test", "/", &root, &[]);
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never served: {}", r.error);
        std::thread::sleep(Duration::from_millis(100));
    }
    let expiry = "rustybalancer_tls_certificate_expiry_timestamp_seconds{pair=\"shop.test\"}";
    assert_eq!(lb.metric(expiry), first["not_after"].as_f64().unwrap());
    // The unreachable name failed, is counted and shown, and does not hold the other back.
    let bad = wait_acme(
        &agent,
        "bad.test",
        "a failed order",
        Duration::from_secs(60),
        |c| c["state"] == "failed",
    );
    assert_eq!(bad["failures"], 1);
    // Once the orders are over, their challenges leave the table.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb.admin_get("/table").body.contains("acme_challenges") {
        assert!(Instant::now() < deadline, "{}", lb.admin_get("/table").body);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        bad["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{bad}"
    );
    let metrics = agent.api_get("/metrics").body;
    for series in [
        "rusty_agent_acme_orders_total{host=\"shop.test\",result=\"issued\"}",
        "rusty_agent_acme_orders_total{host=\"bad.test\",result=\"failed\"}",
        "rusty_agent_acme_failures{host=\"bad.test\"}",
    ] {
        assert_eq!(metric_in(&metrics, series), 1.0, "{series} in\n{metrics}");
    }
    let (ok, text) = agent.cli(&["status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("shop.test") && text.contains("valid"),
        "{text}"
    );
    assert!(
        text.contains("bad.test") && text.contains("failed"),
        "{text}"
    );

    // Keys are the owner's only and never in a log.
    use std::os::unix::fs::PermissionsExt;
    let acme_dir = agent.dir.path("state").join("acme");
    for f in ["shop.test.key", "shop.test.crt", "account.json"] {
        let mode = std::fs::metadata(acme_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(!agent.proc.stderr_text().contains("PRIVATE KEY"));
    assert!(!lb.proc.stderr_text().contains("PRIVATE KEY"));

    // Renewal under load: HTTPS requests on new connections all along, none fails.
    let (ok, text) = agent.cli(&["renew"]);
    assert!(ok && text.contains("shop.test"), "{text}");
    let mut codes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let renewed = loop {
        codes.extend(https_batch(tls_port, "shop.test", &root, 25));
        let c = acme_of(&agent, "shop.test");
        if c["state"] == "valid"
            && c["not_after"] != first["not_after"]
            && lb.metric(expiry) == c["not_after"].as_f64().unwrap()
        {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal: {c}\n{}",
            agent.proc.stderr_text()
        );
    };
    codes.extend(https_batch(tls_port, "shop.test", &root, 25));
    let failed: Vec<&String> = codes.iter().filter(|c| *c != "200").collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        codes.len()
    );
    assert!(codes.len() >= 50);
    assert_eq!(
        metric_in(
            &agent.api_get("/metrics").body,
            "rusty_agent_acme_orders_total{host=\"shop.test\",result=\"issued\"}"
        ),
        2.0
    );

    // A restarted agent serves what it has and orders nothing that is not due.
    agent.kill_and_restart();
    let again = wait_acme(
        &agent,
        "shop.test",
        "the saved certificate",
        Duration::from_secs(20),
        |c| c["state"] == "valid",
    );
    assert_eq!(again["not_after"], renewed["not_after"]);
    assert!(
        !agent
            .api_get("/metrics")
            .body
            .contains("host=\"shop.test\",result=\"issued\""),
        "no new order after a restart"
    );
    // (Its process instances restart with it, issue 21: wait for them.)
    agent.wait_serving("web", 1, Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = curl(tls_port, "shop.test", "/", &root, &[]);
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{} {}", r.status, r.error);
        std::thread::sleep(Duration::from_millis(100));
    }
}
