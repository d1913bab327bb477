//! Idle upstream connections of the fast lane, per worker thread (no lock, no atomic), reused
//! most recent first, swept when idle past [`IDLE`], at most [`MAX_IDLE`] per backend. A
//! connection is checked quiet with one non-blocking read before reuse, so bytes a backend sent
//! after one answer are never read as another's. Used by the lane only.

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

struct Pool {
    idle: HashMap<SocketAddr, Idle>,
    swept: Instant,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        idle: HashMap::new(),
        swept: Instant::now(),
    });
}

/// An idle connection to `addr`, if this thread has a fresh one that is still quiet.
pub fn take(addr: SocketAddr) -> Option<TcpStream> {
    POOL.with_borrow_mut(|pool| {
        let idle = pool.idle.get_mut(&addr)?;
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE && quiet(&conn) {
                return Some(conn);
            }
        }
        None
    })
}

/// Nothing to read and no close: the backend has not spoken since its last response.
fn quiet(conn: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(conn.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Keep a connection that finished a response cleanly, for the next request to `addr`.
pub fn put(addr: SocketAddr, conn: TcpStream) {
    POOL.with_borrow_mut(|pool| {
        let now = Instant::now();
        if now.duration_since(pool.swept) > IDLE {
            pool.swept = now;
            pool.idle.retain(|_, idle| {
                idle.retain(|(_, since)| now.duration_since(*since) < IDLE);
                !idle.is_empty()
            });
        }
        let idle = pool.idle.entry(addr).or_default();
        if idle.len() < MAX_IDLE {
            idle.push((conn, now));
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

    #[tokio::test]
    async fn a_connection_the_backend_spoke_on_or_closed_is_not_reused() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stray = TcpStream::connect(addr).await.unwrap();
        let (mut server_side, _) = listener.accept().await.unwrap();
        let closed = TcpStream::connect(addr).await.unwrap();
        let (server_closed, _) = listener.accept().await.unwrap();
        let fine = TcpStream::connect(addr).await.unwrap();
        let (_server_fine, _) = listener.accept().await.unwrap();
        let fine_port = fine.local_addr().unwrap();
        put(addr, fine);
        put(addr, stray);
        put(addr, closed);
        // Bytes after a response, and a close, both arrive while the connections sit idle.
        server_side.write_all(b"late body").await.unwrap();
        drop(server_closed);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(take(addr).unwrap().local_addr().unwrap(), fine_port);
        assert!(take(addr).is_none());
    }
}
