//! The access log: one line per request, JSON or nginx's `combined`, written by a thread of its
//! own. A request path renders its line into a buffer of its own thread and goes on; the
//! writer takes the buffers every [`FLUSH_EVERY`] (sooner when one fills) and writes them out,
//! so a slow disk never blocks a request: a buffer over [`BUFFER_CAP`] drops lines, counted.
//! SIGUSR1 reopens the file, for log rotation. Called by the lane and the pipeline, from the
//! place each counts the request.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use rusty_shared::civil::Civil;
use rusty_shared::RequestClass;
use tracing::warn;

use crate::http1::editor::ClientText;

/// How often the writer takes the buffers.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this full wakes the writer early.
const WAKE_AT: usize = 64 * 1024;
/// A buffer this full drops lines until the writer has taken it (4 MiB: about 16,000 lines).
pub const BUFFER_CAP: usize = 4 * 1024 * 1024;
/// A taken buffer that grew past this is given back, not kept for the next round.
const KEEP_CAPACITY: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// nginx's and Apache's `combined`.
    Combined,
}

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `-` is stdout; anything else a file, appended to.
    pub fn parse(arg: &str) -> Target {
        match arg {
            "-" => Target::Stdout,
            path => Target::File(PathBuf::from(path)),
        }
    }
}

/// One request, as the path that served it saw it. Byte strings are the client's, as sent.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub client: Option<IpAddr>,
    pub method: &'a [u8],
    pub host: &'a [u8],
    /// The request target: path and query.
    pub target: &'a [u8],
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: &'a str,
    pub status: u16,
    /// Bytes sent to the client, head included.
    pub bytes: u64,
    pub duration: Duration,
    /// Empty when no backend was tried.
    pub backend: &'a str,
    pub request_id: &'a [u8],
    /// Empty when the request matched no service.
    pub service: &'a str,
    pub attempts: usize,
    pub class: RequestClass,
    pub user_agent: &'a [u8],
    pub referer: &'a [u8],
    pub https: bool,
}

