//! TLS against real servers that accept only `hostssl` connections, with certificates made by
//! the test (a CA, a server certificate for `localhost` and `127.0.0.1`, an expired one, a
//! client certificate, and a CA that signed none of them), and the admin token.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use shadowsync::config::Config;

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);";
const BLUE_PASSWORD: &str = "blue-Pw-9d81c2e7";
const GREEN_PASSWORD: &str = "green-Pw-40aa7f13";
const TOKEN: &str = "admin-token-5b0e2f9c71d84a66";
const CERT_USER: &str = "certuser";

/// Password logins for everyone but `certuser`, who logs in by client certificate; TLS only.
const HBA: &str = "hostssl all certuser 127.0.0.1/32 cert\n\
                   hostssl all all 127.0.0.1/32 scram-sha-256";

struct Pki {
    dir: TestDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server: (PathBuf, PathBuf),
    expired: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    /// Revokes `server`.
    crl: PathBuf,
}

fn write_private(path: &PathBuf, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl Pki {
    fn new() -> Pki {
        let dir = TestDir::new("tls-pki");
        let ca_cert = ca("shadowsync test ca");
        let other = ca("some other ca");
        let leaf = |sans: Vec<String>, cn: &str, expired: bool, name: &str| {
            let mut params = CertificateParams::new(sans).unwrap();
            params.serial_number = Some(rcgen::SerialNumber::from(name.len() as u64));
            params.distinguished_name.push(DnType::CommonName, cn);
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca_cert).unwrap();
            let (c, k) = (
                dir.join(&format!("{name}.crt")),
                dir.join(&format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            write_private(&k, &key.serialize_pem());
            (c, k)
        };
        let sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let server = leaf(sans.clone(), "localhost", false, "server");
        let expired = leaf(sans, "localhost", true, "expired");
        let client = leaf(vec![], CERT_USER, false, "client");
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from("server".len() as u64),
                revocation_time: rcgen::date_time_ymd(2025, 6, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&ca_cert)
        .unwrap();
        let crl_path = dir.join("revoked.crl");
        std::fs::write(&crl_path, crl.pem().unwrap()).unwrap();
        let (ca, other_ca) = (dir.join("ca.crt"), dir.join("other-ca.crt"));
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&other_ca, other.pem()).unwrap();
        Pki {
            dir,
            ca,
            other_ca,
            server,
            expired,
            client,
            crl: crl_path,
        }
    }
}

/// A pair whose servers listen on 127.0.0.1 with TLS only (`server` names the certificate each
/// presents), with the passwords and the certificate user set.
fn tls_pair(pki: &Pki, server: &(PathBuf, PathBuf)) -> (Pair, u16, u16) {
    let mut pair = Pair::start(SCHEMA);
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE items")
        .unwrap();
    let ports = (free_addr().port(), free_addr().port());
    for (cluster, port, pw) in [
        (&mut pair.blue, ports.0, BLUE_PASSWORD),
        (&mut pair.green, ports.1, GREEN_PASSWORD),
    ] {
        cluster
            .psql(
                DB,
                &format!(
                    "ALTER ROLE postgres PASSWORD '{pw}'; \
                     CREATE ROLE {CERT_USER} LOGIN SUPERUSER REPLICATION"
                ),
            )
            .unwrap();
        cluster
            .serve_tcp(port, Some((&server.0, &server.1, &pki.ca)), HBA)
            .unwrap();
    }
    (pair, ports.0, ports.1)
}

fn dsn(port: u16, password: &str, tls: &str) -> String {
    format!("host=localhost port={port} user=postgres password={password} dbname={DB} {tls}")
}

fn verify_full(pki: &Pki) -> String {
    format!("sslmode=verify-full sslrootcert={}", pki.ca.display())
}

/// Every connection of shadowsync's (by application name) on this server uses TLS, and there
/// is at least one.
async fn all_ours_use_tls(client: &tokio_postgres::Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name LIKE 'shadowsync%'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_full_streams_and_applies_over_tls_on_both_sides() {
    init_logging();
    let pki = Pki::new();
    let (pair, bp, gp) = tls_pair(&pki, &pki.server);
    let mut config = pair.config();
    config.blue.dsn = dsn(bp, BLUE_PASSWORD, &verify_full(&pki));
    // Green by IP address (checked against the certificate's IP SAN), with channel binding.
    config.green.dsn = dsn(gp, GREEN_PASSWORD, &verify_full(&pki))
        .replace("host=localhost", "host=127.0.0.1")
        + " channel_binding=require";
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    blue.batch_execute("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 500) g")
        .await
        .unwrap();
    let green = pair.green().await;
    wait_for("green has the rows", Duration::from_secs(30), || async {
        count(&green, "items").await == 500
    })
    .await;
    let (tls, plain) = all_ours_use_tls(&blue).await;
    assert!(tls >= 1 && plain == 0, "blue: {tls} TLS, {plain} plaintext");
    let walsender_tls: bool = blue
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(walsender_tls, "the replication connection uses TLS");
    let (tls, plain) = all_ours_use_tls(&green).await;
    assert!(
        tls >= 1 && plain == 0,
        "green: {tls} TLS, {plain} plaintext"
    );
    handle.shutdown();
    handle.wait().await.unwrap();
}

/// Connects as `shadowsync check` would and returns the error text.
async fn refusal(dsn_text: &str) -> String {
    let d = shadowsync::config::Dsn::parse(dsn_text, "blue.dsn").unwrap();
    match d.connect_to("blue", "shadowsync-test").await {
        Ok(_) => panic!("connected with {dsn_text}"),
        Err(e) => {
            assert!(
                !e.failure.is_retryable(),
                "a certificate problem is never retried: {e}"
            );
            e.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificate_problems_are_refused_with_the_check_and_the_fix() {
    init_logging();
    let pki = Pki::new();
    let (pair, bp, _) = tls_pair(&pki, &pki.server);
    let wrong_ca = refusal(&dsn(
        bp,
        BLUE_PASSWORD,
        &format!("sslmode=verify-full sslrootcert={}", pki.other_ca.display()),
    ))
    .await;
    assert!(
        wrong_ca.contains("unknown CA") && wrong_ca.contains("sslrootcert"),
        "{wrong_ca}"
    );
    let wrong_host = refusal(
        &dsn(bp, BLUE_PASSWORD, &verify_full(&pki))
            .replace("host=localhost", "host=db.example.com hostaddr=127.0.0.1"),
    )
    .await;
    assert!(
        wrong_host.contains("hostname mismatch") && wrong_host.contains("verify-ca"),
        "{wrong_host}"
    );
    // The same name passes with verify-ca, which checks the chain only.
    let ca_only = dsn(bp, BLUE_PASSWORD, &verify_full(&pki))
        .replace("host=localhost", "host=db.example.com hostaddr=127.0.0.1")
        .replace("verify-full", "verify-ca");
    shadowsync::config::Dsn::parse(&ca_only, "blue.dsn")
        .unwrap()
        .connect("shadowsync-test")
        .await
        .expect("verify-ca ignores the name");
    // Green may check a CRL: the server's certificate is revoked there.
    let revoked = shadowsync::config::Dsn::parse(
        &format!(
            "{} sslcrl={}",
            dsn(bp, BLUE_PASSWORD, &verify_full(&pki)),
            pki.crl.display()
        ),
        "green.dsn",
    )
    .unwrap()
    .connect_to("green", "shadowsync-test")
    .await
    .unwrap_err();
    assert!(!revoked.failure.is_retryable());
    let revoked = revoked.to_string();
    assert!(
        revoked.contains("revoked") && revoked.contains("sslcrl"),
        "{revoked}"
    );
    drop(pair);

    let (expired_pair, ebp, egp) = tls_pair(&pki, &pki.expired);
    let expired = refusal(&dsn(ebp, BLUE_PASSWORD, &verify_full(&pki))).await;
    assert!(expired.contains("expired"), "{expired}");
    eprintln!("refusals:\n{wrong_ca}\n{wrong_host}\n{revoked}\n{expired}");

    // `run` refuses at startup, at once, and writes nothing to green.
    let dir = TestDir::new("tls-run-refused");
    let mut config_text = shadowsync::cluster::pipeline_config_toml(
        &expired_pair.blue,
        &expired_pair.green,
        DB,
        "test_slot",
        "test_pub",
        &free_addr().to_string(),
    );
    config_text = config_text.replace(
        &expired_pair.blue.dsn(DB),
        &dsn(ebp, BLUE_PASSWORD, &verify_full(&pki)),
    );
    config_text = config_text.replace(
        &expired_pair.green.dsn(DB),
        &dsn(egp, GREEN_PASSWORD, &verify_full(&pki)),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config_text).unwrap();
    let (code, _, stderr) = run_bin(
        &["run", "--config", path.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
    assert!(!stderr.contains(BLUE_PASSWORD) && !stderr.contains(GREEN_PASSWORD));
    let green = expired_pair.green().await;
    let schema: i64 = green
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'shadowsync'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, 0, "nothing was written to green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefer_uses_tls_and_require_refuses_a_server_without_it() {
    init_logging();
    let pki = Pki::new();
    let (pair, bp, _) = tls_pair(&pki, &pki.server);
    for mode in ["", "sslmode=prefer", "sslmode=allow", "sslmode=require"] {
        let d = shadowsync::config::Dsn::parse(&dsn(bp, BLUE_PASSWORD, mode), "blue.dsn").unwrap();
        let (client, _conn) = d
            .connect("shadowsync-test")
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "{mode:?} connected over TLS");
    }
    let disabled = refusal(&dsn(bp, BLUE_PASSWORD, "sslmode=disable")).await;
    assert!(disabled.contains("no encryption"), "{disabled}");
    drop(pair);

    // A server without TLS: prefer falls back to plaintext, require fails and says so.
    let mut plain = Pair::start(SCHEMA);
    let port = free_addr().port();
    plain
        .blue
        .psql(
            DB,
            &format!("ALTER ROLE postgres PASSWORD '{BLUE_PASSWORD}'"),
        )
        .unwrap();
    plain
        .blue
        .serve_tcp(port, None, "host all all 127.0.0.1/32 scram-sha-256")
        .unwrap();
    let prefer = shadowsync::config::Dsn::parse(&dsn(port, BLUE_PASSWORD, ""), "blue.dsn").unwrap();
    prefer
        .connect("shadowsync-test")
        .await
        .expect("prefer falls back to plaintext");
    let d =
        shadowsync::config::Dsn::parse(&dsn(port, BLUE_PASSWORD, "sslmode=require"), "blue.dsn")
            .unwrap();
    let e = d.connect_to("blue", "shadowsync-test").await.unwrap_err();
    let text = e.to_string();
    eprintln!("require without TLS: {text}");
    assert!(
        text.contains("sslmode=require") && text.contains("TLS"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificates_log_in_to_both_sides() {
    init_logging();
    let pki = Pki::new();
    let (pair, bp, gp) = tls_pair(&pki, &pki.server);
    let cert = |port: u16| {
        format!(
            "host=localhost port={port} user={CERT_USER} dbname={DB} {} sslcert={} sslkey={}",
            verify_full(&pki),
            pki.client.0.display(),
            pki.client.1.display()
        )
    };
    let mut config = pair.config();
    config.blue.dsn = cert(bp);
    config.green.dsn = cert(gp);
    let handle = start_streaming(config).await;
    let blue = pair.blue().await;
    blue.batch_execute("INSERT INTO items VALUES (1, 'by certificate')")
        .await
        .unwrap();
    let green = pair.green().await;
    wait_for("the row on green", Duration::from_secs(30), || async {
        count(&green, "items").await == 1
    })
    .await;
    handle.shutdown();
    handle.wait().await.unwrap();

    // Without the certificate the server refuses, and the error says which keys to check.
    let bare = format!(
        "host=localhost port={bp} user={CERT_USER} dbname={DB} {}",
        verify_full(&pki)
    );
    let e = shadowsync::config::Dsn::parse(&bare, "blue.dsn")
        .unwrap()
        .connect_to("blue", "t")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    eprintln!("no client certificate: {e}");
    // A key others can read is refused before connecting, as libpq does.
    std::fs::set_permissions(&pki.client.1, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = shadowsync::config::Dsn::parse(&cert(bp), "blue.dsn")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sslkey") && e.contains("chmod 600"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_token_guards_mutating_calls_and_no_secret_is_printed() {
    init_logging();
    let pki = Pki::new();
    let (pair, bp, gp) = tls_pair(&pki, &pki.server);
    let dir = TestDir::new("tls-admin");
    let port = free_addr().port();
    let token_file = dir.join("admin.token");
    write_private(&token_file, &format!("{TOKEN}\n"));
    let mut text = shadowsync::cluster::pipeline_config_toml(
        &pair.blue,
        &pair.green,
        DB,
        "test_slot",
        "test_pub",
        &format!("0.0.0.0:{port}"),
    );
    text = text.replace(
        &pair.blue.dsn(DB),
        &dsn(bp, BLUE_PASSWORD, &verify_full(&pki)),
    );
    text = text.replace(
        &pair.green.dsn(DB),
        &dsn(gp, GREEN_PASSWORD, &verify_full(&pki)),
    );
    let without_token = dir.join("no-token.toml");
    std::fs::write(&without_token, &text).unwrap();
    let e = Config::load(&without_token).unwrap_err().to_string();
    assert!(
        e.contains("metrics.listen") && e.contains("SHADOWSYNC_ADMIN_TOKEN"),
        "{e}"
    );
    text = text.replace(
        "[metrics]",
        &format!("[metrics]\nadmin_token_file = \"{}\"", token_file.display()),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, &text).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut sidecar = Sidecar::spawn(
        &dir,
        "run",
        &["run", "--config", path.to_str().unwrap()],
        addr,
    );
    sidecar.wait_ready(Duration::from_secs(60)).await;

    let timeout = Duration::from_secs(10);
    let (code, body) = shadowsync::admin::http_call(addr, "DELETE", "/drain", timeout)
        .await
        .unwrap();
    assert_eq!(code, 401, "{body}");
    let (code, _) = shadowsync::admin::http_call(addr, "DELETE", "/hold", timeout)
        .await
        .unwrap();
    assert_eq!(code, 401);
    let wrong = shadowsync::admin::Endpoint::new(addr, Some("x".repeat(TOKEN.len())));
    assert_eq!(wrong.call("DELETE", "/hold", timeout).await.unwrap().0, 401);
    let right = shadowsync::admin::Endpoint::new(addr, Some(TOKEN.to_string()));
    assert_eq!(right.call("DELETE", "/hold", timeout).await.unwrap().0, 200);
    let (code, status) = http_get(addr, "/status").await.unwrap();
    assert_eq!(code, 200);
    let (code, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);

    // `drain` reads the token from the same config and the sidecar drains and exits.
    let blue = pair.blue().await;
    blue.batch_execute("INSERT INTO items VALUES (1, 'a')")
        .await
        .unwrap();
    let (code, drain_out, drain_err) = run_bin(
        &["drain", "--config", path.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(0), "{drain_err}");
    sidecar.wait_exit(Duration::from_secs(30)).await;
    for (what, text) in [
        ("run stdout", sidecar.stdout_text()),
        ("run stderr", sidecar.stderr_text()),
        ("drain stdout", drain_out),
        ("drain stderr", drain_err),
        ("/status", status),
        ("/metrics", metrics),
    ] {
        for secret in [BLUE_PASSWORD, GREEN_PASSWORD, TOKEN] {
            assert!(!text.contains(secret), "{what} shows a secret");
        }
    }
    let green = pair.green().await;
    assert_eq!(count(&green, "items").await, 1);
    drop(pki.dir);
}
