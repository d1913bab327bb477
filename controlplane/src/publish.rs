//! Tables out: turn the healthy instances into a versioned, validated table and hand it to every
//! subscriber through a `watch` channel.
//!
//! A `watch` holds only the newest value, which is exactly the coalescing the data planes need:
//! a subscriber that was busy while three tables were published reads the third and never sees
//! the first two, and no subscriber can hold up the agent or another subscriber.
//!
//! Versions only grow, also across restarts: a new version is the larger of the last one + 1 and
//! the wall clock in milliseconds. `state_dir/version` holds a version no table has reached
//! yet, [`VERSION_BLOCK`] ahead, written and synced only when a table reaches it: a publish does
//! not wait for the disk (a sync took 1–5 ms here, on the path from a decision to the data
//! planes), and a restarted agent starts above every version it may have sent.

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
pub fn build(services: &[&ServiceState], now: std::time::Instant) -> Table {
    let mut out = Vec::with_capacity(services.len());
    let mut desired = 0u64;
    for s in services {
        desired += u64::from(s.replicas);
        let mut svc = s.spec.route.clone();
        svc.backends = s
            .backends_at(now)
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

/// How far ahead of the versions sent the saved one is: about a minute of wall-clock versions,
/// so the file is written about once a minute under constant change.
pub const VERSION_BLOCK: u64 = 1 << 16;

pub struct Publisher {
    state_file: PathBuf,
    last_version: u64,
    /// The version saved in `state_file`: no table has one above it.
    reserved: u64,
    /// The last published table with version 0, to tell real changes from no-ops.
    last_content: Option<Table>,
    tx: watch::Sender<Option<Arc<Published>>>,
}

impl Publisher {
    /// Reads the last version from `state_dir`.
    pub fn open(state_dir: &Path) -> std::io::Result<Publisher> {
        std::fs::create_dir_all(state_dir)?;
        let state_file = state_dir.join("version");
        // A damaged file falls back to the version before it; with neither, the wall clock
        // still keeps versions growing (see `offer`).
        let last_version = crate::state::read_or_previous(&state_file, |b| {
            String::from_utf8_lossy(b)
                .trim()
                .parse::<u64>()
                .map_err(|e| format!("not a version: {e}"))
        })
        .unwrap_or(0);
        let (tx, _) = watch::channel(None);
        Ok(Publisher {
            state_file,
            last_version,
            reserved: last_version,
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
        if version > self.reserved {
            let reserve = version + VERSION_BLOCK;
            crate::state::write_atomic(&self.state_file, reserve.to_string().as_bytes())
                .map_err(PublishError::State)?;
            self.reserved = reserve;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rusty_shared::table::Service;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rusty-publish-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn table(weights: &[u32]) -> Table {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Backend::new(format!("web-{i}"), format!("127.0.0.1:{}", 9000 + i), *w, 0)
            })
            .collect();
        Table::new(0, vec![Service::new("web", backends)])
    }

    #[test]
    fn only_changes_make_versions_and_versions_grow_across_restarts() {
        let d = dir("versions");
        let mut p = Publisher::open(&d).unwrap();
        let v1 = p.offer(table(&[1, 1])).unwrap().expect("first table");
        assert_eq!(
            p.offer(table(&[1, 1])).unwrap(),
            None,
            "same table, no version"
        );
        let v2 = p.offer(table(&[1, 2])).unwrap().expect("weights changed");
        assert!(v2 > v1);
        drop(p);
        let mut again = Publisher::open(&d).unwrap();
        let v3 = again
            .offer(table(&[1, 2]))
            .unwrap()
            .expect("a restarted agent publishes");
        assert!(v3 > v2, "{v3} > {v2}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_saved_version_is_written_once_per_block_and_stays_ahead() {
        let d = dir("block");
        let saved = || -> u64 {
            std::fs::read_to_string(d.join("version"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let mut p = Publisher::open(&d).unwrap();
        let v1 = p.offer(table(&[1, 1])).unwrap().unwrap();
        assert_eq!(saved(), v1 + VERSION_BLOCK);
        let v2 = p.offer(table(&[1, 2])).unwrap().unwrap();
        assert_eq!(saved(), v1 + VERSION_BLOCK, "within the block: not written");
        assert!(v2 < saved());
        // A version past the block (the wall clock jumped) saves the next block first.
        p.last_version = v1 + VERSION_BLOCK;
        let v3 = p.offer(table(&[1, 3])).unwrap().unwrap();
        assert_eq!(saved(), v3 + VERSION_BLOCK);
        drop(p);
        let mut again = Publisher::open(&d).unwrap();
        let v4 = again.offer(table(&[1, 4])).unwrap().unwrap();
        assert!(
            v4 > v3 + VERSION_BLOCK - 1,
            "a restart starts above the block"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn published_tables_carry_schedules_the_data_plane_accepts() {
        let d = dir("schedule");
        let mut p = Publisher::open(&d).unwrap();
        p.offer(table(&[5, 3, 1])).unwrap();
        let published = p.current().unwrap();
        let decoded = rusty_shared::validate::decode(published.json.as_bytes()).unwrap();
        assert_eq!(
            decoded.services[0].schedule,
            Some(vec![vec![0, 1, 0, 2, 0, 1, 0, 1, 0]]),
            "nginx's 5/3/1 sequence"
        );
        rusty_shared::validate(decoded).expect("the data plane's validation accepts it");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_subscriber_that_was_away_sees_only_the_newest_table() {
        let d = dir("coalesce");
        let mut p = Publisher::open(&d).unwrap();
        let mut feed = p.subscribe();
        let mut last = 0;
        for w in 1..=20 {
            last = p.offer(table(&[1, w])).unwrap().unwrap();
        }
        assert!(feed.has_changed().unwrap());
        let seen = feed.borrow_and_update().clone().unwrap();
        assert_eq!(seen.version, last, "the newest, not the first of a backlog");
        assert!(!feed.has_changed().unwrap(), "and nothing queued behind it");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_empty_table_is_allowed_only_when_nothing_is_meant_to_run() {
        let spec = |replicas| crate::spec::ServiceSpec {
            name: "web".into(),
            route: Service::new("web", Vec::new()),
            runtime: crate::spec::RuntimeKind::Process,
            run: crate::spec::RunSpec {
                command: "x".into(),
                image: String::new(),
                args: vec![],
                env: Default::default(),
                weight: 1,
                priority: 0,
            },
            addresses: vec![],
            container: None,
            replicas,
            stop_grace: std::time::Duration::from_secs(1),
            slow_start: std::time::Duration::ZERO,
            health: crate::spec::HealthSpec {
                tls: None,
                probe: crate::spec::Probe::Tcp,
                interval: std::time::Duration::from_secs(1),
                timeout: std::time::Duration::from_secs(1),
                rise: 1,
                fall: 1,
            },
            rollout: crate::spec::RolloutPolicy {
                surge: 1,
                drain: std::time::Duration::from_secs(1),
                healthy_timeout: std::time::Duration::from_secs(5),
            },
            autoscale: None,
            outliers: None,
        };
        let down = ServiceState::new(spec(2));
        assert!(
            !build(&[&down], std::time::Instant::now()).allow_empty,
            "nothing healthy is not 'nothing wanted'"
        );
        let zero = ServiceState::new(spec(0));
        assert!(build(&[&zero], std::time::Instant::now()).allow_empty);
    }
}
