//! Command-line flags of `rusty-lb`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// RustyBalancer's data plane: an HTTP reverse proxy that routes by a table from a file or from
/// `rusty-agent`.
#[derive(Debug, Parser)]
#[command(name = "rusty-lb", version)]
pub struct Args {
    /// Address the proxy listens on for plain HTTP (default 127.0.0.1:8080; none when only
    /// --tls-listen is given).
    #[arg(long)]
    pub listen: Option<SocketAddr>,

    /// Address the proxy listens on for HTTPS (TLS 1.2 and 1.3), with the certificates of
    /// --certs and those the agent sends. May be combined with --listen.
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,

    /// Directory of certificate pairs for --tls-listen: NAME.crt (PEM chain, leaf first) and
    /// NAME.key; each serves the names of its subjectAltName, `default` an SNI none covers.
    /// SIGHUP reloads it.
    #[arg(long, value_name = "DIR", requires = "tls_listen")]
    pub certs: Option<PathBuf>,

    /// The port redirects to HTTPS name (services with `https_redirect`), when clients reach
    /// the TLS listener on another port than it listens on (default: the --tls-listen port,
    /// else 443).
    #[arg(long, value_name = "PORT")]
    pub https_port: Option<u16>,

    /// Seconds a TLS handshake may take from accept; a slower or silent client is closed.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub tls_handshake_timeout: u64,

    /// Write a line per request to this file (appended; `-` for stdout; off by default).
    /// SIGUSR1 reopens it, for log rotation.
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<String>,

    /// The access log's lines: `json` (one object per line) or `combined` (nginx's).
    #[arg(long, value_enum, default_value = "json", value_name = "FORMAT")]
    pub access_log_format: crate::access_log::Format,

    /// Address of the admin listener (/metrics, /healthz, /table). Keep it on loopback unless
    /// something else must scrape it.
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub admin: SocketAddr,

    /// Serve the table in this JSON file; SIGHUP reloads it.
    #[arg(long, value_name = "FILE", conflicts_with = "agent")]
    pub table: Option<PathBuf>,

    /// Bearer token guarding /metrics and /table on the admin listener; required when --admin is
    /// not on loopback.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Subscribe to the agent's table stream, e.g. ws://127.0.0.1:7070/v1/tables.
    #[arg(long, value_name = "URL", requires = "token_file")]
    pub agent: Option<String>,

    /// PEM file of the CA certificates a `wss://` --agent must present a chain to (default:
    /// the system's roots).
    #[arg(long, value_name = "FILE", requires = "agent")]
    pub agent_ca: Option<PathBuf>,

    /// File holding the bearer token for --agent.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Directory where every applied table is saved and from which the last one is served at
    /// start, before any other source answers.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Worker threads of the proxy (default: one per CPU); without `--work-stealing` one more
    /// thread accepts connections.
    #[arg(long)]
    pub threads: Option<usize>,

    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 10)]
    pub grace_period: u64,

    /// Seconds an idle keep-alive client connection is kept open (nginx: 75, HAProxy: its
    /// `timeout http-keep-alive`).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub keepalive_timeout: u64,

    /// Seconds a write to a client may wait for the client to read before the connection is
    /// closed (nginx's send_timeout).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub send_timeout: u64,

    /// Seconds a whole request head may take to arrive, however slowly its bytes trickle in
    /// (counted from accept for a connection's first request); later gets 408 and a close.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub header_timeout: u64,

    /// Open client connections beyond which a new one is answered 503 at once and closed.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub max_connections: usize,

    /// Also serve HTTP/2 with prior knowledge (h2c) on --listen: a connection that starts
    /// with the HTTP/2 preface is HTTP/2, any other HTTP/1. (The TLS listener offers h2 by
    /// ALPN always.)
    #[arg(long)]
    pub h2c: bool,

    /// Streams an HTTP/2 client may have open at once on one connection (nginx: 128).
    #[arg(long, default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub h2_max_streams: u32,

    /// Most requests waiting, over all services, for a backend slot when backends are at their
    /// `max_inflight`; when full, the lowest class waiting is shed first.
    #[arg(long, default_value_t = crate::admission::DEFAULT_QUEUE_SIZE, value_name = "N")]
    pub queue_size: usize,

    /// Longest request target; longer gets 414.
    #[arg(long, default_value_t = 8 * 1024, value_name = "BYTES")]
    pub max_uri_bytes: usize,

    /// Longest header line; longer gets 431.
    #[arg(long, default_value_t = 8 * 1024, value_name = "BYTES")]
    pub max_header_bytes: usize,

    /// Largest request head (request line and headers); larger gets 431.
    #[arg(long, default_value_t = 32 * 1024, value_name = "BYTES")]
    pub max_head_bytes: usize,

    /// Largest request body; larger gets 413 and a close (a chunked body as soon as it grows past
    /// the limit). Default: no limit, like HAProxy and Envoy (nginx: 1 MiB).
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,

    /// Most header lines in a request; more gets 431.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_headers: usize,

    /// Run the proxy's threads as one runtime whose threads steal work from each other, instead
    /// of one single-threaded runtime per thread with each connection staying on the thread it
    /// was given (the default, as nginx's workers: measured faster, see loadtest/TUNING.md).
    #[arg(long)]
    pub work_stealing: bool,

    /// Send every request through Pingora's full proxy pipeline instead of serving plain
    /// requests (bodiless GET and HEAD) on the fast lane. For comparing the two; the answers are
    /// the same.
    #[arg(long)]
    pub no_fast_lane: bool,

    /// Zero-downtime binary upgrade: take the listening sockets over from the running rusty-lb
    /// (start this one, then send the old one SIGQUIT within 5 s). Both accept until the old one
    /// drains and exits.
    #[arg(long)]
    pub upgrade: bool,

    /// Unix socket the listening sockets are handed over on (default: one per --listen port in
    /// the temp dir, so both processes agree on it without being told).
    #[arg(long, value_name = "PATH")]
    pub upgrade_sock: Option<PathBuf>,

    /// Proxies whose X-Forwarded-For, X-Forwarded-Host, Forwarded and X-Real-IP are believed:
    /// addresses or address/prefix ranges, comma-separated (e.g. 10.0.0.0/8,192.0.2.7). From
    /// any other client those headers are dropped and X-Forwarded-For starts at the client.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::http1::trust::Cidr>,

    /// Log filter (tracing's env-filter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log: String,

    /// The log's lines on stderr: `text` for people, `json` (one object per line) for a log
    /// collector.
    #[arg(long, value_enum, default_value = "text", value_name = "FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The plain listener when no flag names one and there is no TLS listener either.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

impl Args {
    /// The plain HTTP listener, if any.
    pub fn plain_listen(&self) -> Option<SocketAddr> {
        match (self.listen, self.tls_listen) {
            (Some(addr), _) => Some(addr),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_LISTEN),
        }
    }

    /// Where the listening sockets are handed over in a binary upgrade.
    pub fn upgrade_sock(&self) -> PathBuf {
        self.upgrade_sock.clone().unwrap_or_else(|| {
            let port = self
                .plain_listen()
                .or(self.tls_listen)
                .map_or(0, |a| a.port());
            std::env::temp_dir().join(format!("rusty-lb-{port}.upgrade.sock"))
        })
    }
}
