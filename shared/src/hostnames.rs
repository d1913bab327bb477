//! Host names as both planes read them: a `Host` (or SNI) put in one form ([`normalize_host`],
//! used by the data plane's router on every request), and the names a certificate covers
//! ([`Names`]), which decide which certificate a TLS client gets, whether a request on that
//! connection may name its host, and whether the agent's certificates cover its services.
//! Pure: no I/O, no allocation per request.

use std::net::IpAddr;

/// Longest host name considered (RFC 1035: 253 characters, plus brackets and slack for IPv6).
pub const MAX_HOST: usize = 255;

/// Lower-case the host and strip its port and trailing dot, into `buf` (no allocation).
/// `None` for hosts that cannot match any name (too long, not ASCII).
#[inline]
pub fn normalize_host<'b>(host: &[u8], buf: &'b mut [u8; MAX_HOST]) -> Option<&'b str> {
    let name = if host.first() == Some(&b'[') {
        // [v6]:port → [v6]
        let end = host.iter().position(|&b| b == b']')?;
        &host[..=end]
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.len() > MAX_HOST || !name.is_ascii() {
        return None;
    }
    let out = &mut buf[..name.len()];
    for (o, &b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

/// The DNS names and addresses one certificate is valid for, in lower case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    /// Names matched exactly.
    exact: Vec<Box<str>>,
    /// For each `*.example.com`, `example.com`: the wildcard covers one label before it.
    wildcard_parents: Vec<Box<str>>,
    ips: Vec<IpAddr>,
}

impl Names {
    /// From a certificate's subjectAltName entries. Names are lower-cased and lose a trailing
    /// dot; a `*` anywhere but as the whole first label is kept as an exact (never matching)
    /// name, as RFC 6125 §6.4.3 allows no partial wildcards.
    pub fn new<S: AsRef<str>>(dns: impl IntoIterator<Item = S>, ips: Vec<IpAddr>) -> Names {
        let mut names = Names {
            ips,
            ..Names::default()
        };
        for name in dns {
            let name = name.as_ref().trim_end_matches('.').to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) if !parent.is_empty() && !parent.contains('*') => {
                    names.wildcard_parents.push(parent.into())
                }
                _ => names.exact.push(name.into()),
            }
        }
        names
    }

    /// The exact names, for the certificate index.
    pub fn exact(&self) -> &[Box<str>] {
        &self.exact
    }

    /// The parents of the wildcard names (`example.com` for `*.example.com`).
    pub fn wildcard_parents(&self) -> &[Box<str>] {
        &self.wildcard_parents
    }

    /// No DNS name and no address: such a certificate can only be a default.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard_parents.is_empty() && self.ips.is_empty()
    }

    /// Every name, wildcards written as such, for logs and the admin listener.
    pub fn display(&self) -> Vec<String> {
        let mut all: Vec<String> = self.exact.iter().map(|n| n.to_string()).collect();
        all.extend(self.wildcard_parents.iter().map(|p| format!("*.{p}")));
        all.extend(self.ips.iter().map(IpAddr::to_string));
        all
    }

    /// Whether a request's `Host` (as sent: any case, maybe a port) is one this certificate is
    /// valid for.
    pub fn covers(&self, host: &[u8]) -> bool {
        let mut buf = [0u8; MAX_HOST];
        let Some(host) = normalize_host(host, &mut buf) else {
            return false;
        };
        self.covers_name(host)
    }

    /// [`Names::covers`] for a host already normalized.
    pub fn covers_name(&self, host: &str) -> bool {
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return self.ips.contains(&ip);
        }
        if self.exact.iter().any(|n| **n == *host) {
            return true;
        }
        match host.split_once('.') {
            Some((label, parent)) if !label.is_empty() => {
                self.wildcard_parents.iter().any(|p| **p == *parent)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dns: &[&str]) -> Names {
        Names::new(dns.iter().copied(), vec!["192.0.2.7".parse().unwrap()])
    }

    #[test]
    fn exact_names_match_in_any_case_with_a_port_or_a_trailing_dot() {
        let n = names(&["App.Example.com", "api.example.com."]);
        for host in [
            "app.example.com",
            "APP.example.COM:8443",
            "api.example.com.",
            "api.example.com",
        ] {
            assert!(n.covers(host.as_bytes()), "{host}");
        }
        for host in ["example.com", "www.example.com", "app.example.com.evil", ""] {
            assert!(!n.covers(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn a_wildcard_covers_exactly_one_label() {
        let n = names(&["*.example.com"]);
        assert!(n.covers(b"a.example.com"));
        assert!(n.covers(b"A-1.Example.Com:443"));
        assert!(!n.covers(b"example.com"), "not the parent itself");
        assert!(!n.covers(b"a.b.example.com"), "not two labels");
        assert!(!n.covers(b".example.com"), "not an empty label");
        assert!(!n.covers(b"aexample.com"));
    }

    #[test]
    fn partial_wildcards_match_nothing_but_themselves() {
        let n = names(&["a*.example.com", "*.*.example.com", "*"]);
        assert!(!n.covers(b"ab.example.com"));
        assert!(!n.covers(b"x.y.example.com"));
        assert!(!n.covers(b"anything"));
        assert!(n.wildcard_parents().is_empty());
    }

    #[test]
    fn addresses_match_only_address_entries() {
        let n = Names::new(
            ["example.com"],
            vec!["192.0.2.7".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        );
        assert!(n.covers(b"192.0.2.7"));
        assert!(n.covers(b"192.0.2.7:8443"));
        assert!(n.covers(b"[2001:db8::1]:443"));
        assert!(n.covers(b"[2001:DB8::1]"));
        assert!(!n.covers(b"192.0.2.8"));
        assert!(
            !Names::new(["192.0.2.9"], vec![]).covers(b"192.0.2.9"),
            "a DNS entry is not an address"
        );
    }

    #[test]
    fn hosts_are_normalized_once_for_every_user() {
        let mut buf = [0u8; MAX_HOST];
        assert_eq!(
            normalize_host(b"Example.COM.:80", &mut buf),
            Some("example.com")
        );
        assert_eq!(normalize_host(b"[::1]:8080", &mut buf), Some("[::1]"));
        assert_eq!(normalize_host("é.example".as_bytes(), &mut buf), None);
        assert_eq!(normalize_host(&[b'a'; 300], &mut buf), None);
    }
}
