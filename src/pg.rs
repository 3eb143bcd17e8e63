//! PostgreSQL connections. Whether a failure of one is retried is decided by
//! [`crate::error::pg::classify`].
//!
//! Invariant: every connection the relay makes goes through [`connect`] (or, for
//! replication, the settings [`PgTarget::parse`] reads), so that its URL, TLS, timeouts
//! and keepalives are the same wherever it is made.
//!
//! # Connection settings
//! Every connection, regular (tokio-postgres) or replication (pgwire-replication), is
//! described by one libpq URL or key=value string, read by [`PgTarget::parse`] and
//! nowhere else. Besides what tokio-postgres understands, it takes libpq's TLS
//! parameters and one of the relay's own:
//!
//! - `sslmode`: `disable`, `prefer` (the default: TLS if the server offers it),
//!   `require`, `verify-ca`, `verify-full` (see [`tls`] for what each one checks);
//! - `sslrootcert`: the CA certificate(s), PEM, that verify-ca and verify-full trust
//!   (required by them; with `require` it upgrades to verify-ca, as in libpq);
//! - `sslcert` and `sslkey`: a client certificate and its key, PEM, for servers that
//!   authenticate clients by certificate;
//! - `password_file`: a file holding the password (a mounted secret), read again at
//!   every connection so that a rotated password is picked up without a restart.
//!
//! These are removed before the rest goes to tokio-postgres, whose parser refuses
//! unknown parameters and the two verify modes. The password, from the URL or the
//! file, lives in a [`Secret`] and in tokio-postgres's `Config`, both of which redact
//! it when printed; errors name files and parameters, never values.

pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::secret::Secret;

/// How long a connection attempt may take before it counts as a transient failure.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and drives the connection on a background task.
///
/// The task ends when the connection breaks; the `Client` then returns errors that
/// [`crate::error::pg::classify`] reports as transient, and the caller reconnects.
///
/// `url` is read by [`PgTarget::from_url`]. The commands check their URLs when they
/// parse their arguments ([`url_arg`]); a problem found only now (a password or
/// certificate file gone since) is returned as a TLS-setup error whose source says
/// what is wrong, because tokio-postgres's error type cannot carry another kind.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (config, tls) = match PgTarget::from_url(url) {
        Ok(target) => {
            let tls = RelayTls(target.tls.connector().map_err(Arc::new));
            (target.config, tls)
        }
        Err(PgUrlError::Syntax(source)) => return Err(source),
        Err(problem) => {
            // Carry the problem to the caller through the one hook that can: the TLS
            // connector, asked for after the TCP connection and before any byte of
            // authentication is sent.
            let config = match split_relay_params(url) {
                Ok((rest, _)) => rest.parse::<tokio_postgres::Config>()?,
                Err(_) => url.parse::<tokio_postgres::Config>()?,
            };
            (config, RelayTls(Err(Arc::new(problem.to_string()))))
        }
    };
    connect_with(config, tls).await
}

/// [`connect`] to a target already read (e.g. one host of a multi-host URL,
/// [`PgTarget::only_host`]).
pub async fn connect_target(target: &PgTarget) -> Result<Client, tokio_postgres::Error> {
    let tls = RelayTls(target.tls.connector().map_err(Arc::new));
    connect_with(target.config.clone(), tls).await
}

async fn connect_with(
    mut config: tokio_postgres::Config,
    tls: RelayTls,
) -> Result<Client, tokio_postgres::Error> {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // Keepalives so that a black-holed server is noticed without waiting for the
    // kernel's two-hour default.
    config.keepalives_idle(Duration::from_secs(10));
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres connection closed");
        }
    });
    Ok(client)
}

/// The TLS connector of one connection attempt, or the reason it could not be built.
#[derive(Clone)]
struct RelayTls(Result<MakeRustlsConnect, Arc<String>>);

impl MakeTlsConnect<Socket> for RelayTls {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        match &mut self.0 {
            Ok(make) => {
                MakeTlsConnect::<Socket>::make_tls_connect(make, domain).map_err(Into::into)
            }
            Err(problem) => Err(problem.as_str().into()),
        }
    }
}

