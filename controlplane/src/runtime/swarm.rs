//! The `swarm` runtime: each instance the core asks for is a Swarm service of one replica
//! (`PREFIX-SERVICE-N`), so Swarm places it on a node, restarts its task when it dies and moves
//! it when its node goes, while every decision about *which* instance runs, drains or stops stays
//! the core's (rollouts, slow start, autoscaling, outliers). Why one service per instance and not
//! Swarm's own scaling and `start-first` updates: `docs/design-swarm.md`.
//!
//! - Instances are reached at their task's address on the service's overlay network. bollard's
//!   `Task` model has no `NetworksAttachments`, so tasks are read from the engine's `/tasks`
//!   endpoint into this module's own types ([`SwarmTask`]): one call answered by the manager for
//!   tasks on every node (a container inspect would only see the local node's containers).
//! - One task follows the tasks: a poll every second, woken early by the local engine's
//!   container `die` events (a task that dies on this node leaves the table at once; elsewhere
//!   within a poll). A dead task is reported `Exited`; the task Swarm starts in its place,
//!   usually at a new address, `Moved`.
//! - The agent's desired state (scale and deploys made through the API) is kept in the labels
//!   of a zero-replica service `PREFIX-state`, so an agent started on another node (no state
//!   dir) adopts the instances *and* what they should be ([`SwarmRuntime::load_desired`]).
//! - Its services are Swarm's to keep: a stopping agent leaves them running for the next one.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};
use bollard::query_parameters::{EventsOptions, ListServicesOptions, UpdateServiceOptions};
use bollard::Docker;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::docker::{
    LABEL_GENERATION, LABEL_INSTANCE, LABEL_MANAGED, LABEL_SEQ, LABEL_SERVICE, LABEL_SPEC,
    LABEL_VERSION, MANAGED_BY,
};
use super::{Adopted, InstanceInfo, InstanceSpec, Runtime, RuntimeError, RuntimeEvent};
use crate::spec::{ContainerPlacement, InstanceRef, RunSpec, SwarmSettings};
use crate::state::Desired;

/// Which agent's services these are (its `[swarm] prefix`).
pub const LABEL_AGENT: &str = "rustybalancer.agent";
/// The desired state, as JSON, on the state service.
const LABEL_DESIRED: &str = "rustybalancer.desired";
/// The label `docker stack rm` removes services by.
const LABEL_STACK: &str = "com.docker.stack.namespace";
/// The label Swarm puts on each task's container.
const LABEL_TASK_SERVICE: &str = "com.docker.swarm.service.name";

const POLL: Duration = Duration::from_secs(1);
/// Longest wait for a new service's task to run (image present: seconds at most).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `/tasks` answer read.
const MAX_ANSWER: usize = 32 << 20;
/// Largest desired state kept in a label (the engine caps a whole spec at a few MB).
const MAX_DESIRED: usize = 256 << 10;

