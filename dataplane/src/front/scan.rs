//! Byte-level scanning of what a client sends, for [`super::Guarded`]: where each request head
//! ends, whether its request line is well-formed as sent, and whether a chunked body's framing
//! is. Pure state machines fed one read at a time, so a message split anywhere scans the same.
//!
//! This is not a second HTTP parser: Pingora parses every request. It only sees what Pingora
//! normalises away before our checks in `check` could: spaces or control bytes in a target
//! (percent-escaped by Pingora), and chunk framing (Pingora accepts control bytes in a chunk
//! extension and reads an empty chunk-size line as the last chunk).

/// Where a connection is in its request/response cycle, as far as its bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading a request head.
    Head(HeadScan),
    /// Reading the framing of a chunked request body.
    Chunked(ChunkScan),
    /// The request is in (or its body is not chunked); response, or a tunnel. Not scanned.
    Body,
    /// A final response has begun; the next byte from the client starts a new head.
    Idle,
}

impl Phase {
    pub fn head() -> Phase {
        Phase::Head(HeadScan {
            line_empty: true,
            seen: false,
            request_line: false,
            spaces: 0,
            cr: false,
            name: NameMatch::Matching(0),
            te_value: false,
            chunked_match: 0,
            chunked: false,
        })
    }
}

/// Why the bytes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not `METHOD SP target SP version` in visible ASCII.
    RequestLine,
    /// Chunked framing that RFC 9112 §7.1 does not allow.
    Chunk,
}

/// Feed bytes just read through the phases. `Ok(true)` when a head ended inside them.
pub fn feed(phase: &mut Phase, mut bytes: &[u8]) -> Result<bool, Bad> {
    let mut head_done = false;
    loop {
        match phase {
            Phase::Head(h) => match h.scan(bytes)? {
                Some(n) => {
                    head_done = true;
                    *phase = if h.chunked {
                        Phase::Chunked(ChunkScan::default())
                    } else {
                        Phase::Body
                    };
                    bytes = &bytes[n..];
                }
                None => return Ok(head_done),
            },
            Phase::Chunked(c) => {
                if c.scan(bytes)?.is_some() {
                    *phase = Phase::Body;
                }
                return Ok(head_done);
            }
            Phase::Body | Phase::Idle => return Ok(head_done),
        }
    }
}

/// Whether a write begins a final response: `HTTP/1.x ` and a status that is not 1xx.
pub fn starts_final_response(buf: &[u8]) -> bool {
    buf.len() > 9 && buf.starts_with(b"HTTP/1.") && buf[8] == b' ' && buf[9] != b'1'
}

const TE: &[u8] = b"transfer-encoding";
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
    /// A non-empty line has begun (empty lines before a request line are ignored, RFC 9112 §2.2).
    seen: bool,
    /// Inside the request line.
    request_line: bool,
    spaces: u8,
    /// The previous byte was a CR inside the request line.
    cr: bool,
    /// The current header line's name so far, against `Transfer-Encoding`.
    name: NameMatch,
    /// Inside the value of a `Transfer-Encoding` line.
    te_value: bool,
    chunked_match: u8,
    /// A `Transfer-Encoding` value mentions `chunked` (`check` refuses anything but exactly
    /// `chunked`, so that is the only form that gets through).
    pub chunked: bool,
}

impl HeadScan {
    /// Scan bytes; `Some(n)` if the head ended after `n` of them.
    fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, Bad> {
        for (i, &b) in bytes.iter().enumerate() {
            if self.request_line {
                match b {
                    b'\n' if self.spaces == 2 => self.request_line = false,
                    b' ' if !self.cr => self.spaces += 1,
                    // Not allowed in a URI, and what Pingora would silently percent-escape.
                    b'"' | b'<' | b'>' if self.spaces == 1 => return Err(Bad::RequestLine),
                    b'\r' if !self.cr => self.cr = true,
                    0x21..=0x7e if !self.cr => {}
                    _ => return Err(Bad::RequestLine),
                }
            } else if self.seen {
                self.header_byte(b);
            }
            match b {
                b'\n' if self.line_empty && self.seen => return Ok(Some(i + 1)),
                b'\n' => self.line_empty = true,
                b'\r' => {}
                _ => {
                    if !self.seen {
                        self.seen = true;
                        self.request_line = true;
                        if b == b' ' {
                            return Err(Bad::RequestLine);
                        }
                    }
                    self.line_empty = false;
                }
            }
        }
        Ok(None)
    }

