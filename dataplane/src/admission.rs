//! Admission under overload, the decisions: a backend address's concurrency slots
//! ([`Limiter`], one compare-and-swap) and, for the overload queue (`queue`), who gets a freed
//! slot ([`choose`]: highest class first, but every [`SHARE_EVERY`]th to a lower class) and whom
//! a full queue sheds ([`victim`]: the newest of the lowest class below the newcomer). Pure
//! functions and atomics: no clock, no I/O, no lock. The rules are in `docs/dataplane.md`
//! ("Priorities under overload").

use std::sync::atomic::{AtomicU32, Ordering};

use rusty_shared::RequestClass;

/// Every this many slots handed over while lower classes wait, one goes to a lower class.
pub const SHARE_EVERY: u64 = 10;

/// Default `--queue-size`.
pub const DEFAULT_QUEUE_SIZE: usize = 1024;

/// Slots of one backend address.
#[derive(Debug, Default)]
pub struct Limiter {
    inflight: AtomicU32,
    /// 0 while no installed service caps this address.
    limit: AtomicU32,
}

impl Limiter {
    /// Take a slot if one is free.
    pub fn try_acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut cur = self.inflight.load(Ordering::Relaxed);
        loop {
            if limit != 0 && cur >= limit {
                return false;
            }
            match self.inflight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Give a slot back to the counter (the queue hands it to a waiter instead when one can
    /// use it).
    pub fn give_back(&self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    /// The cap of this address from now on (0: none).
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }
}

/// Which waiter gets a freed slot: `waiters` in arrival order as (class, can use the slot).
/// Highest class first, then arrival; but every `SHARE_EVERY`th hand-over (`handed` so far)
/// goes to the oldest eligible waiter of a lower class than the best, if there is one.
pub fn choose(waiters: &[(RequestClass, bool)], handed: u64) -> Option<usize> {
    let best = waiters
        .iter()
        .enumerate()
        .filter(|(_, (_, ok))| *ok)
        .max_by_key(|(i, (class, _))| (*class, std::cmp::Reverse(*i)))?;
    if handed % SHARE_EVERY == SHARE_EVERY - 1 {
        let top = best.1 .0;
        if let Some((i, _)) = waiters
            .iter()
            .enumerate()
            .find(|(_, (class, ok))| *ok && *class < top)
        {
            return Some(i);
        }
    }
    Some(best.0)
}

/// The queue is full and a request of `class` arrives: the index of the waiter to shed for it
/// (the newest of the lowest class, if that class is lower than the newcomer's), or `None` to
/// shed the newcomer.
pub fn victim(waiters: &[RequestClass], class: RequestClass) -> Option<usize> {
    let lowest = *waiters.iter().min()?;
    if lowest >= class {
        return None;
    }
    waiters.iter().rposition(|c| *c == lowest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use RequestClass::*;

    #[test]
    fn the_highest_class_goes_first_then_arrival_order() {
        let w = [
            (Bulk, true),
            (Normal, true),
            (Critical, true),
            (Critical, true),
        ];
        assert_eq!(choose(&w, 0), Some(2));
        // Only waiters that can use the freed backend count.
        let w = [
            (Bulk, true),
            (Critical, false),
            (Normal, true),
            (Normal, true),
        ];
        assert_eq!(choose(&w, 0), Some(2));
        assert_eq!(choose(&[(Critical, false)], 0), None);
        assert_eq!(choose(&[], 0), None);
    }

    #[test]
    fn lower_classes_get_one_slot_in_ten_while_they_wait() {
        // A steady mix: critical and bulk always waiting. Count who gets 1,000 slots.
        let w = [
            (Bulk, true),
            (Critical, true),
            (Bulk, true),
            (Critical, true),
        ];
        let mut got = [0u32; 3];
        for handed in 0..1000 {
            let i = choose(&w, handed).unwrap();
            got[w[i].0 as usize] += 1;
        }
        assert_eq!(got[Bulk as usize], 100);
        assert_eq!(got[Critical as usize], 900);
        // The share goes to the oldest lower-class waiter.
        assert_eq!(choose(&w, SHARE_EVERY - 1), Some(0));
        // With one class waiting, it gets every slot.
        let only = [(Bulk, true), (Bulk, true)];
        assert!((0..100).all(|h| choose(&only, h) == Some(0)));
    }

    #[test]
    fn a_full_queue_sheds_the_newest_of_the_lowest_class_below_the_newcomer() {
        let w = [Normal, Bulk, Critical, Bulk, Normal];
        assert_eq!(victim(&w, Critical), Some(3));
        assert_eq!(victim(&w, Normal), Some(3));
        // A newcomer no better than everyone waiting is the one shed.
        assert_eq!(victim(&w, Bulk), None);
        assert_eq!(victim(&[Critical, Critical], Critical), None);
        assert_eq!(victim(&[Normal, Critical], Critical), Some(0));
    }

    #[test]
    fn a_limiter_hands_out_at_most_its_limit() {
        let l = Limiter::default();
        l.set_limit(2);
        assert!(l.try_acquire());
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
        l.give_back();
        assert!(l.try_acquire());
        // Unlimited: counts, never refuses.
        let u = Limiter::default();
        assert!((0..100).all(|_| u.try_acquire()));
        assert_eq!(u.inflight(), 100);
    }

    fn class() -> impl Strategy<Value = RequestClass> {
        prop_oneof![Just(Bulk), Just(Normal), Just(Critical)]
    }

    proptest! {
        #[test]
        fn the_chosen_waiter_is_the_best_eligible_or_the_oldest_lower_on_a_share_turn(
            waiters in proptest::collection::vec((class(), any::<bool>()), 0..12),
            handed in 0u64..1000,
        ) {
            let eligible: Vec<(usize, RequestClass)> = waiters
                .iter()
                .enumerate()
                .filter(|(_, (_, ok))| *ok)
                .map(|(i, (c, _))| (i, *c))
                .collect();
            let got = choose(&waiters, handed);
            let Some(&(_, top)) = eligible.iter().max_by_key(|(_, c)| *c) else {
                prop_assert_eq!(got, None);
                return Ok(());
            };
            let i = got.expect("someone eligible");
            prop_assert!(waiters[i].1, "chose a waiter that cannot use the slot");
            let oldest_lower = eligible.iter().find(|(_, c)| *c < top).map(|(i, _)| *i);
            let oldest_top = eligible.iter().find(|(_, c)| *c == top).map(|(i, _)| *i);
            if handed % SHARE_EVERY == SHARE_EVERY - 1 && oldest_lower.is_some() {
                prop_assert_eq!(Some(i), oldest_lower);
            } else {
                prop_assert_eq!(Some(i), oldest_top);
            }
        }

        #[test]
        fn while_two_classes_wait_each_run_of_ten_slots_gives_the_lower_one_and_the_top_nine(
            waiters in proptest::collection::vec(class(), 2..10),
            start in 0u64..10_000,
        ) {
            let w: Vec<(RequestClass, bool)> = waiters.iter().map(|c| (*c, true)).collect();
            let top = *waiters.iter().max().expect("non-empty");
            prop_assume!(waiters.iter().any(|c| *c < top));
            let picks: Vec<RequestClass> = (start..start + SHARE_EVERY)
                .map(|h| w[choose(&w, h).expect("all eligible")].0)
                .collect();
            prop_assert_eq!(picks.iter().filter(|c| **c < top).count(), 1);
            prop_assert_eq!(picks.iter().filter(|c| **c == top).count(), 9);
        }

        #[test]
        fn a_full_queue_sheds_only_a_lower_class_and_then_its_newest(
            waiters in proptest::collection::vec(class(), 0..12),
            newcomer in class(),
        ) {
            match victim(&waiters, newcomer) {
                None => prop_assert!(waiters.iter().all(|c| *c >= newcomer)),
                Some(v) => {
                    let lowest = *waiters.iter().min().expect("someone to shed");
                    prop_assert!(lowest < newcomer);
                    prop_assert_eq!(waiters[v], lowest);
                    prop_assert!(waiters[v + 1..].iter().all(|c| *c != lowest));
                }
            }
        }
    }
}
