//! The top-level modules of `src/` import each other without a cycle
//! (issue 12: "no import cycle between the folders"). Reads the sources,
//! ignores comments (doc links such as [`crate::x`] are not imports) and
//! string literals, and follows every `crate::<module>` path.
//!
//! The edges in [`KNOWN`] are the config layering still to be done (see
//! ARCHITECTURE.md, "Still spread"); each must still exist, so the list only
//! shrinks, and no other edge may close a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Back edges left on purpose, with why. Remove an entry when its edge goes.
const KNOWN: &[(&str, &str, &str)] = &[
    ("config", "conn", "[ws]/[tls] settings types live in conn/tls_config.rs; to move into config/"),
    ("config", "http", "[http]/[dispatch_auth] settings types live in http/; to move into config/"),
    ("config", "push", "[push_auth] settings type and cluster_key live in push/auth.rs; to move into config/"),
];

/// Not part of the library's module graph.
const SKIP: &[&str] = &["lib.rs", "main.rs", "cli"];

type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source with comments, string and char literals blanked out (line
/// structure kept).
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !b[..i].last().is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{..}'.
            i += 2;
            while i < b.len() && b[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else if c == '\'' && b.get(i + 2) == Some(&'\'') {
            i += 3;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The top-level modules `code` names through `crate::` paths (and
/// `crate::{a, b}` groups).
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let tail = rest.trim_start();
        if let Some(group) = tail.strip_prefix('{') {
            let mut depth = 0;
            let mut item = true;
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item = true,
                    c if item && depth == 0 && (c.is_alphanumeric() || c == '_') => {
                        found.insert(ident(&group[k..]));
                        item = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(tail);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// module -> module it imports -> files that do.
fn graph(src: &Path) -> Graph {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("src/ is readable").flatten() {
        let path = entry.path();
        let file = entry.file_name().to_string_lossy().into_owned();
        if SKIP.contains(&file.as_str()) {
            continue;
        }
        if path.is_dir() {
            let mut files = Vec::new();
            rust_files(&path, &mut files);
            modules.insert(file, files);
        } else if let Some(name) = file.strip_suffix(".rs") {
            modules.insert(name.to_owned(), vec![path]);
        }
    }
    let mut g = Graph::new();
    for (module, files) in &modules {
        let edges = g.entry(module.clone()).or_default();
        for file in files {
            let text = std::fs::read_to_string(file).expect("source is readable");
            for to in crate_paths(&code_only(&text)) {
                if &to != module && modules.contains_key(&to) {
                    let shown = file.strip_prefix(src).unwrap_or(file).display().to_string();
                    edges.entry(to).or_default().insert(shown);
                }
            }
        }
    }
    g
}

/// A cycle in `g`, as the modules along it, if there is one.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    // 0: unseen, 1: on the current path, 2: done.
    fn visit(g: &Graph, at: &str, state: &mut BTreeMap<String, u8>, path: &mut Vec<String>) -> Option<Vec<String>> {
        state.insert(at.to_owned(), 1);
        path.push(at.to_owned());
        for to in g.get(at).into_iter().flat_map(|e| e.keys()) {
            match state.get(to).copied().unwrap_or(0) {
                1 => {
                    let from = path.iter().position(|m| m == to).unwrap_or(0);
                    let mut cycle = path[from..].to_vec();
                    cycle.push(to.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(g, to, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(at.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if state.get(m).copied().unwrap_or(0) == 0
            && let Some(c) = visit(g, m, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g = graph(&src);
    for (from, to, why) in KNOWN {
        let gone = g.get_mut(*from).and_then(|e| e.remove(*to)).is_none();
        assert!(!gone, "{from} no longer imports {to} ({why}): remove the entry from KNOWN");
    }
    if let Some(cycle) = find_cycle(&g) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                let files: Vec<&str> = g[&w[0]][&w[1]].iter().map(String::as_str).collect();
                format!("{} -> {} ({})", w[0], w[1], files.join(", "))
            })
            .collect();
        panic!("import cycle between top-level modules:\n  {}", steps.join("\n  "));
    }
}

#[test]
fn comments_and_strings_are_not_imports_and_a_cycle_is_found() {
    let src = "use crate::a::X; // crate::b\n/* crate::c /* nested crate::d */ */\n\
               /// [`crate::e`]\nlet s = \"crate::f\"; let r = r#\"crate::g\"#; let q = '\"';\n\
               use crate::{h::Y, i};\nfn f<'a>(x: &'a str) { crate::j::k(x) }";
    let found: Vec<String> = crate_paths(&code_only(src)).into_iter().collect();
    assert_eq!(found, ["a", "h", "i", "j"]);

    let mut g = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")] {
        g.entry(from.into()).or_default().entry(to.into()).or_default().insert(format!("{from}.rs"));
    }
    g.entry("d".into()).or_default();
    let cycle = find_cycle(&g).expect("a -> b -> c -> a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
    g.get_mut("c").map(|e| e.remove("a"));
    assert_eq!(find_cycle(&g), None);
}
