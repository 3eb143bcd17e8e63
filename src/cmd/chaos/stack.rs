//! The chaos runner's hands on the stack: `scripts/stack` for the databases and the
//! brokers of one stack instance (its own state dir and port offset), and a toxiproxy
//! server between the relay and every component for the network faults.
//!
//! Every address is derived from the port offset, exactly as `scripts/stack` derives
//! it, so a runner on offset 1000 never touches the default stack on offset 0.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The PostgreSQL password of the local stack.
const PG_PASSWORD: &str = "postgres";

/// One instance of the local stack.
#[derive(Debug, Clone)]
pub struct Stack {
    pub script: PathBuf,
    pub dir: PathBuf,
    pub offset: u16,
    /// Runs the standby profile (pg_standby, a physical standby of the source, for the
    /// `pg-start-failover` fault): the source is then whichever of pg_start and
    /// pg_standby is the primary, reached with a two-host URL.
    pub standby: bool,
    /// The PostgreSQL major version (`scripts/stack up --pg`).
    pub pg: u16,
}

impl Stack {
    /// Whether slots are made failover slots (synced to the standby): the standby
    /// profile on PostgreSQL 17 or newer.
    pub fn failover_slots(&self) -> bool {
        self.standby && self.pg >= 17
    }

    pub fn pg_start_port(&self) -> u16 {
        8000 + self.offset
    }
    pub fn pg_end_port(&self) -> u16 {
        8001 + self.offset
    }
    /// Where toxiproxy listens for the relay's pg_start and pg_end connections.
    pub fn pg_start_proxy_port(&self) -> u16 {
        8002 + self.offset
    }
    pub fn pg_end_proxy_port(&self) -> u16 {
        8003 + self.offset
    }
    /// The standby profile's pg_standby, and where toxiproxy listens for it.
    pub fn pg_standby_port(&self) -> u16 {
        8004 + self.offset
    }
    pub fn pg_standby_proxy_port(&self) -> u16 {
        8005 + self.offset
    }

