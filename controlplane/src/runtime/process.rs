//! The `process` runtime: each instance is a local child process on a port of its own.
//!
//! A supervisor task per instance owns the child. When the child exits on its own the task
//! reports it and starts it again on the same port, with exponential backoff (reset after a run
//! of [`STABLE_RUN`]). Stopping sends SIGTERM to the child's process group and SIGKILL when the
//! grace period is over. Its stdout and stderr go to the agent's log, line by line, tagged with
//! the instance id.
//!
//! Children never outlive the agent: they are stopped at shutdown, and each one is started with
//! `PR_SET_PDEATHSIG = SIGKILL` so the kernel kills it if the agent itself is killed. (The signal
//! follows the thread that spawned the child; spawns happen on the runtime's worker threads,
//! which live as long as the agent.)

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{InstanceInfo, InstanceSpec, Runtime, RuntimeError, RuntimeEvent};
use crate::spec::InstanceRef;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A child that ran this long before it exited starts over at the shortest backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);

struct Supervised {
    addr: SocketAddr,
    pid: Arc<AtomicU32>,
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

pub struct ProcessRuntime {
    host: IpAddr,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    children: Mutex<HashMap<InstanceRef, Supervised>>,
}

impl ProcessRuntime {
    pub fn new(host: IpAddr, events: mpsc::UnboundedSender<RuntimeEvent>) -> ProcessRuntime {
        ProcessRuntime {
            host,
            events,
            children: Mutex::new(HashMap::new()),
        }
    }
}

/// A port nobody listens on right now. The child binds it a moment later; if something else
/// took it meanwhile the child fails, is restarted, and the health check keeps it out.
fn free_port(host: IpAddr) -> Result<u16, RuntimeError> {
    TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(RuntimeError::Port)
}

/// Everything needed to (re)spawn the same instance.
#[derive(Clone)]
struct Launch {
    instance: InstanceRef,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Launch {
    fn new(spec: &InstanceSpec, addr: SocketAddr) -> Launch {
        let id = spec.instance.to_string();
        let fill = |s: &str| {
            s.replace("{port}", &addr.port().to_string())
                .replace("{host}", &addr.ip().to_string())
                .replace("{instance}", &id)
                .replace("{generation}", &spec.generation.to_string())
        };
        let mut env: Vec<(String, String)> = spec
            .run
            .env
            .iter()
            .map(|(k, v)| (k.clone(), fill(v)))
            .collect();
        env.push(("PORT".into(), addr.port().to_string()));
        env.push(("HOST".into(), addr.ip().to_string()));
        env.push(("RUSTY_INSTANCE".into(), id.clone()));
        env.push(("RUSTY_SERVICE".into(), spec.instance.service.clone()));
        env.push(("RUSTY_GENERATION".into(), spec.generation.to_string()));
        Launch {
            instance: spec.instance.clone(),
            program: spec.run.command.clone(),
            args: spec.run.args.iter().map(|a| fill(a)).collect(),
            env,
        }
    }

    fn spawn(&self) -> Result<Child, RuntimeError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: between fork and exec only async-signal-safe calls (setpgid, prctl).
        unsafe {
            cmd.pre_exec(|| {
                // Own process group, so a stop reaches whatever the command starts.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            command: self.program.clone(),
            source,
        })?;
        let id = self.instance.to_string();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(out, id.clone(), "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(err, id, "stderr"));
        }
        Ok(child)
    }
}

async fn forward(stream: impl AsyncRead + Unpin, instance: String, name: &'static str) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        info!(target: "rusty_agent::instance", instance = %instance, stream = name, "{line}");
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (_, Some(sig)) => format!("killed by signal {sig}"),
            _ => "exited".to_owned(),
        },
        Err(e) => format!("lost: {e}"),
    }
}

fn signal_group(child: &Child, sig: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a negative pid signals the child's process group.
        unsafe {
            libc::kill(-(pid as i32), sig);
        }
    }
}

async fn terminate(child: &mut Child, grace: Duration) {
    signal_group(child, libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(child, libc::SIGKILL);
        let _ = child.kill().await;
    }
}

/// Own one instance's child until asked to stop.
async fn supervise(
    launch: Launch,
    mut child: Child,
    pid: Arc<AtomicU32>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let id = launch.instance.to_string();
    let mut backoff = BACKOFF_MIN;
    loop {
        let since = Instant::now();
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop.changed() => {
                let grace = (*stop.borrow()).unwrap_or_default();
                terminate(&mut child, grace).await;
                return;
            }
        };
        let detail = describe(status);
        warn!(instance = %id, "{detail}; restarting");
        let _ = events.send(RuntimeEvent::Exited {
            instance: launch.instance.clone(),
            detail,
        });
        if since.elapsed() >= STABLE_RUN {
            backoff = BACKOFF_MIN;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match launch.spawn() {
                Ok(c) => {
                    child = c;
                    pid.store(child.id().unwrap_or(0), Ordering::Relaxed);
                    info!(instance = %id, pid = child.id().unwrap_or(0), "restarted");
                    let _ = events.send(RuntimeEvent::Restarted {
                        instance: launch.instance.clone(),
                    });
                    break;
                }
                Err(e) => warn!(instance = %id, "{e}; trying again in {}ms", backoff.as_millis()),
            }
        }
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    async fn start(&self, spec: InstanceSpec) -> Result<SocketAddr, RuntimeError> {
        let addr = SocketAddr::new(self.host, free_port(self.host)?);
        let launch = Launch::new(&spec, addr);
        let child = launch.spawn()?;
        let pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
        info!(instance = %spec.instance, %addr, pid = child.id().unwrap_or(0), generation = spec.generation, "started");
        let (stop, stop_rx) = watch::channel(None);
        let task = tokio::spawn(supervise(
            launch,
            child,
            pid.clone(),
            self.events.clone(),
            stop_rx,
        ));
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children.insert(
            spec.instance,
            Supervised {
                addr,
                pid,
                stop,
                task,
            },
        );
        Ok(addr)
    }

    async fn stop(&self, instance: &InstanceRef, grace: Duration) -> Result<(), RuntimeError> {
        let supervised = {
            let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
            children.remove(instance)
        };
        let s = supervised.ok_or_else(|| RuntimeError::Unknown(instance.to_string()))?;
        let _ = s.stop.send(Some(grace));
        let _ = s.task.await;
        info!(%instance, "stopped");
        Ok(())
    }

    async fn list(&self) -> Vec<InstanceInfo> {
        let children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children
            .iter()
            .map(|(i, s)| InstanceInfo {
                id: i.to_string(),
                addr: s.addr,
                pid: Some(s.pid.load(Ordering::Relaxed)).filter(|p| *p != 0),
            })
            .collect()
    }
}
