//! Client connections: how many are open, what happened to the ones that ended early (written
//! by the front and the lane, read by the admin listener and the graceful shutdown), and the
//! one fact about a connection that two request paths share while it lives: whether it has
//! switched protocols ([`switch_protocols`], [`switched`]). Atomics and a task-local, no I/O.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge};

use crate::metrics::{counter, counter_vec, gauge};

/// Counters of every client connection of the proxy listener.
pub struct Connections {
    /// Read by admission (`--max-connections`); mirrored in `open_gauge` for scrapes.
    open: AtomicUsize,
    open_gauge: IntGauge,
    refused: IntCounter,
    head_timeouts: IntCounter,
    drained_idle: IntCounter,
    bad_request_lines: IntCounter,
    bad_chunks: IntCounter,
    lane_requests: IntCounter,
    lane_handovers: IntCounter,
    tls_family: IntCounterVec,
    tls: [IntCounter; 6],
    h2_connections: IntCounter,
    h2_refused_streams: IntCounter,
    h2_closed_family: IntCounterVec,
    h2_closed: [IntCounter; 5],
}

impl Default for Connections {
    fn default() -> Self {
        let tls_family = counter_vec(
            "rustybalancer_tls_handshakes_total",
            "TLS handshakes on the TLS listener, by result.",
            &["result"],
        );
        let h2_closed_family = counter_vec(
            "rustybalancer_h2_connections_closed_total",
            "HTTP/2 client connections the proxy closed itself, by reason.",
            &["reason"],
        );
        Connections {
            open: AtomicUsize::new(0),
            open_gauge: gauge(
                "rustybalancer_client_connections",
                "Client connections open now.",
            ),
            refused: counter(
                "rustybalancer_client_connections_refused_total",
                "Client connections answered 503 because --max-connections were open.",
            ),
            head_timeouts: counter(
                "rustybalancer_request_head_timeouts_total",
                "Client connections closed with 408: a request head took longer than --header-timeout.",
            ),
            bad_request_lines: counter(
                "rustybalancer_bad_request_lines_total",
                "Requests refused with 400 because the request line as sent was malformed.",
            ),
            bad_chunks: counter(
                "rustybalancer_bad_chunked_bodies_total",
                "Requests refused with 400 because their chunked framing was malformed.",
            ),
            drained_idle: counter(
                "rustybalancer_drained_idle_connections_total",
                "Idle keep-alive connections closed by a graceful shutdown.",
            ),
            lane_requests: counter(
                "rustybalancer_fast_lane_requests_total",
                "Requests served on the fast lane, without the full proxy pipeline.",
            ),
            lane_handovers: counter(
                "rustybalancer_fast_lane_handovers_total",
                "Connections the fast lane handed to the full proxy pipeline (a request it does not serve).",
            ),
            // In the order of `Connections::counter`.
            tls: ["ok", "timeout", "unrecognized_name", "plain_http", "failed", "closed"]
                .map(|r| tls_family.with_label_values(&[r])),
            tls_family,
            h2_connections: counter(
                "rustybalancer_h2_connections_total",
                "Client connections that spoke HTTP/2 (ALPN h2, or the h2c preface).",
            ),
            h2_refused_streams: counter(
                "rustybalancer_h2_refused_streams_total",
                "HTTP/2 streams refused (REFUSED_STREAM) because their connection had too many requests in flight.",
            ),
            // In the order of `H2Close`.
            h2_closed: ["idle", "handshake_timeout", "rapid_reset", "refusals", "malformed"]
                .map(|r| h2_closed_family.with_label_values(&[r])),
            h2_closed_family,
        }
    }
}

/// Why the proxy closed an HTTP/2 connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Close {
    /// No request in flight for the idle time (GOAWAY, graceful).
    Idle = 0,
    /// The client's preface did not arrive in time.
    HandshakeTimeout = 1,
    /// Half or more of its streams were abandoned before their answer (GOAWAY
    /// `ENHANCE_YOUR_CALM`).
    RapidReset = 2,
    /// Too many streams refused over the in-flight cap (`ENHANCE_YOUR_CALM`).
    Refusals = 3,
    /// Too many malformed streams (`ENHANCE_YOUR_CALM`).
    Malformed = 4,
}

/// Something that ended a client connection early, or moved it between request paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Answered 503 at once: `--max-connections` were open.
    Refused,
    /// A request head did not arrive within `--header-timeout`.
    HeadTimeout,
    /// Idle while a graceful shutdown drained the listener.
    DrainedIdle,
    /// The request line as sent was malformed.
    BadRequestLine,
    /// A request body's chunked framing was malformed.
    BadChunk,
    /// The fast lane handed the connection to the pipeline.
    LaneHandover,
    /// A TLS handshake completed.
    TlsHandshake,
    /// A TLS handshake did not complete within `--tls-handshake-timeout`.
    TlsTimeout,
    /// A TLS client asked for a name no certificate covers (and there is no default).
    TlsUnknownName,
    /// Plain HTTP arrived on the TLS listener (answered 400).
    TlsPlainHttp,
    /// A connection to the TLS listener closed before sending a byte.
    TlsClosed,
    /// Any other failed TLS handshake.
    TlsFailed,
}

/// Decrements the open count however a connection ends.
pub struct Open<'a>(&'a Connections);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
        self.0.open_gauge.dec();
    }
}

