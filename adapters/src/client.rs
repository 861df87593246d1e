//! The adapters' side of the gRPC API: connecting, topics, blobs.

use justizbus_proto::v1 as pb;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::coalesce::CoalescingConnector;

/// Chunk size of blob uploads.
const CHUNK: usize = 64 * 1024;

/// The client side of mutual TLS. With `--tls-ca` the connection is TLS (`https://`); the
/// certificate and key identify the participant to a server that requires client certificates.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientTls {
    /// CA certificate (PEM) the server's certificate must chain to; turns TLS on.
    #[arg(long, env = "JUSTIZBUS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM); its common name is the participant id.
    #[arg(long, env = "JUSTIZBUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "JUSTIZBUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// The endpoint of a bus: `host:port` or a URL, whose scheme follows the TLS settings. Private:
/// channels connect through [`CoalescingConnector`], which `Endpoint::connect` would bypass.
fn endpoint(server: &str, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    let scheme = if tls.tls_ca.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", server.split_once("://").map_or(server, |(_, rest)| rest));
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("invalid server URL {server:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(ca) = &tls.tls_ca {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&tls.tls_cert, &tls.tls_key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(config).with_context(|| format!("TLS settings for {url}"))?;
    }
    Ok(endpoint)
}

/// How long a connection attempt may take (tonic applies it around the connector).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to a bus that connects on first use (and reconnects after failures).
pub fn connect(server: &str, tls: &ClientTls) -> anyhow::Result<Channel> {
    Ok(endpoint(server, tls)?.connect_with_connector_lazy(CoalescingConnector::default()))
}

/// A channel to a bus, connected now.
pub async fn connect_now(server: &str, tls: &ClientTls) -> anyhow::Result<Channel> {
    let endpoint = endpoint(server, tls)?;
    let url = endpoint.uri().to_string();
    endpoint.connect_with_connector(CoalescingConnector::default()).await.with_context(|| format!("cannot connect to {url}"))
}

/// Creates `topic` unless it exists. Looks first, so a participant without the admin role
/// (which creating needs under mTLS) can use a topic the operator or the router made.
pub async fn ensure_topic(channel: &Channel, topic: &str, partitions: u32) -> Result<(), tonic::Status> {
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    match admin.describe_topic(pb::DescribeTopicRequest { topic: topic.into() }).await {
        Ok(_) => return Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(s),
    }
    match admin.create_topic(pb::CreateTopicRequest { topic: topic.into(), partitions, ..Default::default() }).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => Err(s),
    }
}

/// Uploads `content` as a blob (the server checks the hash we computed).
pub async fn upload(channel: &Channel, name: &str, media_type: &str, content: Vec<u8>) -> Result<pb::Attachment, tonic::Status> {
    let sha256: String = Sha256::digest(&content).iter().map(|b| format!("{b:02x}")).collect();
    let mut blobs = pb::blobs_client::BlobsClient::new(channel.clone());
    // Stored already (a retry after a crash): nothing to send.
    if let Ok(found) = blobs.stat(pb::DownloadRequest { sha256: sha256.clone() }).await {
        if found.get_ref().size == content.len() as u64 {
            return Ok(pb::Attachment { sha256, size: content.len() as u64, name: name.into(), media_type: media_type.into() });
        }
    }
    let header = pb::UploadRequest {
        part: Some(pb::upload_request::Part::Header(pb::UploadHeader {
            name: name.into(),
            media_type: media_type.into(),
            sha256,
            size: content.len() as u64,
        })),
    };
    let chunks: Vec<pb::UploadRequest> =
        content.chunks(CHUNK).map(|c| pb::UploadRequest { part: Some(pb::upload_request::Part::Chunk(c.to_vec())) }).collect();
    let stream = tokio_stream::iter(std::iter::once(header).chain(chunks));
    Ok(blobs.upload(stream).await?.into_inner())
}

/// Downloads a blob and checks its SHA-256 and size.
pub async fn download(channel: &Channel, attachment: &pb::Attachment) -> anyhow::Result<Vec<u8>> {
    let mut blobs = pb::blobs_client::BlobsClient::new(channel.clone());
    let mut stream = blobs.download(pb::DownloadRequest { sha256: attachment.sha256.clone() }).await?.into_inner();
    let mut out = Vec::with_capacity(attachment.size as usize);
    while let Some(chunk) = stream.message().await? {
        out.extend_from_slice(&chunk.chunk);
    }
    let actual: String = Sha256::digest(&out).iter().map(|b| format!("{b:02x}")).collect();
    anyhow::ensure!(actual == attachment.sha256, "blob {} arrived with SHA-256 {actual}", attachment.sha256);
    anyhow::ensure!(out.len() as u64 == attachment.size, "blob {} has {} bytes, not {}", attachment.sha256, out.len(), attachment.size);
    Ok(out)
}

/// A media type from a file name's extension.
pub fn media_type(name: &str) -> &'static str {
    match name.rsplit('.').next().map(str::to_ascii_lowercase).as_deref() {
        Some("xml") => "application/xml",
        Some("pdf") => "application/pdf",
        Some("txt") => "text/plain",
        Some("p7s") | Some("pkcs7") => "application/pkcs7-signature",
        Some("tif") | Some("tiff") => "image/tiff",
        Some("jpg") | Some("jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("zip") => "application/zip",
        _ => "application/octet-stream",
    }
}
