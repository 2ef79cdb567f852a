//! Expansion snapshots over the trybuild fixtures: every file in
//! `ui-tests/pass` and `ui-tests/fail` is parsed, each item carrying
//! `#[command]`, `#[event]`, `#[saga]` or `#[job]` is replaced by its expansion, and the file is
//! pretty printed with prettyplease and compared with
//! `snapshots/<pass|fail>__<case>.snap`. So each fixture is checked twice:
//! by rustc through trybuild (does it compile, what does the user read) and
//! here (what code does the macro write).
//!
//! `UPDATE_SNAPSHOTS=1 cargo test -p catga-macros` rewrites the snapshots;
//! review the diff before committing.

use std::path::{Path, PathBuf};

use proc_macro2::TokenStream;
use quote::ToTokens;

use crate::expand;
use crate::role::Attr;

/// The catga attribute on an item, if any: which one and its arguments.
fn catga_attr(attrs: &mut Vec<syn::Attribute>) -> Option<(Attr, TokenStream)> {
    let pos = attrs.iter().position(|a| {
        let last = a.path().segments.last().map(|s| s.ident.to_string());
        matches!(last.as_deref(), Some("command" | "event" | "saga" | "job"))
    })?;
    let attr = attrs.remove(pos);
    let which = match attr
        .path()
        .segments
        .last()
        .map(|s| s.ident.to_string())
        .as_deref()
    {
        Some("command") => Attr::Command,
        Some("saga") => Attr::Saga,
        Some("job") => Attr::Job,
        _ => Attr::Event,
    };
    let args = match attr.meta {
        syn::Meta::List(list) => list.tokens,
        _ => TokenStream::new(),
    };
    Some((which, args))
}

fn attrs_of(item: &mut syn::Item) -> Option<&mut Vec<syn::Attribute>> {
    match item {
        syn::Item::Struct(s) => Some(&mut s.attrs),
        syn::Item::Enum(e) => Some(&mut e.attrs),
        syn::Item::Fn(f) => Some(&mut f.attrs),
        syn::Item::Mod(m) => Some(&mut m.attrs),
        syn::Item::Trait(t) => Some(&mut t.attrs),
        syn::Item::Static(s) => Some(&mut s.attrs),
        syn::Item::Const(c) => Some(&mut c.attrs),
        _ => None,
    }
}

/// The fixture with every catga attribute expanded.
fn expand_file(source: &str, case: &str) -> String {
    let file: syn::File = syn::parse_str(source).unwrap_or_else(|e| panic!("{case}: does not parse: {e}"));
    let mut out = TokenStream::new();
    for attr in &file.attrs {
        attr.to_tokens(&mut out);
    }
    for mut item in file.items {
        match attrs_of(&mut item).and_then(catga_attr) {
            Some((which, args)) => out.extend(expand(which, args, item.to_token_stream())),
            None => item.to_tokens(&mut out),
        }
    }
    let expanded: syn::File =
        syn::parse2(out.clone()).unwrap_or_else(|e| panic!("{case}: expansion does not parse: {e}\n{out}"));
    prettyplease::unparse(&expanded)
}

fn fixtures(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ui-tests")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    files
}

fn check_dir(dir: &str) {
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    let mut changed = Vec::new();
    for path in fixtures(dir) {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let case = format!("{dir}__{stem}");
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{case}: {e}"));
        let pretty = expand_file(&source, &case);
        let snap = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("snapshots")
            .join(format!("{case}.snap"));
        if update {
            std::fs::write(&snap, &pretty).unwrap_or_else(|e| panic!("{case}: {e}"));
            continue;
        }
        match std::fs::read_to_string(&snap) {
            Ok(expected) if expected == pretty => {}
            Ok(_) => changed.push(format!("{case}: expansion changed")),
            Err(_) => changed.push(format!("{case}: no snapshot at {}", snap.display())),
        }
    }
    assert!(
        changed.is_empty(),
        "{}\nrun with UPDATE_SNAPSHOTS=1 and review the diff",
        changed.join("\n")
    );
}

#[test]
fn expansions_of_the_pass_fixtures() {
    check_dir("pass");
}

#[test]
fn expansions_of_the_fail_fixtures() {
    check_dir("fail");
}

#[test]
fn every_snapshot_has_a_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots");
    for entry in std::fs::read_dir(&dir).expect("snapshots dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((kind, rest)) = name.trim_end_matches(".snap").split_once("__") else {
            panic!("{name}: not a fixture snapshot");
        };
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../ui-tests")
            .join(kind)
            .join(format!("{rest}.rs"));
        assert!(
            fixture.is_file(),
            "{name}: its fixture {} is gone",
            fixture.display()
        );
    }
}
