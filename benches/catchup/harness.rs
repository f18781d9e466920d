//! The catch-up harness: one blue backlog drained three ways, one after the other, with both
//! greens verified. Shared by `cargo bench --bench catchup` and the CI smoke test
//! (`tests/catchup_smoke.rs`), so the harness cannot rot.
//!
//! 1. ceiling: `pg_recvlogical` (pgoutput, same publication) reading the backlog to /dev/null;
//! 2. native: a disabled subscription enabled, timed until its slot confirms the backlog's end;
//! 3. shadowsync: `shadowsync run --drain` (the release binary) over the same backlog.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shadowsync::cluster::Cluster;
use tokio_postgres::{Client, NoTls};

pub const DB: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// 11-column table, preloaded; transactions of one insert and one update, 4 clients.
    W1,
    /// The NovaCron rules over a NovaCron backlog; native reference: triggers doing the rules.
    W2,
    /// W1 with five secondary indexes on green.
    W3,
    /// One transaction of many rows.
    W4,
    /// W2 where 10% of the transactions also move an earlier VM's owner to another tenant.
    W2Moves,
}

/// Share of W2Moves' transactions that move a user to another tenant.
pub const W2_MOVES_PERCENT: u64 = 10;

impl Workload {
    /// The NovaCron workloads (W2 and W2Moves).
    pub fn is_novacron(self) -> bool {
        matches!(self, Workload::W2 | Workload::W2Moves)
    }
}

impl Workload {
    pub fn parse(s: &str) -> Option<Workload> {
        match s {
            "w1" => Some(Workload::W1),
            "w2" => Some(Workload::W2),
            "w2-moves" => Some(Workload::W2Moves),
            "w3" => Some(Workload::W3),
            "w4" => Some(Workload::W4),
            _ => None,
        }
    }
}

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Preloaded rows (W1, W3).
    pub preload: i64,
    /// Backlog transactions (W1, W2, W3) or rows (W4).
    pub backlog: i64,
}

impl Size {
    pub fn full(w: Workload) -> Size {
        match w {
            Workload::W4 => Size {
                preload: 0,
                backlog: 2_000_000,
            },
            _ => Size {
                preload: 200_000,
                backlog: 100_000,
            },
        }
    }

    pub fn smoke(w: Workload) -> Size {
        match w {
            Workload::W4 => Size {
                preload: 0,
                backlog: 20_000,
            },
            _ => Size {
                preload: 2_000,
                backlog: 2_000,
            },
        }
    }
}

/// One method's timing, and where the CPU went while it ran.
#[derive(Debug, Clone)]
pub struct Timing {
    pub method: &'static str,
    pub seconds: f64,
    pub cpu: Cpu,
}

/// CPU seconds (user + system) used during one timed run: all of blue's server processes, all
/// of green's, and the client tool (pg_recvlogical or shadowsync; native's apply worker is a
/// green process). The sum over the wall time says how busy the machine's cores were.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub blue: f64,
    pub green: f64,
    pub tool: f64,
}

/// CPU seconds used so far by a cluster: its live processes, plus the postmaster's own and its
/// reaped children's (a backend that exits hands its time to the postmaster).
pub fn cluster_cpu(cluster: &Cluster) -> f64 {
    let Some(postmaster) = cluster.postmaster_pid() else {
        return 0.0;
    };
    let mut total = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        // After the command: state, ppid, ..., utime (11), stime (12), cutime (13), cstime (14).
        if f.len() < 15 {
            continue;
        }
        if pid == postmaster {
            total += f[11] + f[12] + f[13] + f[14];
        } else if f[1] as u32 == postmaster {
            total += f[11] + f[12];
        }
    }
    total / 100.0 // USER_HZ
}

/// Measures the clusters' CPU across one timed run.
struct CpuMeter {
    blue: f64,
    green: f64,
}

impl CpuMeter {
    fn start(blue: &Cluster, green: &Cluster) -> CpuMeter {
        CpuMeter {
            blue: cluster_cpu(blue),
            green: cluster_cpu(green),
        }
    }

