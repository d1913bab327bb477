//! The wiring: flags to a running data plane. It builds the plane and hands it to every part
//! (nothing else constructs them), loads the state dir and the table file *before* any listener
//! accepts, and owns the end: after SIGTERM (or SIGQUIT once an `--upgrade` took the sockets)
//! [`Drain`] exits as soon as no client connection is left, bounded by the grace period.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tracing::{error, info, warn};

use rusty_shared::auth::read_token;

use crate::access_log::{self, AccessLog};
use crate::admin::Admin;
use crate::certs::Certs;
use crate::cli::Args;
use crate::front::{Front, FrontLimits, H2Limits, TlsListener, Workers};
use crate::http1::trust::TrustedProxies;
use crate::http1::Limits;
use crate::lane::Lane;
use crate::metrics::Registry;
use crate::pipeline::Pipeline;
use crate::plane::Plane;
use crate::queue::Queue;
use crate::source::{agent::AgentSource, cert_dir::CertDir, file::FileSource};
use crate::state_dir::StateDir;
use crate::store::TableStore;

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.table.is_none() && args.agent.is_none() && args.state_dir.is_none() {
        bail!("no table source: give --table FILE, --agent URL (with --token-file) or --state-dir DIR");
    }
    let listen = args.plain_listen();
    if let (Some(plain), Some(tls)) = (listen, args.tls_listen) {
        if plain.port() == tls.port() {
            bail!("--listen {plain} and --tls-listen {tls}: give them different ports (the port tells TLS connections apart)");
        }
    }
    // In an upgrade the old process still holds the ports and hands them over.
    if !args.upgrade {
        for (flag, addr) in [
            ("--listen", listen),
            ("--tls-listen", args.tls_listen),
            ("--admin", Some(args.admin)),
        ] {
            if let Some(addr) = addr {
                check_bindable(flag, addr)?;
            }
        }
    }
    if args.tls_listen.is_some() && args.certs.is_none() && args.agent.is_none() {
        bail!("--tls-listen: no certificates: give --certs DIR, or --agent for the agent's");
    }
    // Certificates load before any listener accepts: the directory's (a pair that does not
    // load stops the start) and the agent's last bundle, saved in the state dir.
    let certs = match args.tls_listen {
        Some(_) => Some(Arc::new(Certs::new().context("--tls-listen")?)),
        None => None,
    };
    let cert_dir = match (&certs, &args.certs) {
        (Some(certs), Some(dir)) => {
            let source = CertDir::new(dir.clone(), certs.clone());
            source
                .load_all()
                .with_context(|| format!("--certs {}", dir.display()))?;
            Some(source)
        }
        _ => None,
    };
    let cert_state = match (&certs, &args.state_dir) {
        (Some(certs), Some(dir)) => {
            let state = StateDir::open_certs(dir)
                .with_context(|| format!("--state-dir {}: cannot use it", dir.display()))?;
            restore_certs(&state, certs);
            Some(state)
        }
        _ => None,
    };
    let admin_token = match &args.admin_token_file {
        Some(path) => Some(read_token(path).context("--admin-token-file")?),
        None => None,
    };
    if !args.admin.ip().is_loopback() && admin_token.is_none() {
        anyhow::bail!(
            "--admin {}: not a loopback address, and /metrics and /table would be open to anyone who reaches it: give --admin-token-file, or bind to 127.0.0.1",
            args.admin
        );
    }
    if !args.admin.ip().is_loopback() {
        tracing::info!(admin = %args.admin,
            "the admin listener is not on loopback: /metrics and /table need the bearer token");
    }

    let state = match &args.state_dir {
        Some(dir) => Some(
            StateDir::open(dir)
                .with_context(|| format!("--state-dir {}: cannot use it", dir.display()))?,
        ),
        None => None,
    };
    let metrics = Arc::new(Registry::default());
    let queue = Arc::new(Queue::default());
    queue.set_capacity(args.queue_size);
    let store = Arc::new(TableStore::new(metrics.clone(), queue.clone(), state));
    if let Some(v) = store.restore() {
        info!(version = v, "serving the table saved in the state dir");
    }
    if args.state_dir.is_some() {
        // Tables are saved off the install's path; a refused one is retried until it is taken,
        // and the table serves meanwhile.
        let store = store.clone();
        std::thread::Builder::new()
            .name("state-dir-saver".into())
            .spawn(move || store.run_saver())
            .context("cannot start the state dir's saver thread")?;
    }
    let file_source = match &args.table {
        Some(path) => {
            let source = FileSource::new(path.clone(), store.clone());
            source.load().context("--table")?;
            Some(source)
        }
        None => None,
    };
    let agent_source = match (&args.agent, &args.token_file) {
        (Some(url), Some(token_file)) => {
            let token = read_token(token_file).context("--token-file")?;
            let mut source = AgentSource::new(url.clone(), token, store.clone());
            if url.starts_with("wss://") {
                source = source
                    .with_tls(agent_roots(args.agent_ca.as_deref())?)
                    .context("--agent")?;
            } else if let Some(host) = off_loopback_host(url) {
                warn!(agent = %url, %host, "--agent is ws:// to a host off loopback: the token crosses the network in clear and the agent sends no certificates; use wss:// (the agent's tls_listen)");
            }
            Some(match &certs {
                Some(certs) => source.with_certs(certs.clone(), cert_state),
                None => source,
            })
        }
        _ => None,
    };

    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let conf = ServerConf {
        threads,
        work_stealing: args.work_stealing,
        grace_period_seconds: Some(args.grace_period),
        graceful_shutdown_timeout_seconds: Some(1),
        max_retries: rusty_shared::limits::RETRIES_MAX as usize + 1,
        upgrade_sock: args.upgrade_sock().display().to_string(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: args.upgrade,
        ..Opt::default()
    };
    if args.upgrade {
        info!(sock = %args.upgrade_sock().display(),
            "waiting for the running rusty-lb to hand over its listeners (send it SIGQUIT)");
    }
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let limits = Limits {
        max_target: args.max_uri_bytes,
        max_header: args.max_header_bytes,
        max_head: args.max_head_bytes,
        max_headers: args.max_headers,
        max_body: args.max_body_bytes,
    };
    let mut plane = Plane::new(
        store.clone(),
        metrics,
        queue,
        limits,
        TrustedProxies::new(args.trusted_proxies.clone()),
        Duration::from_secs(args.keepalive_timeout),
        Duration::from_secs(args.send_timeout),
    );
    plane.certs = certs.clone();
    if let Some(target) = &args.access_log {
        let log = Arc::new(AccessLog::new(
            access_log::Target::parse(target),
            args.access_log_format,
        ));
        log.start().context("--access-log")?;
        plane.access_log = Some(log);
    }
    plane.https_port = args
        .https_port
        .or(args.tls_listen.map(|a| a.port()))
        .unwrap_or(443);
    plane
        .register_metrics()
        .context("cannot register the metrics")?;
    let plane = Arc::new(plane);
    let proxy_app = pingora::proxy::http_proxy(&server.configuration, Pipeline::new(plane.clone()));
    let mut front_app = Front::new(
        proxy_app,
        FrontLimits {
            max_connections: args.max_connections,
            header_timeout: Duration::from_secs(args.header_timeout),
            tls_handshake_timeout: Duration::from_secs(args.tls_handshake_timeout.max(1)),
            h2: H2Limits {
                max_streams: args.h2_max_streams,
                // One size limit for a request head, whatever its protocol.
                max_header_list: u32::try_from(args.max_head_bytes).unwrap_or(u32::MAX),
                handshake: Duration::from_secs(args.header_timeout),
                idle: Duration::from_secs(args.keepalive_timeout),
            },
            h2c: args.h2c,
        },
        plane.clone(),
    );
    if !args.no_fast_lane {
        front_app = front_app.with_lane(Lane::new(plane.clone()));
    }
    if !args.work_stealing {
        let workers = Workers::start(threads).context("cannot start the proxy's threads")?;
        front_app = front_app.with_workers(workers);
    }
    if let (Some(certs), Some(addr)) = (certs, args.tls_listen) {
        front_app = front_app.with_tls(TlsListener {
            port: addr.port(),
            certs,
        });
    }
    // One service for both listeners: one set of worker threads, as nginx's workers serve
    // every listen socket.
    let mut proxy = Service::new("proxy".to_owned(), front_app);
    if !args.work_stealing {
        // The front serves connections on threads of its own: Pingora's only accept.
        proxy.threads = Some(1);
    }
    for addr in listen.iter().chain(args.tls_listen.iter()) {
        // No L4 buffers on accepted sockets: Pingora's default puts a 64 KiB read buffer in
        // front of each one, which the lane (its own buffers, lent only while a request is in
        // hand) and the pipeline (its own head buffer) do not need, and which the default
        // path's `rehome` threw away after paying for it on every accept.
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::new(0, 0)),
        );
    }
    server.add_service(proxy);

    let mut admin = Service::new(
        "admin".to_owned(),
        AdminApp(Admin::new(plane.clone(), admin_token)),
    );
    admin.add_tcp(&args.admin.to_string());
    server.add_service(admin);

    if let Some(source) = file_source {
        server.add_service(background_service("table file", source));
    }
    if let Some(source) = agent_source {
        server.add_service(background_service("agent subscription", source));
    }
    if let Some(source) = cert_dir {
        server.add_service(background_service("certificate directory", source));
    }
    if let Some(log) = &plane.access_log {
        server.add_service(background_service(
            "access log reopen",
            Reopen { log: log.clone() },
        ));
    }
    server.add_service(background_service(
        "drain",
        Drain {
            plane,
            grace: Duration::from_secs(args.grace_period),
        },
    ));
    info!(listen = ?listen, tls_listen = ?args.tls_listen, admin = %args.admin, "rusty-lb starting");
    server.run_forever()
}

