//! Autoscaling decisions: how many instances a service should run for the load the data planes
//! report. Pure: the load and the clock come in as arguments, so every rule is unit-tested with
//! a fake clock; `scrape` fetches the load and `core` applies the decisions.
//!
//! The load is the requests in flight for the service summed over every data plane
//! (`rustybalancer_inflight_requests`), and the target is in-flight requests per instance:
//!
//! - **Out**: once the load per instance has stayed above the target for `window`, scale to
//!   `ceil(load / target)` instances (at least one more), at most `max_replicas`. Acting on
//!   in-flight requests rather than on errors scales out while requests are still being served,
//!   before any backend queue fills.
//! - **In**: once it has stayed below half the target for `cooldown`, and no decision was made
//!   in the last `cooldown`, scale to `ceil(load / target)`, at least `min_replicas`. The
//!   half-target band keeps a load near the target from flapping between two sizes; the agent's
//!   usual scale-down takes instances out of the tables and drains them before stopping them.
//! - No sample (no data plane answered) is not a zero load: it changes nothing.

use std::time::Instant;

use crate::spec::AutoscaleSpec;

/// One decision, kept for `rusty-agent status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub at: Instant,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// The state of one service's autoscaler between samples.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    pub spec: AutoscaleSpec,
    above_since: Option<Instant>,
    below_since: Option<Instant>,
    /// The last load seen, for status.
    pub load: Option<f64>,
    pub last: Option<Decision>,
}

impl Autoscaler {
    pub fn new(spec: AutoscaleSpec) -> Self {
        Autoscaler {
            spec,
            above_since: None,
            below_since: None,
            load: None,
            last: None,
        }
    }

    /// Take one sample: `load` requests in flight over the data planes while `replicas`
    /// instances are wanted. `settled`: every wanted instance serves (no scale-out since the
    /// last one would be counted twice). `complete`: every data plane answered; a partial sum
    /// is a lower bound, good enough to scale out on but never to scale in. Returns a decision
    /// when the count should change.
    pub fn observe(
        &mut self,
        load: f64,
        replicas: u32,
        settled: bool,
        complete: bool,
        now: Instant,
    ) -> Option<Decision> {
        if !load.is_finite() || load < 0.0 {
            return None;
        }
        self.load = Some(load);
        let s = &self.spec;
        let replicas = replicas.max(1);
        let per = load / f64::from(replicas);
        let needed =
            ((load / s.target_inflight).ceil() as u32).clamp(s.min_replicas, s.max_replicas);

        if per > s.target_inflight {
            self.below_since = None;
            let since = *self.above_since.get_or_insert(now);
            if now.duration_since(since) >= s.window && replicas < s.max_replicas && settled {
                let to = needed.max(replicas + 1).min(s.max_replicas);
                return Some(self.decide(now, replicas, to, format!(
                    "{load:.1} requests in flight, {per:.1} per instance over the target {} for {:?}",
                    s.target_inflight, s.window
                )));
            }
            return None;
        }
        self.above_since = None;
        if !complete {
            // Missing data planes could carry the load this sum lacks.
            self.below_since = None;
            return None;
        }
        if per < s.target_inflight / 2.0 && replicas > s.min_replicas {
            let since = *self.below_since.get_or_insert(now);
            let calm = self
                .last
                .as_ref()
                .is_none_or(|d| now.duration_since(d.at) >= s.cooldown);
            if now.duration_since(since) >= s.cooldown && calm && needed < replicas {
                return Some(self.decide(now, replicas, needed, format!(
                    "{load:.1} requests in flight, {per:.1} per instance under half the target {} for {:?}",
                    s.target_inflight, s.cooldown
                )));
            }
            return None;
        }
        self.below_since = None;
        None
    }

    /// Someone scaled by hand: start the timers over from this count, as after a decision.
    pub fn manual(&mut self, from: u32, to: u32, now: Instant) {
        self.decide(now, from, to, "scaled by hand".to_owned());
    }

