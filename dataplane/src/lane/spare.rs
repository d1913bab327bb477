//! Spare buffers of this worker thread, for the fast lane's client connections.
//!
//! A connection holds buffers only while it has a request in hand: when it goes idle between
//! requests it gives them back here, and its next read borrows one only for the moment the
//! socket has bytes ([`read_idle`]). So idle keep-alive connections hold no buffer at all, and
//! busy ones take and give back a buffer per request from this thread's list (no lock, no
//! atomic) instead of the allocator. Buffers that grew past their size (a large head, a body)
//! are freed rather than kept. Used by the lane only.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};

/// The sizes of buffer the lane uses, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// A head being written: the upstream request, the client's response.
    Head,
    /// What a client sends: a request head, maybe with more pipelined after it.
    Client,
    /// What a backend sends: a response head and the start of its body.
    Upstream,
    /// The rest of a large body, read by read (an upstream buffer grows to it).
    Body,
}

impl Size {
    const ALL: [Size; 4] = [Size::Head, Size::Client, Size::Upstream, Size::Body];

    pub const fn bytes(self) -> usize {
        match self {
            Size::Head => 1024,
            Size::Client => 4 * 1024,
            Size::Upstream => 16 * 1024,
            Size::Body => 64 * 1024,
        }
    }

    /// Buffers kept per thread: about the connections of one thread that have a request in
    /// hand at once under load (wrk at 200 connections on 2 threads: 100); beyond it they go
    /// back to the allocator. What is kept counts against every connection's share of memory,
    /// so fewer of the large ones.
    pub const fn keep(self) -> usize {
        match self {
            Size::Body => 16,
            _ => 128,
        }
    }

    fn of(capacity: usize) -> Option<Size> {
        Size::ALL.into_iter().find(|s| s.bytes() == capacity)
    }
}

thread_local! {
    static SPARE: RefCell<[Vec<Vec<u8>>; 4]> =
        const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

/// An empty buffer with room for `size.bytes()`.
pub fn take(size: Size) -> Vec<u8> {
    // `try_with`: a connection dropped while its thread ends finds the list gone, and then
    // allocates or frees as if there were none.
    SPARE
        .try_with(|spare| spare.borrow_mut()[size as usize].pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(size.bytes()))
}

/// Give a buffer back (it is emptied); one of no listed size, or beyond [`Size::keep`], is
/// freed.
pub fn give(mut buf: Vec<u8>) {
    let Some(size) = Size::of(buf.capacity()) else {
        return;
    };
    buf.clear();
    let _ = SPARE.try_with(|spare| {
        let list = &mut spare.borrow_mut()[size as usize];
        if list.len() < size.keep() {
            list.push(buf);
        }
    });
}

/// Give `buf` back and leave it empty without capacity.
pub fn release(buf: &mut Vec<u8>) {
    if buf.capacity() > 0 {
        give(std::mem::take(buf));
    }
}

/// Read once from an idle connection into `buf` (empty, without capacity): a spare buffer is
/// lent for each poll and given back at once when there is nothing to read, so the wait
/// itself holds no memory. Returns the bytes read, then in `buf`.
pub async fn read_idle<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut spare = take(Size::Client);
        let mut read = ReadBuf::uninit(spare.spare_capacity_mut());
        let polled = Pin::new(&mut *r).poll_read(cx, &mut read);
        let n = read.filled().len();
        match polled {
            Poll::Ready(Ok(())) => {
                // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity
                // (`ReadBuf::filled`), and `n` is within it.
                unsafe { spare.set_len(n) };
                *buf = spare;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                give(spare);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                give(spare);
                Poll::Pending
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn buffers_come_back_emptied_and_grown_ones_are_freed() {
        let mut b = take(Size::Upstream);
        b.extend_from_slice(b"left over");
        let at = b.as_ptr();
        give(b);
        let again = take(Size::Upstream);
        assert_eq!(again.as_ptr(), at, "the same buffer is lent again");
        assert!(again.is_empty());
        let mut grown = again;
        grown.reserve(Size::Upstream.bytes() * 2);
        give(grown);
        let kept = SPARE.with_borrow(|s| s.iter().map(Vec::len).sum::<usize>());
        assert_eq!(kept, 0, "a grown buffer is freed, not kept");
    }

    #[test]
    fn a_thread_keeps_at_most_keep_buffers_of_a_size() {
        for size in [Size::Head, Size::Body] {
            let many: Vec<_> = (0..size.keep() + 10).map(|_| take(size)).collect();
            many.into_iter().for_each(give);
            let kept = SPARE.with_borrow(|s| s[size as usize].len());
            assert_eq!(kept, size.keep());
        }
    }

    #[test]
    fn an_upstream_buffer_grown_for_a_body_is_a_body_buffer() {
        // What the lane does before each read of a large body.
        let mut b = take(Size::Upstream);
        b.reserve(64 * 1024);
        assert_eq!(Size::of(b.capacity()), Some(Size::Body));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_read_holds_no_buffer_while_it_waits() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let spare_before = SPARE.with_borrow(|s| s[Size::Client as usize].len());
        let mut buf = Vec::new();
        {
            let read = read_idle(&mut server, &mut buf);
            tokio::pin!(read);
            // Nothing sent yet: the poll returns the lent buffer.
            assert!(futures_util::poll!(read.as_mut()).is_pending());
            let spare_waiting = SPARE.with_borrow(|s| s[Size::Client as usize].len());
            assert_eq!(spare_waiting, spare_before.max(1));
            client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            assert_eq!(read.await.unwrap(), 16);
        }
        assert_eq!(buf, b"GET / HTTP/1.1\r\n");
        assert_eq!(buf.capacity(), Size::Client.bytes());
    }
}
