//! The fast lane's heads, as pure functions over bytes: [`plain_request`] says whether a
//! request is one the lane serves and writes its upstream head with the editor's rules;
//! [`response_head`] reads a backend's head, finds the body's framing and writes the client's
//! head. The lane only recognises the ordinary; anything else is `NotPlain`, for the pipeline.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use pingora::http::ResponseHeader;

use super::editor::{self, Line, Name, Origin, RequestIds};
use super::Limits;

/// Header lines a plain request may have; a request with more takes the full pipeline.
pub const MAX_HEADERS: usize = 64;

/// A request the lane serves: where its parts are in the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plain {
    /// Bytes of the head, empty line included.
    pub len: usize,
    /// `HEAD`: the response has no body whatever its headers say.
    pub head: bool,
    /// The client asked for `Connection: close`.
    pub close: bool,
    pub host: Range<usize>,
    /// The target's path, without the query.
    pub path: Range<usize>,
    /// The whole target, query included.
    pub target: Range<usize>,
    /// `User-Agent` and `Referer` (empty when absent), for the access log.
    pub user_agent: Range<usize>,
    pub referer: Range<usize>,
    /// The client's request id in the upstream head (empty: it sent none).
    request_id: Range<usize>,
    /// Where the headers the editor added begin in the upstream head.
    added: usize,
}

impl Plain {
    /// The request id in `upstream`, the upstream head: the client's, or the one the editor
    /// made up (looked for only here, for the access log, not on every request).
    pub fn request_id<'a>(&self, upstream: &'a [u8]) -> &'a [u8] {
        if !self.request_id.is_empty() {
            return upstream.get(self.request_id.clone()).unwrap_or_default();
        }
        const NAME: &[u8] = b"x-request-id: ";
        let added = upstream.get(self.added..).unwrap_or_default();
        let Some(at) = added.windows(NAME.len()).position(|w| w == NAME) else {
            return b"";
        };
        let value = &added[at + NAME.len()..];
        &value[..value.iter().position(|&b| b == b'\r').unwrap_or(0)]
    }
}

/// A request the lane leaves to the full pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotPlain;

