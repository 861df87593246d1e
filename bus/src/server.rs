//! Wiring: opens the log, starts delivery and retention, serves gRPC until shutdown.
//!
//! [`run`] takes a bound listener and a shutdown future (as in mini-redis), so tests and the
//! benchmark can run the server on any port and stop it cleanly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use justizbus_proto::v1 as pb;
use justizbus_xjustiz::coalesce::Coalescing;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::config::ServerConfig;
use crate::delivery::Delivery;
use crate::grpc::{
    admin::AdminService,
    publish::PublisherService,
    replay::ReplayerService,
    subscribe::{ReceiptWriter, SubscriberService},
    Bus,
};
use crate::routing::directory::DirectoryHandle;
use crate::routing::mailbox::{MailboxLog, MAILBOX_INDEX_FILE};
use crate::routing::router::Router;
use crate::security::auth::Gate;
use crate::{log, Error, Result};

/// How long a shutdown waits for clients to close their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Serves the bus on `listener` until `shutdown` completes; then stops accepting, persists
/// group positions and closes the log.
pub async fn run(config: ServerConfig, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    // Refuse unsafe or broken setups before anything is opened or stored.
    let addr = listener.local_addr().map_err(|e| Error::io("reading the listen address", e))?;
    if config.tls.is_none() && !addr.ip().is_loopback() {
        return Err(Error::invalid(
            "listen",
            format!(
                "{addr} is not a loopback address: without [tls] the bus serves this machine only; configure mTLS to serve the network"
            ),
        ));
    }
    let tls = match &config.tls {
        Some(settings) => {
            Some((crate::security::tls::server_config(settings)?, Duration::from_millis(settings.handshake_timeout_ms.max(100))))
        }
        None => None,
    };
    if tls.is_some() && config.routing.directory.is_none() {
        return Err(Error::invalid("tls", "mTLS needs routing.directory: client certificates name participants of the directory"));
    }
    let signer = match &config.audit.signing_key {
        Some(path) => Some(Arc::new(crate::audit::checkpoint::Signer::load(path)?)),
        None => None,
    };
    crate::memory::set_interval_ms(config.memory_release_interval_ms);
    let url = config.log_url();
    let mut log = log::open(&url, &config.log_settings, &config.kafka).await?;
    // Chains, checkpoints and the journal cover the log as stored, beneath the mailbox view.
    let stored_log = log.clone();
    let chains = Arc::new(crate::audit::Chains::new(stored_log.clone()));
    let checkpointer = signer.map(|signer| {
        Arc::new(crate::audit::checkpointer::Checkpointer::new(stored_log.clone(), chains.clone(), signer, config.audit.clone()))
    });
    let journal = if config.audit.journal { Some(crate::audit::journal::Journal::start(stored_log.clone()).await?) } else { None };
    let audit =
        Arc::new(crate::audit::Audit { log: stored_log.clone(), chains, checkpointer: checkpointer.clone(), journal: journal.clone() });
    match &checkpointer {
        Some(c) => tracing::info!(public_key = %c.signer().public_key().hex(), every_records = config.audit.checkpoint_records,
            every_ms = config.audit.checkpoint_interval_ms, "signing hash chain checkpoints"),
        None => tracing::warn!("no audit.signing_key configured: the hash chain is kept, but no checkpoints are signed"),
    }
    let checkpointing = checkpointer.clone().map(|c| tokio::spawn(c.run()));
    // With a directory, mailboxes are layered over the log and a router runs beside the services.
    let directory = match &config.routing.directory {
        Some(path) => Some(DirectoryHandle::watch(path.clone(), Duration::from_millis(config.routing.reload_ms.max(10)))?),
        None => None,
    };
    let routing = match &directory {
        Some(directory) if config.routing.mailboxes => {
            let mailboxes = Arc::new(
                MailboxLog::open(
                    log.clone(),
                    directory.clone(),
                    &config.routing,
                    &config.log_settings,
                    Some(config.data_dir.join(MAILBOX_INDEX_FILE)),
                )
                .await?,
            );
            log = mailboxes.clone();
            Some((directory.clone(), mailboxes))
        }
        _ => None,
    };
    let delivery = Arc::new(Delivery::with_journal(log.clone(), config.delivery.clone(), journal.clone()));
    let blobs = Arc::new(crate::blob::BlobStore::open(&config.data_dir.join("blobs"), config.max_blob_bytes)?);
    let mailboxes = routing.as_ref().map(|(_, m)| m.clone());
    let gate = match (&tls, &directory) {
        (Some(_), Some(directory)) => Gate::mtls(directory.clone()),
        _ => Gate::open(),
    };
    let receipts = mailboxes.as_ref().map(|m| ReceiptWriter::start(m.clone(), journal.clone()));
    let bus =
        Arc::new(Bus { log: log.clone(), delivery: delivery.clone(), config: config.clone(), blobs, mailboxes, receipts, gate, audit });
    let router = match routing {
        Some((directory, mailboxes)) => {
            Some(Router { mailboxes, directory, settings: config.routing.clone(), journal: journal.clone() }.start().await?)
        }
        None => None,
    };

    let retention_log = log.clone();
    let every = Duration::from_millis(config.log_settings.retention_check_ms.max(100));
    let retention = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = retention_log.apply_retention().await {
                tracing::error!(error = %e, "retention failed");
            }
        }
    });

    // Room for the largest event plus the envelope and request fields around it.
    let max_message = config.log_settings.max_event_bytes + 1024 * 1024;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<pb::publisher_server::PublisherServer<PublisherService>>().await;
    health_reporter.set_serving::<justizbus_proto::raw::subscriber_server::SubscriberServer<SubscriberService>>().await;
    health_reporter.set_serving::<pb::replayer_server::ReplayerServer<ReplayerService>>().await;
    health_reporter.set_serving::<pb::admin_server::AdminServer<AdminService>>().await;
    health_reporter.set_serving::<pb::blobs_server::BlobsServer<crate::grpc::blobs::BlobsService>>().await;
    health_reporter.set_serving::<pb::auditor_server::AuditorServer<crate::grpc::audit::AuditorService>>().await;
    // Reflection v1, and v1alpha for older clients (grpcurl before 1.9 asks only v1alpha).
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1().map_err(|e| Error::Serve(e.to_string()))?;
    let reflection_alpha = reflection_builder().build_v1alpha().map_err(|e| Error::Serve(e.to_string()))?;

    let stopping = delivery.clone();
    tracing::info!(%addr, log = %url, mtls = tls.is_some(), "justizbus listening");
    if tls.is_none() {
        tracing::info!("no TLS configured: listening on loopback only, every local client is the operator");
    }
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let routes = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(pb::publisher_server::PublisherServer::new(PublisherService::new(bus.clone())).max_decoding_message_size(max_message))
        .add_service(
            justizbus_proto::raw::subscriber_server::SubscriberServer::new(SubscriberService::new(bus.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(pb::replayer_server::ReplayerServer::new(ReplayerService::new(bus.clone())).max_encoding_message_size(max_message))
        .add_service(pb::blobs_server::BlobsServer::new(crate::grpc::blobs::BlobsService::new(bus.clone())))
        .add_service(
            pb::auditor_server::AuditorServer::new(crate::grpc::audit::AuditorService::new(bus.clone()))
                .max_encoding_message_size(max_message * 2),
        )
        .add_service(pb::admin_server::AdminServer::new(AdminService::new(bus.clone())).max_encoding_message_size(usize::MAX));
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: storing group positions, ending subscriptions");
        // Subscriptions never end by themselves; stopping the groups ends them, so the
        // graceful shutdown does not wait for subscribers to hang up.
        stopping.shutdown().await;
        let _ = stopping_tx.send(());
    };
    // Every connection gathers h2's frames into one write per turn (adapters/src/coalesce.rs).
    let serve: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls {
        Some((tls_config, handshake_timeout)) => {
            let incoming = crate::security::tls::incoming(listener, tls_config, handshake_timeout).map(|c| c.map(Coalescing::new));
            Box::pin(routes.serve_with_incoming_shutdown(incoming, shutdown))
        }
        // `Server::tcp_nodelay` applies only to listeners tonic binds itself: without it here,
        // Nagle's algorithm held small frames (a delivery, an ack's answer) until the peer's
        // delayed ACK, up to 40 ms.
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)).map(|c| c.map(Coalescing::new));
            Box::pin(routes.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    // A client that keeps its half of a stream open would hold the graceful shutdown forever;
    // give connections a moment to close, then drop them.
    let result = tokio::select! {
        r = serve => r.map_err(|e| Error::Serve(e.to_string())),
        _ = async {
            match stopping_rx.await {
                Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        } => {
            tracing::warn!(grace_ms = SHUTDOWN_GRACE.as_millis() as u64, "connections still open after the grace period; closing them");
            Ok(())
        }
    };
    retention.abort();
    delivery.shutdown().await;
    if let Some(router) = router {
        router.stop().await;
    }
    if let Some(journal) = &journal {
        journal.flush().await;
    }
    if let Some(task) = checkpointing {
        task.abort();
    }
    // Everything stored is signed before the log closes.
    if let Some(c) = &checkpointer {
        if let Err(e) = c.tick(true).await {
            tracing::warn!(error = %e, "signing the last checkpoints failed");
        }
    }
    log.close().await?;
    tracing::info!("stopped");
    result
}
