//! The overload queue: requests waiting for a backend slot, shared by the whole data plane.
//!
//! When every backend a request may use is at its cap (`admission`), the request waits here
//! for at most its service's `queue_timeout`, then gets 503 with `Retry-After`. A freed slot
//! goes straight to the waiter [`admission::choose`] picks, never through the counter where a
//! newcomer could take it; a full queue (`--queue-size`) sheds whom [`admission::victim`]
//! names. The slots of capped addresses live here too, across tables, so requests in flight
//! under the old table count against the new one's caps. Bookkeeping under one mutex that only
//! overloaded requests ever take; the pipeline drives it through [`Queue::acquire`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramVec, IntGauge, IntGaugeVec};
use rusty_shared::RequestClass;
use tokio::sync::oneshot;

use crate::admission::{self, Limiter, DEFAULT_QUEUE_SIZE};
use crate::metrics::{gauge_vec, histogram_vec};
use crate::snapshot::Snapshot;

/// Queue metrics, by class (index = `RequestClass as usize`).
pub struct QueueStats {
    waiting_family: IntGaugeVec,
    wait_family: HistogramVec,
    pub waiting: [IntGauge; 3],
    /// How long requests that got a slot waited for it.
    pub wait: [Histogram; 3],
}

/// Queue wait buckets, in seconds: from a slot freed at once to the longest queue timeout.
const WAIT_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Default for QueueStats {
    fn default() -> Self {
        let waiting_family = gauge_vec(
            "rustybalancer_queue_waiting",
            "Requests waiting for a backend slot, by class.",
            &["class"],
        );
        let wait_family = histogram_vec(
            "rustybalancer_queue_wait_seconds",
            "Time requests that got a slot spent waiting for it, by class.",
            &["class"],
            &WAIT_BUCKETS,
        );
        QueueStats {
            waiting: RequestClass::ALL.map(|c| waiting_family.with_label_values(&[c.as_str()])),
            wait: RequestClass::ALL.map(|c| wait_family.with_label_values(&[c.as_str()])),
            waiting_family,
            wait_family,
        }
    }
}

impl QueueStats {
    /// The queue metrics, for the registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.waiting_family.clone()),
            Box::new(self.wait_family.clone()),
        ]
    }
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
    fn backend_for(&self, limiter: &Arc<Limiter>, now: u64) -> Option<u32> {
        let svc = &self.snapshot.services[self.service as usize];
        let i = svc
            .backends
            .iter()
            .position(|b| b.limiter.as_ref().is_some_and(|l| Arc::ptr_eq(l, limiter)))?
            as u32;
        let usable = !svc.balancer.ejected(i, now) || svc.balancer.all_ejected(now);
        usable.then_some(i)
    }
}

#[derive(Default)]
struct Waiters {
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

pub struct Queue {
    waiters: Mutex<Waiters>,
    /// Requests in the queue, read by every release before it takes the lock.
    queued: AtomicUsize,
    capacity: AtomicUsize,
    limiters: Mutex<HashMap<SocketAddr, Arc<Limiter>>>,
    pub stats: QueueStats,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            waiters: Mutex::default(),
            queued: AtomicUsize::new(0),
            capacity: AtomicUsize::new(DEFAULT_QUEUE_SIZE),
            limiters: Mutex::default(),
            stats: QueueStats::default(),
        }
    }
}

