//! Throwaway PostgreSQL clusters for tests, benchmarks and the `demo` command.
//!
//! A [`Cluster`] is a fresh `initdb` in a private temporary directory, started with `pg_ctl`,
//! reachable only through a Unix socket in that directory (no TCP listener, so clusters never
//! collide on ports), with `wal_level = logical`. Dropping it stops the server (immediate mode)
//! and removes the directory. When we run as root, the server binaries run as the `postgres`
//! user, since PostgreSQL refuses to run as root.
//!
//! Invariant: a `Cluster` value always owns a running server and a directory nobody else uses.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Superuser created by `initdb` in every throwaway cluster.
pub const SUPERUSER: &str = "postgres";

/// How long a replication connection may stay silent before the server drops it, in
/// milliseconds. Short, so that a killed streamer releases its slot quickly in tests.
const WAL_SENDER_TIMEOUT_MS: u32 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb on PATH and under \
         /usr/lib/postgresql/*/bin); install them, e.g. `apt-get install -y postgresql`"
    )]
    NotInstalled,
    #[error(
        "running as root but there is no `postgres` user to run the server as; create it (useradd postgres) or run as a normal user"
    )]
    NoPostgresUser,
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running throwaway cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    stopped: bool,
}

impl Cluster {
    /// Initializes and starts a new cluster. `name` only labels its directory and logs.
    pub fn start(name: &str) -> Result<Cluster, ClusterError> {
        let bin = find_bin_dir().ok_or(ClusterError::NotInstalled)?;
        let run_as = if running_as_root() {
            Some(postgres_ids().ok_or(ClusterError::NoPostgresUser)?)
        } else {
            None
        };
        let dir = unique_dir(name);
        fs::create_dir_all(&dir).map_err(|source| io_err(&dir, source))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|source| io_err(&dir, source))?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| io_err(&dir, source))?;
        let mut cluster = Cluster {
            name: name.to_string(),
            dir,
            bin,
            port: pseudo_port(),
            run_as,
            stopped: true,
        };
        cluster.init()?;
        cluster.pg_ctl_start()?;
        cluster.stopped = false;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Directory holding the server's Unix socket (use as `host=` in a DSN).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Port number; only names the socket file, nothing listens on TCP.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding `initdb`, `pg_ctl`, `psql`, `pg_recvlogical`, ...
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Process id of the running postmaster (from `postmaster.pid`), e.g. to account its CPU time.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Appends settings to `postgresql.conf` and restarts the server to load them
    /// (e.g. `shared_preload_libraries` for a profiling run).
    pub fn reconfigure(&mut self, settings: &str) -> Result<(), ClusterError> {
        let path = self.data_dir().join("postgresql.conf");
        let mut text = fs::read_to_string(&path).map_err(|source| io_err(&path, source))?;
        text.push('\n');
        text.push_str(settings);
        text.push('\n');
        fs::write(&path, text).map_err(|source| io_err(&path, source))?;
        // The restart stops in immediate mode and commits are not synced (fsync and
        // synchronous_commit are off): a checkpoint first keeps what was committed.
        self.psql("postgres", "CHECKPOINT")?;
        self.restart()
    }

    /// Makes the server TLS-capable and reachable on `127.0.0.1:port` (for TLS tests): copies
    /// the server's certificate, key and the CA that signs client certificates into the data
    /// directory, replaces `pg_hba.conf` with `local all all trust` plus `hba` (e.g. `hostssl`
    /// lines only), and restarts. The Unix socket keeps working for the superuser.
    pub fn serve_tcp(
        &mut self,
        port: u16,
        tls: Option<(&Path, &Path, &Path)>,
        hba: &str,
    ) -> Result<(), ClusterError> {
        let data = self.data_dir();
        let mut settings = format!("listen_addresses = '127.0.0.1'\nport = {port}\n");
        if let Some((cert, key, ca)) = tls {
            for (from, name) in [
                (cert, "server.crt"),
                (key, "server.key"),
                (ca, "client_ca.crt"),
            ] {
                let to = data.join(name);
                fs::copy(from, &to).map_err(|source| io_err(&to, source))?;
                fs::set_permissions(&to, fs::Permissions::from_mode(0o600))
                    .map_err(|source| io_err(&to, source))?;
                if let Some((uid, gid)) = self.run_as {
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid))
                        .map_err(|source| io_err(&to, source))?;
                }
            }
            settings.push_str(
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                 ssl_ca_file = 'client_ca.crt'\n",
            );
        }
        let hba_path = data.join("pg_hba.conf");
        fs::write(&hba_path, format!("local all all trust\n{hba}\n"))
            .map_err(|source| io_err(&hba_path, source))?;
        self.reconfigure(&settings)?;
        self.port = port;
        Ok(())
    }

    /// Cluster label given to [`Cluster::start`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// libpq key=value DSN for `dbname` as the superuser.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            self.dir.display(),
            self.port,
            SUPERUSER,
            dbname
        )
    }

    /// Runs SQL through `psql` (stop on first error) and returns its unaligned, tuples-only output.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = self.command("psql");
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d", dbname, "-c", sql]);
        let out = run(cmd, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// Creates a database owned by the superuser.
    pub fn create_database(&self, dbname: &str) -> Result<(), ClusterError> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", dbname.replace('"', "\"\"")),
        )
        .map(|_| ())
    }

    /// A `Command` for one of the server binaries, run as `postgres` when we are root.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.dir).env_remove("PGPASSWORD");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn init(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C"]);
        run(cmd, "initdb")?;
        let conf = format!(
            "\n# shadowsync throwaway cluster\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{dir}'\n\
             port = {port}\n\
             wal_level = logical\n\
             max_wal_senders = 20\n\
             max_replication_slots = 20\n\
             max_connections = 100\n\
             wal_sender_timeout = {timeout}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 128MB\n\
             max_wal_size = 2GB\n\
             logging_collector = off\n\
             log_min_messages = warning\n",
            dir = self.dir.display(),
            port = self.port,
            timeout = WAL_SENDER_TIMEOUT_MS,
        );
        let path = self.data_dir().join("postgresql.conf");
        let mut text = fs::read_to_string(&path).map_err(|source| io_err(&path, source))?;
        text.push_str(&conf);
        fs::write(&path, text).map_err(|source| io_err(&path, source))?;
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"]);
        run(cmd, "pg_ctl start").map_err(|e| self.with_log(e))?;
        Ok(())
    }

    /// Server log so far: helps explain a failed start in test output.
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn with_log(&self, e: ClusterError) -> ClusterError {
        match e {
            ClusterError::Command {
                command,
                status,
                stderr,
            } => ClusterError::Command {
                command,
                status,
                stderr: format!("{stderr}\nserver log:\n{}", self.server_log()),
            },
            other => other,
        }
    }

    /// Stops the server now (immediate mode: like a crash, which is all a throwaway needs).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = cmd.output();
        self.stopped = true;
    }

    /// Restarts a stopped server on the same directory and socket.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop();
        self.pg_ctl_start()?;
        self.stopped = false;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn run(mut cmd: Command, what: &str) -> Result<Output, ClusterError> {
    let out = cmd.output().map_err(|source| ClusterError::Io {
        path: PathBuf::from(what),
        source,
    })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(ClusterError::Command {
            command: what.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ClusterError {
    ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `initdb` on PATH (resolving symlinks, as Debian links a wrapper there) or the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("initdb"))
            .find(|p| p.is_file())
    });
    if let Some(initdb) = on_path {
        let real = fs::canonicalize(&initdb).unwrap_or(initdb);
        let dir = real.parent()?.to_path_buf();
        if dir.join("pg_ctl").is_file() && dir.join("postgres").is_file() {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// uid and gid of the `postgres` user, read from /etc/passwd.
fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != "postgres" {
            return None;
        }
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique_dir(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "shadowsync-{name}-{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Any port number works for a socket-only server; vary it so socket names differ in logs.
fn pseudo_port() -> u16 {
    20_000 + ((std::process::id() + SEQ.fetch_add(1, Ordering::Relaxed) * 7) % 40_000) as u16
}

/// Config TOML streaming database `dbname` of `blue` into the same database of `green`, with
/// the HTTP listener at `listen` and timings suited to tests and demos.
pub fn pipeline_config_toml(
    blue: &Cluster,
    green: &Cluster,
    dbname: &str,
    slot: &str,
    publication: &str,
    listen: &str,
) -> String {
    format!(
        r#"
[blue]
dsn = "{}"
slot = "{slot}"
publication = "{publication}"
[green]
dsn = "{}"
[metrics]
listen = "{listen}"
[retry]
initial_backoff_ms = 200
max_backoff_ms = 2000
startup_timeout_ms = 30000
"#,
        blue.dsn(dbname),
        green.dsn(dbname)
    )
}

/// [`pipeline_config_toml`] parsed, with the listener on a free port.
pub fn pipeline_config(
    blue: &Cluster,
    green: &Cluster,
    dbname: &str,
    slot: &str,
    publication: &str,
) -> crate::config::Config {
    let text = pipeline_config_toml(blue, green, dbname, slot, publication, "127.0.0.1:0");
    crate::config::Config::parse(&text).expect("a valid generated config")
}
