//! The agent's configuration file: TOML, read once at start (and by `rusty-agent check`).
//!
//! Loading has three steps, each with its own kind of error:
//! 1. parse the TOML text (syntax errors carry line and column);
//! 2. lay `[env.<name>]` over the base, table by table, if an environment was chosen;
//! 3. deserialize into the raw types below, which reject unknown keys, then [`validate`] them
//!    into the domain types of [`crate::spec`]. Every error names the key it is about, and
//!    validation reports all problems at once rather than the first.
//!
//! Services are a table keyed by name (`[services.web]`), not an array, so an overlay can change
//! one field of one service: `[env.development.services.web] replicas = 1`.

pub mod duration;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use duration::Dur;
pub use validate::validate;

use crate::spec::Config;

/// The whole file after the overlay, as written (defaults filled in).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<RawDocker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swarm: Option<RawSwarm>,
    #[serde(default)]
    pub services: BTreeMap<String, RawService>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
}

/// Certificates the agent hands its data planes' TLS listeners.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Certificate files: each a PEM chain (leaf first) and its key; the names they serve are
    /// those of the certificate's subjectAltName. Read at start and on SIGHUP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<RawCertificate>,
    /// Certificates ordered from an ACME CA (HTTP-01) for `hosts` and for the hosts of every
    /// service with `tls = "acme"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<RawAcme>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    /// The CA's directory URL (`https://`), e.g. Let's Encrypt's
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// `mailto:` addresses the CA may write to about the account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contact: Vec<String>,
    /// Names to order besides those of `tls = "acme"` services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// A PEM root the directory's own HTTPS is verified against instead of the system's (a
    /// test CA such as pebble).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Where a service's certificates come from, when not from `[[tls.certificates]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTls {
    /// Ordered from `[tls.acme]` for each of its hosts.
    Acme,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The pair's name in the data planes' metrics (default: the file name of `cert` without
    /// its extension); `default` answers names no other certificate covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The Docker engine, for `runtime = "docker"` services and label discovery.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocker {
    /// Engine address, `unix:///var/run/docker.sock` style; default: `DOCKER_HOST`, else that socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Containers labelled `rustybalancer.service=NAME` join that service's table while they run.
    #[serde(default)]
    pub discover: bool,
    /// Leave managed containers running when the agent stops, for the next agent to adopt. By
    /// default a stopping agent drains and removes them, so `compose down` leaves nothing behind.
    #[serde(default)]
    pub keep_on_exit: bool,
}

/// How `runtime = "swarm"` services are named and kept in the engine's Swarm.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSwarm {
    /// Prefix of the Swarm services the agent creates (`PREFIX-SERVICE-N`) and of its state
    /// service `PREFIX-state`; two agents on one swarm need different prefixes. Default `rb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The stack the agent runs in (`docker stack deploy ... NAME`): its services carry the
    /// stack's label, so `docker stack rm NAME` removes them with it. Default: the environment
    /// variable `RUSTY_SWARM_STACK` (stack.yaml sets it), else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// Where the admin API and the table WebSocket listen. Loopback unless you mean it.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where the agent keeps its state (the last table version, a generated token).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// File holding the bearer token; without it the agent generates one in `state_dir/token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Refuse to start without `token_file` (production: no generated tokens).
    #[serde(default)]
    pub require_token_file: bool,
    /// Log filter (tracing env-filter syntax); RUST_LOG overrides it.
    #[serde(default = "default_log")]
    pub log: String,
    /// The address process instances bind to and are reached at.
    #[serde(default = "default_instance_host")]
    pub instance_host: String,
    /// Admin listeners (`host:port`) of the data planes whose `/metrics` autoscaling reads.
    /// `tasks.SERVICE:PORT` (Swarm's DNS name for every task of a service) stands for every
    /// data plane of a global Swarm service, found again each scrape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_planes: Vec<String>,
    /// Bearer token for those `/metrics`, when the data planes guard them (off loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_plane_token_file: Option<PathBuf>,
    /// How often the data planes' load is read.
    #[serde(default = "default_scrape_interval")]
    pub scrape_interval: Dur,
    /// A second listener for the same endpoints over TLS (`wss://…/v1/tables`, `https://`):
    /// the one data planes on other machines use, so tokens and keys never cross a network in
    /// clear. Needs `tls_cert` and `tls_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

