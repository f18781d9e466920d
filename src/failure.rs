//! What a database said when it refused something, in a form safe to log and print: the
//! SQLSTATE, the message, and the constraint, table and column it names, never row values.
//!
//! Invariant: PostgreSQL puts row values in DETAIL ("Failing row contains (...)", "Key
//! (email)=(...)") and, for data errors (class 22), in the message itself ("invalid input syntax
//! for type integer: \"abc\""). DETAIL is dropped, and quoted text in class 22 messages is
//! replaced. The original error is never kept as a `source`, so no error chain can print it.

/// A database refusal, redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbFailure {
    /// SQLSTATE, when the server sent one (none for I/O errors and closed connections).
    pub code: Option<String>,
    /// The constraint the server named, if any.
    pub constraint: Option<String>,
    pub message: String,
}

impl DbFailure {
    pub fn from_pg(e: &tokio_postgres::Error) -> DbFailure {
        let Some(db) = e.as_db_error() else {
            // Client-side: I/O, closed connection, protocol; no row data in these.
            return DbFailure {
                code: None,
                constraint: None,
                message: e.to_string(),
            };
        };
        let code = db.code().code().to_string();
        let mut message = if code.starts_with("22") {
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
            code: Some(code),
            constraint: db.constraint().map(str::to_string),
            message,
        }
    }

    /// Connection trouble, serialization failures, deadlocks, lock and statement timeouts,
    /// resource shortages and server shutdowns pass with time; data, schema, privilege and
    /// authentication errors do not.
    pub fn is_retryable(&self) -> bool {
        match &self.code {
            None => true,
            Some(c) => retryable_sqlstate(c),
        }
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

/// The retry decision for a SQLSTATE.
pub fn retryable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("40")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code.starts_with("58")
        || matches!(code, "57014" | "55P03" | "55006")
}

/// The SQLSTATE in a message formatted `... (SQLSTATE XXXXX)`, as pgwire-replication reports
/// server errors.
pub fn sqlstate_in(message: &str) -> Option<&str> {
    let at = message.rfind("SQLSTATE ")? + "SQLSTATE ".len();
    let code = message.get(at..at + 5)?;
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then_some(code)
}

/// Data errors (class 22) quote the offending value: keep only the text before the first
/// quote (a value may itself contain quotes, so pairing them is not safe).
fn redact_data_message(message: &str) -> String {
    match message.find(['"', '\'']) {
        Some(at) => format!("{}\"…\"", &message[..at]),
        None => message.to_string(),
    }
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
            Some("55006")
        );
        assert_eq!(sqlstate_in("no code here, slot shadowsync_2024_08"), None);
        assert!(retryable_sqlstate("55006"));
        assert!(retryable_sqlstate("08006"));
        assert!(!retryable_sqlstate("42704"));
        assert!(!retryable_sqlstate("28P01"));
    }
}
