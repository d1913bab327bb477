//! The forwarding-header editor: which of a message's headers cross the proxy and which the
//! proxy adds, for every request path.
//!
//! The fast lane writes heads as bytes and the pipeline edits Pingora's header map; both ask
//! this module, header by header, what to keep ([`Request::forwards`], [`Response::forwards`])
//! and let it write what is added ([`Request::add_headers`]) through [`HeaderOut`]. Pingora's own
//! header sanitising is switched off (`snapshot` sets the peers' request policy to preserve), so
//! these are the only rules. No I/O, no allocation for a request with ordinary headers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::Refused;

/// The header names the proxy treats specially, told apart by [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Host,
    ContentLength,
    Expect,
    XForwardedFor,
    XForwardedProto,
    XRequestId,
    /// `X-Forwarded-Host` (and every other `X-Forwarded-*` but `-For` and `-Proto`),
    /// `Forwarded`, `X-Real-IP`, `True-Client-IP`, `X-Client-IP`, `CF-Connecting-IP`: what a
    /// client may claim about the request before it reached us, believed only from a trusted
    /// proxy.
    ClientClaim,
    /// `Connection` itself.
    Connection,
    /// `Upgrade`: hop-by-hop, but written anew for a WebSocket handshake and kept on a `101`.
    Upgrade,
    /// `Keep-Alive` and the legacy `Proxy-Connection`: how the client's connection behaves.
    KeepAlive,
    /// `TE`: which transfer codings the client's connection accepts.
    Te,
    /// The rest of the headers that describe one hop, not the message (RFC 9110 §7.6.1,
    /// RFC 9112 §6): `Proxy-Authenticate`, `Proxy-Authorization`, HTTP/2's upgrade
    /// `HTTP2-Settings`.
    HopByHop,
    /// `Transfer-Encoding` is hop-by-hop too, but the framing code must find it.
    TransferEncoding,
    /// `Trailer`: hop-by-hop in a request (we never forward trailers upstream as such), but a
    /// response's announcement of the trailers its chunked body carries through.
    Trailer,
    Other,
}

/// Which of the names the proxy treats specially `name` (a token, as every parser here
/// yields) is, in any case. Its length and first letter pick at most one candidate, so an
/// ordinary header costs a comparison of two bytes.
#[inline]
pub fn classify(name: &[u8]) -> Name {
    // For tokens, setting bit 5 lower-cases letters and leaves digits and `-` as they are.
    #[inline(always)]
    fn is(name: &[u8], lower: &[u8]) -> bool {
        name.len() == lower.len() && name.iter().zip(lower).all(|(&a, &b)| a | 0x20 == b)
    }
    let Some(&first) = name.first() else {
        return Name::Other;
    };
    let (kind, lower): (Name, &[u8]) = match (name.len(), first | 0x20) {
        (2, b't') => (Name::Te, b"te"),
        (4, b'h') => (Name::Host, b"host"),
        (6, b'e') => (Name::Expect, b"expect"),
        (7, b'u') => (Name::Upgrade, b"upgrade"),
        (7, b't') => (Name::Trailer, b"trailer"),
        (9, b'f') => (Name::ClientClaim, b"forwarded"),
        (9, b'x') => (Name::ClientClaim, b"x-real-ip"),
        (10, b'c') => (Name::Connection, b"connection"),
        (10, b'k') => (Name::KeepAlive, b"keep-alive"),
        (12, b'x') => (Name::XRequestId, b"x-request-id"),
        (14, b'c') => (Name::ContentLength, b"content-length"),
        (14, b'h') => (Name::HopByHop, b"http2-settings"),
        (15, b'x') => (Name::XForwardedFor, b"x-forwarded-for"),
        (16, b'p') => (Name::KeepAlive, b"proxy-connection"),
        (16, b'x') => (Name::ClientClaim, b"x-forwarded-host"),
        (17, b't') => (Name::TransferEncoding, b"transfer-encoding"),
        (17, b'x') => (Name::XForwardedProto, b"x-forwarded-proto"),
        (18, b'p') => (Name::HopByHop, b"proxy-authenticate"),
        (19, b'p') => (Name::HopByHop, b"proxy-authorization"),
        (11, b'x') => (Name::ClientClaim, b"x-client-ip"),
        (14, b't') => (Name::ClientClaim, b"true-client-ip"),
        (16, b'c') => (Name::ClientClaim, b"cf-connecting-ip"),
        _ => (Name::Other, b""),
    };
    if kind != Name::Other && is(name, lower) {
        kind
    } else if name.len() > 12 && first | 0x20 == b'x' && is(&name[..12], b"x-forwarded-") {
        // Any other `X-Forwarded-*` (Port, Ssl, Prefix, Scheme, Server…) is a claim too.
        Name::ClientClaim
    } else {
        Name::Other
    }
}

