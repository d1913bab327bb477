//! Hostile and broken backends, replayed against both request paths. Every case of
//! `e2e/corpus/hostile-backends.txt` is played by two `rusty-echo --script` backends of one
//! service and requested through `rusty-lb` with its fast lane and without it: the client must
//! get what the case expects, the backends must have received the request as often as it
//! says (a GET that failed goes to the other backend once; a POST never twice), and a probe
//! request afterwards, through the same single worker thread and so the same upstream pool,
//! must get its own answer.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusty_e2e::*;

fn corpus_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/hostile-backends.txt")
}

/// What a client can get.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A final status, its body whole.
    Status(u16),
    /// A final status's head, then a close before the body was whole.
    Cut,
    /// No answer at all.
    Closed,
}

fn outcome(word: &str) -> Outcome {
    match word {
        "cut" => Outcome::Cut,
        "closed" => Outcome::Closed,
        n => Outcome::Status(n.parse().unwrap_or_else(|_| panic!("expect {n:?}"))),
    }
}

#[derive(Debug, Default)]
struct Case {
    name: String,
    rule: String,
    method: String,
    extra: Vec<u8>,
    raw: Option<Vec<u8>>,
    then_send: Option<Vec<u8>>,
    expect: Option<Outcome>,
    expect_lane: Option<Outcome>,
    expect_pipeline: Option<Outcome>,
    body: Option<Vec<u8>>,
    headers: Vec<String>,
    no_headers: Vec<String>,
    interim: usize,
    arrivals: (usize, usize),
    arrivals_lane: Option<(usize, usize)>,
    arrivals_pipeline: Option<(usize, usize)>,
}

/// `N` or `N..M`, inclusive.
fn range(s: &str) -> (usize, usize) {
    match s.split_once("..") {
        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
        None => (s.parse().unwrap(), s.parse().unwrap()),
    }
}

/// The bytes of a `"quoted"` corpus string (the escapes of `rusty-echo`'s script reader).
fn unquote(s: &str) -> Vec<u8> {
    let inner = s.trim().strip_prefix('"').and_then(|s| s.strip_suffix('"'));
    let inner = inner.unwrap_or_else(|| panic!("not quoted: {s}"));
    let mut out = Vec::new();
    let mut bytes = inner.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next().expect("an escape") {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'\\' => out.push(b'\\'),
            b'"' => out.push(b'"'),
            b'x' => {
                let h: String = [bytes.next().unwrap(), bytes.next().unwrap()]
                    .iter()
                    .map(|&b| b as char)
                    .collect();
                out.push(u8::from_str_radix(&h, 16).unwrap());
            }
            other => panic!("unknown escape \\{}", other as char),
        }
    }
    out
}

fn corpus() -> Vec<Case> {
    let text = std::fs::read_to_string(corpus_path()).unwrap();
    let mut cases: Vec<Case> = Vec::new();
    let mut rule = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(r) = line.strip_prefix("## ") {
            rule = r.to_owned();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix("case ") {
            cases.push(Case {
                name: name.to_owned(),
                rule: rule.clone(),
                method: "GET".into(),
                arrivals: (1, 1),
                ..Case::default()
            });
            continue;
        }
        let case = cases.last_mut().expect("a case line first");
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "request" => {
                let (method, extra) = rest.split_once(' ').unwrap_or((rest, ""));
                case.method = method.to_owned();
                if !extra.is_empty() {
                    case.extra = unquote(extra);
                }
            }
            "request-raw" => case.raw = Some(unquote(rest)),
            "then-send" => case.then_send = Some(unquote(rest)),
            "expect" => case.expect = Some(outcome(rest)),
            "expect-lane" => case.expect_lane = Some(outcome(rest)),
            "expect-pipeline" => case.expect_pipeline = Some(outcome(rest)),
            "expect-body" => case.body = Some(unquote(rest)),
            "expect-header" => case.headers.push(
                String::from_utf8(unquote(rest))
                    .unwrap()
                    .to_ascii_lowercase(),
            ),
            "expect-no-header" => case.no_headers.push(rest.to_ascii_lowercase()),
            "interim" => case.interim = rest.parse().unwrap(),
            "arrivals" => case.arrivals = range(rest),
            "arrivals-lane" => case.arrivals_lane = Some(range(rest)),
            "arrivals-pipeline" => case.arrivals_pipeline = Some(range(rest)),
            // The backend's lines, played by rusty-echo.
            "send" | "repeat" | "sleep" | "close" | "early" => {}
            other => panic!("case {}: unknown line {other:?}", case.name),
        }
    }
    cases
}

