//! The relay under test, as child processes of the `outbox-relay` binary (connector,
//! sink, direct), each kept running by a supervisor.
//!
//! A fault takes a process down on purpose ([`RelayProc::kill`], [`RelayProc::term`]);
//! any other exit is *unexpected*: the relay is meant to wait and retry through every
//! outage, never to exit. The supervisor records each unexpected exit (it fails the
//! run) and restarts the process, so that one finding does not end the run.
//!
//! A hand-over ([`RelayProc::hand_over`]) starts a second instance of the process, a
//! successor, beside the running one: the relay's hot standby. Once the successor
//! stands by (its `outbox_relay_standby` gauge is 1), the active instance leaves
//! (SIGKILL, or SIGTERM as in a rolling upgrade) and the successor becomes the
//! process. The two instances serve their metrics on two ports, so the successor's own
//! gauge and `/readyz` say what it is doing; after the hand-over the ports swap roles.
//!
//! A successor started while the active instance is between sessions (pg_start down in
//! the other lane) may take the slot itself; the old instance then stands by, and the
//! hand-over's note says the roles were reversed. If the old instance was reading the
//! destination's progress at that moment, the successor fences it and it exits with
//! status 2 naming the fence: the relay's documented answer to a fence. Such an exit,
//! while a successor runs, is recorded as fenced by the successor and does not fail the
//! run; any other exit does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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
    /// Which of [`RelayProc::metrics_ports`] the running instance serves on.
    port: usize,
}

/// How the active instance leaves in a hand-over.
#[derive(Debug, Clone, Copy)]
pub enum Leave {
    /// SIGKILL: the standby must notice the slot released.
    Kill,
    /// SIGTERM and a wait for the exit (a rolling upgrade), up to this long.
    Term(Duration),
}

/// What a hand-over did, for the fault's note.
#[derive(Debug)]
pub struct HandOver {
    pub note: String,
    /// The SIGTERM of [`Leave::Term`] did not end in a clean exit in time.
    pub unclean: Option<String>,
}

