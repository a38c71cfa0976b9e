//! The crate's modules import only downwards (see the top of src/lib.rs): a cycle
//! between two of them would tie the worker side to the parent side again, and
//! would compile without complaint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of src/ and the top-level modules its code names through
/// `crate::` paths (comments left out, tests included: a test module importing
/// upwards is a cycle too).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/ is readable") {
        let path = entry.expect("src/ is readable").path();
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        if name == "lib" {
            continue;
        }
        if path.extension().is_some_and(|ext| ext == "rs") {
            files.entry(name).or_insert_with(Vec::new).push(path);
        } else if path.is_dir() {
            // A module in a folder: all its files count as that module.
            let mut stack = vec![path];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
                    let path = entry.expect("src/ is readable").path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if path.extension().is_some_and(|ext| ext == "rs") {
                        files.entry(name.clone()).or_insert_with(Vec::new).push(path);
                    }
                }
            }
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, paths)| {
            let mut uses = BTreeSet::new();
            for path in paths {
                let text = std::fs::read_to_string(path).expect("source is readable");
                let code: String = text
                    .lines()
                    .map(|line| line.split("//").next().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join("\n");
                for name in crate_paths(&code) {
                    if modules.contains(&name) && name != *module {
                        uses.insert(name);
                    }
                }
            }
            (module.clone(), uses)
        })
        .collect()
}

/// The first segment of every `crate::` path in `code`, including each of a
/// `crate::{a, b::c}` group.
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut names = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: the segments after `{` or a comma at depth 0.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start => {
                        names.push(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.push(ident(rest));
        }
    }
    names
}

#[test]
fn no_module_imports_upwards() {
    let graph = module_graph();
    assert!(graph.contains_key("worker") && graph.contains_key("task"), "found the modules: {graph:?}");
    // Depth-first search for a back edge; the path to it is the cycle.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(module) {
            return;
        }
        if let Some(at) = path.iter().position(|m| *m == module) {
            panic!("import cycle: {} -> {module}", path[at..].join(" -> "));
        }
        path.push(module);
        for next in &graph[module] {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(module);
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_worker_side_names_nothing_of_the_parent_side() {
    let graph = module_graph();
    let parent = [
        "builder",
        "dispatch",
        "drivers",
        "error",
        "executor",
        "map",
        "pool",
        "process",
        "stats",
        "supervisor",
    ];
    let worker = ["blob", "codec", "panic", "protocol", "shape", "state", "sys", "task", "worker"];
    for module in worker {
        let Some(uses) = graph.get(module) else {
            panic!("no module `{module}` in src/: update the lists above");
        };
        let wrong: Vec<_> = parent.iter().filter(|p| uses.contains(**p)).collect();
        assert!(wrong.is_empty(), "`{module}`, on the worker side, uses {wrong:?}");
    }
}
