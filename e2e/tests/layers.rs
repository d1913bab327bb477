//! The module layering of the three crates, read from their sources: no import cycle between
//! the top-level modules of `dataplane`, `controlplane` and `shared`, and the data plane's
//! modules import only from their own layer or below, as `dataplane/src/lib.rs` says (the
//! front may call the lane; no other I/O edge calls another).
//!
//! An import is any `crate::NAME` path outside comments, including the names in a
//! `use crate::{…}` group.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The data plane's layers: 1 pure, 2 state, 3 attempt core, 4 I/O edges, 5 wiring.
const DATAPLANE_LAYERS: &[(&str, u8)] = &[
    ("http1", 1),
    ("answers", 1),
    ("hostnames", 1),
    ("router", 1),
    ("select", 1),
    ("admission", 1),
    ("clock", 1),
    ("metrics", 2),
    ("connections", 2),
    ("shutdown", 2),
    ("snapshot", 2),
    ("queue", 2),
    ("state_dir", 2),
    ("store", 2),
    ("certs", 2),
    ("access_log", 2),
    ("plane", 2),
    ("attempt", 3),
    ("front", 4),
    ("lane", 4),
    ("pipeline", 4),
    ("admin", 4),
    ("source", 4),
    ("cli", 5),
    ("server", 5),
];

/// The one import allowed between two I/O edges.
const EDGE_TO_EDGE: &[(&str, &str)] = &[("front", "lane")];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`None` for the crate root).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(name) => Some(name.to_owned()),
        None => Some(first),
    }
}

/// Source text without `//` comments (doc comments included) and string literals.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if !in_str && c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' && prev != '\'' {
                in_str = !in_str;
            } else if !in_str {
                out.push(c);
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// Every top-level module named by a `crate::` path in `code`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        // `rusty_crate::` or similar is not ours.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let trimmed = rest.trim_start();
        if let Some(group) = trimmed.strip_prefix('{') {
            // Top-level names of the group: split at commas outside nested braces.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(first_ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            found.insert(first_ident(&item));
        } else {
            found.insert(first_ident(trimmed));
        }
    }
    found.remove("");
    found.remove("self");
    found
}

fn first_ident(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Module → the other top-level modules it imports, for one crate.
fn graph(krate: &str) -> Graph {
    let src = repo().join(krate).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g = Graph::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let deps = g.entry(module.clone()).or_default();
        deps.extend(
            imports(&code_only(&text))
                .into_iter()
                .filter(|d| *d != module),
        );
    }
    g
}

/// The modules on some import cycle, each cycle once (its members sorted).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    // Tarjan's strongly connected components, recursively: the graphs are small.
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = vec![];
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on_stack: BTreeSet::new(),
        next: 0,
        found: vec![],
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn the_checker_finds_imports_in_groups_and_sees_cycles() {
    let code = code_only(
        "use crate::a::X;\nuse crate::{b, c::{d, e}, self};\n// use crate::z;\n\
         let s = \"crate::q\"; fn f() { crate::g::h(); rusty_crate::no(); }",
    );
    let found: Vec<String> = imports(&code).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "g"]);
    let g: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
}

#[test]
fn no_crate_has_an_import_cycle_between_its_top_level_modules() {
    for krate in ["dataplane", "controlplane", "shared"] {
        let g = graph(krate);
        assert!(g.len() > 3, "{krate}: only {} modules read", g.len());
        let found = cycles(&g);
        assert!(found.is_empty(), "{krate}: import cycles {found:?}\n{g:#?}");
    }
}

#[test]
fn data_plane_modules_import_only_from_their_layer_or_below() {
    let layers: BTreeMap<&str, u8> = DATAPLANE_LAYERS.iter().copied().collect();
    let g = graph("dataplane");
    let mut wrong = vec![];
    for (module, deps) in &g {
        let Some(&from) = layers.get(module.as_str()) else {
            wrong.push(format!(
                "{module}: in no layer (add it to DATAPLANE_LAYERS)"
            ));
            continue;
        };
        for dep in deps {
            let Some(&to) = layers.get(dep.as_str()) else {
                wrong.push(format!("{module} -> {dep}: {dep} is in no layer"));
                continue;
            };
            if to > from {
                wrong.push(format!(
                    "{module} (layer {from}) imports {dep} (layer {to})"
                ));
            } else if from == 4 && to == 4 && !EDGE_TO_EDGE.contains(&(module, dep)) {
                wrong.push(format!(
                    "{module} imports {dep}: I/O edges do not call each other"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
