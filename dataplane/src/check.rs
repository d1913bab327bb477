//! Request validation: what a proxy must refuse before forwarding anything, in one place.
//!
//! Pingora's parser rejects what `httparse` cannot parse (bad tokens in header names, control
//! bytes in values, obs-fold). This adds the framing and routing rules of RFC 9112 §3.2, §6.1,
//! §6.3 and RFC 9110 §7.2 that a parser alone does not enforce, where a lenient proxy lets a
//! request be read one way here and another way by the backend (request smuggling):
//!
//! - `Transfer-Encoding` together with `Content-Length`: Pingora's parser already takes the other
//!   way RFC 9112 §6.1 allows: it drops `Content-Length`, reads the body as chunked and closes the
//!   connection after the response, so nothing can follow the body on that connection. The check
//!   below refuses the pair if it ever reaches us.
//! - `Transfer-Encoding` other than exactly one `chunked`, or on an HTTP/1.0 request: refused.
//! - `Content-Length` that is not a single run of digits (lists, signs, spaces, repeats): refused.
//! - HTTP/1.1 without a `Host`, with more than one, or with one that is not `host[:port]`
//!   (userinfo, commas, spaces, an empty or out-of-range port): refused. HTTP/1.0 without `Host`
//!   is valid; the proxy supplies one upstream.
//! - A request target with control bytes, spaces or non-ASCII, or that is not origin-form
//!   (`/…`), absolute-form (`http://…`), or `*` for OPTIONS: refused.
//!
//! Every refusal is a 400 with the connection closed: after a framing error nothing that follows
//! on that connection can be trusted.

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{Method, Version};
use pingora::http::RequestHeader;

/// Why a request is refused; the text goes into the 400 body and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

pub fn check(req: &RequestHeader) -> Result<(), Refused> {
    check_target(req)?;
    check_framing(req)?;
    check_host(req)
}

fn check_target(req: &RequestHeader) -> Result<(), Refused> {
    let target = req.raw_path();
    if target.is_empty() || target.iter().any(|b| *b <= b' ' || *b >= 0x7f) {
        return Err(Refused("bad request target"));
    }
    let ok = target[0] == b'/'
        || (target == b"*" && req.method == Method::OPTIONS)
        || starts_with_ignore_case(target, b"http://")
        || starts_with_ignore_case(target, b"https://");
    if ok {
        Ok(())
    } else {
        Err(Refused("bad request target"))
    }
}

fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn check_framing(req: &RequestHeader) -> Result<(), Refused> {
    let te: Vec<_> = req.headers.get_all(TRANSFER_ENCODING).iter().collect();
    let cl: Vec<_> = req.headers.get_all(CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(Refused("both Transfer-Encoding and Content-Length"));
        }
        if req.version == Version::HTTP_10 {
            return Err(Refused("Transfer-Encoding in an HTTP/1.0 request"));
        }
        let only_chunked = te.len() == 1 && te[0].as_bytes().eq_ignore_ascii_case(b"chunked");
        if !only_chunked {
            return Err(Refused("Transfer-Encoding other than chunked"));
        }
    }
    match cl.as_slice() {
        [] => Ok(()),
        [one] if !one.is_empty() && one.as_bytes().iter().all(u8::is_ascii_digit) => Ok(()),
        [_] => Err(Refused("bad Content-Length")),
        _ => Err(Refused("repeated Content-Length")),
    }
}

fn check_host(req: &RequestHeader) -> Result<(), Refused> {
    let mut hosts = req.headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version == Version::HTTP_10 => Ok(()),
        (None, _) => Err(Refused("missing Host")),
        (Some(_), Some(_)) => Err(Refused("repeated Host")),
        (Some(h), None) => valid_host(h.as_bytes()),
    }
}

/// `host[:port]` where host is a reg-name, an IPv4 address or a bracketed IPv6 literal.
fn valid_host(h: &[u8]) -> Result<(), Refused> {
    let bad = Err(Refused("bad Host"));
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

    fn get(headers: &[(&str, &str)]) -> Result<(), Refused> {
        check(&req("GET", "/", Version::HTTP_11, headers))
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
            check(&req("GET", "/", Version::HTTP_10, &[])),
            Ok(()),
            "1.0 may omit Host"
        );
        assert_eq!(
            check(&req("OPTIONS", "*", Version::HTTP_11, &[("host", "a")])),
            Ok(())
        );
        assert_eq!(
            check(&req(
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
            assert_eq!(get(&h), Err(Refused(why)), "{headers:?}");
        }
        let r = req(
            "POST",
            "/",
            Version::HTTP_10,
            &[("transfer-encoding", "chunked")],
        );
        assert_eq!(
            check(&r),
            Err(Refused("Transfer-Encoding in an HTTP/1.0 request"))
        );
    }

    #[test]
    fn missing_repeated_and_malformed_hosts_are_refused() {
        assert_eq!(get(&[]), Err(Refused("missing Host")));
        assert_eq!(
            get(&[("host", "a"), ("host", "b")]),
            Err(Refused("repeated Host"))
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
            assert_eq!(get(&[("host", bad)]), Err(Refused("bad Host")), "{bad:?}");
        }
    }

    #[test]
    fn odd_request_targets_are_refused() {
        // (Control bytes in the target never get this far: Pingora's parser refuses them.)
        for target in ["a/b", "*", "ftp://a/"] {
            let r = req("GET", target, Version::HTTP_11, &[("host", "a")]);
            assert_eq!(check(&r), Err(Refused("bad request target")), "{target:?}");
        }
    }
}