/// Parse a complete head at the start of `buf`. `Ok(None)`: not all of it has arrived (and it
/// is still within the size limit). `Err(NotPlain)`: not a plain request, for the full pipeline.
/// On success the upstream head is in `out` (cleared first): the request line and the headers
/// the editor forwards, as received, then the ones it adds for `origin`.
pub fn plain_request(
    buf: &[u8],
    limits: &Limits,
    origin: &Origin<'_>,
    ids: &RequestIds,
    out: &mut Vec<u8>,
) -> Result<Option<Plain>, NotPlain> {
    // Uninitialised: zeroing the array would cost more than parsing a short head.
    let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= limits.max_head => return Ok(None),
        _ => return Err(NotPlain),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(NotPlain);
    };
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(NotPlain),
    };
    // A target of RFC 3986 characters only: Pingora percent-escapes the others (a backtick, a
    // brace, a backslash…) before forwarding, and such a request goes there to be treated alike.
    if len > limits.max_head
        || target.len() > limits.max_target
        || !target.starts_with('/')
        || !target.bytes().all(uri_char)
        || req.headers.len() > limits.max_headers
    {
        return Err(NotPlain);
    }
    let mut host = None;
    let (mut user_agent, mut referer) = (&b""[..], &b""[..]);
    // One pass for the checks here and the editor's reading; each name classified once.
    let mut edit = editor::Request::new(true, origin.trusted);
    let mut kinds = [Name::Other; MAX_HEADERS];
    for (h, kind) in req.headers.iter().zip(kinds.iter_mut()) {
        let name = h.name.as_bytes();
        if name.len() + h.value.len() + 4 > limits.max_header {
            return Err(NotPlain);
        }
        let line = Line::new(name, h.value);
        *kind = line.kind;
        edit.read(&line).map_err(|_| NotPlain)?;
        match line.kind {
            Name::Host if host.replace(h.value).is_some() => return Err(NotPlain),
            // `close` or `keep-alive`; anything else (an upgrade, a list naming other headers)
            // is the pipeline's business.
            Name::Connection if !only_close_or_keep_alive(h.value) => return Err(NotPlain),
            // A body, a protocol switch, an expectation or the connection's own handling.
            Name::ContentLength
            | Name::TransferEncoding
            | Name::Upgrade
            | Name::Expect
            | Name::KeepAlive
            | Name::Te
            | Name::Trailer => return Err(NotPlain),
            // Length first: most names are neither, and are told so by one comparison.
            Name::Other if name.len() == 10 && name.eq_ignore_ascii_case(b"user-agent") => {
                user_agent = h.value
            }
            Name::Other if name.len() == 7 && name.eq_ignore_ascii_case(b"referer") => {
                referer = h.value
            }
            _ => {}
        }
    }
    let host = host.ok_or(NotPlain)?;
    if super::request::valid_host(host).is_err() {
        return Err(NotPlain);
    }
    // A path with dot segments or escapes is normalised by the pipeline, routed and forwarded
    // in its normal form; the lane serves paths that are normal already.
    let path = target.split('?').next().unwrap_or(target);
    if !matches!(
        super::path::normalize(path.as_bytes()),
        Ok(Cow::Borrowed(_))
    ) {
        return Err(NotPlain);
    }
    let lines = req
        .headers
        .iter()
        .zip(kinds.iter().copied())
        .map(|(h, kind)| Line {
            kind,
            name: h.name.as_bytes(),
            value: h.value,
        });

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut request_id = 0..0;
    for line in lines {
        if edit.forwards(&line) {
            out.extend_from_slice(line.name);
            out.extend_from_slice(b": ");
            if line.kind == Name::XRequestId {
                request_id = out.len()..out.len() + line.value.len();
            }
            out.extend_from_slice(line.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    edit.closes_upstream = head;
    let added = out.len();
    edit.add_headers(origin, ids, None, out);
    out.extend_from_slice(b"\r\n");

    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    Ok(Some(Plain {
        len,
        head,
        close: edit.close,
        host: at(host),
        path: at(path.as_bytes()),
        target: at(target.as_bytes()),
        user_agent: if user_agent.is_empty() {
            0..0
        } else {
            at(user_agent)
        },
        referer: if referer.is_empty() {
            0..0
        } else {
            at(referer)
        },
        request_id,
        added,
    }))
}

/// A `Connection` value of `close` and `keep-alive` options only.
fn only_close_or_keep_alive(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .all(|t| t.eq_ignore_ascii_case(b"close") || t.eq_ignore_ascii_case(b"keep-alive"))
}

/// A status's three digits.
pub fn status_digits(status: u16) -> [u8; 3] {
    [status / 100 % 10, status / 10 % 10, status % 10].map(|d| b'0' + d as u8)
}

/// A byte RFC 3986 allows in a path or query: unreserved, sub-delims, `:@/?` and `%`.
fn uri_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    /// Until the backend closes: the client's connection closes after it too.
    UntilClose,
}

/// A backend's response head, as read by [`response_head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// Bytes of the head, empty line included.
    pub len: usize,
    pub status: u16,
    pub body: Body,
    /// The backend's connection can carry another request after this response.
    pub reusable: bool,
}

/// Why a backend's response head cannot be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadResponse {
    /// Not HTTP/1 a parser accepts, or a head over the size limit.
    Malformed,
    /// Framing the lane cannot pass through safely (a transfer coding other than `chunked`,
    /// conflicting or unparsable lengths).
    Framing,
}

/// Largest response head the lane reads, and most header lines: Pingora's limits for the
/// pipeline, so a backend answer one accepts the other does too.
pub const MAX_RESPONSE_HEAD: usize = 1024 * 1024 - 1;
const MAX_RESPONSE_HEADERS: usize = 256;

