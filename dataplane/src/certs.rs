//! The certificates the TLS listener serves, and the TLS server settings built around them.
//!
//! A [`CertSet`] is loaded from a directory of `NAME.crt` (PEM chain, leaf first) and
//! `NAME.key` pairs ([`load_dir`]); each pair serves the names of its subjectAltName, and one
//! named `default` answers an SNI that matches none. [`Certs`] holds the set in use and the
//! rustls server config made from it, swapped whole on a reload: the front reads one
//! [`Generation`] per handshake, so the certificate it checks the SNI against and the one the
//! handshake presents are the same. Session tickets and the session cache outlive reloads.
//! Key material stays in rustls' types: nothing here logs or renders a key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use thiserror::Error;

use rusty_shared::certs::{load_pair, read_capped, BundleError, CertBundle, LoadedPair};
pub use rusty_shared::certs::{CertError, DEFAULT_PAIR};

use crate::hostnames::Names;
use crate::metrics::{counter_vec, gauge_vec};

/// Most pairs in one directory.
pub const MAX_PAIRS: usize = 10_000;

/// Sessions remembered for resumption by id (TLS 1.2 clients without tickets).
const SESSION_CACHE: usize = 4096;

/// The protocols offered in ALPN, most preferred first: rustls picks the first of these the
/// client offers too, so HTTP/2 wins whenever a client can speak it.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// One certificate with its key, as loaded.
#[derive(Debug)]
pub struct Cert {
    /// The pair's name: the file stem, `default` for the default one.
    pub pair: String,
    /// What it covers.
    pub names: Names,
    /// End of validity, unix seconds.
    pub not_after: i64,
    /// Where it came from: its certificate file, or the agent.
    pub origin: PathBuf,
    pub key: Arc<CertifiedKey>,
}

impl Cert {
    pub fn is_default(&self) -> bool {
        self.pair == DEFAULT_PAIR
    }

    /// A pair checked by [`load_pair`], from `origin`.
    pub fn new(pair: LoadedPair, origin: PathBuf) -> Cert {
        Cert {
            names: Names::new(pair.dns, pair.ips),
            pair: pair.name,
            not_after: pair.not_after,
            origin,
            key: pair.key,
        }
    }
}

/// Certificates indexed for the handshake: exact names, then wildcards, then the default.
#[derive(Debug, Default)]
pub struct CertSet {
    certs: Vec<Arc<Cert>>,
    exact: HashMap<Box<str>, Arc<Cert>>,
    /// By the parent of the wildcard: `example.com` for `*.example.com`.
    wildcard: HashMap<Box<str>, Arc<Cert>>,
    default: Option<Arc<Cert>>,
}

impl CertSet {
    /// Index these certificates. Where two cover the same name, the one valid longer wins
    /// (a renewed certificate placed beside the old one takes over).
    pub fn new(certs: Vec<Arc<Cert>>) -> CertSet {
        let mut set = CertSet::default();
        let later = |slot: Option<&Arc<Cert>>, c: &Arc<Cert>| {
            slot.is_none_or(|old| c.not_after > old.not_after)
        };
        for cert in &certs {
            for name in cert.names.exact() {
                if later(set.exact.get(name), cert) {
                    set.exact.insert(name.clone(), cert.clone());
                }
            }
            for parent in cert.names.wildcard_parents() {
                if later(set.wildcard.get(parent), cert) {
                    set.wildcard.insert(parent.clone(), cert.clone());
                }
            }
            if cert.is_default() && later(set.default.as_ref(), cert) {
                set.default = Some(cert.clone());
            }
        }
        set.certs = certs;
        set
    }

