//! The `docker` runtime: instances are containers, driven through the Docker Engine API (bollard)
//! over the engine's socket. Nothing here shells out to the `docker` CLI.
//!
//! - Every container the agent creates carries labels (service, instance, generation, image,
//!   managed-by, and the run spec), so a restarted agent finds and adopts its containers instead
//!   of starting duplicates, and removes the ones no service claims.
//! - Each container joins the service's network and is addressed by its IP there and the
//!   container port, so a data plane on that network (or on the host) reaches it directly.
//! - One task follows the engine's event stream: a managed container that dies is replaced (a
//!   new container, with backoff), and, with discovery on, containers the agent did not start that
//!   carry `rustybalancer.service` join that service's table while they run (the Traefik habit).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, EventMessage, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, InspectContainerOptions, InspectNetworkOptions,
    ListContainersOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Adopted, InstanceInfo, InstanceSpec, Runtime, RuntimeError, RuntimeEvent};
use crate::spec::InstanceRef;
use crate::spec::{ContainerPlacement, DockerSettings, RunSpec};

pub const LABEL_MANAGED: &str = "rustybalancer.managed-by";
pub const MANAGED_BY: &str = "rusty-agent";
pub const LABEL_SERVICE: &str = "rustybalancer.service";
pub const LABEL_INSTANCE: &str = "rustybalancer.instance";
pub const LABEL_SEQ: &str = "rustybalancer.seq";
pub const LABEL_GENERATION: &str = "rustybalancer.generation";
pub const LABEL_VERSION: &str = "rustybalancer.version";
pub const LABEL_SPEC: &str = "rustybalancer.spec";
/// Discovery labels on containers the agent did not start.
pub const LABEL_PORT: &str = "rustybalancer.port";
pub const LABEL_WEIGHT: &str = "rustybalancer.weight";
pub const LABEL_PRIORITY: &str = "rustybalancer.priority";
pub const LABEL_NETWORK: &str = "rustybalancer.network";

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const STABLE_RUN: Duration = Duration::from_secs(10);
/// How long an unclaimed container found at start keeps running before it is removed, so data
/// planes still holding an older table stop sending to it first.
const ORPHAN_DRAIN: Duration = Duration::from_secs(2);

/// The engine address used: the configured one, `DOCKER_HOST`, or the default socket.
pub fn endpoint(settings: Option<&DockerSettings>) -> String {
    settings
        .and_then(|s| s.host.clone())
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
}

/// Connect and agree on an API version; the error says which endpoint was tried.
pub async fn connect(endpoint: &str) -> Result<Docker, RuntimeError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        RuntimeError::Docker(format!(
            "cannot reach the Docker engine at {endpoint}: {e}; is the daemon running and the socket mounted? ([docker] host or DOCKER_HOST choose another)"
        ))
    };
    let docker = if let Some(path) = endpoint.strip_prefix("unix://") {
        Docker::connect_with_socket(path, 120, API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_http(endpoint, 120, API_DEFAULT_VERSION)
    }
    .map_err(|e| unreachable(&e))?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|e| unreachable(&e))?;
    docker.ping().await.map_err(|e| unreachable(&e))?;
    Ok(docker)
}

pub(super) fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Check before starting that every image and network the config names exists: this machine
/// cannot pull, so a missing image is a mistake to report now, by name.
pub async fn preflight(
    docker: &Docker,
    services: &[(String, String, ContainerPlacement)],
) -> Result<(), RuntimeError> {
    for (name, image, placement) in services {
        check_image(docker, image)
            .await
            .map_err(|e| RuntimeError::Docker(format!("services.{name}.image: {e}")))?;
        match docker
            .inspect_network(&placement.network, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(404) => {
                return Err(RuntimeError::Docker(format!(
                    "services.{name}.network: Docker network {:?} does not exist: create it (docker network create {}) or name an existing one",
                    placement.network, placement.network
                )))
            }
            Err(e) => return Err(RuntimeError::Docker(format!("inspecting network {}: {e}", placement.network))),
        }
    }
    Ok(())
}

async fn check_image(docker: &Docker, image: &str) -> Result<(), String> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(()),
        Err(e) if status_of(&e) == Some(404) => Err(format!(
            "image {image:?} is not present locally and this machine cannot pull: build it (scripts/images.sh) or `docker load` it"
        )),
        Err(e) => Err(format!("inspecting image {image}: {e}")),
    }
}

