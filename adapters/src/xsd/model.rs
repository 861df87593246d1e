//! The compiled type model: what translation and validation walk.
//!
//! [`Model::build`] turns the global components of a [`SchemaSet`] into element declarations
//! and type definitions with everything derived already applied: complex extensions carry
//! their base's content and attributes, restrictions replace them, model-group and
//! attribute-group references are inlined, simple types carry every facet of their derivation
//! chain. Named types stay referenced by name ([`TypeRef::Named`]), which keeps recursive
//! types finite.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::parse::{Node, QName};
use super::set::{ComponentKind, SchemaSet, XS};
use crate::{Error, Result};

/// Upper occurrence bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaxOccurs {
    /// At most this many.
    Bounded(u32),
    /// `unbounded`.
    Unbounded,
}

/// How often a particle may occur.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occurs {
    /// `minOccurs`.
    pub min: u32,
    /// `maxOccurs`.
    pub max: MaxOccurs,
}

impl Occurs {
    /// Exactly once.
    pub const ONCE: Occurs = Occurs { min: 1, max: MaxOccurs::Bounded(1) };

    /// Whether more than one occurrence is allowed (JSON: always an array).
    pub fn repeatable(&self) -> bool {
        !matches!(self.max, MaxOccurs::Bounded(0 | 1))
    }
}

/// A type, by name or inline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TypeRef {
    /// A global or built-in type (`xs:*`).
    Named(QName),
    /// An anonymous type.
    Anonymous(Box<TypeDef>),
}

/// A type definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TypeDef {
    /// A simple type.
    Simple(SimpleType),
    /// A complex type.
    Complex(ComplexType),
}

/// Atomic, list or union.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Variety {
    /// A single value of `SimpleType::builtin`.
    Atomic,
    /// Whitespace-separated values of the item type.
    List(TypeRef),
    /// A value of one of the member types.
    Union(Vec<TypeRef>),
}

/// Constraining facets, accumulated along the derivation chain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Facets {
    /// Allowed values (of the nearest step that has any).
    pub enumeration: Vec<String>,
    /// Pattern sets: a value must match one pattern of every set (one set per derivation step).
    pub patterns: Vec<Vec<String>>,
    /// `length`.
    pub length: Option<u64>,
    /// `minLength`.
    pub min_length: Option<u64>,
    /// `maxLength`.
    pub max_length: Option<u64>,
    /// `totalDigits`.
    pub total_digits: Option<u32>,
    /// `fractionDigits`.
    pub fraction_digits: Option<u32>,
    /// `minInclusive`, lexical.
    pub min_inclusive: Option<String>,
    /// `maxInclusive`, lexical.
    pub max_inclusive: Option<String>,
    /// `minExclusive`, lexical.
    pub min_exclusive: Option<String>,
    /// `maxExclusive`, lexical.
    pub max_exclusive: Option<String>,
    /// `whiteSpace`.
    pub white_space: Option<String>,
}

/// A simple type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimpleType {
    /// The built-in type at the root of the derivation (local name in the XSD namespace).
    pub builtin: String,
    /// Atomic, list or union.
    pub variety: Variety,
    /// Facets of the whole derivation chain.
    pub facets: Facets,
}

/// An attribute of a complex type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttributeUse {
    /// Name (unqualified unless declared globally or with `form="qualified"`).
    pub name: QName,
    /// Its simple type.
    pub type_ref: TypeRef,
    /// `use="required"`.
    pub required: bool,
    /// `fixed` value.
    pub fixed: Option<String>,
    /// `default` value.
    pub default: Option<String>,
}

/// What a complex type contains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Content {
    /// Attributes only.
    Empty,
    /// Text of a simple type.
    Simple(TypeRef),
    /// Child elements.
    Elements(Particle),
}

/// A complex type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComplexType {
    /// Attributes, base attributes included.
    pub attributes: Vec<AttributeUse>,
    /// `xs:anyAttribute` present.
    pub any_attribute: bool,
    /// Content, base content included.
    pub content: Content,
    /// `mixed="true"`.
    pub mixed: bool,
    /// `abstract="true"`.
    pub is_abstract: bool,
    /// The type it derives from, if any.
    pub base: Option<QName>,
}

/// A particle: a term with occurrence bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Particle {
    /// Bounds.
    pub occurs: Occurs,
    /// What occurs.
    pub term: Term,
    /// The key this particle fills in the canonical JSON of its parent (see [`assign_keys`]):
    /// set for elements, for `xs:any`, and for repeatable groups of more than one element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Whether that key holds an array (the particle, or a group around it, may repeat).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub array: bool,
}