/// One header line, with its name classified once for every rule that asks.
#[derive(Debug, Clone, Copy)]
pub struct Line<'h> {
    pub kind: Name,
    pub name: &'h [u8],
    pub value: &'h [u8],
}

impl<'h> Line<'h> {
    pub fn new(name: &'h [u8], value: &'h [u8]) -> Self {
        Line {
            kind: classify(name),
            name,
            value,
        }
    }
}

/// Whether a header of this name describes the connection (never forwarded as it is).
fn hop_by_hop(kind: Name) -> bool {
    matches!(
        kind,
        Name::Connection
            | Name::Upgrade
            | Name::KeepAlive
            | Name::Te
            | Name::HopByHop
            | Name::TransferEncoding
            | Name::Trailer
    )
}

/// Headers a `Connection` option may not name: removing them would change how the request is
/// routed, framed or attributed.
const PROTECTED: [&str; 7] = [
    "host",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
    "x-request-id",
];

/// Most options a `Connection` header list may carry (Pingora's and Envoy's bound is 10).
pub const MAX_CONNECTION_OPTIONS: usize = 10;

/// Most `X-Forwarded-For` lines a request may carry; each is a part of one list.
pub const MAX_FORWARDED_FOR_LINES: usize = 8;

/// Where the proxy writes the headers it adds: a byte buffer, or Pingora's header map. A
/// header is written as `start(name)`, its value in one or more `value`s, then `finish`.
pub trait HeaderOut {
    fn start(&mut self, name: &'static str);
    fn value(&mut self, value: &[u8]);
    fn finish(&mut self);

    /// A whole header with a value in one piece.
    #[inline]
    fn add(&mut self, name: &'static str, value: &[u8]) {
        self.start(name);
        self.value(value);
        self.finish();
    }
}

impl HeaderOut for Vec<u8> {
    #[inline]
    fn start(&mut self, name: &'static str) {
        self.extend_from_slice(name.as_bytes());
        self.extend_from_slice(b": ");
    }
    #[inline]
    fn value(&mut self, value: &[u8]) {
        self.extend_from_slice(value);
    }
    #[inline]
    fn finish(&mut self) {
        self.extend_from_slice(b"\r\n");
    }
}

/// Where a request came in, as the forwarding headers tell the backend.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The client's address as text.
    pub client: Option<&'a [u8]>,
    /// The client is a proxy in `--trusted-proxies`: its forwarding headers are believed.
    pub trusted: bool,
    /// The scheme the client used, for `X-Forwarded-Proto`.
    pub proto: Proto,
}

impl<'a> Origin<'a> {
    /// The origin every request path gives the editor: the client's address as text (if it
    /// has one), whether it is a trusted proxy, and whether it came over TLS.
    pub fn new(client: Option<&'a ClientText>, trusted: bool, https: bool) -> Origin<'a> {
        Origin {
            client: client.map(ClientText::as_bytes),
            trusted,
            proto: if https { Proto::Https } else { Proto::Http },
        }
    }
}

/// A client's address as text, on the stack: IPv4 written by hand (the common case), IPv6
/// through `Display`. Made per request by every request path (no allocation; an idle
/// connection keeps no text), and by the access log.
#[derive(Clone, Copy)]
pub struct ClientText {
    buf: [u8; 45],
    len: u8,
}

impl ClientText {
    pub fn new(ip: IpAddr) -> ClientText {
        let mut text = ClientText {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    if octet >= 100 {
                        text.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        text.push(b'0' + octet / 10 % 10);
                    }
                    text.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(_) => {
                use std::io::Write as _;
                let mut rest = &mut text.buf[..];
                // At most 45 bytes (an IPv4-mapped address in full), so it always fits.
                let _ = write!(rest, "{ip}");
                let left = rest.len();
                text.len = (45 - left) as u8;
            }
        }
        text
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len as usize] = b;
        self.len += 1;
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// The scheme a request came in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http,
    Https,
}

/// A request's headers as read once by the editor: what decides its upstream head.
#[derive(Debug, Clone)]
pub struct Request<'h> {
    http11: bool,
    trusted: bool,
    options: [&'h [u8]; MAX_CONNECTION_OPTIONS],
    n_options: usize,
    /// Options counted against the limit, kept or not.
    seen_options: usize,
    chain: [&'h [u8]; MAX_FORWARDED_FOR_LINES],
    n_chain: usize,
    has_request_id: bool,
    /// The client asked to close its connection after the answer.
    pub close: bool,
    /// A WebSocket upgrade (`Upgrade: websocket` on HTTP/1.1), forwarded as one.
    pub websocket: bool,
    /// The upstream connection is not reused after this request (set by the path for a
    /// `HEAD`: a body its backend sent anyway would be read as the next request's answer),
    /// and the request says so with `Connection: close`.
    pub closes_upstream: bool,
}

/// Read a request's header lines (see [`Request::read`]).
#[inline]
pub fn read_request<'h>(
    headers: impl IntoIterator<Item = Line<'h>>,
    http11: bool,
    trusted: bool,
) -> Result<Request<'h>, Refused> {
    let mut r = Request::new(http11, trusted);
    for line in headers {
        r.read(&line)?;
    }
    Ok(r)
}

