//! The graceful shutdown, as one value every part of the data plane holds: has draining
//! begun, and a signal to wait on for it.
//!
//! It flips only once the listener has closed (the front's cleanup calls [`Shutdown::begin`]).
//! Pingora's own shutdown watch flips at the signal, and the proxy would then tell clients to
//! reconnect while the listener still accepted them into a backlog it was about to reset.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use tokio::sync::watch;

#[derive(Debug)]
pub struct Shutdown {
    draining: AtomicBool,
    signal: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            draining: AtomicBool::new(false),
            signal: watch::Sender::new(false),
        }
    }
}

impl Shutdown {
    /// A graceful shutdown has begun: responses close their connections.
    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Begin draining: from now on responses say `Connection: close` and idle connections
    /// are closed after a short window.
    pub fn begin(&self) {
        self.draining.store(true, Relaxed);
        self.signal.send_replace(true);
    }

    /// A receiver that sees `true` once draining has begun.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }
}