/// The term of a particle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Term {
    /// An element.
    Element(Box<ElementDecl>),
    /// In order.
    Sequence(Vec<Particle>),
    /// One of.
    Choice(Vec<Particle>),
    /// All, any order.
    All(Vec<Particle>),
    /// `xs:any`.
    Any {
        /// The `namespace` constraint as written (`##any` if absent).
        namespace: String,
    },
}

/// An element declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ElementDecl {
    /// Name as it appears in instances.
    pub name: QName,
    /// Its type.
    pub type_ref: TypeRef,
    /// `nillable="true"`.
    pub nillable: bool,
    /// `fixed` value.
    pub fixed: Option<String>,
    /// `default` value.
    pub default: Option<String>,
    /// Identity constraints (`xs:key`, `xs:unique`, `xs:keyref`) declared on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity: Vec<IdentityConstraint>,
}

/// Which identity constraint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum IdentityKind {
    /// `xs:key`: every selected node has the fields, and their values are unique.
    Key,
    /// `xs:unique`: values unique among selected nodes that have the fields.
    Unique,
    /// `xs:keyref`: values must occur among those of the referred key.
    KeyRef(QName),
}

/// A step of a restricted XPath (the subset XSD identity constraints allow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NameTest {
    /// `*`.
    Any,
    /// A qualified name.
    Name(QName),
}

/// One alternative of a selector or field XPath.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XPath {
    /// Starts with `.//`: the steps apply to the context node and all its descendants.
    pub descendants: bool,
    /// Child steps.
    pub steps: Vec<NameTest>,
    /// A final `@attribute` step (fields only).
    pub attribute: Option<NameTest>,
}

/// An identity constraint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityConstraint {
    /// Its name.
    pub name: QName,
    /// Key, unique or keyref.
    pub kind: IdentityKind,
    /// Selector alternatives.
    pub selector: Vec<XPath>,
    /// Fields, each with its alternatives.
    pub fields: Vec<Vec<XPath>>,
}

/// The compiled model of one XSD set.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Model {
    /// Global element declarations.
    pub elements: BTreeMap<QName, ElementDecl>,
    /// Global type definitions, hashed: translation looks one up for every element.
    #[serde(serialize_with = "sorted")]
    pub types: TypeMap,
}

/// Global type definitions by name.
pub type TypeMap = std::collections::HashMap<QName, TypeDef, crate::fasthash::FastHash>;

/// Serializes the types in name order, so that the committed model files are reproducible.
fn sorted<S: serde::Serializer>(types: &TypeMap, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    let ordered: BTreeMap<&QName, &TypeDef> = types.iter().collect();
    ordered.serialize(serializer)
}

struct Builder<'a> {
    set: &'a SchemaSet,
    types: BTreeMap<QName, TypeDef>,
    /// Named types being compiled (derivation cycles are errors).
    in_progress: Vec<QName>,
}

fn xs(local: &str) -> QName {
    QName::new(XS, local)
}

impl Model {
    /// Compiles every global element and type of the set.
    pub fn build(set: &SchemaSet) -> Result<Model> {
        let mut b = Builder { set, types: BTreeMap::new(), in_progress: Vec::new() };
        let names: Vec<QName> = set
            .all()
            .filter(|c| matches!(c.kind, ComponentKind::ComplexType | ComponentKind::SimpleType))
            .map(|c| c.name.clone())
            .collect();
        for name in names {
            b.named_type(&name)?;
        }
        let mut elements = BTreeMap::new();
        for c in set.components(ComponentKind::Element) {
            let target_ns = &set.files[c.file].target_namespace;
            elements.insert(c.name.clone(), b.element(&c.node, c.file, target_ns, true)?);
        }
        Ok(Model { elements, types: b.types.into_iter().collect() })
    }

    /// A named type (global or built in).
    pub fn named(&self, name: &QName) -> Option<TypeDef> {
        self.type_def(name).cloned()
    }

    /// The global types in name order.
    pub fn types_in_order(&self) -> BTreeMap<&QName, &TypeDef> {
        self.types.iter().collect()
    }

    /// A named type (global or built in), borrowed.
    pub fn type_def(&self, name: &QName) -> Option<&TypeDef> {
        if &*name.ns == XS {
            static BUILTINS: std::sync::OnceLock<std::collections::HashMap<String, TypeDef, crate::fasthash::FastHash>> =
                std::sync::OnceLock::new();
            let builtins = BUILTINS.get_or_init(|| BUILTIN_NAMES.iter().map(|n| (n.to_string(), builtin(n))).collect());
            return builtins.get(&*name.local);
        }
        self.types.get(name)
    }

