//! The sizes a request head and body may have, set by flags and read by every request path.

/// Interim (1xx) responses relayed for one request; a backend that sends more gets its
/// request answered 502. HTTP defines two worth relaying (100, 103); a few of each is plenty.
pub const MAX_INTERIM_RESPONSES: u8 = 8;

/// Size limits of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request target (nginx's `large_client_header_buffers` line: 8 KiB).
    pub max_target: usize,
    /// Longest header line, name and value.
    pub max_header: usize,
    /// Largest head: request line and every header line (nginx's 4 x 8 KiB).
    pub max_head: usize,
    /// Most header lines (HAProxy's `tune.http.maxhdr` is 101).
    pub max_headers: usize,
    /// Largest request body, if limited (nginx's `client_max_body_size`; HAProxy and Envoy set
    /// none by default, and neither do we). A larger `Content-Length` is refused with 413 before
    /// anything is forwarded; a chunked body is counted as it streams.
    pub max_body: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_target: 8 * 1024,
            max_header: 8 * 1024,
            max_head: 32 * 1024,
            max_headers: 100,
            max_body: None,
        }
    }
}
