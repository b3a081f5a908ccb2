//! TLS for the gRPC and HTTP API listeners (rustls, ring provider), optionally mutual: with a
//! client CA, every client must present a certificate that chains to it, is within its validity
//! period and is meant for client authentication (WebPKI rules).
//!
//! The certificate, key and client CA are re-read when their files change (cert-manager writes
//! a renewed Secret into the mounted volume). A new configuration applies to new connections;
//! connections already open keep theirs, so no call in flight is dropped. Files that do not
//! load (a half-written key, a certificate that does not match the key, an expired certificate)
//! leave the last good configuration in force, with an error in the log and in
//! `brainai_tls_reloads_total`; at start they stop the server. The serving certificate's notAfter
//! is exported from the start (`brainai_tls_certificate_expiry_timestamp_seconds`), so an expiry
//! alert fires even when no renewal ever arrives.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::metrics;

/// Where the server's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM: the server certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CA(s) client certificates must chain to (mutual TLS); `None`: no client
    /// certificates asked for.
    pub client_ca: Option<PathBuf>,
}

/// Which application protocol a listener speaks (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: HTTP/2 only.
    H2,
    /// The HTTP API: HTTP/1.1 only.
    Http1,
}

/// One loaded configuration, for both listeners.
struct Loaded {
    /// SHA-256 over the files' bytes: unchanged files are not parsed again.
    fingerprint: [u8; 32],
    h2: Arc<ServerConfig>,
    http1: Arc<ServerConfig>,
    /// The DICOM listener's: no ALPN (DICOM TLS negotiates none).
    dicom: Arc<ServerConfig>,
}