    fn stop(self, blue: &Cluster, green: &Cluster, tool: f64) -> Cpu {
        Cpu {
            blue: cluster_cpu(blue) - self.blue,
            green: cluster_cpu(green) - self.green,
            tool,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub workload: Workload,
    pub size: Size,
    /// Row changes in the backlog (blue side).
    pub rows: i64,
    pub ceiling: Timing,
    pub native: Timing,
    pub shadowsync: Timing,
    /// The same run with `[conflicts] detect = false`: what detection costs.
    pub blind: Timing,
    pub shadowsync_peak_rss_kib: u64,
    pub shadowsync_cpu_seconds: f64,
}

impl Outcome {
    /// The result as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:?}: {} row changes ({} backlog, {} preloaded); both greens verified\n\n| method | seconds | rows/s | vs native | vs ceiling | CPU s: blue | green | tool | cores busy |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.workload, self.rows, self.size.backlog, self.size.preload
        );
        for t in [&self.ceiling, &self.native, &self.shadowsync, &self.blind] {
            out.push_str(&format!(
                "| {} | {:.2} | {:.0} | {:.2}x | {:.2}x | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                t.method,
                t.seconds,
                self.rows as f64 / t.seconds,
                self.native.seconds / t.seconds,
                self.ceiling.seconds / t.seconds,
                t.cpu.blue,
                t.cpu.green,
                t.cpu.tool,
                (t.cpu.blue + t.cpu.green + t.cpu.tool) / t.seconds,
            ));
        }
        out.push_str(&format!(
            "\nshadowsync: peak RSS {} MiB, CPU {:.2} s; conflict detection costs {:+.1}% of the time without it\n",
            self.shadowsync_peak_rss_kib / 1024,
            self.shadowsync_cpu_seconds,
            (self.shadowsync.seconds / self.blind.seconds - 1.0) * 100.0
        ));
        out
    }
}

/// Medians (and ranges) over repeated runs of one workload: each ratio is taken per run, as the
/// methods of one run share its clusters and moment.
pub fn summary(runs: &[Outcome]) -> String {
    fn median_range(mut v: Vec<f64>) -> String {
        v.sort_by(f64::total_cmp);
        let mid = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        format!("{mid:.2} ({:.2} to {:.2})", v[0], v[v.len() - 1])
    }
    let mut out = format!(
        "{:?} over {} runs: median (min to max)\n\n| method | seconds | vs native | vs ceiling |\n|---|---:|---:|---:|\n",
        runs[0].workload,
        runs.len()
    );
    let pick: [fn(&Outcome) -> &Timing; 4] = [
        |o| &o.ceiling,
        |o| &o.native,
        |o| &o.shadowsync,
        |o| &o.blind,
    ];
    for f in pick {
        out.push_str(&format!(
            "| {} | {} | {}x | {}x |\n",
            f(&runs[0]).method,
            median_range(runs.iter().map(|o| f(o).seconds).collect()),
            median_range(
                runs.iter()
                    .map(|o| o.native.seconds / f(o).seconds)
                    .collect()
            ),
            median_range(
                runs.iter()
                    .map(|o| o.ceiling.seconds / f(o).seconds)
                    .collect()
            ),
        ));
    }
    out.push_str(&format!(
        "\nshadowsync: peak RSS up to {} MiB\n",
        runs.iter()
            .map(|o| o.shadowsync_peak_rss_kib)
            .max()
            .unwrap_or(0)
            / 1024
    ));
    out
}

pub async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

async fn lsn(client: &Client, sql: &str) -> u64 {
    let text: Option<String> = client.query_one(sql, &[]).await.expect("lsn").get(0);
    text.as_deref()
        .and_then(|t| shadowsync::lsn::Lsn::parse(t).ok())
        .map_or(0, |l| l.as_u64())
}

async fn slot_confirmed(blue: &Client, slot: &str) -> u64 {
    lsn(
        blue,
        &format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .await
}

/// Waits until no process holds `slot` (its walsender has exited), so that the next timed run
/// does not share the machine with the last one's exit.
async fn slot_released(blue: &Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let active: bool = blue
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if !active {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("slot {slot} still in use after 30 s");
}

/// Order-independent content of a query's rows.
pub async fn digest(dsn: &str, from: &str) -> (i64, String) {
    let c = connect(dsn).await;
    let row = c
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '') FROM {from} AS t"
            ),
            &[],
        )
        .await
        .expect("digest");
    (row.get(0), row.get(1))
}

