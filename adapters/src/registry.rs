//! All loaded XJustiz releases, and the entry point that turns a document into a checked,
//! translated message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::instance::{self, Element, Limits, SyntaxError};
use crate::metadata::{self, Metadata};
use crate::translate::{Issue, Release};
use crate::xsd::{Model, SchemaSet};
use crate::{Error, Result};

/// The XJustiz namespace.
pub const XJUSTIZ_NS: &str = "http://www.xjustiz.de";

/// The compiled type model's file name inside `schemas/xjustiz/<version>/`: gzip-compressed
/// JSON (the expanded model repeats base types in every derived one, which compresses ~15:1).
pub const MODEL_FILE: &str = "model.json.gz";

/// A release, compiled already or loaded from its file on first use (a process that reads one
/// release does not pay for decompressing the others).
#[derive(Debug)]
enum Slot {
    Ready(Box<Release>),
    Lazy { path: PathBuf, cell: std::sync::OnceLock<Option<Box<Release>>> },
}

/// The releases this process knows, by version.
#[derive(Debug, Default)]
pub struct Registry {
    releases: BTreeMap<String, Slot>,
    /// Limits applied to every document.
    pub limits: Limits,
    /// JSON Schema validators of the canonical JSON (the `jsonschema` crate).
    pub json: crate::schemas::JsonSchemas,
}

/// A document that checked out.
#[derive(Debug, Clone)]
pub struct Message {
    /// Message type: the root element's name, e.g. `nachricht.gds.uebermittlungSchriftgutobjekte.0005005`.
    pub message_type: String,
    /// XJustiz release, from `xjustizVersion`.
    pub version: String,
    /// Canonical JSON of the root element.
    pub data: Value,
    /// What routing needs from the header.
    pub metadata: Metadata,
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Not well-formed, hostile, or over the limits.
    Syntax(SyntaxError),
    /// Not an XJustiz message at all (namespace, no version).
    NotXJustiz {
        /// Line of the problem.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A release no schema is loaded for.
    UnknownVersion {
        /// Line of the element carrying `xjustizVersion`.
        line: usize,
        /// The version the document claims.
        version: String,
        /// The versions loaded.
        known: Vec<String>,
    },
    /// Schema-invalid (unknown message types included).
    Invalid(Vec<Issue>),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Syntax(e) => write!(f, "not well-formed: {e}"),
            Rejection::NotXJustiz { line, message } => write!(f, "line {line}: {message}"),
            Rejection::UnknownVersion { line, version, known } => {
                write!(f, "line {line}: xjustizVersion \"{version}\" is not a known release (known: {})", known.join(", "))
            }
            Rejection::Invalid(issues) => {
                for (i, issue) in issues.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "{issue}")?;
                }
                Ok(())
            }
        }
    }
}

impl Registry {
    /// Compiles every release under `root` (each `<version>/xsd` directory, as in
    /// `../shared/xjustiz`).
    pub fn from_xsd_root(root: &Path) -> Result<Registry> {
        let mut registry = Registry::default();
        let dirs = if root.join("xsd").is_dir() {
            let version = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            vec![(version, root.to_path_buf())]
        } else {
            version_dirs(root)?
        };
        for (version, dir) in dirs {
            let xsd = dir.join("xsd");
            if xsd.is_dir() {
                let set = SchemaSet::load_dir(&xsd)?;
                registry.insert(Release::new(&version, Model::build(&set)?));
            }
        }
        Ok(registry)
    }

    /// Loads the compiled models that `generate-schemas` wrote (`<dir>/<version>/model.json.gz`).
    pub fn from_schemas(dir: &Path) -> Result<Registry> {
        let mut registry = Registry::default();
        for (version, dir) in version_dirs(dir)? {
            let path = dir.join(MODEL_FILE);
            if !path.is_file() {
                continue;
            }
            registry.releases.insert(version, Slot::Lazy { path, cell: std::sync::OnceLock::new() });
        }
        Ok(registry)
    }

    /// Adds a release.
    pub fn insert(&mut self, release: Release) {
        self.releases.insert(release.version.clone(), Slot::Ready(Box::new(release)));
    }

    /// A release by version.
    pub fn release(&self, version: &str) -> Option<&Release> {
        match self.releases.get(version)? {
            Slot::Ready(r) => Some(r),
            Slot::Lazy { path, cell } => cell
                .get_or_init(|| match load_model(path) {
                    Ok(model) => Some(Box::new(Release::new(version, model))),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot load the compiled model");
                        None
                    }
                })
                .as_deref(),
        }
    }

    /// The loaded versions, ascending.
    pub fn versions(&self) -> Vec<String> {
        self.releases.keys().cloned().collect()
    }

    /// Parses, validates and translates a document.
    pub fn read(&self, xml: &[u8]) -> std::result::Result<Message, Rejection> {
        let root = instance::parse(xml, self.limits).map_err(Rejection::Syntax)?;
        self.read_parsed(xml, &root)
    }

    /// Validates and translates a parsed document.
    pub fn read_parsed(&self, xml: &[u8], root: &Element) -> std::result::Result<Message, Rejection> {
        if &*root.name.ns != XJUSTIZ_NS {
            let ns = if root.name.ns.is_empty() { "no namespace".to_string() } else { format!("namespace {}", root.name.ns) };
            return Err(Rejection::NotXJustiz {
                line: instance::line_of(xml, root.offset),
                message: format!("<{}> is in {ns}, not in {XJUSTIZ_NS}", root.name.local),
            });
        }
        let (version, at) = find_version(root).ok_or_else(|| Rejection::NotXJustiz {
            line: instance::line_of(xml, root.offset),
            message: format!("<{}> has no xjustizVersion attribute in its header", root.name.local),
        })?;
        let release = self.release(&version).ok_or_else(|| Rejection::UnknownVersion {
            line: instance::line_of(xml, at),
            version: version.clone(),
            known: self.versions(),
        })?;
        let (data, issues) = release.translate(xml, root);
        if !issues.is_empty() {
            return Err(Rejection::Invalid(issues));
        }
        let metadata = metadata::extract(root, &version);
        Ok(Message { message_type: root.name.local.to_string(), version, data, metadata })
    }
}

/// Reads a gzip-compressed compiled model.
pub fn load_model(path: &Path) -> Result<Model> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(file), &mut json)
        .map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&json).map_err(|e| Error::Schema { path: path.to_path_buf(), message: format!("not a compiled model: {e}") })
}

/// The `xjustizVersion` attribute: on `nachrichtenkopf` (3.x, 4.x) or `grunddaten` (2.x), the
/// first one in document order within the top levels.
/// Returns the version and the byte offset of the element carrying it.
pub fn find_version(root: &Element) -> Option<(String, usize)> {
    let mut level = vec![root];
    for _ in 0..4 {
        for e in &level {
            if let Some(v) = e.attribute("", "xjustizVersion") {
                return Some((v.trim().to_string(), e.offset));
            }
        }
        level = level.iter().flat_map(|e| e.children.iter()).collect();
    }
    None
}

fn version_dirs(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(root).map_err(|source| Error::Io { path: root.to_path_buf(), source })?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io { path: root.to_path_buf(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && name.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}
