//! Runtimes: where instances actually run. The core asks a runtime to start or stop an
//! instance and hears back through [`RuntimeEvent`]s when one exits on its own; everything
//! else about an instance (health, table membership, rollout) is the core's business.
//!
//! - [`process`]: local child processes, supervised and restarted with backoff.
//! - [`fixed`]: the `static` runtime, fixed addresses the agent only health-checks.
//!
//! - [`docker`]: containers through the Docker Engine API, plus discovery of labelled containers.
//! - [`swarm`]: one Swarm service per instance, placed by Swarm across its nodes.

pub mod docker;
pub mod fixed;
pub mod process;
pub mod swarm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::spec::InstanceRef;
use crate::spec::RunSpec;

/// What the runtime needs to start one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub instance: InstanceRef,
    pub generation: u64,
    pub run: Arc<RunSpec>,
}

/// What a runtime knows about one of its instances, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub addr: SocketAddr,
    /// OS process id, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// Things that happen to instances without the core asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// It stopped by itself (crash, exit); the runtime will try again after a backoff.
    Exited {
        instance: InstanceRef,
        detail: String,
    },
    /// It runs again after an exit.
    Restarted { instance: InstanceRef },
    /// It runs again after an exit, at a new address (a replacement container).
    Moved {
        instance: InstanceRef,
        addr: SocketAddr,
    },
    /// A container the agent did not start, labelled for `service`, is running.
    Discovered {
        service: String,
        container: String,
        addr: SocketAddr,
        weight: u32,
        priority: u32,
    },
    /// That container stopped or went away.
    Vanished { service: String, container: String },
}

/// An instance an earlier agent started that is still running.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub instance: InstanceRef,
    pub addr: SocketAddr,
    pub run: RunSpec,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("no free port for the instance: {0}")]
    Port(std::io::Error),
    #[error("every static address of {0} is already in use")]
    NoAddress(String),
    #[error("unknown instance {0}")]
    Unknown(String),
    #[error("{0}")]
    Docker(String),
}

/// The seam between the agent and whatever runs instances.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// Start one instance; returns the address the data planes reach it at.
    async fn start(&self, spec: InstanceSpec) -> Result<SocketAddr, RuntimeError>;

    /// Stop it: a polite signal, then a forced one after `grace`. Returns once it is gone.
    async fn stop(&self, instance: &InstanceRef, grace: Duration) -> Result<(), RuntimeError>;

    /// Every instance this runtime currently has.
    async fn list(&self) -> Vec<InstanceInfo>;

    /// Instances left running by an earlier agent, for the core to take over at start.
    async fn adopt(&self) -> Vec<Adopted> {
        Vec::new()
    }

    /// Should its instances be left running when the agent stops?
    fn keeps_instances_on_exit(&self) -> bool {
        false
    }
}
