//! Host / path / method matching. The most specific route wins: an exact host over a wildcard,
//! a longer wildcard suffix over a shorter one, a longer path prefix over a shorter one. A host
//! that has routes but none matching the path or method is denied, never forwarded bare.

use foldhash::HashMap;
use std::sync::Arc;

use http::Method;

use crate::config::{HostPattern, Injection, RouteSpec};
use crate::host::Host;
use crate::path;
use crate::s3::NamedSource;

/// A route as the request path uses it.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub host: HostPattern,
    pub path_prefix: Option<String>,
    pub methods: Option<Vec<Method>>,
    /// The default credential; `None`: only agents with their own may use the route.
    pub credential: Option<Arc<str>>,
    pub inject: Injection,
    pub strip: Vec<http::HeaderName>,
    pub respect_retry_after: bool,
    pub auth_failure_markers: Vec<String>,
    pub agents: Option<std::collections::BTreeMap<String, crate::config::AgentScope>>,
    pub tls_only: bool,
}

/// The outcome of looking a request up.
#[derive(Debug)]
pub enum RouteMatch<'a> {
    /// No route has this host at all: the `unmatched` policy decides.
    HostNotRouted,
    /// The host is routed, but no route allows this path and method.
    Denied,
    Matched(&'a Arc<Route>),
}

/// Whose bounds a named source falls outside of.
#[derive(Debug, PartialEq, Eq)]
pub enum OutsideScope {
    /// The route's `path_prefix`.
    Route,
    /// The agent's own `path_prefix`.
    Agent,
}

/// All routes, indexed for lookups that cost a few hash probes whatever the route count. The
/// maps use foldhash, not SipHash: an agent picks the host looked up but never what the maps
/// hold (the config does), so there is no collision flood to resist, and every request probes
/// them. (The upstream pool keeps SipHash: with `unmatched: tunnel` an agent's plain-HTTP
/// requests add hosts of its choosing to it.)
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<Host, Vec<Arc<Route>>>,
    /// Keyed by suffix with its leading dot (`.example.test`).
    wildcard: HashMap<String, Vec<Arc<Route>>>,
}

impl RouteTable {
    pub fn new(specs: &[RouteSpec]) -> Self {
        let mut table = RouteTable::default();
        for spec in specs {
            let route = Arc::new(Route {
                name: Arc::from(spec.name.as_str()),
                host: spec.host.clone(),
                path_prefix: spec.path_prefix.clone(),
                methods: spec.methods.clone(),
                credential: spec.credential.as_deref().map(Arc::from),
                inject: spec.inject.clone(),
                strip: spec.strip.clone(),
                respect_retry_after: spec.respect_retry_after,
                auth_failure_markers: spec.auth_failure_markers.clone(),
                agents: spec.agents.clone(),
                tls_only: spec.tls_only,
            });
            let bucket = match &spec.host {
                HostPattern::Exact(host) => table.exact.entry(host.clone()).or_default(),
                HostPattern::Wildcard(suffix) => table.wildcard.entry(suffix.clone()).or_default(),
            };
            bucket.push(route);
        }
        // Longest prefix first; a route without a prefix matches every path and goes last.
        // The sort is stable, so among equals the first in the file wins.
        for bucket in table.exact.values_mut().chain(table.wildcard.values_mut()) {
            bucket.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.as_deref().map_or(0, str::len)));
        }
        table
    }

    /// Every route, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.exact.values().chain(self.wildcard.values()).flatten()
    }

    /// Whether any route names this host (exactly or by wildcard).
    pub fn routes_host(&self, host: &Host) -> bool {
        self.candidates(host.as_str()).next().is_some()
    }

    pub fn lookup(&self, host: &Host, path: &str, method: &Method) -> RouteMatch<'_> {
        let mut any = false;
        for bucket in self.candidates(host.as_str()) {
            any = true;
            if let Some(route) = bucket.iter().find(|r| r.allows(path, method)) {
                return RouteMatch::Matched(route);
            }
        }
        if any {
            RouteMatch::Denied
        } else {
            RouteMatch::HostNotRouted
        }
    }

    /// Buckets for `host`, most specific first: the exact host, then wildcard suffixes from the
    /// longest (`.b.example.test`) to the shortest (`.test`).
    fn candidates<'a: 'h, 'h>(
        &'a self,
        host: &'h str,
    ) -> impl Iterator<Item = &'a Vec<Arc<Route>>> + 'h {
        let exact = self.exact.get(host);
        let wildcards = host
            .match_indices('.')
            .filter(|(at, _)| *at > 0)
            .filter_map(move |(at, _)| host.get(at..))
            .filter_map(move |suffix| self.wildcard.get(suffix));
        exact.into_iter().chain(wildcards)
    }
}

impl Route {
    /// Whether `agent` may use this route for `method` and `path`: any agent (or none) when the
    /// route lists no `agents:`, else only a listed agent within its scope.
    pub fn admits_agent(&self, agent: Option<&str>, path: &str, method: &Method) -> bool {
        let Some(agents) = &self.agents else {
            return true;
        };
        let Some(scope) = agent.and_then(|agent| agents.get(agent)) else {
            return false;
        };
        scope
            .methods
            .as_ref()
            .is_none_or(|methods| methods.contains(method))
            && scope
                .path_prefix
                .as_ref()
                .is_none_or(|prefix| path::is_under(prefix, path))
    }

