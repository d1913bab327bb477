//! Scripted answers for `--script`: a hostile or broken backend, byte for byte.
//!
//! The file is the test corpus `e2e/corpus/hostile-backends.txt`. Each `case NAME` block may
//! hold, besides what the test reads (requests and expectations, ignored here), the backend's
//! actions, played in order when a request for `/case/NAME` arrives:
//!
//! - `send "BYTES"`: write them (escapes: `\r \n \t \\ \" \xNN`);
//! - `repeat N "BYTES"`: write them N times;
//! - `sleep MS`: pause;
//! - `close`: close the connection (else the next request on it is read as usual);
//! - `early`: answer as soon as the head is in, before the request body (read after).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
enum Action {
    Send(Vec<u8>),
    Sleep(Duration),
    Close,
}

/// One case's answer.
#[derive(Debug, Clone, Default)]
pub struct Case {
    actions: Vec<Action>,
    /// Answer before reading the request body.
    pub early: bool,
}

/// Every case of a script file, by name.
#[derive(Debug, Clone, Default)]
pub struct Script(HashMap<String, Case>);

impl Script {
    pub fn load(path: &Path) -> Result<Script, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let mut cases: HashMap<String, Case> = HashMap::new();
        let mut current: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            let at = || format!("line {}: {line}", n + 1);
            if let Some(name) = line.strip_prefix("case ") {
                current = Some(name.trim().to_owned());
                cases.entry(name.trim().to_owned()).or_default();
                continue;
            }
            let Some(name) = &current else { continue };
            let case = cases.get_mut(name).expect("inserted at its `case` line");
            let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
            match word {
                "send" => case
                    .actions
                    .push(Action::Send(unquote(rest).ok_or_else(at)?)),
                "repeat" => {
                    let (count, bytes) = rest.split_once(' ').ok_or_else(at)?;
                    let count: usize = count.parse().map_err(|_| at())?;
                    let bytes = unquote(bytes).ok_or_else(at)?;
                    case.actions.push(Action::Send(bytes.repeat(count)));
                }
                "sleep" => {
                    let ms: u64 = rest.trim().parse().map_err(|_| at())?;
                    case.actions.push(Action::Sleep(Duration::from_millis(ms)));
                }
                "close" => case.actions.push(Action::Close),
                "early" => case.early = true,
                // The test's own lines: requests and expectations.
                _ => {}
            }
        }
        Ok(Script(cases))
    }

    /// The case a request for `path` plays, if it names one.
    pub fn case_for(&self, path: &str) -> Option<&Case> {
        let name = path.strip_prefix("/case/")?;
        self.0.get(name.split('?').next().unwrap_or(name))
    }
}

impl Case {
    /// Play the case on `stream`. False when it closed the connection (or the peer did).
    pub async fn play(&self, stream: &mut TcpStream) -> bool {
        for action in &self.actions {
            match action {
                Action::Send(bytes) => {
                    if stream.write_all(bytes).await.is_err() {
                        return false;
                    }
                }
                Action::Sleep(d) => tokio::time::sleep(*d).await,
                Action::Close => return false,
            }
        }
        true
    }
}

/// The bytes of a `"quoted"` string with escapes.
pub fn unquote(s: &str) -> Option<Vec<u8>> {
    let inner = s.trim().strip_prefix('"')?.strip_suffix('"')?;
    let mut out = Vec::with_capacity(inner.len());
    let mut chars = inner.bytes();
    while let Some(b) = chars.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match chars.next()? {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'\\' => out.push(b'\\'),
            b'"' => out.push(b'"'),
            b'x' => {
                let hi = (chars.next()? as char).to_digit(16)?;
                let lo = (chars.next()? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
            }
            _ => return None,
        }
    }
    Some(out)
}