    /// Follow header lines far enough to see a `Transfer-Encoding: ...chunked...`.
    fn header_byte(&mut self, b: u8) {
        if b == b'\n' {
            self.name = NameMatch::Matching(0);
            self.te_value = false;
            self.chunked_match = 0;
            return;
        }
        if self.te_value {
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
            return;
        }
        self.name = match self.name {
            NameMatch::Matching(n) if n as usize == TE.len() && b == b':' => {
                self.te_value = true;
                NameMatch::No
            }
            NameMatch::Matching(n)
                if (n as usize) < TE.len() && b.to_ascii_lowercase() == TE[n as usize] =>
            {
                NameMatch::Matching(n + 1)
            }
            _ => NameMatch::No,
        };
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
    fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, Bad> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            *self = match *self {
                ChunkScan::SizeStart => match hex(b) {
                    Some(d) => ChunkScan::Size {
                        size: u64::from(d),
                        digits: 1,
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
                    (_, Some(d)) if !ws && !ext && digits < MAX_SIZE_DIGITS => ChunkScan::Size {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                        ws,
                        ext,
                        cr,
                    },
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
                    (0x21..=0x7e, _) if ext => ChunkScan::Size {
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

    /// Feed `chunks` in order; the phase after, and after which byte of them the head ended.
    fn feed_all(chunks: &[&[u8]]) -> (Phase, Option<usize>) {
        let mut phase = Phase::head();
        for c in chunks {
            feed(&mut phase, c).unwrap_or_else(|e| panic!("{e:?}: {chunks:?}"));
        }
        let all = chunks.concat();
        let mut p = Phase::head();
        let end = all
            .iter()
            .position(|b| feed(&mut p, std::slice::from_ref(b)) == Ok(true))
            .map(|i| i + 1);
        (phase, end)
    }

    fn refusal(bytes: &[u8]) -> Option<Bad> {
        // One byte at a time, the hardest split.
        let mut phase = Phase::head();
        bytes
            .iter()
            .find_map(|b| feed(&mut phase, std::slice::from_ref(b)).err())
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(feed_all(&[head]), (Phase::Body, Some(head.len() - 4)));
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
                    .map(|part| feed(&mut phase, part).unwrap())
                    .collect();
                assert_eq!(phase, Phase::Body, "{split}/{split2}");
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
            &b"GET /a b HTTP/1.1"[..],
            b"GET  / HTTP/1.1",
            b"GET / HTTP/1.1 ",
            b"GET\t/ HTTP/1.1",
            b"GET /a\x01 HTTP/1.1",
            b"GET /a\x7f HTTP/1.1",
            b"GET /a\"b HTTP/1.1",
            b"GET /\xc3\xa9 HTTP/1.1",
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
            feed(&mut phase, &msg).unwrap();
            assert_eq!(phase, Phase::Body, "{}", body.escape_ascii());
            // Nothing after the body is scanned (it is the next request, or garbage Pingora
            // will refuse).
            feed(&mut phase, b"\x00\x01 not scanned").unwrap();
        }
        // A body in progress stays in the chunk phase.
        let mut phase = Phase::head();
        feed(&mut phase, &chunked(b"10\r\nabc")).unwrap();
        assert_eq!(phase, Phase::Chunked(ChunkScan::Data(13)));
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
        for (head, chunked) in [
            (
                &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                true,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding:gzip, chunked\r\n\r\n",
                true,
            ),
            (
                b"POST / HTTP/1.1\r\nX-Transfer-Encoding: chunked\r\n\r\n",
                false,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encodings: chunked\r\n\r\n",
                false,
            ),
            (b"POST /chunked HTTP/1.1\r\nX-A: chunked\r\n\r\n", false),
            (b"POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\n", false),
        ] {
            let mut phase = Phase::head();
            feed(&mut phase, head).unwrap();
            let expect = if chunked {
                Phase::Chunked(ChunkScan::SizeStart)
            } else {
                Phase::Body
            };
            assert_eq!(phase, expect, "{}", head.escape_ascii());
        }
    }

    #[test]
    fn only_final_responses_start_a_new_cycle() {
        assert!(starts_final_response(b"HTTP/1.1 200 OK\r\n"));
        assert!(starts_final_response(
            b"HTTP/1.0 503 Service Unavailable\r\n"
        ));
        assert!(!starts_final_response(b"HTTP/1.1 100 Continue\r\n"));
        assert!(!starts_final_response(
            b"HTTP/1.1 101 Switching Protocols\r\n"
        ));
        assert!(!starts_final_response(b"<html>HTTP/1.1 200"));
        assert!(!starts_final_response(b"HTTP/1.1"));
    }
}
