//! Idle upstream connections of the fast lane, kept per worker thread.
//!
//! A thread-local map needs no lock and no atomic: a connection is taken and put back between
//! awaits, so no borrow is held across a suspension point. A task that moves to another worker
//! just uses that worker's pool. Connections are reused most-recent first, which keeps the hot
//! ones hot and lets the rest age out: one idle longer than [`IDLE`] is dropped when reached,
//! and a backend's pool holds at most [`MAX_IDLE`]. A pooled connection the backend has closed
//! in the meantime is found on use; the lane then retries once on a new connection (`mod.rs`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// How long an idle upstream connection is kept (nginx's upstream `keepalive_timeout`).
pub const IDLE: Duration = Duration::from_secs(60);

/// Idle connections kept per backend address and worker thread (nginx's `keepalive` is a
/// total per worker; Pingora's pool defaults to 128 per thread).
pub const MAX_IDLE: usize = 128;

type Idle = Vec<(TcpStream, Instant)>;

thread_local! {
    static POOL: RefCell<HashMap<SocketAddr, Idle>> = RefCell::new(HashMap::new());
}

/// An idle connection to `addr`, if this thread has a fresh one.
pub fn take(addr: SocketAddr) -> Option<TcpStream> {
    POOL.with_borrow_mut(|pool| {
        let idle = pool.get_mut(&addr)?;
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE {
                return Some(conn);
            }
        }
        None
    })
}

/// Keep a connection that finished a response cleanly, for the next request to `addr`.
pub fn put(addr: SocketAddr, conn: TcpStream) {
    POOL.with_borrow_mut(|pool| {
        let idle = pool.entry(addr).or_default();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_come_back_most_recent_first_and_per_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let (a_port, b_port) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        assert!(take(addr).is_none());
        put(addr, a);
        put(addr, b);
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(take(other).is_none());
        assert_eq!(take(addr).unwrap().local_addr().unwrap(), b_port);
        assert_eq!(take(addr).unwrap().local_addr().unwrap(), a_port);
        assert!(take(addr).is_none());
    }
}
