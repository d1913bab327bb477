//! An accepted plain TCP connection as the front serves it: the socket, registered with the
//! runtime that serves it ([`super::rehome`]), and what Pingora asks of a stream.
//!
//! Pingora's own `l4::Stream` carries write-buffer state, timestamps and a tracer (about 400
//! bytes) and its socket digest another 200, for every connection, however idle; this holds
//! the socket and the peer address, and makes the digest only if the pipeline asks for it
//! (the lane never does). What it does not do: `try_peek` (Pingora peeks only for an h2c
//! preface, which is off) and read or write timings.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub struct Accepted {
    tcp: TcpStream,
    peer: SocketAddr,
    accepted: SystemTime,
    digest: OnceLock<Arc<SocketDigest>>,
}

impl Accepted {
    pub fn new(tcp: TcpStream, peer: SocketAddr) -> Self {
        Accepted {
            tcp,
            peer,
            accepted: SystemTime::now(),
            digest: OnceLock::new(),
        }
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Accepted {
    async fn shutdown(&mut self) {
        // As Pingora's stream does: a peer already gone is not worth more than that.
        let _ = AsyncWriteExt::shutdown(&mut self.tcp).await;
    }
}

impl UniqueID for Accepted {
    fn id(&self) -> UniqueIDType {
        self.tcp.as_raw_fd()
    }
}

impl Ssl for Accepted {}

impl GetTimingDigest for Accepted {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        vec![Some(TimingDigest {
            established_ts: self.accepted,
            establishment_duration: None,
            offload_wait_duration: None,
        })]
    }

    fn get_read_pending_time(&self) -> Duration {
        Duration::ZERO
    }

    fn get_write_pending_time(&self) -> Duration {
        Duration::ZERO
    }
}

impl GetProxyDigest for Accepted {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Accepted {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        let digest = self.digest.get_or_init(|| {
            let digest = SocketDigest::from_raw_fd(self.tcp.as_raw_fd());
            let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(self.peer)));
            Arc::new(digest)
        });
        Some(digest.clone())
    }
}

#[async_trait]
impl Peek for Accepted {}

impl fmt::Debug for Accepted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accepted")
            .field("fd", &self.tcp.as_raw_fd())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(flavor = "current_thread")]
    async fn it_carries_bytes_and_tells_pingora_the_peer_and_the_local_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(local).await.unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        let mut s = Accepted::new(tcp, peer);
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        s.write_all(b"pong").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");

        let digest = s.get_socket_digest().expect("a digest");
        assert_eq!(
            digest.peer_addr().and_then(|a| a.as_inet()).copied(),
            Some(client.local_addr().unwrap())
        );
        assert_eq!(
            digest.local_addr().and_then(|a| a.as_inet()).copied(),
            Some(local)
        );
        // Made once, then shared.
        assert!(Arc::ptr_eq(&digest, &s.get_socket_digest().unwrap()));
        assert_eq!(s.id(), s.tcp.as_raw_fd());

        Shutdown::shutdown(&mut s).await;
        assert_eq!(
            client.read(&mut got).await.unwrap(),
            0,
            "the client sees the close"
        );
    }
}
