//! What a person watching the sidecar sees: the live status line `run` redraws on a terminal
//! (state, lag, rows/s, conflicts, errors), and `shadowsync status`, the running sidecar's
//! `/status` in words.
//!
//! The line stays under 100 columns: a line wider than the terminal wraps, and redrawing it
//! from the line's start (`\r`) then leaves its first part behind on the line above.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Shared;

/// How often the status line is redrawn.
const INTERVAL: Duration = Duration::from_secs(1);

/// The line for `shared`, with `rows_per_s` green rows applied in the last interval.
pub fn line(shared: &Shared, rows_per_s: u64) -> String {
    let applied = shared.applied();
    let conflicts: u64 = applied.conflicts.values().flat_map(|k| k.values()).sum();
    format!(
        "[{}]  lag {:.2}s {}  {} rows/s  conflicts {}",
        shared.state().name(),
        shared.lag_seconds(),
        bytes(shared.lag_bytes()),
        rows_per_s,
        conflicts,
    )
}

/// Redraws the status line on stderr every second while stderr is a terminal, until the task
/// is aborted. Log lines erase it before they are written (see `logging`), and it comes back
/// at the next tick.
pub fn spawn_if_terminal(shared: Arc<Shared>) -> Option<tokio::task::AbortHandle> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        let mut last = rows_applied(&shared);
        tick.tick().await;
        loop {
            tick.tick().await;
            let rows = rows_applied(&shared);
            let text = line(&shared, rows.saturating_sub(last));
            last = rows;
            let mut err = std::io::stderr().lock();
            // Cursor back to the line's start after drawing: a log line then writes over it.
            let _ = write!(err, "\r\x1b[2K{text}\r");
            let _ = err.flush();
        }
    });
    Some(task.abort_handle())
}

fn rows_applied(shared: &Shared) -> u64 {
    shared
        .applied()
        .rows
        .values()
        .flat_map(|ops| ops.values())
        .sum()
}

/// `n` bytes as a person reads them (B, KiB, MiB, GiB).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A sidecar's `/status` JSON, one field per line, for `shadowsync status`.
pub fn describe_status(status: &serde_json::Value) -> String {
    let s = |key: &str| match &status[key] {
        serde_json::Value::String(v) => v.clone(),
        serde_json::Value::Null => "-".to_string(),
        v => v.to_string(),
    };
    let connected = |key: &str| {
        if status[key] == true {
            "connected"
        } else {
            "not connected"
        }
    };
    let ready = if status["ready"] == true {
        "ready"
    } else {
        "not ready"
    };
    let mut out = vec![
        format!("state       {} ({ready})", s("state")),
        format!(
            "blue        {}, WAL at {}",
            connected("blue_connected"),
            s("blue_wal_lsn")
        ),
        format!("green       {}", connected("green_connected")),
        format!("confirmed   {}", s("confirmed_lsn")),
        format!(
            "lag         {:.2} s, {}",
            status["lag_seconds"].as_f64().unwrap_or(0.0),
            bytes(status["lag_bytes"].as_u64().unwrap_or(0))
        ),
    ];
    let applied = &status["applied"];
    out.push(format!(
        "applied     {} blue transactions in {} green commits",
        applied["transactions"], applied["batches"]
    ));
    for (what, key) in [("rows", "rows"), ("conflicts", "conflicts")] {
        let Some(tables) = applied[key].as_object() else {
            continue;
        };
        for (table, counts) in tables {
            let counts: Vec<String> = counts
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            out.push(format!("{what:<11} {table}: {}", counts.join(", ")));
        }
    }
    out.join("\n")
}

/// `shadowsync status --config F`: the running sidecar's `/status`, for a person.
pub async fn command(addr: std::net::SocketAddr) -> Result<String, crate::admin::AdminError> {
    let (code, body) =
        crate::admin::http_call(addr, "GET", "/status", Duration::from_secs(10)).await?;
    let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    match parsed {
        Some(v) if code == 200 => Ok(describe_status(&v)),
        _ => Err(crate::admin::AdminError::Refused {
            status: code.to_string(),
            body,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_fits_a_terminal() {
        let s = Shared::new();
        s.set_state(crate::metrics::State::Reconnecting);
        let text = line(&s, 1_234_567);
        assert!(text.len() < 100, "{} columns: {text}", text.len());
        assert!(
            text.starts_with("[reconnecting]  lag 0.00s 0 B  1234567 rows/s"),
            "{text}"
        );
    }

    #[test]
    fn bytes_read_as_a_person_reads_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(10_000_000), "9.5 MiB");
    }

    #[test]
    fn status_is_described_field_by_field() {
        let v = serde_json::json!({
            "state": "streaming", "ready": true, "blue_connected": true, "green_connected": true,
            "streaming": true, "confirmed_lsn": "0/2BE5228", "blue_wal_lsn": "0/2BE5228",
            "lag_bytes": 0, "lag_seconds": 0.0,
            "applied": { "transactions": 3, "batches": 2,
                         "rows": { "public.vms": { "insert": 3 } },
                         "conflicts": { "public.vms": { "update_older": 1 } } }
        });
        let text = describe_status(&v);
        assert!(text.contains("state       streaming (ready)"), "{text}");
        assert!(
            text.contains("blue        connected, WAL at 0/2BE5228"),
            "{text}"
        );
        assert!(text.contains("rows        public.vms: 3 insert"), "{text}");
        assert!(
            text.contains("conflicts   public.vms: 1 update_older"),
            "{text}"
        );
    }
}
