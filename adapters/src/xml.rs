//! Writing XML: canonical JSON back to an XJustiz document (driven by the model, the mirror of
//! [`crate::translate`]), parsed trees back to text, and a canonical form to compare documents.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::instance::{Element, XSI};
use crate::translate::Release;
use crate::xsd::{ComplexType, Content, ElementDecl, Particle, QName, Term, TypeDef};

/// Why JSON could not be written as XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError {
    /// JSON pointer to the offending value.
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", if self.pointer.is_empty() { "/" } else { &self.pointer }, self.message)
    }
}

/// Writes the canonical JSON of message `root` (its element name) as an XML document.
pub fn to_xml(release: &Release, root: &QName, data: &Value) -> Result<String, ShapeError> {
    let decl = release
        .model
        .elements
        .get(root)
        .ok_or_else(|| ShapeError { pointer: String::new(), message: format!("{root} is not a message of XJustiz {}", release.version) })?;
    let mut w = Writer { release, out: String::with_capacity(4096), prefixes: BTreeMap::new(), pointer: String::new() };
    w.prefixes.insert(root.ns.to_string(), "tns".to_string());
    w.element(decl, data)?;
    // Namespace declarations go on the root, once every namespace used is known.
    let mut declarations = String::new();
    for (ns, prefix) in &w.prefixes {
        if !ns.is_empty() {
            let _ = write!(declarations, " xmlns:{prefix}=\"{}\"", escape(ns, true));
        }
    }
    let at = w.out.find(ROOT_MARK).unwrap_or(0);
    w.out.replace_range(at..at + ROOT_MARK.len(), &declarations);
    Ok(format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}\n", w.out))
}

const ROOT_MARK: &str = "\u{0}";

struct Writer<'a> {
    release: &'a Release,
    out: String,
    prefixes: BTreeMap<String, String>,
    pointer: String,
}

impl Writer<'_> {
    fn fail<T>(&self, message: String) -> Result<T, ShapeError> {
        Err(ShapeError { pointer: self.pointer.clone(), message })
    }

    fn prefixed(&mut self, name: &QName) -> String {
        if name.ns.is_empty() {
            return name.local.to_string();
        }
        if &*name.ns == XSI {
            self.prefixes.insert(XSI.to_string(), "xsi".to_string());
            return format!("xsi:{}", name.local);
        }
        let next = format!("ns{}", self.prefixes.len());
        let prefix = self.prefixes.entry(name.ns.to_string()).or_insert(next).clone();
        format!("{prefix}:{}", name.local)
    }

    fn element(&mut self, decl: &ElementDecl, value: &Value) -> Result<(), ShapeError> {
        let model = &self.release.model;
        let tag = self.prefixed(&decl.name);
        let first = self.out.is_empty();
        self.out.push('<');
        self.out.push_str(&tag);
        if first {
            self.out.push_str(ROOT_MARK);
        }
        let xsi_type = value.get("@xsi:type").and_then(Value::as_str).and_then(parse_clark);
        let def = match &xsi_type {
            Some(t) => model.type_def(t),
            None => model.resolve(&decl.type_ref),
        };
        let def = match def {
            Some(d) => d,
            None => return self.fail(format!("the type of <{}> is not defined", decl.name.local)),
        };
        match def {
            TypeDef::Simple(_) => {
                let Some(text) = value.as_str() else { return self.fail(format!("<{}> needs a string", decl.name.local)) };
                self.out.push('>');
                self.out.push_str(&escape(text, false));
            }
            TypeDef::Complex(ct) => {
                let Some(obj) = value.as_object() else { return self.fail(format!("<{}> needs an object", decl.name.local)) };
                self.attributes(ct, obj, xsi_type.as_ref())?;
                self.out.push('>');
                match &ct.content {
                    Content::Empty => {}
                    Content::Simple(_) => {
                        let text = obj.get("#text").and_then(Value::as_str).unwrap_or_default();
                        self.out.push_str(&escape(text, false));
                    }
                    Content::Elements(p) => {
                        if let Some(text) = obj.get("#text").and_then(Value::as_str).filter(|_| ct.mixed) {
                            self.out.push_str(&escape(text, false));
                        }
                        let mut known = Vec::new();
                        particle_keys(p, &mut known);
                        if let Some(k) = obj.keys().find(|k| !k.starts_with('@') && *k != "#text" && !known.contains(&k.as_str())) {
                            return self.fail(format!("<{}> has no child {k:?}", decl.name.local));
                        }
                        self.particle(p, obj)?;
                    }
                }
            }
        }
        self.out.push_str("</");
        self.out.push_str(&tag);
        self.out.push('>');
        Ok(())
    }

    fn attributes(&mut self, ct: &ComplexType, obj: &Map<String, Value>, xsi_type: Option<&QName>) -> Result<(), ShapeError> {
        for (key, value) in obj.iter().filter(|(k, _)| k.starts_with('@')) {
            let Some(text) = value.as_str() else { return self.fail(format!("attribute {key} needs a string")) };
            let name = match key.strip_prefix("@xsi:") {
                Some(local) => QName::new(XSI, local),
                None => {
                    let local = &key[1..];
                    match ct.attributes.iter().find(|a| &*a.name.local == local) {
                        Some(a) => a.name.clone(),
                        None if ct.any_attribute => QName::new("", local),
                        None => return self.fail(format!("attribute {local} is not declared")),
                    }
                }
            };
            let text = match (xsi_type, &*name.ns == XSI && &*name.local == "type") {
                (Some(t), true) => {
                    let type_name = QName::new(&t.ns, &t.local);
                    self.prefixed(&type_name)
                }
                _ => text.to_string(),
            };
            let attr = self.prefixed(&name);
            let _ = write!(self.out, " {attr}=\"{}\"", escape(&text, true));
        }
        Ok(())
    }

    fn particle(&mut self, p: &Particle, obj: &Map<String, Value>) -> Result<(), ShapeError> {
        match (&p.term, &p.key) {
            (Term::Element(decl), key) => {
                let key = key.as_deref().unwrap_or(&decl.name.local);
                self.each(obj, key, |w, v| w.element(decl, v))
            }
            (Term::Any { .. }, key) => self.each(obj, key.as_deref().unwrap_or(crate::xsd::ANY_KEY), |w, v| match v.as_str() {
                Some(raw) => {
                    w.out.push_str(raw);
                    Ok(())
                }
                None => w.fail("xs:any content must be an XML string".into()),
            }),
            (_, Some(key)) => self.each(obj, key, |w, v| match v.as_object() {
                Some(item) => w.term(&p.term, item),
                None => w.fail(format!("{key} items must be objects")),
            }),
            (_, None) => self.term(&p.term, obj),
        }
    }

    fn term(&mut self, term: &Term, obj: &Map<String, Value>) -> Result<(), ShapeError> {
        match term {
            Term::Sequence(parts) | Term::Choice(parts) | Term::All(parts) => parts.iter().try_for_each(|c| self.particle(c, obj)),
            _ => Ok(()),
        }
    }

    /// Calls `write` for the value under `key`, or for each item when it is an array.
    fn each(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        mut write: impl FnMut(&mut Self, &Value) -> Result<(), ShapeError>,
    ) -> Result<(), ShapeError> {
        let Some(value) = obj.get(key) else { return Ok(()) };
        let len = self.pointer.len();
        self.pointer.push('/');
        self.pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
        let result = match value {
            Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| {
                let l = self.pointer.len();
                let _ = write!(self.pointer, "/{i}");
                let r = write(self, v);
                self.pointer.truncate(l);
                r
            }),
            single => write(self, single),
        };
        self.pointer.truncate(len);
        result
    }
}

