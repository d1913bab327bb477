//! A certificate directory (`--certs`): loaded once before the TLS listener accepts, reloaded
//! on SIGHUP together with the table file. A pair that does not load is logged with its file
//! named and counted; the pair of that name already serving keeps serving, and the others
//! load. At start, any refused pair stops the data plane instead.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::certs::{load_dir, CertError, Certs, TlsSetupError};
use crate::clock::unix_now;

pub struct CertDir {
    dir: PathBuf,
    certs: Arc<Certs>,
}

/// Why the directory could not be served at start.
#[derive(Debug, thiserror::Error)]
pub enum CertDirError {
    #[error(transparent)]
    Load(#[from] CertError),
    #[error("{count} certificate pair(s) refused; the first: {first}")]
    Refused { count: usize, first: CertError },
    #[error("{0}: no certificate pair (NAME.crt and NAME.key) in it")]
    Empty(String),
    #[error(transparent)]
    Setup(#[from] TlsSetupError),
}

impl CertDir {
    pub fn new(dir: PathBuf, certs: Arc<Certs>) -> Self {
        CertDir { dir, certs }
    }

    /// The first load: every pair must load, and there must be one.
    pub fn load_all(&self) -> Result<(), CertDirError> {
        let loaded = load_dir(&self.dir, &[], self.certs.provider(), unix_now())?;
        self.certs
            .count_load(loaded.certs.len(), loaded.refused.len());
        let count = loaded.refused.len();
        if let Some(first) = loaded.refused.into_iter().next() {
            return Err(CertDirError::Refused { count, first });
        }
        if loaded.certs.is_empty() {
            return Err(CertDirError::Empty(self.dir.display().to_string()));
        }
        for cert in &loaded.certs {
            info!(pair = %cert.pair, names = ?cert.names.display(), not_after = cert.not_after,
                "certificate loaded");
        }
        self.certs.set_dir(loaded.certs)?;
        Ok(())
    }

    /// A reload: what loads replaces its pair, what does not keeps the old one.
    pub fn reload(&self) {
        let previous = self.certs.dir_certs();
        let loaded = match load_dir(&self.dir, &previous, self.certs.provider(), unix_now()) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "certificate reload failed; the loaded certificates keep serving");
                return;
            }
        };
        self.certs
            .count_load(loaded.certs.len(), loaded.refused.len());
        for why in &loaded.refused {
            warn!(error = %why, "certificate pair refused; the pair of that name already loaded, if any, keeps serving");
        }
        let pairs = loaded.certs.len();
        match self.certs.set_dir(loaded.certs) {
            Ok(()) => info!(dir = %self.dir.display(), pairs, refused = loaded.refused.len(),
                "certificates reloaded"),
            Err(e) => {
                error!(error = %e, "certificate reload failed; the loaded certificates keep serving")
            }
        }
    }
}

#[async_trait]
impl BackgroundService for CertDir {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGHUP; certificate reloads are disabled");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    info!(dir = %self.dir.display(), "SIGHUP: reloading the certificates");
                    self.reload();
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