    /// The certificate for a client's SNI: an exact name, else a wildcard one label up, else
    /// the default. `None`: the handshake is refused with `unrecognized_name`.
    pub fn resolve(&self, sni: Option<&str>) -> Option<&Arc<Cert>> {
        let found = sni.and_then(|sni| {
            let sni = sni.trim_end_matches('.');
            let mut lower = [0u8; crate::hostnames::MAX_HOST];
            let lower = lower.get_mut(..sni.len())?;
            lower.copy_from_slice(sni.as_bytes());
            lower.make_ascii_lowercase();
            let sni = std::str::from_utf8(lower).ok()?;
            if let Some(c) = self.exact.get(sni) {
                return Some(c);
            }
            let (label, parent) = sni.split_once('.')?;
            if label.is_empty() {
                return None;
            }
            self.wildcard.get(parent)
        });
        found.or(self.default.as_ref())
    }

    pub fn certs(&self) -> &[Arc<Cert>] {
        &self.certs
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// What a directory load gave: the pairs that loaded, and why each other one did not.
#[derive(Debug, Default)]
pub struct Loaded {
    pub certs: Vec<Arc<Cert>>,
    pub refused: Vec<CertError>,
}

/// Load every `NAME.crt`/`NAME.key` pair of `dir` (other files are ignored). A pair that does
/// not load is refused with its file named; if `previous` holds a pair of that name, that one
/// stays (the certificates already serving keep serving). Only an unreadable directory, or
/// one with more than [`MAX_PAIRS`] pairs, fails as a whole.
pub fn load_dir(
    dir: &Path,
    previous: &[Arc<Cert>],
    provider: &CryptoProvider,
    now: i64,
) -> Result<Loaded, CertError> {
    let dir_error = |source| CertError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut crts = Vec::new();
    let mut keys = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let path = entry.map_err(dir_error)?.path();
        let (Some(stem), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        match ext {
            "crt" => crts.push(stem.to_owned()),
            "key" => {
                keys.insert(stem.to_owned());
            }
            _ => {}
        }
        if crts.len() > MAX_PAIRS || keys.len() > MAX_PAIRS {
            return Err(CertError::TooMany {
                path: dir.to_owned(),
                limit: MAX_PAIRS,
            });
        }
    }
    crts.sort();
    let mut loaded = Loaded::default();
    let refuse = |loaded: &mut Loaded, pair: &str, why: CertError| {
        loaded.refused.push(why);
        if let Some(old) = previous.iter().find(|c| c.pair == pair) {
            loaded.certs.push(old.clone());
        }
    };
    for pair in &crts {
        let crt = dir.join(format!("{pair}.crt"));
        let key = dir.join(format!("{pair}.key"));
        if !keys.remove(pair) {
            let why = CertError::Unpaired {
                path: crt,
                missing: "NAME.key",
            };
            refuse(&mut loaded, pair, why);
            continue;
        }
        let result = read_capped(&crt).and_then(|crt_pem| {
            let key_pem = read_capped(&key)?;
            load_pair(pair, (&crt, &crt_pem), (&key, &key_pem), provider, now)
        });
        match result {
            Ok(loaded_pair) => loaded.certs.push(Arc::new(Cert::new(loaded_pair, crt))),
            Err(why) => refuse(&mut loaded, pair, why),
        }
    }
    for pair in keys {
        loaded.refused.push(CertError::Unpaired {
            path: dir.join(format!("{pair}.key")),
            missing: "NAME.crt",
        });
    }
    Ok(loaded)
}

/// Chooses the certificate of a handshake from one set.
#[derive(Debug)]
struct BySni(Arc<CertSet>);

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.resolve(hello.server_name()).map(|c| c.key.clone())
    }
}

/// One set of certificates and the server config that presents them.
pub struct Generation {
    pub set: Arc<CertSet>,
    pub config: Arc<ServerConfig>,
}

/// The certificates in use, and what the handshakes share across reloads.
pub struct Certs {
    current: ArcSwap<Generation>,
    /// What the current generation was made of; changed one source at a time.
    sources: std::sync::Mutex<Sources>,
    provider: Arc<CryptoProvider>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
    expiry: IntGaugeVec,
    loads: IntCounterVec,
    loaded: IntCounter,
    refused: IntCounter,
}

