//! What every route is, declared once where the route is mounted: its path, the name the call's
//! metrics, audit record and trace use, and what it takes to call it. The gRPC services declare
//! their methods next to their handlers (`grpc::ROUTES`, `oip::grpc::ROUTES`, and the health and
//! reflection services below); the HTTP API declares each route where its router mounts it
//! (`rest::router`). The call layer ([`super::call`]) reads nothing else: there is no second table
//! of path strings that must agree with the first.

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

/// Every gRPC route of the gRPC port.
pub fn grpc_routes() -> impl Iterator<Item = &'static Route> {
    super::grpc::ROUTES
        .iter()
        .chain(super::oip::grpc::ROUTES)
        .chain(HEALTH_ROUTES)
        .chain(REFLECTION_ROUTES)
}

/// The declared route of a gRPC request path, or [`UNKNOWN_GRPC`].
pub fn grpc_route(path: &str) -> &'static Route {
    known_grpc_route(path).unwrap_or(&UNKNOWN_GRPC)
}

/// The declared route of a gRPC request path; `None` for a path no service serves (a client's
/// invention, which must not name anything).
pub fn known_grpc_route(path: &str) -> Option<&'static Route> {
    grpc_routes().find(|route| route.path == path)
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
    use prost::Message;

    /// Every method of every service on the gRPC port (by the descriptor sets: brainai.v1, the
    /// Open Inference Protocol, health, both reflections) has exactly one declared route, and no
    /// route names a method that does not exist.
    #[test]
    fn every_grpc_method_is_declared_once() {
        let mut methods = Vec::new();
        for set in [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).expect("a descriptor set");
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        assert!(methods.len() >= 17, "{methods:?}");
        for method in &methods {
            assert_eq!(
                grpc_routes().filter(|r| r.path == *method).count(),
                1,
                "{method} must be declared once"
            );
        }
        for route in grpc_routes() {
            assert!(methods.iter().any(|m| m == route.path), "{}", route.path);
        }
        let mut names: Vec<&str> = grpc_routes().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), grpc_routes().count(), "route names are unique");
    }

    #[test]
    fn an_unknown_path_gets_the_fixed_unknown_route() {
        assert_eq!(grpc_route("/DOE_JANE.Svc/1234567"), &UNKNOWN_GRPC);
        assert_eq!(
            grpc_route("/brainai.v1.TumorClassifier/Classify").name,
            "Classify"
        );
        assert_eq!(grpc_route("/grpc.health.v1.Health/Check").protection, Open);
    }

    #[test]
    fn scopes_of_methods() {
        let scope =
            |path: &str, open_reflection| grpc_route(path).protection.scope(open_reflection);
        assert_eq!(scope("/grpc.health.v1.Health/Check", false), None);
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert_eq!(scope(reflection, false), Some(Read));
        assert_eq!(scope(reflection, true), None);
        assert_eq!(
            scope("/brainai.v1.TumorClassifier/ClassifySeries", false),
            Some(Infer)
        );
        assert_eq!(
            scope("/brainai.v1.TumorClassifier/ClassifyStream", false),
            Some(Infer)
        );
        assert_eq!(
            scope("/brainai.v1.TumorClassifier/ListModels", false),
            Some(Read)
        );
        assert_eq!(
            scope("/inference.GRPCInferenceService/ModelInfer", false),
            Some(Infer)
        );
        assert_eq!(
            scope("/inference.GRPCInferenceService/RepositoryModelLoad", false),
            Some(Admin)
        );
        assert_eq!(
            scope("/inference.GRPCInferenceService/ServerLive", false),
            None
        );
        assert_eq!(scope("/nothing.Here/At", true), Some(Read));
    }

    #[test]
    fn reflection_is_open_only_when_configured() {
        assert_eq!(Reflection.scope(true), None);
        assert_eq!(Reflection.scope(false), Some(Read));
        assert_eq!(Open.scope(false), None);
        assert_eq!(Scope(Infer).scope(true), Some(Infer));
    }
}