/// `sslmode`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // allow and the others have no safe meaning here.
            other => {
                return Err(format!(
                    "sslmode={other:?} is not supported: use disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// The TLS half of a connection's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// `sslrootcert`: the CAs trusted by verify-ca and verify-full.
    pub root_cert: Option<PathBuf>,
    /// `sslcert`: a client certificate chain, PEM.
    pub client_cert: Option<PathBuf>,
    /// `sslkey`: its private key, PEM.
    pub client_key: Option<PathBuf>,
}

impl TlsSettings {
    /// The rustls connector for tokio-postgres; reads the certificate files.
    pub fn connector(&self) -> Result<MakeRustlsConnect, String> {
        tls::client_config(self).map(MakeRustlsConnect::new)
    }
}

/// Why a connection URL cannot be used. The texts name parameters and files, never
/// a value, so that they can be logged.
#[derive(Debug, thiserror::Error)]
pub enum PgUrlError {
    // Each message is complete on its own (no `#[source]`), so that printing the
    // chain does not repeat it.
    /// tokio-postgres refused the rest of the URL (its message names the parameter).
    #[error("the PostgreSQL connection URL is not valid: {}", crate::error::error_chain(.0))]
    Syntax(tokio_postgres::Error),
    #[error("the PostgreSQL connection URL is not valid: {0}")]
    Setting(String),
    #[error("cannot read the password file password_file={}: {error}", path.display())]
    PasswordFile {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// One PostgreSQL server as the relay connects to it: the single reading of a
/// connection URL, shared by the regular and the replication connections.
#[derive(Debug, Clone)]
pub struct PgTarget {
    /// tokio-postgres's settings, the relay's own parameters removed, the password
    /// (from the URL or the file) filled in. Its `Debug` redacts the password.
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
    /// `password_file`, read by [`PgTarget::from_url`] at every connection.
    pub password_file: Option<PathBuf>,
}

/// The parameters the relay reads itself and removes before tokio-postgres parses.
const RELAY_PARAMS: [&str; 5] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "password_file",
];

impl PgTarget {
    /// Reads `url` without touching any file.
    pub fn parse(url: &str) -> Result<Self, PgUrlError> {
        let (rest, params) = split_relay_params(url).map_err(PgUrlError::Setting)?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(PgUrlError::Syntax)?;
        let mut tls = TlsSettings::default();
        let mut password_file = None;
        let mut mode_given = false;
        for (key, value) in params {
            match key.as_str() {
                "sslmode" => {
                    tls.mode = value.parse().map_err(PgUrlError::Setting)?;
                    mode_given = true;
                }
                "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
                "sslcert" => tls.client_cert = Some(PathBuf::from(value)),
                "sslkey" => tls.client_key = Some(PathBuf::from(value)),
                "password_file" => password_file = Some(PathBuf::from(value)),
                _ => unreachable!("split_relay_params returns RELAY_PARAMS only"),
            }
        }
        // libpq: with a root certificate, require verifies the chain.
        if tls.mode == SslMode::Require && tls.root_cert.is_some() {
            tls.mode = SslMode::VerifyCa;
        }
        if !mode_given && tls.root_cert.is_some() {
            tls.mode = SslMode::VerifyCa;
        }
        if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root_cert.is_none() {
            return Err(PgUrlError::Setting(format!(
                "sslmode={} needs sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate)",
                tls.mode
            )));
        }
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            return Err(PgUrlError::Setting(
                "sslcert and sslkey must be given together".into(),
            ));
        }
        #[cfg(unix)]
        if matches!(
            tls.mode,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        ) {
            if let Some(dir) = config.get_hosts().iter().find_map(|host| match host {
                tokio_postgres::config::Host::Unix(dir) => Some(dir),
                tokio_postgres::config::Host::Tcp(_) => None,
            }) {
                return Err(PgUrlError::Setting(format!(
                    "sslmode={} cannot be met over the Unix socket in {}: PostgreSQL does not \
                     speak TLS there; use sslmode=prefer or disable with a socket, or a TCP host",
                    tls.mode,
                    dir.display()
                )));
            }
        }
        if password_file.is_some() && config.get_password().is_some() {
            return Err(PgUrlError::Setting(
                "the URL has both a password and password_file; give one".into(),
            ));
        }
        config.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        Ok(Self {
            config,
            tls,
            password_file,
        })
    }

    /// [`PgTarget::parse`], then reads the password file if there is one.
    pub fn from_url(url: &str) -> Result<Self, PgUrlError> {
        let mut target = Self::parse(url)?;
        if let Some(path) = &target.password_file {
            let secret = Secret::from_file(path).map_err(|error| PgUrlError::PasswordFile {
                path: path.clone(),
                error,
            })?;
            target.config.password(secret.expose());
        }
        Ok(target)
    }

    /// The password, from the URL or the file.
    pub fn password(&self) -> Option<Secret> {
        self.config
            .get_password()
            .map(|p| Secret::new(String::from_utf8_lossy(p).into_owned()))
    }

    /// The first host's name (as the certificate must show it) and the address to
    /// connect to (`hostaddr` if given, else the name).
    pub fn host(&self) -> (String, String) {
        self.host_at(0)
    }

    /// How many hosts the URL names (libpq's `host=a,b`, or `postgres://a:1,b:2/db`).
    pub fn host_count(&self) -> usize {
        self.config
            .get_hosts()
            .len()
            .max(self.config.get_hostaddrs().len())
            .max(1)
    }

    /// Whether the URL asks for a server that accepts writes
    /// (`target_session_attrs=read-write`): of several hosts, the primary.
    pub fn wants_read_write(&self) -> bool {
        self.config.get_target_session_attrs()
            == tokio_postgres::config::TargetSessionAttrs::ReadWrite
    }

    /// The same settings with host `i` only (its name, `hostaddr` and port): for a
    /// connection that cannot try several hosts itself (the replication stream), or
    /// must reach the very server another connection reached (the snapshot import).
    pub fn only_host(&self, i: usize) -> PgTarget {
        if self.host_count() <= 1 {
            return self.clone();
        }
        let from = &self.config;
        let mut one = tokio_postgres::Config::new();
        if let Some(user) = from.get_user() {
            one.user(user);
        }
        if let Some(password) = from.get_password() {
            one.password(password);
        }
        if let Some(dbname) = from.get_dbname() {
            one.dbname(dbname);
        }
        if let Some(options) = from.get_options() {
            one.options(options);
        }
        if let Some(name) = from.get_application_name() {
            one.application_name(name);
        }
        if let Some(timeout) = from.get_connect_timeout() {
            one.connect_timeout(*timeout);
        }
        if let Some(timeout) = from.get_tcp_user_timeout() {
            one.tcp_user_timeout(*timeout);
        }
        one.keepalives(from.get_keepalives())
            .keepalives_idle(from.get_keepalives_idle())
            .ssl_mode(from.get_ssl_mode())
            .channel_binding(from.get_channel_binding());
        match from.get_hosts().get(i) {
            Some(tokio_postgres::config::Host::Tcp(host)) => {
                one.host(host);
            }
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(path)) => {
                one.host_path(path);
            }
            None => {}
        }
        if let Some(address) = from.get_hostaddrs().get(i) {
            one.hostaddr(*address);
        }
        one.port(self.port_at(i));
        PgTarget {
            config: one,
            tls: self.tls.clone(),
            password_file: self.password_file.clone(),
        }
    }

    /// Host `i`'s name and address, as [`PgTarget::host`].
    fn host_at(&self, i: usize) -> (String, String) {
        let name = match self.config.get_hosts().get(i) {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => String::new(),
        };
        let address = self
            .config
            .get_hostaddrs()
            .get(i)
            .map(|a| a.to_string())
            .unwrap_or_else(|| name.clone());
        let name = if name.is_empty() {
            address.clone()
        } else {
            name
        };
        (name, address)
    }

    pub fn port(&self) -> u16 {
        self.port_at(0)
    }

    /// Host `i`'s port: one port for every host, or one each (as libpq).
    fn port_at(&self, i: usize) -> u16 {
        let ports = self.config.get_ports();
        ports.get(i).or(ports.first()).copied().unwrap_or(5432)
    }

    /// The same settings for pgwire-replication.
    pub fn replication_tls(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as Mode;
        let mut tls = pgwire_replication::TlsConfig::disabled();
        tls.mode = match self.tls.mode {
            SslMode::Disable => Mode::Disable,
            SslMode::Prefer => Mode::Prefer,
            SslMode::Require => Mode::Require,
            SslMode::VerifyCa => Mode::VerifyCa,
            SslMode::VerifyFull => Mode::VerifyFull,
        };
        tls.ca_pem_path = self.tls.root_cert.clone();
        tls.client_cert_pem_path = self.tls.client_cert.clone();
        tls.client_key_pem_path = self.tls.client_key.clone();
        // The name the certificate must carry. Given explicitly, an IP address is
        // checked against the certificate's IP SANs (pgwire-replication would refuse
        // verify-full to an IP otherwise), and a `hostaddr` connection is verified
        // against `host`, as tokio-postgres does.
        tls.sni_hostname = Some(self.host().0);
        tls
    }

    /// `postgres://user@host:port/db`, plus a non-default sslmode: loggable.
    pub fn redacted(&self) -> String {
        let hosts: Vec<String> = (0..self.host_count())
            .map(|i| format!("{}:{}", self.host_at(i).0, self.port_at(i)))
            .collect();
        let mut text = format!(
            "postgres://{}@{}/{}",
            self.config.get_user().unwrap_or(""),
            hosts.join(","),
            self.config.get_dbname().unwrap_or("")
        );
        let mut params = Vec::new();
        if self.tls.mode != SslMode::Prefer {
            params.push(format!("sslmode={}", self.tls.mode));
        }
        if self.wants_read_write() {
            params.push("target_session_attrs=read-write".to_string());
        }
        if !params.is_empty() {
            text.push('?');
            text.push_str(&params.join("&"));
        }
        text
    }
}

/// Checks a URL given on the command line, in the environment or in the
/// configuration file, reading its files now so that a typo stops the command at
/// once. The error never repeats the URL (it may hold a password).
pub fn check_url(url: &str) -> Result<(), String> {
    let target = PgTarget::from_url(url).map_err(|e| e.to_string())?;
    target.tls.connector().map(|_| ())
}

/// Splits off [`RELAY_PARAMS`] from a libpq URL's query or a key=value string.
/// Returns the rest, for tokio-postgres, and the removed pairs, values decoded.
fn split_relay_params(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url_query(url)
    } else {
        split_key_values(url)
    }
}

