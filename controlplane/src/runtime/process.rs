//! The `process` runtime: each instance is a local child process on a port of its own.
//!
//! A supervisor task per instance owns the child. When the child exits on its own the task
//! reports it and starts it again on the same port, with exponential backoff (reset after a run
//! of [`STABLE_RUN`]). Stopping sends SIGTERM to the child's process group and SIGKILL when the
//! grace period is over.
//!
//! Instances outlive a crash of the agent, so traffic does not notice one: a deliberate stop
//! (SIGTERM, SIGINT) stops them as before, but a SIGKILLed or crashed agent leaves them running.
//! Each start is recorded in `state_dir/processes.json` (instance, address, pid, the process's
//! start time, what it runs); a restarted agent adopts every recorded process that still runs
//! *and* has the recorded start time (so a reused pid is never taken for ours), watches it
//! through a pidfd, and restarts it like its own children when it exits. Output goes to
//! `state_dir/logs/INSTANCE.log` (a pipe would break with the agent), which the agent follows
//! into its own log, line by line, tagged with the instance id, and empties past 8 MiB.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Adopted, InstanceInfo, InstanceSpec, Runtime, RuntimeError, RuntimeEvent};
use crate::spec::{InstanceRef, RunSpec};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A child that ran this long before it exited starts over at the shortest backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// An instance's log file is emptied once the agent has read this much of it.
const LOG_KEEP: u64 = 8 * 1024 * 1024;
/// Longest line forwarded from an instance's output (the rest of the line is dropped).
const MAX_LINE: usize = 16 * 1024;

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
    records: Arc<Records>,
}

impl ProcessRuntime {
    pub fn new(
        host: IpAddr,
        events: mpsc::UnboundedSender<RuntimeEvent>,
        state_dir: &Path,
    ) -> ProcessRuntime {
        ProcessRuntime {
            host,
            events,
            children: Mutex::new(HashMap::new()),
            records: Arc::new(Records::open(state_dir)),
        }
    }
}

/// What a restarted agent needs to know of a running instance, and to tell it is the one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    service: String,
    seq: u64,
    addr: SocketAddr,
    pid: u32,
    /// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
    started: u64,
    run: RunSpec,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// `processes.json` and the log directory. Writing the file can fail (a full disk): that is
/// logged, and only adoption after a crash is lost, never a start.
struct Records {
    file: PathBuf,
    logs: PathBuf,
    map: Mutex<BTreeMap<String, Record>>,
}

impl Records {
    fn open(state_dir: &Path) -> Records {
        let file = state_dir.join("processes.json");
        let map = crate::state::read_or_previous(&file, |b| {
            serde_json::from_slice::<Vec<Record>>(b).map_err(|e| e.to_string())
        })
        .unwrap_or_default()
        .into_iter()
        .map(|r| (format!("{}-{}", r.service, r.seq), r))
        .collect();
        Records {
            file,
            logs: state_dir.join("logs"),
            map: Mutex::new(map),
        }
    }

    fn log_file(&self, instance: &InstanceRef) -> PathBuf {
        self.logs.join(format!("{instance}.log"))
    }

    fn set(&self, record: Option<Record>, instance: &InstanceRef) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match record {
            Some(r) => map.insert(instance.to_string(), r),
            None => map.remove(&instance.to_string()),
        };
        let all: Vec<&Record> = map.values().collect();
        let saved = serde_json::to_vec_pretty(&all)
            .map_err(std::io::Error::other)
            .and_then(|json| crate::state::write_atomic(&self.file, &json));
        if let Err(e) = saved {
            warn!(file = %self.file.display(), "cannot record the instances ({e}); after a crash they would not be adopted");
        }
    }

    fn take_all(&self) -> Vec<Record> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }
}

/// When `pid` started (field 22 of its `/proc/PID/stat`), if it runs and is not a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3; field 22 is 19 further.
    fields.nth(18)?.parse().ok()
}

