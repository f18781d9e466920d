//! Columns where green is narrower than blue: a `varchar(n)` under `text` or a wider
//! `varchar`, fewer integer digits in a `numeric`, a smaller integer type. Blue's values may fit
//! today and not tomorrow; when one does not, green rejects it (an error, never a truncation),
//! which would otherwise first be seen hours into the initial copy or the stream.
//!
//! Pure comparison of the two `format_type` spellings (type modifiers included); the verdicts
//! are warnings, not failures: the operator may know the data fits.

/// Why values of blue type `blue` may not fit green type `green`; `None` when every value fits
/// (as far as these rules tell).
pub fn narrower(blue: &str, green: &str) -> Option<String> {
    // Arrays are left alone: `varchar(12)[]` is not a `varchar(12)` with a suffix to parse.
    if blue.ends_with("[]") || green.ends_with("[]") {
        return None;
    }
    let (b, g) = (Shape::of(blue), Shape::of(green));
    match (b, g) {
        (Shape::Chars(from), Shape::Chars(Some(to))) if from.is_none_or(|n| n > to) => Some(
            format!("values longer than {to} characters ({blue} on blue) are rejected"),
        ),
        (
            Shape::Number {
                digits: Some(bd),
                scale: bs,
            },
            Shape::Number {
                digits: Some(gd),
                scale: gs,
            },
        ) if bd > gd || bs > gs => {
            let mut why = Vec::new();
            if bd > gd {
                why.push(format!(
                    "values with more than {gd} digits before the decimal point are rejected"
                ));
            }
            if bs > gs {
                why.push(format!("values are rounded to {gs} decimal places"));
            }
            Some(why.join(", and "))
        }
        (
            Shape::Number { digits: None, .. },
            Shape::Number {
                digits: Some(gd),
                scale: gs,
            },
        ) => Some(format!(
            "{blue} on blue has no limit: values with more than {gd} digits before the decimal point are rejected, and values are rounded to {gs} decimal places"
        )),
        _ => None,
    }
}

/// What matters of a type for the comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// A character type and its length limit (`None`: unbounded).
    Chars(Option<u32>),
    /// An exact number: digits before the decimal point (`None`: unbounded) and after it.
    Number {
        digits: Option<u32>,
        scale: u32,
    },
    Other,
}

impl Shape {
    fn of(spelling: &str) -> Shape {
        let (name, args) = match spelling.split_once('(') {
            Some((n, rest)) => (n.trim(), rest.trim_end_matches(')')),
            None => (spelling.trim(), ""),
        };
        let nums: Vec<u32> = args
            .split(',')
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        match name {
            "text" => Shape::Chars(None),
            "character varying" | "character" | "bpchar" => Shape::Chars(nums.first().copied()),
            "smallint" => Shape::Number {
                digits: Some(5),
                scale: 0,
            },
            "integer" => Shape::Number {
                digits: Some(10),
                scale: 0,
            },
            "bigint" => Shape::Number {
                digits: Some(19),
                scale: 0,
            },
            "numeric" => match nums.as_slice() {
                [p] => Shape::Number {
                    digits: Some(*p),
                    scale: 0,
                },
                [p, s] => Shape::Number {
                    digits: Some(p.saturating_sub(*s)),
                    scale: *s,
                },
                _ => Shape::Number {
                    digits: None,
                    scale: 0,
                },
            },
            _ => Shape::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::narrower;

    #[test]
    fn narrower_character_types_are_named() {
        assert!(narrower("text", "character varying(12)").is_some());
        assert!(narrower("character varying(40)", "character varying(12)").is_some());
        assert!(narrower("character varying", "character(3)").is_some());
        assert_eq!(
            narrower("character varying(12)", "character varying(12)"),
            None
        );
        assert_eq!(narrower("character varying(12)", "text"), None);
        assert_eq!(
            narrower("character varying(5)", "character varying(12)"),
            None
        );
    }

    #[test]
    fn narrower_numbers_are_named() {
        assert!(narrower("bigint", "integer").is_some());
        assert!(narrower("integer", "smallint").is_some());
        assert_eq!(narrower("integer", "bigint"), None);
        assert!(narrower("numeric", "numeric(10,2)").is_some());
        assert!(narrower("numeric(12,2)", "numeric(10,2)").is_some());
        let rounding = narrower("numeric(10,4)", "numeric(12,2)").unwrap();
        assert!(rounding.contains("rounded to 2"), "{rounding}");
        assert_eq!(narrower("numeric(10,2)", "numeric(12,2)"), None);
        assert!(narrower("bigint", "numeric(12,2)").is_some());
        assert_eq!(narrower("integer", "numeric(12,2)"), None);
        assert_eq!(narrower("integer", "numeric"), None);
        assert_eq!(narrower("timestamp with time zone", "date"), None);
        assert_eq!(narrower("text[]", "character varying(12)[]"), None);
    }
}
