//! Our verdicts against libxml2's (`xmllint --noout --schema`), on every sample and on mutated
//! copies of the valid ones. xmllint comes from Debian's libxml2-utils, which the test script
//! installs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::instance::{self, Element, Limits};
use crate::samples_tests::{expected_verdicts, registry};
use crate::xml::write_element;

/// The XSD file of `version` that declares `root` globally; 2.2.1 gets a wrapper schema that
/// imports the xdomea namespace from the file libxml2 would otherwise skip (see VALIDATION.md).
fn entry_schema(version: &str, root: &str, scratch: &Path) -> PathBuf {
    let dir = crate::testdata::shared_xjustiz().join(version).join("xsd");
    let needle = format!("name=\"{root}\"");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("xsd dir").map(|e| e.expect("entry").path()).collect();
    files.sort();
    let entry = files
        .into_iter()
        .find(|p| std::fs::read_to_string(p).map(|t| t.contains(&needle)).unwrap_or(false))
        .unwrap_or_else(|| panic!("no XSD of {version} declares {root}"));
    if version != "2.2.1" {
        return entry;
    }
    let wrapper = scratch.join(format!("wrapper-{}.xsd", entry.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default()));
    let text = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="http://www.xjustiz.de" elementFormDefault="qualified">
  <xs:import namespace="http://www.xdomea.de/V2.2.0" schemaLocation="{}"/>
  <xs:include schemaLocation="{}"/>
</xs:schema>
"#,
        dir.join("xdomea-Baukasten.xsd").display(),
        entry.display()
    );
    std::fs::write(&wrapper, text).expect("wrapper");
    wrapper
}

fn xmllint_verdicts(schema: &Path, files: &[PathBuf]) -> BTreeMap<PathBuf, bool> {
    let mut out = BTreeMap::new();
    for chunk in files.chunks(200) {
        let output = Command::new("xmllint")
            .arg("--noout")
            .arg("--schema")
            .arg(schema)
            .args(chunk)
            .output()
            .expect("xmllint runs (bash scripts/test.sh installs libxml2-utils)");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for f in chunk {
            let name = f.display().to_string();
            let valid = stderr.lines().any(|l| l == format!("{name} validates"));
            let invalid = stderr.lines().any(|l| l == format!("{name} fails to validate"));
            assert!(valid != invalid, "xmllint said neither or both for {name}:\n{stderr}");
            out.insert(f.clone(), valid);
        }
    }
    out
}

/// Every element in document order, as index paths from the root.
fn element_paths(e: &Element, prefix: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    for (i, c) in e.children.iter().enumerate() {
        prefix.push(i);
        out.push(prefix.clone());
        element_paths(c, prefix, out);
        prefix.pop();
    }
}

fn parent_of<'e, 'x>(root: &'e mut Element<'x>, path: &[usize]) -> &'e mut Element<'x> {
    let mut e = root;
    for i in &path[..path.len() - 1] {
        e = &mut e.children[*i];
    }
    e
}

fn at<'e, 'x>(root: &'e mut Element<'x>, path: &[usize]) -> &'e mut Element<'x> {
    let mut e = root;
    for i in path {
        e = &mut e.children[*i];
    }
    e
}

