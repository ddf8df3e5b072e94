//! The module graph of a crate, read from its source files, and the import cycles in it.
//!
//! Every `crate::a::b` and `super::x` path in a module's file is an edge to the longest module
//! it names: `use` lines, grouped `use crate::{a, b::c}` and inline paths alike (comments are
//! not, nor a file's trailing `#[cfg(test)] mod tests { .. }`: test fixtures may name what they
//! test). A cycle is broken by moving the type to the module that owns it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`dist::transport`; the crate root is `crate`) → modules its file names.
pub type ModuleGraph = BTreeMap<String, BTreeSet<String>>;

/// The path items of a `use` tail or inline path starting at `rest`: `a::b::C` gives
/// `["a::b::C"]`, `{a, b::{C, D}}` gives `["a", "b::C", "b::D"]`.
pub fn paths(rest: &str) -> Vec<String> {
    let mut out = Vec::new();
    expand("", rest, &mut out);
    out
}

fn expand(prefix: &str, rest: &str, out: &mut Vec<String>) {
    let rest = rest.trim_start();
    let Some(group) = rest.strip_prefix('{') else {
        let head: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect::<String>()
            .trim_end_matches(':')
            .to_string();
        let tail = &rest[head.len()..];
        if let Some(inner) = tail.strip_prefix("::{") {
            expand(&join(prefix, &head), &format!("{{{inner}"), out);
        } else {
            out.push(join(prefix, &head));
        }
        return;
    };
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                expand(prefix, &group[start..i], out);
                return;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(prefix, &group[start..i], out);
                start = i + 1;
            }
            _ => {}
        }
    }
}

fn join(prefix: &str, head: &str) -> String {
    match (prefix.is_empty(), head.is_empty()) {
        (true, _) => head.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}::{head}"),
    }
}

/// The module path of a file under `src`: `lib.rs` → `crate`, `a/mod.rs` and `a.rs` → `a`,
/// `a/b.rs` → `a::b`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [only] if only == "lib" || only == "main" => Some("crate".into()),
        [] => None,
        _ => Some(parts.join("::")),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The module graph of the crate whose sources are in `src`.
pub fn module_graph(src: &Path) -> std::io::Result<ModuleGraph> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let mut texts = BTreeMap::new();
    for file in files {
        if let Some(module) = module_of(src, &file) {
            texts.insert(module, std::fs::read_to_string(&file)?);
        }
    }
    let known: BTreeSet<String> = texts.keys().cloned().collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|m| known.contains(m))
    };
    let mut graph = ModuleGraph::new();
    for (module, text) in &texts {
        let text = text.find("#[cfg(test)]\nmod tests {").map_or(text.as_str(), |at| &text[..at]);
        let code: String =
            text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p).to_string();
        let mut edges = BTreeSet::new();
        for (anchor, base) in [("crate::", String::new()), ("super::", parent)] {
            for (at, _) in code.match_indices(anchor) {
                // `ninelives_core::x` or `my_crate::x` is not this crate's `crate::`.
                let before = code[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                for path in paths(&code[at + anchor.len()..]) {
                    if let Some(target) = resolve(&join(&base, &path)).filter(|t| t != module) {
                        // A child naming its parent (a `tests` module's `use super::*`) is not
                        // an import of a sibling topic.
                        if !module.starts_with(&format!("{target}::")) {
                            edges.insert(target);
                        }
                    }
                }
            }
        }
        graph.insert(module.clone(), edges);
    }
    Ok(graph)
}

/// An import cycle of `graph`, as the path of modules (first = last), if there is one.
pub fn find_cycle(graph: &ModuleGraph) -> Option<Vec<String>> {
    fn visit(
        graph: &ModuleGraph,
        from: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == from) {
            let mut found = path[at..].to_vec();
            found.push(from.to_string());
            return Some(found);
        }
        if !done.insert(from.to_string()) {
            return None;
        }
        path.push(from.to_string());
        for next in graph.get(from).into_iter().flatten() {
            if let Some(found) = visit(graph, next, path, done) {
                return Some(found);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(graph, m, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths_expand_groups_and_nesting() {
        assert_eq!(paths("a::b::C;"), ["a::b::C"]);
        assert_eq!(paths("{a, b::{C, D}, e::F};"), ["a", "b::C", "b::D", "e::F"]);
        assert_eq!(paths("dist::{plan, wire::Frame};"), ["dist::plan", "dist::wire::Frame"]);
    }

    #[test]
    fn a_cycle_through_nested_modules_is_found_and_a_parent_edge_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path();
        std::fs::create_dir_all(src.join("dist")).unwrap();
        std::fs::write(src.join("lib.rs"), "pub mod dist;\npub mod error;\n").unwrap();
        std::fs::write(src.join("error.rs"), "// crate::dist is only named in a comment\n").unwrap();
        std::fs::write(src.join("dist/mod.rs"), "pub mod a;\npub mod b;\n#[cfg(test)]\nmod tests;\n")
            .unwrap();
        std::fs::write(src.join("dist/tests.rs"), "use super::*;\nuse crate::error;\n").unwrap();
        std::fs::write(src.join("dist/a.rs"), "use super::b::Thing;\nuse ninelives_core::b;\n").unwrap();
        let b = "use crate::error;\n#[cfg(test)]\nmod tests {\n    use crate::dist::a;\n}\n";
        std::fs::write(src.join("dist/b.rs"), b).unwrap();
        let graph = module_graph(src).unwrap();
        assert_eq!(graph["dist::a"], BTreeSet::from(["dist::b".to_string()]));
        assert!(graph["dist::tests"].contains("error") && !graph["dist::tests"].contains("dist"));
        assert_eq!(find_cycle(&graph), None);
        std::fs::write(src.join("dist/b.rs"), "fn f() { crate::dist::a::g() }\n").unwrap();
        let graph = module_graph(src).unwrap();
        assert_eq!(find_cycle(&graph).unwrap(), ["dist::a", "dist::b", "dist::a"]);
    }
}
