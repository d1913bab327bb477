//! Certificates both planes read: one pair (a PEM chain and its key) checked the same way by
//! the data plane loading a directory and by the agent loading its config or an ACME order
//! ([`load_pair`]), and the message that carries pairs from the agent to the data planes
//! ([`CertBundle`], a binary WebSocket frame of its own, never part of a table).
//!
//! Key material stays in rustls' types or in [`CertPair::key_pem`], whose `Debug` hides it:
//! nothing here logs, renders or returns a key in an error.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The pair that answers an SNI no other certificate covers (and clients that send none).
pub const DEFAULT_PAIR: &str = "default";

/// Largest certificate or key file read (a chain of a few certificates is a few KiB).
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Largest PEM text of one pair in a [`CertBundle`].
pub const MAX_BUNDLE_PEM_BYTES: usize = 64 * 1024;

/// Most pairs in one bundle.
pub const MAX_BUNDLE_PAIRS: usize = 1000;

/// Why a certificate pair did not load. Each names the file (or pair) at fault.
#[derive(Debug, Error)]
pub enum CertError {
    #[error("{path}: cannot read the certificate directory: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_PEM_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate chain: {why}")]
    BadCertificate { path: PathBuf, why: String },
    #[error("{path}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: the private key cannot be used: {why}")]
    BadKey { path: PathBuf, why: String },
    #[error("{key}: this key does not match the certificate in {crt}")]
    Mismatch { crt: PathBuf, key: PathBuf },
    #[error("{path}: the certificate expired at {not_after} (unix time)")]
    Expired { path: PathBuf, not_after: i64 },
    #[error("{path}: the certificate names no DNS name or address in its subjectAltName (only a pair named `default` may)")]
    NoNames { path: PathBuf },
    #[error("{path}: has no matching {missing}")]
    Unpaired {
        path: PathBuf,
        missing: &'static str,
    },
    #[error("{path}: more than {limit} certificate pairs")]
    TooMany { path: PathBuf, limit: usize },
}

/// One certificate with its key, checked.
pub struct LoadedPair {
    pub name: String,
    /// The DNS names of the leaf's subjectAltName, as written.
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Start and end of validity, unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub key: Arc<CertifiedKey>,
}

impl fmt::Debug for LoadedPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPair")
            .field("name", &self.name)
            .field("dns", &self.dns)
            .field("ips", &self.ips)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Read a file into memory, refusing one larger than [`MAX_PEM_BYTES`].
pub fn read_capped(path: &Path) -> Result<Vec<u8>, CertError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| CertError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(CertError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Load one pair from PEM bytes: the chain, the key, that they match, the names the leaf
/// covers and that it has not expired at `now` (unix seconds). The paths only name the parts
/// in errors.
pub fn load_pair(
    name: &str,
    crt: (&Path, &[u8]),
    key: (&Path, &[u8]),
    provider: &CryptoProvider,
    now: i64,
) -> Result<LoadedPair, CertError> {
    let (crt_path, crt_pem) = crt;
    let (key_path, key_pem) = key;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(crt_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadCertificate {
            path: crt_path.to_owned(),
            why: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: crt_path.to_owned(),
        });
    };
    let (dns, ips, (not_before, not_after)) =
        leaf_facts(leaf).map_err(|why| CertError::BadCertificate {
            path: crt_path.to_owned(),
            why,
        })?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            path: key_path.to_owned(),
        },
        other => CertError::BadKey {
            path: key_path.to_owned(),
            why: other.to_string(),
        },
    })?;
    let certified = CertifiedKey::from_der(chain, key_der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::Mismatch {
            crt: crt_path.to_owned(),
            key: key_path.to_owned(),
        },
        other => CertError::BadKey {
            path: key_path.to_owned(),
            why: other.to_string(),
        },
    })?;
    if not_after < now {
        return Err(CertError::Expired {
            path: crt_path.to_owned(),
            not_after,
        });
    }
    if dns.is_empty() && ips.is_empty() && name != DEFAULT_PAIR {
        return Err(CertError::NoNames {
            path: crt_path.to_owned(),
        });
    }
    Ok(LoadedPair {
        name: name.to_owned(),
        dns,
        ips,
        not_before,
        not_after,
        key: Arc::new(certified),
    })
}

/// The names of a leaf certificate's subjectAltName and its validity.
type LeafFacts = (Vec<String>, Vec<IpAddr>, (i64, i64));

fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<LeafFacts, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?
    {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns.push(n.to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        ips.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        ips.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    let validity = cert.validity();
    Ok((
        dns,
        ips,
        (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        ),
    ))
}

/// The certificates the agent hands its data planes: all of them each time, versioned so a
/// data plane installs only a newer bundle. Sent as a binary WebSocket frame (a data plane
/// that predates it ignores binary frames), persisted by the data plane with mode 0600.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertBundle {
    pub version: u64,
    #[serde(default)]
    pub pairs: Vec<CertPair>,
}

