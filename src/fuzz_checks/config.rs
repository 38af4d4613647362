//! Config parsing: [`Config::from_toml_str`] (TOML, then `validate()`).
//!
//! Input: the file's text. Invariants:
//! - an error never shows a secret: no value written for a `*secret*` key
//!   (`auth.keys.secret_hex` today) appears in its message, whether the
//!   file parsed or not;
//! - a config that loads prints (`toml::to_string`, as the bench and tests
//!   write configs) to text that loads back to the same config, and its
//!   `Debug` output shows no secret either.

use crate::config::Config;

/// Shorter values are not taken for secrets: they could appear in an error
/// by coincidence (a number, a field name).
const MIN_SECRET_CHARS: usize = 12;

pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let secrets = secrets_in(text);
    match Config::from_toml_str(text) {
        Ok(config) => {
            let printed = toml::to_string(&config).expect("a loaded config prints as TOML");
            let again = Config::from_toml_str(&printed).expect("a printed config loads");
            assert_eq!(again, config, "printed as\n{printed}");
            let debug = format!("{config:?}");
            for secret in &secrets {
                assert!(!debug.contains(secret.as_str()), "Debug shows the secret {secret:?}");
            }
        }
        Err(err) => {
            let shown = format!("{err}\n{err:?}");
            for secret in &secrets {
                assert!(!shown.contains(secret.as_str()), "the error shows the secret {secret:?}:\n{shown}");
            }
        }
    }
}

/// Values written after a key whose name contains "secret", found in the
/// text itself (the file may not parse), quoted or bare. Only those that
/// occur nowhere else in the text count.
fn secrets_in(text: &str) -> Vec<String> {
    let lower = text.to_ascii_lowercase();
    let mut found = Vec::new();
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(at) = lower[from..].find("secret") {
        let key_end = from + at + "secret".len();
        from = key_end;
        let line_end = text[key_end..].find('\n').map_or(text.len(), |n| key_end + n);
        let Some(eq) = text[key_end..line_end].find('=') else { continue };
        let value_start = key_end + eq + 1;
        let value = text[value_start..line_end].trim_start();
        let start = value_start + (text[value_start..line_end].len() - value.len());
        let (value, start) = match value.chars().next() {
            Some(q @ ('"' | '\'')) => {
                let inner = &value[1..];
                (inner.find(q).map_or(inner, |n| &inner[..n]), start + 1)
            }
            _ => (value.split(|c: char| c.is_whitespace() || ",}]#".contains(c)).next().unwrap_or(""), start),
        };
        if value.chars().count() >= MIN_SECRET_CHARS && value.chars().all(|c| c.is_ascii_alphanumeric()) {
            found.push(value.to_owned());
            spans.push(start..start + value.len());
        }
    }
    // A value that also appears outside the secrets (a node name, a number)
    // may show up in an error legitimately.
    let mut others = text.to_owned();
    for span in spans {
        others.replace_range(span.clone(), &" ".repeat(span.len()));
    }
    found.retain(|s| !others.contains(s.as_str()));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_found_quoted_bare_inline_and_in_broken_files() {
        let hex = "00112233445566778899aabbccddeeff";
        let text = format!(
            "[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"{hex}\"\n\
             keys = [{{ id = \"k2\", secret_hex = 'AAAABBBBCCCCDDDD' }}]\n\
             secret = 1234567890123456 # bare\nsecret_hex = \"short\"\nSECRET_X=\"unterminated0123"
        );
        assert_eq!(secrets_in(&text), [hex, "AAAABBBBCCCCDDDD", "1234567890123456", "unterminated0123"]);
        // Also elsewhere in the file: not only a secret.
        assert!(secrets_in(&format!("node_name = \"{hex}\"\nsecret_hex = \"{hex}\"")).is_empty());
    }
}
