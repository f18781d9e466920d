//! Process plumbing shared by every command: structured logging and the shutdown signal.
//!
//! Invariant: log lines carry table names, LSNs and keys as fields, never row values.

use tracing_subscriber::EnvFilter;

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`), text or JSON lines.
pub fn init(json: bool) {
    let mut filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // tokio-postgres logs statement parameters (row values) at debug level.
        .add_directive("tokio_postgres=info".parse().expect("a valid directive"));
    // The replication transport logs every lost connection at ERROR ("replication worker
    // terminated with error: io error: EOF ..."), expected on each reconnect; its errors reach
    // the session as values and are logged once there, with their context. RUST_LOG naming it
    // still shows them.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("pgwire_replication")) {
        filter = filter.add_directive("pgwire_replication=off".parse().expect("a valid directive"));
    }
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || {
            let mut err = std::io::stderr();
            if terminal {
                // Erase `run`'s live status line (see `status_line`) before a log line.
                let _ = std::io::Write::write_all(&mut err, b"\r\x1b[2K");
            }
            err
        })
        // Colours only on a terminal: escape codes in a log file or a collector garble it
        // (NO_COLOR, https://no-color.org, turns them off on a terminal too).
        .with_ansi(colours(
            terminal,
            std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
        ));
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Whether log lines carry ANSI colours: on a terminal, unless NO_COLOR is set.
fn colours(stderr_is_terminal: bool, no_color: bool) -> bool {
    stderr_is_terminal && !no_color
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

#[cfg(test)]
mod tests {
    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(super::colours(true, false));
        assert!(!super::colours(false, false));
        assert!(!super::colours(true, true));
    }
}
