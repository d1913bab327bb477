//! The one place a table gets installed: decode, validate, check against the installed table,
//! build the snapshot, swap it in, persist it.
//!
//! Every table source (file, agent, state dir) hands its bytes to [`TableStore::offer`]. A table
//! that fails any check changes nothing: the last good snapshot keeps serving, and the reason is
//! logged and counted. The request path only ever calls [`TableStore::current`]. Persisting is
//! off the install's path: one thread ([`TableStore::run_saver`]) writes the newest applied
//! table, so a slow or broken disk never holds back the next table.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rusty_shared::{check_succession, decode, validate, TableError};
use tracing::{debug, error, info, warn};

use crate::clock;
use crate::metrics::{Registry, StateEvent, UpdateResult};
use crate::queue::Queue;
use crate::snapshot::{self, Snapshot};
use crate::state_dir::StateDir;

/// How long the saver waits before it offers a refused table to the state dir again.
const SAVE_RETRY: Duration = Duration::from_secs(5);

/// What the saver has to do.
#[derive(Default)]
struct Unsaved {
    table: Option<(u64, Vec<u8>)>,
    /// The state dir refused `table` last time: wait [`SAVE_RETRY`] before the next try.
    refused: bool,
}

pub struct TableStore {
    current: ArcSwapOption<Snapshot>,
    registry: Arc<Registry>,
    /// Where the slots of capped addresses live across tables.
    queue: Arc<Queue>,
    state: Option<StateDir>,
    /// The newest applied table the state dir does not have yet, for the saver.
    unsaved: Mutex<Unsaved>,
    /// Wakes the saver for a newer table.
    to_save: Condvar,
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
            unsaved: Mutex::new(Unsaved::default()),
            to_save: Condvar::new(),
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
                self.save(version, bytes);
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

    /// Hand an applied table to the saver; one it has not started on yet is overtaken.
    fn save(&self, version: u64, bytes: &[u8]) {
        if self.state.is_none() {
            return;
        }
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        unsaved.table = Some((version, bytes.to_vec()));
        // A newer table is tried at once, not at the refused one's retry.
        unsaved.refused = false;
        self.to_save.notify_one();
    }

    /// The state dir's writer, for the life of the process (returns at once without a state
    /// dir): saves the newest applied table, skipping those overtaken while it wrote, and tries
    /// again every [`SAVE_RETRY`] while the state dir refuses one (full disk, read-only).
    pub fn run_saver(&self) {
        let Some(state) = &self.state else { return };
        let mut failing = false;
        loop {
            let (version, bytes) = {
                let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match (&unsaved.table, unsaved.refused) {
                        (Some(_), false) => break,
                        (None, _) => {
                            unsaved = self
                                .to_save
                                .wait(unsaved)
                                .unwrap_or_else(|p| p.into_inner())
                        }
                        (Some(_), true) => {
                            let (guard, waited) = self
                                .to_save
                                .wait_timeout(unsaved, SAVE_RETRY)
                                .unwrap_or_else(|p| p.into_inner());
                            unsaved = guard;
                            if waited.timed_out() {
                                unsaved.refused = false;
                            }
                        }
                    }
                }
                match unsaved.table.take() {
                    Some(t) => t,
                    None => continue,
                }
            };
            match state.save(&bytes) {
                Ok(()) if failing => {
                    failing = false;
                    info!(version, path = %state.path().display(), "table saved to the state dir after all");
                }
                Ok(()) => {}
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(version, path = %state.path().display(), error = %e,
                            "table applied but not saved to the state dir; retrying");
                    } else {
                        debug!(version, error = %e, "the state dir still refuses the table");
                    }
                    self.registry.count_state(StateEvent::SaveFailed);
                    let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
                    if unsaved.table.is_none() {
                        unsaved.table = Some((version, bytes));
                        unsaved.refused = true;
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rusty_shared::table::{Backend, Service, Table};

    fn table(version: u64) -> Vec<u8> {
        let backends = vec![Backend::new("web-a", "127.0.0.1:9001", 1, 0)];
        Table::new(version, vec![Service::new("web", backends)])
            .to_json()
            .into_bytes()
    }

    #[test]
    fn tables_apply_at_once_and_the_saver_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("rusty-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::open(&dir).unwrap();
        let file = state.path().to_owned();
        let store = Arc::new(TableStore::new(Arc::default(), Arc::default(), Some(state)));
        // No saver yet: installs do not wait for the disk.
        for v in 1..=50 {
            assert_eq!(store.offer(&table(v), "test").unwrap(), v);
        }
        assert!(!file.exists(), "nothing saved without the saver");
        let saver = store.clone();
        std::thread::spawn(move || saver.run_saver());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read(&file).ok() != Some(table(50)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the newest never saved"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The tables in between were overtaken: the one before the newest was never written.
        let previous = dir.join("table.prev.json");
        assert!(
            !previous.exists(),
            "only one save: {:?}",
            std::fs::read(&previous)
        );
        store.offer(&table(51), "test").unwrap();
        while std::fs::read(&file).ok() != Some(table(51)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the next one never saved"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(std::fs::read(&previous).unwrap(), table(50));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