    /// Whether an object the request names outside its path (an S3 copy source, see `s3.rs`)
    /// lies within the route's prefix and `agent`'s scope, by the same path rule as the path.
    /// Something no path stands for passes only where neither has a prefix.
    pub fn admits_named_source(
        &self,
        agent: Option<&str>,
        source: &NamedSource,
    ) -> Result<(), OutsideScope> {
        let within = |prefix: &String| match source {
            NamedSource::Path(path) => path::is_under(prefix, path),
            NamedSource::Unreadable => false,
        };
        if self.path_prefix.as_ref().is_some_and(|p| !within(p)) {
            return Err(OutsideScope::Route);
        }
        let scope_prefix = self.scope_of(agent).and_then(|s| s.path_prefix.as_ref());
        if scope_prefix.is_some_and(|p| !within(p)) {
            return Err(OutsideScope::Agent);
        }
        Ok(())
    }

    /// The credential `agent` uses on this route: its own, else the route's default.
    pub fn credential_for(&self, agent: Option<&str>) -> Option<Arc<str>> {
        let own = self
            .scope_of(agent)
            .and_then(|scope| scope.credential.as_deref());
        own.map(Arc::from).or_else(|| self.credential.clone())
    }

    /// How `agent`'s credential is injected: its own way, else the route's.
    pub fn inject_for(&self, agent: Option<&str>) -> &Injection {
        self.scope_of(agent)
            .and_then(|scope| scope.inject.as_ref())
            .unwrap_or(&self.inject)
    }

    fn scope_of(&self, agent: Option<&str>) -> Option<&crate::config::AgentScope> {
        self.agents.as_ref()?.get(agent?)
    }

    fn allows(&self, path: &str, method: &Method) -> bool {
        if let Some(methods) = &self.methods {
            if !methods.contains(method) {
                return false;
            }
        }
        match &self.path_prefix {
            None => true,
            Some(prefix) => path::is_under(prefix, path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(yaml_routes: &str) -> RouteTable {
        let yaml = format!(
            "listen: 127.0.0.1:0\nca: {{ generate: true }}\ncredentials:\n  a: {{ source: {{ env: A }} }}\n  b: {{ source: {{ env: B }} }}\nroutes:\n{yaml_routes}"
        );
        let config = Config::from_yaml(std::path::Path::new("/t/k.yaml"), &yaml).unwrap();
        RouteTable::new(&config.routes)
    }

    fn matched(table: &RouteTable, host: &str, path: &str, method: Method) -> Option<String> {
        match table.lookup(&Host::parse(host).unwrap(), path, &method) {
            RouteMatch::Matched(route) => Some(route.name.to_string()),
            RouteMatch::Denied => Some("denied".into()),
            RouteMatch::HostNotRouted => None,
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let t = table(
            "  - { name: wild, host: '*.x.test', credential: a, inject: { type: bearer } }\n\
             \x20 - { name: exact, host: api.x.test, credential: a, inject: { type: bearer } }\n\
             \x20 - { name: v1, host: api.x.test, path_prefix: /v1/, credential: b, inject: { type: bearer } }\n\
             \x20 - { name: deep, host: '*.b.x.test', credential: b, inject: { type: bearer } }\n",
        );
        assert_eq!(
            matched(&t, "api.x.test", "/v1/a", Method::GET).as_deref(),
            Some("v1")
        );
        assert_eq!(
            matched(&t, "API.X.TEST.", "/v2", Method::GET).as_deref(),
            Some("exact")
        );
        assert_eq!(
            matched(&t, "other.x.test", "/", Method::GET).as_deref(),
            Some("wild")
        );
        assert_eq!(
            matched(&t, "a.b.x.test", "/", Method::GET).as_deref(),
            Some("deep")
        );
        assert_eq!(matched(&t, "x.test", "/", Method::GET), None);
        assert_eq!(matched(&t, "evilx.test", "/", Method::GET), None);
    }

    #[test]
    fn routed_host_without_matching_path_or_method_is_denied() {
        let t = table(
            "  - { host: api.x.test, path_prefix: /v1/, methods: [GET], credential: a, inject: { type: bearer } }\n",
        );
        assert_eq!(
            matched(&t, "api.x.test", "/v1/ok", Method::GET).as_deref(),
            Some("api.x.test/v1/")
        );
        assert_eq!(
            matched(&t, "api.x.test", "/v1/ok", Method::POST).as_deref(),
            Some("denied")
        );
        assert_eq!(
            matched(&t, "api.x.test", "/v2/", Method::GET).as_deref(),
            Some("denied")
        );
        assert_eq!(
            matched(&t, "api.x.test", "/v1/../admin", Method::GET).as_deref(),
            Some("denied")
        );
        assert_eq!(
            matched(&t, "api.x.test", "/v1/%2e%2e/admin", Method::GET).as_deref(),
            Some("denied")
        );
    }
}
