//! Connection strings, as libpq reads them, and the connections made from them.
//!
//! A DSN is a libpq `key=value` string or a `postgres://` URL. Every key is checked: an unknown
//! or malformed key, or one libpq has that shadowsync cannot honour, is an error naming the
//! key, never silently ignored. TLS keys become a [`tls::Settings`] (files read here, once).
//!
//! Invariants:
//! - A password never leaves this module in text meant for people: `Display` and `Debug` print
//!   host, port, user and database only. Passwords come from the DSN, then the side's
//!   environment variable, then the pgpass file (libpq's rules, including ignoring a pgpass
//!   file that group or others can read).
//! - A connection tries what `sslmode` allows, in libpq's order, and reports the failure of the
//!   attempt that got furthest (a server's refusal over a refused TLS request).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::tls::{self, Attempt, SslMode};

/// Session settings pinned on both sides so that the text blue's walsender prints is exactly the
/// text green parses back (dates, intervals, floats, bytea, money, xml fragments).
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO,MDY -c intervalstyle=postgres \
     -c extra_float_digits=3 -c timezone=UTC -c bytea_output=hex -c lc_monetary=C \
     -c xmloption=content -c client_min_messages=warning";

/// A DSN that cannot be used: the config field holding it, and what is wrong (naming the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for DsnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for DsnError {}

/// Default `connect_timeout`, in seconds, when the DSN gives none.
pub const DEFAULT_CONNECT_TIMEOUT_S: u64 = 10;

/// libpq's `channel_binding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    Disable,
    #[default]
    Prefer,
    Require,
}

/// Where a database is and how to reach it: host (or socket directory), port, user, database,
/// password, TLS.
#[derive(Clone)]
pub struct Dsn {
    pub field: &'static str,
    pub host: String,
    /// `hostaddr`: the address connected to, when `host` is only the name to verify.
    pub hostaddr: Option<String>,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<String>,
    pub tls: tls::Settings,
    pub channel_binding: ChannelBinding,
    pub connect_timeout: Duration,
    /// The DSN's own `options`, sent after shadowsync's session settings.
    pub options: Option<String>,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, even in debug output.
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host={} port={} user={} dbname={}",
            self.host, self.port, self.user, self.dbname
        )?;
        if !self.is_unix() {
            write!(f, " sslmode={}", self.tls.mode.as_str())?;
        }
        Ok(())
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> DsnError {
    DsnError {
        field,
        message: message.into(),
    }
}

/// libpq keys shadowsync does not honour, and why: refused rather than ignored.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "sslpassword",
        "encrypted client keys are not supported: decrypt the key (openssl pkey -in key.pem -out \
         plain.pem) and protect it with chmod 600",
    ),
    ("sslcompression", "TLS compression is not supported"),
    (
        "sslcertmode",
        "not supported: sslcert is sent whenever it is set",
    ),
    ("sslsni", "not supported: the host name is always sent"),
    (
        "sslnegotiation",
        "not supported: TLS is negotiated the PostgreSQL way",
    ),
    ("requiressl", "deprecated in libpq: use sslmode=require"),
    ("gssencmode", "GSSAPI is not supported: use TLS (sslmode)"),
    ("krbsrvname", "Kerberos is not supported"),
    ("gsslib", "GSSAPI is not supported"),
    ("gssdelegation", "GSSAPI is not supported"),
    (
        "service",
        "service files are not supported: write the keys in the DSN",
    ),
    (
        "target_session_attrs",
        "not supported: point the DSN at the one server to use",
    ),
    (
        "load_balance_hosts",
        "not supported: point the DSN at the one server to use",
    ),
    ("replication", "set by shadowsync itself"),
    ("require_auth", "not supported"),
    (
        "ssl_min_protocol_version",
        "not supported: TLS 1.2 or 1.3 is used",
    ),
    (
        "ssl_max_protocol_version",
        "not supported: TLS 1.2 or 1.3 is used",
    ),
];

