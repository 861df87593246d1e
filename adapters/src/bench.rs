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

/// Throughput of `work` over `xml` in MB/s: five rounds of `duration / 5`; (median, best).
/// The best round is the one least disturbed by other load on a shared machine.
fn rounds(xml: &[u8], duration: Duration, mut work: impl FnMut() -> bool) -> (f64, f64, u64) {
    let mut rates = Vec::new();
    let mut total = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < duration / 5 || n == 0 {
            if !work() {
                return (0.0, 0.0, 0);
            }
            n += 1;
        }
        total += n;
        rates.push((xml.len() as u64 * n) as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    (rates[2], rates[4], total)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Measures one document: parse only; parse + validate + translate (+ metadata); and that plus
/// the JSON Schema check of the canonical JSON. Single thread.
pub fn measure(registry: &Registry, name: &str, xml: &[u8], duration: Duration) -> Value {
    let valid = registry.read(xml).is_ok();
    let parse = rounds(xml, duration, || instance::parse(xml, Limits::default()).is_ok());
    let events = rounds(xml, duration, || {
        let Ok(text) = std::str::from_utf8(xml) else { return false };
        let mut r = quick_xml::NsReader::from_str(text);
        let mut n = 0usize;
        loop {
            match r.read_resolved_event() {
                Ok((_, quick_xml::events::Event::Eof)) => break,
                Ok((_, quick_xml::events::Event::Start(s))) => n += s.attributes().count(),
                Ok(_) => n += 1,
                Err(_) => return false,
            }
        }
        std::hint::black_box(n) > 0
    });
    let translate = rounds(xml, duration, || {
        let Ok(root) = instance::parse(xml, Limits::default()) else { return false };
        let _ = registry.read_parsed(xml, &root);
        true
    });
    let with_schema = rounds(xml, duration, || {
        let Ok(root) = instance::parse(xml, Limits::default()) else { return false };
        if let Ok(m) = registry.read_parsed(xml, &root) {
            if let Some(release) = registry.release(&m.version) {
                let _ = registry.json.check(release, &m.message_type, &m.data);
            }
        }
        true
    });
    json!({
        "document": name,
        "bytes": xml.len(),
        "valid": valid,
        "iterations": translate.2,
        "events_only_mb_per_s": { "median": round1(events.0), "best": round1(events.1) },
        "parse_only_mb_per_s": { "median": round1(parse.0), "best": round1(parse.1) },
        "parse_validate_translate_mb_per_s": { "median": round1(translate.0), "best": round1(translate.1) },
        "plus_json_schema_mb_per_s": { "median": round1(with_schema.0), "best": round1(with_schema.1) },
    })
}