/// A pidfd for `pid`: readable once the process has exited, whoever its parent is.
fn pidfd(pid: u32) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us and nothing else owns it; the OwnedFd
    // keeps it open, unchanged, for as long as the AsyncFd owns that.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
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
    addr: SocketAddr,
    run: RunSpec,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    records: Arc<Records>,
}

impl Launch {
    fn new(spec: &InstanceSpec, addr: SocketAddr, records: Arc<Records>) -> Launch {
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
            addr,
            run: (*spec.run).clone(),
            program: spec.run.command.clone(),
            args: spec.run.args.iter().map(|a| fill(a)).collect(),
            env,
            records,
        }
    }

    fn from_record(r: &Record, records: Arc<Records>) -> Launch {
        Launch {
            instance: InstanceRef {
                service: r.service.clone(),
                seq: r.seq,
            },
            addr: r.addr,
            run: r.run.clone(),
            program: r.program.clone(),
            args: r.args.clone(),
            env: r.env.clone(),
            records,
        }
    }

    fn output(&self) -> std::io::Result<(std::fs::File, std::fs::File)> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&self.records.logs)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(self.records.log_file(&self.instance))?;
        Ok((file.try_clone()?, file))
    }

    /// Start the process and record it.
    fn spawn(&self) -> Result<Child, RuntimeError> {
        let spawn_error = |source| RuntimeError::Spawn {
            command: self.program.clone(),
            source,
        };
        let (out, err) = self.output().map_err(spawn_error)?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Not killed with the agent: a crashed agent's instances keep serving.
            .kill_on_drop(false);
        // SAFETY: between fork and exec only async-signal-safe calls (setpgid).
        unsafe {
            cmd.pre_exec(|| {
                // Own process group, so a stop reaches whatever the command starts, and a
                // terminal's Ctrl-C reaches the agent only (which stops them in order).
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_error)?;
        let pid = child.id().unwrap_or(0);
        self.record(pid);
        Ok(child)
    }

    fn record(&self, pid: u32) {
        let Some(started) = start_time(pid) else {
            return;
        };
        self.records.set(
            Some(Record {
                service: self.instance.service.clone(),
                seq: self.instance.seq,
                addr: self.addr,
                pid,
                started,
                run: self.run.clone(),
                program: self.program.clone(),
                args: self.args.clone(),
                env: self.env.clone(),
            }),
            &self.instance,
        );
    }
}

/// Forward what an instance writes to its log file into the agent's log, from byte `from` on,
/// until the instance is stopped; empty the file once it holds more than [`LOG_KEEP`]. Reads of
/// a local file do not block for long, so they run on the task itself.
async fn follow(
    path: PathBuf,
    mut from: u64,
    instance: String,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    use std::io::{BufRead, Read, Seek};
    let Ok(file) = std::fs::File::open(&path) else {
        return;
    };
    let mut reader = std::io::BufReader::new(file);
    if reader.seek(std::io::SeekFrom::Start(from)).is_err() {
        return;
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => {
                if from > LOG_KEEP {
                    // The instance writes with O_APPEND: after this it writes at 0 again.
                    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
                        let _ = f.set_len(0);
                    }
                    from = 0;
                    let _ = reader.seek(std::io::SeekFrom::Start(0));
                }
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => false,
                    _ = stop.changed() => true,
                };
                if stopped {
                    // Its last words, written while it stopped.
                    let mut rest = Vec::new();
                    let _ = (&mut reader).take(64 * 1024).read_to_end(&mut rest);
                    for l in String::from_utf8_lossy(&rest).lines() {
                        info!(target: "rusty_agent::instance", instance = %instance, "{l}");
                    }
                    return;
                }
            }
            Ok(n) => {
                from += n as u64;
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                info!(target: "rusty_agent::instance", instance = %instance, "{text}");
                // A line over the cap: skip the rest of it.
                if n == MAX_LINE && !line.ends_with(b"\n") {
                    let mut rest = Vec::new();
                    while let Ok(k) = (&mut reader)
                        .take(MAX_LINE as u64)
                        .read_until(b'\n', &mut rest)
                    {
                        from += k as u64;
                        if k == 0 || rest.ends_with(b"\n") {
                            break;
                        }
                        rest.clear();
                    }
                }
            }
        }
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

