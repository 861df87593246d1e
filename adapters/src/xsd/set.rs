//! A loaded XSD set: files, global components by qualified name, reference checking.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::parse::{parse_file, Node, QName};
use crate::{Error, Result};

/// The XML Schema namespace.
pub const XS: &str = "http://www.w3.org/2001/XMLSchema";
/// The `xml:` namespace (attributes such as `xml:lang` are predefined).
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

/// The built-in types of XML Schema 1.0.
pub const BUILTIN_TYPES: [&str; 46] = [
    "anyType",
    "anySimpleType",
    "string",
    "normalizedString",
    "token",
    "language",
    "Name",
    "NCName",
    "ID",
    "IDREF",
    "IDREFS",
    "ENTITY",
    "ENTITIES",
    "NMTOKEN",
    "NMTOKENS",
    "boolean",
    "base64Binary",
    "hexBinary",
    "float",
    "double",
    "decimal",
    "integer",
    "nonPositiveInteger",
    "negativeInteger",
    "long",
    "int",
    "short",
    "byte",
    "nonNegativeInteger",
    "unsignedLong",
    "unsignedInt",
    "unsignedShort",
    "unsignedByte",
    "positiveInteger",
    "duration",
    "dateTime",
    "time",
    "date",
    "gYearMonth",
    "gYear",
    "gMonthDay",
    "gDay",
    "gMonth",
    "anyURI",
    "QName",
    "NOTATION",
];

/// Kinds of global components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComponentKind {
    /// `xs:element`
    Element,
    /// `xs:complexType`
    ComplexType,
    /// `xs:simpleType`
    SimpleType,
    /// `xs:group`
    Group,
    /// `xs:attributeGroup`
    AttributeGroup,
    /// `xs:attribute`
    Attribute,
}

impl ComponentKind {
    fn of(kind: &str) -> Option<Self> {
        Some(match kind {
            "element" => ComponentKind::Element,
            "complexType" => ComponentKind::ComplexType,
            "simpleType" => ComponentKind::SimpleType,
            "group" => ComponentKind::Group,
            "attributeGroup" => ComponentKind::AttributeGroup,
            "attribute" => ComponentKind::Attribute,
            _ => return None,
        })
    }
}

/// A global component.
#[derive(Debug, Clone)]
pub struct Component {
    /// Its kind.
    pub kind: ComponentKind,
    /// Its qualified name.
    pub name: QName,
    /// Index of the defining file in [`SchemaSet::files`].
    pub file: usize,
    /// Its definition.
    pub node: Node,
}

/// One parsed schema file.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its `targetNamespace`.
    pub target_namespace: String,
    /// `elementFormDefault="qualified"`.
    pub elements_qualified: bool,
    /// The `xs:schema` element.
    pub root: Node,
}

/// A reference that names no component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// File of the reference.
    pub file: PathBuf,
    /// Line of the referring element.
    pub line: u32,
    /// The attribute (`type`, `ref`, ...).
    pub attribute: String,
    /// The missing name.
    pub name: QName,
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}=\"{}\" names nothing", self.file.display(), self.line, self.attribute, self.name)
    }
}

/// All files of an XSD set and their global components.
#[derive(Debug, Default)]
pub struct SchemaSet {
    /// Files in load order.
    pub files: Vec<SchemaFile>,
    components: BTreeMap<(ComponentKind, QName), Component>,
    /// Global components defined again (same kind and name) in another file: (name, first
    /// file, other file). The first definition is kept.
    pub redefinitions: Vec<(QName, PathBuf, PathBuf)>,
}

