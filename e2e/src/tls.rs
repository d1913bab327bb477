//! TLS test helpers around real tools: certificates made by the `openssl` command line (a
//! test CA and leaves with chosen subjectAltNames), and requests made by `curl`, `openssl
//! s_client` and Python's `ssl` module.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for_port, Lb};

/// Run a command, panicking with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A test certificate authority in a directory.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A new CA (ECDSA P-256) in `dir`.
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("openssl").current_dir(dir).args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=RustyBalancer Test CA",
        ]));
        Pki {
            dir: dir.to_owned(),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Issue `out/PAIR.crt` and `out/PAIR.key` (mode 0600) for these subjectAltName entries
    /// (`DNS:…`, `IP:…`), valid for `days` (-1: expired yesterday). The subject's CN is the
    /// pair's name, so a client can tell which one it got.
    pub fn issue(&self, out: &Path, pair: &str, sans: &[&str], days: i32) {
        std::fs::create_dir_all(out).unwrap();
        let key = out.join(format!("{pair}.key"));
        let crt = out.join(format!("{pair}.crt"));
        let csr = self.dir.join(format!("{pair}.csr"));
        let ext = self.dir.join(format!("{pair}.ext"));
        std::fs::write(&ext, format!("subjectAltName={}\n", sans.join(","))).unwrap();
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .args(["-subj", &format!("/CN={pair}")]));
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", &days.to_string()])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(self.ca())
            .arg("-CAkey")
            .arg(self.dir.join("ca.key"))
            .arg("-out")
            .arg(&crt)
            .arg("-extfile")
            .arg(&ext));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A `rusty-lb` with a TLS listener on `tls_port` serving `certs`, besides its plain one.
pub struct TlsLb {
    pub lb: Lb,
    pub tls_port: u16,
}

impl TlsLb {
    pub fn start(certs: &Path, extra: &[String]) -> TlsLb {
        let tls_port = free_port();
        let mut args = vec![
            "--tls-listen".to_owned(),
            format!("127.0.0.1:{tls_port}"),
            "--certs".to_owned(),
            certs.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let lb = Lb::start(&args);
        wait_for_port(tls_port, Duration::from_secs(20));
        TlsLb { lb, tls_port }
    }
}

/// What `curl` got for one HTTPS request: the status (0 when the request failed) and the
/// body, or curl's error.
pub struct Curled {
    pub status: u16,
    pub body: String,
    pub error: String,
}

/// `curl` one HTTPS request for `name` to 127.0.0.1:`port`, trusting `ca`.
pub fn curl(port: u16, name: &str, path: &str, ca: &Path, extra: &[&str]) -> Curled {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(ca)
        .args(extra)
        .arg(format!("https://{name}:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Curled {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        error: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One `curl` for `n` HTTPS requests to `https://name:port/r`, each on a new connection (the
/// server closes after each), trusting `ca`; [`https_codes`] reads what it printed.
pub fn https_requests(port: u16, name: &str, ca: &Path, n: usize) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--http1.1",
        "-H",
        "Connection: close",
        "-o",
        "/dev/null",
    ])
    .args(["-w", "\ncode=%{http_code}\n"])
    .arg("--resolve")
    .arg(format!("{name}:{port}:127.0.0.1"))
    .arg("--cacert")
    .arg(ca)
    .args((0..n).map(|_| format!("https://{name}:{port}/r")))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// The status of each request of an [`https_requests`] run, and curl's complaint when it
/// failed. (`-o` applies to the first URL only; the others' bodies come before their codes.)
pub fn https_codes(out: &std::process::Output) -> Vec<String> {
    let mut codes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("code="))
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        codes.push(format!(
            "curl: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    codes
}

/// The CN of the certificate 127.0.0.1:`port` presents for `sni` (none: no SNI), per `openssl
/// s_client`; `Err` with its output when the handshake fails.
pub fn served_cn(port: u16, sni: Option<&str>, extra: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    match sni {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cn = text
        .lines()
        .find_map(|l| l.strip_prefix("subject=CN = "))
        .map(str::to_owned);
    match cn {
        Some(cn) if out.status.success() => Ok(cn),
        _ => Err(text),
    }
}

/// Run a Python snippet (with `ssl` and `socket` imported, `PORT` set), returning its stdout.
pub fn python(port: u16, code: &str) -> String {
    let script = format!("import ssl, socket, sys, warnings\nwarnings.simplefilter('ignore')\nPORT = {port}\n{code}\n");
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
