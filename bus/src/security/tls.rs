//! Server-side mutual TLS: configuration, handshakes, the peer's participant id.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Error, Result};

/// `[tls]` in the server config: with it the server requires client certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM, PKCS#8 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// A client that has not finished its handshake after this long is dropped.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Tls(format!("reading certificates from {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

/// The rustls server configuration: the server's identity, client certificates required and
/// verified against `client_ca` (chain, validity period, key usage), HTTP/2 only.
pub fn server_config(settings: &TlsSettings) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&settings.client_ca)? {
        roots.add(ca).map_err(|e| Error::Tls(format!("client CA {}: {e}", settings.client_ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Tls(format!("client certificate verifier: {e}")))?;
    let chain = read_certs(&settings.cert)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key)
        .map_err(|e| Error::Tls(format!("reading the private key {}: {e}", settings.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(format!("server certificate {}: {e}", settings.cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts connections on `listener` and yields those whose TLS handshake succeeded. Each
/// handshake runs in its own task, so a slow or hostile client holds up no one; a refused one
/// is logged with the peer address and rustls' reason. Ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    handshake_timeout: Duration,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    // Established connections on their way to tonic; closed when tonic stops serving.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    // A connection closed before saying anything is a port probe, not a refusal.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "connection closed before the TLS handshake")
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, reason = %e, "TLS connection refused"),
                    Err(_) => tracing::warn!(%peer, reason = "handshake timed out", "TLS connection refused"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The participant id a client certificate names: its subject's common name.
pub fn participant_id(cert: &CertificateDer<'_>) -> Result<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::Unauthenticated(format!("unreadable client certificate: {e}")))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| Error::Unauthenticated("the client certificate has no common name (the participant id)".into()))?;
    Ok(cn.to_string())
}
