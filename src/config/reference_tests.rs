//! docs/configuration.md against the code: every key of its tables has the default the code
//! applies, every range it states is where the code starts refusing (naming the key), every
//! environment variable it lists is read, and every variable read is listed. The tables are
//! parsed; a change of their layout fails here rather than passing unchecked.

use std::collections::{BTreeMap, HashMap};

use serde_yaml::{Mapping, Value};

use super::{known_keys, raw, Config};

const DOCS: &str = include_str!("../../docs/configuration.md");
const MINIMAL: &str = "upstream:\n  addrs: [\"127.0.0.1:8080\"]\n";

/// One row of a `| key | default | meaning |` table, with its section's prefix.
#[derive(Debug)]
struct Row {
    key: String,
    default: String,
    meaning: String,
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split(" | ").map(|c| c.trim().to_string()).collect()
}

fn unticked(cell: &str) -> String {
    cell.replace("**", "").trim_matches('`').to_string()
}

/// The rows of every `### \`section\`` key table.
fn key_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mut section: Option<String> = None;
    let mut in_table = false;
    for line in DOCS.lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            section = Some(unticked(heading.trim()));
            in_table = false;
            continue;
        }
        if line.starts_with("## ") {
            section = None;
        }
        let Some(section) = &section else { continue };
        if line.starts_with("| key | ") {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        let c = cells(line);
        assert!(c.len() >= 3, "a key table row of three cells: {line}");
        rows.push(Row {
            key: format!("{section}.{}", unticked(&c[0])),
            default: c[1].clone(),
            meaning: c[2..].join(" | "),
        });
    }
    rows
}

/// `| \`NAME\` | \`key\` or – | meaning |` rows of the environment table.
fn env_rows() -> Vec<(String, Option<String>)> {
    let start = DOCS
        .find("## Environment variables")
        .expect("an environment section");
    let section = &DOCS[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    section[..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let c = cells(l);
            let overrides = (c[1] != "–").then(|| unticked(&c[1]));
            (unticked(&c[0]), overrides)
        })
        .collect()
}

/// The default's first word as the docs write it (`60`, `` `none` ``, `**5** (Pingora: 300)`).
fn documented_default(cell: &str) -> String {
    let plain = cell.replace("**", "");
    let word = plain
        .split([' ', ';', '('])
        .find(|w| !w.is_empty())
        .unwrap_or("");
    word.trim_matches('`').to_string()
}

fn shown(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(s) if s.is_empty() => "[]".into(),
        Value::Mapping(m) if m.is_empty() => "{}".into(),
        other => format!("{other:?}"),
    }
}

fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, k| v.get(k))
}

/// Every default the code applies, by dotted key: the file format's, and for `pingora` the
/// `ServerConf` tollgate builds from an empty section.
fn applied_defaults() -> Value {
    let minimal: raw::RawConfig = serde_yaml::from_str(MINIMAL).unwrap();
    let mut value = serde_yaml::to_value(minimal).unwrap();
    let config = Config::from_yaml(MINIMAL, "t.yaml", &HashMap::<String, String>::new()).unwrap();
    let server = serde_yaml::to_value(&config.server).unwrap();
    value
        .as_mapping_mut()
        .unwrap()
        .insert("pingora".into(), server);
    value
}

/// Keys whose default the docs describe in words rather than as a value.
const DESCRIBED: &[(&str, &str)] = &[
    ("upstream.addrs", "–"),
    ("upstream.sni", "each"),
    ("admin.allow", "absent"),
    ("access_log.path", "stdout)"),
    ("pingora.error_log", "none"),
    ("pingora.ca_file", "none"),
    ("pingora.others", "Pingora's"),
    // "true; false when `threads` is 1", checked below.
    ("pingora.work_stealing", "true"),
];

#[test]
fn every_documented_default_is_the_one_applied() {
    let rows = key_rows();
    assert!(rows.len() >= 50, "the key tables were found: {rows:?}");
    let applied = applied_defaults();
    for row in &rows {
        let doc = documented_default(&row.default);
        if let Some((_, words)) = DESCRIBED.iter().find(|(k, _)| *k == row.key) {
            assert_eq!(&doc, words, "{}: described default changed", row.key);
            continue;
        }
        let actual = lookup(&applied, &row.key)
            .unwrap_or_else(|| panic!("docs/configuration.md has {}, the code does not", row.key));
        assert_eq!(doc, shown(actual), "default of {}", row.key);
    }
    let stealing = |threads: &str| {
        let yaml = format!("{MINIMAL}pingora: {{threads: {threads}}}\n");
        let env = HashMap::<String, String>::new();
        Config::from_yaml(&yaml, "t.yaml", &env)
            .unwrap()
            .server
            .work_stealing
    };
    assert!(!stealing("1") && stealing("2"), "pingora.work_stealing");
    // The other way round: every key of the file format is in a table, except the sections
    // documented as prose (lists).
    let documented: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    for key in known_keys() {
        let is_section = lookup(&applied, &key).is_some_and(Value::is_mapping);
        let prose = ["listen", "trusted_proxies", "ip_blocklist"].contains(&key.as_str());
        let nested = documented.iter().any(|d| d.starts_with(&format!("{key}.")));
        assert!(
            documented.contains(&key.as_str()) || prose || (is_section && nested),
            "{key} is in no table of docs/configuration.md"
        );
    }
}

