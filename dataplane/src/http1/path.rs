//! The path a request is routed by and forwarded with: percent-encoded unreserved characters
//! decoded (RFC 3986 §6.2.2.2, so `%2e` is a dot) and dot segments removed (§5.2.4), so that
//! `/api/../secret` is `/secret` here as it will be at the backend. An encoded slash or
//! backslash (`%2F`, `%5C`) is refused: it is a separator to some backends and data to others.
//! Called by both request paths before routing; pure, and free for a path with nothing to do.

use std::borrow::Cow;

use super::Refused;

/// The normal form of `path` (a target's path, without its query), or `Refused` (400) for an
/// encoded slash or backslash, or a malformed percent-encoding.
pub fn normalize(path: &[u8]) -> Result<Cow<'_, [u8]>, Refused> {
    if !needs_work(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// A `%` or a segment that is `.` or `..`: the common path has neither.
fn needs_work(path: &[u8]) -> bool {
    path.contains(&b'%')
        || path
            .split(|b| *b == b'/')
            .any(|seg| seg == b"." || seg == b"..")
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decode `%XX` where it encodes an unreserved character; keep the others as they are (with
/// upper-case hex digits).
fn decode_unreserved(path: &[u8]) -> Result<Vec<u8>, Refused> {
    let malformed = Refused(400, "bad percent-encoding in the path");
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] != b'%' {
            out.push(path[i]);
            i += 1;
            continue;
        }
        let (Some(&h), Some(&l)) = (path.get(i + 1), path.get(i + 2)) else {
            return Err(malformed);
        };
        let (Some(hi), Some(lo)) = (hex(h), hex(l)) else {
            return Err(malformed);
        };
        let byte = hi << 4 | lo;
        match byte {
            b'/' | b'\\' => return Err(Refused(400, "an encoded slash in the path")),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte),
            _ => out.extend_from_slice(&[b'%', h.to_ascii_uppercase(), l.to_ascii_uppercase()]),
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path: `.` segments go, `..` removes the segment before it
/// (never above the root).
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut parts = path.split(|b| *b == b'/').skip(1).peekable();
    // A path ending in `.` or `..` keeps its trailing slash: `/a/b/..` is `/a/`.
    let mut trailing = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            b"." => trailing = last,
            b".." => {
                segments.pop();
                trailing = last;
            }
            _ => {
                segments.push(seg);
                trailing = false;
            }
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for seg in &segments {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if trailing || out.is_empty() {
        out.push(b'/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Refused> {
        normalize(p.as_bytes()).map(|c| String::from_utf8(c.into_owned()).unwrap())
    }

    #[test]
    fn dot_segments_are_resolved_as_the_backend_would() {
        for (path, want) in [
            ("/api/../secret", "/secret"),
            ("/api/./v1", "/api/v1"),
            ("/a/b/../../..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/api/%2e%2e/secret", "/secret"),
            ("/api/%2E./secret", "/secret"),
            ("/%7Euser/%41", "/~user/A"),
            ("/a%20b/%e2%82%ac", "/a%20b/%E2%82%AC"),
            ("/.../x", "/.../x"),
            ("/a..b/c", "/a..b/c"),
        ] {
            assert_eq!(norm(path).as_deref(), Ok(want), "{path}");
        }
    }

    #[test]
    fn a_path_with_nothing_to_do_is_not_copied() {
        for path in ["/", "/api/v1/users", "/a.b/c..d/.x"] {
            assert!(
                matches!(normalize(path.as_bytes()), Ok(Cow::Borrowed(_))),
                "{path}"
            );
        }
    }

    #[test]
    fn encoded_separators_and_broken_escapes_are_refused() {
        for path in [
            "/api%2f..%2fsecret",
            "/a%2Fb",
            "/a%5cb",
            "/a%",
            "/a%4",
            "/a%zz",
        ] {
            assert!(norm(path).is_err(), "{path}");
        }
    }
}