/// What the client saw.
#[derive(Debug)]
struct Seen {
    outcome: Outcome,
    interim: usize,
    head: String,
    body: Vec<u8>,
}

fn read_head(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = Vec::new();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        head.push_str(&line);
        if line == "\r\n" {
            return Some(head);
        }
    }
}

/// The status of a head, 0 for one that is no HTTP/1.1 status line.
fn status_of(head: &str) -> u16 {
    head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Send `request` on a new connection and read its answer as a client frames it.
fn ask(port: u16, request: &[u8], head_request: bool, then_send: Option<&[u8]>) -> Seen {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut interim = 0;
    let head = loop {
        let Some(head) = read_head(&mut r) else {
            return Seen {
                outcome: Outcome::Closed,
                interim,
                head: String::new(),
                body: vec![],
            };
        };
        let status = status_of(&head);
        if (100..200).contains(&status) {
            interim += 1;
            continue;
        }
        break head;
    };
    let status = status_of(&head);
    let mut body = Vec::new();
    let whole = if head_request || status == 204 || status == 304 {
        true
    } else if header(&head, "transfer-encoding").is_some() {
        read_chunked(&mut r, &mut body)
    } else if let Some(n) = header(&head, "content-length") {
        let n: usize = n.parse().unwrap_or(0);
        body.resize(n, 0);
        r.read_exact(&mut body).is_ok()
    } else {
        r.read_to_end(&mut body).is_ok()
    };
    if let Some(bytes) = then_send {
        let _ = s.write_all(bytes);
        std::thread::sleep(Duration::from_millis(200));
    }
    Seen {
        outcome: if whole {
            Outcome::Status(status)
        } else {
            Outcome::Cut
        },
        interim,
        head,
        body,
    }
}

fn read_chunked(r: &mut BufReader<TcpStream>, body: &mut Vec<u8>) -> bool {
    loop {
        let mut size = String::new();
        if r.read_line(&mut size).unwrap_or(0) == 0 {
            return false;
        }
        let Ok(n) = usize::from_str_radix(size.trim_end().split(';').next().unwrap_or(""), 16)
        else {
            return false;
        };
        if n == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return false;
                }
                if line == "\r\n" {
                    return true;
                }
            }
        }
        let mut chunk = vec![0; n + 2];
        if r.read_exact(&mut chunk).is_err() {
            return false;
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

/// Bodies the backends recorded (after answering early) that hold the request sent after it.
fn smuggled_in_bodies(records: &[PathBuf]) -> usize {
    records
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            text.lines()
                .filter(|l| l.starts_with("body ") && l.contains("smuggled"))
                .count()
        })
        .sum()
}

/// Requests the backends received, by path, from their `--record` files.
fn arrivals(records: &[PathBuf]) -> BTreeMap<String, usize> {
    let mut by_path = BTreeMap::new();
    for file in records {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().filter(|l| !l.starts_with("body ")) {
            let path = line.split(' ').nth(1).unwrap_or("").to_owned();
            *by_path.entry(path).or_default() += 1;
        }
    }
    by_path
}

