//! The README's claims that code can check: its configuration table is the
//! one the code reads, and the tests it names exist.

use std::path::Path;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README.md")
}

#[test]
fn the_configuration_table_is_the_one_the_code_reads() {
    let readme = readme();
    let start = readme
        .find("<!-- settings-table -->\n")
        .expect("table start marker")
        + "<!-- settings-table -->\n".len();
    let end = readme.find("<!-- /settings-table -->").expect("table end marker");
    if std::env::var_os("UPDATE_README").is_some() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let updated = format!(
            "{}{}{}",
            &readme[..start],
            catga::Config::table_markdown(),
            &readme[end..]
        );
        std::fs::write(path, updated).expect("write README.md");
        return;
    }
    assert_eq!(
        &readme[start..end],
        catga::Config::table_markdown(),
        "README's table differs from catga::SETTINGS; paste Config::table_markdown() between the markers"
    );
}

#[test]
fn every_test_the_readme_names_exists() {
    let readme = readme();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = String::new();
    for dir in [
        "tests/tests",
        "tests/tests/scenarios",
        "examples/order-system/tests",
    ] {
        for entry in std::fs::read_dir(root.join(dir)).expect("dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(entry.path()).expect("source"));
            }
        }
    }
    // In the "What you can rely on" section, each claim names its tests in
    // parentheses: `module::name` or `name`. Type paths (`Runtime::...`)
    // and settings (`CATGA_...`) are not tests.
    let section = &readme[readme.find("## What you can rely on").expect("section")..];
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
                "README names `{piece}`, but no test has that name"
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "found the test names ({checked})");
}
