//! The attempt core: the one policy for how a routed request meets its backends, driven by
//! every request path (the fast lane and the pipeline today, TLS and HTTP/2 next).
//!
//! A [`Routed`] request holds the table it was routed by and decides, without I/O: the
//! backend for the next attempt within the service's retry budget ([`Routed::next`]), what a
//! failed attempt means ([`Routed::fail`]: a failed connect ejects the backend and lets any
//! method go elsewhere; a backend that took the request may only be retried when the request
//! can be replayed), the answer when no attempt is left ([`Routed::answer`]), and the
//! accounting: the request is in flight while the value lives and is counted exactly once —
//! by [`Routed::end`], or as 499 if it is dropped unfinished. The paths own the mechanism
//! (sockets, Pingora's phases) and the reading of the clock; `now` is passed in.

use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use crate::answers::Answer;
use crate::metrics::UpstreamError;
use crate::snapshot::{Service, Snapshot};

/// Attempts per request: the first plus at most `RETRIES_MAX` retries.
pub const MAX_TRIES: usize = rusty_shared::limits::RETRIES_MAX as usize + 1;

/// How one attempt on a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection was made: nothing was sent, so any method may go to another backend.
    Connect(UpstreamError),
    /// The backend took the request and gave no usable answer. `replayable`: the request may
    /// be sent again (idempotent, still whole at hand, and nothing of an answer reached the
    /// client).
    Answer {
        kind: UpstreamError,
        replayable: bool,
    },
    /// A pooled connection turned out closed before any byte of an answer: the backend is not
    /// to blame, but the request may have reached it, so the attempt counts. A replayable
    /// request may go again, to the same backend, on a new connection.
    Stale { replayable: bool },
}

impl Failure {
    /// The status this failure stands for: 503 when no backend took the request, 504 after a
    /// timeout, 502 otherwise.
    pub fn status(self) -> u16 {
        match self {
            Failure::Connect(_) => 503,
            Failure::Answer {
                kind: UpstreamError::ReadTimeout,
                ..
            } => 504,
            Failure::Answer { .. } | Failure::Stale { .. } => 502,
        }
    }
}

/// A request routed to a service, from routing to the end of its answer.
pub struct Routed {
    snapshot: Arc<Snapshot>,
    service: u32,
    start: Instant,
    tried: [u32; MAX_TRIES],
    tries: usize,
    last: Option<Failure>,
    /// `tries` when `last` was recorded: the last attempt failed when they are equal.
    failed_at: usize,
    /// Attempts that do not count against the retry budget: the first stale pooled connection
    /// of each backend (the pool's staleness, not a try of the backend).
    free: usize,
    /// The backend whose in-flight count the current attempt holds.
    holding: Option<u32>,
    ended: bool,
}

