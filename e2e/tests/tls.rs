//! The TLS listener with certificates from a directory, tested with real clients (curl,
//! `openssl s_client`, Python's `ssl`) and certificates the `openssl` command issued: SNI
//! selection, wildcards, the default, unknown names, old protocol versions, ALPN, resumption,
//! bad pairs at start and at reload, reload under load, 421, the forwarded scheme on both
//! request paths, the handshake deadline and the connection cap.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rusty_e2e::tls::{curl, https_codes, https_requests, python, served_cn, Pki, TlsLb};
use rusty_e2e::*;

/// A CA, and a certificate directory with `app` (app.test and *.wild.test), `other`
/// (other.test) and, if asked, `default` (fallback.test).
fn pki(tag: &str, default: bool) -> (TempDir, Pki, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let pki = Pki::new(&dir.path("ca"));
    let certs = dir.path("certs");
    pki.issue(&certs, "app", &["DNS:app.test", "DNS:*.wild.test"], 10);
    pki.issue(&certs, "other", &["DNS:other.test", "IP:127.0.0.1"], 10);
    if default {
        pki.issue(&certs, "default", &["DNS:fallback.test"], 10);
    }
    (dir, pki, certs)
}

/// A TLS data plane in front of one echo backend.
fn tls_stack(tag: &str, default: bool, extra: &[&str]) -> (TempDir, Pki, Echo, TlsLb) {
    let (dir, pki, certs) = pki(tag, default);
    let echo = Echo::start_with("e1", &["--echo-headers"]);
    let table = dir.path("table.json");
    write_atomic(&table, &rusty_e2e::table(1, &[("e1", &echo.addr(), 1, 0)]));
    let mut args = vec!["--table".to_owned(), table.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let lb = TlsLb::start(&certs, &args);
    lb.lb.wait_version(1, Duration::from_secs(10));
    (dir, pki, echo, lb)
}

fn tls_metric(lb: &Lb, result: &str) -> f64 {
    lb.metric(&format!(
        "rustybalancer_tls_handshakes_total{{result=\"{result}\"}}"
    ))
}

#[test]
fn sni_picks_the_exact_name_then_a_wildcard_then_the_default() {
    let (_dir, _pki, _echo, lb) = tls_stack("sni", true, &[]);
    for (sni, cn) in [
        (Some("app.test"), "app"),
        (Some("APP.test"), "app"),
        (Some("other.test"), "other"),
        (Some("x.wild.test"), "app"),
        (Some("a.b.wild.test"), "default"),
        (Some("wild.test"), "default"),
        (Some("unknown.example"), "default"),
        (None, "default"),
    ] {
        assert_eq!(
            served_cn(lb.tls_port, sni, &[]).as_deref(),
            Ok(cn),
            "SNI {sni:?}"
        );
    }
    // And a real client trusts what it gets, over the name it asked for.
    let r = curl(lb.tls_port, "x.wild.test", "/hello", &_pki.ca(), &[]);
    assert_eq!(r.status, 200, "{}", r.error);
    assert!(r.body.starts_with("hello from e1"), "{}", r.body);
}

#[test]
fn an_unknown_name_without_a_default_is_refused_with_unrecognized_name() {
    let (_dir, _pki, _echo, lb) = tls_stack("unknown", false, &[]);
    let out = python(
        lb.tls_port,
        r#"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection(("127.0.0.1", PORT))
try:
    ctx.wrap_socket(s, server_hostname="nobody.example"); print("connected")
except ssl.SSLError as e:
    print("refused", e.reason)
"#,
    );
    assert!(out.contains("refused TLSV1_UNRECOGNIZED_NAME"), "{out}");
    assert_eq!(tls_metric(&lb.lb, "unrecognized_name"), 1.0);
    // Without any SNI there is nothing to serve either.
    let err = served_cn(lb.tls_port, None, &[]).unwrap_err();
    assert!(err.contains("unrecognized name"), "{err}");
    // The known names still work.
    assert_eq!(
        served_cn(lb.tls_port, Some("app.test"), &[]).as_deref(),
        Ok("app")
    );
}

#[test]
fn tls_1_0_and_1_1_are_refused_and_1_2_and_1_3_negotiate_h2_or_http_1_1() {
    let (_dir, _pki, _echo, lb) = tls_stack("versions", true, &[]);
    for version in ["TLSv1", "TLSv1_1"] {
        let failed = tls_metric(&lb.lb, "failed");
        let out = python(
            lb.tls_port,
            &format!(
                r#"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1; ctx.maximum_version = ssl.TLSVersion.{version}
ctx.set_ciphers("DEFAULT@SECLEVEL=0")
s = socket.create_connection(("127.0.0.1", PORT))
try:
    print("connected", ctx.wrap_socket(s, server_hostname="app.test").version())
except ssl.SSLError as e:
    print("refused", e.reason)
"#
            ),
        );
        // The refusal is the server's alert, not the client declining to offer the version.
        assert!(
            out.contains("refused") && out.contains("ALERT"),
            "{version}: {out}"
        );
        lb.lb.wait_metric(
            "rustybalancer_tls_handshakes_total{result=\"failed\"}",
            failed + 1.0,
            Duration::from_secs(5),
        );
    }
    // HTTP/2 when the client offers it, HTTP/1.1 when it offers only that.
    for (flag, version, offered, chosen) in [
        ("-tls1_2", "TLSv1.2", "h2,http/1.1", "h2"),
        ("-tls1_3", "TLSv1.3", "h2,http/1.1", "h2"),
        ("-tls1_2", "TLSv1.2", "http/1.1", "http/1.1"),
        ("-tls1_3", "TLSv1.3", "http/1.1", "http/1.1"),
    ] {
        let out = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", lb.tls_port),
            ])
            .args(["-servername", "app.test", flag, "-alpn", offered])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("Protocol  : {version}"))
                || text.contains(&format!("New, {version}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("ALPN protocol: {chosen}\n")),
            "{offered}: {text}"
        );
    }
}

