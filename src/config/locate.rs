//! Maps a key path (`pools.portal.backends[2].address`) to its line and column in the file.
//!
//! serde reports where *syntax* errors are, but validation problems are found after
//! deserialisation, when positions are gone. This scanner walks block-style YAML by
//! indentation and records where each key and sequence item starts, and the keys of a flow
//! collection that opens and closes on one line (`- { cert: a, key: b }`); a path inside a
//! flow collection spread over several lines resolves to its nearest recorded ancestor.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::ops::Range;

/// Line and column (both 1-based) of every block-style key path in a YAML document.
#[derive(Debug, Default)]
pub struct Locator {
    /// Every place a path occurs, in file order: a name given twice (`listeners: { web: …,
    /// web: … }`) has two.
    positions: HashMap<String, Vec<(usize, usize)>>,
    /// The key each path of a key (not of a sequence item) ends with.
    keys: HashMap<String, String>,
    /// For a key in a flow mapping, by its place: the bytes of its line that hold its entry
    /// with the comma before it (`, listen: "b"`), which can go without breaking the line.
    flow_entries: HashMap<(usize, usize), Range<usize>>,
}

/// A [`Locator`] made the first time something asks where a key is: only a problem needs
/// placing, so a file that reads and validates cleanly — every reload of a good
/// configuration — never pays for the scan (≈ 40 % of the instructions of checking a
/// 1,000-backend file).
pub struct LazyLocator<'t> {
    text: &'t str,
    made: OnceCell<Locator>,
}

impl<'t> LazyLocator<'t> {
    /// A locator for `text`, not made yet.
    pub fn new(text: &'t str) -> Self {
        LazyLocator {
            text,
            made: OnceCell::new(),
        }
    }

    /// The locator, made now if it was not yet.
    pub fn get(&self) -> &Locator {
        self.made.get_or_init(|| Locator::new(self.text))
    }

    /// Whether something asked for the locator.
    #[cfg(test)]
    pub fn is_made(&self) -> bool {
        self.made.get().is_some()
    }
}

/// A key given again in the mapping that already has it, where it is given again.
#[derive(Debug, PartialEq, Eq)]
pub struct Repeat {
    pub path: String,
    /// The key itself (the last step of `path`; a name may hold dots).
    pub key: String,
    pub line: usize,
    pub column: usize,
    /// The line of the key's first occurrence.
    pub first_line: usize,
    /// In a flow mapping: the bytes of its line that hold this entry and the comma before it.
    /// Else the key's lines (the key's, and every line indented deeper) hold it.
    pub flow_entry: Option<Range<usize>>,
}

enum Frame {
    Key { indent: usize, name: String },
    Item { indent: usize, index: usize },
}

impl Frame {
    fn indent(&self) -> usize {
        match self {
            Frame::Key { indent, .. } | Frame::Item { indent, .. } => *indent,
        }
    }
}

