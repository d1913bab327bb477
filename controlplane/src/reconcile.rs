//! The desired-vs-actual logic of one service, with no I/O: events come in as method calls,
//! decisions go out as [`Action`]s for the core to carry out. Time is passed in, so tests drive
//! it with a fake clock.
//!
//! One rule set covers scaling, replacement and rolling deploys. A service has a current
//! *generation* (what it should run); an instance of any other generation is *outdated*.
//! - Start current instances until there are `replicas`, but during a replacement keep live
//!   instances (current + outdated) at most `replicas + surge`.
//! - Take outdated instances out of the table only while `replicas` others serve: the table never
//!   shrinks below the desired capacity because of a deploy.
//! - An instance leaves the table first and is stopped `drain` later; one that is not in the
//!   table (never healthy, or down) is stopped at once.
//! - A deploy fails when a new instance is not healthy `healthy_timeout` after it started, or
//!   cannot be started: the previous generation becomes current again, so the same rules put the
//!   old version back to full strength and retire the new one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::health::Tracker;
use crate::spec::{InstanceRef, RunSpec, RuntimeKind, ServiceSpec, MAX_REPLICAS, SLOW_START_STEPS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The runtime was asked to start it and has not answered yet.
    Starting,
    /// Running; in the table while healthy.
    Running,
    /// Out of the table; stopped when the drain time is over.
    Draining,
    /// The runtime was asked to stop it.
    Stopping,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub seq: u64,
    pub generation: u64,
    pub run: Arc<RunSpec>,
    pub addr: Option<SocketAddr>,
    pub created: Instant,
    pub phase: Phase,
    pub drain_until: Option<Instant>,
    pub health: Tracker,
    /// Times the runtime restarted it after it exited.
    pub restarts: u32,
    /// The last thing that went wrong with it (exit status, failed check), for `status`.
    pub last_error: Option<String>,
    /// False for containers found by label discovery: they serve while healthy, but the agent
    /// never counts, starts, drains or stops them.
    pub managed: bool,
    /// Discovered only: the container id.
    pub external: Option<String>,
    /// In the table at the last reconcile (to see an instance enter or return).
    pub was_in_table: bool,
    /// When it last entered the table, while slow start still ramps its weight.
    pub warm_from: Option<Instant>,
}

impl Instance {
    /// Should the data planes send it traffic?
    pub fn in_table(&self) -> bool {
        self.phase == Phase::Running && self.health.is_up()
    }

    /// Managed and not leaving: counts towards `replicas`.
    pub fn live(&self) -> bool {
        self.managed && matches!(self.phase, Phase::Starting | Phase::Running)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    InProgress,
    Succeeded,
    Failed { reason: String },
}

#[derive(Debug, Clone)]
pub struct Deploy {
    pub generation: u64,
    pub from: u64,
    pub started: Instant,
    pub finished: Option<Instant>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start {
        instance: InstanceRef,
        generation: u64,
        run: Arc<RunSpec>,
    },
    Stop {
        instance: InstanceRef,
        grace: Duration,
    },
}

/// A request the service refuses; the admin API turns it into a 4xx.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("service {0:?} uses the static runtime: change its addresses in the config instead")]
    Static(String),
    #[error("replicas {0} is over the limit of {MAX_REPLICAS}")]
    TooMany(u32),
    #[error("a deploy of generation {0} is in progress; wait for it to finish")]
    DeployInProgress(u64),
    #[error("no instance {0}")]
    NoInstance(String),
    #[error("instance {0} is already leaving")]
    AlreadyLeaving(String),
    #[error("instance {0} was discovered, not started by the agent: stop its container instead")]
    NotManaged(String),
}

/// Delay before starting instances again after the runtime failed to start one.
const START_BACKOFF_MIN: Duration = Duration::from_millis(500);
const START_BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ServiceState {
    pub spec: ServiceSpec,
    pub generation: u64,
    pub replicas: u32,
    pub instances: BTreeMap<u64, Instance>,
    pub deploy: Option<Deploy>,
    /// Run specs of the generations still referenced (current, outdated, revert target).
    runs: BTreeMap<u64, Arc<RunSpec>>,
    next_seq: u64,
    next_generation: u64,
    start_backoff: Duration,
    no_start_before: Option<Instant>,
    /// Events worth a metric, drained by the core.
    pub finished_deploys: Vec<Outcome>,
}

