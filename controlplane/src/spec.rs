//! The agent's domain types: a validated configuration. Everything downstream of
//! [`crate::config::validate`] trusts these values and never re-checks them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentSettings,
    pub docker: Option<DockerSettings>,
    pub swarm: SwarmSettings,
    pub services: Vec<ServiceSpec>,
    /// Certificate files for the data planes, checked when the config was read.
    pub certificates: Vec<CertFile>,
    /// Certificates ordered from an ACME CA.
    pub acme: Option<AcmeSettings>,
}

/// `[tls.acme]`, checked: an `https://` directory, `mailto:` contacts, DNS names (no wildcard:
/// HTTP-01 cannot prove one), each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    pub directory: String,
    pub contact: Vec<String>,
    pub hosts: Vec<String>,
    pub ca_file: Option<PathBuf>,
}

/// One certificate pair the agent reads and sends to its data planes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFile {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// `None`: `DOCKER_HOST`, else the default socket.
    pub host: Option<String>,
    pub discover: bool,
    pub keep_on_exit: bool,
}

/// Names of what the swarm runtime creates (see `config::RawSwarm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmSettings {
    pub prefix: String,
    pub stack: Option<String>,
}

impl Default for SwarmSettings {
    fn default() -> Self {
        SwarmSettings {
            prefix: "rb".to_owned(),
            stack: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub token_file: Option<PathBuf>,
    pub log: String,
    pub instance_host: IpAddr,
    /// Data planes' admin listeners (`host:port`) whose load autoscaling reads.
    pub data_planes: Vec<String>,
    pub data_plane_token_file: Option<PathBuf>,
    pub scrape_interval: Duration,
    /// The TLS listener, with the agent's own certificate (checked when the config was read).
    pub tls: Option<AgentTls>,
}

#[derive(Debug, Clone)]
pub struct AgentTls {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Process,
    Static,
    Docker,
    Swarm,
    Discovered,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Static => "static",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Swarm => "swarm",
            RuntimeKind::Discovered => "discovered",
        }
    }

    /// Does the agent start and stop its instances (so it can scale, deploy and replace them)?
    pub fn starts_instances(self) -> bool {
        matches!(
            self,
            RuntimeKind::Process | RuntimeKind::Docker | RuntimeKind::Swarm
        )
    }

    /// Does it run images (`image`, `port`, `network`)?
    pub fn runs_images(self) -> bool {
        matches!(self, RuntimeKind::Docker | RuntimeKind::Swarm)
    }
}

/// What one version of a service runs: everything a deploy may change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// `process`: the program. Empty for other runtimes.
    pub command: String,
    /// `docker`, `swarm`: the image. Empty for other runtimes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub weight: u32,
    pub priority: u32,
}

/// How instances are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Http {
        path: String,
    },
    Tcp,
    /// `grpc.health.v1.Health/Check` for `service` (empty: the server as a whole).
    Grpc {
        service: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// The service's backends speak TLS (`upstream_tls`): checks do too, verified the same way.
    pub tls: Option<ProbeTls>,
}

/// How a check verifies a TLS backend: the name (default: the address) and the CA (default:
/// the system's roots), as the data planes will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTls {
    pub server_name: Option<String>,
    pub ca_pem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutPolicy {
    pub surge: u32,
    pub drain: Duration,
    pub healthy_timeout: Duration,
}

/// The route and proxy settings of a service as they go into every table, backends left empty.
pub type RouteTemplate = rusty_shared::table::Service;

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub route: RouteTemplate,
    pub runtime: RuntimeKind,
    pub run: RunSpec,
    /// `static` only: the fixed backend addresses.
    pub addresses: Vec<SocketAddr>,
    /// `docker`, `swarm`: where containers listen and which network they join.
    pub container: Option<ContainerPlacement>,
    pub replicas: u32,
    pub stop_grace: Duration,
    /// Zero: off. Otherwise the ramp from a tenth of the weight to all of it.
    pub slow_start: Duration,
    pub health: HealthSpec,
    pub rollout: RolloutPolicy,
    pub autoscale: Option<AutoscaleSpec>,
    /// Replace instances the data planes keep ejecting; `None`: off.
    pub outliers: Option<OutlierSpec>,
}

/// Most instances one service may ask for.
pub const MAX_REPLICAS: u32 = 1_000;

/// Slow start raises an instance's weight in this many steps; weights in the table are then
/// multiplied by it, so a weight can be at most 1000 / SLOW_START_STEPS.
pub const SLOW_START_STEPS: u32 = 10;

/// The largest weight a service may give its instances: the table's limit, divided by the
/// slow-start scaling when slow start is on.
pub fn max_weight(slow_start: bool) -> u32 {
    if slow_start {
        rusty_shared::limits::WEIGHT_MAX / SLOW_START_STEPS
    } else {
        rusty_shared::limits::WEIGHT_MAX
    }
}

/// Where a service's containers listen and are reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlacement {
    pub port: u16,
    pub network: String,
    /// `swarm`: placement constraints of its tasks (empty for `docker`).
    pub constraints: Vec<String>,
}

/// Names one instance: `web-7` is instance 7 of service `web`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceRef {
    pub service: String,
    pub seq: u64,
}

impl fmt::Display for InstanceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.service, self.seq)
    }
}

/// A service's autoscaling settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleSpec {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Requests in flight per instance the service is sized for.
    pub target_inflight: f64,
    pub window: Duration,
    pub cooldown: Duration,
}

/// A service's outlier settings, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSpec {
    /// Ejection episodes that make an outlier; at least 2.
    pub ejections: u32,
    pub window: Duration,
}
