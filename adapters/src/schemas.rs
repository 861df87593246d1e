//! Generating `schemas/`: per release one file of shared definitions, one small schema per
//! message type that refers into it, and the compiled model that translation loads; plus the
//! envelope schema. The JSON Schemas describe exactly the canonical JSON of [`crate::translate`].
//!
//! The JSON Schemas check shapes, cardinalities and facets; what JSON Schema cannot say cheaply
//! (which branch of a choice, identity constraints) stays with the XSD model, which both
//! directions of translation apply as well.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::registry::{Registry, MODEL_FILE};
use crate::translate::Release;
use crate::xsd::{ComplexType, Content, MaxOccurs, Particle, QName, SimpleType, Term, TypeDef, TypeRef, Variety, XS};
use crate::{Error, Result};

/// Base of the schemas' `$id`s (the reserved `.invalid` domain: never fetched, only named).
pub const ID_BASE: &str = "https://justizbus.invalid/schemas";

/// The file of shared definitions inside each release directory.
pub const DEFINITIONS_FILE: &str = "definitions.schema.json";

/// The envelope schema's file name in `schemas/`.
pub const ENVELOPE_FILE: &str = "envelope.schema.json";

/// Writes everything for every release of `registry` under `out` and returns the files written.
pub fn generate(registry: &Registry, out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let write = |path: PathBuf, value: &Value, written: &mut Vec<PathBuf>| -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
        }
        let mut text = serde_json::to_string(value).map_err(|e| Error::Schema { path: path.clone(), message: e.to_string() })?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|source| Error::Io { path: path.clone(), source })?;
        written.push(path);
        Ok(())
    };
    write(out.join(ENVELOPE_FILE), &envelope_schema(), &mut written)?;
    for version in registry.versions() {
        let Some(release) = registry.release(&version) else { continue };
        let dir = out.join("xjustiz").join(&version);
        let path = dir.join(MODEL_FILE);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        std::fs::write(&path, compressed_model(release)?).map_err(|source| Error::Io { path: path.clone(), source })?;
        written.push(path);
        let gen = Generator::new(release);
        // Messages first: the long patterns they use go into the definitions too.
        for name in message_types(release) {
            write(dir.join(format!("{}.schema.json", name.local)), &gen.message(&name), &mut written)?;
        }
        write(dir.join(DEFINITIONS_FILE), &gen.definitions(), &mut written)?;
    }
    Ok(written)
}

/// The compiled model as gzip-compressed JSON (deterministic: no timestamp in the header).
pub fn compressed_model(release: &Release) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let json = serde_json::to_vec(&release.model).map_err(|e| Error::Schema { path: PathBuf::new(), message: e.to_string() })?;
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    gz.write_all(&json).and_then(|_| gz.try_finish()).map_err(|source| Error::Io { path: PathBuf::new(), source })?;
    gz.finish().map_err(|source| Error::Io { path: PathBuf::new(), source })
}

/// The message types of a release: its global elements named `nachricht.*`.
pub fn message_types(release: &Release) -> Vec<QName> {
    release.model.elements.keys().filter(|n| n.local.starts_with("nachricht.")).cloned().collect()
}

/// The `$id` of a release's schema file.
pub fn schema_id(version: &str, file: &str) -> String {
    format!("{ID_BASE}/xjustiz/{version}/{file}")
}

struct Generator<'a> {
    release: &'a Release,
    /// Named complex types and the named types deriving from them.
    derived: BTreeMap<QName, BTreeSet<QName>>,
    /// Long pattern sets, shared through `$defs` instead of repeated (name -> pattern).
    long_patterns: std::cell::RefCell<BTreeMap<String, String>>,
}

/// Patterns longer than this are written once into `$defs` and referenced.
const LONG_PATTERN: usize = 200;

/// A `$defs` name for a named type: its local name, prefixed with the last segment of its
/// namespace when not in the XJustiz namespace (e.g. `din-91379_2022-08:datatypeC`).
fn def_name(name: &QName) -> String {
    if &*name.ns == crate::registry::XJUSTIZ_NS {
        return name.local.to_string();
    }
    let alias = name.ns.rsplit([':', '/']).find(|s| !s.is_empty()).unwrap_or("ns");
    format!("{alias}:{}", name.local)
}