/// Keys accepted and ignored, with the reason in the docs: shadowsync sets them itself.
const IGNORED: &[&str] = &[
    "application_name",
    "fallback_application_name",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
];

impl Dsn {
    /// Parses a libpq key=value string or URL; `field` names it in errors.
    pub fn parse(text: &str, field: &'static str) -> Result<Dsn, DsnError> {
        let pairs = if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            parse_url(text).map_err(|m| invalid(field, m))?
        } else {
            parse_key_values(text).map_err(|m| invalid(field, m))?
        };
        Dsn::from_pairs(pairs, field)
    }

    fn from_pairs(pairs: Vec<(String, String)>, field: &'static str) -> Result<Dsn, DsnError> {
        let mut v = Values::default();
        for (key, value) in pairs {
            v.set(&key, value).map_err(|m| invalid(field, m))?;
        }
        let host = v.host.unwrap_or_else(|| "localhost".to_string());
        if host.contains(',') {
            return Err(invalid(
                field,
                "host lists several hosts: shadowsync needs exactly one (the primary)",
            ));
        }
        let user = v
            .user
            .ok_or_else(|| invalid(field, "names no user (add user=...)"))?;
        let unix = host.starts_with('/');
        let tls = v
            .tls
            .resolve(unix)
            .map_err(|e| invalid(field, format!("key `{}`: {}", e.key, e.message)))?;
        if v.channel_binding == ChannelBinding::Require && tls.attempts() != [Attempt::Tls] {
            return Err(invalid(
                field,
                "key `channel_binding`: require needs TLS: set sslmode=require, verify-ca or \
                 verify-full (channel binding is a TLS feature)",
            ));
        }
        Ok(Dsn {
            field,
            dbname: v.dbname.unwrap_or_else(|| user.clone()),
            host,
            hostaddr: v.hostaddr,
            port: v.port.unwrap_or(5432),
            user,
            password: v.password,
            tls,
            channel_binding: v.channel_binding,
            connect_timeout: Duration::from_secs(
                v.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT_S),
            ),
            options: v.options,
        })
    }

    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Fills in the password from `env`, then the pgpass text, when the DSN has none.
    pub fn with_password(mut self, env: &str, pgpass: Option<&str>) -> Dsn {
        if self.password.is_none() {
            self.password = std::env::var(env)
                .ok()
                .or_else(|| pgpass_match(pgpass?, &self.host, self.port, &self.dbname, &self.user));
        }
        self
    }

    /// Session options: shadowsync's, then the DSN's own.
    pub fn session_options(&self) -> String {
        match &self.options {
            Some(o) => format!("{SESSION_OPTIONS} {o}"),
            None => SESSION_OPTIONS.to_string(),
        }
    }

    /// Opens an ordinary connection, trying what `sslmode` allows in libpq's order; its driver
    /// task logs how it ended. Abort the handle (or drop the client) to close it.
    pub async fn connect(
        &self,
        application_name: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let mut failures: Vec<(Attempt, tokio_postgres::Error)> = Vec::new();
        for &attempt in self.tls.attempts() {
            match self.connect_once(attempt, application_name).await {
                Ok(connected) => return Ok(connected),
                Err(e) => {
                    let unreachable = is_unreachable(&e);
                    failures.push((attempt, e));
                    if unreachable {
                        break; // the next attempt would meet the same closed door
                    }
                }
            }
        }
        Err(furthest(failures))
    }

    async fn connect_once(
        &self,
        attempt: Attempt,
        application_name: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        use tokio_postgres::config::SslMode as Mode;
        let mut config = self.pg_config(application_name);
        let label = format!("{} ({application_name})", self.field);
        let tls_config = match attempt {
            Attempt::Tls => self.tls.rustls(),
            Attempt::Plain => None,
        };
        match tls_config {
            Some(rustls) => {
                config.ssl_mode(Mode::Require);
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*rustls).clone());
                let (client, conn) = config.connect(connector).await?;
                Ok((client, drive(conn, label)))
            }
            None => {
                config.ssl_mode(Mode::Disable);
                let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                Ok((client, drive(conn, label)))
            }
        }
    }

    /// [`Self::connect`] for a command talking to `side` (`blue` or `green`): a failure names
    /// the side and the DSN (without its password).
    pub async fn connect_to(
        &self,
        side: &'static str,
        application_name: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), crate::failure::Unreachable>
    {
        self.connect(application_name)
            .await
            .map_err(|e| crate::failure::Unreachable {
                side,
                dsn: self.to_string(),
                failure: crate::failure::DbFailure::from_pg_on(&e, self.field),
            })
    }

    /// Settings for an ordinary (non-replication) tokio-postgres connection, TLS aside.
    pub fn pg_config(&self, application_name: &str) -> tokio_postgres::Config {
        use tokio_postgres::config::ChannelBinding as Cb;
        let mut c = tokio_postgres::Config::new();
        if self.is_unix() {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        if let Some(addr) = self.hostaddr.as_deref().and_then(|a| a.parse().ok()) {
            c.hostaddr(addr);
        }
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(application_name)
            .options(self.session_options())
            .connect_timeout(self.connect_timeout)
            .channel_binding(match self.channel_binding {
                ChannelBinding::Disable => Cb::Disable,
                ChannelBinding::Prefer => Cb::Prefer,
                ChannelBinding::Require => Cb::Require,
            });
        if let Some(p) = &self.password {
            c.password(p);
        }
        c
    }
}

