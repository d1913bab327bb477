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
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
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
use tracing::{error, info, warn};

use super::docker::{
    launch, status_of, unique_suffix, LABEL_MANAGED, LABEL_SEQ, LABEL_SERVICE, LABEL_SPEC,
    MANAGED_BY,
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
/// How long adoption waits, for all services together, for tasks that are starting.
const ADOPT_WAIT: Duration = Duration::from_secs(20);
/// Attempts at listing this agent's services before adopting none.
const ADOPT_TRIES: u32 = 10;

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

/// What a call to the engine's API came to, when it did not answer as asked.
#[derive(Debug)]
pub enum EngineError {
    /// 404: the object asked about (a service, a task) does not exist (any more).
    NotFound,
    Failed(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::NotFound => f.write_str("not found"),
            EngineError::Failed(e) => f.write_str(e),
        }
    }
}

/// GET `path` on the engine and parse the JSON answer. HTTP/1.0 and `Connection: close`, so the
/// answer ends with the connection (no chunked framing to undo).
async fn engine_get<T: serde::de::DeserializeOwned>(
    endpoint: &str,
    path: &str,
) -> Result<T, EngineError> {
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
                .map_err(|e| EngineError::Failed(format!("connect {socket}: {e}")))?;
            exchange(s, path).await.map_err(EngineError::Failed)?
        } else {
            let addr = endpoint
                .trim_start_matches("tcp://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| EngineError::Failed(format!("connect {addr}: {e}")))?;
            exchange(s, path).await.map_err(EngineError::Failed)?
        };
        let at = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| EngineError::Failed("no HTTP answer".to_owned()))?;
        let status = String::from_utf8_lossy(&raw[..at]);
        let status = status.lines().next().unwrap_or_default();
        let body = &raw[at + 4..];
        if status.contains(" 404 ") {
            return Err(EngineError::NotFound);
        }
        if !status.contains(" 200 ") {
            return Err(EngineError::Failed(format!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            )));
        }
        serde_json::from_slice(body).map_err(|e| EngineError::Failed(format!("GET {path}: {e}")))
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .map_err(|_| EngineError::Failed(format!("GET {path}: timed out")))?
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
    /// What it runs, to create its service again if someone removes it.
    spec: InstanceSpec,
    /// The task it serves on, while one runs.
    task: Option<String>,
    addr: SocketAddr,
    stopping: bool,
    /// Its service is being created again.
    recreating: bool,
    /// Tasks seen dead (a `die` event may come before `/tasks` says so).
    dead: HashSet<String>,
}

/// Why the desired state could not be kept in Swarm.
#[derive(Debug)]
pub enum SaveError {
    /// It does not fit in a label: trying again cannot help.
    TooLarge(usize),
    Engine(String),
}

impl std::fmt::Display for SaveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaveError::TooLarge(n) => {
                write!(f, "the desired state is {n} bytes, over {MAX_DESIRED}")
            }
            SaveError::Engine(e) => f.write_str(e),
        }
    }
}

