//! The guarded client stream: a deadline for each whole request head (408), the byte scan's
//! checks on the bytes as sent (400), absolute-form heads rewritten to origin form (their
//! authority the `Host`), and the graceful close of a connection idle while draining. The
//! front wraps every client stream in one; the lane and the pipeline read through it without
//! knowing. It sees bytes, not HTTP, and arms no timer when a head arrives in one read. Why
//! each guard exists: `docs/request-path.md` ("Why the front guards").

use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{Peek, Stream};
use rusty_shared::RequestClass;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::access_log::Entry;
use crate::answers::Answer;
use crate::connections::{self, Event};
use crate::http1::request::{origin_form, Refused};
use crate::http1::scan::{feed_marked, Bad, Phase};
use crate::plane::Plane;
use crate::shutdown::IdleEntry;

/// A client stream with a whole-head deadline and a graceful close when idle while draining.
pub struct Guarded {
    inner: Stream,
    phase: Phase,
    header_timeout: Duration,
    /// Deadline of the head being read; set at accept, or when a later head first has to wait.
    deadline: Option<Instant>,
    /// Allocated the first time a head has to wait, then reset for later heads.
    timer: Option<Pin<Box<Sleep>>>,
    /// Its place among the connections waiting between requests, made on the first such
    /// wait: woken when idle connections close (`DRAIN_IDLE` into a graceful shutdown).
    idle: Option<IdleEntry>,
    plane: Arc<Plane>,
    /// Bytes read and scanned already (by the fast lane, or rewritten here), returned before
    /// any new read.
    unread: Aside,
    /// An absolute-form head from its target on, held back until it is whole. Boxed as
    /// [`Aside`] is: a pointer on connections that never have one.
    #[allow(clippy::box_collection)]
    held: Option<Box<Vec<u8>>>,
    /// Bytes read after an absolute-form head that the scan has not seen yet: scanned as if
    /// just read once the head before them is rewritten.
    rescan: Aside,
    /// The client's address, for the access log.
    peer: Option<IpAddr>,
}

impl Guarded {
    pub(super) fn new(
        inner: Stream,
        header_timeout: Duration,
        plane: Arc<Plane>,
        peer: Option<IpAddr>,
    ) -> Self {
        Guarded {
            peer,
            inner,
            phase: Phase::head(),
            header_timeout,
            deadline: Some(Instant::now() + header_timeout),
            timer: None,
            idle: None,
            plane,
            unread: Aside::default(),
            held: None,
            rescan: Aside::default(),
        }
    }

    /// The fast lane hands the connection to the pipeline: `read` (bytes it read and did not
    /// answer) is read again first.
    pub(super) fn hand_over(&mut self, mut read: Vec<u8>) {
        // Bytes still waiting here (the rest of a rewritten head's read) come after them.
        read.extend_from_slice(self.unread.bytes());
        self.unread.set(read);
    }

    /// A read is waiting inside a head: is the deadline past? Registers a wake-up if not.
    fn head_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Instant::now() + self.header_timeout);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// A read is waiting between requests: has the drain window passed? Registers a wake-up.
    fn drain_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.plane.shutdown.idle_wait(&mut self.idle, cx.waker())
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(entry) = self.idle.take() {
            self.plane.shutdown.forget(entry);
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.unread.is_empty() {
                this.unread.put_into(buf);
                return Poll::Ready(Ok(()));
            }
            // The pipeline let a 101 through to an upgrade: the rest is another protocol.
            if this.phase != Phase::Tunnel && connections::switched() {
                this.phase = Phase::Tunnel;
                this.deadline = None;
            }
            let before = buf.filled().len();
            let read = if this.rescan.is_empty() {
                Pin::new(&mut this.inner).poll_read(cx, buf)
            } else {
                // Bytes read before, not scanned yet: as if read now.
                this.rescan.put_into(buf);
                Poll::Ready(Ok(()))
            };
            match read {
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    // End of stream (a head held back, incomplete, goes with it).
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => match this.scan_read(buf, before) {
                    Ok(true) => return Poll::Ready(Ok(())),
                    // Everything read went into a held head: read on.
                    Ok(false) => continue,
                    Err(refusal) => {
                        // Best effort, and the connection ends here either way. (A response
                        // may already be under way for a request before this one; the client
                        // then sees it cut short, as with any connection closed mid-response.)
                        let (event, answer) = refusal;
                        this.plane.connections.count(event);
                        this.log_refusal(answer, Duration::ZERO);
                        let mut rendered = Vec::new();
                        let bytes = match answer {
                            Answer::Refused(_) => {
                                answer.render(true, &mut rendered);
                                &rendered[..]
                            }
                            _ => answer.closing_bytes(),
                        };
                        let _ = Pin::new(&mut this.inner).poll_write(cx, bytes);
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            answer.body().trim_end(),
                        )));
                    }
                },
                Poll::Pending => return this.pending(cx, buf),
                other => return other,
            }
        }
    }
}