impl Routed {
    /// Service `service` of `snapshot` takes a request that arrived at `start`: it is in flight
    /// from now on.
    pub fn new(snapshot: Arc<Snapshot>, service: u32, start: Instant) -> Routed {
        snapshot.services[service as usize].counters.inflight_add(1);
        Routed {
            snapshot,
            service,
            start,
            tried: [0; MAX_TRIES],
            tries: 0,
            last: None,
            failed_at: 0,
            free: 0,
            holding: None,
            ended: false,
        }
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    pub fn service(&self) -> &Service {
        &self.snapshot.services[self.service as usize]
    }

    /// The service's index in the snapshot.
    pub fn service_index(&self) -> u32 {
        self.service
    }

    /// Backends tried so far, the current one last.
    pub fn tried(&self) -> &[u32] {
        &self.tried[..self.tries]
    }

    /// The backend of the current (or last) attempt.
    pub fn backend(&self) -> Option<u32> {
        self.tried().last().copied()
    }

    /// The backend for the next attempt, which begins: `None` when the retry budget is spent
    /// or every backend has been tried. After a stale pooled connection it is the same backend
    /// again.
    pub fn next(&mut self, now: u64) -> Option<u32> {
        let i = match (self.last, self.backend()) {
            (Some(Failure::Stale { .. }), Some(same)) if self.budget_left() => same,
            _ => self.candidate(now)?,
        };
        self.begin(i);
        Some(i)
    }

    /// The round robin's choice for the next attempt, not yet begun (admission may put the
    /// attempt on another backend, or shed the request). Spends no round-robin position when
    /// the budget is out.
    pub fn candidate(&self, now: u64) -> Option<u32> {
        if !self.budget_left() {
            return None;
        }
        self.service().pick(self.tried(), now)
    }

    /// The next attempt goes to backend `i`.
    pub fn begin(&mut self, i: u32) {
        self.release();
        self.snapshot.services[self.service as usize].backends[i as usize]
            .counters
            .inflight_add(1);
        self.holding = Some(i);
        if self.tries < MAX_TRIES {
            self.tried[self.tries] = i;
            self.tries += 1;
        }
    }

    /// The current attempt is over: its backend has one less in flight.
    fn release(&mut self) {
        if let Some(i) = self.holding.take() {
            self.snapshot.services[self.service as usize].backends[i as usize]
                .counters
                .inflight_add(-1);
        }
    }

    fn budget_left(&self) -> bool {
        self.tries - self.free <= self.service().retries as usize && self.tries < MAX_TRIES
    }

    /// The current attempt failed: counted on its backend, which is ejected if it refused the
    /// connection. True when another attempt may follow (budget left, and nothing was sent or
    /// the request can be replayed); the path then asks [`Routed::next`] for the backend.
    pub fn fail(&mut self, failure: Failure, now: u64) -> bool {
        self.release();
        self.last = Some(failure);
        self.failed_at = self.tries;
        let Some(i) = self.backend() else {
            return false;
        };
        // A pooled connection that turned out closed is the pool's staleness: the first one of
        // each backend is free, so a backend that died (its pooled connection stale, the new
        // one refused) costs one attempt, not two, and two dying at once do not use up a
        // budget of two retries before the third backend is asked. Another stale connection
        // to the same backend counts: the pool may hold several, and MAX_TRIES bounds it all.
        if matches!(failure, Failure::Stale { .. }) && !self.tried[..self.tries - 1].contains(&i) {
            self.free += 1;
        }
        let svc = self.service();
        let backend = &svc.backends[i as usize];
        let may_retry = match failure {
            Failure::Connect(kind) => {
                backend.counters.count_error(kind);
                if svc.balancer.eject(i, now) {
                    warn!(service = %svc.name, backend = %backend.id,
                        "backend ejected after a failed connect");
                }
                true
            }
            Failure::Answer { kind, replayable } => {
                backend.counters.count_error(kind);
                if kind == UpstreamError::ReadTimeout && svc.balancer.timed_out(i, now) {
                    warn!(service = %svc.name, backend = %backend.id,
                        "backend ejected after read timeouts in a row");
                }
                replayable
            }
            // The pool's staleness, not the backend's failure: not counted against it.
            Failure::Stale { replayable } => replayable,
        };
        may_retry && self.budget_left()
    }

    /// The answer when no (further) attempt can be made: for the last failure, or 503 when
    /// there was no backend to try at all.
    pub fn answer(&self) -> Answer {
        match self.last {
            Some(f) => Answer::for_failure(f.status()),
            None => Answer::NoBackend,
        }
    }

    /// Count the request's outcome: the status the client got (499 if it left first) on the
    /// backend of the last attempt, or on the service's "no backend" series. Only the first
    /// call counts.
    pub fn end(&mut self, status: u16) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.release();
        let svc = &self.snapshot.services[self.service as usize];
        match self.tried[..self.tries].last() {
            Some(&i) => {
                svc.backends[i as usize].counters.count_response(status);
                if self.failed_at != self.tries {
                    svc.balancer.answered(i);
                }
            }
            None => svc.no_backend.count_response(status),
        }
        svc.counters.observe(self.start.elapsed().as_nanos() as u64);
        svc.counters.inflight_add(-1);
    }
}

