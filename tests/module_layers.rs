//! The crate's modules import only downwards (see the top of src/lib.rs): a cycle
//! between two of them would tie the worker side to the parent side again, and
//! would compile without complaint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Folders of src/ that group modules (each of their files or subfolders is a module
/// of its own, named `folder::module`); any other folder is one module.
const GROUPS: [&str; 5] = ["parent", "wire", "worker", "channel", "shared"];

/// The module a source file belongs to: `task`, `wire::protocol`,
/// `parent::supervisor` (a folder module), `worker` (worker/mod.rs).
fn module_of(relative: &Path) -> String {
    let parts: Vec<String> =
        relative.iter().map(|part| part.to_string_lossy().trim_end_matches(".rs").to_owned()).collect();
    match parts.as_slice() {
        [group, rest @ ..] if GROUPS.contains(&group.as_str()) => match rest {
            [] => group.clone(),
            [file] if file == "mod" => group.clone(),
            [module, ..] => format!("{group}::{module}"),
        },
        [module, ..] => module.clone(),
        [] => String::new(),
    }
}

/// Each module of src/ and the modules its code names through `crate::` paths
/// (comments left out, tests included: a test module importing upwards is a cycle
/// too).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("src/ is readable").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let module = module_of(path.strip_prefix(&src).expect("under src/"));
                // lib.rs and the folders' mod.rs only declare and re-export.
                if module != "lib" && !GROUPS[..2].contains(&module.as_str()) {
                    files.entry(module).or_default().push(path);
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

/// The module named by every `crate::` path in `code` (its first segment, or its
/// first two inside a group folder), including each of a `crate::{a, b::c}` group.
fn crate_paths(code: &str) -> Vec<String> {
    let segment = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let module = |s: &str| {
        let first = segment(s);
        match s[first.len()..].strip_prefix("::") {
            Some(rest) if GROUPS.contains(&first.as_str()) && !segment(rest).is_empty() => {
                let second = segment(rest);
                // `crate::worker::init_worker` names the worker module itself.
                if second.chars().next().is_some_and(|c| c.is_lowercase()) && first != "worker"
                    || second == "state"
                {
                    format!("{first}::{second}")
                } else {
                    first
                }
            }
            _ => first,
        }
    };
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
                        names.push(module(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.push(module(rest));
        }
    }
    names
}

#[test]
fn no_module_imports_upwards() {
    let graph = module_graph();
    for expected in
        ["worker", "worker::state", "task", "wire::protocol", "parent::executor", "parent::supervisor"]
    {
        assert!(graph.contains_key(expected), "no module `{expected}`: {graph:?}");
    }
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
    let worker_side: Vec<&String> = graph.keys().filter(|module| !module.starts_with("parent")).collect();
    assert!(worker_side.len() >= 9, "{worker_side:?}");
    for module in worker_side {
        let wrong: Vec<_> = graph[module].iter().filter(|used| used.starts_with("parent")).collect();
        assert!(wrong.is_empty(), "`{module}`, on the worker side, uses {wrong:?}");
    }
}
