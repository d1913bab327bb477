//! The one place a table gets installed: decode, validate, check against the installed table,
//! build the snapshot, swap it in, persist it.
//!
//! Every table source (file, agent, state dir) hands its bytes to [`TableStore::offer`]. A table
//! that fails any check changes nothing: the last good snapshot keeps serving, and the reason is
//! logged and counted. The request path only ever calls [`TableStore::current`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use rusty_shared::{check_succession, decode, validate, TableError};
use tracing::{debug, info, warn};

use crate::clock;
use crate::metrics::{Registry, UpdateResult};
use crate::queue::Queue;
use crate::snapshot::{self, Snapshot};
use crate::state_dir::StateDir;

pub struct TableStore {
    current: ArcSwapOption<Snapshot>,
    registry: Arc<Registry>,
    /// Where the slots of capped addresses live across tables.
    queue: Arc<Queue>,
    state: Option<StateDir>,
    /// Serializes installs from concurrent sources (never taken on the request path).
    installing: Mutex<()>,
}

impl TableStore {
    pub fn new(registry: Arc<Registry>, queue: Arc<Queue>, state: Option<StateDir>) -> Self {
        TableStore {
            current: ArcSwapOption::empty(),
            registry,
            queue,
            state,
            installing: Mutex::new(()),
        }
    }

    /// The installed snapshot, if any. One atomic load and refcount increment.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Install `bytes` if it is a valid table newer than the installed one. Returns the new
    /// version. `origin` names the source in logs ("file /etc/lb.json", "agent", "state dir").
    pub fn offer(&self, bytes: &[u8], origin: &str) -> Result<u64, TableError> {
        let _one_at_a_time = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        match self.try_install(bytes) {
            Ok(snapshot) => {
                let version = snapshot.version;
                let backends = snapshot.backend_count;
                let services = snapshot.services.len();
                if let Some(state) = &self.state {
                    if let Err(e) = state.save(bytes) {
                        warn!(%origin, version, error = %e,
                            "table applied but not saved to the state dir");
                    }
                }
                self.current.store(Some(Arc::new(snapshot)));
                self.registry.count_update(UpdateResult::Applied);
                info!(%origin, version, services, backends, "table applied");
                Ok(version)
            }
            Err(e) if e.is_stale() => {
                self.registry.count_update(UpdateResult::Stale);
                debug!(%origin, reason = %e, "table ignored");
                Err(e)
            }
            Err(e) => {
                self.registry.count_update(UpdateResult::Rejected);
                warn!(%origin, reason = %e, "table rejected; the installed table keeps serving");
                Err(e)
            }
        }
    }

    fn try_install(&self, bytes: &[u8]) -> Result<Snapshot, TableError> {
        let valid = validate(decode(bytes)?)?;
        let installed = self
            .current
            .load()
            .as_ref()
            .map(|s| (s.version, s.backend_count));
        check_succession(installed, &valid)?;
        let previous = self.current.load_full();
        // The one place an install reads the clock: carried ejections are judged against it.
        let now = clock::now_ms();
        let cas = snapshot::upstream_cas(&valid)?;
        let limiters = self.queue.limiters_for(&snapshot::caps(&valid), now);
        Ok(Snapshot::build(
            valid,
            &self.registry,
            &limiters,
            &cas,
            previous.as_deref(),
            now,
        ))
    }

    /// Load the last applied table from the state dir, before any listener accepts.
    pub fn restore(&self) -> Option<u64> {
        let state = self.state.as_ref()?;
        match state.load() {
            Ok(Some(bytes)) => self
                .offer(&bytes, &format!("state dir {}", state.path().display()))
                .ok(),
            Ok(None) => None,
            Err(e) => {
                warn!(path = %state.path().display(), error = %e, "cannot read the saved table");
                None
            }
        }
    }

    pub fn state_path(&self) -> Option<PathBuf> {
        self.state.as_ref().map(|s| s.path().to_owned())
    }
}
