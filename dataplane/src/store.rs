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
use tracing::{debug, error, info, warn};

use crate::clock;
use crate::metrics::{Registry, StateEvent, UpdateResult};
use crate::queue::Queue;
use crate::snapshot::{self, Snapshot};
use crate::state_dir::StateDir;

pub struct TableStore {
    current: ArcSwapOption<Snapshot>,
    registry: Arc<Registry>,
    /// Where the slots of capped addresses live across tables.
    queue: Arc<Queue>,
    state: Option<StateDir>,
    /// An applied table the state dir could not take yet (full disk, read-only): saved by
    /// [`TableStore::retry_save`] or with the next table.
    unsaved: Mutex<Option<(u64, Vec<u8>)>>,
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
            unsaved: Mutex::new(None),
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
                // In memory first: a state dir that cannot take it never holds a table back.
                self.current.store(Some(Arc::new(snapshot)));
                self.save(version, bytes, origin);
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
                match self.current.load().as_ref() {
                    Some(s) => warn!(%origin, reason = %e, installed = s.version,
                        "table rejected; the installed table keeps serving"),
                    None => warn!(%origin, reason = %e,
                        "table rejected; no table is installed yet (requests get 503)"),
                }
                Err(e)
            }
        }
    }

    fn save(&self, version: u64, bytes: &[u8], origin: &str) {
        let Some(state) = &self.state else { return };
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        match state.save(bytes) {
            Ok(()) => *unsaved = None,
            Err(e) => {
                self.registry.count_state(StateEvent::SaveFailed);
                warn!(%origin, version, path = %state.path().display(), error = %e,
                    "table applied but not saved to the state dir; retrying");
                *unsaved = Some((version, bytes.to_vec()));
            }
        }
    }

    /// Save the applied table the state dir refused earlier, if any. Returns whether one is
    /// still waiting.
    pub fn retry_save(&self) -> bool {
        let Some(state) = &self.state else {
            return false;
        };
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        let Some((version, bytes)) = unsaved.as_ref() else {
            return false;
        };
        match state.save(bytes) {
            Ok(()) => {
                info!(version, path = %state.path().display(), "table saved to the state dir after all");
                *unsaved = None;
                false
            }
            Err(e) => {
                self.registry.count_state(StateEvent::SaveFailed);
                debug!(version, error = %e, "the state dir still refuses the table");
                true
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

    /// Load the last applied table from the state dir, before any listener accepts: the saved
    /// one, or when that is unusable (unreadable, truncated, invalid) the one before it, saying
    /// which and why.
    pub fn restore(&self) -> Option<u64> {
        let state = self.state.as_ref()?;
        let _one_at_a_time = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        let mut problems = Vec::new();
        let events = [StateEvent::Restored, StateEvent::RestoredPrevious];
        for ((path, read), event) in state.saved().into_iter().zip(events) {
            let bytes = match read {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) => {
                    self.registry.count_state(StateEvent::Unusable);
                    problems.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            match self.try_install(&bytes) {
                Ok(snapshot) => {
                    let version = snapshot.version;
                    self.current.store(Some(Arc::new(snapshot)));
                    self.registry.count_state(event);
                    if event == StateEvent::RestoredPrevious {
                        warn!(path = %path.display(), version, problems = ?problems,
                            "the saved table is unusable; restored the one before it");
                        // Over the damaged file, keeping this good one as the previous too.
                        if let Err(e) = state.save_over(&bytes) {
                            warn!(error = %e, "cannot repair the state dir's table file");
                        }
                    } else {
                        info!(path = %path.display(), version, "table restored from the state dir");
                    }
                    return Some(version);
                }
                Err(e) => {
                    self.registry.count_state(StateEvent::Unusable);
                    problems.push(format!("{}: {e}", path.display()));
                }
            }
        }
        if !problems.is_empty() {
            error!(problems = ?problems,
                "no saved table could be restored; no table is installed (requests get 503) until a source delivers one");
        }
        None
    }

    pub fn state_path(&self) -> Option<PathBuf> {
        self.state.as_ref().map(|s| s.path().to_owned())
    }
}
