//! Finds the line and column of a key path (`routes[2].credential`) in block-style YAML text, so
//! errors found after parsing still point at the file. Best effort: when a segment cannot be
//! found (flow style, anchors) it answers the position of the deepest segment it did find.

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// 1-based (line, column) of `path` in `text`; (1, 1) when nothing matches.
pub fn locate(text: &str, path: &[Segment]) -> (usize, usize) {
    let lines: Vec<Line<'_>> = text.lines().map(Line::parse).collect();
    let mut best = (1, 1);
    let mut from = 0;
    let mut parent_indent: isize = -1;
    for segment in path {
        let found = match segment {
            Segment::Key(key) => find_key(&lines, from, parent_indent, key),
            Segment::Index(index) => find_item(&lines, from, parent_indent, *index),
        };
        let Some((line_index, indent)) = found else {
            break;
        };
        best = (line_index + 1, usize::try_from(indent).unwrap_or(0) + 1);
        from = line_index;
        parent_indent = indent;
    }
    best
}

struct Line<'a> {
    /// Indent of the first non-space character (a `-` counts as content here).
    raw_indent: isize,
    /// Indent of the first key on the line, after any `- ` item markers.
    key_indent: isize,
    /// Dash positions (indents) of the item markers that open this line.
    dashes: Vec<isize>,
    /// The text after the item markers.
    rest: &'a str,
    blank: bool,
}

impl<'a> Line<'a> {
    fn parse(line: &'a str) -> Self {
        let trimmed = line.trim_start_matches(' ');
        let raw_indent = isize::try_from(line.len() - trimmed.len()).unwrap_or(0);
        let blank = trimmed.is_empty() || trimmed.starts_with('#');
        let mut rest = trimmed;
        let mut indent = raw_indent;
        let mut dashes = Vec::new();
        while rest == "-" || rest.starts_with("- ") {
            dashes.push(indent);
            let after = rest.get(1..).unwrap_or("");
            let stripped = after.trim_start_matches(' ');
            indent += 1 + isize::try_from(after.len() - stripped.len()).unwrap_or(0);
            rest = stripped;
        }
        Self {
            raw_indent,
            key_indent: indent,
            dashes,
            rest,
            blank,
        }
    }

    fn key(&self) -> Option<&'a str> {
        let (key, _) = self.rest.split_once(':')?;
        Some(key.trim().trim_matches(|c| c == '"' || c == '\''))
    }
}

fn find_key(lines: &[Line<'_>], from: usize, parent: isize, key: &str) -> Option<(usize, isize)> {
    for (index, line) in lines.iter().enumerate().skip(from) {
        if line.blank {
            continue;
        }
        if index > from
            && line.raw_indent <= parent
            && line.dashes.first() != Some(&line.raw_indent)
        {
            return None;
        }
        if index > from && line.dashes.first().is_some_and(|d| *d <= parent) {
            return None;
        }
        if line.key_indent > parent && line.key() == Some(key) {
            return Some((index, line.key_indent));
        }
    }
    None
}

fn find_item(
    lines: &[Line<'_>],
    from: usize,
    parent: isize,
    wanted: usize,
) -> Option<(usize, isize)> {
    let mut item_indent = None;
    let mut seen = 0;
    for (index, line) in lines.iter().enumerate().skip(from + 1) {
        if line.blank {
            continue;
        }
        let dash = line.dashes.first().copied();
        if line.raw_indent <= parent && dash != Some(line.raw_indent) {
            return None;
        }
        let Some(dash) = dash else { continue };
        if dash < parent {
            return None;
        }
        let level = *item_indent.get_or_insert(dash);
        if dash != level {
            continue;
        }
        if seen == wanted {
            return Some((index, dash));
        }
        seen += 1;
    }
    None
}

/// Parses `routes[2].inject.name` into segments.
pub fn parse_path(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(open) = rest.find('[') {
            let (key, indexes) = rest.split_at(open);
            if !key.is_empty() {
                segments.push(Segment::Key(key.to_string()));
            }
            rest = indexes;
            for index in rest.split('[').filter(|s| !s.is_empty()) {
                if let Ok(n) = index.trim_end_matches(']').parse() {
                    segments.push(Segment::Index(n));
                }
            }
        } else if !rest.is_empty() {
            segments.push(Segment::Key(rest.to_string()));
        }
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "listen: 1\nca:\n  generate: true\nroutes:\n  - host: a\n    credential: x\n  - host: b\n    inject: { type: bearer }\n    credential: y\n";

    #[test]
    fn finds_nested_keys_and_items() {
        assert_eq!(locate(TEXT, &parse_path("ca.generate")), (3, 3));
        assert_eq!(locate(TEXT, &parse_path("routes[0].host")), (5, 5));
        assert_eq!(locate(TEXT, &parse_path("routes[1].credential")), (9, 5));
        assert_eq!(locate(TEXT, &parse_path("routes[1].inject.type")), (8, 5));
        assert_eq!(locate(TEXT, &parse_path("routes[2]")), (4, 1));
    }
}
