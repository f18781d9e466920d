//! What a rule's SQL expression reads, found by scanning its tokens (green parses and
//! type-checks the expression itself; no SQL grammar lives here).
//!
//! Invariant: the answers over-approximate. A word equal to a source column's name counts as
//! reading it (unless qualified by something other than `src`), and any relation named after
//! `FROM` or `JOIN` counts as a lookup. Over-approximation only costs speed (an extra flush, a
//! full-row fetch), never correctness.

/// One identifier chain, e.g. `src.status` -> ["src", "status"]; unquoted parts lower-cased as
/// PostgreSQL folds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain(pub Vec<String>);

/// Identifier chains of an expression, skipping string literals, quoted text and comments,
/// plus the relations of FROM lists (comma-separated, `ONLY`, `LATERAL`) and JOINs.
pub fn scan(expr: &str) -> (Vec<Chain>, Vec<Chain>) {
    let b = expr.as_bytes();
    let mut chains = Vec::new();
    let mut relations = Vec::new();
    let mut from = FromList::default();
    let mut i = 0;
    while i < b.len() {
        if let Some(end) = skip_comment(b, i) {
            i = end;
            continue;
        }
        let c = b[i];
        match c {
            b'\'' => i = skip_quoted(b, i, b'\''),
            b'$' => i = skip_dollar(b, i),
            b'"' => {
                let (chain, next) = read_chain(expr, i);
                i = next;
                push(chain, &mut chains, &mut relations, &mut from);
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                // E'...' and similar prefixed literals.
                if matches!(c, b'E' | b'e' | b'B' | b'b' | b'X' | b'x' | b'U' | b'u')
                    && b.get(i + 1) == Some(&b'\'')
                {
                    i = skip_quoted(b, i + 1, b'\'');
                    continue;
                }
                let (chain, next) = read_chain(expr, i);
                i = next;
                push(chain, &mut chains, &mut relations, &mut from);
            }
            c if c.is_ascii_digit() => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            b'(' => {
                // A subquery in the FROM list: its own FROM names its relations.
                from.expecting = false;
                from.depth += 1;
                i += 1;
            }
            b')' => {
                from.depth = from.depth.saturating_sub(1);
                if from.list_depth.is_some_and(|d| d > from.depth) {
                    from.list_depth = None;
                }
                i += 1;
            }
            b',' => {
                // Another item of the FROM list at this level.
                if from.list_depth == Some(from.depth) {
                    from.expecting = true;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    (chains, relations)
}

/// Where the scan is in a FROM list.
#[derive(Default)]
struct FromList {
    /// Parenthesis depth.
    depth: usize,
    /// Depth of the FROM list being read, if any.
    list_depth: Option<usize>,
    /// The next chain names a relation.
    expecting: bool,
}

fn push(chain: Chain, chains: &mut Vec<Chain>, relations: &mut Vec<Chain>, from: &mut FromList) {
    let word = (chain.0.len() == 1).then(|| chain.0[0].as_str());
    if from.expecting {
        if !matches!(word, Some("only" | "lateral")) {
            relations.push(chain.clone());
            from.expecting = false;
        }
    } else {
        match word {
            Some("from" | "join") => {
                from.expecting = true;
                from.list_depth = Some(from.depth);
            }
            Some(
                "where" | "group" | "order" | "limit" | "having" | "window" | "on" | "using"
                | "union" | "except" | "intersect" | "returning",
            ) if from.list_depth == Some(from.depth) => from.list_depth = None,
            _ => {}
        }
    }
    chains.push(chain);
}

/// The end of the comment starting at `start` (`--` to the end of the line, `/* ... */`), if
/// one starts there.
fn skip_comment(b: &[u8], start: usize) -> Option<usize> {
    match (b[start], b.get(start + 1)) {
        (b'-', Some(b'-')) => Some(
            b[start..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| start + p),
        ),
        (b'/', Some(b'*')) => {
            let mut i = start + 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            Some(i + 2)
        }
        _ => None,
    }
}

fn skip_quoted(b: &[u8], start: usize, quote: u8) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        if b[i] == b'\\' && quote == b'\'' {
            // Backslash escapes matter only in E'' strings; skipping one byte is harmless
            // for standard strings too (it can only hide a quote that E'' would escape).
            i += 1;
        }
        i += 1;
    }
    b.len()
}

/// `$tag$ ... $tag$` dollar quoting; a lone `$1` parameter is just skipped.
fn skip_dollar(b: &[u8], start: usize) -> usize {
    let mut j = start + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    if j < b.len() && b[j] == b'$' && !b[start + 1..j].first().is_some_and(u8::is_ascii_digit) {
        let tag = &b[start..=j];
        let mut k = j + 1;
        while k + tag.len() <= b.len() {
            if &b[k..k + tag.len()] == tag {
                return k + tag.len();
            }
            k += 1;
        }
        return b.len();
    }
    j
}

/// Reads `part(.part)*` where parts are bare words or double-quoted identifiers.
fn read_chain(expr: &str, start: usize) -> (Chain, usize) {
    let b = expr.as_bytes();
    let mut parts = Vec::new();
    let mut i = start;
    loop {
        if i < b.len() && b[i] == b'"' {
            let mut s = String::new();
            let mut j = i + 1;
            while j < b.len() {
                if b[j] == b'"' {
                    if b.get(j + 1) == Some(&b'"') {
                        s.push('"');
                        j += 2;
                        continue;
                    }
                    break;
                }
                let ch = expr[j..].chars().next().unwrap_or('\u{fffd}');
                s.push(ch);
                j += ch.len_utf8().max(1);
            }
            parts.push(s);
            i = (j + 1).min(b.len());
        } else {
            let s = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80)
            {
                i += 1;
            }
            if s == i {
                break;
            }
            parts.push(expr[s..i].to_lowercase());
        }
        if i < b.len()
            && b[i] == b'.'
            && b.get(i + 1)
                .is_some_and(|&n| n == b'"' || n.is_ascii_alphabetic() || n == b'_' || n == b'*')
        {
            if b[i + 1] == b'*' {
                parts.push("*".into());
                i += 2;
                break;
            }
            i += 1;
            continue;
        }
        break;
    }
    (Chain(parts), i)
}

/// Source columns (indices into `names`) an expression may read: bare names, or `src.name`.
pub fn inputs(expr: &str, names: &[String]) -> Vec<usize> {
    let (chains, _) = scan(expr);
    let mut found: Vec<usize> = Vec::new();
    for chain in chains {
        let column = match chain.0.as_slice() {
            // The whole row (`to_jsonb(src)`, `src::text`, `src.*`) reads every column.
            [whole] if whole == "src" => return (0..names.len()).collect(),
            [qualifier, star] if qualifier == "src" && star == "*" => {
                return (0..names.len()).collect();
            }
            [name] => name,
            [qualifier, name] if qualifier == "src" => name,
            _ => continue,
        };
        if let Some(i) = names.iter().position(|n| n == column)
            && !found.contains(&i)
        {
            found.push(i);
        }
    }
    found.sort_unstable();
    found
}

/// Relations an expression reads (after FROM or JOIN), as `[schema.]name` chains.
pub fn relations(expr: &str) -> Vec<Vec<String>> {
    scan(expr).1.into_iter().map(|c| c.0).collect()
}

/// A token of an expression: an identifier chain or one punctuation byte.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Chain(Chain),
    Symbol(u8),
}

