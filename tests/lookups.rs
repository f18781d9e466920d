//! Lookups stay true (issue 18): when a looked-up row changes, every green row that read it is
//! re-derived, set-based, in the same green transaction; `check` says how each lookup is kept;
//! `remap` re-derives on demand what the stream cannot see (green-only tables).

mod common;

use std::time::Duration;

use common::novacron::*;
use common::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A sidecar config file for the NovaCron pair (the example rules), listening on `listen`.
fn novacron_config(pair: &Pair, dir: &TestDir, listen: std::net::SocketAddr) -> std::path::PathBuf {
    let text = format!(
        "{}[transforms]\nfiles = [\"{}\"]\n",
        shadowsync::cluster::pipeline_config_toml(
            &pair.blue,
            &pair.green,
            DB,
            "test_slot",
            "novacron_migration",
            &listen.to_string()
        ),
        example("transforms/novacron.toml").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A user with 1,000 VMs moves tenant: the VMs follow (one statement re-derives them, see
/// `apply::writer::remap`), and green then equals the plan's SQL over blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_moving_tenant_takes_all_their_vms_in_one_statement() {
    init_logging();
    let (pair, config) = novacron();
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    let green = pair.green().await;
    blue.batch_execute(
        "INSERT INTO users (id, email, name) VALUES (1, 'a@acme.example', 'a'), (2, 'b@acme.example', 'b');
         INSERT INTO hypervisors (id, hostname) VALUES (1, 'hv1');
         INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id)
              SELECT g, 'vm' || g, 1 + (g > 1000)::int, 1 FROM generate_series(1, 1010) g;",
    )
    .await
    .unwrap();
    wait_for("the VMs", Duration::from_secs(60), || async {
        count(&green, "vms").await == 1010
    })
    .await;
    blue.batch_execute("UPDATE users SET email = 'a@globex.example' WHERE id = 1")
        .await
        .unwrap();
    let report = handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    assert!(report.drained);
    let moved = count(
        &green,
        "vms v JOIN tenants t ON t.id = v.tenant_id WHERE t.slug = 'globex.example'",
    )
    .await;
    assert_eq!(moved, 1000, "every VM of the user follows the user");
    assert_matches_plan(&pair).await;
}

/// `check` names how every lookup is kept: re-derived through the stored column, and the
/// green-only table that only `remap` re-derives; a reader without an index on the stored
/// column is warned about; `remap --table` re-derives after a green-only change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_explains_each_lookup_and_remap_follows_green_only_changes() {
    init_logging();
    let (pair, _config) = novacron();
    let dir = TestDir::new("lookups-check");
    let path = novacron_config(&pair, &dir, free_addr());
    let path = path.to_str().unwrap();
    let (code, out, err) = run_bin(&["check", "--config", path], Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains(
            "public.vms (tenant_id) re-derived on change of public.users via public.vms.owner_id"
        ),
        "{out}"
    );
    assert!(
        out.contains("tenants is not streamed from blue (green-only)")
            && out.contains("shadowsync remap --config <file> --table public.users"),
        "{out}"
    );
    assert!(
        !out.contains("no index on green's public.vms.owner_id"),
        "{out}"
    );
    pair.green.psql(DB, "DROP INDEX vms_owner").unwrap();
    let (_, out, _) = run_bin(&["check", "--config", path], Duration::from_secs(60)).await;
    assert!(
        out.contains("no index on green's public.vms.owner_id leads with that column"),
        "{out}"
    );

    // A green-only change: a new tenant for a domain users already have.
    let mut sidecar = Sidecar::run(&dir, "run", path.as_ref());
    sidecar.wait_ready(Duration::from_secs(60)).await;
    let blue = pair.blue().await;
    blue.batch_execute(
        "INSERT INTO users (id, email, name) VALUES (1, 'a@initech.example', 'a'), (2, 'b@acme.example', 'b');
         INSERT INTO hypervisors (id, hostname) VALUES (1, 'hv1');
         INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id)
              SELECT g, 'vm' || g, 1 + g % 2, 1 FROM generate_series(1, 500) g;",
    )
    .await
    .unwrap();
    let green = pair.green().await;
    wait_for("the VMs", Duration::from_secs(60), || async {
        count(&green, "vms").await == 500
    })
    .await;
    green
        .batch_execute(
            "INSERT INTO tenants (id, name, slug) VALUES ('00000000-0000-0000-0000-000000000004', 'Initech', 'initech.example')",
        )
        .await
        .unwrap();
    let (code, out, err) = run_bin(
        &[
            "remap",
            "--config",
            path,
            "--table",
            "users",
            "--chunk-rows",
            "1",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("public.users: 1 row re-derived"), "{out}");
    let (code, out, err) = run_bin(
        &[
            "remap",
            "--config",
            path,
            "--table",
            "vms",
            "--chunk-rows",
            "100",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("public.vms: 250 rows re-derived"), "{out}");
    sidecar.signal("TERM");
    sidecar.wait_exit(Duration::from_secs(30)).await;
    // The plan's SQL with the new tenant.
    pair.blue
        .psql(DB, &EXPECTED.replace(
            "('00000000-0000-0000-0000-000000000003', 'globex.example');",
            "('00000000-0000-0000-0000-000000000003', 'globex.example'), ('00000000-0000-0000-0000-000000000004', 'initech.example');",
        ))
        .unwrap();
    for table in ["users", "vms"] {
        assert_eq!(
            rows(&blue, &format!("expected.{table}")).await,
            rows(&green, &format!("public.{table}")).await,
            "{table}"
        );
    }
}

/// Under last-writer-wins, a VM whose tenant green changed after the owner moved on blue is
/// kept and the re-derivation recorded as a `remap_older` conflict; the others follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_green_edit_newer_than_the_move_is_kept_and_recorded() {
    init_logging();
    let (pair, config) = novacron();
    let handle = start_streaming(config.clone()).await;
    let blue = pair.blue().await;
    let green = pair.green().await;
    blue.batch_execute(
        "INSERT INTO users (id, email, name) VALUES (1, 'a@acme.example', 'a');
         INSERT INTO hypervisors (id, hostname) VALUES (1, 'hv1');
         INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id) VALUES (1, 'vm1', 1, 1), (2, 'vm2', 1, 1);",
    )
    .await
    .unwrap();
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    // Blue moves the user; then, before shadowsync applies it, green's application edits vm2.
    blue.batch_execute("UPDATE users SET email = 'a@globex.example' WHERE id = 1")
        .await
        .unwrap();
    green
        .batch_execute(
            "UPDATE vms SET tenant_id = '00000000-0000-0000-0000-000000000001', updated_at = clock_timestamp() WHERE id = 2",
        )
        .await
        .unwrap();
    let handle = start_streaming(config).await;
    handle.drain().await.unwrap();
    let shared = handle.shared.clone();
    handle.wait().await.unwrap();
    let slugs: Vec<(i64, String)> = green
        .query(
            "SELECT v.id, t.slug FROM vms v JOIN tenants t ON t.id = v.tenant_id ORDER BY v.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        slugs,
        vec![(1, "globex.example".into()), (2, "default".into())]
    );
    let recorded: Vec<(String, String, String)> = green
        .query(
            "SELECT kind, resolution, key::text FROM shadowsync.conflicts WHERE target_table = 'public.vms'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        recorded,
        vec![("remap_older".into(), "keep".into(), "{\"id\": 2}".into())]
    );
    assert!(
        shared.encode().contains(
            "shadowsync_conflicts_total{table=\"public.vms\",kind=\"remap_older\",resolution=\"keep\"} 1"
        ),
        "the conflict is counted"
    );
}