/// Every key a content model fills.
pub(crate) fn particle_keys<'p>(p: &'p Particle, out: &mut Vec<&'p str>) {
    if let Some(k) = &p.key {
        out.push(k);
        return;
    }
    if let Term::Sequence(parts) | Term::Choice(parts) | Term::All(parts) = &p.term {
        parts.iter().for_each(|c| particle_keys(c, out));
    }
}

/// `{ns}local` to a name.
pub fn parse_clark(s: &str) -> Option<QName> {
    let (ns, local) = s.strip_prefix('{')?.split_once('}')?;
    Some(QName::new(ns, local))
}

/// Escapes text (and, in attributes, quotes and line breaks).
pub fn escape(s: &str, attribute: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attribute => out.push_str("&quot;"),
            '\n' if attribute => out.push_str("&#10;"),
            '\t' if attribute => out.push_str("&#9;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// Writes a parsed element back as XML, with the prefixes and namespace declarations it was
/// read with.
pub fn write_element(e: &Element) -> String {
    let mut out = String::new();
    write_into(e, &mut out);
    out
}

fn write_into(e: &Element, out: &mut String) {
    let tag = if e.prefix.is_empty() { e.name.local.to_string() } else { format!("{}:{}", e.prefix, e.name.local) };
    out.push('<');
    out.push_str(&tag);
    for (prefix, ns) in &e.namespaces {
        let _ = if prefix.is_empty() {
            write!(out, " xmlns=\"{}\"", escape(ns, true))
        } else {
            write!(out, " xmlns:{prefix}=\"{}\"", escape(ns, true))
        };
    }
    for (name, value) in &e.attributes {
        let prefix = if &*name.ns == XSI {
            "xsi:".to_string()
        } else if name.ns.is_empty() {
            String::new()
        } else {
            format!("{}:", prefix_for(e, &name.ns).unwrap_or("ns"))
        };
        let _ = write!(out, " {prefix}{}=\"{}\"", name.local, escape(value, true));
    }
    out.push('>');
    out.push_str(&escape(&e.text, false));
    for c in &e.children {
        write_into(c, out);
    }
    let _ = write!(out, "</{tag}>");
}

fn prefix_for<'e>(e: &'e Element, ns: &str) -> Option<&'e str> {
    e.namespaces.iter().find(|(p, n)| n == ns && !p.is_empty()).map(|(p, _)| p.as_str())
}

/// A canonical text form of a document for equivalence: names resolved, attributes sorted,
/// namespace declarations and prefixes ignored, `xsi:type` resolved, text whitespace-collapsed.
pub fn canonical(e: &Element) -> String {
    let mut out = String::new();
    canonical_into(e, &mut out, 0);
    out
}

fn canonical_into(e: &Element, out: &mut String, depth: usize) {
    let _ = write!(out, "{:indent$}{}", "", e.name, indent = depth * 2);
    let mut attrs: Vec<(String, String)> = e
        .attributes
        .iter()
        .map(|(n, v)| match (&e.xsi_type, &*n.ns == XSI && &*n.local == "type") {
            (Some(t), true) => (n.to_string(), t.to_string()),
            _ => (n.to_string(), v.split_whitespace().collect::<Vec<_>>().join(" ")),
        })
        .collect();
    attrs.sort();
    for (n, v) in attrs {
        let _ = write!(out, " {n}={v:?}");
    }
    let text = e.text.split_whitespace().collect::<Vec<_>>().join(" ");
    if !text.is_empty() {
        let _ = write!(out, " text={text:?}");
    }
    out.push('\n');
    for c in &e.children {
        canonical_into(c, out, depth + 1);
    }
}
