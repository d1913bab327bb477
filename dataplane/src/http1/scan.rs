//! The byte scan of what a client sends: where each request begins and ends (from the requests'
//! own framing, never the responses), whether its request line is well formed as sent, and
//! whether a chunked body's framing is — what Pingora's parser would normalise away before our
//! checks could see it. Pure state machines fed one read at a time, so bytes split anywhere
//! scan the same. Fed by the front's guarded stream, in place: a request line's `HTTP/1.2`
//! (or any later 1.x) is rewritten to `HTTP/1.1`, as RFC 9110 §2.5 says to serve it.

/// Where the client's side of a connection is, as far as its bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading a request head, or waiting for one (nothing of it yet: `between_requests`).
    Head(HeadScan),
    /// `n` bytes of a `Content-Length` body still to come.
    Body(u64),
    /// Reading the framing of a chunked request body.
    Chunked(ChunkScan),
    /// The connection switched protocols (the pipeline let a `101` through to a WebSocket
    /// upgrade): not HTTP any more, never scanned again.
    Tunnel,
}

impl Phase {
    /// The first request of a connection.
    pub fn head() -> Phase {
        Phase::Head(HeadScan {
            line_empty: true,
            seen: false,
            blank: 0,
            blank_cr: false,
            version: 0,
            target_len: 0,
            absolute: false,
            absolute_here: None,
            request_line: false,
            spaces: 0,
            cr: false,
            te: NameMatch::Matching(0),
            cl: NameMatch::Matching(0),
            value: Value::None,
            chunked_match: 0,
            chunked: false,
            content_length: 0,
        })
    }

    /// Between requests: no byte of the next head has arrived, not even an empty line.
    pub fn between_requests(&self) -> bool {
        matches!(self, Phase::Head(h) if !h.started())
    }
}

/// Why the bytes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not `METHOD SP target SP version` in visible ASCII.
    RequestLine,
    /// A target byte no URI may hold (control, space-like, non-ASCII, `"<>`), or a fragment.
    Target,
    /// Chunked framing that RFC 9112 §7.1 does not allow.
    Chunk,
}

/// Most bytes of empty lines a request line may follow: RFC 9112 §2.2 asks a server to ignore
/// "at least one"; a client that keeps sending them is only holding the connection.
pub const MAX_BLANK: u8 = 32;

/// What a feed found, for a reader that rewrites absolute-form heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fed {
    /// A head ended inside the bytes.
    pub head_ended: bool,
    /// A head with an absolute-form target (`http://host/path`) was in the bytes: where its
    /// target began (`None`: before them) and where the head ended (`None`: after them).
    pub absolute: Option<(Option<usize>, Option<usize>)>,
    /// Bytes scanned: all of them, unless an absolute-form head ended before their end; the
    /// rest is for the next feed, once that head has been rewritten.
    pub consumed: usize,
}

/// Feed bytes just read through the phases. `Ok(true)` when a head ended inside them.
pub fn feed(phase: &mut Phase, bytes: &mut [u8]) -> Result<bool, Bad> {
    feed_marked(phase, bytes).map(|fed| fed.head_ended)
}

/// [`feed`], and where the first absolute-form head among the bytes is: the scan stops at its
/// end (`Fed::consumed`).
pub fn feed_marked(phase: &mut Phase, mut bytes: &mut [u8]) -> Result<Fed, Bad> {
    let total = bytes.len();
    let mut fed = Fed {
        consumed: total,
        ..Fed::default()
    };
    // Offset of `bytes` in what was fed.
    let mut base = 0;
    while !bytes.is_empty() {
        match phase {
            Phase::Head(h) => match h.scan(bytes)? {
                Some(n) => {
                    fed.head_ended = true;
                    let absolute = h.absolute;
                    let target = h.absolute_here.map(|t| base + t);
                    *phase = if h.chunked {
                        Phase::Chunked(ChunkScan::default())
                    } else if h.content_length > 0 {
                        Phase::Body(h.content_length)
                    } else {
                        Phase::head()
                    };
                    bytes = &mut bytes[n..];
                    base += n;
                    if absolute {
                        fed.absolute = Some((target, Some(base)));
                        fed.consumed = base;
                        return Ok(fed);
                    }
                }
                None => {
                    if h.absolute {
                        fed.absolute = Some((h.absolute_here.map(|t| base + t), None));
                    }
                    break;
                }
            },
            Phase::Body(left) => {
                let skip = (*left).min(bytes.len() as u64);
                *left -= skip;
                bytes = &mut bytes[skip as usize..];
                base += skip as usize;
                if *left == 0 {
                    *phase = Phase::head();
                }
            }
            Phase::Chunked(c) => match c.scan(bytes)? {
                Some(n) => {
                    *phase = Phase::head();
                    bytes = &mut bytes[n..];
                    base += n;
                }
                None => break,
            },
            Phase::Tunnel => break,
        }
    }
    Ok(fed)
}

