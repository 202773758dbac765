//! Reading past a structural error: serde stops at the first section it cannot read, which
//! would hide every error of the sections after it. The section at fault is blanked line for
//! line (so every later line keeps its number) or, for a required one, replaced by a minimal
//! stand-in, and the file is read again; the stand-in is never used for anything but finding
//! the next error.

/// Minimal stand-ins for the required top-level keys.
const STAND_INS: &[(&str, &str)] = &[
    ("ca", "ca: { generate: true }"),
    ("listen", "listen: 127.0.0.1:0"),
];

/// `text` without top-level section `key` (its lines kept, emptied; a required key's first line
/// becomes its stand-in), or with a missing required `key` added at the end. `None`: the
/// section cannot be found, so reading on would only repeat the error.
pub fn without_section(text: &str, key: &str) -> Option<String> {
    let stand_in = STAND_INS
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, line)| *line);
    let opening = format!("{key}:");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let Some(start) = lines.iter().position(|line| line.starts_with(&opening)) else {
        // A required key that is missing altogether: add it after everything else.
        let mut added = text.to_string();
        if !added.ends_with('\n') {
            added.push('\n');
        }
        added.push_str(stand_in?);
        added.push('\n');
        return Some(added);
    };
    let end = lines
        .iter()
        .enumerate()
        .skip(start + 1)
        .find(|(_, line)| {
            let first = line.chars().next();
            first.is_some_and(|c| !c.is_whitespace() && c != '#' && c != '-')
        })
        .map_or(lines.len(), |(index, _)| index);
    for line in lines.iter_mut().take(end).skip(start) {
        line.clear();
    }
    if let (Some(stand_in), Some(first)) = (stand_in, lines.get_mut(start)) {
        *first = stand_in.to_string();
    }
    let mut rebuilt = lines.join("\n");
    rebuilt.push('\n');
    Some(rebuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_blanked_and_line_numbers_are_kept() {
        let text = "listen: x\nroutes:\n  - host: a\n    bad: 1\nbreaker: { failures: 2 }\n";
        let out = without_section(text, "routes").unwrap();
        assert_eq!(out, "listen: x\n\n\n\nbreaker: { failures: 2 }\n");
        let out = without_section(text, "listen").unwrap();
        assert!(out.starts_with("listen: 127.0.0.1:0\nroutes:"));
        assert!(without_section(text, "ca")
            .unwrap()
            .ends_with("ca: { generate: true }\n"));
        assert_eq!(without_section(text, "nowhere"), None);
    }
}
