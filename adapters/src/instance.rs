//! Reading XJustiz instance documents into an element tree, hardened against hostile input.
//!
//! DTDs (and with them every entity declaration) are refused, only the five predefined entities
//! and character references are expanded, and depth and size are bounded ([`Limits`]). Every
//! element keeps its byte offset so errors can name a line without counting lines on the fast path.

use std::borrow::Cow;
use std::collections::HashMap;

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{QName as RawName, ResolveResult};
use quick_xml::NsReader;

use crate::xsd::QName;

/// The XML Schema instance namespace (`xsi:type`, `xsi:nil`, `xsi:schemaLocation`).
pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// Bounds on what a document may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest document in bytes.
    pub max_bytes: usize,
    /// Deepest element nesting.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bytes: 64 * 1024 * 1024, max_depth: 256 }
    }
}

/// An element of an instance document.
#[derive(Debug, Clone, PartialEq)]
pub struct Element<'a> {
    /// Resolved name.
    pub name: QName,
    /// The prefix it was written with ("" for none).
    pub prefix: std::sync::Arc<str>,
    /// Attributes other than namespace declarations, resolved.
    pub attributes: Vec<(QName, Cow<'a, str>)>,
    /// Namespace declarations written on this element: (prefix, uri).
    pub namespaces: Vec<(String, String)>,
    /// `xsi:type`, resolved against the namespaces in scope.
    pub xsi_type: Option<QName>,
    /// Child elements in document order.
    pub children: Vec<Element<'a>>,
    /// Character data directly inside this element, concatenated (borrowed from the document
    /// unless entities or line breaks had to be replaced, or several pieces joined).
    pub text: Cow<'a, str>,
    /// Byte offset of the start tag.
    pub offset: usize,
}

impl Element<'_> {
    /// An attribute by name.
    pub fn attribute(&self, ns: &str, local: &str) -> Option<&str> {
        self.attributes.iter().find(|(n, _)| &*n.ns == ns && &*n.local == local).map(|(_, v)| v.as_ref())
    }
}

/// A document that is not well-formed or breaks the limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// The 1-based line of a byte offset.
pub fn line_of(xml: &[u8], offset: usize) -> usize {
    1 + xml[..offset.min(xml.len())].iter().filter(|&&b| b == b'\n').count()
}

/// Parses a whole document into its root element.
pub fn parse(xml: &[u8], limits: Limits) -> Result<Element<'_>, SyntaxError> {
    let fail = |offset: usize, message: String| SyntaxError { line: line_of(xml, offset), message };
    if xml.len() > limits.max_bytes {
        return Err(fail(0, format!("document is {} bytes, more than the limit of {}", xml.len(), limits.max_bytes)));
    }
    let text = std::str::from_utf8(xml).map_err(|e| fail(e.valid_up_to(), format!("not UTF-8: {e}")))?;
    let mut reader = NsReader::from_str(text);
    reader.config_mut().expand_empty_elements = true;
    let mut stack: Vec<Element<'_>> = Vec::new();
    let mut root: Option<Element<'_>> = None;
    let mut namespaces = Namespaces::default();
    let mut pending_space: Option<std::borrow::Cow<'_, str>> = None;
    loop {
        let offset = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(|e| fail(reader.error_position() as usize, e.to_string()))?;
        match event {
            Event::Start(start) => {
                // Whitespace before a child element is never content (no XJustiz type is mixed).
                pending_space = None;
                if root.is_some() {
                    return Err(fail(offset, "content after the root element".into()));
                }
                if stack.len() >= limits.max_depth {
                    return Err(fail(offset, format!("elements nested deeper than {}", limits.max_depth)));
                }
                let element = start_element(text, &reader, &start, offset, &mut namespaces).map_err(|m| fail(offset, m))?;
                stack.push(element);
            }
            Event::End(_) => {
                let mut done = stack.pop().ok_or_else(|| fail(offset, "end tag without start tag".into()))?;
                if let Some(space) = pending_space.take() {
                    if done.children.is_empty() {
                        append(&mut done.text, space);
                    }
                }
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => root = Some(done),
                }
            }
            Event::Text(t) => {
                // The document is already UTF-8: re-slice it instead of validating each piece again.
                let content = match document_slice(text, &t) {
                    Some(slice) if !slice.contains('\r') => Cow::Borrowed(slice),
                    _ => Cow::Owned(t.xml_content().map_err(|e| fail(offset, e.to_string()))?.into_owned()),
                };
                match stack.last_mut() {
                    // Whitespace waits: dropped if a child element follows (no allocation for
                    // indentation), kept if the element ends without children.
                    Some(e) if pending_space.is_none() && e.text.is_empty() && content.bytes().all(|b| b.is_ascii_whitespace()) => {
                        pending_space = Some(content);
                    }
                    Some(e) => {
                        if let Some(space) = pending_space.take() {
                            append(&mut e.text, space);
                        }
                        append(&mut e.text, content)
                    }
                    None if content.trim().is_empty() => {}
                    None => return Err(fail(offset, "text outside the root element".into())),
                }
            }
            Event::CData(c) => {
                let content = c.decode().map_err(|e| fail(offset, e.to_string()))?;
                match stack.last_mut() {
                    Some(e) => {
                        if let Some(space) = pending_space.take() {
                            append(&mut e.text, space);
                        }
                        append(&mut e.text, content)
                    }
                    None => return Err(fail(offset, "CDATA outside the root element".into())),
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| fail(offset, e.to_string()))? {
                    Some(c) => c,
                    None => match r.as_ref() {
                        b"amp" => '&',
                        b"lt" => '<',
                        b"gt" => '>',
                        b"quot" => '"',
                        b"apos" => '\'',
                        other => {
                            return Err(fail(offset, format!("undeclared entity &{};", String::from_utf8_lossy(other))));
                        }
                    },
                };
                match stack.last_mut() {
                    Some(e) => {
                        if let Some(space) = pending_space.take() {
                            append(&mut e.text, space);
                        }
                        e.text.to_mut().push(resolved)
                    }
                    None => return Err(fail(offset, "reference outside the root element".into())),
                }
            }
            Event::DocType(_) => return Err(fail(offset, "DOCTYPE is not allowed (no DTDs, no entity declarations)".into())),
            Event::Empty(_) => unreachable!("empty elements are expanded"),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(fail(xml.len(), format!("document ends inside <{}>", stack.last().map(|e| &*e.name.local).unwrap_or(""))));
    }
    root.ok_or_else(|| fail(0, "no root element".into()))
}

