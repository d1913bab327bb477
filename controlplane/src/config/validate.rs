//! Raw config → [`Config`]: every rule a config must meet, each failure tied to its key.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use rusty_shared::limits;
use rusty_shared::table::{Backend, Service, Table};

use super::{CheckKind, KeyError, RawConfig, RawService, RuntimeName};
use crate::spec::{
    max_weight, AcmeSettings, AgentSettings, Config, ContainerPlacement, DockerSettings,
    HealthSpec, Probe, RolloutPolicy, RunSpec, RuntimeKind, ServiceSpec, SwarmSettings,
    MAX_REPLICAS, SLOW_START_STEPS,
};

struct Errors(Vec<KeyError>);

impl Errors {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(KeyError {
            key: key.into(),
            message: message.into(),
        });
    }
}

/// `[swarm]`: names that become parts of Swarm service names, so only lowercase letters, digits
/// and dashes (Swarm's own rule for names is looser; a strict one keeps `PREFIX-SERVICE-N` valid).
fn swarm_settings(raw: Option<&super::RawSwarm>, errs: &mut Errors) -> SwarmSettings {
    let mut settings = SwarmSettings::default();
    let Some(raw) = raw else {
        return settings;
    };
    let valid = |v: &str| {
        (1..=32).contains(&v.len())
            && v.starts_with(|c: char| c.is_ascii_lowercase())
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    for (field, value) in [("swarm.prefix", &raw.prefix), ("swarm.stack", &raw.stack)] {
        if let Some(v) = value {
            if !valid(v) {
                errs.add(field, format!("{v:?}: 1 to 32 lowercase letters, digits and dashes, starting with a letter"));
            }
        }
    }
    if let Some(p) = &raw.prefix {
        settings.prefix = p.clone();
    }
    settings.stack = raw.stack.clone();
    settings
}

/// Check everything and return the domain config, or every problem found.
pub fn validate(raw: &RawConfig, base_dir: &Path) -> Result<Config, Vec<KeyError>> {
    let mut errs = Errors(Vec::new());
    let a = &raw.agent;
    let listen = a
        .listen
        .parse::<SocketAddr>()
        .map_err(|_| {
            errs.add(
                "agent.listen",
                format!("{:?} is not an ip:port address", a.listen),
            )
        })
        .ok();
    let instance_host = a
        .instance_host
        .parse::<IpAddr>()
        .map_err(|_| {
            errs.add(
                "agent.instance_host",
                format!("{:?} is not an IP address", a.instance_host),
            )
        })
        .ok();
    if a.require_token_file && a.token_file.is_none() {
        errs.add(
            "agent.token_file",
            "required here (agent.require_token_file = true): name a file holding the token",
        );
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&a.log) {
        errs.add("agent.log", format!("{:?} is not a log filter: {e}", a.log));
    }
    if raw.services.is_empty() {
        errs.add(
            "services",
            "no service is defined: add at least one [services.<name>]",
        );
    }
    for (i, plane) in a.data_planes.iter().enumerate() {
        if a.data_planes[..i].contains(plane) {
            errs.add(
                format!("agent.data_planes[{i}]"),
                format!("{plane:?} is listed twice: its load would count twice"),
            );
        }
        let port_ok = !plane.contains('/')
            && plane.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !port_ok {
            errs.add(
                format!("agent.data_planes[{i}]"),
                format!("{plane:?} is not host:port (a data plane's --admin address)"),
            );
        }
    }
    let tls = agent_tls(a, base_dir, &mut errs);
    if a.scrape_interval.0 < std::time::Duration::from_millis(100) {
        errs.add("agent.scrape_interval", "must be at least 100ms");
    }
    let autoscaled = raw.services.iter().find(|(_, s)| s.autoscale.is_some());
    if let (Some((first, _)), true) = (autoscaled, a.data_planes.is_empty()) {
        errs.add(
            "agent.data_planes",
            format!("services.{first}.autoscale needs the load of at least one data plane: list their admin addresses, e.g. [\"127.0.0.1:9100\"]"),
        );
    }
    let mut services = Vec::new();
    for (name, s) in &raw.services {
        if let Some(spec) = service(name, s, base_dir, &mut errs) {
            services.push(spec);
        }
    }
    // Timings that depend on how often the data planes are read, or on how long they eject.
    for spec in &services {
        let key = |k: &str| format!("services.{}.{k}", spec.name);
        if let Some(auto) = &spec.autoscale {
            for (field, d) in [
                ("autoscale.window", auto.window),
                ("autoscale.cooldown", auto.cooldown),
            ] {
                if d < a.scrape_interval.0 {
                    errs.add(
                        key(field),
                        format!("{d:?} is shorter than agent.scrape_interval ({}): it would act on a single sample", a.scrape_interval),
                    );
                }
            }
        }
        if let Some(o) = &spec.outliers {
            let eject = std::time::Duration::from_millis(spec.route.eject_ms);
            let needed = eject * (o.ejections - 1);
            if o.window <= needed {
                errs.add(
                    key("ejection_window"),
                    format!(
                        "{:?} cannot hold {} ejections of {eject:?} each (eject): make it longer than {needed:?}, or eject shorter",
                        o.window, o.ejections
                    ),
                );
            }
        }
    }
    if errs.0.is_empty() {
        check_routes(&services, &mut errs);
    }
    let acme = acme(raw, base_dir, &mut errs);
    let acme_hosts = acme.as_ref().map_or(&[][..], |a| &a.hosts);
    let certificates = certificates(raw.tls.as_ref(), base_dir, &services, acme_hosts, &mut errs);
    if let Some(host) = raw.docker.as_ref().and_then(|d| d.host.as_deref()) {
        if !host.starts_with("unix://")
            && !host.starts_with("tcp://")
            && !host.starts_with("http://")
        {
            errs.add(
                "docker.host",
                format!("{host:?}: write unix:///path/to/docker.sock or tcp://host:port"),
            );
        }
    }
    let swarm = swarm_settings(raw.swarm.as_ref(), &mut errs);
    match (listen, instance_host) {
        (Some(listen), Some(instance_host)) if errs.0.is_empty() => Ok(Config {
            agent: AgentSettings {
                listen,
                state_dir: base_dir_join(base_dir, &a.state_dir),
                token_file: a.token_file.as_ref().map(|f| base_dir_join(base_dir, f)),
                log: a.log.clone(),
                instance_host,
                data_planes: a.data_planes.clone(),
                data_plane_token_file: a
                    .data_plane_token_file
                    .as_ref()
                    .map(|f| base_dir_join(base_dir, f)),
                scrape_interval: a.scrape_interval.0,
                tls,
            },
            docker: raw.docker.as_ref().map(|d| DockerSettings {
                host: d.host.clone(),
                discover: d.discover,
                keep_on_exit: d.keep_on_exit,
            }),
            swarm,
            services,
            certificates,
            acme,
        }),
        _ => Err(errs.0),
    }
}

/// The agent's own TLS listener: an address, and a pair that loads (checked now).
fn agent_tls(
    a: &super::RawAgent,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<crate::spec::AgentTls> {
    let (listen, cert, key) = match (&a.tls_listen, &a.tls_cert, &a.tls_key) {
        (None, None, None) => return None,
        (Some(l), Some(c), Some(k)) => (l, base_dir_join(base_dir, c), base_dir_join(base_dir, k)),
        _ => {
            errs.add(
                "agent.tls_listen",
                "give tls_listen, tls_cert and tls_key together (the TLS listener and its certificate)",
            );
            return None;
        }
    };
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        errs.add(
            "agent.tls_listen",
            format!("{listen:?} is not an ip:port address"),
        );
        return None;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let provider = rustls::crypto::ring::default_provider();
    let loaded = rusty_shared::certs::read_capped(&cert).and_then(|c| {
        let k = rusty_shared::certs::read_capped(&key)?;
        rusty_shared::certs::load_pair("agent", (&cert, &c), (&key, &k), &provider, now)
    });
    match loaded {
        Ok(_) => Some(crate::spec::AgentTls { listen, cert, key }),
        Err(e) => {
            errs.add("agent.tls_cert", e.to_string());
            None
        }
    }
}

/// The `[tls]` certificates: each readable, its key matching, not expired (checked now, with
/// the same code the data planes run), names unique; and every host of a service that
/// redirects to HTTPS covered by one of them.
fn certificates(
    tls: Option<&super::RawTls>,
    base_dir: &Path,
    services: &[ServiceSpec],
    acme_hosts: &[String],
    errs: &mut Errors,
) -> Vec<crate::spec::CertFile> {
    use rusty_shared::certs::{load_pair, read_capped};
    use rusty_shared::hostnames::Names;
    let provider = rustls::crypto::ring::default_provider();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut files = Vec::new();
    let mut covered: Vec<(Names, bool)> = Vec::new();
    for (i, c) in tls.map_or(&[][..], |t| &t.certificates).iter().enumerate() {
        let key = format!("tls.certificates[{i}]");
        let cert = base_dir_join(base_dir, &c.cert);
        let key_file = base_dir_join(base_dir, &c.key);
        let name = c.name.clone().unwrap_or_else(|| {
            cert.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !name_ok {
            errs.add(
                format!("{key}.name"),
                format!("{name:?}: 1 to 128 of A-Z a-z 0-9 - _ . :"),
            );
            continue;
        }
        if files.iter().any(|f: &crate::spec::CertFile| f.name == name) {
            errs.add(
                format!("{key}.name"),
                format!("{name:?} is used twice: name one of them"),
            );
            continue;
        }
        let loaded = read_capped(&cert).and_then(|crt_pem| {
            let key_pem = read_capped(&key_file)?;
            load_pair(
                &name,
                (&cert, &crt_pem),
                (&key_file, &key_pem),
                &provider,
                now,
            )
        });
        match loaded {
            Ok(pair) => {
                covered.push((
                    Names::new(pair.dns, pair.ips),
                    pair.name == rusty_shared::certs::DEFAULT_PAIR,
                ));
                files.push(crate::spec::CertFile {
                    name,
                    cert,
                    key: key_file,
                });
            }
            Err(e) => errs.add(key, e.to_string()),
        }
    }
    for s in services.iter().filter(|s| s.route.https_redirect) {
        let key = format!("services.{}.https_redirect", s.name);
        if s.route.hosts.is_empty() && !covered.iter().any(|(_, default)| *default) {
            errs.add(
                key.clone(),
                "the service answers any host: give [tls] a certificate named \"default\", or list its hosts",
            );
        }
        for host in &s.route.hosts {
            let host = host.to_ascii_lowercase();
            if !covered.iter().any(|(names, _)| names.covers_name(&host))
                && !acme_hosts.contains(&host)
            {
                errs.add(
                    key.clone(),
                    format!("host {host:?} is covered by no [tls] certificate: clients redirected to HTTPS would be refused"),
                );
            }
        }
    }
    files
}

/// `[tls.acme]` and the services with `tls = "acme"`: the names to order, each a DNS name
/// the CA can reach over HTTP-01.
fn acme(raw: &RawConfig, base_dir: &Path, errs: &mut Errors) -> Option<AcmeSettings> {
    let settings = raw.tls.as_ref().and_then(|t| t.acme.as_ref());
    let mut hosts: Vec<String> = Vec::new();
    let mut add = |key: String, host: &str, errs: &mut Errors| {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match acme_name_problem(&host) {
            Some(why) => errs.add(key, format!("{host:?}: {why}")),
            None if !hosts.contains(&host) => hosts.push(host),
            None => {}
        }
    };
    for (name, s) in raw.services.iter().filter(|(_, s)| s.tls.is_some()) {
        let key = format!("services.{name}.tls");
        if settings.is_none() {
            errs.add(
                key.clone(),
                "\"acme\" needs [tls.acme] (directory, contact)",
            );
        }
        if s.hosts.is_empty() {
            errs.add(
                key.clone(),
                "the service answers any host: list its hosts, certificates are ordered per name",
            );
        }
        for h in &s.hosts {
            add(key.clone(), h, errs);
        }
    }
    let a = settings?;
    for (i, h) in a.hosts.iter().enumerate() {
        add(format!("tls.acme.hosts[{i}]"), h, errs);
    }
    if hosts.is_empty() {
        errs.add(
            "tls.acme.hosts",
            "no name to order: list hosts, or set tls = \"acme\" on a service with hosts",
        );
    }
    if !a.directory.starts_with("https://") || a.directory.len() <= "https://".len() {
        errs.add(
            "tls.acme.directory",
            format!("{:?}: the directory URL must be https://", a.directory),
        );
    }
    for (i, c) in a.contact.iter().enumerate() {
        let ok = c.strip_prefix("mailto:").is_some_and(|m| {
            m.contains('@')
                && !m
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        });
        if !ok {
            errs.add(
                format!("tls.acme.contact[{i}]"),
                format!("{c:?}: write mailto:someone@example.com"),
            );
        }
    }
    let ca_file = a.ca_file.as_ref().map(|f| base_dir_join(base_dir, f));
    if let Some(f) = &ca_file {
        let pem = rusty_shared::certs::read_capped(f).map_err(|e| e.to_string());
        let has_cert = pem.as_ref().is_ok_and(|pem| {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::pem_slice_iter(pem).any(|c| c.is_ok())
        });
        match pem {
            Err(e) => errs.add("tls.acme.ca_file", e),
            Ok(_) if !has_cert => errs.add(
                "tls.acme.ca_file",
                format!("{}: no PEM certificate in it", f.display()),
            ),
            Ok(_) => {}
        }
    }
    Some(AcmeSettings {
        directory: a.directory.clone(),
        contact: a.contact.clone(),
        hosts,
        ca_file,
    })
}

/// A service's `upstream_tls`: its CA file read now (at most the table's limit for a CA
/// bundle, PEM certificates in it), to travel in the table.
fn upstream_tls(
    t: &super::RawUpstreamTls,
    base_dir: &Path,
    key: &str,
    errs: &mut Errors,
) -> Option<crate::spec::ProbeTls> {
    use rustls::pki_types::pem::PemObject;
    let ca_pem = match &t.ca_file {
        None => None,
        Some(f) => {
            let path = base_dir_join(base_dir, f);
            // Capped while reading, like every certificate file; the table's own limit below.
            let text = match rusty_shared::certs::read_capped(&path) {
                Err(e) => {
                    errs.add(key, e.to_string());
                    return None;
                }
                Ok(b) if b.len() > limits::MAX_CA_PEM_BYTES => {
                    errs.add(
                        key,
                        format!(
                            "{}: over {} bytes of CA certificates",
                            path.display(),
                            limits::MAX_CA_PEM_BYTES
                        ),
                    );
                    return None;
                }
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            };
            let certs: Result<Vec<_>, _> =
                rustls::pki_types::CertificateDer::pem_slice_iter(text.as_bytes()).collect();
            match certs {
                Ok(c) if !c.is_empty() => Some(text),
                Ok(_) => {
                    errs.add(key, format!("{}: no PEM certificate in it", path.display()));
                    return None;
                }
                Err(e) => {
                    errs.add(key, format!("{}: {e}", path.display()));
                    return None;
                }
            }
        }
    };
    Some(crate::spec::ProbeTls {
        server_name: t.server_name.clone(),
        ca_pem,
    })
}

/// Why `host` (lower case) cannot be ordered over HTTP-01, if it cannot.
fn acme_name_problem(host: &str) -> Option<&'static str> {
    if host.starts_with("*.") {
        return Some(
            "HTTP-01 cannot prove a wildcard name (order each name, or use [[tls.certificates]])",
        );
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Some("an IP address, not a DNS name");
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.len() > 253 || !host.contains('.') || !host.split('.').all(label_ok) {
        return Some(
            "not a DNS name a CA can issue for (labels of letters, digits and -, at least two)",
        );
    }
    None
}

fn base_dir_join(base: &Path, p: &Path) -> std::path::PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn service(name: &str, s: &RawService, base_dir: &Path, errs: &mut Errors) -> Option<ServiceSpec> {
    let before = errs.0.len();
    let key = |field: &str| format!("services.{name}.{field}");
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        errs.add(
            format!("services.{name}"),
            "a service name is 1 to 64 ASCII letters, digits, - or _",
        );
    }
    if !(limits::WEIGHT_MIN..=limits::WEIGHT_MAX).contains(&s.weight) {
        errs.add(
            key("weight"),
            format!("{} is out of range 1..=1000", s.weight),
        );
    }
    if s.priority > limits::PRIORITY_MAX {
        errs.add(
            key("priority"),
            format!("{} is out of range 0..=127 (0 is preferred)", s.priority),
        );
    }
    let mut command = String::new();
    let mut addresses = Vec::new();
    let mut image = String::new();
    let mut container = None;
    let replicas;
    let container_only = [
        ("image", s.image.is_some()),
        ("port", s.port.is_some()),
        ("network", s.network.is_some()),
    ];
    let runs_images = matches!(s.runtime, RuntimeName::Docker | RuntimeName::Swarm);
    if !runs_images {
        for (field, set) in container_only {
            if set {
                errs.add(key(field), "only for runtime = \"docker\" or \"swarm\"");
            }
        }
    }
    if s.runtime != RuntimeName::Swarm && !s.constraints.is_empty() {
        errs.add(key("constraints"), "only for runtime = \"swarm\"");
    }
    match s.runtime {
        RuntimeName::Docker | RuntimeName::Swarm => {
            let runtime = if s.runtime == RuntimeName::Swarm {
                "swarm"
            } else {
                "docker"
            };
            if s.command.is_some() {
                errs.add(
                    key("command"),
                    format!("not for runtime = \"{runtime}\": the image says what runs (args replace its CMD)"),
                );
            }
            if !s.addresses.is_empty() {
                errs.add(key("addresses"), "only for runtime = \"static\"");
            }
            match s.image.as_deref().map(str::trim) {
                None | Some("") => errs.add(key("image"), format!("required with runtime = \"{runtime}\": the image each instance runs, e.g. \"app:v1\"")),
                Some(i) => image = i.to_owned(),
            }
            for (i, c) in s.constraints.iter().enumerate() {
                if !(c.contains("==") || c.contains("!=")) || c.len() > 256 {
                    errs.add(
                        format!("{}[{i}]", key("constraints")),
                        format!("{c:?}: write ATTRIBUTE==VALUE or ATTRIBUTE!=VALUE, e.g. \"node.role==worker\""),
                    );
                }
            }
            match (s.port, s.network.as_deref()) {
                (Some(0), _) => errs.add(key("port"), "must be 1..=65535"),
                (None, _) => errs.add(key("port"), format!("required with runtime = \"{runtime}\": the port the container listens on")),
                (_, None | Some("")) => errs.add(key("network"), if runtime == "swarm" {
                    "required with runtime = \"swarm\": the overlay network its tasks join (the agent and the data planes must be attached to it)".to_owned()
                } else {
                    "required with runtime = \"docker\": the Docker network its containers join (the data plane must be able to reach it)".to_owned()
                }),
                (Some(port), Some(network)) => {
                    container = Some(ContainerPlacement {
                        port,
                        network: network.to_owned(),
                        constraints: s.constraints.clone(),
                    })
                }
            }
            replicas = s.replicas.unwrap_or(1);
            if replicas > MAX_REPLICAS {
                errs.add(
                    key("replicas"),
                    format!("{replicas} is over the limit of {MAX_REPLICAS}"),
                );
            }
        }
        RuntimeName::Discovered => {
            if s.command.is_some()
                || !s.args.is_empty()
                || !s.env.is_empty()
                || !s.addresses.is_empty()
            {
                errs.add(key("runtime"), "a discovered service runs nothing: its backends are containers labelled rustybalancer.service; leave out command, args, env and addresses");
            }
            if s.replicas.is_some_and(|r| r != 0) {
                errs.add(
                    key("replicas"),
                    "a discovered service has no instances of its own",
                );
            }
            replicas = 0;
        }
        RuntimeName::Process => {
            match s.command.as_deref().map(str::trim) {
                None | Some("") => errs.add(
                    key("command"),
                    "required with runtime = \"process\": the program to run for each instance",
                ),
                Some(c) => command = resolve_command(c, base_dir),
            }
            if !s.addresses.is_empty() {
                errs.add(key("addresses"), "only for runtime = \"static\"; a process service gets its addresses from its instances");
            }
            replicas = s.replicas.unwrap_or(1);
            if replicas > MAX_REPLICAS {
                errs.add(
                    key("replicas"),
                    format!("{replicas} is over the limit of {MAX_REPLICAS}"),
                );
            }
        }
        RuntimeName::Static => {
            if s.command.is_some() || !s.args.is_empty() || !s.env.is_empty() {
                errs.add(
                    key("command"),
                    "command, args and env are only for runtime = \"process\"",
                );
            }
            if s.addresses.is_empty() {
                errs.add(
                    key("addresses"),
                    "required with runtime = \"static\": at least one ip:port",
                );
            }
            for (i, a) in s.addresses.iter().enumerate() {
                match a.parse::<SocketAddr>() {
                    Ok(addr) if addresses.contains(&addr) => errs.add(
                        format!("{}[{i}]", key("addresses")),
                        format!("{a} is listed twice"),
                    ),
                    Ok(addr) => addresses.push(addr),
                    Err(_) => errs.add(
                        format!("{}[{i}]", key("addresses")),
                        format!("{a:?} is not an ip:port address"),
                    ),
                }
            }
            replicas = s.addresses.len() as u32;
            if s.replicas.is_some_and(|r| r != replicas) {
                errs.add(
                    key("replicas"),
                    "a static service has one instance per address; leave replicas out",
                );
            }
        }
    }
    for (k, v) in &s.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            errs.add(
                format!("{}.{k}", key("env")),
                "not a valid environment variable",
            );
        }
    }

    let slow_start = s.slow_start.is_some_and(|d| !d.0.is_zero());
    if slow_start && s.weight > max_weight(true) {
        errs.add(
            key("weight"),
            format!(
                "{} is over {} (with slow_start, weights are scaled by {SLOW_START_STEPS} in the table)",
                s.weight,
                max_weight(true)
            ),
        );
    }
    let h = &s.health;
    let probe = match h.kind {
        CheckKind::Http => {
            if !h.path.starts_with('/') || h.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                errs.add(
                    key("health.path"),
                    format!(
                        "{:?} must start with / and contain no spaces or control bytes",
                        h.path
                    ),
                );
            }
            Probe::Http {
                path: h.path.clone(),
            }
        }
        CheckKind::Tcp => Probe::Tcp,
        CheckKind::Grpc => {
            if h.grpc_service.len() > 200 || h.grpc_service.bytes().any(|b| !b.is_ascii_graphic()) {
                errs.add(
                    key("health.grpc_service"),
                    format!(
                        "{:?} must be at most 200 visible ASCII characters",
                        h.grpc_service
                    ),
                );
            }
            if !s.upstream_protocol.unwrap_or_default().is_h2() {
                errs.add(
                    key("health.kind"),
                    "grpc checks speak HTTP/2: set upstream_protocol to \"h2c\" (or \"h2\" with upstream_tls)",
                );
            }
            Probe::Grpc {
                service: h.grpc_service.clone(),
            }
        }
    };
    if h.interval.0 < Duration::from_millis(10) {
        errs.add(key("health.interval"), "must be at least 10ms");
    }
    if h.timeout.0 < Duration::from_millis(1) {
        errs.add(key("health.timeout"), "must be at least 1ms");
    }
    for (field, v) in [("health.rise", h.rise), ("health.fall", h.fall)] {
        if !(1..=100).contains(&v) {
            errs.add(key(field), format!("{v} is out of range 1..=100"));
        }
    }
    let r = &s.rollout;
    if !(1..=MAX_REPLICAS).contains(&r.surge) {
        errs.add(
            key("rollout.surge"),
            format!("{} is out of range 1..={MAX_REPLICAS}", r.surge),
        );
    }
    let fastest = h.interval.0 * h.rise.saturating_sub(1);
    if r.healthy_timeout.0 <= fastest {
        errs.add(
            key("rollout.healthy_timeout"),
            format!(
                "{} is too short: an instance needs at least health.interval x (health.rise - 1) = {}ms to become healthy",
                r.healthy_timeout,
                fastest.as_millis()
            ),
        );
    }
    let mut replicas = replicas;
    let autoscale = match &s.autoscale {
        None => None,
        Some(auto) => {
            let before = errs.0.len();
            if !matches!(
                s.runtime,
                RuntimeName::Process | RuntimeName::Docker | RuntimeName::Swarm
            ) {
                errs.add(
                    key("autoscale"),
                    "only for runtime = \"process\", \"docker\" or \"swarm\": the agent must start the instances",
                );
            }
            if auto.min_replicas == 0 || auto.min_replicas > auto.max_replicas {
                errs.add(
                    key("autoscale.min_replicas"),
                    format!(
                        "{} must be 1..=max_replicas ({})",
                        auto.min_replicas, auto.max_replicas
                    ),
                );
            }
            if auto.max_replicas > MAX_REPLICAS {
                errs.add(
                    key("autoscale.max_replicas"),
                    format!("{} is over the limit of {MAX_REPLICAS}", auto.max_replicas),
                );
            }
            if !(auto.target_inflight > 0.0 && auto.target_inflight <= 1e6) {
                errs.add(
                    key("autoscale.target_inflight"),
                    format!(
                        "{} must be above 0 (requests in flight per instance)",
                        auto.target_inflight
                    ),
                );
            }
            (errs.0.len() == before).then(|| {
                replicas = replicas.clamp(auto.min_replicas, auto.max_replicas);
                crate::spec::AutoscaleSpec {
                    min_replicas: auto.min_replicas,
                    max_replicas: auto.max_replicas,
                    target_inflight: auto.target_inflight,
                    window: auto.window.0,
                    cooldown: auto.cooldown.0,
                }
            })
        }
    };
    if s.replace_after_ejections == 1 {
        errs.add(
            key("replace_after_ejections"),
            "must be 0 (off) or at least 2: one failed connect is no pattern",
        );
    }
    if s.ejection_window.0 < std::time::Duration::from_secs(1) {
        errs.add(key("ejection_window"), "must be at least 1s");
    }
    let outliers = (s.replace_after_ejections >= 2
        && matches!(
            s.runtime,
            RuntimeName::Process | RuntimeName::Docker | RuntimeName::Swarm
        ))
    .then_some(crate::spec::OutlierSpec {
        ejections: s.replace_after_ejections,
        window: s.ejection_window.0,
    });
    let mut route = Service::new(name, Vec::new());
    route.hosts = s.hosts.clone();
    route.path_prefix = s.path_prefix.clone();
    let ms = |d: &Option<super::Dur>, default: u64| d.map_or(default, |d| d.0.as_millis() as u64);
    route.connect_timeout_ms = ms(&s.connect_timeout, route.connect_timeout_ms);
    route.read_timeout_ms = ms(&s.read_timeout, route.read_timeout_ms);
    route.eject_ms = ms(&s.eject, route.eject_ms);
    route.retries = s.retries.unwrap_or(route.retries);
    route.overprovisioning = s.overprovisioning.unwrap_or(route.overprovisioning);
    route.class = s.class.unwrap_or(route.class);
    route.class_header = s.class_header.clone();
    route.max_inflight = s.max_inflight.unwrap_or(route.max_inflight);
    route.queue_timeout_ms = ms(&s.queue_timeout, route.queue_timeout_ms);
    route.https_redirect = s.https_redirect;
    route.hsts = s.hsts.as_ref().map(|h| rusty_shared::Hsts {
        max_age_s: h.max_age.0.as_secs(),
        include_subdomains: h.include_subdomains,
        preload: h.preload,
    });
    let upstream_tls = s
        .upstream_tls
        .as_ref()
        .and_then(|t| upstream_tls(t, base_dir, &key("upstream_tls.ca_file"), errs));
    route.upstream_protocol = s.upstream_protocol.unwrap_or_default();
    route.upstream_tls = upstream_tls.clone().map(|t| rusty_shared::UpstreamTls {
        server_name: t.server_name,
        ca_pem: t.ca_pem,
        ca_file: None,
    });
    // The route's own ranges (timeouts, retries, hosts, prefix) are the table's: check them with
    // the same code the data plane runs, on a one-backend trial table.
    let mut trial = route.clone();
    trial.backends = vec![Backend::new("trial", "127.0.0.1:1", 1, 0)];
    if let Err(e) = rusty_shared::validate(Table::new(1, vec![trial])) {
        errs.add(format!("services.{name}"), e.to_string());
    }
    if errs.0.len() != before {
        return None;
    }
    Some(ServiceSpec {
        name: name.to_owned(),
        route,
        runtime: match s.runtime {
            RuntimeName::Process => RuntimeKind::Process,
            RuntimeName::Static => RuntimeKind::Static,
            RuntimeName::Docker => RuntimeKind::Docker,
            RuntimeName::Swarm => RuntimeKind::Swarm,
            RuntimeName::Discovered => RuntimeKind::Discovered,
        },
        run: RunSpec {
            command,
            image,
            args: s.args.clone(),
            env: s.env.clone(),
            weight: s.weight,
            priority: s.priority,
        },
        addresses,
        container,
        replicas,
        stop_grace: s.stop_grace.0,
        slow_start: s.slow_start.map_or(Duration::ZERO, |d| d.0),
        health: HealthSpec {
            tls: upstream_tls,
            probe,
            interval: h.interval.0,
            timeout: h.timeout.0,
            rise: h.rise,
            fall: h.fall,
        },
        rollout: RolloutPolicy {
            surge: r.surge,
            drain: r.drain.0,
            healthy_timeout: r.healthy_timeout.0,
        },
        autoscale,
        outliers,
    })
}

/// A command with a `/` in it is a path; a relative one is taken from the config file's
/// directory, as Compose does, so a config works from any working directory.
fn resolve_command(command: &str, base_dir: &Path) -> String {
    let p = Path::new(command);
    if command.contains('/') && p.is_relative() && !base_dir.as_os_str().is_empty() {
        base_dir.join(p).display().to_string()
    } else {
        command.to_owned()
    }
}

/// Two services that claim the same host and path prefix: the table would be refused.
fn check_routes(services: &[ServiceSpec], errs: &mut Errors) {
    let trial: Vec<Service> = services
        .iter()
        .map(|s| {
            let mut t = s.route.clone();
            t.backends = vec![Backend::new("trial", "127.0.0.1:1", 1, 0)];
            t
        })
        .collect();
    if let Err(e) = rusty_shared::validate(Table::new(1, trial)) {
        errs.add("services", e.to_string());
    }
}