/// One random step of the lookup workload: users moving tenant, users deleted with their VMs'
/// owner cleared (as `ON DELETE SET NULL` does), a VM created and its owner moved in one
/// transaction, VMs changing owner; plus the ordinary NovaCron workload.
async fn lookup_step(client: &mut tokio_postgres::Client, rng: &mut StdRng, users: i64) {
    const DOMAINS: [&str; 3] = ["acme.example", "globex.example", "elsewhere.example"];
    let domain = DOMAINS[rng.random_range(0..DOMAINS.len())];
    let tx = client.transaction().await.unwrap();
    // An existing user, picked by the seeded generator.
    let pick = |n: i64| n % users.max(1);
    let user: i64 = tx
        .query_one(
            "SELECT id FROM users ORDER BY id OFFSET $1 % greatest((SELECT count(*) FROM users), 1) LIMIT 1",
            &[&pick(rng.random_range(0..1_000_000i64))],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(1);
    match rng.random_range(0..6) {
        0 | 1 => {
            tx.execute(
                "UPDATE users SET email = 'u' || id || '@' || $2, updated_at = now() WHERE id = $1",
                &[&user, &domain],
            )
            .await
            .unwrap();
        }
        2 => {
            tx.execute("DELETE FROM api_keys WHERE user_id = $1", &[&user])
                .await
                .unwrap();
            tx.execute("DELETE FROM users WHERE id = $1", &[&user])
                .await
                .unwrap();
            // Re-created at once, so the id keeps being used.
            tx.execute(
                "INSERT INTO users (id, email, name) VALUES ($1, 'u' || $1::bigint || '@' || $2, 'again')",
                &[&user, &domain],
            )
            .await
            .unwrap();
        }
        3 => {
            let vm = 100_000 + rng.random_range(0..1_000_000i64);
            tx.execute(
                "INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id) VALUES ($1, 'vm', $2, (SELECT min(id) FROM hypervisors))
                 ON CONFLICT (id) DO NOTHING",
                &[&vm, &user],
            )
            .await
            .unwrap();
            tx.execute(
                "UPDATE users SET email = 'u' || id || '@' || $2 WHERE id = $1",
                &[&user, &domain],
            )
            .await
            .unwrap();
        }
        4 => {
            let other: i64 = tx
                .query_one(
                    "SELECT id FROM users ORDER BY id OFFSET $1 % greatest((SELECT count(*) FROM users), 1) LIMIT 1",
                    &[&pick(rng.random_range(0..1_000_000i64))],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(user);
            tx.execute(
                "UPDATE virtual_machines SET owner_id = $2 WHERE id IN (SELECT id FROM virtual_machines WHERE owner_id = $1 LIMIT 3)",
                &[&user, &other],
            )
            .await
            .unwrap();
        }
        _ => {
            tx.execute(
                "DELETE FROM users WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM api_keys WHERE user_id = $1)",
                &[&user],
            )
            .await
            .unwrap();
        }
    }
    tx.commit().await.unwrap();
}

/// The randomized workload with SIGKILLs of the sidecar in between: after the drain, green
/// equals the migration plan's SQL over blue's final state, table by table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_tenant_moves_with_kills_end_as_the_plan_says() {
    init_logging();
    let seed = seed("random_tenant_moves_with_kills_end_as_the_plan_says");
    let mut rng = StdRng::seed_from_u64(seed);
    let (pair, _config) = novacron();
    // As the plan's schema would have it for deletes of users that own VMs.
    pair.blue
        .psql(
            DB,
            "ALTER TABLE virtual_machines DROP CONSTRAINT virtual_machines_owner_id_fkey,
               ADD FOREIGN KEY (owner_id) REFERENCES users (id) ON DELETE SET NULL;",
        )
        .unwrap();
    let dir = TestDir::new("lookups-random");
    let path = novacron_config(&pair, &dir, free_addr());
    let mut blue = pair.blue().await;
    novacron_workload(&mut blue, &mut rng, 300).await;
    let users: i64 = blue
        .query_one("SELECT coalesce(max(id), 1) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    for round in 0..4 {
        let mut sidecar = Sidecar::run(&dir, &format!("run{round}"), &path);
        let steps = rng.random_range(100..300);
        for _ in 0..steps {
            lookup_step(&mut blue, &mut rng, users).await;
        }
        novacron_workload_from(&mut blue, &mut rng, 10_000 * (round + 1), 50).await;
        // Killed at a random moment of its catch-up.
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        sidecar.kill();
    }
    let config = shadowsync::config::Config::load(&path).unwrap();
    let handle = start_streaming(config).await;
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    assert_matches_plan(&pair).await;
}

/// Without a foreign key on blue, a VM may name an owner that does not exist yet: when the user
/// is inserted later, the VM is re-derived (with the key, blue rules that out, and inserted
/// users re-derive nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_inserted_after_its_vm_re_derives_it_without_a_foreign_key() {
    init_logging();
    let (pair, config) = novacron();
    pair.blue
        .psql(
            DB,
            "ALTER TABLE virtual_machines DROP CONSTRAINT virtual_machines_owner_id_fkey",
        )
        .unwrap();
    let handle = start_streaming(config.clone()).await;
    let blue = pair.blue().await;
    blue.batch_execute(
        "INSERT INTO hypervisors (id, hostname) VALUES (1, 'hv1');
         INSERT INTO virtual_machines (id, name, owner_id, hypervisor_id) VALUES (1, 'vm1', 77, 1);",
    )
    .await
    .unwrap();
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    let green = pair.green().await;
    let handle = start_streaming(config).await;
    blue.batch_execute("INSERT INTO users (id, email, name) VALUES (77, 'x@acme.example', 'x')")
        .await
        .unwrap();
    handle.drain().await.unwrap();
    handle.wait().await.unwrap();
    let slug: String = green
        .query_one(
            "SELECT t.slug FROM vms v JOIN tenants t ON t.id = v.tenant_id WHERE v.id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slug, "acme.example");
}
