//! The threads that serve client connections: one single-threaded Tokio runtime each, started
//! by us at start-up rather than by Pingora, and given accepted connections in turn by the
//! front.
//!
//! Why not Pingora's own threads: code in Pingora that runs on them spawns its helpers on a
//! random one of them (`pingora_runtime::current_handle` under its one-runtime-per-thread
//! mode). The pipeline's pooled upstream connections are watched by such a helper, so a
//! connection was often watched on one thread and taken on the other, and the taker lost the
//! race for it about one time in a hundred: a new upstream connection, and an ERROR line in the
//! log, each time (`loadtest/TUNING.md`). On a thread Pingora did not start, `current_handle`
//! is the thread's own runtime, so every helper runs beside the request that made it.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use tokio::runtime::{Builder, Handle};

/// The threads, one runtime each, and the one the next connection goes to.
pub struct Workers {
    handles: Box<[Handle]>,
    next: AtomicUsize,
}

impl Workers {
    /// Start `threads` threads (at least one), each running its runtime until the process ends
    /// with Pingora's shutdown.
    pub fn start(threads: usize) -> io::Result<Workers> {
        let handles = (0..threads.max(1))
            .map(|i| {
                let runtime = Builder::new_current_thread().enable_all().build()?;
                let handle = runtime.handle().clone();
                std::thread::Builder::new()
                    .name(format!("rusty-lb-{i}"))
                    .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
                Ok(handle)
            })
            .collect::<io::Result<_>>()?;
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Serve `connection` on the next thread in turn.
    pub fn spawn<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Relaxed) % self.handles.len();
        self.handles[i].spawn(connection);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn connections_go_to_the_threads_in_turn_and_helpers_stay_on_their_thread() {
        let workers = Workers::start(2).expect("threads start");
        let (tx, rx) = mpsc::channel();
        for i in 0..4 {
            let tx = tx.clone();
            workers.spawn(async move {
                let here = std::thread::current().id();
                // Where Pingora spawns a pooled upstream connection's idle watcher.
                let helper =
                    pingora_runtime::current_handle().spawn(async { std::thread::current().id() });
                let there = helper.await.expect("helper ran");
                tx.send((i, here, there)).expect("test listens");
            });
        }
        let mut seen: Vec<_> = (0..4).map(|_| rx.recv().expect("served")).collect();
        seen.sort_by_key(|s| s.0);
        for (_, here, there) in &seen {
            assert_eq!(here, there, "a helper runs on its connection's thread");
        }
        assert_ne!(
            seen[0].1, seen[1].1,
            "the next connection goes to the next thread"
        );
        assert_eq!(seen[0].1, seen[2].1, "and round again");
        assert_eq!(seen[1].1, seen[3].1);
    }
}
