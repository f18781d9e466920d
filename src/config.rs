//! Configuration: the TOML file an operator writes, validated before anything connects.
//!
//! Invariants: unknown keys are rejected; every error names the field (`blue.dsn`, ...);
//! passwords never come from the command line: a DSN may carry one, otherwise it is read from
//! `SHADOWSYNC_BLUE_PASSWORD` / `SHADOWSYNC_GREEN_PASSWORD` or the user's pgpass file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// Default `[metrics] listen`. Port 7187 lies outside 9090-9999, which the Prometheus wiki's
/// "Default port allocations" gives to Prometheus itself and its exporters (9187 is
/// postgres_exporter's, often running beside PostgreSQL), and is no common service's port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7187";
/// Default `[batch] max_rows`: rows per group commit (and per chunk of a large transaction).
pub const DEFAULT_BATCH_MAX_ROWS: usize = 20_000;
/// Default `[batch] max_bytes`: decoded column bytes held per batch, 16 MiB.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Default `[batch] max_delay_ms`: longest a committed blue transaction waits to be grouped.
pub const DEFAULT_BATCH_MAX_DELAY_MS: u64 = 200;
/// Default `[batch] channel_capacity`: decoded messages buffered between source and apply (they
/// travel in runs of up to 256; the channel holds this many messages' worth of runs).
pub const DEFAULT_CHANNEL_CAPACITY: usize = 8_192;
/// Default `[retry] initial_backoff_ms`.
pub const DEFAULT_INITIAL_BACKOFF_MS: u64 = 500;
/// Default `[retry] max_backoff_ms`.
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 30_000;
/// Default `[retry] startup_timeout_ms`.
pub const DEFAULT_STARTUP_TIMEOUT_MS: u64 = 60_000;
/// Default `[blue] status_interval_ms`: how often progress is confirmed to blue. Short, because
/// a drain (the cutover) ends only once blue has been told; PostgreSQL's own apply worker confirms
/// after every batch it applies.
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 10;
/// Default `[snapshot] range_pages`: 16384 pages of 8 KiB = 128 MiB per range.
pub const DEFAULT_SNAPSHOT_RANGE_PAGES: u64 = 16_384;
/// Most copy workers chosen by default (`[snapshot] workers = 0`).
pub const DEFAULT_SNAPSHOT_MAX_WORKERS: usize = 4;

pub use crate::transform::lww::{
    ConflictsConfig, DEFAULT_COMMIT_TIME_COLUMN, DEFAULT_LWW_COLUMN, LWW_COMMIT_TIME, Resolution,
};

/// Session settings pinned on both sides so that the text blue's walsender prints is exactly the
/// text green parses back (dates, intervals, floats, bytea, money, xml fragments).
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO,MDY -c intervalstyle=postgres \
     -c extra_float_digits=3 -c timezone=UTC -c bytea_output=hex -c lc_monetary=C \
     -c xmloption=content -c client_min_messages=warning";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The production database streamed from.
    pub blue: BlueConfig,
    /// The new database written to.
    pub green: GreenConfig,
    /// HTTP listener for `/metrics`, `/healthz`, `/readyz` and admin calls.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Group-commit limits.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Reconnection backoff.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Transform rule files.
    #[serde(default)]
    pub transforms: TransformsConfig,
    /// What to do when green's row disagrees with blue's change.
    #[serde(default)]
    pub conflicts: ConflictsConfig,
    /// Initial copy of blue's existing rows.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// Directory the config file is in: rule file paths are relative to it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The pgpass file's text, read once when the config is parsed: connections made later,
    /// inside the pipeline's tasks, never block on the file system.
    #[serde(skip)]
    pgpass: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformsConfig {
    /// Rule files, relative to the config file; `*` and `?` allowed in the file name. Tables
    /// in the publication without a rule are replicated as identity.
    #[serde(default)]
    pub files: Vec<String>,
}