/// Runs a command to completion, sampling its peak RSS (KiB) and CPU time (s).
pub fn run_watched(mut cmd: Command) -> (Duration, u64, f64, bool) {
    let ticks = 100.0; // USER_HZ on Linux
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let (mut peak, mut cpu) = (0u64, 0.0f64);
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kib) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        {
            peak = peak.max(kib);
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.to_string())
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(u), Some(s)) = (f.get(11), f.get(12)) {
                let t = u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0);
                cpu = cpu.max(t / ticks);
            }
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (started.elapsed(), peak, cpu, status.success())
}

pub const W1_SCHEMA: &str = "
CREATE TABLE w1 (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    descr text,
    doc jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    n integer,
    status text,
    ratio double precision,
    flag boolean,
    tag text
);";

const W3_INDEXES: &str = "
CREATE INDEX w1_name ON w1 (name);
CREATE INDEX w1_status ON w1 (status, updated_at);
CREATE INDEX w1_n ON w1 (n);
CREATE INDEX w1_tag ON w1 (tag, id);
CREATE INDEX w1_doc ON w1 USING gin (doc);";

pub fn preload_sql(rows: i64) -> String {
    format!(
        "INSERT INTO w1 (id, name, descr, doc, created_at, updated_at, n, status, ratio, flag, tag)
         SELECT g, 'name-' || g, 'preloaded row', jsonb_build_object('g', g), '2026-01-01 00:00:00+00',
                '2026-01-01 00:00:00+00', g, 'active', g / 7.0, g % 2 = 0, 'tag-' || (g % 10)
         FROM generate_series(1, {rows}) g"
    )
}

/// What the native greens get on top of their tables for W2: PostgreSQL's own subscription
/// into blue-shaped tables, and ENABLE ALWAYS triggers writing the NovaCron rules' result into
/// the new tables (schema `app`): what a DBA would do without shadowsync.
const W2_NATIVE_TRIGGERS: &str = "
CREATE FUNCTION app_users() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN DELETE FROM app.users WHERE id = OLD.id; RETURN NULL; END IF;
  INSERT INTO app.users (id, email, name, tenant_id, created_at, updated_at)
  VALUES (NEW.id, NEW.email, NEW.name,
          COALESCE((SELECT t.id FROM app.tenants t WHERE t.slug = split_part(NEW.email, '@', 2)),
                   '00000000-0000-0000-0000-000000000001'::uuid),
          NEW.created_at, NEW.updated_at)
  ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, name = EXCLUDED.name,
     tenant_id = EXCLUDED.tenant_id, created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at;
  -- The owner's VMs follow a tenant move (what shadowsync's re-derivation does).
  IF TG_OP = 'UPDATE' THEN
    UPDATE app.vms v SET tenant_id = u.tenant_id FROM app.users u
     WHERE u.id = NEW.id AND v.owner_id = NEW.id AND v.tenant_id IS DISTINCT FROM u.tenant_id;
  END IF;
  RETURN NULL;
END $$;
CREATE FUNCTION app_nodes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN DELETE FROM app.compute_nodes WHERE id = OLD.id; RETURN NULL; END IF;
  INSERT INTO app.compute_nodes (id, name, hostname, status, cpu_cores, memory_total, hypervisor_type, created_at, updated_at)
  VALUES (NEW.id, NEW.hostname, NEW.hostname,
          (CASE NEW.status WHEN 'active' THEN 'online' WHEN 'inactive' THEN 'offline' ELSE 'maintenance' END)::app.node_status,
          (NEW.capacity->>'cpu_cores')::integer, (NEW.capacity->>'memory_mb')::bigint, NEW.type,
          NEW.created_at, NEW.updated_at)
  ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, hostname = EXCLUDED.hostname, status = EXCLUDED.status,
     cpu_cores = EXCLUDED.cpu_cores, memory_total = EXCLUDED.memory_total,
     hypervisor_type = EXCLUDED.hypervisor_type, created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at;
  RETURN NULL;
