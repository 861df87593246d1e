//! `Blobs`: streamed upload and download of content-addressed documents.

use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;

use justizbus_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Bus;
use crate::blob::{BlobInfo, CHUNK};
use crate::security::auth::Caller;
use crate::{Error, Result};

/// The `Blobs` service.
pub struct BlobsService {
    bus: Arc<Bus>,
}

impl BlobsService {
    /// A service over the bus.
    pub fn new(bus: Arc<Bus>) -> Self {
        BlobsService { bus }
    }
}

fn attachment(info: BlobInfo, name: String, media_type: String) -> pb::Attachment {
    pb::Attachment { sha256: info.sha256, size: info.size, name, media_type }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blob task: {e}")))?
}

#[tonic::async_trait]
impl pb::blobs_server::Blobs for BlobsService {
    async fn upload(&self, request: Request<Streaming<pb::UploadRequest>>) -> std::result::Result<Response<pb::Attachment>, Status> {
        let caller = self.bus.gate.caller(&request, "Blobs.Upload")?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UploadRequest { part: Some(pb::upload_request::Part::Header(h)) })) => h,
            Some(Ok(_)) => return Err(Error::invalid("header", "the first message of an upload must be its header").into()),
            Some(Err(status)) => return Err(status),
            None => return Err(Error::invalid("header", "the upload is empty").into()),
        };
        if !header.sha256.is_empty() && !crate::blob::is_sha256_hex(&header.sha256) {
            return Err(Error::invalid("header.sha256", "must be empty or 64 lower-case hex digits").into());
        }
        if header.size > self.bus.blobs.max_bytes() {
            return Err(Error::BlobTooLarge { limit: self.bus.blobs.max_bytes() }.into());
        }
        let store = self.bus.blobs.clone();
        let mut upload = Some(blocking(move || store.begin()).await?);
        while let Some(message) = stream.next().await {
            let chunk = match message?.part {
                Some(pb::upload_request::Part::Chunk(c)) => c,
                _ => return Err(Error::invalid("header", "an upload has exactly one header, first").into()),
            };
            let mut up = upload.take().ok_or_else(|| Status::internal("upload lost"))?;
            up = blocking(move || up.write(&chunk).map(|_| up)).await?;
            upload = Some(up);
        }
        let up = upload.take().ok_or_else(|| Status::internal("upload lost"))?;
        let store = self.bus.blobs.clone();
        let (sha, size) = (header.sha256.clone(), header.size);
        let info = blocking(move || store.commit(up, &sha, size)).await?;
        // Acknowledged only once the log holds it too (on Kafka: where every node can serve it).
        self.bus.log.put_blob(&info.sha256, info.size, &self.bus.blobs.path_of(&info.sha256)).await?;
        if let Caller::Participant(p) = &caller {
            self.bus.log.grant_blobs(&[(info.sha256.clone(), p.id.clone())]).await?;
        }
        Ok(Response::new(attachment(info, header.name, header.media_type)))
    }

    type DownloadStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::DownloadResponse, Status>> + Send>>;

    async fn download(&self, request: Request<pb::DownloadRequest>) -> std::result::Result<Response<Self::DownloadStream>, Status> {
        let caller = self.bus.gate.caller(&request, "Blobs.Download")?;
        let sha256 = request.into_inner().sha256;
        self.bus.check_blob_read(&caller, "Blobs.Download", &sha256).await?;
        let file = self.bus.open_blob(&sha256).await?.ok_or_else(|| Status::from(Error::UnknownBlob(sha256.clone())))?;
        let (tx, rx) = mpsc::channel(4);
        // Reads on a blocking thread; the hash is checked as the last chunk goes out.
        tokio::task::spawn_blocking(move || {
            let mut file = file;
            let mut hasher = Sha256::new();
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match file.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::from(Error::io(format!("reading blob {sha256}"), e))));
                        return;
                    }
                };
                if n == 0 {
                    let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
                    if actual != sha256 {
                        tracing::error!(sha256 = %sha256, actual = %actual, "stored blob does not match its hash");
                        let _ =
                            tx.blocking_send(Err(Status::data_loss(format!("blob {sha256} is damaged: its content hashes to {actual}"))));
                    }
                    return;
                }
                buf.truncate(n);
                hasher.update(&buf);
                if tx.blocking_send(Ok(pb::DownloadResponse { chunk: buf })).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stat(&self, request: Request<pb::DownloadRequest>) -> std::result::Result<Response<pb::Attachment>, Status> {
        let caller = self.bus.gate.caller(&request, "Blobs.Stat")?;
        let sha256 = request.into_inner().sha256;
        self.bus.check_blob_read(&caller, "Blobs.Stat", &sha256).await?;
        let info = self.bus.blob_info(&sha256).await?.ok_or_else(|| Status::from(Error::UnknownBlob(sha256)))?;
        Ok(Response::new(attachment(info, String::new(), String::new())))
    }
}
