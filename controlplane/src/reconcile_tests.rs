//! The reconcile rules, driven by hand with a fake clock: no processes, no sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::spec::{HealthSpec, Probe, RolloutPolicy, RunSpec, RuntimeKind, ServiceSpec};

fn spec(replicas: u32, surge: u32) -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        route: rusty_shared::table::Service::new("web", Vec::new()),
        runtime: RuntimeKind::Process,
        run: run("v1"),
        addresses: Vec::new(),
        container: None,
        replicas,
        stop_grace: Duration::from_secs(1),
        slow_start: Duration::ZERO,
        health: HealthSpec {
            tls: None,
            probe: Probe::Tcp,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            rise: 1,
            fall: 1,
        },
        rollout: RolloutPolicy {
            surge,
            drain: Duration::from_secs(2),
            healthy_timeout: Duration::from_secs(10),
        },
        autoscale: None,
        outliers: None,
    }
}

fn run(tag: &str) -> RunSpec {
    RunSpec {
        command: "app".into(),
        image: String::new(),
        args: vec![tag.into()],
        env: BTreeMap::new(),
        weight: 1,
        priority: 0,
    }
}

fn addr(seq: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + seq as u16))
}

/// Carries out actions the way the core would, with every start succeeding at once.
struct Sim {
    s: ServiceState,
    now: Instant,
    stopped: Vec<u64>,
}

impl Sim {
    fn new(spec: ServiceSpec) -> Sim {
        Sim {
            s: ServiceState::new(spec),
            now: Instant::now(),
            stopped: Vec::new(),
        }
    }

    /// Reconcile and apply the actions; returns them.
    fn step(&mut self) -> Vec<Action> {
        let actions = self.s.reconcile(self.now);
        for a in &actions {
            match a {
                Action::Start { instance, .. } => self.s.started(instance.seq, addr(instance.seq)),
                Action::Stop { instance, .. } => {
                    self.stopped.push(instance.seq);
                    self.s.stopped(instance.seq);
                }
            }
        }
        actions
    }

    fn pass_all(&mut self) {
        let seqs: Vec<u64> = self.s.instances.keys().copied().collect();
        for seq in seqs {
            self.s.probed(seq, true, None);
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn serving(&self) -> Vec<u64> {
        self.s
            .instances
            .values()
            .filter(|i| i.in_table())
            .map(|i| i.seq)
            .collect()
    }

    fn serving_generation(&self, g: u64) -> usize {
        self.s
            .instances
            .values()
            .filter(|i| i.in_table() && i.generation == g)
            .count()
    }

    fn live(&self) -> usize {
        self.s
            .instances
            .values()
            .filter(|i| matches!(i.phase, Phase::Starting | Phase::Running))
            .count()
    }

    /// Start `n` serving instances of generation 1.
    fn steady(n: u32, surge: u32) -> Sim {
        let mut sim = Sim::new(spec(n, surge));
        sim.step();
        sim.pass_all();
        sim.step();
        assert_eq!(sim.serving().len(), n as usize);
        sim
    }
}

fn starts(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Start { .. }))
        .count()
}

fn stops(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Stop { .. }))
        .count()
}

#[test]
fn instances_join_the_table_only_once_healthy() {
    let mut sim = Sim::new(spec(3, 1));
    let a = sim.step();
    assert_eq!(starts(&a), 3);
    assert!(sim.serving().is_empty(), "started is not healthy");
    assert_eq!(sim.s.backends().len(), 0);
    sim.pass_all();
    assert_eq!(sim.serving().len(), 3);
    assert!(sim.step().is_empty(), "nothing more to do");
}

#[test]
fn scaling_down_drains_serving_instances_before_stopping_them() {
    let mut sim = Sim::steady(3, 1);
    sim.s.scale(1).unwrap();
    let a = sim.step();
    assert_eq!(stops(&a), 0, "serving instances are drained first");
    assert_eq!(sim.serving(), vec![1], "the newest go, the oldest stays");
    sim.advance(Duration::from_millis(1_999));
    assert_eq!(stops(&sim.step()), 0);
    sim.advance(Duration::from_millis(1));
    assert_eq!(stops(&sim.step()), 2);
    assert_eq!(sim.stopped, vec![2, 3]);
    assert_eq!(sim.s.instances.len(), 1);
}

#[test]
fn scaling_down_takes_instances_that_serve_nothing_first_and_at_once() {
    let mut sim = Sim::steady(3, 1);
    sim.s.probed(1, false, Some("down".into()));
    sim.s.scale(2).unwrap();
    let a = sim.step();
    assert_eq!(stops(&a), 1);
    assert_eq!(sim.stopped, vec![1]);
    assert_eq!(sim.serving(), vec![2, 3]);
}

