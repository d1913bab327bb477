//! Which service a request belongs to: host first (exact, then the longest `*.suffix`, then
//! services that name no host), then the longest byte prefix of the path among that host's
//! services, with no fall-through to a less specific host — as nginx and Envoy do. Built once
//! per table; a lookup is one or two hash probes and a short scan, no allocation.

use std::collections::HashMap;

use rusty_shared::{HostPattern, ValidService};

use crate::hostnames::{normalize_host, MAX_HOST};

/// Routes of one host level, longest prefix first.
#[derive(Debug, Default)]
struct Prefixes(Vec<(Box<[u8]>, u32)>);

impl Prefixes {
    fn add(&mut self, prefix: &str, service: u32) {
        self.0.push((prefix.as_bytes().into(), service));
        self.0.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    }
    fn find(&self, path: &[u8]) -> Option<u32> {
        self.0
            .iter()
            .find(|(p, _)| path.starts_with(p))
            .map(|(_, s)| *s)
    }
}

#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<Box<str>, Prefixes>,
    /// Wildcard suffixes (".example.com"), longest first.
    suffixes: Vec<(Box<str>, Prefixes)>,
    any: Option<Prefixes>,
}

impl Router {
    pub fn new(services: &[ValidService]) -> Self {
        let mut r = Router::default();
        for (i, svc) in services.iter().enumerate() {
            let i = i as u32;
            if svc.hosts.is_empty() {
                r.any
                    .get_or_insert_with(Prefixes::default)
                    .add(&svc.path_prefix, i);
            }
            for h in &svc.hosts {
                match h {
                    HostPattern::Exact(name) => r
                        .exact
                        .entry(name.as_str().into())
                        .or_default()
                        .add(&svc.path_prefix, i),
                    HostPattern::Suffix(suffix) => {
                        match r.suffixes.iter_mut().find(|(s, _)| **s == **suffix) {
                            Some((_, p)) => p.add(&svc.path_prefix, i),
                            None => {
                                let mut p = Prefixes::default();
                                p.add(&svc.path_prefix, i);
                                r.suffixes.push((suffix.as_str().into(), p));
                            }
                        }
                    }
                }
            }
        }
        r.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        r
    }

    /// The index of the service for this request, if any. `host` is the Host header (or the
    /// URI authority) as sent: any case, maybe with a port or a trailing dot.
    pub fn route(&self, host: &[u8], path: &[u8]) -> Option<u32> {
        let mut buf = [0u8; MAX_HOST];
        let level = normalize_host(host, &mut buf).and_then(|h| self.host_level(h));
        match level {
            Some(p) => p.find(path),
            None => self.any.as_ref()?.find(path),
        }
    }

