//! The files of `src/` import one another without circles, and no import
//! runs back up: a frontend may use the wiring, the adapters and the base,
//! never the reverse. A change that closes a circle or reaches up fails
//! here, naming the files.
//!
//! A module is a file's path under `src/`, folders written `a::b`
//! (`src/config/check.rs` is `config::check`, a folder's `mod.rs` the folder
//! itself). A folder's `mod.rs` is the table of contents of the files in it,
//! so imports between a module and its own ancestors are not counted; test
//! modules are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, highest first. A module belongs to the layer of the longest
/// name here that is it or one of its ancestors.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "frontends",
        &["main", "cli", "admin", "api", "mcp", "demo", "daemon"],
    ),
    ("wiring and views", &["admin::client", "views", "submit"]),
    (
        "adapters",
        &[
            "store", "runtime", "results", "gpu", "openai", "metrics", "sim", "systemd",
        ],
    ),
    ("base", &["config", "chunk", "logging"]),
];

/// Imports allowed although they break a rule, each with why: none.
const ALLOWED: &[(&str, &str)] = &[];

/// Each module of `src/` and the text of its file, test modules left out.
fn modules() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap().with_extension("");
            let parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let parts = match parts.split_last() {
                Some((last, rest)) if last == "mod" => rest.to_vec(),
                _ => parts,
            };
            if parts == ["lib"] || parts.last().is_some_and(|p| p == "tests") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap()
                .to_string();
            out.insert(parts.join("::"), text);
        }
    }
    out
}

/// The path segments written after `at` in `text`: `a::b::c`.
fn path_after(text: &str, at: usize) -> Vec<String> {
    let mut segs = Vec::new();
    let mut rest = &text[at..];
    loop {
        let seg: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if seg.is_empty() {
            break;
        }
        rest = &rest[seg.len()..];
        segs.push(seg);
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    segs
}

/// The longest module that `segs`, taken from the crate root, names.
fn resolve(names: &BTreeSet<String>, segs: &[String]) -> Option<String> {
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| names.contains(m))
}

fn is_ancestor(a: &str, b: &str) -> bool {
    b.starts_with(&format!("{a}::"))
}

/// Each module and the modules it imports.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(module, text)| {
            let mut deps = BTreeSet::new();
            let here: Vec<String> = module.split("::").map(String::from).collect();
            for (prefix, base) in [("crate::", vec![]), ("gpu_feeder::", vec![])] {
                for (at, _) in text.match_indices(prefix) {
                    let mut segs = base.clone();
                    segs.extend(path_after(text, at + prefix.len()));
                    deps.extend(resolve(&names, &segs));
                }
            }
            // `super::x`, relative to the file's folder.
            for (at, _) in text.match_indices("super::") {
                let mut segs = here[..here.len().saturating_sub(1)].to_vec();
                let mut rest = at + "super::".len();
                while text[rest..].starts_with("super::") {
                    segs.pop();
                    rest += "super::".len();
                }
                segs.extend(path_after(text, rest));
                deps.extend(resolve(&names, &segs));
            }
            deps.retain(|d| d != module && !is_ancestor(d, module) && !is_ancestor(module, d));
            (module.clone(), deps)
        })
        .collect()
}

fn allowed(from: &str, to: &str) -> bool {
    ALLOWED.contains(&(from, to))
}

/// Where `module` sits: 0 for the highest layer.
fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (_, names))| names.iter().map(move |n| (i, *n)))
        .filter(|(_, n)| *n == module || is_ancestor(n, module))
        .max_by_key(|(_, n)| n.len())
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("{module} is in no layer: add it to LAYERS"))
}

/// The circle through `start`, if there is one: a breadth-first walk along
/// the counted imports, remembering how each module was reached, until it
/// comes back to `start`.
fn circle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut reached_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(m) = queue.pop_front() {
        for d in graph
            .get(m)
            .into_iter()
            .flatten()
            .filter(|d| !allowed(m, d))
        {
            if d == start {
                let mut circle = vec![start.to_string(), m.to_string()];
                let mut at = m;
                while at != start {
                    at = reached_from[at];
                    circle.push(at.to_string());
                }
                circle.reverse();
                return Some(circle);
            }
            if !reached_from.contains_key(d.as_str()) {
                reached_from.insert(d, m);
                queue.push_back(d);
            }
        }
    }
    None
}

#[test]
fn no_file_in_src_imports_a_file_that_imports_it() {
    let graph = imports();
    assert!(graph.len() > 30, "the files were not found: {graph:?}");
    assert!(
        graph["admin::server"].contains("views"),
        "the scan misses imports: {graph:?}"
    );
    let circles: Vec<String> = graph
        .keys()
        .filter_map(|m| circle_through(&graph, m))
        .map(|c| c.join(" → "))
        .collect();
    assert!(
        circles.is_empty(),
        "import circles among src/ files:\n{}",
        circles.join("\n")
    );
}

#[test]
fn no_import_in_src_runs_back_up() {
    let graph = imports();
    let mut up = Vec::new();
    for (module, deps) in &graph {
        for dep in deps {
            if layer(dep) < layer(module) && !allowed(module, dep) {
                up.push(format!(
                    "{module} ({}) imports {dep} ({})",
                    LAYERS[layer(module)].0,
                    LAYERS[layer(dep)].0
                ));
            }
        }
    }
    assert!(up.is_empty(), "imports running back up:\n{}", up.join("\n"));
}
