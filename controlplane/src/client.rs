//! The CLI's side of the admin API: a one-request-per-connection HTTP client and the commands
//! that follow an operation until it is done, showing each change (a progress bar on a
//! terminal, plain lines otherwise: `progress`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::{DeployAccepted, DeployRequest, ErrorBody, ScaleRequest, ServiceStatus, Status};
use crate::auth::Token;
use crate::cli::{AgentArgs, WaitArgs};
use crate::progress::{scale_steps, Progress, Steps};

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

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn rfc3339(t: i64) -> String {
    rusty_shared::civil::Civil::from_unix(t).rfc3339()
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

/// Instances the agent runs for the service (discovered containers serve it too but are not the
/// agent's to count), and of those the ones of its current generation in the table.
fn managed(s: &ServiceStatus) -> (u64, u64) {
    let managed = s.instances.iter().filter(|i| i.managed);
    let serving = managed
        .clone()
        .filter(|i| i.in_table && i.generation == s.generation)
        .count();
    (managed.count() as u64, serving as u64)
}

pub async fn scale(service: &str, replicas: u32, args: &AgentArgs, wait: &WaitArgs) -> Result<()> {
    let client = Client::new(args)?;
    let from = managed(&client.service(service).await?).0;
    let body = serde_json::to_string(&ScaleRequest { replicas })?;
    let _: ScaleRequest = client
        .call("POST", &format!("/v1/services/{service}/scale"), Some(body))
        .await?;
    println!("{service}: scaling to {replicas}");
    if wait.no_wait {
        return Ok(());
    }
    let started = Instant::now();
    let to = u64::from(replicas);
    let steps = |s: &ServiceStatus| {
        let (all, serving) = managed(s);
        scale_steps(from, to, if to >= from { serving } else { all })
    };
    follow(
        &client,
        service,
        wait,
        &format!("scale {service}"),
        steps,
        |s| {
            let (all, serving) = managed(s);
            let settled = all == to && serving == to;
            settled.then(|| {
                Ok(format!(
                    "{service}: {replicas} instances in the table after {:.1}s",
                    started.elapsed().as_secs_f64()
                ))
            })
        },
    )
    .await
}

/// Show each change of `service` (`what` names the operation on a bar, `steps` counts its
/// progress) until `done` gives an outcome — its closing line, printed once the bar is
/// cleared, or the error — or the wait runs out.
async fn follow(
    client: &Client,
    service: &str,
    wait: &WaitArgs,
    what: &str,
    steps: impl Fn(&ServiceStatus) -> Steps,
    mut done: impl FnMut(&ServiceStatus) -> Option<Result<String>>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(wait.timeout);
    let mut progress = Progress::new(what);
    loop {
        let s = client.service(service).await?;
        progress.update(&line(&s), steps(&s));
        if let Some(outcome) = done(&s) {
            progress.finish();
            println!("{}", outcome?);
            return Ok(());
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
    let steps = |s: &ServiceStatus| {
        let new = s
            .instances
            .iter()
            .filter(|i| i.managed && i.generation == generation && i.in_table)
            .count() as u64;
        let of = u64::from(s.replicas).max(1);
        Steps {
            done: new.min(of),
            of,
        }
    };
    let what = format!("deploy {service} generation {generation}");
    follow(&client, service, wait, &what, steps, |s| {
        let d = s.deploy.as_ref().filter(|d| d.generation == generation)?;
        let secs = d.elapsed_ms as f64 / 1000.0;
        match d.state.as_str() {
            "succeeded" => {
                Some(Ok(format!(
                    "{service}: generation {generation} serves all traffic ({secs:.1}s)"
                )))
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

pub async fn drain(instance: &str, args: &AgentArgs, wait: &WaitArgs) -> Result<()> {
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
    if wait.no_wait {
        return Ok(());
    }
    let started = Instant::now();
    // Two steps: the instance is gone, and the service is back to its replicas in the table.
    let gone = |s: &ServiceStatus| s.instances.iter().all(|i| i.id != instance);
    let whole = |s: &ServiceStatus| {
        let (all, serving) = managed(s);
        all == u64::from(s.replicas) && serving == all
    };
    let steps = |s: &ServiceStatus| Steps {
        done: u64::from(gone(s)) + u64::from(gone(s) && whole(s)),
        of: 2,
    };
    follow(
        &client,
        service,
        wait,
        &format!("drain {instance}"),
        steps,
        |s| {
            (gone(s) && whole(s)).then(|| {
                Ok(format!(
                    "{instance}: stopped and replaced after {:.1}s",
                    started.elapsed().as_secs_f64()
                ))
            })
        },
    )
    .await
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