    fn host_level(&self, host: &str) -> Option<&Prefixes> {
        if let Some(p) = self.exact.get(host) {
            return Some(p);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(&**suffix))
            .map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusty_shared::{validate, Service, Table};

    fn router(spec: &[(&str, &[&str], &str)]) -> Router {
        let services = spec
            .iter()
            .map(|(name, hosts, prefix)| {
                let mut s = Service::new(*name, vec![]);
                s.hosts = hosts.iter().map(|h| h.to_string()).collect();
                s.path_prefix = prefix.to_string();
                s
            })
            .collect();
        let v = validate(Table::new(1, services)).unwrap();
        Router::new(&v.services)
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any() {
        let r = router(&[
            ("any", &[], "/"),
            ("wild", &["*.example.com"], "/"),
            ("exact", &["api.example.com"], "/"),
        ]);
        assert_eq!(r.route(b"api.example.com", b"/x"), Some(2));
        assert_eq!(r.route(b"www.example.com", b"/x"), Some(1));
        assert_eq!(r.route(b"a.b.example.com", b"/x"), Some(1));
        assert_eq!(r.route(b"example.com", b"/x"), Some(0));
        assert_eq!(r.route(b"other.org", b"/x"), Some(0));
    }

    #[test]
    fn longest_prefix_wins_within_a_host() {
        let r = router(&[
            ("root", &["localhost"], "/"),
            ("api", &["localhost"], "/api"),
            ("v2", &["localhost"], "/api/v2"),
        ]);
        assert_eq!(r.route(b"localhost", b"/"), Some(0));
        assert_eq!(r.route(b"localhost", b"/api/v1/users"), Some(1));
        assert_eq!(r.route(b"localhost", b"/api/v2/users"), Some(2));
        assert_eq!(r.route(b"localhost", b"/apiary"), Some(1));
    }

    #[test]
    fn no_fallthrough_to_a_less_specific_host() {
        let r = router(&[("api", &["localhost"], "/api"), ("any", &[], "/")]);
        assert_eq!(r.route(b"localhost", b"/api"), Some(0));
        assert_eq!(r.route(b"localhost", b"/"), None);
        assert_eq!(r.route(b"elsewhere", b"/"), Some(1));
    }

    #[test]
    fn host_case_port_and_trailing_dot_are_ignored() {
        let r = router(&[("web", &["localhost", "[::1]"], "/")]);
        assert_eq!(r.route(b"LocalHost:8080", b"/"), Some(0));
        assert_eq!(r.route(b"localhost.", b"/"), Some(0));
        assert_eq!(r.route(b"[::1]:8080", b"/"), Some(0));
        assert_eq!(r.route(b"nothere", b"/"), None);
    }

    #[test]
    fn without_a_host_only_any_host_services_match() {
        let r = router(&[("web", &["localhost"], "/"), ("any", &[], "/any")]);
        assert_eq!(r.route(b"", b"/any/x"), Some(1));
        assert_eq!(r.route(b"", b"/"), None);
        assert_eq!(r.route("h\u{e9}".as_bytes(), b"/any"), Some(1));
    }

    #[test]
    fn wildcard_needs_a_label_before_the_suffix() {
        let r = router(&[("wild", &["*.example.com"], "/")]);
        assert_eq!(r.route(b"x.example.com", b"/"), Some(0));
        assert_eq!(r.route(b".example.com", b"/"), None);
        assert_eq!(r.route(b"badexample.com", b"/"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const HOSTS: [&str; 5] = [
            "a.example.com",
            "b.example.com",
            "*.example.com",
            "*.com",
            "localhost",
        ];
        const PREFIXES: [&str; 5] = ["/", "/api", "/api/v2", "/b", "/apiary"];
        const REQUEST_HOSTS: [&str; 8] = [
            "a.example.com",
            "A.Example.Com:8080",
            "x.a.example.com",
            "example.com",
            "other.com",
            "localhost.",
            "nothing.org",
            "",
        ];
        const PATHS: [&str; 7] = ["/", "/api", "/api/v2/x", "/apiary", "/b/c", "/c", ""];

        /// What the router must answer, from the rule as stated: the most specific matching
        /// host pattern (exact, then the longest suffix, then services without hosts), then
        /// the longest matching prefix among that pattern's services; no fall-through.
        fn expected(spec: &[(Vec<&str>, &str)], host: &str, path: &str) -> Option<u32> {
            let name = host
                .split(':')
                .next()
                .unwrap()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let exact: Vec<usize> = (0..spec.len())
                .filter(|&i| spec[i].0.iter().any(|h| *h == name))
                .collect();
            let level = if !exact.is_empty() {
                exact
            } else {
                let best = spec
                    .iter()
                    .flat_map(|(hosts, _)| hosts.iter())
                    .filter_map(|h| h.strip_prefix('*'))
                    .filter(|suffix| name.len() > suffix.len() && name.ends_with(suffix))
                    .max_by_key(|suffix| suffix.len());
                match best {
                    Some(suffix) => (0..spec.len())
                        .filter(|&i| {
                            spec[i]
                                .0
                                .iter()
                                .any(|h| h.strip_prefix('*') == Some(suffix))
                        })
                        .collect(),
                    None => (0..spec.len()).filter(|&i| spec[i].0.is_empty()).collect(),
                }
            };
            level
                .into_iter()
                .filter(|&i| path.starts_with(spec[i].1))
                .max_by_key(|&i| spec[i].1.len())
                .map(|i| i as u32)
        }

        fn service() -> impl Strategy<Value = (Vec<&'static str>, &'static str)> {
            (
                proptest::sample::subsequence(HOSTS.to_vec(), 0..3),
                proptest::sample::select(PREFIXES.to_vec()),
            )
        }

        proptest! {
            #[test]
            fn the_most_specific_host_then_the_longest_prefix_wins(
                spec in proptest::collection::vec(service(), 1..6),
                host in proptest::sample::select(REQUEST_HOSTS.to_vec()),
                path in proptest::sample::select(PATHS.to_vec()),
            ) {
                let services: Vec<Service> = spec
                    .iter()
                    .enumerate()
                    .map(|(i, (hosts, prefix))| {
                        let mut s = Service::new(format!("s{i}"), vec![]);
                        s.hosts = hosts.iter().map(|h| h.to_string()).collect();
                        s.path_prefix = prefix.to_string();
                        s
                    })
                    .collect();
                // Two services on the same host and prefix are refused by validation.
                let Ok(valid) = validate(Table::new(1, services)) else {
                    return Ok(());
                };
                let router = Router::new(&valid.services);
                prop_assert_eq!(
                    router.route(host.as_bytes(), path.as_bytes()),
                    expected(&spec, host, path),
                    "host {:?} path {:?} services {:?}", host, path, spec
                );
            }
        }
    }
}
