//! Maps a key path (`pools.portal.backends[2].address`) to its line and column in the file.
//!
//! serde reports where *syntax* errors are, but validation problems are found after
//! deserialisation, when positions are gone. This scanner walks block-style YAML by
//! indentation and records where each key and sequence item starts; a path written in flow
//! style (`{ cert: a, key: b }`) resolves to its nearest block-style ancestor.

use std::collections::HashMap;

/// Line and column (both 1-based) of every block-style key path in a YAML document.
#[derive(Debug, Default)]
pub struct Locator {
    /// Every place a path occurs, in file order: a name given twice (`listeners: { web: …,
    /// web: … }`) has two.
    positions: HashMap<String, Vec<(usize, usize)>>,
    /// The key each path of a key (not of a sequence item) ends with.
    keys: HashMap<String, String>,
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
        let mut positions: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        let mut keys = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for (line_index, line) in text.lines().enumerate() {
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
                positions
                    .entry(path_of(&stack))
                    .or_default()
                    .push((line_index + 1, column + 1));
                let content = after_dash.trim_start_matches(' ');
                column += 1 + (after_dash.len() - content.len());
                rest = content;
            }
            let Some(key) = key_of(rest) else { continue };
            while stack.last().is_some_and(|top| top.indent() >= column) {
                stack.pop();
            }
            stack.push(Frame::Key {
                indent: column,
                name: key.clone(),
            });
            let path = path_of(&stack);
            positions
                .entry(path.clone())
                .or_default()
                .push((line_index + 1, column + 1));
            keys.insert(path, key);
        }
        Locator { positions, keys }
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

/// The mapping key at the start of `text`, if the line is `key:` or `key: value`.
fn key_of(text: &str) -> Option<String> {
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
        Some(key.to_string())
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
    fn flow_style_falls_back_to_ancestor() {
        let locator = Locator::new(DOC);
        assert_eq!(locator.find("listeners.web.routes[0].pool"), Some((5, 7)));
        assert_eq!(locator.find("nothing.here"), None);
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
