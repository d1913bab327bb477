//! The admin API's JSON: what the agent answers and what the CLI reads, in one place so the two
//! cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Version of the last published table, if one was published.
    pub table_version: Option<u64>,
    pub subscribers: usize,
    pub services: Vec<ServiceStatus>,
    /// Certificates ordered over ACME, one per name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acme: Vec<AcmeStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeStatus {
    pub host: String,
    /// `waiting` (no certificate yet), `ordering`, `valid` or `failed` (the last order failed;
    /// a certificate already issued keeps serving).
    pub state: String,
    /// Validity of the certificate serving now, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    /// When the next order starts, unix seconds: renewal at two thirds of the lifetime, or the
    /// retry after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_order_at: Option<i64>,
    /// Orders failed in a row.
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub runtime: String,
    pub generation: u64,
    /// Desired instances.
    pub replicas: u32,
    /// Instances started or running (not leaving).
    pub live: usize,
    /// Instances in the table.
    pub healthy: usize,
    pub command: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    pub args: Vec<String>,
    pub deploy: Option<DeployStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleStatus>,
    /// The last instance replaced for being ejected by the data planes again and again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_replaced: Option<String>,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub target_inflight: f64,
    /// Requests in flight over all data planes at the last sample, if any was taken.
    pub load: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<AutoscaleDecision>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoscaleDecision {
    pub from: u32,
    pub to: u32,
    pub reason: String,
    pub ago_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployStatus {
    pub generation: u64,
    pub from: u64,
    /// `in_progress`, `succeeded` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Time from the deploy request to its outcome (or until now).
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: String,
    pub generation: u64,
    pub addr: Option<String>,
    /// `starting`, `running`, `draining` or `stopping`.
    pub phase: String,
    pub healthy: bool,
    pub in_table: bool,
    pub restarts: u32,
    /// False for containers found by label discovery.
    pub managed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub replicas: u32,
}

/// A new version: what is given replaces the current value, what is left out is kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// `docker` services: the new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployAccepted {
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
