//! Small files the agent keeps in its state directory, written so a crash leaves either the old
//! content or the new one: write a temporary file, fsync it, rename it over the old one. The
//! content it replaces is kept as `NAME.prev`, and [`read_or_previous`] falls back to it when
//! the file itself is damaged (truncated by something else, garbage), saying so. A file that
//! cannot be written (full disk, read-only) is the caller's to log; nothing the agent decides
//! waits for its state files.

use crate::metrics::{FELL_BACK, UNUSABLE};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// The saved state (or the one before it, when it is damaged), or empty if there is none.
    pub fn load(path: &Path) -> Desired {
        read_or_previous(path, |b| {
            serde_json::from_slice(b).map_err(|e| e.to_string())
        })
        .unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(path, &json)
    }
}

fn previous(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".prev");
    path.with_file_name(name)
}

fn tmp(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// `path` parsed, or its previous version when `path` is unreadable or does not parse; `None`
/// when neither exists or parses (each problem logged with the file and the reason).
pub fn read_or_previous<T>(path: &Path, parse: impl Fn(&[u8]) -> Result<T, String>) -> Option<T> {
    let mut damaged = false;
    for (i, file) in [path.to_path_buf(), previous(path)].iter().enumerate() {
        let read = match std::fs::read(file) {
            Ok(b) => parse(&b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(e.to_string()),
        };
        match read {
            Ok(v) => {
                if i == 1 && damaged {
                    FELL_BACK.inc();
                    tracing::warn!(file = %path.display(), previous = %file.display(),
                        "the saved state is damaged; using the version before it");
                }
                return Some(v);
            }
            Err(e) => {
                UNUSABLE.inc();
                damaged = true;
                tracing::warn!(file = %file.display(), "ignoring an unreadable state file: {e}");
            }
        }
    }
    None
}

/// Replace `path` with `bytes` (crash-safe), keeping what it held as `NAME.prev`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp(path);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    rotate(path)?;
    std::fs::rename(&tmp, path)
}

/// Keep the current content as the previous version.
fn rotate(path: &Path) -> std::io::Result<()> {
    match std::fs::rename(path, previous(path)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// [`write_atomic`] for secrets: the file is created with mode 0600 before a byte is written,
/// so the content is never readable by others, not even for a moment.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = tmp(path);
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
    rotate(path)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_file_falls_back_to_the_version_before_it() {
        let dir = std::env::temp_dir().join(format!("rusty-agent-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("version");
        let parse = |b: &[u8]| {
            std::str::from_utf8(b)
                .map_err(|e| e.to_string())?
                .trim()
                .parse::<u64>()
                .map_err(|e| e.to_string())
        };
        assert_eq!(read_or_previous(&file, parse), None, "nothing saved yet");
        write_atomic(&file, b"41").unwrap();
        write_atomic(&file, b"42").unwrap();
        assert_eq!(read_or_previous(&file, parse), Some(42));
        let before = FELL_BACK.get();
        std::fs::write(&file, b"4\0garbage").unwrap();
        assert_eq!(read_or_previous(&file, parse), Some(41), "the one before");
        assert_eq!(FELL_BACK.get(), before + 1);
        write_private(&file, b"43").unwrap();
        assert_eq!(read_or_previous(&file, parse), Some(43));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
