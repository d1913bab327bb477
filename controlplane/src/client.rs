//! The CLI's side of the admin API: a one-request-per-connection HTTP client and the commands
//! that follow an operation until it is done, printing each change.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::{DeployAccepted, DeployRequest, ErrorBody, ScaleRequest, ServiceStatus, Status};
use crate::auth::Token;
use crate::cli::{AgentArgs, WaitArgs};

const POLL: Duration = Duration::from_millis(200);

pub struct Client {
    addr: String,
    token: Token,
}

impl Client {
    pub fn new(args: &AgentArgs) -> Result<Client> {
        let token = Token::read(&args.token_file).map_err(|e| {
            anyhow!("{e} (the CLI needs the agent's token: pass --token-file or set RUSTY_AGENT_TOKEN_FILE)")
        })?;
        Ok(Client {
            addr: args.agent.clone(),
            token,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<T> {
        let mut stream =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&self.addr))
                .await
                .map_err(|_| anyhow!("agent at {} did not answer within 5s", self.addr))?
                .with_context(|| {
                    format!(
                        "cannot reach the agent at {} (is it running? see --agent)",
                        self.addr
                    )
                })?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.token.as_str(),
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
            .await
            .map_err(|_| anyhow!("the agent did not finish its answer"))??;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let start = match resp.parse(&raw)? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => bail!("truncated answer from the agent"),
        };
        let code = resp.code.unwrap_or(0);
        let text = &raw[start..];
        if !(200..300).contains(&code) {
            let msg = serde_json::from_slice::<ErrorBody>(text)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(text).trim().to_owned());
            bail!("agent answered {code}: {msg}");
        }
        serde_json::from_slice(text).context("unexpected answer from the agent")
    }

    pub async fn status(&self) -> Result<Status> {
        self.call("GET", "/v1/status", None).await
    }

    async fn service(&self, name: &str) -> Result<ServiceStatus> {
        self.status()
            .await?
            .services
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("no service {name:?}"))
    }
}

