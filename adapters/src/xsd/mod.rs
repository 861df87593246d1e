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