/// What a container of one instance is given, the same in the docker and swarm runtimes.
pub(super) struct Launch {
    /// What lets a later agent adopt it: managed-by, service, instance, generation, image and
    /// the run spec.
    pub labels: HashMap<String, String>,
    /// The run spec's environment, then `PORT`, `RUSTY_INSTANCE` and `RUSTY_SERVICE`.
    pub env: Vec<String>,
    /// The run spec's args, replacing the image's CMD; `None` keeps it.
    pub args: Option<Vec<String>>,
}

/// The labels, environment and args of `spec`'s container listening on `port`, with
/// `{port}`, `{instance}` and `{generation}` filled in.
pub(super) fn launch(spec: &InstanceSpec, port: u16) -> Launch {
    let (service, run) = (&spec.instance.service, &spec.run);
    let id = spec.instance.to_string();
    let fill = |s: &str| {
        s.replace("{port}", &port.to_string())
            .replace("{instance}", &id)
            .replace("{generation}", &spec.generation.to_string())
    };
    let mut labels = HashMap::new();
    labels.insert(LABEL_MANAGED.to_owned(), MANAGED_BY.to_owned());
    labels.insert(LABEL_SERVICE.to_owned(), service.clone());
    labels.insert(LABEL_INSTANCE.to_owned(), id.clone());
    labels.insert(LABEL_SEQ.to_owned(), spec.instance.seq.to_string());
    labels.insert(LABEL_GENERATION.to_owned(), spec.generation.to_string());
    labels.insert(LABEL_VERSION.to_owned(), run.image.clone());
    labels.insert(
        LABEL_SPEC.to_owned(),
        serde_json::to_string(run.as_ref()).unwrap_or_default(),
    );
    let mut env: Vec<String> = run
        .env
        .iter()
        .map(|(k, v)| format!("{k}={}", fill(v)))
        .collect();
    env.push(format!("PORT={port}"));
    env.push(format!("RUSTY_INSTANCE={id}"));
    env.push(format!("RUSTY_SERVICE={service}"));
    let args = (!run.args.is_empty()).then(|| run.args.iter().map(|a| fill(a)).collect());
    Launch { labels, env, args }
}

/// Five hex digits of the clock's nanoseconds, so a name is not taken twice (an instance
/// number reused after a failed adoption must not collide with a live container or service).
pub(super) fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:05x}", nanos & 0xfffff)
}

struct Managed {
    id: String,
    addr: SocketAddr,
    spec: InstanceSpec,
    stopping: bool,
    started: Instant,
    backoff: Duration,
}

pub struct DockerRuntime {
    docker: Docker,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    placements: HashMap<String, ContainerPlacement>,
    discover: bool,
    keep_on_exit: bool,
    managed: Mutex<HashMap<InstanceRef, Managed>>,
}

