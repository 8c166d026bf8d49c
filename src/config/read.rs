//! The file's text → [`RawConfig`], reporting every unknown key rather than only the first.
//!
//! serde stops at the first key it does not know (`deny_unknown_fields`), so an operator who
//! mistyped two keys and an address would fix them one `check` at a time. Each unknown key
//! serde reports is taken out of a copy of the document, which is parsed again, until the
//! copy parses or something other than an unknown key stops it; the validation pass then
//! reports the rest of the file's problems beside them.

use super::locate::Locator;
use super::raw::RawConfig;
use super::Problem;
use serde_yaml::Value;

/// How many unknown keys one reading reports before it stops looking (each costs a parse).
const MAX_UNKNOWN_KEYS: usize = 64;

/// The raw configuration when serde could build it (with unknown keys left out), and the
/// problems found on the way. `None` means a problem stopped serde, and it is in the list.
pub(super) fn read(text: &str, locator: &Locator) -> (Option<RawConfig>, Vec<Problem>) {
    let mut error = match serde_yaml::from_str::<RawConfig>(text) {
        Ok(raw) => return (Some(raw), Vec::new()),
        Err(error) => error,
    };
    let mut problems = vec![yaml_problem(&error)];
    let Ok(mut document) = serde_yaml::from_str::<Value>(text) else {
        return (None, problems);
    };
    for _ in 0..MAX_UNKNOWN_KEYS {
        let Some((parent, field)) = unknown_field(&error) else {
            break;
        };
        if !remove_field(&mut document, &parent, &field) {
            break;
        }
        let reparsed = serde_yaml::to_string(&document)
            .and_then(|text| serde_yaml::from_str::<RawConfig>(&text));
        match reparsed {
            Ok(raw) => return (Some(raw), problems),
            Err(next) => {
                // Positions serde gives now are in the rewritten copy: place it in the file.
                let mut problem = yaml_problem(&next);
                let position = locator.find(&problem.path);
                problem.line = position.map(|(line, _)| line);
                problem.column = position.map(|(_, column)| column);
                problems.push(problem);
                error = next;
            }
        }
    }
    (None, problems)
}

/// Turns a serde_yaml error ("path: message at line L column C") into a [`Problem`].
fn yaml_problem(error: &serde_yaml::Error) -> Problem {
    let location = error.location();
    let mut message = error.to_string();
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    let (mut path, mut message) = split_path(&message);
    if let Some(field) = unknown_field_name(&message) {
        path = if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
    }
    if let Some(cut) = message.find("expected struct Raw") {
        message.truncate(cut);
        message.push_str("expected a mapping");
    }
    Problem {
        path,
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

/// Splits serde_yaml's "path: message" (a message without a path is the whole text).
fn split_path(message: &str) -> (String, String) {
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && !path.is_empty() => {
            (path.to_string(), rest.to_string())
        }
        _ => (String::new(), message.to_string()),
    }
}

/// The key in "unknown field `key`, expected …".
fn unknown_field_name(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field)
}

/// The mapping's path and the key when `error` is an unknown key.
fn unknown_field(error: &serde_yaml::Error) -> Option<(String, String)> {
    let mut message = error.to_string();
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    let (path, message) = split_path(&message);
    let field = unknown_field_name(&message)?.to_string();
    Some((path, field))
}

/// Removes `field` from the mapping at `path`, written as serde_yaml writes paths
/// (`pools.portal.backends[0]`; empty for the top level). Names may contain dots
/// (`listeners.tax.v2`), so at each mapping the longest key the path continues with is taken.
fn remove_field(document: &mut Value, path: &str, field: &str) -> bool {
    let mut node = document;
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let Some((index, after)) = after.split_once(']') else {
                return false;
            };
            let Some(item) = index
                .parse::<usize>()
                .ok()
                .and_then(|index| node.as_sequence_mut()?.get_mut(index))
            else {
                return false;
            };
            node = item;
            rest = after.strip_prefix('.').unwrap_or(after);
        } else {
            let Some(mapping) = node.as_mapping_mut() else {
                return false;
            };
            let Some((key, name_length)) = mapping
                .keys()
                .filter_map(|key| {
                    let name = key_text(key)?;
                    let after = rest.strip_prefix(name.as_str())?;
                    (after.is_empty() || after.starts_with(['.', '[']))
                        .then(|| (key.clone(), name.len()))
                })
                .max_by_key(|(_, length)| *length)
            else {
                return false;
            };
            let Some(child) = mapping.get_mut(&key) else {
                return false;
            };
            node = child;
            rest = &rest[name_length..];
            rest = rest.strip_prefix('.').unwrap_or(rest);
        }
    }
    node.as_mapping_mut()
        .and_then(|mapping| mapping.shift_remove(field))
        .is_some()
}

/// A mapping key as it appears in a path: names are strings, but `8080:` is a number.
fn key_text(key: &Value) -> Option<String> {
    match key {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(text: &str) -> Vec<String> {
        let (_, problems) = read(text, &Locator::new(text));
        problems.into_iter().map(|problem| problem.path).collect()
    }

    #[test]
    fn every_unknown_key_is_reported_and_the_rest_still_parses() {
        let text = "\
bogus: 1
listeners:
  tax.v2:
    listen: \"127.0.0.1:1\"
    pool: p
    limits: { max_header_bytes: 2048, junk: 2 }
pools:
  p:
    backends:
      - name: a
        address: \"127.0.0.1:2\"
        wieght: 3
";
        let locator = Locator::new(text);
        let (raw, problems) = read(text, &locator);
        let found: Vec<_> = problems
            .iter()
            .map(|problem| (problem.path.as_str(), problem.line))
            .collect();
        assert_eq!(
            found,
            [
                ("bogus", Some(1)),
                ("listeners.tax.v2.limits.junk", Some(6)),
                ("pools.p.backends[0].wieght", Some(12)),
            ]
        );
        assert!(problems[2].message.contains("expected one of `name`"));
        let raw = raw.expect("the rest of the file is valid");
        assert_eq!(raw.pools.0[0].1.backends[0].address, "127.0.0.1:2");
    }

    #[test]
    fn a_problem_that_is_not_an_unknown_key_ends_the_reading_after_it() {
        assert_eq!(
            paths("listeners: {}\npools: {}\nextra: 1\nadmin: { listen: [1] }\n"),
            ["extra", "admin.listen"]
        );
        assert_eq!(
            paths("listeners: [\n").len(),
            1,
            "a syntax error stops at once"
        );
    }

    #[test]
    fn a_valid_file_has_no_problems() {
        let text = "listeners: {}\npools: {}\n";
        let (raw, problems) = read(text, &Locator::new(text));
        assert!(raw.is_some());
        assert!(problems.is_empty());
    }
}
