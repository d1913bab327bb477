//! The wiring of `rusty-agent run`: build every part, connect them, own the shutdown.
//!
//! Shutdown is explicit: SIGTERM or SIGINT flips one `watch` flag; the listener stops accepting,
//! subscriber sessions send a close frame, and the core stops every instance (each gets its stop
//! grace) before the process exits.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::acme::Acme;
use crate::auth::Token;
use crate::certs::CertSource;
use crate::core::Core;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::runtime::docker::{self, DockerRuntime};
use crate::runtime::fixed::StaticRuntime;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::swarm::{SaveError, SwarmPlacement, SwarmRuntime};
use crate::runtime::{Runtime, RuntimeEvent};
use crate::server::{self, Shared};
use crate::spec::{Config, RuntimeKind};
use crate::state::Desired;

pub async fn run(config: Config) -> Result<()> {
    let agent = &config.agent;
    let (token, token_path) =
        Token::load_or_generate(agent.token_file.as_deref(), &agent.state_dir)?;
    let publisher = Publisher::open(&agent.state_dir)
        .with_context(|| format!("agent.state_dir {}", agent.state_dir.display()))?;
    let listener = TcpListener::bind(agent.listen)
        .await
        .with_context(|| format!("agent.listen: cannot listen on {}", agent.listen))?;
    if !agent.listen.ip().is_loopback() {
        warn!(listen = %agent.listen, "the admin API and table stream listen beyond loopback; the token is all that guards them");
    }

    let (runtime_tx, runtime_rx) = mpsc::unbounded_channel();
    let runtime_tx_docker = runtime_tx.clone();
    let statics = config
        .services
        .iter()
        .filter(|s| s.runtime == RuntimeKind::Static)
        .map(|s| (s.name.clone(), s.addresses.clone()))
        .collect();
    let mut runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>> = HashMap::new();
    runtimes.insert(
        RuntimeKind::Process,
        Arc::new(ProcessRuntime::new(
            agent.instance_host,
            runtime_tx,
            &agent.state_dir,
        )),
    );
    runtimes.insert(RuntimeKind::Static, Arc::new(StaticRuntime::new(statics)));
    let runtime_tx_swarm = runtime_tx_docker.clone();
    if let Some(docker) = docker_runtime(&config, runtime_tx_docker).await? {
        runtimes.insert(RuntimeKind::Docker, docker);
    }
    let swarm = swarm_runtime(&config, runtime_tx_swarm).await?;
    if let Some(swarm) = &swarm {
        runtimes.insert(RuntimeKind::Swarm, swarm.clone());
    }

    let metrics = Arc::new(Metrics::default());
    let feed = publisher.subscribe();
    let mut cert_source = CertSource::new(config.certificates.clone());
    cert_source.reload();
    let certs = cert_source.subscribe();
    let cert_source = Arc::new(std::sync::Mutex::new(cert_source));
    let core = Core::new(
        config.services.clone(),
        runtimes,
        publisher,
        metrics.clone(),
    )
    .with_saved_state(agent.state_dir.join("desired.json"));
    let core = match &swarm {
        Some(swarm) => {
            let kept = load_desired(swarm).await?;
            let (keeper, kept_rx) = watch::channel(kept.clone().unwrap_or_default());
            tokio::spawn(keep_desired_in_swarm(swarm.clone(), kept_rx));
            core.with_kept_state(kept, keeper)
        }
        None => core,
    };
    let (commands_tx, commands_rx) = mpsc::channel(64);
    // Kept here for the whole run, so the core's sample channel stays open without a scraper.
    let (samples_tx, samples_rx) = mpsc::channel(4);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let (acme_status, acme_renew, acme_task) = match &config.acme {
        Some(settings) => {
            let (acme, status) = Acme::new(
                settings.clone(),
                &agent.state_dir,
                commands_tx.clone(),
                cert_source.clone(),
                metrics.clone(),
            )
            .with_context(|| format!("agent.state_dir {}", agent.state_dir.display()))?;
            let (renew_tx, renew_rx) = mpsc::channel(1);
            info!(directory = %settings.directory, hosts = ?settings.hosts, "ACME on");
            let task = tokio::spawn(acme.run(renew_rx, shutdown_rx.clone()));
            (status, Some(renew_tx), Some(task))
        }
        None => (watch::channel(Vec::new()).1, None, None),
    };
    let shared = Arc::new(Shared {
        token,
        commands: commands_tx.clone(),
        feed,
        certs,
        metrics,
        acme: acme_status,
        acme_renew,
        shutdown: shutdown_rx.clone(),
    });
    info!(
        listen = %agent.listen,
        token_file = %token_path.display(),
        services = config.services.len(),
        "agent up: tables at ws://{}/v1/tables",
        agent.listen
    );
    let scraper = if !agent.data_planes.is_empty() {
        let token = match &agent.data_plane_token_file {
            Some(path) => {
                Some(rusty_shared::auth::read_token(path).context("agent.data_plane_token_file")?)
            }
            None => None,
        };
        info!(data_planes = ?agent.data_planes,
            "reading the data planes' metrics for autoscaling and outliers");
        Some(tokio::spawn(crate::scrape::run(
            agent.data_planes.clone(),
            token,
            agent.scrape_interval,
            samples_tx.clone(),
            shutdown_rx.clone(),
        )))
    } else {
        None
    };
    let tls_server = match &agent.tls {
        Some(tls) => {
            let acceptor = tls_acceptor(tls)?;
            let listener = TcpListener::bind(tls.listen)
                .await
                .with_context(|| format!("agent.tls_listen: cannot listen on {}", tls.listen))?;
            info!(listen = %tls.listen, "TLS listener up: tables at wss://{}/v1/tables", tls.listen);
            Some(tokio::spawn(server::serve(
                listener,
                Some(acceptor),
                shared.clone(),
            )))
        }
        None => None,
    };
    let server = tokio::spawn(server::serve(listener, None, shared));
    let core = tokio::spawn(core.run(commands_rx, samples_rx, runtime_rx, shutdown_rx));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); break }
            _ = int.recv() => { info!("SIGINT: stopping"); break }
            // Renewed certificate files (certbot, a secrets manager) go out without a restart.
            _ = hangup.recv() => {
                info!("SIGHUP: reading the [tls] certificates again");
                cert_source.lock().unwrap_or_else(|p| p.into_inner()).reload();
            }
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    if let Some(tls_server) = tls_server {
        let _ = tls_server.await;
    }
    if let Some(scraper) = scraper {
        let _ = scraper.await;
    }
    if let Some(acme) = acme_task {
        let _ = acme.await;
    }
    let _ = core.await;
    drop(samples_tx);
    info!("agent stopped");
    Ok(())
}