    /// The toxiproxy proxies between the relay and the source: pg_start's, and under
    /// the standby profile also pg_standby's (a source network fault cuts both).
    pub fn source_proxies(&self) -> Vec<&'static str> {
        if self.standby {
            vec!["pg_start", "pg_standby"]
        } else {
            vec!["pg_start"]
        }
    }

    /// The source database `db` as the runner reaches it (directly): pg_start, or under
    /// the standby profile whichever server is the primary (libpq's
    /// `target_session_attrs=read-write` over both).
    pub fn source_url(&self, db: &str) -> String {
        self.two_hosts(self.pg_start_port(), self.pg_standby_port(), db)
    }

    /// The source database `db` as the relay reaches it: through toxiproxy.
    pub fn relay_source_url(&self, db: &str) -> String {
        self.two_hosts(self.pg_start_proxy_port(), self.pg_standby_proxy_port(), db)
    }

    fn two_hosts(&self, first: u16, second: u16, db: &str) -> String {
        if self.standby {
            format!(
                "postgres://postgres:{PG_PASSWORD}@127.0.0.1:{first},127.0.0.1:{second}/{db}\
                 ?target_session_attrs=read-write"
            )
        } else {
            Self::url(first, db)
        }
    }
    /// The toxiproxy API.
    pub fn toxiproxy_api_port(&self) -> u16 {
        8474 + self.offset
    }
    /// Node `n` (1..=3): its plain client listener.
    pub fn broker_port(&self, n: u8) -> u16 {
        19089 + self.offset + n as u16
    }
    /// Node `n`: the listener that advertises the proxy (scripts/stack's PROXIED).
    pub fn broker_proxied_port(&self, n: u8) -> u16 {
        19289 + self.offset + n as u16
    }
    /// Node `n`: where toxiproxy listens, forwarding to [`Self::broker_proxied_port`].
    pub fn broker_proxy_port(&self, n: u8) -> u16 {
        19389 + self.offset + n as u16
    }

    /// The brokers, reached directly (the runner's own checks).
    pub fn brokers(&self) -> String {
        (1..=3)
            .map(|n| format!("127.0.0.1:{}", self.broker_port(n)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The brokers through toxiproxy (the relay).
    pub fn proxied_brokers(&self) -> String {
        (1..=3)
            .map(|n| format!("127.0.0.1:{}", self.broker_proxy_port(n)))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(port: u16, db: &str) -> String {
        format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/{db}")
    }

    /// Runs `scripts/stack ARGS…` with this instance's dir and offset.
    pub fn run(&self, args: &[&str]) -> Result<(), String> {
        let output = Command::new(&self.script)
            .args(args)
            .env("OUTBOX_RELAY_STACK_DIR", &self.dir)
            .env("OUTBOX_RELAY_STACK_PORT_OFFSET", self.offset.to_string())
            .env("OUTBOX_RELAY_STACK_KAFKA_PROXY", "1")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.script.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            Err(format!(
                "scripts/stack {} failed ({}): {}",
                args.join(" "),
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ))
        }
    }

    /// The name of the source's primary now (`scripts/stack primary`): pg_start, or
    /// pg_standby after an odd number of failovers.
    pub async fn primary(&self) -> Result<String, String> {
        if !self.standby {
            return Ok("pg_start".into());
        }
        let stack = self.clone();
        tokio::task::spawn_blocking(move || {
            let output = Command::new(&stack.script)
                .arg("primary")
                .env("OUTBOX_RELAY_STACK_DIR", &stack.dir)
                .env("OUTBOX_RELAY_STACK_PORT_OFFSET", stack.offset.to_string())
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", stack.script.display()))?;
            let name = String::from_utf8_lossy(&output.stdout).trim().to_string();
            if output.status.success() && !name.is_empty() {
                Ok(name)
            } else {
                Err(format!(
                    "scripts/stack primary failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        })
        .await
        .map_err(|e| format!("stack task: {e}"))?
    }

    /// [`Self::run`] off the async runtime.
    pub async fn run_async(&self, args: &[&str]) -> Result<(), String> {
        let stack = self.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            stack.run(&args)
        })
        .await
        .map_err(|e| format!("stack task: {e}"))?
    }

    /// Whether the brokers were started with the proxied listener.
    pub fn proxied_listener_up(&self) -> bool {
        (1..=3).all(|n| {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], self.broker_proxied_port(n))),
                Duration::from_secs(2),
            )
            .is_ok()
        })
    }
}

/// Finds `toxiproxy-server`, or installs it with `go install` into `dir`.
pub fn toxiproxy_binary(dir: &Path) -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("OUTBOX_RELAY_TOXIPROXY") {
        return Ok(PathBuf::from(path));
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v toxiproxy-server"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(path) = on_path {
        return Ok(path);
    }
    // v2.5.0 is the newest release the Go module proxy resolves for the /v2 module
    // path; its server lives in cmd/server (the binary is called `server`).
    let bin = dir.join("toxiproxy");
    let installed = bin.join("server");
    if installed.exists() {
        return Ok(installed);
    }
    eprintln!(
        "chaos: installing toxiproxy-server v2.5.0 with go install into {}",
        bin.display()
    );
    let status = Command::new("go")
        .args([
            "install",
            "github.com/Shopify/toxiproxy/v2/cmd/server@v2.5.0",
        ])
        .env("GOBIN", &bin)
        .status()
        .map_err(|e| format!("cannot run go (needed to install toxiproxy): {e}"))?;
    if !status.success() || !installed.exists() {
        return Err(format!("go install of toxiproxy failed ({status})"));
    }
    Ok(installed)
}

/// The toxics the runner adds, both ways.
#[derive(Debug, Clone, Copy)]
enum Toxic {
    /// A one-hour latency: bytes held, then let through.
    Blackhole,
    /// Bytes dropped, nothing closed.
    Stall,
}

impl Toxic {
    fn name(self) -> &'static str {
        match self {
            Toxic::Blackhole => "blackhole",
            Toxic::Stall => "stall",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Toxic::Blackhole => "latency",
            Toxic::Stall => "timeout",
        }
    }
    fn attributes(self) -> &'static str {
        match self {
            Toxic::Blackhole => r#"{"latency":3600000,"jitter":0}"#,
            Toxic::Stall => r#"{"timeout":0}"#,
        }
    }
}

