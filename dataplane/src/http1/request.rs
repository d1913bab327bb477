//! The request checks: what a proxy must refuse before forwarding anything — sizes over the
//! limits (414, 431, 413), framing a backend could read another way (RFC 9112 §6.1, §6.3), a
//! missing, repeated or malformed `Host`, a target that is not origin-, absolute- or asterisk-
//! form. Called by the pipeline on Pingora's parsed head (the lane hands anything unusual
//! over). Every refusal closes the connection. The rules, and why each, are in
//! `docs/dataplane.md` ("Request validation").

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{Method, Version};
use pingora::http::RequestHeader;

use super::Limits;

/// Why a request is refused: the status and the text that goes into the body and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub u16, pub &'static str);

pub fn check(req: &RequestHeader, limits: &Limits) -> Result<(), Refused> {
    check_sizes(req, limits)?;
    check_target(req)?;
    check_framing(req)?;
    check_host(req)?;
    check_body_size(req, limits)
}

/// Runs after [`check_framing`], so a `Content-Length` here is one run of digits.
fn check_body_size(req: &RequestHeader, limits: &Limits) -> Result<(), Refused> {
    let (Some(max), Some(cl)) = (limits.max_body, req.headers.get(CONTENT_LENGTH)) else {
        return Ok(());
    };
    // Too many digits for a u64 is over any limit too.
    match std::str::from_utf8(cl.as_bytes())
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(n) if n <= max => Ok(()),
        _ => Err(Refused(413, "request body larger than the limit")),
    }
}

/// The request line exactly as the client sent it: `METHOD SP target SP version`, with one space
/// on each side and a target of visible ASCII without a fragment. The proxy checks it in the
/// connection front's byte scan (`http1::scan`), which sees every request before Pingora's
/// parser escapes or drops anything; this runs the same scan over a raw head.
pub fn check_request_line(raw_head: &[u8]) -> Result<(), Refused> {
    use super::scan::{feed, Bad, Phase};
    match feed(&mut Phase::head(), &mut raw_head.to_vec()) {
        Err(Bad::Target) => Err(Refused(400, "bad request target")),
        Err(_) => Err(Refused(400, "bad request line")),
        Ok(_) => Ok(()),
    }
}

fn check_sizes(req: &RequestHeader, limits: &Limits) -> Result<(), Refused> {
    let target = req.raw_path().len();
    if target > limits.max_target {
        return Err(Refused(414, "request target too long"));
    }
    if req.headers.len() > limits.max_headers {
        return Err(Refused(431, "too many header lines"));
    }
    // "METHOD SP target SP HTTP/1.1 CRLF", then "name: value CRLF" per header.
    let mut head = req.method.as_str().len() + target + 12;
    for (name, value) in req.headers.iter() {
        let line = name.as_str().len() + value.len() + 4;
        if line > limits.max_header {
            return Err(Refused(431, "header line too large"));
        }
        head += line;
    }
    if head > limits.max_head {
        return Err(Refused(431, "request head too large"));
    }
    Ok(())
}

/// The form of the target. Its bytes were checked as sent ([`check_request_line`]), before
/// Pingora's parser escaped or dropped any of them.
fn check_target(req: &RequestHeader) -> Result<(), Refused> {
    let target = req.raw_path();
    if target.is_empty() {
        return Err(Refused(400, "bad request target"));
    }
    let ok = target[0] == b'/'
        || (target == b"*" && req.method == Method::OPTIONS)
        || starts_with_ignore_case(target, b"http://")
        || starts_with_ignore_case(target, b"https://");
    if ok {
        Ok(())
    } else {
        Err(Refused(400, "bad request target"))
    }
}

fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Parse a raw request head the way Pingora's HTTP/1 server does (httparse, up to 256 headers)
/// and run every check on it. `None` when the parser itself refuses the head or has not seen
/// all of it (Pingora answers the former 400). For the fuzz target and its corpus tests; the
/// proxy runs the same request-line scan in `front` and [`check`] on what Pingora parsed.
pub fn check_raw(head: &[u8], limits: &Limits) -> Option<Result<(), Refused>> {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = parsed.parse(head).ok()? else {
        return None;
    };
    let mut req = RequestHeader::build(
        parsed.method.unwrap_or(""),
        parsed.path.unwrap_or("").as_bytes(),
        Some(parsed.headers.len()),
    )
    .ok()?;
    req.set_version(match parsed.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_09,
    });
    for h in parsed.headers.iter() {
        req.append_header(h.name.to_owned(), h.value).ok()?;
    }
    Some(check_request_line(&head[..len]).and_then(|()| check(&req, limits)))
}