/// When the initial copy runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Copy when shadowsync creates the slot (and finish an interrupted copy).
    #[default]
    Auto,
    /// Also copy, from a new snapshot, every mapped table not yet copied for this slot when the
    /// slot already exists.
    Always,
    /// Never copy: the operator backfilled green (or nothing existed before the slot).
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// `auto` (default), `always` or `never`.
    #[serde(default)]
    pub mode: SnapshotMode,
    /// Tables (or ranges of a table) copied at once (connections to each side); 0 picks
    /// min(4, CPUs).
    #[serde(default)]
    pub workers: usize,
    /// Tables larger than this many pages (8 KiB each) are split into ranges of this size,
    /// copied concurrently under the same snapshot (pages).
    #[serde(default = "default_range_pages")]
    pub range_pages: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            mode: SnapshotMode::Auto,
            workers: 0,
            range_pages: DEFAULT_SNAPSHOT_RANGE_PAGES,
        }
    }
}

impl SnapshotConfig {
    /// Copy workers to run.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(DEFAULT_SNAPSHOT_MAX_WORKERS)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlueConfig {
    /// libpq key=value string or postgres:// URL; the user needs the REPLICATION attribute.
    pub dsn: String,
    /// Logical replication slot (created when missing).
    pub slot: String,
    /// Publication naming the replicated tables (must exist).
    pub publication: String,
    /// Shortest interval between progress confirmations sent to blue, in milliseconds (while
    /// data flows, one per interval; an idle stream confirms every second).
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GreenConfig {
    /// libpq key=value string or postgres:// URL.
    pub dsn: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address (ip:port) of the HTTP listener; port 0 picks a free one.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_LISTEN.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Row changes per green transaction (rows); a larger blue transaction is written in chunks
    /// of this size inside one green transaction.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// Column bytes held per batch (bytes); bounds memory like `max_rows`.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Longest a committed blue transaction waits for others to share its green commit (ms).
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Decoded messages buffered between the replication reader and the applier (messages).
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: DEFAULT_BATCH_MAX_ROWS,
            max_bytes: DEFAULT_BATCH_MAX_BYTES,
            max_delay_ms: DEFAULT_BATCH_MAX_DELAY_MS,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First wait after a lost connection (ms); doubles on each failure.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest wait between reconnection attempts (ms).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Before the first session streams, how long retryable errors (unreachable database, slot
    /// still held by a predecessor) are retried before giving up (ms). Afterwards: forever.
    #[serde(default = "default_startup_timeout_ms")]
    pub startup_timeout_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff_ms: DEFAULT_INITIAL_BACKOFF_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            startup_timeout_ms: DEFAULT_STARTUP_TIMEOUT_MS,
        }
    }
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}
fn default_max_rows() -> usize {
    DEFAULT_BATCH_MAX_ROWS
}
fn default_max_bytes() -> usize {
    DEFAULT_BATCH_MAX_BYTES
}
fn default_max_delay_ms() -> u64 {
    DEFAULT_BATCH_MAX_DELAY_MS
}
fn default_channel_capacity() -> usize {
    DEFAULT_CHANNEL_CAPACITY
}
fn default_initial_backoff_ms() -> u64 {
    DEFAULT_INITIAL_BACKOFF_MS
}
fn default_max_backoff_ms() -> u64 {
    DEFAULT_MAX_BACKOFF_MS
}
fn default_startup_timeout_ms() -> u64 {
    DEFAULT_STARTUP_TIMEOUT_MS
}
fn default_range_pages() -> u64 {
    DEFAULT_SNAPSHOT_RANGE_PAGES
}
fn default_status_interval_ms() -> u64 {
    DEFAULT_STATUS_INTERVAL_MS
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Ok(config)
    }

    /// The transform rules named by `[transforms] files`.
    pub fn rules(&self) -> Result<crate::transform::rules::RuleSet, ConfigError> {
        let mut rules = crate::transform::rules::load(&self.base_dir, &self.transforms.files)
            .map_err(|e| ConfigError::Invalid {
                field: "transforms.files",
                message: e.to_string(),
            })?;
        rules.conflicts = self.conflicts.clone();
        Ok(rules)
    }

    /// Parses and validates TOML text (rule paths then resolve against the working directory).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        config.base_dir = PathBuf::from(".");
        config.pgpass = read_pgpass();
        config.validate()?;
        Ok(config)
    }

    /// Checks every field that TOML typing cannot; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Dsn::parse(&self.blue.dsn, "blue.dsn")?;
        Dsn::parse(&self.green.dsn, "green.dsn")?;
        check_identifier(&self.blue.slot, "blue.slot")?;
        if !self
            .blue
            .slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(invalid(
                "blue.slot",
                "slot names may contain only lower-case letters, digits and underscores",
            ));
        }
        check_identifier(&self.blue.publication, "blue.publication")?;
        self.listen_addr()?;
        if self.batch.max_rows == 0 {
            return Err(invalid("batch.max_rows", "must be at least 1"));
        }
        if self.batch.max_bytes < 1024 {
            return Err(invalid("batch.max_bytes", "must be at least 1024 bytes"));
        }
        if self.batch.channel_capacity == 0 {
            return Err(invalid("batch.channel_capacity", "must be at least 1"));
        }
        if self.retry.initial_backoff_ms == 0
            || self.retry.max_backoff_ms < self.retry.initial_backoff_ms
        {
            return Err(invalid(
                "retry.max_backoff_ms",
                "initial_backoff_ms must be > 0 and max_backoff_ms >= initial_backoff_ms",
            ));
        }
        if self.blue.status_interval_ms == 0 {
            return Err(invalid("blue.status_interval_ms", "must be > 0"));
        }
        check_identifier(&self.conflicts.lww_column, "conflicts.lww_column")?;
        if self.snapshot.range_pages == 0 {
            return Err(invalid("snapshot.range_pages", "must be at least 1"));
        }
        if self.snapshot.workers > 64 {
            return Err(invalid(
                "snapshot.workers",
                "at most 64 (each is a connection to blue and to green)",
            ));
        }
        check_identifier(
            &self.conflicts.commit_time_column,
            "conflicts.commit_time_column",
        )?;
        Ok(())
    }

    /// `[metrics] listen` as a socket address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.metrics.listen.parse().map_err(|e| {
            invalid(
                "metrics.listen",
                format!("{e}: expected ip:port such as {DEFAULT_LISTEN}"),
            )
        })
    }

    pub fn batch_max_delay(&self) -> Duration {
        Duration::from_millis(self.batch.max_delay_ms)
    }

    /// Blue's connection settings, password resolved.
    pub fn blue_dsn(&self) -> Result<Dsn, ConfigError> {
        Dsn::parse(&self.blue.dsn, "blue.dsn")?
            .with_password("SHADOWSYNC_BLUE_PASSWORD", self.pgpass.as_deref())
    }

    /// Green's connection settings, password resolved.
    pub fn green_dsn(&self) -> Result<Dsn, ConfigError> {
        Dsn::parse(&self.green.dsn, "green.dsn")?
            .with_password("SHADOWSYNC_GREEN_PASSWORD", self.pgpass.as_deref())
    }
}

