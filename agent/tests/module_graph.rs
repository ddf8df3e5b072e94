//! The agent's modules form no import cycle. Every `crate::<module>` path in a module's file is
//! an edge: `use` lines, grouped `use crate::{a, b}` and inline paths alike, test modules
//! included (comments are not). A cycle is broken by moving a type to the module that owns it.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The first identifier of each top-level item of a path or `{..}` group starting at `rest`.
fn heads(rest: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
    };
    let Some(group) = rest.strip_prefix('{') else { return vec![ident(rest)] };
    let (mut depth, mut items, mut start) = (0usize, Vec::new(), 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(ident(&group[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(ident(&group[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// Module → the other modules of the crate its file names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files: BTreeMap<String, String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .map(|path| (path.file_stem().unwrap().to_string_lossy().into_owned(), path))
        .filter(|(name, _)| name != "lib")
        .map(|(name, path)| (name, std::fs::read_to_string(path).unwrap()))
        .collect();
    files
        .iter()
        .map(|(module, text)| {
            let code: String = text
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let names = code
                .match_indices("crate::")
                .flat_map(|(at, _)| heads(&code[at + "crate::".len()..]))
                .filter(|name| name != module && files.contains_key(name))
                .collect();
            (module.clone(), names)
        })
        .collect()
}

/// A cycle through `from`, as the path of modules, if there is one.
fn cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|m| m == from) {
        let mut found = path[at..].to_vec();
        found.push(from.to_string());
        return Some(found);
    }
    if done.contains(from) {
        return None;
    }
    path.push(from.to_string());
    for next in &graph[from] {
        if let Some(found) = cycle(graph, next, path, done) {
            return Some(found);
        }
    }
    path.pop();
    done.insert(from.to_string());
    None
}

#[test]
fn the_agents_modules_form_no_import_cycle() {
    let graph = module_graph();
    // The parser sees the edges it must see (a broken parser would find no cycle either).
    assert!(graph["agent"].contains("exec") && graph["error"].contains("probe"), "{graph:?}");
    assert_eq!(heads("{a, b::{C, D}, e::F};"), ["a", "b", "e"]);
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(found) = cycle(&graph, module, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", found.join(" -> "));
        }
    }
}
