//! Configuration: the TOML file an operator writes, validated before anything connects.
//!
//! Invariants: unknown keys are rejected; every error names the field (`blue.dsn`, ...);
//! passwords never come from the command line: a DSN may carry one, otherwise it is read from
//! `SHADOWSYNC_BLUE_PASSWORD` / `SHADOWSYNC_GREEN_PASSWORD` or the user's pgpass file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default `[metrics] listen`. Port 7187 lies outside 9090-9999, which the Prometheus wiki's
/// "Default port allocations" gives to Prometheus itself and its exporters (9187 is
/// postgres_exporter's, often running beside PostgreSQL), and is no common service's port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7187";
/// Environment variable holding the admin token (see `[metrics] admin_token_file`).
pub const ADMIN_TOKEN_ENV: &str = "SHADOWSYNC_ADMIN_TOKEN";
/// Shortest admin token accepted, in characters.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;
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
/// Default `[retry] stall_timeout_ms`: half of PostgreSQL's own `wal_receiver_timeout`.
pub const DEFAULT_STALL_TIMEOUT_MS: u64 = 30_000;
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

pub use crate::dsn::{Dsn, SESSION_OPTIONS};
pub use crate::transform::lww::{
    ConflictsConfig, DEFAULT_COMMIT_TIME_COLUMN, DEFAULT_LWW_COLUMN, LWW_COMMIT_TIME, Resolution,
};

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

impl From<crate::dsn::DsnError> for ConfigError {
    fn from(e: crate::dsn::DsnError) -> ConfigError {
        ConfigError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
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
    /// Replication origins: marking this stream's writes, skipping other streams' (no echo).
    #[serde(default)]
    pub origin: crate::origin::OriginConfig,
    /// The rollback stream `cutover` prepares on green (absent: none).
    #[serde(default)]
    pub reverse: Option<ReverseConfig>,
    /// Directory the config file is in: rule file paths are relative to it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The pgpass file's text, read once when the config is parsed: connections made later,
    /// inside the pipeline's tasks, never block on the file system.
    #[serde(skip)]
    pgpass: Option<String>,
}

/// `[reverse]`: the rollback stream green -> blue, made ready by `cutover` inside the fence.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReverseConfig {
    /// Logical slot (pgoutput) created on green before green is reported ready; the reverse
    /// config's `blue.slot`. Lower-case letters, digits, `_`.
    pub slot: String,
    /// Publication on green the reverse stream reads; created by `cutover` when missing
    /// (the reverse config's `blue.publication`).
    pub publication: String,
    /// Green tables (schema-qualified) of the publication when `cutover` creates it; default:
    /// every target table of this config's mappings.
    #[serde(default)]
    pub tables: Vec<String>,
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
    /// Address (ip:port) of the HTTP listener; port 0 picks a free one. Anything but a loopback
    /// address needs an admin token (see `admin_token_file`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// File holding the bearer token that the mutating admin calls (`POST`/`DELETE` of `/drain`
    /// and `/hold`) must send, used when `SHADOWSYNC_ADMIN_TOKEN` is not set; at least
    /// 16 characters, readable by its owner only (mode 0600). `drain`, `cutover` and `verify`
    /// send it. Required when `listen` is not a loopback address; the read-only endpoints
    /// (`/metrics`, `/healthz`, `/readyz`, `/status`) never need it.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_LISTEN.to_string(),
            admin_token_file: None,
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
    /// A database that answers nothing (not even a trivial query on a connection of its own)
    /// for this long, or a blue walsender that hears nothing from us for this long while we
    /// stream, is stalled: readiness turns false and the session is dropped and reconnected
    /// (ms). At least 2000.
    #[serde(default = "default_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff_ms: DEFAULT_INITIAL_BACKOFF_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            startup_timeout_ms: DEFAULT_STARTUP_TIMEOUT_MS,
            stall_timeout_ms: DEFAULT_STALL_TIMEOUT_MS,
        }
    }
}

