//! Reading XSD sets.
//!
//! [`SchemaSet::load`] parses an entry schema and everything it includes or imports (each file
//! once, however often it is referenced: XJustiz 2.2.1 imports one xdomea namespace from two
//! files, and both are loaded, where libxml2 honours only the first import). Components are kept
//! as parsed element trees ([`Node`]) with their QName-valued attributes already resolved
//! against the namespaces in scope, so later stages need no prefix bookkeeping.

mod model;
mod parse;
mod set;

pub use model::{
    assign_keys, AttributeUse, ComplexType, Content, ElementDecl, Facets, IdentityConstraint, IdentityKind, MaxOccurs, Model, NameTest,
    Occurs, Particle, SimpleType, Term, TypeDef, TypeRef, Variety, XPath, ANY_KEY, BUILTIN_NAMES,
};
pub use parse::{Node, QName};
pub use set::{Component, ComponentKind, SchemaFile, SchemaSet, Unresolved, XS};

/// `../shared/xjustiz` beside the checkout (or `$JUSTIZBUS_SHARED/xjustiz`), where tests read
/// the third-party XJustiz files from; they are never copied into the project.
#[doc(hidden)]
pub fn shared_xjustiz() -> std::path::PathBuf {
    let shared = std::env::var_os("JUSTIZBUS_SHARED")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let dir = shared.join("xjustiz");
    assert!(
        dir.is_dir(),
        "{} not found: the tests read the XJustiz schemas from ../shared beside the checkout (or set JUSTIZBUS_SHARED)",
        dir.display()
    );
    dir
}