/// How a response is framed, as its head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub body: Body,
    /// The backend's connection can carry another request after this response.
    pub reusable: bool,
    /// `Connection` names something other than `close` and `keep-alive`.
    pub options: bool,
}

/// The framing of a response of `status` (to a `HEAD` when `head_request`) with these header
/// lines, for every path. Refused as ambiguous (RFC 9112 §6.3, RFC 9110 §8.6): a
/// `Transfer-Encoding` that does not end in one `chunked`, or appears twice; a
/// `Content-Length` that is not one line of digits. With both, chunked wins and the length is
/// not passed on (as Pingora reads it for the pipeline; the body is read exactly by its
/// chunks, so nothing is left over to split the stream). A connection is reusable
/// only when nothing can follow the response legitimately *and* nothing was announced that is
/// not read: not after a body delimited by the close, nor after a response that has no body
/// by rule (`HEAD`, 204, 304), where a backend that sends one anyway would leave it for the
/// next request.
pub fn response_framing<'h>(
    version: u8,
    status: u16,
    head_request: bool,
    lines: impl IntoIterator<Item = Line<'h>>,
) -> Result<Framing, BadResponse> {
    let mut reusable = version == 1;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut options = false;
    for line in lines {
        match line.kind {
            Name::Connection => {
                for token in line.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        reusable = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        reusable |= version == 0;
                    } else {
                        options = true;
                    }
                }
            }
            Name::TransferEncoding => {
                // Chunked must be the final coding, once (RFC 9112 §6.1); the codings before
                // it are the client's to undo, and pass through with it.
                let mut codings = line.value.rsplit(|b| *b == b',').map(<[u8]>::trim_ascii);
                let last = codings.next().unwrap_or(b"");
                let again = codings.any(|c| c.eq_ignore_ascii_case(b"chunked"));
                if chunked || again || !last.eq_ignore_ascii_case(b"chunked") {
                    return Err(BadResponse::Framing);
                }
                chunked = true;
            }
            Name::ContentLength => {
                let n = std::str::from_utf8(line.value.trim_ascii())
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(BadResponse::Framing)?;
                if length.replace(n).is_some() {
                    return Err(BadResponse::Framing);
                }
            }
            _ => {}
        }
    }
    // Chunked in an HTTP/1.0 response: close after it (RFC 9112 §6.1).
    if chunked && version == 0 {
        reusable = false;
    }
    let bodiless = head_request || status == 204 || status == 304;
    let body = if bodiless || status < 200 {
        Body::None
    } else if chunked {
        Body::Chunked
    } else {
        match length {
            Some(0) => Body::None,
            Some(n) => Body::Length(n),
            None => Body::UntilClose,
        }
    };
    if body == Body::UntilClose || bodiless {
        reusable = false;
    }
    Ok(Framing {
        body,
        reusable,
        options,
    })
}

/// Where [`response_head`] writes the head a client gets: the bytes of an HTTP/1.1 head
/// (`Vec<u8>`, the fast lane's clients), or the status and fields of an HTTP/2 answer
/// ([`H2Head`]).
pub trait ResponseOut {
    /// The status line; the reason as the backend gave it, if it gave one.
    fn status(&mut self, status: u16, reason: Option<&str>);
    /// One field, its value as received (an obsolete line fold in it is the writer's to
    /// flatten).
    fn field(&mut self, name: &[u8], value: &[u8]);
    /// After the fields of a final response: an HTTP/1 client learns that a body delimited
    /// by the backend's close comes `chunked`, and whether its connection stays open.
    fn finish(&mut self, until_close: bool, close: bool);
    /// The end of the head, interim or final.
    fn end(&mut self);
}

impl ResponseOut for Vec<u8> {
    #[inline]
    fn status(&mut self, status: u16, reason: Option<&str>) {
        self.clear();
        self.extend_from_slice(b"HTTP/1.1 ");
        // httparse reads exactly three digits.
        self.extend_from_slice(&status_digits(status));
        if let Some(reason) = reason {
            self.push(b' ');
            self.extend_from_slice(reason.as_bytes());
        }
        self.extend_from_slice(b"\r\n");
    }

