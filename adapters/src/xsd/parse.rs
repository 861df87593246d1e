//! Parses one XSD file into a small tree of XSD elements.

use std::path::Path;

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::NsReader;

use crate::{Error, Result};

/// A namespace-qualified name.
///
/// The local name comes first so comparisons fail fast: most names share their namespace.
/// The namespace is shared (`Arc<str>`) because instance documents repeat it on every element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QName {
    /// Local name.
    pub local: std::sync::Arc<str>,
    /// Namespace URI ("" for none).
    pub ns: std::sync::Arc<str>,
}

impl QName {
    /// A name in a namespace.
    pub fn new(ns: &str, local: &str) -> Self {
        QName { ns: ns.into(), local: local.into() }
    }
}

/// Serialised in Clark notation, `{namespace}local` (or just `local` without a namespace), so
/// names can be JSON map keys.
impl serde::Serialize for QName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.ns.is_empty() {
            s.serialize_str(&self.local)
        } else {
            s.serialize_str(&format!("{{{}}}{}", self.ns, self.local))
        }
    }
}

impl<'de> serde::Deserialize<'de> for QName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.strip_prefix('{').and_then(|r| r.split_once('}')) {
            Some((ns, local)) => Ok(QName::new(ns, local)),
            None => Ok(QName::new("", &s)),
        }
    }
}

impl std::fmt::Display for QName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{{{}}}{}", self.ns, self.local)
    }
}

/// Attributes whose values are QNames (or lists of them) in XSD.
const QNAME_ATTRIBUTES: [&str; 7] = ["type", "base", "ref", "itemType", "memberTypes", "substitutionGroup", "refer"];

/// An XSD element (only elements in the XSD namespace and their attributes are kept; the text
/// of `xs:documentation` is dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Local name in the XSD namespace, e.g. `complexType`.
    pub kind: String,
    /// Attributes as written.
    pub attrs: Vec<(String, String)>,
    /// QName-valued attributes, resolved: (attribute, names).
    pub refs: Vec<(String, Vec<QName>)>,
    /// Child XSD elements.
    pub children: Vec<Node>,
    /// Line of the start tag (1-based).
    pub line: u32,
}

impl Node {
    /// An attribute's value.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A resolved QName-valued attribute (the first name of a list).
    pub fn qname(&self, name: &str) -> Option<&QName> {
        self.refs.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.first())
    }

    /// Children of one kind.
    pub fn children_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.kind == kind)
    }

    /// This node and all below it, depth first.
    pub fn walk(&self) -> Vec<&Node> {
        let mut out = vec![self];
        let mut i = 0;
        while i < out.len() {
            let node = out[i];
            out.extend(node.children.iter());
            i += 1;
        }
        out
    }
}

/// Counts lines incrementally: positions only grow while parsing.
struct Lines<'a> {
    text: &'a [u8],
    at: usize,
    line: u32,
}

impl Lines<'_> {
    /// The line of the first non-blank byte at or after `position`.
    fn of(&mut self, position: usize) -> u32 {
        let start = (position..self.text.len()).find(|&i| !self.text[i].is_ascii_whitespace()).unwrap_or(self.text.len());
        if start >= self.at {
            self.line += self.text[self.at..start].iter().filter(|b| **b == b'\n').count() as u32;
            self.at = start;
        }
        self.line
    }
}

/// Parses the XSD at `path` into its `xs:schema` node.
pub fn parse_file(path: &Path) -> Result<Node> {
    let text = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    parse_bytes(path, &text)
}