fn default_stall_timeout_ms() -> u64 {
    DEFAULT_STALL_TIMEOUT_MS
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
        config.pgpass = crate::dsn::read_pgpass();
        config.validate()?;
        Ok(config)
    }

    /// Checks every field that TOML typing cannot; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.blue_dsn()?;
        self.green_dsn()?;
        check_slot_name(&self.blue.slot, "blue.slot")?;
        check_identifier(&self.blue.publication, "blue.publication")?;
        let listen = self.listen_addr()?;
        if !listen.ip().is_loopback() && self.admin_token()?.is_none() {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{listen} is not a loopback address, so the admin calls that change the \
                     migration's state need a token: set {ADMIN_TOKEN_ENV} or \
                     metrics.admin_token_file (or listen on 127.0.0.1)"
                ),
            ));
        }
        if self.retry.stall_timeout_ms < 2_000 {
            return Err(invalid(
                "retry.stall_timeout_ms",
                "at least 2000 (the monitor asks once a second)",
            ));
        }
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
        if let Some(r) = &self.reverse {
            r.validate(&self.blue.slot)?;
        }
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

    /// The admin token: `SHADOWSYNC_ADMIN_TOKEN`, else the text of `metrics.admin_token_file`
    /// (trimmed); `None` when neither is set.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let field = "metrics.admin_token_file";
        let token = match std::env::var(ADMIN_TOKEN_ENV) {
            Ok(t) if !t.is_empty() => t,
            _ => {
                let Some(path) = &self.metrics.admin_token_file else {
                    return Ok(None);
                };
                let path = self.base_dir.join(path);
                check_private(&path, field)?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
                text.trim().to_string()
            }
        };
        if token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
            return Err(invalid(
                field,
                format!(
                    "the admin token ({ADMIN_TOKEN_ENV} or this file) must have at least \
                     {MIN_ADMIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        Ok(Some(token))
    }

    pub fn batch_max_delay(&self) -> Duration {
        Duration::from_millis(self.batch.max_delay_ms)
    }

    /// Blue's connection settings, password resolved. Blue's DSN also makes the replication
    /// connection, whose transport (pgwire-replication) has neither CRL checks nor SCRAM channel
    /// binding: asking for either is refused here rather than ignored there.
    pub fn blue_dsn(&self) -> Result<Dsn, ConfigError> {
        let dsn = Dsn::parse(&self.blue.dsn, "blue.dsn")?;
        if dsn.tls.crl.is_some() {
            return Err(invalid(
                "blue.dsn",
                "key `sslcrl`: not supported for blue (the replication connection cannot check \
                 a CRL); remove it, and revoke by replacing the server's CA if you must",
            ));
        }
        if dsn.channel_binding == crate::dsn::ChannelBinding::Require {
            return Err(invalid(
                "blue.dsn",
                "key `channel_binding`: require is not supported for blue (the replication \
                 connection's SCRAM has no channel binding); use prefer with \
                 sslmode=verify-full, which authenticates the server by its certificate",
            ));
        }
        Ok(dsn.with_password("SHADOWSYNC_BLUE_PASSWORD", self.pgpass.as_deref()))
    }

    /// Green's connection settings, password resolved.
    pub fn green_dsn(&self) -> Result<Dsn, ConfigError> {
        Ok(Dsn::parse(&self.green.dsn, "green.dsn")?
            .with_password("SHADOWSYNC_GREEN_PASSWORD", self.pgpass.as_deref()))
    }
}

impl ReverseConfig {
    /// Errors name the field (`reverse.slot`, ...); `forward_slot` is this config's `blue.slot`.
    pub fn validate(&self, forward_slot: &str) -> Result<(), ConfigError> {
        check_slot_name(&self.slot, "reverse.slot")?;
        if self.slot == forward_slot {
            return Err(invalid(
                "reverse.slot",
                "must differ from blue.slot (each stream has its own slot, progress and origin)",
            ));
        }
        check_identifier(&self.publication, "reverse.publication")?;
        for t in &self.tables {
            if crate::transform::rules::qualified(t).is_none() {
                return Err(invalid(
                    "reverse.tables",
                    format!("{t:?}: write schema-qualified table names such as \"public.users\""),
                ));
            }
        }
        Ok(())
    }
}

/// A slot name PostgreSQL accepts: 1 to 63 lower-case letters, digits and underscores.
fn check_slot_name(value: &str, field: &'static str) -> Result<(), ConfigError> {
    check_identifier(value, field)?;
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            field,
            "slot names may contain only lower-case letters, digits and underscores",
        ));
    }
    Ok(())
}

/// A secret file must not be readable by group or others (libpq's rule for pgpass and keys).
fn check_private(path: &Path, field: &'static str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    if !crate::dsn::owner_only(&meta) {
        let mode = meta.permissions().mode() & 0o777;
        return Err(invalid(
            field,
            format!(
                "{} has group or world access (mode {mode:o}); it holds a secret: chmod 600 it",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn check_identifier(value: &str, field: &'static str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 63 || value.contains('\0') {
        return Err(invalid(field, "must be 1 to 63 bytes long"));
    }
    Ok(())
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
        let text = MINIMAL.replace("user=replicator", "user=replicator sslmode=requir");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("blue.dsn") && err.contains("key `sslmode`"),
            "{err}"
        );
        let text = MINIMAL.replace("user=replicator", "user=replicator sslcrl=/x.pem");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("blue.dsn") && err.contains("sslcrl"), "{err}");
        let text = MINIMAL.replace(
            "user=replicator",
            "user=replicator sslmode=require channel_binding=require",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("blue.dsn") && err.contains("channel_binding"),
            "{err}"
        );
        let text = format!("{MINIMAL}\n[metrics]\nlisten = \"0.0.0.0:9999\"\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("metrics.listen") && err.contains("token"),
            "{err}"
        );
    }

    #[test]
    fn the_example_configs_and_rules_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in ["example.toml", "novacron.toml", "novacron-reverse.toml"] {
            let c = Config::load(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            c.rules().unwrap_or_else(|e| panic!("{name} rules: {e}"));
        }
        let novacron = Config::load(&dir.join("novacron.toml")).unwrap();
        assert_eq!(novacron.rules().unwrap().rules.len(), 3 + 1);
        let reverse = novacron.reverse.as_ref().expect("[reverse]");
        let back = Config::load(&dir.join("novacron-reverse.toml")).unwrap();
        assert_eq!(
            (back.blue.slot.as_str(), back.blue.publication.as_str()),
            (reverse.slot.as_str(), reverse.publication.as_str()),
            "the reverse config streams from the slot the forward cutover creates"
        );
        assert_eq!(back.snapshot.mode, SnapshotMode::Never);
        assert_eq!(back.origin.mark, crate::origin::Mark::On);
    }

    #[test]
    fn reverse_fields_are_checked() {
        let text =
            format!("{MINIMAL}\n[reverse]\nslot = \"novacron_migration\"\npublication = \"p\"\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("reverse.slot"), "{err}");
        let text = format!(
            "{MINIMAL}\n[reverse]\nslot = \"back\"\npublication = \"p\"\ntables = [\"users\"]\n"
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("reverse.tables"), "{err}");
        let text = format!("{MINIMAL}\n[origin]\nmark = \"sometimes\"\n");
        assert!(Config::parse(&text).is_err());
    }
}