#[test]
fn hostile_backends_get_what_the_corpus_says_on_both_paths_and_reach_no_other_request() {
    let cases = corpus();
    assert!(cases.len() > 60, "only {} cases", cases.len());
    let dir = TempDir::new("hostile");
    let script = corpus_path().display().to_string();
    let records = [dir.path("b1.log"), dir.path("b2.log")];
    let backends: Vec<Echo> = records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            Echo::start_with(
                &format!("b{}", i + 1),
                &[
                    "--script",
                    &script,
                    "--record",
                    &record.display().to_string(),
                ],
            )
        })
        .collect();
    let table = serde_json::json!({"version": 1, "services": [{
        "name": "hostile", "retries": 2, "read_timeout_ms": 500, "eject_ms": 1,
        "backends": backends.iter().enumerate()
            .map(|(i, b)| serde_json::json!({"id": format!("b{}", i + 1), "addr": b.addr()}))
            .collect::<Vec<_>>()}]});
    let table_path = dir.path("table.json");
    write_atomic(&table_path, &table.to_string());
    let start = |extra: &[&str]| {
        let mut args = vec![
            "--table".to_owned(),
            table_path.display().to_string(),
            "--threads".to_owned(),
            "1".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let lb = Lb::start(&args);
        lb.wait_version(1, Duration::from_secs(10));
        lb
    };
    let paths = [
        ("lane", start(&[])),
        ("pipeline", start(&["--no-fast-lane"])),
    ];

    let mut failures = Vec::new();
    for case in cases
        .iter()
        .filter(|c| c.name != "probe" && c.name != "smuggled")
    {
        let path = format!("/case/{}", case.name);
        let request = match &case.raw {
            Some(raw) => String::from_utf8(raw.clone())
                .unwrap()
                .replace("{path}", &path)
                .into_bytes(),
            None => {
                let mut r = format!("{} {path} HTTP/1.1\r\nHost: a\r\n", case.method).into_bytes();
                if case.extra.is_empty() {
                    r.extend_from_slice(b"\r\n");
                } else {
                    // Extra header lines, then the empty line and any body they announce.
                    r.extend_from_slice(&case.extra);
                }
                r
            }
        };
        for (name, lb) in &paths {
            let fail =
                |what: String| format!("[{}] {} on the {name}: {what}", case.rule, case.name);
            let before = arrivals(&records);
            let seen = ask(
                lb.port,
                &request,
                case.method == "HEAD",
                case.then_send.as_deref(),
            );
            // The backends are done with the case once the client has its answer, or shortly.
            std::thread::sleep(Duration::from_millis(30));
            let after = arrivals(&records);
            let count = |m: &BTreeMap<String, usize>, p: &str| m.get(p).copied().unwrap_or(0);
            let expected = match *name {
                "lane" => case.expect_lane.clone(),
                _ => case.expect_pipeline.clone(),
            }
            .or_else(|| case.expect.clone())
            .unwrap_or_else(|| panic!("case {} expects nothing", case.name));
            if seen.outcome != expected {
                failures.push(fail(format!(
                    "got {:?}, expected {expected:?}: {:?}",
                    seen.outcome, seen.head
                )));
            }
            if seen.interim != case.interim {
                failures.push(fail(format!(
                    "{} interim responses, expected {}",
                    seen.interim, case.interim
                )));
            }
            if let Some(body) = &case.body {
                if &seen.body != body {
                    failures.push(fail(format!(
                        "body {:?}",
                        String::from_utf8_lossy(&seen.body)
                    )));
                }
            }
            let head = seen.head.to_ascii_lowercase();
            for h in &case.headers {
                if !head.contains(&format!("{h}\r\n")) {
                    failures.push(fail(format!("no {h:?} in {head:?}")));
                }
            }
            for h in &case.no_headers {
                if header(&head, h).is_some() {
                    failures.push(fail(format!("{h} reached the client: {head:?}")));
                }
            }
            let arrived = count(&after, &path) - count(&before, &path);
            let (low, high) = match *name {
                "lane" => case.arrivals_lane,
                _ => case.arrivals_pipeline,
            }
            .unwrap_or(case.arrivals);
            if !(low..=high).contains(&arrived) {
                failures.push(fail(format!(
                    "{arrived} arrivals at the backends, expected {low}..={high}"
                )));
            }
            if count(&after, "/case/smuggled") != count(&before, "/case/smuggled")
                || smuggled_in_bodies(&records) > 0
            {
                failures.push(fail("bytes sent after the answer reached a backend".into()));
            }
            // The probe: a request of its own must get its own answer.
            let probe = ask(
                lb.port,
                b"GET /case/probe HTTP/1.1\r\nHost: a\r\n\r\n",
                false,
                None,
            );
            if probe.outcome != Outcome::Status(200) || probe.body != b"probe-ok" {
                failures.push(fail(format!(
                    "the probe after it got {:?} {:?}",
                    probe.outcome,
                    String::from_utf8_lossy(&probe.body)
                )));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
