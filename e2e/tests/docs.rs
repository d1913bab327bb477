//! The documentation against the code: the flag tables in `docs/` list exactly the flags the
//! binaries' `--help` prints, and every code link in `docs/` points at a file that still
//! defines what the link names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use rusty_e2e::bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(repo().join("docs").join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The long flags `--help` lists as options (not ones mentioned in examples), minus `--help`
/// and `--version`.
fn help_flags(program: &str, args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(bin(program))
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{program} --help: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-")
                .filter(|_| !l.starts_with("--"))
                .map_or(l, |rest| {
                    // `-c, --config <FILE>`
                    rest.split_once(", ").map_or(l, |(_, long)| long)
                });
            let flag: String = l
                .strip_prefix("--")?
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            Some(format!("--{flag}"))
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

/// Every `--flag` in `cell`.
fn flags_in(cell: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = cell;
    while let Some(at) = rest.find("--") {
        let flag: String = rest[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !flag.is_empty() {
            out.insert(format!("--{flag}"));
        }
        rest = &rest[at + 2..];
    }
    out
}

/// The table rows (cells split) of a markdown text whose first cell satisfies `first`.
fn rows<'a>(text: &'a str, first: impl Fn(&str) -> bool + 'a) -> Vec<Vec<&'a str>> {
    text.lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .filter(|cells| first(cells[0]))
        .collect()
}

#[test]
fn the_data_plane_flag_table_lists_exactly_the_flags_of_its_help() {
    let documented: BTreeSet<String> = rows(&doc("dataplane.md"), |c| c.starts_with("`--"))
        .iter()
        .flat_map(|cells| flags_in(cells[0]))
        .collect();
    let help = help_flags("rusty-lb", &[]);
    assert!(help.len() > 15, "only {help:?} read from --help");
    let missing: Vec<_> = help.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&help).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/dataplane.md: not documented {missing:?}, documented but gone {stale:?}"
    );
}

#[test]
fn the_agent_command_table_lists_exactly_the_flags_of_each_command() {
    let text = doc("agent.md");
    let table = rows(&text, |c| c == "any" || c.starts_with("`rusty-agent "));
    let global: BTreeSet<String> = table
        .iter()
        .find(|cells| cells[0] == "any")
        .map(|cells| flags_in(cells[1]))
        .expect("a row for the flags of any command");
    assert_eq!(
        global,
        help_flags("rusty-agent", &[]),
        "flags of any command"
    );
    let mut commands = 0;
    for cells in table.iter().filter(|cells| cells[0] != "any") {
        let command = cells[0]
            .trim_matches('`')
            .split_whitespace()
            .nth(1)
            .expect("a command name");
        let help: BTreeSet<String> = help_flags("rusty-agent", &[command])
            .difference(&global)
            .cloned()
            .collect();
        assert_eq!(flags_in(cells[1]), help, "rusty-agent {command}");
        commands += 1;
    }
    assert_eq!(
        commands, 6,
        "a row for each of run, check, status, scale, deploy, drain"
    );
}

/// `[`Name::item`](../path.rs)` links: the file exists and defines `item`.
#[test]
fn code_links_in_the_docs_point_at_what_they_name() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](../") {
            let before = &rest[..at];
            rest = &rest[at + 5..];
            let target = &rest[..rest.find(')').expect("a closed link")];
            let file = repo().join(target.split('#').next().unwrap());
            assert!(
                file.exists(),
                "{}: link to {target}: no such file",
                path.display()
            );
            let Some(label) = before.rsplit('[').next().and_then(|l| l.strip_prefix('`')) else {
                continue;
            };
            let Some(label) = label.strip_suffix('`') else {
                continue;
            };
            // A path as the label names the file itself, already checked.
            if !target.ends_with(".rs") || label.contains('/') {
                continue;
            }
            let item = label.rsplit("::").next().unwrap();
            // A module's link names its own file.
            let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let dir = file
                .parent()
                .and_then(|d| d.file_name())
                .and_then(|d| d.to_str())
                .unwrap_or("");
            if item == stem || (stem == "mod" && item == dir) {
                checked += 1;
                continue;
            }
            let source = std::fs::read_to_string(&file).unwrap();
            let defined = [
                "fn", "struct", "enum", "trait", "const", "type", "mod", "static",
            ]
            .iter()
            .any(|kw| {
                source.contains(&format!("{kw} {item}("))
                    || source.contains(&format!("{kw} {item} "))
                    || source.contains(&format!("{kw} {item}<"))
                    || source.contains(&format!("{kw} {item}:"))
                    || source.contains(&format!("{kw} {item};"))
            }) || source.contains(&format!("    {item},"))
                || source.contains(&format!("    {item}("))
                || source.contains(&format!("    {item} {{"));
            assert!(
                defined,
                "{}: `{label}` is not defined in {target}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} code links checked");
}
