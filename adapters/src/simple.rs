//! Checking a text value against a simple type: the built-in lexical spaces of XSD 1.0 and the
//! facets of the derivation chain.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

use crate::xsd::{Facets, Model, SimpleType, TypeDef, TypeRef, Variety};

/// Compiled `xs:pattern` facets. Looked up by the address of the pattern string inside the
/// model (stable: the model is never changed after it is built), so a check never hashes a
/// pattern; the same text at several places shares one compiled regex.
#[derive(Debug, Default)]
pub struct Patterns {
    by_text: HashMap<String, Option<std::sync::Arc<Regex>>>,
    by_address: HashMap<usize, Option<std::sync::Arc<Regex>>, crate::fasthash::FastHash>,
}

impl Patterns {
    /// Compiles every pattern of the model: named types, and anonymous types anywhere inside
    /// element declarations.
    pub fn for_model(model: &Model) -> Patterns {
        let mut p = Patterns::default();
        for def in model.types.values() {
            p.collect_def(def);
        }
        for decl in model.elements.values() {
            p.collect_ref(&decl.type_ref);
        }
        p.by_text.clear();
        p
    }

    fn collect_particle(&mut self, particle: &crate::xsd::Particle) {
        match &particle.term {
            crate::xsd::Term::Element(decl) => self.collect_ref(&decl.type_ref),
            crate::xsd::Term::Sequence(ps) | crate::xsd::Term::Choice(ps) | crate::xsd::Term::All(ps) => {
                ps.iter().for_each(|c| self.collect_particle(c))
            }
            crate::xsd::Term::Any { .. } => {}
        }
    }

    fn collect_def(&mut self, def: &TypeDef) {
        match def {
            TypeDef::Simple(s) => self.collect(s),
            TypeDef::Complex(c) => {
                for a in &c.attributes {
                    self.collect_ref(&a.type_ref);
                }
                match &c.content {
                    crate::xsd::Content::Simple(r) => self.collect_ref(r),
                    crate::xsd::Content::Elements(p) => self.collect_particle(p),
                    crate::xsd::Content::Empty => {}
                }
            }
        }
    }

    fn collect_ref(&mut self, r: &TypeRef) {
        if let TypeRef::Anonymous(def) = r {
            self.collect_def(def);
        }
    }

    /// Adds the patterns of one simple type (and of inline member types).
    pub fn collect(&mut self, st: &SimpleType) {
        for set in &st.facets.patterns {
            for p in set {
                let compiled = self
                    .by_text
                    .entry(p.clone())
                    .or_insert_with(|| Regex::new(&format!("^(?:{})$", xsd_regex(p))).ok().map(std::sync::Arc::new))
                    .clone();
                self.by_address.insert(p.as_ptr() as usize, compiled);
            }
        }
        match &st.variety {
            Variety::Atomic => {}
            Variety::List(item) => self.collect_ref(item),
            Variety::Union(members) => members.iter().for_each(|m| self.collect_ref(m)),
        }
    }

    fn matches(&self, pattern: &str, value: &str) -> bool {
        match self.by_address.get(&(pattern.as_ptr() as usize)) {
            Some(Some(re)) => re.is_match(value),
            // Not compiled up front (an inline type met late) or not translatable: compile now.
            _ => Regex::new(&format!("^(?:{})$", xsd_regex(pattern))).map(|re| re.is_match(value)).unwrap_or(true),
        }
    }
}

/// Translates an XSD regular expression to the `regex` crate's dialect. XSD's syntax is a near
/// subset; the differences used in practice are the multi-character escapes `\i` and `\c`.
pub fn xsd_regex(pattern: &str) -> String {
    pattern.replace(r"\i", "[_:A-Za-z]").replace(r"\c", r"[-._:A-Za-z0-9]")
}

/// The whitespace handling of a type: built-in default unless a facet says otherwise.
fn whitespace_mode(st: &SimpleType) -> &str {
    if let Some(ws) = &st.facets.white_space {
        return ws;
    }
    match (&st.variety, st.builtin.as_str()) {
        (Variety::Atomic, "string" | "anySimpleType") => "preserve",
        (Variety::Atomic, "normalizedString") => "replace",
        _ => "collapse",
    }
}

/// Applies the whitespace facet (without allocating when the value is normal already).
pub fn normalize<'v>(value: &'v str, mode: &str) -> std::borrow::Cow<'v, str> {
    use std::borrow::Cow;
    let has_controls = value.bytes().any(|b| matches!(b, b'\t' | b'\n' | b'\r'));
    match mode {
        "preserve" => Cow::Borrowed(value),
        "replace" if !has_controls => Cow::Borrowed(value),
        "replace" => Cow::Owned(value.replace(['\t', '\n', '\r'], " ")),
        _ if !has_controls && !value.starts_with(' ') && !value.ends_with(' ') && !value.contains("  ") => Cow::Borrowed(value),
        _ => Cow::Owned(value.split_ascii_whitespace().collect::<Vec<_>>().join(" ")),
    }
}