impl Drop for Routed {
    /// A request dropped before its end was counted: its client (or the process) went away.
    fn drop(&mut self) {
        self.end(499);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Registry;
    use rusty_shared::{validate, Backend, Service as WireService, Table};

    const NOW: u64 = 1_000;

    /// One service of `n` backends in tier 0 with `retries`.
    fn snapshot(n: usize, retries: u32) -> Arc<Snapshot> {
        let backends = (0..n)
            .map(|i| Backend::new(format!("b{i}"), format!("127.0.0.1:{}", 9000 + i), 1, 0))
            .collect();
        let mut svc = WireService::new("web", backends);
        svc.retries = retries;
        let valid = validate(Table::new(1, vec![svc])).unwrap();
        Arc::new(Snapshot::fresh(valid, &Registry::default()))
    }

    fn routed(snap: &Arc<Snapshot>) -> Routed {
        Routed::new(snap.clone(), 0, Instant::now())
    }

    const REFUSED: Failure = Failure::Connect(UpstreamError::ConnectRefused);
    const CLOSED_GET: Failure = Failure::Answer {
        kind: UpstreamError::Closed,
        replayable: true,
    };
    const CLOSED_POST: Failure = Failure::Answer {
        kind: UpstreamError::Closed,
        replayable: false,
    };
    const TIMED_OUT: Failure = Failure::Answer {
        kind: UpstreamError::ReadTimeout,
        replayable: true,
    };

    #[test]
    fn a_backend_counts_the_attempts_under_way_on_it() {
        let snap = snapshot(2, 1);
        let inflight = |i: usize| snap.services[0].backends[i].counters.inflight();
        let mut r = routed(&snap);
        let first = r.next(NOW).unwrap() as usize;
        assert_eq!((inflight(first), inflight(1 - first)), (1, 0));
        assert!(r.fail(REFUSED, NOW));
        assert_eq!(inflight(first), 0, "a failed attempt is over");
        let second = r.next(NOW).unwrap() as usize;
        assert_eq!((second, inflight(second)), (1 - first, 1));
        r.end(200);
        r.end(200);
        assert_eq!(
            (inflight(0), inflight(1)),
            (0, 0),
            "once, however often it ends"
        );
        let mut dropped = routed(&snap);
        let i = dropped.next(NOW).unwrap() as usize;
        drop(dropped);
        assert_eq!(inflight(i), 0, "a request dropped unfinished");
    }

    #[test]
    fn failed_connects_eject_and_retry_within_the_budget_then_answer_503() {
        let snap = snapshot(4, 2);
        let mut r = routed(&snap);
        let mut seen = vec![];
        while let Some(i) = r.next(NOW) {
            seen.push(i);
            if !r.fail(REFUSED, NOW) {
                break;
            }
        }
        assert_eq!(seen.len(), 3, "the first attempt and two retries: {seen:?}");
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "each backend at most once");
        let svc = r.service();
        for &i in r.tried() {
            assert!(svc.balancer.ejected(i, NOW));
            let errors = svc.backends[i as usize]
                .counters
                .errors(UpstreamError::ConnectRefused);
            assert_eq!(errors, 1);
        }
        assert_eq!(r.answer(), Answer::NoBackend);
        assert_eq!(r.next(NOW), None, "out of budget: no pick");
    }

    #[test]
    fn a_request_that_reached_a_backend_is_retried_only_if_it_can_be_replayed() {
        let snap = snapshot(3, 2);
        let mut post = routed(&snap);
        post.next(NOW).unwrap();
        assert!(!post.fail(CLOSED_POST, NOW));
        assert_eq!(post.answer(), Answer::BadGateway);
        let first = post.backend().unwrap();
        assert!(
            !post.service().balancer.ejected(first, NOW),
            "it answered the connect"
        );

        let mut get = routed(&snap);
        get.next(NOW).unwrap();
        assert!(get.fail(CLOSED_GET, NOW));
        get.next(NOW).unwrap();
        assert!(get.fail(TIMED_OUT, NOW));
        assert_eq!(
            get.answer(),
            Answer::GatewayTimeout,
            "answered for the last failure"
        );
    }

