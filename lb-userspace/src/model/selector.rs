//! Label selectors with Kubernetes semantics.
//!
//! A Service's `spec.selector` is an equality map (every key must be present with that value);
//! [`Selector::parse`] also reads the `kubectl -l` string form (`=`, `==`, `!=`, `in`, `notin`,
//! `exists`, `!exists`, `>`, `<`) so both share one evaluator.
use std::collections::BTreeMap;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// An AND of requirements. The empty selector matches everything: callers that must treat an
/// empty Service selector as "no pods" (Kubernetes does) check [`Selector::is_empty`] first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct ParseError {
    selector: String,
    reason: String,
}

impl Selector {
    /// The selector of a Service: `key=value` for every entry.
    pub fn from_map(map: &Labels) -> Self {
        Self(
            map.iter()
                .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|req| match req {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
            Requirement::GreaterThan(key, bound) => label_number(labels, key).is_some_and(|n| n > *bound),
            Requirement::LessThan(key, bound) => label_number(labels, key).is_some_and(|n| n < *bound),
        })
    }

    /// Parses the `kubectl -l` form, e.g. `app=web,tier!=cache,env in (prod,staging),!legacy`.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let fail = |reason: &str| ParseError {
            selector: text.to_owned(),
            reason: reason.to_owned(),
        };
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let term = term.trim();
            if term.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(fail("empty requirement"));
            }
            requirements.push(parse_requirement(term).map_err(|reason| fail(&reason))?);
        }
        Ok(Self(requirements))
    }
}

fn label_number(labels: &Labels, key: &str) -> Option<i64> {
    labels.get(key)?.parse().ok()
}

/// Splits on commas that are not inside `( … )`.
fn split_terms(text: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(label_key(key.trim())?));
    }
    for (op, is_in) in [(" notin ", false), (" in ", true)] {
        if let Some((key, set)) = term.split_once(op) {
            let key = label_key(key.trim())?;
            let values = value_set(set.trim())?;
            return Ok(if is_in {
                Requirement::In(key, values)
            } else {
                Requirement::NotIn(key, values)
            });
        }
    }
    // Longest operators first so `==` is not read as `=` followed by a value `=…`.
    for op in ["!=", "==", "=", ">", "<"] {
        if let Some((key, value)) = term.split_once(op) {
            let key = label_key(key.trim())?;
            let value = value.trim();
            return match op {
                ">" | "<" => {
                    let bound = value
                        .parse()
                        .map_err(|_| format!("{op} needs an integer, not {value:?}"))?;
                    Ok(if op == ">" {
                        Requirement::GreaterThan(key, bound)
                    } else {
                        Requirement::LessThan(key, bound)
                    })
                }
                "!=" => Ok(Requirement::NotIn(key, vec![label_value(value)?])),
                _ => Ok(Requirement::In(key, vec![label_value(value)?])),
            };
        }
    }
    Ok(Requirement::Exists(label_key(term)?))
}

fn value_set(set: &str) -> Result<Vec<String>, String> {
    let inner = set
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised value set, found {set:?}"))?;
    inner.split(',').map(|v| label_value(v.trim())).collect()
}

/// `[prefix/]name`: name ≤ 63 characters of alphanumerics, `-`, `_`, `.`, starting and ending
/// alphanumeric; prefix a DNS subdomain.
fn label_key(key: &str) -> Result<String, String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(is_dns_label) {
                return Err(format!("invalid label key prefix {prefix:?}"));
            }
            name
        }
        None => key,
    };
    if name.is_empty() || !is_label_token(name) {
        return Err(format!("invalid label key {key:?}"));
    }
    Ok(key.to_owned())
}

/// A label value: empty, or like a key's name part.
pub fn label_value(value: &str) -> Result<String, String> {
    if value.is_empty() || is_label_token(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

fn is_label_token(s: &str) -> bool {
    let bytes = s.as_bytes();
    s.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vectors {
        matches: Vec<MatchCase>,
        parse_errors: Vec<String>,
    }

    #[derive(serde::Deserialize)]
    struct MatchCase {
        selector: String,
        labels: Labels,
        #[serde(rename = "match")]
        expected: bool,
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The upstream apimachinery vectors shared in `../shared/testdata`.
    #[test]
    fn upstream_selector_vectors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/label-selectors.json");
        let vectors: Vectors = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(vectors.matches.len() >= 18, "the vector file lost cases");
        for case in &vectors.matches {
            let selector = Selector::parse(&case.selector)
                .unwrap_or_else(|e| panic!("{:?} should parse: {e}", case.selector));
            assert_eq!(
                selector.matches(&case.labels),
                case.expected,
                "{:?} against {:?}",
                case.selector,
                case.labels
            );
        }
        for bad in &vectors.parse_errors {
            assert!(Selector::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn service_selector_is_an_and_of_equalities() {
        let selector = Selector::from_map(&labels(&[("app", "web"), ("version", "v1")]));
        assert!(selector.matches(&labels(&[("app", "web"), ("version", "v1"), ("env", "prod")])));
        assert!(!selector.matches(&labels(&[("app", "web"), ("version", "v2")])));
        assert!(!selector.matches(&labels(&[("app", "api"), ("version", "v1")])));
        assert!(!selector.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn equality_map_needs_every_pair() {
        let selector = Selector::from_map(&labels(&[("x", "y"), ("z", "w")]));
        assert!(!selector.matches(&labels(&[("x", "w"), ("z", "w")])));
        assert!(selector.matches(&labels(&[("x", "y"), ("z", "w")])));
    }

    #[test]
    fn label_values_are_validated() {
        assert!(label_value("web-1.a_b").is_ok());
        assert!(label_value("").is_ok());
        assert!(label_value("-web").is_err());
        assert!(label_value("a b").is_err());
        assert!(label_value(&"a".repeat(64)).is_err());
    }
}
