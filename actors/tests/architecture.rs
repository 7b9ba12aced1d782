//! The actor tier's files import one another without circles: publishers
//! own their events and never name their subscribers' messages, so every
//! `use crate::…` runs one way. A module may be a file or a folder; the
//! files inside a folder import one another without circles too. And the
//! tier does no host I/O: it reaches the world through its ports only. A
//! change that breaks one of these fails here, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// One source file of `actors/src`, its test module left out.
struct Source {
    /// Its path below `actors/src`, e.g. `container/launch.rs`.
    path: String,
    /// The top-level module it belongs to (`container` for `container/*.rs`).
    module: String,
    /// The folder it sits in, for a file inside a module's folder.
    folder: Option<String>,
    /// Its file stem (`mod` for a folder's root).
    stem: String,
    /// Its text up to its test module.
    text: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every file of `actors/src` but `lib.rs`.
fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&root, &mut paths);
    paths
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(&root).unwrap();
            let parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts == ["lib"] {
                return None;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            Some(Source {
                path: rel.to_string_lossy().into_owned(),
                module: parts[0].clone(),
                folder: (parts.len() > 1).then(|| parts[..parts.len() - 1].join("/")),
                stem: parts.last().unwrap().clone(),
                text: text.to_string(),
            })
        })
        .collect()
}

/// The names that follow each `prefix` in `text`.
fn names_after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    text.match_indices(prefix).map(move |(at, _)| {
        text[at + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect()
    })
}

/// Each top-level module of `actors/src` and the modules it imports.
fn imports() -> Graph {
    let sources = sources();
    let names: BTreeSet<String> = sources.iter().map(|s| s.module.clone()).collect();
    let mut graph = Graph::new();
    for s in &sources {
        let deps = graph.entry(s.module.clone()).or_default();
        for name in names_after(&s.text, "crate::") {
            if names.contains(&name) && name != s.module {
                deps.insert(name);
            }
        }
    }
    graph
}

/// Within each folder, its files (but the root `mod.rs`, which declares
/// them) and the sibling files each imports through `super::`.
fn folder_imports() -> BTreeMap<String, Graph> {
    let sources = sources();
    let mut folders: BTreeMap<String, Graph> = BTreeMap::new();
    for s in sources.iter().filter(|s| s.stem != "mod") {
        let Some(folder) = &s.folder else { continue };
        let siblings: BTreeSet<&str> = sources
            .iter()
            .filter(|o| o.folder.as_ref() == Some(folder) && o.stem != "mod")
            .map(|o| o.stem.as_str())
            .collect();
        let deps = names_after(&s.text, "super::")
            .filter(|n| siblings.contains(n.as_str()) && *n != s.stem)
            .collect();
        folders
            .entry(folder.clone())
            .or_default()
            .insert(s.stem.clone(), deps);
    }
    folders
}

/// A path from `from` back to `to`, if there is one.
fn path_back(
    graph: &Graph,
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

/// Every circle of `graph`, one line each.
fn circles(graph: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for (module, deps) in graph {
        for dep in deps {
            if let Some(back) = path_back(graph, dep, module, &mut BTreeSet::new()) {
                found.push(format!("{module} → {}", back.join(" → ")));
            }
        }
    }
    found
}

#[test]
fn no_file_in_actors_src_imports_a_file_that_imports_it() {
    let graph = imports();
    assert!(graph.len() > 15, "the files were not found: {graph:?}");
    let found = circles(&graph);
    assert!(
        found.is_empty(),
        "import circles among actors/src modules:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_files_of_a_folder_import_one_another_without_circles() {
    let folders = folder_imports();
    assert!(
        folders.contains_key("container"),
        "the folders were not found: {folders:?}"
    );
    for (folder, graph) in &folders {
        let found = circles(graph);
        assert!(
            found.is_empty(),
            "import circles among the files of actors/src/{folder}:\n{}",
            found.join("\n")
        );
    }
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

#[test]
fn no_file_outside_the_testkit_reads_the_host() {
    let mut reads = Vec::new();
    for s in sources().iter().filter(|s| s.module != "testkit") {
        for what in ["std::fs", "fs::read", "/proc/", "std::process"] {
            if s.text.contains(what) {
                reads.push(format!("{} uses {what}", s.path));
            }
        }
    }
    assert!(
        reads.is_empty(),
        "the actors crate reaches the host only through its ports:\n{}",
        reads.join("\n")
    );
}
