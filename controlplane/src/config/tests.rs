//! Config errors must name the file and the key; overlays must change only what they name.

use std::path::Path;

use super::*;

const BASE: &str = r#"
[agent]
listen = "127.0.0.1:7070"

[services.web]
hosts = ["example.com"]
command = "./app"
args = ["--port", "{port}"]
replicas = 3

[services.api]
runtime = "static"
path_prefix = "/api"
addresses = ["127.0.0.1:9001", "127.0.0.1:9002"]

[env.development.services.web]
replicas = 1

[env.development.agent]
log = "debug"

[env.production.agent]
token_file = "/run/secrets/token"
require_token_file = true
"#;

fn load(text: &str, env: Option<&str>) -> Result<Loaded, LoadError> {
    load_str(text, "agent.toml", Path::new("/etc/rusty"), env)
}

fn errors(text: &str) -> String {
    load(text, None).unwrap_err().to_string()
}

#[test]
fn a_valid_config_loads_with_defaults_filled_in() {
    let l = load(BASE, None).unwrap();
    let c = &l.config;
    assert_eq!(c.services.len(), 2);
    let web = c.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.replicas, 3);
    assert_eq!(
        web.run.command, "/etc/rusty/./app",
        "relative paths are the config's"
    );
    assert_eq!(web.health.rise, 2);
    assert_eq!(web.rollout.surge, 1);
    let api = c.services.iter().find(|s| s.name == "api").unwrap();
    assert_eq!(api.replicas, 2, "one per address");
    assert_eq!(api.route.path_prefix, "/api");
    assert_eq!(l.environments, vec!["development", "production"]);
    assert_eq!(c.agent.state_dir, Path::new("/etc/rusty/.rusty/agent"));
}

#[test]
fn an_overlay_changes_only_what_it_names() {
    let base = load(BASE, None).unwrap().config;
    let dev = load(BASE, Some("development")).unwrap().config;
    let web = |c: &Config| c.services.iter().find(|s| s.name == "web").unwrap().clone();
    assert_eq!(web(&dev).replicas, 1);
    assert_eq!(web(&dev).run.args, web(&base).run.args, "args untouched");
    assert_eq!(dev.agent.log, "debug");
    assert_eq!(base.agent.log, "info");
    let prod = load(BASE, Some("production")).unwrap().config;
    assert_eq!(
        prod.agent.token_file.as_deref(),
        Some(Path::new("/run/secrets/token"))
    );
}

#[test]
fn an_unknown_environment_lists_the_known_ones() {
    let e = load(BASE, Some("staging")).unwrap_err().to_string();
    assert_eq!(
        e,
        "agent.toml: --env staging: there is no [env.staging] table (environments in this file: development, production)"
    );
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    let e = errors("[services.web]\ncommand = \"x\"\nreplica = 2\n");
    assert!(
        e.starts_with("agent.toml: services.web.replica: unknown field `replica`, expected one of"),
        "{e}"
    );
    let e = errors("[services.web]\ncommand = \"x\"\n[services.web.health]\nris = 2\n");
    assert!(
        e.starts_with("agent.toml: services.web.health.ris: unknown field `ris`"),
        "{e}"
    );
    let e = errors("[agnet]\n");
    assert!(
        e.starts_with("agent.toml: agnet: unknown field `agnet`"),
        "{e}"
    );
    assert!(!e.contains("\nin `"), "{e}");
}

#[test]
fn wrong_types_and_bad_durations_are_named_with_their_path() {
    let e = errors("[services.web]\ncommand = \"x\"\nreplicas = \"two\"\n");
    assert!(
        e.starts_with("agent.toml: services.web.replicas: invalid type"),
        "{e}"
    );
    let e = errors("[services.web]\ncommand = \"x\"\n[services.web.health]\ninterval = \"5\"\n");
    assert!(
        e.starts_with("agent.toml: services.web.health.interval: invalid duration \"5\""),
        "{e}"
    );
}

