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
    pub message: String,
}

impl DbFailure {
    pub fn from_pg(e: &tokio_postgres::Error) -> DbFailure {
        let Some(db) = e.as_db_error() else {
            // Client-side: I/O, closed connection, protocol; no row data in these.
            return DbFailure {
                code: None,
                message: e.to_string(),
            };
        };
        let code = db.code().code().to_string();
        let mut message = if code.starts_with("22") {
            redact_quoted(db.message())
        } else {
            db.message().to_string()
        };
        if let Some(c) = db.constraint() {
            message.push_str(&format!(" [constraint {c}]"));
        }
        if let Some(c) = db.column() {
            message.push_str(&format!(" [column {c}]"));
        }
        if let Some(h) = db.hint()
            && !code.starts_with("22")
        {
            message.push_str(&format!(" (hint: {h})"));
        }
        message.push_str(&format!(" (SQLSTATE {code})"));
        DbFailure {
            code: Some(code),
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

fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quote: Option<char> = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None if c == '"' || c == '\'' => {
                out.push(c);
                quote = Some(c);
            }
            None => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_redacted() {
        assert_eq!(
            redact_quoted("invalid input syntax for type integer: \"abc@example.com\""),
            "invalid input syntax for type integer: \"…\""
        );
        assert_eq!(
            redact_quoted("value too long for type character varying(3)"),
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