END $$;
CREATE FUNCTION app_vms() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' OR NEW.status = 'deleted' THEN
    DELETE FROM app.vms WHERE id = OLD.id; RETURN NULL;
  END IF;
  INSERT INTO app.vms (id, name, state, cpu_cores, memory_mb, disk_size_gb, node_id, tenant_id, owner_id, ip_address, created_at, updated_at)
  VALUES (NEW.id, NEW.name,
          (CASE WHEN NEW.status IN ('creating', 'running', 'stopped', 'paused', 'migrating') THEN NEW.status ELSE 'error' END)::app.vm_state,
          (NEW.resources->>'cpu_cores')::integer, (NEW.resources->>'memory_mb')::integer,
          (NEW.resources->>'disk_gb')::integer, NEW.hypervisor_id,
          COALESCE((SELECT u.tenant_id FROM app.users u WHERE u.id = NEW.owner_id),
                   '00000000-0000-0000-0000-000000000001'::uuid),
          NEW.owner_id, (NEW.network_config->>'ip_address')::inet, NEW.created_at, NEW.updated_at)
  ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, state = EXCLUDED.state, cpu_cores = EXCLUDED.cpu_cores,
     memory_mb = EXCLUDED.memory_mb, disk_size_gb = EXCLUDED.disk_size_gb, node_id = EXCLUDED.node_id,
     tenant_id = EXCLUDED.tenant_id, owner_id = EXCLUDED.owner_id, ip_address = EXCLUDED.ip_address,
     created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at;
  RETURN NULL;
END $$;
CREATE TRIGGER app_users AFTER INSERT OR UPDATE OR DELETE ON public.users FOR EACH ROW EXECUTE FUNCTION app_users();
CREATE TRIGGER app_nodes AFTER INSERT OR UPDATE OR DELETE ON public.hypervisors FOR EACH ROW EXECUTE FUNCTION app_nodes();
CREATE TRIGGER app_vms AFTER INSERT OR UPDATE OR DELETE ON public.virtual_machines FOR EACH ROW EXECUTE FUNCTION app_vms();
ALTER TABLE public.users ENABLE ALWAYS TRIGGER app_users;
ALTER TABLE public.hypervisors ENABLE ALWAYS TRIGGER app_nodes;
ALTER TABLE public.virtual_machines ENABLE ALWAYS TRIGGER app_vms;
";

