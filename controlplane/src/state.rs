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

/// [`write_atomic`] for secrets: the file is created with mode 0600 before a byte is written,
/// so the content is never readable by others, not even for a moment.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A temporary file left by a crash may have been created looser.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
