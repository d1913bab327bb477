//! Admission under overload: per-backend concurrency limits and one queue ordered by class.
//!
//! A service may cap the requests in flight per backend address (`max_inflight` in the table).
//! The cap belongs to the address, so services sharing a backend share its slots; an address
//! takes the smallest cap of the services that list it. While a backend has a free slot a
//! request takes it with one compare-and-swap: no lock, no allocation, and nothing at all for
//! addresses without a cap. When every backend a request may use is full it waits here, in a
//! queue shared by the whole data plane:
//!
//! - A freed slot goes straight to the waiting request of the **highest class** (`critical` > `normal` >
//!   `bulk`) that can use that backend, first come first served within a class.
//! - **Minimum share**: while lower classes wait, every [`SHARE_EVERY`]th slot handed over goes
//!   to the longest-waiting request of a class below the best one waiting. So a lower class gets
//!   at least 1 in 10 freed slots and is never starved, and a higher class at least 9 in 10.
//! - A request waits at most its service's `queue_timeout_ms`, then gets 503 with `Retry-After`.
//! - The queue holds at most `--queue-size` requests. When it is full, a newcomer of a higher
//!   class than the lowest one waiting takes the place of the **newest** request of that lowest
//!   class (which is shed: 503); otherwise the newcomer is shed.
//!
//! The choice of waiter and of victim are plain functions ([`choose`], [`victim`]) with unit
//! tests; the rest is bookkeeping under one mutex that only overloaded requests ever take.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusty_shared::RequestClass;
use tokio::sync::oneshot;

use crate::snapshot::Snapshot;

/// Every this many slots handed over while lower classes wait, one goes to a lower class.
pub const SHARE_EVERY: u64 = 10;

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
}

/// Queue metrics, by class (index = `RequestClass as usize`).
#[derive(Debug, Default)]
pub struct QueueStats {
    pub waiting: [AtomicI64; 3],
    pub wait_nanos: [AtomicU64; 3],
    pub waits: [AtomicU64; 3],
}

/// A request waiting for a slot.
struct Waiter {
    seq: u64,
    class: RequestClass,
    since: Instant,
    snapshot: Arc<Snapshot>,
    service: u32,
    /// Receives the index of the backend whose slot was handed over.
    grant: oneshot::Sender<u32>,
}

impl Waiter {
    /// The backend of this waiter's service that uses `limiter`, if any and if it is in good
    /// standing (an ejected one only when every backend of the service is ejected, as picks do).
    fn backend_for(&self, limiter: &Arc<Limiter>) -> Option<u32> {
        let svc = &self.snapshot.services[self.service as usize];
        let i = svc
            .backends
            .iter()
            .position(|b| b.limiter.as_ref().is_some_and(|l| Arc::ptr_eq(l, limiter)))?
            as u32;
        let usable =
            !svc.ejected_now(i) || (0..svc.backends.len() as u32).all(|j| svc.ejected_now(j));
        usable.then_some(i)
    }
}

#[derive(Default)]
struct Queue {
    /// In arrival order.
    waiters: VecDeque<Waiter>,
    next_seq: u64,
    handed: u64,
}

/// What happened to a request that found every backend full.
pub enum Admit {
    /// A slot came free while it queued up: this backend.
    Now(u32),
    /// It waits: a backend index arrives on the receiver (a dropped sender means it was shed to
    /// make room). Cancel with its sequence number on timeout.
    Wait(oneshot::Receiver<u32>, u64),
    /// The queue is full of requests of its class or higher.
    Shed,
}

pub struct Admission {
    queue: Mutex<Queue>,
    /// Requests in the queue, read by every release before it takes the lock.
    queued: AtomicUsize,
    capacity: AtomicUsize,
    limiters: Mutex<HashMap<SocketAddr, Arc<Limiter>>>,
    pub stats: QueueStats,
}

/// Default `--queue-size`.
pub const DEFAULT_QUEUE_SIZE: usize = 1024;

impl Default for Admission {
    fn default() -> Self {
        Admission {
            queue: Mutex::default(),
            queued: AtomicUsize::new(0),
            capacity: AtomicUsize::new(DEFAULT_QUEUE_SIZE),
            limiters: Mutex::default(),
            stats: QueueStats::default(),
        }
    }
}

impl Admission {
    /// Most requests the queue holds (at least 1).
    pub fn set_capacity(&self, n: usize) {
        self.capacity.store(n.max(1), Ordering::Relaxed);
    }