impl Guarded {
    /// Scan what a read just put into `buf` after `before`, rewriting an absolute-form head to
    /// origin form (`http1::request::origin_form`): its bytes from the target on are held
    /// back until the head is whole. True when `buf` has new bytes for the reader.
    fn scan_read(&mut self, buf: &mut ReadBuf<'_>, before: usize) -> Result<bool, (Event, Answer)> {
        let refused = |bad| match bad {
            Bad::RequestLine | Bad::Target => (Event::BadRequestLine, Answer::BadRequestLine),
            Bad::Chunk => (Event::BadChunk, Answer::BadChunk),
        };
        if let Some(held) = self.held.as_mut() {
            let start = held.len();
            held.extend_from_slice(&buf.filled()[before..]);
            buf.set_filled(before);
            let fed = feed_marked(&mut self.phase, &mut held[start..]).map_err(refused)?;
            if fed.head_ended {
                self.deadline = None;
            }
            match fed.absolute {
                Some((_, Some(end))) => {
                    let mut held = self.held.take().unwrap_or_default();
                    self.rescan
                        .set([&held[start + end..], self.rescan.bytes()].concat());
                    held.truncate(start + end);
                    self.release(&held)?;
                }
                _ if held.len() > self.plane.limits.max_head => {
                    let too_large = Refused(431, "request head too large");
                    return Err((Event::BadRequestLine, Answer::Refused(too_large)));
                }
                _ => {}
            }
            return Ok(false);
        }
        let fed = feed_marked(&mut self.phase, &mut buf.filled_mut()[before..]).map_err(refused)?;
        if fed.head_ended {
            self.deadline = None;
        }
        // What the scan stopped short of (after an absolute-form head) is scanned next.
        let scanned = before + fed.consumed;
        if scanned < buf.filled().len() {
            self.rescan
                .set([&buf.filled()[scanned..], self.rescan.bytes()].concat());
            buf.set_filled(scanned);
        }
        let Some((Some(target), end)) = fed.absolute else {
            return Ok(buf.filled().len() > before);
        };
        let at = before + target;
        let rest = buf.filled()[at..].to_vec();
        buf.set_filled(at);
        match end {
            Some(_) => self.release(&rest)?,
            None => self.held = Some(Box::new(rest)),
        }
        Ok(at > before)
    }

    /// The access log's line for a request refused here, before anything parsed it: no
    /// method, target or service to name.
    fn log_refusal(&self, answer: Answer, duration: Duration) {
        if let Some(log) = &self.plane.access_log {
            log.log(&Entry {
                client: self.peer,
                method: b"",
                host: b"",
                target: b"",
                version: "HTTP/1.1",
                status: answer.status(),
                bytes: answer.body().len() as u64,
                duration,
                backend: "",
                request_id: b"",
                service: "",
                attempts: 0,
                class: RequestClass::Normal,
                user_agent: b"",
                referer: b"",
                https: false,
            });
        }
    }

    /// `head` is an absolute-form head from its target to its end: read next in origin form.
    fn release(&mut self, head: &[u8]) -> Result<(), (Event, Answer)> {
        let origin = origin_form(head).ok_or((Event::BadRequestLine, Answer::BadRequestLine))?;
        self.unread.extend(&origin);
        Ok(())
    }

    /// Nothing to read now: is the head deadline past, or the drain window?
    fn pending(&mut self, cx: &mut Context<'_>, buf: &ReadBuf<'_>) -> Poll<io::Result<()>> {
        let phase = self.phase;
        // A head has begun (or it is the connection's first, timed from accept).
        let in_head = matches!(phase, Phase::Head(h) if h.started()) || self.deadline.is_some();
        match phase {
            Phase::Head(h) if in_head && self.head_expired(cx) => {
                self.plane.connections.count(Event::HeadTimeout);
                // A connection that never sent a byte made no request to log.
                if h.started() {
                    self.log_refusal(Answer::HeadTimeout, self.header_timeout);
                }
                // Best effort: the socket's send buffer is empty between requests.
                let answer = Answer::HeadTimeout.closing_bytes();
                let _ = Pin::new(&mut self.inner).poll_write(cx, answer);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("request head not complete within {:?}", self.header_timeout),
                )))
            }
            // Between requests and draining. Pingora also reads one byte at a time while a
            // response streams, to notice a client that leaves; that read must not end the
            // stream, so only a read for a new head (a buffer of more than one byte) is
            // answered with end of stream.
            _ if phase.between_requests() && buf.remaining() > 1 && self.drain_expired(cx) => {
                self.plane.connections.count(Event::DrainedIdle);
                // End of stream: the proxy closes the connection as if the client had.
                Poll::Ready(Ok(()))
            }
            _ => Poll::Pending,
        }
    }
}

pass_through_io!(Guarded);

/// Bytes set aside for later reads. Almost every connection never has any, so while there are
/// none this is one pointer, not a `Vec`'s three words (`loadtest/idle.py`).
#[derive(Default)]
#[allow(clippy::box_collection)] // the box is the point: one pointer while empty
struct Aside(Option<Box<Vec<u8>>>);

impl Aside {
    fn bytes(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    fn set(&mut self, bytes: Vec<u8>) {
        self.0 = (!bytes.is_empty()).then(|| Box::new(bytes));
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.0.get_or_insert_default().extend_from_slice(bytes);
    }

    /// Move as many bytes from the front as `buf` takes; freed once all are gone.
    fn put_into(&mut self, buf: &mut ReadBuf<'_>) {
        if let Some(bytes) = self.0.as_mut() {
            let n = bytes.len().min(buf.remaining());
            buf.put_slice(&bytes[..n]);
            bytes.drain(..n);
            if bytes.is_empty() {
                self.0 = None;
            }
        }
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        // Pingora peeks for the HTTP/2 preface; bytes handed back by the lane come first.
        let unread = self.unread.bytes();
        if !unread.is_empty() {
            let n = unread.len().min(buf.len());
            buf[..n].copy_from_slice(&unread[..n]);
            return Ok(n == buf.len());
        }
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}
