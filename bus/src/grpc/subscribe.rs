//! `Subscriber`: the bidirectional subscribe stream.
//!
//! The first client message is `init`; the server answers `subscribed`, then streams
//! deliveries. Acks, nacks and credit changes from the client are forwarded to the group. A
//! protocol violation (a second `init`, an empty message, credit above the limit, too many ids
//! at once) ends the stream with `INVALID_ARGUMENT`; an ack the group cannot apply is answered
//! in-band with an `ack_error` and the stream goes on.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use justizbus_proto::v1 as pb;
use justizbus_proto::wire::RawSubscribeResponse;
use pb::subscribe_request::Request as Req;
use pb::subscribe_response::Response as Resp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Bus;
use crate::audit::journal::{Entry as JournalEntry, Journal, Kind};
use crate::delivery::{GroupOverrides, Outgoing, Settler, StartPosition, SubscribeParams, SubscriberControl};
use crate::event::{ms_timestamp, Event};
use crate::log::NewRecord;
use crate::routing::mailbox::{is_mailbox_topic, MailboxLog};
use crate::routing::router::{receipt_for, ReceiptHead};
use crate::Error;

/// Most delivery ids in one ack or nack message.
pub const MAX_IDS_PER_MESSAGE: usize = 10_000;

/// The `Subscriber` service.
pub struct SubscriberService {
    bus: Arc<Bus>,
}