    /// The definition a reference stands for.
    pub fn resolve<'a>(&'a self, r: &'a TypeRef) -> Option<&'a TypeDef> {
        match r {
            TypeRef::Named(n) => self.type_def(n),
            TypeRef::Anonymous(def) => Some(def),
        }
    }

    /// Whether named type `derived` is `base` or derives from it.
    pub fn derives_from(&self, derived: &QName, base: &QName) -> bool {
        let mut current = Some(derived.clone());
        let mut steps = 0;
        while let Some(name) = current {
            if &name == base {
                return true;
            }
            steps += 1;
            current = match self.type_def(&name) {
                Some(TypeDef::Complex(c)) if steps < 64 => c.base.clone(),
                _ => None,
            };
        }
        false
    }
}

/// The built-in types of XSD 1.0.
pub use super::set::BUILTIN_TYPES as BUILTIN_NAMES;

/// The definition of a built-in type.
fn builtin(local: &str) -> TypeDef {
    if local == "anyType" {
        return TypeDef::Complex(ComplexType {
            attributes: Vec::new(),
            any_attribute: true,
            content: Content::Elements(Particle {
                occurs: Occurs { min: 0, max: MaxOccurs::Unbounded },
                term: Term::Any { namespace: "##any".into() },
                key: Some(ANY_KEY.into()),
                array: true,
            }),
            mixed: true,
            is_abstract: false,
            base: None,
        });
    }
    TypeDef::Simple(SimpleType { builtin: local.to_string(), variety: Variety::Atomic, facets: Facets::default() })
}

