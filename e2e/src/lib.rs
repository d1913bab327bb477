//! Test support for end-to-end tests: real processes on loopback, a tiny blocking HTTP client,
//! and cleanup that happens even when a test panics (every child is killed on drop).
//!
//! The binaries are the workspace's own debug builds (`target/debug/rusty-lb`, `rusty-agent`, `rusty-echo`);
//! `scripts/test.sh` builds them before the tests run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the test executable's target dir.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (scripts/test.sh does) first",
        path.display()
    );
    path
}

/// A free loopback port for a server a test starts, from below the kernel's ephemeral range
/// (32768 and up), so the local ports of the many client connections the tests make never take
/// it between this call and the server's bind (a port the kernel handed out for `:0` is in that
/// range). Each test process walks its own stretch of 10000–30000, from its pid on, taking the
/// next port that binds.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 10_000;
    const SPAN: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (BASE + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {BASE}..{}", BASE + SPAN)
}

/// A child process killed when dropped. Its stderr goes to a file it removes then (or to the
/// test's own with `E2E_VERBOSE` set).
pub struct Proc {
    pub child: Child,
    pub name: String,
    log: Option<PathBuf>,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String]) -> Proc {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let (stderr, log) = if std::env::var_os("E2E_VERBOSE").is_some() {
            (Stdio::inherit(), None)
        } else {
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("rusty-e2e-{}-{n}-{name}.log", std::process::id()));
            match std::fs::File::create(&path) {
                Ok(f) => (Stdio::from(f), Some(path)),
                Err(_) => (Stdio::null(), None),
            }
        };
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Proc {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// What the process wrote to stderr so far (empty with `E2E_VERBOSE`).
    pub fn stderr_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {} failed", self.name);
    }

    /// Wait for the process to exit, up to `limit`; its exit code if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(log) = &self.log {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// A `rusty-echo` on a fresh port.
pub struct Echo {
    pub proc: Proc,
    pub port: u16,
    pub id: String,
}

impl Echo {
    pub fn start(id: &str) -> Echo {
        Echo::start_with(id, &[])
    }

    pub fn start_with(id: &str, extra: &[&str]) -> Echo {
        Echo::start_on(id, free_port(), extra)
    }