/// One run of an instance: our child, or a process an earlier agent started (its parent is
/// now init, so it is watched through a pidfd and cannot be waited for).
enum Running {
    Child(Child),
    Adopted { pid: u32, exited: AsyncFd<OwnedFd> },
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child(c) => c.id().unwrap_or(0),
            Running::Adopted { pid, .. } => *pid,
        }
    }

    /// Until it exits; how it ended, for the log.
    async fn wait(&mut self) -> String {
        match self {
            Running::Child(c) => describe(c.wait().await),
            Running::Adopted { exited, .. } => match exited.readable().await {
                Ok(_) => "exited (adopted: its status went to init)".to_owned(),
                Err(e) => format!("lost: {e}"),
            },
        }
    }

    fn signal_group(&self, sig: i32) {
        let pid = self.pid();
        if pid != 0 {
            // SAFETY: kill(2) with a negative pid signals the process group it leads.
            unsafe {
                libc::kill(-(pid as i32), sig);
            }
        }
    }

    async fn terminate(&mut self, grace: Duration) {
        self.signal_group(libc::SIGTERM);
        if tokio::time::timeout(grace, self.wait()).await.is_err() {
            self.signal_group(libc::SIGKILL);
            if let Running::Child(c) = self {
                let _ = c.kill().await;
            } else {
                let _ = tokio::time::timeout(Duration::from_secs(5), self.wait()).await;
            }
        }
    }
}

