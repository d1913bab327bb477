//! The agent subscription: a one-directional WebSocket from `rusty-agent`.
//!
//! Every text frame is a whole table; a binary frame is a certificate bundle, which the agent
//! sends only to a data plane that asked for them (it has a TLS listener: `?certs=1`) and, off
//! loopback, only over `wss://`. A bundle that installs is saved in the state dir (mode 0600).
//! The data plane sends nothing but control frames (pings to
//! detect a dead agent, and pongs), so neither side ever waits on the other. When the agent is
//! unreachable the installed table keeps serving and we reconnect with capped, jittered
//! exponential backoff. Frames are capped at the table size limit so a broken or hostile peer
//! cannot make us buffer more.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn};

use crate::certs::{Certs, Offered};
use crate::state_dir::StateDir;
use crate::store::TableStore;

/// The TCP connect when the agent does not answer at all (a partition): a fresh attempt
/// starts every [`CONNECT_STAGGER`] while the earlier ones still wait, each given up after
/// [`TCP_CONNECT_TIMEOUT`], so after the partition heals a new SYN goes out within a quarter
/// of a second (one attempt alone would wait for TCP's retransmissions: 1, then 2, then 4 s)
/// and a slow but working path still gets a whole second to answer.
const CONNECT_STAGGER: Duration = Duration::from_millis(250);
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// TLS and WebSocket handshakes after the connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pings keep the subscription's liveness known to within a few seconds: a partitioned or
/// hung agent is given up after [`DEAD_AFTER`], and from then on a reconnect is tried every
/// second, so a healed partition brings the newest table within about a second (a session
/// kept through the partition would wait for TCP's retransmission timer instead).
const PING_EVERY: Duration = Duration::from_secs(1);
/// No frame at all (pongs included) for this long: the agent is gone.
const DEAD_AFTER: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Low, so a restarted agent has every data plane back within half a second (each retry is
/// one refused connect or a handshake: cheap for the agent even with many data planes, and the
/// jitter spreads them).
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A subscription that lived this long was healthy: the next retry starts from the minimum.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// At most this many frames already received are looked at together for overtaken tables.
const COALESCE_FRAMES: usize = 16;
/// A frame as the WebSocket stream yields it (`None`: the stream ended).
type Frame = Option<Result<Message, tokio_tungstenite::tungstenite::Error>>;
/// Room for the WebSocket framing around the largest table (bundles are smaller).
const MAX_MESSAGE: usize = rusty_shared::limits::MAX_TABLE_BYTES + 1024;
const _: () =
    assert!(rusty_shared::limits::MAX_BUNDLE_BYTES <= rusty_shared::limits::MAX_TABLE_BYTES);

pub struct AgentSource {
    url: String,
    token: String,
    store: Arc<TableStore>,
    /// For `wss://`: the roots the agent's certificate must lead to.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Where bundles go, when there is a TLS listener; and where they are saved.
    certs: Option<(Arc<Certs>, Option<StateDir>)>,
}

impl AgentSource {
    pub fn new(url: String, token: String, store: Arc<TableStore>) -> Self {
        AgentSource {
            url,
            token,
            store,
            tls: None,
            certs: None,
        }
    }

    /// Verify a `wss://` agent against these roots.
    pub fn with_tls(mut self, roots: rustls::RootCertStore) -> Result<Self, rustls::Error> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
        self.tls = Some(Arc::new(config));
        Ok(self)
    }

    /// Take certificate bundles into `certs`, saving each installed one in `saved`.
    pub fn with_certs(mut self, certs: Arc<Certs>, saved: Option<StateDir>) -> Self {
        self.certs = Some((certs, saved));
        self
    }

    /// The subscription URL, asking for bundles when they have somewhere to go.
    fn url(&self) -> String {
        if self.certs.is_none() {
            return self.url.clone();
        }
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}certs=1", self.url)
    }

    fn offer_bundle(&self, bytes: &[u8]) {
        let Some((certs, saved)) = &self.certs else {
            warn!("agent sent a certificate bundle, but there is no TLS listener: ignored");
            return;
        };
        match certs.offer_bundle(bytes, crate::clock::unix_now()) {
            Ok(Offered::Installed {
                version,
                pairs,
                refused,
            }) => {
                for why in &refused {
                    warn!(error = %why, "certificate from the agent refused; the pair of that name already loaded, if any, keeps serving");
                }
                info!(
                    version,
                    pairs,
                    refused = refused.len(),
                    "certificates from the agent installed"
                );
                if let Some(state) = saved {
                    if let Err(e) = state.save(bytes) {
                        warn!(error = %e, "certificates installed but not saved to the state dir");
                    }
                }
            }
            Ok(Offered::Stale { version, installed }) => {
                info!(
                    version,
                    installed, "certificate bundle not newer than the installed one"
                )
            }
            Err(e) => {
                warn!(error = %e, "certificate bundle refused; the loaded certificates keep serving")
            }
        }
    }

    /// Acts on one frame from the agent; `Some` ends the session, saying how.
    fn on_frame(&self, frame: Frame) -> Option<Result<&'static str, String>> {
        match frame {
            Some(Ok(Message::Text(table))) => {
                // Installed or refused inside; either way we keep listening.
                let _ = self.store.offer(table.as_bytes(), "agent");
                None
            }
            Some(Ok(Message::Binary(bundle))) => {
                self.offer_bundle(&bundle);
                None
            }
            Some(Ok(Message::Close(_))) | None => Some(Ok("agent closed the connection")),
            Some(Ok(_)) => None, // ping/pong: tungstenite answers pings itself
            Some(Err(e)) => Some(Err(e.to_string())),
        }
    }

    /// One connection, until it fails or the agent closes it. Returns how it ended.
    async fn session(&self) -> Result<&'static str, String> {
        let mut request = self
            .url()
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad agent URL {}: {e}", self.url))?;
        let auth = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| "the token contains bytes not allowed in a header".to_owned())?;
        request.headers_mut().insert("authorization", auth);
        let config = WebSocketConfig {
            max_message_size: Some(MAX_MESSAGE),
            max_frame_size: Some(MAX_MESSAGE),
            ..WebSocketConfig::default()
        };
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let uri = request.uri();
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| format!("bad agent URL {}: no host", self.url))?;
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("wss") {
                443
            } else {
                80
            });
        let tcp = connect_tcp(&host, port, &self.url).await?;
        let _ = tcp.set_nodelay(true);
        let connect =
            tokio_tungstenite::client_async_tls_with_config(request, tcp, Some(config), connector);
        let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        info!(url = %self.url, "subscribed to the agent");
        let (mut tx, mut rx) = ws.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                frame = rx.next() => {
                    last_heard = Instant::now();
                    // Frames that queued up meanwhile (a big table's install, a busy core):
                    // a table overtaken by a later one is not worth installing, nor keeping
                    // (tables reach 16 MiB), so at most one table is held at a time.
                    let is_table = |f: &Frame| matches!(f, Some(Ok(Message::Text(_))));
                    let mut frames = vec![frame];
                    for _ in 1..COALESCE_FRAMES {
                        let Some(f) = futures_util::FutureExt::now_or_never(rx.next()) else {
                            break;
                        };
                        if is_table(&f) {
                            frames.retain(|held| !is_table(held));
                        }
                        frames.push(f);
                    }
                    for f in frames {
                        if let Some(end) = self.on_frame(f) {
                            return end;
                        }
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > DEAD_AFTER {
                        return Err(format!("no frame from the agent for {DEAD_AFTER:?}"));
                    }
                    tx.send(Message::Ping(Vec::new())).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for AgentSource {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            let ended = tokio::select! {
                r = self.session() => r,
                _ = shutdown.changed() => return,
            };
            match ended {
                Ok(why) => info!(url = %self.url, why, "agent subscription ended; reconnecting"),
                Err(e) => warn!(url = %self.url, error = %e,
                    "agent unreachable; serving the installed table and retrying"),
            }
            // A connection that lived a while was healthy: start the backoff over.
            if started.elapsed() > HEALTHY_SESSION {
                backoff = BACKOFF_MIN;
            }
            let wait = jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// A TCP connection to the agent: staggered attempts while none is answered (see
/// [`CONNECT_STAGGER`]), until one connects or one is refused. Says once when the agent does
/// not answer.
async fn connect_tcp(host: &str, port: u16, url: &str) -> Result<tokio::net::TcpStream, String> {
    let mut attempts = futures_util::stream::FuturesUnordered::new();
    attempts.push(attempt(host, port));
    let mut stagger = tokio::time::interval_at(
        tokio::time::Instant::now() + CONNECT_STAGGER,
        CONNECT_STAGGER,
    );
    let mut said = false;
    loop {
        tokio::select! {
            Some(attempt) = attempts.next() => match attempt {
                Some(Ok(tcp)) => {
                    if said {
                        info!(%url, "the agent answers again");
                    }
                    return Ok(tcp);
                }
                // No path to the agent (its address did not resolve on the link, a router
                // said so): the network is broken, not the agent, so keep trying as for no
                // answer at all.
                Some(Err(e)) if !matches!(e.kind(), ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable) => {
                    return Err(e.to_string())
                }
                Some(Err(_)) | None if !said => {
                    said = true;
                    warn!(%url, "agent unreachable (no answer to connect); serving the installed table and trying again every {CONNECT_STAGGER:?}");
                }
                Some(Err(_)) | None => {}
            },
            _ = stagger.tick() => attempts.push(attempt(host, port)),
        }
    }
}

/// One TCP connect, `None` when it got no answer within [`TCP_CONNECT_TIMEOUT`].
async fn attempt(host: &str, port: u16) -> Option<std::io::Result<tokio::net::TcpStream>> {
    tokio::time::timeout(
        TCP_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .ok()
}

/// Between half and all of `d`, so many data planes do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let half = d / 2;
    half + Duration::from_nanos(random % (half.as_nanos() as u64).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_all() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
    }
}
