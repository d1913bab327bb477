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

use std::time::{Duration, Instant};

/// A service's autoscaling settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleSpec {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Requests in flight per instance the service is sized for.
    pub target_inflight: f64,
    pub window: Duration,
    pub cooldown: Duration,
}

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

    /// Take one sample: `load` requests in flight over all data planes while `replicas`
    /// instances are wanted. Returns the new replica count when it should change.
    pub fn observe(&mut self, load: f64, replicas: u32, now: Instant) -> Option<Decision> {
        self.load = Some(load);
        let s = &self.spec;
        let replicas = replicas.max(1);
        let per = load / f64::from(replicas);
        let needed =
            ((load / s.target_inflight).ceil() as u32).clamp(s.min_replicas, s.max_replicas);

        if per > s.target_inflight {
            self.below_since = None;
            let since = *self.above_since.get_or_insert(now);
            if now.duration_since(since) >= s.window && replicas < s.max_replicas {
                let to = needed.max(replicas + 1).min(s.max_replicas);
                return Some(self.decide(now, replicas, to, format!(
                    "{load:.1} requests in flight, {per:.1} per instance over the target {} for {:?}",
                    s.target_inflight, s.window
                )));
            }
            return None;
        }
        self.above_since = None;
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
                if let Some(d) = a.observe(load, replicas, now) {
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
    fn a_load_between_half_and_the_whole_target_holds_steady() {
        let mut a = scaler();
        let t = Instant::now();
        // 3 instances, 8 in flight: 2.7 per instance, between 2 and 4: no change, ever.
        assert_eq!(run(&mut a, t, 3, &[8.0; 30]), [3; 30]);
    }
}
