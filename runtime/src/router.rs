//! Maps an HTTP method and path to a function: route patterns with `{param}`
//! segments, method sets, and "most specific wins" matching.
//!
//! Conflicting routes (same shape, overlapping methods) are rejected when the
//! manifest is validated, so matching here never has to break ties.

use std::fmt;

/// An HTTP method a route can accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
    Head,
    Options,
}

impl Method {
    const ALL: [Method; 7] = [
        Method::Get,
        Method::Post,
        Method::Put,
        Method::Patch,
        Method::Delete,
        Method::Head,
        Method::Options,
    ];

    /// Parses a method name, case-insensitively.
    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of methods, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSet(u8);

impl MethodSet {
    pub const NONE: MethodSet = MethodSet(0);
    pub const ANY: MethodSet = MethodSet(0x7f);

    pub fn with(self, m: Method) -> MethodSet {
        MethodSet(self.0 | m.bit())
    }

    pub fn contains(self, m: Method) -> bool {
        self.0 & m.bit() != 0
    }

    pub fn overlaps(self, other: MethodSet) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn union(self, other: MethodSet) -> MethodSet {
        MethodSet(self.0 | other.0)
    }

    /// The value of an `Allow` header for this set (HEAD wherever GET is).
    pub fn allow_header(self) -> String {
        let set = if self.contains(Method::Get) {
            self.with(Method::Head)
        } else {
            self
        };
        Method::ALL
            .into_iter()
            .filter(|m| set.contains(*m))
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A validated route pattern such as `/users/{id}/posts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pattern: String,
    segments: Vec<Segment>,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

impl Route {
    /// A path this route matches, each parameter `value` (for a benchmark's
    /// request: `/hello/{name}` is `/hello/bench`).
    pub fn example(&self, value: &str) -> String {
        if self.segments.is_empty() {
            return "/".to_owned();
        }
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => format!("/{l}"),
                Segment::Param(_) => format!("/{value}"),
            })
            .collect()
    }

    /// Parses a pattern; the error says what to write instead.
    pub fn parse(pattern: &str) -> Result<Route, String> {
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(format!(
                "route {pattern:?} must start with `/`, e.g. \"/hello/{{name}}\""
            ));
        };
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        // "/" is the root route: no segments. A trailing slash is not allowed
        // elsewhere, so "/a" and "/a/" cannot both exist ambiguously.
        if !rest.is_empty() {
            for seg in rest.split('/') {
                if seg.is_empty() {
                    return Err(format!(
                        "route {pattern:?} has an empty segment (`//` or a trailing `/`); remove it"
                    ));
                }
                if let Some(inner) = seg.strip_prefix('{') {
                    let name = inner.strip_suffix('}').ok_or_else(|| {
                        format!("route {pattern:?}: segment {seg:?} opens `{{` but does not close it; write `{{name}}`")
                    })?;
                    let valid = name
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(format!(
                            "route {pattern:?}: parameter {seg:?} needs a name of letters, digits and `_`, e.g. `{{id}}`"
                        ));
                    }
                    if names.contains(&name) {
                        return Err(format!(
                            "route {pattern:?} uses parameter `{{{name}}}` twice; give each a distinct name"
                        ));
                    }
                    names.push(name);
                    segments.push(Segment::Param(name.to_owned()));
                } else if seg.contains(['{', '}']) {
                    return Err(format!(
                        "route {pattern:?}: segment {seg:?} mixes text and a parameter; a parameter takes a whole segment, e.g. \"/files/{{name}}\""
                    ));
                } else if let Some(bad) = seg
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || "-._~".contains(*c)))
                {
                    return Err(format!(
                        "route {pattern:?}: character {bad:?} is not allowed in a path segment; use letters, digits, `-`, `.`, `_` and `~`"
                    ));
                } else {
                    segments.push(Segment::Literal(seg.to_owned()));
                }
            }
        }
        Ok(Route {
            pattern: pattern.to_owned(),
            segments,
        })
    }

    /// Its parameters' names, in order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) => Some(n.as_str()),
            _ => None,
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// True if both routes match exactly the same paths (parameter names aside).
    pub fn same_shape(&self, other: &Route) -> bool {
        self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|(a, b)| match (a, b) {
                    (Segment::Literal(x), Segment::Literal(y)) => x == y,
                    (Segment::Param(_), Segment::Param(_)) => true,
                    _ => false,
                })
    }

    /// Matches `path` (already split on `/`), collecting parameters.
    fn matches<'p>(&self, parts: &[&'p str]) -> Option<Vec<(String, &'p str)>> {
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (seg, part) in self.segments.iter().zip(parts) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => params.push((name.clone(), *part)),
            }
        }
        Some(params)
    }

    /// Sort key: literals before parameters, segment by segment, so that the
    /// first matching route in sorted order is the most specific one.
    fn specificity(&self) -> Vec<u8> {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(_) => 0,
                Segment::Param(_) => 1,
            })
            .collect()
    }
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum RouteMatch<'r, T> {
    Found {
        target: &'r T,
        route: &'r Route,
        params: Vec<(String, String)>,
        /// A HEAD request that matched a route for GET only: serve it as a
        /// GET (the server sends no body for HEAD).
        head_as_get: bool,
    },
    /// The path exists, but not for this method; the set is for `Allow`.
    MethodNotAllowed(MethodSet),
    NotFound,
}

/// A routing table from (method, path) to a target `T`.
#[derive(Debug)]
pub struct Router<T> {
    routes: Vec<(Route, MethodSet, T)>,
}