/// An absolute-form request in origin form, from its target on: `http://host:port/p?q
/// HTTP/1.1`, then the header lines and the empty line, becomes `/p?q HTTP/1.1`, a `Host` of
/// the target's authority and the header lines without any `Host` they had. RFC 9112 §3.2.2:
/// a proxy ignores `Host` for the target's authority (Pingora refuses a `Host` that differs,
/// so the connection front rewrites such heads before either request path reads them). `None`
/// for a target that is not `http` or `https`, or an authority that is no valid `host[:port]`.
pub fn origin_form(from_target: &[u8]) -> Option<Vec<u8>> {
    let line_end = from_target.iter().position(|&b| b == b'\n')? + 1;
    let (line, headers) = from_target.split_at(line_end);
    let space = line.iter().position(|&b| b == b' ')?;
    let (target, version) = line.split_at(space);
    let rest = [&b"http://"[..], b"https://"]
        .iter()
        .find(|scheme| starts_with_ignore_case(target, scheme))
        .map(|scheme| &target[scheme.len()..])?;
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    valid_host(authority).ok()?;
    let mut out = Vec::with_capacity(from_target.len() + 8);
    if !path.starts_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(path);
    out.extend_from_slice(version);
    out.extend_from_slice(b"Host: ");
    out.extend_from_slice(authority);
    out.extend_from_slice(b"\r\n");
    for line in headers.split_inclusive(|&b| b == b'\n') {
        let name = line.split(|&b| b == b':').next().unwrap_or(b"");
        if !name.trim_ascii().eq_ignore_ascii_case(b"host") || !line.contains(&b':') {
            out.extend_from_slice(line);
        }
    }
    Some(out)
}

/// The first two values of a header: enough to tell none, one and repeated apart without
/// collecting them (this runs for every request).
fn first_two(
    req: &RequestHeader,
    name: http::header::HeaderName,
) -> (Option<&http::HeaderValue>, Option<&http::HeaderValue>) {
    let mut values = req.headers.get_all(name).iter();
    (values.next(), values.next())
}