impl<'a> Generator<'a> {
    fn new(release: &'a Release) -> Self {
        let mut derived: BTreeMap<QName, BTreeSet<QName>> = BTreeMap::new();
        for (name, def) in release.model.types_in_order() {
            if let TypeDef::Complex(c) = def {
                let mut base = c.base.clone();
                while let Some(b) = base {
                    if &*b.ns == XS {
                        break;
                    }
                    derived.entry(b.clone()).or_default().insert(name.clone());
                    base = match release.model.types.get(&b) {
                        Some(TypeDef::Complex(bc)) if bc.base.as_ref() != Some(&b) => bc.base.clone(),
                        _ => None,
                    };
                }
            }
        }
        Generator { release, derived, long_patterns: Default::default() }
    }

    fn definitions(&self) -> Value {
        let mut defs = Map::new();
        for (name, def) in self.release.model.types_in_order() {
            // Two namespaces ending alike would share `$defs` names: refuse rather than merge.
            let previous = defs.insert(def_name(name), self.type_def(def, ""));
            assert!(previous.is_none(), "two types map to the $defs name {}", def_name(name));
        }
        for (name, pattern) in self.long_patterns.borrow().iter() {
            defs.insert(name.clone(), json!({ "type": "string", "pattern": pattern }));
        }
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": schema_id(&self.release.version, DEFINITIONS_FILE),
            "title": format!("XJustiz {} type definitions (canonical JSON)", self.release.version),
            "$defs": Value::Object(defs),
        })
    }

    fn message(&self, name: &QName) -> Value {
        let decl = &self.release.model.elements[name];
        let mut schema = match self.element_type(&decl.type_ref, DEFINITIONS_FILE) {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("allOf".into(), json!([other]));
                m
            }
        };
        schema.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
        schema.insert("$id".into(), json!(schema_id(&self.release.version, &format!("{}.schema.json", name.local))));
        schema.insert("title".into(), json!(format!("{} (XJustiz {})", name.local, self.release.version)));
        Value::Object(schema)
    }

    /// The schema of an element's value; `file` prefixes references (empty inside definitions).
    fn element_type(&self, r: &TypeRef, file: &str) -> Value {
        match r {
            TypeRef::Anonymous(def) => self.type_def(def, file),
            TypeRef::Named(n) if &*n.ns == XS => match self.release.model.type_def(n) {
                Some(def) => self.type_def(def, file),
                None => json!({}),
            },
            TypeRef::Named(n) => {
                let reference = |t: &QName| json!({ "$ref": format!("{file}#/$defs/{}", def_name(t)) });
                let abstract_base = matches!(self.release.model.types.get(n), Some(TypeDef::Complex(c)) if c.is_abstract);
                match self.derived.get(n) {
                    None => reference(n),
                    Some(subs) => {
                        let mut options: Vec<Value> = Vec::new();
                        if !abstract_base {
                            options.push(reference(n));
                        }
                        options.extend(subs.iter().map(reference));
                        json!({ "anyOf": options })
                    }
                }
            }
        }
    }

    fn type_def(&self, def: &TypeDef, file: &str) -> Value {
        match def {
            TypeDef::Simple(st) => self.simple(st, file),
            TypeDef::Complex(ct) => self.complex(ct, file),
        }
    }

    fn simple(&self, st: &SimpleType, file: &str) -> Value {
        let mut s = Map::new();
        s.insert("type".into(), json!("string"));
        match &st.variety {
            Variety::Atomic => {
                if let Some(p) = builtin_pattern(&st.builtin) {
                    s.insert("pattern".into(), json!(p));
                }
            }
            Variety::List(_) => {}
            Variety::Union(members) => {
                let options: Vec<Value> = members.iter().map(|m| self.element_type(m, file)).collect();
                s.insert("anyOf".into(), Value::Array(options));
            }
        }
        let f = &st.facets;
        if !f.enumeration.is_empty() {
            s.insert("enum".into(), json!(f.enumeration));
        }
        let patterns: Vec<Value> = f
            .patterns
            .iter()
            .map(|set| {
                let pattern = format!("^(?:{})$", set.iter().map(|p| crate::simple::xsd_regex(p)).collect::<Vec<_>>().join("|"));
                if pattern.len() <= LONG_PATTERN {
                    return json!({ "pattern": pattern });
                }
                let name = format!("pattern.{}", &crate::event::sha256_hex(pattern.as_bytes())[..16]);
                self.long_patterns.borrow_mut().insert(name.clone(), pattern);
                json!({ "$ref": format!("{file}#/$defs/{name}") })
            })
            .collect();
        if !patterns.is_empty() {
            s.insert("allOf".into(), Value::Array(patterns));
        }
        if matches!(st.variety, Variety::Atomic) && !matches!(st.builtin.as_str(), "hexBinary" | "base64Binary") {
            if let Some(l) = f.length {
                s.insert("minLength".into(), json!(l));
                s.insert("maxLength".into(), json!(l));
            }
            if let Some(l) = f.min_length {
                s.insert("minLength".into(), json!(l));
            }
            if let Some(l) = f.max_length {
                s.insert("maxLength".into(), json!(l));
            }
        }
        Value::Object(s)
    }

    fn complex(&self, ct: &ComplexType, file: &str) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for a in &ct.attributes {
            let key = format!("@{}", a.name.local);
            let mut schema = match crate::simple::simple_of(&self.release.model, &a.type_ref) {
                Some(st) => self.simple(st, file),
                None => json!({ "type": "string" }),
            };
            if let (Some(fixed), Value::Object(m)) = (&a.fixed, &mut schema) {
                m.insert("const".into(), json!(fixed));
            }
            properties.insert(key.clone(), schema);
            if a.required {
                required.push(key);
            }
        }
        match &ct.content {
            Content::Empty => {}
            Content::Simple(r) => {
                let schema = match crate::simple::simple_of(&self.release.model, r) {
                    Some(st) => self.simple(st, file),
                    None => json!({ "type": "string" }),
                };
                properties.insert("#text".into(), schema);
                required.push("#text".to_string());
            }
            Content::Elements(p) => {
                if ct.mixed {
                    properties.insert("#text".into(), json!({ "type": "string" }));
                }
                self.particle(p, file, true, &mut properties, &mut required);
            }
        }
        let mut schema = Map::new();
        schema.insert("type".into(), json!("object"));
        schema.insert("properties".into(), Value::Object(properties));
        if !required.is_empty() {
            schema.insert("required".into(), json!(required));
        }
        schema.insert("patternProperties".into(), json!({ "^@xsi:": { "type": "string" } }));
        schema.insert("additionalProperties".into(), json!(ct.any_attribute));
        Value::Object(schema)
    }

    /// Adds the keys a particle fills. `certain`: every enclosing group must occur (so a
    /// particle with `minOccurs` >= 1 makes its key required).
    fn particle(&self, p: &Particle, file: &str, certain: bool, properties: &mut Map<String, Value>, required: &mut Vec<String>) {
        let here_certain = certain && p.occurs.min > 0;
        match (&p.term, &p.key) {
            (Term::Element(decl), Some(key)) => {
                let item = self.element_type(&decl.type_ref, file);
                properties.insert(key.clone(), if p.array { array_of(item, p, certain) } else { item });
                if here_certain {
                    required.push(key.clone());
                }
            }
            (Term::Any { .. }, Some(key)) => {
                properties.insert(key.clone(), json!({ "type": "array", "items": { "type": "string" } }));
            }
            (Term::Sequence(parts) | Term::Choice(parts) | Term::All(parts), Some(key)) => {
                let mut inner = Map::new();
                let mut inner_required = Vec::new();
                let choice = matches!(p.term, Term::Choice(_));
                for c in parts {
                    self.particle(c, file, !choice, &mut inner, &mut inner_required);
                }
                let mut item = json!({ "type": "object", "properties": inner, "additionalProperties": false });
                if !inner_required.is_empty() {
                    item["required"] = json!(inner_required);
                }
                if choice {
                    item["minProperties"] = json!(1);
                    item["maxProperties"] = json!(1);
                }
                properties.insert(key.clone(), array_of(item, p, certain));
                if here_certain {
                    required.push(key.clone());
                }
            }
            (Term::Sequence(parts) | Term::All(parts), None) => {
                parts.iter().for_each(|c| self.particle(c, file, here_certain, properties, required));
            }
            (Term::Choice(parts), None) => {
                parts.iter().for_each(|c| self.particle(c, file, false, properties, required));
            }
            (_, None) => {}
        }
    }
}