impl SchemaSet {
    /// Loads every `.xsd` file of a directory and everything they include or import.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io { path: dir.to_path_buf(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "xsd"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::Schema { path: dir.to_path_buf(), message: "no .xsd files".into() });
        }
        let mut set = SchemaSet::default();
        for p in paths {
            set.load(&p)?;
        }
        Ok(set)
    }

    /// Loads one schema file and, recursively, what it includes and imports (each file once).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut queue = vec![path.to_path_buf()];
        while let Some(path) = queue.pop() {
            let canonical = path.canonicalize().map_err(|source| Error::Io { path: path.clone(), source })?;
            if self.files.iter().any(|f| f.path == canonical) {
                continue;
            }
            let root = parse_file(&canonical)?;
            let target_namespace = root.attr("targetNamespace").unwrap_or("").to_string();
            let elements_qualified = root.attr("elementFormDefault") == Some("qualified");
            let index = self.files.len();
            for child in &root.children {
                if matches!(child.kind.as_str(), "include" | "import" | "redefine") {
                    if let Some(location) = child.attr("schemaLocation") {
                        let target = canonical.parent().unwrap_or(Path::new(".")).join(location);
                        if !target.exists() {
                            return Err(Error::Schema {
                                path: canonical.clone(),
                                message: format!("line {}: xs:{} schemaLocation=\"{location}\" does not exist", child.line, child.kind),
                            });
                        }
                        queue.push(target);
                    }
                    continue;
                }
                let (Some(kind), Some(name)) = (ComponentKind::of(&child.kind), child.attr("name")) else { continue };
                let name = QName::new(&target_namespace, name);
                match self.components.get(&(kind, name.clone())) {
                    Some(existing) => {
                        let first = self.files.get(existing.file).map(|f| f.path.clone()).unwrap_or_default();
                        self.redefinitions.push((name, first, canonical.clone()));
                    }
                    None => {
                        self.components.insert((kind, name.clone()), Component { kind, name, file: index, node: child.clone() });
                    }
                }
            }
            self.files.push(SchemaFile { path: canonical, target_namespace, elements_qualified, root });
        }
        Ok(())
    }

    /// A global component.
    pub fn get(&self, kind: ComponentKind, name: &QName) -> Option<&Component> {
        self.components.get(&(kind, name.clone()))
    }

    /// All global components.
    pub fn all(&self) -> impl Iterator<Item = &Component> {
        self.components.values()
    }

    /// All global components of a kind.
    pub fn components(&self, kind: ComponentKind) -> impl Iterator<Item = &Component> {
        self.components.values().filter(move |c| c.kind == kind)
    }

    /// A type: complex, simple, or built in.
    pub fn has_type(&self, name: &QName) -> bool {
        (&*name.ns == XS && BUILTIN_TYPES.contains(&&*name.local))
            || self.get(ComponentKind::ComplexType, name).is_some()
            || self.get(ComponentKind::SimpleType, name).is_some()
    }

    fn has_simple_type(&self, name: &QName) -> bool {
        (&*name.ns == XS && BUILTIN_TYPES.contains(&&*name.local)) || self.get(ComponentKind::SimpleType, name).is_some()
    }

    /// Every `type`, `base`, `ref`, `itemType`, `memberTypes` and `substitutionGroup` value that
    /// names no component of the right kind.
    pub fn unresolved(&self) -> Vec<Unresolved> {
        let mut out = Vec::new();
        for file in &self.files {
            for node in file.root.walk() {
                for (attribute, names) in &node.refs {
                    for name in names {
                        let found = match (attribute.as_str(), node.kind.as_str()) {
                            ("type", _) => self.has_type(name),
                            ("base", _) => self.has_type(name),
                            ("itemType" | "memberTypes", _) => self.has_simple_type(name),
                            ("ref", "element") | ("substitutionGroup", _) => self.get(ComponentKind::Element, name).is_some(),
                            ("ref", "group") => self.get(ComponentKind::Group, name).is_some(),
                            ("ref", "attributeGroup") => self.get(ComponentKind::AttributeGroup, name).is_some(),
                            ("ref", "attribute") => &*name.ns == XML_NS || self.get(ComponentKind::Attribute, name).is_some(),
                            _ => true,
                        };
                        if !found {
                            out.push(Unresolved {
                                file: file.path.clone(),
                                line: node.line,
                                attribute: attribute.clone(),
                                name: name.clone(),
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The XJustiz releases in `../shared/xjustiz`, with a root element each must declare.
    const VERSIONS: [(&str, &str); 9] = [
        ("2.2.1", "nachricht.gds.uebermittlung_schriftgutobjekte.0005005"),
        ("2.4.0", "nachricht.gds.uebermittlung_schriftgutobjekte.0005005"),
        ("3.2.1", "nachricht.gds.uebermittlungSchriftgutobjekte.0005005"),
        ("3.3.1", "nachricht.gds.uebermittlungSchriftgutobjekte.0005005"),
        ("3.4.1", "nachricht.gds.uebermittlungSchriftgutobjekte.0005005"),
        ("3.5.1", "nachricht.gds.uebermittlungSchriftgutobjekte.0005005"),
        ("3.6.2", "nachricht.gds.uebermittlungSchriftgutobjekte.0005005"),
        ("3.7.0", "nachricht.gds.uebermittlungSchriftgutobjekte.0005005"),
        ("4.0.0", "nachricht.gds.uebermittlungSchriftgutobjekte.0005005"),
    ];

    fn shared() -> PathBuf {
        crate::testdata::shared_xjustiz()
    }

    #[test]
    fn every_xjustiz_release_loads_with_every_reference_resolved() {
        for (version, root) in VERSIONS {
            let dir = shared().join(version).join("xsd");
            let set = SchemaSet::load_dir(&dir).unwrap_or_else(|e| panic!("{version}: {e}"));
            let on_disk = std::fs::read_dir(&dir)
                .expect("dir")
                .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "xsd")))
                .count();
            assert_eq!(set.files.len(), on_disk, "{version}: every file loaded once");
            let unresolved = set.unresolved();
            assert!(unresolved.is_empty(), "{version}: {} unresolved, e.g. {}", unresolved.len(), unresolved[0]);
            assert!(
                set.get(ComponentKind::Element, &QName::new("http://www.xjustiz.de", root)).is_some(),
                "{version}: root element {root} is declared"
            );
            let messages = set.components(ComponentKind::Element).filter(|c| c.name.local.starts_with("nachricht.")).count();
            assert!(messages >= 10, "{version}: {messages} message types");
        }
    }

    #[test]
    fn the_double_import_of_2_2_1_loads_both_files() {
        let set = SchemaSet::load_dir(&shared().join("2.2.1/xsd")).expect("loads");
        // The grunddatensatz imports http://www.xdomea.de/V2.2.0 from two files; libxml2 keeps only
        // the first. Here the components of both are in the set.
        let xdomea: Vec<usize> =
            set.files.iter().enumerate().filter(|(_, f)| f.target_namespace == "http://www.xdomea.de/V2.2.0").map(|(i, _)| i).collect();
        assert!(xdomea.len() >= 2, "both files of the xdomea namespace are loaded: {}", xdomea.len());
        for i in xdomea {
            assert!(set.all().any(|c| c.file == i), "components of {} are in the set", set.files[i].path.display());
        }
    }

    #[test]
    fn a_missing_schema_location_is_an_error() {
        let dir = std::env::temp_dir().join(format!("jb-xsd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("a.xsd"),
            r#"<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="urn:a"><xs:include schemaLocation="missing.xsd"/></xs:schema>"#,
        )
        .expect("write");
        let err = SchemaSet::load_dir(&dir).expect_err("missing include");
        assert!(err.to_string().contains("missing.xsd"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