/// Namespace URIs, prefixes and local names of one document, each stored once and shared by
/// every element that uses it (documents repeat a few hundred names many times).
#[derive(Default)]
struct Namespaces(Vec<std::sync::Arc<str>>, Vec<std::sync::Arc<str>>, HashMap<Vec<u8>, std::sync::Arc<str>, crate::fasthash::FastHash>);

impl Namespaces {
    fn local(&mut self, name: &[u8]) -> std::sync::Arc<str> {
        if let Some(known) = self.2.get(name) {
            return known.clone();
        }
        let new: std::sync::Arc<str> = String::from_utf8_lossy(name).as_ref().into();
        self.2.insert(name.to_vec(), new.clone());
        new
    }

    fn prefix(&mut self, prefix: &[u8]) -> std::sync::Arc<str> {
        if let Some(known) = self.1.iter().find(|k| k.as_bytes() == prefix) {
            return known.clone();
        }
        let new: std::sync::Arc<str> = String::from_utf8_lossy(prefix).as_ref().into();
        self.1.push(new.clone());
        new
    }

    fn intern(&mut self, resolved: ResolveResult<'_>) -> Result<std::sync::Arc<str>, String> {
        let uri: &[u8] = match resolved {
            ResolveResult::Bound(n) => n.into_inner(),
            ResolveResult::Unbound => b"",
            ResolveResult::Unknown(p) => return Err(format!("unbound namespace prefix {}", String::from_utf8_lossy(&p))),
        };
        if let Some(known) = self.0.iter().find(|k| k.as_bytes() == uri) {
            return Ok(known.clone());
        }
        let new: std::sync::Arc<str> = String::from_utf8_lossy(uri).as_ref().into();
        self.0.push(new.clone());
        Ok(new)
    }
}

fn start_element<'a>(
    input: &'a str,
    reader: &NsReader<&'a [u8]>,
    start: &BytesStart<'a>,
    offset: usize,
    namespaces: &mut Namespaces,
) -> Result<Element<'a>, String> {
    let (ns, local) = reader.resolve_element(start.name());
    let ns = namespaces.intern(ns)?;
    let prefix = namespaces.prefix(start.name().prefix().map(|p| p.into_inner()).unwrap_or_default());
    let mut element = Element {
        name: QName { ns, local: namespaces.local(local.as_ref()) },
        prefix,
        attributes: Vec::new(),
        namespaces: Vec::new(),
        xsi_type: None,
        children: Vec::new(),
        text: Cow::Borrowed(""),
        offset,
    };
    for attr in start.attributes() {
        let attr = attr.map_err(|e| e.to_string())?;
        let key = attr.key;
        let value = match document_slice(input, &attr.value) {
            Some(raw) if !raw.contains('&') => Cow::Borrowed(raw),
            _ => reborrow(input, attr.unescape_value().map_err(|e| e.to_string())?),
        };
        let value = normalize_attribute(value);
        if key.as_ref() == b"xmlns" {
            element.namespaces.push((String::new(), value.into_owned()));
            continue;
        }
        if let Some(p) = key.as_ref().strip_prefix(b"xmlns:") {
            element.namespaces.push((String::from_utf8_lossy(p).into_owned(), value.into_owned()));
            continue;
        }
        let (ans, alocal) = reader.resolve_attribute(key);
        let name = QName { ns: namespaces.intern(ans)?, local: namespaces.local(alocal.as_ref()) };
        if element.attributes.iter().any(|(n, _)| *n == name) {
            return Err(format!("attribute {} given twice", name.local));
        }
        if &*name.ns == XSI && &*name.local == "type" {
            let (tns, tlocal) = reader.resolve_element(RawName(value.trim().as_bytes()));
            let tns = namespaces.intern(tns).map_err(|e| format!("xsi:type: {e}"))?;
            element.xsi_type = Some(QName { ns: tns, local: namespaces.local(tlocal.as_ref()) });
        }
        element.attributes.push((name, value));
    }
    Ok(element)
}

