//! Small files the agent keeps in its state directory, written so a crash leaves either the old
//! content or the new one: write a temporary file, fsync it, rename it over the old one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::spec::RunSpec;

/// Desired state changed through the API, per service, with the config it was changed from: a
/// restarted agent keeps the saved state while the config of that service is unchanged, and the
/// config wins once an operator edits it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub services: BTreeMap<String, SavedService>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedService {
    pub config_replicas: u32,
    pub config_run: RunSpec,
    pub replicas: u32,
    pub run: RunSpec,
}

impl Desired {
    /// The saved state, or empty if there is none or it cannot be read (said in the log).
    pub fn load(path: &Path) -> Desired {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), "ignoring unreadable saved state: {e}");
                Desired::default()
            }),
            Err(_) => Desired::default(),
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(path, &json)
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
