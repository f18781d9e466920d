//! What a database said when it refused something, in a form safe to log and print: the
//! SQLSTATE, the message, and the constraint, table and column it names, never row values.
//!
//! Invariant: PostgreSQL puts row values in DETAIL ("Failing row contains (...)", "Key
//! (email)=(...)") and, for data errors (class 22), in the message itself ("invalid input syntax
//! for type integer: \"abc\""). DETAIL is dropped, and quoted text in class 22 messages is
//! replaced. The original error is never kept as a `source`, so no error chain can print it.

pub use tokio_postgres::error::SqlState;

/// What the pipeline does about a failure: the one decision, by SQLSTATE (see [`policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Passes with time: reconnect and resume from green's progress.
    Retry,
    /// Needs the operator: stop, with the error's next step.
    Permanent,
}

/// A database refusal, redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbFailure {
    /// SQLSTATE, when the server sent one (none for I/O errors and closed connections).
    pub code: Option<SqlState>,
    /// The constraint the server named, if any.
    pub constraint: Option<String>,
    pub message: String,
    /// A TLS handshake that failed (a certificate check, the server's refusal of ours): the
    /// operator must change a setting, so it is never retried.
    pub tls: Option<crate::tls::Refusal>,
}

impl DbFailure {
    pub fn from_pg(e: &tokio_postgres::Error) -> DbFailure {
        DbFailure::from_pg_on(e, "the DSN")
    }

    /// As [`Self::from_pg`], a TLS failure explained for the config field `field` (`blue.dsn`).
    pub fn from_pg_on(e: &tokio_postgres::Error, field: &str) -> DbFailure {
        let Some(db) = e.as_db_error() else {
            // Client-side: I/O, closed connection, protocol, TLS; no row data in these.
            let (tls, message) = match crate::tls::Refusal::of(e, field) {
                Some((refusal, text)) => (Some(refusal), text),
                None => (None, describe(e)),
            };
            return DbFailure {
                code: None,
                constraint: None,
                message,
                tls,
            };
        };
        let code = db.code().code().to_string();
        let mut message = if class_of(db.code()) == "22" {
            redact_data_message(db.message())
        } else if MESSAGE_CLASSES.iter().any(|c| code.starts_with(c)) {
            db.message().to_string()
        } else {
            // Raised by user code (triggers, functions called by rules): the text is theirs and
            // may hold anything.
            "green raised an error".to_string()
        };
        if let Some(c) = db.constraint() {
            message.push_str(&format!(" [constraint {c}]"));
        }
        if let Some(c) = db.column() {
            message.push_str(&format!(" [column {c}]"));
        }
        if let Some(h) = db.hint()
            && MESSAGE_CLASSES.iter().any(|c| code.starts_with(c))
        {
            message.push_str(&format!(" (hint: {h})"));
        }
        message.push_str(&format!(" (SQLSTATE {code})"));
        DbFailure {
            code: Some(db.code().clone()),
            constraint: db.constraint().map(str::to_string),
            message,
            tls: None,
        }
    }

    /// See [`policy`]; a failed TLS handshake never passes with time.
    pub fn is_retryable(&self) -> bool {
        self.tls.is_none() && policy(self.code.as_ref()) == Policy::Retry
    }

    /// The server sent exactly this SQLSTATE.
    pub fn is(&self, state: &SqlState) -> bool {
        self.code.as_ref() == Some(state)
    }

    /// Class 22: a value green cannot take (too long, out of range, bad syntax for the type).
    pub fn is_data_exception(&self) -> bool {
        self.code.as_ref().is_some_and(|c| class_of(c) == "22")
    }

    /// Class 23: a constraint refused the row (NOT NULL, CHECK, unique, foreign key).
    pub fn is_integrity_violation(&self) -> bool {
        self.code.as_ref().is_some_and(|c| class_of(c) == "23")
    }

    /// Green refused the data itself (class 22 or 23), not the connection or the schema.
    pub fn is_rejected_data(&self) -> bool {
        self.is_data_exception() || self.is_integrity_violation()
    }

    /// A unique or exclusion constraint refused the row.
    pub fn is_unique_violation(&self) -> bool {
        self.is(&SqlState::UNIQUE_VIOLATION) || self.is(&SqlState::EXCLUSION_VIOLATION)
    }

    /// Class 42: the statement does not fit the schema (names, types, privileges).
    pub fn is_schema_mismatch(&self) -> bool {
        self.code.as_ref().is_some_and(|c| class_of(c) == "42")
    }
}

/// A SQLSTATE's class: its first two characters.
pub fn class_of(state: &SqlState) -> &str {
    state.code().get(..2).unwrap_or("")
}