fn check_identifier(value: &str, field: &'static str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 63 || value.contains('\0') {
        return Err(invalid(field, "must be 1 to 63 bytes long"));
    }
    Ok(())
}

/// Where a database is: host (or socket directory), port, user, database, password.
#[derive(Clone)]
pub struct Dsn {
    pub field: &'static str,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<String>,
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
        )
    }
}

impl Dsn {
    /// Parses a libpq key=value string or URL (as libpq does, through tokio-postgres).
    pub fn parse(text: &str, field: &'static str) -> Result<Dsn, ConfigError> {
        let pg = tokio_postgres::Config::from_str(text)
            .map_err(|e| invalid(field, format!("not a valid connection string: {e}")))?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg
            .get_user()
            .map(str::to_string)
            .ok_or_else(|| invalid(field, "names no user (add user=...)"))?;
        let dbname = pg.get_dbname().unwrap_or(&user).to_string();
        if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(invalid(
                field,
                "sslmode=require is not supported yet; connect over a trusted network or \
                 a Unix socket (sslmode=disable or prefer)",
            ));
        }
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        Ok(Dsn {
            field,
            host,
            port,
            user,
            dbname,
            password,
        })
    }

    fn with_password(mut self, env: &str, pgpass: Option<&str>) -> Result<Dsn, ConfigError> {
        if self.password.is_none() {
            self.password = std::env::var(env)
                .ok()
                .or_else(|| pgpass_match(pgpass?, &self.host, self.port, &self.dbname, &self.user));
        }
        Ok(self)
    }

    /// Opens an ordinary connection; its driver task logs how it ended. Abort the handle (or drop
    /// the client) to close it.
    pub async fn connect(
        &self,
        application_name: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let (client, conn) = self
            .pg_config(application_name)
            .connect(tokio_postgres::NoTls)
            .await?;
        let label = format!("{} ({application_name})", self.field);
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(connection = %label, error = %e, "connection ended");
            }
        });
        Ok((client, driver))
    }

    /// Settings for an ordinary (non-replication) tokio-postgres connection.
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
                failure: crate::failure::DbFailure::from_pg(&e),
            })
    }

    pub fn pg_config(&self, application_name: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        if self.host.starts_with('/') {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(application_name)
            .options(SESSION_OPTIONS)
            .connect_timeout(Duration::from_secs(10));
        if let Some(p) = &self.password {
            c.password(p);
        }
        c
    }
}