/// Checks `value` against `st`; returns the normalised value or what is wrong.
pub fn check<'v>(model: &Model, patterns: &Patterns, st: &SimpleType, value: &'v str) -> Result<std::borrow::Cow<'v, str>, String> {
    let normalized = normalize(value, whitespace_mode(st));
    match &st.variety {
        Variety::Atomic => {
            check_builtin(&st.builtin, &normalized)?;
        }
        Variety::List(item) => {
            let item = simple_of(model, item).ok_or("list item type is not simple")?;
            for v in normalized.split(' ').filter(|s| !s.is_empty()) {
                check(model, patterns, item, v)?;
            }
        }
        Variety::Union(members) => {
            let mut errors = Vec::new();
            let ok = members.iter().filter_map(|m| simple_of(model, m)).any(|m| match check(model, patterns, m, &normalized) {
                Ok(_) => true,
                Err(e) => {
                    errors.push(e);
                    false
                }
            });
            if !ok {
                return Err(format!("\"{normalized}\" matches no member of the union ({})", errors.join("; ")));
            }
        }
    }
    check_facets(patterns, st, &st.facets, &normalized)?;
    Ok(normalized)
}

/// The simple type a reference stands for (the text type for simple-content complex types).
pub fn simple_of<'a>(model: &'a Model, r: &'a TypeRef) -> Option<&'a SimpleType> {
    match model.resolve(r)? {
        TypeDef::Simple(s) => Some(s),
        TypeDef::Complex(c) => match &c.content {
            crate::xsd::Content::Simple(inner) => simple_of(model, inner),
            _ => None,
        },
    }
}

fn check_facets(patterns: &Patterns, st: &SimpleType, f: &Facets, value: &str) -> Result<(), String> {
    if !f.enumeration.is_empty() && !f.enumeration.iter().any(|e| e == value) {
        let shown: Vec<&str> = f.enumeration.iter().take(8).map(String::as_str).collect();
        let more = if f.enumeration.len() > 8 { ", ..." } else { "" };
        return Err(format!("\"{value}\" is not one of the allowed values ({}{more})", shown.join(", ")));
    }
    for set in &f.patterns {
        if !set.iter().any(|p| patterns.matches(p, value)) {
            return Err(format!("\"{value}\" does not match the pattern {}", set.join(" | ")));
        }
    }
    let length = match (&st.variety, st.builtin.as_str()) {
        (Variety::List(_), _) => value.split(' ').filter(|s| !s.is_empty()).count() as u64,
        (_, "hexBinary") => value.len() as u64 / 2,
        (_, "base64Binary") => base64_octets(value),
        _ => value.chars().count() as u64,
    };
    let name = "length";
    if let Some(l) = f.length.filter(|l| *l != length) {
        return Err(format!("\"{value}\" has {name} {length}, must be {l}"));
    }
    if let Some(l) = f.min_length.filter(|l| length < *l) {
        return Err(format!("\"{value}\" has {name} {length}, at least {l} required"));
    }
    if let Some(l) = f.max_length.filter(|l| length > *l) {
        return Err(format!("\"{value}\" has {name} {length}, at most {l} allowed"));
    }
    if f.total_digits.is_some() || f.fraction_digits.is_some() {
        let (total, fraction) = digits(value);
        if let Some(t) = f.total_digits.filter(|t| total > *t) {
            return Err(format!("\"{value}\" has {total} digits, at most {t} allowed"));
        }
        if let Some(t) = f.fraction_digits.filter(|t| fraction > *t) {
            return Err(format!("\"{value}\" has {fraction} fraction digits, at most {t} allowed"));
        }
    }
    let numeric = is_numeric(&st.builtin);
    let cmp = |bound: &str| if numeric { compare_decimal(value, bound) } else { Some(value.cmp(bound)) };
    use std::cmp::Ordering::*;
    if let Some(b) = &f.min_inclusive {
        if cmp(b) == Some(Less) {
            return Err(format!("\"{value}\" is less than {b}"));
        }
    }
    if let Some(b) = &f.max_inclusive {
        if cmp(b) == Some(Greater) {
            return Err(format!("\"{value}\" is greater than {b}"));
        }
    }
    if let Some(b) = &f.min_exclusive {
        if matches!(cmp(b), Some(Less | Equal)) {
            return Err(format!("\"{value}\" must be greater than {b}"));
        }
    }
    if let Some(b) = &f.max_exclusive {
        if matches!(cmp(b), Some(Greater | Equal)) {
            return Err(format!("\"{value}\" must be less than {b}"));
        }
    }
    Ok(())
}