fn drive<T>(conn: T, label: String) -> tokio::task::JoinHandle<()>
where
    T: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(connection = %label, error = %crate::failure::DbFailure::from_pg(&e), "connection ended");
        }
    })
}

/// The network refused before any protocol: no other TLS mode would fare better.
fn is_unreachable(e: &tokio_postgres::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::TimedOut
                    | K::HostUnreachable
                    | K::NetworkUnreachable
                    | K::AddrNotAvailable
                    | K::NotFound
            );
        }
        next = err.source();
    }
    false
}

/// The failure to report when every attempt failed: the server's own refusal of a TLS attempt,
/// then any server refusal, then the first failure.
fn furthest(mut failures: Vec<(Attempt, tokio_postgres::Error)>) -> tokio_postgres::Error {
    let pick = failures
        .iter()
        .position(|(a, e)| *a == Attempt::Tls && e.as_db_error().is_some())
        .or_else(|| failures.iter().position(|(_, e)| e.as_db_error().is_some()))
        .unwrap_or(0);
    failures.swap_remove(pick).1
}

/// Every key a DSN may set, as parsed.
#[derive(Default)]
struct Values {
    host: Option<String>,
    hostaddr: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    options: Option<String>,
    connect_timeout: Option<u64>,
    channel_binding: ChannelBinding,
    tls: tls::Requested,
}

