//! Process plumbing shared by every command: structured logging and the shutdown signal.
//!
//! Invariant: log lines carry table names, LSNs and keys as fields, never row values.

use tracing_subscriber::EnvFilter;

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`), text or JSON lines.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // tokio-postgres logs statement parameters (row values) at debug level.
        .add_directive("tokio_postgres=info".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits the process at once (code 1):
/// nothing is acknowledged past green's progress, so the next start resumes exactly.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now; the next start resumes from green's progress");
        std::process::exit(1);
    });
}