/// The two places certificates come from: `--certs DIR` and the agent's bundles.
#[derive(Default)]
struct Sources {
    dir: Vec<Arc<Cert>>,
    agent: Vec<Arc<Cert>>,
    /// The version of the agent's bundle installed (0: none).
    agent_version: u64,
}

/// What became of a bundle from the agent.
#[derive(Debug)]
pub enum Offered {
    /// Installed; the pairs that did not load, by name and reason (the previous pair of that
    /// name, if any, kept serving).
    Installed {
        version: u64,
        pairs: usize,
        refused: Vec<String>,
    },
    /// Not newer than the installed bundle.
    Stale { version: u64, installed: u64 },
}

/// Why a bundle was not installed at all.
#[derive(Debug, Error)]
pub enum OfferError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Setup(#[from] TlsSetupError),
}

/// How the TLS listener's settings could not be made.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

impl Certs {
    /// Empty, with fresh ticket keys (rotated every 6 hours by rustls, kept in memory only).
    pub fn new() -> Result<Certs, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ticketer = rustls::crypto::ring::Ticketer::new()?;
        let sessions: Arc<dyn StoresServerSessions> =
            rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        let empty = Arc::new(CertSet::default());
        let config = server_config(&provider, &empty, &ticketer, &sessions)?;
        let loads = counter_vec(
            "rustybalancer_tls_certificate_loads_total",
            "Certificate pairs loaded, and refused (the previous one of that name kept serving).",
            &["result"],
        );
        Ok(Certs {
            current: ArcSwap::from_pointee(Generation { set: empty, config }),
            sources: std::sync::Mutex::new(Sources::default()),
            provider,
            ticketer,
            sessions,
            loaded: loads.with_label_values(&["loaded"]),
            refused: loads.with_label_values(&["refused"]),
            loads,
            expiry: gauge_vec(
                "rustybalancer_tls_certificate_expiry_timestamp_seconds",
                "End of validity of each certificate served, by pair name (unix time).",
                &["pair"],
            ),
        })
    }

    pub fn provider(&self) -> &CryptoProvider {
        &self.provider
    }

    /// The set and config a new handshake uses.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Serve these certificates of the directory, with the agent's, from the next handshake
    /// on.
    pub fn set_dir(&self, certs: Vec<Arc<Cert>>) -> Result<(), TlsSetupError> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let previous = std::mem::replace(&mut sources.dir, certs);
        self.rebuild(&sources)
            .inspect_err(|_| sources.dir = previous)
    }

    /// The pairs loaded from the directory (a reload keeps those of broken pairs).
    pub fn dir_certs(&self) -> Vec<Arc<Cert>> {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dir
            .clone()
    }

    /// A bundle from the agent (or the state dir): installed when newer than the one in use.
    /// Each pair is checked as a directory's would be; one that does not load keeps the
    /// previous pair of its name. Only a bundle that does not parse is an error.
    pub fn offer_bundle(&self, bytes: &[u8], now: i64) -> Result<Offered, OfferError> {
        let bundle = CertBundle::decode(bytes)?;
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if bundle.version <= sources.agent_version {
            return Ok(Offered::Stale {
                version: bundle.version,
                installed: sources.agent_version,
            });
        }
        let mut certs = Vec::with_capacity(bundle.pairs.len());
        let mut refused = Vec::new();
        for pair in &bundle.pairs {
            let crt = PathBuf::from(format!("agent:{}.crt", pair.name));
            let key = PathBuf::from(format!("agent:{}.key", pair.name));
            let loaded = load_pair(
                &pair.name,
                (&crt, pair.chain_pem.as_bytes()),
                (&key, pair.key_pem.as_bytes()),
                &self.provider,
                now,
            );
            match loaded {
                Ok(p) => certs.push(Arc::new(Cert::new(p, crt))),
                Err(why) => {
                    refused.push(why.to_string());
                    if let Some(old) = sources.agent.iter().find(|c| c.pair == pair.name) {
                        certs.push(old.clone());
                    }
                }
            }
        }
        self.count_load(certs.len(), refused.len());
        let pairs = certs.len();
        let previous = std::mem::replace(&mut sources.agent, certs);
        if let Err(e) = self.rebuild(&sources) {
            sources.agent = previous;
            return Err(e.into());
        }
        sources.agent_version = bundle.version;
        Ok(Offered::Installed {
            version: bundle.version,
            pairs,
            refused,
        })
    }

    fn rebuild(&self, sources: &Sources) -> Result<(), TlsSetupError> {
        let all = sources.dir.iter().chain(&sources.agent).cloned().collect();
        let set = Arc::new(CertSet::new(all));
        let config = server_config(&self.provider, &set, &self.ticketer, &self.sessions)?;
        self.expiry.reset();
        for cert in set.certs() {
            self.expiry
                .with_label_values(&[&cert.pair])
                .set(cert.not_after);
        }
        self.current.store(Arc::new(Generation { set, config }));
        Ok(())
    }

    /// Count a load: how many pairs loaded and how many were refused.
    pub fn count_load(&self, loaded: usize, refused: usize) {
        self.loaded.inc_by(loaded as u64);
        self.refused.inc_by(refused as u64);
    }

    /// The certificate metrics, for the registry: names and dates only.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![Box::new(self.expiry.clone()), Box::new(self.loads.clone())]
    }
}