/// The roots a `wss://` agent is verified against: `--agent-ca`, else the system's.
fn agent_roots(ca: Option<&std::path::Path>) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = rusty_shared::certs::read_capped(path).context("--agent-ca")?;
            for der in CertificateDer::pem_slice_iter(&pem) {
                let der = der.with_context(|| format!("--agent-ca {}", path.display()))?;
                roots.add(der).with_context(|| {
                    format!(
                        "--agent-ca {}: a certificate cannot be a root",
                        path.display()
                    )
                })?;
            }
            if roots.is_empty() {
                bail!("--agent-ca {}: no PEM certificate in it", path.display());
            }
        }
        None => {
            for der in pingora::tls::load_native_certs().unwrap_or_default() {
                let _ = roots.add(der);
            }
            if roots.is_empty() {
                bail!("--agent wss://: the system has no CA certificates; give --agent-ca FILE");
            }
        }
    }
    Ok(roots)
}

/// The host of a `ws://` URL when it is neither a loopback address nor `localhost`.
fn off_loopback_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("ws://")?;
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| host.to_owned())
}

/// Fail with the flag's name now rather than with a Pingora panic later.
fn check_bindable(flag: &str, addr: SocketAddr) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("{flag} {addr}: cannot listen there"))
}

/// The admin app, wrapped so Pingora's `ServeHttp` blanket service applies.
struct AdminApp(Admin);

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(
        &self,
        session: &mut pingora::protocols::http::ServerSession,
    ) -> http::Response<Vec<u8>> {
        self.0.response(session).await
    }
}