/// A task as `/tasks` gives it: only the fields this runtime reads (the engine adds fields
/// between API versions, so unknown ones are ignored, unlike in our own configs).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SwarmTask {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    #[serde(default)]
    pub desired_state: String,
    #[serde(default)]
    pub status: TaskStatus,
    #[serde(default)]
    pub networks_attachments: Vec<NetworkAttachment>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaskStatus {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub err: String,
    #[serde(default)]
    pub container_status: Option<ContainerStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerStatus {
    #[serde(default, rename = "ContainerID")]
    pub container_id: String,
    #[serde(default)]
    pub exit_code: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkAttachment {
    pub network: AttachedNetwork,
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AttachedNetwork {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(default)]
    pub spec: NetworkName,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkName {
    #[serde(default)]
    pub name: String,
}

impl SwarmTask {
    pub fn running(&self) -> bool {
        self.desired_state == "running" && self.status.state == "running"
    }

    /// Its IP on `network` (by name or id): the address part of the attachment's CIDR.
    pub fn address_on(&self, network: &str) -> Option<IpAddr> {
        self.networks_attachments
            .iter()
            .find(|a| a.network.spec.name == network || a.network.id == network)?
            .addresses
            .iter()
            .find_map(|cidr| cidr.split('/').next()?.parse().ok())
    }
}

/// GET `path` on the engine and parse the JSON answer. HTTP/1.0 and `Connection: close`, so the
/// answer ends with the connection (no chunked framing to undo).
async fn engine_get<T: serde::de::DeserializeOwned>(
    endpoint: &str,
    path: &str,
) -> Result<T, String> {
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        path: &str,
    ) -> Result<Vec<u8>, String> {
        let head = format!("GET {path} HTTP/1.0\r\nHost: docker\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        (&mut s)
            .take(MAX_ANSWER as u64 + 1)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if raw.len() > MAX_ANSWER {
            return Err(format!("answer over {MAX_ANSWER} bytes"));
        }
        Ok(raw)
    }
    let run = async {
        let raw = if let Some(socket) = endpoint.strip_prefix("unix://") {
            let s = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| format!("connect {socket}: {e}"))?;
            exchange(s, path).await?
        } else {
            let addr = endpoint
                .trim_start_matches("tcp://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            exchange(s, path).await?
        };
        let at = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no HTTP answer")?;
        let status = String::from_utf8_lossy(&raw[..at]);
        let status = status.lines().next().unwrap_or_default();
        let body = &raw[at + 4..];
        if !status.contains(" 200 ") {
            return Err(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            ));
        }
        serde_json::from_slice(body).map_err(|e| format!("GET {path}: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .map_err(|_| format!("GET {path}: timed out"))?
}

/// The query string of a `filters` parameter, percent-encoded.
fn filters(pairs: &[(&str, &[String])]) -> String {
    let map: HashMap<&str, &[String]> = pairs.iter().copied().collect();
    let json = serde_json::to_string(&map).unwrap_or_default();
    let mut out = String::with_capacity(json.len() * 3);
    for b in json.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where a service's tasks run, and the grace Swarm gives them when it stops one.
#[derive(Debug, Clone)]
pub struct SwarmPlacement {
    pub container: ContainerPlacement,
    pub stop_grace: Duration,
}

impl std::ops::Deref for SwarmPlacement {
    type Target = ContainerPlacement;
    fn deref(&self) -> &ContainerPlacement {
        &self.container
    }
}

/// One instance's service and what the runtime last told the core about it.
struct Managed {
    service_name: String,
    service_id: String,
    network: String,
    port: u16,
    /// The task it serves on, while one runs.
    task: Option<String>,
    addr: SocketAddr,
    stopping: bool,
    /// Tasks seen dead (a `die` event may come before `/tasks` says so).
    dead: HashSet<String>,
}

pub struct SwarmRuntime {
    docker: Docker,
    endpoint: String,
    settings: SwarmSettings,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    placements: HashMap<String, SwarmPlacement>,
    managed: Mutex<HashMap<InstanceRef, Managed>>,
    wake: Notify,
}

impl SwarmRuntime {
    /// Check the engine is a Swarm manager and every overlay network the config names exists.
    pub async fn new(
        docker: Docker,
        endpoint: String,
        settings: SwarmSettings,
        events: mpsc::UnboundedSender<RuntimeEvent>,
        placements: HashMap<String, SwarmPlacement>,
    ) -> Result<Arc<SwarmRuntime>, RuntimeError> {
        if let Err(e) = docker.inspect_swarm().await {
            return Err(RuntimeError::Docker(format!(
                "the Docker engine at {endpoint} is not a Swarm manager ({e}): run the agent on a manager node (docker swarm init, or a placement constraint node.role==manager)"
            )));
        }
        for (name, placement) in &placements {
            match docker
                .inspect_network(&placement.network, None::<bollard::query_parameters::InspectNetworkOptions>)
                .await
            {
                Ok(n) if n.scope.as_deref() == Some("swarm") => {}
                Ok(_) => {
                    return Err(RuntimeError::Docker(format!(
                        "services.{name}.network: {:?} is not a Swarm network: create an overlay (docker network create -d overlay --attachable {})",
                        placement.network, placement.network
                    )))
                }
                Err(e) => {
                    return Err(RuntimeError::Docker(format!(
                        "services.{name}.network: Swarm network {:?}: {e}; create it (docker network create -d overlay --attachable {}) or name an existing one",
                        placement.network, placement.network
                    )))
                }
            }
        }
        Ok(Arc::new(SwarmRuntime {
            docker,
            endpoint,
            settings,
            events,
            placements,
            managed: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceRef, Managed>> {
        self.managed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn service_name(&self, instance: &InstanceRef) -> String {
        format!("{}-{}", self.settings.prefix, instance)
    }

    fn state_service(&self) -> String {
        format!("{}-state", self.settings.prefix)
    }

    /// Labels every service this agent creates carries.
    fn base_labels(&self) -> HashMap<String, String> {
        let mut labels = HashMap::new();
        labels.insert(LABEL_MANAGED.to_owned(), MANAGED_BY.to_owned());
        labels.insert(LABEL_AGENT.to_owned(), self.settings.prefix.clone());
        if let Some(stack) = &self.settings.stack {
            labels.insert(LABEL_STACK.to_owned(), stack.clone());
        }
        labels
    }

    /// The tasks of the services `ids` (all of them when `ids` is empty would be too many: the
    /// caller always names some).
    async fn tasks(&self, services: &[String]) -> Result<Vec<SwarmTask>, String> {
        if services.is_empty() {
            return Ok(Vec::new());
        }
        let path = format!("/tasks?filters={}", filters(&[("service", services)]));
        engine_get(&self.endpoint, &path).await
    }

    /// Wait for the one task of `service_id` to run and have an address on `network`.
    async fn running_task(
        &self,
        service_id: &str,
        network: &str,
        skip: &HashSet<String>,
    ) -> Result<(String, IpAddr), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("no task yet");
        loop {
            match self.tasks(&[service_id.to_owned()]).await {
                Ok(tasks) => {
                    for t in &tasks {
                        if t.running() && !skip.contains(&t.id) {
                            if let Some(ip) = t.address_on(network) {
                                return Ok((t.id.clone(), ip));
                            }
                            last = format!("task {} has no address on {network}", t.id);
                        } else if !t.status.err.is_empty() {
                            last = format!("task {}: {}", t.status.state, t.status.err);
                        } else if t.desired_state == "running" {
                            last = format!("task {}", t.status.state);
                        }
                    }
                }
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                return Err(format!("no running task within {START_TIMEOUT:?}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn remove_service(&self, name: &str) {
        if let Err(e) = self.docker.delete_service(name).await {
            if !matches!(
                e,
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                }
            ) {
                warn!(service = name, "remove: {e}");
            }
        }
    }

    /// Create the Swarm service of one instance and wait for its task to run.
    async fn run(&self, spec: &InstanceSpec) -> Result<Managed, RuntimeError> {
        let service = &spec.instance.service;
        let placement = self.placements.get(service).ok_or_else(|| {
            RuntimeError::Docker(format!("service {service} is not a swarm service"))
        })?;
        let run = &spec.run;
        let id = spec.instance.to_string();
        let fill = |s: &str| {
            s.replace("{port}", &placement.port.to_string())
                .replace("{instance}", &id)
                .replace("{generation}", &spec.generation.to_string())
        };
        let mut labels = self.base_labels();
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
        env.push(format!("PORT={}", placement.port));
        env.push(format!("RUSTY_INSTANCE={id}"));
        env.push(format!("RUSTY_SERVICE={service}"));
        let name = self.service_name(&spec.instance);
        let body = ServiceSpec {
            name: Some(name.clone()),
            labels: Some(labels),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(run.image.clone()),
                    args: (!run.args.is_empty())
                        .then(|| run.args.iter().map(|a| fill(a)).collect()),
                    env: Some(env),
                    // Also what Swarm gives it when it stops the task itself (a drained node).
                    stop_grace_period: Some(placement.stop_grace.as_nanos() as i64),
                    // Only for the `die` events of this agent's tasks; not the docker runtime's
                    // labels, whose adoption and discovery must not take these containers.
                    labels: Some(HashMap::from([(
                        LABEL_AGENT.to_owned(),
                        self.settings.prefix.clone(),
                    )])),
                    ..Default::default()
                }),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                    delay: Some(500_000_000),
                    ..Default::default()
                }),
                placement: (!placement.constraints.is_empty()).then(|| TaskSpecPlacement {
                    constraints: Some(placement.constraints.clone()),
                    ..Default::default()
                }),
                networks: Some(vec![NetworkAttachmentConfig {
                    target: Some(placement.network.clone()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
                ..Default::default()
            }),
            // Reached at its task's address: no virtual IP to allocate on the overlay.
            endpoint_spec: Some(EndpointSpec {
                mode: Some(EndpointSpecModeEnum::DNSRR),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A service of that name left by a crash between create and record: replace it.
        self.remove_service(&name).await;
        let created = self.docker.create_service(body, None).await.map_err(|e| {
            RuntimeError::Docker(format!(
                "create Swarm service {name} from {}: {e}",
                run.image
            ))
        })?;
        let service_id = created.id.unwrap_or_else(|| name.clone());
        match self
            .running_task(&service_id, &placement.network, &HashSet::new())
            .await
        {
            Ok((task, ip)) => Ok(Managed {
                service_name: name,
                service_id,
                network: placement.network.clone(),
                port: placement.port,
                task: Some(task),
                addr: SocketAddr::new(ip, placement.port),
                stopping: false,
                dead: HashSet::new(),
            }),
            Err(e) => {
                self.remove_service(&name).await;
                Err(RuntimeError::Docker(format!(
                    "Swarm service {name} ({}): {e}",
                    run.image
                )))
            }
        }
    }

    /// Follow the tasks until the agent exits: a poll, woken early by container `die` events.
    pub fn watch(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = me.wake.notified() => {}
                }
                me.resync().await;
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let mut f = HashMap::new();
                f.insert("type".to_owned(), vec!["container".to_owned()]);
                f.insert("event".to_owned(), vec!["die".to_owned()]);
                f.insert(
                    "label".to_owned(),
                    vec![format!("{LABEL_AGENT}={}", me.settings.prefix)],
                );
                let mut stream = me.docker.events(Some(EventsOptions {
                    filters: Some(f),
                    ..Default::default()
                }));
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(m) => {
                            let attrs = m.actor.and_then(|a| a.attributes).unwrap_or_default();
                            if let Some(name) = attrs.get(LABEL_TASK_SERVICE) {
                                me.task_died(
                                    name,
                                    attrs.get("com.docker.swarm.task.id"),
                                    attrs.get("exitCode"),
                                );
                            }
                        }
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

    /// A task's container died on this node: out of the table now, not at the next poll.
    fn task_died(&self, service_name: &str, task: Option<&String>, exit_code: Option<&String>) {
        let exited = {
            let mut managed = self.lock();
            let Some((instance, m)) = managed
                .iter_mut()
                .find(|(_, m)| m.service_name == service_name)
            else {
                return;
            };
            if let Some(t) = task {
                m.dead.insert(t.clone());
            }
            if m.stopping || m.task.is_none() || (task.is_some() && m.task.as_ref() != task) {
                return;
            }
            m.task = None;
            instance.clone()
        };
        let detail = format!(
            "task exited with code {}; Swarm starts another",
            exit_code.map_or("?", String::as_str)
        );
        warn!(instance = %exited, "{detail}");
        let _ = self.events.send(RuntimeEvent::Exited {
            instance: exited,
            detail,
        });
        self.wake.notify_one();
    }

    /// Compare each instance's task with what the engine says now.
    async fn resync(&self) {
        let ids: Vec<String> = self
            .lock()
            .values()
            .filter(|m| !m.stopping)
            .map(|m| m.service_id.clone())
            .collect();
        let tasks = match self.tasks(&ids).await {
            Ok(t) => t,
            Err(e) => {
                // Change nothing: an empty answer would read as "every task died".
                debug!("listing tasks: {e}");
                return;
            }
        };
        let mut by_service: HashMap<&str, Vec<&SwarmTask>> = HashMap::new();
        for t in &tasks {
            by_service.entry(t.service_id.as_str()).or_default().push(t);
        }
        let mut out = Vec::new();
        {
            let mut managed = self.lock();
            for (instance, m) in managed.iter_mut().filter(|(_, m)| !m.stopping) {
                let mine = by_service.remove(m.service_id.as_str()).unwrap_or_default();
                let live = mine
                    .iter()
                    .filter(|t| t.running() && !m.dead.contains(&t.id))
                    .find_map(|t| Some((t.id.clone(), t.address_on(&m.network)?)));
                match (&m.task, live) {
                    (Some(current), Some((task, _))) if *current == task => {}
                    (Some(_), None) => {
                        let failed = mine.iter().find(|t| Some(&t.id) == m.task.as_ref());
                        let detail = failed.map_or_else(
                            || "its task is gone".to_owned(),
                            |t| {
                                let code = t
                                    .status
                                    .container_status
                                    .as_ref()
                                    .map_or(0, |c| c.exit_code);
                                format!(
                                    "task {} (exit code {code}) {}",
                                    t.status.state, t.status.err
                                )
                                .trim()
                                .to_owned()
                            },
                        );
                        if let Some(t) = m.task.take() {
                            m.dead.insert(t);
                        }
                        out.push(RuntimeEvent::Exited {
                            instance: instance.clone(),
                            detail: format!("{detail}; Swarm starts another"),
                        });
                    }
                    (_, Some((task, ip))) => {
                        if let Some(old) = m.task.replace(task) {
                            m.dead.insert(old);
                            out.push(RuntimeEvent::Exited {
                                instance: instance.clone(),
                                detail: "Swarm replaced its task".to_owned(),
                            });
                        }
                        let addr = SocketAddr::new(ip, m.port);
                        if addr == m.addr {
                            out.push(RuntimeEvent::Restarted {
                                instance: instance.clone(),
                            });
                        } else {
                            m.addr = addr;
                            out.push(RuntimeEvent::Moved {
                                instance: instance.clone(),
                                addr,
                            });
                        }
                    }
                    (None, None) => {}
                }
                // Remember only the tasks the engine still lists.
                m.dead.retain(|d| mine.iter().any(|t| &t.id == d));
            }
        }
        for ev in out {
            info!(?ev, "swarm task change");
            let _ = self.events.send(ev);
        }
    }

    /// The desired state the last agent kept in the state service, if any.
    pub async fn load_desired(&self) -> Option<Desired> {
        let service = self
            .docker
            .inspect_service(&self.state_service(), None)
            .await
            .ok()?;
        let json = service.spec?.labels?.remove(LABEL_DESIRED)?;
        match serde_json::from_str(&json) {
            Ok(d) => Some(d),
            Err(e) => {
                warn!(service = %self.state_service(), "the desired state kept in Swarm does not parse ({e}); using the config");
                None
            }
        }
    }

    /// Keep `desired` in the labels of the state service (created, with no task, on first use).
    pub async fn save_desired(&self, desired: &Desired) -> Result<(), String> {
        let json = serde_json::to_string(desired).map_err(|e| e.to_string())?;
        if json.len() > MAX_DESIRED {
            return Err(format!(
                "the desired state is {} bytes, over {MAX_DESIRED}",
                json.len()
            ));
        }
        let name = self.state_service();
        let mut labels = self.base_labels();
        labels.insert(LABEL_DESIRED.to_owned(), json);
        // Never run (zero replicas), so never pulled: any name does.
        let image = "rustybalancer-state".to_owned();
        let spec = |labels| ServiceSpec {
            name: Some(name.clone()),
            labels: Some(labels),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(image.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
                ..Default::default()
            }),
            ..Default::default()
        };
        match self.docker.inspect_service(&name, None).await {
            Ok(current) => {
                let version = current.version.and_then(|v| v.index).unwrap_or(0);
                self.docker
                    .update_service(
                        &name,
                        spec(labels),
                        UpdateServiceOptions {
                            version: version as i32,
                            ..Default::default()
                        },
                        None,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("update {name}: {e}"))
            }
            Err(_) => self
                .docker
                .create_service(spec(labels), None)
                .await
                .map(|_| ())
                .map_err(|e| format!("create {name}: {e}")),
        }
    }
}

#[async_trait]
impl Runtime for SwarmRuntime {
    async fn start(&self, spec: InstanceSpec) -> Result<SocketAddr, RuntimeError> {
        let started = Instant::now();
        let m = self.run(&spec).await?;
        let addr = m.addr;
        let took_ms = started.elapsed().as_millis() as u64;
        info!(instance = %spec.instance, %addr, image = %spec.run.image, service = %m.service_name, took_ms, "swarm task running");
        self.lock().insert(spec.instance.clone(), m);
        Ok(addr)
    }

    async fn stop(&self, instance: &InstanceRef, grace: Duration) -> Result<(), RuntimeError> {
        let (name, id) = {
            let mut managed = self.lock();
            let m = managed
                .get_mut(instance)
                .ok_or_else(|| RuntimeError::Unknown(instance.to_string()))?;
            m.stopping = true;
            (m.service_name.clone(), m.service_id.clone())
        };
        self.remove_service(&name).await;
        // Removing the service stops its task (SIGTERM, then SIGKILL after the task's grace):
        // return once no task of it is left.
        let deadline = Instant::now() + grace + Duration::from_secs(15);
        while Instant::now() < deadline {
            match self.tasks(std::slice::from_ref(&id)).await {
                Ok(tasks)
                    if tasks.iter().all(|t| {
                        matches!(
                            t.status.state.as_str(),
                            "shutdown" | "complete" | "failed" | "rejected" | "orphaned" | "remove"
                        )
                    }) =>
                {
                    break
                }
                Err(_) => break,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        self.lock().remove(instance);
        info!(%instance, "swarm service removed");
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
        let mut f = HashMap::new();
        f.insert(
            "label".to_owned(),
            vec![format!("{LABEL_AGENT}={}", self.settings.prefix)],
        );
        let services = match self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(f),
                ..Default::default()
            }))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                warn!("listing Swarm services for adoption: {e}");
                return Vec::new();
            }
        };
        let mut adopted = Vec::new();
        for s in services {
            let (Some(id), Some(spec)) = (s.id, s.spec) else {
                continue;
            };
            let name = spec.name.unwrap_or_default();
            if name == self.state_service() {
                continue;
            }
            let labels = spec.labels.unwrap_or_default();
            let service = labels.get(LABEL_SERVICE).cloned().unwrap_or_default();
            let seq = labels.get(LABEL_SEQ).and_then(|s| s.parse::<u64>().ok());
            let run = labels
                .get(LABEL_SPEC)
                .and_then(|s| serde_json::from_str::<RunSpec>(s).ok());
            let (Some(placement), Some(seq), Some(run)) = (self.placements.get(&service), seq, run)
            else {
                info!(service = %name, "no service of the config claims this Swarm service; removing it");
                self.remove_service(&name).await;
                continue;
            };
            let instance = InstanceRef {
                service: service.clone(),
                seq,
            };
            match self
                .running_task(&id, &placement.network, &HashSet::new())
                .await
            {
                Ok((task, ip)) => {
                    let addr = SocketAddr::new(ip, placement.port);
                    info!(%instance, %addr, "adopted a running Swarm service");
                    self.lock().insert(
                        instance.clone(),
                        Managed {
                            service_name: name,
                            service_id: id,
                            network: placement.network.clone(),
                            port: placement.port,
                            task: Some(task),
                            addr,
                            stopping: false,
                            dead: HashSet::new(),
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
                    self.remove_service(&name).await;
                }
            }
        }
        adopted
    }

    fn keeps_instances_on_exit(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task as engine 20.10 answers `/tasks` (trimmed, field names as sent).
    const TASK: &str = r#"[{"ID":"t1","Version":{"Index":20},"ServiceID":"s1","Slot":1,
      "NodeID":"n1","Status":{"Timestamp":"2026-12-07T13:00:00Z","State":"running",
      "Message":"started","ContainerStatus":{"ContainerID":"c1","PID":42,"ExitCode":0}},
      "DesiredState":"running","NetworksAttachments":[
        {"Network":{"ID":"ing","Spec":{"Name":"ingress"}},"Addresses":["10.0.0.7/24"]},
        {"Network":{"ID":"ov1","Spec":{"Name":"rbnet","Driver":"overlay"}},"Addresses":["10.0.1.5/24"]}],
      "Unknown":{"fields":"are ignored"}}]"#;

    #[test]
    fn a_task_is_read_with_its_address_on_the_named_network() {
        let tasks: Vec<SwarmTask> = serde_json::from_str(TASK).unwrap();
        let t = &tasks[0];
        assert!(t.running());
        assert_eq!(t.address_on("rbnet"), Some("10.0.1.5".parse().unwrap()));
        assert_eq!(t.address_on("ov1"), Some("10.0.1.5".parse().unwrap()));
        assert_eq!(t.address_on("other"), None);
    }

    #[test]
    fn a_task_that_should_stop_is_not_running_even_while_it_still_does() {
        let mut tasks: Vec<SwarmTask> = serde_json::from_str(TASK).unwrap();
        tasks[0].desired_state = "shutdown".to_owned();
        assert!(!tasks[0].running());
    }

    #[test]
    fn filters_are_json_percent_encoded() {
        let q = filters(&[("service", &["rb-web-1".to_owned()])]);
        assert_eq!(q, "%7B%22service%22%3A%5B%22rb-web-1%22%5D%7D");
    }
}
