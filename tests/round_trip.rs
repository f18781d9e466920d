//! `shadowsync check --round-trip`: the NovaCron forward rules and inverse rules on a seeded
//! blue, through the real binary: lossless columns reported unchanged, lossy ones with counts,
//! ignored green columns, no sampled value in the output, the JSON shape; a failing inverse
//! expression and a lossy key fail naming the table and column.

mod common;

use std::time::Duration;

use common::novacron::{example, novacron};
use common::*;

/// Blue's rows: hypervisors in every status (`retired` becomes `maintenance` on green and comes
/// back as `maintenance`), a few with a capacity key green has no column for, VMs in and out of
/// the forward filter, some in a status green folds into `error`. Values carry the marker
/// `SECRET` so that the output can be searched for them.
const SEED: &str = "
INSERT INTO users (id, email, name)
SELECT i, 'u' || i || '@' || (ARRAY['acme.example', 'globex.example', 'elsewhere.example'])[1 + i % 3],
       'SECRET-name-' || i
  FROM generate_series(1, 60) i;
INSERT INTO hypervisors (id, hostname, status, type, capacity)
SELECT i, 'SECRET-host-' || i,
       CASE WHEN i % 10 = 0 THEN 'retired' WHEN i % 2 = 0 THEN 'inactive' ELSE 'active' END,
       'kvm',
       CASE WHEN i % 25 = 0 THEN jsonb_build_object('cpu_cores', i, 'memory_mb', 1024 * i, 'gpu', 'SECRET-gpu')
            ELSE jsonb_build_object('cpu_cores', i, 'memory_mb', 1024 * i) END
  FROM generate_series(1, 50) i;
INSERT INTO virtual_machines (id, name, status, owner_id, hypervisor_id, resources, network_config)
SELECT i, 'SECRET-vm-' || i,
       CASE WHEN i % 5 = 0 THEN 'deleted' WHEN i % 7 = 0 THEN 'exploded' ELSE 'running' END,
       1 + i % 60, 1 + i % 50,
       jsonb_build_object('cpu_cores', 2, 'memory_mb', 2048, 'disk_gb', 20),
       jsonb_build_object('ip_address', '10.0.' || (i % 250) || '.1')
  FROM generate_series(1, 70) i;
INSERT INTO api_keys (id, user_id, key_hash)
SELECT i, i, 'SECRET-hash-' || i FROM generate_series(1, 30) i;
ANALYZE;
";

/// Test-only inverse rules (green -> blue) of the NovaCron migration: users lose their tenant,
/// compute nodes give back status, type and capacity, VMs their status, resources and network.
/// Once the `reverse` branch is merged, `include_str!("../transforms/novacron-reverse.toml")`
/// replaces them: every assertion below holds for those rules too (checked on a merge of both
/// branches), and the edits of the failing cases apply to their text as well.
/// The shipped inverse rules (the rollback stream's).
const INVERSE: &str = include_str!("../transforms/novacron-reverse.toml");

/// The forward config (the example rules) and a reverse config with `inverse` as its rules,
/// written to `dir`.
fn configs(pair: &Pair, dir: &TestDir, inverse: &str) -> (String, String) {
    let listen = free_addr();
    let forward = write_config(
        pair,
        dir,
        listen,
        &format!(
            "[transforms]\nfiles = [\"{}\"]",
            example("transforms/novacron.toml").display()
        ),
    );
    let forward_text = std::fs::read_to_string(&forward)
        .unwrap()
        .replace("test_pub", "novacron_migration");
    let forward = dir.join("forward.toml");
    std::fs::write(&forward, forward_text).unwrap();
    let rules = dir.join("inverse-rules.toml");
    std::fs::write(&rules, inverse).unwrap();
    let reverse = dir.join("reverse.toml");
    std::fs::write(
        &reverse,
        format!(
            "[blue]\ndsn = \"{}\"\nslot = \"novacron_reverse\"\npublication = \"novacron_reverse\"\n[green]\ndsn = \"{}\"\n[metrics]\nlisten = \"{}\"\n[transforms]\nfiles = [\"{}\"]\n",
            pair.green.dsn(DB),
            pair.blue.dsn(DB),
            free_addr(),
            rules.display()
        ),
    )
    .unwrap();
    (forward.display().to_string(), reverse.display().to_string())
}