    #[inline]
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        // An obsolete line fold becomes spaces (RFC 9112 §5.2).
        self.extend(
            value
                .iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        self.extend_from_slice(b"\r\n");
    }

    #[inline]
    fn finish(&mut self, until_close: bool, close: bool) {
        if until_close {
            // Re-framed for the client, which keeps its connection (the pipeline does the same).
            self.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        if close {
            self.extend_from_slice(b"Connection: close\r\n");
        } else {
            self.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }

    #[inline]
    fn end(&mut self) {
        self.extend_from_slice(b"\r\n");
    }
}

/// The head of an HTTP/2 answer made by [`response_head`]: HTTP/2 has no reason phrase, no
/// `Connection` and no transfer coding (its frames delimit the body).
#[derive(Default)]
pub struct H2Head(pub Option<ResponseHeader>);

impl ResponseOut for H2Head {
    fn status(&mut self, status: u16, _reason: Option<&str>) {
        self.0 = ResponseHeader::build(status, Some(16)).ok();
    }

    fn field(&mut self, name: &[u8], value: &[u8]) {
        let Some(head) = self.0.as_mut() else { return };
        // Only a folded value needs a copy (an obsolete line fold becomes spaces).
        let value: Cow<'_, [u8]> = if value.iter().any(|&b| b == b'\r' || b == b'\n') {
            Cow::Owned(
                value
                    .iter()
                    .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
                    .collect(),
            )
        } else {
            Cow::Borrowed(value)
        };
        // httparse passed the name as a token and the value without controls but tab.
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(&value),
        ) {
            let _ = head.append_header(name, value);
        }
    }

    fn finish(&mut self, _until_close: bool, _close: bool) {}

    fn end(&mut self) {}
}