#[test]
fn an_exited_instance_leaves_the_table_at_once_and_returns_after_rise() {
    let mut sim = Sim::steady(2, 1);
    assert!(sim.s.exited(2, "killed by signal 9".into()));
    assert_eq!(sim.serving(), vec![1]);
    assert_eq!(
        starts(&sim.step()),
        0,
        "the runtime restarts it; no new instance"
    );
    assert!(sim.s.probed(2, true, None));
    assert_eq!(sim.serving(), vec![1, 2]);
    assert_eq!(sim.s.instances[&2].restarts, 1);
}

#[test]
fn a_rolling_deploy_keeps_capacity_and_ends_on_the_new_generation() {
    let mut sim = Sim::steady(3, 1);
    let g = sim.s.deploy(run("v2"), sim.now).unwrap();
    assert_eq!(g, 2);
    for _ in 0..50 {
        sim.step();
        assert!(sim.live() <= 4, "surge 1 over 3 replicas");
        assert!(sim.serving().len() >= 3, "never fewer than 3 serving");
        sim.pass_all();
        sim.advance(Duration::from_secs(1));
        if sim.s.deploy.as_ref().unwrap().outcome == Outcome::Succeeded
            && sim.s.instances.len() == 3
        {
            break;
        }
    }
    assert_eq!(sim.s.deploy.as_ref().unwrap().outcome, Outcome::Succeeded);
    assert_eq!(sim.serving_generation(2), 3);
    assert_eq!(
        sim.s.instances.len(),
        3,
        "old instances stopped after their drain"
    );
    assert_eq!(sim.stopped, vec![1, 2, 3]);
    assert_eq!(sim.s.current_run().args, vec!["v2".to_string()]);
}

