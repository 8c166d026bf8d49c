//! The file's text → [`RawConfig`], reporting every key serde refuses rather than only the first.
//!
//! serde stops at the first key it cannot take — unknown (`deny_unknown_fields`), or with a
//! value of the wrong type (`fail_open: maybe`) — so an operator who mistyped two keys and an
//! address would fix them one `check` at a time. Each key serde refuses is taken out of a copy
//! of the document, which is parsed again, until the copy parses or something that cannot be
//! left out stops it (a syntax error, a missing or duplicate name); the validation pass then
//! reports the rest of the file's problems beside them. YAML merge keys (`<<: *anchor`),
//! which serde does not apply, are applied to that copy first.

use super::locate::Locator;
use super::raw::RawConfig;
use super::Problem;
use serde_yaml::Value;

/// How many refused keys one reading reports before it stops looking (each costs a parse).
const MAX_SKIPPED_KEYS: usize = 64;

/// The raw configuration when serde could build it (with refused keys left out), and the
/// problems found on the way. `None` means a problem stopped serde, and it is in the list.
pub(super) fn read(text: &str, locator: &Locator) -> (Option<RawConfig>, Vec<Problem>) {
    let error = match serde_yaml::from_str::<RawConfig>(text) {
        Ok(raw) => return (Some(raw), Vec::new()),
        Err(error) => error,
    };
    let Ok(mut document) = serde_yaml::from_str::<Value>(text) else {
        return (None, vec![yaml_problem(&error)]);
    };
    let mut problems = vec![yaml_problem(&error)];
    // YAML merge keys (`timeouts: { <<: *defaults, request: 2m }`) are not applied by
    // serde: applied here, the file reads as its author meant it.
    let mut merged = document.clone();
    if merged.apply_merge().is_ok() && merged != document {
        document = merged;
        match reparse(&document) {
            Ok(raw) => return (Some(raw), Vec::new()),
            Err(error) => problems = vec![placed(yaml_problem(&error), locator)],
        }
    }
    let mut skipped: Vec<String> = Vec::new();
    for _ in 0..MAX_SKIPPED_KEYS {
        let Some(last) = problems.last() else { break };
        let path = last.path.clone();
        if !can_skip(last) || !remove_key(&mut document, &path) {
            break;
        }
        skipped.push(path);
        let next = match reparse(&document) {
            Ok(raw) => return (Some(raw), problems),
            Err(next) => yaml_problem(&next),
        };
        if missing_field(&next).is_some_and(|missing| skipped.contains(&missing)) {
            // The key is missing because it was taken out: reported already.
            break;
        }
        problems.push(placed(next, locator));
    }
    (None, problems)
}

/// Parses a rewritten copy of the document.
fn reparse(document: &Value) -> Result<RawConfig, serde_yaml::Error> {
    serde_yaml::to_string(document).and_then(|text| serde_yaml::from_str::<RawConfig>(&text))
}

/// A problem found in a rewritten copy, placed in the file by its key path (the positions
/// serde gives are the copy's).
fn placed(problem: Problem, locator: &Locator) -> Problem {
    Problem::placed(locator, problem.path, problem.message)
}

/// Whether the problem is one key's, which can be left out to read on: not a syntax error
/// (no path), not a sequence item (taking it out would renumber the rest), not a missing key.
fn can_skip(problem: &Problem) -> bool {
    !problem.path.is_empty()
        && !problem.path.ends_with(']')
        && !problem.message.starts_with("missing field")
}

/// The full path of the key in "missing field `key`" (`listeners.web.listen`).
fn missing_field(problem: &Problem) -> Option<String> {
    let field = problem
        .message
        .strip_prefix("missing field `")?
        .split_once('`')?
        .0;
    Some(if problem.path.is_empty() {
        field.to_string()
    } else {
        format!("{}.{field}", problem.path)
    })
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

/// Removes the key at `path`, written as serde_yaml writes paths
/// (`pools.portal.backends[0].weight`). Names may contain dots (`listeners.tax.v2`), so at
/// each mapping the longest key the path continues with is taken.
fn remove_key(document: &mut Value, path: &str) -> bool {
    let mut node = document;
    let mut rest = path;
    loop {
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
            continue;
        }
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
        rest = &rest[name_length..];
        if rest.is_empty() {
            return mapping.shift_remove(&key).is_some();
        }
        let Some(child) = mapping.get_mut(&key) else {
            return false;
        };
        node = child;
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
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
    fn a_value_of_the_wrong_type_is_reported_and_left_out_too() {
        let text = "listeners: {}\npools:\n  p:\n    fail_open: maybe\n    backends: [ { name: a, address: \"127.0.0.1:2\", weight: heavy } ]\nextra: 1\n";
        assert_eq!(
            paths(text),
            ["pools.p.fail_open", "pools.p.backends[0].weight", "extra"]
        );
    }

    #[test]
    fn what_cannot_be_left_out_ends_the_reading_after_it() {
        assert_eq!(
            paths("listeners: [\n").len(),
            1,
            "a syntax error stops at once"
        );
        // A required key of the wrong type is reported once, not again as missing.
        assert_eq!(
            paths(
                "extra: 1\nlisteners:\n  web: { listen: [1], pool: p }\n  other: {}\npools: {}\n"
            ),
            ["extra", "listeners.web.listen"]
        );
        // A key missing from the file is reported as such.
        assert_eq!(
            paths("listeners:\n  web: { pool: p }\npools: {}\n"),
            ["listeners.web"]
        );
    }

    #[test]
    fn yaml_merge_keys_are_applied() {
        let text = "\
listeners: {}
pools:
  portal:
    timeouts: &timeouts { connect: 1s, request: 30s }
    backends: []
  tax:
    timeouts: { <<: *timeouts, request: 2m }
    backends: []
";
        let (raw, problems) = read(text, &Locator::new(text));
        assert!(problems.is_empty(), "{problems:?}");
        let raw = raw.expect("merged");
        let timeouts = raw.pools.0[1].1.timeouts.as_ref().expect("tax's timeouts");
        assert_eq!(timeouts.connect.as_deref(), Some("1s"), "merged in");
        assert_eq!(timeouts.request.as_deref(), Some("2m"), "its own wins");
        // A problem in a merged file is still placed in it.
        let broken = text.replace("request: 2m", "request: 2m, bogus: 1");
        assert_eq!(paths(&broken), ["pools.tax.timeouts.bogus"]);
    }

    #[test]
    fn a_valid_file_has_no_problems() {
        let text = "listeners: {}\npools: {}\n";
        let (raw, problems) = read(text, &Locator::new(text));
        assert!(raw.is_some());
        assert!(problems.is_empty());
    }
}
