//! The actor tier's files import one another without circles: publishers
//! own their events and never name their subscribers' messages, so every
//! `use crate::…` runs one way. A change that closes a circle fails here,
//! naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each file of `actors/src` (its module name) and the modules it imports,
/// test modules left out.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut names = BTreeSet::new();
    let mut texts = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs") && stem != "lib" {
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap()
                .to_string();
            names.insert(stem.to_string());
            texts.insert(stem.to_string(), text);
        }
    }
    texts
        .into_iter()
        .map(|(module, text)| {
            let deps = text
                .match_indices("crate::")
                .filter_map(|(at, _)| {
                    let rest = &text[at + "crate::".len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                        .collect();
                    (names.contains(&name) && name != module).then_some(name)
                })
                .collect();
            (module, deps)
        })
        .collect()
}

/// A path from `from` back to `to`, if there is one.
fn path_back(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if from == to {
        return Some(vec![to.to_string()]);
    }
    if !seen.insert(from.to_string()) {
        return None;
    }
    for next in graph.get(from).into_iter().flatten() {
        if let Some(mut rest) = path_back(graph, next, to, seen) {
            rest.insert(0, from.to_string());
            return Some(rest);
        }
    }
    None
}

#[test]
fn no_file_in_actors_src_imports_a_file_that_imports_it() {
    let graph = imports();
    assert!(graph.len() > 15, "the files were not found: {graph:?}");
    let mut circles = Vec::new();
    for (module, deps) in &graph {
        for dep in deps {
            if let Some(back) = path_back(&graph, dep, module, &mut BTreeSet::new()) {
                circles.push(format!("{module} → {}", back.join(" → ")));
            }
        }
    }
    assert!(
        circles.is_empty(),
        "import circles among actors/src files:\n{}",
        circles.join("\n")
    );
}

#[test]
fn publishers_do_not_import_their_subscribers() {
    let graph = imports();
    // (publisher, subscriber whose messages it once named)
    for (publisher, subscriber) in [
        ("queue", "dispatch"),
        ("queue", "fanin"),
        ("container", "dispatch"),
        ("health", "instances"),
        ("gpu_monitor", "supervisor"),
    ] {
        assert!(
            !graph[publisher].contains(subscriber),
            "{publisher} imports {subscriber}: it should publish its own events instead"
        );
    }
}
