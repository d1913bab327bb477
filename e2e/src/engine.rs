//! The Docker engine for the tests that need it (`docker`, `swarm`): whether one answers (said
//! loudly when not), the images `scripts/images.sh` builds, and running the `docker` CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Does `docker info` answer? When not, says so on stderr (the test then returns).
pub fn engine_answers() -> bool {
    match Command::new("docker").arg("info").output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "DOCKER TESTS SKIPPED: `docker info` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("DOCKER TESTS SKIPPED: cannot run `docker`: {e}");
            false
        }
    }
}

/// `scripts/test.sh --quick` before any image was built says to skip; the full run builds them.
/// Otherwise the images must be there.
pub fn images_ready(what: &str) -> bool {
    if let Ok(why) = std::env::var("RUSTY_SKIP_DOCKER") {
        eprintln!("{what} SKIPPED: {why}");
        return false;
    }
    let images = Command::new("docker")
        .args([
            "image",
            "inspect",
            "rustybalancer:production",
            "rustybalancer-demo:v1",
            "rustybalancer-demo:v2",
        ])
        .output()
        .expect("docker image inspect");
    assert!(
        images.status.success(),
        "the images are missing: run scripts/images.sh (scripts/test.sh does when the engine answers)"
    );
    true
}

/// Run `cmd`; panic with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `docker ARGS`, which must succeed; its stdout.
pub fn docker(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(Command::new("docker").args(args)).stdout).into_owned()
}

/// The repository's root (where the Compose and stack files are).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Poll `check` every 100 ms until it holds; fails after `limit`. Returns how long it took.
pub fn wait_for(what: &str, limit: Duration, check: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// Does the agent's status show `n` instances of service `app`, all of `generation` and all in
/// the table?
pub fn app_serving(st: &serde_json::Value, n: usize, generation: u64) -> bool {
    st["services"].as_array().into_iter().flatten().any(|s| {
        s["name"] == "app"
            && s["instances"].as_array().is_some_and(|i| {
                i.len() == n
                    && i.iter()
                        .all(|i| i["in_table"] == true && i["generation"] == generation)
            })
    })
}