fn is_numeric(builtin: &str) -> bool {
    matches!(
        builtin,
        "decimal"
            | "integer"
            | "nonPositiveInteger"
            | "negativeInteger"
            | "long"
            | "int"
            | "short"
            | "byte"
            | "nonNegativeInteger"
            | "unsignedLong"
            | "unsignedInt"
            | "unsignedShort"
            | "unsignedByte"
            | "positiveInteger"
            | "float"
            | "double"
    )
}

fn base64_octets(value: &str) -> u64 {
    let chars: Vec<u8> = value.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let pad = chars.iter().rev().take_while(|b| **b == b'=').count() as u64;
    (chars.len() as u64 / 4) * 3 - pad
}

/// (total digits, fraction digits) of a decimal, ignoring sign and insignificant zeros.
fn digits(value: &str) -> (u32, u32) {
    let v = value.trim_start_matches(['+', '-']);
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let total = (int.len() + frac.len()).max(1) as u32;
    (total, frac.len() as u32)
}

/// Compares two decimal literals exactly; `None` when one is not a decimal.
pub fn compare_decimal(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    fn parts(v: &str) -> Option<(bool, String, String)> {
        let (neg, v) = match v.as_bytes().first()? {
            b'-' => (true, &v[1..]),
            b'+' => (false, &v[1..]),
            _ => (false, v),
        };
        let (int, frac) = v.split_once('.').unwrap_or((v, ""));
        if !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) || (int.is_empty() && frac.is_empty()) {
            return None;
        }
        let int = int.trim_start_matches('0').to_string();
        let frac = frac.trim_end_matches('0').to_string();
        let zero = int.is_empty() && frac.is_empty();
        Some((neg && !zero, int, frac))
    }
    let (na, ia, fa) = parts(a)?;
    let (nb, ib, fb) = parts(b)?;
    use std::cmp::Ordering::*;
    let magnitude = ia.len().cmp(&ib.len()).then_with(|| ia.cmp(&ib)).then_with(|| fa.cmp(&fb));
    Some(match (na, nb) {
        (false, true) => Greater,
        (true, false) => Less,
        (false, false) => magnitude,
        (true, true) => magnitude.reverse(),
    })
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("built-in lexical pattern"))
}

macro_rules! lexical {
    ($pattern:expr) => {{
        static CELL: OnceLock<Regex> = OnceLock::new();
        re(&CELL, $pattern)
    }};
}

const TZ: &str = r"(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))?";

