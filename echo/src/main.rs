//! `rusty-echo`: the demo backend. It answers every request with 200, an `x-backend-id` header
//! and a short body naming its id, and `GET /healthz` with `ok`. It exists so that the README,
//! the tests and the load tests have a real HTTP server to put behind the balancer without
//! installing anything; it speaks HTTP/1.1 with keep-alive and reads (and discards) request
//! bodies of either framing so connections stay reusable. With `--script FILE` it plays a
//! hostile backend: a request for `/case/NAME` gets the bytes, pauses and closes that case
//! of the file scripts (`e2e/corpus/hostile-backends.txt`, see `script.rs`).

mod script;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A tiny HTTP backend for demos and tests.
#[derive(Debug, Parser)]
#[command(name = "rusty-echo", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// The id this backend reports in `x-backend-id` and its body.
    #[arg(long, env = "ECHO_ID", default_value = "echo")]
    id: String,
    /// Wait this long before answering each request (to simulate a slow backend).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Append the request head to the body (to see what a proxy forwarded).
    #[arg(long)]
    echo_headers: bool,
    /// Send the response body in ten pieces spread over this long (a slow, streaming answer).
    #[arg(long, default_value_t = 0)]
    trickle_ms: u64,
    /// Serve at most this many requests at a time (0: no limit); the others wait their turn,
    /// like a worker pool of that size.
    #[arg(long, default_value_t = 0)]
    max_concurrent: usize,
    /// Append every complete request received (head and body read) to this file, one line
    /// each, head escaped: what a proxy let through, for tests to check.
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Answer `/case/NAME` requests as case NAME of this file scripts them.
    #[arg(long, value_name = "FILE")]
    script: Option<std::path::PathBuf>,
    /// Say in `x-echo-connection` which connection (1 for the first accepted, …) each answer
    /// went out on: how a proxy reuses its upstream connections, for tests to check.
    #[arg(long)]
    number_connections: bool,
}

/// What each connection needs besides its stream.
struct Conf {
    /// Bumped at each flap: connections from before it are dropped, as by a restart.
    epoch: std::sync::atomic::AtomicU64,
    trickle: Duration,
    /// Permits for `--max-concurrent`.
    workers: Option<tokio::sync::Semaphore>,
    id: Arc<str>,
    delay: Duration,
    echo_headers: bool,
    record: Option<std::path::PathBuf>,
    script: script::Script,
    /// Connections accepted so far, when `--number-connections` is set.
    accepted: Option<std::sync::atomic::AtomicU64>,
}

/// Largest request head we read; more gets a 431.
const MAX_HEAD: usize = 64 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rusty-echo: --listen {}: {e}", args.listen);
            std::process::exit(2);
        }
    };
    let script = match &args.script {
        Some(path) => match script::Script::load(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("rusty-echo: --script {}: {e}", path.display());
                std::process::exit(2);
            }
        },
        None => script::Script::default(),
    };
    eprintln!("rusty-echo {} listening on {}", args.id, args.listen);
    let conf = Arc::new(Conf {
        epoch: std::sync::atomic::AtomicU64::new(0),
        trickle: Duration::from_millis(args.trickle_ms),
        workers: (args.max_concurrent > 0)
            .then(|| tokio::sync::Semaphore::new(args.max_concurrent)),
        id: args.id.into(),
        delay: Duration::from_millis(args.delay_ms),
        echo_headers: args.echo_headers,
        record: args.record,
        script,
        accepted: args
            .number_connections
            .then(|| std::sync::atomic::AtomicU64::new(0)),
    });
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    // Fault injection for tests: SIGUSR1 makes this backend flap, as if it restarted every
    // FLAP_PERIOD: its listener is gone for FLAP_DOWN and its open connections are dropped.
    // Probes a few per second apart mostly pass; a proxy's connects in the gap are refused.
    let mut usr1 = signal(SignalKind::user_defined1()).expect("SIGUSR1 handler");
    let mut listener = Some(listener);
    let mut flapping = false;
    let mut next_flap = tokio::time::Instant::now();
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = accept => {
                if let Some((stream, _)) = accepted {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, conf.clone()));
                }
            }
            _ = usr1.recv() => {
                flapping = true;
                eprintln!("rusty-echo: SIGUSR1, flapping from now on");
            }
            _ = tokio::time::sleep_until(next_flap), if flapping => {
                drop(listener.take());
                conf.epoch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(FLAP_DOWN).await;
                listener = TcpListener::bind(args.listen).await.ok();
                next_flap = tokio::time::Instant::now() + FLAP_PERIOD;
            }
            _ = term.recv() => return,
        }
    }
}

const FLAP_PERIOD: Duration = Duration::from_millis(700);
const FLAP_DOWN: Duration = Duration::from_millis(150);

