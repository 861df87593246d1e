//! The adapters' side of the gRPC API: connecting, topics, blobs.

use justizbus_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// Chunk size of blob uploads.
const CHUNK: usize = 64 * 1024;

/// Connects to a bus (`http://host:port`).
pub async fn connect(server: &str) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(server.to_string())
        .map_err(|e| anyhow::anyhow!("invalid server URL {server:?}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    Ok(endpoint.connect_lazy())
}

/// Creates `topic` unless it exists.
pub async fn ensure_topic(channel: &Channel, topic: &str, partitions: u32) -> Result<(), tonic::Status> {
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
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
