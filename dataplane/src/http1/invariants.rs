//! What must hold for any bytes a client sends, checked by the fuzz target `request` and by
//! the replay of its corpus in the unit tests: the request checks never panic, what they pass
//! has one reading, and the fast lane never takes a request the pipeline would refuse.

use super::editor::{Origin, Proto, RequestIds};
use super::head::plain_request;
use super::request::{check_raw, check_request_line, origin_form};
use super::scan::{feed_marked, Phase};
use super::Limits;

/// The bytes as the connection front passes them to either path: scanned (a later HTTP/1.x
/// version read as 1.1) and an absolute-form head in origin form; `None` when it refuses them.
fn through_the_front(data: &[u8]) -> Option<Vec<u8>> {
    let mut bytes = data.to_vec();
    let fed = feed_marked(&mut Phase::head(), &mut bytes).ok()?;
    match fed.absolute {
        Some((Some(target), Some(end))) => {
            let mut out = bytes[..target].to_vec();
            out.extend(origin_form(&bytes[target..end])?);
            out.extend_from_slice(&bytes[end..]);
            Some(out)
        }
        // The front holds an incomplete absolute-form head back: nobody sees it yet.
        Some(_) => None,
        None => Some(bytes),
    }
}

/// What must hold for any bytes (the fuzz target `request`): no panic; whatever passes has one
/// way to read its body and exactly one valid Host (or none, on HTTP/1.0); and the fast lane
/// never takes as plain a request the pipeline would refuse. Both read what the connection
/// front lets through, and the lane drops the empty lines before a request line first.
pub fn request_invariants(raw: &[u8]) {
    let limits = Limits::default();
    let Some(passed) = through_the_front(raw) else {
        return;
    };
    let data = &passed[..];
    let verdict = check_raw(data, &limits);
    // The lane drops empty lines before a request line; the pipeline's parser skips them.
    let lead = data
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let mut upstream = Vec::new();
    let origin = Origin {
        client: Some(b"127.0.0.1"),
        trusted: false,
        proto: Proto::Http,
    };
    let plain = plain_request(
        &data[lead..],
        &limits,
        &origin,
        &RequestIds::with_prefix(0),
        &mut upstream,
    );
    if let Ok(Some(p)) = plain {
        if check_request_line(&data[..lead + p.len]).is_ok() {
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
