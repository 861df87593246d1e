//! Tests against the real XJustiz samples in `../shared/xjustiz/samples`.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::instance::{self, Limits};
use crate::{xml, Registry, Rejection};

pub(crate) fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry::from_xsd_root(&crate::xsd::shared_xjustiz()).expect("every release compiles"))
}

/// (sample path, libxml2 verdict) from the table in `VALIDATION.md`.
pub(crate) fn expected_verdicts() -> Vec<(PathBuf, bool)> {
    let dir = crate::xsd::shared_xjustiz();
    let table = std::fs::read_to_string(dir.join("VALIDATION.md")).expect("VALIDATION.md");
    table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let path = cells.get(1)?.trim_matches('`');
            let verdict = cells.get(5)?;
            Some((dir.join("samples").join(path), verdict.starts_with("VALID")))
        })
        .collect()
}

#[test]
fn verdicts_match_libxml2_on_every_sample() {
    let registry = registry();
    let rows = expected_verdicts();
    assert!(rows.len() >= 56, "{} rows", rows.len());
    let mut wrong = Vec::new();
    for (path, valid) in rows {
        let xml = std::fs::read(&path).expect("sample");
        let verdict = registry.read(&xml);
        if verdict.is_ok() != valid {
            wrong.push(format!("{}: expected {}, got {:?}", path.display(), if valid { "valid" } else { "invalid" }, verdict.err()));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn valid_samples_round_trip_through_json() {
    let registry = registry();
    for (path, valid) in expected_verdicts() {
        if !valid {
            continue;
        }
        let xml = std::fs::read(&path).expect("sample");
        let message = registry.read(&xml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let original = instance::parse(&xml, Limits::default()).expect("parses");
        let release = registry.release(&message.version).expect("release");
        let back = xml::to_xml(release, &original.name, &message.data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let reparsed = instance::parse(back.as_bytes(), Limits::default()).expect("written XML parses");
        assert_eq!(xml::canonical(&original), xml::canonical(&reparsed), "{}", path.display());
        let again = registry.read(back.as_bytes()).unwrap_or_else(|e| panic!("{}: written XML invalid: {e}", path.display()));
        assert_eq!(again.data, message.data, "{}", path.display());
    }
}

#[test]
fn rejections_say_what_and_where() {
    let registry = registry();
    let cases: [(&str, &str); 5] = [
        ("<a>", "not well-formed"),
        ("<!DOCTYPE a><a/>", "DOCTYPE"),
        (r#"<x:nachricht xmlns:x="urn:other"/>"#, "not in http://www.xjustiz.de"),
        (r#"<x:nachricht xmlns:x="http://www.xjustiz.de"><x:nachrichtenkopf xjustizVersion="9.9.9"/></x:nachricht>"#, "9.9.9"),
        (
            r#"<x:nachricht.unbekannt xmlns:x="http://www.xjustiz.de"><x:nachrichtenkopf xjustizVersion="3.6.2"/></x:nachricht.unbekannt>"#,
            "not a message",
        ),
    ];
    for (xml, expected) in cases {
        let err = registry.read(xml.as_bytes()).expect_err(xml);
        assert!(err.to_string().contains(expected), "{xml}: {err}");
    }
    assert!(matches!(registry.read(b"<a>"), Err(Rejection::Syntax(_))));
}
