//! The NovaCron example end to end: schemas, the example rules, the plan's own transformation
//! SQL as the expected result, and a random workload.
#![allow(dead_code)]

use std::path::PathBuf;

use rand::RngExt;
use rand::rngs::StdRng;
use shadowsync::config::Config;

use super::*;

pub fn example(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file)
}

pub fn read(file: &str) -> String {
    std::fs::read_to_string(example(file)).expect("example file")
}

/// Blue and green with the NovaCron schemas, and a config using the example rules.
pub fn novacron() -> (Pair, Config) {
    let blue = shadowsync::cluster::Cluster::start("blue").expect("blue");
    let green = shadowsync::cluster::Cluster::start("green").expect("green");
    blue.create_database(DB).unwrap();
    green.create_database(DB).unwrap();
    blue.psql(DB, &read("transforms/novacron-blue.sql"))
        .unwrap();
    green
        .psql(DB, &read("transforms/novacron-green.sql"))
        .unwrap();
    let pair = Pair { blue, green };
    let mut config = shadowsync::cluster::pipeline_config(
        &pair.blue,
        &pair.green,
        DB,
        "test_slot",
        "novacron_migration",
    );
    config.transforms.files = vec![example("transforms/novacron.toml").display().to_string()];
    (pair, config)
}

/// The plan's transformation SQL, run on blue's final state into a scratch schema `expected`
/// shaped like green.
pub const EXPECTED: &str = "
DROP SCHEMA IF EXISTS expected CASCADE;
CREATE SCHEMA expected;
CREATE TYPE expected.node_status AS ENUM ('online', 'offline', 'maintenance', 'error');
CREATE TYPE expected.vm_state AS ENUM ('creating', 'running', 'stopped', 'paused', 'migrating', 'error', 'deleting');
CREATE TABLE expected.tenants (id uuid, slug text);
INSERT INTO expected.tenants VALUES
    ('00000000-0000-0000-0000-000000000001', 'default'),
    ('00000000-0000-0000-0000-000000000002', 'acme.example'),
    ('00000000-0000-0000-0000-000000000003', 'globex.example');
CREATE TABLE expected.users AS
SELECT u.id, u.email, u.name,
       COALESCE((SELECT t.id FROM expected.tenants t WHERE t.slug = split_part(u.email, '@', 2)),
                '00000000-0000-0000-0000-000000000001'::uuid) AS tenant_id,
       u.created_at, u.updated_at
  FROM public.users u;
CREATE TABLE expected.compute_nodes AS
SELECT h.id, h.hostname AS name, h.hostname,
       (CASE WHEN h.status = 'active' THEN 'online' WHEN h.status = 'inactive' THEN 'offline'
             ELSE 'maintenance' END)::expected.node_status AS status,
       (h.capacity->>'cpu_cores')::integer AS cpu_cores,
       (h.capacity->>'memory_mb')::bigint AS memory_total,
       h.type::varchar(50) AS hypervisor_type, '{}'::jsonb AS tags, h.created_at, h.updated_at
  FROM public.hypervisors h;
CREATE TABLE expected.vms AS
SELECT vm.id, vm.name,
       (CASE WHEN vm.status IN ('creating', 'running', 'stopped', 'paused', 'migrating') THEN vm.status
             ELSE 'error' END)::expected.vm_state AS state,
       (vm.resources->>'cpu_cores')::integer AS cpu_cores,
       (vm.resources->>'memory_mb')::integer AS memory_mb,
       (vm.resources->>'disk_gb')::integer AS disk_size_gb,
       vm.hypervisor_id AS node_id,
       COALESCE(u.tenant_id, '00000000-0000-0000-0000-000000000001'::uuid) AS tenant_id,
       vm.owner_id,
       (vm.network_config->>'ip_address')::inet AS ip_address,
       vm.created_at, vm.updated_at
  FROM public.virtual_machines vm
  LEFT JOIN expected.users u ON vm.owner_id = u.id
 WHERE vm.status <> 'deleted';
CREATE TABLE expected.api_keys AS SELECT * FROM public.api_keys;
";