impl Locator {
    /// Scans `text`; never fails (unparseable lines are skipped).
    pub fn new(text: &str) -> Self {
        let mut locator = Locator::default();
        let mut stack: Vec<Frame> = Vec::new();
        // Brackets a flow collection left open on an earlier line: its next lines are inside
        // it, not keys of their own.
        let mut open_flow = 0;
        for (line_index, line) in text.lines().enumerate() {
            if open_flow > 0 {
                open_flow = (open_flow + bracket_balance(line)).max(0);
                continue;
            }
            let trimmed = line.trim_start_matches(' ');
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
                continue;
            }
            let mut column = line.len() - trimmed.len();
            let mut rest = trimmed;
            while let Some(after_dash) = rest
                .strip_prefix('-')
                .filter(|r| r.is_empty() || r.starts_with(' '))
            {
                let mut previous_index = None;
                while let Some(top) = stack.last() {
                    match top {
                        Frame::Item { indent, index } if *indent == column => {
                            previous_index = Some(*index);
                            stack.pop();
                            break;
                        }
                        _ if top.indent() > column => {
                            stack.pop();
                        }
                        _ => break,
                    }
                }
                let index = previous_index.map_or(0, |i| i + 1);
                stack.push(Frame::Item {
                    indent: column,
                    index,
                });
                locator.record(path_of(&stack), None, (line_index + 1, column + 1));
                let content = after_dash.trim_start_matches(' ');
                column += 1 + (after_dash.len() - content.len());
                rest = content;
            }
            let Some((key, value_at)) = key_of(rest) else {
                open_flow = locator.follow_flow(line, line_index + 1, column, &path_of(&stack));
                continue;
            };
            while stack.last().is_some_and(|top| top.indent() >= column) {
                stack.pop();
            }
            stack.push(Frame::Key {
                indent: column,
                name: key.clone(),
            });
            let path = path_of(&stack);
            locator.record(path.clone(), Some(key), (line_index + 1, column + 1));
            open_flow = locator.follow_flow(line, line_index + 1, column + value_at, &path);
        }
        locator
    }

    /// Records the keys of the flow collection that starts at byte `at` of `line` (past an
    /// anchor or tag), if one does, as `path`'s value; how many of its brackets the line
    /// leaves open.
    fn follow_flow(&mut self, line: &str, line_number: usize, at: usize, path: &str) -> isize {
        let value = line.get(at..).unwrap_or_default();
        let at = at + after_anchor(value);
        let value = line.get(at..).unwrap_or_default();
        if !value.starts_with(['{', '[']) {
            return 0;
        }
        FlowScan::new(line, line_number, at).collection(path, self, 0);
        bracket_balance(value)
    }

    /// Notes that `path` (a key's, naming `key`, or an item's) occurs at `place`.
    fn record(&mut self, path: String, key: Option<String>, place: (usize, usize)) {
        if let Some(key) = key {
            self.keys.insert(path.clone(), key);
        }
        self.positions.entry(path).or_default().push(place);
    }

    /// The position of `path` (its first occurrence), or of its nearest recorded ancestor.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut candidate = path;
        loop {
            if let Some(position) = self.positions.get(candidate).and_then(|all| all.first()) {
                return Some(*position);
            }
            let cut = candidate.rfind(['.', '['])?;
            candidate = &candidate[..cut];
        }
    }

    /// Every later occurrence of a key given more than once in one mapping (two `listen:` in
    /// a listener, two pools named `p`), in file order, with the line of its first: one whose
    /// enclosing key repeats too is left out, as the enclosing repetition holds it.
    pub fn repeats(&self) -> Vec<Repeat> {
        let repeated = |path: &str| self.positions.get(path).is_some_and(|all| all.len() > 1);
        let enclosed = |path: &str| {
            path.match_indices(['.', '['])
                .any(|(cut, _)| repeated(&path[..cut]))
        };
        let mut repeats: Vec<Repeat> = self
            .positions
            .iter()
            .filter(|(path, all)| all.len() > 1 && !enclosed(path))
            .flat_map(|(path, all)| {
                all[1..].iter().map(|&(line, column)| Repeat {
                    path: path.clone(),
                    key: self.keys.get(path).cloned().unwrap_or_default(),
                    line,
                    column,
                    first_line: all[0].0,
                    flow_entry: self.flow_entries.get(&(line, column)).cloned(),
                })
            })
            .collect();
        repeats.sort_by_key(|repeat| repeat.line);
        repeats
    }

    /// The position of `path`'s `nth` occurrence (from 0), for a name given more than once;
    /// else as [`Locator::find`].
    pub fn find_occurrence(&self, path: &str, nth: usize) -> Option<(usize, usize)> {
        match self.positions.get(path).and_then(|all| all.get(nth)) {
            Some(position) => Some(*position),
            None => self.find(path),
        }
    }
}