    /// On a given port (a backend coming back where it was).
    pub fn start_on(id: &str, port: u16, extra: &[&str]) -> Echo {
        let mut args = vec![
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--id".to_owned(),
            id.to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(id, &bin("rusty-echo"), &args);
        wait_for_port(port, Duration::from_secs(10));
        Echo {
            proc,
            port,
            id: id.to_owned(),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A `rusty-lb` with fresh proxy and admin ports.
pub struct Lb {
    pub proc: Proc,
    pub port: u16,
    pub admin: u16,
}

impl Lb {
    /// Start with these extra flags and wait until the admin listener answers.
    pub fn start(extra: &[String]) -> Lb {
        Lb::start_on(free_port(), free_port(), extra)
    }

    /// On given proxy and admin ports (when something else must know the admin port first).
    pub fn start_on(port: u16, admin: u16, extra: &[String]) -> Lb {
        let mut args = vec![
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--admin".to_owned(),
            format!("127.0.0.1:{admin}"),
            "--grace-period".to_owned(),
            "5".to_owned(),
        ];
        // Two worker threads unless the test asks for another number.
        if !extra.iter().any(|a| a == "--threads") {
            args.extend(["--threads".to_owned(), "2".to_owned()]);
        }
        args.extend(extra.iter().cloned());
        let proc = Proc::spawn("rusty-lb", &bin("rusty-lb"), &args);
        wait_for_port(admin, Duration::from_secs(20));
        wait_for_port(port, Duration::from_secs(20));
        Lb { proc, port, admin }
    }

    pub fn get(&self, host: &str, path: &str) -> Response {
        get(self.port, host, path)
    }

    pub fn admin_get(&self, path: &str) -> Response {
        get(self.admin, "localhost", path)
    }

    /// The value of one metric series, 0 when absent: `series` is written as in the exposition
    /// (`name{label="value",…}`), its labels in any order.
    pub fn metric(&self, series: &str) -> f64 {
        metric_in(&self.admin_get("/metrics").body, series)
    }

    /// Requests answered by each backend of `service` so far, over every status code.
    pub fn served_by_backend(&self, service: &str) -> std::collections::BTreeMap<String, u64> {
        served_by_backend(&self.admin_get("/metrics").body, service)
    }

    /// Wait until a series reaches `value`. Requests are counted when Pingora logs them, just
    /// after the response is written, so a client may read its response a moment before.
    pub fn wait_metric(&self, series: &str, value: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.metric(series);
            if got == value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {got}, expected {value}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn table_version(&self) -> Option<u64> {
        let r = self.admin_get("/table");
        if r.status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        v["version"].as_u64()
    }

    /// Wait until the installed table has `version`.
    pub fn wait_version(&self, version: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.table_version() == Some(version) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "table version {version} not installed within {limit:?} (have {:?})",
            self.table_version()
        );
    }
}

pub fn wait_for_port(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {limit:?}");
}

/// One HTTP response, as read by [`Client`].
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend-id")
    }
}

/// A keep-alive HTTP/1.1 client for responses with Content-Length, enough for our servers.
pub struct Client {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    pub fn new(port: u16) -> Client {
        Client { port, conn: None }
    }

    /// One request on the kept-alive connection (reconnecting when the server closed it).
    pub fn request(&mut self, head: &str) -> std::io::Result<Response> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().expect("connected above");
        conn.get_mut().write_all(head.as_bytes())?;
        let r = read_response(conn);
        let close = match &r {
            Ok(resp) => resp
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
            Err(_) => true,
        };
        if close {
            self.conn = None;
        }
        r
    }

    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<Response> {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
    }
}

fn read_response(conn: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        conn.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    conn.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a fresh connection.
pub fn get(port: u16, host: &str, path: &str) -> Response {
    Client::new(port)
        .request(&format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))
        .unwrap_or_else(|e| panic!("GET {path} via port {port}: {e}"))
}

/// A table JSON for one service `web` (any host) with these (id, addr, weight, priority).
pub fn table(version: u64, backends: &[(&str, &str, u32, u32)]) -> String {
    let backends: Vec<serde_json::Value> = backends
        .iter()
        .map(|(id, addr, w, p)| serde_json::json!({"id": id, "addr": addr, "weight": w, "priority": p}))
        .collect();
    serde_json::json!({"version": version, "services": [{"name": "web", "backends": backends}]})
        .to_string()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p =
            std::env::temp_dir().join(format!("rusty-e2e-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Write `text` to `path` atomically (so a SIGHUP never reads half a file).
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write table");
    std::fs::rename(&tmp, path).expect("rename table");
}

/// A bounded background load: `threads` keep-alive clients sending GETs until stopped (or until
/// the hard limit passes), recording every outcome.
pub struct LoadLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<std::thread::JoinHandle<LoadReport>>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    /// Non-200 statuses and I/O errors, as text.
    pub failures: Vec<String>,
    pub by_backend: std::collections::BTreeMap<String, u64>,
}

impl LoadLoop {
    pub fn start(port: u16, host: &str, threads: usize, hard_limit: Duration) -> LoadLoop {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                let host = host.to_owned();
                std::thread::spawn(move || {
                    let mut report = LoadReport::default();
                    let mut client = Client::new(port);
                    let deadline = Instant::now() + hard_limit;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        match client.get(&host, "/") {
                            Ok(r) if r.status == 200 => {
                                report.ok += 1;
                                let b = r.backend().unwrap_or("?").to_owned();
                                *report.by_backend.entry(b).or_default() += 1;
                            }
                            Ok(r) => report.failures.push(format!(
                                "status {}: {}",
                                r.status,
                                r.body.trim()
                            )),
                            Err(e) => report.failures.push(format!("error: {e}")),
                        }
                    }
                    report
                })
            })
            .collect();
        LoadLoop { stop, workers }
    }

    pub fn finish(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadReport::default();
        for w in self.workers {
            let r = w.join().expect("load worker panicked");
            total.ok += r.ok;
            total.failures.extend(r.failures);
            for (k, v) in r.by_backend {
                *total.by_backend.entry(k).or_default() += v;
            }
        }
        total
    }
}