    fn decide(&mut self, now: Instant, from: u32, to: u32, reason: String) -> Decision {
        self.above_since = None;
        self.below_since = None;
        let d = Decision {
            at: now,
            from,
            to,
            reason,
        };
        self.last = Some(d.clone());
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scaler() -> Autoscaler {
        Autoscaler::new(AutoscaleSpec {
            min_replicas: 1,
            max_replicas: 5,
            target_inflight: 4.0,
            window: Duration::from_secs(2),
            cooldown: Duration::from_secs(10),
        })
    }

    /// Feed one sample a second; the replica count after each, as the core would apply it.
    fn run(a: &mut Autoscaler, start: Instant, mut replicas: u32, loads: &[f64]) -> Vec<u32> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &load)| {
                let now = start + Duration::from_secs(i as u64);
                if let Some(d) = a.observe(load, replicas, true, true, now) {
                    assert_eq!(d.from, replicas);
                    replicas = d.to;
                }
                replicas
            })
            .collect()
    }

    #[test]
    fn a_load_over_the_target_for_the_window_scales_out_to_what_it_needs() {
        let mut a = scaler();
        let t = Instant::now();
        // 1 instance, 10 in flight: 10 per instance > 4. Out after 2 s, to ceil(10/4) = 3.
        assert_eq!(run(&mut a, t, 1, &[10.0, 10.0, 10.0, 10.0]), [1, 1, 3, 3]);
        assert!(a.last.as_ref().unwrap().reason.contains("over the target"));
    }

    #[test]
    fn a_short_spike_does_not_scale() {
        let mut a = scaler();
        let t = Instant::now();
        assert_eq!(run(&mut a, t, 1, &[10.0, 2.0, 10.0, 2.0, 10.0]), [1; 5]);
        assert!(a.last.is_none());
    }

    #[test]
    fn scaling_out_is_capped_and_takes_at_least_one_step() {
        let mut a = scaler();
        let t = Instant::now();
        assert_eq!(run(&mut a, t, 2, &[100.0, 100.0, 100.0]), [2, 2, 5]);
        // Just over the target: one more, though ceil(load/target) equals the current size.
        let mut a = scaler();
        assert_eq!(run(&mut a, t, 2, &[8.5, 8.5, 8.5]), [2, 2, 3]);
        // At the maximum nothing happens.
        let mut a = scaler();
        assert_eq!(run(&mut a, t, 5, &[100.0; 4]), [5; 4]);
    }

    #[test]
    fn scaling_in_waits_for_the_cooldown_and_keeps_the_minimum() {
        let mut a = scaler();
        let t = Instant::now();
        // Out first (at t+2), then the load stops.
        let mut loads = vec![20.0; 3];
        loads.extend(vec![0.0; 14]);
        let r = run(&mut a, t, 1, &loads);
        assert_eq!(r[2], 5);
        // Below half the target from t+3; the cooldown (10 s since both the last decision at
        // t+2 and the start of the calm at t+3) ends at t+13.
        assert_eq!(r[12], 5);
        assert_eq!(r[13], 1);
        assert_eq!(*r.last().unwrap(), 1);
    }

    #[test]
    fn no_second_scale_out_before_the_first_serves_and_no_scale_in_on_partial_data() {
        let mut a = scaler();
        let t = Instant::now();
        let at = |s: u64| t + Duration::from_secs(s);
        assert!(a.observe(20.0, 1, true, true, at(0)).is_none());
        assert_eq!(a.observe(20.0, 1, true, true, at(2)).unwrap().to, 5);
        // Still starting: the load stays high, but no decision until they serve.
        let mut a = scaler();
        assert!(a.observe(10.0, 2, false, true, at(0)).is_none());
        assert!(a.observe(10.0, 2, false, true, at(5)).is_none());
        assert_eq!(a.observe(10.0, 2, true, true, at(6)).unwrap().to, 3);
        // A low sum from some of the data planes never scales in.
        let mut a = scaler();
        for s in 0..30 {
            assert!(a.observe(0.0, 4, true, false, at(s)).is_none());
        }
        // A high partial sum may scale out: the real load is at least that.
        assert!(a.observe(30.0, 1, true, false, at(0)).is_none());
        assert!(a.observe(30.0, 1, true, false, at(2)).is_some());
        // Nonsense loads are ignored.
        assert!(a.observe(f64::NAN, 1, true, true, at(3)).is_none());
        assert!(a.observe(-1.0, 1, true, true, at(3)).is_none());
    }

    #[test]
    fn a_manual_scale_restarts_the_timers() {
        let mut a = scaler();
        let t = Instant::now();
        let at = |s: u64| t + Duration::from_secs(s);
        // Calm at 3 instances for a long time, then an operator scales to 5.
        for s in 0..20 {
            assert!(a.observe(0.0, 3, true, true, at(s)).is_none() || s >= 10);
        }
        a.manual(3, 5, at(20));
        // The cooldown counts from the manual change, not from the old calm.
        assert!(a.observe(0.0, 5, true, true, at(21)).is_none());
        assert_eq!(a.observe(0.0, 5, true, true, at(31)).map(|d| d.to), Some(1));
    }

    #[test]
    fn a_load_between_half_and_the_whole_target_holds_steady() {
        let mut a = scaler();
        let t = Instant::now();
        // 3 instances, 8 in flight: 2.7 per instance, between 2 and 4: no change, ever.
        assert_eq!(run(&mut a, t, 3, &[8.0; 30]), [3; 30]);
    }
}