impl Builder<'_> {
    fn error(&self, file: usize, node: &Node, message: String) -> Error {
        Error::Schema { path: self.set.files[file].path.clone(), message: format!("line {}: {message}", node.line) }
    }

    /// Compiles (once) a named type and returns its definition.
    fn named_type(&mut self, name: &QName) -> Result<TypeDef> {
        if &*name.ns == XS {
            return Ok(builtin(&name.local));
        }
        if let Some(t) = self.types.get(name) {
            return Ok(t.clone());
        }
        let set = self.set;
        let component = set
            .get(ComponentKind::ComplexType, name)
            .or_else(|| set.get(ComponentKind::SimpleType, name))
            .ok_or_else(|| Error::Schema { path: Default::default(), message: format!("type {name} is not defined") })?;
        if self.in_progress.contains(name) {
            return Err(self.error(component.file, &component.node, format!("type {name} derives from itself")));
        }
        self.in_progress.push(name.clone());
        let def = self.type_def(&component.node, component.file)?;
        self.in_progress.pop();
        self.types.insert(name.clone(), def.clone());
        Ok(def)
    }

    fn type_def(&mut self, node: &Node, file: usize) -> Result<TypeDef> {
        match node.kind.as_str() {
            "simpleType" => Ok(TypeDef::Simple(self.simple(node, file)?)),
            "complexType" => Ok(TypeDef::Complex(self.complex(node, file)?)),
            other => Err(self.error(file, node, format!("xs:{other} is not a type definition"))),
        }
    }

    /// A reference to a type from `type`/`base`-like attributes or an inline definition.
    fn type_ref(&mut self, node: &Node, file: usize, attr: &str) -> Result<TypeRef> {
        if let Some(name) = node.qname(attr) {
            return Ok(TypeRef::Named(name.clone()));
        }
        match node.children.iter().find(|c| c.kind == "simpleType" || c.kind == "complexType") {
            Some(inline) => Ok(TypeRef::Anonymous(Box::new(self.type_def(inline, file)?))),
            None => Ok(TypeRef::Named(xs(if attr == "itemType" { "anySimpleType" } else { "anyType" }))),
        }
    }

    fn simple_of(&mut self, r: &TypeRef, file: usize, node: &Node) -> Result<SimpleType> {
        let def = match r {
            TypeRef::Named(name) => self.named_type(name)?,
            TypeRef::Anonymous(def) => (**def).clone(),
        };
        match def {
            TypeDef::Simple(s) => Ok(s),
            TypeDef::Complex(ComplexType { content: Content::Simple(inner), .. }) => self.simple_of(&inner, file, node),
            TypeDef::Complex(_) => Err(self.error(file, node, "a simple type is required here".into())),
        }
    }

    fn simple(&mut self, node: &Node, file: usize) -> Result<SimpleType> {
        if let Some(r) = node.children_of("restriction").next() {
            let base = self.type_ref(r, file, "base")?;
            let mut st = self.simple_of(&base, file, r)?;
            add_facets(&mut st.facets, r);
            return Ok(st);
        }
        if let Some(l) = node.children_of("list").next() {
            let item = self.type_ref(l, file, "itemType")?;
            return Ok(SimpleType { builtin: "string".into(), variety: Variety::List(item), facets: Facets::default() });
        }
        if let Some(u) = node.children_of("union").next() {
            let mut members: Vec<TypeRef> =
                u.refs.iter().filter(|(k, _)| k == "memberTypes").flat_map(|(_, v)| v.iter().cloned()).map(TypeRef::Named).collect();
            for inline in u.children_of("simpleType") {
                members.push(TypeRef::Anonymous(Box::new(TypeDef::Simple(self.simple(inline, file)?))));
            }
            return Ok(SimpleType { builtin: "anySimpleType".into(), variety: Variety::Union(members), facets: Facets::default() });
        }
        Err(self.error(file, node, "xs:simpleType without restriction, list or union".into()))
    }

    fn complex(&mut self, node: &Node, file: usize) -> Result<ComplexType> {
        let mixed = node.attr("mixed") == Some("true");
        let is_abstract = node.attr("abstract") == Some("true");
        if let Some(cc) = node.children_of("complexContent").next() {
            let mixed = mixed || cc.attr("mixed") == Some("true");
            let (derivation, is_extension) = match (cc.children_of("extension").next(), cc.children_of("restriction").next()) {
                (Some(e), _) => (e, true),
                (None, Some(r)) => (r, false),
                _ => return Err(self.error(file, cc, "xs:complexContent without extension or restriction".into())),
            };
            let base_name = derivation.qname("base").cloned().unwrap_or_else(|| xs("anyType"));
            let base = match self.named_type(&base_name)? {
                TypeDef::Complex(c) => c,
                TypeDef::Simple(_) => {
                    return Err(self.error(file, derivation, format!("complex content cannot derive from simple type {base_name}")))
                }
            };
            let own = self.particle_of(derivation, file)?;
            let content = if is_extension {
                match (base.content, own) {
                    (Content::Elements(b), Some(o)) => {
                        Content::Elements(Particle { occurs: Occurs::ONCE, term: Term::Sequence(vec![b, o]), key: None, array: false })
                    }
                    (Content::Elements(b), None) => Content::Elements(b),
                    (_, Some(o)) => Content::Elements(o),
                    (other, None) => other,
                }
            } else {
                own.map_or(Content::Empty, Content::Elements)
            };
            let mut content = content;
            if let Content::Elements(p) = &mut content {
                assign_keys(p);
            }
            let (own_attrs, own_any) = self.attributes_of(derivation, file)?;
            let attributes = merge_attributes(base.attributes, own_attrs, derivation);
            return Ok(ComplexType {
                attributes,
                any_attribute: own_any || (is_extension && base.any_attribute),
                content,
                mixed,
                is_abstract,
                base: Some(base_name),
            });
        }
        if let Some(sc) = node.children_of("simpleContent").next() {
            let (derivation, is_extension) = match (sc.children_of("extension").next(), sc.children_of("restriction").next()) {
                (Some(e), _) => (e, true),
                (None, Some(r)) => (r, false),
                _ => return Err(self.error(file, sc, "xs:simpleContent without extension or restriction".into())),
            };
            let base_name = derivation.qname("base").cloned().unwrap_or_else(|| xs("anySimpleType"));
            let (base_attrs, base_any) = match self.named_type(&base_name)? {
                TypeDef::Complex(c) => (c.attributes, c.any_attribute),
                TypeDef::Simple(_) => (Vec::new(), false),
            };
            let mut text = self.simple_of(&TypeRef::Named(base_name.clone()), file, derivation)?;
            if !is_extension {
                add_facets(&mut text.facets, derivation);
            }
            let (own_attrs, own_any) = self.attributes_of(derivation, file)?;
            return Ok(ComplexType {
                attributes: merge_attributes(base_attrs, own_attrs, derivation),
                any_attribute: own_any || base_any,
                content: Content::Simple(TypeRef::Anonymous(Box::new(TypeDef::Simple(text)))),
                mixed: false,
                is_abstract,
                base: Some(base_name),
            });
        }
        let mut content = self.particle_of(node, file)?.map_or(Content::Empty, Content::Elements);
        if let Content::Elements(p) = &mut content {
            assign_keys(p);
        }
        let (attributes, any_attribute) = self.attributes_of(node, file)?;
        Ok(ComplexType { attributes, any_attribute, content, mixed, is_abstract, base: None })
    }

    /// The model group directly inside `node` (sequence, choice, all or a group reference).
    fn particle_of(&mut self, node: &Node, file: usize) -> Result<Option<Particle>> {
        match node.children.iter().find(|c| matches!(c.kind.as_str(), "sequence" | "choice" | "all" | "group")) {
            Some(group) => Ok(Some(self.particle(group, file)?)),
            None => Ok(None),
        }
    }

    fn particle(&mut self, node: &Node, file: usize) -> Result<Particle> {
        let occurs = occurs(node).map_err(|m| self.error(file, node, m))?;
        let term = match node.kind.as_str() {
            "element" => {
                let target_ns = self.set.files[file].target_namespace.clone();
                Term::Element(Box::new(self.element(node, file, &target_ns, false)?))
            }
            "sequence" | "choice" | "all" => {
                let mut parts = Vec::new();
                for child in
                    node.children.iter().filter(|c| matches!(c.kind.as_str(), "element" | "sequence" | "choice" | "group" | "any" | "all"))
                {
                    parts.push(self.particle(child, file)?);
                }
                match node.kind.as_str() {
                    "sequence" => Term::Sequence(parts),
                    "choice" => Term::Choice(parts),
                    _ => Term::All(parts),
                }
            }
            "group" => {
                let name =
                    node.qname("ref").cloned().ok_or_else(|| self.error(file, node, "xs:group without ref in a content model".into()))?;
                let set = self.set;
                let def =
                    set.get(ComponentKind::Group, &name).ok_or_else(|| self.error(file, node, format!("group {name} is not defined")))?;
                let inner = def
                    .node
                    .children
                    .iter()
                    .find(|c| matches!(c.kind.as_str(), "sequence" | "choice" | "all"))
                    .ok_or_else(|| self.error(def.file, &def.node, format!("group {name} has no model group")))?;
                self.particle(inner, def.file)?.term
            }
            "any" => Term::Any { namespace: node.attr("namespace").unwrap_or("##any").to_string() },
            other => return Err(self.error(file, node, format!("xs:{other} is not a particle"))),
        };
        Ok(Particle { occurs, term, key: None, array: false })
    }

    /// An element declaration: global (`global`), local, or a reference to a global one.
    fn element(&mut self, node: &Node, file: usize, target_ns: &str, global: bool) -> Result<ElementDecl> {
        if let Some(name) = node.qname("ref") {
            let set = self.set;
            let def =
                set.get(ComponentKind::Element, name).ok_or_else(|| self.error(file, node, format!("element {name} is not declared")))?;
            let ns = set.files[def.file].target_namespace.clone();
            return self.element(&def.node, def.file, &ns, true);
        }
        let local = node.attr("name").ok_or_else(|| self.error(file, node, "xs:element without name or ref".into()))?;
        let qualified =
            global || node.attr("form") == Some("qualified") || (node.attr("form").is_none() && self.set.files[file].elements_qualified);
        let name = QName::new(if qualified { target_ns } else { "" }, local);
        let mut identity = Vec::new();
        for c in node.children.iter().filter(|c| matches!(c.kind.as_str(), "key" | "unique" | "keyref")) {
            identity.push(self.identity(c, file, target_ns)?);
        }
        Ok(ElementDecl {
            name,
            type_ref: self.type_ref(node, file, "type")?,
            nillable: node.attr("nillable") == Some("true"),
            fixed: node.attr("fixed").map(str::to_string),
            default: node.attr("default").map(str::to_string),
            identity,
        })
    }

    fn identity(&self, node: &Node, file: usize, target_ns: &str) -> Result<IdentityConstraint> {
        let kind = match node.kind.as_str() {
            "key" => IdentityKind::Key,
            "unique" => IdentityKind::Unique,
            _ => {
                IdentityKind::KeyRef(node.qname("refer").cloned().ok_or_else(|| self.error(file, node, "xs:keyref without refer".into()))?)
            }
        };
        let name = QName::new(target_ns, node.attr("name").unwrap_or_default());
        let xpath_of =
            |n: &Node| n.attr("xpath").map(parse_xpath).ok_or_else(|| self.error(file, n, "selector or field without xpath".into()));
        let selector = xpath_of(
            node.children_of("selector").next().ok_or_else(|| self.error(file, node, "identity constraint without selector".into()))?,
        )?;
        let fields = node.children_of("field").map(xpath_of).collect::<Result<Vec<_>>>()?;
        Ok(IdentityConstraint { name, kind, selector, fields })
    }

    /// Attributes declared directly in `node` (attribute groups inlined).
    fn attributes_of(&mut self, node: &Node, file: usize) -> Result<(Vec<AttributeUse>, bool)> {
        let mut out = Vec::new();
        let mut any = false;
        for child in &node.children {
            match child.kind.as_str() {
                "attribute" => {
                    if child.attr("use") == Some("prohibited") {
                        continue;
                    }
                    out.push(self.attribute(child, file)?);
                }
                "attributeGroup" => {
                    let name =
                        child.qname("ref").cloned().ok_or_else(|| self.error(file, child, "xs:attributeGroup without ref".into()))?;
                    let set = self.set;
                    let def = set
                        .get(ComponentKind::AttributeGroup, &name)
                        .ok_or_else(|| self.error(file, child, format!("attribute group {name} is not defined")))?;
                    let (attrs, group_any) = self.attributes_of(&def.node, def.file)?;
                    out.extend(attrs);
                    any |= group_any;
                }
                "anyAttribute" => any = true,
                _ => {}
            }
        }
        Ok((out, any))
    }

    fn attribute(&mut self, node: &Node, file: usize) -> Result<AttributeUse> {
        let required = node.attr("use") == Some("required");
        let (decl, decl_file, qualified) = match node.qname("ref") {
            Some(name) if &*name.ns == "http://www.w3.org/XML/1998/namespace" => {
                return Ok(AttributeUse {
                    name: name.clone(),
                    type_ref: TypeRef::Named(xs("string")),
                    required,
                    fixed: node.attr("fixed").map(str::to_string),
                    default: node.attr("default").map(str::to_string),
                })
            }
            Some(name) => {
                let set = self.set;
                let def = set
                    .get(ComponentKind::Attribute, name)
                    .ok_or_else(|| self.error(file, node, format!("attribute {name} is not declared")))?;
                (&def.node, def.file, true)
            }
            None => (node, file, node.attr("form") == Some("qualified")),
        };
        let local = decl.attr("name").ok_or_else(|| self.error(file, node, "xs:attribute without name or ref".into()))?;
        let ns = if qualified { self.set.files[decl_file].target_namespace.clone() } else { String::new() };
        let decl = decl.clone();
        Ok(AttributeUse {
            name: QName::new(&ns, local),
            type_ref: match self.type_ref(&decl, decl_file, "type")? {
                TypeRef::Named(n) if n == xs("anyType") => TypeRef::Named(xs("anySimpleType")),
                other => other,
            },
            required,
            fixed: node.attr("fixed").or(decl.attr("fixed")).map(str::to_string),
            default: node.attr("default").or(decl.attr("default")).map(str::to_string),
        })
    }
}