#[test]
fn a_deploy_that_never_gets_healthy_fails_and_the_old_generation_keeps_serving() {
    let mut sim = Sim::steady(2, 1);
    sim.s.deploy(run("broken"), sim.now).unwrap();
    let a = sim.step();
    assert_eq!(starts(&a), 1, "one surge instance");
    let new = sim.s.instances.keys().copied().max().unwrap();
    for _ in 0..9 {
        sim.advance(Duration::from_secs(1));
        sim.s.probed(new, false, Some("connect: refused".into()));
        sim.step();
        assert_eq!(sim.serving(), vec![1, 2], "old instances untouched");
    }
    sim.advance(Duration::from_secs(1));
    let a = sim.step();
    let d = sim.s.deploy.as_ref().unwrap();
    match &d.outcome {
        Outcome::Failed { reason } => {
            assert!(reason.contains("web-3 did not become healthy"), "{reason}");
            assert!(reason.contains("connect: refused"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.s.generation, 1, "reverted");
    assert_eq!(stops(&a), 1);
    assert_eq!(sim.stopped, vec![new]);
    assert_eq!(sim.serving(), vec![1, 2]);
    assert_eq!(sim.s.finished_deploys.len(), 1);
    assert!(sim.step().is_empty());
}

#[test]
fn a_deploy_whose_instance_cannot_start_fails_at_once() {
    let mut sim = Sim::steady(2, 1);
    sim.s.deploy(run("missing"), sim.now).unwrap();
    let a = sim.s.reconcile(sim.now);
    let Action::Start { instance, .. } = &a[0] else {
        panic!("{a:?}")
    };
    sim.s.start_failed(instance.seq, "No such file", sim.now);
    assert!(matches!(
        sim.s.deploy.as_ref().unwrap().outcome,
        Outcome::Failed { .. }
    ));
    assert_eq!(sim.s.generation, 1);
    assert!(
        sim.step().is_empty(),
        "nothing to start again: v1 is complete"
    );
}

#[test]
fn start_failures_back_off() {
    let mut sim = Sim::new(spec(1, 1));
    let a = sim.s.reconcile(sim.now);
    let Action::Start { instance, .. } = &a[0] else {
        panic!("{a:?}")
    };
    sim.s.start_failed(instance.seq, "No such file", sim.now);
    assert!(sim.s.reconcile(sim.now).is_empty(), "backing off");
    assert!(sim.s.next_deadline(sim.now).is_some());
    sim.advance(Duration::from_millis(500));
    assert_eq!(starts(&sim.s.reconcile(sim.now)), 1);
}

#[test]
fn a_second_deploy_waits_for_the_first() {
    let mut sim = Sim::steady(1, 1);
    sim.s.deploy(run("v2"), sim.now).unwrap();
    assert_eq!(
        sim.s.deploy(run("v3"), sim.now),
        Err(Refusal::DeployInProgress(2))
    );
}

#[test]
fn draining_an_instance_replaces_it() {
    let mut sim = Sim::steady(2, 1);
    sim.s.drain(1, sim.now).unwrap();
    assert_eq!(sim.serving(), vec![2]);
    let a = sim.step();
    assert_eq!(starts(&a), 1);
    sim.pass_all();
    assert_eq!(sim.serving(), vec![2, 3]);
    assert_eq!(
        sim.s.drain(1, sim.now),
        Err(Refusal::AlreadyLeaving("web-1".into()))
    );
    assert_eq!(
        sim.s.drain(9, sim.now),
        Err(Refusal::NoInstance("web-9".into()))
    );
}

#[test]
fn static_services_refuse_scale_and_deploy() {
    let mut sp = spec(2, 1);
    sp.runtime = RuntimeKind::Static;
    let mut s = ServiceState::new(sp);
    assert!(matches!(s.scale(3), Err(Refusal::Static(_))));
    assert!(matches!(
        s.deploy(run("x"), Instant::now()),
        Err(Refusal::Static(_))
    ));
}

proptest! {
    /// Whatever order new instances become healthy in, a deploy never drops the table below
    /// the desired capacity, never exceeds the surge, and ends with only the new generation.
    #[test]
    fn rolling_deploys_hold_their_invariants(
        replicas in 1u32..6,
        surge in 1u32..4,
        healthy_order in proptest::collection::vec(any::<bool>(), 200),
    ) {
        let mut sim = Sim::steady(replicas, surge);
        sim.s.deploy(run("v2"), sim.now).unwrap();
        let mut coin = healthy_order.into_iter().cycle();
        for _ in 0..400 {
            sim.step();
            prop_assert!(sim.live() <= (replicas + surge) as usize);
            prop_assert!(sim.serving().len() >= replicas as usize);
            // Some of the instances waiting for health pass this round.
            let waiting: Vec<u64> = sim.s.instances.values().filter(|i| !i.health.is_up()).map(|i| i.seq).collect();
            for seq in waiting {
                if coin.next().unwrap_or(true) {
                    sim.s.probed(seq, true, None);
                }
            }
            sim.advance(Duration::from_millis(500));
            if sim.s.deploy.as_ref().unwrap().outcome == Outcome::Succeeded && sim.s.instances.len() == replicas as usize {
                break;
            }
        }
        prop_assert_eq!(&sim.s.deploy.as_ref().unwrap().outcome, &Outcome::Succeeded);
        prop_assert_eq!(sim.serving_generation(2), replicas as usize);
        prop_assert_eq!(sim.s.instances.len(), replicas as usize);
    }
}

#[test]
fn adopted_instances_of_the_current_spec_count_and_others_are_rolled_away() {
    let mut sim = Sim::new(spec(2, 1));
    sim.s.adopt(7, addr(7), run("v1"), sim.now);
    sim.s.adopt(9, addr(9), run("old"), sim.now);
    assert_eq!(sim.s.instances[&7].generation, 1, "same spec: current");
    assert_eq!(sim.s.instances[&9].generation, 0, "other spec: outdated");
    let a = sim.step();
    assert_eq!(
        starts(&a),
        1,
        "one more current instance, none for the adopted current one"
    );
    let Action::Start { instance, .. } = &a[0] else {
        panic!("{a:?}")
    };
    assert_eq!(instance.seq, 10, "no seq of an adopted instance is reused");
    sim.pass_all();
    for _ in 0..5 {
        sim.step();
        sim.advance(Duration::from_secs(1));
    }
    assert_eq!(sim.serving(), vec![7, 10]);
    assert_eq!(sim.stopped, vec![9], "the outdated one drained and stopped");
}

#[test]
fn discovered_containers_serve_but_are_never_counted_or_stopped() {
    let mut sim = Sim::steady(1, 1);
    let seq = sim.s.discovered("c0ffee".into(), addr(50), 3, 0, sim.now);
    assert_eq!(
        sim.s.discovered("c0ffee".into(), addr(51), 3, 0, sim.now),
        seq,
        "same container, same instance"
    );
    assert!(sim.s.probed(seq, true, None));
    assert_eq!(sim.serving(), vec![1, seq]);
    let backends = sim.s.backends();
    assert!(
        backends.iter().any(|b| b.1 == addr(51) && b.2 == 3),
        "{backends:?}"
    );
    sim.s.scale(0).unwrap();
    sim.step();
    sim.advance(Duration::from_secs(3));
    sim.step();
    assert_eq!(
        sim.serving(),
        vec![seq],
        "scaling to 0 leaves the discovered one"
    );
    assert!(matches!(
        sim.s.drain(seq, sim.now),
        Err(Refusal::NotManaged(_))
    ));
    assert_eq!(sim.s.vanished("c0ffee"), Some(seq));
    assert!(sim.serving().is_empty());
}

#[test]
fn slow_start_ramps_a_new_instance_in_ten_steps_and_wakes_for_each() {
    let mut sp = spec(2, 1);
    sp.slow_start = Duration::from_secs(10);
    sp.run.weight = 2;
    let mut sim = Sim::new(sp);
    sim.step();
    sim.s.probed(1, true, None);
    sim.step();
    sim.advance(Duration::from_secs(20));
    sim.step();
    let weights =
        |sim: &Sim| -> Vec<u32> { sim.s.backends_at(sim.now).iter().map(|b| b.2).collect() };
    assert_eq!(
        weights(&sim),
        vec![20],
        "a warm instance carries its weight x 10"
    );

    // Instance 2 joins now: 2 of 20, then 2 more each second, then its full 20.
    sim.s.probed(2, true, None);
    sim.step();
    let joined = sim.now;
    assert_eq!(weights(&sim), vec![20, 2]);
    assert_eq!(
        sim.s.next_deadline(sim.now),
        Some(joined + Duration::from_secs(1))
    );
    sim.advance(Duration::from_millis(4_500));
    sim.step();
    assert_eq!(weights(&sim), vec![20, 10]);
    assert_eq!(
        sim.s.next_deadline(sim.now),
        Some(joined + Duration::from_secs(5))
    );
    sim.advance(Duration::from_millis(5_500));
    sim.step();
    assert_eq!(weights(&sim), vec![20, 20]);
    assert_eq!(sim.s.next_deadline(sim.now), None, "nothing left to ramp");

    // A recovered instance ramps again.
    sim.s.probed(2, false, None);
    sim.step();
    assert_eq!(weights(&sim), vec![20]);
    sim.s.probed(2, true, None);
    sim.step();
    assert_eq!(weights(&sim), vec![20, 2]);
}

#[test]
fn without_slow_start_weights_are_as_configured() {
    let mut sim = Sim::steady(2, 1);
    sim.step();
    let weights: Vec<u32> = sim.s.backends_at(sim.now).iter().map(|b| b.2).collect();
    assert_eq!(weights, vec![1, 1]);
    assert_eq!(sim.s.next_deadline(sim.now), None);
}

#[test]
fn deadlines_in_the_past_are_never_returned() {
    let mut sim = Sim::new(spec(1, 1));
    let a = sim.s.reconcile(sim.now);
    let Action::Start { instance, .. } = &a[0] else {
        panic!("{a:?}")
    };
    sim.s.start_failed(instance.seq, "No such file", sim.now);
    assert_eq!(
        sim.s.next_deadline(sim.now),
        Some(sim.now + Duration::from_millis(500))
    );
    sim.advance(Duration::from_secs(1));
    let d = sim.s.next_deadline(sim.now);
    assert!(
        d.is_none_or(|t| t > sim.now),
        "{d:?} is not after {:?}",
        sim.now
    );
}

#[test]
fn a_deploy_that_turns_healthy_once_and_then_fails_still_ends() {
    let mut sim = Sim::steady(2, 1);
    sim.s.deploy(run("flaky"), sim.now).unwrap();
    sim.step();
    // Every new instance passes once (so the per-instance rule is satisfied), then fails.
    let flap = |sim: &mut Sim| {
        let new: Vec<u64> = sim
            .s
            .instances
            .values()
            .filter(|i| i.generation == 2)
            .map(|i| i.seq)
            .collect();
        for seq in new {
            sim.s.probed(seq, true, None);
            sim.s.probed(seq, false, Some("status 500".into()));
        }
    };
    // Limit: healthy_timeout (10 s) x (ceil(2 / 1) + 1) = 30 s.
    for _ in 0..29 {
        flap(&mut sim);
        sim.advance(Duration::from_secs(1));
        sim.step();
        assert_eq!(sim.s.deploy.as_ref().unwrap().outcome, Outcome::InProgress);
    }
    sim.advance(Duration::from_secs(1));
    sim.step();
    match &sim.s.deploy.as_ref().unwrap().outcome {
        Outcome::Failed { reason } => assert!(
            reason.contains("did not take over within 30000ms"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.s.generation, 1);
}