/// One pair of a bundle, as PEM text.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    /// The pair's name (what the data plane's metrics and logs call it).
    pub name: String,
    pub chain_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair")
            .field("name", &self.name)
            .field("chain_pem", &format_args!("{} bytes", self.chain_pem.len()))
            .field("key_pem", &"(hidden)")
            .finish()
    }
}

/// Why a bundle was refused as a whole.
#[derive(Debug, Error)]
pub enum BundleError {
    #[error("certificate bundle is not valid JSON: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("certificate bundle is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("certificate bundle has {count} pairs, over the limit of {MAX_BUNDLE_PAIRS}")]
    TooMany { count: usize },
    #[error("certificate bundle: pair {name:?}: {why}")]
    BadPair { name: String, why: &'static str },
}

impl CertBundle {
    /// Parse and check the shape of a bundle (each pair's content is checked by
    /// [`load_pair`] where it is installed).
    pub fn decode(bytes: &[u8]) -> Result<CertBundle, BundleError> {
        let limit = crate::limits::MAX_BUNDLE_BYTES;
        if bytes.len() > limit {
            return Err(BundleError::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let bundle: CertBundle = serde_json::from_slice(bytes)?;
        if bundle.pairs.len() > MAX_BUNDLE_PAIRS {
            return Err(BundleError::TooMany {
                count: bundle.pairs.len(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for p in &bundle.pairs {
            let bad = |why| BundleError::BadPair {
                name: p.name.chars().take(64).collect(),
                why,
            };
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 128
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !name_ok {
                return Err(bad("names are 1 to 128 of A-Z a-z 0-9 - _ . :"));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(bad("appears more than once"));
            }
            if p.chain_pem.len() > MAX_BUNDLE_PEM_BYTES || p.key_pem.len() > MAX_BUNDLE_PEM_BYTES {
                return Err(bad("PEM text over 65536 bytes"));
            }
        }
        Ok(bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn load(name: &str, names: &[&str], year: i32) -> Result<LoadedPair, CertError> {
        let (crt, key) = pem(names, year);
        let provider = rustls::crypto::ring::default_provider();
        load_pair(
            name,
            (Path::new("x.crt"), crt.as_bytes()),
            (Path::new("x.key"), key.as_bytes()),
            &provider,
            NOW,
        )
    }

    #[test]
    fn pairs_that_cannot_serve_are_refused_with_the_file_named() {
        assert!(matches!(
            load("a", &["a.example.com"], 2026),
            Err(CertError::Expired { .. })
        ));
        assert!(matches!(
            load("a", &[], 2030),
            Err(CertError::NoNames { .. })
        ));
        assert!(
            load("default", &[], 2030).is_ok(),
            "a default needs no names"
        );

        let provider = rustls::crypto::ring::default_provider();
        let (crt, _) = pem(&["a.example.com"], 2030);
        let (_, other_key) = pem(&["b.example.com"], 2030);
        let pair = |crt: &[u8], key: &[u8]| {
            load_pair(
                "a",
                (Path::new("a.crt"), crt),
                (Path::new("a.key"), key),
                &provider,
                NOW,
            )
        };
        let err = pair(crt.as_bytes(), other_key.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("a.key: this key does not match the certificate in a.crt"),
            "{err}"
        );
        assert!(!err.contains("PRIVATE"), "{err}");
        let no_key = pair(crt.as_bytes(), crt.as_bytes());
        assert!(matches!(no_key, Err(CertError::NoKey { .. })), "{no_key:?}");
        let no_cert = pair(b"hello", other_key.as_bytes());
        assert!(
            matches!(no_cert, Err(CertError::NoCertificate { .. })),
            "{no_cert:?}"
        );
    }

    #[test]
    fn names_come_from_the_subject_alt_name() {
        let p = load(
            "a",
            &["a.example.com", "*.b.example.com", "192.0.2.1"],
            2030,
        )
        .unwrap();
        assert_eq!(p.dns, ["a.example.com", "*.b.example.com"]);
        assert_eq!(p.ips, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.not_after, 1_893_456_000, "2030-01-01");
    }

    #[test]
    fn bundles_are_checked_for_shape_and_never_show_a_key() {
        let pair = |name: &str| CertPair {
            name: name.into(),
            chain_pem: "-----BEGIN CERTIFICATE-----".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----secret".into(),
        };
        let ok = CertBundle {
            version: 3,
            pairs: vec![pair("app"), pair("default")],
        };
        let bytes = serde_json::to_vec(&ok).unwrap();
        assert_eq!(CertBundle::decode(&bytes).unwrap(), ok);
        assert!(!format!("{ok:?}").contains("secret"));
        for (bad, says) in [
            (vec![pair("a"), pair("a")], "more than once"),
            (vec![pair("a b")], "names are"),
            (vec![pair("")], "names are"),
        ] {
            let b = serde_json::to_vec(&CertBundle {
                version: 1,
                pairs: bad,
            })
            .unwrap();
            let e = CertBundle::decode(&b).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let e = CertBundle::decode(br#"{"version": 1, "extra": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }
}
