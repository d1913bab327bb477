//! The proxy's own answers: every response `rusty-lb` writes itself, as one value per case.
//!
//! An [`Answer`] knows its status, its text, whether it carries `Retry-After` and whether it
//! closes the connection by default. Each request path renders it its own way — bytes for the
//! connection front and the fast lane ([`Answer::render`]), a Pingora header and body for the
//! pipeline ([`Answer::response_header`], [`Answer::body`]) — from the same parts, so a client
//! cannot tell which path answered. Nothing here does I/O.

use std::sync::LazyLock;

use pingora::http::ResponseHeader;
use rusty_shared::RequestClass;

use crate::http1::head::status_digits;
use crate::http1::Refused;

/// What every answer's body is.
pub const CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// The gRPC status codes our answers use (grpc/doc/statuscodes.md).
pub const GRPC_DEADLINE_EXCEEDED: u32 = 4;
pub const GRPC_PERMISSION_DENIED: u32 = 7;
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
pub const GRPC_UNIMPLEMENTED: u32 = 12;
pub const GRPC_INTERNAL: u32 = 13;
pub const GRPC_UNAVAILABLE: u32 = 14;

/// `grpc-message` as the gRPC wire spec wants it: bytes outside printable ASCII, and `%`,
/// percent-encoded.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is a gRPC call: its `content-type` is `application/grpc`, alone or with a
/// `+format` or `;parameters` suffix.
pub fn is_grpc(content_type: &[u8]) -> bool {
    let prefix = b"application/grpc";
    content_type.len() >= prefix.len()
        && content_type[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(content_type.get(prefix.len()), None | Some(b'+' | b';'))
}

/// A response the proxy writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// No table has been installed yet.
    NoTable,
    /// No service matches the request's host and path.
    NoRoute,
    /// No backend could take the request: none exists, or none accepted a connection.
    NoBackend,
    /// A backend took the request and failed to answer it properly.
    BadGateway,
    /// A backend took the request and did not answer in time.
    GatewayTimeout,
    /// Every backend is at its concurrency cap and the request was shed.
    Shed(RequestClass),
    /// The request body grew past `--max-body-bytes` while streaming.
    PayloadTooLarge,
    /// The request breaks a rule of `http1::request` or the editor: its status and reason.
    Refused(Refused),
    /// `--max-connections` client connections are open.
    TooManyConnections,
    /// A request head did not arrive within `--header-timeout`.
    HeadTimeout,
    /// The request line as sent is malformed.
    BadRequestLine,
    /// The chunked framing of a request body is malformed.
    BadChunk,
    /// A request on a TLS connection names a host its certificate does not cover.
    Misdirected,
    /// A plain-HTTP request to a service that redirects to HTTPS (the `Location` is added
    /// where the answer is given).
    HttpsRedirect,
    /// Plain HTTP arrived on the TLS listener.
    PlainHttpToTls,
    /// Something the proxy did not expect went wrong (a bug, or an internal limit).
    Internal,
}

impl Answer {
    pub fn status(self) -> u16 {
        match self {
            Answer::NoTable | Answer::NoBackend | Answer::Shed(_) | Answer::TooManyConnections => {
                503
            }
            Answer::NoRoute => 404,
            Answer::BadGateway => 502,
            Answer::GatewayTimeout => 504,
            Answer::PayloadTooLarge => 413,
            Answer::Refused(Refused(status, _)) => status,
            Answer::HeadTimeout => 408,
            Answer::BadRequestLine | Answer::BadChunk | Answer::PlainHttpToTls => 400,
            Answer::Misdirected => 421,
            Answer::HttpsRedirect => 308,
            Answer::Internal => 500,
        }
    }

    /// The answer to an attempt that ended with this status (502, 503 or 504).
    pub fn for_failure(status: u16) -> Answer {
        match status {
            504 => Answer::GatewayTimeout,
            503 => Answer::NoBackend,
            _ => Answer::BadGateway,
        }
    }

