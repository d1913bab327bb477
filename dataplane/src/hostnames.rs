//! Host names in the data plane: the shared normal form and certificate names
//! (`rusty_shared::hostnames`), and where a redirect to HTTPS points. Pure.

pub use rusty_shared::hostnames::{normalize_host, Names, MAX_HOST};

/// Where ACME HTTP-01 challenges are asked for: never redirected to HTTPS.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The HTTPS URL for a plain request to `host` (as sent) and `target` (path and query): the
/// host lower-cased without its port, then `port` unless it is 443. `None` for a host that
/// cannot be put in a URL.
pub fn https_location(host: &[u8], port: u16, target: &str) -> Option<String> {
    let mut buf = [0u8; MAX_HOST];
    let host = normalize_host(host, &mut buf)?;
    let url_safe = |b: u8| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b);
    if host.is_empty() || !host.bytes().all(url_safe) {
        return None;
    }
    let target = if target.starts_with('/') { target } else { "/" };
    Some(if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_go_to_the_same_host_and_target_over_https() {
        assert_eq!(
            https_location(b"Example.com:8080", 443, "/a?b=1").as_deref(),
            Some("https://example.com/a?b=1")
        );
        assert_eq!(
            https_location(b"example.com", 8443, "/").as_deref(),
            Some("https://example.com:8443/")
        );
        assert_eq!(
            https_location(b"[::1]:80", 8443, "/x").as_deref(),
            Some("https://[::1]:8443/x")
        );
        assert_eq!(https_location(b"", 443, "/"), None);
        assert_eq!(https_location(b"a b", 443, "/"), None);
        assert_eq!(https_location(b"evil.com/@x", 443, "/"), None);
        assert_eq!(
            https_location(b"example.com", 443, "*").as_deref(),
            Some("https://example.com/")
        );
    }
}