/// Append `e`, logged at `now`, to `out` as one line.
pub fn render(e: &Entry<'_>, now: SystemTime, format: Format, out: &mut Vec<u8>) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let t = Civil::from_unix(since.as_secs() as i64);
    match format {
        Format::Json => {
            out.extend_from_slice(b"{\"time\":\"");
            push_padded(out, t.year.max(0) as u64, 4);
            out.push(b'-');
            push_padded(out, u64::from(t.month), 2);
            out.push(b'-');
            push_padded(out, u64::from(t.day), 2);
            out.push(b'T');
            push_clock(out, &t);
            out.push(b'.');
            push_padded(out, u64::from(since.subsec_millis()), 3);
            out.extend_from_slice(b"Z\",\"client\":\"");
            if let Some(ip) = e.client {
                push_ip(out, ip);
            }
            out.extend_from_slice(b"\",\"method\":\"");
            json_str(e.method, out);
            out.extend_from_slice(b"\",\"host\":\"");
            json_str(e.host, out);
            out.extend_from_slice(b"\",\"path\":\"");
            json_str(e.target, out);
            out.extend_from_slice(b"\",\"protocol\":\"");
            out.extend_from_slice(e.version.as_bytes());
            out.extend_from_slice(if e.https {
                b"\",\"tls\":true,\"status\":"
            } else {
                b"\",\"tls\":false,\"status\":"
            });
            push_u64(out, u64::from(e.status));
            out.extend_from_slice(b",\"bytes\":");
            push_u64(out, e.bytes);
            // Milliseconds with three decimals, from whole microseconds.
            let micros = u64::try_from(e.duration.as_micros()).unwrap_or(u64::MAX);
            out.extend_from_slice(b",\"duration_ms\":");
            push_u64(out, micros / 1000);
            out.push(b'.');
            push_padded(out, micros % 1000, 3);
            out.extend_from_slice(b",\"backend\":\"");
            json_str(e.backend.as_bytes(), out);
            out.extend_from_slice(b"\",\"request_id\":\"");
            json_str(e.request_id, out);
            out.extend_from_slice(b"\",\"service\":\"");
            json_str(e.service.as_bytes(), out);
            out.extend_from_slice(b"\",\"attempts\":");
            push_u64(out, e.attempts as u64);
            out.extend_from_slice(b",\"class\":\"");
            out.extend_from_slice(e.class.as_str().as_bytes());
            out.extend_from_slice(b"\",\"user_agent\":\"");
            json_str(e.user_agent, out);
            out.extend_from_slice(b"\",\"referer\":\"");
            json_str(e.referer, out);
            out.extend_from_slice(b"\"}\n");
        }
        Format::Combined => {
            match e.client {
                Some(ip) => push_ip(out, ip),
                None => out.push(b'-'),
            }
            out.extend_from_slice(b" - - [");
            push_padded(out, u64::from(t.day), 2);
            out.push(b'/');
            out.extend_from_slice(MONTHS[t.month as usize - 1].as_bytes());
            out.push(b'/');
            push_padded(out, t.year.max(0) as u64, 4);
            out.push(b':');
            push_clock(out, &t);
            out.extend_from_slice(b" +0000] \"");
            // A request refused before it was parsed has no request line to show.
            if e.method.is_empty() {
                out.push(b'-');
            } else {
                quoted(e.method, out);
                out.push(b' ');
                quoted(e.target, out);
                out.push(b' ');
                out.extend_from_slice(e.version.as_bytes());
            }
            out.extend_from_slice(b"\" ");
            push_u64(out, u64::from(e.status));
            out.push(b' ');
            push_u64(out, e.bytes);
            out.extend_from_slice(b" \"");
            dash_or_quoted(e.referer, out);
            out.extend_from_slice(b"\" \"");
            dash_or_quoted(e.user_agent, out);
            out.extend_from_slice(b"\"\n");
        }
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `s` inside a JSON string: quotes, backslashes and control bytes escaped, and bytes past
/// ASCII as `\u00XX` (their Latin-1 reading), so a line is valid JSON whatever a client sent.
fn json_str(mut s: &[u8], out: &mut Vec<u8>) {
    // Runs that need no escape (nearly every byte) are copied whole.
    while let Some(i) = s
        .iter()
        .position(|&b| matches!(b, b'"' | b'\\') || !(0x20..=0x7e).contains(&b))
    {
        out.extend_from_slice(&s[..i]);
        match s[i] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        s = &s[i + 1..];
    }
    out.extend_from_slice(s);
}

/// `n`'s decimal digits, in the tail of the array from the returned index.
fn decimal(mut n: u64) -> ([u8; 20], usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return (digits, at);
        }
    }
}

/// `n` in decimal.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    let (digits, at) = decimal(n);
    out.extend_from_slice(&digits[at..]);
}

/// `n` in decimal, zero-padded to at least `width` digits.
fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let (digits, at) = decimal(n);
    let len = digits.len() - at;
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(len)));
    out.extend_from_slice(&digits[at..]);
}

/// The time of day of `t`, `HH:MM:SS`.
fn push_clock(out: &mut Vec<u8>, t: &Civil) {
    push_padded(out, u64::from(t.hour), 2);
    out.push(b':');
    push_padded(out, u64::from(t.minute), 2);
    out.push(b':');
    push_padded(out, u64::from(t.second), 2);
}

/// A client address as text.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    out.extend_from_slice(ClientText::new(ip).as_bytes());
}

/// `s` inside a quoted field of the combined format, escaped as nginx does: `"`, `\`, control
/// bytes and bytes past ASCII as `\xXX`.
fn quoted(s: &[u8], out: &mut Vec<u8>) {
    for &b in s {
        match b {
            b'"' | b'\\' | 0..=0x1f | 0x7f..=0xff => {
                let _ = write!(out, "\\x{b:02X}");
            }
            _ => out.push(b),
        }
    }
}

fn dash_or_quoted(s: &[u8], out: &mut Vec<u8>) {
    if s.is_empty() {
        out.push(b'-');
    } else {
        quoted(s, out);
    }
}

/// One thread's lines not yet written.
type Buffer = Arc<Mutex<Vec<u8>>>;