pub async fn status(args: &AgentArgs, json: bool) -> Result<()> {
    let st = Client::new(args)?.status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!(
        "table version {}   subscribers {}",
        st.table_version
            .map_or("(none yet)".to_owned(), |v| v.to_string()),
        st.subscribers
    );
    for s in &st.services {
        println!();
        println!(
            "{}  ({}, generation {})  desired {}  live {}  in table {}",
            s.name, s.runtime, s.generation, s.replicas, s.live, s.healthy
        );
        match s.runtime.as_str() {
            "process" => println!("  runs: {} {}", s.command, s.args.join(" ")),
            "docker" => println!("  image: {} {}", s.image, s.args.join(" ")),
            _ => {}
        }
        if let Some(a) = &s.autoscale {
            println!(
                "  autoscale: {}..{} instances, target {} in flight each; load now {}",
                a.min_replicas,
                a.max_replicas,
                a.target_inflight,
                a.load
                    .map_or("(no sample yet)".to_owned(), |l| format!("{l:.1}"))
            );
            if let Some(d) = &a.last_decision {
                println!(
                    "  last autoscale: {} -> {} instances {:.1}s ago: {}",
                    d.from,
                    d.to,
                    d.ago_ms as f64 / 1000.0,
                    d.reason
                );
            }
        }
        if let Some(r) = &s.outlier_replaced {
            println!("  last outlier replaced: {r}");
        }
        if let Some(d) = &s.deploy {
            println!(
                "  last deploy: generation {} from {}: {} after {:.1}s{}",
                d.generation,
                d.from,
                d.state,
                d.elapsed_ms as f64 / 1000.0,
                d.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        println!(
            "  {:<16} {:>4} {:<22} {:<9} {:<9} {:>8} {:>8}  last error",
            "INSTANCE", "GEN", "ADDRESS", "PHASE", "HEALTH", "RESTARTS", "PID"
        );
        for i in &s.instances {
            println!(
                "  {:<16} {:>4} {:<22} {:<9} {:<9} {:>8} {:>8}  {}",
                i.id,
                i.generation,
                i.addr.as_deref().unwrap_or("-"),
                i.phase,
                if i.in_table {
                    "in table"
                } else if i.healthy {
                    "healthy"
                } else {
                    "down"
                },
                i.restarts,
                i.pid.map_or("-".to_owned(), |p| p.to_string()),
                i.last_error.as_deref().unwrap_or("")
            );
        }
    }
    if !st.acme.is_empty() {
        println!();
        println!(
            "ACME  {:<32} {:<9} {:<22} {:<22} {:>8}  last error",
            "HOST", "STATE", "NOT AFTER", "NEXT ORDER", "FAILURES"
        );
        for c in &st.acme {
            println!(
                "      {:<32} {:<9} {:<22} {:<22} {:>8}  {}",
                c.host,
                c.state,
                c.not_after.map_or("-".to_owned(), rfc3339),
                c.next_order_at.map_or("-".to_owned(), rfc3339),
                c.failures,
                c.last_error.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
fn rfc3339(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// `rusty-agent renew`: order every ACME certificate again now.
pub async fn renew(args: &AgentArgs) -> Result<()> {
    let client = Client::new(args)?;
    let answer: serde_json::Value = client
        .call("POST", "/v1/acme/renew", Some(String::new()))
        .await?;
    let hosts = answer["renewing"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!("renewing: {hosts} (rusty-agent status shows the progress)");
    Ok(())
}

fn line(s: &ServiceStatus) -> String {
    let mut by_gen: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for i in &s.instances {
        let e = by_gen.entry(i.generation).or_default();
        e.0 += 1;
        e.1 += usize::from(i.in_table);
    }
    let gens: Vec<String> = by_gen
        .iter()
        .map(|(g, (n, t))| format!("gen {g}: {n} instances, {t} in table"))
        .collect();
    format!("{}: desired {}, {}", s.name, s.replicas, gens.join("; "))
}

pub async fn scale(service: &str, replicas: u32, args: &AgentArgs, wait: &WaitArgs) -> Result<()> {
    let client = Client::new(args)?;
    let body = serde_json::to_string(&ScaleRequest { replicas })?;
    let _: ScaleRequest = client
        .call("POST", &format!("/v1/services/{service}/scale"), Some(body))
        .await?;
    println!("{service}: scaling to {replicas}");
    if wait.no_wait {
        return Ok(());
    }
    let started = Instant::now();
    follow(&client, service, wait, |s| {
        // Discovered containers serve the service too but are not the agent's to count.
        let managed: Vec<_> = s.instances.iter().filter(|i| i.managed).collect();
        let settled = managed.len() == replicas as usize
            && managed
                .iter()
                .all(|i| i.in_table && i.generation == s.generation);
        settled.then(|| {
            println!(
                "{service}: {replicas} instances in the table after {:.1}s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        })
    })
    .await
}

/// Print each change of `service` until `done` gives an outcome or the wait runs out.
async fn follow(
    client: &Client,
    service: &str,
    wait: &WaitArgs,
    mut done: impl FnMut(&ServiceStatus) -> Option<Result<()>>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(wait.timeout);
    let mut last = String::new();
    loop {
        let s = client.service(service).await?;
        let l = line(&s);
        if l != last {
            println!("  {l}");
            last = l;
        }
        if let Some(outcome) = done(&s) {
            return outcome;
        }
        if Instant::now() > deadline {
            bail!(
                "{service}: not finished after {}s (the agent keeps working on it; see `rusty-agent status`)",
                wait.timeout
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn deploy(
    service: &str,
    request: DeployRequest,
    args: &AgentArgs,
    wait: &WaitArgs,
) -> Result<()> {
    let client = Client::new(args)?;
    let body = serde_json::to_string(&request)?;
    let accepted: DeployAccepted = client
        .call(
            "POST",
            &format!("/v1/services/{service}/deploy"),
            Some(body),
        )
        .await?;
    let generation = accepted.generation;
    println!("{service}: deploying generation {generation}");
    if wait.no_wait {
        return Ok(());
    }
    follow(&client, service, wait, |s| {
        let d = s.deploy.as_ref().filter(|d| d.generation == generation)?;
        let secs = d.elapsed_ms as f64 / 1000.0;
        match d.state.as_str() {
            "succeeded" => {
                println!("{service}: generation {generation} serves all traffic ({secs:.1}s)");
                Some(Ok(()))
            }
            "failed" => Some(Err(anyhow!(
                "{service}: deploy of generation {generation} failed after {secs:.1}s, generation {} keeps serving: {}",
                s.generation,
                d.reason.as_deref().unwrap_or("no reason given")
            ))),
            _ => None,
        }
    })
    .await
}

pub async fn drain(instance: &str, args: &AgentArgs) -> Result<()> {
    let (service, _) = instance
        .rsplit_once('-')
        .ok_or_else(|| anyhow!("{instance:?} is not an instance id like web-3"))?;
    let client = Client::new(args)?;
    let _: serde_json::Value = client
        .call(
            "POST",
            &format!("/v1/services/{service}/instances/{instance}/drain"),
            Some(String::new()),
        )
        .await?;
    println!("{instance}: draining; a replacement is starting");
    Ok(())
}

/// `--set-env K=V` pairs → a map, naming the bad one.
pub fn parse_env(pairs: &[String]) -> Result<Option<BTreeMap<String, String>>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut env = BTreeMap::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| anyhow!("--set-env {p:?}: write KEY=VALUE"))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    Ok(Some(env))
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_136_061), "2026-12-01T14:41:01Z");
    }
}