/// The expression's tokens, skipping literals, quoted text and comments as [`scan`] does.
fn tokens(expr: &str) -> Vec<Token> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if let Some(end) = skip_comment(b, i) {
            i = end;
            continue;
        }
        let c = b[i];
        match c {
            b'\'' => {
                i = skip_quoted(b, i, b'\'');
                out.push(Token::Symbol(b'\''));
            }
            b'$' => {
                i = skip_dollar(b, i);
                out.push(Token::Symbol(b'$'));
            }
            b'"' => {
                let (chain, next) = read_chain(expr, i);
                i = next;
                out.push(Token::Chain(chain));
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                if matches!(c, b'E' | b'e' | b'B' | b'b' | b'X' | b'x' | b'U' | b'u')
                    && b.get(i + 1) == Some(&b'\'')
                {
                    i = skip_quoted(b, i + 1, b'\'');
                    out.push(Token::Symbol(b'\''));
                    continue;
                }
                let (chain, next) = read_chain(expr, i);
                i = next;
                out.push(Token::Chain(chain));
            }
            c if c.is_ascii_digit() => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                out.push(Token::Symbol(b'0'));
            }
            c if c.is_ascii_whitespace() => i += 1,
            c => {
                out.push(Token::Symbol(c));
                i += 1;
            }
        }
    }
    out
}

