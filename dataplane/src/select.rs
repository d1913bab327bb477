//! Picking a backend for one request: round robin within a tier, Envoy-style spill across tiers,
//! passive health by local ejection.
//!
//! The fast path, taken whenever no backend of the service is ejected, is one `arc-swap` load
//! (no refcount change), one relaxed `fetch_add` and an index into the precomputed schedule:
//! O(1), no lock, no allocation. With every backend in good standing tier 0 always takes all
//! traffic (its health is 100 % × overprovisioning), so the tier loads need not be consulted.
//!
//! The slow path runs while some backend is ejected: it chooses a tier by the spill loads
//! (recomputed only when an ejection starts or expires), walks that tier's schedule past ejected
//! backends and backends this request already tried, and falls back to the other tiers. When no
//! backend in good standing is left it ignores ejections (Envoy's panic mode) rather than fail a
//! request a recovered backend could serve; each backend is still tried at most once per request.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use rusty_shared::spill::{tier_loads, TierHealth, FULL};
use tracing::warn;

use crate::clock::now_ms;
use crate::snapshot::{ServiceState, TierState};

/// Tier loads as of the last change in ejections.
#[derive(Debug)]
pub struct Spill {
    /// Basis points per tier; all zero when nothing is in good standing.
    loads: Box<[u32]>,
    any_ejected: bool,
    /// When the earliest ejection ends and these loads go stale.
    valid_until_ms: u64,
}

impl Spill {
    pub fn all_healthy(tiers: usize) -> Spill {
        let mut loads = vec![0; tiers];
        if let Some(first) = loads.first_mut() {
            *first = FULL;
        }
        Spill {
            loads: loads.into(),
            any_ejected: false,
            valid_until_ms: u64::MAX,
        }
    }
}

/// How many schedule positions a pick walks before scanning the tier's members instead.
const WALK: usize = 16;

impl ServiceState {
    /// The backend for the next attempt of a request that already tried `tried`, or `None` when
    /// every backend has been tried.
    pub fn pick(&self, tried: &[u32]) -> Option<u32> {
        let spill = self.spill.load();
        if !spill.any_ejected {
            if let Some(tier) = self.tiers.first() {
                let i = tier.schedule[tier.next.fetch_add(1, Relaxed) % tier.schedule.len()];
                if !tried.contains(&i) {
                    return Some(i);
                }
            }
        }
        self.pick_slow(tried)
    }

    #[cold]
    fn pick_slow(&self, tried: &[u32]) -> Option<u32> {
        let now = now_ms();
        let mut spill = self.spill.load_full();
        if now >= spill.valid_until_ms {
            spill = self.refresh_spill(now);
        }
        let usable = |i: u32| !tried.contains(&i) && !self.is_ejected(i, now);
        if let Some(t) = self.choose_tier(&spill.loads) {
            if let Some(i) = walk(&self.tiers[t], usable) {
                return Some(i);
            }
        }
        // The chosen tier had nothing left for this request: any tier, most preferred first.
        if let Some(i) = self.tiers.iter().find_map(|t| walk(t, usable)) {
            return Some(i);
        }
        // Panic mode: nothing in good standing is left, so ejections are ignored.
        self.tiers
            .iter()
            .find_map(|t| walk(t, |i| !tried.contains(&i)))
    }