    #[test]
    fn read_timeouts_in_a_row_eject_a_backend_and_an_answer_between_them_forgives() {
        let snap = snapshot(2, 1);
        let balancer = &snap.services[0].balancer;
        let slow = 0;
        // A request whose first attempt goes to `slow` (others are answered on the way).
        let on_slow = || loop {
            let mut r = routed(&snap);
            if r.next(NOW).unwrap() == slow {
                return r;
            }
            r.end(200);
        };
        let time_out_then_retry = |mut r: Routed| {
            assert!(r.fail(TIMED_OUT, NOW), "idempotent: retried elsewhere");
            assert_ne!(r.next(NOW), Some(slow));
            r.end(200);
        };
        time_out_then_retry(on_slow());
        assert!(
            !balancer.ejected(slow, NOW),
            "one timeout may be one slow request"
        );
        // It answers one request: its run of timeouts is over.
        on_slow().end(200);
        time_out_then_retry(on_slow());
        assert!(
            !balancer.ejected(slow, NOW),
            "an answer came between the timeouts"
        );
        // Two in a row: ejected for the service's eject time.
        time_out_then_retry(on_slow());
        assert!(balancer.ejected(slow, NOW), "two read timeouts in a row");
        let errors = snap.services[0].backends[0]
            .counters
            .errors(UpstreamError::ReadTimeout);
        assert_eq!(errors, 3);
    }

    #[test]
    fn no_retries_means_one_attempt_and_every_backend_tried_means_none_left() {
        let snap = snapshot(3, 0);
        let mut r = routed(&snap);
        assert!(r.next(NOW).is_some());
        assert!(!r.fail(REFUSED, NOW), "a budget of 0 retries");
        assert_eq!(r.next(NOW), None);

        let snap = snapshot(2, 5);
        let mut r = routed(&snap);
        r.next(NOW).unwrap();
        assert!(r.fail(CLOSED_GET, NOW));
        r.next(NOW).unwrap();
        assert!(r.fail(CLOSED_GET, NOW), "the budget allows more");
        assert_eq!(r.next(NOW), None, "but both backends were tried");
        assert_eq!(r.answer(), Answer::BadGateway);
    }

    #[test]
    fn a_backends_first_stale_pooled_connection_is_free_and_later_ones_count() {
        let snap = snapshot(3, 2);
        let mut r = routed(&snap);
        let first = r.next(NOW).unwrap();
        let stale = Failure::Stale { replayable: true };
        assert!(r.fail(stale, NOW));
        assert_eq!(
            r.next(NOW),
            Some(first),
            "the same backend, on a new connection"
        );
        assert!(r.fail(stale, NOW));
        assert_eq!(r.next(NOW), Some(first));
        assert!(r.fail(stale, NOW));
        assert_eq!(r.next(NOW), Some(first));
        assert!(
            !r.fail(stale, NOW),
            "four arrivals, the first free: the budget of 2 retries is spent"
        );
        assert_eq!(r.next(NOW), None);
        assert_eq!(r.tried(), &[first, first, first, first]);
        let counters = &r.service().backends[first as usize].counters;
        assert_eq!(
            counters.errors(UpstreamError::Closed),
            0,
            "not the backend's failure"
        );
        assert!(!r.service().balancer.ejected(first, NOW));
        // A request that cannot be replayed does not go again.
        let mut post = routed(&snap);
        post.next(NOW).unwrap();
        assert!(!post.fail(Failure::Stale { replayable: false }, NOW));
    }

