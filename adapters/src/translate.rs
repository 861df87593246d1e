//! Validation and translation of one instance document against the model of its release,
//! in one walk: every element is checked against its declaration while its canonical JSON is
//! built.
//!
//! Canonical JSON, driven by the model ([`crate::xsd::assign_keys`]):
//! - an element of simple type is a string holding its whitespace-normalised lexical form
//!   (numbers and dates are never converted, so nothing loses precision);
//! - an element of complex type is an object: attributes as `@name`, simple content as
//!   `#text`, child elements under their particle's key;
//! - a key whose particle may repeat always holds an array, even of one item;
//! - a repeatable group of several elements is one array of objects, one per pass, so the order
//!   of interleaved siblings survives;
//! - `xsi:type` is kept as `@xsi:type` in Clark notation (`{namespace}local`); other `xsi:`
//!   attributes as written.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::instance::{Element, XSI};
use crate::simple::{self, Patterns};
use crate::xsd::{
    ComplexType, Content, ElementDecl, IdentityConstraint, IdentityKind, MaxOccurs, Model, NameTest, Particle, QName, Term, TypeDef,
    TypeRef, XPath,
};

/// The compiled model of one XJustiz release, ready to validate and translate.
#[derive(Debug)]
pub struct Release {
    /// The release, e.g. `3.6.2`.
    pub version: String,
    /// Its type model.
    pub model: Model,
    patterns: Patterns,
}

/// One validation error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    /// Element path, e.g. `/nachricht.../nachrichtenkopf/absender`.
    pub path: String,
    /// 1-based line of the element's start tag.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.path, self.message)
    }
}

impl Release {
    /// Wraps a model.
    pub fn new(version: &str, model: Model) -> Release {
        let patterns = Patterns::for_model(&model);
        Release { version: version.to_string(), model, patterns }
    }

    /// Validates a parsed document and translates it; the JSON is complete only when there are
    /// no issues.
    pub fn translate(&self, xml: &[u8], root: &Element) -> (Value, Vec<Issue>) {
        let mut walker = Walker { release: self, issues: Vec::new(), path: String::new() };
        let value = match self.model.elements.get(&root.name) {
            Some(decl) => walker.element(root, decl),
            None => {
                walker.issue(root, format!("{} is not a message of XJustiz {}", root.name, self.version));
                Value::Null
            }
        };
        let mut issues = walker.issues;
        offsets_to_lines(xml, &mut issues);
        (value, issues)
    }
}

struct Walker<'a> {
    release: &'a Release,
    issues: Vec<Issue>,
    path: String,
}

/// A content model did not match; the issue is recorded already.
struct Mismatch;

