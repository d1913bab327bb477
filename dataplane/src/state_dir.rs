//! The state dir: the last applied table, and the last certificate bundle from the agent,
//! saved so that a restarted data plane serves at once even when the agent is down.
//!
//! Writes go to a temporary file that is synced and then renamed over the file, so a crash
//! mid-write leaves the previous one intact; the file it replaces is kept as `NAME.prev.json`,
//! so a file damaged later (a truncating copy, a bad disk) still leaves the one before to fall
//! back to. The bundle holds private keys: its files are created with mode 0600 and kept so.
//! What is read back goes through the same checks as what arrives.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One file of the state dir.
pub struct StateDir {
    file: PathBuf,
    tmp: PathBuf,
    /// What `file` held before the last save.
    previous: PathBuf,
    /// Only the owner may read it (it holds keys).
    private: bool,
}

impl StateDir {
    /// The table file of `dir` (created if needed).
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(StateDir {
            file: dir.join("table.json"),
            tmp: dir.join(".table.json.tmp"),
            previous: dir.join("table.prev.json"),
            private: false,
        })
    }

    /// The certificate bundle file of `dir`, mode 0600.
    pub fn open_certs(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let file = dir.join("certs.json");
        let previous = dir.join("certs.prev.json");
        for f in [&file, &previous] {
            if f.exists() {
                fs::set_permissions(f, fs::Permissions::from_mode(0o600))?;
            }
        }
        Ok(StateDir {
            file,
            tmp: dir.join(".certs.json.tmp"),
            previous,
            private: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Save `bytes`, keeping what the file held as the previous version.
    pub fn save(&self, bytes: &[u8]) -> io::Result<()> {
        self.write(bytes, true)
    }

    /// Save `bytes` over the file only (the previous version stays): for a restore from the
    /// previous version, so the good copy is not rotated away by the damaged one.
    pub fn save_over(&self, bytes: &[u8]) -> io::Result<()> {
        self.write(bytes, false)
    }

    fn write(&self, bytes: &[u8], rotate: bool) -> io::Result<()> {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if self.private {
            options.mode(0o600);
        }
        let mut f = options.open(&self.tmp)?;
        if self.private {
            // A tmp file left by an older process may have kept another mode.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        if rotate {
            match fs::rename(&self.file, &self.previous) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        fs::rename(&self.tmp, &self.file)?;
        // Make the rename itself durable.
        if let Some(dir) = self.file.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn load(&self) -> io::Result<Option<Vec<u8>>> {
        read(&self.file)
    }

    /// The file's previous version (see [`StateDir::save`]).
    pub fn load_previous(&self) -> io::Result<Option<Vec<u8>>> {
        read(&self.previous)
    }

    /// What a restore tries, in order: the file, then its previous version, each with its
    /// path (for the log) and what reading it gave.
    pub fn saved(&self) -> [(&Path, io::Result<Option<Vec<u8>>>); 2] {
        [
            (&self.file, self.load()),
            (&self.previous, self.load_previous()),
        ]
    }
}

fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_replaces_atomically_and_load_reads_back() {
        let dir = std::env::temp_dir().join(format!("rusty-lb-state-{}", std::process::id()));
        let s = StateDir::open(&dir).unwrap();
        assert_eq!(s.load().unwrap(), None);
        s.save(b"one").unwrap();
        s.save(b"two").unwrap();
        assert_eq!(s.load().unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(s.load_previous().unwrap().as_deref(), Some(&b"one"[..]));
        assert!(!dir.join(".table.json.tmp").exists());
        s.save_over(b"three").unwrap();
        assert_eq!(s.load().unwrap().as_deref(), Some(&b"three"[..]));
        assert_eq!(s.load_previous().unwrap().as_deref(), Some(&b"one"[..]));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_certificate_bundle_is_readable_by_its_owner_only() {
        let dir = std::env::temp_dir().join(format!("rusty-lb-certs-{}", std::process::id()));
        let s = StateDir::open_certs(&dir).unwrap();
        s.save(b"old keys").unwrap();
        s.save(b"keys").unwrap();
        let mode = fs::metadata(dir.join("certs.prev.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the previous bundle too");
        let mode = fs::metadata(dir.join("certs.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::set_permissions(dir.join("certs.json"), fs::Permissions::from_mode(0o644)).unwrap();
        let s = StateDir::open_certs(&dir).unwrap();
        let mode = fs::metadata(dir.join("certs.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "tightened when reopened");
        assert_eq!(s.load().unwrap().as_deref(), Some(&b"keys"[..]));
        fs::remove_dir_all(dir).unwrap();
    }
}