/// A test's agent stops the way an operator stops it (SIGTERM: it stops its instances); if it
/// does not within 10 s, or was killed before, whatever instances it recorded are killed too,
/// so no test leaves processes behind.
impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.proc.child.try_wait(), Ok(None)) {
            self.proc.signal("TERM");
            if self.proc.wait_exit(Duration::from_secs(10)).is_none() {
                self.kill();
            }
        }
        for pid in self.recorded_pids() {
            // The group the instance leads: whatever it started goes too.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A `rusty-agent` on a fresh port, with its config, token and state in a scratch directory.
pub struct Agent {
    pub proc: Proc,
    pub port: u16,
    pub config: PathBuf,
    pub token_file: PathBuf,
    pub dir: TempDir,
}

/// `[services.web]` run by the agent as `rusty-echo` processes that answer with `{tag}{instance}`,
/// with quick health checks and drains so tests stay short.
pub fn echo_service(name: &str, replicas: u32, tag: &str) -> String {
    format!(
        r#"
[services.{name}]
command = "{echo}"
args = ["--listen", "{{host}}:{{port}}", "--id", "{tag}{{instance}}"]
replicas = {replicas}

[services.{name}.health]
interval = "100ms"
timeout = "1s"
rise = 2
fall = 3

[services.{name}.rollout]
drain = "500ms"
healthy_timeout = "5s"
"#,
        echo = bin("rusty-echo").display()
    )
}

impl Agent {
    /// Start an agent with these `[services.*]` tables and wait until its listener answers.
    pub fn start(tag: &str, services: &str) -> Agent {
        Agent::start_with(tag, "", services)
    }

    /// Like [`Agent::start`], with more lines for the `[agent]` table.
    pub fn start_with(tag: &str, agent_lines: &str, services: &str) -> Agent {
        Agent::start_on("127.0.0.1", tag, agent_lines, services)
    }

    /// Like [`Agent::start_with`], listening on `ip` (`0.0.0.0`: also reachable from a network
    /// namespace of the test's; the helpers still talk to it on 127.0.0.1).
    pub fn start_on(ip: &str, tag: &str, agent_lines: &str, services: &str) -> Agent {
        let dir = TempDir::new(tag);
        let port = free_port();
        let token_file = dir.path("token");
        std::fs::write(&token_file, format!("token-{tag}-{}\n", std::process::id()))
            .expect("write token");
        let config = dir.path("agent.toml");
        let text = format!(
            "[agent]\nlisten = \"{ip}:{port}\"\nstate_dir = \"{}\"\ntoken_file = \"{}\"\nlog = \"info\"\n{agent_lines}\n{services}",
            dir.path("state").display(),
            token_file.display()
        );
        std::fs::write(&config, text).expect("write agent config");
        let proc = Agent::spawn(&config);
        wait_for_port(port, Duration::from_secs(20));
        Agent {
            proc,
            port,
            config,
            token_file,
            dir,
        }
    }

    fn spawn(config: &Path) -> Proc {
        Proc::spawn(
            "rusty-agent",
            &bin("rusty-agent"),
            &[
                "run".to_owned(),
                "--config".to_owned(),
                config.display().to_string(),
            ],
        )
    }

    /// SIGKILL the agent and start it again with the same config and state.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.proc = Agent::spawn(&self.config);
        wait_for_port(self.port, Duration::from_secs(20));
    }

    /// SIGKILL, as a crash: its process instances keep running (a restarted agent adopts them).
    pub fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// The pids of the process instances the agent has recorded in its state dir.
    pub fn recorded_pids(&self) -> Vec<i64> {
        let file = self.dir.path("state").join("processes.json");
        let records: serde_json::Value = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        records
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["pid"].as_i64())
            .collect()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/tables", self.port)
    }

    /// A data plane subscribed to this agent.
    pub fn lb(&self) -> Lb {
        self.lb_on(free_port())
    }

    /// A data plane subscribed to this agent, with its admin listener on `admin`.
    pub fn lb_on(&self, admin: u16) -> Lb {
        Lb::start_on(
            free_port(),
            admin,
            &[
                "--agent".to_owned(),
                self.ws_url(),
                "--token-file".to_owned(),
                self.token_file.display().to_string(),
            ],
        )
    }

    /// Run the CLI against this agent; returns (success, stdout + stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        // The connection flags go right after the subcommand: `deploy` takes everything after
        // `--` as the new command line.
        let (sub, rest) = args.split_first().expect("a subcommand");
        let out = Command::new(bin("rusty-agent"))
            .arg(sub)
            .arg("--agent")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--token-file")
            .arg(&self.token_file)
            .args(rest)
            .output()
            .expect("run rusty-agent CLI");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `GET path` on the agent's listener with the right token.
    pub fn api_get(&self, path: &str) -> Response {
        let token = std::fs::read_to_string(&self.token_file).expect("token");
        Client::new(self.port)
            .request(&format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                token.trim()
            ))
            .unwrap_or_else(|e| panic!("GET {path} on the agent: {e}"))
    }

    pub fn status(&self) -> serde_json::Value {
        let r = self.api_get("/v1/status");
        assert_eq!(r.status, 200, "status: {}", r.body);
        serde_json::from_str(&r.body).expect("status JSON")
    }

    /// The status of one service.
    pub fn service(&self, name: &str) -> serde_json::Value {
        self.status()["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no service {name} in the agent's status"))
    }

    /// Wait until `check` holds for the status; panics with `what` and the last status.
    pub fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.status();
            if check(&st) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; status: {st:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until `name` has exactly `n` instances, all in the table.
    pub fn wait_serving(&self, name: &str, n: usize, limit: Duration) {
        self.wait_until(&format!("{name} serving on {n} instances"), limit, |st| {
            st["services"].as_array().into_iter().flatten().any(|s| {
                s["name"] == name
                    && s["instances"]
                        .as_array()
                        .is_some_and(|i| i.len() == n && i.iter().all(|i| i["in_table"] == true))
            })
        });
    }
}

