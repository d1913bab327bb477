//! Certificates out: the `[tls]` pairs read from their files and those [`crate::acme`] issued,
//! in one versioned bundle handed to every subscriber that asks for it through a `watch`
//! channel, like tables.
//!
//! Read at start (the config check already loaded each pair once) and again on SIGHUP. A pair
//! that no longer loads keeps its last good content, so a half-written renewal never reaches a
//! data plane; a bundle whose content did not change gets no new version. Key material lives
//! only in the bundle's bytes: the `Debug` of [`Bundle`] shows names and sizes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rusty_shared::certs::{load_pair, read_capped, CertBundle, CertPair};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::spec::CertFile;

/// One bundle, ready to send.
pub struct Bundle {
    pub version: u64,
    pub names: Vec<String>,
    /// The JSON of the [`CertBundle`].
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("version", &self.version)
            .field("names", &self.names)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

pub type CertFeed = watch::Receiver<Option<Arc<Bundle>>>;

/// Reads the `[tls]` certificate files, takes the certificates ACME issued, and publishes the
/// bundle of both.
pub struct CertSource {
    files: Vec<CertFile>,
    /// The files' pairs as last read (a broken file keeps its last good pair).
    from_files: Vec<CertPair>,
    /// Certificates ordered over ACME, by name.
    issued: BTreeMap<String, CertPair>,
    /// The pairs of the last bundle sent.
    last: Vec<CertPair>,
    version: u64,
    tx: watch::Sender<Option<Arc<Bundle>>>,
}

/// The wall clock in unix seconds: what certificates' validity is judged against.
pub fn unix_now() -> i64 {
    unix_now_ms() as i64 / 1000
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl CertSource {
    pub fn new(files: Vec<CertFile>) -> CertSource {
        let (tx, _) = watch::channel(None);
        CertSource {
            files,
            from_files: Vec::new(),
            issued: BTreeMap::new(),
            last: Vec::new(),
            version: 0,
            tx,
        }
    }

    pub fn subscribe(&self) -> CertFeed {
        self.tx.subscribe()
    }

    /// Read every pair again and publish a new bundle if anything changed. Returns the
    /// version published, if any.
    pub fn reload(&mut self) -> Option<u64> {
        if self.files.is_empty() {
            return None;
        }
        let provider = rustls::crypto::ring::default_provider();
        let now = unix_now();
        let mut pairs = Vec::with_capacity(self.files.len());
        for f in &self.files {
            let read = read_capped(&f.cert).and_then(|crt| {
                let key = read_capped(&f.key)?;
                load_pair(&f.name, (&f.cert, &crt), (&f.key, &key), &provider, now)?;
                Ok((crt, key))
            });
            let text = read.map(|(crt, key)| {
                (
                    String::from_utf8_lossy(&crt).into_owned(),
                    String::from_utf8_lossy(&key).into_owned(),
                )
            });
            match text {
                Ok((chain_pem, key_pem)) => pairs.push(CertPair {
                    name: f.name.clone(),
                    chain_pem,
                    key_pem,
                }),
                Err(e) => {
                    warn!(pair = %f.name, error = %e,
                        "certificate does not load; the data planes keep its last good version");
                    if let Some(old) = self.from_files.iter().find(|p| p.name == f.name) {
                        pairs.push(old.clone());
                    }
                }
            }
        }
        self.from_files = pairs;
        self.publish()
    }

    /// Add or replace a certificate ACME issued (checked by the caller) and publish.
    pub fn set_issued(&mut self, pair: CertPair) -> Option<u64> {
        self.issued.insert(pair.name.clone(), pair);
        self.publish()
    }

    fn publish(&mut self) -> Option<u64> {
        let pairs: Vec<CertPair> = self
            .from_files
            .iter()
            .chain(self.issued.values())
            .cloned()
            .collect();
        if pairs == self.last && self.version > 0 {
            return None;
        }
        let now_ms = unix_now_ms();
        self.version = (self.version + 1).max(now_ms);
        let bundle = CertBundle {
            version: self.version,
            pairs,
        };
        let bytes = match serde_json::to_vec(&bundle) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode the certificate bundle");
                return None;
            }
        };
        let names: Vec<String> = bundle.pairs.iter().map(|p| p.name.clone()).collect();
        info!(version = self.version, ?names, "certificates published");
        self.last = bundle.pairs;
        self.tx.send_replace(Some(Arc::new(Bundle {
            version: self.version,
            names,
            bytes,
        })));
        Some(self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &std::path::Path, name: &str, host: &str) -> CertFile {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let f = CertFile {
            name: name.to_owned(),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&f.cert, cert.pem()).unwrap();
        std::fs::write(&f.key, key.serialize_pem()).unwrap();
        f
    }

    #[test]
    fn a_bundle_is_published_when_its_content_changes_and_keeps_a_broken_pair() {
        let dir = std::env::temp_dir().join(format!("rusty-agent-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = write_pair(&dir, "a", "a.example.com");
        let b = write_pair(&dir, "b", "b.example.com");
        let mut source = CertSource::new(vec![a.clone(), b.clone()]);
        let feed = source.subscribe();
        let first = source.reload().expect("a first bundle");
        let sent = feed.borrow().clone().unwrap();
        assert_eq!(sent.names, ["a", "b"]);
        assert!(!format!("{sent:?}").contains("PRIVATE"), "{sent:?}");
        assert_eq!(source.reload(), None, "nothing changed");

        // b's key is overwritten with garbage: b keeps its last good content.
        let b_before = source.last[1].clone();
        std::fs::write(&b.key, "garbage").unwrap();
        write_pair(&dir, "a", "a2.example.com");
        let second = source.reload().expect("a changed");
        assert!(second > first);
        let bundle = CertBundle::decode(&feed.borrow().clone().unwrap().bytes).unwrap();
        assert_eq!(bundle.version, second);
        assert_eq!(bundle.pairs[1], b_before);
        assert_ne!(bundle.pairs[0].chain_pem, b_before.chain_pem);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