/// Parses XSD text (`path` only names it in errors).
pub fn parse_bytes(path: &Path, text: &[u8]) -> Result<Node> {
    let mut reader = NsReader::from_reader(text);
    reader.config_mut().trim_text(true);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut skip_depth = 0usize; // inside non-XSD elements (e.g. appinfo content)
    let mut buf = Vec::new();
    let mut lines = Lines { text, at: 0, line: 1 };
    let xml_err =
        |reader: &NsReader<&[u8]>, message: String| Error::Xml { path: path.to_path_buf(), position: reader.buffer_position(), message };
    loop {
        let position = reader.buffer_position() as usize;
        let event = match reader.read_resolved_event_into(&mut buf) {
            Ok(event) => event,
            Err(e) => return Err(Error::Xml { path: path.to_path_buf(), position: position as u64, message: e.to_string() }),
        };
        match event {
            (ResolveResult::Bound(Namespace(ns)), Event::Start(start)) if ns == XS_BYTES && skip_depth == 0 => {
                let node = element(&reader, path, &start, lines.of(position))?;
                stack.push(node);
            }
            (ResolveResult::Bound(Namespace(ns)), Event::Empty(start)) if ns == XS_BYTES && skip_depth == 0 => {
                let node = element(&reader, path, &start, lines.of(position))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            (_, Event::Start(_)) => skip_depth += 1,
            (_, Event::End(_)) if skip_depth > 0 => skip_depth -= 1,
            (_, Event::End(_)) => {
                let node = stack.pop().ok_or_else(|| xml_err(&reader, "unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            (_, Event::DocType(_)) => return Err(xml_err(&reader, "DOCTYPE declarations are not accepted".into())),
            (_, Event::Eof) => break,
            _ => {}
        }
        buf.clear();
    }
    let root = root.ok_or_else(|| Error::Schema { path: path.to_path_buf(), message: "no xs:schema element".into() })?;
    if root.kind != "schema" {
        return Err(Error::Schema { path: path.to_path_buf(), message: format!("root element is xs:{}, not xs:schema", root.kind) });
    }
    Ok(root)
}

const XS_BYTES: &[u8] = b"http://www.w3.org/2001/XMLSchema";

fn element(reader: &NsReader<&[u8]>, path: &Path, start: &BytesStart<'_>, line: u32) -> Result<Node> {
    let kind = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    let mut refs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| Error::Xml { path: path.to_path_buf(), position: reader.buffer_position(), message: e.to_string() })?;
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        let value = attr
            .unescape_value()
            .map_err(|e| Error::Xml { path: path.to_path_buf(), position: reader.buffer_position(), message: e.to_string() })?
            .into_owned();
        if key == "xpath" {
            attrs.push((key, clark_xpath(reader, &value)));
            continue;
        }
        if QNAME_ATTRIBUTES.contains(&key.as_str()) {
            let mut names = Vec::new();
            for token in value.split_whitespace() {
                let (resolved, local) = reader.resolve(quick_xml::name::QName(token.as_bytes()), false);
                let ns = match resolved {
                    ResolveResult::Bound(Namespace(ns)) => String::from_utf8_lossy(ns).into_owned(),
                    ResolveResult::Unbound => String::new(),
                    ResolveResult::Unknown(prefix) => {
                        return Err(Error::Schema {
                            path: path.to_path_buf(),
                            message: format!(
                                "line {line}: {key}=\"{value}\" uses the undeclared prefix {:?}",
                                String::from_utf8_lossy(&prefix)
                            ),
                        })
                    }
                };
                names.push(QName { ns: ns.into(), local: String::from_utf8_lossy(local.as_ref()).as_ref().into() });
            }
            refs.push((key.clone(), names));
        }
        attrs.push((key, value));
    }
    Ok(Node { kind, attrs, refs, children: Vec::new(), line })
}

/// Rewrites the prefixed names of an identity-constraint XPath into Clark notation
/// (`{ns}local`). An undeclared prefix becomes `{?prefix}`, which matches nothing.
fn clark_xpath(reader: &NsReader<&[u8]>, xpath: &str) -> String {
    let mut out = String::with_capacity(xpath.len());
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if let Some((prefix, local)) = token.split_once(':').filter(|(p, _)| !p.is_empty() && !p.contains("::")) {
            if !local.starts_with(':') {
                let (resolved, _) = reader.resolve(quick_xml::name::QName(format!("{prefix}:x").as_bytes()), false);
                match resolved {
                    ResolveResult::Bound(Namespace(ns)) => out.push_str(&format!("{{{}}}{local}", String::from_utf8_lossy(ns))),
                    _ => out.push_str(&format!("{{?{prefix}}}{local}")),
                }
                token.clear();
                return;
            }
        }
        out.push_str(token);
        token.clear();
    };
    for c in xpath.chars() {
        if c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':') {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_qname_values_against_the_namespaces_in_scope() {
        let xsd = br#"<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:t="urn:t" targetNamespace="urn:t">
            <xs:annotation><xs:appinfo><other xmlns="urn:x"><x/></other></xs:appinfo></xs:annotation>
            <xs:element name="a" type="t:A"/>
            <xs:complexType name="A"><xs:sequence><xs:element name="b" type="xs:string" minOccurs="0"/></xs:sequence></xs:complexType>
        </xs:schema>"#;
        let root = parse_bytes(Path::new("t.xsd"), xsd).expect("parses");
        let a = root.children_of("element").next().expect("element a");
        assert_eq!(a.qname("type"), Some(&QName::new("urn:t", "A")));
        assert_eq!(a.line, 3);
        let b = root.walk().into_iter().find(|n| n.attr("name") == Some("b")).expect("b");
        assert_eq!(b.qname("type"), Some(&QName::new("http://www.w3.org/2001/XMLSchema", "string")));
        assert_eq!(b.attr("minOccurs"), Some("0"));
    }

    #[test]
    fn rejects_doctype_and_undeclared_prefixes() {
        let doctype = br#"<!DOCTYPE x [<!ENTITY e "x">]><xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema"/>"#;
        assert!(matches!(parse_bytes(Path::new("d.xsd"), doctype), Err(Error::Xml { .. })));
        let prefix = br#"<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema"><xs:element name="a" type="nope:A"/></xs:schema>"#;
        assert!(matches!(parse_bytes(Path::new("p.xsd"), prefix), Err(Error::Schema { .. })));
    }
}