/// The JSON key of `xs:any` content.
pub const ANY_KEY: &str = "#any";

/// Gives every particle of a content model its key in the canonical JSON.
///
/// Elements use their local name; a second particle with the same name gets `name#2`. A
/// repeatable group holding more than one element becomes one array key named after its members,
/// e.g. `(terminsdaten|fortsetzungsterminsdaten)`, each item one pass through the group: that
/// keeps the order of interleaved siblings, which separate per-name arrays would lose.
pub fn assign_keys(content: &mut Particle) {
    let mut used = BTreeMap::new();
    assign(content, false, &mut used);
}

fn assign(p: &mut Particle, repeated: bool, used: &mut BTreeMap<String, u32>) {
    let repeated_here = repeated || p.occurs.repeatable();
    let group_key = group_key(p);
    match &mut p.term {
        Term::Element(e) => {
            p.key = Some(unique_key(used, &e.name.local));
            p.array = repeated_here;
        }
        Term::Any { .. } => {
            p.key = Some(unique_key(used, ANY_KEY));
            p.array = true;
        }
        Term::Sequence(parts) | Term::Choice(parts) | Term::All(parts) => {
            if p.occurs.repeatable() && parts.iter().map(leaves).sum::<usize>() > 1 {
                p.key = Some(unique_key(used, &group_key));
                p.array = true;
                let mut inner = BTreeMap::new();
                parts.iter_mut().for_each(|c| assign(c, false, &mut inner));
            } else {
                p.key = None;
                p.array = false;
                parts.iter_mut().for_each(|c| assign(c, repeated_here, used));
            }
        }
    }
}