impl ServiceState {
    pub fn new(spec: ServiceSpec) -> ServiceState {
        let mut runs = BTreeMap::new();
        runs.insert(1, Arc::new(spec.run.clone()));
        ServiceState {
            replicas: spec.replicas,
            spec,
            generation: 1,
            instances: BTreeMap::new(),
            deploy: None,
            runs,
            next_seq: 1,
            next_generation: 2,
            start_backoff: START_BACKOFF_MIN,
            no_start_before: None,
            finished_deploys: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Start from desired state saved by an earlier agent (scale and deploy survive restarts).
    pub fn restore(&mut self, replicas: u32, run: RunSpec) {
        self.replicas = replicas.min(MAX_REPLICAS);
        self.runs.insert(self.generation, Arc::new(run));
    }

    /// What to save: the replicas and the run spec that serves (a deploy in progress saves the
    /// version it started from, which is what a restarted agent should keep).
    pub fn desired(&self) -> (u32, RunSpec) {
        let generation = match &self.deploy {
            Some(d) if d.outcome == Outcome::InProgress => d.from,
            _ => self.generation,
        };
        (self.replicas, self.runs[&generation].as_ref().clone())
    }

    pub fn current_run(&self) -> &Arc<RunSpec> {
        &self.runs[&self.generation]
    }

    fn instance_ref(&self, seq: u64) -> InstanceRef {
        InstanceRef {
            service: self.spec.name.clone(),
            seq,
        }
    }

    // ----- requests -------------------------------------------------------------------------

    /// Instances in the table now.
    pub fn serving(&self) -> usize {
        self.instances.values().filter(|i| i.in_table()).count()
    }

    /// A rolling deploy has not finished.
    pub fn deploy_in_progress(&self) -> bool {
        self.deploy
            .as_ref()
            .is_some_and(|d| d.outcome == Outcome::InProgress)
    }

    pub fn scale(&mut self, replicas: u32) -> Result<(), Refusal> {
        if self.spec.runtime == RuntimeKind::Static {
            return Err(Refusal::Static(self.spec.name.clone()));
        }
        if replicas > MAX_REPLICAS {
            return Err(Refusal::TooMany(replicas));
        }
        self.replicas = replicas;
        Ok(())
    }

    /// Start rolling to `run`; returns the new generation.
    pub fn deploy(&mut self, run: RunSpec, now: Instant) -> Result<u64, Refusal> {
        if self.spec.runtime == RuntimeKind::Static {
            return Err(Refusal::Static(self.spec.name.clone()));
        }
        if let Some(d) = &self.deploy {
            if d.outcome == Outcome::InProgress {
                return Err(Refusal::DeployInProgress(d.generation));
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.runs.insert(generation, Arc::new(run));
        self.deploy = Some(Deploy {
            generation,
            from: self.generation,
            started: now,
            finished: None,
            outcome: Outcome::InProgress,
        });
        self.generation = generation;
        self.start_backoff = START_BACKOFF_MIN;
        self.no_start_before = None;
        Ok(generation)
    }

    /// Take one instance out of the table and stop it after the drain time; the usual rules start
    /// a replacement.
    pub fn drain(&mut self, seq: u64, now: Instant) -> Result<(), Refusal> {
        let name = self.instance_ref(seq).to_string();
        let drain = self.spec.rollout.drain;
        let i = self
            .instances
            .get_mut(&seq)
            .ok_or(Refusal::NoInstance(name.clone()))?;
        if !i.managed {
            return Err(Refusal::NotManaged(name));
        }
        if !i.live() {
            return Err(Refusal::AlreadyLeaving(name));
        }
        i.phase = Phase::Draining;
        i.drain_until = Some(now + drain);
        Ok(())
    }

    // ----- events ---------------------------------------------------------------------------

    pub fn started(&mut self, seq: u64, addr: SocketAddr) {
        if let Some(i) = self.instances.get_mut(&seq) {
            i.addr = Some(addr);
            if i.phase == Phase::Starting {
                i.phase = Phase::Running;
            }
        }
        self.start_backoff = START_BACKOFF_MIN;
    }

    /// The runtime could not start it: forget it, back off, and fail a deploy it belonged to.
    pub fn start_failed(&mut self, seq: u64, error: &str, now: Instant) {
        let Some(i) = self.instances.remove(&seq) else {
            return;
        };
        self.no_start_before = Some(now + self.start_backoff);
        self.start_backoff = (self.start_backoff * 2).min(START_BACKOFF_MAX);
        if self.deploying(i.generation) {
            let reason = format!("{} could not be started: {error}", self.instance_ref(seq));
            self.fail_deploy(reason, now);
        }
    }

    /// One health check result; true when the instance moved in or out of the table.
    pub fn probed(&mut self, seq: u64, ok: bool, error: Option<String>) -> bool {
        let (rise, fall) = (self.spec.health.rise, self.spec.health.fall);
        let Some(i) = self.instances.get_mut(&seq) else {
            return false;
        };
        if error.is_some() {
            i.last_error = error;
        }
        let before = i.in_table();
        if i.health.record(ok, rise, fall) && i.health.is_up() {
            i.last_error = None;
        }
        before != i.in_table()
    }

    /// The process exited (the runtime restarts it): out of the table now.
    pub fn exited(&mut self, seq: u64, detail: String) -> bool {
        let Some(i) = self.instances.get_mut(&seq) else {
            return false;
        };
        let before = i.in_table();
        i.health.force_down();
        i.restarts += 1;
        i.last_error = Some(detail);
        before
    }

    pub fn stopped(&mut self, seq: u64) {
        self.instances.remove(&seq);
        let live: std::collections::BTreeSet<u64> =
            self.instances.values().map(|i| i.generation).collect();
        let (current, revert) = (self.generation, self.deploy.as_ref().map(|d| d.from));
        self.runs
            .retain(|g, _| *g == current || Some(*g) == revert || live.contains(g));
    }

    fn deploying(&self, generation: u64) -> bool {
        self.deploy
            .as_ref()
            .is_some_and(|d| d.outcome == Outcome::InProgress && d.generation == generation)
    }

    fn fail_deploy(&mut self, reason: String, now: Instant) {
        let Some(d) = self.deploy.as_mut() else {
            return;
        };
        d.outcome = Outcome::Failed { reason };
        d.finished = Some(now);
        self.generation = d.from;
        self.finished_deploys.push(d.outcome.clone());
    }

    /// A running instance left by an earlier agent (the runtime found it). It counts as current
    /// when it runs what the current generation runs, else as outdated and is rolled away.
    pub fn adopt(&mut self, seq: u64, addr: SocketAddr, run: RunSpec, now: Instant) {
        let generation = if &run == self.current_run().as_ref() {
            self.generation
        } else {
            self.runs.entry(0).or_insert_with(|| Arc::new(run.clone()));
            0
        };
        let run = self.runs[&generation].clone();
        self.next_seq = self.next_seq.max(seq + 1);
        let mut instance = self.running_instance(seq, generation, run, addr, now, true, None);
        // It was serving: no slow start.
        instance.health.assume_up();
        instance.was_in_table = true;
        self.instances.insert(seq, instance);
    }

    /// A container labelled for this service appeared; returns its seq (for health checks).
    pub fn discovered(
        &mut self,
        container: String,
        addr: SocketAddr,
        weight: u32,
        priority: u32,
        now: Instant,
    ) -> u64 {
        if let Some(i) = self
            .instances
            .values_mut()
            .find(|i| i.external.as_deref() == Some(&container))
        {
            i.addr = Some(addr);
            return i.seq;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let run = Arc::new(RunSpec {
            command: String::new(),
            image: String::new(),
            args: Vec::new(),
            env: Default::default(),
            weight,
            priority,
        });
        self.instances.insert(
            seq,
            self.running_instance(seq, 0, run, addr, now, false, Some(container)),
        );
        seq
    }

    /// A discovered container is gone; returns its seq.
    pub fn vanished(&mut self, container: &str) -> Option<u64> {
        let seq = self
            .instances
            .values()
            .find(|i| !i.managed && i.external.as_deref() == Some(container))?
            .seq;
        self.instances.remove(&seq);
        Some(seq)
    }

    #[allow(clippy::too_many_arguments)]
    fn running_instance(
        &self,
        seq: u64,
        generation: u64,
        run: Arc<RunSpec>,
        addr: SocketAddr,
        now: Instant,
        managed: bool,
        external: Option<String>,
    ) -> Instance {
        Instance {
            seq,
            generation,
            run,
            addr: Some(addr),
            created: now,
            phase: Phase::Running,
            drain_until: None,
            health: Tracker::default(),
            restarts: 0,
            last_error: None,
            managed,
            external,
            was_in_table: false,
            warm_from: None,
        }
    }

    /// The runtime replaced the instance (a new container): new address, must rise again.
    pub fn moved(&mut self, seq: u64, addr: SocketAddr) {
        if let Some(i) = self.instances.get_mut(&seq) {
            i.addr = Some(addr);
            i.health.force_down();
        }
    }

    // ----- decisions ------------------------------------------------------------------------

    /// Bring the actual state one step closer to the desired one.
    pub fn reconcile(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let grace = self.spec.stop_grace;

        // Slow start: an instance that (re)enters the table ramps up from now.
        let slow_start = self.spec.slow_start;
        for i in self.instances.values_mut() {
            let in_table = i.in_table();
            if in_table && !i.was_in_table && !slow_start.is_zero() {
                i.warm_from = Some(now);
            }
            if i.warm_from
                .is_some_and(|t| now.duration_since(t) >= slow_start)
                || !in_table
            {
                i.warm_from = None;
            }
            i.was_in_table = in_table;
        }

        // A new instance that had its chance and never became healthy fails the deploy.
        if let Some(d) = &self.deploy {
            if d.outcome == Outcome::InProgress {
                let timeout = self.spec.rollout.healthy_timeout;
                let late = self.instances.values().find(|i| {
                    i.generation == d.generation
                        && i.live()
                        && !i.health.ever_up()
                        && now.duration_since(i.created) >= timeout
                });
                let limit = self.deploy_limit();
                if late.is_none() && now.duration_since(d.started) >= limit {
                    let reason = format!(
                        "generation {} did not take over within {}ms",
                        d.generation,
                        limit.as_millis()
                    );
                    self.fail_deploy(reason, now);
                } else if let Some(i) = late {
                    let reason = format!(
                        "{} did not become healthy within {}ms{}",
                        self.instance_ref(i.seq),
                        timeout.as_millis(),
                        i.last_error
                            .as_ref()
                            .map(|e| format!(" (last: {e})"))
                            .unwrap_or_default()
                    );
                    self.fail_deploy(reason, now);
                }
            }
        }

        // Drains that are over.
        for i in self.instances.values_mut() {
            if i.phase == Phase::Draining && i.drain_until.is_some_and(|t| now >= t) {
                i.phase = Phase::Stopping;
                actions.push(Action::Stop {
                    instance: InstanceRef {
                        service: self.spec.name.clone(),
                        seq: i.seq,
                    },
                    grace,
                });
            }
        }

        // Outdated instances that serve nothing go at once.
        let generation = self.generation;
        let idle_outdated: Vec<u64> = self
            .instances
            .values()
            .filter(|i| i.live() && i.generation != generation && !i.in_table())
            .map(|i| i.seq)
            .collect();
        for seq in idle_outdated {
            actions.push(self.stop_now(seq));
        }

        // Too many current instances: idle ones first, then the newest serving ones.
        let mut current: Vec<&Instance> = self
            .instances
            .values()
            .filter(|i| i.live() && i.generation == generation)
            .collect();
        let excess = current.len().saturating_sub(self.replicas as usize);
        if excess > 0 {
            current.sort_by_key(|i| (i.in_table(), std::cmp::Reverse(i.seq)));
            let victims: Vec<(u64, bool)> = current[..excess]
                .iter()
                .map(|i| (i.seq, i.in_table()))
                .collect();
            for (seq, serving) in victims {
                if serving {
                    self.drain_now(seq, now);
                } else {
                    actions.push(self.stop_now(seq));
                }
            }
        }

        // Too few: start more, within the surge allowance while outdated instances remain.
        let current_live = self.count(|i| i.live() && i.generation == generation);
        let outdated_live = self.count(|i| i.live() && i.generation != generation);
        let need = (self.replicas as usize).saturating_sub(current_live);
        let room = (self.replicas + self.spec.rollout.surge) as usize
            - (current_live + outdated_live)
                .min((self.replicas + self.spec.rollout.surge) as usize);
        let backing_off = self.no_start_before.is_some_and(|t| now < t);
        if !backing_off {
            for _ in 0..need.min(room) {
                actions.push(self.start_new(now));
            }
        }

        // Outdated instances leave the table while enough current ones serve.
        let serving_current = self.count(|i| i.in_table() && i.generation == generation);
        let mut outdated_serving: Vec<u64> = self
            .instances
            .values()
            .filter(|i| i.managed && i.in_table() && i.generation != generation)
            .map(|i| i.seq)
            .collect();
        let keep = (self.replicas as usize).saturating_sub(serving_current);
        let drainable = outdated_serving.len().saturating_sub(keep);
        outdated_serving.truncate(drainable); // oldest first
        for seq in outdated_serving {
            self.drain_now(seq, now);
        }

        // A deploy is done when every outdated instance is out of the table and enough serve.
        if let Some(d) = self.deploy.as_mut() {
            if d.outcome == Outcome::InProgress
                && !self
                    .instances
                    .values()
                    .any(|i| i.live() && i.generation != d.generation)
                && self
                    .instances
                    .values()
                    .filter(|i| i.in_table() && i.generation == d.generation)
                    .count()
                    >= self.replicas as usize
            {
                d.outcome = Outcome::Succeeded;
                d.finished = Some(now);
                self.finished_deploys.push(Outcome::Succeeded);
            }
        }
        actions
    }

    /// When should `reconcile` run again even if nothing happens? (Drain ends, deploy deadlines,
    /// start backoff.)
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let drains = self.instances.values().filter_map(|i| {
            (i.phase == Phase::Draining)
                .then_some(i.drain_until)
                .flatten()
        });
        let deadline = self
            .deploy
            .as_ref()
            .filter(|d| d.outcome == Outcome::InProgress)
            .into_iter()
            .flat_map(|d| {
                self.instances
                    .values()
                    .filter(move |i| {
                        i.live() && i.generation == d.generation && !i.health.ever_up()
                    })
                    .map(|i| i.created + self.spec.rollout.healthy_timeout)
                    .chain(std::iter::once(d.started + self.deploy_limit()))
            });
        let ramps = self
            .instances
            .values()
            .filter_map(|i| i.warm_from)
            .map(|t| t + self.ramp_step_of(now.saturating_duration_since(t)).1);
        // Only future instants: a past one would make the core loop spin.
        drains
            .chain(deadline)
            .chain(self.no_start_before)
            .chain(ramps)
            .filter(|t| *t > now)
            .min()
    }

    /// The longest a whole deploy may take: one `healthy_timeout` per round of `surge` new
    /// instances, plus one. It catches a new version that turns healthy once and then fails, which
    /// the per-instance rule cannot.
    fn deploy_limit(&self) -> Duration {
        let surge = self.spec.rollout.surge.max(1);
        let rounds = self.replicas.div_ceil(surge) + 1;
        self.spec.rollout.healthy_timeout * rounds
    }

    fn count(&self, f: impl Fn(&Instance) -> bool) -> usize {
        self.instances.values().filter(|i| f(i)).count()
    }

    fn start_new(&mut self, now: Instant) -> Action {
        let seq = self.next_seq;
        self.next_seq += 1;
        let run = self.current_run().clone();
        self.instances.insert(
            seq,
            Instance {
                seq,
                generation: self.generation,
                run: run.clone(),
                addr: None,
                created: now,
                phase: Phase::Starting,
                drain_until: None,
                health: Tracker::default(),
                restarts: 0,
                last_error: None,
                managed: true,
                external: None,
                was_in_table: false,
                warm_from: None,
            },
        );
        Action::Start {
            instance: self.instance_ref(seq),
            generation: self.generation,
            run,
        }
    }

    fn stop_now(&mut self, seq: u64) -> Action {
        if let Some(i) = self.instances.get_mut(&seq) {
            i.phase = Phase::Stopping;
        }
        Action::Stop {
            instance: self.instance_ref(seq),
            grace: self.spec.stop_grace,
        }
    }

    fn drain_now(&mut self, seq: u64, now: Instant) {
        let drain = self.spec.rollout.drain;
        if let Some(i) = self.instances.get_mut(&seq) {
            i.phase = Phase::Draining;
            i.drain_until = Some(now + drain);
        }
    }

    /// Slow start: (the step, 1..=STEPS, an instance is on after `elapsed` in the table; when the
    /// next step begins, counted from its entry).
    fn ramp_step_of(&self, elapsed: Duration) -> (u32, Duration) {
        let steps = SLOW_START_STEPS;
        let per_step = self.spec.slow_start / steps;
        if per_step.is_zero() {
            return (steps, Duration::ZERO);
        }
        let done = (elapsed.as_nanos() / per_step.as_nanos()) as u32;
        let step = (done + 1).min(steps);
        (step, per_step * step)
    }

    /// The backends this service puts in the table at `now`: (id, addr, weight, priority).
    /// With slow start every weight is scaled by the number of steps and a warming instance gets
    /// its share of the way: weight 2 starts at 2 of 20 and adds 2 per step.
    pub fn backends_at(&self, now: Instant) -> Vec<(String, SocketAddr, u32, u32)> {
        let slow = !self.spec.slow_start.is_zero();
        self.instances
            .values()
            .filter(|i| i.in_table())
            .filter_map(|i| {
                let weight = match (slow, i.warm_from) {
                    (false, _) => i.run.weight,
                    (true, None) => i.run.weight * SLOW_START_STEPS,
                    (true, Some(t)) => {
                        i.run.weight * self.ramp_step_of(now.saturating_duration_since(t)).0
                    }
                };
                i.addr.map(|a| {
                    (
                        self.instance_ref(i.seq).to_string(),
                        a,
                        weight,
                        i.run.priority,
                    )
                })
            })
            .collect()
    }

    pub fn backends(&self) -> Vec<(String, SocketAddr, u32, u32)> {
        self.backends_at(Instant::now())
    }
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