/// The retry decision, the only one: connection trouble (08), serialization failures and
/// deadlocks (40), resource shortages (53), operator intervention such as a server shutting
/// down or a cancelled statement (57P, 57014), system errors (58), a lock not available
/// (55P03) and an object in use (55006: a replication slot a dead predecessor still holds)
/// pass with time; data, schema, privilege and authentication errors do not. No SQLSTATE (an
/// I/O error, a closed connection) passes too.
pub fn policy(state: Option<&SqlState>) -> Policy {
    let Some(state) = state else {
        return Policy::Retry;
    };
    let code = state.code();
    let passes = matches!(class_of(state), "08" | "40" | "53" | "58")
        || code.starts_with("57P")
        || [
            SqlState::QUERY_CANCELED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::OBJECT_IN_USE,
        ]
        .contains(state);
    if passes {
        Policy::Retry
    } else {
        Policy::Permanent
    }
}

impl std::fmt::Display for DbFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// SQLSTATE classes whose messages PostgreSQL writes itself without row values (class 23 puts
/// them in DETAIL, which is never kept): connection, feature, integrity, transaction state,
/// authorization, catalog, syntax and access, resources, object state, operator intervention.
const MESSAGE_CLASSES: [&str; 13] = [
    "08", "0A", "23", "25", "28", "3D", "3F", "40", "42", "53", "55", "57", "58",
];

/// The SQLSTATE in a message formatted `... (SQLSTATE XXXXX)`, as pgwire-replication reports
/// server errors (it keeps no structured code).
pub fn sqlstate_in(message: &str) -> Option<SqlState> {
    let at = message.rfind("SQLSTATE ")? + "SQLSTATE ".len();
    let code = message.get(at..at + 5)?;
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then(|| SqlState::from_code(code))
}

/// Data errors (class 22) quote the offending value: keep only the text before the first
/// quote (a value may itself contain quotes, so pairing them is not safe).
fn redact_data_message(message: &str) -> String {
    match message.find(['"', '\'']) {
        Some(at) => format!("{}\"…\"", &message[..at]),
        None => message.to_string(),
    }
}

/// An error and its causes as one line, `outer: cause: cause`, leaving out a cause whose text
/// the line already holds (many messages embed their source, which a plain chain then printed
/// twice: "... (os error 98); choose a free address: Address already in use (os error 98)").
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_redacted() {
        assert_eq!(
            redact_data_message("invalid input syntax for type integer: \"12\"34 Main St\""),
            "invalid input syntax for type integer: \"…\""
        );
        assert_eq!(
            redact_data_message("value too long for type character varying(3)"),
            "value too long for type character varying(3)"
        );
    }

    #[test]
    fn sqlstates_are_found_and_classified() {
        assert_eq!(
            sqlstate_in("replication slot \"s_08\" is active for PID 7 (SQLSTATE 55006)"),
            Some(SqlState::OBJECT_IN_USE)
        );
        assert_eq!(sqlstate_in("no code here, slot shadowsync_2024_08"), None);
        let retry = |code: &str| policy(Some(&SqlState::from_code(code))) == Policy::Retry;
        assert!(retry("55006"));
        assert!(retry("08006"));
        assert!(retry("57P01"));
        assert!(retry("40P01"));
        assert!(!retry("42704"));
        assert!(!retry("28P01"));
        assert!(!retry("23505"));
        assert_eq!(policy(None), Policy::Retry);
    }
}

/// A statement that failed on one side (`blue` or `green`), and the step it was for.
#[derive(Debug, thiserror::Error)]
#[error("{side}, {context}: {failure}")]
pub struct OnSide {
    pub side: &'static str,
    pub context: &'static str,
    pub failure: DbFailure,
}

/// `map_err` adapter: the failure, with its side and step.
pub fn on(
    side: &'static str,
    context: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> OnSide {
    move |e| OnSide {
        side,
        context,
        failure: DbFailure::from_pg(&e),
    }
}

/// A side that could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {side} ({dsn}): {failure}")]
pub struct Unreachable {
    pub side: &'static str,
    /// The DSN without its password.
    pub dsn: String,
    pub failure: DbFailure,
}

#[cfg(test)]
mod describe_tests {
    #[test]
    fn describe_prints_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot listen on {addr}: {source}; choose a free address")]
        struct Listen {
            addr: &'static str,
            source: std::io::Error,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("starting the sidecar")]
        struct Outer(#[source] Listen);
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = Outer(Listen {
            addr: "127.0.0.1:7187",
            source: io,
        });
        assert_eq!(
            super::describe(&e),
            "starting the sidecar: cannot listen on 127.0.0.1:7187: Address already in use; choose a free address"
        );
    }
}
