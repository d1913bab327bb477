//! Picking a backend for one request: smooth weighted round robin within a tier, Envoy-style
//! spill across tiers, passive health by local ejection. A [`Balancer`] per service is built
//! when a table is installed and lives in its snapshot; every call that depends on time takes
//! `now`, so tests step time instead of sleeping. The fast path (nothing ejected) is one
//! `arc-swap` load, one relaxed `fetch_add` and an index; the slow path walks past ejected and
//! already-tried backends and, with nothing in good standing left, ignores ejections (Envoy's
//! panic mode). The rules are in `docs/dataplane.md` ("Selection").

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rusty_shared::spill::{tier_loads, TierHealth, FULL};
use rusty_shared::ValidTier;

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
    fn all_healthy(tiers: usize) -> Spill {
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

/// One priority tier: its smooth weighted round-robin cycle and where picks are in it.
#[derive(Debug)]
pub struct Tier {
    pub priority: u32,
    schedule: Box<[u32]>,
    /// The tier's backends, each once (for scans that must not loop over a long schedule).
    members: Box<[u32]>,
    total_weight: u64,
    /// Position in `schedule`: one relaxed `fetch_add` per pick.
    next: AtomicUsize,
}

/// Backend selection for one service of an installed table.
#[derive(Debug)]
pub struct Balancer {
    /// Non-empty tiers, most preferred first.
    tiers: Box<[Tier]>,
    weights: Box<[u32]>,
    /// Each backend's index in `tiers`.
    tier_of: Box<[u32]>,
    /// `now` until which each backend is skipped; 0 when in good standing.
    ejected_until_ms: Box<[AtomicU64]>,
    /// Read timeouts in a row per backend (reset by an answer).
    timeouts: Box<[AtomicU32]>,
    overprovisioning_pct: u32,
    eject_for_ms: u64,
    spill: ArcSwap<Spill>,
    /// Drives the choice of tier when traffic is split across tiers.
    tier_turn: AtomicU64,
}

/// How many schedule positions a pick walks before scanning the tier's members instead.
const WALK: usize = 16;

/// Read timeouts in a row that eject a backend: one can be a slow request, two in a row with
/// no answer between them is a backend (or a path to it) that does not answer. nginx takes
/// one (`max_fails=1` counts timeouts); Envoy's outlier detection five gateway failures.
pub const TIMEOUTS_TO_EJECT: u32 = 2;

impl Balancer {
    /// A balancer over `weights.len()` backends in `tiers` (as validated by `shared`), whose
    /// backends start ejected until `ejected_until_ms` (carried over from the table before).
    pub fn new(
        tiers: &[ValidTier],
        weights: Vec<u32>,
        ejected_until_ms: impl IntoIterator<Item = u64>,
        overprovisioning_pct: u32,
        eject_for_ms: u64,
        now: u64,
    ) -> Balancer {
        let mut tier_of = vec![0u32; weights.len()];
        let tiers: Box<[Tier]> = tiers
            .iter()
            .enumerate()
            .map(|(t, tier)| {
                for &m in &tier.members {
                    tier_of[m as usize] = t as u32;
                }
                Tier {
                    priority: tier.priority,
                    schedule: tier.schedule.clone().into(),
                    members: tier.members.clone().into(),
                    total_weight: tier.total_weight,
                    next: AtomicUsize::new(0),
                }
            })
            .collect();
        let ejected: Box<[AtomicU64]> = ejected_until_ms.into_iter().map(AtomicU64::new).collect();
        debug_assert_eq!(ejected.len(), weights.len());
        let carried = ejected.iter().any(|e| e.load(Relaxed) > now);
        let timeouts = (0..weights.len()).map(|_| AtomicU32::new(0)).collect();
        let b = Balancer {
            spill: ArcSwap::from_pointee(Spill::all_healthy(tiers.len())),
            tiers,
            weights: weights.into(),
            tier_of: tier_of.into(),
            ejected_until_ms: ejected,
            timeouts,
            overprovisioning_pct,
            eject_for_ms,
            tier_turn: AtomicU64::new(0),
        };
        if carried {
            b.refresh_spill(now);
        }
        b
    }

    /// Backends, counted.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The tiers, most preferred first.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// Every backend once, tier by tier (most preferred first).
    pub fn members(&self) -> impl Iterator<Item = u32> + '_ {
        self.tiers.iter().flat_map(|t| t.members.iter().copied())
    }

    /// The tier backend `i` is in.
    pub fn tier_of(&self, i: u32) -> u32 {
        self.tier_of[i as usize]
    }

    /// The backend for the next attempt of a request that already tried `tried`, or `None`
    /// when every backend has been tried.
    pub fn pick(&self, tried: &[u32], now: u64) -> Option<u32> {
        let spill = self.spill.load();
        if !spill.any_ejected {
            if let Some(tier) = self.tiers.first() {
                let i = tier.schedule[tier.next.fetch_add(1, Relaxed) % tier.schedule.len()];
                if !tried.contains(&i) {
                    return Some(i);
                }
            }
        }
        self.pick_slow(tried, now)
    }

    #[cold]
    fn pick_slow(&self, tried: &[u32], now: u64) -> Option<u32> {
        let mut spill = self.spill.load_full();
        if now >= spill.valid_until_ms {
            spill = self.refresh_spill(now);
        }
        let usable = |i: u32| !tried.contains(&i) && !self.ejected(i, now);
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

    /// Whether backend `i` is ejected at `now`.
    pub fn ejected(&self, i: u32, now: u64) -> bool {
        self.ejected_until_ms[i as usize].load(Relaxed) > now
    }

    /// Whether every backend is ejected at `now` (picks then ignore ejections).
    pub fn all_ejected(&self, now: u64) -> bool {
        (0..self.len() as u32).all(|i| self.ejected(i, now))
    }

    /// When backend `i`'s ejection ends (0: it is in good standing), for the next table.
    pub fn ejected_until(&self, i: u32) -> u64 {
        self.ejected_until_ms[i as usize].load(Relaxed)
    }

    /// Skip backend `i` for the service's eject time from `now`, after a failed connect. True
    /// when it was in good standing until now (a new ejection, worth a log line).
    pub fn eject(&self, i: u32, now: u64) -> bool {
        let before = self.ejected_until_ms[i as usize].swap(now + self.eject_for_ms, Relaxed);
        self.refresh_spill(now);
        before <= now
    }

    /// Backend `i` did not answer within the read timeout. Ejects it (true: newly) after
    /// [`TIMEOUTS_TO_EJECT`] in a row.
    pub fn timed_out(&self, i: u32, now: u64) -> bool {
        let n = self.timeouts[i as usize].fetch_add(1, Relaxed) + 1;
        if n < TIMEOUTS_TO_EJECT {
            return false;
        }
        self.timeouts[i as usize].store(0, Relaxed);
        self.eject(i, now)
    }

    /// Backend `i` answered: its run of timeouts is over.
    pub fn answered(&self, i: u32) {
        let t = &self.timeouts[i as usize];
        // Read first: the common case writes nothing (no cache line bouncing between threads).
        if t.load(Relaxed) != 0 {
            t.store(0, Relaxed);
        }
    }

    /// Recompute tier loads from the ejection deadlines. Concurrent refreshes compute the same
    /// answer from the same atomics, so the last store wins harmlessly.
    fn refresh_spill(&self, now: u64) -> Arc<Spill> {
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
        for (i, until) in self.ejected_until_ms.iter().enumerate() {
            let until = until.load(Relaxed);
            if until > now {
                any_ejected = true;
                valid_until_ms = valid_until_ms.min(until);
            } else {
                health[self.tier_of[i] as usize].healthy_weight += u64::from(self.weights[i]);
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

    /// Whether no backend is ejected as far as the current loads know.
    #[cfg(test)]
    fn nothing_ejected(&self) -> bool {
        !self.spill.load().any_ejected
    }
}

/// The next usable backend of a tier in schedule order, or `None`.
fn walk(tier: &Tier, usable: impl Fn(u32) -> bool) -> Option<u32> {
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
    use rusty_shared::{validate, Backend, Service, Table};

    const NOW: u64 = 1_000;

    fn balancer_with(backends: &[(u32, u32)], eject_ms: u64) -> Balancer {
        let backends = backends
            .iter()
            .enumerate()
            .map(|(i, &(w, p))| {
                Backend::new(format!("b{i}"), format!("127.0.0.1:{}", 9000 + i), w, p)
            })
            .collect();
        let mut svc = Service::new("web", backends);
        svc.eject_ms = eject_ms;
        let t = validate(Table::new(1, vec![svc])).unwrap();
        let s = &t.services[0];
        let weights = s.backends.iter().map(|b| b.weight).collect();
        Balancer::new(
            &s.tiers,
            weights,
            vec![0; s.backends.len()],
            s.overprovisioning_pct,
            s.eject_for.as_millis() as u64,
            NOW,
        )
    }

    fn balancer(backends: &[(u32, u32)]) -> Balancer {
        balancer_with(backends, 10_000)
    }

    fn counts(b: &Balancer, n: usize) -> Vec<u32> {
        let mut c = vec![0; b.len()];
        for _ in 0..n {
            c[b.pick(&[], NOW).unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn weights_5_3_1_get_exactly_500_300_100_of_900_and_the_spare_nothing() {
        let b = balancer(&[(5, 0), (3, 0), (1, 0), (1, 1)]);
        assert_eq!(counts(&b, 900), vec![500, 300, 100, 0]);
    }

    #[test]
    fn sequential_picks_never_repeat_a_backend_another_could_take() {
        let b = balancer(&[(2, 0), (1, 0), (1, 0), (1, 0), (1, 0)]);
        let mut last = None;
        for _ in 0..600 {
            let i = b.pick(&[], NOW);
            assert_ne!(i, last);
            last = i;
        }
    }

    #[test]
    fn half_of_tier_zero_ejected_spills_thirty_percent_to_tier_one() {
        let b = balancer(&[(1, 0), (1, 0), (1, 1)]);
        assert!(b.eject(0, NOW));
        let c = counts(&b, 10_000);
        assert_eq!(c[0], 0);
        // 50 % healthy × 1.4 = 70 % stays on tier 0; the Weyl sequence is within a few per mille.
        assert!((6_950..=7_050).contains(&c[1]), "{c:?}");
        assert!((2_950..=3_050).contains(&c[2]), "{c:?}");
    }

    #[test]
    fn all_of_tier_zero_ejected_sends_everything_to_tier_one() {
        let b = balancer(&[(1, 0), (1, 0), (1, 1)]);
        b.eject(0, NOW);
        b.eject(1, NOW);
        assert_eq!(counts(&b, 1_000), vec![0, 0, 1_000]);
    }

    #[test]
    fn one_ejected_backend_of_four_keeps_traffic_in_tier_zero() {
        let b = balancer(&[(1, 0), (1, 0), (1, 0), (1, 0), (1, 1)]);
        b.eject(2, NOW);
        let c = counts(&b, 3_000);
        assert_eq!(c[2], 0);
        assert_eq!(c[4], 0, "75 % x 1.4 > 100 %: no spill");
        assert_eq!(c[0] + c[1] + c[3], 3_000);
    }

    #[test]
    fn retries_skip_backends_the_request_already_tried() {
        let b = balancer(&[(1, 0), (1, 0), (1, 1)]);
        let first = b.pick(&[], NOW).unwrap();
        let second = b.pick(&[first], NOW).unwrap();
        let third = b.pick(&[first, second], NOW).unwrap();
        let mut all = vec![first, second, third];
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
        assert_eq!(b.pick(&[0, 1, 2], NOW), None);
    }

    #[test]
    fn with_everything_ejected_backends_are_still_tried_once_each() {
        let b = balancer(&[(1, 0), (1, 1)]);
        b.eject(0, NOW);
        b.eject(1, NOW);
        assert!(b.all_ejected(NOW));
        let x = b.pick(&[], NOW).unwrap();
        let y = b.pick(&[x], NOW).unwrap();
        assert_ne!(x, y);
        assert_eq!(b.pick(&[x, y], NOW), None);
    }

    #[test]
    fn a_service_without_backends_picks_nothing() {
        assert_eq!(balancer(&[]).pick(&[], NOW), None);
    }

    #[test]
    fn ejections_expire_and_traffic_returns() {
        let b = balancer_with(&[(1, 0), (1, 1)], 20);
        assert!(b.eject(0, NOW));
        assert!(!b.eject(0, NOW + 5), "already ejected: not a new ejection");
        assert!(b.ejected(0, NOW + 24));
        assert_eq!(counts(&b, 10), vec![0, 10]);
        let later = NOW + 30;
        assert!(!b.ejected(0, later));
        let mut c = vec![0; 2];
        for _ in 0..100 {
            c[b.pick(&[], later).unwrap() as usize] += 1;
        }
        assert_eq!(c, vec![100, 0]);
        assert!(b.nothing_ejected());
    }

    #[test]
    fn ejections_carried_into_a_new_balancer_steer_traffic_until_they_end() {
        let t = validate(Table::new(
            1,
            vec![Service::new(
                "web",
                vec![
                    Backend::new("a", "127.0.0.1:9000", 1, 0),
                    Backend::new("b", "127.0.0.1:9001", 1, 0),
                ],
            )],
        ))
        .unwrap();
        let s = &t.services[0];
        let b = Balancer::new(&s.tiers, vec![1, 1], [NOW + 50, 0], 140, 10_000, NOW);
        assert!(b.ejected(0, NOW));
        assert_eq!(counts(&b, 10), vec![0, 10]);
        assert_eq!(b.ejected_until(0), NOW + 50);
    }
}