/// The text of `$PGPASSFILE` or `~/.pgpass` (libpq's format: host:port:db:user:pw, `*`
/// wildcards, `\` escapes); `None` when there is none.
fn read_pgpass() -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    std::fs::read_to_string(path).ok()
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

    const MINIMAL: &str = r#"
        [blue]
        dsn = "host=blue-db port=5432 dbname=novacron user=replicator"
        slot = "novacron_migration"
        publication = "novacron_migration"
        [green]
        dsn = "postgres://app@green-db:5432/novacron"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.metrics.listen, DEFAULT_LISTEN);
        assert_eq!(c.batch.max_rows, DEFAULT_BATCH_MAX_ROWS);
        let g = c.green_dsn().unwrap();
        assert_eq!(
            (g.host.as_str(), g.port, g.user.as_str(), g.dbname.as_str()),
            ("green-db", 5432, "app", "novacron")
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let text = format!("{MINIMAL}\n[batch]\nmax_rowz = 5\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("max_rowz"), "{err}");
    }

    #[test]
    fn invalid_fields_are_named() {
        let text = MINIMAL.replace(
            "novacron_migration\"\n        publication",
            "Bad-Slot\"\n        publication",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("blue.slot"), "{err}");
        let text = format!("{MINIMAL}\n[metrics]\nlisten = \"nope\"\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("metrics.listen"), "{err}");
        let text = MINIMAL.replace("user=replicator", "user=replicator sslmode=require");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("blue.dsn") && err.contains("sslmode"), "{err}");
    }

    #[test]
    fn the_example_configs_and_rules_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in ["example.toml", "novacron.toml"] {
            let c = Config::load(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            c.rules().unwrap_or_else(|e| panic!("{name} rules: {e}"));
        }
        let novacron = Config::load(&dir.join("novacron.toml")).unwrap();
        assert_eq!(novacron.rules().unwrap().rules.len(), 3 + 1);
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let d = Dsn::parse("host=h user=u password=s3cret dbname=d", "blue.dsn").unwrap();
        assert!(!format!("{d:?}").contains("s3cret"));
        assert_eq!(d.password.as_deref(), Some("s3cret"));
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
}
