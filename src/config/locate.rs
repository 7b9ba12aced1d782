//! Finding where in the file a key is, so that every error names its line.

use toml_edit::{Document, Item};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seg<'a> {
    /// A key in a table.
    Key(&'a str),
    /// An element of an array (of tables).
    Index(usize),
}

/// 1-based line of byte `offset` in `text`.
pub(crate) fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The line of the item at `path`, or of its nearest ancestor that is in the
/// file (a missing key is reported at its table).
pub(crate) fn line_of(text: &str, path: &[Seg<'_>]) -> Option<usize> {
    let doc = Document::parse(text).ok()?;
    let mut item: &Item = doc.as_item();
    let mut best = None;
    for seg in path {
        let next = match seg {
            Seg::Key(k) => item.get(*k),
            Seg::Index(i) => item.get(*i),
        };
        match next {
            Some(n) => {
                item = n;
                if let Some(span) = span_of(item) {
                    best = Some(line_of_offset(text, span.start));
                }
            }
            None => break,
        }
    }
    best
}

fn span_of(item: &Item) -> Option<std::ops::Range<usize>> {
    match item {
        Item::Table(t) => t.span(),
        other => other.span(),
    }
}

/// The dotted key and line at byte `offset`, for parse errors: the key
/// written on that line (if any) inside the nearest table header above it.
pub(crate) fn key_at(text: &str, offset: usize) -> (String, Option<usize>) {
    let line_no = line_of_offset(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line_no - 1).copied().unwrap_or("");
    let mut table = String::new();
    for (i, l) in lines[..line_no.min(lines.len())].iter().enumerate().rev() {
        let t = l.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim();
            let index = lines[..=i]
                .iter()
                .filter(|x| {
                    x.trim()
                        .strip_prefix("[[")
                        .and_then(|r| r.split("]]").next())
                        .is_some_and(|n| n.trim() == name)
                })
                .count()
                - 1;
            table = format!("{name}[{index}]");
            break;
        }
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
            break;
        }
    }
    let key = here
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let dotted = match (table.is_empty(), key) {
        (_, Some(k)) if table.is_empty() => k,
        (_, Some(k)) => format!("{table}.{k}"),
        (_, None) => table,
    };
    (dotted, Some(line_no))
}

/// Makes serde's messages read as advice about the file.
pub(crate) fn tidy_message(msg: &str) -> String {
    msg.trim()
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing required key")
        .replace("expected u16", "expected a whole number from 0 to 65535")
        .replace("expected u32", "expected a whole number (0 or more)")
        .replace("expected u64", "expected a whole number (0 or more)")
        .replace("expected f64", "expected a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[queue]\nlease_s = 3\n\n[[instances]]\nname = \"a\"\nport = 1\n\n[[instances]]\nname = \"b\"\nport = 2\n";

    #[test]
    fn finds_keys_in_arrays_of_tables() {
        let at = |p: &[Seg<'_>]| line_of(DOC, p);
        assert_eq!(at(&[Seg::Key("queue"), Seg::Key("lease_s")]), Some(2));
        assert_eq!(
            at(&[Seg::Key("instances"), Seg::Index(1), Seg::Key("port")]),
            Some(10)
        );
        // A missing key is reported at its table.
        assert_eq!(
            at(&[Seg::Key("instances"), Seg::Index(1), Seg::Key("url")]),
            Some(8)
        );
    }

    #[test]
    fn names_the_key_at_an_offset() {
        let offset = DOC.find("port = 2").unwrap();
        assert_eq!(key_at(DOC, offset), ("instances[1].port".into(), Some(10)));
        let offset = DOC.find("lease_s").unwrap();
        assert_eq!(key_at(DOC, offset), ("queue.lease_s".into(), Some(2)));
    }
}