fn split_url_query(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    // The query starts at the first '?' after the user info (a password may hold one).
    let after_userinfo = url.rfind('@').map(|i| i + 1).unwrap_or(0);
    let Some(q) = url[after_userinfo..].find('?').map(|i| i + after_userinfo) else {
        return Ok((url.to_string(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in url[q + 1..].split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_encoding::percent_decode_str(key)
            .decode_utf8()
            .map_err(|_| "a URL parameter name is not UTF-8".to_string())?;
        if RELAY_PARAMS.contains(&key.as_ref()) {
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| format!("the value of {key} is not UTF-8"))?;
            taken.push((key.into_owned(), value.into_owned()));
        } else {
            kept.push(pair);
        }
    }
    let mut rest = url[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, taken))
}

/// libpq's key=value form: `host=h port=5432 password='a b\'c'`.
fn split_key_values(text: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("expected `=` after {key:?}"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quoted value of {key}")),
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => return Err(format!("unterminated quoted value of {key}")),
                    },
                    Some((_, c)) => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((_, next)) = chars.next() {
                        value.push(next);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map(|&(i, _)| i).unwrap_or(text.len());
        if RELAY_PARAMS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            kept.push(&text[start..end]);
        }
    }
    Ok((kept.join(" "), taken))
}