tokio::task_local! {
    /// Set once the connection's answer to a WebSocket upgrade was a `101`: from then on it
    /// carries another protocol. Each connection is one task, so one value per connection.
    static SWITCHED: Cell<bool>;
}

tokio::task_local! {
    /// Set when the HTTP/2 stream of the calling task was left by its client before it was
    /// answered. Each stream is one task.
    static ABANDONED: Cell<bool>;
}

/// Run an HTTP/2 stream's future with its own mark, unset.
pub fn with_stream<F: Future>(stream: F) -> impl Future<Output = F::Output> {
    ABANDONED.scope(Cell::new(false), stream)
}

/// The client of the calling task's HTTP/2 stream left before its answer was through (the
/// pipeline, when it logs a 499 or a downstream error). Nothing outside a stream's task.
pub fn abandon_stream() {
    let _ = ABANDONED.try_with(|a| a.set(true));
}

/// Whether the calling task's stream was abandoned (the front's HTTP/2 loop, after the
/// pipeline is done with it).
pub fn stream_abandoned() -> bool {
    ABANDONED.try_with(Cell::get).unwrap_or(false)
}

/// Run a connection's future with its own switch, unset.
pub fn with_switch<F: Future>(connection: F) -> impl Future<Output = F::Output> {
    SWITCHED.scope(Cell::new(false), connection)
}

/// The connection of the task calling this switched protocols (the pipeline, on the `101` it
/// lets through).
pub fn switch_protocols() {
    let _ = SWITCHED.try_with(|s| s.set(true));
}

/// Whether the connection of the calling task switched protocols (the front's guarded stream,
/// which then stops reading HTTP from it). False outside a connection's task.
pub fn switched() -> bool {
    SWITCHED.try_with(Cell::get).unwrap_or(false)
}

impl Connections {
    /// A connection was accepted: counted open until the returned guard drops. Also returns how
    /// many are open with it.
    pub fn open_one(&self) -> (Open<'_>, usize) {
        let n = self.open.fetch_add(1, Relaxed) + 1;
        self.open_gauge.inc();
        (Open(self), n)
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    pub fn count(&self, event: Event) {
        self.counter(event).inc();
    }

    pub fn counted(&self, event: Event) -> u64 {
        self.counter(event).get()
    }

    fn counter(&self, event: Event) -> &IntCounter {
        match event {
            Event::Refused => &self.refused,
            Event::HeadTimeout => &self.head_timeouts,
            Event::DrainedIdle => &self.drained_idle,
            Event::BadRequestLine => &self.bad_request_lines,
            Event::BadChunk => &self.bad_chunks,
            Event::LaneHandover => &self.lane_handovers,
            Event::TlsHandshake => &self.tls[0],
            Event::TlsTimeout => &self.tls[1],
            Event::TlsUnknownName => &self.tls[2],
            Event::TlsPlainHttp => &self.tls[3],
            Event::TlsFailed => &self.tls[4],
            Event::TlsClosed => &self.tls[5],
        }
    }

    /// An HTTP/2 connection was established.
    pub fn count_h2_connection(&self) {
        self.h2_connections.inc();
    }

    /// An HTTP/2 stream was refused over the in-flight cap.
    pub fn count_h2_refused_stream(&self) {
        self.h2_refused_streams.inc();
    }

    /// The proxy closed an HTTP/2 connection itself.
    pub fn count_h2_close(&self, why: H2Close) {
        self.h2_closed[why as usize].inc();
    }

    /// A request the fast lane served.
    pub fn lane_request(&self) {
        self.lane_requests.inc();
    }

    pub fn lane_requests(&self) -> u64 {
        self.lane_requests.get()
    }

    /// The connection metrics, for the registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.open_gauge.clone()),
            Box::new(self.refused.clone()),
            Box::new(self.head_timeouts.clone()),
            Box::new(self.bad_request_lines.clone()),
            Box::new(self.bad_chunks.clone()),
            Box::new(self.drained_idle.clone()),
            Box::new(self.lane_requests.clone()),
            Box::new(self.lane_handovers.clone()),
            Box::new(self.tls_family.clone()),
            Box::new(self.h2_connections.clone()),
            Box::new(self.h2_refused_streams.clone()),
            Box::new(self.h2_closed_family.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_switch_belongs_to_the_connection_that_set_it() {
        assert!(!switched(), "outside any connection");
        let first = with_switch(async {
            assert!(!switched());
            switch_protocols();
            switched()
        });
        let second = with_switch(async { switched() });
        assert_eq!(tokio::join!(first, second), (true, false));
        switch_protocols();
        assert!(!switched(), "no connection here to switch");
    }

    #[test]
    fn an_open_connection_is_counted_until_its_guard_drops() {
        let c = Connections::default();
        let (a, n) = c.open_one();
        assert_eq!(n, 1);
        let (b, n) = c.open_one();
        assert_eq!((n, c.open()), (2, 2));
        drop(a);
        drop(b);
        assert_eq!(c.open(), 0);
        c.count(Event::Refused);
        let text = crate::metrics::text_of(c.collectors());
        assert!(text.contains("rustybalancer_client_connections 0\n"));
        assert!(text.contains("rustybalancer_client_connections_refused_total 1\n"));
    }
}
