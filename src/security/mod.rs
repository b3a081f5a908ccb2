//! Transport security and access, one mechanism for every front end: [`tls`] (TLS and mutual TLS
//! on the gRPC and HTTP API listeners, reloaded when the files change), [`auth`] (bearer tokens
//! and client certificates, scopes per method) and [`audit`] (one JSON line per call); the call
//! layer (`api::call`) applies them to every route of the gRPC port and the HTTP API alike.
//! The metrics port and the optional health-only port stay plaintext: they carry no patient data
//! and Kubernetes' probes cannot speak TLS to a gRPC port.

pub mod audit;
pub mod auth;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

/// The security flags of `brainai serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct SecurityArgs {
    /// TLS certificate chain (PEM: the server certificate, then intermediates) for the gRPC and
    /// HTTP API ports. With --tls-key; re-read when the file changes.
    #[arg(long, env = "BRAINAI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "BRAINAI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: clients must present a certificate that chains to a CA of this PEM file.
    #[arg(long, env = "BRAINAI_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Check the TLS files and the callers file for changes every N seconds (new connections get
    /// the new certificate; open ones keep theirs).
    #[arg(long, env = "BRAINAI_CREDENTIALS_RELOAD_S", default_value_t = 30)]
    pub credentials_reload_s: u64,

    /// Callers file (TOML): `[[caller]]` tables with `name`, a bearer `token` and/or a client
    /// `certificate_cn`, and `scopes` (infer, read, admin; default infer and read). Set: every
    /// method but health needs a credential.
    #[arg(long, env = "BRAINAI_AUTH_CALLERS")]
    pub auth_callers: Option<PathBuf>,

    /// Leave gRPC reflection open to callers without credentials (grpcurl, ghz without a proto).
    #[arg(long, env = "BRAINAI_AUTH_OPEN_REFLECTION", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub auth_open_reflection: bool,

    /// Audit trail: a file to append one JSON line per call to, or `-` for standard output.
    #[arg(long, env = "BRAINAI_AUDIT_LOG")]
    pub audit_log: Option<String>,

    /// Origins (`https://viewer.example:8443`) besides the server's own whose web pages may call
    /// the HTTP API from a browser (comma-separated). Browser requests from any other site are
    /// refused 403 (cross-site request forgery); clients that are not browsers are not affected.
    #[arg(long, env = "BRAINAI_HTTP_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub http_allowed_origins: Vec<String>,

    /// Refuse calls (UNAVAILABLE) while audit records cannot be written, instead of serving on
    /// and counting the failures.
    #[arg(long, env = "BRAINAI_AUDIT_FAIL_CLOSED", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub audit_fail_closed: bool,

    /// Plaintext gRPC health-only listener (grpc.health.v1 and nothing else), for Kubernetes'
    /// native gRPC probes, which cannot speak TLS.
    #[arg(long, env = "BRAINAI_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
}

/// The `reason` of `brainai_insecure_config`: bearer tokens accepted on plaintext ports.
pub const TOKENS_WITHOUT_TLS: &str = "tokens_without_tls";

/// What the transport knows about a connection, attached to each of its requests.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The verified client certificate (mutual TLS).
    pub certificate: Option<Arc<tls::PeerCertificate>>,
}

/// Everything the security flags set up.
pub struct Security {
    pub tls: Option<Arc<tls::Tls>>,
    pub access: Arc<auth::Access>,
    pub audit: Option<Arc<audit::Audit>>,
}

impl Security {
    /// Loads the TLS files and the callers file and opens the audit trail; errors name the flag
    /// and the file. Installs the metrics recorder first: what loading learns (the certificate's
    /// expiry, an insecure configuration) is exported from the start, not from the first reload.
    pub fn load(args: &SecurityArgs) -> Result<Self, String> {
        crate::metrics::install();
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(tls::Tls::load(tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            })?),
            (None, None) if args.tls_client_ca.is_some() => {
                return Err("--tls-client-ca needs --tls-cert and --tls-key".into());
            }
            (None, None) => None,
            _ => return Err("--tls-cert and --tls-key go together".into()),
        };
        if args.credentials_reload_s == 0 {
            return Err("--credentials-reload-s must be at least 1".into());
        }
        // Tokens are the only credential a plaintext port can carry, and anyone on the network
        // path can read and replay them. Allowed (TLS may end in front of the server, at a mesh
        // sidecar), but never silently.
        let plaintext_tokens = args.auth_callers.is_some() && tls.is_none();
        crate::metrics::insecure_config(TOKENS_WITHOUT_TLS, plaintext_tokens);
        if plaintext_tokens {
            tracing::warn!(
                "--auth-callers without --tls-cert: bearer tokens cross the network in plaintext, \
                 where anyone on the path can read and replay them; serve TLS (--tls-cert, \
                 --tls-key) unless a proxy in front of this server terminates it"
            );
        }
        let mutual = tls.as_ref().is_some_and(|t| t.mutual());
        let access =
            auth::Access::new(args.auth_callers.clone(), mutual, args.auth_open_reflection)?;
        let audit = match args.audit_log.as_deref() {
            None => None,
            Some("-") => Some(audit::Audit::open(
                audit::Target::Stdout,
                args.audit_fail_closed,
            )?),
            Some(path) => Some(audit::Audit::open(
                audit::Target::File(path.into()),
                args.audit_fail_closed,
            )?),
        };
        Ok(Security { tls, access, audit })
    }
}