impl Queue {
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
        now: u64,
    ) -> HashMap<SocketAddr, Arc<Limiter>> {
        let mut all = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|addr, l| limits.contains_key(addr) || l.inflight() > 0);
        // Each address goes straight from its old cap to its new one; only addresses no
        // service caps any more lose theirs.
        for (addr, l) in all.iter() {
            if !limits.contains_key(addr) {
                l.set_limit(0);
            }
        }
        let installed: HashMap<SocketAddr, Arc<Limiter>> = limits
            .iter()
            .map(|(addr, &limit)| {
                let l = all.entry(*addr).or_default().clone();
                l.set_limit(limit);
                (*addr, l)
            })
            .collect();
        // A cap that rose, or went away, frees slots that waiters are owed now.
        if self.queued.load(Ordering::SeqCst) > 0 {
            let mut q = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            for l in all.values() {
                self.fill(&mut q, l, now);
            }
        }
        installed
    }

    /// Every backend of the service is full: queue up (or, if a slot freed meanwhile, take it).
    pub fn enqueue(
        &self,
        snapshot: &Arc<Snapshot>,
        service: u32,
        class: RequestClass,
        now: u64,
    ) -> Admit {
        let mut q = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Announce before the last look, so a release either sees us waiting or we see its slot.
        self.queued.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let svc = &snapshot.services[service as usize];
        for (i, b) in svc.backends.iter().enumerate() {
            if svc.balancer.ejected(i as u32, now) {
                continue;
            }
            if b.limiter.as_ref().is_some_and(|l| l.try_acquire()) {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                return Admit::Now(i as u32);
            }
        }
        if q.waiters.len() >= self.capacity.load(Ordering::Relaxed) {
            let classes: Vec<RequestClass> = q.waiters.iter().map(|w| w.class).collect();
            match admission::victim(&classes, class) {
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
        self.stats.waiting[class as usize].inc();
        Admit::Wait(rx, seq)
    }

    /// A waiter gave up (timeout, or its client left). True if it was still queued; false if a
    /// slot was handed to it meanwhile (the caller then owns that slot).
    pub fn cancel(&self, seq: u64) -> bool {
        let mut q = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
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
    pub fn release(&self, limiter: &Arc<Limiter>, now: u64) {
        // Waiters first: the slot goes straight to one and never passes through the counter,
        // where a newcomer could take it ahead of the queue.
        if self.queued.load(Ordering::SeqCst) > 0 {
            let mut q = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if self.hand_over(&mut q, limiter, now) {
                return;
            }
        }
        limiter.give_back();
        fence(Ordering::SeqCst);
        // A request that queued after the look above either saw this slot free when it last
        // tried, or is seen here.
        if self.queued.load(Ordering::SeqCst) > 0 {
            let mut q = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            self.fill(&mut q, limiter, now);
        }
    }

    /// Give a slot of `limiter` that the caller holds to the best waiter that can use it.
    /// False when none can (the caller still holds the slot).
    fn hand_over(&self, q: &mut Waiters, limiter: &Arc<Limiter>, now: u64) -> bool {
        loop {
            let eligible: Vec<(RequestClass, Option<u32>)> = q
                .waiters
                .iter()
                .map(|w| (w.class, w.backend_for(limiter, now)))
                .collect();
            let classes: Vec<(RequestClass, bool)> =
                eligible.iter().map(|(c, b)| (*c, b.is_some())).collect();
            let Some(pick) = admission::choose(&classes, q.handed) else {
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
    fn fill(&self, q: &mut Waiters, limiter: &Arc<Limiter>, now: u64) {
        while q
            .waiters
            .iter()
            .any(|w| w.backend_for(limiter, now).is_some())
            && limiter.try_acquire()
        {
            if !self.hand_over(q, limiter, now) {
                limiter.give_back();
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
        self.stats.waiting[c].dec();
        if served {
            self.stats.wait[c].observe(w.since.elapsed().as_secs_f64());
        }
    }

    /// A slot for this attempt of a request to a service with capped backends: on `first` (the
    /// round robin's pick) if it has one free, else on any other backend not yet `tried`, else
    /// one handed over in the queue by class. The backend whose slot it is, or `None` when the
    /// request is shed (queue full, or its service's queue timeout passed).
    pub async fn acquire(
        &self,
        snap: &Arc<Snapshot>,
        service: u32,
        class: RequestClass,
        first: u32,
        tried: &[u32],
        now: u64,
    ) -> Option<u32> {
        let svc = &snap.services[service as usize];
        let free = |i: u32| {
            svc.backends[i as usize]
                .limiter
                .as_ref()
                .is_none_or(|l| l.try_acquire())
        };
        let others = svc
            .balancer
            .members()
            .filter(|&i| i != first && !tried.contains(&i) && !svc.balancer.ejected(i, now));
        // While requests wait, a newcomer queues behind them (and is served at once if a slot
        // is free that none of them can use).
        if self.queued() == 0 {
            if let Some(i) = std::iter::once(first).chain(others).find(|&i| free(i)) {
                return Some(i);
            }
        }
        match self.enqueue(snap, service, class, now) {
            Admit::Now(i) => Some(i),
            Admit::Shed => None,
            Admit::Wait(rx, seq) => {
                let mut wait = Waiting {
                    queue: self,
                    snap,
                    service,
                    seq,
                    rx: Some(rx),
                };
                wait.granted(svc.queue_timeout).await
            }
        }
    }
}

/// A request in the queue. If it is dropped while waiting (the client went away), it leaves
/// the queue, and a slot handed to it in the meantime goes back.
struct Waiting<'a> {
    queue: &'a Queue,
    snap: &'a Arc<Snapshot>,
    service: u32,
    seq: u64,
    rx: Option<oneshot::Receiver<u32>>,
}

impl Waiting<'_> {
    /// The backend whose slot was handed over, or `None` if shed or timed out.
    async fn granted(&mut self, timeout: Duration) -> Option<u32> {
        let rx = self.rx.as_mut()?;
        let got = match tokio::time::timeout(timeout, &mut *rx).await {
            Ok(Ok(i)) => Some(i),
            // The sender was dropped: shed to make room for a higher class.
            Ok(Err(_)) => None,
            // Timed out, unless a slot arrived just now (then it is already ours).
            Err(_) if self.queue.cancel(self.seq) => None,
            Err(_) => rx.try_recv().ok(),
        };
        self.rx = None;
        got
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        if !self.queue.cancel(self.seq) {
            if let Ok(i) = rx.try_recv() {
                let svc = &self.snap.services[self.service as usize];
                if let Some(limiter) = &svc.backends[i as usize].limiter {
                    // Dropped outside any request: the clock is read here.
                    self.queue.release(limiter, crate::clock::now_ms());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Registry;
    use RequestClass::*;

    const NOW: u64 = 1_000;

    /// A one-service snapshot whose one backend takes `cap` requests at a time, with its slots
    /// from `queue` as the store takes them.
    fn snapshot(queue: &Queue, version: u64, cap: u32) -> Arc<Snapshot> {
        let text = format!(
            r#"{{"version": {version}, "services": [{{"name": "s", "max_inflight": {cap},
                "backends": [{{"id": "a", "addr": "127.0.0.1:1"}}]}}]}}"#
        );
        let valid = rusty_shared::validate(rusty_shared::decode(text.as_bytes()).unwrap()).unwrap();
        let limiters = queue.limiters_for(&crate::snapshot::caps(&valid), NOW);
        Arc::new(Snapshot::build(
            valid,
            &Registry::default(),
            &limiters,
            &[],
            None,
            NOW,
        ))
    }

    fn wait(a: &Queue, snap: &Arc<Snapshot>, class: RequestClass) -> (oneshot::Receiver<u32>, u64) {
        match a.enqueue(snap, 0, class, NOW) {
            Admit::Wait(rx, seq) => (rx, seq),
            Admit::Now(_) => panic!("a slot was free"),
            Admit::Shed => panic!("shed"),
        }
    }

    #[test]
    fn a_freed_slot_goes_straight_to_the_best_waiter_and_cannot_be_taken_on_the_way() {
        let a = &Queue::default();
        let snap = snapshot(a, 1, 1);
        let limiter = snap.services[0].backends[0].limiter.clone().unwrap();
        assert!(limiter.try_acquire());
        let (mut bulk, _) = wait(a, &snap, Bulk);
        let (mut crit, _) = wait(a, &snap, Critical);
        assert_eq!(a.stats.waiting[Bulk as usize].get(), 1);

        a.release(&limiter, NOW);
        assert_eq!(crit.try_recv(), Ok(0), "critical first");
        assert!(bulk.try_recv().is_err());
        // Handed over, not freed: a newcomer cannot slip in.
        assert_eq!(limiter.inflight(), 1);
        assert!(!limiter.try_acquire());

        a.release(&limiter, NOW);
        assert_eq!(bulk.try_recv(), Ok(0));
        a.release(&limiter, NOW);
        assert_eq!(limiter.inflight(), 0);
        assert_eq!(a.queued(), 0);
        assert_eq!(a.stats.waiting[Bulk as usize].get(), 0);
        assert_eq!(a.stats.wait[Critical as usize].get_sample_count(), 1);
    }

    #[test]
    fn a_raised_cap_serves_waiters_at_once() {
        let a = &Queue::default();
        let old = snapshot(a, 1, 1);
        let limiter = old.services[0].backends[0].limiter.clone().unwrap();
        assert!(limiter.try_acquire());
        let (mut rx, _) = wait(a, &old, Normal);
        // Version 2 doubles the cap: the waiter gets the new slot without any release.
        let new = snapshot(a, 2, 2);
        assert!(Arc::ptr_eq(
            new.services[0].backends[0].limiter.as_ref().unwrap(),
            &limiter
        ));
        assert_eq!(rx.try_recv(), Ok(0));
        assert_eq!(limiter.inflight(), 2);
    }

    #[test]
    fn a_waiter_that_gives_up_leaves_nothing_behind() {
        let a = &Queue::default();
        let snap = snapshot(a, 1, 1);
        let limiter = snap.services[0].backends[0].limiter.clone().unwrap();
        assert!(limiter.try_acquire());
        let (_rx, seq) = wait(a, &snap, Normal);
        assert!(a.cancel(seq));
        assert!(!a.cancel(seq));
        assert_eq!(a.queued(), 0);
        assert_eq!(a.stats.waiting[Normal as usize].get(), 0);
        // A waiter whose request is gone is skipped: the slot goes to the counter.
        let (rx, _) = wait(a, &snap, Normal);
        drop(rx);
        a.release(&limiter, NOW);
        assert_eq!(limiter.inflight(), 0);
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn a_full_queue_makes_room_for_a_higher_class_by_shedding_the_newest_lowest() {
        let a = &Queue::default();
        a.set_capacity(2);
        let snap = snapshot(a, 1, 1);
        let limiter = snap.services[0].backends[0].limiter.clone().unwrap();
        assert!(limiter.try_acquire());
        let (mut first, _) = wait(a, &snap, Bulk);
        let (mut second, _) = wait(a, &snap, Bulk);
        assert!(matches!(a.enqueue(&snap, 0, Bulk, NOW), Admit::Shed));
        let (mut crit, _) = wait(a, &snap, Critical);
        assert!(matches!(
            second.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(first.try_recv().is_err());
        a.release(&limiter, NOW);
        assert_eq!(crit.try_recv(), Ok(0));
    }
}
