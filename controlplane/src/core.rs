//! The core: one task that owns every service's state. Admin requests, runtime events and health
//! results arrive as messages; after each batch it reconciles every service, carries out the
//! actions (starts and stops run in tasks of their own and report back, so a slow runtime never
//! stalls the loop), and publishes a table if the healthy set changed.
//!
//! Bursts coalesce here first (a batch of events gives one table) and again in the `watch`
//! channel the subscribers read.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, error, info, warn};

use crate::api::{
    AutoscaleDecision, AutoscaleStatus, DeployRequest, DeployStatus, InstanceStatus, ServiceStatus,
    Status,
};
use crate::autoscale::Autoscaler;
use crate::health;
use crate::metrics::Metrics;
use crate::outlier::OutlierTracker;
use crate::publish::{self, Publisher};
use crate::reconcile::{Action, Outcome, Phase, Refusal, ServiceState};
use crate::runtime::{InstanceSpec, Runtime, RuntimeEvent};
use crate::scrape::Sample;
use crate::spec::{InstanceRef, RunSpec, RuntimeKind, ServiceSpec};
use crate::state::{Desired, SavedService};

/// How long the first table waits for every service to have a healthy instance. Until then a
/// restarted agent would publish a table missing the services that are still rising.
const FIRST_TABLE_WAIT: Duration = Duration::from_secs(10);
/// Reconcile at least this often, whatever happens.
const TICK: Duration = Duration::from_secs(1);