async fn round_trip(forward: &str, reverse: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec!["check", "--config", forward, "--round-trip", reverse];
    args.extend(extra);
    run_bin(&args, Duration::from_secs(60)).await
}

/// The JSON report of one table pair.
fn table<'a>(report: &'a serde_json::Value, source: &str) -> &'a serde_json::Value {
    report["round_trip"]["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["source"] == source)
        .unwrap_or_else(|| panic!("{source} in {report:#}"))
}

fn names(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|n| n.as_str().expect("a name"))
        .collect()
}

fn lossy(t: &serde_json::Value, column: &str) -> Option<u64> {
    t["lossy"]
        .as_array()
        .expect("lossy")
        .iter()
        .find(|l| l["column"] == column)
        .map(|l| l["changed"].as_u64().expect("a count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn novacron_round_trip_reports_what_survives() {
    init_logging();
    let (pair, _) = novacron();
    pair.blue.psql(DB, SEED).unwrap();
    let dir = TestDir::new("round-trip");
    let (forward, reverse) = configs(&pair, &dir, INVERSE);
    let blue = pair.blue().await;
    let green = pair.green().await;
    let before = (
        rows(&blue, "hypervisors").await,
        count(&green, "pg_class").await,
        count(&blue, "pg_class").await,
    );

    let (code, out, err) = round_trip(&forward, &reverse, &["--json"]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        !out.contains("SECRET") && !err.contains("SECRET"),
        "a sampled value is shown:\n{out}\n{err}"
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["round_trip"]["sample"], 1000);

    let hv = table(&report, "public.hypervisors");
    assert_eq!(hv["target"], "public.compute_nodes");
    assert_eq!(hv["status"], "lossy");
    assert_eq!(hv["sampled"], 50);
    assert_eq!(hv["compared"], 50);
    assert_eq!(hv["evaluated"], true);
    // 'retired' comes back as 'maintenance'; the gpu key has no green column.
    assert_eq!(lossy(hv, "status"), Some(5), "{hv:#}");
    assert_eq!(lossy(hv, "capacity"), Some(2), "{hv:#}");
    let unchanged = names(&hv["unchanged"]);
    for c in ["id", "hostname", "type", "created_at", "updated_at"] {
        assert!(unchanged.contains(&c), "{c} unchanged: {hv:#}");
    }
    let ignored = names(&hv["ignored"]);
    assert!(
        ignored.contains(&"name") && ignored.contains(&"tags"),
        "{hv:#}"
    );

    let users = table(&report, "public.users");
    assert_eq!(users["status"], "unchanged", "{users:#}");
    assert_eq!(names(&users["ignored"]), ["tenant_id"]);
    assert_eq!(users["sampled"], 60);

    let vms = table(&report, "public.virtual_machines");
    assert_eq!(vms["status"], "lossy", "{vms:#}");
    assert_eq!(vms["sampled"], 70);
    assert_eq!(
        vms["not_in_green"], 14,
        "the deleted VMs stay out of green: {vms:#}"
    );
    assert_eq!(vms["compared"], 56);
    // 'exploded' comes back as 'error' (i % 7 = 0 and not i % 5 = 0: 8 rows).
    assert_eq!(lossy(vms, "status"), Some(8), "{vms:#}");
    assert_eq!(names(&vms["ignored"]), ["tenant_id"]);
    let unchanged = names(&vms["unchanged"]);
    for c in [
        "id",
        "name",
        "owner_id",
        "hypervisor_id",
        "resources",
        "network_config",
    ] {
        assert!(unchanged.contains(&c), "{c} unchanged: {vms:#}");
    }

    let keys = table(&report, "public.api_keys");
    assert_eq!(keys["status"], "unchanged", "{keys:#}");
    assert!(names(&keys["ignored"]).is_empty());
    assert_eq!(table(&report, "public.audit_log")["status"], "skipped");

    // The text form says the same, without values either.
    let (code, text, err) = round_trip(&forward, &reverse, &["--sample", "20"]).await;
    assert_eq!(code, Some(0), "stdout:\n{text}\nstderr:\n{err}");
    assert!(!text.contains("SECRET"), "{text}");
    assert!(text.contains("up to 20 rows"), "{text}");
    assert!(
        text.contains(" public.hypervisors -> public.compute_nodes -> public.hypervisors ("),
        "{text}"
    );
    assert!(
        text.contains("green columns the inverse ignores: tenant_id"),
        "{text}"
    );
    assert!(text.contains("20 rows sampled"), "{text}");

    // An inverse that leaves a blue column out: listed as not produced (blue's default on
    // insert); a table emptied on blue: nothing compared, no column claimed unchanged.
    let partial = INVERSE.replace(
        "resources = \"jsonb_build_object('cpu_cores', cpu_cores, 'memory_mb', memory_mb, 'disk_gb', disk_size_gb)\"",
        "",
    );
    assert_ne!(partial, INVERSE);
    pair.blue.psql(DB, "DELETE FROM api_keys").unwrap();
    let (_, reverse_partial) = configs(&pair, &dir, &partial);
    let (code, out, err) = round_trip(&forward, &reverse_partial, &["--json"]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let vms = table(&report, "public.virtual_machines");
    assert_eq!(names(&vms["not_produced"]), ["resources"], "{vms:#}");
    assert!(!names(&vms["unchanged"]).contains(&"resources"), "{vms:#}");
    let keys = table(&report, "public.api_keys");
    assert_eq!(keys["sampled"], 0);
    assert_eq!(keys["status"], "skipped");
    assert!(names(&keys["unchanged"]).is_empty(), "{keys:#}");
    assert!(keys["notes"].to_string().contains("empty"), "{keys:#}");
    let (code, _, err) = round_trip(&forward, &reverse, &["--sample", "0"]).await;
    assert_eq!(code, Some(2), "--sample 0 is refused: {err}");

    // Nothing was left behind on either side.
    let after = (
        rows(&blue, "hypervisors").await,
        count(&green, "pg_class").await,
        count(&blue, "pg_class").await,
    );
    assert_eq!(before, after);
    assert_eq!(count(&blue, "pg_replication_slots").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_inverse_or_a_lossy_key_fails_naming_the_column() {
    init_logging();
    let (pair, _) = novacron();
    pair.blue.psql(DB, SEED).unwrap();
    let dir = TestDir::new("round-trip-fail");

    // Green's memory_total (bigint) does not fit blue's integer for large hypervisors: fails
    // only on real rows, with the server's message, never the value.
    let broken = INVERSE.replace(
        "'memory_mb', memory_total)",
        "'memory_mb', (memory_total * 1000000)::integer)",
    );
    let (forward, reverse) = configs(&pair, &dir, &broken);
    let (code, out, err) = round_trip(&forward, &reverse, &[]).await;
    assert_ne!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        !out.contains("SECRET") && !err.contains("SECRET"),
        "{out}\n{err}"
    );
    let line = out
        .lines()
        .find(|l| l.contains("inverse column capacity"))
        .unwrap_or_else(|| panic!("the failing column is named:\n{out}"));
    assert!(line.contains("inverse-rules.toml:"), "{line}");
    assert!(
        line.contains("public.compute_nodes -> public.hypervisors"),
        "{line}"
    );
    assert!(line.contains("integer out of range"), "{line}");
    assert!(out.contains("FAIL public.hypervisors"), "{out}");
    assert!(out.contains("50 rows sampled, not compared"), "{out}");
    assert!(err.contains("the round trip fails"), "{err}");

    // A key that does not come back: the reverse stream could not match rows.
    let shifted = INVERSE.replace(
        "hypervisor_id = \"node_id\"",
        "hypervisor_id = \"node_id\"\nid = \"id + 1000\"",
    );
    let (forward, reverse) = configs(&pair, &dir, &shifted);
    let (code, out, err) = round_trip(&forward, &reverse, &["--json"]).await;
    assert_ne!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["ok"], false);
    let vms = table(&report, "public.virtual_machines");
    assert_eq!(vms["status"], "failed", "{vms:#}");
    let id = vms["lossy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["column"] == "id")
        .expect("id is lossy");
    assert_eq!(id["key"], true);
    assert_eq!(id["changed"], 56);
    let problems = vms["problems"].to_string();
    assert!(problems.contains("KEY column id"), "{problems}");
    assert!(problems.contains("could not match"), "{problems}");
    // The other pairs are still reported.
    assert_eq!(table(&report, "public.users")["status"], "unchanged");

    // A rule that would write (here: advance a sequence) is refused by the read-only
    // transaction, and nothing moves.
    let seq = "SELECT last_value::text FROM hypervisors_id_seq";
    let before = pair.blue.psql(DB, seq).unwrap();
    let writing = INVERSE.replace(
        "type = \"hypervisor_type\"",
        "type = \"nextval('hypervisors_id_seq')::text\"",
    );
    let (forward, reverse) = configs(&pair, &dir, &writing);
    let (code, out, err) = round_trip(&forward, &reverse, &[]).await;
    assert_ne!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains("inverse column type"))
        .unwrap_or_else(|| panic!("the writing column is named:\n{out}"));
    assert!(line.contains("read-only transaction"), "{line}");
    assert_eq!(pair.blue.psql(DB, seq).unwrap(), before);

    // A blue value the forward rule cannot convert: the forward column is named, the server's
    // message is given with the value redacted.
    pair.blue
        .psql(
            DB,
            "INSERT INTO hypervisors (id, hostname, capacity) VALUES (99, 'h99', '{\"cpu_cores\": \"SECRET-many\"}')",
        )
        .unwrap();
    let (forward, reverse) = configs(&pair, &dir, INVERSE);
    let (code, out, err) = round_trip(&forward, &reverse, &[]).await;
    assert_ne!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        !out.contains("SECRET") && !err.contains("SECRET"),
        "{out}\n{err}"
    );
    let line = out
        .lines()
        .find(|l| l.contains("forward column cpu_cores"))
        .unwrap_or_else(|| panic!("the failing forward column is named:\n{out}"));
    assert!(line.contains("novacron.toml:"), "{line}");
    assert!(
        line.contains("public.hypervisors -> public.compute_nodes"),
        "{line}"
    );
    assert!(
        line.contains("invalid input syntax for type integer"),
        "{line}"
    );
}

/// The inverse is evaluated on blue, in blue's types: a blue-only enum named by the inverse
/// rule works (green has no such type), and green's enum arrives on blue as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inverse_is_evaluated_in_blues_types() {
    init_logging();
    let pair = Pair::start("");
    pair.blue
        .psql(
            DB,
            "CREATE TYPE hv_state AS ENUM ('up', 'down', 'retired');
             CREATE TABLE nodes (id int PRIMARY KEY, state hv_state NOT NULL);
             INSERT INTO nodes SELECT i, (ARRAY['up', 'down', 'retired'])[1 + i % 3]::hv_state
               FROM generate_series(1, 30) i;
             CREATE PUBLICATION test_pub FOR TABLE nodes;",
        )
        .unwrap();
    pair.green
        .psql(
            DB,
            "CREATE TYPE node_state AS ENUM ('online', 'offline');
             CREATE TABLE nodes (id int PRIMARY KEY, state node_state NOT NULL);",
        )
        .unwrap();
    let dir = TestDir::new("round-trip-types");
    let forward_rules = dir.join("forward-rules.toml");
    std::fs::write(
        &forward_rules,
        "[[table]]\nsource = \"public.nodes\"\n[table.columns]\nstate = \"(CASE state WHEN 'up' THEN 'online' ELSE 'offline' END)::node_state\"\n",
    )
    .unwrap();
    let forward = write_config(
        &pair,
        &dir,
        free_addr(),
        &format!("[transforms]\nfiles = [\"{}\"]", forward_rules.display()),
    );
    let inverse_rules = dir.join("inverse-rules.toml");
    std::fs::write(
        &inverse_rules,
        "[[table]]\nsource = \"public.nodes\"\n[table.columns]\nstate = \"(CASE state WHEN 'online' THEN 'up' ELSE 'down' END)::hv_state\"\n",
    )
    .unwrap();
    let reverse = dir.join("reverse.toml");
    std::fs::write(
        &reverse,
        format!(
            "[blue]\ndsn = \"{}\"\nslot = \"back\"\npublication = \"back\"\n[green]\ndsn = \"{}\"\n[metrics]\nlisten = \"{}\"\n[transforms]\nfiles = [\"{}\"]\n",
            pair.green.dsn(DB),
            pair.blue.dsn(DB),
            free_addr(),
            inverse_rules.display()
        ),
    )
    .unwrap();
    let (forward, reverse) = (forward.display().to_string(), reverse.display().to_string());
    let (code, out, err) = round_trip(&forward, &reverse, &["--json"]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let nodes = table(&report, "public.nodes");
    assert_eq!(nodes["compared"], 30, "{nodes:#}");
    assert_eq!(names(&nodes["unchanged"]), ["id"], "{nodes:#}");
    // 'retired' (i % 3 = 2) goes offline and comes back down.
    assert_eq!(lossy(nodes, "state"), Some(10), "{nodes:#}");
}