fn check_framing(req: &RequestHeader) -> Result<(), Refused> {
    let te = first_two(req, TRANSFER_ENCODING);
    let cl = first_two(req, CONTENT_LENGTH);
    if let (Some(first), second) = te {
        if cl.0.is_some() {
            return Err(Refused(400, "both Transfer-Encoding and Content-Length"));
        }
        if req.version == Version::HTTP_10 {
            return Err(Refused(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        if second.is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(Refused(400, "Transfer-Encoding other than chunked"));
        }
    }
    match cl {
        (None, _) => Ok(()),
        (Some(one), None) if !one.is_empty() && one.as_bytes().iter().all(u8::is_ascii_digit) => {
            Ok(())
        }
        (Some(_), None) => Err(Refused(400, "bad Content-Length")),
        (Some(_), Some(_)) => Err(Refused(400, "repeated Content-Length")),
    }
}

fn check_host(req: &RequestHeader) -> Result<(), Refused> {
    match first_two(req, HOST) {
        (None, _) if req.version == Version::HTTP_10 => Ok(()),
        // HTTP/2 names the host in `:authority` (Pingora refuses a stream without one).
        (None, _) if req.version == Version::HTTP_2 => match req.uri.authority() {
            Some(authority) => valid_host(authority.as_str().as_bytes()),
            None => Err(Refused(400, "missing :authority")),
        },
        (None, _) => Err(Refused(400, "missing Host")),
        (Some(_), Some(_)) => Err(Refused(400, "repeated Host")),
        (Some(h), None) => valid_host(h.as_bytes()),
    }
}

/// `host[:port]` where host is a reg-name, an IPv4 address or a bracketed IPv6 literal.
pub(crate) fn valid_host(h: &[u8]) -> Result<(), Refused> {
    let bad = Err(Refused(400, "bad Host"));
    let (name, port) = if h.first() == Some(&b'[') {
        let Some(end) = h.iter().position(|b| *b == b']') else {
            return bad;
        };
        let literal = &h[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return bad;
        }
        match &h[end + 1..] {
            [] => (&h[..=end], None),
            [b':', port @ ..] => (&h[..=end], Some(port)),
            _ => return bad,
        }
    } else {
        match h.iter().rposition(|b| *b == b':') {
            Some(i) => (&h[..i], Some(&h[i + 1..])),
            None => (h, None),
        }
    };
    if name.is_empty() {
        return bad;
    }
    if name[0] != b'['
        && !name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        return bad;
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(port)
                .ok()
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| (1..=65535).contains(&p));
        if !valid {
            return bad;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_raw_sees_what_the_proxy_sees() {
        let limits = Limits::default();
        let ok = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(check_raw(ok, &limits), Some(Ok(())));
        let smuggle =
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(check_raw(smuggle, &limits).map(|r| r.is_err()), Some(true));
        assert_eq!(check_raw(b"GET / HTTP/1.1\r\nHost: x\r\n", &limits), None);
        super::super::invariants::request_invariants(ok);
        super::super::invariants::request_invariants(smuggle);
    }

    fn req(
        method: &str,
        target: &str,
        version: Version,
        headers: &[(&str, &str)],
    ) -> RequestHeader {
        let mut r = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        r.set_version(version);
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn check_default(r: &RequestHeader) -> Result<(), Refused> {
        check(r, &Limits::default())
    }

    fn get(headers: &[(&str, &str)]) -> Result<(), Refused> {
        check_default(&req("GET", "/", Version::HTTP_11, headers))
    }

    #[test]
    fn ordinary_requests_pass() {
        assert_eq!(get(&[("host", "example.com")]), Ok(()));
        assert_eq!(get(&[("host", "example.com:8080")]), Ok(()));
        assert_eq!(get(&[("host", "127.0.0.1")]), Ok(()));
        assert_eq!(get(&[("host", "[::1]:80")]), Ok(()));
        assert_eq!(get(&[("host", "a"), ("content-length", "0")]), Ok(()));
        assert_eq!(
            get(&[("host", "a"), ("transfer-encoding", "Chunked")]),
            Ok(())
        );
        assert_eq!(
            check_default(&req("GET", "/", Version::HTTP_10, &[])),
            Ok(()),
            "1.0 may omit Host"
        );
        assert_eq!(
            check_default(&req("OPTIONS", "*", Version::HTTP_11, &[("host", "a")])),
            Ok(())
        );
        assert_eq!(
            check_default(&req(
                "GET",
                "http://a/x",
                Version::HTTP_11,
                &[("host", "a")]
            )),
            Ok(())
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("transfer-encoding", "chunked"), ("content-length", "5")],
                "both Transfer-Encoding and Content-Length",
            ),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                "Transfer-Encoding other than chunked",
            ),
            (
                &[("transfer-encoding", "gzip, chunked")],
                "Transfer-Encoding other than chunked",
            ),
            (
                &[("transfer-encoding", "chunked, identity")],
                "Transfer-Encoding other than chunked",
            ),
            (
                &[("transfer-encoding", "xchunked")],
                "Transfer-Encoding other than chunked",
            ),
            (
                &[("content-length", "5"), ("content-length", "6")],
                "repeated Content-Length",
            ),
            (
                &[("content-length", "5"), ("content-length", "5")],
                "repeated Content-Length",
            ),
            (&[("content-length", "5, 5")], "bad Content-Length"),
            (&[("content-length", "+5")], "bad Content-Length"),
            (&[("content-length", "-1")], "bad Content-Length"),
            (&[("content-length", "0x10")], "bad Content-Length"),
            (&[("content-length", "")], "bad Content-Length"),
        ];
        for (headers, why) in cases {
            let mut h = vec![("host", "a")];
            h.extend_from_slice(headers);
            assert_eq!(get(&h), Err(Refused(400, why)), "{headers:?}");
        }
        let r = req(
            "POST",
            "/",
            Version::HTTP_10,
            &[("transfer-encoding", "chunked")],
        );
        assert_eq!(
            check_default(&r),
            Err(Refused(400, "Transfer-Encoding in an HTTP/1.0 request"))
        );
    }

    #[test]
    fn missing_repeated_and_malformed_hosts_are_refused() {
        assert_eq!(get(&[]), Err(Refused(400, "missing Host")));
        assert_eq!(
            get(&[("host", "a"), ("host", "b")]),
            Err(Refused(400, "repeated Host"))
        );
        for bad in [
            "",
            "user@example.com",
            "a,b",
            "a b",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:80x",
            "example.com:123456",
            "[::1",
            "[]:80",
            "[::1]x",
            "exa$mple.com",
            ":80",
        ] {
            assert_eq!(
                get(&[("host", bad)]),
                Err(Refused(400, "bad Host")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn odd_request_targets_are_refused() {
        // (Control bytes in the target never get this far: Pingora's parser refuses them.)
        for target in ["a/b", "*", "ftp://a/"] {
            let r = req("GET", target, Version::HTTP_11, &[("host", "a")]);
            assert_eq!(
                check_default(&r),
                Err(Refused(400, "bad request target")),
                "{target:?}"
            );
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn a_content_length_over_the_body_limit_gets_413() {
        let limits = Limits {
            max_body: Some(10),
            ..Limits::default()
        };
        let post = |cl: &str| {
            let mut r = RequestHeader::build("POST", b"/", None).unwrap();
            r.insert_header("host", "a").unwrap();
            r.insert_header("content-length", cl).unwrap();
            r
        };
        assert_eq!(check(&post("10"), &limits), Ok(()));
        assert_eq!(check(&post("11"), &limits).map_err(|r| r.0), Err(413));
        assert_eq!(
            check(&post("99999999999999999999999"), &limits).map_err(|r| r.0),
            Err(413)
        );
        // Unlimited by default.
        assert_eq!(check(&post("99999999999"), &Limits::default()), Ok(()));
    }

    fn with_headers(n: usize, value_len: usize) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.append_header("host", "a").unwrap();
        for i in 0..n {
            r.append_header(format!("x-h{i}"), "v".repeat(value_len))
                .unwrap();
        }
        r
    }

    #[test]
    fn heads_over_each_limit_get_414_or_431() {
        let l = Limits::default();
        assert_eq!(check(&with_headers(10, 100), &l), Ok(()));
        assert_eq!(
            check(&with_headers(100, 10), &l),
            Err(Refused(431, "too many header lines"))
        );
        assert_eq!(
            check(&with_headers(1, 8 * 1024), &l),
            Err(Refused(431, "header line too large"))
        );
        assert_eq!(
            check(&with_headers(5, 7 * 1024), &l),
            Err(Refused(431, "request head too large"))
        );
        let long = format!("/{}", "a".repeat(8 * 1024));
        let r = RequestHeader::build("GET", long.as_bytes(), None).unwrap();
        assert_eq!(check(&r, &l), Err(Refused(414, "request target too long")));
    }
}

#[cfg(test)]
mod origin_form_tests {
    use super::*;

    fn origin(s: &str) -> Option<String> {
        origin_form(s.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn an_absolute_target_becomes_origin_form_with_its_authority_as_host() {
        assert_eq!(
            origin("http://main.example:8080/x?y=1 HTTP/1.1\r\nHost: other\r\nAccept: */*\r\n\r\n")
                .as_deref(),
            Some("/x?y=1 HTTP/1.1\r\nHost: main.example:8080\r\nAccept: */*\r\n\r\n")
        );
        assert_eq!(
            origin("HTTPS://a.example HTTP/1.0\r\n\r\n").as_deref(),
            Some("/ HTTP/1.0\r\nHost: a.example\r\n\r\n")
        );
        assert_eq!(
            origin("http://a?q HTTP/1.1\r\nhost: a\r\nHOST: b\r\n\r\n").as_deref(),
            Some("/?q HTTP/1.1\r\nHost: a\r\n\r\n")
        );
    }

    #[test]
    fn other_schemes_and_bad_authorities_are_refused() {
        for bad in [
            "ftp://a/ HTTP/1.1\r\n\r\n",
            "http://user@a/ HTTP/1.1\r\n\r\n",
            "http:///x HTTP/1.1\r\n\r\n",
            "http://a:0/ HTTP/1.1\r\n\r\n",
            "mailto:x HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(origin(bad), None, "{bad:?}");
        }
    }
}

#[cfg(test)]
mod request_line_tests {
    use super::*;

    #[test]
    fn only_a_plain_request_line_passes() {
        assert_eq!(
            check_request_line(b"GET /a?b=c HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(())
        );
        assert_eq!(check_request_line(b"GET / HTTP/1.0\n\n"), Ok(()));
        for bad in [
            &b"GET //a b HTTP/1.1\r\n"[..],
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/1.1 x\r\n",
            b"GET /\r\n",
            b" / HTTP/1.1\r\n",
        ] {
            assert_eq!(
                check_request_line(bad),
                Err(Refused(400, "bad request line")),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            &b"GET /a#b HTTP/1.1\r\n"[..],
            b"GET #a HTTP/1.1\r\n",
            b"GET /a\x01 HTTP/1.1\r\n",
        ] {
            assert_eq!(
                check_request_line(bad),
                Err(Refused(400, "bad request target")),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