const TE: &[u8] = b"transfer-encoding";
const CL: &[u8] = b"content-length";
const CHUNKED: &[u8] = b"chunked";

/// How far the current header line's name matches `Transfer-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameMatch {
    Matching(u8),
    No,
}

/// Progress through a head, byte by byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadScan {
    /// Nothing but CR since the last LF.
    line_empty: bool,
    /// A non-empty line has begun.
    seen: bool,
    /// Bytes of empty lines before the request line (RFC 9112 §2.2), at most [`MAX_BLANK`].
    blank: u8,
    /// A CR of such an empty line is waiting for its LF.
    blank_cr: bool,
    /// Bytes of the version in the request line so far, while they match `HTTP/1.`.
    version: u8,
    /// Bytes of the target so far (counted to 1: only its first byte matters).
    target_len: u8,
    /// The target is in absolute form (`http…`).
    absolute: bool,
    /// Where that target began in the bytes of the current `scan` call.
    absolute_here: Option<usize>,
    /// Inside the request line.
    request_line: bool,
    spaces: u8,
    /// The previous byte was a CR inside the request line.
    cr: bool,
    /// The current header line's name so far, against `Transfer-Encoding` and
    /// `Content-Length`.
    te: NameMatch,
    cl: NameMatch,
    /// Which value the rest of the line is.
    value: Value,
    chunked_match: u8,
    /// A `Transfer-Encoding` value mentions `chunked` (`check` refuses anything but exactly
    /// `chunked`, so that is the only form that gets through, and it wins over a length).
    chunked: bool,
    /// The `Content-Length` (the last one; `check` refuses lists, repeats and non-digits, and
    /// closes the connection, so an odd value only decides how far this scan skips).
    content_length: u64,
}

/// What the current header line's value is, once its name is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    None,
    TransferEncoding,
    ContentLength,
}

impl HeadScan {
    /// A byte of this head has arrived, an empty line before it included: its deadline runs.
    pub fn started(&self) -> bool {
        self.seen || self.blank > 0
    }