/// Parse a backend's response head at the start of `buf`; `Ok(None)` if incomplete. On
/// success the client's head is in `out` (started anew): status and fields as received minus
/// those the editor keeps back (hop-by-hop), and for an HTTP/1 client its connection's own
/// `Connection` (as the pipeline writes it): `close` when `close`, else `keep-alive`. A body
/// that runs until the backend closes is sent to an HTTP/1 client chunked. `hsts`, when given,
/// is the `Strict-Transport-Security` value the client gets instead of the backend's.
pub fn response_head(
    buf: &[u8],
    head_request: bool,
    close: bool,
    hsts: Option<&str>,
    out: &mut impl ResponseOut,
) -> Result<Option<Response>, BadResponse> {
    let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    // Pingora's leniencies for responses (backends are trusted more than clients).
    let mut config = httparse::ParserConfig::default();
    config
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true);
    let len = match config.parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(BadResponse::Malformed),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(BadResponse::Malformed);
    };
    if status < 100 {
        return Err(BadResponse::Malformed);
    }
    let lines = || {
        resp.headers
            .iter()
            .map(|h| Line::new(h.name.as_bytes(), h.value))
    };
    let framing = response_framing(version, status, head_request, lines())?;
    let (body, reusable) = (framing.body, framing.reusable);

    out.status(status, resp.reason.filter(|r| !r.is_empty()));
    // Most responses name nothing in `Connection` but `keep-alive` or `close`: then there is
    // nothing for the editor to read.
    let edit = editor::read_response(status, lines().filter(|_| framing.options));
    for line in lines() {
        if !edit.forwards(&line) {
            continue;
        }
        // A chunked body wins over a length (RFC 9112 §6.3); the length is not passed on.
        if body == Body::Chunked && line.kind == Name::ContentLength {
            continue;
        }
        if hsts.is_some() && line.name.eq_ignore_ascii_case(b"strict-transport-security") {
            continue;
        }
        out.field(line.name, line.value);
    }
    if status >= 200 {
        if let Some(value) = hsts {
            out.field(b"Strict-Transport-Security", value.as_bytes());
        }
        out.finish(body == Body::UntilClose, close);
    }
    out.end();
    Ok(Some(Response {
        len,
        status,
        body,
        reusable,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::editor::Proto;

    fn plain(req: &str) -> (Result<Option<Plain>, NotPlain>, String) {
        let mut out = Vec::new();
        let origin = Origin {
            client: Some(b"10.0.0.7"),
            trusted: true,
            proto: Proto::Http,
        };
        let ids = RequestIds::with_prefix(1);
        let r = plain_request(req.as_bytes(), &Limits::default(), &origin, &ids, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_plain_get_goes_upstream_with_forwarding_headers() {
        let req = "GET /a/b?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\r\nGET /next";
        let (r, out) = plain(req);
        let p = r.unwrap().unwrap();
        assert_eq!(&req[p.host.clone()], "example.com:8080");
        assert_eq!(&req[p.path.clone()], "/a/b");
        assert_eq!(&req[p.len..], "GET /next");
        assert!(!p.head);
        assert_eq!(
            out,
            "GET /a/b?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.7\r\nx-forwarded-proto: http\r\nx-request-id: 00000001-0000000000000000\r\n\r\n"
        );
    }

    #[test]
    fn an_existing_chain_is_extended_and_a_client_request_id_kept() {
        let req = "HEAD / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\
                   X-Forwarded-Proto: https\r\nX-Request-Id: mine\r\nConnection: keep-alive\r\n\r\n";
        let (r, out) = plain(req);
        let p = r.unwrap().unwrap();
        assert!(p.head && !p.close);
        assert_eq!(
            out,
            "HEAD / HTTP/1.1\r\nHost: a\r\nX-Request-Id: mine\r\n\
             x-forwarded-for: 1.2.3.4, 10.0.0.7\r\nx-forwarded-proto: http\r\n\
             connection: close\r\n\r\n"
        );
        let (_, out) = plain("GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: \u{fc}\r\n\r\n");
        assert!(out.contains("x-forwarded-for: 10.0.0.7\r\n"), "{out:?}");
        let (r, out) = plain("GET / HTTP/1.1\r\nConnection: Keep-Alive, close\r\nHost: a\r\n\r\n");
        assert!(r.unwrap().unwrap().close);
        assert!(!out.to_ascii_lowercase().contains("connection"));
    }

    #[test]
    fn hop_by_hop_headers_stay_behind_as_on_the_pipeline() {
        let (r, out) = plain(
            "GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic eA==\r\n\
             HTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Forwarded-For: 1.1.1.1\r\n\
             X-Forwarded-For: 2.2.2.2\r\n\r\n",
        );
        assert!(r.unwrap().is_some());
        let lower = out.to_ascii_lowercase();
        assert!(!lower.contains("proxy-authorization"), "{out}");
        assert!(!lower.contains("http2-settings"), "{out}");
        assert!(
            lower.contains("x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.7\r\n"),
            "{out}"
        );
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert_eq!(plain("GET / HTTP/1.1\r\nHost: a\r\n").0, Ok(None));
        assert_eq!(plain("GE").0, Ok(None));
    }

    #[test]
    fn anything_but_a_plain_request_takes_the_pipeline() {
        for req in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n folded\r\n\r\n",
            "GET /a`b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /{x}|\\^ HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(plain(req).0, Err(NotPlain), "{req:?}");
        }
    }

    #[test]
    fn heads_over_a_limit_take_the_pipeline() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(9000));
        assert_eq!(plain(&long).0, Err(NotPlain));
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            plain(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")).0,
            Err(NotPlain)
        );
        // A head that never ends is refused once it passes the head limit.
        let endless = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "y".repeat(40_000));
        assert_eq!(plain(&endless).0, Err(NotPlain));
    }

    fn response(
        raw: &str,
        head: bool,
        close: bool,
    ) -> (Result<Option<Response>, BadResponse>, String) {
        let mut out = Vec::new();
        let r = response_head(raw.as_bytes(), head, close, None, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_framing_is_read_from_the_head() {
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nhello",
            false,
            false,
        );
        let r = r.unwrap().unwrap();
        assert_eq!((r.status, r.body, r.reusable), (200, Body::Length(5), true));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"
        );

        // No body by rule, and then no reuse: a body sent anyway would wait for the next request.
        for (raw, head) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false,
            ),
            ("HTTP/1.1 204 No Content\r\n\r\n", false),
        ] {
            let r = response(raw, head, false).0.unwrap().unwrap();
            assert_eq!((r.body, r.reusable), (Body::None, false), "{raw:?}");
        }

        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            true,
        );
        assert_eq!(r.unwrap().unwrap().body, Body::Chunked);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );

        let (r, out) = response("HTTP/1.0 200 OK\r\n\r\nuntil close", false, false);
        let r = r.unwrap().unwrap();
        assert_eq!((r.body, r.reusable), (Body::UntilClose, false));
        assert!(out.ends_with("Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"));

        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nX: a\r\n b\r\n\r\n",
            false,
            false,
        );
        assert_eq!(r.unwrap().unwrap().body, Body::Chunked);
        assert!(out.contains("X: a   b\r\n"), "{out:?}");
        // Both framings: chunked, and the length dropped.
        let (r, out) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
            false,
        );
        let r = r.unwrap().unwrap();
        assert_eq!(r.body, Body::Chunked);
        // Chunked in HTTP/1.0: read, then the connection closes.
        let (r, _) = response(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            false,
        );
        let r = r.unwrap().unwrap();
        assert_eq!((r.body, r.reusable), (Body::Chunked, false));
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out:?}"
        );

        let (r, _) = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
            false,
        );
        assert!(!r.unwrap().unwrap().reusable);
    }

    #[test]
    fn unsafe_response_framing_is_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            // One length said twice is still two: refused, not passed on as a list.
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        ] {
            assert_eq!(
                response(raw, false, false).0,
                Err(BadResponse::Framing),
                "{raw:?}"
            );
        }
        for raw in ["HTTP/1.1 2000 OK\r\n\r\n", "HTTP/1.1 000 X\r\n\r\n"] {
            assert_eq!(response(raw, false, false).0, Err(BadResponse::Malformed));
        }
        assert_eq!(response("HTTP/1.1 200 OK\r\n", false, false).0, Ok(None));
    }

    #[test]
    fn an_http2_head_has_the_same_fields_without_framing_or_connection() {
        let raw = "HTTP/1.1 200 Fine\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
                   X-Folded: a\r\n b\r\nStrict-Transport-Security: max-age=1\r\nX-Keep: 2\r\n\r\nbody";
        let mut h1 = Vec::new();
        let mut h2 = H2Head::default();
        let hsts = Some("max-age=63072000");
        let a = response_head(raw.as_bytes(), false, false, hsts, &mut h1)
            .unwrap()
            .unwrap();
        let b = response_head(raw.as_bytes(), false, false, hsts, &mut h2)
            .unwrap()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.body, Body::UntilClose);
        let h1 = String::from_utf8(h1).unwrap();
        assert!(
            h1.contains("Transfer-Encoding: chunked\r\n") && h1.contains("Connection: keep-alive")
        );
        let head = h2.0.expect("a head");
        assert_eq!(head.status.as_u16(), 200);
        let fields: Vec<(String, String)> = head
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        // What the HTTP/1 client gets, less what HTTP/2 frames itself.
        assert_eq!(
            fields,
            [
                ("x-folded".to_owned(), "a   b".to_owned()),
                ("x-keep".to_owned(), "2".to_owned()),
                (
                    "strict-transport-security".to_owned(),
                    "max-age=63072000".to_owned()
                ),
            ]
        );
        for (name, value) in &fields {
            assert!(
                h1.to_ascii_lowercase()
                    .contains(&format!("{name}: {value}")),
                "{h1}"
            );
        }
    }
}