#[test]
fn syntax_errors_give_the_line() {
    let e = errors("[services.web]\ncommand = \n");
    assert!(e.starts_with("agent.toml: not valid TOML"), "{e}");
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn every_rule_broken_is_reported_with_its_key() {
    let e = errors(
        r#"
[agent]
listen = "localhost:7070"
require_token_file = true

[services.web]
weight = 0
priority = 500
[services.web.health]
rise = 0
path = "healthz"
[services.web.rollout]
surge = 0

[services.api]
runtime = "static"
addresses = ["127.0.0.1:9001", "nowhere", "127.0.0.1:9001"]
command = "x"
"#,
    );
    for expected in [
        "agent.toml: agent.listen: \"localhost:7070\" is not an ip:port address",
        "agent.toml: agent.token_file: required here",
        "agent.toml: services.web.command: required with runtime = \"process\"",
        "agent.toml: services.web.weight: 0 is out of range 1..=1000",
        "agent.toml: services.web.priority: 500 is out of range",
        "agent.toml: services.web.health.rise: 0 is out of range 1..=100",
        "agent.toml: services.web.health.path: \"healthz\" must start with /",
        "agent.toml: services.web.rollout.surge: 0 is out of range",
        "agent.toml: services.api.addresses[1]: \"nowhere\" is not an ip:port address",
        "agent.toml: services.api.addresses[2]: 127.0.0.1:9001 is listed twice",
        "agent.toml: services.api.command: command, args and env are only for runtime = \"process\"",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
}

#[test]
fn services_that_claim_the_same_route_are_refused() {
    let e = errors(
        "[services.a]\ncommand = \"x\"\nhosts = [\"h\"]\n[services.b]\ncommand = \"y\"\nhosts = [\"h\"]\n",
    );
    assert!(e.starts_with("agent.toml: services: "), "{e}");
    assert!(e.contains("\"a\"") && e.contains("\"b\""), "{e}");
}

#[test]
fn a_healthy_timeout_shorter_than_rising_is_refused() {
    let e = errors(
        "[services.web]\ncommand = \"x\"\n[services.web.health]\ninterval = \"2s\"\nrise = 3\n[services.web.rollout]\nhealthy_timeout = \"3s\"\n",
    );
    assert!(
        e.contains("services.web.rollout.healthy_timeout: 3s is too short"),
        "{e}"
    );
}

#[test]
fn an_overlay_error_is_named_by_the_merged_key() {
    let text = format!("{BASE}\n[env.slim.services.web.health]\nfall = 0\n");
    assert!(load(&text, None).is_ok());
    let e = load(&text, Some("slim")).unwrap_err().to_string();
    assert!(
        e.contains("agent.toml: services.web.health.fall: 0 is out of range"),
        "{e}"
    );
}

#[test]
fn the_effective_config_renders_and_reads_back_the_same() {
    let l = load(BASE, Some("development")).unwrap();
    let text = render(&l.raw);
    let again = load(&text, None).unwrap();
    assert_eq!(render(&again.raw), text);
}

#[test]
fn the_shipped_examples_are_valid_in_every_environment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    let files = std::fs::read_dir(root.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .chain([root.join("docker/agent.toml")]);
    for path in files {
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let base = super::load(&path, None).unwrap_or_else(|e| panic!("{e}"));
        for env in &base.environments {
            super::load(&path, Some(env)).unwrap_or_else(|e| panic!("--env {env}: {e}"));
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "examples cover production, development and slim"
    );
}

#[test]
fn docker_services_need_an_image_a_port_and_a_network() {
    let e = errors("[services.app]\nruntime = \"docker\"\ncommand = \"x\"\n");
    for expected in [
        "agent.toml: services.app.command: not for runtime = \"docker\"",
        "agent.toml: services.app.image: required with runtime = \"docker\"",
        "agent.toml: services.app.port: required with runtime = \"docker\"",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
    let e = errors("[services.app]\nruntime = \"docker\"\nimage = \"a:1\"\nport = 80\n");
    assert!(e.contains("services.app.network: required"), "{e}");
    let e = errors("[services.app]\ncommand = \"x\"\nimage = \"a:1\"\n");
    assert!(
        e.contains("services.app.image: only for runtime = \"docker\""),
        "{e}"
    );
    let ok = load(
        "[services.app]\nruntime = \"docker\"\nimage = \"a:1\"\nport = 80\nnetwork = \"n\"\nreplicas = 2\n[docker]\ndiscover = true\n",
        None,
    )
    .unwrap();
    let app = &ok.config.services[0];
    assert_eq!(app.run.image, "a:1");
    assert_eq!(app.container.as_ref().unwrap().network, "n");
    assert!(ok.config.docker.unwrap().discover);
}

#[test]
fn swarm_services_need_an_overlay_and_take_constraints_and_names() {
    let e = errors("[services.app]\nruntime = \"swarm\"\nimage = \"a:1\"\nport = 80\n");
    assert!(
        e.contains("services.app.network: required with runtime = \"swarm\": the overlay network"),
        "{e}"
    );
    let e = errors(
        "[swarm]\nprefix = \"Bad_Prefix\"\n[services.app]\nruntime = \"swarm\"\nimage = \"a:1\"\nport = 80\nnetwork = \"ov\"\nconstraints = [\"node.role\"]\n",
    );
    for expected in [
        "agent.toml: swarm.prefix: \"Bad_Prefix\": 1 to 32 lowercase letters",
        "agent.toml: services.app.constraints[0]: \"node.role\": write ATTRIBUTE==VALUE",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
    let e = errors("[services.app]\ncommand = \"x\"\nconstraints = [\"node.role==worker\"]\n");
    assert!(
        e.contains("services.app.constraints: only for runtime = \"swarm\""),
        "{e}"
    );
    let ok = load(
        "[swarm]\nprefix = \"edge\"\nstack = \"prod\"\n[services.app]\nruntime = \"swarm\"\nimage = \"a:1\"\nport = 80\nnetwork = \"ov\"\nconstraints = [\"node.role==worker\"]\nreplicas = 3\n[services.app.autoscale]\nmin_replicas = 2\nmax_replicas = 5\ntarget_inflight = 10\n[agent]\ndata_planes = [\"tasks.lb:9100\"]\n",
        None,
    )
    .unwrap();
    let app = &ok.config.services[0];
    assert_eq!(app.runtime, crate::spec::RuntimeKind::Swarm);
    assert_eq!(app.run.image, "a:1");
    let placement = app.container.as_ref().unwrap();
    assert_eq!(placement.network, "ov");
    assert_eq!(placement.constraints, ["node.role==worker"]);
    assert_eq!(ok.config.swarm.prefix, "edge");
    assert_eq!(ok.config.swarm.stack.as_deref(), Some("prod"));
    assert!(app.autoscale.is_some());
}

#[test]
fn a_discovered_service_runs_nothing() {
    let e = errors("[services.extra]\nruntime = \"discovered\"\ncommand = \"x\"\nreplicas = 2\n");
    assert!(
        e.contains("services.extra.runtime: a discovered service runs nothing"),
        "{e}"
    );
    assert!(
        e.contains("services.extra.replicas: a discovered service has no instances"),
        "{e}"
    );
    let e = errors(
        "[docker]\nhost = \"/var/run/docker.sock\"\n[services.extra]\nruntime = \"discovered\"\n",
    );
    assert!(
        e.contains("docker.host: \"/var/run/docker.sock\": write unix://"),
        "{e}"
    );
}

#[test]
fn slow_start_limits_weights_to_what_scaling_by_ten_allows() {
    let e = errors("[services.web]\ncommand = \"x\"\nweight = 200\nslow_start = \"10s\"\n");
    assert!(
        e.contains("services.web.weight: 200 is over 100 (with slow_start"),
        "{e}"
    );
    let ok = load(
        "[services.web]\ncommand = \"x\"\nweight = 100\nslow_start = \"10s\"\n",
        None,
    )
    .unwrap();
    assert_eq!(
        ok.config.services[0].slow_start,
        std::time::Duration::from_secs(10)
    );
}

#[test]
fn priority_settings_reach_the_route_and_bad_ones_are_named() {
    let text = format!(
        "{BASE}\n[env.prio.services.api]\nclass = \"critical\"\nclass_header = \"X-Priority\"\nmax_inflight = 8\nqueue_timeout = \"250ms\"\n"
    );
    let l = load(&text, Some("prio")).unwrap();
    let api = l.config.services.iter().find(|s| s.name == "api").unwrap();
    assert_eq!(api.route.class, rusty_shared::RequestClass::Critical);
    assert_eq!(api.route.class_header.as_deref(), Some("X-Priority"));
    assert_eq!(api.route.max_inflight, 8);
    assert_eq!(api.route.queue_timeout_ms, 250);
    let web = l.config.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.route.class, rusty_shared::RequestClass::Normal);
    assert_eq!(web.route.max_inflight, 0, "unlimited unless set");

    let e = errors(&format!(
        "{BASE}\n[services.x]\ncommand = \"./x\"\nclass = \"urgent\"\n"
    ));
    assert!(e.contains("services.x.class"), "{e}");
    let e = errors(&format!(
        "{BASE}\n[services.x]\ncommand = \"./x\"\nclass_header = \"bad header\"\n"
    ));
    assert!(
        e.contains("services.x") && e.contains("class_header"),
        "{e}"
    );
}

#[test]
fn outlier_replacement_is_on_by_default_and_one_ejection_is_not_a_pattern() {
    let l = load(BASE, None).unwrap();
    let web = l.config.services.iter().find(|s| s.name == "web").unwrap();
    let o = web.outliers.expect("on by default for process services");
    assert_eq!(o.ejections, 3);
    assert_eq!(o.window, std::time::Duration::from_secs(30));
    let api = l.config.services.iter().find(|s| s.name == "api").unwrap();
    assert_eq!(
        api.outliers, None,
        "static backends are not the agent's to replace"
    );

    let e = errors(&format!(
        "{BASE}\n[services.x]\ncommand = \"./x\"\nreplace_after_ejections = 1\n"
    ));
    assert!(e.contains("services.x.replace_after_ejections"), "{e}");
    let off = load(
        &BASE.replace(
            "replicas = 3\n",
            "replicas = 3\nreplace_after_ejections = 0\n",
        ),
        None,
    )
    .unwrap();
    let web = off
        .config
        .services
        .iter()
        .find(|s| s.name == "web")
        .unwrap();
    assert_eq!(web.outliers, None);
}

#[test]
fn autoscaling_and_outlier_timings_must_fit_the_scrape_and_the_ejections() {
    let auto = "\n[services.web.autoscale]\nmin_replicas = 1\nmax_replicas = 3\ntarget_inflight = 2\nwindow = \"50ms\"\n";
    let e = errors(&format!(
        "{}{auto}",
        BASE.replace(
            "[agent]\n",
            "[agent]\ndata_planes = [\"127.0.0.1:9100\", \"127.0.0.1:9100\", \"http://x:9100\"]\n"
        )
    ));
    assert!(e.contains("services.web.autoscale.window"), "{e}");
    assert!(
        e.contains("agent.data_planes[1]") && e.contains("twice"),
        "{e}"
    );
    assert!(e.contains("agent.data_planes[2]"), "{e}");
    let e = errors(&BASE.replace(
        "replicas = 3\n",
        "replicas = 3\neject = \"20s\"\nejection_window = \"30s\"\n",
    ));
    assert!(e.contains("services.web.ejection_window"), "{e}");
}

/// A self-signed pair for `hosts` in `dir`, as `NAME.crt` and `NAME.key`.
fn cert_files(dir: &Path, name: &str, hosts: &[&str]) {
    let key = rcgen::KeyPair::generate().unwrap();
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let cert = rcgen::CertificateParams::new(hosts)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

#[test]
fn tls_certificates_are_checked_and_must_cover_redirected_hosts() {
    let dir = std::env::temp_dir().join(format!("rusty-agent-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    cert_files(&dir, "site", &["example.com", "*.example.com"]);
    cert_files(&dir, "other", &["other.test"]);
    let config = |extra: &str| {
        format!(
            "{BASE}\n[services.web.hsts]\nmax_age = \"365d\"\n{extra}\n[[tls.certificates]]\ncert = \"{0}/site.crt\"\nkey = \"{0}/site.key\"\n",
            dir.display()
        )
    };
    let ok = load(&config(""), None).unwrap();
    assert_eq!(ok.config.certificates.len(), 1);
    assert_eq!(ok.config.certificates[0].name, "site");
    let web = ok.config.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(
        web.route.hsts.as_ref().map(|h| h.max_age_s),
        Some(31_536_000)
    );

    // A redirect to HTTPS for a host no certificate covers, and one for any host.
    let text = config("").replace(
        "[services.web]\nhosts = [\"example.com\"]",
        "[services.web]\nhosts = [\"example.com\", \"shop.test\"]\nhttps_redirect = true",
    );
    let e = errors(&text);
    assert!(e.contains("services.web.https_redirect"), "{e}");
    assert!(
        e.contains("host \"shop.test\" is covered by no [tls] certificate"),
        "{e}"
    );
    assert!(!e.contains("\"example.com\" is covered"), "{e}");
    let text = config("").replace(
        "[services.api]\nruntime = \"static\"",
        "[services.api]\nruntime = \"static\"\nhttps_redirect = true",
    );
    let e = errors(&text);
    assert!(
        e.contains("services.api.https_redirect: the service answers any host"),
        "{e}"
    );

    // A key that is another certificate's, and a missing file: each names its key and file.
    let mismatch = format!(
        "{BASE}\n[[tls.certificates]]\ncert = \"{0}/site.crt\"\nkey = \"{0}/other.key\"\n[[tls.certificates]]\ncert = \"{0}/missing.crt\"\nkey = \"{0}/missing.key\"\n",
        dir.display()
    );
    let e = errors(&mismatch);
    assert!(
        e.contains("tls.certificates[0]") && e.contains("other.key: this key does not match"),
        "{e}"
    );
    assert!(
        e.contains("tls.certificates[1]") && e.contains("missing.crt: cannot read it"),
        "{e}"
    );
    assert!(!e.contains("PRIVATE"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn acme_names_its_hosts_and_refuses_what_http01_cannot_prove() {
    let with = |service_lines: &str, acme: &str| {
        BASE.replace(
            "[services.web]\nhosts = [\"example.com\"]",
            &format!("[services.web]\nhosts = [\"Shop.Test\", \"example.com\"]\n{service_lines}"),
        ) + acme
    };
    let acme = "\n[tls.acme]\ndirectory = \"https://acme.test/dir\"\ncontact = [\"mailto:ops@example.com\"]\nhosts = [\"extra.example.com\", \"shop.test\"]\n";
    // A service's hosts and the listed ones, lower-cased, each once; its redirect is covered.
    let ok = load(&with("tls = \"acme\"\nhttps_redirect = true", acme), None).unwrap();
    let a = ok.config.acme.expect("[tls.acme]");
    assert_eq!(a.hosts, ["shop.test", "example.com", "extra.example.com"]);
    assert_eq!(a.directory, "https://acme.test/dir");

    let e = errors(&with("tls = \"acme\"", ""));
    assert!(
        e.contains("services.web.tls: \"acme\" needs [tls.acme]"),
        "{e}"
    );
    let e = errors(&BASE.replace(
        "[services.api]\nruntime = \"static\"",
        &format!("{acme}\n[services.api]\ntls = \"acme\"\nruntime = \"static\""),
    ));
    assert!(
        e.contains("services.api.tls: the service answers any host"),
        "{e}"
    );
    let bad = "\n[tls.acme]\ndirectory = \"http://acme.test/dir\"\ncontact = [\"ops@example.com\"]\nhosts = [\"*.example.com\", \"10.0.0.1\", \"bad_name.test\"]\nca_file = \"/nonexistent/root.pem\"\n";
    let e = errors(&with("", bad));
    for needle in [
        "tls.acme.directory: \"http://acme.test/dir\": the directory URL must be https://",
        "tls.acme.contact[0]: \"ops@example.com\": write mailto:",
        "tls.acme.hosts[0]: \"*.example.com\": HTTP-01 cannot prove a wildcard name",
        "tls.acme.hosts[1]: \"10.0.0.1\": an IP address",
        "tls.acme.hosts[2]: \"bad_name.test\": not a DNS name",
        "tls.acme.ca_file",
        "/nonexistent/root.pem",
    ] {
        assert!(e.contains(needle), "{needle} in {e}");
    }
    let e = errors(&with(
        "",
        "\n[tls.acme]\ndirectory = \"https://acme.test/dir\"\n",
    ));
    assert!(e.contains("tls.acme.hosts: no name to order"), "{e}");
}
