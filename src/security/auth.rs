//! Who may call what. A caller proves its identity with a bearer token (`authorization: Bearer
//! <token>`, gRPC metadata or HTTP header) or, under mutual TLS, with its client certificate.
//! Callers and their scopes come from the callers file (`--auth-callers`); tokens are compared as
//! SHA-256 digests in constant time, against every known token, so neither the time taken nor an
//! error says how close a guess was. Health stays open; reflection too when configured.
//!
//! No credential, or one nobody issued → UNAUTHENTICATED (HTTP 401). A known caller whose scopes
//! do not cover the method → PERMISSION_DENIED (HTTP 403). Tokens never appear in logs, `Debug`
//! output, errors, metrics or the audit trail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::tls::PeerCertificate;

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Classify and infer.
    Infer,
    /// Model metadata, model lists, readiness of one model, reflection (unless open).
    Read,
    /// Loading and unloading models (the Open Inference Protocol's repository extension).
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// A front end, as the audit trail and the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontEnd {
    Grpc,
    Rest,
}

impl FrontEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            FrontEnd::Grpc => "grpc",
            FrontEnd::Rest => "rest",
        }
    }
}

/// A caller as configured (the token only as its digest).
#[derive(Clone)]
struct Caller {
    name: Arc<str>,
    token_sha256: Option<[u8; 32]>,
    certificate_cn: Option<String>,
    scopes: BTreeSet<Scope>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("token", &self.token_sha256.map(|_| "[redacted]"))
            .field("certificate_cn", &self.certificate_cn)
            .field("scopes", &self.scopes)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallersFile {
    #[serde(default, rename = "caller")]
    callers: Vec<CallerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    name: String,
    token: Option<String>,
    certificate_cn: Option<String>,
    #[serde(default = "default_scopes")]
    scopes: Vec<Scope>,
}

fn default_scopes() -> Vec<Scope> {
    vec![Scope::Infer, Scope::Read]
}

/// Tokens shorter than this are refused at load: guessable.
const MIN_TOKEN_LEN: usize = 16;

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Parses a callers file. Errors name the file and the caller, never a token.
fn parse_callers(path: &Path) -> Result<(Vec<Caller>, [u8; 32]), String> {
    let text =
        std::fs::read(path).map_err(|e| format!("--auth-callers {}: {e}", path.display()))?;
    let fingerprint = digest(&text);
    let text = String::from_utf8(text)
        .map_err(|_| format!("--auth-callers {}: not UTF-8", path.display()))?;
    // toml's errors quote the offending line, which could hold a token: report the position only.
    let file: CallersFile = toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| text[..s.start].lines().count().max(1))
            .map_or(String::new(), |line| format!(" at line {line}"));
        format!(
            "--auth-callers {}: not a valid callers file{at} (expected [[caller]] tables with name, token and/or certificate_cn, scopes)",
            path.display()
        )
    })?;
    let mut names = BTreeSet::new();
    let mut callers = Vec::with_capacity(file.callers.len());
    for entry in file.callers {
        let what = format!("--auth-callers {}: caller {:?}", path.display(), entry.name);
        if entry.name.is_empty() || !names.insert(entry.name.clone()) {
            return Err(format!("{what}: names must be non-empty and unique"));
        }
        if entry.token.is_none() && entry.certificate_cn.is_none() {
            return Err(format!("{what}: has neither a token nor a certificate_cn"));
        }
        if let Some(token) = &entry.token
            && (token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace()))
        {
            return Err(format!(
                "{what}: its token must be at least {MIN_TOKEN_LEN} characters without spaces"
            ));
        }
        callers.push(Caller {
            name: entry.name.into(),
            token_sha256: entry.token.as_deref().map(|t| digest(t.as_bytes())),
            certificate_cn: entry.certificate_cn,
            scopes: entry.scopes.into_iter().collect(),
        });
    }
    let mut tokens = BTreeSet::new();
    for caller in &callers {
        if let Some(t) = caller.token_sha256
            && !tokens.insert(t)
        {
            return Err(format!(
                "--auth-callers {}: caller {:?} shares its token with another caller",
                path.display(),
                caller.name
            ));
        }
    }
    Ok((callers, fingerprint))
}

/// Who the server decided a caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No authentication configured.
    Anonymous,
    /// A caller of the callers file, by token.
    Token(Arc<str>),
    /// A client certificate (its subject CN, or the whole subject without one); `caller` names
    /// the callers-file entry it matched.
    Certificate {
        subject: String,
        caller: Option<Arc<str>>,
    },
}

impl Identity {
    /// As the audit trail writes it.
    pub fn describe(&self) -> (&str, &'static str) {
        match self {
            Identity::Anonymous => ("anonymous", "none"),
            Identity::Token(name) => (name, "token"),
            Identity::Certificate {
                caller: Some(name), ..
            } => (name, "certificate"),
            Identity::Certificate { subject, .. } => (subject, "certificate"),
        }
    }
}

