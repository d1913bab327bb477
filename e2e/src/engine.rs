//! The Docker engine for the tests that need it (`docker`, `swarm`): whether one answers (said
//! loudly when not), the images `scripts/images.sh` builds, and running the `docker` CLI.

use std::process::{Command, Output};

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