/// Strips the password from a connection URL so that it can be logged.
pub fn redact_url(url: &str) -> String {
    match PgTarget::parse(url) {
        Ok(target) => target.redacted(),
        Err(_) => "<unparsable postgres url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_of_a_multi_host_url_keeps_every_other_setting() {
        let target = PgTarget::parse(
            "postgres://relay:pw@db-a:5433,db-b:5434/orders?target_session_attrs=read-write&sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(target.host_count(), 2);
        assert!(target.wants_read_write());
        let b = target.only_host(1);
        assert_eq!(b.host_count(), 1);
        assert_eq!(b.host(), ("db-b".to_string(), "db-b".to_string()));
        assert_eq!(b.port(), 5434);
        assert_eq!(b.config.get_user(), Some("relay"));
        assert_eq!(b.config.get_password(), Some(&b"pw"[..]));
        assert_eq!(b.config.get_dbname(), Some("orders"));
        assert_eq!(b.config.get_application_name(), Some("x"));
        assert_eq!(b.tls.mode, SslMode::Require);
        assert_eq!(
            b.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        // One port for every host, as libpq.
        let shared = PgTarget::parse("host=a,b port=6000 user=u dbname=d").unwrap();
        assert!(!shared.wants_read_write());
        assert_eq!(shared.only_host(1).port(), 6000);
        assert_eq!(shared.only_host(1).host().0, "b");
        assert_eq!(
            target.redacted(),
            "postgres://relay@db-a:5433,db-b:5434/orders?sslmode=require&target_session_attrs=read-write"
        );
        // A single host is kept as it is.
        let single = PgTarget::parse("postgres://u@h:1/d").unwrap();
        assert_eq!(single.host_count(), 1);
        assert_eq!(single.only_host(0).port(), 1);
    }

    #[test]
    fn redact_url_drops_the_password() {
        let redacted = redact_url("postgres://postgres:s3cret@127.0.0.1:8000/db_start");
        assert_eq!(redacted, "postgres://postgres@127.0.0.1:8000/db_start");
        assert!(!redacted.contains("s3cret"));
    }

    #[test]
    fn relay_parameters_are_read_and_removed_from_a_url() {
        let target = PgTarget::parse(
            "postgres://relay:pw@db.example:6432/app?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(target.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            target.tls.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            target.tls.client_key.as_deref(),
            Some(std::path::Path::new("/k.pem"))
        );
        // The replication connection gets the same client certificate.
        let replication = target.replication_tls();
        assert_eq!(
            replication.client_cert_pem_path.as_deref(),
            Some(std::path::Path::new("/c.pem"))
        );
        assert_eq!(
            replication.client_key_pem_path.as_deref(),
            Some(std::path::Path::new("/k.pem"))
        );
        assert_eq!(target.config.get_application_name(), Some("x"));
        assert_eq!(
            target.host(),
            ("db.example".to_string(), "db.example".to_string())
        );
        assert_eq!(target.port(), 6432);
        assert_eq!(
            target.redacted(),
            "postgres://relay@db.example:6432/app?sslmode=verify-full"
        );
        assert_eq!(target.password().unwrap().expose(), "pw");
        assert!(!format!("{target:?}").contains("pw@"), "{target:?}");
    }

    #[test]
    fn relay_parameters_are_read_and_removed_from_key_values() {
        let target = PgTarget::parse(
            "host=h hostaddr=127.0.0.1 user=u password='a b\\'c' sslmode = verify-ca sslrootcert='/x y/ca.pem'",
        )
        .unwrap();
        assert_eq!(target.tls.mode, SslMode::VerifyCa);
        assert_eq!(
            target.tls.root_cert.as_deref(),
            Some(std::path::Path::new("/x y/ca.pem"))
        );
        assert_eq!(target.password().unwrap().expose(), "a b'c");
        assert_eq!(target.host(), ("h".to_string(), "127.0.0.1".to_string()));
        let tls = target.replication_tls();
        assert_eq!(tls.mode, pgwire_replication::SslMode::VerifyCa);
        assert_eq!(tls.sni_hostname.as_deref(), Some("h"));
    }

    #[test]
    fn unsafe_or_incomplete_tls_settings_are_refused_without_echoing_the_password() {
        for (url, expected) in [
            (
                "postgres://u:s3cret@h/db?sslmode=verify-full",
                "needs sslrootcert",
            ),
            ("postgres://u:s3cret@h/db?sslmode=allow", "not supported"),
            ("postgres://u:s3cret@h/db?sslcert=/c.pem", "together"),
            (
                "postgres://u:s3cret@h/db?password_file=/p",
                "both a password and password_file",
            ),
            ("postgres://u:s3cret@h/db?bogus=1", "not valid"),
            (
                "postgres://u:s3cret@%2Frun%2Fpg/db?sslmode=require",
                "cannot be met over the Unix socket in /run/pg",
            ),
            (
                "postgres://u:s3cret@/db?host=/run/pg&sslmode=verify-full&sslrootcert=/ca.pem",
                "sslmode=verify-full cannot be met over the Unix socket",
            ),
        ] {
            let error = PgTarget::parse(url).unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("s3cret"), "{url}: {error}");
        }
        // require with a root certificate verifies the chain, as in libpq.
        let target =
            PgTarget::parse("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(target.tls.mode, SslMode::VerifyCa);
        assert_eq!(
            PgTarget::parse("postgres://u@h/db").unwrap().tls.mode,
            SslMode::Prefer
        );
        // A socket with the default (prefer) or disable is fine: plain text, locally.
        for url in [
            "postgres://u@%2Frun%2Fpg:5433/db",
            "postgres://u@%2Frun%2Fpg/db?sslmode=disable",
        ] {
            let target = PgTarget::parse(url).unwrap();
            assert_eq!(target.host().1, "/run/pg", "{url}");
        }
    }

    #[test]
    fn the_password_file_is_read_at_each_connection() {
        let path = std::env::temp_dir().join(format!("outbox-relay-pgpass-{}", std::process::id()));
        std::fs::write(&path, "first\n").unwrap();
        let url = format!("postgres://u@h/db?password_file={}", path.display());
        assert_eq!(
            PgTarget::from_url(&url)
                .unwrap()
                .password()
                .unwrap()
                .expose(),
            "first"
        );
        std::fs::write(&path, "second\n").unwrap();
        assert_eq!(
            PgTarget::from_url(&url)
                .unwrap()
                .password()
                .unwrap()
                .expose(),
            "second"
        );
        std::fs::remove_file(&path).unwrap();
        let error = PgTarget::from_url(&url).unwrap_err().to_string();
        assert!(error.contains("cannot read the password file"), "{error}");
    }
}
