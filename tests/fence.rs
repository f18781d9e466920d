//! The cutover's fence on blue (`fence`): writers already connected are refused, a replica-role
//! session cannot skip it, reads go on, a transaction in flight either commits before the
//! fence's LSN or holds the fence back until the lock timeout (then nothing is fenced), a user
//! without the rights is told which, and removing it lets writes resume.

mod common;

use std::time::Duration;

use common::*;
use shadowsync::fence;
use shadowsync::transform::QualifiedName;

const SCHEMA: &str = "
CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL);
CREATE TABLE \"VMs\" (id bigserial PRIMARY KEY, owner bigint);
";

fn tables() -> Vec<QualifiedName> {
    vec![
        QualifiedName::new("public", "users"),
        QualifiedName::new("public", "VMs"),
    ]
}

/// The SQLSTATE and message of a refused write.
async fn refused(client: &tokio_postgres::Client, sql: &str) -> (String, String) {
    let e = client
        .batch_execute(sql)
        .await
        .expect_err("the write is refused");
    let db = e.as_db_error().expect("a server error");
    (db.code().code().to_string(), db.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fence_stops_every_writer_and_no_reader_and_comes_off() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    let operator = pair.blue().await;
    // An application session connected before the fence.
    let app = pair.blue().await;
    app.batch_execute("INSERT INTO users (email) VALUES ('a@x')")
        .await
        .unwrap();
    assert!(
        fence::missing_privileges(&operator, &tables())
            .await
            .unwrap()
            .is_empty()
    );

    let before = wal_insert_lsn(&operator).await;
    let f = fence::raise(&operator, &tables(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(f.lsn > before, "{f:?}");
    assert_eq!(fence::fenced_tables(&operator).await.unwrap().len(), 2);

    for sql in [
        "INSERT INTO users (email) VALUES ('b@x')",
        "UPDATE users SET email = 'c@x'",
        "DELETE FROM users",
        "TRUNCATE users",
        "INSERT INTO \"VMs\" (owner) VALUES (1)",
        // A session cannot skip it: the trigger fires in replica mode too.
        "SET session_replication_role = replica; INSERT INTO users (email) VALUES ('d@x')",
    ] {
        let (code, message) = refused(&app, sql).await;
        assert_eq!(code, "25006", "{sql}: {message}");
        assert!(
            message.contains("being migrated by shadowsync"),
            "{message}"
        );
        app.batch_execute("SET session_replication_role = origin")
            .await
            .unwrap();
    }
    assert_eq!(count(&app, "users").await, 1, "reads go on");

    assert_eq!(fence::remove(&operator).await.unwrap().len(), 2);
    app.batch_execute("INSERT INTO users (email) VALUES ('e@x')")
        .await
        .unwrap();
    assert!(
        fence::remove(&operator).await.unwrap().is_empty(),
        "idempotent"
    );
    assert_eq!(count(&app, "users").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_in_flight_commits_before_the_fence_or_holds_it_off() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    let operator = pair.blue().await;
    let app = pair.blue().await;
    // A writer's transaction left open: the fence's lock waits for it, then gives up.
    app.batch_execute("BEGIN; INSERT INTO users (email) VALUES ('open@x')")
        .await
        .unwrap();
    let e = fence::raise(&operator, &tables(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, fence::FenceError::LockTimeout { .. }), "{e}");
    assert!(e.to_string().contains("Nothing was fenced"), "{e}");
    assert!(fence::fenced_tables(&operator).await.unwrap().is_empty());
    // The writer goes on as if nothing happened.
    app.batch_execute("COMMIT").await.unwrap();

    // With time to wait, the open transaction commits first and lands before the fence's LSN.
    app.batch_execute("BEGIN; INSERT INTO users (email) VALUES ('late@x')")
        .await
        .unwrap();
    let op = operator;
    let raising = tokio::spawn(async move {
        let f = fence::raise(&op, &tables(), Duration::from_secs(10)).await;
        (op, f)
    });
    let app_commit = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.batch_execute("COMMIT").await.unwrap();
        wal_insert_lsn(&app).await
    };
    let committed_at = app_commit.await;
    let (operator, f) = raising.await.unwrap();
    let f = f.unwrap();
    assert!(
        committed_at <= f.lsn,
        "{committed_at} after the fence {f:?}"
    );
    assert_eq!(count(&operator, "users").await, 2);
    fence::remove(&operator).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_without_the_rights_is_told_which_and_nothing_is_fenced() {
    init_logging();
    let pair = Pair::start(SCHEMA);
    pair.blue
        .psql(
            DB,
            "CREATE ROLE cutter LOGIN; GRANT SELECT, INSERT ON users, \"VMs\" TO cutter;
             REVOKE CREATE ON DATABASE app FROM PUBLIC;",
        )
        .unwrap();
    let dsn = format!("{} user=cutter", pair.blue.dsn(DB));
    let cutter = connect(&dsn).await;
    let missing = fence::missing_privileges(&cutter, &tables()).await.unwrap();
    let text = missing.join("; ");
    assert!(text.contains("users") && text.contains("\"VMs\""), "{text}");
    assert!(text.contains("CREATE on the database"), "{text}");
    assert!(fence::fenced_tables(&cutter).await.unwrap().is_empty());
}
