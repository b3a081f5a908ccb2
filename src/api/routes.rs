//! What every route is, declared once where the route is mounted: its path, the name the call's
//! metrics, audit record and trace use, and what it takes to call it. The gRPC services declare
//! their methods next to their handlers (`grpc::ROUTES`, `oip::grpc::ROUTES`, and the health and
//! reflection services below), and the server composes the gRPC port's [`GrpcRoutes`] where it
//! mounts those services (`server::GRPC_ROUTES`); the HTTP API declares each route where its
//! router mounts it (`rest::router`). The call layer ([`super::call`]) and the trace layer read
//! nothing else: there is no second table of path strings that must agree with the first. This
//! module imports no front end.

use crate::security::auth::Scope;

/// What it takes to call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Anyone (health, the upload page): no credential needed, none refused, no audit record.
    Open,
    /// A caller whose scopes include this one.
    Scope(Scope),
    /// Server reflection: the `read` scope, or open with `--open-reflection`.
    Reflection,
}

impl Protection {
    /// The scope a call needs; `None`: open.
    pub fn scope(self, open_reflection: bool) -> Option<Scope> {
        match self {
            Protection::Open => None,
            Protection::Scope(scope) => Some(scope),
            Protection::Reflection if open_reflection => None,
            Protection::Reflection => Some(Scope::Read),
        }
    }
}

/// One route.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    /// gRPC: `/package.Service/Method`; HTTP: the route's path template (`/v2/models/{model}`).
    pub path: &'static str,
    /// The `rpc` label of the call's metrics and the name of its trace span: `Classify`,
    /// `v1.classify`, … — a fixed set, never caller text.
    pub name: &'static str,
    pub protection: Protection,
}

impl Route {
    pub const fn new(path: &'static str, name: &'static str, protection: Protection) -> Self {
        Route {
            path,
            name,
            protection,
        }
    }

    /// The gRPC service and method of a gRPC route (`brainai.v1.TumorClassifier`, `Classify`).
    pub fn grpc_parts(&self) -> (&'static str, &'static str) {
        self.path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""))
    }
}

use Protection::*;
use Scope::*;

/// The gRPC health service (`grpc.health.v1.Health`): open, for probes and load balancers.
pub const HEALTH_ROUTES: &[Route] = &[
    Route::new("/grpc.health.v1.Health/Check", "health.Check", Open),
    Route::new("/grpc.health.v1.Health/Watch", "health.Watch", Open),
];

/// Server reflection, both versions grpcurl and friends use.
pub const REFLECTION_ROUTES: &[Route] = &[
    Route::new(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "reflection.v1",
        Reflection,
    ),
    Route::new(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "reflection.v1alpha",
        Reflection,
    ),
];

/// A gRPC path no service declares: it needs the `read` scope (an unauthenticated caller learns
/// nothing about which services exist), then tonic answers UNIMPLEMENTED. Its name is fixed, so a
/// caller cannot choose what metrics, audit records or traces call it.
pub const UNKNOWN_GRPC: Route = Route::new("(unknown)", "unknown", Scope(Read));

/// An HTTP API path no route matches.
pub const UNMATCHED_HTTP: Route = Route::new("(unmatched)", "unmatched", Scope(Read));

/// The routes of the gRPC port: the tables of the services mounted on it.
#[derive(Debug, Clone, Copy)]
pub struct GrpcRoutes(&'static [&'static [Route]]);

impl GrpcRoutes {
    pub const fn new(tables: &'static [&'static [Route]]) -> Self {
        GrpcRoutes(tables)
    }

    /// Every route, table by table.
    pub fn iter(self) -> impl Iterator<Item = &'static Route> {
        self.0.iter().flat_map(|table| table.iter())
    }

    /// The declared route of a gRPC request path, or [`UNKNOWN_GRPC`].
    pub fn route(self, path: &str) -> &'static Route {
        self.known(path).unwrap_or(&UNKNOWN_GRPC)
    }

    /// The declared route of a gRPC request path; `None` for a path no service serves (a
    /// client's invention, which must not name anything).
    pub fn known(self, path: &str) -> Option<&'static Route> {
        self.iter().find(|route| route.path == path)
    }
}

/// An HTTP method as a static name (`_OTHER` for an extension method, which is caller text).
pub fn http_verb(method: &hyper::Method) -> &'static str {
    match *method {
        hyper::Method::GET => "GET",
        hyper::Method::POST => "POST",
        hyper::Method::PUT => "PUT",
        hyper::Method::DELETE => "DELETE",
        hyper::Method::HEAD => "HEAD",
        hyper::Method::OPTIONS => "OPTIONS",
        hyper::Method::PATCH => "PATCH",
        hyper::Method::CONNECT => "CONNECT",
        hyper::Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: GrpcRoutes = GrpcRoutes::new(&[HEALTH_ROUTES, REFLECTION_ROUTES]);

    #[test]
    fn an_unknown_path_gets_the_fixed_unknown_route() {
        assert_eq!(ROUTES.route("/DOE_JANE.Svc/1234567"), &UNKNOWN_GRPC);
        assert_eq!(ROUTES.known("/DOE_JANE.Svc/1234567"), None);
        assert_eq!(
            ROUTES.route("/grpc.health.v1.Health/Check").protection,
            Open
        );
        assert_eq!(
            ROUTES.iter().count(),
            HEALTH_ROUTES.len() + REFLECTION_ROUTES.len()
        );
    }

    #[test]
    fn reflection_is_open_only_when_configured() {
        assert_eq!(Reflection.scope(true), None);
        assert_eq!(Reflection.scope(false), Some(Read));
        assert_eq!(Open.scope(false), None);
        assert_eq!(Scope(Infer).scope(true), Some(Infer));
    }
}
