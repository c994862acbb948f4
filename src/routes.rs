//! The routing table: host and path prefix → origin, who may read it, and whether it is cached.
//! The most specific route wins: one with a host before one without, then the longest prefix.

use std::sync::Arc;

use crate::origin::Origin;

/// Who may read a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only clients with a verified certificate.
    Authenticated,
    /// Any client the listener admitted (in optional mode, also clients without a certificate).
    Any,
}

/// A compiled route.
pub struct Route {
    /// Lowercased host without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub origin: Arc<Origin>,
    pub access: Access,
    /// Default freshness when the route is cached.
    pub cache_ttl: Option<u32>,
    /// `host` and `path_prefix` as one label for metrics and logs (bounded by the config).
    pub label: Arc<str>,
}

/// Routes in match order.
pub struct Routes(Vec<Route>);

impl Routes {
    pub fn new(mut routes: Vec<Route>) -> Routes {
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
        Routes(routes)
    }

    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.0
            .iter()
            .find(|r| r.host.as_deref().is_none_or(|h| Some(h) == host) && path.starts_with(&r.path_prefix))
    }
}