impl Default for RawAgent {
    fn default() -> Self {
        RawAgent {
            listen: default_listen(),
            state_dir: default_state_dir(),
            token_file: None,
            require_token_file: false,
            log: default_log(),
            instance_host: default_instance_host(),
            data_planes: Vec::new(),
            data_plane_token_file: None,
            scrape_interval: default_scrape_interval(),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeName {
    Process,
    Static,
    Docker,
    /// Each instance a Swarm service of one task, placed by Swarm across its nodes.
    Swarm,
    /// No instances of its own: only containers found by label discovery.
    Discovered,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// Host names this service answers (`*.example.com` allowed); empty means any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    #[serde(default = "default_runtime")]
    pub runtime: RuntimeName,
    /// `process`: the program; `{port}`, `{host}` and `{instance}` are replaced in `args`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `docker`, `swarm`: the image each instance runs (`args` replace its CMD when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `docker`, `swarm`: the port the container listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `docker`, `swarm`: the network containers join and are reached on (`swarm`: an overlay
    /// network the agent and the data planes are attached to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `swarm`: placement constraints of its tasks, as in `docker service create --constraint`
    /// (`node.role==worker`, `node.labels.zone==a`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// `static`: the fixed backend addresses (ip:port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// `process`: how many instances (default 1); `static`: the number of addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub priority: u32,
    /// How long an instance gets between SIGTERM and SIGKILL.
    #[serde(default = "default_stop_grace")]
    pub stop_grace: Dur,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overprovisioning: Option<f64>,
    /// How long a data plane stops using a backend whose connection failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eject: Option<Dur>,
    /// A new or recovered instance enters the table at a tenth of its weight and reaches it in
    /// ten steps over this long, so a cold instance is not flooded. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<Dur>,
    /// Request priority class under overload: `critical`, `normal` (default) or `bulk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<rusty_shared::RequestClass>,
    /// A request header whose value (`critical`, `normal`, `bulk`) overrides `class`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_header: Option<String>,
    /// Requests in flight per instance; more wait in the data plane's queue by class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<u32>,
    /// How long a request may wait in that queue before it gets 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<Dur>,
    /// Plain-HTTP requests get 308 to the same URL over HTTPS (its hosts must be covered by
    /// the `[tls]` certificates).
    #[serde(default)]
    pub https_redirect: bool,
    /// TLS to its instances: from the data planes and from the agent's health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<RawUpstreamTls>,
    /// What the data planes speak to its instances: `http1` (default), `h2c` (HTTP/2 with
    /// prior knowledge) or `h2` (HTTP/2 over TLS, with `upstream_tls`). gRPC needs `h2c` or `h2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_protocol: Option<rusty_shared::UpstreamProtocol>,
    /// `"acme"`: the agent orders a certificate for each of its hosts from `[tls.acme]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServiceTls>,
    /// `Strict-Transport-Security` on its HTTPS responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<RawHsts>,
    /// Replace an instance the data planes eject this many times within `ejection_window`
    /// (with `agent.data_planes` listed); 0 turns it off.
    #[serde(default = "default_replace_after_ejections")]
    pub replace_after_ejections: u32,
    #[serde(default = "default_ejection_window")]
    pub ejection_window: Dur,
    /// Scale between bounds by the load the data planes report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<RawAutoscale>,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub rollout: RawRollout,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    /// The name sent as SNI and verified in the instances' certificates (default: each
    /// instance's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM CA certificates the instances' chains must lead to (default: the system's roots),
    /// read by the agent and sent in the table, so data planes need no copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHsts {
    pub max_age: Dur,
    #[serde(default)]
    pub include_subdomains: bool,
    #[serde(default)]
    pub preload: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAutoscale {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Requests in flight per instance the service is sized for.
    pub target_inflight: f64,
    /// How long the load must stay over the target before scaling out.
    #[serde(default = "default_autoscale_window")]
    pub window: Dur,
    /// How long it must stay under half the target, and since the last decision, before
    /// scaling in.
    #[serde(default = "default_autoscale_cooldown")]
    pub cooldown: Dur,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Http,
    Tcp,
    Grpc,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// `http`: GET `path`, any 2xx or 3xx passes; `tcp`: a connection that opens passes;
    /// `grpc`: the standard `grpc.health.v1.Health/Check` over HTTP/2 (h2c, or h2 with
    /// `upstream_tls`), `SERVING` passes.
    #[serde(default = "default_check")]
    pub kind: CheckKind,
    #[serde(default = "default_health_path")]
    pub path: String,
    /// For `grpc`: the service asked about (`HealthCheckRequest.service`; empty: the server).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub grpc_service: String,
    #[serde(default = "default_interval")]
    pub interval: Dur,
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
    /// Passing checks in a row before an instance enters the table.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failing checks in a row before it leaves the table.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            kind: default_check(),
            path: default_health_path(),
            grpc_service: String::new(),
            interval: default_interval(),
            timeout: default_check_timeout(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// New instances started at once above `replicas` during a deploy.
    #[serde(default = "default_surge")]
    pub surge: u32,
    /// Time between taking an instance out of the table and stopping it.
    #[serde(default = "default_drain")]
    pub drain: Dur,
    /// A new instance that is not healthy this long after it started fails the deploy.
    #[serde(default = "default_healthy_timeout")]
    pub healthy_timeout: Dur,
}

impl Default for RawRollout {
    fn default() -> Self {
        RawRollout {
            surge: default_surge(),
            drain: default_drain(),
            healthy_timeout: default_healthy_timeout(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:7070".into()
}
fn default_state_dir() -> PathBuf {
    ".rusty/agent".into()
}
fn default_log() -> String {
    "info".into()
}
fn default_instance_host() -> String {
    "127.0.0.1".into()
}
fn default_path_prefix() -> String {
    "/".into()
}
fn default_runtime() -> RuntimeName {
    RuntimeName::Process
}
fn default_weight() -> u32 {
    1
}
fn default_replace_after_ejections() -> u32 {
    3
}
fn default_ejection_window() -> Dur {
    Dur::ms(30_000)
}
fn default_scrape_interval() -> Dur {
    Dur::ms(1_000)
}
fn default_autoscale_window() -> Dur {
    Dur::ms(3_000)
}
fn default_autoscale_cooldown() -> Dur {
    Dur::ms(30_000)
}
fn default_stop_grace() -> Dur {
    Dur::ms(5_000)
}
fn default_check() -> CheckKind {
    CheckKind::Http
}
fn default_health_path() -> String {
    "/healthz".into()
}
fn default_interval() -> Dur {
    Dur::ms(1_000)
}
fn default_check_timeout() -> Dur {
    Dur::ms(1_000)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_surge() -> u32 {
    1
}
fn default_drain() -> Dur {
    Dur::ms(2_000)
}
fn default_healthy_timeout() -> Dur {
    Dur::ms(30_000)
}

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// Dotted path of the key, e.g. `services.web.health.rise`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a config could not be loaded. Displayed one problem per line, each starting with the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: not valid TOML: {message}")]
    Syntax { file: String, message: String },
    #[error(
        "{file}: --env {env}: there is no [env.{env}] table (environments in this file: {known})"
    )]
    NoSuchEnv {
        file: String,
        env: String,
        known: String,
    },
    #[error("{}", .errors.iter().map(|e| format!("{}: {e}", .file)).collect::<Vec<_>>().join("\n"))]
    Invalid { file: String, errors: Vec<KeyError> },
}

/// A loaded config: the effective raw form (for `check` to print) and the validated domain form.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub raw: RawConfig,
    pub config: Config,
    /// Environments the file defines, for `check` to validate them all.
    pub environments: Vec<String>,
}

/// Read, overlay and validate `path`.
pub fn load(path: &Path, env: Option<&str>) -> Result<Loaded, LoadError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        file: file.clone(),
        source,
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
    load_str(&text, &file, &base_dir, env)
}

/// [`load`] for text already in memory; `base_dir` resolves relative command paths.
pub fn load_str(
    text: &str,
    file: &str,
    base_dir: &Path,
    env: Option<&str>,
) -> Result<Loaded, LoadError> {
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| LoadError::Syntax {
        file: file.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })?;
    let envs = match doc.remove("env") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => {
            return Err(invalid(
                file,
                "env",
                "must be a table of environments, e.g. [env.production]",
            ));
        }
    };
    let environments: Vec<String> = envs.keys().cloned().collect();
    if let Some(name) = env {
        match envs.get(name) {
            Some(toml::Value::Table(overlay)) => merge(&mut doc, overlay),
            Some(_) => return Err(invalid(file, &format!("env.{name}"), "must be a table")),
            None => {
                return Err(LoadError::NoSuchEnv {
                    file: file.to_owned(),
                    env: name.to_owned(),
                    known: if environments.is_empty() {
                        "none".to_owned()
                    } else {
                        environments.join(", ")
                    },
                })
            }
        }
    }
    let raw: RawConfig =
        serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".to_owned()
            } else {
                key
            };
            // toml's own message may end with "in `key`"; the path says that already.
            let message = e.into_inner().to_string();
            let message = message
                .split("\nin `")
                .next()
                .unwrap_or_default()
                .to_owned();
            invalid(file, &key, &message)
        })?;
    let config = validate(&raw, base_dir).map_err(|errors| LoadError::Invalid {
        file: file.to_owned(),
        errors,
    })?;
    Ok(Loaded {
        raw,
        config,
        environments,
    })
}

fn invalid(file: &str, key: &str, message: &str) -> LoadError {
    LoadError::Invalid {
        file: file.to_owned(),
        errors: vec![KeyError {
            key: key.to_owned(),
            message: message.trim().to_owned(),
        }],
    }
}

/// Lay `overlay` over `base`: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Table, overlay: &toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The effective configuration as TOML, for `rusty-agent check`.
pub fn render(raw: &RawConfig) -> String {
    toml::to_string_pretty(raw).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests;