fn word(t: Option<&Token>) -> Option<&str> {
    match t {
        Some(Token::Chain(c)) if c.0.len() == 1 => Some(c.0[0].as_str()),
        _ => None,
    }
}

/// Words that end a FROM item instead of naming its alias.
const NOT_ALIAS: [&str; 14] = [
    "where", "join", "inner", "left", "right", "full", "cross", "natural", "on", "using", "group",
    "order", "limit", "union",
];

/// A lookup of `relation` that reads only the rows whose column `key` equals the source row's
/// column: `... FROM relation [AS] alias WHERE alias.key = src.column [AND ...]`, the relation
/// read nowhere else in the expression, and no `OR` anywhere. Returns (`key`, index of
/// `column` in `names`); `None` when the expression does not have exactly that shape (then any
/// change of the relation may matter to it).
pub fn keyed_lookup(expr: &str, relation: &[String], names: &[String]) -> Option<(String, usize)> {
    if relations(expr)
        .iter()
        .filter(|r| r.as_slice() == relation)
        .count()
        != 1
    {
        return None;
    }
    let t = tokens(expr);
    if t.iter().any(|x| word(Some(x)) == Some("or")) {
        return None;
    }
    // The FROM item naming the relation.
    let at = t.iter().enumerate().position(|(i, x)| {
        matches!(x, Token::Chain(c) if c.0.as_slice() == relation)
            && matches!(
                word(i.checked_sub(1).and_then(|j| t.get(j))),
                Some("from" | "only")
            )
    })?;
    let mut i = at + 1;
    if word(t.get(i)) == Some("as") {
        i += 1;
    }
    let alias = match word(t.get(i)) {
        Some(w) if !NOT_ALIAS.contains(&w) => {
            i += 1;
            w.to_string()
        }
        _ => relation.last()?.clone(),
    };
    // `src.x` would then name the looked-up table, not the source row.
    if alias == "src" {
        return None;
    }
    if word(t.get(i)) != Some("where") {
        return None;
    }
    let side = |x: Option<&Token>| match x {
        Some(Token::Chain(c)) if c.0.len() == 2 => Some((c.0[0].clone(), c.0[1].clone())),
        _ => None,
    };
    let (l, r) = (side(t.get(i + 1))?, side(t.get(i + 3))?);
    if t.get(i + 2) != Some(&Token::Symbol(b'=')) {
        return None;
    }
    // The comparison must end there: a closing parenthesis, AND, or the end of the query.
    let ends = match t.get(i + 4) {
        None | Some(Token::Symbol(b')')) => true,
        Some(x) => matches!(word(Some(x)), Some("and" | "order" | "limit" | "group")),
    };
    if !ends {
        return None;
    }
    let (key, source) = if l.0 == alias && r.0 == "src" {
        (l.1, r.1)
    } else if r.0 == alias && l.0 == "src" {
        (r.1, l.1)
    } else {
        return None;
    };
    let column = names.iter().position(|n| *n == source)?;
    Some((key, column))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_lookups_are_recognised_only_in_their_exact_shape() {
        let cols = names(&["id", "owner_id", "email"]);
        let users = vec!["users".to_string()];
        let ok = |e: &str| keyed_lookup(e, &users, &cols);
        assert_eq!(
            ok("COALESCE((SELECT u.tenant_id FROM users u WHERE u.id = src.owner_id), 'x'::uuid)"),
            Some(("id".into(), 1))
        );
        assert_eq!(
            ok("(SELECT tenant_id FROM users AS u WHERE src.owner_id = u.id AND u.active LIMIT 1)"),
            Some(("id".into(), 1))
        );
        assert_eq!(
            ok("(SELECT tenant_id FROM users WHERE users.id = src.owner_id)"),
            Some(("id".into(), 1))
        );
        for bad in [
            "(SELECT u.t FROM users u WHERE u.id = src.owner_id OR u.admin)",
            "(SELECT u.t FROM users u WHERE u.id = src.owner_id + 1)",
            "(SELECT u.t FROM users u WHERE u.id <= src.owner_id)",
            "(SELECT u.t FROM users u JOIN x ON true WHERE u.id = src.owner_id)",
            "(SELECT u.t FROM users u WHERE u.email = lower(src.email))",
            "(SELECT max(u.t) FROM users u) + (SELECT u.t FROM users u WHERE u.id = src.owner_id)",
            "(SELECT u.t FROM users u WHERE NOT u.id = src.owner_id)",
            "(SELECT u.t FROM users u WHERE u.id = src.nope)",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn inputs_are_bare_or_src_qualified_columns() {
        let cols = names(&["id", "status", "capacity", "owner_id", "type"]);
        assert_eq!(
            inputs(
                "(CASE status WHEN 'active' THEN 'online' END)::node_status",
                &cols
            ),
            vec![1]
        );
        assert_eq!(inputs("(capacity->>'cpu_cores')::integer", &cols), vec![2]);
        assert_eq!(inputs("TYPE", &cols), vec![4]);
        assert_eq!(
            inputs(
                "COALESCE((SELECT u.tenant_id FROM users u WHERE u.id = src.owner_id), 'x'::uuid)",
                &cols
            ),
            vec![3]
        );
        // Words inside literals, comments and quoted text are not columns.
        assert_eq!(
            inputs(
                "'status' || E'id\\'' || $$capacity$$ -- owner_id\n || \"Id\"",
                &cols
            ),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn whole_row_references_read_every_column() {
        let cols = names(&["id", "body", "title"]);
        assert_eq!(inputs("md5(to_jsonb(src)::text)", &cols), vec![0, 1, 2]);
        assert_eq!(inputs("row_to_json(src.*)", &cols), vec![0, 1, 2]);
        assert_eq!(inputs("src.title", &cols), vec![2]);
    }

    #[test]
    fn from_lists_only_and_lateral_are_relations() {
        assert_eq!(
            relations(
                "(SELECT 1 FROM users u, ONLY tenants t, LATERAL (SELECT 1) x WHERE u.id = 1, 2)"
            ),
            vec![names(&["users"]), names(&["tenants"])]
        );
        assert_eq!(
            relations("coalesce((SELECT a FROM x WHERE b IN (1, 2)), (SELECT c FROM y))"),
            vec![names(&["x"]), names(&["y"])]
        );
    }

    #[test]
    fn relations_follow_from_and_join() {
        assert_eq!(
            relations("(SELECT t.id FROM public.tenants t JOIN users u ON true WHERE x)"),
            vec![names(&["public", "tenants"]), names(&["users"])]
        );
        assert_eq!(relations("lower(status)"), Vec::<Vec<String>>::new());
    }
}
