//! No crate of the workspace has an import cycle between its modules (see
//! [`ninelives_testkit::modules`]): modules form a hierarchy that reads top-down.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

use ninelives_testkit::modules::{find_cycle, module_graph};

#[test]
fn no_crate_has_an_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut crates = 0;
    let mut cycles = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let src = dir.join("src");
        if !dir.join("Cargo.toml").is_file() || !src.is_dir() {
            continue;
        }
        crates += 1;
        let graph = module_graph(&src).unwrap();
        if let Some(cycle) = find_cycle(&graph) {
            cycles.push(format!("{}: {}", dir.file_name().unwrap().to_string_lossy(), cycle.join(" -> ")));
        }
    }
    assert!(crates >= 10, "found only {crates} crates under {}", root.display());
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}
