//! Tables out: turn the healthy instances into a versioned, validated table and hand it to every
//! subscriber through a `watch` channel.
//!
//! A `watch` holds only the newest value, which is exactly the coalescing the data planes need:
//! a subscriber that was busy while three tables were published reads the third and never sees
//! the first two, and no subscriber can hold up the agent or another subscriber.
//!
//! Versions only grow, also across restarts: a new version is the larger of the last one + 1 and
//! the wall clock in milliseconds, and the last one is kept in `state_dir/version`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusty_shared::table::{Backend, Table};
use rusty_shared::TableError;
use tokio::sync::watch;

use crate::reconcile::ServiceState;

/// One published table, ready to send.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub backends: usize,
    pub json: String,
}

pub type Feed = watch::Receiver<Option<Arc<Published>>>;

/// The table the services describe now, without a version.
pub fn build(services: &[&ServiceState]) -> Table {
    let mut out = Vec::with_capacity(services.len());
    let mut desired = 0u64;
    for s in services {
        desired += u64::from(s.replicas);
        let mut svc = s.spec.route.clone();
        svc.backends = s
            .backends()
            .into_iter()
            .map(|(id, addr, w, p)| Backend::new(id, addr.to_string(), w, p))
            .collect();
        out.push(svc);
    }
    let mut table = Table::new(0, out);
    // Nothing is meant to run: let the data planes take an empty table. Otherwise an empty
    // table means "nothing is healthy right now", and the data planes keep their last one.
    table.allow_empty = desired == 0;
    table
}

pub struct Publisher {
    state_file: PathBuf,
    last_version: u64,
    /// The last published table with version 0, to tell real changes from no-ops.
    last_content: Option<Table>,
    tx: watch::Sender<Option<Arc<Published>>>,
}

impl Publisher {
    /// Reads the last version from `state_dir`.
    pub fn open(state_dir: &Path) -> std::io::Result<Publisher> {
        std::fs::create_dir_all(state_dir)?;
        let state_file = state_dir.join("version");
        let last_version = match std::fs::read_to_string(&state_file) {
            Ok(t) => t.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let (tx, _) = watch::channel(None);
        Ok(Publisher {
            state_file,
            last_version,
            last_content: None,
            tx,
        })
    }

    pub fn subscribe(&self) -> Feed {
        self.tx.subscribe()
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    pub fn current(&self) -> Option<Arc<Published>> {
        self.tx.borrow().clone()
    }

    /// Publish `table` if it differs from the last one. Returns the new version, if any.
    pub fn offer(&mut self, table: Table) -> Result<Option<u64>, PublishError> {
        if self.last_content.as_ref() == Some(&table) {
            return Ok(None);
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let version = (self.last_version + 1).max(now_ms);
        let mut versioned = table.clone();
        versioned.version = version;
        let valid = rusty_shared::validate(versioned.clone())?;
        // Ship the schedules we computed, so every data plane uses the agent's, not its own.
        for (svc, v) in versioned.services.iter_mut().zip(&valid.services) {
            svc.schedule = Some(v.tiers.iter().map(|t| t.schedule.clone()).collect());
        }
        let json = versioned.to_json();
        crate::state::write_atomic(&self.state_file, version.to_string().as_bytes())
            .map_err(PublishError::State)?;
        self.last_version = version;
        self.last_content = Some(table);
        let _ = self.tx.send_replace(Some(Arc::new(Published {
            version,
            backends: valid.backend_count,
            json,
        })));
        Ok(Some(version))
    }

    /// Drop the feed's senders' value so subscriber sessions end (shutdown).
    pub fn close(self) {
        drop(self.tx);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the computed table is invalid: {0}")]
    Invalid(#[from] TableError),
    #[error("cannot save the table version: {0}")]
    State(std::io::Error),
}