/// The outcome of the access check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead (as this identity).
    Allow(Identity),
    /// UNAUTHENTICATED, with the reason (no secret in it).
    Unauthenticated(String),
    /// PERMISSION_DENIED: the identity and the reason.
    Denied(Identity, String),
}

/// The access policy in force (reloadable).
pub struct Access {
    callers_file: Option<PathBuf>,
    callers: RwLock<Arc<(Vec<Caller>, [u8; 32])>>,
    /// Mutual TLS is on: every connection carries a verified client certificate.
    mutual_tls: bool,
    open_reflection: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let callers = self.callers.read().expect("callers lock");
        f.debug_struct("Access")
            .field("callers_file", &self.callers_file)
            .field("callers", &callers.0)
            .field("mutual_tls", &self.mutual_tls)
            .field("open_reflection", &self.open_reflection)
            .finish()
    }
}

impl Access {
    /// The policy: a callers file, mutual TLS, both or neither (then everything is open).
    pub fn new(
        callers_file: Option<PathBuf>,
        mutual_tls: bool,
        open_reflection: bool,
    ) -> Result<Arc<Self>, String> {
        let callers = match &callers_file {
            Some(path) => parse_callers(path)?,
            None => (Vec::new(), [0; 32]),
        };
        Ok(Arc::new(Access {
            callers_file,
            callers: RwLock::new(Arc::new(callers)),
            mutual_tls,
            open_reflection,
        }))
    }

    /// Whether any authentication is configured.
    pub fn enabled(&self) -> bool {
        self.callers_file.is_some() || self.mutual_tls
    }

    pub fn open_reflection(&self) -> bool {
        self.open_reflection
    }

    /// Re-reads the callers file; `Ok(true)` when it changed. A file that does not parse leaves
    /// the previous callers in force.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.callers_file else {
            return Ok(false);
        };
        let text =
            std::fs::read(path).map_err(|e| format!("--auth-callers {}: {e}", path.display()))?;
        if digest(&text) == self.callers.read().expect("callers lock").1 {
            return Ok(false);
        }
        let parsed = parse_callers(path)?;
        *self.callers.write().expect("callers lock") = Arc::new(parsed);
        Ok(true)
    }

    /// Polls the callers file every `every`.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        every: Duration,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.callers_file.as_ref()?;
        let access = self.clone();
        Some(crate::state::spawn_every(every, move || {
            let access = access.clone();
            async move {
                match tokio::task::spawn_blocking(move || access.reload()).await {
                    Ok(Ok(true)) => tracing::info!("callers file changed: reloaded"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "callers file changed but does not load; the previous callers stay in force")
                    }
                    Err(e) => tracing::error!(error = %e, "callers reload task failed"),
                }
            }
        }))
    }

    /// Decides one request: `authorization` is the header's value (if any), `peer` the
    /// connection's verified client certificate (if any), `scope` what the method needs.
    ///
    /// An open method (`scope` `None`) ignores every credential: a browser or a probe that
    /// sends `Authorization: Basic …` (or a token this server never issued) still gets health
    /// and the page. With mutual TLS and no callers file the certificate alone decides, whatever
    /// else the request carries.
    pub fn decide(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<&PeerCertificate>,
        scope: Option<Scope>,
    ) -> Decision {
        if !self.enabled() {
            return Decision::Allow(Identity::Anonymous);
        }
        let certificate = |peer: &PeerCertificate, caller: Option<&Caller>| Identity::Certificate {
            subject: peer
                .common_name
                .clone()
                .unwrap_or_else(|| peer.subject.clone()),
            caller: caller.map(|c| c.name.clone()),
        };
        let Some(scope) = scope else {
            return Decision::Allow(peer.map_or(Identity::Anonymous, |p| certificate(p, None)));
        };
        if self.callers_file.is_none()
            && let Some(peer) = peer
        {
            // Mutual TLS alone: every certificate the client CA signed may call anything.
            return Decision::Allow(certificate(peer, None));
        }
        let callers = self.callers.read().expect("callers lock").clone();
        let (identity, caller) = match (authorization, peer) {
            (Some(header), _) => {
                let token = match credential(header) {
                    Credential::Bearer(token) => token,
                    Credential::OtherScheme(scheme) => {
                        return Decision::Unauthenticated(format!(
                            "the authorization header uses the {scheme} scheme; this server takes \
                             only \"Bearer <token>\""
                        ));
                    }
                    Credential::Malformed => {
                        return Decision::Unauthenticated(
                            "the authorization header is not \"Bearer <token>\"".into(),
                        );
                    }
                };
                let presented = digest(token);
                // Every caller is compared, match or not: the time taken does not depend on
                // which token (if any) matched.
                let mut found: Option<&Caller> = None;
                for caller in &callers.0 {
                    if let Some(known) = &caller.token_sha256 {
                        let equal: bool = known.ct_eq(&presented).into();
                        if equal {
                            found = Some(caller);
                        }
                    }
                }
                match found {
                    Some(caller) => (Identity::Token(caller.name.clone()), Some(caller)),
                    None => {
                        return Decision::Unauthenticated(
                            "the bearer token is not one this server issued".into(),
                        );
                    }
                }
            }
            (None, Some(peer)) => {
                let matched = callers
                    .0
                    .iter()
                    .find(|c| c.certificate_cn.is_some() && c.certificate_cn == peer.common_name);
                match matched {
                    Some(caller) => (certificate(peer, Some(caller)), Some(caller)),
                    None => {
                        return Decision::Denied(
                            certificate(peer, None),
                            "the client certificate is valid but names no caller of the callers file"
                                .into(),
                        );
                    }
                }
            }
            (None, None) => {
                return Decision::Unauthenticated(
                    "this method needs a credential: an \"authorization: Bearer <token>\" header"
                        .into(),
                );
            }
        };
        match caller {
            Some(caller) if caller.scopes.contains(&scope) => Decision::Allow(identity),
            _ => Decision::Denied(
                identity,
                format!(
                    "this caller lacks the {:?} scope this method needs",
                    scope.as_str()
                ),
            ),
        }
    }
}