impl Values {
    fn set(&mut self, key: &str, value: String) -> Result<(), String> {
        let bad = |expected: &str| format!("key `{key}`: `{value}` is not {expected}");
        match key {
            "host" => self.host = Some(value),
            "hostaddr" => {
                if value.parse::<std::net::IpAddr>().is_err() {
                    return Err(bad("an IP address"));
                }
                self.hostaddr = Some(value)
            }
            "port" => self.port = Some(value.parse().map_err(|_| bad("a port number"))?),
            "user" => self.user = Some(value),
            "password" => self.password = Some(value),
            "dbname" => self.dbname = Some(value),
            "options" => self.options = Some(value),
            "connect_timeout" => {
                let s: u64 = value.parse().map_err(|_| bad("a number of seconds"))?;
                // libpq: 0 means wait forever; shadowsync never waits forever on a connect.
                self.connect_timeout = Some(if s == 0 {
                    DEFAULT_CONNECT_TIMEOUT_S
                } else {
                    s.max(2)
                });
            }
            "sslmode" => {
                self.tls.mode = SslMode::parse(&value).ok_or_else(|| {
                    bad("an sslmode (disable, allow, prefer, require, verify-ca, verify-full)")
                })?
            }
            "sslrootcert" => self.tls.rootcert = Some(value),
            "sslcert" => self.tls.cert = Some(value),
            "sslkey" => self.tls.key = Some(value),
            "sslcrl" => self.tls.crl = Some(value),
            "channel_binding" => {
                self.channel_binding = match value.as_str() {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    _ => return Err(bad("disable, prefer or require")),
                }
            }
            k if IGNORED.contains(&k) => {}
            k => {
                return Err(match UNSUPPORTED.iter().find(|(u, _)| *u == k) {
                    Some((_, why)) => format!("key `{k}`: {why}"),
                    None => {
                        format!("unknown key `{k}` (a libpq connection parameter was expected)")
                    }
                });
            }
        }
        Ok(())
    }
}

/// libpq's `key = value` list: values unquoted (backslash escapes) or single-quoted.
fn parse_key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("key `{key}` has no `=` and value"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("key `{key}`: unterminated quoted value")),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                match c {
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        }
        pairs.push((key, value));
    }
}

/// `postgres[ql]://[user[:password]@][host][:port][/dbname][?key=value&...]`, percent-decoded.
fn parse_url(text: &str) -> Result<Vec<(String, String)>, String> {
    let rest = text.split_once("://").map(|(_, r)| r).unwrap_or(text);
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, dbname) = main.split_once('/').unwrap_or((main, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut pairs = Vec::new();
    if let Some(info) = userinfo {
        let (user, password) = info.split_once(':').unwrap_or((info, ""));
        if !user.is_empty() {
            pairs.push(("user".into(), decode(user)?));
        }
        if info.contains(':') {
            pairs.push(("password".into(), decode(password)?));
        }
    }
    let (host, port) = split_host_port(hostport)?;
    if !host.is_empty() {
        pairs.push(("host".into(), decode(host)?));
    }
    if let Some(p) = port {
        pairs.push(("port".into(), p.to_string()));
    }
    if !dbname.is_empty() {
        pairs.push(("dbname".into(), decode(dbname)?));
    }
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param
            .split_once('=')
            .ok_or_else(|| format!("URL parameter `{param}` has no `=` and value"))?;
        pairs.push((decode(k)?, decode(v)?));
    }
    Ok(pairs)
}

fn split_host_port(hostport: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(v6) = hostport.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or("URL: `[` of an IPv6 address is not closed")?;
        return Ok((addr, after.strip_prefix(':')));
    }
    Ok(match hostport.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    })
}

fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("URL: bad percent-encoding in `{text}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("URL: `{text}` does not decode to UTF-8"))
}