    /// The body, one line of text.
    pub fn body(self) -> &'static str {
        match self {
            Answer::NoTable => "no routing table installed yet\n",
            Answer::NoRoute => "no route matched\n",
            Answer::NoBackend => "service unavailable: no backend available\n",
            Answer::BadGateway => "bad gateway: the backend failed to answer\n",
            Answer::GatewayTimeout => "gateway timeout: the backend did not answer in time\n",
            Answer::Shed(RequestClass::Critical) => {
                "service unavailable: overloaded, critical request shed; retry shortly\n"
            }
            Answer::Shed(RequestClass::Normal) => {
                "service unavailable: overloaded, normal request shed; retry shortly\n"
            }
            Answer::Shed(RequestClass::Bulk) => {
                "service unavailable: overloaded, bulk request shed; retry shortly\n"
            }
            Answer::PayloadTooLarge => "payload too large: the request body is over the limit\n",
            Answer::Refused(Refused(_, why)) => why,
            Answer::TooManyConnections => "too many connections, try again\n",
            Answer::HeadTimeout => "request head not received in time\n",
            Answer::BadRequestLine => "malformed request line\n",
            Answer::BadChunk => "malformed chunked body\n",
            Answer::Misdirected => {
                "misdirected request: this connection's certificate does not cover that host\n"
            }
            Answer::PlainHttpToTls => "a plain HTTP request was sent to the HTTPS port\n",
            Answer::HttpsRedirect => "moved to HTTPS\n",
            Answer::Internal => "internal error\n",
        }
    }

    /// Refusals carry a reason without its line end.
    fn needs_newline(self) -> bool {
        matches!(self, Answer::Refused(_))
    }

    fn body_len(self) -> usize {
        self.body().len() + usize::from(self.needs_newline())
    }

    /// Seconds a client should wait before trying again, for answers about load.
    pub fn retry_after(self) -> Option<&'static str> {
        matches!(self, Answer::Shed(_) | Answer::TooManyConnections).then_some("1")
    }

    /// Whether the connection closes after this answer wherever it is given: after a refusal,
    /// a framing error or a failed attempt nothing more is read from it.
    pub fn closes(self) -> bool {
        !matches!(
            self,
            Answer::NoTable
                | Answer::NoRoute
                | Answer::Shed(_)
                | Answer::Misdirected
                | Answer::HttpsRedirect
        )
    }

    /// The whole HTTP/1.1 response, appended to `out`; `close` says which `Connection` it
    /// announces.
    pub fn render(self, close: bool, out: &mut Vec<u8>) {
        let status = self.status();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(&status_digits(status));
        out.push(b' ');
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\nContent-Type: ");
        out.extend_from_slice(CONTENT_TYPE.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        push_decimal(out, self.body_len());
        if let Some(after) = self.retry_after() {
            out.extend_from_slice(b"\r\nRetry-After: ");
            out.extend_from_slice(after.as_bytes());
        }
        out.extend_from_slice(if close {
            b"\r\nConnection: close\r\n\r\n"
        } else {
            b"\r\nConnection: keep-alive\r\n\r\n"
        });
        out.extend_from_slice(self.body().as_bytes());
        if self.needs_newline() {
            out.push(b'\n');
        }
    }

    /// The head Pingora writes for this answer (it adds `Connection` and `Date` itself).
    pub fn response_header(self) -> ResponseHeader {
        let mut resp = ResponseHeader::build(self.status(), Some(4))
            .unwrap_or_else(|_| ResponseHeader::build(500, Some(4)).expect("500 is a status"));
        // Static names and ASCII values: these inserts cannot fail.
        let _ = resp.insert_header("Content-Type", CONTENT_TYPE);
        let _ = resp.insert_header("Content-Length", self.body_len());
        if let Some(after) = self.retry_after() {
            let _ = resp.insert_header("Retry-After", after);
        }
        resp
    }

    /// The gRPC status a gRPC client gets for this answer: the HTTP-to-gRPC mapping of the
    /// gRPC spec, except that our own timeout is `DEADLINE_EXCEEDED` and load shedding and a
    /// body over the limit are `RESOURCE_EXHAUSTED`.
    pub fn grpc_status(self) -> u32 {
        match self {
            Answer::GatewayTimeout | Answer::HeadTimeout => GRPC_DEADLINE_EXCEEDED,
            Answer::Shed(_) | Answer::PayloadTooLarge => GRPC_RESOURCE_EXHAUSTED,
            Answer::NoRoute => GRPC_UNIMPLEMENTED,
            Answer::Misdirected | Answer::HttpsRedirect => GRPC_PERMISSION_DENIED,
            Answer::Refused(_)
            | Answer::BadRequestLine
            | Answer::BadChunk
            | Answer::PlainHttpToTls
            | Answer::Internal => GRPC_INTERNAL,
            Answer::NoTable
            | Answer::NoBackend
            | Answer::BadGateway
            | Answer::TooManyConnections => GRPC_UNAVAILABLE,
        }
    }

    /// The answer to a gRPC client, trailers-only: HTTP 200, `application/grpc`, the status in
    /// `grpc-status` and the text in `grpc-message` (percent-encoded where it must be), no body.
    pub fn grpc_response_header(self) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, Some(4)).expect("200 is a status");
        let _ = resp.insert_header("Content-Type", "application/grpc");
        for (name, value) in self.grpc_trailers().iter() {
            let _ = resp.insert_header(name.clone(), value.clone());
        }
        if let Some(after) = self.retry_after() {
            let _ = resp.insert_header("Retry-After", after);
        }
        resp
    }

    /// `grpc-status` and `grpc-message`: the end of a gRPC call the backend broke off after its
    /// answer began, or the status part of [`Answer::grpc_response_header`].
    pub fn grpc_trailers(self) -> http::HeaderMap {
        let mut trailers = http::HeaderMap::with_capacity(2);
        trailers.insert("grpc-status", self.grpc_status().into());
        // Printable ASCII after encoding: always a valid value.
        if let Ok(message) = http::HeaderValue::from_str(&grpc_message(self.body().trim_end())) {
            trailers.insert("grpc-message", message);
        }
        trailers
    }

    /// The body as Pingora sends it.
    pub fn body_bytes(self) -> bytes::Bytes {
        if self.needs_newline() {
            bytes::Bytes::from(format!("{}\n", self.body()))
        } else {
            bytes::Bytes::from_static(self.body().as_bytes())
        }
    }

    /// The rendered answer that closes the connection, made once: for the connection front,
    /// which writes these from inside a poll without room to allocate.
    pub fn closing_bytes(self) -> &'static [u8] {
        static TOO_MANY: LazyLock<Vec<u8>> = LazyLock::new(|| rendered(Answer::TooManyConnections));
        static HEAD_TIMEOUT: LazyLock<Vec<u8>> = LazyLock::new(|| rendered(Answer::HeadTimeout));
        static LINE: LazyLock<Vec<u8>> = LazyLock::new(|| rendered(Answer::BadRequestLine));
        static CHUNK: LazyLock<Vec<u8>> = LazyLock::new(|| rendered(Answer::BadChunk));
        match self {
            Answer::TooManyConnections => &TOO_MANY,
            Answer::HeadTimeout => &HEAD_TIMEOUT,
            Answer::BadRequestLine => &LINE,
            Answer::BadChunk => &CHUNK,
            // Others are rendered where they are given; this is only a fallback.
            _ => &CHUNK,
        }
    }
}