    /// Tier for this request, by the spill loads; `None` when no tier takes any traffic.
    fn choose_tier(&self, loads: &[u32]) -> Option<usize> {
        // A Weyl sequence over the request counter spreads picks evenly over [0, FULL) without
        // a random number generator.
        let turn = self.tier_turn.fetch_add(1, Relaxed);
        let u = (turn.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32;
        let point = ((u64::from(u) * u64::from(FULL)) >> 32) as u32;
        let mut acc = 0;
        for (t, &load) in loads.iter().enumerate() {
            acc += load;
            if point < acc {
                return Some(t);
            }
        }
        None
    }

    fn is_ejected(&self, i: u32, now: u64) -> bool {
        self.backends[i as usize].ejected_until_ms.load(Relaxed) > now
    }

    /// Skip backend `i` for `eject_for_ms` after a failed connect.
    pub fn eject(&self, i: u32) {
        let now = now_ms();
        let b = &self.backends[i as usize];
        let before = b.ejected_until_ms.swap(now + self.eject_for_ms, Relaxed);
        if before <= now {
            warn!(service = %self.name, backend = %b.id, for_ms = self.eject_for_ms,
                "backend ejected after a failed connect");
        }
        self.refresh_spill(now);
    }

    pub fn ejected_now(&self, i: u32) -> bool {
        self.is_ejected(i, now_ms())
    }

    /// Recompute tier loads from the ejection deadlines. Concurrent refreshes compute the same
    /// answer from the same atomics, so the last store wins harmlessly.
    pub(crate) fn refresh_spill(&self, now: u64) -> Arc<Spill> {
        let mut health: Vec<TierHealth> = self
            .tiers
            .iter()
            .map(|t| TierHealth {
                healthy_weight: 0,
                total_weight: t.total_weight,
            })
            .collect();
        let mut any_ejected = false;
        let mut valid_until_ms = u64::MAX;
        for b in self.backends.iter() {
            let until = b.ejected_until_ms.load(Relaxed);
            if until > now {
                any_ejected = true;
                valid_until_ms = valid_until_ms.min(until);
            } else {
                health[b.tier as usize].healthy_weight += u64::from(b.weight);
            }
        }
        let spill = Arc::new(Spill {
            loads: tier_loads(&health, self.overprovisioning_pct).into(),
            any_ejected,
            valid_until_ms,
        });
        self.spill.store(spill.clone());
        spill
    }
}

/// The next usable backend of a tier in schedule order, or `None`.
fn walk(tier: &TierState, usable: impl Fn(u32) -> bool) -> Option<u32> {
    let len = tier.schedule.len();
    let start = tier.next.fetch_add(1, Relaxed);
    for k in 0..len.min(WALK) {
        let i = tier.schedule[(start + k) % len];
        if usable(i) {
            return Some(i);
        }
    }
    // A long run of unusable entries: scan the members once instead of the whole schedule.
    let n = tier.members.len();
    (0..n)
        .map(|k| tier.members[(start + k) % n])
        .find(|&i| usable(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Registry;
    use crate::snapshot::Snapshot;
    use rusty_shared::{validate, Backend, Service, Table};

    fn service(backends: &[(u32, u32)]) -> Snapshot {
        let backends = backends
            .iter()
            .enumerate()
            .map(|(i, &(w, p))| {
                Backend::new(format!("b{i}"), format!("127.0.0.1:{}", 9000 + i), w, p)
            })
            .collect();
        let t = validate(Table::new(1, vec![Service::new("web", backends)])).unwrap();
        Snapshot::build(t, &Registry::default())
    }

    fn counts(s: &ServiceState, n: usize) -> Vec<u32> {
        let mut c = vec![0; s.backends.len()];
        for _ in 0..n {
            c[s.pick(&[]).unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn weights_5_3_1_get_exactly_500_300_100_of_900_and_the_spare_nothing() {
        let snap = service(&[(5, 0), (3, 0), (1, 0), (1, 1)]);
        assert_eq!(counts(&snap.services[0], 900), vec![500, 300, 100, 0]);
    }

    #[test]
    fn sequential_picks_never_repeat_a_backend_another_could_take() {
        let snap = service(&[(2, 0), (1, 0), (1, 0), (1, 0), (1, 0)]);
        let s = &snap.services[0];
        let mut last = None;
        for _ in 0..600 {
            let i = s.pick(&[]);
            assert_ne!(i, last);
            last = i;
        }
    }

    #[test]
    fn half_of_tier_zero_ejected_spills_thirty_percent_to_tier_one() {
        let snap = service(&[(1, 0), (1, 0), (1, 1)]);
        let s = &snap.services[0];
        s.eject(0);
        let c = counts(s, 10_000);
        assert_eq!(c[0], 0);
        // 50 % healthy × 1.4 = 70 % stays on tier 0; the Weyl sequence is within a few per mille.
        assert!((6_950..=7_050).contains(&c[1]), "{c:?}");
        assert!((2_950..=3_050).contains(&c[2]), "{c:?}");
    }

    #[test]
    fn all_of_tier_zero_ejected_sends_everything_to_tier_one() {
        let snap = service(&[(1, 0), (1, 0), (1, 1)]);
        let s = &snap.services[0];
        s.eject(0);
        s.eject(1);
        assert_eq!(counts(s, 1_000), vec![0, 0, 1_000]);
    }

    #[test]
    fn one_ejected_backend_of_four_keeps_traffic_in_tier_zero() {
        let snap = service(&[(1, 0), (1, 0), (1, 0), (1, 0), (1, 1)]);
        let s = &snap.services[0];
        s.eject(2);
        let c = counts(s, 3_000);
        assert_eq!(c[2], 0);
        assert_eq!(c[4], 0, "75 % x 1.4 > 100 %: no spill");
        assert_eq!(c[0] + c[1] + c[3], 3_000);
    }

    #[test]
    fn retries_skip_backends_the_request_already_tried() {
        let snap = service(&[(1, 0), (1, 0), (1, 1)]);
        let s = &snap.services[0];
        let first = s.pick(&[]).unwrap();
        let second = s.pick(&[first]).unwrap();
        let third = s.pick(&[first, second]).unwrap();
        let mut all = vec![first, second, third];
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
        assert_eq!(s.pick(&[0, 1, 2]), None);
    }

    #[test]
    fn with_everything_ejected_backends_are_still_tried_once_each() {
        let snap = service(&[(1, 0), (1, 1)]);
        let s = &snap.services[0];
        s.eject(0);
        s.eject(1);
        let a = s.pick(&[]).unwrap();
        let b = s.pick(&[a]).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.pick(&[a, b]), None);
    }

    #[test]
    fn a_service_without_backends_picks_nothing() {
        let snap = service(&[]);
        assert_eq!(snap.services[0].pick(&[]), None);
    }

    #[test]
    fn ejections_expire_and_traffic_returns() {
        let mut svc = Service::new(
            "web",
            vec![
                Backend::new("a", "127.0.0.1:9000", 1, 0),
                Backend::new("spare", "127.0.0.1:9001", 1, 1),
            ],
        );
        svc.eject_ms = 20;
        let snap = Snapshot::build(
            validate(Table::new(1, vec![svc])).unwrap(),
            &Registry::default(),
        );
        let s = &snap.services[0];
        s.eject(0);
        assert!(s.ejected_now(0));
        assert_eq!(counts(s, 10), vec![0, 10]);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(counts(s, 100), vec![100, 0]);
        assert!(!s.spill.load().any_ejected);
    }

    #[test]
    fn a_new_table_keeps_the_ejections_of_backends_it_lists_unchanged() {
        let registry = Registry::default();
        let table = |v, b_addr: &str| {
            let backends = vec![
                Backend::new("a", "127.0.0.1:9000", 1, 0),
                Backend::new("b", b_addr, 1, 0),
                Backend::new("c", "127.0.0.1:9002", 1, 0),
            ];
            validate(Table::new(v, vec![Service::new("web", backends)])).unwrap()
        };
        let old = Snapshot::build(table(1, "127.0.0.1:9001"), &registry);
        old.services[0].eject(0);
        old.services[0].eject(1);
        // Version 2 lists `a` unchanged and `b` at a new address.
        let new = Snapshot::build_after(table(2, "127.0.0.1:9011"), &registry, Some(&old));
        let s = &new.services[0];
        assert!(s.ejected_now(0), "a is still failing as far as we know");
        assert!(!s.ejected_now(1), "b moved: a new backend in good standing");
        let c = counts(s, 10);
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1] > 0 && c[2] > 0, "{c:?}");
        // Without a previous table nothing is ejected.
        let fresh = Snapshot::build(table(3, "127.0.0.1:9001"), &registry);
        assert_eq!(counts(&fresh.services[0], 9), vec![3, 3, 3]);
    }
}