/// Runs one workload at `size`; `binary` is the release `shadowsync`. With `blind_first`, the
/// run without conflict detection goes before the one with it (repeated runs alternate, so that
/// neither pays for going first).
pub async fn run(workload: Workload, size: Size, binary: &Path, blind_first: bool) -> Outcome {
    let mut blue = Cluster::start("bench-blue").expect("blue");
    let mut green = Cluster::start("bench-green").expect("green");
    // An otherwise idle machine: no autovacuum worker may wake up during a timed run to process
    // what an earlier step wrote (the backlog on blue, the previous method's rows on green),
    // which would charge one method for another's work, at random.
    let idle = "autovacuum = off";
    blue.reconfigure(idle).expect("blue settings");
    let statements = std::env::var_os("BENCH_STATEMENTS").is_some();
    let profiling = "shared_preload_libraries = 'pg_stat_statements,auto_explain'\npg_stat_statements.track = all\nauto_explain.log_min_duration = '2ms'\nauto_explain.log_analyze = on\nauto_explain.sample_rate = 0.05";
    green
        .reconfigure(&if statements {
            format!("{idle}\n{profiling}")
        } else {
            idle.to_string()
        })
        .expect("green settings");
    blue.create_database(DB).unwrap();
    for db in ["native", DB, BLIND] {
        green.create_database(db).unwrap();
        if statements {
            green
                .psql(db, "CREATE EXTENSION pg_stat_statements")
                .unwrap();
        }
    }
    let publication = match workload {
        Workload::W2 | Workload::W2Moves => {
            blue.psql(DB, shadowsync::demo::BLUE_SCHEMA).unwrap();
            // Native: blue-shaped tables receiving the subscription, new tables in schema app.
            let blue_tables = shadowsync::demo::BLUE_SCHEMA
                .split("CREATE PUBLICATION")
                .next()
                .unwrap()
                .to_string();
            green.psql("native", &blue_tables).unwrap();
            green
                .psql(
                    "native",
                    &format!(
                        "CREATE SCHEMA app; SET search_path = app; {} RESET search_path; {W2_NATIVE_TRIGGERS}",
                        shadowsync::demo::GREEN_SCHEMA
                    ),
                )
                .unwrap();
            for db in [DB, BLIND] {
                green.psql(db, shadowsync::demo::GREEN_SCHEMA).unwrap();
            }
            "novacron_migration"
        }
        _ => {
            blue.psql(DB, W1_SCHEMA).unwrap();
            for db in ["native", DB, BLIND] {
                green.psql(db, W1_SCHEMA).unwrap();
                if workload == Workload::W3 {
                    green.psql(db, W3_INDEXES).unwrap();
                }
            }
            if size.preload > 0 {
                let preload = preload_sql(size.preload);
                blue.psql(DB, &preload).unwrap();
                // The preloaded rows are on both greens (an initial copy would have put them).
                for db in ["native", DB, BLIND] {
                    green.psql(db, &preload).unwrap();
                }
            }
            blue.psql(DB, "CREATE PUBLICATION bench_pub FOR TABLE w1")
                .unwrap();
            "bench_pub"
        }
    };
    // Slots first: the backlog is what they must catch up on.
    for slot in ["ceiling", "native", "shadowsync", BLIND] {
        blue.psql(
            DB,
            &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
        )
        .unwrap();
    }
    green
        .psql(
            "native",
            &format!(
                "CREATE SUBSCRIPTION native CONNECTION '{}' PUBLICATION {publication}
                 WITH (create_slot = false, slot_name = 'native', enabled = false, copy_data = false)",
                blue.dsn(DB)
            ),
        )
        .unwrap();

    let started = Instant::now();
    let rows = write_backlog(workload, size, &blue.dsn(DB)).await;
    let blue_client = connect(&blue.dsn(DB)).await;
    let end = lsn(&blue_client, "SELECT pg_current_wal_insert_lsn()::text").await;
    blue.psql(DB, "CHECKPOINT").unwrap();
    eprintln!(
        "{workload:?}: backlog written in {:.1}s ({rows} row changes, {} MiB of WAL)",
        started.elapsed().as_secs_f64(),
        (end - slot_confirmed(&blue_client, "ceiling").await) >> 20
    );

    // 1. Ceiling: the walsender decoding the backlog, nothing applied.
    let mut cmd = Command::new(blue.bin_dir().join("pg_recvlogical"));
    cmd.args([
        "-d",
        &blue.dsn(DB),
        "-S",
        "ceiling",
        "--start",
        "-f",
        "/dev/null",
    ])
    .args(["-o", "proto_version=1", "-o"])
    .arg(format!("publication_names={publication}"))
    .args(["-E", &shadowsync::lsn::Lsn::from_u64(end).to_string()])
    .stdout(Stdio::null());
    let meter = CpuMeter::start(&blue, &green);
    let (ceiling, _, tool, ok) = run_watched(cmd);
    let ceiling_cpu = meter.stop(&blue, &green, tool);
    assert!(ok, "pg_recvlogical failed");

    // 2. Native logical replication (from a checkpointed green, as the shadowsync runs below).
    green.psql("native", "CHECKPOINT").unwrap();
    let meter = CpuMeter::start(&blue, &green);
    let t = Instant::now();
    green
        .psql("native", "ALTER SUBSCRIPTION native ENABLE")
        .unwrap();
    while slot_confirmed(&blue_client, "native").await < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let native = t.elapsed();
    let native_cpu = meter.stop(&blue, &green, 0.0);
    green
        .psql("native", "ALTER SUBSCRIPTION native DISABLE")
        .unwrap();
    slot_released(&blue_client, "native").await;

    // 3. shadowsync, and 4. shadowsync without conflict detection (its own slot and database),
    // in the order asked. Each run starts from a checkpointed green, so that neither pays for
    // the other's dirty pages.
    let mut detecting = None;
    let mut blind = None;
    let order = if blind_first {
        [false, true]
    } else {
        [true, false]
    };
    for detect in order {
        let db = if detect { DB } else { BLIND };
        green.psql(db, "CHECKPOINT").unwrap();
        let meter = CpuMeter::start(&blue, &green);
        let (took, rss, tool) =
            run_shadowsync(binary, workload, &blue, &green, publication, db, detect);
        let cpu = meter.stop(&blue, &green, tool);
        slot_released(&blue_client, if detect { "shadowsync" } else { BLIND }).await;
        if detect {
            detecting = Some((took, rss, tool, cpu));
        } else {
            blind = Some((took, cpu));
        }
    }
    let (ours, rss, cpu, ours_cpu) = detecting.expect("ran");
    let (blind, blind_cpu) = blind.expect("ran");
    if statements {
        for db in ["native", DB] {
            print_statements(&green, db).await;
        }
        // Plans (with actual times) of a 5% sample of statements over 2 ms (auto_explain).
        let log = std::env::temp_dir().join(format!("bench-green-{workload:?}.log"));
        std::fs::write(&log, green.server_log()).unwrap();
        eprintln!("green's server log, with slow plans: {}", log.display());
    }

    verify(workload, &blue, &green).await;
    let timing = |method, d: Duration, cpu| Timing {
        method,
        seconds: d.as_secs_f64(),
        cpu,
    };
    Outcome {
        workload,
        size,
        rows,
        ceiling: timing("ceiling (pg_recvlogical)", ceiling, ceiling_cpu),
        native: timing(
            if workload.is_novacron() {
                "native subscription + triggers"
            } else {
                "native subscription"
            },
            native,
            native_cpu,
        ),
        shadowsync: timing("shadowsync run --drain", ours, ours_cpu),
        blind: timing("shadowsync, conflict detection off", blind, blind_cpu),
        shadowsync_peak_rss_kib: rss,
        shadowsync_cpu_seconds: cpu,
    }
}