/// The answer to an ACME HTTP-01 challenge the table carries (RFC 8555 §8.3): the key
/// authorization, as Pingora sends it. Not an [`Answer`]: its body comes from the table.
pub fn acme_challenge(key_authorization: &str) -> (ResponseHeader, bytes::Bytes) {
    let mut resp = ResponseHeader::build(200, Some(3))
        .unwrap_or_else(|_| ResponseHeader::build(500, Some(3)).expect("500 is a status"));
    let _ = resp.insert_header("Content-Type", "text/plain");
    let _ = resp.insert_header("Content-Length", key_authorization.len());
    let _ = resp.insert_header("Cache-Control", "no-store");
    (
        resp,
        bytes::Bytes::copy_from_slice(key_authorization.as_bytes()),
    )
}

fn rendered(answer: Answer) -> Vec<u8> {
    let mut out = Vec::new();
    answer.render(true, &mut out);
    out
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// Append the decimal digits of `n`, without `fmt`.
pub fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Answer; 18] = [
        Answer::NoTable,
        Answer::NoRoute,
        Answer::NoBackend,
        Answer::BadGateway,
        Answer::GatewayTimeout,
        Answer::Shed(RequestClass::Critical),
        Answer::Shed(RequestClass::Normal),
        Answer::Shed(RequestClass::Bulk),
        Answer::PayloadTooLarge,
        Answer::Refused(Refused(431, "header line too large")),
        Answer::TooManyConnections,
        Answer::HeadTimeout,
        Answer::BadRequestLine,
        Answer::BadChunk,
        Answer::Misdirected,
        Answer::HttpsRedirect,
        Answer::PlainHttpToTls,
        Answer::Internal,
    ];

    #[test]
    fn grpc_clients_get_a_status_and_no_body_and_only_grpc_types_count() {
        let head = Answer::NoBackend.grpc_response_header();
        assert_eq!(head.status.as_u16(), 200);
        let get = |n: &str| head.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(get("content-type").as_deref(), Some("application/grpc"));
        assert_eq!(get("grpc-status").as_deref(), Some("14"));
        assert_eq!(
            get("grpc-message").as_deref(),
            Some("service unavailable: no backend available")
        );
        assert_eq!(head.headers.get("content-length"), None);
        assert_eq!(Answer::GatewayTimeout.grpc_status(), GRPC_DEADLINE_EXCEEDED);
        assert_eq!(Answer::Shed(RequestClass::Bulk).grpc_status(), 8);
        assert_eq!(Answer::NoRoute.grpc_status(), 12);
        assert_eq!(grpc_message("50% off\n"), "50%25 off%0A");
        for (ct, grpc) in [
            (&b"application/grpc"[..], true),
            (b"application/grpc+proto", true),
            (b"Application/GRPC; charset=x", true),
            (b"application/grpc-web", false),
            (b"application/json", false),
        ] {
            assert_eq!(is_grpc(ct), grpc, "{}", String::from_utf8_lossy(ct));
        }
    }

    #[test]
    fn every_answer_frames_its_body_exactly_and_renders_like_the_pipeline_head() {
        for answer in ALL {
            for close in [true, false] {
                let mut raw = Vec::new();
                answer.render(close, &mut raw);
                let mut headers = [httparse::EMPTY_HEADER; 8];
                let mut resp = httparse::Response::new(&mut headers);
                let httparse::Status::Complete(n) = resp.parse(&raw).unwrap() else {
                    panic!("incomplete: {}", raw.escape_ascii());
                };
                assert_eq!(resp.code, Some(answer.status()));
                let body = &raw[n..];
                assert_eq!(body, &answer.body_bytes()[..], "{answer:?}");
                assert!(body.ends_with(b"\n"), "{answer:?}");
                // The same headers as the pipeline's head, plus the Connection it adds.
                let head = answer.response_header();
                let mut ours: Vec<(String, String)> = head
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                    .collect();
                ours.push((
                    "connection".into(),
                    if close { "close" } else { "keep-alive" }.into(),
                ));
                let mut rendered: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                ours.sort();
                rendered.sort();
                assert_eq!(ours, rendered, "{answer:?}");
                assert_eq!(head.status.as_u16(), answer.status());
            }
        }
    }

    #[test]
    fn only_answers_about_load_ask_the_client_to_retry() {
        for answer in ALL {
            let load = matches!(answer, Answer::Shed(_) | Answer::TooManyConnections);
            assert_eq!(answer.retry_after().is_some(), load, "{answer:?}");
        }
        assert_eq!(Answer::for_failure(504), Answer::GatewayTimeout);
        assert_eq!(Answer::for_failure(503), Answer::NoBackend);
        assert_eq!(Answer::for_failure(502), Answer::BadGateway);
    }

    #[test]
    fn the_prerendered_closing_answers_are_the_rendered_ones() {
        for answer in [
            Answer::TooManyConnections,
            Answer::HeadTimeout,
            Answer::BadRequestLine,
            Answer::BadChunk,
        ] {
            assert_eq!(answer.closing_bytes(), &rendered(answer)[..]);
            assert!(answer.closes());
        }
    }
}