/// A toxiproxy server run by the runner, with one proxy per component.
pub struct Toxiproxy {
    child: Child,
    api: String,
    binary: PathBuf,
    log: PathBuf,
    port: u16,
    proxies: Vec<(String, u16, u16)>,
    /// Restarts after a failed call ([`Self::call`]).
    pub restarts: u32,
}

/// The proxies: name, listen port, upstream port.
pub fn proxies(stack: &Stack) -> Vec<(String, u16, u16)> {
    let mut list = vec![
        (
            "pg_start".to_string(),
            stack.pg_start_proxy_port(),
            stack.pg_start_port(),
        ),
        (
            "pg_end".to_string(),
            stack.pg_end_proxy_port(),
            stack.pg_end_port(),
        ),
    ];
    if stack.standby {
        list.push((
            "pg_standby".to_string(),
            stack.pg_standby_proxy_port(),
            stack.pg_standby_port(),
        ));
    }
    for n in 1..=3 {
        list.push((
            format!("kafka{n}"),
            stack.broker_proxy_port(n),
            stack.broker_proxied_port(n),
        ));
    }
    list
}

/// Starts `toxiproxy-server` on `port`, appending its output to `log`, after killing
/// any server of `binary` on that port left behind by a runner that did not end
/// cleanly: a new one could not bind the port, and the runner would talk to the old one,
/// which a restart (the cure for a wedged API) then never replaces.
fn spawn_toxiproxy(binary: &Path, port: u16, log: &Path) -> Result<Child, String> {
    for pid in leftover_servers(binary, port) {
        eprintln!("chaos: killing toxiproxy {pid}, left on port {port} by an earlier run");
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let gone = Instant::now() + Duration::from_secs(5);
        while !leftover_servers(binary, port).is_empty() && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut child = spawn_toxiproxy_process(binary, port, log)?;
    // One that cannot bind its port exits at once.
    std::thread::sleep(Duration::from_millis(200));
    if let Ok(Some(status)) = child.try_wait() {
        return Err(format!(
            "toxiproxy exited at start ({status}); is port {port} taken? (its log: {})",
            log.display()
        ));
    }
    Ok(child)
}

/// The processes running `binary -host 127.0.0.1 -port <port>` (how the runner starts
/// toxiproxy), read from /proc.
fn leftover_servers(binary: &Path, port: u16) -> Vec<u32> {
    let wanted = [
        binary.to_string_lossy().into_owned(),
        "-host".into(),
        "127.0.0.1".into(),
        "-port".into(),
        port.to_string(),
    ];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args == wanted
            })
        })
        .collect()
}

