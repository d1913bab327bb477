//! A client stream with the bytes the front already read from it (a TLS ClientHello, the
//! first bytes of a plain connection checked for the HTTP/2 preface) put back in front, so
//! whatever reads the stream next sees it whole. Used by the front only.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, ReadBuf};

/// A client stream with bytes already read from it put back in front of it.
pub(super) struct Replay {
    unread: Vec<u8>,
    at: usize,
    inner: Stream,
}

impl Replay {
    pub(super) fn new(unread: Vec<u8>, inner: Stream) -> Self {
        Replay {
            unread,
            at: 0,
            inner,
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.unread.len() {
            let n = (this.unread.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.unread[this.at..this.at + n]);
            this.at += n;
            if this.at == this.unread.len() {
                this.unread = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

pass_through_io!(Replay);

#[async_trait]
impl Peek for Replay {}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("unread", &(self.unread.len() - self.at))
            .field("inner", &self.inner)
            .finish()
    }
}