fn path_of(stack: &[Frame]) -> String {
    let mut path = String::new();
    for frame in stack {
        match frame {
            Frame::Key { name, .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(name);
            }
            Frame::Item { index, .. } => {
                path.push('[');
                path.push_str(&index.to_string());
                path.push(']');
            }
        }
    }
    path
}

/// Where a value starts past its anchor or tag (`&checks { … }`, `!!map { … }`), if any.
fn after_anchor(value: &str) -> usize {
    if !value.starts_with(['&', '!']) {
        return 0;
    }
    let token = value.find(' ').unwrap_or(value.len());
    value.len() - value[token..].trim_start_matches(' ').len()
}

/// How many more flow brackets `text` opens than it closes (outside quoted scalars and
/// comments; a quote inside a plain scalar, `it's`, opens nothing).
fn bracket_balance(text: &str) -> isize {
    let mut balance = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    // Whether the character before may precede the start of a scalar or a comment (or this
    // is the first).
    let mut at_boundary = true;
    for char in text.chars() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if char == '\\' => escaped = true,
            Some(open) if char == open => quote = None,
            Some(_) => {}
            None => match char {
                '"' | '\'' if at_boundary => quote = Some(char),
                '{' | '[' => balance += 1,
                '}' | ']' => balance -= 1,
                '#' if at_boundary => break,
                _ => {}
            },
        }
        at_boundary = " {[,:".contains(char);
    }
    balance
}

/// Flow collections nested deeper than this are not followed (the scan recurses).
const MAX_FLOW_DEPTH: usize = 16;

/// Reads the flow collection (`{ … }` or `[ … ]`) that starts at byte `at` of one line and
/// records the keys of its mappings; it stops, keeping what it recorded, at the line's end
/// or at anything it does not follow (a flow collection spread over several lines).
struct FlowScan<'a> {
    line: &'a str,
    line_number: usize,
    at: usize,
}

impl<'a> FlowScan<'a> {
    fn new(line: &'a str, line_number: usize, at: usize) -> Self {
        FlowScan {
            line,
            line_number,
            at,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.line.as_bytes().get(self.at).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.at += 1;
        }
    }

    /// The collection at `at`, whose path is `path`; `None` where the scan stops.
    fn collection(&mut self, path: &str, locator: &mut Locator, depth: usize) -> Option<()> {
        if depth > MAX_FLOW_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => self.mapping(path, locator, depth),
            b'[' => self.sequence(path, locator, depth),
            _ => None,
        }
    }

    fn mapping(&mut self, path: &str, locator: &mut Locator, depth: usize) -> Option<()> {
        // The comma before the entry (for the first, the brace: never a repetition).
        let mut entry_start = self.at;
        self.at += 1;
        loop {
            self.skip_spaces();
            if self.peek()? == b'}' {
                self.at += 1;
                return Some(());
            }
            let key_at = self.at;
            let key = self.scalar()?;
            self.skip_spaces();
            if self.peek()? != b':' {
                return None;
            }
            self.at += 1;
            self.skip_spaces();
            let key_path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let place = (self.line_number, key_at + 1);
            locator.record(key_path.clone(), Some(key), place);
            if matches!(self.peek()?, b'{' | b'[') {
                self.collection(&key_path, locator, depth + 1)?;
            } else {
                self.scalar()?;
            }
            locator.flow_entries.insert(place, entry_start..self.at);
            self.skip_spaces();
            match self.peek()? {
                b',' => {
                    entry_start = self.at;
                    self.at += 1;
                }
                b'}' => {}
                _ => return None,
            }
        }
    }

    fn sequence(&mut self, path: &str, locator: &mut Locator, depth: usize) -> Option<()> {
        self.at += 1;
        let mut index = 0;
        loop {
            self.skip_spaces();
            match self.peek()? {
                b']' => {
                    self.at += 1;
                    return Some(());
                }
                b'{' | b'[' => {
                    let item_path = format!("{path}[{index}]");
                    locator.record(item_path.clone(), None, (self.line_number, self.at + 1));
                    self.collection(&item_path, locator, depth + 1)?;
                }
                _ => {
                    self.scalar()?;
                }
            }
            self.skip_spaces();
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    index += 1;
                }
                b']' => {}
                _ => return None,
            }
        }
    }

    /// A quoted or plain scalar at `at` (a key or a value), as written between its quotes.
    fn scalar(&mut self) -> Option<String> {
        let rest = self.line.get(self.at..)?;
        let (text, length) = match rest.as_bytes().first()? {
            b'"' => {
                let mut escaped = false;
                let end = rest.char_indices().skip(1).find_map(|(index, char)| {
                    let closes = char == '"' && !escaped;
                    escaped = char == '\\' && !escaped;
                    closes.then_some(index)
                })?;
                (rest.get(1..end)?, end + 1)
            }
            b'\'' => {
                let end = rest.get(1..)?.find('\'')? + 1;
                (rest.get(1..end)?, end + 1)
            }
            _ => {
                // A plain scalar ends at a flow indicator, or at a colon before a space or an
                // indicator (`a:b` is one scalar, `a: b` a key and its value).
                let bytes = rest.as_bytes();
                let end = (0..bytes.len())
                    .find(|&index| match bytes[index] {
                        b',' | b'{' | b'}' | b'[' | b']' => true,
                        b':' => bytes
                            .get(index + 1)
                            .is_none_or(|next| b" ,{}[]".contains(next)),
                        b'#' => index > 0 && bytes[index - 1] == b' ',
                        _ => false,
                    })
                    .unwrap_or(bytes.len());
                (rest.get(..end)?.trim_end(), end)
            }
        };
        self.at += length;
        Some(text.to_string())
    }
}

