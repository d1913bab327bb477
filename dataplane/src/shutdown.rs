//! The graceful shutdown, as one value every part of the data plane holds: has draining
//! begun, a signal to wait on for it, and when connections idle between requests close.
//!
//! It flips only once the listener has closed (the front's cleanup calls [`Shutdown::begin`]).
//! Pingora's own shutdown watch flips at the signal, and the proxy would then tell clients to
//! reconnect while the listener still accepted them into a backlog it was about to reset.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Mutex;
use std::task::Waker;

use slab::Slab;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Shutdown {
    draining: AtomicBool,
    signal: watch::Sender<bool>,
    /// Connections idle between requests are to close now.
    closing_idle: AtomicBool,
    /// The tasks of connections that have waited between requests, woken when idle ones
    /// close: a waker each (about 24 bytes), instead of a future and a timer per connection.
    idle: Mutex<Slab<Waker>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            draining: AtomicBool::new(false),
            signal: watch::Sender::new(false),
            closing_idle: AtomicBool::new(false),
            idle: Mutex::new(Slab::new()),
        }
    }
}

/// A connection's entry among the idle waiters: its key and the waker it holds there.
#[derive(Debug)]
pub struct IdleEntry {
    key: usize,
    waker: Waker,
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

    /// Close the connections idle between requests (the drain window has passed): true from
    /// now on for [`Shutdown::idle_wait`], and every connection waiting there is woken.
    pub fn close_idle(&self) {
        self.closing_idle.store(true, SeqCst);
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        for (_, waker) in idle.iter() {
            waker.wake_by_ref();
        }
    }

    /// A connection waits between requests with `waker`: true if idle connections are
    /// closing, else its task is woken when they do. `entry` is the connection's place among
    /// the waiters, made on its first wait and kept until [`Shutdown::forget`]; the lock is
    /// taken only then, or when the connection's waker changes.
    pub fn idle_wait(&self, entry: &mut Option<IdleEntry>, waker: &Waker) -> bool {
        if self.closing_idle.load(SeqCst) {
            return true;
        }
        match entry {
            Some(e) if e.waker.will_wake(waker) => return false,
            _ => {}
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            match entry {
                Some(e) => {
                    e.waker = waker.clone();
                    if let Some(w) = idle.get_mut(e.key) {
                        *w = waker.clone();
                    }
                }
                None => {
                    let key = idle.insert(waker.clone());
                    *entry = Some(IdleEntry {
                        key,
                        waker: waker.clone(),
                    });
                }
            }
        }
        // `close_idle` may have woken the waiters just before this one was in: it set the
        // flag first, so it is seen here.
        self.closing_idle.load(SeqCst)
    }

    /// The connection of `entry` is gone.
    pub fn forget(&self, entry: IdleEntry) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.try_remove(entry.key);
    }

    /// Connections registered as waiting between requests now.
    #[cfg(test)]
    fn idle_waiters(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn idle_waiters_are_woken_once_when_idle_connections_close_and_forgotten_after() {
        let shutdown = Shutdown::default();
        let (a_count, a) = waker();
        let (b_count, b) = waker();
        let (mut ea, mut eb) = (None, None);
        assert!(!shutdown.idle_wait(&mut ea, &a));
        assert!(!shutdown.idle_wait(&mut eb, &b));
        // Waiting again with the same waker keeps one entry.
        assert!(!shutdown.idle_wait(&mut ea, &a));
        assert_eq!(shutdown.idle_waiters(), 2);
        shutdown.forget(eb.take().unwrap());
        assert_eq!(shutdown.idle_waiters(), 1);

        shutdown.close_idle();
        assert_eq!(a_count.0.load(SeqCst), 1);
        assert_eq!(
            b_count.0.load(SeqCst),
            0,
            "a forgotten connection is not woken"
        );
        assert!(shutdown.idle_wait(&mut ea, &a));
        // A connection's first wait after the close sees it at once.
        let mut late = None;
        assert!(shutdown.idle_wait(&mut late, &b));
        assert!(late.is_none());
    }

    #[test]
    fn a_new_waker_replaces_the_old_one() {
        let shutdown = Shutdown::default();
        let (old_count, old) = waker();
        let (new_count, new) = waker();
        let mut entry = None;
        shutdown.idle_wait(&mut entry, &old);
        shutdown.idle_wait(&mut entry, &new);
        assert_eq!(shutdown.idle_waiters(), 1);
        shutdown.close_idle();
        assert_eq!((old_count.0.load(SeqCst), new_count.0.load(SeqCst)), (0, 1));
    }
}
