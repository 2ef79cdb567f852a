//! Checks of an exported AsyncAPI document: valid against the
//! specification's own JSON Schema, every `$ref` pointing at something, and
//! payloads valid against the schema the document gives their message.
//!
//! `tests/fixtures/asyncapi-3.0.0.schema.json` is the AsyncAPI 3.0.0 JSON
//! Schema as the AsyncAPI Initiative publishes it
//! (`asyncapi/spec-json-schemas`, `schemas/3.0.0-without-$id.json`,
//! Apache-2.0), unchanged.

use serde_json::{Value, json};

/// The specification's schema.
const SPEC: &str = include_str!("../fixtures/asyncapi-3.0.0.schema.json");

/// What is wrong with `doc`: each error the specification's schema finds
/// (with where), then each `$ref` that points nowhere. Empty when it is
/// valid.
pub fn problems(doc: &Value) -> Vec<String> {
    let spec: Value = match serde_json::from_str(SPEC) {
        Ok(v) => v,
        Err(e) => return vec![format!("the specification's schema does not parse: {e}")],
    };
    let validator = match jsonschema::draft7::new(&spec) {
        Ok(v) => v,
        Err(e) => return vec![format!("the specification's schema does not compile: {e}")],
    };
    let mut found: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    let mut refs = Vec::new();
    collect_refs(doc, "", &mut refs);
    for (at, target) in refs {
        match target.strip_prefix('#') {
            Some(pointer) if doc.pointer(pointer).is_some() => {}
            _ => found.push(format!("`$ref` {target} at {at} points nowhere")),
        }
    }
    found
}

fn collect_refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let here = format!("{at}/{k}");
                if k == "$ref"
                    && let Some(target) = v.as_str()
                {
                    out.push((here.clone(), target.to_owned()));
                }
                collect_refs(v, &here, out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                collect_refs(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Why `payload` does not fit the payload schema `doc` gives message
/// `message` (its key under `components.messages`); empty when it fits.
pub fn payload_problems(doc: &Value, message: &str, payload: &Value) -> Vec<String> {
    let pointer = format!("/components/messages/{message}/payload");
    if doc.pointer(&pointer).is_none() {
        return vec![format!("no message `{message}` in the document")];
    }
    // The payload schema, with the document's components beside it so that
    // its `#/components/schemas/...` references resolve.
    let schema = json!({
        "$ref": format!("#{pointer}"),
        "components": doc["components"],
    });
    let validator = match jsonschema::draft7::new(&schema) {
        Ok(v) => v,
        Err(e) => return vec![format!("the payload schema of `{message}` does not compile: {e}")],
    };
    validator
        .iter_errors(payload)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}