/// What an `authorization` header holds.
enum Credential<'a> {
    /// `Bearer <token>` (scheme case-insensitive).
    Bearer(&'a [u8]),
    /// Another scheme (`Basic`, `Digest`, …), named as RFC 9110 spells a scheme: a token of at
    /// most 32 characters, so the name can be quoted back.
    OtherScheme(&'a str),
    /// Neither: no scheme, an empty token, or bytes that are no scheme name.
    Malformed,
}

fn credential(header: &[u8]) -> Credential<'_> {
    let header = header.trim_ascii();
    let (scheme, rest) = match header.iter().position(|&b| b == b' ') {
        Some(space) => (&header[..space], header[space..].trim_ascii()),
        None => (header, &header[header.len()..]),
    };
    if scheme.eq_ignore_ascii_case(b"bearer") {
        return if rest.is_empty() {
            Credential::Malformed
        } else {
            Credential::Bearer(rest)
        };
    }
    let is_name = !scheme.is_empty()
        && scheme.len() <= 32
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b));
    match std::str::from_utf8(scheme) {
        Ok(name) if is_name && !rest.is_empty() => Credential::OtherScheme(name),
        _ => Credential::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACS: &str = "pacs-token-0123456789abcdef";
    const VIEWER: &str = "viewer-token-0123456789abcdef";

    fn access(mutual: bool) -> (Arc<Access>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers.toml");
        std::fs::write(
            &path,
            format!(
                r#"
[[caller]]
name = "pacs"
token = "{PACS}"
[[caller]]
name = "viewer"
token = "{VIEWER}"
scopes = ["read"]
[[caller]]
name = "router"
certificate_cn = "router.hospital.example"
scopes = ["infer"]
"#
            ),
        )
        .unwrap();
        (Access::new(Some(path), mutual, false).unwrap(), dir)
    }

    fn header(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn tokens_scopes_and_certificates() {
        let (access, _dir) = access(true);
        let infer = Some(Scope::Infer);
        assert_eq!(
            access.decide(Some(&header(PACS)), None, infer),
            Decision::Allow(Identity::Token("pacs".into()))
        );
        assert!(matches!(
            access.decide(Some(&header(VIEWER)), None, infer),
            Decision::Denied(Identity::Token(name), _) if &*name == "viewer"
        ));
        assert!(matches!(
            access.decide(Some(&header("wrong-token-0123456789")), None, infer),
            Decision::Unauthenticated(_)
        ));
        assert!(matches!(
            access.decide(Some(b"Basic abc"), None, infer),
            Decision::Unauthenticated(_)
        ));
        assert!(matches!(
            access.decide(None, None, infer),
            Decision::Unauthenticated(_)
        ));
        // Open methods need nothing.
        assert_eq!(
            access.decide(None, None, None),
            Decision::Allow(Identity::Anonymous)
        );
        let router = PeerCertificate {
            subject: "CN=router.hospital.example".into(),
            common_name: Some("router.hospital.example".into()),
        };
        assert!(matches!(
            access.decide(None, Some(&router), infer),
            Decision::Allow(Identity::Certificate { caller: Some(name), .. }) if &*name == "router"
        ));
        assert!(matches!(
            access.decide(None, Some(&router), Some(Scope::Read)),
            Decision::Denied(..)
        ));
        let stranger = PeerCertificate {
            subject: "CN=stranger".into(),
            common_name: Some("stranger".into()),
        };
        assert!(matches!(
            access.decide(None, Some(&stranger), infer),
            Decision::Denied(..)
        ));
    }

    #[test]
    fn open_methods_ignore_credentials_they_do_not_need() {
        let (access, _dir) = access(true);
        let router = PeerCertificate {
            subject: "CN=router.hospital.example".into(),
            common_name: Some("router.hospital.example".into()),
        };
        // A browser's Basic credentials, a token nobody issued, a header that is no credential:
        // health and the page answer all the same.
        for header in [
            &b"Basic dXNlcjpwYXNzd29yZA=="[..],
            &header("wrong-token-0123456789"),
            b"Bearer",
            b"\xff\xfe",
        ] {
            assert_eq!(
                access.decide(Some(header), None, None),
                Decision::Allow(Identity::Anonymous),
                "{:?}",
                String::from_utf8_lossy(header)
            );
            assert!(matches!(
                access.decide(Some(header), Some(&router), None),
                Decision::Allow(Identity::Certificate { .. })
            ));
        }
    }

    #[test]
    fn another_scheme_on_a_protected_method_is_named_in_the_refusal() {
        let (access, _dir) = access(false);
        let Decision::Unauthenticated(reason) =
            access.decide(Some(b"Basic dXNlcjpwYXNzd29yZA=="), None, Some(Scope::Read))
        else {
            panic!("Basic must not pass");
        };
        assert!(
            reason.contains("Basic scheme") && reason.contains("Bearer <token>"),
            "{reason}"
        );
        assert!(!reason.contains("dXNlcjpwYXNzd29yZA"), "{reason}");
        // Not a scheme name (too long, or bytes that are none): not quoted back.
        let long = format!("{} x", "S".repeat(200));
        for header in [long.as_bytes(), b"Bearer", b"\xff\xfe abc", b"   "] {
            let Decision::Unauthenticated(reason) =
                access.decide(Some(header), None, Some(Scope::Read))
            else {
                panic!("{header:?} must not pass");
            };
            assert!(reason.len() <= 80 && !reason.contains("SSS"), "{reason}");
        }
        // The scheme is case-insensitive.
        assert_eq!(
            access.decide(
                Some(format!("bEaReR {PACS}").as_bytes()),
                None,
                Some(Scope::Infer)
            ),
            Decision::Allow(Identity::Token("pacs".into()))
        );
    }

    #[test]
    fn mutual_tls_alone_lets_a_certificate_call_everything_whatever_else_comes() {
        let access = Access::new(None, true, false).unwrap();
        let client = PeerCertificate {
            subject: "CN=viewer,O=Hospital".into(),
            common_name: Some("viewer".into()),
        };
        let allowed = Decision::Allow(Identity::Certificate {
            subject: "viewer".into(),
            caller: None,
        });
        for header in [
            None,
            Some(header("any-bearer-0123456789")),
            Some(b"Basic dXNlcjpwYXNzd29yZA==".to_vec()),
        ] {
            for scope in [Scope::Infer, Scope::Read, Scope::Admin] {
                assert_eq!(
                    access.decide(header.as_deref(), Some(&client), Some(scope)),
                    allowed,
                    "{header:?} {scope:?}"
                );
            }
        }
    }

    #[test]
    fn no_secret_in_debug_or_errors() {
        let (access, dir) = access(false);
        let debug = format!("{access:?}");
        assert!(!debug.contains(PACS) && !debug.contains(VIEWER), "{debug}");
        assert!(debug.contains("[redacted]"));
        for decision in [
            access.decide(
                Some(&header("wrong-token-0123456789")),
                None,
                Some(Scope::Infer),
            ),
            access.decide(Some(&header(VIEWER)), None, Some(Scope::Infer)),
        ] {
            let text = format!("{decision:?}");
            assert!(
                !text.contains("wrong-token") && !text.contains(VIEWER),
                "{text}"
            );
        }
        // A malformed file's error says where, not what.
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[[caller]]\nname = \"x\"\ntoken = \"secret-secret-secret\" junk\n",
        )
        .unwrap();
        let e = Access::new(Some(path), false, false).unwrap_err();
        assert!(!e.contains("secret-secret"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn short_or_shared_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[[caller]]\nname = \"a\"\ntoken = \"short\"\n").unwrap();
        assert!(
            Access::new(Some(path.clone()), false, false)
                .unwrap_err()
                .contains("at least 16")
        );
        std::fs::write(
            &path,
            format!("[[caller]]\nname = \"a\"\ntoken = \"{PACS}\"\n[[caller]]\nname = \"b\"\ntoken = \"{PACS}\"\n"),
        )
        .unwrap();
        assert!(
            Access::new(Some(path), false, false)
                .unwrap_err()
                .contains("shares")
        );
    }
}