/// Requests from the admin API.
pub enum Command {
    Status(oneshot::Sender<Status>),
    Scale {
        service: String,
        replicas: u32,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Deploy {
        service: String,
        request: DeployRequest,
        reply: oneshot::Sender<Result<u64, ApiError>>,
    },
    Drain {
        service: String,
        seq: u64,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// The ACME challenges to answer from now on (token → key authorization), replacing the
    /// last set; the reply is the version of the table that carries them.
    Challenges {
        challenges: BTreeMap<String, String>,
        reply: oneshot::Sender<Option<u64>>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no service {0:?}")]
    NoService(String),
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Invalid(String),
}

/// What the core's own tasks report back.
enum Event {
    Started {
        instance: InstanceRef,
        result: Result<SocketAddr, String>,
    },
    Stopped {
        instance: InstanceRef,
    },
    Probe {
        instance: InstanceRef,
        result: Result<(), String>,
    },
}

pub struct Core {
    services: BTreeMap<String, ServiceState>,
    runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    probes: HashMap<InstanceRef, AbortHandle>,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    desired_file: Option<std::path::PathBuf>,
    /// Where else the desired state is kept (the swarm runtime's state service).
    desired_keeper: Option<watch::Sender<Desired>>,
    saved: Desired,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: Option<mpsc::UnboundedReceiver<Event>>,
    started_at: Instant,
    /// Set once the first table went out.
    published: bool,
    autoscalers: HashMap<String, Autoscaler>,
    outliers: OutlierTracker,
    /// The last outlier replaced per service: (instance, reason, when), for status.
    replaced: HashMap<String, (String, String, Instant)>,
    /// Open ACME challenges, carried in every table while they are.
    challenges: BTreeMap<String, String>,
}

impl Core {
    pub fn new(
        specs: Vec<ServiceSpec>,
        runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
        publisher: Publisher,
        metrics: Arc<Metrics>,
    ) -> Core {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let autoscalers = specs
            .iter()
            .filter_map(|s| Some((s.name.clone(), Autoscaler::new(s.autoscale.clone()?))))
            .collect();
        Core {
            autoscalers,
            outliers: OutlierTracker::default(),
            replaced: HashMap::new(),
            challenges: BTreeMap::new(),
            services: specs
                .into_iter()
                .map(|s| (s.name.clone(), ServiceState::new(s)))
                .collect(),
            runtimes,
            probes: HashMap::new(),
            publisher,
            metrics,
            events_tx,
            events_rx: Some(events_rx),
            desired_file: None,
            desired_keeper: None,
            saved: Desired::default(),
            started_at: Instant::now(),
            published: false,
        }
    }

    /// Keep scale and deploy results in `file` and start from what it holds, for each service
    /// whose config has not changed since.
    pub fn with_saved_state(mut self, file: std::path::PathBuf) -> Core {
        let saved = Desired::load(&file);
        self.restore(&saved);
        self.saved = saved;
        self.desired_file = Some(file);
        self
    }

    /// Also keep the desired state through `keeper`, and start from `kept` when there is one:
    /// kept in Swarm, it outlives the state dir of an agent that moved to another node.
    pub fn with_kept_state(
        mut self,
        kept: Option<Desired>,
        keeper: watch::Sender<Desired>,
    ) -> Core {
        if let Some(kept) = kept {
            self.restore(&kept);
            self.saved = kept;
        }
        self.desired_keeper = Some(keeper);
        self
    }

    /// Start each service from `saved` where its config has not changed since.
    fn restore(&mut self, saved: &Desired) {
        for (name, entry) in &saved.services {
            let Some(s) = self.services.get_mut(name) else {
                continue;
            };
            if entry.config_replicas == s.spec.replicas && entry.config_run == s.spec.run {
                info!(
                    service = name,
                    replicas = entry.replicas,
                    "keeping the scale and version set through the API"
                );
                s.restore(entry.replicas, entry.run.clone());
            } else {
                info!(
                    service = name,
                    "the config changed since the last scale or deploy: the config wins"
                );
            }
        }
    }

    fn save_desired(&mut self) {
        if self.desired_file.is_none() && self.desired_keeper.is_none() {
            return;
        }
        let now = Desired {
            services: self
                .services
                .values()
                .filter(|s| s.spec.runtime.starts_instances())
                .filter_map(|s| {
                    let (replicas, run) = s.desired();
                    (replicas != s.spec.replicas || run != s.spec.run).then(|| {
                        (
                            s.name().to_owned(),
                            SavedService {
                                config_replicas: s.spec.replicas,
                                config_run: s.spec.run.clone(),
                                replicas,
                                run,
                            },
                        )
                    })
                })
                .collect(),
        };
        if now != self.saved {
            if let Some(keeper) = &self.desired_keeper {
                keeper.send_if_modified(|kept| {
                    let changed = *kept != now;
                    if changed {
                        kept.clone_from(&now);
                    }
                    changed
                });
            }
            match &self.desired_file {
                Some(file) => match now.save(file) {
                    Ok(()) => self.saved = now,
                    Err(e) => error!(file = %file.display(), "cannot save the desired state: {e}"),
                },
                None => self.saved = now,
            }
        }
    }

    /// Run until `shutdown` flips, then stop every instance and return. `samples` are the
    /// data planes' load, read by `scrape`.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut samples: mpsc::Receiver<Sample>,
        mut runtime_events: mpsc::UnboundedReceiver<RuntimeEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(mut events_rx) = self.events_rx.take() else {
            return;
        };
        self.adopt().await;
        loop {
            self.step();
            let wake = self
                .services
                .values()
                .filter_map(|s| s.next_deadline(Instant::now()))
                .min()
                .map_or(TICK, |t| {
                    t.saturating_duration_since(Instant::now()).min(TICK)
                });
            tokio::select! {
                Some(cmd) = commands.recv() => self.command(cmd).await,
                Some(sample) = samples.recv() => {
                    let now = Instant::now();
                    self.autoscale(&sample.inflight, sample.complete, now);
                    self.replace_outliers(sample.ejected, now);
                }
                Some(ev) = events_rx.recv() => {
                    self.event(ev);
                    while let Ok(ev) = events_rx.try_recv() {
                        self.event(ev);
                    }
                }
                Some(ev) = runtime_events.recv() => self.runtime_event(ev),
                _ = tokio::time::sleep(wake) => {}
                _ = shutdown.changed() => break,
            }
        }
        self.stop_everything().await;
    }

    /// Reconcile, act, publish.
    fn step(&mut self) {
        let now = Instant::now();
        let mut actions = Vec::new();
        for s in self.services.values_mut() {
            actions.extend(s.reconcile(now));
            let finished: Vec<Outcome> = s.finished_deploys.drain(..).collect();
            for outcome in finished {
                let (label, detail) = match &outcome {
                    Outcome::Succeeded => ("succeeded", String::new()),
                    Outcome::Failed { reason } => ("failed", reason.clone()),
                    Outcome::InProgress => continue,
                };
                self.metrics.deploy(s.name(), label);
                match label {
                    "succeeded" => info!(
                        service = s.name(),
                        generation = s.generation,
                        "deploy succeeded"
                    ),
                    _ => warn!(
                        service = s.name(),
                        "deploy failed, generation {} serves: {detail}", s.generation
                    ),
                }
            }
        }
        for a in actions {
            self.act(a);
        }
        self.publish();
        self.save_desired();
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Start {
                instance,
                generation,
                run,
            } => {
                let Some(runtime) = self.runtime_of(&instance.service) else {
                    return;
                };
                debug!(%instance, generation, "starting");
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    let spec = InstanceSpec {
                        instance: instance.clone(),
                        generation,
                        run,
                    };
                    let result = runtime.start(spec).await.map_err(|e| e.to_string());
                    let _ = tx.send(Event::Started { instance, result });
                });
            }
            Action::Stop { instance, grace } => {
                if let Some(p) = self.probes.remove(&instance) {
                    p.abort();
                }
                let Some(runtime) = self.runtime_of(&instance.service) else {
                    return;
                };
                info!(%instance, "stopping");
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = runtime.stop(&instance, grace).await {
                        warn!(%instance, "stop: {e}");
                    }
                    let _ = tx.send(Event::Stopped { instance });
                });
            }
        }
    }

    fn runtime_of(&self, service: &str) -> Option<Arc<dyn Runtime>> {
        let kind = self.services.get(service)?.spec.runtime;
        self.runtimes.get(&kind).cloned()
    }

    fn publish(&mut self) {
        let ready = self.published
            || !self.challenges.is_empty()
            || self.started_at.elapsed() >= FIRST_TABLE_WAIT
            || self
                .services
                .values()
                .all(|s| s.replicas == 0 || s.instances.values().any(|i| i.in_table()));
        if !ready {
            return;
        }
        let decided = Instant::now();
        let states: Vec<&ServiceState> = self.services.values().collect();
        let mut table = publish::build(&states, decided);
        table.acme_challenges = self.challenges.clone();
        match self.publisher.offer(table) {
            Ok(Some(version)) => {
                self.published = true;
                self.metrics.tables_published.inc();
                let summary: Vec<String> = self
                    .services
                    .values()
                    .map(|s| format!("{}={}", s.name(), s.backends().len()))
                    .collect();
                // How long building, checking and saving took before the table went out:
                // the agent's share of the time from a decision to the data planes
                // (loadtest/fanout.py reads it).
                let took_us = decided.elapsed().as_micros() as u64;
                info!(version, backends = %summary.join(" "), took_us, "table published");
            }
            Ok(None) => {}
            Err(e) => error!("not publishing: {e}"),
        }
    }

    fn event(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Started { instance, result } => {
                let Some(s) = self.services.get_mut(&instance.service) else {
                    return;
                };
                match result {
                    Ok(addr) => {
                        let still_wanted = s
                            .instances
                            .get(&instance.seq)
                            .is_some_and(|i| i.phase == Phase::Starting);
                        s.started(instance.seq, addr);
                        if still_wanted {
                            self.spawn_probe(instance, addr);
                        } else {
                            // Given up on (a failed deploy, a scale-down) while the runtime was
                            // still starting it: the stop found nothing then, so stop it now.
                            let grace = s.spec.stop_grace;
                            if let Some(runtime) = self.runtime_of(&instance.service) {
                                info!(%instance, "started after it was given up; stopping");
                                tokio::spawn(async move {
                                    let _ = runtime.stop(&instance, grace).await;
                                });
                            }
                        }
                    }
                    Err(e) => {
                        warn!(%instance, "could not start: {e}");
                        s.start_failed(instance.seq, &e, now);
                    }
                }
            }
            Event::Stopped { instance } => {
                if let Some(p) = self.probes.remove(&instance) {
                    p.abort();
                }
                if let Some(s) = self.services.get_mut(&instance.service) {
                    s.stopped(instance.seq);
                }
            }
            Event::Probe { instance, result } => {
                let Some(s) = self.services.get_mut(&instance.service) else {
                    return;
                };
                self.metrics.check(&instance.service, result.is_ok());
                let ok = result.is_ok();
                if s.probed(instance.seq, ok, result.err()) {
                    if ok {
                        info!(%instance, "healthy: joins the table");
                    } else {
                        let why = s
                            .instances
                            .get(&instance.seq)
                            .and_then(|i| i.last_error.clone());
                        warn!(%instance, "unhealthy: leaves the table ({})", why.unwrap_or_default());
                    }
                }
            }
        }
    }

    fn runtime_event(&mut self, ev: RuntimeEvent) {
        match ev {
            RuntimeEvent::Exited { instance, detail } => {
                self.metrics.restart(&instance.service);
                if let Some(s) = self.services.get_mut(&instance.service) {
                    if s.exited(instance.seq, detail) {
                        warn!(%instance, "exited: out of the table until it is healthy again");
                    }
                }
            }
            RuntimeEvent::Restarted { instance } => debug!(%instance, "restarted"),
            RuntimeEvent::Moved { instance, addr } => {
                let Some(s) = self.services.get_mut(&instance.service) else {
                    return;
                };
                let serving = s
                    .instances
                    .get(&instance.seq)
                    .is_some_and(|i| matches!(i.phase, Phase::Running | Phase::Starting));
                if serving {
                    s.moved(instance.seq, addr);
                    self.spawn_probe(instance, addr);
                }
            }
            RuntimeEvent::Discovered {
                service,
                container,
                addr,
                weight,
                priority,
            } => {
                let Some(s) = self.services.get_mut(&service) else {
                    warn!(
                        service,
                        container,
                        "a container is labelled for a service the config does not have; ignored"
                    );
                    return;
                };
                let weight = weight.clamp(
                    rusty_shared::limits::WEIGHT_MIN,
                    rusty_shared::limits::WEIGHT_MAX,
                );
                let priority = priority.min(rusty_shared::limits::PRIORITY_MAX);
                let seq = s.discovered(container, addr, weight, priority, Instant::now());
                let instance = InstanceRef { service, seq };
                self.spawn_probe(instance, addr);
            }
            RuntimeEvent::Vanished { service, container } => {
                if let Some(seq) = self
                    .services
                    .get_mut(&service)
                    .and_then(|s| s.vanished(&container))
                {
                    info!(
                        service,
                        container, "discovered container gone: out of the table"
                    );
                    if let Some(p) = self.probes.remove(&InstanceRef { service, seq }) {
                        p.abort();
                    }
                }
            }
        }
    }

    fn spawn_probe(&mut self, instance: InstanceRef, addr: SocketAddr) {
        let Some(s) = self.services.get(&instance.service) else {
            return;
        };
        let spec = s.spec.health.clone();
        let tx = self.events_tx.clone();
        let key = instance.clone();
        let task = tokio::spawn(async move {
            // Checked when the config was read; a failure here fails every check, loudly.
            let grpc = matches!(spec.probe, crate::spec::Probe::Grpc { .. });
            let tls = match spec
                .tls
                .as_ref()
                .map(|t| health::TlsProbe::new(t, grpc))
                .transpose()
            {
                Ok(t) => t,
                Err(e) => {
                    error!(%instance, "health checks cannot speak TLS: {e}");
                    return;
                }
            };
            let mut tick = tokio::time::interval(spec.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let result = health::probe(addr, &spec.probe, tls.as_ref(), spec.timeout).await;
                if tx
                    .send(Event::Probe {
                        instance: instance.clone(),
                        result,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        if let Some(old) = self.probes.insert(key, task.abort_handle()) {
            old.abort();
        }
    }

    async fn command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Status(reply) => {
                let status = self.status().await;
                let _ = reply.send(status);
            }
            Command::Scale {
                service,
                replicas,
                reply,
            } => {
                let scaler = self.autoscalers.get_mut(&service);
                let r = match (self.services.get_mut(&service), scaler) {
                    (None, _) => Err(ApiError::NoService(service)),
                    (Some(_), Some(a))
                        if !(a.spec.min_replicas..=a.spec.max_replicas).contains(&replicas) =>
                    {
                        Err(ApiError::Invalid(format!(
                            "{service} is autoscaled between {} and {} instances: scale within them, or change services.{service}.autoscale",
                            a.spec.min_replicas, a.spec.max_replicas
                        )))
                    }
                    (Some(s), scaler) => {
                        let from = s.replicas;
                        s.scale(replicas).map_err(ApiError::from).inspect(|_| {
                            info!(service = s.name(), replicas, "scale requested");
                            if let Some(a) = scaler {
                                a.manual(from, replicas, now);
                            }
                        })
                    }
                };
                let _ = reply.send(r);
            }
            Command::Deploy {
                service,
                request,
                reply,
            } => {
                let r = match self.services.get_mut(&service) {
                    None => Err(ApiError::NoService(service)),
                    Some(s) => match merge_run(&s.spec, s.current_run(), request) {
                        Err(e) => Err(e),
                        Ok(run) => {
                            let shown = format!("{} {}", run.command, run.args.join(" "));
                            s.deploy(run, now).map_err(ApiError::from).inspect(|g| {
                                info!(service = s.name(), generation = g, command = %shown, "deploy started");
                            })
                        }
                    },
                };
                let _ = reply.send(r);
            }
            Command::Drain {
                service,
                seq,
                reply,
            } => {
                let r = match self.services.get_mut(&service) {
                    None => Err(ApiError::NoService(service)),
                    Some(s) => s.drain(seq, now).map_err(ApiError::from),
                };
                let _ = reply.send(r);
            }
            Command::Challenges { challenges, reply } => {
                self.challenges = challenges;
                self.publish();
                let _ = reply.send(self.publisher.current().map(|p| p.version));
            }
        }
    }

    /// Apply the autoscalers to one load sample. A service the sample does not mention (no data
    /// plane has it in its table yet) is left alone.
    fn autoscale(&mut self, load: &HashMap<String, f64>, complete: bool, now: Instant) {
        for (name, scaler) in &mut self.autoscalers {
            let (Some(s), Some(&inflight)) = (self.services.get_mut(name), load.get(name)) else {
                continue;
            };
            // A rolling deploy sizes its own time limit by the replica count: leave it be.
            if s.deploy_in_progress() {
                continue;
            }
            let serving = s.serving();
            let settled = serving >= s.replicas as usize;
            let Some(d) = scaler.observe(inflight, s.replicas, settled, complete, now) else {
                continue;
            };
            match s.scale(d.to) {
                Ok(()) => {
                    let direction = if d.to > d.from { "out" } else { "in" };
                    info!(service = %name, from = d.from, to = d.to, reason = %d.reason,
                        "autoscale: scaling {direction}");
                    self.metrics.autoscale(name, direction);
                }
                Err(e) => warn!(service = %name, to = d.to, error = %e, "autoscale: cannot scale"),
            }
        }
    }

    /// Replace the instances the data planes keep ejecting (see `outlier`).
    fn replace_outliers(
        &mut self,
        ejected: std::collections::HashSet<(String, String)>,
        now: Instant,
    ) {
        let services = &self.services;
        let found = self.outliers.observe(ejected, now, |svc| {
            services.get(svc).and_then(|s| s.spec.outliers)
        });
        let mut replacing: std::collections::HashSet<String> = std::collections::HashSet::new();
        for (svc, id) in found {
            let Some(s) = self.services.get_mut(&svc) else {
                continue;
            };
            let Some(spec) = s.spec.outliers else {
                continue;
            };
            // Capacity first: one replacement per service at a time, only while every wanted
            // instance serves, and never the last one serving (a data plane whose own fault
            // ejects everything must not empty the table).
            let serving = s.serving();
            if replacing.contains(&svc) || serving < s.replicas as usize || serving <= 1 {
                warn!(service = %svc, instance = %id, serving,
                    "outlier not replaced now: capacity is short already");
                continue;
            }
            // Backend ids are `service-seq`.
            let seq = id
                .strip_prefix(&format!("{svc}-"))
                .and_then(|n| n.parse::<u64>().ok());
            let Some(seq) = seq else { continue };
            let reason = format!(
                "ejected by the data planes {} times within {:?}",
                spec.ejections, spec.window
            );
            match s.drain(seq, now) {
                Ok(()) => {
                    replacing.insert(svc.clone());
                    warn!(service = %svc, instance = %id, %reason, "replacing an outlier");
                    self.metrics.outlier(&svc);
                    self.replaced.insert(svc.clone(), (id, reason, now));
                }
                Err(e) => {
                    debug!(service = %svc, instance = %id, error = %e, "outlier not replaced")
                }
            }
        }
    }

    async fn status(&self) -> Status {
        let mut pids = HashMap::new();
        for r in self.runtimes.values() {
            for info in r.list().await {
                if let Some(pid) = info.pid {
                    pids.insert(info.id, pid);
                }
            }
        }
        let now = Instant::now();
        Status {
            acme: Vec::new(),
            table_version: self.publisher.current().map(|p| p.version),
            subscribers: self.metrics.subscribers.get().max(0) as usize,
            services: self
                .services
                .values()
                .map(|s| {
                    let run = s.current_run();
                    ServiceStatus {
                        name: s.name().to_owned(),
                        runtime: s.spec.runtime.name().to_owned(),
                        generation: s.generation,
                        replicas: s.replicas,
                        live: s.instances.values().filter(|i| i.live()).count(),
                        healthy: s.serving(),
                        command: run.command.clone(),
                        image: run.image.clone(),
                        args: run.args.clone(),
                        deploy: s.deploy.as_ref().map(|d| {
                            let (state, reason) = match &d.outcome {
                                Outcome::InProgress => ("in_progress", None),
                                Outcome::Succeeded => ("succeeded", None),
                                Outcome::Failed { reason } => ("failed", Some(reason.clone())),
                            };
                            DeployStatus {
                                generation: d.generation,
                                from: d.from,
                                state: state.to_owned(),
                                reason,
                                elapsed_ms: d
                                    .finished
                                    .unwrap_or(now)
                                    .duration_since(d.started)
                                    .as_millis() as u64,
                            }
                        }),
                        outlier_replaced: self.replaced.get(s.name()).map(|(id, reason, at)| {
                            format!(
                                "{id} {:.1}s ago: {reason}",
                                now.saturating_duration_since(*at).as_secs_f64()
                            )
                        }),
                        autoscale: self.autoscalers.get(s.name()).map(|a| AutoscaleStatus {
                            min_replicas: a.spec.min_replicas,
                            max_replicas: a.spec.max_replicas,
                            target_inflight: a.spec.target_inflight,
                            load: a.load,
                            last_decision: a.last.as_ref().map(|d| AutoscaleDecision {
                                from: d.from,
                                to: d.to,
                                reason: d.reason.clone(),
                                ago_ms: now.saturating_duration_since(d.at).as_millis() as u64,
                            }),
                        }),
                        instances: s
                            .instances
                            .values()
                            .map(|i| {
                                let id = format!("{}-{}", s.name(), i.seq);
                                InstanceStatus {
                                    pid: pids.get(&id).copied(),
                                    id,
                                    generation: i.generation,
                                    addr: i.addr.map(|a| a.to_string()),
                                    // Running but never healthy yet is still starting, to
                                    // an operator: it has not served a request.
                                    phase: match i.phase {
                                        Phase::Starting => "starting",
                                        Phase::Running if !i.health.ever_up() => "starting",
                                        Phase::Running => "running",
                                        Phase::Draining => "draining",
                                        Phase::Stopping => "stopping",
                                    }
                                    .to_owned(),
                                    healthy: i.health.is_up(),
                                    in_table: i.in_table(),
                                    restarts: i.restarts,
                                    managed: i.managed,
                                    last_error: i.last_error.clone(),
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    /// Take over what the runtimes report still running from an earlier agent.
    async fn adopt(&mut self) {
        let now = Instant::now();
        for runtime in self.runtimes.values().cloned().collect::<Vec<_>>() {
            for a in runtime.adopt().await {
                let Some(s) = self.services.get_mut(&a.instance.service) else {
                    // Its service left the config while the agent was down.
                    info!(instance = %a.instance, "adopted, but no service claims it: stopping it");
                    let runtime = runtime.clone();
                    tokio::spawn(async move {
                        let _ = runtime.stop(&a.instance, Duration::from_secs(10)).await;
                    });
                    continue;
                };
                s.adopt(a.instance.seq, a.addr, a.run, now);
                self.spawn_probe(a.instance, a.addr);
            }
        }
    }

    /// Shutdown: every instance gets its stop (SIGTERM, grace, SIGKILL), all at once.
    async fn stop_everything(mut self) {
        for (_, p) in self.probes.drain() {
            p.abort();
        }
        let mut stops = JoinSet::new();
        for s in self.services.values() {
            let Some(runtime) = self.runtimes.get(&s.spec.runtime).cloned() else {
                continue;
            };
            if runtime.keeps_instances_on_exit() {
                info!(
                    service = s.name(),
                    "leaving its containers running for the next agent"
                );
                continue;
            }
            for i in s.instances.values().filter(|i| i.managed) {
                let instance = InstanceRef {
                    service: s.name().to_owned(),
                    seq: i.seq,
                };
                let (runtime, grace) = (runtime.clone(), s.spec.stop_grace);
                stops.spawn(async move {
                    let _ = runtime.stop(&instance, grace).await;
                });
            }
        }
        info!("stopping {} instances", stops.len());
        while stops.join_next().await.is_some() {}
        self.publisher.close();
    }
}

/// A deploy request over the current run spec: what it gives replaces, what it omits stays.
fn merge_run(
    spec: &ServiceSpec,
    current: &RunSpec,
    req: DeployRequest,
) -> Result<RunSpec, ApiError> {
    let mut run = current.clone();
    match (spec.runtime, &req.command, &req.image) {
        (kind, Some(_), _) if kind.runs_images() => {
            return Err(ApiError::Invalid(format!(
                "command: a {} service runs its image; deploy a new image (args replace its CMD)",
                kind.name()
            )))
        }
        (RuntimeKind::Process, _, Some(_)) => {
            return Err(ApiError::Invalid(
                "image: only for docker and swarm services; deploy a command".into(),
            ))
        }
        _ => {}
    }
    if let Some(i) = req.image {
        if i.trim().is_empty() {
            return Err(ApiError::Invalid("image: must not be empty".into()));
        }
        run.image = i;
    }
    if let Some(c) = req.command {
        if c.trim().is_empty() {
            return Err(ApiError::Invalid("command: must not be empty".into()));
        }
        run.command = c;
    }
    if let Some(a) = req.args {
        run.args = a;
    }
    if let Some(e) = req.env {
        run.env = e;
    }
    if let Some(w) = req.weight {
        let max = crate::spec::max_weight(!spec.slow_start.is_zero());
        if !(rusty_shared::limits::WEIGHT_MIN..=max).contains(&w) {
            let why = if max < rusty_shared::limits::WEIGHT_MAX {
                " (this service has slow_start, which scales weights by 10)"
            } else {
                ""
            };
            return Err(ApiError::Invalid(format!(
                "weight: {w} is out of range 1..={max}{why}"
            )));
        }
        run.weight = w;
    }
    if let Some(p) = req.priority {
        if p > rusty_shared::limits::PRIORITY_MAX {
            return Err(ApiError::Invalid(format!(
                "priority: {p} is out of range 0..=127"
            )));
        }
        run.priority = p;
    }
    Ok(run)
}