impl<T> Router<T> {
    /// Builds a table; routes are assumed checked for conflicts already.
    pub fn new(mut routes: Vec<(Route, MethodSet, T)>) -> Router<T> {
        routes.sort_by_key(|r| r.0.specificity());
        Router { routes }
    }

    /// The route for `method` and `path`. HEAD is answered wherever GET
    /// is (load balancers and uptime probes send it): by the most specific
    /// route that takes HEAD or GET, as a GET unless it takes HEAD itself.
    pub fn lookup(&self, method: &str, path: &str) -> RouteMatch<'_, T> {
        let parts: Vec<&str> = match path.strip_prefix('/') {
            Some("") | None => Vec::new(),
            Some(rest) => rest.split('/').collect(),
        };
        let method = Method::parse(method);
        let mut allowed = MethodSet::NONE;
        for (route, methods, target) in &self.routes {
            let Some(params) = route.matches(&parts) else {
                continue;
            };
            let head_as_get = method == Some(Method::Head)
                && !methods.contains(Method::Head)
                && methods.contains(Method::Get);
            if method.is_some_and(|m| methods.contains(m)) || head_as_get {
                return RouteMatch::Found {
                    target,
                    route,
                    params: params
                        .into_iter()
                        .map(|(k, v)| (k, percent_decode(v)))
                        .collect(),
                    head_as_get,
                };
            }
            allowed = allowed.union(*methods);
        }
        if allowed.is_empty() {
            RouteMatch::NotFound
        } else {
            RouteMatch::MethodNotAllowed(allowed)
        }
    }
}

/// Decodes `%XX` escapes in a path segment; invalid escapes stay as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        let r = |p: &str| Route::parse(p).unwrap();
        Router::new(vec![
            (r("/users/{id}"), MethodSet::ANY, "user"),
            (r("/users/me"), MethodSet::NONE.with(Method::Get), "me"),
            (r("/"), MethodSet::ANY, "root"),
            (r("/items"), MethodSet::NONE.with(Method::Post), "items"),
        ])
    }

    #[test]
    fn most_specific_route_wins() {
        let router = router();
        match router.lookup("GET", "/users/me") {
            RouteMatch::Found { target, .. } => assert_eq!(*target, "me"),
            other => panic!("{other:?}"),
        }
        match router.lookup("POST", "/users/me") {
            RouteMatch::Found { target, params, .. } => {
                assert_eq!(*target, "user");
                assert_eq!(params, vec![("id".to_owned(), "me".to_owned())]);
            }
            other => panic!("{other:?}"),
        }
        match router.lookup("GET", "/users/a%20b") {
            RouteMatch::Found { params, .. } => assert_eq!(params[0].1, "a b"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            router.lookup("GET", "/"),
            RouteMatch::Found {
                target: &"root",
                ..
            }
        ));
    }

    #[test]
    fn head_is_get_without_a_body_where_get_is_allowed() {
        let router = router();
        match router.lookup("HEAD", "/users/me") {
            RouteMatch::Found {
                target,
                head_as_get,
                ..
            } => assert_eq!((*target, head_as_get), ("me", true)),
            other => panic!("{other:?}"),
        }
        // A route taking every method takes HEAD as itself.
        match router.lookup("HEAD", "/") {
            RouteMatch::Found { head_as_get, .. } => assert!(!head_as_get),
            other => panic!("{other:?}"),
        }
        match router.lookup("HEAD", "/items") {
            RouteMatch::MethodNotAllowed(set) => assert_eq!(set.allow_header(), "POST"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            MethodSet::NONE.with(Method::Get).allow_header(),
            "GET, HEAD"
        );
    }

    #[test]
    fn wrong_method_and_unknown_path() {
        let router = router();
        match router.lookup("GET", "/items") {
            RouteMatch::MethodNotAllowed(set) => assert_eq!(set.allow_header(), "POST"),
            other => panic!("{other:?}"),
        }
        assert_eq!(router.lookup("GET", "/nope"), RouteMatch::NotFound);
        assert_eq!(router.lookup("GET", "/users/1/2"), RouteMatch::NotFound);
    }

    #[test]
    fn bad_patterns_are_explained() {
        for (bad, needle) in [
            ("users", "must start with `/`"),
            ("/a//b", "empty segment"),
            ("/a/", "empty segment"),
            ("/{id", "does not close"),
            ("/{}", "needs a name"),
            ("/{a}/{a}", "twice"),
            ("/x{a}", "mixes text"),
            ("/a b", "not allowed"),
        ] {
            let err = Route::parse(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn shapes() {
        let r = |p: &str| Route::parse(p).unwrap();
        assert!(r("/a/{x}").same_shape(&r("/a/{y}")));
        assert!(!r("/a/{x}").same_shape(&r("/a/b")));
        assert!(!r("/a").same_shape(&r("/a/b")));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any method and path a client sends finds a route or not, and any
        /// pattern a manifest holds parses or is explained: never a panic.
        #[test]
        fn lookups_and_patterns_never_panic(
            method in "\\PC{0,10}",
            path in "(/[\\PC%]{0,12}){0,6}",
            raw in "\\PC{0,30}",
            pattern in "(/(\\{[a-z_]{0,4}\\}?|[a-z.~%-]{0,4})){0,4}",
        ) {
            let router = router();
            let _ = router.lookup(&method, &path);
            let _ = router.lookup(&method, &raw);
            if let Ok(route) = Route::parse(&pattern) {
                let table = Router::new(vec![(route, MethodSet::ANY, ())]);
                let _ = table.lookup("GET", &path);
            }
            let _ = Route::parse(&raw);
        }
    }
}
