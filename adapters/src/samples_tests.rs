//! Tests against the real XJustiz samples in `../shared/xjustiz/samples`.

use std::sync::OnceLock;

use crate::instance::{self, Limits};
use crate::{xml, Registry, Rejection};

pub(crate) fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry::from_xsd_root(&crate::testdata::shared_xjustiz()).expect("every release compiles"))
}

pub(crate) use crate::testdata::samples_with_verdicts as expected_verdicts;

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

fn committed_schemas() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

#[test]
fn committed_schemas_are_what_the_generator_writes() {
    let out = tempfile::tempdir().expect("tempdir");
    let written = crate::schemas::generate(registry(), out.path()).expect("generates");
    let committed = committed_schemas();
    let mut stale = Vec::new();
    for path in &written {
        let relative = path.strip_prefix(out.path()).expect("inside out");
        if std::fs::read(committed.join(relative)).ok() != std::fs::read(path).ok() {
            stale.push(relative.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/ is stale (run `justizbus xjustiz generate-schemas --xsd-dir ../shared/xjustiz --out schemas`): {stale:?}"
    );
    let mut count = 0;
    for entry in std::fs::read_dir(committed.join("xjustiz")).expect("schemas/xjustiz") {
        count += std::fs::read_dir(entry.expect("entry").path()).expect("version dir").count();
    }
    assert_eq!(count + 1, written.len(), "schemas/ holds files the generator no longer writes");
    let bytes: u64 = written.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    assert!(bytes < 10_000_000, "schemas/ grew to {bytes} bytes");
}

#[test]
fn committed_models_give_the_same_verdicts_and_json() {
    let from_files = Registry::from_schemas(&committed_schemas().join("xjustiz")).expect("loads schemas/");
    assert_eq!(from_files.versions(), registry().versions());
    for (path, valid) in expected_verdicts() {
        let xml = std::fs::read(&path).expect("sample");
        let (a, b) = (from_files.read(&xml), registry().read(&xml));
        assert_eq!(a.is_ok(), valid, "{}", path.display());
        if let (Ok(a), Ok(b)) = (a, b) {
            assert_eq!(a.data, b.data, "{}", path.display());
        }
    }
}

#[test]
fn canonical_json_of_valid_samples_matches_its_json_schema() {
    let registry = registry();
    for (path, valid) in expected_verdicts() {
        if !valid {
            continue;
        }
        let xml = std::fs::read(&path).expect("sample");
        let m = registry.read(&xml).expect("valid");
        let release = registry.release(&m.version).expect("release");
        if let Err(e) = registry.json.check(release, &m.message_type, &m.data) {
            panic!("{}: {}", path.display(), e.join("\n"));
        }
        // A dropped required key, a wrong type and an unknown key are each refused.
        let mut data = m.data.clone();
        let head = data.get_mut("nachrichtenkopf").and_then(|h| h.as_object_mut()).expect("header");
        head.remove("erstellungszeitpunkt");
        head.insert("unbekannt".into(), serde_json::json!(1));
        let errors = registry.json.check(release, &m.message_type, &data).expect_err("broken JSON");
        assert!(errors.iter().any(|e| e.contains("erstellungszeitpunkt")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("unbekannt")), "{errors:?}");
    }
}