impl SubscriberService {
    /// A service over the bus.
    pub fn new(bus: Arc<Bus>) -> Self {
        SubscriberService { bus }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<RawSubscribeResponse, Status>> + Send>>;

fn nonzero(v: u32) -> Option<u32> {
    (v > 0).then_some(v)
}

#[tonic::async_trait]
impl justizbus_proto::raw::subscriber_server::Subscriber for SubscriberService {
    type SubscribeStream = ResponseStream;

    async fn subscribe(&self, request: Request<Streaming<pb::SubscribeRequest>>) -> Result<Response<ResponseStream>, Status> {
        let caller = self.bus.gate.caller(&request, "Subscribe")?;
        let mut inbound = request.into_inner();
        let init = match inbound.message().await?.and_then(|m| m.request) {
            Some(Req::Init(init)) => init,
            _ => return Err(Error::invalid("request", "the first message of a subscription must be init").into()),
        };
        caller.check_read("Subscribe", &init.topic)?;
        let params = SubscribeParams {
            topic: init.topic.clone(),
            group: init.group.clone(),
            max_unacked: init.max_unacked,
            overrides: GroupOverrides {
                ack_deadline_ms: nonzero(init.ack_deadline_ms),
                max_attempts: nonzero(init.max_attempts),
                min_backoff_ms: nonzero(init.min_backoff_ms),
                max_backoff_ms: nonzero(init.max_backoff_ms),
            },
            start: if init.start() == pb::StartPosition::Latest { StartPosition::Latest } else { StartPosition::Earliest },
        };
        let subscription = self.bus.delivery.subscribe(params).await?;
        tracing::info!(topic = %init.topic, group = %init.group, caller = caller.id(), max_unacked = subscription.max_unacked, "subscriber connected");
        let subscribed = pb::SubscribeResponse {
            response: Some(Resp::Subscribed(pb::Subscribed {
                topic: init.topic.clone(),
                group: init.group.clone(),
                partitions: subscription.partitions,
                max_unacked: subscription.max_unacked,
            })),
        };
        let receipts = match (&self.bus.mailboxes, &self.bus.receipts) {
            (Some(mailboxes), Some(writer)) if is_mailbox_topic(&init.topic) => Some(Arc::new(Receipts {
                mailboxes: mailboxes.clone(),
                topic: init.topic.clone(),
                pending: Default::default(),
                writer: writer.clone(),
            })),
            _ => None,
        };
        let (violation_tx, violation_rx) = mpsc::channel(1);
        tokio::spawn(forward_client_messages(inbound, subscription.control, violation_tx, receipts.clone()));
        let topic = init.topic;
        // The stream ends when the group lets the subscriber go (it left, or the server shuts
        // down: the `None` after the deliveries), or with a protocol violation.
        let deliveries = ReceiverStream::new(subscription.receiver)
            .map(move |out| Some(Ok(to_wire(&topic, out, receipts.as_deref()))))
            .chain(tokio_stream::once(None));
        let violations = ReceiverStream::new(violation_rx).map(|status| Some(Err(status)));
        let stream = tokio_stream::once(Ok(subscribed.into())).chain(deliveries.merge(violations).map_while(|item| item));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The wire form of what the group hands out. A mailbox delivery (the subscription keeps a
/// receipt book) goes out as stored: the bus composed it from an event it had decoded, so
/// only the fields its receipt needs are read. Any other record is decoded in full first.
fn to_wire(topic: &str, out: Outgoing, book: Option<&Receipts>) -> RawSubscribeResponse {
    let response = match out {
        Outgoing::Delivery(d) => {
            let r = &d.record;
            let head = pb::Delivery {
                delivery_id: d.delivery_id,
                topic: topic.to_string(),
                partition: r.partition,
                offset: r.offset,
                key: String::from_utf8_lossy(&r.key).into_owned(),
                attempt: d.attempt,
                event: None,
                log_time: Some(ms_timestamp(r.timestamp_ms)),
            };
            let decoded = match book {
                Some(book) => match ReceiptHead::decode(&r.value) {
                    Ok(receipted) => {
                        if let Some(receipted) = receipted {
                            book.delivered(d.delivery_id, r.offset, receipted);
                        }
                        return RawSubscribeResponse::Delivery { head, event: r.value.clone() };
                    }
                    Err(_) => None,
                },
                None => Event::decode(&r.value).ok(),
            };
            // A stored envelope that no longer decodes is delivered with its id so the
            // subscriber can nack it; it then ends in the dead-letter topic.
            let event = decoded.unwrap_or_else(|| pb::Event { id: r.id.clone(), ..Default::default() });
            Resp::Delivery(pb::Delivery { event: Some(event), ..head })
        }
        Outgoing::AckError { delivery_id, error } => {
            Resp::AckError(pb::AckError { delivery_id, code: error.code() as i32, message: error.to_string() })
        }
    };
    pb::SubscribeResponse { response: Some(response) }.into()
}

/// What a mailbox subscription needs to send receipts: the deliveries it holds.
struct Receipts {
    mailboxes: Arc<MailboxLog>,
    topic: String,
    /// Delivery id -> (mailbox offset, what its receipt needs) of the deliveries out that earn
    /// a receipt. Filled as deliveries go out, emptied by acks and nacks.
    pending: std::sync::Mutex<crate::FastMap<u64, (u64, ReceiptHead)>>,
    /// Stores the receipts.
    writer: ReceiptWriter,
}

impl Receipts {
    fn delivered(&self, delivery_id: u64, offset: u64, head: ReceiptHead) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(delivery_id, (offset, head));
    }

    fn take(&self, ids: &[u64]) -> Vec<(u64, ReceiptHead)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter().filter_map(|id| pending.remove(id)).collect()
    }

    /// The receipts acknowledging `ids` causes (taken out of the book), for the
    /// [`ReceiptWriter`].
    fn receipts(&self, ids: &[u64]) -> (Vec<(String, NewRecord)>, Vec<JournalEntry>) {
        let mut journal = Vec::new();
        let mut receipts = Vec::new();
        for (offset, head) in self.take(ids) {
            let (mailbox, record) = receipt_for(&self.topic, offset, &head);
            // A sender that has left the directory has no mailbox: its receipt is dropped.
            if !self.mailboxes.exists(&mailbox) {
                tracing::warn!(mailbox, id = %record.id, "receipt dropped: the sender has no mailbox");
                continue;
            }
            let mut entry = JournalEntry::now(Kind::Receipt, &self.topic, 0, offset, &mailbox, &head.id);
            entry.detail = Some(format!("acknowledged by {}", head.recipient));
            journal.push(entry);
            receipts.push((mailbox, record));
        }
        (receipts, journal)
    }
}

/// Receipts of one ack, and the deliveries to settle once they are durable.
struct ReceiptJob {
    receipts: Vec<(String, NewRecord)>,
    entries: Vec<JournalEntry>,
    ids: Vec<u64>,
    settler: Settler,
}

/// Most receipts in one write.
const MAX_RECEIPTS_PER_WRITE: usize = 4096;

/// Stores the receipts of every mailbox subscription. What acks brought while a write was
/// on disk goes out in the next one: one write and one store batch for many acks.
#[derive(Clone)]
pub struct ReceiptWriter {
    jobs: mpsc::UnboundedSender<ReceiptJob>,
}

impl ReceiptWriter {
    /// Starts the writer task; it ends when the last handle is dropped.
    pub fn start(mailboxes: Arc<MailboxLog>, journal: Option<Journal>) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_receipts(mailboxes, journal, rx));
        ReceiptWriter { jobs }
    }

    /// Stores `receipts` (journaling `entries`), then settles the deliveries `ids`. They are
    /// stored before the deliveries are settled, so a crash in between repeats the delivery
    /// and its receipt (stored once: receipt ids are per event and recipient) and never loses
    /// the receipt.
    fn store(&self, (receipts, entries): (Vec<(String, NewRecord)>, Vec<JournalEntry>), ids: Vec<u64>, settler: Settler) {
        // Fails only once the writer has stopped (the server is stopping): the deliveries
        // stay unsettled and are delivered again after the restart.
        let _ = self.jobs.send(ReceiptJob { receipts, entries, ids, settler });
    }
}

/// The receipt writer task: stores the waiting receipts in one write, retrying until it is
/// durable or the bus stops; then journals them and settles their deliveries.
async fn write_receipts(mailboxes: Arc<MailboxLog>, journal: Option<Journal>, mut jobs: mpsc::UnboundedReceiver<ReceiptJob>) {
    while let Some(first) = jobs.recv().await {
        let mut count = first.receipts.len();
        let mut batch = vec![first];
        while count < MAX_RECEIPTS_PER_WRITE {
            let Ok(job) = jobs.try_recv() else { break };
            count += job.receipts.len();
            batch.push(job);
        }
        let mut wait = Duration::from_millis(50);
        loop {
            // Collected again for a retry rather than cloned twice for every write.
            let receipts: Vec<(String, NewRecord)> = batch.iter().flat_map(|j| j.receipts.iter().cloned()).collect();
            match mailboxes.append_many(receipts).await {
                Ok(_) => break,
                Err(Error::ShuttingDown) => return, // not settled: redelivered after the restart
                Err(e) => {
                    tracing::error!(error = %e, receipts = count, retry_in_ms = wait.as_millis() as u64, "storing receipts failed");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        for job in batch {
            if let Some(journal) = &journal {
                job.entries.into_iter().for_each(|e| journal.record(e));
            }
            job.settler.settle_soon(job.ids);
        }
    }
}

/// Applies the client's acks, nacks and credit until its stream ends; then the control is
/// dropped, which leaves the group and frees what the subscriber held.
async fn forward_client_messages(
    mut inbound: Streaming<pb::SubscribeRequest>,
    control: SubscriberControl,
    violations: mpsc::Sender<Status>,
    receipts: Option<Arc<Receipts>>,
) {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) | Err(_) => break,
        };
        let result = match msg.request {
            Some(Req::Ack(ack)) if ack.delivery_ids.len() <= MAX_IDS_PER_MESSAGE => match &receipts {
                Some(book) => {
                    let made = book.receipts(&ack.delivery_ids);
                    if made.0.is_empty() {
                        control.ack(ack.delivery_ids).await
                    } else {
                        // The case's next delivery need not wait for the receipt's disk write;
                        // the group commits these deliveries only once their receipts are durable.
                        let result = control.release(ack.delivery_ids.clone()).await;
                        book.writer.store(made, ack.delivery_ids, control.settler());
                        result
                    }
                }
                None => control.ack(ack.delivery_ids).await,
            },
            Some(Req::Nack(nack)) if nack.delivery_ids.len() <= MAX_IDS_PER_MESSAGE => {
                if let Some(book) = &receipts {
                    book.take(&nack.delivery_ids);
                }
                control.nack(nack.delivery_ids).await
            }
            Some(Req::Ack(_) | Req::Nack(_)) => {
                Err(Error::invalid("delivery_ids", format!("at most {MAX_IDS_PER_MESSAGE} delivery ids per message")))
            }
            Some(Req::Flow(flow)) => control.set_credit(flow.max_unacked).await,
            Some(Req::Init(_)) => Err(Error::invalid("request", "init may be sent only once per stream")),
            None => Err(Error::invalid("request", "empty subscribe request")),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "subscriber protocol violation; closing its stream");
            let _ = violations.send(e.into()).await;
            // Stay in the group until the error has ended the response stream; leaving first
            // could end it without the error.
            violations.closed().await;
            break;
        }
    }
}
