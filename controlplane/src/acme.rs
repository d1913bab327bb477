//! ACME: the certificates of `[tls.acme]`, ordered from the CA over HTTP-01 and renewed at two
//! thirds of their lifetime. One task, spawned by [`crate::wiring`], owns the account, the
//! orders and the schedule. Challenge answers go into the table through the core
//! ([`Command::Challenges`]), so whichever data plane the CA reaches answers them; issued pairs
//! go to [`CertSource`], which sends them only over private connections.
//!
//! State lives in `state_dir/acme/` (directory 0700, files 0600): `account.json` (the account
//! key and the directory it belongs to), `NAME.crt` and `NAME.key`. A restarted agent serves what
//! it has and orders only what is due. A failed order keeps the current certificate serving and
//! is retried after [`retry_delay`]; `POST /v1/acme/renew` orders every name again now.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rusty_shared::certs::{load_pair, CertPair};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::api::AcmeStatus;
use crate::certs::{unix_now, CertSource};
use crate::core::Command;
use crate::metrics::Metrics;
use crate::spec::AcmeSettings;

/// The longest one order may take, from new-order to the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the CA gets to validate and to issue, each.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(60));
/// Longest sleep between looks at the schedule (the wall clock may jump).
const RECHECK: Duration = Duration::from_secs(3600);

/// When a certificate valid from `not_before` to `not_after` (unix seconds) is renewed: at two
/// thirds of its lifetime, as certbot and Caddy do for 90-day certificates (30 days left).
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// The wait before the next order after `failures` failed in a row: one minute, doubling, at
/// most six hours (well inside Let's Encrypt's failed-validation limit of 5 per name per hour).
pub fn retry_delay(failures: u32) -> Duration {
    let minutes = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs((minutes * 60).min(6 * 3600))
}

/// One name and where its certificate stands.
#[derive(Debug, Clone)]
struct Name {
    host: String,
    /// Validity of the certificate serving now.
    valid: Option<(i64, i64)>,
    next_order_at: i64,
    ordering: bool,
    failures: u32,
    last_error: Option<String>,
}

impl Name {
    fn status(&self) -> AcmeStatus {
        let state = if self.ordering {
            "ordering"
        } else if self.failures > 0 {
            "failed"
        } else if self.valid.is_some() {
            "valid"
        } else {
            "waiting"
        };
        AcmeStatus {
            host: self.host.clone(),
            state: state.to_owned(),
            not_after: self.valid.map(|(_, to)| to),
            next_order_at: Some(self.next_order_at),
            failures: self.failures,
            last_error: self.last_error.clone(),
        }
    }
}

/// `account.json`: the credentials with the directory they were made at, so a config that
/// names another CA gets a new account instead of a confusing refusal.
#[derive(Serialize, Deserialize)]
struct SavedAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// A certificate just issued and checked.
struct Issued {
    pair: CertPair,
    validity: (i64, i64),
}

pub struct Acme {
    settings: AcmeSettings,
    dir: PathBuf,
    commands: mpsc::Sender<Command>,
    certs: Arc<Mutex<CertSource>>,
    status: watch::Sender<Vec<AcmeStatus>>,
    metrics: Arc<Metrics>,
    /// Between publishing a challenge and telling the CA to check it: time for the table to
    /// reach every data plane.
    propagation: Duration,
}

impl Acme {
    pub fn new(
        settings: AcmeSettings,
        state_dir: &Path,
        commands: mpsc::Sender<Command>,
        certs: Arc<Mutex<CertSource>>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Acme, watch::Receiver<Vec<AcmeStatus>>)> {
        use std::os::unix::fs::PermissionsExt;
        let dir = state_dir.join("acme");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let (status, rx) = watch::channel(Vec::new());
        Ok((
            Acme {
                settings,
                dir,
                commands,
                certs,
                status,
                metrics,
                propagation: Duration::from_millis(500),
            },
            rx,
        ))
    }

