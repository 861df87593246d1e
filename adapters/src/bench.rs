//! `justizbus xjustiz bench`: parse + validate + translate throughput on one core, for given
//! documents and for a synthetic message grown from a valid one through the model.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::instance::{self, Limits};
use crate::xsd::QName;
use crate::{xml, Registry};

/// Grows a valid message to at least `target` bytes: items of repeatable keys of its canonical
/// JSON (the model says which keys repeat) are copied, the result written back through the model,
/// and kept only if it is still valid. Returns the XML.
pub fn synthetic(registry: &Registry, seed: &[u8], target: usize) -> Option<Vec<u8>> {
    let message = registry.read(seed).ok()?;
    let release = registry.release(&message.version)?;
    let root = QName::new(crate::registry::XJUSTIZ_NS, &message.message_type);
    let mut data = message.data;
    let mut current = seed.to_vec();
    // Candidate arrays by JSON pointer, largest item first.
    let mut arrays = Vec::new();
    collect_arrays(&data, String::new(), &mut arrays);
    arrays.sort_by_key(|(_, size)| std::cmp::Reverse(*size));
    for (pointer, _) in arrays {
        while current.len() < target {
            let mut grown = data.clone();
            let Some(Value::Array(items)) = grown.pointer_mut(&pointer) else { break };
            let Some(first) = items.first().cloned() else { break };
            items.push(first);
            let Ok(text) = xml::to_xml(release, &root, &grown) else { break };
            if registry.read(text.as_bytes()).is_err() {
                break;
            }
            data = grown;
            current = text.into_bytes();
        }
        if current.len() >= target {
            return Some(current);
        }
    }
    None
}

fn collect_arrays(v: &Value, pointer: String, out: &mut Vec<(String, usize)>) {
    match v {
        Value::Array(items) => {
            if let Some(first) = items.first() {
                out.push((pointer.clone(), first.to_string().len()));
            }
            for (i, item) in items.iter().enumerate() {
                collect_arrays(item, format!("{pointer}/{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                collect_arrays(item, format!("{pointer}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        _ => {}
    }
}

/// Measures one document for about `duration`: parse + validate + translate (+ metadata) on
/// this thread, and the same plus the JSON Schema check of the canonical JSON.
pub fn measure(registry: &Registry, name: &str, xml: &[u8], duration: Duration) -> Value {
    let run = |with_json_schema: bool| -> (f64, u64, bool) {
        let start = Instant::now();
        let mut n = 0u64;
        let mut valid = true;
        while start.elapsed() < duration || n == 0 {
            let root = match instance::parse(xml, Limits::default()) {
                Ok(r) => r,
                Err(_) => return (0.0, 0, false),
            };
            match registry.read_parsed(xml, &root) {
                Ok(m) if with_json_schema => {
                    if let Some(release) = registry.release(&m.version) {
                        valid &= registry.json.check(release, &m.message_type, &m.data).is_ok();
                    }
                }
                Ok(_) => {}
                Err(_) => valid = false,
            }
            n += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        ((xml.len() as u64 * n) as f64 / secs / 1e6, n, valid)
    };
    let start = Instant::now();
    let mut parsed = 0u64;
    while start.elapsed() < duration || parsed == 0 {
        if instance::parse(xml, Limits::default()).is_err() {
            break;
        }
        parsed += 1;
    }
    let parse_mb_s = (xml.len() as u64 * parsed) as f64 / start.elapsed().as_secs_f64() / 1e6;
    let (xsd_mb_s, n, valid) = run(false);
    let (with_schema_mb_s, _, _) = run(true);
    json!({
        "document": name,
        "bytes": xml.len(),
        "valid": valid,
        "iterations": n,
        "parse_only_mb_per_s": (parse_mb_s * 10.0).round() / 10.0,
        "parse_validate_translate_mb_per_s": (xsd_mb_s * 10.0).round() / 10.0,
        "plus_json_schema_mb_per_s": (with_schema_mb_s * 10.0).round() / 10.0,
        "docs_per_s": (xsd_mb_s * 1e6 / xml.len() as f64).round(),
    })
}