fn unique_key(used: &mut BTreeMap<String, u32>, name: &str) -> String {
    let n = used.entry(name.to_string()).or_insert(0);
    *n += 1;
    if *n == 1 {
        name.to_string()
    } else {
        format!("{name}#{n}")
    }
}

fn leaves(p: &Particle) -> usize {
    match &p.term {
        Term::Element(_) | Term::Any { .. } => 1,
        Term::Sequence(ps) | Term::Choice(ps) | Term::All(ps) => ps.iter().map(leaves).sum(),
    }
}

/// `(a,b)` for a sequence, `(a|b)` for a choice, `(a&b)` for all.
fn group_key(p: &Particle) -> String {
    match &p.term {
        Term::Element(e) => e.name.local.to_string(),
        Term::Any { .. } => ANY_KEY.to_string(),
        Term::Sequence(ps) | Term::Choice(ps) | Term::All(ps) => {
            let sep = match &p.term {
                Term::Sequence(_) => ",",
                Term::Choice(_) => "|",
                _ => "&",
            };
            format!("({})", ps.iter().map(group_key).collect::<Vec<_>>().join(sep))
        }
    }
}

/// Parses the XPath subset of identity constraints; names come in Clark notation (`{ns}local`)
/// from the XSD reader, which resolved their prefixes.
fn parse_xpath(expr: &str) -> Vec<XPath> {
    let test = |s: &str| -> NameTest {
        let s = s.trim().trim_start_matches("child::").trim_start_matches("attribute::");
        if s == "*" {
            return NameTest::Any;
        }
        match s.strip_prefix('{').and_then(|r| r.split_once('}')) {
            Some((ns, local)) => NameTest::Name(QName::new(ns, local)),
            None => NameTest::Name(QName::new("", s)),
        }
    };
    expr.split('|')
        .map(|alt| {
            let alt = alt.trim();
            let (descendants, rest) = match alt.strip_prefix(".//") {
                Some(rest) => (true, rest),
                None => (false, alt.trim_start_matches("./")),
            };
            let mut steps = Vec::new();
            let mut attribute = None;
            for step in rest.split('/').map(str::trim).filter(|s| !s.is_empty() && *s != ".") {
                match step.strip_prefix('@') {
                    Some(a) => attribute = Some(test(a)),
                    None => steps.push(test(step)),
                }
            }
            XPath { descendants, steps, attribute }
        })
        .collect()
}