/// Ends the process once a graceful shutdown has no client connection left open (idle ones
/// are closed by the front after its drain window; a request in flight always holds its
/// connection, and Pingora counts it until its `logging` phase has run).
struct Drain {
    plane: Arc<Plane>,
    grace: Duration,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut idle_polls = 0;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Two quiet polls in a row: the last response has been written and logged.
            idle_polls = if self.plane.connections.open() == 0 {
                idle_polls + 1
            } else {
                0
            };
            if idle_polls >= 2 {
                info!("graceful shutdown: no connection open, exiting");
                if let Some(log) = &self.plane.access_log {
                    log.flush();
                }
                std::process::exit(0);
            }
        }
        info!("graceful shutdown: grace period over");
    }
}

/// Reopens the access log on SIGUSR1, after a rotation moved the file away.
struct Reopen {
    log: Arc<AccessLog>,
}

#[async_trait]
impl BackgroundService for Reopen {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGUSR1; the access log is not reopened");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    info!("SIGUSR1: reopening the access log");
                    self.log.reopen();
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The agent's certificates saved in the state dir, or the bundle before them when those do not
/// load; nothing stops the start (the agent sends them again).
fn restore_certs(state: &StateDir, certs: &Certs) {
    let now = crate::clock::unix_now();
    for (path, read) in state.saved() {
        let outcome = match read {
            Ok(None) => continue,
            Ok(Some(bytes)) => certs.offer_bundle(&bytes, now).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(offered) => {
                info!(path = %path.display(), ?offered, "the agent's certificates saved in the state dir");
                return;
            }
            Err(e) => warn!(path = %path.display(), error = %e,
                "saved certificates do not load; trying the bundle before them, else waiting for the agent's"),
        }
    }
}