/// With `BENCH_STATEMENTS=1`: green's most expensive statements in `db` (pg_stat_statements).
async fn print_statements(green: &Cluster, db: &str) {
    let client = connect(&green.dsn(db)).await;
    let rows = client
        .query(
            "SELECT calls, total_exec_time, rows,
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 150)
             FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             ORDER BY total_exec_time DESC LIMIT 12",
            &[],
        )
        .await
        .expect("pg_stat_statements");
    eprintln!("\ngreen statements in {db} (calls, total ms, rows, query):");
    for r in rows {
        let (calls, ms, n, q): (i64, f64, i64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        eprintln!("  {calls:>8} {ms:>10.1} {n:>9}  {q}");
    }
}

/// Green database and slot of the run without conflict detection.
const BLIND: &str = "blind";

/// `shadowsync run --drain` into green database `db` (slot `shadowsync`, or `blind` for that
/// database); returns its wall time, peak RSS and CPU time.
fn run_shadowsync(
    binary: &Path,
    workload: Workload,
    blue: &Cluster,
    green: &Cluster,
    publication: &str,
    db: &str,
    detect: bool,
) -> (Duration, u64, f64) {
    let slot = if db == BLIND { BLIND } else { "shadowsync" };
    let dir = std::env::temp_dir().join(format!("shadowsync-bench-{}-{db}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    let mut text = format!(
        "[blue]\ndsn = \"{}\"\nslot = \"{slot}\"\npublication = \"{publication}\"\n[green]\ndsn = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[conflicts]\ndetect = {detect}\n",
        blue.dsn(DB),
        green.dsn(db)
    );
    if workload.is_novacron() {
        let rules = dir.join("novacron.toml");
        std::fs::write(&rules, shadowsync::demo::RULES).unwrap();
        text.push_str(&format!(
            "[transforms]\nfiles = [\"{}\"]\n",
            rules.display()
        ));
    }
    std::fs::write(&config, text).unwrap();
    // BENCH_PERF=<file>: profile the first run with `perf record` (its CPU then includes perf's).
    let mut cmd = match std::env::var("BENCH_PERF") {
        Ok(out) if db == DB => {
            let mut c = Command::new("perf");
            c.args([
                "record",
                "-F",
                "1999",
                "--call-graph",
                "fp",
                "-o",
                &out,
                "--",
            ])
            .arg(binary);
            c
        }
        _ => Command::new(binary),
    };
    cmd.args(["run", "--drain", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let (took, rss, cpu, ok) = run_watched(cmd);
    assert!(ok, "shadowsync run --drain failed ({db})");
    let _ = std::fs::remove_dir_all(&dir);
    (took, rss, cpu)
}

/// Both greens equal blue (W2: equal each other, and hold every filtered row).
async fn verify(workload: Workload, blue: &Cluster, green: &Cluster) {
    match workload {
        Workload::W2 | Workload::W2Moves => {
            for table in ["users", "compute_nodes", "vms"] {
                let native = digest(&green.dsn("native"), &format!("app.{table}")).await;
                let ours = digest(&green.dsn(DB), &format!("public.{table}")).await;
                assert_eq!(
                    native, ours,
                    "{table}: shadowsync and native+triggers differ"
                );
            }
            let want = digest(
                &blue.dsn(DB),
                "(SELECT id FROM virtual_machines WHERE status <> 'deleted')",
            )
            .await
            .0;
            let got = digest(&green.dsn(DB), "(SELECT id FROM vms)").await.0;
            assert_eq!(want, got, "vms rows");
            for table in ["users", "compute_nodes", "vms"] {
                assert_eq!(
                    digest(&green.dsn(DB), table).await,
                    digest(&green.dsn(BLIND), table).await,
                    "{table}: runs with and without conflict detection differ"
                );
            }
        }
        _ => {
            let b = digest(&blue.dsn(DB), "w1").await;
            assert_eq!(
                b,
                digest(&green.dsn("native"), "w1").await,
                "native green differs"
            );
            assert_eq!(
                b,
                digest(&green.dsn(DB), "w1").await,
                "shadowsync green differs"
            );
            assert_eq!(
                b,
                digest(&green.dsn(BLIND), "w1").await,
                "shadowsync green (detection off) differs"
            );
        }
    }
}

/// Writes the backlog on blue; returns its row changes.
async fn write_backlog(workload: Workload, size: Size, dsn: &str) -> i64 {
    match workload {
        Workload::W4 => {
            let client = connect(dsn).await;
            let n = size.backlog;
            client
                .batch_execute(&format!(
                    "INSERT INTO w1 (id, name, descr, doc, n, status, ratio, flag, tag)
                     SELECT g, 'name-' || g, 'one huge transaction', jsonb_build_object('g', g), g, 'new',
                            g / 3.0, g % 2 = 0, 'tag-' || (g % 10)
                     FROM generate_series({}, {}) g",
                    size.preload + 1,
                    size.preload + n
                ))
                .await
                .unwrap();
            n
        }
        Workload::W2 | Workload::W2Moves => {
            let moves = if workload == Workload::W2Moves {
                W2_MOVES_PERCENT
            } else {
                0
            };
            let (stop, stopped) = shadowsync::shutdown::channel();
            let written = Arc::new(AtomicU64::new(0));
            let mut writers = Vec::new();
            for w in 0..4u64 {
                let (stop, written, dsn) = (stopped.clone(), written.clone(), dsn.to_string());
                writers.push(tokio::spawn(async move {
                    shadowsync::demo::workload_client_moving(&dsn, w, stop, written, moves)
                        .await
                        .unwrap()
                }));
            }
            while written.load(Ordering::Relaxed) < size.backlog as u64 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.fire();
            for w in writers {
                w.await.unwrap();
            }
            // Each NovaCron transaction changes about six rows.
            written.load(Ordering::Relaxed) as i64 * 6
        }
        Workload::W1 | Workload::W3 => {
            let clients = 4i64;
            let mut writers = Vec::new();
            for w in 0..clients {
                let client = connect(dsn).await;
                let (preload, txns) = (size.preload, size.backlog);
                writers.push(tokio::spawn(async move {
                    let insert = client
                        .prepare(
                            "INSERT INTO w1 (id, name, descr, doc, n, status, ratio, flag, tag)
                             VALUES ($1, 'new', 'backlog row', '{\"k\": 1}', 1, 'creating', 0.5, true, 'tag')",
                        )
                        .await
                        .unwrap();
                    let update = client
                        .prepare(
                            "UPDATE w1 SET status = 'running', n = n + 1, updated_at = now() WHERE id = $1",
                        )
                        .await
                        .unwrap();
                    let mut i = w;
                    while i < txns {
                        let id = preload + 1 + i;
                        client.batch_execute("BEGIN").await.unwrap();
                        client.execute(&insert, &[&id]).await.unwrap();
                        client
                            .execute(&update, &[&((id * 7919) % (preload + i + 1) + 1)])
                            .await
                            .unwrap();
                        client.batch_execute("COMMIT").await.unwrap();
                        i += clients;
                    }
                }));
            }
            for w in writers {
                w.await.unwrap();
            }
            2 * size.backlog
        }
    }
}

/// The release binary next to the running executable (target/release/shadowsync).
pub fn release_binary() -> PathBuf {
    // BENCH_BINARY: another build (e.g. one with frame pointers, for `BENCH_PERF`).
    if let Some(path) = std::env::var_os("BENCH_BINARY") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    let candidates = [
        exe.parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("shadowsync")),
        exe.parent().map(|p| p.join("shadowsync")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .expect("build the release binary first: cargo build --release")
}