/// Wait until the data plane's table has `n` backends for its first service.
pub fn wait_backends(lb: &Lb, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let r = lb.admin_get("/table");
        let count = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["services"][0]["backends"].as_array().map(|b| b.len()));
        if count == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "data plane has {count:?} backends, expected {n}, within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Which backends answer `n` sequential requests.
pub fn backends_seen(port: u16, host: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut client = Client::new(port);
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let r = client.get(host, "/").expect("request");
        assert_eq!(r.status, 200, "{}", r.body);
        *seen
            .entry(r.backend().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    seen
}

/// Wait until the data plane's table lists exactly these backends for its first service
/// (the agent reports a change before every data plane has applied it).
pub fn wait_table_backends(lb: &Lb, ids: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut want: Vec<&str> = ids.to_vec();
    want.sort_unstable();
    loop {
        let r = lb.admin_get("/table");
        let mut got: Vec<String> = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| {
                v["services"][0]["backends"].as_array().map(|b| {
                    b.iter()
                        .filter_map(|b| b["id"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default();
        got.sort_unstable();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "data plane has backends {got:?}, expected {want:?}, within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send raw bytes, read until the proxy closes (or 5 s), return what came back.
pub fn raw(port: u16, request: impl AsRef<[u8]>) -> (String, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_ref()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// A `rusty-lb` serving a one-backend table that points at `a`, with these extra flags.
pub fn proxy_to(a: &Echo, tag: &str, extra: &[&str]) -> (TempDir, Lb) {
    let dir = TempDir::new(tag);
    let path = dir.path("table.json");
    write_atomic(&path, &table(1, &[("a", &a.addr(), 1, 0)]));
    let mut args = vec!["--table".to_owned(), path.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let lb = Lb::start(&args);
    lb.wait_version(1, Duration::from_secs(10));
    (dir, lb)
}

/// Reading answers off a raw client connection exactly as a client must frame them, for tests
/// that compare answers byte for byte (the lane against the pipeline).
pub mod engine;
pub mod tls;

pub mod wire {
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpStream;
    use std::time::Duration;

    /// One response read off a client connection.
    #[derive(Debug)]
    pub struct Answer {
        pub status: u16,
        pub head: String,
        pub body: Vec<u8>,
    }

    impl Answer {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }

        /// The head's lines (status line first), lower-cased and sorted, without `Date`.
        pub fn head_lines(&self) -> Vec<String> {
            let mut lines: Vec<String> = self
                .head
                .lines()
                .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
                .filter(|l| !l.is_empty())
                .map(str::to_ascii_lowercase)
                .collect();
            lines.sort();
            lines
        }
    }

    /// A connection and a buffered reader on it, with a 10 s read timeout.
    pub fn connect(port: u16) -> (TcpStream, BufReader<TcpStream>) {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        (s, r)
    }

    /// The next answer: its head, then the body its framing gives (none after a `HEAD`).
    pub fn read_answer(r: &mut BufReader<TcpStream>, head_request: bool) -> Answer {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(
                r.read_line(&mut line).unwrap() > 0,
                "closed mid-head: {head:?}"
            );
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let status: u16 = head[9..12].parse().unwrap();
        let mut a = Answer {
            status,
            head,
            body: Vec::new(),
        };
        if head_request || status < 200 || status == 204 || status == 304 {
            return a;
        }
        if a.header("transfer-encoding").is_some() {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim_end(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    assert_eq!(chunk, b"\r\n", "no trailers expected");
                    return a;
                }
                a.body.extend_from_slice(&chunk[..n]);
            }
        }
        match a.header("content-length") {
            Some(n) => {
                let mut body = vec![0; n.parse().unwrap()];
                r.read_exact(&mut body).unwrap();
                a.body = body;
            }
            None => {
                r.read_to_end(&mut a.body).unwrap();
            }
        }
        a
    }

    /// Send `request` on a new connection and read one answer, or `None` if the connection
    /// closed without one.
    pub fn exchange(port: u16, request: &[u8]) -> Option<Answer> {
        use std::io::Write;
        let (mut s, mut r) = connect(port);
        s.write_all(request).unwrap();
        if r.fill_buf().map_or(true, |b| b.is_empty()) {
            return None;
        }
        let head = request.starts_with(b"HEAD");
        Some(read_answer(&mut r, head))
    }
}

/// A small tmpfs mounted for a test (needs root), lazily unmounted on drop: a state dir that
/// can be made read-only.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` where mounting is not allowed (not root).
    pub fn mount(at: &std::path::Path) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_owned()))
    }

    /// `remount` with `mode`: "ro" or "rw".
    pub fn remount(&self, mode: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {mode}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The value of one series in a metrics text, 0 when absent: `series` is written as in the
/// exposition (`name{label="value",…}`), its labels in any order.
pub fn metric_in(text: &str, series: &str) -> f64 {
    let line = format!("{series} 0");
    let wanted =
        rusty_shared::exposition::sample(&line).unwrap_or_else(|| panic!("not a series: {series}"));
    let labels: Vec<(&str, &str)> = wanted
        .labels
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    rusty_shared::exposition::value_of(text, wanted.name, &labels).unwrap_or(0.0)
}

/// Requests answered by each backend of `service` in a data plane's metrics text, over every
/// status code.
pub fn served_by_backend(text: &str, service: &str) -> std::collections::BTreeMap<String, u64> {
    let mut by = std::collections::BTreeMap::new();
    for s in rusty_shared::exposition::samples(text) {
        if s.name != "rustybalancer_requests_total" || s.label("service") != Some(service) {
            continue;
        }
        match s.label("backend") {
            Some(backend) if !backend.is_empty() => {
                *by.entry(backend.to_owned()).or_default() += s.value as u64;
            }
            _ => {}
        }
    }
    by
}