    #[test]
    fn two_backends_gone_at_once_leave_the_third_one_within_two_retries() {
        let snap = snapshot(3, 2);
        let mut r = routed(&snap);
        // Two backends died: each one's pooled connection is stale, each new one refused.
        let first = r.next(NOW).unwrap();
        assert!(r.fail(Failure::Stale { replayable: true }, NOW));
        assert_eq!(r.next(NOW), Some(first));
        assert!(r.fail(REFUSED, NOW));
        let second = r.next(NOW).unwrap();
        assert_ne!(second, first);
        assert!(r.fail(Failure::Stale { replayable: true }, NOW));
        assert_eq!(r.next(NOW), Some(second));
        assert!(
            r.fail(REFUSED, NOW),
            "two attempts spent (the stale ones free), one left of 2 retries"
        );
        // The third backend takes it: within the budget of three attempts.
        let third = r.next(NOW).unwrap();
        assert!(third != first && third != second);
        assert_eq!(r.tried(), &[first, first, second, second, third]);
        // Closed mid-request after the stale one (a process dying while the kernel still
        // accepted): that counts, and the third backend is still within the budget.
        let mut r = routed(&snap);
        let a = r.next(NOW).unwrap();
        assert!(r.fail(Failure::Stale { replayable: true }, NOW));
        assert_eq!(r.next(NOW), Some(a));
        assert!(r.fail(CLOSED_GET, NOW));
        let b = r.next(NOW).unwrap();
        assert!(r.fail(Failure::Stale { replayable: true }, NOW));
        assert_eq!(r.next(NOW), Some(b));
        assert!(r.fail(CLOSED_GET, NOW));
        let c = r.next(NOW).expect("the third backend, within 2 retries");
        assert!(c != a && c != b);
    }

    #[test]
    fn a_service_without_backends_answers_503_without_an_attempt() {
        let snap = snapshot(0, 2);
        let mut r = routed(&snap);
        assert_eq!(r.next(NOW), None);
        assert_eq!(r.answer(), Answer::NoBackend);
        r.end(503);
        assert_eq!(r.service().no_backend.responses(503), 1);
    }

    #[test]
    fn a_request_is_counted_once_however_it_ends() {
        let snap = snapshot(2, 1);
        let svc = &snap.services[0];
        let mut r = routed(&snap);
        assert_eq!(svc.counters.inflight(), 1);
        let i = r.next(NOW).unwrap();
        r.end(200);
        r.end(502);
        drop(r);
        assert_eq!(svc.counters.inflight(), 0);
        assert_eq!(svc.backends[i as usize].counters.responses(200), 1);
        assert_eq!(svc.backends[i as usize].counters.responses(502), 0);
        assert_eq!(svc.backends[i as usize].counters.responses(499), 0);
        assert_eq!(svc.counters.observed(), 1);

        // Dropped unfinished: the client left.
        let mut r = routed(&snap);
        let j = r.next(NOW).unwrap();
        drop(r);
        assert_eq!(svc.counters.inflight(), 0);
        assert_eq!(svc.backends[j as usize].counters.responses(499), 1);
        assert_eq!(svc.counters.observed(), 2);
    }

    #[test]
    fn an_attempt_admission_moved_is_counted_on_the_backend_that_took_it() {
        let snap = snapshot(3, 1);
        let mut r = routed(&snap);
        let candidate = r.candidate(NOW).unwrap();
        assert!(r.tried().is_empty(), "a candidate is not an attempt");
        let other = (candidate + 1) % 3;
        r.begin(other);
        assert_eq!(r.tried(), &[other]);
        r.end(200);
        assert_eq!(
            snap.services[0].backends[other as usize]
                .counters
                .responses(200),
            1
        );
    }

    #[test]
    fn a_request_shed_before_any_attempt_counts_without_a_backend() {
        let snap = snapshot(2, 1);
        let mut r = routed(&snap);
        r.candidate(NOW).unwrap();
        r.end(503);
        assert_eq!(r.service().no_backend.responses(503), 1);
    }
}
