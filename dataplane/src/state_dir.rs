//! The state dir: the last applied table, saved so that a restarted data plane serves at once
//! even when the agent is down.
//!
//! Writes go to a temporary file that is synced and then renamed over `table.json`, so a crash
//! mid-write leaves the previous table intact. What is read back goes through the same
//! validation as any other table.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct StateDir {
    file: PathBuf,
    tmp: PathBuf,
}

impl StateDir {
    /// Use (and create if needed) `dir`.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(StateDir {
            file: dir.join("table.json"),
            tmp: dir.join(".table.json.tmp"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    pub fn save(&self, bytes: &[u8]) -> io::Result<()> {
        let mut f = fs::File::create(&self.tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&self.tmp, &self.file)?;
        // Make the rename itself durable.
        if let Some(dir) = self.file.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn load(&self) -> io::Result<Option<Vec<u8>>> {
        match fs::read(&self.file) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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
        assert!(!dir.join(".table.json.tmp").exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