pub async fn assert_matches_plan(pair: &Pair) {
    pair.blue.psql(DB, EXPECTED).unwrap();
    let blue = pair.blue().await;
    let green = pair.green().await;
    for table in ["users", "compute_nodes", "vms", "api_keys"] {
        let want = rows(&blue, &format!("expected.{table}")).await;
        let got = rows(&green, &format!("public.{table}")).await;
        if want != got {
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(3).collect();
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).take(3).collect();
            panic!(
                "{table}: the plan's SQL gives {} rows, green has {}\nmissing in green: {missing:?}\nunexpected in green: {extra:?}",
                want.len(),
                got.len()
            );
        }
    }
    let audit = count(&green, "pg_tables WHERE tablename = 'audit_log'").await;
    assert_eq!(audit, 0, "audit_log is skipped, green has no such table");
    assert_no_conflicts(&green).await;
}

const VM_STATUSES: [&str; 8] = [
    "creating",
    "running",
    "stopped",
    "paused",
    "migrating",
    "deleted",
    "exploded",
    "deleting",
];
const DOMAINS: [&str; 3] = ["acme.example", "globex.example", "elsewhere.example"];

/// A random NovaCron workload: users and their VMs created in one transaction (the lookup must
/// see the new user), hypervisors in every status, VMs moving in and out of the filter.
pub async fn novacron_workload(client: &mut tokio_postgres::Client, rng: &mut StdRng, txns: usize) {
    novacron_workload_from(client, rng, 0, txns).await
}

/// [`novacron_workload`] with ids from `first` (for concurrent workloads).
pub async fn novacron_workload_from(
    client: &mut tokio_postgres::Client,
    rng: &mut StdRng,
    first: i64,
    txns: usize,
) {
    for i in first..first + txns as i64 {
        let tx = client.transaction().await.unwrap();
        match rng.random_range(0..10) {
            0..=2 => {
                let domain = DOMAINS[rng.random_range(0..DOMAINS.len())];
                tx.execute(
                    "INSERT INTO users (id, email, name) VALUES ($1, $2, 'n')",
                    &[&i, &format!("u{i}@{domain}")],
                )
                .await
                .unwrap();
                tx.execute(
                    "INSERT INTO hypervisors (id, hostname, status, type, capacity) VALUES ($1, $2, $3, 'kvm',
                       jsonb_build_object('cpu_cores', $4::int, 'memory_mb', 65536))",
                    &[&i, &format!("hv{i}"), &["active", "inactive", "weird"][rng.random_range(0..3)], &rng.random_range(1..64i32)],
                )
                .await
                .unwrap();
                let status = VM_STATUSES[rng.random_range(0..VM_STATUSES.len())];
                tx.execute(
                    "INSERT INTO virtual_machines (id, name, status, owner_id, hypervisor_id, resources, network_config)
                     VALUES ($1, $2, $3, $1, $1, jsonb_build_object('cpu_cores', 2, 'memory_mb', 2048, 'disk_gb', 20),
                             jsonb_build_object('ip_address', '10.0.' || ($1::bigint % 250) || '.1'))",
                    &[&i, &format!("vm{i}"), &status],
                )
                .await
                .unwrap();
                tx.execute(
                    "INSERT INTO api_keys (id, user_id, key_hash) VALUES ($1, $1, $2)",
                    &[&i, &format!("hash{i}")],
                )
                .await
                .unwrap();
            }
            3..=6 => {
                // Status changes move VMs into and out of the filter.
                let status = VM_STATUSES[rng.random_range(0..VM_STATUSES.len())];
                tx.execute(
                    "UPDATE virtual_machines SET status = $2, updated_at = now() WHERE id = $1",
                    &[&rng.random_range(first..=i), &status],
                )
                .await
                .unwrap();
            }
            7 => {
                tx.execute(
                    "UPDATE hypervisors SET status = $2, capacity = capacity || '{\"cpu_cores\": 96}' WHERE id = $1",
                    &[&rng.random_range(first..=i), &["active", "inactive", "drained"][rng.random_range(0..3)]],
                )
                .await
                .unwrap();
            }
            8 => {
                tx.execute(
                    "INSERT INTO audit_log (action, details) VALUES ('touch', jsonb_build_object('i', $1::bigint))",
                    &[&i],
                )
                .await
                .unwrap();
            }
            _ => {
                let id = rng.random_range(first..=i);
                tx.execute("DELETE FROM api_keys WHERE user_id = $1", &[&id])
                    .await
                    .unwrap();
                tx.execute("DELETE FROM virtual_machines WHERE id = $1", &[&id])
                    .await
                    .unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
}
