//! The file's text → [`RawConfig`], reporting every key serde refuses rather than only the first.
//!
//! serde stops at the first key it cannot take — unknown (`deny_unknown_fields`), with a
//! value of the wrong type (`fail_open: maybe`), or missing (a backend without `address`) —
//! so an operator who mistyped two keys and forgot an address would fix them one `check` at
//! a time. Each key serde refuses is taken out of a copy of the document, and each missing
//! one is put in it with a stand-in value; the copy is parsed again, until it parses or
//! something that cannot be mended stops it (a syntax error, a key given twice inside a
//! flow mapping `{ … }`). A key given twice in block style (two `listen:` lines in one
//! listener) is reported where it repeats and its repetition blanked out of the text before
//! that. The validation pass then reports the rest of the file's problems beside them, but
//! none about the stand-ins. YAML merge keys (`<<: *anchor`), which serde does not apply, are
//! applied to that copy first.

use super::locate::{LazyLocator, Locator, Repeat};
use super::raw::RawConfig;
use super::Problem;
use serde_yaml::{Mapping, Value};
use std::borrow::Cow;

/// How many keys one reading takes out or stands in for before it stops looking (each costs
/// a parse).
const MAX_MENDED_KEYS: usize = 64;

/// What the file reads as.
pub(super) struct Reading {
    /// The raw configuration when serde could build it (with refused keys left out and
    /// missing ones stood in for); `None` means a problem stopped serde, and it is listed.
    pub raw: Option<RawConfig>,
    /// What serde refused, in the order found.
    pub problems: Vec<Problem>,
    /// The stand-in values put in for missing keys.
    pub stand_ins: StandIns,
}

/// The key paths of the stand-in values put in for missing keys, reported as missing
/// already: what validation finds at or under them, or at the mapping they were put in
/// (`capacity: cpu and memory_gib must be positive`), is about the stand-in, not the file.
pub(super) struct StandIns(Vec<String>);