/// Checks the lexical space of a built-in type.
pub fn check_builtin(builtin: &str, v: &str) -> Result<(), String> {
    let bad = |what: &str| Err(format!("\"{v}\" is not a valid {what}"));
    let ok = match builtin {
        "string" | "normalizedString" | "token" | "anySimpleType" | "anyType" | "anyURI" => true,
        "boolean" => matches!(v, "true" | "false" | "1" | "0"),
        "decimal" => lexical!(r"^[+-]?(\d+(\.\d*)?|\.\d+)$").is_match(v),
        "float" | "double" => {
            matches!(v, "INF" | "-INF" | "NaN")
                || (lexical!(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$").is_match(v) && v.parse::<f64>().is_ok())
        }
        "integer" | "nonPositiveInteger" | "negativeInteger" | "long" | "int" | "short" | "byte" | "nonNegativeInteger"
        | "unsignedLong" | "unsignedInt" | "unsignedShort" | "unsignedByte" | "positiveInteger" => {
            if !lexical!(r"^[+-]?\d+$").is_match(v) {
                return bad(builtin);
            }
            let (min, max): (Option<&str>, Option<&str>) = match builtin {
                "nonPositiveInteger" => (None, Some("0")),
                "negativeInteger" => (None, Some("-1")),
                "long" => (Some("-9223372036854775808"), Some("9223372036854775807")),
                "int" => (Some("-2147483648"), Some("2147483647")),
                "short" => (Some("-32768"), Some("32767")),
                "byte" => (Some("-128"), Some("127")),
                "nonNegativeInteger" => (Some("0"), None),
                "unsignedLong" => (Some("0"), Some("18446744073709551615")),
                "unsignedInt" => (Some("0"), Some("4294967295")),
                "unsignedShort" => (Some("0"), Some("65535")),
                "unsignedByte" => (Some("0"), Some("255")),
                "positiveInteger" => (Some("1"), None),
                _ => (None, None),
            };
            min.is_none_or(|m| compare_decimal(v, m) != Some(std::cmp::Ordering::Less))
                && max.is_none_or(|m| compare_decimal(v, m) != Some(std::cmp::Ordering::Greater))
        }
        "date" => date_ok(v, lexical!(&format!(r"^-?(\d{{4,}})-(\d\d)-(\d\d){TZ}$"))),
        "dateTime" => {
            date_ok(v, lexical!(&format!(r"^-?(\d{{4,}})-(\d\d)-(\d\d)T(([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?|24:00:00(\.0+)?){TZ}$")))
        }
        "time" => lexical!(&format!(r"^(([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?|24:00:00(\.0+)?){TZ}$")).is_match(v),
        "gYear" => lexical!(&format!(r"^-?\d{{4,}}{TZ}$")).is_match(v),
        "gYearMonth" => lexical!(&format!(r"^-?\d{{4,}}-(0[1-9]|1[0-2]){TZ}$")).is_match(v),
        "gMonthDay" => lexical!(&format!(r"^--(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]){TZ}$")).is_match(v),
        "gDay" => lexical!(&format!(r"^---(0[1-9]|[12]\d|3[01]){TZ}$")).is_match(v),
        "gMonth" => lexical!(&format!(r"^--(0[1-9]|1[0-2]){TZ}$")).is_match(v),
        "duration" => {
            lexical!(r"^-?P(\d+Y)?(\d+M)?(\d+D)?(T(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?$").is_match(v) && !v.ends_with('P') && !v.ends_with('T')
        }
        "hexBinary" => v.len().is_multiple_of(2) && v.bytes().all(|b| b.is_ascii_hexdigit()),
        "base64Binary" => {
            let s: Vec<u8> = v.bytes().filter(|b| *b != b' ').collect();
            s.len().is_multiple_of(4)
                && s.iter().rev().skip_while(|b| **b == b'=').all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
                && s.iter().rev().take_while(|b| **b == b'=').count() <= 2
        }
        "language" => lexical!(r"^[a-zA-Z]{1,8}(-[a-zA-Z0-9]{1,8})*$").is_match(v),
        "Name" => lexical!(r"^[_:\p{L}][-._:\p{L}\p{N}]*$").is_match(v),
        "NCName" | "ID" | "IDREF" | "ENTITY" => lexical!(r"^[_\p{L}][-._\p{L}\p{N}]*$").is_match(v),
        "NMTOKEN" => lexical!(r"^[-._:\p{L}\p{N}]+$").is_match(v),
        "IDREFS" | "ENTITIES" => v.split(' ').all(|t| lexical!(r"^[_\p{L}][-._\p{L}\p{N}]*$").is_match(t)) && !v.is_empty(),
        "NMTOKENS" => v.split(' ').all(|t| lexical!(r"^[-._:\p{L}\p{N}]+$").is_match(t)) && !v.is_empty(),
        "QName" | "NOTATION" => lexical!(r"^([_\p{L}][-._\p{L}\p{N}]*:)?[_\p{L}][-._\p{L}\p{N}]*$").is_match(v),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        bad(builtin)
    }
}

/// Checks that a date's month and day exist (February 29 only in leap years).
fn date_ok(v: &str, re: &Regex) -> bool {
    let Some(c) = re.captures(v) else { return false };
    let (Ok(year), Ok(month), Ok(day)) = (c[1].parse::<i64>(), c[2].parse::<u32>(), c[3].parse::<u32>()) else { return false };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_lexical_spaces() {
        for (t, good, bad) in [
            ("date", "2024-02-29", "2023-02-29"),
            ("date", "2024-12-31+01:00", "2024-13-01"),
            ("dateTime", "2024-01-01T12:00:00.5Z", "2024-01-01 12:00:00"),
            ("boolean", "1", "yes"),
            ("int", "-2147483648", "2147483648"),
            ("decimal", "-.5", "1e3"),
            ("gYear", "2024", "24"),
            ("duration", "P1DT2H", "PT"),
            ("base64Binary", "QUJD", "QUJ"),
            ("unsignedByte", "255", "-1"),
        ] {
            assert!(check_builtin(t, good).is_ok(), "{t} {good}");
            assert!(check_builtin(t, bad).is_err(), "{t} {bad}");
        }
    }

    #[test]
    fn decimals_compare_exactly() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_decimal("10.50", "10.5"), Some(Equal));
        assert_eq!(compare_decimal("-0", "0"), Some(Equal));
        assert_eq!(compare_decimal("-2", "-10"), Some(Greater));
        assert_eq!(compare_decimal("99999999999999999999.1", "99999999999999999999"), Some(Greater));
        assert_eq!(digits("-0012.3400"), (4, 2));
    }
}