impl<'h> Request<'h> {
    /// Before the first header line of a request of this version, from a client that is (or
    /// is not) a trusted proxy.
    #[inline]
    pub fn new(http11: bool, trusted: bool) -> Self {
        Request {
            http11,
            trusted,
            options: [&[]; MAX_CONNECTION_OPTIONS],
            n_options: 0,
            seen_options: 0,
            chain: [&[]; MAX_FORWARDED_FOR_LINES],
            n_chain: 0,
            has_request_id: false,
            close: false,
            websocket: false,
            closes_upstream: false,
        }
    }

    /// Read one header line, in order (a path may do it in its own pass over the headers).
    /// Refused: a `Connection` list with more than [`MAX_CONNECTION_OPTIONS`] options, an
    /// option that is not a token or names a header in [`PROTECTED`], more than
    /// [`MAX_FORWARDED_FOR_LINES`] `X-Forwarded-For` lines.
    #[inline]
    pub fn read(&mut self, line: &Line<'h>) -> Result<(), Refused> {
        let value = line.value;
        match line.kind {
            Name::Connection => {
                for option in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if !option.is_empty() {
                        self.option(option)?;
                    }
                }
            }
            // From anyone but a trusted proxy, the chain is not believed: it starts at the peer.
            Name::XForwardedFor if self.trusted => {
                if self.n_chain == MAX_FORWARDED_FOR_LINES {
                    return Err(Refused(400, "too many X-Forwarded-For lines"));
                }
                // A value that is not visible ASCII is no address list; it is dropped.
                let value = value.trim_ascii();
                if !value.is_empty()
                    && value
                        .iter()
                        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
                {
                    self.chain[self.n_chain] = value;
                    self.n_chain += 1;
                }
            }
            Name::XRequestId => self.has_request_id = true,
            Name::Upgrade => {
                self.websocket =
                    self.http11 && value.trim_ascii().eq_ignore_ascii_case(b"websocket");
            }
            _ => {}
        }
        Ok(())
    }

    fn option(&mut self, option: &'h [u8]) -> Result<(), Refused> {
        if self.seen_options == MAX_CONNECTION_OPTIONS {
            return Err(Refused(400, "too many Connection options"));
        }
        self.seen_options += 1;
        if !option.iter().all(|&b| is_tchar(b)) {
            return Err(Refused(400, "a Connection option that is not a token"));
        }
        if PROTECTED
            .iter()
            .any(|p| option.eq_ignore_ascii_case(p.as_bytes()))
        {
            return Err(Refused(
                400,
                "Connection names a header the proxy must keep",
            ));
        }
        self.close |= option.eq_ignore_ascii_case(b"close");
        if !names_nothing_more(option) {
            self.options[self.n_options] = option;
            self.n_options += 1;
        }
        Ok(())
    }
}