impl StandIns {
    /// Whether a problem at `path` may be about a stand-in.
    pub fn cover(&self, path: &str) -> bool {
        self.0.iter().any(|stand_in| {
            let parent = stand_in.rsplit_once('.').map_or("", |(parent, _)| parent);
            path == parent
                || path
                    .strip_prefix(stand_in.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }
}

/// The values tried, in turn, for a missing key until serde takes one: most required keys
/// are strings; `cpu` is a number, `listeners` and `pools` mappings.
const STAND_INS: [fn() -> Value; 3] = [
    || Value::String(String::new()),
    || Value::Number(0.into()),
    || Value::Mapping(Mapping::new()),
];

/// Reads `text`, mending a copy of it as long as serde refuses something that can be mended.
pub(super) fn read(text: &str, locator: &LazyLocator) -> Reading {
    let error = match serde_yaml::from_str::<RawConfig>(text) {
        Ok(raw) => return Reading::new(Some(raw), Vec::new(), &[]),
        Err(error) => error,
    };
    if !stopped_by_repetition(text, &error) {
        return mend(text, &error, locator);
    }
    // Each later occurrence is reported and blanked out, its lines kept (so every position
    // still holds); the rest is read as if it were not there. A repetition inside one
    // that was blanked out goes with it; one inside the first occurrence shows in the next
    // round.
    let mut repeats = locator.get().repeats();
    let mut unrepeated = without(text, &repeats);
    for _ in 0..MAX_MENDED_KEYS {
        let more = Locator::new(&unrepeated).repeats();
        if more.is_empty() {
            break;
        }
        unrepeated = without(&unrepeated, &more);
        repeats.extend(more);
    }
    if repeats.is_empty() {
        return mend(text, &error, locator);
    }
    let mut reading = match serde_yaml::from_str::<RawConfig>(&unrepeated) {
        Ok(raw) => Reading::new(Some(raw), Vec::new(), &[]),
        Err(error) => mend(&unrepeated, &error, locator),
    };
    reading.problems.extend(repeats.iter().map(repeat_problem));
    reading
}

/// Whether a key given twice in one mapping stops the reading: serde refuses it in a struct
/// ("duplicate field"), and the document copy that mending works on cannot hold it either
/// ("duplicate entry": a name given twice in `listeners` or `pools`, which validation reports
/// when nothing else stops serde).
fn stopped_by_repetition(text: &str, error: &serde_yaml::Error) -> bool {
    error.to_string().contains("duplicate field")
        || serde_yaml::from_str::<Value>(text)
            .is_err_and(|error| error.to_string().contains("duplicate entry"))
}

/// `text` with each repeated key taken out, every line and column kept: in block style its
/// lines — the key's line, then every line indented deeper, or a sequence item at its
/// indentation — made empty; in a flow mapping its entry, with the comma before it, made
/// spaces.
fn without(text: &str, repeats: &[Repeat]) -> String {
    let mut blanked = String::with_capacity(text.len());
    // The indentation of the key being blanked out.
    let mut blanking: Option<usize> = None;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let on_line = || {
            repeats
                .iter()
                .filter(move |repeat| repeat.line == index + 1)
        };
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        let content = content.trim_end();
        let starts = on_line().find(|repeat| repeat.flow_entry.is_none());
        let continues = blanking.is_some_and(|key| {
            content.is_empty()
                || content.starts_with('#')
                || indent > key
                || (indent == key && (content == "-" || content.starts_with("- ")))
        });
        blanking = match starts {
            Some(repeat) => Some(repeat.column - 1),
            None if continues => blanking,
            None => None,
        };
        if blanking.is_some() {
            if line.ends_with('\n') {
                blanked.push('\n');
            }
            continue;
        }
        let mut line = Cow::Borrowed(line);
        for entry in on_line().filter_map(|repeat| repeat.flow_entry.clone()) {
            if line.is_char_boundary(entry.start) && line.is_char_boundary(entry.end) {
                let spaces = " ".repeat(entry.len());
                line.to_mut().replace_range(entry, &spaces);
            }
        }
        blanked.push_str(&line);
    }
    blanked
}

/// The problem of a key given again: a name in `listeners` or `pools` is reported as
/// validation reports one (where nothing else stopped serde).
fn repeat_problem(repeat: &Repeat) -> Problem {
    let parent = repeat
        .path
        .strip_suffix(repeat.key.as_str())
        .and_then(|parent| parent.strip_suffix('.'));
    let message = if matches!(parent, Some("listeners" | "pools")) {
        duplicate_name(&repeat.key)
    } else {
        format!(
            "duplicate key \"{}\" (first on line {})",
            repeat.key, repeat.first_line
        )
    };
    Problem::at(
        repeat.path.clone(),
        Some((repeat.line, repeat.column)),
        message,
    )
}

/// What a listener or pool name given twice is told.
pub(super) fn duplicate_name(name: &str) -> String {
    format!("duplicate name \"{name}\" (names must be unique)")
}

/// Reads a `text` serde refused with `error` by mending a copy of it.
fn mend(text: &str, error: &serde_yaml::Error, locator: &LazyLocator) -> Reading {
    let locator = locator.get();
    let first = yaml_problem(error);
    // serde places a missing key at the first entry of its mapping; placed by its path, it is
    // at the key naming that mapping, as the problems found in the mended copy are.
    let first = if missing_field(&first).is_some() && locator.find(&first.path).is_some() {
        placed(first, locator)
    } else {
        first
    };
    let Ok(mut document) = serde_yaml::from_str::<Value>(text) else {
        return Reading::new(None, vec![first], &[]);
    };
    let mut problems = vec![first];
    // YAML merge keys (`timeouts: { <<: *defaults, request: 2m }`) are not applied by
    // serde: applied here, the file reads as its author meant it.
    let mut merged = document.clone();
    if merged.apply_merge().is_ok() && merged != document {
        document = merged;
        match reparse(&document) {
            Ok(raw) => return Reading::new(Some(raw), Vec::new(), &[]),
            Err(error) => problems = vec![placed(yaml_problem(&error), locator)],
        }
    }
    let mut taken_out: Vec<String> = Vec::new();
    // Each stand-in's path and which of `STAND_INS` it holds.
    let mut stand_ins: Vec<(String, usize)> = Vec::new();
    let mut current = problems.last().cloned();
    for _ in 0..MAX_MENDED_KEYS {
        let Some(problem) = current.take() else { break };
        let mended = if let Some((parent, field)) = missing_field(&problem) {
            let path = child_path(parent, field);
            match node_at(&mut document, parent).and_then(Value::as_mapping_mut) {
                Some(mapping) => {
                    mapping.insert(Value::String(field.to_string()), STAND_INS[0]());
                    stand_ins.push((path, 0));
                    true
                }
                None => false,
            }
        } else if let Some((path, tried)) =
            stand_ins.iter_mut().find(|(path, _)| *path == problem.path)
        {
            // The stand-in is of the wrong type: the next one.
            *tried += 1;
            match (STAND_INS.get(*tried), node_at(&mut document, path)) {
                (Some(stand_in), Some(node)) => {
                    *node = stand_in();
                    true
                }
                _ => false,
            }
        } else if can_skip(&problem) && remove_key(&mut document, &problem.path) {
            taken_out.push(problem.path);
            true
        } else {
            false
        };
        if !mended {
            break;
        }
        let next = match reparse(&document) {
            Ok(raw) => return Reading::new(Some(raw), problems, &stand_ins),
            Err(next) => placed(yaml_problem(&next), locator),
        };
        // A key missing because it was taken out is reported already; so is a stand-in
        // serde refused.
        let known = missing_field(&next)
            .is_some_and(|(parent, field)| taken_out.contains(&child_path(parent, field)))
            || stand_ins.iter().any(|(path, _)| *path == next.path);
        if !known {
            problems.push(next.clone());
        }
        current = Some(next);
    }
    Reading::new(None, problems, &stand_ins)
}

impl Reading {
    /// The reading's outcome; `stand_ins` pairs each stand-in's path with the one it holds.
    fn new(raw: Option<RawConfig>, problems: Vec<Problem>, stand_ins: &[(String, usize)]) -> Self {
        let paths = stand_ins.iter().map(|(path, _)| path.clone()).collect();
        Reading {
            raw,
            problems,
            stand_ins: StandIns(paths),
        }
    }
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
/// (no path), not a sequence item (taking it out would renumber the rest).
fn can_skip(problem: &Problem) -> bool {
    !problem.path.is_empty() && !problem.path.ends_with(']')
}

/// The path of the mapping and the key in "missing field `key`" (`listeners.web`, `listen`).
fn missing_field(problem: &Problem) -> Option<(&str, &str)> {
    let field = problem
        .message
        .strip_prefix("missing field `")?
        .split_once('`')?
        .0;
    Some((problem.path.as_str(), field))
}

/// `parent.field`, as serde_yaml writes paths (`field` alone at the top).
fn child_path(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
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
        path = child_path(&path, field);
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

/// One step of a key path through the document.
enum Segment {
    Index(usize),
    Key(Value),
}

/// `path`, written as serde_yaml writes paths (`pools.portal.backends[0].weight`), split into
/// the steps it takes through `document`. Names may contain dots (`listeners.tax.v2`), so at
/// each mapping the longest key the path continues with is taken.
fn segments(document: &Value, path: &str) -> Option<Vec<Segment>> {
    let mut node = document;
    let mut rest = path;
    let mut segments = Vec::new();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let (index, after) = after.split_once(']')?;
            let index = index.parse::<usize>().ok()?;
            node = node.as_sequence()?.get(index)?;
            segments.push(Segment::Index(index));
            rest = after;
        } else {
            let mapping = node.as_mapping()?;
            let (key, name_length) = mapping
                .keys()
                .filter_map(|key| {
                    let name = key_text(key)?;
                    let after = rest.strip_prefix(name.as_str())?;
                    (after.is_empty() || after.starts_with(['.', '[']))
                        .then(|| (key.clone(), name.len()))
                })
                .max_by_key(|(_, length)| *length)?;
            node = mapping.get(&key)?;
            segments.push(Segment::Key(key));
            rest = &rest[name_length..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Some(segments)
}

/// The node `segments` lead to.
fn walk<'d>(mut node: &'d mut Value, segments: &[Segment]) -> Option<&'d mut Value> {
    for segment in segments {
        node = match segment {
            Segment::Index(index) => node.as_sequence_mut()?.get_mut(*index)?,
            Segment::Key(key) => node.as_mapping_mut()?.get_mut(key)?,
        };
    }
    Some(node)
}

/// The node at `path` (the whole document for an empty path).
fn node_at<'d>(document: &'d mut Value, path: &str) -> Option<&'d mut Value> {
    let segments = segments(document, path)?;
    walk(document, &segments)
}

/// Removes the key at `path`.
fn remove_key(document: &mut Value, path: &str) -> bool {
    let Some(mut segments) = segments(document, path) else {
        return false;
    };
    let Some(Segment::Key(key)) = segments.pop() else {
        return false;
    };
    walk(document, &segments)
        .and_then(Value::as_mapping_mut)
        .is_some_and(|mapping| mapping.shift_remove(&key).is_some())
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
        let reading = read(text, &LazyLocator::new(text));
        reading
            .problems
            .into_iter()
            .map(|problem| problem.path)
            .collect()
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
        let Reading { raw, problems, .. } = read(text, &LazyLocator::new(text));
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
    fn a_syntax_error_ends_the_reading() {
        assert_eq!(paths("listeners: [\n").len(), 1);
    }

    #[test]
    fn missing_keys_are_reported_and_stood_in_for() {
        let text = "\
listeners:
  web: { pool: p }
pools:
  p:
    backends:
      - name: a
      - { address: \"127.0.0.1:2\", capacity: { memory_gib: 2 } }
    bogus: 1
";
        let reading = read(text, &LazyLocator::new(text));
        let found: Vec<_> = reading
            .problems
            .iter()
            .map(|problem| {
                (
                    problem.path.as_str(),
                    problem.line,
                    problem.message.as_str(),
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                ("listeners.web", Some(2), "missing field `listen`"),
                ("pools.p.backends[0]", Some(6), "missing field `address`"),
                (
                    "pools.p.backends[1].capacity",
                    Some(7),
                    "missing field `cpu`"
                ),
                ("pools.p.backends[1]", Some(7), "missing field `name`"),
                ("pools.p.bogus", Some(8), found[4].2),
            ]
        );
        assert!(found[4].2.starts_with("unknown field `bogus`"));
        let raw = reading.raw.expect("the rest of the file is read");
        assert_eq!(raw.pools.0[0].1.backends[1].address, "127.0.0.1:2");
        assert!(reading.stand_ins.cover("listeners.web.listen"));
        assert!(reading.stand_ins.cover("pools.p.backends[1].capacity.cpu"));
        assert!(reading.stand_ins.cover("pools.p.backends[1].capacity"));
        assert!(!reading.stand_ins.cover("pools.p.backends[1].weight"));
        assert!(!reading.stand_ins.cover("listeners.web.listener"));
        assert!(!reading.stand_ins.cover("listeners"));
        // The top-level mappings, missing, are stood in for too.
        assert_eq!(paths("admin: {}\n"), ["", ""]);
    }

    #[test]
    fn a_required_key_of_the_wrong_type_is_reported_once_not_again_as_missing() {
        assert_eq!(
            paths(
                "extra: 1\nlisteners:\n  web: { listen: [1], pool: p }\n  other: {}\npools: {}\n"
            ),
            ["extra", "listeners.web.listen", "listeners.other"]
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
        let Reading { raw, problems, .. } = read(text, &LazyLocator::new(text));
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
    fn a_repeated_key_is_blanked_out_with_its_block_and_nothing_else() {
        let text = "pools:\n  p:\n    backends:\n    - name: a\n    backends:\n    # note\n    - name: b\n      address: x\n\n    timeouts: {}\n";
        let repeats = Locator::new(text).repeats();
        assert_eq!(repeats.len(), 1);
        assert_eq!(
            without(text, &repeats),
            "pools:\n  p:\n    backends:\n    - name: a\n\n\n\n\n\n    timeouts: {}\n",
            "the key, its items at its indentation, what is deeper, blank and comment lines"
        );
    }

    #[test]
    fn a_key_repeated_in_flow_mappings_is_blanked_out_with_its_comma_and_nothing_else() {
        let text = "pools:\n  p:\n    health_check: &hc { type: http, path: /h, type: tcp }\n    backends:\n    - { name: a, name: b, address: x }\n";
        let repeats = Locator::new(text).repeats();
        assert_eq!(repeats.len(), 2);
        assert_eq!(
            without(text, &repeats),
            "pools:\n  p:\n    health_check: &hc { type: http, path: /h            }\n    backends:\n    - { name: a         , address: x }\n",
            "each entry and the comma before it, every column kept"
        );
    }

    proptest::proptest! {
        /// Whatever the text, finding its repetitions and blanking them out never panics and
        /// keeps every line and every column where it was.
        #[test]
        fn blanking_out_repetitions_keeps_every_line_and_column(
            text in "([a-cé\t]|[ :,'\"#&!{}\\[\\]-]|\n){0,120}",
        ) {
            let repeats = Locator::new(&text).repeats();
            let blanked = without(&text, &repeats);
            let lines = |text: &str| text.split('\n').map(str::len).collect::<Vec<_>>();
            let (before, after) = (lines(&text), lines(&blanked));
            proptest::prop_assert_eq!(before.len(), after.len());
            for (was, is) in before.iter().zip(&after) {
                proptest::prop_assert!(*is == *was || *is == 0, "{} -> {}", was, is);
            }
        }

        /// Whatever the text, reading it ends with a configuration or with problems.
        #[test]
        fn any_text_is_read_or_refused_with_problems(
            text in "(listeners|pools|p|listen|backends|name|address|[ :,'\"&*!{}\\[\\]-]|\n){0,60}",
        ) {
            let Reading { raw, problems, .. } = read(&text, &LazyLocator::new(&text));
            proptest::prop_assert!(raw.is_some() || !problems.is_empty());
        }
    }

    #[test]
    fn a_valid_file_has_no_problems() {
        let text = "listeners: {}\npools: {}\n";
        let Reading { raw, problems, .. } = read(text, &LazyLocator::new(text));
        assert!(raw.is_some());
        assert!(problems.is_empty());
    }

    #[test]
    fn only_a_problem_makes_the_locator() {
        let valid = "listeners: {}\npools: {}\n";
        let locator = LazyLocator::new(valid);
        assert!(read(valid, &locator).problems.is_empty());
        assert!(
            !locator.is_made(),
            "a valid file was scanned for key positions"
        );

        let mistyped = "listeners: {}\npools: {}\nlisteners_typo: 1\n";
        let locator = LazyLocator::new(mistyped);
        let reading = read(mistyped, &locator);
        assert_eq!(reading.problems.len(), 1, "{:?}", reading.problems);
        assert_eq!(reading.problems[0].line, Some(3));
        assert!(locator.is_made());
    }
}