    /// Scan bytes; `Some(n)` if the head ended after `n` of them.
    fn scan(&mut self, bytes: &mut [u8]) -> Result<Option<usize>, Bad> {
        self.absolute_here = None;
        for (i, byte) in bytes.iter_mut().enumerate() {
            let b = *byte;
            if !self.seen {
                // Empty lines before the request line: CRLF or a bare LF, a few.
                match b {
                    b'\n' => {
                        self.blank_cr = false;
                        self.blank = self.blank.saturating_add(1);
                    }
                    b'\r' if !self.blank_cr => {
                        self.blank_cr = true;
                        self.blank = self.blank.saturating_add(1);
                    }
                    _ if self.blank_cr => return Err(Bad::RequestLine),
                    b' ' => return Err(Bad::RequestLine),
                    _ => {
                        self.seen = true;
                        self.request_line = true;
                        self.line_empty = false;
                    }
                }
                if self.blank > MAX_BLANK {
                    return Err(Bad::RequestLine);
                }
                continue;
            }
            if self.request_line {
                if self.spaces == 2 {
                    self.version_byte(byte);
                } else if self.spaces == 1 && self.target_len == 0 && b != b' ' {
                    self.target_len = 1;
                    // `http://` or `https://`, as far as one byte tells (`origin_form` checks
                    // the rest); an authority-form `CONNECT` target is not one.
                    if b.eq_ignore_ascii_case(&b'h') {
                        self.absolute = true;
                        self.absolute_here = Some(i);
                    }
                }
                match b {
                    b'\n' if self.spaces == 2 => self.request_line = false,
                    b' ' if !self.cr && self.spaces < 2 => self.spaces += 1,
                    b'\r' if !self.cr => self.cr = true,
                    // Not allowed in a URI and silently percent-escaped by Pingora (`"<>`), or
                    // a fragment, which Pingora drops: never sent by a client that means well.
                    b'"' | b'<' | b'>' | b'#' if self.spaces == 1 => return Err(Bad::Target),
                    0x21..=0x7e if !self.cr => {}
                    b'\r' | b'\n' | b' ' => return Err(Bad::RequestLine),
                    _ if self.spaces == 1 && !self.cr => return Err(Bad::Target),
                    _ => return Err(Bad::RequestLine),
                }
            } else {
                self.header_byte(b);
            }
            match b {
                b'\n' if self.line_empty => return Ok(Some(i + 1)),
                b'\n' => self.line_empty = true,
                b'\r' => {}
                _ => self.line_empty = false,
            }
        }
        Ok(None)
    }

    /// A byte of the request line's version: `HTTP/1.` and a minor version above 1 is served
    /// as `HTTP/1.1` (RFC 9110 §2.5), rewritten where it was read.
    fn version_byte(&mut self, b: &mut u8) {
        const PREFIX: &[u8] = b"HTTP/1.";
        let at = self.version as usize;
        if at < PREFIX.len() && *b == PREFIX[at] {
            self.version += 1;
        } else if at == PREFIX.len() && (b'2'..=b'9').contains(b) {
            *b = b'1';
            self.version = u8::MAX;
        } else {
            self.version = u8::MAX;
        }
    }

    /// Follow header lines far enough to see `Transfer-Encoding: ...chunked...` and
    /// `Content-Length: N`.
    fn header_byte(&mut self, b: u8) {
        if b == b'\n' {
            self.te = NameMatch::Matching(0);
            self.cl = NameMatch::Matching(0);
            self.value = Value::None;
            self.chunked_match = 0;
            return;
        }
        match self.value {
            Value::TransferEncoding => {
                let b = b.to_ascii_lowercase();
                if b == CHUNKED[self.chunked_match as usize] {
                    self.chunked_match += 1;
                    if self.chunked_match as usize == CHUNKED.len() {
                        self.chunked = true;
                        self.chunked_match = 0;
                    }
                } else {
                    self.chunked_match = u8::from(b == CHUNKED[0]);
                }
            }
            Value::ContentLength => {
                if b.is_ascii_digit() {
                    self.content_length = self
                        .content_length
                        .saturating_mul(10)
                        .saturating_add(u64::from(b - b'0'));
                }
            }
            Value::None => {
                if b == b':' {
                    if self.te == NameMatch::Matching(TE.len() as u8) {
                        self.value = Value::TransferEncoding;
                    } else if self.cl == NameMatch::Matching(CL.len() as u8) {
                        self.value = Value::ContentLength;
                        self.content_length = 0;
                    }
                }
                self.te = self.te.next(TE, b);
                self.cl = self.cl.next(CL, b);
            }
        }
    }
}

impl NameMatch {
    /// The match after one more byte of a header name.
    fn next(self, name: &[u8], b: u8) -> NameMatch {
        match self {
            NameMatch::Matching(n)
                if (n as usize) < name.len() && b.to_ascii_lowercase() == name[n as usize] =>
            {
                NameMatch::Matching(n + 1)
            }
            _ => NameMatch::No,
        }
    }
}

/// Where the framing of a chunked body is (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkScan {
    /// In a chunk-size line.
    #[default]
    SizeStart,
    Size {
        size: u64,
        digits: u8,
        /// Whitespace after the digits (BWS before an extension).
        ws: bool,
        ext: bool,
        cr: bool,
    },
    /// `n` bytes of chunk data still to skip.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk, until an empty one.
    Trailer {
        line_empty: bool,
        cr: bool,
    },
}