/// The log of a data plane: the buffers of every thread that logged, and the writer's state.
pub struct AccessLog {
    format: Format,
    target: Target,
    /// Tells the thread-local buffers of one log from another's (tests make several).
    id: u64,
    buffers: Mutex<Vec<Buffer>>,
    /// The open file (or stdout), once started.
    out: Mutex<Option<Box<dyn Write + Send>>>,
    writer: OnceLock<std::thread::Thread>,
    reopen: AtomicBool,
    dropped: IntCounter,
    lines: IntCounter,
    write_errors: AtomicU64,
}

thread_local! {
    /// This thread's buffer, and the log it belongs to.
    static BUFFER: RefCell<Option<(u64, Buffer)>> = const { RefCell::new(None) };
}

impl AccessLog {
    /// A log to `target` in `format`; nothing is written until [`AccessLog::start`].
    pub fn new(target: Target, format: Format) -> AccessLog {
        static IDS: AtomicU64 = AtomicU64::new(1);
        AccessLog {
            format,
            target,
            id: IDS.fetch_add(1, Ordering::Relaxed),
            buffers: Mutex::new(Vec::new()),
            out: Mutex::new(None),
            writer: OnceLock::new(),
            reopen: AtomicBool::new(false),
            dropped: crate::metrics::counter(
                "rustybalancer_access_log_dropped_total",
                "Access log lines dropped because the writer fell behind or could not write.",
            ),
            lines: crate::metrics::counter(
                "rustybalancer_access_log_lines_total",
                "Lines given to the access log.",
            ),
            write_errors: AtomicU64::new(0),
        }
    }

