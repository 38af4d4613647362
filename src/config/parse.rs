//! Reading the TOML text (errors that never show a secret) and writing
//! `generate-config`'s commented file.

use super::*;

pub(super) fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
    let error = |message: String| ConfigError::Parse { path: path.map(Path::to_owned), message };
    if let Some(table) = with_admin_listen_moved(text) {
        return table.try_into().map_err(|e: toml::de::Error| error(mask_secret_values(text, e.message())));
    }
    toml::from_str(text).map_err(|e| error(describe_parse_error(text, &e)))
}

/// A file that sets `[cluster] admin_listen` (where the admin address was
/// before single nodes served it too): the table with it moved to
/// `[server]`. None for every other file, which is parsed from its text so
/// errors keep their line numbers.
pub(super) fn with_admin_listen_moved(text: &str) -> Option<toml::Table> {
    if !text.contains("admin_listen") {
        return None;
    }
    let mut table: toml::Table = text.parse().ok()?;
    let cluster = table.get_mut("cluster")?.as_table_mut()?;
    let addr = cluster.remove("admin_listen")?;
    let server = table.entry("server").or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut()?;
    if server.contains_key("admin_listen") {
        // Both set: keep the new one, and let the old one fail as unknown.
        return None;
    }
    server.insert("admin_listen".into(), addr);
    Some(table)
}

/// Words that mark a setting (or a line) as holding a secret: its value
/// never appears in an error. Any key containing one counts, including
/// keys added later (`secret_hex` today; URLs may carry a password).
pub(super) const SECRET_WORDS: &[&str] =
    &["secret", "password", "passwd", "token", "credential", "private", "api_key", "url"];

pub(super) fn looks_secret(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| text.contains(w))
}

/// A parse error without the source: toml's own `Display` quotes the
/// offending line, which may be `secret_hex = "..."`. The message is
/// rebuilt from the position and toml's description; when the line
/// mentions a secret-looking name the description goes too (it can quote
/// the value, e.g. "invalid type: integer `1234`") unless it is one that
/// only names keys, and any secret-looking value of the file is masked
/// from what remains.
pub(super) fn describe_parse_error(text: &str, err: &toml::de::Error) -> String {
    let Some(span) = err.span() else { return mask_secret_values(text, err.message()) };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let source_line = text.get(line_start..line_end).unwrap_or_default();
    // These descriptions name keys, never values.
    let names_keys_only =
        ["unknown field", "duplicate key", "missing field"].iter().any(|p| err.message().starts_with(p));
    if looks_secret(source_line) && !names_keys_only {
        return format!(
            "line {line}, column {column}: malformed setting on a line that holds a secret \
             (its value and the parser's description are not shown); check its quoting and type"
        );
    }
    format!("line {line}, column {column}: {}", mask_secret_values(text, err.message()))
}

/// `message` with every value of a secret-looking `key = value` line of
/// `text` replaced by `<redacted>`.
pub(super) fn mask_secret_values(text: &str, message: &str) -> String {
    let mut out = message.to_owned();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        if !looks_secret(key) {
            continue;
        }
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        // Short fragments ("", "0") would mask ordinary words.
        if value.len() >= 4 {
            out = out.replace(value, "<redacted>");
        }
    }
    out
}

/// `url` with any user and password replaced by `***`, for messages.
pub(super) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.contains('@') { "<redacted>".into() } else { url.to_owned() };
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Field docs of the section stored under `name` in [`Config`].
pub(super) fn section_fields(name: &str) -> &'static [FieldDoc] {
    match name {
        "server" => ServerConfig::FIELDS,
        "session" => SessionConfig::FIELDS,
        "auth" => AuthConfig::FIELDS,
        "push" => PushConfig::FIELDS,
        "upstream" => UpstreamConfig::FIELDS,
        "delivery" => DeliveryConfig::FIELDS,
        "cluster" => ClusterConfig::FIELDS,
        "http" => crate::http::guard::HttpConfig::FIELDS,
        "dispatch" => crate::http::dispatch_auth::DispatchAuthConfig::FIELDS,
        "push_auth" => crate::push::auth::PushAuthConfig::FIELDS,
        "client_groups" => ClientGroupsConfig::FIELDS,
        "ws" => crate::conn::tls_config::WsConfig::FIELDS,
        "tls" => crate::conn::tls_config::TlsConfig::FIELDS,
        // A new section must be listed here; the round-trip test fails
        // until it is.
        _ => &[],
    }
}

pub(super) fn write_doc(out: &mut String, doc: &[&str]) {
    for line in doc {
        // Doc comments keep the space after `///`.
        let _ = writeln!(out, "#{}", line.trim_end());
    }
}

pub(super) fn write_field(out: &mut String, field: &FieldDoc, value: &toml::Value) {
    out.push('\n');
    write_doc(out, field.doc);
    let _ = writeln!(out, "{} = {value}", field.name);
}

/// The host name from gethostname(2), if it has one.
pub(super) fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, which is the
    // length passed; gethostname writes no more than that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    // POSIX leaves a truncated name without a NUL, so take the whole buffer then.
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    (!name.is_empty()).then_some(name)
}