pub struct SwarmRuntime {
    docker: Docker,
    endpoint: String,
    settings: SwarmSettings,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    placements: HashMap<String, SwarmPlacement>,
    managed: Mutex<HashMap<InstanceRef, Managed>>,
    wake: Notify,
    /// The last poll of `/tasks` failed: a change either way is logged once.
    poll_failing: AtomicBool,
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
            let net = &placement.network;
            match docker
                .inspect_network(net, None::<bollard::query_parameters::InspectNetworkOptions>)
                .await
            {
                Ok(n) if n.scope.as_deref() == Some("swarm") => {}
                Ok(n) => {
                    return Err(RuntimeError::Docker(format!(
                        "services.{name}.network: {net:?} is a {} network of scope {}, not a Swarm overlay: name an overlay the agent and the data planes are attached to (docker network create -d overlay --attachable NAME)",
                        n.driver.as_deref().unwrap_or("?"),
                        n.scope.as_deref().unwrap_or("?"),
                    )))
                }
                Err(e) if status_of(&e) == Some(404) => {
                    return Err(RuntimeError::Docker(format!(
                        "services.{name}.network: there is no network {net:?}: create it (docker network create -d overlay --attachable {net}) or name an existing overlay"
                    )))
                }
                Err(e) => {
                    return Err(RuntimeError::Docker(format!(
                        "services.{name}.network: inspecting {net:?}: {e}"
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
            poll_failing: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceRef, Managed>> {
        self.managed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `PREFIX-SERVICE-N-XXXXX` (see [`unique_suffix`]).
    fn service_name(&self, instance: &InstanceRef) -> String {
        format!("{}-{}-{}", self.settings.prefix, instance, unique_suffix())
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

    /// The tasks of the services `ids`.
    async fn tasks(&self, services: &[String]) -> Result<Vec<SwarmTask>, EngineError> {
        if services.is_empty() {
            return Ok(Vec::new());
        }
        let path = format!("/tasks?filters={}", filters(&[("service", services)]));
        engine_get(&self.endpoint, &path).await
    }

    /// The tasks of the services `ids`, and those of them that no longer exist: the engine
    /// answers 404 to the whole question when one is gone, so then each is asked on its own.
    async fn tasks_of(
        &self,
        ids: &[String],
    ) -> Result<(Vec<SwarmTask>, HashSet<String>), EngineError> {
        match self.tasks(ids).await {
            Ok(tasks) => Ok((tasks, HashSet::new())),
            Err(EngineError::NotFound) => {
                let (mut tasks, mut gone) = (Vec::new(), HashSet::new());
                for id in ids {
                    match self.tasks(std::slice::from_ref(id)).await {
                        Ok(t) => tasks.extend(t),
                        Err(EngineError::NotFound) => {
                            gone.insert(id.clone());
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok((tasks, gone))
            }
            Err(e) => Err(e),
        }
    }

    /// Wait for the one task of `service_id` to run and have an address on `network`.
    async fn running_task(
        &self,
        service_id: &str,
        network: &str,
    ) -> Result<(String, IpAddr), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("no task yet");
        loop {
            match self.tasks(&[service_id.to_owned()]).await {
                Ok(tasks) => {
                    for t in &tasks {
                        if t.running() {
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
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(format!("no running task within {START_TIMEOUT:?}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Remove a service; one that is already gone is no error.
    async fn remove_service(&self, name: &str) -> Result<(), String> {
        match self.docker.delete_service(name).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(format!("remove Swarm service {name}: {e}")),
        }
    }

    /// Create the Swarm service of one instance and wait for its task to run.
    async fn run(&self, spec: &InstanceSpec) -> Result<Managed, RuntimeError> {
        let service = &spec.instance.service;
        let placement = self.placements.get(service).ok_or_else(|| {
            RuntimeError::Docker(format!("service {service} is not a swarm service"))
        })?;
        let run = &spec.run;
        let launch = launch(spec, placement.port);
        let mut labels = launch.labels;
        labels.extend(self.base_labels());
        let name = self.service_name(&spec.instance);
        let body = ServiceSpec {
            name: Some(name.clone()),
            labels: Some(labels),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(run.image.clone()),
                    args: launch.args,
                    env: Some(launch.env),
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
        let created = self.docker.create_service(body, None).await.map_err(|e| {
            RuntimeError::Docker(format!(
                "create Swarm service {name} from {}: {e}",
                run.image
            ))
        })?;
        let service_id = created.id.unwrap_or_else(|| name.clone());
        match self.running_task(&service_id, &placement.network).await {
            Ok((task, ip)) => Ok(Managed {
                service_name: name,
                service_id,
                network: placement.network.clone(),
                port: placement.port,
                spec: spec.clone(),
                task: Some(task),
                addr: SocketAddr::new(ip, placement.port),
                stopping: false,
                recreating: false,
                dead: HashSet::new(),
            }),
            Err(e) => {
                if let Err(e) = self.remove_service(&name).await {
                    warn!("{e}");
                }
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
                me.clone().resync().await;
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
    async fn resync(self: Arc<Self>) {
        let ids: Vec<String> = self
            .lock()
            .values()
            .filter(|m| !m.stopping && !m.recreating)
            .map(|m| m.service_id.clone())
            .collect();
        let (tasks, gone) = match self.tasks_of(&ids).await {
            Ok(answer) => {
                if self.poll_failing.swap(false, Relaxed) {
                    warn!("the engine answers /tasks again");
                }
                answer
            }
            Err(e) => {
                // Change nothing: an empty answer would read as "every task died".
                if !self.poll_failing.swap(true, Relaxed) {
                    warn!("cannot list the Swarm tasks ({e}); instances keep their last state until it answers");
                }
                return;
            }
        };
        let mut by_service: HashMap<&str, Vec<&SwarmTask>> = HashMap::new();
        for t in &tasks {
            by_service.entry(t.service_id.as_str()).or_default().push(t);
        }
        let mut out = Vec::new();
        let mut recreate = Vec::new();
        {
            let mut managed = self.lock();
            // Only those asked about: one started or adopted meanwhile has no tasks here yet.
            let asked = managed
                .iter_mut()
                .filter(|(_, m)| !m.stopping && !m.recreating && ids.contains(&m.service_id));
            for (instance, m) in asked {
                if gone.contains(&m.service_id) {
                    m.recreating = true;
                    if let Some(t) = m.task.take() {
                        m.dead.insert(t);
                    }
                    out.push(RuntimeEvent::Exited {
                        instance: instance.clone(),
                        detail: format!(
                            "its Swarm service {} was removed; creating it again",
                            m.service_name
                        ),
                    });
                    recreate.push(instance.clone());
                    continue;
                }
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
                                    .map_or(String::new(), |c| {
                                        format!(" (exit code {})", c.exit_code)
                                    });
                                format!("task {}{code} {}", t.status.state, t.status.err)
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
        for instance in recreate {
            tokio::spawn(self.clone().recreate(instance));
        }
    }

    /// Someone removed an instance's service: create it again (the core still wants it) and
    /// report where it runs now, trying again until it works or the core stops the instance.
    async fn recreate(self: Arc<Self>, instance: InstanceRef) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let spec = match self.lock().get(&instance) {
                Some(m) if !m.stopping => m.spec.clone(),
                _ => return,
            };
            match self.run(&spec).await {
                Ok(new) => {
                    let addr = new.addr;
                    let mut managed = self.lock();
                    match managed.get_mut(&instance) {
                        Some(m) if !m.stopping => {
                            info!(%instance, %addr, service = %new.service_name, "Swarm service created again");
                            *m = new;
                            let _ = self.events.send(RuntimeEvent::Moved { instance, addr });
                        }
                        // Stopped meanwhile: the new service must not outlive it.
                        _ => {
                            let (me, name) = (self.clone(), new.service_name);
                            tokio::spawn(async move { me.remove_service(&name).await });
                        }
                    }
                    return;
                }
                Err(e) => warn!(%instance, "creating its Swarm service again: {e}; trying again"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// The desired state the last agent kept in the state service: `None` when there is none
    /// (or it does not parse, said in the log); an error when the engine does not answer, so
    /// the caller does not mistake that for "nothing kept" and fall back to the config.
    pub async fn load_desired(&self) -> Result<Option<Desired>, String> {
        let service = match self
            .docker
            .inspect_service(&self.state_service(), None)
            .await
        {
            Ok(s) => s,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", self.state_service())),
        };
        let Some(json) = service
            .spec
            .and_then(|s| s.labels)
            .and_then(|mut l| l.remove(LABEL_DESIRED))
        else {
            return Ok(None);
        };
        match serde_json::from_str(&json) {
            Ok(d) => Ok(Some(d)),
            Err(e) => {
                warn!(service = %self.state_service(), "the desired state kept in Swarm does not parse ({e}); using the config");
                Ok(None)
            }
        }
    }

    /// Keep `desired` in the labels of the state service (created, with no task, on first use).
    pub async fn save_desired(&self, desired: &Desired) -> Result<(), SaveError> {
        let json = serde_json::to_string(desired).map_err(|e| SaveError::Engine(e.to_string()))?;
        if json.len() > MAX_DESIRED {
            return Err(SaveError::TooLarge(json.len()));
        }
        let name = self.state_service();
        let mut labels = self.base_labels();
        labels.insert(LABEL_DESIRED.to_owned(), json);
        let spec = ServiceSpec {
            name: Some(name.clone()),
            labels: Some(labels),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    // Never run (zero replicas), so never pulled: any name does.
                    image: Some("rustybalancer-state".to_owned()),
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
        let failed = |what: &str, e: bollard::errors::Error| {
            SaveError::Engine(format!("{what} {name}: {e}"))
        };
        match self.docker.inspect_service(&name, None).await {
            Ok(current) => {
                let version = current.version.and_then(|v| v.index).unwrap_or(0);
                self.docker
                    .update_service(
                        &name,
                        spec,
                        UpdateServiceOptions {
                            version: version as i32,
                            ..Default::default()
                        },
                        None,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| failed("update", e))
            }
            Err(e) if status_of(&e) == Some(404) => self
                .docker
                .create_service(spec, None)
                .await
                .map(|_| ())
                .map_err(|e| failed("create", e)),
            Err(e) => Err(failed("inspect", e)),
        }
    }

    /// Services of this agent (its label), listed with a few tries: an agent that cannot list
    /// them must not go on as if there were none.
    async fn own_services(&self) -> Vec<bollard::models::Service> {
        let mut f = HashMap::new();
        f.insert(
            "label".to_owned(),
            vec![format!("{LABEL_AGENT}={}", self.settings.prefix)],
        );
        for attempt in 1..=ADOPT_TRIES {
            match self
                .docker
                .list_services(Some(ListServicesOptions {
                    filters: Some(f.clone()),
                    ..Default::default()
                }))
                .await
            {
                Ok(s) => return s,
                Err(e) if attempt < ADOPT_TRIES => {
                    warn!("listing Swarm services for adoption: {e}; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => error!(
                    "listing Swarm services for adoption failed {ADOPT_TRIES} times ({e}): none adopted; services left by an earlier agent keep running beside the new ones"
                ),
            }
        }
        Vec::new()
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
        let (name, task) = {
            let mut managed = self.lock();
            let m = managed
                .get_mut(instance)
                .ok_or_else(|| RuntimeError::Unknown(instance.to_string()))?;
            m.stopping = true;
            (m.service_name.clone(), m.task.clone())
        };
        self.remove_service(&name)
            .await
            .map_err(RuntimeError::Docker)?;
        // Removing the service stops its task (SIGTERM, then SIGKILL after the task's grace):
        // return once the task has stopped or is gone.
        if let Some(task) = task {
            let deadline = Instant::now() + grace + Duration::from_secs(15);
            while Instant::now() < deadline {
                match engine_get::<SwarmTask>(&self.endpoint, &format!("/tasks/{task}")).await {
                    Ok(t)
                        if matches!(
                            t.status.state.as_str(),
                            "shutdown" | "complete" | "failed" | "rejected" | "orphaned" | "remove"
                        ) =>
                    {
                        break
                    }
                    Err(EngineError::NotFound) => break,
                    Err(e) => {
                        warn!(%instance, "following its task's stop: {e}");
                        break;
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
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

    /// Take over the services an earlier agent left: those whose task runs at once; those
    /// whose task is starting (Swarm moving it) for up to [`ADOPT_WAIT`] all together; the
    /// rest, and those no service of the config claims, are removed.
    async fn adopt(&self) -> Vec<Adopted> {
        struct Candidate {
            name: String,
            id: String,
            instance: InstanceRef,
            run: RunSpec,
            network: String,
            port: u16,
        }
        let mut candidates: Vec<Candidate> = Vec::new();
        for s in self.own_services().await {
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
            let why = match (self.placements.get(&service), seq, run) {
                (Some(placement), Some(seq), Some(run)) => {
                    let instance = InstanceRef { service, seq };
                    if candidates.iter().any(|c| c.instance == instance) {
                        format!("a second service for instance {instance}")
                    } else {
                        candidates.push(Candidate {
                            name,
                            id,
                            instance,
                            run,
                            network: placement.network.clone(),
                            port: placement.port,
                        });
                        continue;
                    }
                }
                (None, _, _) => format!("no service {service:?} in the config"),
                _ => format!("labels {LABEL_SEQ} or {LABEL_SPEC} unreadable"),
            };
            info!(service = %name, "removing this Swarm service: {why}");
            if let Err(e) = self.remove_service(&name).await {
                warn!("{e}");
            }
        }
        let mut adopted = Vec::new();
        let deadline = Instant::now() + ADOPT_WAIT;
        while !candidates.is_empty() {
            let ids: Vec<String> = candidates.iter().map(|c| c.id.clone()).collect();
            let tasks = match self.tasks_of(&ids).await {
                Ok((tasks, _)) => tasks,
                Err(e) => {
                    warn!("listing tasks for adoption: {e}");
                    Vec::new()
                }
            };
            candidates.retain(|c| {
                let live = tasks
                    .iter()
                    .filter(|t| t.service_id == c.id && t.running())
                    .find_map(|t| Some((t.id.clone(), t.address_on(&c.network)?)));
                let Some((task, ip)) = live else {
                    return true;
                };
                let addr = SocketAddr::new(ip, c.port);
                info!(instance = %c.instance, %addr, "adopted a running Swarm service");
                self.lock().insert(
                    c.instance.clone(),
                    Managed {
                        service_name: c.name.clone(),
                        service_id: c.id.clone(),
                        network: c.network.clone(),
                        port: c.port,
                        spec: InstanceSpec {
                            instance: c.instance.clone(),
                            generation: 0,
                            run: Arc::new(c.run.clone()),
                        },
                        task: Some(task),
                        addr,
                        stopping: false,
                        recreating: false,
                        dead: HashSet::new(),
                    },
                );
                adopted.push(Adopted {
                    instance: c.instance.clone(),
                    addr,
                    run: c.run.clone(),
                });
                false
            });
            if candidates.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for c in candidates {
            warn!(instance = %c.instance, service = %c.name, "no running task within {ADOPT_WAIT:?}: removing it (the core starts a new instance)");
            if let Err(e) = self.remove_service(&c.name).await {
                warn!("{e}");
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