fn spawn_toxiproxy_process(binary: &Path, port: u16, log: &Path) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("toxiproxy log {}: {e}", log.display()))?;
    Command::new(binary)
        .args(["-host", "127.0.0.1", "-port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))
}

impl Toxiproxy {
    pub fn start(binary: &Path, stack: &Stack, log: &Path) -> Result<Self, String> {
        let port = stack.toxiproxy_api_port();
        let mut proxy = Self {
            child: spawn_toxiproxy(binary, port, log)?,
            api: format!("http://127.0.0.1:{port}"),
            binary: binary.to_path_buf(),
            log: log.to_path_buf(),
            port,
            proxies: proxies(stack),
            restarts: 0,
        };
        proxy.configure()?;
        Ok(proxy)
    }

    /// Runs `f`. When it fails, the server is restarted ([`Self::restart`]) and the
    /// failure returned: in chaos runs 9 and 10 the API stopped answering for one
    /// proxy, and every later fault on it, and the final heal, failed. The caller's step
    /// fails; the next one finds a working server.
    pub fn call(&mut self, f: impl FnOnce(&Self) -> Result<(), String>) -> Result<(), String> {
        let error = match f(self) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        self.restarts += 1;
        match self.restart() {
            Ok(()) => Err(error),
            Err(restart) => Err(format!("{error}; restarting toxiproxy failed: {restart}")),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server and starts a fresh one with clean proxies. Every connection
    /// through it is cut.
    pub fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_toxiproxy(&self.binary, self.port, &self.log)?;
        self.configure()
    }

    /// Waits for the API, then (re)creates every proxy.
    fn configure(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.curl("GET", "/version", None).is_err() {
            if Instant::now() > deadline {
                return Err("toxiproxy did not answer within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // A server left over from a crashed runner may hold proxies already.
        for (name, listen, upstream) in &self.proxies {
            let _ = self.curl("DELETE", &format!("/proxies/{name}"), None);
            self.curl(
                "POST",
                "/proxies",
                Some(&format!(
                    r#"{{"name":"{name}","listen":"127.0.0.1:{listen}","upstream":"127.0.0.1:{upstream}","enabled":true}}"#
                )),
            )?;
        }
        Ok(())
    }

    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-f", "-m", "10", "-X", method]);
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "-d", body]);
        }
        let output = cmd
            .arg(format!("{}{path}", self.api))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "toxiproxy {method} {path}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// Closes every connection through `name` and refuses new ones (or accepts again).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), String> {
        self.curl(
            "POST",
            &format!("/proxies/{name}"),
            Some(&format!(r#"{{"enabled":{enabled}}}"#)),
        )
        .map(|_| ())
    }

    /// Stalls every byte through `name`, both ways, without closing anything: a
    /// latency far beyond the hold, removed at the heal (toxiproxy then lets the held
    /// bytes through, so the streams stay intact, as TCP's would).
    pub fn blackhole(&self, name: &str) -> Result<(), String> {
        self.add_toxics(name, Toxic::Blackhole)
    }

    /// Drops every byte through `name`, both ways, and closes nothing (toxiproxy's
    /// `timeout` toxic with timeout 0), until [`Self::unstall`]: connections a
    /// middlebox lost silently. A stream that carried bytes meanwhile is broken for
    /// good; its ends must notice by their own timeouts or by the garbage that follows.
    /// For `long-stall`: removing a latency toxic that held bytes for tens of seconds
    /// was seen to hang toxiproxy 2.5 (503 after 10 s, then nothing passed until it was
    /// restarted); a dropping toxic holds nothing.
    pub fn stall(&self, name: &str) -> Result<(), String> {
        self.add_toxics(name, Toxic::Stall)
    }

    pub fn unblackhole(&self, name: &str) -> Result<(), String> {
        self.remove_toxics(name, Toxic::Blackhole)
    }

    pub fn unstall(&self, name: &str) -> Result<(), String> {
        self.remove_toxics(name, Toxic::Stall)
    }

    fn add_toxics(&self, name: &str, toxic: Toxic) -> Result<(), String> {
        for stream in ["upstream", "downstream"] {
            self.curl(
                "POST",
                &format!("/proxies/{name}/toxics"),
                Some(&format!(
                    r#"{{"name":"{}_{stream}","type":"{}","stream":"{stream}","toxicity":1.0,"attributes":{}}}"#,
                    toxic.name(),
                    toxic.kind(),
                    toxic.attributes()
                )),
            )?;
        }
        Ok(())
    }

    /// Removes the toxics. One that is not there (404) is fine; any other failure is
    /// returned, so that [`Self::call`] restarts the server.
    fn remove_toxics(&self, name: &str, toxic: Toxic) -> Result<(), String> {
        for stream in ["upstream", "downstream"] {
            match self.curl(
                "DELETE",
                &format!("/proxies/{name}/toxics/{}_{stream}", toxic.name()),
                None,
            ) {
                Err(e) if !e.contains("error: 404") => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every proxy enabled and without toxics.
    pub fn heal_all(&self) -> Result<(), String> {
        for (name, _, _) in &self.proxies {
            self.unblackhole(name)?;
            self.unstall(name)?;
            self.set_enabled(name, true)?;
        }
        Ok(())
    }
}

impl Drop for Toxiproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
