//! Outliers: instances the data planes keep ejecting while the agent's own health checks pass.
//!
//! A data plane ejects a backend for a while after a connect to it fails, and retries the
//! request elsewhere, so clients see nothing; but an instance that keeps failing (a flapping
//! listener, a network path only the data planes take) costs every data plane retries and
//! capacity, and the agent's health checks, a few per second, can miss it. The agent reads the
//! data planes' `rustybalancer_backend_ejected` gauges with the load (`scrape`) and counts
//! *ejection episodes* per instance: a sample in which a data plane reports it ejected after
//! one in which none did. `ejections` episodes within `window` make the instance an outlier,
//! and the core replaces it (drain, stop, start a new one). A single failure, however long its
//! ejection lasts, is one episode and replaces nothing.
//!
//! Pure: the samples and the clock come in as arguments.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::spec::OutlierSpec;

/// (service, backend id as in the table).
pub type BackendKey = (String, String);

#[derive(Debug, Default)]
pub struct OutlierTracker {
    /// Backends ejected in the previous sample.
    ejected: HashSet<BackendKey>,
    /// Start of each recent episode, per backend.
    episodes: HashMap<BackendKey, VecDeque<Instant>>,
}

impl OutlierTracker {
    /// Take one sample: every backend some data plane reports ejected now. Returns the
    /// backends that just became outliers under `spec_of(service)` (None: not watched).
    pub fn observe(
        &mut self,
        ejected: HashSet<BackendKey>,
        now: Instant,
        spec_of: impl Fn(&str) -> Option<OutlierSpec>,
    ) -> Vec<BackendKey> {
        let mut outliers = Vec::new();
        for key in ejected.difference(&self.ejected) {
            let Some(spec) = spec_of(&key.0) else {
                continue;
            };
            let starts = self.episodes.entry(key.clone()).or_default();
            starts.push_back(now);
            while starts
                .front()
                .is_some_and(|t| now.duration_since(*t) > spec.window)
            {
                starts.pop_front();
            }
            if starts.len() >= spec.ejections as usize {
                starts.clear();
                outliers.push(key.clone());
            }
        }
        // Forget backends with no episode left in any window (they left the table, or healed).
        self.episodes.retain(|(svc, _), starts| {
            let window = spec_of(svc).map_or(Duration::ZERO, |s| s.window);
            starts.retain(|t| now.duration_since(*t) <= window);
            !starts.is_empty()
        });
        self.ejected = ejected;
        outliers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: OutlierSpec = OutlierSpec {
        ejections: 3,
        window: Duration::from_secs(10),
    };

    fn key(id: &str) -> BackendKey {
        ("web".to_owned(), id.to_owned())
    }

    /// One sample a second; `pattern[i]` lists the backends ejected at second i.
    fn run(pattern: &[&[&str]]) -> Vec<(usize, BackendKey)> {
        let mut t = OutlierTracker::default();
        let start = Instant::now();
        let mut found = Vec::new();
        for (i, ids) in pattern.iter().enumerate() {
            let ejected = ids.iter().map(|id| key(id)).collect();
            let now = start + Duration::from_secs(i as u64);
            for k in t.observe(ejected, now, |svc| (svc == "web").then_some(SPEC)) {
                found.push((i, k));
            }
        }
        found
    }

    #[test]
    fn three_episodes_in_the_window_make_an_outlier() {
        let flapping: Vec<&[&str]> = vec![&["web-2"], &[], &["web-2"], &[], &["web-2"], &[]];
        assert_eq!(run(&flapping), [(4, key("web-2"))]);
    }

    #[test]
    fn one_long_ejection_is_one_episode() {
        let long: Vec<&[&str]> = vec![&["web-1"]; 30];
        assert!(run(&long).is_empty());
    }

    #[test]
    fn episodes_spread_wider_than_the_window_do_not_add_up() {
        let mut sparse: Vec<&[&str]> = Vec::new();
        for _ in 0..4 {
            sparse.push(&["web-3"]);
            sparse.extend([&[][..]; 5]);
        }
        // Episodes at 0, 6, 12, 18: never three within 10 s.
        assert!(run(&sparse).is_empty());
    }

    #[test]
    fn unwatched_services_and_other_backends_are_left_alone() {
        let mut t = OutlierTracker::default();
        let start = Instant::now();
        for i in 0..10u64 {
            let ejected = if i % 2 == 0 {
                [("api".to_owned(), "api-1".to_owned())]
                    .into_iter()
                    .collect()
            } else {
                HashSet::new()
            };
            let now = start + Duration::from_secs(i);
            assert!(t
                .observe(ejected, now, |svc| (svc == "web").then_some(SPEC))
                .is_empty());
        }
    }
}