    /// Open the target (an error names the file) and start the writer thread.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.open()?);
        let log = self.clone();
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    std::thread::park_timeout(FLUSH_EVERY);
                    if log.reopen.swap(false, Ordering::Relaxed) {
                        match log.open() {
                            Ok(o) => *log.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(o),
                            Err(e) => {
                                warn!(error = %e, "cannot reopen the access log; writing on to the file already open")
                            }
                        }
                    }
                    log.write_out(&mut spare);
                }
            })?;
        let _ = self.writer.set(handle.thread().clone());
        Ok(())
    }

    fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        match &self.target {
            Target::Stdout => Ok(Box::new(std::io::stdout())),
            Target::File(path) => {
                let file = File::options()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                Ok(Box::new(file))
            }
        }
    }

    /// Write what is buffered now (at exit: the writer would be too late).
    pub fn flush(&self) {
        self.write_out(&mut Vec::new());
    }

    /// Take every thread's lines and write them out.
    fn write_out(&self, spare: &mut Vec<u8>) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let Some(out) = out.as_mut() else { return };
        let buffers: Vec<Buffer> = self
            .buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut wrote = false;
        for buffer in buffers {
            {
                let mut lines = buffer.lock().unwrap_or_else(|p| p.into_inner());
                if lines.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *lines, spare);
            }
            if let Err(e) = out.write_all(spare) {
                if self.write_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(error = %e, "cannot write the access log; its lines are dropped until it can");
                }
                let lost = spare.iter().filter(|&&b| b == b'\n').count();
                self.dropped.inc_by(lost as u64);
            }
            wrote = true;
            spare.clear();
            if spare.capacity() > KEEP_CAPACITY {
                *spare = Vec::new();
            }
        }
        if wrote {
            let _ = out.flush();
        }
    }

    /// Reopen the file before the next write (SIGUSR1).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.get() {
            w.unpark();
        }
    }

    /// Log one request. Never waits for the writer: a full buffer drops the line.
    pub fn log(&self, entry: &Entry<'_>) {
        BUFFER.with(|slot| {
            let mut slot = slot.borrow_mut();
            let buffer = match &*slot {
                Some((id, b)) if *id == self.id => b,
                _ => {
                    let b = Buffer::default();
                    self.buffers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(b.clone());
                    &slot.insert((self.id, b)).1
                }
            };
            let mut lines = buffer.lock().unwrap_or_else(|p| p.into_inner());
            if lines.len() >= BUFFER_CAP {
                self.dropped.inc();
                return;
            }
            let before = lines.len();
            render(entry, SystemTime::now(), self.format, &mut lines);
            self.lines.inc();
            if before < WAKE_AT && lines.len() >= WAKE_AT {
                if let Some(w) = self.writer.get() {
                    w.unpark();
                }
            }
        });
    }

    /// The log's metrics, for the registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.lines.clone()), Box::new(self.dropped.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            client: Some("192.0.2.7".parse().unwrap()),
            method: b"GET",
            host: b"example.com",
            target: b"/a?b=1",
            version: "HTTP/1.1",
            status: 200,
            bytes: 1234,
            duration: Duration::from_micros(1500),
            backend: "web-1",
            request_id: b"0000abcd-0000000000000001",
            service: "web",
            attempts: 1,
            class: RequestClass::Normal,
            user_agent: b"curl/8.0",
            referer: b"",
            https: false,
        }
    }

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn numbers_and_escapes_are_written_by_hand_as_fmt_would() {
        for n in [0u64, 7, 10, 999, 1000, 65_535, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            for width in [0, 2, 3, 4] {
                let mut out = Vec::new();
                push_padded(&mut out, n, width);
                assert_eq!(out, format!("{n:0width$}").as_bytes());
            }
        }
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "10.20.30.4",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
        let mut out = Vec::new();
        json_str(b"a\"b\\c\x01\xff\x7fz", &mut out);
        assert_eq!(out, b"a\\\"b\\\\c\\u0001\\u00ff\\u007fz".as_slice());
        let decoded: String =
            serde_json::from_slice(&[b"\"".as_slice(), &out, b"\""].concat()).unwrap();
        assert_eq!(decoded, "a\"b\\c\u{1}\u{ff}\u{7f}z");
    }

    #[test]
    fn a_json_line_is_valid_json_with_every_field() {
        let mut out = Vec::new();
        let mut e = entry();
        e.user_agent = b"evil\"\\\n\xff";
        render(&e, at(1_796_148_123, 45), Format::Json, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["time"], "2026-12-01T18:02:03.045Z");
        assert_eq!(v["client"], "192.0.2.7");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["host"], "example.com");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 1234);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["backend"], "web-1");
        assert_eq!(v["request_id"], "0000abcd-0000000000000001");
        assert_eq!(v["service"], "web");
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["class"], "normal");
        assert_eq!(v["tls"], false);
        assert_eq!(
            v["user_agent"], "evil\"\\\n\u{ff}",
            "escaped, and read back whole"
        );
    }

    #[test]
    fn a_combined_line_is_nginxs() {
        let mut out = Vec::new();
        let mut e = entry();
        e.target = b"/q\"x";
        render(&e, at(1_796_148_123, 45), Format::Combined, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "192.0.2.7 - - [01/Dec/2026:18:02:03 +0000] \"GET /q\\x22x HTTP/1.1\" 200 1234 \"-\" \"curl/8.0\"\n"
        );
    }

    #[test]
    fn lines_from_many_threads_are_written_whole_and_a_full_buffer_drops_and_counts() {
        let dir = std::env::temp_dir().join(format!("rusty-access-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let log = Arc::new(AccessLog::new(Target::File(path.clone()), Format::Json));
        // Before the writer starts, one thread fills its buffer: the rest is dropped.
        let mut line = Vec::new();
        render(&entry(), SystemTime::now(), Format::Json, &mut line);
        let fits = BUFFER_CAP.div_ceil(line.len());
        for _ in 0..fits + 10 {
            log.log(&entry());
        }
        assert_eq!(log.dropped.get(), 10);
        log.start().unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        log.log(&entry());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let want = fits + 4000;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let n = text.lines().count();
            if n == want {
                for l in text.lines() {
                    serde_json::from_str::<serde_json::Value>(l).expect("every line whole");
                }
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{n} of {want} lines");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Rotation: the file moved away, SIGUSR1's reopen starts a new one.
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        std::thread::sleep(FLUSH_EVERY * 3);
        log.log(&entry());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path).map_or(0, |t| t.lines().count()) != 1 {
            assert!(std::time::Instant::now() < deadline, "no new file");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            want
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