async fn serve(mut stream: TcpStream, conf: Arc<Conf>) {
    let born = conf.epoch.load(std::sync::atomic::Ordering::Relaxed);
    let Conf {
        epoch,
        trickle,
        workers,
        id,
        delay,
        echo_headers,
        record,
        script,
        accepted,
    } = &*conf;
    let number = accepted.as_ref().map_or(String::new(), |a| {
        let n = a.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        format!("x-echo-connection: {n}\r\n")
    });
    let mut buf = Vec::with_capacity(4096);
    let body = format!("hello from {id}\n");
    loop {
        // Read until a whole head is buffered.
        let (head_len, keep_alive, framing, is_health, case) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let framing = match framing_of(req.headers) {
                        Some(f) => f,
                        None => return reject(&mut stream, "400 Bad Request").await,
                    };
                    let ka = keep_alive_of(req.version, req.headers);
                    let health = req.method == Some("GET") && req.path == Some("/healthz");
                    let case = req.path.and_then(|p| script.case_for(p));
                    break (n, ka, framing, health, case);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {
                    if read_more(&mut stream, &mut buf).await == 0 {
                        return;
                    }
                }
                Ok(httparse::Status::Partial) => {
                    return reject(&mut stream, "431 Request Header Fields Too Large").await
                }
                Err(_) => return reject(&mut stream, "400 Bad Request").await,
            }
        };
        if epoch.load(std::sync::atomic::Ordering::Relaxed) != born {
            return; // flapped since this connection came: it goes, unanswered
        }
        let head = echo_headers.then(|| String::from_utf8_lossy(&buf[..head_len]).into_owned());
        let recorded = record
            .as_ref()
            .map(|_| format!("{}\n", buf[..head_len].escape_ascii()));
        buf.drain(..head_len);
        // A case that answers early does so before the body is in (if it ever comes).
        let early = case.is_some_and(|c| c.early);
        if !early && !discard_body(&mut stream, &mut buf, framing).await {
            return reject(&mut stream, "400 Bad Request").await;
        }
        if let (Some(path), Some(line)) = (record, recorded) {
            append(path, &line);
        }
        if let Some(case) = case {
            if !case.play(&mut stream).await {
                return;
            }
            if early {
                // What arrives as this request's body after the answer, recorded: the test
                // checks none of it was meant as another request.
                let body = read_body(&mut stream, &mut buf, framing).await;
                if let Some(path) = record {
                    let line = format!("body {}\n", body.as_deref().unwrap_or(b"").escape_ascii());
                    append(path, &line);
                }
                if body.is_none() {
                    return;
                }
            }
            continue;
        }
        let _worker = match workers {
            Some(w) => w.acquire().await.ok(),
            None => None,
        };
        if !delay.is_zero() {
            tokio::time::sleep(*delay).await;
        }
        let echoed;
        let text = match (&head, is_health) {
            (_, true) => "ok\n",
            (Some(head), false) => {
                echoed = format!("{body}{head}");
                echoed.as_str()
            }
            (None, false) => body.as_str(),
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\nx-backend-id: {id}\r\n{number}content-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{text}",
            text.len(),
            if keep_alive { "" } else { "connection: close\r\n" },
        );
        if !trickle.is_zero() && !is_health {
            // Headers first, then the body in ten pieces.
            let (head, body) = response.split_at(response.len() - text.len());
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let piece = body.len().div_ceil(10).max(1);
            for part in body.as_bytes().chunks(piece) {
                tokio::time::sleep(*trickle / 10).await;
                if stream.write_all(part).await.is_err() {
                    return;
                }
            }
            if !keep_alive {
                return;
            }
            continue;
        }
        if stream.write_all(response.as_bytes()).await.is_err() || !keep_alive {
            return;
        }
    }
}

#[derive(Clone, Copy)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

fn framing_of(headers: &[httparse::Header]) -> Option<Framing> {
    let mut framing = Framing::None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !h.value.eq_ignore_ascii_case(b"chunked") {
                return None;
            }
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
            if matches!(framing, Framing::Chunked) {
                return None;
            }
            framing = Framing::Length(n);
        }
    }
    Some(framing)
}

fn keep_alive_of(version: Option<u8>, headers: &[httparse::Header]) -> bool {
    let conn = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| h.value.to_ascii_lowercase());
    match version {
        Some(1) => conn.as_deref() != Some(b"close"),
        _ => conn.as_deref() == Some(b"keep-alive"),
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk).await {
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            n
        }
        Err(_) => 0,
    }
}

/// Consume the request body from `buf` and the stream. False on a malformed body.
async fn discard_body(stream: &mut TcpStream, buf: &mut Vec<u8>, framing: Framing) -> bool {
    match framing {
        Framing::None => true,
        Framing::Length(mut left) => loop {
            let take = (buf.len() as u64).min(left) as usize;
            buf.drain(..take);
            left -= take as u64;
            if left == 0 {
                return true;
            }
            if read_more(stream, buf).await == 0 {
                return false;
            }
        },
        Framing::Chunked => loop {
            let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
                if buf.len() > 1024 || read_more(stream, buf).await == 0 {
                    return false;
                }
                continue;
            };
            let size_text = std::str::from_utf8(&buf[..line_end]).unwrap_or("");
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let Ok(size) = u64::from_str_radix(size_text, 16) else {
                return false;
            };
            // Wait for the chunk and its CRLF (or, for the last chunk, the final CRLF).
            let need = line_end as u64 + 2 + size + 2;
            while (buf.len() as u64) < need {
                if read_more(stream, buf).await == 0 {
                    return false;
                }
            }
            buf.drain(..need as usize);
            if size == 0 {
                return true;
            }
        },
    }
}

/// Append a line to the `--record` file.
fn append(path: &std::path::Path, line: &str) {
    use std::io::Write as _;
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        eprintln!("rusty-echo: --record {}: {e}", path.display());
    }
}

/// Read a `Content-Length` body whole (what a connection delivers before it ends, if it
/// ends first); `None` when it ended short. Chunked bodies are discarded, and give `Some` of
/// nothing.
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, framing: Framing) -> Option<Vec<u8>> {
    let Framing::Length(n) = framing else {
        return discard_body(stream, buf, framing).await.then(Vec::new);
    };
    let n = n as usize;
    while buf.len() < n {
        if read_more(stream, buf).await == 0 {
            return None;
        }
    }
    Some(buf.drain(..n).collect())
}

async fn reject(stream: &mut TcpStream, status: &str) {
    let response = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = stream.write_all(response.as_bytes()).await;
}