    /// Serve the saved certificates, then order what is due, until shutdown. A message on
    /// `renew` makes every name due now.
    pub async fn run(self, mut renew: mpsc::Receiver<()>, mut shutdown: watch::Receiver<bool>) {
        let now = unix_now();
        let mut names: Vec<Name> = self
            .settings
            .hosts
            .iter()
            .map(|host| self.restore(host, now))
            .collect();
        self.show(&names);
        let mut account: Option<Account> = None;
        let mut told = false;
        loop {
            let now = unix_now();
            // With no data plane subscribed, nobody could answer the CA: an order would fail
            // and count against the CA's limits.
            let due = names.iter().any(|n| n.next_order_at <= now);
            if due && self.metrics.subscribers.get() <= 0 {
                if !told {
                    info!("ACME: waiting for a data plane to subscribe before ordering");
                    told = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            for i in 0..names.len() {
                if names[i].next_order_at > now || *shutdown.borrow() {
                    continue;
                }
                names[i].ordering = true;
                self.show(&names);
                let host = names[i].host.clone();
                info!(%host, "ACME: ordering a certificate");
                let result = tokio::select! {
                    r = tokio::time::timeout(ORDER_TIMEOUT, self.order(&mut account, &host)) => {
                        r.unwrap_or_else(|_| Err(format!("no certificate within {ORDER_TIMEOUT:?}")))
                    }
                    _ = shutdown.changed() => return,
                };
                // Answered or not, the challenges of this order are over.
                let _ = self.set_challenges(BTreeMap::new()).await;
                let name = &mut names[i];
                name.ordering = false;
                match result.and_then(|issued| self.keep(issued)) {
                    Ok((from, to)) => {
                        info!(%host, not_after = to, "ACME: certificate issued");
                        self.metrics.acme_order(&host, "issued");
                        name.valid = Some((from, to));
                        name.failures = 0;
                        name.last_error = None;
                        name.next_order_at = renew_at(from, to);
                    }
                    Err(e) => {
                        name.failures += 1;
                        let delay = retry_delay(name.failures);
                        warn!(%host, error = %e, retry_in = ?delay,
                            "ACME: order failed; the current certificate, if any, keeps serving");
                        self.metrics.acme_order(&host, "failed");
                        name.last_error = Some(e);
                        name.next_order_at = unix_now() + delay.as_secs() as i64;
                        // A broken account (revoked, another CA's) is made again next time.
                        if name.failures > 1 {
                            account = None;
                        }
                    }
                }
                self.show(&names);
            }
            let next = names.iter().map(|n| n.next_order_at).min();
            let wait = next.map_or(RECHECK, |t| {
                Duration::from_secs((t - unix_now()).clamp(0, RECHECK.as_secs() as i64) as u64)
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Some(()) = renew.recv() => {
                    info!("ACME: renewal of every name requested");
                    let now = unix_now();
                    for n in &mut names {
                        n.next_order_at = now;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    fn show(&self, names: &[Name]) {
        self.status
            .send_replace(names.iter().map(Name::status).collect());
    }

    fn cert_path(&self, host: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{host}.{ext}"))
    }

    /// The saved certificate of `host`, handed to the data planes if it still loads.
    fn restore(&self, host: &str, now: i64) -> Name {
        let mut name = Name {
            host: host.to_owned(),
            valid: None,
            next_order_at: now,
            ordering: false,
            failures: 0,
            last_error: None,
        };
        let (crt_path, key_path) = (self.cert_path(host, "crt"), self.cert_path(host, "key"));
        let (Ok(chain_pem), Ok(key_pem)) = (
            std::fs::read_to_string(&crt_path),
            std::fs::read_to_string(&key_path),
        ) else {
            return name;
        };
        let provider = rustls::crypto::ring::default_provider();
        let loaded = load_pair(
            host,
            (&crt_path, chain_pem.as_bytes()),
            (&key_path, key_pem.as_bytes()),
            &provider,
            now,
        );
        match loaded {
            Ok(pair) if pair.dns.iter().any(|d| d.eq_ignore_ascii_case(host)) => {
                let validity = (pair.not_before, pair.not_after);
                info!(%host, not_after = pair.not_after, "ACME: serving the saved certificate");
                self.publish_pair(CertPair {
                    name: host.to_owned(),
                    chain_pem,
                    key_pem,
                });
                name.valid = Some(validity);
                name.next_order_at = renew_at(validity.0, validity.1);
            }
            Ok(_) => warn!(%host, "ACME: the saved certificate does not name the host; ordering"),
            Err(e) => {
                warn!(%host, error = %e, "ACME: the saved certificate does not load; ordering")
            }
        }
        name
    }

    fn publish_pair(&self, pair: CertPair) {
        self.certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_issued(pair);
    }

    /// Save an issued certificate (key first, both 0600) and send it out.
    fn keep(&self, issued: Issued) -> Result<(i64, i64), String> {
        let host = issued.pair.name.clone();
        let save = |ext: &str, text: &str| {
            let path = self.cert_path(&host, ext);
            crate::state::write_private(&path, text.as_bytes())
                .map_err(|e| format!("cannot save {}: {e}", path.display()))
        };
        save("key", &issued.pair.key_pem)?;
        save("crt", &issued.pair.chain_pem)?;
        self.publish_pair(issued.pair);
        Ok(issued.validity)
    }

    /// Put `challenges` into the table; returns once a table carrying them is published.
    async fn set_challenges(&self, challenges: BTreeMap<String, String>) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Challenges { challenges, reply })
            .await
            .map_err(|_| "the agent is stopping".to_owned())?;
        match rx.await {
            Ok(Some(_)) => Ok(()),
            _ => Err("no table could carry the challenge".to_owned()),
        }
    }

    async fn account(&self) -> Result<Account, String> {
        let path = self.dir.join("account.json");
        let directory = &self.settings.directory;
        let builder = || match &self.settings.ca_file {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        let saved = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<SavedAccount>(&b).ok())
            .filter(|s| &s.directory == directory);
        if let Some(saved) = saved {
            let account = builder()
                .map_err(|e| format!("ACME client: {e}"))?
                .from_credentials(saved.credentials)
                .await
                .map_err(|e| format!("account at {directory}: {e}"))?;
            return Ok(account);
        }
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()
            .map_err(|e| format!("ACME client: {e}"))?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory.clone(),
                None,
            )
            .await
            .map_err(|e| format!("new account at {directory}: {e}"))?;
        let saved = SavedAccount {
            directory: directory.clone(),
            credentials,
        };
        let json = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
        crate::state::write_private(&path, &json)
            .map_err(|e| format!("cannot save {}: {e}", path.display()))?;
        info!(directory, id = account.id(), "ACME: account created");
        Ok(account)
    }

    /// One order for `host`, from new-order to a certificate that loads.
    async fn order(&self, account: &mut Option<Account>, host: &str) -> Result<Issued, String> {
        let account = match account {
            Some(a) => a,
            None => account.insert(self.account().await?),
        };
        let err = |step: &'static str| move |e: instant_acme::Error| format!("{step}: {e}");
        let ids = [Identifier::Dns(host.to_owned())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(err("new order"))?;

        // First the answers, into every data plane's table; then the CA may look.
        let mut challenges = BTreeMap::new();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(err("authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("authorization is {other:?}")),
            }
            let challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or("the CA offers no http-01 challenge")?;
            challenges.insert(
                challenge.token.clone(),
                challenge.key_authorization().as_str().to_owned(),
            );
        }
        if !challenges.is_empty() {
            self.set_challenges(challenges).await?;
            tokio::time::sleep(self.propagation).await;
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(err("authorization"))?;
                if authz.status != AuthorizationStatus::Pending {
                    continue;
                }
                let mut challenge = authz
                    .challenge(ChallengeType::Http01)
                    .ok_or("the CA offers no http-01 challenge")?;
                challenge.set_ready().await.map_err(err("challenge"))?;
            }
        }
        let status = order.poll_ready(&POLL).await.map_err(err("validation"))?;
        if status != OrderStatus::Ready {
            let problem = order
                .state()
                .error
                .as_ref()
                .map_or_else(String::new, |p| format!(": {p}"));
            return Err(format!("the order is {status:?}{problem}"));
        }
        let key_pem = order.finalize().await.map_err(err("finalize"))?;
        let chain_pem = order
            .poll_certificate(&POLL)
            .await
            .map_err(err("certificate"))?;
        let provider = rustls::crypto::ring::default_provider();
        let pair = load_pair(
            host,
            (Path::new("(issued certificate)"), chain_pem.as_bytes()),
            (Path::new("(its key)"), key_pem.as_bytes()),
            &provider,
            unix_now(),
        )
        .map_err(|e| format!("the issued certificate does not load: {e}"))?;
        Ok(Issued {
            validity: (pair.not_before, pair.not_after),
            pair: CertPair {
                name: host.to_owned(),
                chain_pem,
                key_pem,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_two_thirds_of_the_lifetime() {
        let day = 86_400;
        // A 90-day certificate is renewed with 30 days left.
        assert_eq!(renew_at(0, 90 * day), 60 * day);
        assert_eq!(renew_at(1_000, 1_000 + 90 * day), 1_000 + 60 * day);
        // Short-lived (6-day) certificates: with two days left.
        assert_eq!(renew_at(0, 6 * day), 4 * day);
        // A certificate that ends before it starts is due at once.
        assert_eq!(renew_at(500, 100), 500);
    }

    #[test]
    fn retries_back_off_from_a_minute_to_six_hours() {
        let mins: Vec<u64> = (1..=12).map(|f| retry_delay(f).as_secs() / 60).collect();
        assert_eq!(mins, [1, 2, 4, 8, 16, 32, 64, 128, 256, 360, 360, 360]);
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(6 * 3600));
    }
}