#[test]
fn sessions_resume_with_tickets() {
    let (dir, _pki, _echo, lb) = tls_stack("resume", true, &[]);
    let sess = dir.path("session.pem");
    let connect = |args: &[&str]| {
        // The ticket arrives after the handshake: give s_client a moment to read it.
        let mut child = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", lb.tls_port),
            ])
            .args(["-servername", "app.test"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let sess_arg = sess.display().to_string();
    for version in ["-tls1_3", "-tls1_2"] {
        let first = connect(&[version, "-sess_out", &sess_arg]);
        assert!(first.contains("New, TLSv1."), "{first}");
        let second = connect(&[version, "-sess_in", &sess_arg]);
        assert!(second.contains("Reused, TLSv1."), "{version}: {second}");
    }
}

fn refused_start(certs: &Path) -> String {
    let dir = TempDir::new("tlsstart");
    let table = dir.path("table.json");
    write_atomic(&table, &rusty_e2e::table(1, &[("a", "127.0.0.1:1", 1, 0)]));
    let out = std::process::Command::new(bin("rusty-lb"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--tls-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .args(["--table", &table.display().to_string()])
        .args(["--certs", &certs.display().to_string()])
        .output()
        .expect("run rusty-lb");
    assert_eq!(out.status.code(), Some(2));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_pair_at_start_refuses_to_start_with_the_file_named() {
    let (dir, pki, certs) = pki("badpairs", false);
    // A key that belongs to another certificate.
    let mismatched = dir.path("mismatched");
    pki.issue(&mismatched, "a", &["DNS:a.test"], 10);
    pki.issue(&mismatched, "b", &["DNS:b.test"], 10);
    std::fs::rename(mismatched.join("b.key"), mismatched.join("a.key")).unwrap();
    std::fs::remove_file(mismatched.join("b.crt")).unwrap();
    let err = refused_start(&mismatched);
    assert!(
        err.contains("a.key: this key does not match the certificate in"),
        "{err}"
    );

    let expired = dir.path("expired");
    pki.issue(&expired, "old", &["DNS:old.test"], -1);
    let err = refused_start(&expired);
    assert!(err.contains("old.crt: the certificate expired"), "{err}");

    let garbage = dir.path("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("x.crt"), "not a certificate\n").unwrap();
    std::fs::write(garbage.join("x.key"), "not a key\n").unwrap();
    let err = refused_start(&garbage);
    assert!(err.contains("x.crt: no PEM certificate in it"), "{err}");

    let unpaired = dir.path("unpaired");
    pki.issue(&unpaired, "lonely", &["DNS:lonely.test"], 10);
    std::fs::remove_file(unpaired.join("lonely.key")).unwrap();
    let err = refused_start(&unpaired);
    assert!(
        err.contains("lonely.crt: has no matching NAME.key"),
        "{err}"
    );

    let empty = dir.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = refused_start(&empty);
    assert!(err.contains("no certificate pair"), "{err}");

    // The good directory starts.
    let table = dir.path("table.json");
    write_atomic(&table, &rusty_e2e::table(1, &[("a", "127.0.0.1:1", 1, 0)]));
    let lb = TlsLb::start(&certs, &["--table".to_owned(), table.display().to_string()]);
    assert_eq!(
        served_cn(lb.tls_port, Some("app.test"), &[]).as_deref(),
        Ok("app")
    );
}

#[test]
fn a_reload_adds_and_replaces_pairs_and_keeps_the_old_one_of_a_bad_pair() {
    let (dir, pki, certs) = pki("reload", true);
    let table = dir.path("table.json");
    write_atomic(&table, &rusty_e2e::table(1, &[("a", "127.0.0.1:1", 1, 0)]));
    let lb = TlsLb::start(&certs, &["--table".to_owned(), table.display().to_string()]);
    assert_eq!(
        served_cn(lb.tls_port, Some("new.test"), &[]).as_deref(),
        Ok("default")
    );

    // A new pair, and `other` replaced by a broken one.
    pki.issue(&certs, "new", &["DNS:new.test"], 10);
    std::fs::write(certs.join("other.key"), "broken\n").unwrap();
    lb.lb.proc.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_cn(lb.tls_port, Some("new.test"), &[]).as_deref() != Ok("new") {
        assert!(Instant::now() < deadline, "the new pair never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        served_cn(lb.tls_port, Some("other.test"), &[]).as_deref(),
        Ok("other"),
        "the loaded `other` keeps serving"
    );
    assert_eq!(
        lb.lb
            .metric("rustybalancer_tls_certificate_loads_total{result=\"refused\"}"),
        1.0
    );
    let log = lb.lb.proc.stderr_text();
    assert!(
        log.contains("other.key"),
        "the refusal names the file: {log}"
    );
    assert!(!log.contains("PRIVATE KEY"), "no key material in the log");
    drop(dir);
}

#[test]
fn reloads_under_load_fail_no_handshake_and_no_request() {
    let (_dir, pki, _echo, lb) = tls_stack("reloadload", true, &[]);
    let child = https_requests(lb.tls_port, "app.test", &pki.ca(), 300)
        .spawn()
        .unwrap();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        lb.lb.proc.signal("HUP");
    }
    let codes = https_codes(&child.wait_with_output().unwrap());
    let ok = codes.iter().filter(|c| *c == "200").count();
    assert_eq!(ok, 300, "{codes:?}");
    assert!(
        lb.lb
            .metric("rustybalancer_tls_certificate_loads_total{result=\"loaded\"}")
            > 3.0
    );
    assert_eq!(tls_metric(&lb.lb, "failed"), 0.0);
}

#[test]
fn a_host_outside_the_certificate_gets_421_on_both_paths() {
    let (_dir, pki, _echo, lb) = tls_stack("misdirected", true, &[]);
    let ca = pki.ca();
    // GET (the fast lane's kind of request) and POST (the pipeline's).
    for method in [&["-X", "GET"][..], &["-X", "POST", "--data", "x=1"][..]] {
        let mut extra = method.to_vec();
        extra.extend(["-H", "Host: other.test"]);
        let r = curl(lb.tls_port, "app.test", "/", &ca, &extra);
        assert_eq!(r.status, 421, "{method:?}: {} {}", r.body, r.error);
        assert!(r.body.contains("misdirected request"), "{}", r.body);
        // A host the certificate covers, including by its wildcard, is served.
        let mut extra = method.to_vec();
        extra.extend(["-H", "Host: deep.wild.test"]);
        let r = curl(lb.tls_port, "app.test", "/", &ca, &extra);
        assert_eq!(r.status, 200, "{method:?}: {}", r.error);
    }
    // Plain HTTP has no certificate to check against.
    let r = lb.lb.get("other.test", "/");
    assert_eq!(r.status, 200);
}

#[test]
fn requests_over_tls_say_https_to_the_backend_on_both_paths() {
    let (_dir, pki, _echo, lb) = tls_stack("proto", true, &[]);
    let ca = pki.ca();
    let lane = "rustybalancer_fast_lane_requests_total";
    for (method, on_lane) in [
        (&["-X", "GET"][..], 1.0),
        (&["-X", "POST", "--data", "x=1"][..], 0.0),
    ] {
        let before = lb.lb.metric(lane);
        let r = curl(lb.tls_port, "app.test", "/", &ca, method);
        assert_eq!(r.status, 200, "{}", r.error);
        let forwarded = r.body.to_ascii_lowercase();
        assert!(
            forwarded.contains("x-forwarded-proto: https\r\n"),
            "{method:?}: {}",
            r.body
        );
        lb.lb
            .wait_metric(lane, before + on_lane, Duration::from_secs(5));
    }
    let r = lb.lb.get("localhost", "/");
    let forwarded = r.body.to_ascii_lowercase();
    assert!(
        forwarded.contains("x-forwarded-proto: http\r\n"),
        "{}",
        r.body
    );
}

#[test]
fn plain_http_to_the_tls_port_gets_400_that_says_so() {
    let (_dir, _pki, _echo, lb) = tls_stack("plain", true, &[]);
    let (answer, closed) = raw(lb.tls_port, "GET / HTTP/1.1\r\nHost: app.test\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("plain HTTP request was sent to the HTTPS port"),
        "{answer}"
    );
    assert!(closed);
    assert_eq!(tls_metric(&lb.lb, "plain_http"), 1.0);
}

#[test]
fn a_silent_or_trickling_tls_client_is_closed_at_the_handshake_deadline() {
    let (_dir, _pki, _echo, lb) = tls_stack("deadline", true, &["--tls-handshake-timeout", "1"]);
    // Silent after connecting.
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", lb.tls_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // A ClientHello record header, then a byte every 200 ms: the deadline counts from accept.
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", lb.tls_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let closed = loop {
        if s.write_all(&[0]).is_err() {
            break true;
        }
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => break false,
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(5) {
            break false;
        }
    };
    assert!(
        closed,
        "trickling client still open after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    lb.lb.wait_metric(
        "rustybalancer_tls_handshakes_total{result=\"timeout\"}",
        2.0,
        Duration::from_secs(5),
    );
}

#[test]
fn tls_connections_count_against_max_connections() {
    let (_dir, pki, _echo, lb) = tls_stack("cap", true, &["--max-connections", "2"]);
    // Two TLS connections held open after their handshake.
    let open = |_: u8| {
        std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", lb.tls_port),
            ])
            .args(["-servername", "app.test", "-quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let held: Vec<_> = (0..2).map(open).collect();
    lb.lb.wait_metric(
        "rustybalancer_tls_handshakes_total{result=\"ok\"}",
        2.0,
        Duration::from_secs(5),
    );
    let r = curl(lb.tls_port, "app.test", "/", &pki.ca(), &[]);
    assert_eq!(r.status, 0, "refused over the cap: {}", r.body);
    assert_eq!(
        lb.lb
            .metric("rustybalancer_client_connections_refused_total"),
        1.0
    );
    for mut child in held {
        let _ = child.kill();
        let _ = child.wait();
    }
    // Once they close, a new one is served.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = curl(lb.tls_port, "app.test", "/", &pki.ca(), &[]);
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", r.error);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A table of one service `web` with these extra fields, in front of `addr`.
fn service_table(version: u64, addr: &str, extra: serde_json::Value) -> String {
    // A new backend id per version: a failed handshake's ejection is not carried over.
    let id = format!("b{version}");
    let mut svc = serde_json::json!({"name": "web", "backends": [{"id": id, "addr": addr}]});
    if let (Some(svc), Some(extra)) = (svc.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            svc.insert(k.clone(), v.clone());
        }
    }
    serde_json::json!({"version": version, "services": [svc]}).to_string()
}

#[test]
fn https_redirect_sends_plain_requests_to_https_except_acme_challenges_and_hsts_is_set() {
    let (dir, pki, certs) = pki("redirect", true);
    let echo = Echo::start_with("e1", &["--echo-headers"]);
    let table = dir.path("table.json");
    let extra = serde_json::json!({
        "https_redirect": true,
        "hsts": {"max_age_s": 31536000, "include_subdomains": true}
    });
    write_atomic(&table, &service_table(1, &echo.addr(), extra.clone()));
    let lb = TlsLb::start(&certs, &["--table".to_owned(), table.display().to_string()]);
    lb.lb.wait_version(1, Duration::from_secs(10));

    for request in [
        "GET /a/b?x=1 HTTP/1.1\r\nHost: App.Test:8080\r\n\r\n",
        "POST /a/b?x=1 HTTP/1.1\r\nHost: App.Test:8080\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    ] {
        let mut c = Client::new(lb.lb.port);
        let r = c.request(request).expect("an answer");
        assert_eq!(r.status, 308, "{request}: {}", r.body);
        assert_eq!(
            r.header("location"),
            Some(format!("https://app.test:{}/a/b?x=1", lb.tls_port).as_str()),
            "{request}"
        );
        assert!(r.header("strict-transport-security").is_none(), "never over plain HTTP");
    }
    // ACME HTTP-01 challenges stay on plain HTTP: one the table does not carry goes to the
    // backend (it may run its own ACME client)...
    let r = lb.lb.get("app.test", "/.well-known/acme-challenge/token-1");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.backend(), Some("e1"));
    // ...and one it carries is answered by the data plane, on whichever path takes the
    // request, also for a host no service routes.
    let mut extra = extra;
    extra["hosts"] = serde_json::json!(["app.test"]);
    let mut with_challenge: serde_json::Value =
        serde_json::from_str(&service_table(2, &echo.addr(), extra)).unwrap();
    with_challenge["acme_challenges"] = serde_json::json!({"tok-A_1": "tok-A_1.thumb-print"});
    write_atomic(&table, &with_challenge.to_string());
    lb.lb.proc.signal("HUP");
    lb.lb.wait_version(2, Duration::from_secs(10));
    for request in [
        "GET /.well-known/acme-challenge/tok-A_1 HTTP/1.1\r\nHost: app.test\r\n\r\n",
        "GET /.well-known/acme-challenge/tok-A_1 HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: close\r\n\r\n",
    ] {
        let r = Client::new(lb.lb.port).request(request).expect("an answer");
        assert_eq!((r.status, r.body.as_str()), (200, "tok-A_1.thumb-print"), "{request}");
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.backend(), None, "answered by the data plane");
    }
    assert_eq!(
        lb.lb.get("elsewhere.test", "/").status,
        404,
        "not routed otherwise"
    );

    // Over TLS: served, with the service's HSTS on both paths.
    for method in [
        &["-X", "GET", "-i"][..],
        &["-X", "POST", "--data", "x=1", "-i"][..],
    ] {
        let r = curl(lb.tls_port, "app.test", "/a", &pki.ca(), method);
        assert_eq!(r.status, 200, "{method:?}: {}", r.error);
        let head = r.body.to_ascii_lowercase();
        assert_eq!(
            head.matches("strict-transport-security: max-age=31536000; includesubdomains\r\n")
                .count(),
            1,
            "{method:?}: {}",
            r.body
        );
    }
}

/// A second data plane serving TLS in front of an echo backend, with a certificate for
/// `backend.test` and 127.0.0.1: the HTTPS backend of the tests below. Being a data plane, it
/// answers 421 to a Host its certificate does not cover, so requests name `backend.test`.
fn tls_backend(dir: &TempDir, pki: &Pki) -> (Echo, TlsLb) {
    let certs = dir.path("backend-certs");
    // The default pair: a client that verifies the address sends no SNI.
    pki.issue(&certs, "default", &["DNS:backend.test", "IP:127.0.0.1"], 10);
    let echo = Echo::start_with("behind-tls", &["--echo-headers"]);
    let table = dir.path("backend-table.json");
    write_atomic(&table, &rusty_e2e::table(1, &[("e", &echo.addr(), 1, 0)]));
    let lb = TlsLb::start(&certs, &["--table".to_owned(), table.display().to_string()]);
    lb.lb.wait_version(1, Duration::from_secs(10));
    (echo, lb)
}

#[test]
fn https_backends_are_verified_against_the_configured_ca_and_name() {
    let dir = TempDir::new("upstreamtls");
    let pki = Pki::new(&dir.path("ca"));
    let other = Pki::new(&dir.path("other-ca"));
    let (_echo, backend) = tls_backend(&dir, &pki);
    let addr = format!("127.0.0.1:{}", backend.tls_port);
    let ca = std::fs::read_to_string(pki.ca()).unwrap();
    let wrong_ca = std::fs::read_to_string(other.ca()).unwrap();

    let table = dir.path("table.json");
    write_atomic(
        &table,
        &service_table(
            1,
            &addr,
            serde_json::json!({"upstream_tls": {"server_name": "backend.test", "ca_pem": ca}}),
        ),
    );
    let lb = Lb::start(&["--table".to_owned(), table.display().to_string()]);
    lb.wait_version(1, Duration::from_secs(10));
    // GET and POST alike go over TLS (the pipeline's connector), and reuse the connection.
    for _ in 0..3 {
        let r = lb.get("backend.test", "/over-tls");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("hello from behind-tls"), "{}", r.body);
    }
    let mut c = Client::new(lb.port);
    let r = c
        .request("POST /p HTTP/1.1\r\nHost: backend.test\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // Four requests over pooled TLS connections: one per worker thread (two), and on a busy
    // machine a request may come before the previous one's connection is back in the pool.
    // Without pooling it would be four.
    let handshakes = backend
        .lb
        .metric("rustybalancer_tls_handshakes_total{result=\"ok\"}");
    assert!((1.0..=3.0).contains(&handshakes), "{handshakes} handshakes");

    let cases = [
        // Verified by address (an IP SAN) when no name is given, with the CA from a file.
        (
            serde_json::json!({"upstream_tls": {"ca_file": pki.ca().display().to_string()}}),
            200,
        ),
        // Another CA: the backend's certificate is not trusted, so no connection is made
        // (503, as for any backend that cannot be connected to).
        (
            serde_json::json!({"upstream_tls": {"server_name": "backend.test", "ca_pem": wrong_ca}}),
            503,
        ),
        // The right CA, a name the certificate does not cover.
        (
            serde_json::json!({"upstream_tls": {"server_name": "elsewhere.test", "ca_pem": ca}}),
            503,
        ),
        // Plain HTTP to the TLS port: the backend says so.
        (serde_json::json!({}), 400),
    ];
    for (version, (extra, status)) in (2..).zip(cases) {
        write_atomic(&table, &service_table(version, &addr, extra.clone()));
        lb.proc.signal("HUP");
        lb.wait_version(version, Duration::from_secs(10));
        let r = lb.get("backend.test", "/x");
        assert_eq!(
            r.status,
            status,
            "{extra}: {}\n{}",
            r.body,
            lb.proc.stderr_text()
        );
        if status == 503 {
            let failed = format!(
                "rustybalancer_upstream_errors_total{{service=\"web\",backend=\"b{version}\",kind=\"tls_handshake\"}}"
            );
            assert!(
                lb.metric(&failed) >= 1.0,
                "{extra}: counted as a TLS failure"
            );
        }
    }
}

#[test]
fn a_table_with_an_unusable_backend_ca_is_rejected_with_the_field_named() {
    let dir = TempDir::new("badca");
    let table = dir.path("table.json");
    for (extra, says) in [
        (
            serde_json::json!({"upstream_tls": {"ca_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}}),
            "upstream_tls.ca_pem is invalid",
        ),
        (
            serde_json::json!({"upstream_tls": {"ca_pem": "hello"}}),
            "upstream_tls.ca_pem is invalid: holds no PEM certificate",
        ),
        (
            serde_json::json!({"upstream_tls": {"ca_file": "/nonexistent/ca.pem"}}),
            "upstream_tls.ca_file is invalid: /nonexistent/ca.pem",
        ),
        (
            serde_json::json!({"upstream_tls": {"server_name": "bad name"}}),
            "upstream_tls.server_name is invalid",
        ),
        (
            serde_json::json!({"hsts": {"max_age_s": 100, "preload": true}}),
            "hsts.preload is invalid",
        ),
    ] {
        write_atomic(&table, &service_table(1, "127.0.0.1:1", extra.clone()));
        let out = std::process::Command::new(bin("rusty-lb"))
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin", &format!("127.0.0.1:{}", free_port())])
            .args(["--table", &table.display().to_string()])
            .output()
            .expect("run rusty-lb");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {err}");
        assert!(
            err.contains(says) && err.contains("service \"web\""),
            "{extra}: {err}"
        );
    }
}

/// Wait until the TLS listener presents pair `cn` for `sni`.
fn wait_cn(port: u16, sni: &str, cn: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = served_cn(port, Some(sni), &[]);
        if got.as_deref() == Ok(cn) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sni}: expected {cn}, got {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn certificates_from_the_agent_serve_survive_a_restart_and_renew_on_sighup() {
    let dir = TempDir::new("agentcerts");
    let pki = Pki::new(&dir.path("ca"));
    let files = dir.path("agent-certs");
    pki.issue(&files, "app", &["DNS:app.test"], 10);
    let tls = format!(
        "\n[[tls.certificates]]\ncert = \"{0}/app.crt\"\nkey = \"{0}/app.key\"\n",
        files.display()
    );
    let services = echo_service("web", 1, "") + &tls;
    let mut agent = Agent::start("agentcerts", &services);
    agent.wait_serving("web", 1, Duration::from_secs(20));

    let state = dir.path("lb-state");
    let tls_port = free_port();
    let lb_args: Vec<String> = vec![
        "--agent".into(),
        agent.ws_url(),
        "--token-file".into(),
        agent.token_file.display().to_string(),
        "--tls-listen".into(),
        format!("127.0.0.1:{tls_port}"),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    let lb = Lb::start(&lb_args);
    wait_for_port(tls_port, Duration::from_secs(20));
    wait_cn(tls_port, "app.test", "app");
    let r = curl(tls_port, "app.test", "/", &pki.ca(), &[]);
    assert_eq!(r.status, 200, "{}", r.error);

    // Saved for the owner only, and never shown on the admin listener.
    let saved = state.join("certs.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    for path in ["/table", "/metrics"] {
        let body = lb.admin_get(path).body;
        assert!(
            !body.contains("PRIVATE KEY") && !body.contains("BEGIN"),
            "{path}: {body}"
        );
    }
    assert!(!lb.proc.stderr_text().contains("PRIVATE KEY"));
    assert!(!agent.proc.stderr_text().contains("PRIVATE KEY"));

    // A renewal: new files, SIGHUP to the agent, the data plane serves them.
    pki.issue(&files, "app", &["DNS:app.test", "DNS:new.test"], 10);
    agent.proc.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while curl(tls_port, "new.test", "/", &pki.ca(), &[]).status != 200 {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The agent gone, a restarted data plane serves the saved certificates at once.
    agent.kill();
    drop(lb);
    let lb = Lb::start(&lb_args);
    wait_for_port(tls_port, Duration::from_secs(20));
    assert_eq!(
        served_cn(tls_port, Some("new.test"), &[]).as_deref(),
        Ok("app")
    );
    let r = curl(tls_port, "new.test", "/", &pki.ca(), &[]);
    assert_ne!(r.status, 0, "TLS works without the agent: {}", r.error);
    drop(lb);
}

#[test]
fn over_wss_the_agent_is_verified_and_sends_certificates() {
    let dir = TempDir::new("wss");
    let pki = Pki::new(&dir.path("ca"));
    let other = Pki::new(&dir.path("other-ca"));
    let files = dir.path("files");
    pki.issue(&files, "agent", &["DNS:agent.test", "IP:127.0.0.1"], 10);
    pki.issue(&files, "app", &["DNS:app.test"], 10);
    let tls_port = free_port();
    let agent_lines = format!(
        "tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{0}/agent.crt\"\ntls_key = \"{0}/agent.key\"\n",
        files.display()
    );
    let services = echo_service("web", 1, "")
        + &format!(
            "\n[[tls.certificates]]\ncert = \"{0}/app.crt\"\nkey = \"{0}/app.key\"\n",
            files.display()
        );
    let agent = Agent::start_with("wss", &agent_lines, &services);
    agent.wait_serving("web", 1, Duration::from_secs(20));
    wait_for_port(tls_port, Duration::from_secs(10));

    let lb_tls = free_port();
    let start = |ca: &Path| {
        Lb::start(&[
            "--agent".into(),
            format!("wss://127.0.0.1:{tls_port}/v1/tables"),
            "--agent-ca".into(),
            ca.display().to_string(),
            "--token-file".into(),
            agent.token_file.display().to_string(),
            "--tls-listen".into(),
            format!("127.0.0.1:{lb_tls}"),
        ])
    };
    // An agent whose certificate another CA signed is not talked to.
    let wrong = start(&other.ca());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        wrong.table_version(),
        None,
        "no table from an unverified agent"
    );
    assert!(
        wrong.proc.stderr_text().contains("agent unreachable"),
        "{}",
        wrong.proc.stderr_text()
    );
    drop(wrong);

    let lb = start(&pki.ca());
    wait_for_port(lb_tls, Duration::from_secs(20));
    wait_cn(lb_tls, "app.test", "app");
    let r = curl(lb_tls, "app.test", "/", &pki.ca(), &[]);
    assert_eq!(r.status, 200, "{}", r.error);
    assert!(
        lb.table_version().is_some(),
        "the table came over wss:// too"
    );
    let sent = agent.api_get("/metrics").body.lines().find_map(|l| {
        l.strip_prefix("rusty_agent_cert_bundles_sent_total ")
            .map(str::to_owned)
    });
    assert_eq!(sent.as_deref(), Some("1"));
}

#[test]
fn the_agent_checks_https_instances_over_tls_and_sends_its_ca_in_the_table() {
    let dir = TempDir::new("agentupstream");
    let pki = Pki::new(&dir.path("ca"));
    let other = Pki::new(&dir.path("other-ca"));
    let (_echo, backend) = tls_backend(&dir, &pki);
    let service = |name: &str, prefix: &str, ca: &Path| {
        format!(
            "\n[services.{name}]\nruntime = \"static\"\npath_prefix = \"{prefix}\"\naddresses = [\"127.0.0.1:{port}\"]\n\n[services.{name}.upstream_tls]\nserver_name = \"backend.test\"\nca_file = \"{ca}\"\n\n[services.{name}.health]\npath = \"/\"\ninterval = \"100ms\"\nrise = 1\n",
            port = backend.tls_port,
            ca = ca.display()
        )
    };
    let services = service("api", "/", &pki.ca()) + &service("wrong", "/wrong", &other.ca());
    let agent = Agent::start("agentupstream", &services);
    // Checked over TLS against the right CA: in the table; against another CA: never.
    agent.wait_serving("api", 1, Duration::from_secs(20));
    let wrong = agent.status()["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "wrong")
        .cloned()
        .unwrap();
    assert_eq!(wrong["healthy"], 0, "{wrong}");
    let error = wrong["instances"][0]["last_error"].as_str().unwrap_or("");
    assert!(error.contains("TLS"), "{wrong}");

    // The data plane has no copy of the CA file: the table carries it.
    let lb = agent.lb();
    rusty_e2e::wait_backends(&lb, 1, Duration::from_secs(20));
    let table = lb.admin_get("/table").body;
    assert!(
        table.contains("BEGIN CERTIFICATE") && !table.contains("ca_file"),
        "{table}"
    );
    for (method, body) in [("GET", ""), ("POST", "x=1")] {
        let r = rusty_e2e::Client::new(lb.port)
            .request(&format!(
                "{method} /hello HTTP/1.1\r\nHost: backend.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ))
            .unwrap();
        assert_eq!(r.status, 200, "{method}: {}", r.body);
        assert_eq!(r.backend(), Some("behind-tls"), "{method}");
    }
}
