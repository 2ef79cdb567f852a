//! The documentation's claims that code can check: the configuration table
//! of the guide is the one the code reads, the tests the guarantees name
//! exist, and the README's and the guide's relative links lead to files.

use std::path::{Path, PathBuf};

/// The guide's page with the configuration table.
const CONFIGURATION: &str = "catga/docs/configuration.md";
/// The guide's page with "What you can rely on".
const GUARANTEES: &str = "catga/docs/guarantees.md";
/// The README and the guide's pages (the modules of `catga::guide`).
const DOCS: &[&str] = &[
    "README.md",
    "catga/docs/guarantees.md",
    "catga/docs/sagas.md",
    "catga/docs/configuration.md",
    "catga/docs/operations.md",
];

/// A path of the workspace, given from its root.
fn workspace_path(path: impl AsRef<Path>) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A documentation file, given from the workspace root.
fn read_doc(path: &str) -> String {
    std::fs::read_to_string(workspace_path(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_configuration_table_is_the_one_the_code_reads() {
    let page = read_doc(CONFIGURATION);
    let start = page
        .find("<!-- settings-table -->\n")
        .expect("table start marker")
        + "<!-- settings-table -->\n".len();
    let end = page.find("<!-- /settings-table -->").expect("table end marker");
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!(
            "{}{}{}",
            &page[..start],
            catga::Config::table_markdown(),
            &page[end..]
        );
        std::fs::write(workspace_path(CONFIGURATION), updated)
            .unwrap_or_else(|e| panic!("write {CONFIGURATION}: {e}"));
        return;
    }
    assert_eq!(
        &page[start..end],
        catga::Config::table_markdown(),
        "{CONFIGURATION}'s table differs from catga::SETTINGS; paste Config::table_markdown() between the \
         markers (or run this test with UPDATE_README=1)"
    );
}

#[test]
fn every_test_the_guarantees_name_exists() {
    let page = read_doc(GUARANTEES);
    let mut sources = String::new();
    for dir in [
        "tests/tests",
        "tests/tests/scenarios",
        "examples/order-system/tests",
        // The schedule's own tests (clock changes need no servers).
        "catga-macros/names/src",
    ] {
        for entry in std::fs::read_dir(workspace_path(dir)).expect("dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(entry.path()).expect("source"));
            }
        }
    }
    // In the "What you can rely on" section, each claim names its tests in
    // parentheses: `module::name` or `name`. Type paths (`Runtime::...`)
    // and settings (`CATGA_...`) are not tests.
    let section = &page[page.find("## What you can rely on").expect("section")..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut checked = 0;
    for group in section
        .split('(')
        .skip(1)
        .filter_map(|g| g.split_once(')').map(|(inside, _)| inside))
    {
        for piece in group.split('`').skip(1).step_by(2) {
            let first = piece.split("::").next().unwrap_or(piece);
            let name = piece.rsplit("::").next().unwrap_or(piece);
            let looks_like_test = name.contains('_')
                && !first.starts_with(char::is_uppercase)
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit());
            if !looks_like_test {
                continue;
            }
            assert!(
                sources.contains(&format!("fn {name}(")),
                "{GUARANTEES} names `{piece}`, but no test has that name"
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "found the test names ({checked})");
}

/// The targets of a Markdown text's inline links (`[text](target)`),
/// outside fenced code blocks.
fn link_targets(text: &str) -> Vec<&str> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // A link reference definition: `[label]: target`.
        if let Some(def) = line.strip_prefix('[').and_then(|l| l.split_once("]: ")) {
            targets.push(def.1.trim());
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find([')', ' ']).unwrap_or(rest.len());
            targets.push(&rest[..end]);
            rest = &rest[end..];
        }
    }
    targets
}

#[test]
fn every_relative_link_of_the_docs_leads_to_a_file() {
    let mut checked = 0;
    for doc in DOCS {
        let text = read_doc(doc);
        let dir = Path::new(doc).parent().unwrap_or(Path::new(""));
        for target in link_targets(&text) {
            // Web addresses and anchors in the same page are not files.
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            // Anchors are not checked: only the file.
            let file = target.split_once('#').map_or(target, |(file, _)| file);
            let path = dir.join(file);
            assert!(
                workspace_path(&path).exists(),
                "{doc} links to `{target}`, but {} does not exist",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "found the links ({checked})");
}