impl Request<'_> {
    /// Whether a header line of the client's goes upstream as it is.
    #[inline]
    pub fn forwards(&self, line: &Line<'_>) -> bool {
        let (kind, name) = (line.kind, line.name);
        !hop_by_hop(kind)
            && kind != Name::XForwardedFor
            && kind != Name::XForwardedProto
            && (kind != Name::ClientClaim || self.trusted)
            && !nominated(&self.options[..self.n_options], name)
    }

    /// Write what the proxy adds: `X-Forwarded-For` (a trusted proxy's chain, then the client,
    /// as nginx's `$proxy_add_x_forwarded_for`), `X-Forwarded-Proto`, an `X-Request-Id` when the
    /// client sent none, `Host` when the request had none (HTTP/1.0; `host` is the backend's
    /// address, as nginx's default `$proxy_host`), and the `Connection` of a WebSocket
    /// handshake or of a request after which the upstream connection closes.
    #[inline]
    pub fn add_headers(
        &self,
        origin: &Origin<'_>,
        ids: &RequestIds,
        host: Option<&[u8]>,
        out: &mut impl HeaderOut,
    ) {
        if let Some(host) = host {
            out.add("host", host);
        }
        if let Some(client) = origin.client {
            out.start("x-forwarded-for");
            for line in &self.chain[..self.n_chain] {
                out.value(line);
                out.value(b", ");
            }
            out.value(client);
            out.finish();
        }
        // Each arm a constant: no copy of unknown length.
        match origin.proto {
            Proto::Http => out.add("x-forwarded-proto", b"http"),
            Proto::Https => out.add("x-forwarded-proto", b"https"),
        }
        if !self.has_request_id {
            out.add("x-request-id", &ids.next());
        }
        if self.websocket {
            out.add("connection", b"upgrade");
            out.add("upgrade", b"websocket");
        } else if self.closes_upstream {
            out.add("connection", b"close");
        }
    }
}

/// A response's `Connection` options, read once by the editor.
#[derive(Debug, Clone)]
pub struct Response<'h> {
    options: [&'h [u8]; MAX_CONNECTION_OPTIONS],
    n_options: usize,
    switching: bool,
}

/// Read a response's header lines. A backend is not refused for an odd `Connection` list: the
/// first [`MAX_CONNECTION_OPTIONS`] options are honoured and the line itself never passes.
#[inline]
pub fn read_response<'h>(status: u16, headers: impl IntoIterator<Item = Line<'h>>) -> Response<'h> {
    let mut r = Response {
        options: [&[]; MAX_CONNECTION_OPTIONS],
        n_options: 0,
        switching: status == 101,
    };
    for Line { kind, value, .. } in headers {
        if kind != Name::Connection {
            continue;
        }
        for option in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if !option.is_empty()
                && !names_nothing_more(option)
                && r.n_options < MAX_CONNECTION_OPTIONS
            {
                r.options[r.n_options] = option;
                r.n_options += 1;
            }
        }
    }
    r
}

impl Response<'_> {
    /// Whether a header line of the backend's reaches the client as it is (the framing headers
    /// are the path's business, not this).
    #[inline]
    pub fn forwards(&self, line: &Line<'_>) -> bool {
        let name = line.name;
        match line.kind {
            Name::Connection | Name::Upgrade => self.switching,
            // The framing headers are rewritten by each path for its client.
            Name::TransferEncoding | Name::ContentLength | Name::Trailer => true,
            Name::KeepAlive | Name::Te | Name::HopByHop => false,
            _ => !nominated(&self.options[..self.n_options], name),
        }
    }
}

/// Whether a `Connection` option names this header.
fn nominated(options: &[&[u8]], name: &[u8]) -> bool {
    options.iter().any(|o| o.eq_ignore_ascii_case(name))
}

/// The options that name no header beyond the hop-by-hop ones removed anyway (`close`,
/// `keep-alive`, `upgrade`): not kept, so the usual `Connection: keep-alive` costs nothing
/// per header.
fn names_nothing_more(option: &[u8]) -> bool {
    match option.len() {
        5 => option.eq_ignore_ascii_case(b"close"),
        7 => option.eq_ignore_ascii_case(b"upgrade"),
        10 => option.eq_ignore_ascii_case(b"keep-alive"),
        _ => false,
    }
}

/// A `tchar` (RFC 9110 §5.6.2): the bytes of a token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Request ids unique per process run: a prefix fixed at start and a counter, in hex.
pub struct RequestIds {
    prefix: u32,
    counter: AtomicU64,
}