/// Mutated copies of a valid document: drop or repeat elements, break ids, codes, dates,
/// enumerations and code-list attributes.
fn mutations<'x>(root: &Element<'x>) -> Vec<(String, Element<'x>)> {
    let mut paths = Vec::new();
    element_paths(root, &mut Vec::new(), &mut paths);
    let pick = |n: usize, k: usize| -> Vec<Vec<usize>> { (1..=k).map(|i| paths[(i * n / (k + 1)).min(n - 1)].clone()).collect() };
    let n = paths.len();
    let mut out = Vec::new();
    for p in pick(n, 4) {
        let mut m = root.clone();
        parent_of(&mut m, &p).children.remove(p[p.len() - 1]);
        out.push((format!("drop-{p:?}"), m));
    }
    for p in pick(n, 4) {
        let mut m = root.clone();
        let parent = parent_of(&mut m, &p);
        let copy = parent.children[p[p.len() - 1]].clone();
        parent.children.insert(p[p.len() - 1] + 1, copy);
        out.push((format!("repeat-{p:?}"), m));
    }
    let leaves: Vec<Vec<usize>> = paths
        .iter()
        .filter(|p| {
            let mut r = root.clone();
            let e = at(&mut r, p);
            e.children.is_empty() && !e.text.trim().is_empty()
        })
        .cloned()
        .collect();
    let is_uuid = |s: &str| s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4;
    let mut kinds = 0;
    for p in &leaves {
        let mut m = root.clone();
        let e = at(&mut m, p);
        let text = e.text.trim().to_string();
        let (kind, new) = if is_uuid(&text) {
            ("id", format!("{}zz", &text[..34]))
        } else if &*e.name.local == "code" {
            ("code", "unbekannter Code mit Leerzeichen".to_string())
        } else if text.len() >= 10 && text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-' {
            ("date", format!("{}-02-30{}", &text[..4], &text[10..]))
        } else if matches!(text.as_str(), "true" | "false") {
            ("boolean", "ja".to_string())
        } else {
            continue;
        };
        if kinds & (1 << kind.len()) != 0 {
            continue;
        }
        kinds |= 1 << kind.len();
        e.text = new.into();
        out.push((format!("{kind}-{p:?}"), m));
    }
    if let Some(p) = paths.iter().find(|p| {
        let mut r = root.clone();
        at(&mut r, p).attribute("", "listVersionID").is_some()
    }) {
        let mut m = root.clone();
        at(&mut m, p).attributes.retain(|(n, _)| &*n.local != "listVersionID");
        out.push((format!("listVersionID-{p:?}"), m));
    }
    let mut m = root.clone();
    if let Some((_, v)) = m.children.iter_mut().flat_map(|c| c.attributes.iter_mut()).find(|(n, _)| &*n.local == "xjustizVersion") {
        v.to_mut().push_str(".9");
        out.push(("version".into(), m));
    }
    out
}

#[test]
fn verdicts_equal_xmllint_on_samples_and_mutations() {
    let registry = registry();
    let scratch = tempfile::tempdir().expect("tempdir");
    // (entry schema) -> files, and each file's verdict from us.
    let mut by_schema: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    let mut ours: BTreeMap<PathBuf, (bool, String)> = BTreeMap::new();
    let mut count = 0;
    for (sample, valid) in expected_verdicts() {
        let xml = std::fs::read(&sample).expect("sample");
        let root = instance::parse(&xml, Limits::default()).expect("samples are well-formed");
        let version = match crate::registry::find_version(&root).map(|(v, _)| v).as_deref() {
            Some("2.4") => "2.4.0".to_string(),
            Some(v) => v.to_string(),
            None => panic!("{} has no version", sample.display()),
        };
        let schema = entry_schema(&version, &root.name.local, scratch.path());
        let mut documents = vec![(sample.clone(), xml.clone())];
        if valid {
            for (what, mutated) in mutations(&root) {
                let path = scratch.path().join(format!("{count}-{what}.xml").replace([' ', ',', '[', ']'], ""));
                count += 1;
                let text = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}", write_element(&mutated));
                std::fs::write(&path, &text).expect("write mutation");
                documents.push((path, text.into_bytes()));
            }
        }
        for (path, bytes) in documents {
            let verdict = registry.read(&bytes);
            ours.insert(path.clone(), (verdict.is_ok(), verdict.err().map(|e| e.to_string()).unwrap_or_default()));
            by_schema.entry(schema.clone()).or_default().push(path);
        }
    }
    let mut differ = Vec::new();
    let (mut valid, mut invalid) = (0, 0);
    for (schema, files) in &by_schema {
        for (file, theirs) in xmllint_verdicts(schema, files) {
            let (mine, why) = &ours[&file];
            if *mine {
                valid += 1
            } else {
                invalid += 1
            }
            if *mine != theirs {
                differ.push(format!("{}: xmllint {}, we {} {why}", file.display(), theirs, mine));
            }
        }
    }
    eprintln!("compared {} documents ({count} mutations): {valid} valid, {invalid} invalid", ours.len());
    assert!(count > 150, "only {count} mutations");
    assert!(differ.is_empty(), "{} verdicts differ:\n{}", differ.len(), differ.join("\n"));
}
