//! The relay under test, as child processes of the `outbox-relay` binary (connector,
//! sink, direct), each kept running by a supervisor.
//!
//! A fault takes a process down on purpose ([`RelayProc::kill`], [`RelayProc::term`]);
//! any other exit is *unexpected*: the relay is meant to wait and retry through every
//! outage, never to exit. The supervisor records each unexpected exit (it fails the
//! run) and restarts the process, so that one finding does not end the run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// An exit nobody asked for.
#[derive(Debug, Clone, Serialize)]
pub struct UnexpectedExit {
    pub process: String,
    pub status: String,
    pub at_secs: f64,
}

struct State {
    child: Option<Child>,
    /// True while a fault holds the process down: the supervisor leaves it alone.
    held_down: bool,
    starts: u64,
}

/// One supervised relay process.
#[derive(Clone)]
pub struct RelayProc {
    pub name: String,
    binary: PathBuf,
    args: Vec<String>,
    /// Extra environment, e.g. a metrics address of its own.
    envs: Vec<(String, String)>,
    log: PathBuf,
    state: Arc<Mutex<State>>,
    unexpected: Arc<Mutex<Vec<UnexpectedExit>>>,
    t0: Instant,
}

impl RelayProc {
    pub fn new(
        name: &str,
        binary: &Path,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        log_dir: &Path,
        unexpected: Arc<Mutex<Vec<UnexpectedExit>>>,
        t0: Instant,
    ) -> Self {
        Self {
            name: name.to_string(),
            binary: binary.to_path_buf(),
            args,
            envs,
            log: log_dir.join(format!("{name}.log")),
            state: Arc::new(Mutex::new(State {
                child: None,
                held_down: false,
                starts: 0,
            })),
            unexpected,
            t0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self, state: &mut State) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env(
                "OUTBOX_RELAY_LOG",
                "info,librdkafka=warn,rdkafka=warn,outbox_relay::sink=info",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {} {}: {e}", self.binary.display(), self.name))?;
        state.child = Some(child);
        state.starts += 1;
        Ok(())
    }

    /// Starts the process (if it is not running) and lets the supervisor keep it up.
    pub fn start(&self) -> Result<(), String> {
        let mut state = self.lock();
        state.held_down = false;
        if state.child.is_none() {
            self.spawn(&mut state)?;
        }
        Ok(())
    }

    /// SIGKILL; the process stays down until [`Self::start`].
    pub fn kill(&self) {
        let mut state = self.lock();
        state.held_down = true;
        if let Some(mut child) = state.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait up to `timeout` for the exit; a process that does not exit
    /// in time is killed. Returns the exit status text, and whether it was clean (a
    /// zero exit within the timeout).
    pub async fn term(&self, timeout: Duration) -> (String, bool) {
        let child = {
            let mut state = self.lock();
            state.held_down = true;
            state.child.take()
        };
        let Some(mut child) = child else {
            return ("not running".into(), true);
        };
        // SAFETY-free: kill(2) through the `kill` command, no libc binding needed.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return (status.to_string(), status.success()),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return (format!("no exit within {timeout:?} of SIGTERM"), false);
                }
            }
        }
    }

    /// Stops for good (end of the run): SIGTERM, then SIGKILL.
    pub async fn shutdown(&self) {
        let _ = self.term(Duration::from_secs(30)).await;
    }

    pub fn starts(&self) -> u64 {
        self.lock().starts
    }

    /// One supervision step: an exited process that is not held down is recorded as
    /// an unexpected exit and restarted.
    pub fn supervise(&self) {
        let mut state = self.lock();
        if state.held_down {
            return;
        }
        let exited = match state.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(format!("wait failed: {e}")),
            _ => None,
        };
        if let Some(status) = exited {
            state.child = None;
            let at_secs = self.t0.elapsed().as_secs_f64();
            eprintln!(
                "chaos: UNEXPECTED EXIT of {} ({status}) at t+{at_secs:.1}s, see {}; restarting",
                self.name,
                self.log.display()
            );
            self.unexpected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(UnexpectedExit {
                    process: self.name.clone(),
                    status,
                    at_secs,
                });
            if let Err(error) = self.spawn(&mut state) {
                eprintln!("chaos: {error}");
            }
        }
    }
}