/// Attribute-value normalisation of XML 1.0 (section 3.3.3): literal tabs and line breaks become spaces.
fn normalize_attribute(value: Cow<'_, str>) -> Cow<'_, str> {
    if value.contains(['\t', '\n', '\r']) {
        Cow::Owned(value.replace("\r\n", " ").replace(['\t', '\n', '\r'], " "))
    } else {
        value
    }
}

/// quick-xml ties attribute values to the borrow of their start tag; a value that is a slice of
/// the document is re-sliced from the document itself, so it can outlive the tag.
fn reborrow<'a>(input: &'a str, value: Cow<'_, str>) -> Cow<'a, str> {
    match &value {
        Cow::Borrowed(v) => match document_slice(input, v.as_bytes()) {
            Some(slice) => Cow::Borrowed(slice),
            None => Cow::Owned(value.into_owned()),
        },
        Cow::Owned(_) => Cow::Owned(value.into_owned()),
    }
}

/// `bytes` as a slice of `input` when they lie inside it (checked in constant time: bounds and
/// character boundaries), so borrowed pieces need no second UTF-8 validation.
fn document_slice<'a>(input: &'a str, bytes: &[u8]) -> Option<&'a str> {
    let start = (bytes.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
    let slice = input.get(start..start.checked_add(bytes.len())?)?;
    (slice.as_ptr() == bytes.as_ptr()).then_some(slice)
}

/// Appends a piece of character data, borrowing when it is the first piece.
fn append<'a>(text: &mut Cow<'a, str>, piece: Cow<'a, str>) {
    if text.is_empty() {
        *text = piece;
    } else {
        text.to_mut().push_str(&piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_attributes_and_text() {
        let xml = br#"<?xml version="1.0"?>
<t:a xmlns:t="urn:t" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" x="1 &amp; 2">
  <t:b xsi:type="t:T">A&#65;&lt;<![CDATA[<c>]]></t:b><c/>
</t:a>"#;
        let root = parse(xml, Limits::default()).expect("parses");
        assert_eq!(root.name, QName::new("urn:t", "a"));
        assert_eq!(root.attribute("", "x"), Some("1 & 2"));
        assert_eq!(root.children.len(), 2);
        assert_eq!(root.children[0].text, "AA<<c>");
        assert_eq!(root.children[0].xsi_type, Some(QName::new("urn:t", "T")));
        assert_eq!(root.children[1].name, QName::new("", "c"));
        assert_eq!(line_of(xml, root.children[0].offset), 3);
    }

    #[test]
    fn normalizes_line_ends_and_attribute_whitespace() {
        // Borrowed fast path and decoded slow path must agree with XML 1.0 sections 2.11 and 3.3.3.
        let xml = b"<a x=\"1\r\n2\t3\" y=\"&#x41;\"><b>line\r\nnext\rlast</b><c>plain</c></a>";
        let root = parse(xml, Limits::default()).expect("parses");
        assert_eq!(root.attribute("", "x"), Some("1 2 3"));
        assert_eq!(root.attribute("", "y"), Some("A"));
        assert_eq!(root.children[0].text, "line\nnext\nlast");
        assert!(matches!(root.children[1].text, Cow::Borrowed("plain")), "plain text is borrowed");
    }

    #[test]
    fn refuses_hostile_documents() {
        let cases: [(&[u8], &str); 6] = [
            (b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>", "DOCTYPE"),
            (b"<a>&x;</a>", "undeclared entity"),
            (b"<a><b></a>", ""),
            (b"<a/><b/>", "after the root"),
            (b"<p:a/>", "unbound"),
            (b"", "no root"),
        ];
        for (xml, expected) in cases {
            let err = parse(xml, Limits::default()).expect_err(&String::from_utf8_lossy(xml));
            assert!(err.message.contains(expected), "{}: {err}", String::from_utf8_lossy(xml));
        }
        let deep = format!("{}{}", "<a>".repeat(300), "</a>".repeat(300));
        assert!(parse(deep.as_bytes(), Limits::default()).expect_err("deep").message.contains("deeper"));
        let big = Limits { max_bytes: 10, max_depth: 10 };
        assert!(parse(b"<a>0123456789</a>", big).expect_err("big").message.contains("bytes"));
    }
}
