//! The status pages, in a real browser: Debian's `chromium`, headless, loads the data plane's
//! admin `/`, which must show the installed table's backends and follow a table swap, and the
//! agent's `/`, which shows nothing without the token and its services and instances with it,
//! and follows a scale. Without a chromium (`scripts/setup.sh` installs it) the tests say so
//! loudly and check nothing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rusty_e2e::*;

/// The page's DOM after its script has run for a few (virtual) seconds.
fn rendered(url: &str, profile: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=3000",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            url,
        ])
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The backend ids the page's tables show, in order.
fn backends_shown(dom: &str) -> Vec<String> {
    dom.match_indices("data-id=\"")
        .map(|(at, m)| {
            let rest = &dom[at + m.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

fn no_chromium() -> bool {
    let missing = Command::new("chromium").arg("--version").output().is_err();
    if missing {
        eprintln!("\n==== SKIPPED: no chromium here (scripts/setup.sh installs it); the status page is untested in a browser ====\n");
    }
    missing
}

/// The agent's instance ids the page shows.
fn instances_shown(dom: &str) -> Vec<String> {
    backends_shown(dom)
}

#[test]
fn the_data_plane_page_shows_the_backends_and_follows_a_table_swap() {
    if no_chromium() {
        return;
    }
    let (a, b, c) = (Echo::start("a"), Echo::start("b"), Echo::start("c"));
    let dir = TempDir::new("pages");
    let path = dir.path("table.json");
    write_atomic(
        &path,
        &table(1, &[("a", &a.addr(), 3, 0), ("b", &b.addr(), 1, 1)]),
    );
    let lb = Lb::start(&["--table".to_owned(), path.display().to_string()]);
    lb.wait_version(1, Duration::from_secs(10));
    for _ in 0..20 {
        assert_eq!(lb.get("localhost", "/").status, 200);
    }
    let url = format!("http://127.0.0.1:{}/", lb.admin);
    let profile = dir.path("chromium");

    let dom = rendered(&url, &profile);
    assert_eq!(backends_shown(&dom), ["a", "b"], "{dom}");
    assert!(dom.contains("<b id=\"version\">1</b>"), "{dom}");
    // a took every request (b is a spare in tier 1): its count is on the page.
    assert!(
        dom.contains("<td>a</td><td class=\"addr\">"),
        "the backend row: {dom}"
    );
    assert!(dom.contains("<td>20</td>"), "a's requests: {dom}");

    // A swap: b leaves, c joins; the page follows.
    write_atomic(
        &path,
        &table(2, &[("a", &a.addr(), 3, 0), ("c", &c.addr(), 1, 0)]),
    );
    lb.proc.signal("HUP");
    lb.wait_version(2, Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dom = rendered(&url, &profile);
        if backends_shown(&dom) == ["a", "c"] && dom.contains("<b id=\"version\">2</b>") {
            break;
        }
        assert!(Instant::now() < deadline, "the page never followed: {dom}");
    }
}

#[test]
fn the_agent_page_needs_the_token_and_shows_instances_and_a_scale() {
    if no_chromium() {
        return;
    }
    let agent = Agent::start("agent-page", &echo_service("web", 2, "v1-"));
    agent.wait_serving("web", 2, Duration::from_secs(30));
    let dir = TempDir::new("agent-page");
    let profile = dir.path("chromium");
    let url = format!("http://127.0.0.1:{}/", agent.port);

    // No token: the form, and nothing of the agent's state.
    let dom = rendered(&url, &profile);
    assert!(
        dom.contains("id=\"token-form\">"),
        "the form is shown: {dom}"
    );
    assert!(instances_shown(&dom).is_empty(), "{dom}");
    // A wrong one is refused and forgotten.
    let dom = rendered(&format!("{url}#token=wrong"), &profile);
    assert!(dom.contains("the agent refused that token"), "{dom}");
    assert!(instances_shown(&dom).is_empty(), "{dom}");

    let token = std::fs::read_to_string(&agent.token_file).unwrap();
    let with_token = format!("{url}#token={}", token.trim());
    let dom = rendered(&with_token, &profile);
    let shown = instances_shown(&dom);
    assert_eq!(shown.len(), 2, "{dom}");
    assert!(dom.contains("generation 1, 2 of 2 healthy"), "{dom}");
    assert!(dom.matches(">healthy<").count() >= 2, "{dom}");

    let (ok, out) = agent.cli(&["scale", "web", "3"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dom = rendered(&with_token, &profile);
        if instances_shown(&dom).len() == 3 && dom.contains("3 of 3 healthy") {
            break;
        }
        assert!(Instant::now() < deadline, "the page never followed: {dom}");
    }
}