/// Own one instance until asked to stop.
async fn supervise(
    launch: Launch,
    mut running: Running,
    pid: Arc<AtomicU32>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let id = launch.instance.to_string();
    let mut backoff = BACKOFF_MIN;
    loop {
        let since = Instant::now();
        let detail = tokio::select! {
            detail = running.wait() => detail,
            _ = stop.changed() => {
                let grace = (*stop.borrow()).unwrap_or_default();
                running.terminate(grace).await;
                launch.records.set(None, &launch.instance);
                return;
            }
        };
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
                _ = stop.changed() => {
                    launch.records.set(None, &launch.instance);
                    return;
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match launch.spawn() {
                Ok(c) => {
                    running = Running::Child(c);
                    pid.store(running.pid(), Ordering::Relaxed);
                    info!(instance = %id, pid = running.pid(), "restarted");
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

impl ProcessRuntime {
    fn log_len(&self, instance: &InstanceRef) -> u64 {
        std::fs::metadata(self.records.log_file(instance)).map_or(0, |m| m.len())
    }

    /// What a crash does: the supervisors vanish, the processes stay.
    #[cfg(test)]
    fn abandon(&self) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        for (_, s) in children.drain() {
            s.task.abort();
        }
    }

    /// Supervise `running` from now on and follow its output from byte `from` of its log.
    fn supervise(&self, launch: Launch, running: Running, from: u64) {
        let instance = launch.instance.clone();
        let addr = launch.addr;
        let pid = Arc::new(AtomicU32::new(running.pid()));
        let (stop, stop_rx) = watch::channel(None);
        let log = self.records.log_file(&instance);
        tokio::spawn(follow(log, from, instance.to_string(), stop_rx.clone()));
        let task = tokio::spawn(supervise(
            launch,
            running,
            pid.clone(),
            self.events.clone(),
            stop_rx,
        ));
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children.insert(
            instance,
            Supervised {
                addr,
                pid,
                stop,
                task,
            },
        );
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    async fn start(&self, spec: InstanceSpec) -> Result<SocketAddr, RuntimeError> {
        let addr = SocketAddr::new(self.host, free_port(self.host)?);
        let launch = Launch::new(&spec, addr, self.records.clone());
        // From where its log ends now: what it writes from its first byte on is forwarded.
        let from = self.log_len(&spec.instance);
        let child = launch.spawn()?;
        info!(instance = %spec.instance, %addr, pid = child.id().unwrap_or(0), generation = spec.generation, "started");
        self.supervise(launch, Running::Child(child), from);
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

    /// The recorded processes that still run with their recorded start time; the others are
    /// forgotten (a pid that now names another process is left alone).
    async fn adopt(&self) -> Vec<Adopted> {
        let mut adopted = Vec::new();
        for r in self.records.take_all() {
            let instance = InstanceRef {
                service: r.service.clone(),
                seq: r.seq,
            };
            let ours = start_time(r.pid) == Some(r.started);
            let watched = if ours {
                pidfd(r.pid)
            } else {
                Err(std::io::ErrorKind::NotFound.into())
            };
            match watched {
                Ok(exited) => {
                    info!(%instance, addr = %r.addr, pid = r.pid, "adopted a running instance");
                    let launch = Launch::from_record(&r, self.records.clone());
                    // What it wrote while no agent ran stays in the file, not in our log.
                    let from = self.log_len(&instance);
                    self.supervise(launch, Running::Adopted { pid: r.pid, exited }, from);
                    adopted.push(Adopted {
                        instance,
                        addr: r.addr,
                        run: r.run,
                    });
                }
                Err(e) => {
                    if ours {
                        warn!(%instance, pid = r.pid, "cannot watch it ({e}); not adopted");
                    } else {
                        info!(%instance, pid = r.pid, "no longer runs; not adopted");
                    }
                    self.records.set(None, &instance);
                }
            }
        }
        adopted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &str, args: &[&str]) -> RunSpec {
        RunSpec {
            command: command.to_owned(),
            image: String::new(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Default::default(),
            weight: 1,
            priority: 0,
        }
    }

    fn alive(pid: u32) -> bool {
        start_time(pid).is_some()
    }

    #[tokio::test]
    async fn a_new_runtime_adopts_what_the_last_one_started_and_only_that() {
        let dir = std::env::temp_dir().join(format!("rusty-process-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let host: IpAddr = "127.0.0.1".parse().unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let first = ProcessRuntime::new(host, tx.clone(), &dir);
        let spec = |seq| InstanceSpec {
            instance: InstanceRef {
                service: "web".into(),
                seq,
            },
            generation: 1,
            run: Arc::new(run("sh", &["-c", "echo up {instance}; exec sleep 30"])),
        };
        let a = first.start(spec(1)).await.unwrap();
        first.start(spec(2)).await.unwrap();
        let listed = first.list().await;
        let pid_of = |id: &str| {
            listed
                .iter()
                .find(|i| i.id == id)
                .and_then(|i| i.pid)
                .unwrap()
        };
        let (one, two) = (pid_of("web-1"), pid_of("web-2"));
        let pids = [one, two];
        // The agent is gone without stopping anything (a crash): its tasks just vanish.
        first.abandon();
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            pids.iter().all(|p| alive(*p)),
            "instances outlive the runtime"
        );
        let log = std::fs::read_to_string(dir.join("logs/web-1.log")).unwrap();
        assert_eq!(log, "up web-1\n");

        // A pid recorded with another start time is not ours: left alone, not adopted.
        let records = Records::open(&dir);
        let mut forged = records.take_all().into_iter().find(|r| r.seq == 2).unwrap();
        forged.started += 1;
        records.set(Some(forged), &spec(2).instance);
        let second = ProcessRuntime::new(host, tx, &dir);
        let adopted = second.adopt().await;
        assert_eq!(adopted.len(), 1, "{adopted:?}");
        assert_eq!((adopted[0].instance.seq, adopted[0].addr), (1, a));
        assert_eq!(adopted[0].run, *spec(1).run);
        let listed: Vec<Option<u32>> = second.list().await.iter().map(|i| i.pid).collect();
        assert_eq!(listed, [Some(one)]);
        assert!(alive(two), "the other process is left alone");

        // An adopted instance is stopped like a child: SIGTERM to its group, and gone.
        second
            .stop(&spec(1).instance, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(!alive(one));
        assert!(
            Records::open(&dir).take_all().iter().all(|r| r.seq != 1),
            "forgotten once stopped"
        );
        for p in pids {
            // SAFETY: test cleanup of the processes this test started.
            unsafe {
                libc::kill(p as i32, libc::SIGKILL);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