/// The text of `$PGPASSFILE` or `~/.pgpass` (libpq's format: host:port:db:user:pw, `*`
/// wildcards, `\` escapes); `None` when there is none, or when group or others can read it
/// (libpq ignores such a file, and so do we, with a warning that says why).
pub fn read_pgpass() -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    let meta = std::fs::metadata(&path).ok()?;
    if !pgpass_private(&meta) {
        tracing::warn!(
            path = %path.display(),
            "password file has group or world access; permissions should be u=rw (0600) or less: ignoring it"
        );
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// libpq's rule: a regular file with no group or other permission bits.
fn pgpass_private(meta: &std::fs::Metadata) -> bool {
    meta.is_file() && owner_only(meta)
}

/// No group or other permission bits: the test for every file holding a secret.
pub fn owner_only(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o077 == 0
}

/// The password of the first pgpass line matching, as libpq picks it.
fn pgpass_match(text: &str, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    // libpq matches a Unix-socket connection against "localhost".
    let host = if host.starts_with('/') {
        "localhost"
    } else {
        host
    };
    let port = port.to_string();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = split_pgpass(line);
            if fields.len() != 5 {
                return None;
            }
            let ok = |pattern: &str, value: &str| pattern == "*" || pattern == value;
            (ok(&fields[0], host)
                && ok(&fields[1], &port)
                && ok(&fields[2], dbname)
                && ok(&fields[3], user))
            .then(|| fields[4].clone())
        })
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("never empty").push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("never empty").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Dsn::parse(text, "blue.dsn").unwrap_err().to_string()
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let d = Dsn::parse("host=h user=u password=s3cret dbname=d", "blue.dsn").unwrap();
        assert!(!format!("{d:?} {d}").contains("s3cret"));
        assert_eq!(d.password.as_deref(), Some("s3cret"));
    }

    #[test]
    fn key_values_and_urls_parse_alike() {
        let a = Dsn::parse(
            "host=db.example.com port=6432 user='app user' dbname=nova password='it\\'s' sslmode=require",
            "green.dsn",
        )
        .unwrap();
        let b = Dsn::parse(
            "postgresql://app%20user:it's@db.example.com:6432/nova?sslmode=require",
            "green.dsn",
        )
        .unwrap();
        for d in [&a, &b] {
            assert_eq!(
                (d.host.as_str(), d.port, d.user.as_str(), d.dbname.as_str()),
                ("db.example.com", 6432, "app user", "nova")
            );
            assert_eq!(d.password.as_deref(), Some("it's"));
            assert_eq!(d.tls.mode, SslMode::Require);
        }
        let v6 = Dsn::parse("postgres://u@[::1]:5433/d", "green.dsn").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 5433));
        let sock = Dsn::parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/d", "green.dsn").unwrap();
        assert!(sock.is_unix());
    }

    #[test]
    fn bad_keys_are_named() {
        assert!(err("host=h user=u sslmod=require").contains("unknown key `sslmod`"));
        assert!(err("host=h user=u sslmode=verify-everything").contains("key `sslmode`"));
        assert!(err("host=h user=u port=x").contains("key `port`"));
        assert!(err("host=h user=u sslpassword=x").contains("key `sslpassword`"));
        assert!(err("postgres://u@h/d?gssencmode=require").contains("key `gssencmode`"));
        let e = err("host=h user=u sslmode=verify-full sslrootcert=/nonexistent/ca.pem");
        assert!(
            e.contains("blue.dsn") && e.contains("sslrootcert") && e.contains("/nonexistent"),
            "{e}"
        );
        assert!(
            err("host=h user=u channel_binding=require sslmode=prefer").contains("channel_binding")
        );
        assert!(err("host=a,b user=u").contains("several hosts"));
    }

    #[test]
    fn pgpass_picks_the_first_matching_line() {
        let text = "# comment\nother:5432:*:app:nope\ngreen-db:5432:novacron:app:right\n*:*:*:app:fallback\n";
        assert_eq!(
            pgpass_match(text, "green-db", 5432, "novacron", "app").as_deref(),
            Some("right")
        );
        assert_eq!(
            pgpass_match(text, "/var/run/postgresql", 5432, "x", "app").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            pgpass_match(text, "green-db", 5432, "novacron", "bob"),
            None
        );
    }

    #[test]
    fn pgpass_lines_split_with_escapes() {
        assert_eq!(
            split_pgpass(r"db\:1:5432:*:app:pa\:ss:word"),
            vec!["db:1", "5432", "*", "app", "pa:ss:word"]
        );
    }

    #[test]
    fn a_readable_pgpass_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("shadowsync-pgpass-{}", std::process::id()));
        std::fs::write(&path, "*:*:*:*:pw\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!pgpass_private(&std::fs::metadata(&path).unwrap()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(pgpass_private(&std::fs::metadata(&path).unwrap()));
        std::fs::remove_file(&path).unwrap();
    }
}