    /// Limiters for a table being installed: one per capped address (`limits`: address → the
    /// smallest cap of the services that list it). Limiters live across tables, so requests in
    /// flight under the old table count against the new one's caps.
    pub fn limiters_for(
        &self,
        limits: &HashMap<SocketAddr, u32>,
    ) -> HashMap<SocketAddr, Arc<Limiter>> {
        let mut all = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|addr, l| limits.contains_key(addr) || l.inflight() > 0);
        // Each address goes straight from its old cap to its new one; only addresses no
        // service caps any more lose theirs.
        for (addr, l) in all.iter() {
            if !limits.contains_key(addr) {
                l.limit.store(0, Ordering::Relaxed);
            }
        }
        let now: HashMap<SocketAddr, Arc<Limiter>> = limits
            .iter()
            .map(|(addr, &limit)| {
                let l = all.entry(*addr).or_default().clone();
                l.limit.store(limit, Ordering::Relaxed);
                (*addr, l)
            })
            .collect();
        // A cap that rose, or went away, frees slots that waiters are owed now.
        if self.queued.load(Ordering::SeqCst) > 0 {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            for l in all.values() {
                self.fill(&mut q, l);
            }
        }
        now
    }

    /// Every backend of the service is full: queue up (or, if a slot freed meanwhile, take it).
    pub fn enqueue(&self, snapshot: &Arc<Snapshot>, service: u32, class: RequestClass) -> Admit {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // Announce before the last look, so a release either sees us waiting or we see its slot.
        self.queued.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let svc = &snapshot.services[service as usize];
        for (i, b) in svc.backends.iter().enumerate() {
            if svc.ejected_now(i as u32) {
                continue;
            }
            if b.limiter.as_ref().is_some_and(|l| l.try_acquire()) {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                return Admit::Now(i as u32);
            }
        }
        if q.waiters.len() >= self.capacity.load(Ordering::Relaxed) {
            let classes: Vec<RequestClass> = q.waiters.iter().map(|w| w.class).collect();
            match victim(&classes, class) {
                Some(v) => {
                    let shed = q.waiters.remove(v).expect("victim index is in range");
                    self.left(&shed, false);
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    // Dropping its sender tells the victim it was shed.
                }
                None => {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    return Admit::Shed;
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let seq = q.next_seq;
        q.next_seq += 1;
        q.waiters.push_back(Waiter {
            seq,
            class,
            since: Instant::now(),
            snapshot: snapshot.clone(),
            service,
            grant: tx,
        });
        self.stats.waiting[class as usize].fetch_add(1, Ordering::Relaxed);
        Admit::Wait(rx, seq)
    }

    /// A waiter gave up (timeout, or its client left). True if it was still queued; false if a
    /// slot was handed to it meanwhile (the caller then owns that slot).
    pub fn cancel(&self, seq: u64) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match q.waiters.iter().position(|w| w.seq == seq) {
            Some(i) => {
                let w = q.waiters.remove(i).expect("position is in range");
                self.left(&w, false);
                self.queued.fetch_sub(1, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Give back a slot: to the best waiter that can use it, else to the limiter.
    pub fn release(&self, limiter: &Arc<Limiter>) {
        // Waiters first: the slot goes straight to one and never passes through the counter,
        // where a newcomer could take it ahead of the queue.
        if self.queued.load(Ordering::SeqCst) > 0 {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if self.hand_over(&mut q, limiter) {
                return;
            }
        }
        limiter.inflight.fetch_sub(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // A request that queued after the look above either saw this slot free when it last
        // tried, or is seen here.
        if self.queued.load(Ordering::SeqCst) > 0 {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            self.fill(&mut q, limiter);
        }
    }

    /// Give a slot of `limiter` that the caller holds to the best waiter that can use it.
    /// False when none can (the caller still holds the slot).
    fn hand_over(&self, q: &mut Queue, limiter: &Arc<Limiter>) -> bool {
        loop {
            let eligible: Vec<(RequestClass, Option<u32>)> = q
                .waiters
                .iter()
                .map(|w| (w.class, w.backend_for(limiter)))
                .collect();
            let classes: Vec<(RequestClass, bool)> =
                eligible.iter().map(|(c, b)| (*c, b.is_some())).collect();
            let Some(pick) = choose(&classes, q.handed) else {
                return false;
            };
            let w = q.waiters.remove(pick).expect("chosen index is in range");
            self.queued.fetch_sub(1, Ordering::SeqCst);
            q.handed += 1;
            self.left(&w, true);
            let backend = eligible[pick]
                .1
                .expect("chosen waiters can use the backend");
            if w.grant.send(backend).is_ok() {
                return true;
            }
            // Its request is gone (the client left): the next waiter.
        }
    }

    /// Hand free slots of `limiter` to waiters while there are both.
    fn fill(&self, q: &mut Queue, limiter: &Arc<Limiter>) {
        while q.waiters.iter().any(|w| w.backend_for(limiter).is_some()) && limiter.try_acquire() {
            if !self.hand_over(q, limiter) {
                limiter.inflight.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        }
    }

    /// Requests waiting now (a hint for the fast path: while any wait, newcomers queue too).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    fn left(&self, w: &Waiter, served: bool) {
        let c = w.class as usize;
        self.stats.waiting[c].fetch_sub(1, Ordering::Relaxed);
        if served {
            self.stats.wait_nanos[c]
                .fetch_add(w.since.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.stats.waits[c].fetch_add(1, Ordering::Relaxed);
        }
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
    use crate::metrics::Registry;
    use RequestClass::*;

    /// A one-service snapshot whose one backend takes `cap` requests at a time.
    fn snapshot(registry: &Registry, version: u64, cap: u32) -> Arc<Snapshot> {
        let text = format!(
            r#"{{"version": {version}, "services": [{{"name": "s", "max_inflight": {cap},
                "backends": [{{"id": "a", "addr": "127.0.0.1:1"}}]}}]}}"#
        );
        let valid = rusty_shared::validate(rusty_shared::decode(text.as_bytes()).unwrap()).unwrap();
        Arc::new(Snapshot::build(valid, registry))
    }

    fn wait(
        a: &Admission,
        snap: &Arc<Snapshot>,
        class: RequestClass,
    ) -> (oneshot::Receiver<u32>, u64) {
        match a.enqueue(snap, 0, class) {
            Admit::Wait(rx, seq) => (rx, seq),
            Admit::Now(_) => panic!("a slot was free"),
            Admit::Shed => panic!("shed"),
        }
    }

    #[test]
    fn a_freed_slot_goes_straight_to_the_best_waiter_and_cannot_be_taken_on_the_way() {
        let registry = Registry::default();
        let snap = snapshot(&registry, 1, 1);
        let a = &registry.admission;
        let limiter = snap.services[0].backends[0].limiter.clone().unwrap();
        assert!(limiter.try_acquire());
        let (mut bulk, _) = wait(a, &snap, Bulk);
        let (mut crit, _) = wait(a, &snap, Critical);
        assert_eq!(a.stats.waiting[Bulk as usize].load(Ordering::Relaxed), 1);

        a.release(&limiter);
        assert_eq!(crit.try_recv(), Ok(0), "critical first");
        assert!(bulk.try_recv().is_err());
        // Handed over, not freed: a newcomer cannot slip in.
        assert_eq!(limiter.inflight(), 1);
        assert!(!limiter.try_acquire());

        a.release(&limiter);
        assert_eq!(bulk.try_recv(), Ok(0));
        a.release(&limiter);
        assert_eq!(limiter.inflight(), 0);
        assert_eq!(a.queued(), 0);
        assert_eq!(a.stats.waiting[Bulk as usize].load(Ordering::Relaxed), 0);
        assert_eq!(a.stats.waits[Critical as usize].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_raised_cap_serves_waiters_at_once() {
        let registry = Registry::default();
        let old = snapshot(&registry, 1, 1);
        let a = &registry.admission;
        let limiter = old.services[0].backends[0].limiter.clone().unwrap();
        assert!(limiter.try_acquire());
        let (mut rx, _) = wait(a, &old, Normal);
        // Version 2 doubles the cap: the waiter gets the new slot without any release.
        let new = snapshot(&registry, 2, 2);
        assert!(Arc::ptr_eq(
            new.services[0].backends[0].limiter.as_ref().unwrap(),
            &limiter
        ));
        assert_eq!(rx.try_recv(), Ok(0));
        assert_eq!(limiter.inflight(), 2);
    }

    #[test]
    fn a_waiter_that_gives_up_leaves_nothing_behind() {
        let registry = Registry::default();
        let snap = snapshot(&registry, 1, 1);
        let a = &registry.admission;
        let limiter = snap.services[0].backends[0].limiter.clone().unwrap();
        assert!(limiter.try_acquire());
        let (_rx, seq) = wait(a, &snap, Normal);
        assert!(a.cancel(seq));
        assert!(!a.cancel(seq));
        assert_eq!(a.queued(), 0);
        assert_eq!(a.stats.waiting[Normal as usize].load(Ordering::Relaxed), 0);
        // A waiter whose request is gone is skipped: the slot goes to the counter.
        let (rx, _) = wait(a, &snap, Normal);
        drop(rx);
        a.release(&limiter);
        assert_eq!(limiter.inflight(), 0);
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn a_full_queue_makes_room_for_a_higher_class_by_shedding_the_newest_lowest() {
        let registry = Registry::default();
        registry.admission.set_capacity(2);
        let snap = snapshot(&registry, 1, 1);
        let a = &registry.admission;
        let limiter = snap.services[0].backends[0].limiter.clone().unwrap();
        assert!(limiter.try_acquire());
        let (mut first, _) = wait(a, &snap, Bulk);
        let (mut second, _) = wait(a, &snap, Bulk);
        assert!(matches!(a.enqueue(&snap, 0, Bulk), Admit::Shed));
        let (mut crit, _) = wait(a, &snap, Critical);
        assert!(matches!(
            second.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(first.try_recv().is_err());
        a.release(&limiter);
        assert_eq!(crit.try_recv(), Ok(0));
    }

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
        l.limit.store(2, Ordering::Relaxed);
        assert!(l.try_acquire());
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
        l.inflight.fetch_sub(1, Ordering::SeqCst);
        assert!(l.try_acquire());
        // Unlimited: counts, never refuses.
        let u = Limiter::default();
        assert!((0..100).all(|_| u.try_acquire()));
        assert_eq!(u.inflight(), 100);
    }
}