impl DockerRuntime {
    pub fn new(
        docker: Docker,
        events: mpsc::UnboundedSender<RuntimeEvent>,
        placements: HashMap<String, ContainerPlacement>,
        settings: Option<&DockerSettings>,
    ) -> Arc<DockerRuntime> {
        Arc::new(DockerRuntime {
            docker,
            events,
            placements,
            discover: settings.is_some_and(|s| s.discover),
            keep_on_exit: settings.is_some_and(|s| s.keep_on_exit),
            managed: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceRef, Managed>> {
        self.managed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follow the engine's events until the agent exits (reconnecting if the stream breaks).
    pub fn watch(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let mut filters = HashMap::new();
                filters.insert("type".to_owned(), vec!["container".to_owned()]);
                // The stream only connects when first polled, after the resync below: asking
                // for the events since just before it (the engine replays them) leaves no gap
                // for a container started in between. Replays are harmless: discovery is by
                // container id, and events come in order.
                let since = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .saturating_sub(2);
                let mut stream = me.docker.events(Some(EventsOptions {
                    since: Some(since.to_string()),
                    filters: Some(filters),
                    ..Default::default()
                }));
                // Events missed while the stream was down: a managed container that died then
                // is replaced now, and discovered ones are listed again.
                me.resync_managed().await;
                if me.discover {
                    me.resync_discovered().await;
                }
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(m) => me.clone().on_event(m).await,
                        Err(e) => {
                            warn!("Docker event stream: {e}; reconnecting");
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn on_event(self: Arc<Self>, m: EventMessage) {
        let action = m.action.unwrap_or_default();
        let Some(actor) = m.actor else { return };
        let id = actor.id.unwrap_or_default();
        let attrs = actor.attributes.unwrap_or_default();
        if attrs.get(LABEL_MANAGED).map(String::as_str) == Some(MANAGED_BY) {
            if action == "die" {
                self.managed_died(&id, attrs.get("exitCode").cloned());
            }
            return;
        }
        let Some(service) = attrs.get(LABEL_SERVICE) else {
            return;
        };
        if !self.discover {
            return;
        }
        match action.as_str() {
            "start" => self.discover_container(&id, service).await,
            "die" | "destroy" => {
                let _ = self.events.send(RuntimeEvent::Vanished {
                    service: service.clone(),
                    container: id,
                });
            }
            _ => {}
        }
    }

    fn managed_died(self: &Arc<Self>, id: &str, exit_code: Option<String>) {
        let instance = {
            let mut managed = self.lock();
            let Some((instance, m)) = managed.iter_mut().find(|(_, m)| m.id == id) else {
                return;
            };
            if m.stopping {
                return;
            }
            if m.started.elapsed() >= STABLE_RUN {
                m.backoff = BACKOFF_MIN;
            }
            instance.clone()
        };
        let detail = format!(
            "container exited with code {}",
            exit_code.as_deref().unwrap_or("?")
        );
        warn!(%instance, "{detail}; replacing it");
        let _ = self.events.send(RuntimeEvent::Exited {
            instance: instance.clone(),
            detail,
        });
        let me = self.clone();
        tokio::spawn(async move { me.replace(instance).await });
    }

    /// A managed container died: after a backoff, remove it and run a new one in its place.
    async fn replace(self: Arc<Self>, instance: InstanceRef) {
        loop {
            let (old, spec, backoff) = {
                let mut managed = self.lock();
                let Some(m) = managed.get_mut(&instance) else {
                    return;
                };
                if m.stopping {
                    return;
                }
                let b = m.backoff;
                m.backoff = (m.backoff * 2).min(BACKOFF_MAX);
                (m.id.clone(), m.spec.clone(), b)
            };
            tokio::time::sleep(backoff).await;
            if self.lock().get(&instance).is_none_or(|m| m.stopping) {
                return;
            }
            self.remove(&old).await;
            match self.run(&spec).await {
                Ok((id, addr)) => {
                    let keep = {
                        let mut managed = self.lock();
                        match managed.get_mut(&instance) {
                            Some(m) if !m.stopping => {
                                m.id = id.clone();
                                m.addr = addr;
                                m.started = Instant::now();
                                true
                            }
                            _ => false,
                        }
                    };
                    if !keep {
                        self.remove(&id).await;
                        return;
                    }
                    info!(%instance, %addr, "replacement container running");
                    let _ = self.events.send(RuntimeEvent::Moved { instance, addr });
                    return;
                }
                Err(e) => warn!(%instance, "replacement failed: {e}; trying again"),
            }
        }
    }

    async fn remove(&self, id: &str) {
        let opts = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        if let Err(e) = self.docker.remove_container(id, Some(opts)).await {
            if status_of(&e) != Some(404) {
                warn!(container = id, "remove: {e}");
            }
        }
    }

    /// The container's IP on `network` (or on its only network when `network` is `None`).
    async fn address(
        &self,
        id: &str,
        network: Option<&str>,
        port: u16,
    ) -> Result<SocketAddr, String> {
        let info = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| format!("inspect: {e}"))?;
        let networks = info
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default();
        let endpoint = match network {
            Some(n) => networks.get(n),
            None => networks.values().next(),
        }
        .ok_or_else(|| format!("not attached to network {}", network.unwrap_or("(any)")))?;
        let ip: IpAddr = endpoint
            .ip_address
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or("no IP address on its network")?
            .parse()
            .map_err(|e| format!("bad IP address: {e}"))?;
        Ok(SocketAddr::new(ip, port))
    }

    /// Create and start one container for `spec`; on any failure nothing is left behind.
    async fn run(&self, spec: &InstanceSpec) -> Result<(String, SocketAddr), RuntimeError> {
        let service = &spec.instance.service;
        let placement = self.placements.get(service).ok_or_else(|| {
            RuntimeError::Docker(format!("service {service} is not a docker service"))
        })?;
        let run = &spec.run;
        let launch = launch(spec, placement.port);
        let body = ContainerCreateBody {
            image: Some(run.image.clone()),
            cmd: launch.args,
            env: Some(launch.env),
            labels: Some(launch.labels),
            host_config: Some(HostConfig {
                network_mode: Some(placement.network.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("{}-{}", spec.instance, unique_suffix());
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| match status_of(&e) {
                Some(404) => RuntimeError::Docker(format!(
                    "image {:?} is not present locally and this machine cannot pull: build it (scripts/images.sh) or `docker load` it",
                    run.image
                )),
                _ => RuntimeError::Docker(format!("create container from {}: {e}", run.image)),
            })?;
        let cid = created.id;
        if let Err(e) = self.docker.start_container(&cid, None).await {
            self.remove(&cid).await;
            return Err(RuntimeError::Docker(match status_of(&e) {
                Some(404) => format!(
                    "network {:?} does not exist: create it (docker network create {}) or fix services.{service}.network",
                    placement.network, placement.network
                ),
                _ => format!("start container: {e}"),
            }));
        }
        match self
            .address(&cid, Some(&placement.network), placement.port)
            .await
        {
            Ok(addr) => Ok((cid, addr)),
            Err(e) => {
                self.remove(&cid).await;
                Err(RuntimeError::Docker(format!(
                    "container {}: {e}",
                    spec.instance
                )))
            }
        }
    }

    /// A labelled container the agent did not start is running: tell the core where it is.
    async fn discover_container(&self, id: &str, service: &str) {
        let info = match self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(i) => i,
            Err(e) => {
                debug!(container = id, "inspect: {e}");
                return;
            }
        };
        let labels = info
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let name = info.name.unwrap_or_default();
        let Some(port) = labels.get(LABEL_PORT).and_then(|p| p.parse::<u16>().ok()) else {
            warn!(container = %name, "labelled {LABEL_SERVICE}={service} but {LABEL_PORT} is missing or not a port: ignored");
            return;
        };
        let weight = labels
            .get(LABEL_WEIGHT)
            .and_then(|w| w.parse().ok())
            .unwrap_or(1);
        let priority = labels
            .get(LABEL_PRIORITY)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        match self
            .address(id, labels.get(LABEL_NETWORK).map(String::as_str), port)
            .await
        {
            Ok(addr) => {
                info!(container = %name, service, %addr, "discovered");
                let _ = self.events.send(RuntimeEvent::Discovered {
                    service: service.to_owned(),
                    container: id.to_owned(),
                    addr,
                    weight,
                    priority,
                });
            }
            Err(e) => warn!(container = %name, service, "discovered but unreachable: {e}"),
        }
    }

    /// Containers matching `filters` (`all`: stopped ones too); empty, with a warning, on error.
    async fn list_containers(
        &self,
        all: bool,
        filters: HashMap<String, Vec<String>>,
        what: &str,
    ) -> Vec<bollard::models::ContainerSummary> {
        let opts = ListContainersOptions {
            all,
            filters: Some(filters),
            ..Default::default()
        };
        self.docker
            .list_containers(Some(opts))
            .await
            .unwrap_or_else(|e| {
                warn!("listing containers for {what}: {e}");
                Vec::new()
            })
    }

    /// Treat every tracked container that is no longer running as died.
    async fn resync_managed(self: &Arc<Self>) {
        if self.lock().is_empty() {
            return;
        }
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_owned(),
            vec![format!("{LABEL_MANAGED}={MANAGED_BY}")],
        );
        filters.insert("status".to_owned(), vec!["running".to_owned()]);
        let opts = ListContainersOptions {
            filters: Some(filters),
            ..Default::default()
        };
        // On an error, change nothing: an empty list would read as "all of them died".
        let running: std::collections::HashSet<String> =
            match self.docker.list_containers(Some(opts)).await {
                Ok(list) => list.into_iter().filter_map(|c| c.id).collect(),
                Err(e) => {
                    warn!("listing managed containers after a reconnect: {e}");
                    return;
                }
            };
        let dead: Vec<String> = self
            .lock()
            .values()
            .filter(|m| !m.stopping && !running.contains(&m.id))
            .map(|m| m.id.clone())
            .collect();
        for id in dead {
            self.managed_died(&id, None);
        }
    }

    /// Report every running labelled container (after a (re)connect of the event stream).
    async fn resync_discovered(&self) {
        let mut filters = HashMap::new();
        filters.insert("label".to_owned(), vec![LABEL_SERVICE.to_owned()]);
        filters.insert("status".to_owned(), vec!["running".to_owned()]);
        let list = self.list_containers(false, filters, "discovery").await;
        for c in list {
            let labels = c.labels.unwrap_or_default();
            if labels.get(LABEL_MANAGED).map(String::as_str) == Some(MANAGED_BY) {
                continue;
            }
            if let (Some(id), Some(service)) = (c.id, labels.get(LABEL_SERVICE)) {
                self.discover_container(&id, service).await;
            }
        }
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    async fn start(&self, spec: InstanceSpec) -> Result<SocketAddr, RuntimeError> {
        let (id, addr) = self.run(&spec).await?;
        info!(instance = %spec.instance, %addr, image = %spec.run.image, container = %&id[..12.min(id.len())], "container running");
        self.lock().insert(
            spec.instance.clone(),
            Managed {
                id,
                addr,
                spec,
                stopping: false,
                started: Instant::now(),
                backoff: BACKOFF_MIN,
            },
        );
        Ok(addr)
    }

    async fn stop(&self, instance: &InstanceRef, grace: Duration) -> Result<(), RuntimeError> {
        let id = {
            let mut managed = self.lock();
            let m = managed
                .get_mut(instance)
                .ok_or_else(|| RuntimeError::Unknown(instance.to_string()))?;
            m.stopping = true;
            m.id.clone()
        };
        let opts = StopContainerOptions {
            t: Some(grace.as_secs_f64().ceil() as i32),
            ..Default::default()
        };
        if let Err(e) = self.docker.stop_container(&id, Some(opts)).await {
            if !matches!(status_of(&e), Some(304 | 404)) {
                warn!(%instance, "stop: {e}");
            }
        }
        self.remove(&id).await;
        self.lock().remove(instance);
        info!(%instance, "container removed");
        Ok(())
    }

    async fn list(&self) -> Vec<InstanceInfo> {
        self.lock()
            .iter()
            .map(|(i, m)| InstanceInfo {
                id: i.to_string(),
                addr: m.addr,
                pid: None,
            })
            .collect()
    }

    async fn adopt(&self) -> Vec<Adopted> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_owned(),
            vec![format!("{LABEL_MANAGED}={MANAGED_BY}")],
        );
        let list = self.list_containers(true, filters, "adoption").await;
        let mut adopted = Vec::new();
        for c in list {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            let running = c.state.map(|s| s.to_string()) == Some("running".to_owned());
            let service = labels.get(LABEL_SERVICE).cloned().unwrap_or_default();
            let seq = labels.get(LABEL_SEQ).and_then(|s| s.parse::<u64>().ok());
            let run = labels
                .get(LABEL_SPEC)
                .and_then(|s| serde_json::from_str::<RunSpec>(s).ok());
            let claimed = self.placements.get(&service);
            match (running, claimed, seq, run) {
                (true, Some(placement), Some(seq), Some(run)) => {
                    let instance = InstanceRef {
                        service: service.clone(),
                        seq,
                    };
                    match self
                        .address(&id, Some(&placement.network), placement.port)
                        .await
                    {
                        Ok(addr) => {
                            info!(%instance, %addr, "adopted a running container");
                            self.lock().insert(
                                instance.clone(),
                                Managed {
                                    id,
                                    addr,
                                    spec: InstanceSpec {
                                        instance: instance.clone(),
                                        generation: 0,
                                        run: Arc::new(run.clone()),
                                    },
                                    stopping: false,
                                    started: Instant::now(),
                                    backoff: BACKOFF_MIN,
                                },
                            );
                            adopted.push(Adopted {
                                instance,
                                addr,
                                run,
                            });
                        }
                        Err(e) => {
                            warn!(%instance, "cannot adopt ({e}); removing it");
                            self.remove(&id).await;
                        }
                    }
                }
                _ => {
                    info!(container = %id, service, running, "no service claims this container; removing it");
                    let docker = self.docker.clone();
                    tokio::spawn(async move {
                        if running {
                            tokio::time::sleep(ORPHAN_DRAIN).await;
                        }
                        let opts = RemoveContainerOptions {
                            force: true,
                            ..Default::default()
                        };
                        let _ = docker.remove_container(&id, Some(opts)).await;
                    });
                }
            }
        }
        adopted
    }

    fn keeps_instances_on_exit(&self) -> bool {
        self.keep_on_exit
    }
}