/// The numbers of "at least N", "at most N", "at most a year (N)", "(A–B)", "A to B".
fn documented_range(meaning: &str) -> (Option<u64>, Option<u64>) {
    let number_after = |marker: &str| -> Option<u64> {
        // The last: a range closes the cell, after prose that may quote other numbers.
        let rest = &meaning[meaning.rfind(marker)? + marker.len()..];
        let digits: String = rest
            .trim_start_matches(['(', ' '])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let mut lo = number_after("at least ");
    let mut hi = number_after("at most a year (").or_else(|| number_after("at most "));
    for (open, sep) in [("(", "–"), ("", " to ")] {
        for (i, _) in meaning.match_indices(sep) {
            let before: String = meaning[..i]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .chars()
                .rev()
                .collect();
            let after: String = meaning[i + sep.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let opened = open.is_empty() || meaning[..i - before.len()].ends_with(open);
            if let (Ok(a), Ok(b), true) = (before.parse(), after.parse(), opened) {
                lo = lo.or(Some(a));
                hi = hi.or(Some(b));
            }
        }
    }
    (lo, hi)
}

/// A document setting `key` to `value` (plus what keeps other checks out of the way).
fn document_with(key: &str, value: u64) -> String {
    let mut root: Value = serde_yaml::from_str(MINIMAL).unwrap();
    let mut set = |path: &str, v: Value| {
        let mut node = &mut root;
        let parts: Vec<&str> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            let map = node.as_mapping_mut().unwrap();
            node = map
                .entry((*part).into())
                .or_insert_with(|| Value::Mapping(Mapping::new()));
        }
        node.as_mapping_mut()
            .unwrap()
            .insert((*parts.last().unwrap()).into(), v);
    };
    if key == "rate_limit.window_seconds" {
        // Rates that any window keeps exactly.
        set("rate_limit.requests_per_minute", 0.into());
        set("rate_limit.auth_failures_per_minute", 0.into());
    }
    set(key, value.into());
    serde_yaml::to_string(&root).unwrap()
}

#[test]
fn every_documented_range_is_where_the_code_refuses() {
    let env: HashMap<String, String> = HashMap::new();
    let mut checked = BTreeMap::new();
    for row in key_rows() {
        let (lo, hi) = documented_range(&row.meaning);
        if lo.is_none() && hi.is_none() {
            continue;
        }
        let load = |v: u64| Config::from_yaml(&document_with(&row.key, v), "t.yaml", &env);
        if let Some(lo) = lo {
            assert!(load(lo).is_ok(), "{} = {lo} (documented lowest)", row.key);
            if lo > 0 {
                let err = load(lo - 1).err();
                assert_eq!(
                    err.map(|e| e.key),
                    Some(row.key.clone()),
                    "{} = {}",
                    row.key,
                    lo - 1
                );
            }
        }
        if let Some(hi) = hi {
            assert!(load(hi).is_ok(), "{} = {hi} (documented highest)", row.key);
            let err = load(hi + 1).err();
            assert_eq!(
                err.map(|e| e.key),
                Some(row.key.clone()),
                "{} = {}",
                row.key,
                hi + 1
            );
        }
        checked.insert(row.key, (lo, hi));
    }
    assert!(checked.len() >= 18, "ranges were found: {checked:?}");
    assert_eq!(
        checked.get("rate_limit.estimator_slots"),
        Some(&(Some(1024), Some(16_777_216)))
    );
}

#[test]
fn every_documented_variable_is_read_and_every_read_one_documented() {
    let code = [
        include_str!("mod.rs"),
        include_str!("env.rs"),
        include_str!("../observe/logging.rs"),
    ]
    .concat();
    let rows = env_rows();
    assert!(
        rows.len() >= 14,
        "the environment table was found: {rows:?}"
    );
    let keys = known_keys();
    for (name, overrides) in &rows {
        if name == "any name" {
            continue;
        }
        let read = code.contains(&format!("\"{name}\"")) || name == "RUST_LOG";
        assert!(read, "{name} is documented but not read");
        if let Some(key) = overrides {
            assert!(
                keys.contains(key),
                "{name} overrides {key}, which is no key"
            );
        }
    }
    // Each variable the builder reads (`env::…(self.env, "NAME")`) is in the table.
    for (i, _) in code.match_indices("(self.env, \"") {
        let rest = &code[i + "(self.env, \"".len()..];
        let name = &rest[..rest.find('"').unwrap()];
        assert!(
            rows.iter().any(|(n, _)| n == name),
            "{name} is read but not in docs/configuration.md's table"
        );
        assert!(
            super::env::READ.contains(&name),
            "{name} is read but not in env::READ (checked for UTF-8)"
        );
    }
}

/// The model test's table of keys (defaults and ranges it expects) is the documented one.
#[test]
fn the_model_tests_keys_are_the_documented_ones() {
    let rows = key_rows();
    for k in super::model_tests::INT_KEYS {
        let row = rows.iter().find(|r| r.key == k.path);
        let row = row.unwrap_or_else(|| panic!("{} is not documented", k.path));
        assert_eq!(
            documented_default(&row.default),
            k.default.to_string(),
            "{}",
            k.path
        );
        let (lo, hi) = documented_range(&row.meaning);
        assert_eq!(lo.unwrap_or(k.lo), k.lo, "{}", k.path);
        assert_eq!(hi.unwrap_or(k.hi), k.hi, "{}", k.path);
    }
}
