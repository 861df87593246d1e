//! XJustiz support for Justizbus (DESIGN.md section 6).
//!
//! This crate reads the XSD sets of the XJustiz releases into a [`xsd::SchemaSet`]: every global
//! component (elements, complex and simple types, model groups, attribute groups, attributes)
//! of every namespace, keyed by qualified name, with every `schemaLocation` followed and every
//! type, base and `ref` reference resolved; and compiles it into an [`xsd::Model`] of element
//! declarations and type definitions with derivations applied. Translation to canonical JSON,
//! validation, schema generation and the adapter processes build on this model (issue 3).
//!
//! XML is read with `quick-xml` rather than the design card's `xml-rs`: issue 3 measured
//! 25 MB/s for xml-rs and 167-383 MB/s for quick-xml, against a target of 80 MB/s per core.

pub mod adapter;
pub mod bench;
pub mod cli;
pub mod client;
pub mod coalesce;
pub mod error;
pub mod event;
mod fasthash;
pub mod instance;
pub mod metadata;
pub mod registry;
pub mod schemas;
pub mod simple;
#[doc(hidden)]
pub mod testdata;
pub mod translate;
pub mod xml;
pub mod xsd;

pub use error::{Error, Result};
pub use registry::{Message, Registry, Rejection};
pub use translate::{Issue, Release};

#[cfg(test)]
mod samples_tests;

#[cfg(test)]
mod libxml2_tests;