/// Base attributes, overridden by same-named own ones; `prohibited` ones removed.
fn merge_attributes(base: Vec<AttributeUse>, own: Vec<AttributeUse>, derivation: &Node) -> Vec<AttributeUse> {
    let prohibited: Vec<&str> = derivation
        .children_of("attribute")
        .filter(|a| a.attr("use") == Some("prohibited"))
        .filter_map(|a| a.attr("name").or(a.attr("ref")))
        .collect();
    let mut out: Vec<AttributeUse> =
        base.into_iter().filter(|b| !own.iter().any(|o| o.name == b.name) && !prohibited.contains(&&*b.name.local)).collect();
    out.extend(own);
    out
}

fn occurs(node: &Node) -> std::result::Result<Occurs, String> {
    let min = match node.attr("minOccurs") {
        None => 1,
        Some(v) => v.parse().map_err(|_| format!("minOccurs=\"{v}\" is not a number"))?,
    };
    let max = match node.attr("maxOccurs") {
        None => MaxOccurs::Bounded(1),
        Some("unbounded") => MaxOccurs::Unbounded,
        Some(v) => MaxOccurs::Bounded(v.parse().map_err(|_| format!("maxOccurs=\"{v}\" is not a number"))?),
    };
    Ok(Occurs { min, max })
}

/// Adds the facets of one restriction step.
fn add_facets(f: &mut Facets, restriction: &Node) {
    let values = |kind: &str| restriction.children_of(kind).filter_map(|n| n.attr("value")).map(str::to_string).collect::<Vec<_>>();
    let one = |kind: &str| restriction.children_of(kind).next().and_then(|n| n.attr("value")).map(str::to_string);
    let enumeration = values("enumeration");
    if !enumeration.is_empty() {
        f.enumeration = enumeration;
    }
    let patterns = values("pattern");
    if !patterns.is_empty() {
        f.patterns.push(patterns);
    }
    let num = |kind: &str| one(kind).and_then(|v| v.parse::<u64>().ok());
    f.length = num("length").or(f.length);
    f.min_length = num("minLength").or(f.min_length);
    f.max_length = num("maxLength").or(f.max_length);
    f.total_digits = num("totalDigits").map(|v| v as u32).or(f.total_digits);
    f.fraction_digits = num("fractionDigits").map(|v| v as u32).or(f.fraction_digits);
    f.min_inclusive = one("minInclusive").or(f.min_inclusive.take());
    f.max_inclusive = one("maxInclusive").or(f.max_inclusive.take());
    f.min_exclusive = one("minExclusive").or(f.min_exclusive.take());
    f.max_exclusive = one("maxExclusive").or(f.max_exclusive.take());
    f.white_space = one("whiteSpace").or(f.white_space.take());
}