/// A request id as text: 8 hex digits, a dash, 16 hex digits.
pub type RequestId = [u8; 25];

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self::with_prefix(nanos ^ std::process::id().rotate_left(16))
    }

    /// Ids with a fixed prefix, for tests and benchmarks.
    pub fn with_prefix(prefix: u32) -> Self {
        RequestIds {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> RequestId {
        format_id(self.prefix, self.counter.fetch_add(1, Relaxed))
    }
}

fn format_id(prefix: u32, n: u64) -> RequestId {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [b'-'; 25];
    for (i, d) in id[..8].iter_mut().enumerate() {
        *d = HEX[(prefix >> ((7 - i) * 4)) as usize & 0xf];
    }
    for (i, d) in id[9..].iter_mut().enumerate() {
        *d = HEX[(n >> ((15 - i) * 4)) as usize & 0xf];
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines<'a>(lines: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = Line<'a>> + 'a {
        lines
            .iter()
            .map(|(n, v)| Line::new(n.as_bytes(), v.as_bytes()))
    }

    fn read<'a>(l: &'a [(&'a str, &'a str)]) -> Result<Request<'a>, Refused> {
        read_request(lines(l), true, true)
    }

    fn upstream(headers: &[(&str, &str)], client: Option<&str>, host: Option<&str>) -> String {
        let r = read(headers).unwrap();
        let mut out = Vec::new();
        for line in lines(headers) {
            if r.forwards(&line) {
                out.start("");
                out.value(line.name);
                out.value(b"=");
                out.value(line.value);
                out.finish();
            }
        }
        let ids = RequestIds::with_prefix(0xabcd);
        let origin = Origin {
            client: client.map(str::as_bytes),
            trusted: true,
            proto: Proto::Http,
        };
        r.add_headers(&origin, &ids, host.map(str::as_bytes), &mut out);
        String::from_utf8(out)
            .unwrap()
            .replace(": ", "")
            .replace("\r\n", "|")
    }

    #[test]
    fn hop_by_hop_and_nominated_headers_stay_behind() {
        let got = upstream(
            &[
                ("Host", "a"),
                ("Connection", "keep-alive, X-Secret"),
                ("Keep-Alive", "timeout=5"),
                ("X-Secret", "1"),
                ("Proxy-Authorization", "Basic x"),
                ("HTTP2-Settings", "AAA"),
                ("TE", "trailers"),
                ("Accept", "*/*"),
            ],
            Some("10.0.0.1"),
            None,
        );
        assert_eq!(
            got,
            "Host=a|Accept=*/*|x-forwarded-for10.0.0.1|x-forwarded-protohttp|\
             x-request-id0000abcd-0000000000000000|"
        );
    }

    #[test]
    fn the_forwarded_chain_is_extended_and_a_client_request_id_kept() {
        let got = upstream(
            &[
                ("X-Forwarded-For", "1.1.1.1"),
                ("x-forwarded-for", " 2.2.2.2, 3.3.3.3 "),
                ("X-Forwarded-For", "\u{fc}"),
                ("X-Forwarded-Proto", "https"),
                ("X-Request-Id", "mine"),
            ],
            Some("10.0.0.1"),
            Some("127.0.0.1:9000"),
        );
        assert_eq!(
            got,
            "X-Request-Id=mine|host127.0.0.1:9000|\
             x-forwarded-for1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.1|x-forwarded-protohttp|"
        );
    }

    #[test]
    fn an_untrusted_client_cannot_speak_for_anyone_else() {
        let headers = [
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Host", "admin.internal"),
            ("Forwarded", "for=203.0.113.9"),
            ("X-Real-IP", "203.0.113.9"),
            ("Accept", "*/*"),
        ];
        let r = read_request(lines(&headers), true, false).unwrap();
        let kept: Vec<&[u8]> = lines(&headers)
            .filter(|l| r.forwards(l))
            .map(|l| l.name)
            .collect();
        assert_eq!(kept, [&b"Accept"[..]]);
        let mut out = Vec::new();
        let origin = Origin {
            client: Some(b"10.0.0.1"),
            trusted: false,
            proto: Proto::Http,
        };
        r.add_headers(&origin, &RequestIds::with_prefix(0), None, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("x-forwarded-for: 10.0.0.1\r\n"), "{out}");
        // A trusted proxy's claims pass, and its chain is extended.
        let r = read_request(lines(&headers), true, true).unwrap();
        assert_eq!(lines(&headers).filter(|l| r.forwards(l)).count(), 4);
    }

    #[test]
    fn a_websocket_upgrade_is_forwarded_as_one_and_other_upgrades_are_not() {
        let got = upstream(
            &[("Connection", "Upgrade"), ("Upgrade", "WebSocket")],
            None,
            None,
        );
        assert!(
            got.ends_with("connectionupgrade|upgradewebsocket|"),
            "{got}"
        );
        let got = upstream(&[("Connection", "Upgrade"), ("Upgrade", "h2c")], None, None);
        assert!(!got.contains("upgrade"), "{got}");
    }

    #[test]
    fn connection_lists_that_could_hide_a_header_are_refused() {
        for (value, why) in [
            ("host", "Connection names a header the proxy must keep"),
            (
                "close, X-Forwarded-For",
                "Connection names a header the proxy must keep",
            ),
            (
                "Content-Length",
                "Connection names a header the proxy must keep",
            ),
            (
                "\"x-forwarded-for\"",
                "a Connection option that is not a token",
            ),
            ("a b", "a Connection option that is not a token"),
            ("a,b,c,d,e,f,g,h,i,j,k", "too many Connection options"),
        ] {
            assert_eq!(
                read(&[("Connection", value)]).unwrap_err(),
                Refused(400, why),
                "{value}"
            );
        }
        let nine: Vec<(&str, &str)> = vec![("X-Forwarded-For", "1"); 9];
        assert!(read(&nine).is_err());
        assert!(
            read(&[("Connection", "close, , keep-alive")])
                .unwrap()
                .close
        );
    }

    #[test]
    fn response_hop_by_hop_headers_stay_behind_except_a_switch_of_protocols() {
        let headers = [
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
        ];
        let r = read_response(200, lines(&headers));
        for line in lines(&headers) {
            assert!(!r.forwards(&line), "{}", line.name.escape_ascii());
        }
        let line = |n: &'static str| Line::new(n.as_bytes(), b"");
        assert!(r.forwards(&line("Content-Type")));
        assert!(r.forwards(&line("Trailer")));
        assert!(!r.forwards(&line("Upgrade")));
        let r = read_response(101, lines(&[("Connection", "Upgrade")]));
        assert!(r.forwards(&line("Connection")) && r.forwards(&line("Upgrade")));
    }

    #[test]
    fn names_are_classified_in_any_case_and_near_misses_are_other() {
        for (name, kind) in [
            ("Host", Name::Host),
            ("CONNECTION", Name::Connection),
            ("keep-Alive", Name::KeepAlive),
            ("Proxy-Connection", Name::KeepAlive),
            ("TE", Name::Te),
            ("Transfer-Encoding", Name::TransferEncoding),
            ("x-forwarded-FOR", Name::XForwardedFor),
            ("X-Forwarded-Proto", Name::XForwardedProto),
            ("HTTP2-Settings", Name::HopByHop),
            ("Proxy-Authorization", Name::HopByHop),
            ("Trailer", Name::Trailer),
            ("X-Forwarded-Host", Name::ClientClaim),
            ("forwarded", Name::ClientClaim),
            ("X-Real-IP", Name::ClientClaim),
            ("X-Forwarded-Port", Name::ClientClaim),
            ("x-forwarded-ssl", Name::ClientClaim),
            ("X-Forwarded-Prefix", Name::ClientClaim),
            ("True-Client-IP", Name::ClientClaim),
            ("X-Forwardedxfor", Name::Other),
            ("X-Request-Id", Name::XRequestId),
            ("Content-Type", Name::Other),
            ("Hosts", Name::Other),
            ("Connectio", Name::Other),
            ("X-Forwarded-Fox", Name::ClientClaim),
            ("X-Forwarded-", Name::Other),
            ("X-Forwarder-For", Name::Other),
            ("", Name::Other),
        ] {
            assert_eq!(classify(name.as_bytes()), kind, "{name}");
        }
    }

    #[test]
    fn request_ids_are_a_prefix_and_a_counter_in_hex() {
        for (prefix, n) in [
            (0, 0),
            (0xdead_beef, 1),
            (u32::MAX, u64::MAX),
            (7, 0x0123_4567_89ab),
        ] {
            assert_eq!(
                String::from_utf8(format_id(prefix, n).to_vec()).unwrap(),
                format!("{prefix:08x}-{n:016x}")
            );
        }
        let ids = RequestIds::new();
        assert_ne!(ids.next(), ids.next());
    }

    #[test]
    fn client_text_is_what_display_writes() {
        let cases = [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ];
        for case in cases {
            let ip: IpAddr = case.parse().unwrap();
            assert_eq!(ClientText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }
}