/// 16 hex digits are 64 bits; more can only overflow.
const MAX_SIZE_DIGITS: u8 = 16;

impl ChunkScan {
    /// Scan bytes; `Some(n)` if the body ended after `n` of them.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, Bad> {
        self.scan_data(bytes, |_| {})
    }

    /// [`ChunkScan::scan`], handing each run of chunk data to `data` as it is passed (the
    /// body without its framing, for a client that frames it another way).
    #[inline]
    pub(crate) fn scan_data(
        &mut self,
        bytes: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<Option<usize>, Bad> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            *self = match *self {
                ChunkScan::SizeStart => match hex(b) {
                    Some(d) => ChunkScan::Size {
                        size: u64::from(d),
                        digits: u8::from(d != 0),
                        ws: false,
                        ext: false,
                        cr: false,
                    },
                    None => return Err(Bad::Chunk),
                },
                ChunkScan::Size {
                    size,
                    digits,
                    ws,
                    ext,
                    cr,
                } => match (b, hex(b)) {
                    (b'\n', _) if cr && size == 0 => ChunkScan::Trailer {
                        line_empty: true,
                        cr: false,
                    },
                    (b'\n', _) if cr => ChunkScan::Data(size),
                    (_, _) if cr => return Err(Bad::Chunk),
                    (b'\r', _) => ChunkScan::Size {
                        size,
                        digits,
                        ws,
                        ext,
                        cr: true,
                    },
                    // Leading zeros are free; more than 16 significant digits overflow.
                    (_, Some(d)) if !ws && !ext && (size == 0 || digits < MAX_SIZE_DIGITS) => {
                        ChunkScan::Size {
                            size: size << 4 | u64::from(d),
                            digits: if size == 0 {
                                u8::from(d != 0)
                            } else {
                                digits + 1
                            },
                            ws,
                            ext,
                            cr,
                        }
                    }
                    (b';', _) => ChunkScan::Size {
                        size,
                        digits,
                        ws,
                        ext: true,
                        cr,
                    },
                    (b' ' | b'\t', _) => ChunkScan::Size {
                        size,
                        digits,
                        ws: true,
                        ext,
                        cr,
                    },
                    // Visible ASCII and obs-text (in quoted values) inside an extension.
                    (0x21..=0x7e | 0x80..=0xff, _) if ext => ChunkScan::Size {
                        size,
                        digits,
                        ws,
                        ext,
                        cr,
                    },
                    _ => return Err(Bad::Chunk),
                },
                ChunkScan::Data(left) => {
                    let skip = left.min((bytes.len() - i) as u64);
                    data(&bytes[i..i + skip as usize]);
                    i += skip as usize;
                    *self = if skip == left {
                        ChunkScan::DataCr
                    } else {
                        ChunkScan::Data(left - skip)
                    };
                    continue;
                }
                ChunkScan::DataCr if b == b'\r' => ChunkScan::DataLf,
                ChunkScan::DataLf if b == b'\n' => ChunkScan::SizeStart,
                ChunkScan::DataCr | ChunkScan::DataLf => return Err(Bad::Chunk),
                ChunkScan::Trailer { line_empty, cr } => match b {
                    b'\n' if cr && line_empty => return Ok(Some(i + 1)),
                    b'\n' if cr => ChunkScan::Trailer {
                        line_empty: true,
                        cr: false,
                    },
                    b'\r' if !cr => ChunkScan::Trailer {
                        line_empty,
                        cr: true,
                    },
                    b'\t' | 0x20..=0x7e | 0x80..=0xff if !cr => ChunkScan::Trailer {
                        line_empty: false,
                        cr,
                    },
                    _ => return Err(Bad::Chunk),
                },
            };
            i += 1;
        }
        Ok(None)
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed a copy (the scan may rewrite a version in place).
    fn feed_copy(phase: &mut Phase, bytes: &[u8]) -> Result<bool, Bad> {
        feed(phase, &mut bytes.to_vec())
    }

    /// Feed `chunks` in order; the phase after, and after which byte of them the head ended.
    fn feed_all(chunks: &[&[u8]]) -> (Phase, Option<usize>) {
        let mut phase = Phase::head();
        for c in chunks {
            feed_copy(&mut phase, c).unwrap_or_else(|e| panic!("{e:?}: {chunks:?}"));
        }
        let all = chunks.concat();
        let mut p = Phase::head();
        let end = all
            .iter()
            .position(|b| feed_copy(&mut p, std::slice::from_ref(b)) == Ok(true))
            .map(|i| i + 1);
        (phase, end)
    }

    fn refusal(bytes: &[u8]) -> Option<Bad> {
        // One byte at a time, the hardest split.
        let mut phase = Phase::head();
        bytes
            .iter()
            .find_map(|b| feed_copy(&mut phase, std::slice::from_ref(b)).err())
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(feed_all(&[head]), (Phase::head(), Some(head.len())));
        // Bare LF line ends, as httparse accepts them.
        assert_eq!(feed_all(&[b"GET / HTTP/1.1\nHost: a\n\n"]).1, Some(24));
    }

    #[test]
    fn empty_lines_before_the_request_line_do_not_end_a_head() {
        let (phase, end) = feed_all(&[b"\r\n\r\n\r\n"]);
        assert_eq!(end, None);
        assert!(matches!(phase, Phase::Head(HeadScan { seen: false, .. })));
        assert_eq!(feed_all(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]).1, Some(22));
    }

    #[test]
    fn a_trickled_head_ends_on_the_right_byte_wherever_it_is_split() {
        let head = b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\r\n";
        for split in 0..head.len() {
            for split2 in split..head.len() {
                let (a, rest) = head.split_at(split);
                let (b, c) = rest.split_at(split2 - split);
                let mut phase = Phase::head();
                let ended: Vec<bool> = [a, b, c]
                    .iter()
                    .map(|part| feed_copy(&mut phase, part).unwrap())
                    .collect();
                assert_eq!(phase, Phase::head(), "{split}/{split2}");
                // The head ends in the part holding the last byte.
                assert_eq!(ended.iter().filter(|e| **e).count(), 1);
                assert!(*ended.last().unwrap() || c.is_empty());
            }
        }
    }

    #[test]
    fn request_lines_are_checked_as_sent() {
        let with = |line: &[u8]| [line, b"\r\nHost: a\r\n\r\n"].concat();
        for ok in [
            &b"GET / HTTP/1.1"[..],
            b"GET /a?b=%20 HTTP/1.0",
            b"OPTIONS * HTTP/1.1",
        ] {
            assert_eq!(refusal(&with(ok)), None, "{}", ok.escape_ascii());
        }
        for bad in [
            &b"GET /a\x01 HTTP/1.1"[..],
            b"GET /a\x7f HTTP/1.1",
            b"GET /a\"b HTTP/1.1",
            b"GET /a#b HTTP/1.1",
            b"GET /\xc3\xa9 HTTP/1.1",
        ] {
            assert_eq!(
                refusal(&with(bad)),
                Some(Bad::Target),
                "{}",
                bad.escape_ascii()
            );
        }
        for bad in [
            &b"GET /a b HTTP/1.1"[..],
            b"GET  / HTTP/1.1",
            b"GET / HTTP/1.1 ",
            b"GET\t/ HTTP/1.1",
            b"GET / HTTP/1.1\r\r",
            b" GET / HTTP/1.1",
            b"GET /",
        ] {
            assert_eq!(
                refusal(&with(bad)),
                Some(Bad::RequestLine),
                "{}",
                bad.escape_ascii()
            );
        }
    }

    fn chunked(body: &[u8]) -> Vec<u8> {
        [
            &b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-ENCODING: chunked\r\n\r\n"[..],
            body,
        ]
        .concat()
    }

    #[test]
    fn valid_chunked_bodies_end_where_they_end() {
        for body in [
            &b"0\r\n\r\n"[..],
            b"5\r\nabcde\r\n0\r\n\r\n",
            b"5;name=value\r\nabcde\r\n0\r\n\r\n",
            b"5 ;ext\r\nabcde\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
            b"00000005\r\n\r\n\r\n\r\r\n0\r\n\r\n",
        ] {
            let msg = chunked(body);
            assert_eq!(refusal(&msg), None, "{}", body.escape_ascii());
            let mut phase = Phase::head();
            feed_copy(&mut phase, &msg).unwrap();
            assert!(phase.between_requests(), "{}", body.escape_ascii());
            // What follows is the next request, and is scanned as one.
            assert_eq!(feed_copy(&mut phase, b"GET / HTTP/1.1\r\n\r\n"), Ok(true));
            assert_eq!(
                feed_copy(
                    &mut Phase::Chunked(ChunkScan::default()),
                    b"0\r\n\r\nGET /a b HTTP/1.1\r\n"
                ),
                Err(Bad::RequestLine)
            );
        }
        // A body in progress stays in the chunk phase.
        let mut phase = Phase::head();
        feed_copy(&mut phase, &chunked(b"10\r\nabc")).unwrap();
        assert_eq!(phase, Phase::Chunked(ChunkScan::Data(13)));
    }

    #[test]
    fn the_data_of_a_chunked_body_comes_out_whole_however_it_is_split() {
        let body = b"5;ext\r\nabcde\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            for second in split..body.len() {
                let mut scan = ChunkScan::default();
                let mut data = Vec::new();
                let mut ended = None;
                let mut at = 0;
                for part in [&body[..split], &body[split..second], &body[second..]] {
                    if ended.is_none() {
                        let got = scan.scan_data(part, |d| data.extend_from_slice(d)).unwrap();
                        ended = got.map(|n| at + n);
                    }
                    at += part.len();
                }
                assert_eq!(data, b"abcde0123456789", "split at {split}, {second}");
                assert_eq!(ended, Some(end), "split at {split}, {second}");
            }
        }
    }

    #[test]
    fn bad_chunk_framing_is_refused_wherever_it_is_split() {
        for body in [
            &b"\r\nabcde\r\n0\r\n\r\n"[..],
            b"5;\x01\r\nabcde\r\n0\r\n\r\n",
            b"zz\r\nab\r\n0\r\n\r\n",
            b"-1\r\na\r\n0\r\n\r\n",
            b"5 x\r\nabcde\r\n0\r\n\r\n",
            b"fffffffffffffffff\r\na\r\n",
            b"5\r\nabcdefgh\r\n0\r\n\r\n",
            b"5\nabcde\r\n0\r\n\r\n",
            b"5\r\nabcde\n0\r\n\r\n",
            b"0\r\nBad\x01: x\r\n\r\n",
            b"+5\r\nabcde\r\n0\r\n\r\n",
        ] {
            assert_eq!(
                refusal(&chunked(body)),
                Some(Bad::Chunk),
                "{}",
                body.escape_ascii()
            );
        }
    }

    #[test]
    fn only_a_transfer_encoding_line_makes_a_body_chunked() {
        let chunked = Phase::Chunked(ChunkScan::SizeStart);
        for (head, expect) in [
            (
                &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                chunked,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding:gzip, chunked\r\n\r\n",
                chunked,
            ),
            // Chunked wins over a length, as Pingora reads it.
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                chunked,
            ),
            (
                b"POST / HTTP/1.1\r\nX-Transfer-Encoding: chunked\r\n\r\n",
                Phase::head(),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encodings: chunked\r\n\r\n",
                Phase::head(),
            ),
            (
                b"POST /chunked HTTP/1.1\r\nX-A: chunked\r\n\r\n",
                Phase::head(),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\n",
                Phase::Body(7),
            ),
            (
                b"POST / HTTP/1.1\r\nX-Content-Length: 7\r\n\r\n",
                Phase::head(),
            ),
        ] {
            let mut phase = Phase::head();
            feed_copy(&mut phase, head).unwrap();
            assert_eq!(phase, expect, "{}", head.escape_ascii());
        }
    }

    #[test]
    fn content_length_bodies_are_skipped_and_the_next_request_is_scanned() {
        // A body is data, whatever it holds: quotes, spaces, things that look like requests.
        let mut phase = Phase::head();
        let post = b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 10\r\n\r\n{\"a\": \"b\"}";
        assert_eq!(feed_copy(&mut phase, post), Ok(true));
        assert!(phase.between_requests());
        // Split anywhere, the same.
        assert_eq!(refusal(post), None);
        // A pipelined request after a body in the same read is checked like any other.
        let two = [&post[..], b"GET /a\"b HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(refusal(&two), Some(Bad::Target));
        // A body still arriving keeps its place.
        let mut phase = Phase::head();
        feed_copy(
            &mut phase,
            b"PUT / HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc",
        )
        .unwrap();
        assert_eq!(phase, Phase::Body(97));
    }

    #[test]
    fn an_absolute_form_head_is_marked_where_its_target_begins_and_the_head_ends() {
        let head = b"GET http://a/x HTTP/1.1\r\nHost: b\r\n\r\n";
        let fed = feed_marked(&mut Phase::head(), &mut head.to_vec()).unwrap();
        assert_eq!(fed.absolute, Some((Some(4), Some(head.len()))));
        // Split: the first part has the target's start, the second the head's end.
        let mut phase = Phase::head();
        let fed = feed_marked(&mut phase, &mut head[..10].to_vec()).unwrap();
        assert_eq!(fed.absolute, Some((Some(4), None)));
        let fed = feed_marked(&mut phase, &mut head[10..].to_vec()).unwrap();
        assert_eq!(fed.absolute, Some((None, Some(head.len() - 10))));
        // Two in one read: the scan stops at the end of the first.
        let twice = [&head[..], &head[..]].concat();
        let fed = feed_marked(&mut Phase::head(), &mut twice.clone()).unwrap();
        assert_eq!(
            (fed.absolute, fed.consumed),
            (Some((Some(4), Some(head.len()))), head.len())
        );
        // Origin form is not marked; a body before the next head shifts the offsets.
        let two = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET http://a/ HTTP/1.1\r\n\r\n";
        let fed = feed_marked(&mut Phase::head(), &mut two.to_vec()).unwrap();
        assert_eq!(fed.absolute, Some((Some(44), Some(two.len()))));
        let fed = feed_marked(&mut Phase::head(), &mut b"GET / HTTP/1.1\r\n\r\n".to_vec());
        assert_eq!(fed.unwrap().absolute, None);
    }

    #[test]
    fn a_tunnel_is_never_scanned() {
        let mut phase = Phase::Tunnel;
        assert_eq!(feed_copy(&mut phase, b"\x00\x01 anything"), Ok(false));
        assert_eq!(phase, Phase::Tunnel);
    }

    #[test]
    fn empty_lines_before_a_request_start_its_head_and_are_few() {
        let mut phase = Phase::head();
        assert_eq!(feed_copy(&mut phase, b"\r\n"), Ok(false));
        assert!(
            !phase.between_requests(),
            "the head deadline runs from the first empty line"
        );
        assert_eq!(refusal(&[&b"\n"[..]; 40].concat()), Some(Bad::RequestLine));
        assert_eq!(refusal(&[&b"\r\n"[..]; 16].concat()), None);
        // A CR that is not the start of a CRLF is no empty line.
        assert_eq!(refusal(b"\rGET / HTTP/1.1\r\n\r\n"), Some(Bad::RequestLine));
        assert_eq!(
            refusal(b"\r\r\nGET / HTTP/1.1\r\n\r\n"),
            Some(Bad::RequestLine)
        );
        assert_eq!(refusal(b"\n\r\nGET / HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn a_later_http_1_minor_version_is_read_as_1_1_wherever_it_is_split() {
        let head = b"GET / HTTP/1.2\r\nHost: a\r\n\r\n";
        for split in 0..head.len() {
            let (a, b) = head.split_at(split);
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            let mut phase = Phase::head();
            feed(&mut phase, &mut a).unwrap();
            feed(&mut phase, &mut b).unwrap();
            assert_eq!(
                [a, b].concat(),
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                "{split}"
            );
        }
        for kept in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET /HTTP/1.2 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.2\r\n\r\n",
        ] {
            let mut bytes = kept.to_vec();
            let _ = feed(&mut Phase::head(), &mut bytes);
            assert_eq!(bytes, kept, "{}", kept.escape_ascii());
        }
    }

    #[test]
    fn chunk_sizes_may_have_leading_zeros_and_extensions_obs_text() {
        for body in [
            &b"000000000000000000005\r\nabcde\r\n0\r\n\r\n"[..],
            b"5;name=\"caf\xc3\xa9\"\r\nabcde\r\n0\r\n\r\n",
        ] {
            assert_eq!(refusal(&chunked(body)), None, "{}", body.escape_ascii());
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One request of a pipelined stream: a head and the body its framing announces.
        fn request() -> impl Strategy<Value = Vec<u8>> {
            let body = prop_oneof![
                Just(None),
                proptest::collection::vec(any::<u8>(), 0..40).prop_map(Some),
            ];
            let chunked = any::<bool>();
            let path = "/[a-z0-9/?=]{0,12}";
            (path, body, chunked).prop_map(|(path, body, chunked)| match body {
                None => format!("GET /{path} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes(),
                Some(b) if chunked => {
                    let mut out = format!(
                        "POST /{path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    )
                    .into_bytes();
                    for part in b.chunks(7) {
                        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                        out.extend_from_slice(part);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                    out
                }
                Some(b) => {
                    let mut out = format!(
                        "PUT /{path} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                        b.len()
                    )
                    .into_bytes();
                    out.extend_from_slice(&b);
                    out
                }
            })
        }

        /// Which of `chunks` a head ended in, the phase after all of them, and the first
        /// refusal (after which nothing more is fed).
        fn scan(chunks: &[&[u8]]) -> (Vec<usize>, Phase, Option<Bad>) {
            let mut phase = Phase::head();
            let mut ended = vec![];
            for (i, c) in chunks.iter().enumerate() {
                match feed_copy(&mut phase, c) {
                    Ok(true) => ended.push(i),
                    Ok(false) => {}
                    Err(bad) => return (ended, phase, Some(bad)),
                }
            }
            (ended, phase, None)
        }

        /// The chunks of `bytes` cut at `cuts`.
        fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            at.sort();
            let mut out = vec![];
            let mut last = 0;
            for a in at.into_iter().chain([bytes.len()]) {
                out.push(&bytes[last..a]);
                last = a;
            }
            out
        }

        proptest! {
            #[test]
            fn the_scan_finds_the_same_boundaries_however_the_bytes_are_split(
                stream in proptest::collection::vec(request(), 1..5),
                noise in proptest::collection::vec(any::<u8>(), 0..8),
                cuts in proptest::collection::vec(any::<usize>(), 0..12),
            ) {
                let mut bytes = stream.concat();
                // Whatever follows the requests (a refusal, or the start of another head).
                bytes.extend_from_slice(&noise);
                // The reference: one byte at a time, so each boundary is at a known byte.
                let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
                let (ends, phase, bad) = scan(&bytewise);
                let chunks = split(&bytes, &cuts);
                let (got_ends, got_phase, got_bad) = scan(&chunks);
                prop_assert_eq!(got_bad, bad);
                if bad.is_none() {
                    prop_assert_eq!(got_phase, phase);
                    // Each head ends in the chunk holding its last byte.
                    let mut starts = vec![0];
                    for c in &chunks {
                        starts.push(starts.last().unwrap() + c.len());
                    }
                    let chunk_of = |byte: usize| starts.iter().rposition(|&s| s <= byte).unwrap();
                    let mut want: Vec<usize> = ends.iter().map(|&b| chunk_of(b)).collect();
                    want.dedup();
                    prop_assert_eq!(got_ends, want);
                }
                // The whole valid stream scans as whole requests: every head found.
                let (whole_ends, _, whole_bad) = scan(&bytewise[..stream.concat().len()]);
                prop_assert_eq!(whole_bad, None);
                prop_assert_eq!(whole_ends.len(), stream.len());
            }
        }
    }
}