/// One supervised relay process.
#[derive(Clone)]
pub struct RelayProc {
    pub name: String,
    binary: PathBuf,
    args: Vec<String>,
    /// The two ports an instance serves its metrics on (127.0.0.1): the running one's,
    /// and a successor's during a hand-over.
    metrics_ports: [u16; 2],
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
        metrics_ports: [u16; 2],
        log_dir: &Path,
        unexpected: Arc<Mutex<Vec<UnexpectedExit>>>,
        t0: Instant,
    ) -> Self {
        Self {
            name: name.to_string(),
            binary: binary.to_path_buf(),
            args,
            metrics_ports,
            log: log_dir.join(format!("{name}.log")),
            state: Arc::new(Mutex::new(State {
                child: None,
                held_down: false,
                starts: 0,
                port: 0,
            })),
            unexpected,
            t0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self, state: &mut State) -> Result<(), String> {
        let child = self.launch(self.metrics_ports[state.port])?;
        state.child = Some(child);
        state.starts += 1;
        Ok(())
    }

    /// Starts one instance serving its metrics on `metrics_port`; its output goes to
    /// the process's log (a successor's lines are interleaved with the active one's).
    fn launch(&self, metrics_port: u16) -> Result<Child, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        Command::new(&self.binary)
            .args(&self.args)
            .env(
                "OUTBOX_RELAY_LOG",
                "info,librdkafka=warn,rdkafka=warn,outbox_relay::sink=info",
            )
            .env(
                "OUTBOX_RELAY_METRICS_ADDR",
                format!("127.0.0.1:{metrics_port}"),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {} {}: {e}", self.binary.display(), self.name))
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
        match child {
            Some(child) => terminate(child, timeout).await,
            None => ("not running".into(), true),
        }
    }

    /// Hands the process over to a successor: starts a second instance beside the
    /// running one, waits until it stands by (up to 60 s), keeps both for
    /// `side_by_side`, makes the active one leave as `leave` says, and waits until the
    /// successor is ready (up to 120 s). The successor is the process from the moment
    /// the old one is gone.
    ///
    /// Only an exit of the successor is an error (it is recorded as unexpected, too):
    /// a successor that does not stand by, or is not ready in time, is noted, because
    /// a fault of the other lane (pg_start down, say) explains both. Whether anything
    /// was lost or repeated is the run's verdict, not this step's.
    pub async fn hand_over(
        &self,
        leave: Leave,
        side_by_side: Duration,
    ) -> Result<HandOver, String> {
        let port = {
            let mut state = self.lock();
            let port = 1 - state.port;
            state.starts += 1;
            port
        };
        let metrics_port = self.metrics_ports[port];
        let old_port = self.metrics_ports[1 - port];
        let mut successor = Some(self.launch(metrics_port)?);
        let mut note = String::new();
        let started = Instant::now();
        let standing_by = |port: u16| {
            scrape(port, "/metrics").is_some_and(|(_, body)| standby_gauge(&body) == Some(true))
        };
        // Either stands by: the successor (the usual case) or, when the successor took
        // the slot while the active one was between sessions, the old instance.
        let one_stood_by = wait_for(Duration::from_secs(60), &mut successor, || {
            standing_by(metrics_port) || standing_by(old_port)
        })
        .await;
        match one_stood_by {
            Err(status) => return Err(self.successor_exited(status, "before standing by")),
            Ok(true) if standing_by(metrics_port) => note.push_str(&format!(
                "stood by after {:.1}s",
                started.elapsed().as_secs_f64()
            )),
            Ok(true) => note.push_str(&format!(
                "roles reversed: the successor took the slot while the active one was \
                 between sessions, and the old one stood by after {:.1}s",
                started.elapsed().as_secs_f64()
            )),
            Ok(false) => note.push_str("not standing by after 60 s"),
        }
        tokio::time::sleep(side_by_side).await;
        let active = {
            let mut state = self.lock();
            state.held_down = true;
            state.child.take()
        };
        let left = Instant::now();
        let mut unclean = None;
        match (leave, active) {
            (_, None) => note.push_str("; no active instance"),
            (Leave::Kill, Some(mut child)) => {
                let _ = child.kill();
                let _ = child.wait();
                note.push_str("; active SIGKILLed");
            }
            (Leave::Term(timeout), Some(child)) => {
                let (status, clean) = terminate(child, timeout).await;
                note.push_str(&format!("; active SIGTERMed, {status}"));
                if !clean {
                    unclean = Some(status);
                }
            }
        }
        // The successor is the process from here on; the supervisor watches it.
        {
            let mut state = self.lock();
            state.child = successor.take();
            state.port = port;
            state.held_down = false;
        }
        let left_after = left.elapsed();
        let mut watched = None;
        let ready = wait_for(Duration::from_secs(120), &mut watched, || {
            scrape(metrics_port, "/readyz").is_some_and(|(status, _)| status == 200)
        })
        .await
        .unwrap_or(false);
        if ready {
            note.push_str(&format!(
                "; ready {:.1}s after the active one was gone",
                (left.elapsed() - left_after).as_secs_f64()
            ));
        } else {
            note.push_str("; not ready within 120 s");
        }
        Ok(HandOver { note, unclean })
    }

    /// Records the exit of a successor that was not yet the process; the error text.
    fn successor_exited(&self, status: String, when: &str) -> String {
        let at_secs = self.t0.elapsed().as_secs_f64();
        eprintln!(
            "chaos: UNEXPECTED EXIT of {}'s successor ({status}) at t+{at_secs:.1}s, {when}; see {}",
            self.name,
            self.log.display()
        );
        self.unexpected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(UnexpectedExit {
                process: format!("{} (successor)", self.name),
                status: status.clone(),
                at_secs,
            });
        format!("the successor exited ({status}) {when}")
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
            // A relay fenced in Kafka by another instance ends its session and stands
            // by: every exit is unexpected (run 17 met one that exited, finding 11).
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

/// SIGTERM to `child` and a wait up to `timeout` for its exit; a process that does not
/// exit in time is killed. The exit status text, and whether it was clean (a zero exit
/// within the timeout).
async fn terminate(mut child: Child, timeout: Duration) -> (String, bool) {
    // kill(2) through the `kill` command, no libc binding needed.
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

/// Polls `ready` every 200 ms for up to `timeout`: `Ok(true)` once it holds, `Ok(false)`
/// when the time is up, `Err(status)` when `child` (if any) exits first.
async fn wait_for(
    timeout: Duration,
    child: &mut Option<Child>,
    ready: impl Fn() -> bool,
) -> Result<bool, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(c) = child.as_mut() {
            match c.try_wait() {
                Ok(Some(status)) => {
                    child.take();
                    return Err(status.to_string());
                }
                Err(e) => return Err(format!("wait failed: {e}")),
                Ok(None) => {}
            }
        }
        if tokio::task::block_in_place(&ready) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0, 2 s timeouts): the status and the body.
fn scrape(port: u16, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of the `outbox_relay_standby` gauge in a Prometheus text body, if present.
fn standby_gauge(body: &str) -> Option<bool> {
    body.lines()
        .find(|l| {
            l.strip_prefix(crate::metrics::STANDBY)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v == 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standby_gauge_is_read_from_the_metrics_text() {
        let body = "# HELP outbox_relay_standby x\n# TYPE outbox_relay_standby gauge\n\
                    outbox_relay_standby{stage=\"connector\"} 1\nother 3\n";
        assert_eq!(standby_gauge(body), Some(true));
        assert_eq!(
            standby_gauge("outbox_relay_standby{stage=\"direct\"} 0\n"),
            Some(false)
        );
        assert_eq!(standby_gauge("outbox_relay_standby_x 1\nfoo 1\n"), None);
        assert_eq!(standby_gauge("foo 1\n"), None);
    }
}