/// The acceptor of the agent's TLS listener: its own pair (checked when the config was read;
/// read again here), TLS 1.3 and 1.2, no client certificates (the bearer token authenticates).
fn tls_acceptor(tls: &crate::spec::AgentTls) -> Result<tokio_rustls::TlsAcceptor> {
    use rusty_shared::certs::{load_pair, read_capped};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let now = crate::certs::unix_now();
    let crt = read_capped(&tls.cert).context("agent.tls_cert")?;
    let key = read_capped(&tls.key).context("agent.tls_key")?;
    let pair = load_pair("agent", (&tls.cert, &crt), (&tls.key, &key), &provider, now)
        .context("agent.tls_cert")?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("agent TLS settings")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(pair.key)));
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The swarm runtime, when a service runs on Swarm: the engine must be a manager and each
/// service's network an overlay, or the start stops here saying which.
async fn swarm_runtime(
    config: &Config,
    events: mpsc::UnboundedSender<RuntimeEvent>,
) -> Result<Option<Arc<SwarmRuntime>>> {
    let placements: HashMap<_, _> = config
        .services
        .iter()
        .filter(|s| s.runtime == RuntimeKind::Swarm)
        .filter_map(|s| {
            s.container.clone().map(|container| {
                (
                    s.name.clone(),
                    SwarmPlacement {
                        container,
                        stop_grace: s.stop_grace,
                    },
                )
            })
        })
        .collect();
    if placements.is_empty() {
        return Ok(None);
    }
    let mut settings = config.swarm.clone();
    // stack.yaml passes the stack's name, which the config file cannot know.
    if let (None, Ok(stack)) = (&settings.stack, std::env::var("RUSTY_SWARM_STACK")) {
        settings.stack = Some(stack).filter(|s| !s.is_empty());
    }
    let endpoint = docker::endpoint(config.docker.as_ref());
    let engine = docker::connect(&endpoint).await?;
    let runtime = SwarmRuntime::new(engine, endpoint.clone(), settings, events, placements).await?;
    info!(%endpoint, prefix = %config.swarm.prefix, "Swarm manager connected");
    runtime.watch();
    Ok(Some(runtime))
}

/// The desired state kept in Swarm, with a few tries: an engine that does not answer must not
/// read as "nothing kept" (the agent would fall back to the config's scale and version).
async fn load_desired(swarm: &SwarmRuntime) -> Result<Option<Desired>> {
    let mut tries = 0;
    loop {
        match swarm.load_desired().await {
            Ok(kept) => return Ok(kept),
            Err(e) if tries < 10 => {
                tries += 1;
                warn!("the desired state kept in Swarm: {e}; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => anyhow::bail!("the desired state kept in Swarm cannot be read: {e}"),
        }
    }
}

/// Write each change of the desired state to Swarm, the latest one first; a failed write is
/// tried again (the state dir still has it meanwhile).
async fn keep_desired_in_swarm(swarm: Arc<SwarmRuntime>, mut kept: watch::Receiver<Desired>) {
    while kept.changed().await.is_ok() {
        loop {
            let desired = kept.borrow_and_update().clone();
            match swarm.save_desired(&desired).await {
                Ok(()) => break,
                Err(e @ SaveError::TooLarge(_)) => {
                    error!("cannot keep the desired state in Swarm: {e}; an agent started elsewhere will start from the config");
                    break;
                }
                Err(e) => {
                    warn!("cannot keep the desired state in Swarm: {e}; trying again");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// The Docker runtime, when a service runs containers or discovery is on. An engine that does
/// not answer, or an image or network the config names that does not exist, stops the start
/// here with a message that says which.
async fn docker_runtime(
    config: &Config,
    events: mpsc::UnboundedSender<RuntimeEvent>,
) -> Result<Option<Arc<dyn Runtime>>> {
    let services: Vec<_> = config
        .services
        .iter()
        .filter(|s| s.runtime == RuntimeKind::Docker)
        .filter_map(|s| {
            s.container
                .clone()
                .map(|c| (s.name.clone(), s.run.image.clone(), c))
        })
        .collect();
    let discover = config.docker.as_ref().is_some_and(|d| d.discover);
    if services.is_empty() && !discover {
        return Ok(None);
    }
    let endpoint = docker::endpoint(config.docker.as_ref());
    let engine = docker::connect(&endpoint).await?;
    docker::preflight(&engine, &services).await?;
    info!(%endpoint, discover, "Docker engine connected");
    let placements = services.into_iter().map(|(n, _, c)| (n, c)).collect();
    let runtime = DockerRuntime::new(engine, events, placements, config.docker.as_ref());
    runtime.watch();
    Ok(Some(runtime))
}
