//! A table file: loaded once before the listeners start, reloaded on SIGHUP (like nginx's
//! `-s reload`), with the same validation as any table. A reload that fails leaves the installed
//! table serving.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

use crate::store::TableStore;

pub struct FileSource {
    path: PathBuf,
    store: Arc<TableStore>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read table file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("table file {path}: {source}")]
    Invalid {
        path: String,
        source: rusty_shared::TableError,
    },
}

impl FileSource {
    pub fn new(path: PathBuf, store: Arc<TableStore>) -> Self {
        FileSource { path, store }
    }

    /// Read and offer the file. A stale table (the state dir had a newer one) is not an error.
    pub fn load(&self) -> Result<(), FileError> {
        let shown = self.path.display().to_string();
        let bytes = std::fs::read(&self.path).map_err(|source| FileError::Read {
            path: shown.clone(),
            source,
        })?;
        match self.store.offer(&bytes, &format!("file {shown}")) {
            Ok(_) => Ok(()),
            Err(e) if e.is_stale() => {
                info!(path = %shown, reason = %e, "table file not newer than the installed table");
                Ok(())
            }
            Err(source) => Err(FileError::Invalid {
                path: shown,
                source,
            }),
        }
    }
}

#[async_trait]
impl BackgroundService for FileSource {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGHUP; table reloads are disabled");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    info!(path = %self.path.display(), "SIGHUP: reloading the table file");
                    if let Err(e) = self.load() {
                        // Already logged and counted by the store when the table was invalid.
                        error!(error = %e, "reload failed; the installed table keeps serving");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