/// TLS 1.2 and 1.3 with ring's suites (AES-GCM and ChaCha20-Poly1305, ECDHE only), no
/// client certificates, no 0-RTT data (it could be replayed), tickets and a session cache.
fn server_config(
    provider: &Arc<CryptoProvider>,
    set: &Arc<CertSet>,
    ticketer: &Arc<dyn ProducesTickets>,
    sessions: &Arc<dyn StoresServerSessions>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni(set.clone())));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config.ticketer = ticketer.clone();
    config.session_storage = sessions.clone();
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// What a request on a TLS connection needs to know of it: the certificate it was given
/// (whose names the request's `Host` must be among) and the SNI it asked for.
#[derive(Debug)]
pub struct TlsConn {
    pub cert: Arc<Cert>,
    pub sni: Option<Box<str>>,
}

impl TlsConn {
    /// The facts the front left in a TLS stream's digest (`None` on plain connections).
    pub fn of(digest: &pingora::protocols::tls::SslDigest) -> Option<&Arc<TlsConn>> {
        digest.extension.get::<Arc<TlsConn>>()
    }

    /// Whether a request on this connection may name this host: its certificate covers it.
    pub fn covers(&self, host: &[u8]) -> bool {
        self.cert.names.covers(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for these names, valid until `year`, and its key, as PEM.
    fn pem(names: &[&str], year: i32) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// 2026-06-01, as unix seconds.
    const NOW: i64 = 1_780_272_000;

    fn load(pair: &str, names: &[&str], year: i32) -> Result<Cert, CertError> {
        let (crt, key) = pem(names, year);
        let provider = rustls::crypto::ring::default_provider();
        load_pair(
            pair,
            (Path::new("x.crt"), crt.as_bytes()),
            (Path::new("x.key"), key.as_bytes()),
            &provider,
            NOW,
        )
        .map(|p| Cert::new(p, PathBuf::from("x.crt")))
    }

    fn cert(pair: &str, names: &[&str], year: i32) -> Arc<Cert> {
        Arc::new(load(pair, names, year).unwrap())
    }

    #[test]
    fn an_exact_name_beats_a_wildcard_beats_the_default() {
        let set = CertSet::new(vec![
            cert("wild", &["*.example.com"], 2030),
            cert("www", &["www.example.com"], 2030),
            cert("default", &[], 2030),
        ]);
        let pair = |sni: Option<&str>| set.resolve(sni).map(|c| c.pair.as_str());
        assert_eq!(pair(Some("www.example.com")), Some("www"));
        assert_eq!(pair(Some("WWW.Example.com.")), Some("www"));
        assert_eq!(pair(Some("api.example.com")), Some("wild"));
        assert_eq!(pair(Some("a.b.example.com")), Some("default"));
        assert_eq!(pair(Some("example.com")), Some("default"));
        assert_eq!(pair(None), Some("default"));
        assert_eq!(pair(Some(&"a".repeat(300))), Some("default"));
        let no_default = CertSet::new(vec![cert("www", &["www.example.com"], 2030)]);
        assert!(no_default.resolve(Some("other.example.com")).is_none());
        assert!(no_default.resolve(None).is_none());
    }

    #[test]
    fn of_two_certificates_for_a_name_the_one_valid_longer_serves() {
        let set = CertSet::new(vec![
            cert("new", &["a.example.com"], 2031),
            cert("old", &["a.example.com"], 2029),
        ]);
        assert_eq!(set.resolve(Some("a.example.com")).unwrap().pair, "new");
        let set = CertSet::new(vec![
            cert("old", &["a.example.com"], 2029),
            cert("new", &["a.example.com"], 2031),
        ]);
        assert_eq!(set.resolve(Some("a.example.com")).unwrap().pair, "new");
    }

    #[test]
    fn names_come_from_the_subject_alt_name() {
        let c = cert(
            "a",
            &["a.example.com", "*.b.example.com", "192.0.2.1"],
            2030,
        );
        assert!(c.names.covers(b"a.example.com"));
        assert!(c.names.covers(b"x.b.example.com"));
        assert!(c.names.covers(b"192.0.2.1"));
        assert!(!c.names.covers(b"b.example.com"));
        assert_eq!(c.not_after, 1_893_456_000, "2030-01-01");
    }

    #[test]
    fn a_directory_reload_keeps_the_old_pair_of_a_broken_one() {
        let dir = std::env::temp_dir().join(format!("rusty-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |pair: &str, names: &[&str]| {
            let (crt, key) = pem(names, 2030);
            std::fs::write(dir.join(format!("{pair}.crt")), crt).unwrap();
            std::fs::write(dir.join(format!("{pair}.key")), key).unwrap();
        };
        write("a", &["a.example.com"]);
        write("b", &["b.example.com"]);
        std::fs::write(dir.join("README"), "not a pair").unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let first = load_dir(&dir, &[], &provider, NOW).unwrap();
        assert_eq!(first.certs.len(), 2);
        assert!(first.refused.is_empty(), "{:?}", first.refused);

        std::fs::write(dir.join("b.key"), "broken").unwrap();
        write("c", &["c.example.com"]);
        std::fs::write(dir.join("orphan.key"), "x").unwrap();
        let second = load_dir(&dir, &first.certs, &provider, NOW).unwrap();
        let pairs: Vec<&str> = second.certs.iter().map(|c| c.pair.as_str()).collect();
        assert_eq!(pairs, ["a", "b", "c"]);
        let old_b = first.certs.iter().find(|c| c.pair == "b").unwrap();
        let kept_b = second.certs.iter().find(|c| c.pair == "b").unwrap();
        assert!(Arc::ptr_eq(old_b, kept_b), "the loaded b keeps serving");
        let refused: Vec<String> = second.refused.iter().map(|e| e.to_string()).collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].contains("b.key"), "{refused:?}");
        assert!(
            refused[1].contains("orphan.key: has no matching NAME.crt"),
            "{refused:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_generation_presents_what_its_set_resolves() {
        let certs = Certs::new().unwrap();
        assert!(certs.current().set.is_empty());
        certs
            .set_dir(vec![cert("a", &["a.example.com"], 2030)])
            .unwrap();
        let generation = certs.current();
        assert_eq!(
            generation.set.resolve(Some("a.example.com")).unwrap().pair,
            "a"
        );
        assert_eq!(
            generation.config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(generation.config.max_early_data_size, 0);
        let metrics = crate::metrics::text_of(certs.collectors());
        assert!(
            metrics.contains("expiry_timestamp_seconds{pair=\"a\"} 1893456000"),
            "{metrics}"
        );
        assert!(!metrics.contains("PRIVATE"), "{metrics}");
    }
}