/// An array of `item`, with the particle's bounds when only its own occurrence makes it repeat.
fn array_of(item: Value, p: &Particle, certain: bool) -> Value {
    let mut a = json!({ "type": "array", "items": item });
    if certain && p.occurs.repeatable() {
        if p.occurs.min > 0 {
            a["minItems"] = json!(p.occurs.min);
        }
        if let MaxOccurs::Bounded(m) = p.occurs.max {
            a["maxItems"] = json!(m);
        }
    }
    a
}

/// Lexical patterns of the built-in types where a string could be wrong.
fn builtin_pattern(builtin: &str) -> Option<&'static str> {
    Some(match builtin {
        "boolean" => "^(true|false|1|0)$",
        "decimal" => r"^[+-]?(\d+(\.\d*)?|\.\d+)$",
        "integer" | "long" | "int" | "short" | "byte" | "nonNegativeInteger" | "positiveInteger" | "nonPositiveInteger"
        | "negativeInteger" | "unsignedLong" | "unsignedInt" | "unsignedShort" | "unsignedByte" => r"^[+-]?\d+$",
        "date" => r"^-?\d{4,}-\d\d-\d\d(Z|[+-]\d\d:\d\d)?$",
        "dateTime" => r"^-?\d{4,}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?$",
        "time" => r"^\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?$",
        "gYear" => r"^-?\d{4,}(Z|[+-]\d\d:\d\d)?$",
        _ => return None,
    })
}

