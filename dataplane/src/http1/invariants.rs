//! What must hold for any bytes a client sends, checked by the fuzz target `request` and by
//! the replay of its corpus in the unit tests: the request checks never panic, what they pass
//! has one reading, and the fast lane never takes a request the pipeline would refuse.

use super::editor::{Origin, Proto, RequestIds};
use super::head::plain_request;
use super::request::{check_raw, check_request_line};
use super::Limits;

/// What must hold for any bytes (the fuzz target `request`): no panic; whatever passes has one
/// way to read its body and exactly one valid Host (or none, on HTTP/1.0); and the fast lane
/// never takes as plain a request the pipeline would refuse (the byte scan runs before either).
pub fn request_invariants(data: &[u8]) {
    let limits = Limits::default();
    let verdict = check_raw(data, &limits);
    let mut upstream = Vec::new();
    let origin = Origin {
        client: Some(b"127.0.0.1"),
        proto: Proto::Http,
    };
    let plain = plain_request(
        data,
        &limits,
        &origin,
        &RequestIds::with_prefix(0),
        &mut upstream,
    );
    if let Ok(Some(p)) = plain {
        if check_request_line(&data[..p.len]).is_ok() {
            assert_eq!(
                verdict,
                Some(Ok(())),
                "the lane takes what the pipeline refuses: {data:?}"
            );
            // What goes upstream is one complete head, of the same request, with one Host.
            let mut headers = [httparse::EMPTY_HEADER; 256];
            let mut sent = httparse::Request::new(&mut headers);
            let mut got = [httparse::EMPTY_HEADER; 256];
            let mut received = httparse::Request::new(&mut got);
            let _ = received.parse(data);
            assert_eq!(
                sent.parse(&upstream).ok(),
                Some(httparse::Status::Complete(upstream.len())),
                "the upstream head is not one complete head: {upstream:?}"
            );
            assert_eq!((sent.method, sent.path), (received.method, received.path));
            let hosts = sent
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            assert_eq!(hosts.count(), 1, "{upstream:?}");
        }
    }
    let Some(Ok(())) = verdict else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(data).expect("parsed once already");
    let count = |name: &str| {
        parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    let (te, cl, host) = (
        count("transfer-encoding"),
        count("content-length"),
        count("host"),
    );
    assert!(te + cl <= 1, "passed with {te} TE and {cl} CL: {data:?}");
    assert!(
        host == 1 || (host == 0 && parsed.version == Some(0)),
        "passed with {host} Host headers: {data:?}"
    );
    let target = parsed.path.unwrap_or("");
    assert!(
        target.starts_with('/')
            || target
                .get(..4)
                .is_some_and(|s| s.eq_ignore_ascii_case("http"))
            || target == "*",
        "passed with target {target:?}"
    );
    assert!(target.len() <= limits.max_target);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input of the committed fuzz corpus, replayed on each test run.
    #[test]
    fn the_request_fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/request");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/request") {
            request_invariants(&std::fs::read(entry.expect("entry").path()).expect("read"));
            n += 1;
        }
        assert!(n >= 50, "only {n} inputs in {}", dir.display());
    }
}
