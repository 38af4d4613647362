//! Limits every side of the protocol agrees on, and the one check of an id.

/// Longest id string (user, device, app, platform, version, group, service)
/// in bytes; a session's compact identity record stores lengths in one
/// byte each.
pub const MAX_ID_BYTES: usize = 255;

/// Longest body of a valid `Auth` frame: the longest token, three id
/// fields, and room for the field tags, lengths and numbers. Before a
/// client has authenticated the node waits for no longer frame, so a
/// silent client costs at most this plus a header until its deadline.
pub const MAX_AUTH_BODY_BYTES: u32 = (crate::protocol::token::MAX_TOKEN_BYTES + 3 * MAX_ID_BYTES + 64) as u32;

/// Why a string is not usable as an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("empty id")]
    Empty,
    #[error("id longer than {0} bytes")]
    TooLong(usize),
    #[error("id with a control character")]
    NotPrintable,
}

/// A target, group or service id: 1 to `max` bytes of printable
/// characters (ids reach logs and terminals: no escape sequences).
pub fn check_id(id: &str, max: usize) -> Result<(), IdError> {
    if id.is_empty() {
        Err(IdError::Empty)
    } else if id.len() > max {
        Err(IdError::TooLong(max))
    } else if !printable(id) {
        Err(IdError::NotPrintable)
    } else {
        Ok(())
    }
}

/// An optional identity field (platform, version, ...): at most `max`
/// bytes of printable characters (so no NUL, which the identity record
/// uses as a separator).
pub fn fits_field(field: &str, max: usize) -> bool {
    field.len() <= max && printable(field)
}

/// A client-supplied string as a log field: control characters escaped
/// (`\u{1b}`), at most [`Escaped::MAX_CHARS`] characters (then `…`), so
/// no client can write escape sequences or floods into the logs. Ids are
/// checked printable at Auth; this is for every other path, and in case.
pub struct Escaped<'a>(pub &'a str);

impl Escaped<'_> {
    pub const MAX_CHARS: usize = 256;
}

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for (i, c) in self.0.chars().enumerate() {
            if i == Self::MAX_CHARS {
                return f.write_char('…');
            }
            if c.is_control() || c == '\\' {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// No control characters (C0, DEL, C1: ANSI escapes start with one).
fn printable(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_one_to_max_bytes() {
        assert_eq!(check_id("", MAX_ID_BYTES), Err(IdError::Empty));
        assert_eq!(
            check_id(&"x".repeat(256), MAX_ID_BYTES).map_err(|e| e.to_string()),
            Err("id longer than 255 bytes".into())
        );
        assert!(check_id(&"x".repeat(255), MAX_ID_BYTES).is_ok());
        assert!(fits_field("", 3) && !fits_field("a\0", 3) && !fits_field("abcd", 3));
        assert_eq!(check_id("\u{1b}[31mred", MAX_ID_BYTES), Err(IdError::NotPrintable));
        assert_eq!(check_id("a\u{9b}b", MAX_ID_BYTES), Err(IdError::NotPrintable));
        assert!(!fits_field("v1\n", 9) && fits_field("Ünïcode ok", 20));
        assert_eq!(Escaped("a\u{1b}[31mb\n\u{9b}c\\").to_string(), "a\\u{1b}[31mb\\n\\u{9b}c\\\\");
        assert_eq!(Escaped(&"x".repeat(300)).to_string(), format!("{}…", "x".repeat(256)));
    }
}