/// The JSON Schema of the event envelope as `xjustiz translate` prints it (and as the JSON
/// mapping of `justizbus.v1.Event`).
pub fn envelope_schema() -> Value {
    let string = json!({ "type": "string" });
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("{ID_BASE}/{ENVELOPE_FILE}"),
        "title": "Justizbus event envelope (justizbus.v1)",
        "type": "object",
        "required": ["spec_version", "id", "type", "schema_version", "subject", "data"],
        "additionalProperties": false,
        "properties": {
            "spec_version": { "const": "justizbus.v1" },
            "id": { "type": "string", "minLength": 1, "maxLength": 128 },
            "source": string,
            "type": { "type": "string", "minLength": 1 },
            "schema_version": { "type": "string", "pattern": r"^\d+\.\d+\.\d+$" },
            "subject": { "type": "string", "minLength": 1 },
            "time": { "type": "string", "format": "date-time" },
            "sender": string,
            "recipients": { "type": "array", "items": string },
            "data_content_type": string,
            "data": { "type": "object" },
            "original_base64": { "type": "string", "contentEncoding": "base64" },
            "attachments": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["sha256", "size", "name"],
                    "additionalProperties": false,
                    "properties": {
                        "sha256": { "type": "string", "pattern": "^[0-9a-f]{64}$" },
                        "size": { "type": "integer", "minimum": 0 },
                        "name": string,
                        "media_type": string
                    }
                }
            },
            "headers": { "type": "object", "additionalProperties": string },
            "metadata": { "type": "object" }
        }
    })
}

/// Serves a release's definitions to the `jsonschema` crate without touching the network.
struct Definitions {
    id: String,
    contents: Value,
}

impl jsonschema::Retrieve for Definitions {
    fn retrieve(&self, uri: &jsonschema::Uri<String>) -> std::result::Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        if uri.as_str() == self.id {
            Ok(self.contents.clone())
        } else {
            Err(format!("{uri} is not a Justizbus schema").into())
        }
    }
}

/// Compiled JSON Schema validators (with the `jsonschema` crate), one per release and message
/// type, built on first use from the same generator that writes `schemas/`.
#[derive(Default)]
pub struct JsonSchemas {
    compiled: std::sync::Mutex<BTreeMap<(String, String), std::sync::Arc<jsonschema::Validator>>>,
}

impl std::fmt::Debug for JsonSchemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonSchemas")
    }
}

impl JsonSchemas {
    /// Checks canonical JSON against the schema of its message type; every error with its
    /// JSON pointer.
    pub fn check(&self, release: &Release, message_type: &str, data: &Value) -> std::result::Result<(), Vec<String>> {
        let key = (release.version.clone(), message_type.to_string());
        let cached = self.compiled.lock().ok().and_then(|c| c.get(&key).cloned());
        let validator = match cached {
            Some(v) => v,
            None => {
                let name = QName::new(crate::registry::XJUSTIZ_NS, message_type);
                if !release.model.elements.contains_key(&name) {
                    return Err(vec![format!("{message_type} is not a message type of XJustiz {}", release.version)]);
                }
                let gen = Generator::new(release);
                let schema = gen.message(&name);
                let retriever = Definitions { id: schema_id(&release.version, DEFINITIONS_FILE), contents: gen.definitions() };
                let validator = jsonschema::options()
                    .with_retriever(retriever)
                    .build(&schema)
                    .map_err(|e| vec![format!("schema of {message_type} does not compile: {e}")])?;
                let validator = std::sync::Arc::new(validator);
                if let Ok(mut c) = self.compiled.lock() {
                    c.insert(key, validator.clone());
                }
                validator
            }
        };
        let errors: Vec<String> = validator.iter_errors(data).map(|e| format!("{}: {e}", e.instance_path())).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}