/// The server's TLS configuration, reloadable.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths only: never key material.
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// The identity a client certificate proves (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject, RFC 4514 style (`CN=pacs-router,O=Hospital`).
    pub subject: String,
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let loaded = build(&files)?;
        Ok(Arc::new(Tls {
            files,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        let loaded = self.current.read().expect("tls lock").clone();
        TlsAcceptor::from(match alpn {
            Alpn::H2 => loaded.h2.clone(),
            Alpn::Http1 => loaded.http1.clone(),
        })
    }

    /// The DICOM listener's configuration in force now (the same certificate and client CA).
    pub fn dicom_config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").dicom.clone()
    }

    /// A client configuration for connections this server opens (the DICOM node's deliveries):
    /// trusts the CAs of `ca` and presents this server's certificate.
    pub fn client_config(&self, ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
        client_config(ca, Some(&self.files))
    }

    /// Re-reads the files; `Ok(true)` when they changed and the new configuration is in force,
    /// `Ok(false)` when unchanged, `Err` (the old configuration stays) when they do not load.
    pub fn reload(&self) -> Result<bool, String> {
        let fingerprint = fingerprint(&self.files)?;
        if fingerprint == self.current.read().expect("tls lock").fingerprint {
            return Ok(false);
        }
        let loaded = build(&self.files)?;
        *self.current.write().expect("tls lock") = Arc::new(loaded);
        Ok(true)
    }

    /// Polls the files every `every` and reloads them when they change.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        crate::state::spawn_every(every, move || {
            let tls = tls.clone();
            async move {
                let result = tokio::task::spawn_blocking(move || tls.reload())
                    .await
                    .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
                match result {
                    Ok(false) => {}
                    Ok(true) => {
                        metrics::tls_reloaded("ok");
                        tracing::info!(
                            "TLS certificate, key or client CA changed: reloaded; new connections use them"
                        );
                    }
                    Err(e) => {
                        metrics::tls_reloaded("error");
                        tracing::error!(error = %e, "TLS files changed but do not load; the previous certificate stays in force");
                    }
                }
            }
        })
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn fingerprint(files: &TlsFiles) -> Result<[u8; 32], String> {
    let mut hash = Sha256::new();
    for (path, what) in [
        (Some(&files.cert), "--tls-cert"),
        (Some(&files.key), "--tls-key"),
        (files.client_ca.as_ref(), "--tls-client-ca"),
    ] {
        if let Some(path) = path {
            let bytes = read(path, what)?;
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(&bytes);
        }
    }
    Ok(hash.finalize().into())
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Loaded, String> {
    let fingerprint = fingerprint(files)?;
    let chain = certificates(&files.cert, "--tls-cert")?;
    let key_pem = read(&files.key, "--tls-key")?;
    // The parser's error could quote the file: say only what is wrong.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        format!(
            "--tls-key {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "--tls-client-ca")? {
                roots.add(cert).map_err(|e| {
                    format!("--tls-client-ca {}: not a usable CA: {e}", ca.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let not_after = not_after(&chain[0]);
    if let Some(expiry) = not_after {
        refuse_expired(&files.cert, expiry, now_unix())?;
    }
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "--tls-cert {} and --tls-key {}: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    let with_alpn = |protocol: &[u8]| {
        let mut c = config.clone();
        c.alpn_protocols = vec![protocol.to_vec()];
        Arc::new(c)
    };
    if let Some(not_after) = not_after {
        metrics::tls_certificate_expiry(not_after);
    }
    Ok(Loaded {
        fingerprint,
        h2: with_alpn(b"h2"),
        http1: with_alpn(b"http/1.1"),
        dicom: Arc::new(config),
    })
}

/// A client configuration trusting the CAs of `ca`; presenting `identity`'s certificate if given.
pub fn client_config(
    ca: &Path,
    identity: Option<&TlsFiles>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca, "--dicom-destination-ca")? {
        roots.add(cert).map_err(|e| {
            format!(
                "--dicom-destination-ca {}: not a usable CA: {e}",
                ca.display()
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = certificates(&files.cert, "--tls-cert")?;
            let key = PrivateKeyDer::from_pem_slice(&read(&files.key, "--tls-key")?)
                .map_err(|_| format!("--tls-key {}: no PEM private key", files.key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--tls-cert as a client certificate: {e}"))?
        }
    };
    Ok(Arc::new(config))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// An expired server certificate is an error naming the file and the date: every client would
/// refuse it, so a server that served it would look ready and answer nobody.
fn refuse_expired(cert: &Path, not_after: i64, now: i64) -> Result<(), String> {
    if not_after >= now {
        return Ok(());
    }
    Err(format!(
        "--tls-cert {}: the certificate expired on {}; renew it",
        cert.display(),
        crate::security::audit::rfc3339_utc(not_after.saturating_mul(1000))
    ))
}

/// The certificate's notAfter, in seconds since the Unix epoch.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The subject of a verified client certificate.
pub fn peer_certificate(cert: &CertificateDer<'_>) -> Option<PeerCertificate> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Some(PeerCertificate {
        subject: subject.to_string(),
        common_name,
    })
}

/// A connection: plain TCP or TLS over TCP.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    /// The verified client certificate's identity (mutual TLS only).
    pub fn peer_certificate(&self) -> Option<PeerCertificate> {
        match self {
            Io::Plain(_) => None,
            Io::Tls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(peer_certificate),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

/// Writes are never vectored: h2 then copies small DATA payloads into its write buffer, so a
/// unary response of a few hundred bytes (HEADERS, DATA, trailers) leaves in one write (measured
/// with `ModelInfer`: 3.5 write syscalls per call with vectored writes, 2.6 without).
impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// Completes the TLS handshake of a new connection, within `timeout`; `None` (counted, logged at
/// debug) when it fails: a plaintext client, an unknown CA, an expired certificate, no ALPN in
/// common.
pub async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
    listener: &'static str,
) -> Option<Io> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(Io::Tls(Box::new(tls))),
        Ok(Err(e)) => {
            metrics::tls_handshake_failed(listener, "error");
            tracing::debug!(listener, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::tls_handshake_failed(listener, "timeout");
            tracing::debug!(listener, "TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed server certificate for localhost valid until `not_after` (y, m, d), written
    /// as PEM files into `dir`.
    fn files(dir: &Path, not_after: (i32, u8, u8)) -> TlsFiles {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2019, 6, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: None,
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn an_expired_certificate_is_refused_naming_the_file_and_the_date() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), (2020, 3, 1));
        let e = Tls::load(files.clone()).unwrap_err();
        assert!(
            e.contains(&files.cert.display().to_string())
                && e.contains("expired on 2020-03-01T00:00:00.000Z"),
            "{e}"
        );
        // The boundary: valid through its notAfter second.
        assert!(refuse_expired(&files.cert, 1_000, 1_000).is_ok());
        assert!(refuse_expired(&files.cert, 999, 1_000).is_err());
    }

    #[test]
    fn a_renewal_to_an_expired_certificate_keeps_the_one_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let good = files(dir.path(), (2099, 12, 31));
        let tls = Tls::load(good.clone()).unwrap();
        let before = tls.current.read().unwrap().fingerprint;
        files(dir.path(), (2020, 3, 1));
        let e = tls.reload().unwrap_err();
        assert!(e.contains("expired on 2020-03-01"), "{e}");
        assert_eq!(tls.current.read().unwrap().fingerprint, before);
    }
}