/// The mapping key at the start of `text`, if the line is `key:` or `key: value`, and where
/// in `text` its value starts.
fn key_of(text: &str) -> Option<(String, usize)> {
    let (key, after) = if let Some(quoted) = text.strip_prefix('"') {
        let end = quoted.find('"')?;
        (&quoted[..end], &quoted[end + 1..])
    } else if let Some(quoted) = text.strip_prefix('\'') {
        let end = quoted.find('\'')?;
        (&quoted[..end], &quoted[end + 1..])
    } else {
        if text.starts_with(['{', '[', '|', '>', '&', '*', '!']) {
            return None;
        }
        let colon = text.find(':')?;
        (text[..colon].trim_end(), &text[colon..])
    };
    let after = after.trim_start();
    let value = after.strip_prefix(':')?;
    if value.is_empty() || value.starts_with([' ', '\t']) {
        let value_at = text.len() - value.trim_start_matches([' ', '\t']).len();
        Some((key.to_string(), value_at))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
listeners:
  web:
    listen: \"0.0.0.0:8080\"
    routes:
      - { host: a, pool: p }
      - host: b
        pool: q
pools:
  portal:
    backends:
    - name: vm-1
      address: 1.2.3.4:1
    - name: vm-2
      address: \"bad\"
";

    #[test]
    fn finds_block_keys_and_items() {
        let locator = Locator::new(DOC);
        assert_eq!(locator.find("listeners.web.listen"), Some((3, 5)));
        assert_eq!(locator.find("listeners.web.routes[1].pool"), Some((7, 9)));
        assert_eq!(
            locator.find("pools.portal.backends[1].address"),
            Some((14, 7))
        );
        assert_eq!(locator.find("pools.portal.backends[0]"), Some((11, 5)));
    }

    #[test]
    fn finds_the_keys_of_flow_collections_on_one_line() {
        let locator = Locator::new(DOC);
        assert_eq!(locator.find("listeners.web.routes[0].pool"), Some((5, 20)));
        assert_eq!(locator.find("listeners.web.routes[0].host"), Some((5, 11)));
        assert_eq!(locator.find("nothing.here"), None);
        let locator = Locator::new(
            "a:\n  b: { c: [ { d: \"x, y: }\" }, 'e' ], f: { 'g': 1 } } # c: 2\n  h: [ { i: j:k } ]\n",
        );
        assert_eq!(locator.find("a.b.c"), Some((2, 8)));
        assert_eq!(locator.find("a.b.c[0].d"), Some((2, 15)));
        assert_eq!(locator.find("a.b.f.g"), Some((2, 43)));
        assert_eq!(locator.find("a.h[0].i"), Some((3, 10)));
        let anchored = Locator::new(
            "a:\n  b: &checks { c: 1 }\n  d: !!map { e: 2 }\n  f:\n    - &g { h: 3 }\n",
        );
        assert_eq!(anchored.find("a.b.c"), Some((2, 16)));
        assert_eq!(anchored.find("a.d.e"), Some((3, 14)));
        assert_eq!(anchored.find("a.f[0].h"), Some((5, 12)));
        assert_eq!(locator.keys.get("a.b.f.g").map(String::as_str), Some("g"));
    }

    #[test]
    fn a_flow_collection_over_several_lines_falls_back_to_the_recorded_ancestor() {
        let locator = Locator::new(
            "a:\n  b: { c: 1,\n    d: 2, c: \"}#\" }\n  e: [ { f: 1 }, # ]\n    { g: 2 } ]\n  h: 1\n",
        );
        assert_eq!(locator.find("a.b.c"), Some((2, 8)));
        assert_eq!(locator.find("a.b.d"), Some((2, 3)), "at a.b");
        assert_eq!(locator.find("a.e[0].f"), Some((4, 10)));
        assert_eq!(locator.find("a.e[1].g"), Some((4, 3)), "at a.e");
        assert_eq!(locator.find("a.h"), Some((6, 3)));
        assert_eq!(
            locator.repeats(),
            [],
            "a continuation line holds no key of its own"
        );
        let locator = Locator::new("a: { b: it's, c: 1 }\nd: 2\n");
        assert_eq!(
            locator.find("d"),
            Some((2, 1)),
            "a quote inside a plain scalar"
        );
    }

    #[test]
    fn a_key_repeated_in_a_flow_mapping_is_listed_with_its_entry() {
        let line = "  web: { listen: a, pool: p, listen: \"b\" }";
        let locator = Locator::new(&format!("listeners:\n{line}\n"));
        let repeats = locator.repeats();
        assert_eq!(repeats.len(), 1);
        let repeat = &repeats[0];
        assert_eq!(
            (
                repeat.path.as_str(),
                repeat.line,
                repeat.column,
                repeat.first_line
            ),
            ("listeners.web.listen", 2, 30, 2)
        );
        let entry = repeat.flow_entry.clone().unwrap();
        assert_eq!(&line[entry], ", listen: \"b\"");
    }

    #[test]
    fn a_name_given_twice_has_both_places() {
        let locator = Locator::new("pools:\n  p:\n    backends: []\n  p:\n    backends: []\n");
        assert_eq!(locator.find("pools.p.backends"), Some((3, 5)), "the first");
        assert_eq!(locator.find_occurrence("pools.p", 1), Some((4, 3)));
        assert_eq!(locator.find_occurrence("pools.p", 2), Some((2, 3)));
    }

    #[test]
    fn repeated_keys_are_listed_where_they_repeat_but_not_inside_a_repetition() {
        let locator = Locator::new(
            "pools:\n  p:\n    backends: []\n    backends: []\n  q:\n    backends: []\n  q:\n    backends: []\n",
        );
        let repeat = |path: &str, key: &str, line, column, first_line| Repeat {
            path: path.to_string(),
            key: key.to_string(),
            line,
            column,
            first_line,
            flow_entry: None,
        };
        assert_eq!(
            locator.repeats(),
            [
                repeat("pools.p.backends", "backends", 4, 5, 3),
                repeat("pools.q", "q", 7, 3, 5)
            ]
        );
        assert_eq!(Locator::new(DOC).repeats(), []);
    }
}