impl<'a> Walker<'a> {
    fn model(&self) -> &'a Model {
        &self.release.model
    }

    fn issue(&mut self, at: &Element, message: String) {
        let path = if self.path.is_empty() { format!("/{}", at.name.local) } else { self.path.clone() };
        // `line` holds the byte offset until `translate` turns all offsets into lines in one pass.
        self.issues.push(Issue { path, line: at.offset, message });
    }

    fn element(&mut self, node: &Element, decl: &'a ElementDecl) -> Value {
        let path_len = self.path.len();
        self.path.push('/');
        self.path.push_str(&node.name.local);
        let value = self.element_inner(node, decl);
        if !decl.identity.is_empty() {
            self.identity(node, &decl.identity);
        }
        self.path.truncate(path_len);
        value
    }

    fn element_inner(&mut self, node: &Element, decl: &'a ElementDecl) -> Value {
        let model = self.model();
        let def = match &node.xsi_type {
            Some(xt) => match model.type_def(xt) {
                None => {
                    self.issue(node, format!("xsi:type {xt} is not a known type"));
                    return Value::Null;
                }
                Some(def) => {
                    if let TypeRef::Named(declared) = &decl.type_ref {
                        if !model.derives_from(xt, declared) {
                            self.issue(node, format!("xsi:type {xt} does not derive from the declared type {declared}"));
                        }
                    }
                    def
                }
            },
            None => match model.resolve(&decl.type_ref) {
                Some(def) => def,
                None => {
                    self.issue(node, format!("type {:?} is not defined", decl.type_ref));
                    return Value::Null;
                }
            },
        };
        match def {
            TypeDef::Simple(st) => {
                if let Some(child) = node.children.first() {
                    self.issue(child, format!("element <{}> is not allowed: {} has simple content", child.name.local, node.name.local));
                }
                for (name, _) in node.attributes.iter().filter(|(n, _)| &*n.ns != XSI) {
                    self.issue(node, format!("attribute {} is not allowed", name.local));
                }
                let text = self.simple_value(node, st, &node.text, "");
                if let Some(fixed) = &decl.fixed {
                    if simple::normalize(&text, "collapse") != simple::normalize(fixed, "collapse") {
                        self.issue(node, format!("value \"{text}\" differs from the fixed value \"{fixed}\""));
                    }
                }
                Value::String(text)
            }
            TypeDef::Complex(ct) => {
                if ct.is_abstract && node.xsi_type.is_none() {
                    self.issue(node, format!("the type of {} is abstract: xsi:type must name a derived type", node.name.local));
                }
                Value::Object(self.complex(node, ct))
            }
        }
    }

    fn simple_value(&mut self, node: &Element, st: &crate::xsd::SimpleType, text: &str, what: &str) -> String {
        match simple::check(self.model(), &self.release.patterns, st, text) {
            Ok(normalized) => normalized.into_owned(),
            Err(message) => {
                self.issue(node, format!("{what}{message}"));
                text.to_string()
            }
        }
    }

    fn complex(&mut self, node: &Element, ct: &'a ComplexType) -> Map<String, Value> {
        let model = self.model();
        let mut obj = Map::new();
        for (name, value) in &node.attributes {
            if &*name.ns == XSI {
                let v = match (&node.xsi_type, &*name.local) {
                    (Some(t), "type") => format!("{{{}}}{}", t.ns, t.local),
                    _ => value.to_string(),
                };
                obj.insert(format!("@xsi:{}", name.local), Value::String(v));
                continue;
            }
            match ct.attributes.iter().find(|a| a.name == *name) {
                Some(decl) => {
                    let text = match simple::simple_of(model, &decl.type_ref) {
                        Some(st) => self.simple_value(node, st, value, &format!("attribute {}: ", name.local)),
                        None => value.to_string(),
                    };
                    if let Some(fixed) = &decl.fixed {
                        if text != *fixed {
                            self.issue(node, format!("attribute {} is \"{text}\", but fixed to \"{fixed}\"", name.local));
                        }
                    }
                    obj.insert(format!("@{}", name.local), Value::String(text));
                }
                None if ct.any_attribute => {
                    obj.insert(format!("@{}", name.local), Value::String(value.to_string()));
                }
                None => self.issue(node, format!("attribute {} is not allowed", name.local)),
            }
        }
        for decl in ct.attributes.iter().filter(|a| a.required) {
            if !node.attributes.iter().any(|(n, _)| *n == decl.name) {
                self.issue(node, format!("required attribute {} is missing", decl.name.local));
            }
        }
        let has_text = !node.text.trim().is_empty();
        match &ct.content {
            Content::Empty => {
                if let Some(child) = node.children.first() {
                    self.issue(child, format!("element <{}> is not allowed: {} has no content", child.name.local, node.name.local));
                }
                if has_text {
                    self.issue(node, "text is not allowed here".into());
                }
            }
            Content::Simple(r) => {
                if let Some(child) = node.children.first() {
                    self.issue(child, format!("element <{}> is not allowed: {} has simple content", child.name.local, node.name.local));
                }
                let text = match simple::simple_of(model, r) {
                    Some(st) => self.simple_value(node, st, &node.text, ""),
                    None => node.text.to_string(),
                };
                obj.insert("#text".into(), Value::String(text));
            }
            Content::Elements(p) => {
                if has_text && !ct.mixed {
                    self.issue(
                        node,
                        format!("text \"{}\" is not allowed: {} has element content", short(node.text.trim()), node.name.local),
                    );
                }
                if ct.mixed && has_text {
                    obj.insert("#text".into(), Value::String(node.text.to_string()));
                }
                let mut i = 0;
                if self.particle(p, node, &mut i, &mut obj).is_ok() {
                    if let Some(extra) = node.children.get(i) {
                        let name = extra.name.local.clone();
                        self.issue(extra, format!("element <{name}> is not expected here"));
                    }
                }
            }
        }
        obj
    }

    /// Matches `p` greedily against the children from `*i`: XSD's unique particle attribution
    /// makes the first particle that can take an element the only one.
    fn particle(&mut self, p: &'a Particle, parent: &Element, i: &mut usize, obj: &mut Map<String, Value>) -> Result<(), Mismatch> {
        let kids = &parent.children;
        let mut count = 0u32;
        while !matches!(p.occurs.max, MaxOccurs::Bounded(m) if count >= m) && *i < kids.len() && starts(&p.term, &kids[*i]) {
            let before = *i;
            match (&p.term, &p.key) {
                (Term::Sequence(_) | Term::Choice(_) | Term::All(_), Some(key)) => {
                    let mut item = Map::new();
                    self.term(p, parent, i, &mut item)?;
                    push(obj, key, true, Value::Object(item));
                }
                _ => self.term(p, parent, i, obj)?,
            }
            count += 1;
            if *i == before {
                break;
            }
        }
        if count < p.occurs.min && !nullable(&p.term) {
            let mut expected = Vec::new();
            first_names(&p.term, &mut expected);
            let expected = expected.join(" or ");
            match kids.get(*i) {
                Some(found) => {
                    let found_name = found.name.local.clone();
                    self.issue(found, format!("element <{found_name}> is not expected here; expected {expected}"));
                }
                None => self.issue(parent, format!("missing child element {expected}")),
            }
            return Err(Mismatch);
        }
        Ok(())
    }

    fn term(&mut self, p: &'a Particle, parent: &Element, i: &mut usize, obj: &mut Map<String, Value>) -> Result<(), Mismatch> {
        let kids = &parent.children;
        match &p.term {
            Term::Element(decl) => {
                let value = self.element(&kids[*i], decl);
                *i += 1;
                push(obj, p.key.as_deref().unwrap_or(&decl.name.local), p.array, value);
            }
            Term::Any { .. } => {
                push(obj, p.key.as_deref().unwrap_or(crate::xsd::ANY_KEY), true, Value::String(crate::xml::write_element(&kids[*i])));
                *i += 1;
            }
            Term::Sequence(parts) => {
                for c in parts {
                    self.particle(c, parent, i, obj)?;
                }
            }
            Term::Choice(parts) => {
                if let Some(c) = parts.iter().find(|c| *i < kids.len() && starts(&c.term, &kids[*i])) {
                    self.particle(c, parent, i, obj)?;
                }
            }
            Term::All(parts) => {
                let mut used = vec![false; parts.len()];
                while let Some(k) = (0..parts.len()).find(|&k| !used[k] && *i < kids.len() && starts(&parts[k].term, &kids[*i])) {
                    used[k] = true;
                    self.particle(&parts[k], parent, i, obj)?;
                }
                for (k, c) in parts.iter().enumerate() {
                    if !used[k] && c.occurs.min > 0 && !nullable(&c.term) {
                        let mut expected = Vec::new();
                        first_names(&c.term, &mut expected);
                        self.issue(parent, format!("missing child element {}", expected.join(" or ")));
                        return Err(Mismatch);
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks `xs:key`, `xs:unique` and `xs:keyref` declared on `node`'s declaration.
    fn identity(&mut self, node: &Element, constraints: &[IdentityConstraint]) {
        let mut tables: HashMap<&QName, HashSet<Vec<String>>> = HashMap::new();
        let ordered = constraints
            .iter()
            .filter(|c| !matches!(c.kind, IdentityKind::KeyRef(_)))
            .chain(constraints.iter().filter(|c| matches!(c.kind, IdentityKind::KeyRef(_))));
        for c in ordered {
            let mut seen = HashSet::new();
            for target in select(node, &c.selector) {
                let mut tuple = Vec::new();
                let mut complete = true;
                for field in &c.fields {
                    let values = field_values(target, field);
                    if values.len() > 1 {
                        self.issue(target, format!("{}: a field selects more than one value", c.name.local));
                    }
                    match values.into_iter().next() {
                        Some(v) => tuple.push(v),
                        None => complete = false,
                    }
                }
                match &c.kind {
                    IdentityKind::Key if !complete => {
                        self.issue(target, format!("key {}: a field of <{}> is missing", c.name.local, target.name.local))
                    }
                    IdentityKind::Key | IdentityKind::Unique if complete && !seen.insert(tuple.clone()) => {
                        self.issue(target, format!("{}: duplicate value {:?}", c.name.local, tuple.join(", ")))
                    }
                    IdentityKind::KeyRef(refer) if complete => {
                        if let Some(table) = tables.get(refer) {
                            if !table.contains(&tuple) {
                                self.issue(target, format!("{}: no {} has the value {:?}", c.name.local, refer.local, tuple.join(", ")));
                            }
                        }
                    }
                    _ => {}
                }
            }
            tables.insert(&c.name, seen);
        }
    }
}

/// Replaces the byte offsets in `issues[..].line` by 1-based lines, scanning the text once.
fn offsets_to_lines(xml: &[u8], issues: &mut [Issue]) {
    let mut order: Vec<usize> = (0..issues.len()).collect();
    order.sort_by_key(|&i| issues[i].line);
    let (mut at, mut line) = (0usize, 1usize);
    for i in order {
        let offset = issues[i].line.min(xml.len());
        if offset > at {
            line += xml[at..offset].iter().filter(|&&b| b == b'\n').count();
            at = offset;
        }
        issues[i].line = line;
    }
}

fn short(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

fn push(obj: &mut Map<String, Value>, key: &str, array: bool, value: Value) {
    if array {
        match obj.entry(key.to_string()).or_insert_with(|| Value::Array(Vec::new())) {
            Value::Array(items) => items.push(value),
            other => *other = Value::Array(vec![value]),
        }
    } else {
        obj.insert(key.to_string(), value);
    }
}

/// Whether a term can begin with `node`.
pub(crate) fn starts(term: &Term, node: &Element) -> bool {
    match term {
        Term::Element(decl) => decl.name == node.name,
        Term::Any { namespace } => any_allows(namespace, &node.name.ns),
        Term::Sequence(parts) => {
            for c in parts {
                if starts(&c.term, node) {
                    return true;
                }
                if c.occurs.min > 0 && !nullable(&c.term) {
                    return false;
                }
            }
            false
        }
        Term::Choice(parts) | Term::All(parts) => parts.iter().any(|c| starts(&c.term, node)),
    }
}

/// The `namespace` constraint of `xs:any` (`##targetNamespace` cannot be told apart here and
/// is treated like `##any`).
fn any_allows(constraint: &str, ns: &str) -> bool {
    constraint.split_whitespace().any(|c| match c {
        "##any" | "##targetNamespace" => true,
        "##other" => !ns.is_empty(),
        "##local" => ns.is_empty(),
        uri => uri == ns,
    })
}

/// Whether a term can match nothing.
pub(crate) fn nullable(term: &Term) -> bool {
    match term {
        Term::Element(_) | Term::Any { .. } => false,
        Term::Sequence(parts) | Term::All(parts) => parts.iter().all(|c| c.occurs.min == 0 || nullable(&c.term)),
        Term::Choice(parts) => parts.iter().any(|c| c.occurs.min == 0 || nullable(&c.term)),
    }
}

fn first_names(term: &Term, out: &mut Vec<String>) {
    match term {
        Term::Element(decl) => out.push(format!("<{}>", decl.name.local)),
        Term::Any { .. } => out.push("any element".into()),
        Term::Sequence(parts) => {
            for c in parts {
                first_names(&c.term, out);
                if c.occurs.min > 0 && !nullable(&c.term) {
                    break;
                }
            }
        }
        Term::Choice(parts) | Term::All(parts) => parts.iter().for_each(|c| first_names(&c.term, out)),
    }
}

fn test_matches(test: &NameTest, name: &QName) -> bool {
    match test {
        NameTest::Any => true,
        NameTest::Name(n) => n == name,
    }
}

/// The nodes an identity-constraint selector picks, in document order.
fn select<'e, 'x>(context: &'e Element<'x>, paths: &[XPath]) -> Vec<&'e Element<'x>> {
    let mut out: Vec<&Element<'x>> = Vec::new();
    for path in paths {
        for node in evaluate(context, path) {
            if !out.iter().any(|o| std::ptr::eq(*o, node)) {
                out.push(node);
            }
        }
    }
    out
}

fn evaluate<'e, 'x>(context: &'e Element<'x>, path: &XPath) -> Vec<&'e Element<'x>> {
    let mut current = vec![context];
    if path.descendants {
        let mut i = 0;
        while i < current.len() {
            let node = current[i];
            current.extend(node.children.iter());
            i += 1;
        }
    }
    for step in &path.steps {
        current = current.iter().flat_map(|n| n.children.iter()).filter(|c| test_matches(step, &c.name)).collect();
    }
    current
}

fn field_values(target: &Element, alternatives: &[XPath]) -> Vec<String> {
    let mut out = Vec::new();
    for path in alternatives {
        // The common field `@attr` or `child`: no node list needed.
        if !path.descendants && path.steps.len() <= 1 {
            let nodes: Box<dyn Iterator<Item = &Element>> = match path.steps.first() {
                None => Box::new(std::iter::once(target)),
                Some(step) => Box::new(target.children.iter().filter(move |c| test_matches(step, &c.name))),
            };
            for node in nodes {
                match &path.attribute {
                    Some(test) => {
                        out.extend(node.attributes.iter().filter(|(n, _)| test_matches(test, n)).map(|(_, v)| v.trim().to_string()))
                    }
                    None => out.push(node.text.trim().to_string()),
                }
            }
            continue;
        }
        for node in evaluate(target, path) {
            match &path.attribute {
                Some(test) => {
                    out.extend(node.attributes.iter().filter(|(n, _)| test_matches(test, n)).map(|(_, v)| v.trim().to_string()));
                }
                None => out.push(node.text.trim().to_string()),
            }
        }
    }
    out
}