#[cfg(test)]
mod tests {
    use super::*;

    const XJ: &str = "http://www.xjustiz.de";

    fn model(version: &str) -> Model {
        let dir = crate::testdata::shared_xjustiz().join(version).join("xsd");
        let set = SchemaSet::load_dir(&dir).expect("loads");
        Model::build(&set).unwrap_or_else(|e| panic!("{version}: {e}"))
    }

    fn children(p: &Particle, out: &mut Vec<String>) {
        match &p.term {
            Term::Element(e) => out.push(e.name.local.to_string()),
            Term::Sequence(ps) | Term::Choice(ps) | Term::All(ps) => ps.iter().for_each(|p| children(p, out)),
            Term::Any { .. } => {}
        }
    }

    fn complex(m: &Model, t: &TypeRef) -> ComplexType {
        let def = match t {
            TypeRef::Named(n) => m.named(n).expect("named type"),
            TypeRef::Anonymous(d) => (**d).clone(),
        };
        match def {
            TypeDef::Complex(c) => c,
            TypeDef::Simple(_) => panic!("expected a complex type"),
        }
    }

    #[test]
    fn every_release_compiles() {
        for version in ["2.2.1", "2.4.0", "3.2.1", "3.3.1", "3.4.1", "3.5.1", "3.6.2", "3.7.0", "4.0.0"] {
            let m = model(version);
            assert!(m.elements.len() > 10 && m.types.len() > 100, "{version}: {} elements, {} types", m.elements.len(), m.types.len());
        }
    }

    #[test]
    fn extension_carries_the_base_content_and_attributes() {
        let m = model("3.6.2");
        let root = &m.elements[&QName::new(XJ, "nachricht.gds.uebermittlungSchriftgutobjekte.0005005")];
        let c = complex(&m, &root.type_ref);
        assert_eq!(c.base, Some(QName::new(XJ, "Type.GDS.Basisnachricht")));
        let Content::Elements(p) = &c.content else { panic!("element content") };
        let mut names = Vec::new();
        children(p, &mut names);
        assert_eq!(names.first().map(String::as_str), Some("nachrichtenkopf"), "{names:?}");
        assert_eq!(names.last().map(String::as_str), Some("schriftgutobjekte"), "{names:?}");
        // The header's xjustizVersion attribute is required and fixed to the release.
        let head = complex(&m, &TypeRef::Named(QName::new(XJ, "Type.GDS.Nachrichtenkopf")));
        let version = head.attributes.iter().find(|a| &*a.name.local == "xjustizVersion").expect("xjustizVersion");
        assert!(version.required);
        assert_eq!(version.fixed.as_deref(), Some("3.6.2"));
    }

    #[test]
    fn code_types_have_a_code_element_and_list_attributes() {
        let m = model("3.6.2");
        let code = complex(&m, &TypeRef::Named(QName::new(XJ, "Code.GDS.Gerichte.Typ3")));
        let Content::Elements(p) = &code.content else { panic!("element content") };
        let mut names = Vec::new();
        children(p, &mut names);
        assert!(names.contains(&"code".to_string()), "{names:?}");
        let attrs: Vec<&str> = code.attributes.iter().map(|a| &*a.name.local).collect();
        assert!(attrs.contains(&"listURI") && attrs.contains(&"listVersionID"), "{attrs:?}");
    }

    #[test]
    fn simple_types_accumulate_facets() {
        let m = model("4.0.0");
        let head = complex(&m, &TypeRef::Named(QName::new(XJ, "Type.GDS.Nachrichtenkopf")));
        let version = head.attributes.iter().find(|a| &*a.name.local == "xjustizVersion").expect("xjustizVersion");
        let TypeRef::Named(name) = &version.type_ref else { panic!("named type, got {:?}", version.type_ref) };
        let Some(TypeDef::Simple(st)) = m.named(name) else { panic!("simple type {name}") };
        assert_eq!(st.builtin, "string");
        assert_eq!(st.facets.patterns.len(), 1, "{st:?}");
        assert_eq!(st.facets.patterns[0][0], r"4\.(0|[1-9]\d*)\.(0|[1-9]\d*)");
    }
}
