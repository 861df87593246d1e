//! Delivery semantics against a real server process, through real gRPC clients.

use std::collections::{BTreeMap, BTreeSet};

use std::time::Duration;

use justizbus_e2e::{admin, event, publish, Subscriber, TestServer, ARRIVES, QUIET};
use justizbus_proto::v1 as pb;

fn payload(d: &pb::Delivery) -> String {
    String::from_utf8_lossy(&d.event.as_ref().expect("event").data).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_waits_for_its_ack_while_other_keys_flow() {
    let server = TestServer::start(&[]);
    // One partition, so both cases share it: no head-of-line blocking across keys.
    server.create_topic("orders", 1).await;
    let ch = server.channel().await;
    for i in 0..3 {
        publish(&ch, "orders", event(&format!("a{i}"), "case-A", &format!("A{i}"))).await.expect("publish");
    }
    for i in 0..5 {
        publish(&ch, "orders", event(&format!("b{i}"), "case-B", &format!("B{i}"))).await.expect("publish");
    }
    let mut sub = Subscriber::simple(&ch, "orders", "court", 100).await;
    let first = sub.take(2, ARRIVES).await;
    let mut got: Vec<String> = first.iter().map(payload).collect();
    got.sort();
    assert_eq!(got, ["A0", "B0"], "only the head of each case is handed out");
    let a0 = first.iter().find(|d| payload(d) == "A0").expect("A0");
    // Acknowledge B's events one by one, never A0: case B flows, case A waits.
    let mut b_order = vec!["B0".to_string()];
    let mut current = first.iter().find(|d| payload(d) == "B0").expect("B0").clone();
    for _ in 0..4 {
        sub.ack(&[current.delivery_id]).await;
        current = sub.next(ARRIVES).await.expect("next B");
        b_order.push(payload(&current));
    }
    sub.ack(&[current.delivery_id]).await;
    assert_eq!(b_order, ["B0", "B1", "B2", "B3", "B4"]);
    assert!(sub.next(QUIET).await.is_none(), "A1 must wait for A0's ack");
    sub.ack(&[a0.delivery_id]).await;
    let a1 = sub.next(ARRIVES).await.expect("A1 after A0's ack");
    assert_eq!(payload(&a1), "A1");
    sub.ack(&[a1.delivery_id]).await;
    let a2 = sub.next(ARRIVES).await.expect("A2");
    assert_eq!(payload(&a2), "A2");
    sub.ack(&[a2.delivery_id]).await;
    sub.close().await;
    let g = admin(ch.clone())
        .describe_group(pb::DescribeGroupRequest { topic: "orders".into(), group: "court".into() })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(g.partitions[0].committed_offset, 8, "everything acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_and_deadline_redeliver_with_backoff_then_dead_letter_and_quarantine() {
    let server = TestServer::start(&[]);
    server.create_topic("filings", 2).await;
    let ch = server.channel().await;
    publish(&ch, "filings", event("p0", "poison-case", "P0")).await.expect("publish");
    publish(&ch, "filings", event("p1", "poison-case", "P1")).await.expect("publish");
    publish(&ch, "filings", event("h0", "healthy-case", "H0")).await.expect("publish");
    let init = pb::SubscribeInit {
        topic: "filings".into(),
        group: "registry".into(),
        max_unacked: 10,
        ack_deadline_ms: 600,
        max_attempts: 3,
        min_backoff_ms: 50,
        max_backoff_ms: 200,
        ..Default::default()
    };
    let mut sub = Subscriber::open(&ch, init).await.expect("subscribe");
    let mut attempts = Vec::new();
    let mut healthy = Vec::new();
    // Attempt 1: nack. Attempt 2: let the deadline expire. Attempt 3: nack -> dead letter.
    while attempts.len() < 3 {
        let d = sub.next(ARRIVES).await.expect("a delivery");
        match payload(&d).as_str() {
            "P0" => {
                attempts.push(d.attempt);
                if d.attempt != 2 {
                    sub.nack(&[d.delivery_id]).await;
                }
            }
            "H0" => {
                healthy.push(d.attempt);
                sub.ack(&[d.delivery_id]).await;
            }
            other => panic!("unexpected {other} while P0 is not acknowledged"),
        }
    }
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(healthy, [1], "the other case flowed while the poison case retried");
    assert!(sub.next(Duration::from_millis(1500)).await.is_none(), "P1 waits: its case is quarantined");

    let mut a = admin(ch.clone());
    let q = a
        .list_quarantine(pb::ListQuarantineRequest { topic: "filings".into(), group: "registry".into() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(q.keys.len(), 1);
    assert_eq!((q.keys[0].key.as_str(), q.keys[0].event_id.as_str(), q.keys[0].attempts), ("poison-case", "p0", 3));
    let dl = a
        .list_dead_letters(pb::ListDeadLettersRequest { topic: "filings".into(), group: "registry".into(), max: 10 })
        .await
        .expect("dlq")
        .into_inner();
    assert_eq!(dl.records.len(), 1);
    let dead = dl.records[0].event.as_ref().expect("event");
    assert_eq!(&dead.data[..], b"P0");
    assert_eq!(dead.headers.get("justizbus.dlq.event_id").map(String::as_str), Some("p0"));

    // Release: P0 comes again from attempt 1; acknowledging it lets P1 flow.
    a.release_quarantine(pb::QuarantineActionRequest { topic: "filings".into(), group: "registry".into(), key: "poison-case".into() })
        .await
        .expect("release");
    let again = sub.next(ARRIVES).await.expect("P0 again");
    assert_eq!((payload(&again).as_str(), again.attempt), ("P0", 1));
    // Fail it again until it is quarantined again, then skip it.
    sub.nack(&[again.delivery_id]).await;
    for expected in [2, 3] {
        let d = sub.next(ARRIVES).await.expect("P0 retry");
        assert_eq!((payload(&d).as_str(), d.attempt), ("P0", expected));
        sub.nack(&[d.delivery_id]).await;
    }
    assert!(sub.next(Duration::from_millis(800)).await.is_none());
    let err = a
        .release_quarantine(pb::QuarantineActionRequest { topic: "filings".into(), group: "registry".into(), key: "no-such-case".into() })
        .await
        .expect_err("not quarantined");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    a.skip_quarantine(pb::QuarantineActionRequest { topic: "filings".into(), group: "registry".into(), key: "poison-case".into() })
        .await
        .expect("skip");
    let p1 = sub.next(ARRIVES).await.expect("P1 after skip");
    assert_eq!(payload(&p1), "P1");
    sub.ack(&[p1.delivery_id]).await;
    sub.close().await;
    let dl = a
        .list_dead_letters(pb::ListDeadLettersRequest { topic: "filings".into(), group: "registry".into(), max: 10 })
        .await
        .expect("dlq")
        .into_inner();
    assert_eq!(dl.records.len(), 2, "each dead-lettering is recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_bounds_outstanding_deliveries() {
    let server = TestServer::start(&[]);
    server.create_topic("flow", 4).await;
    let ch = server.channel().await;
    for i in 0..40 {
        publish(&ch, "flow", event(&format!("f{i}"), &format!("case-{i}"), "x")).await.expect("publish");
    }
    let mut sub = Subscriber::simple(&ch, "flow", "slow", 3).await;
    let first = sub.take(3, ARRIVES).await;
    assert_eq!(first.len(), 3);
    assert!(sub.next(QUIET).await.is_none(), "no more than the credit is outstanding");
    sub.ack(&[first[0].delivery_id]).await;
    assert!(sub.next(ARRIVES).await.is_some(), "one ack frees one slot");
    assert!(sub.next(QUIET).await.is_none(), "one ack frees only one slot");
    sub.send(pb::subscribe_request::Request::Flow(pb::Flow { max_unacked: 10 })).await;
    let raised = sub.take(7, ARRIVES).await;
    assert_eq!(raised.len(), 7, "raising the credit to 10 allows 7 more");
    assert!(sub.next(QUIET).await.is_none(), "and no more");
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_of_one_group_share_the_events_and_a_leaver_is_redelivered() {
    let server = TestServer::start(&[]);
    server.create_topic("shared", 4).await;
    let ch = server.channel().await;
    let n = 60;
    for i in 0..n {
        publish(&ch, "shared", event(&format!("s{i}"), &format!("case-{}", i % 12), &format!("{i}"))).await.expect("publish");
    }
    let mut one = Subscriber::simple(&ch, "shared", "pool", 5).await;
    let mut two = Subscriber::simple(&ch, "shared", "pool", 5).await;
    // Subscriber one takes a delivery and goes away without acknowledging it.
    let abandoned = one.next(ARRIVES).await.expect("delivery");
    drop(one);
    let mut attempts: BTreeMap<String, u32> = BTreeMap::new();
    while attempts.len() < n {
        let Some(d) = two.next(ARRIVES).await else { break };
        attempts.insert(payload(&d), d.attempt);
        two.ack(&[d.delivery_id]).await;
    }
    assert_eq!(attempts.len(), n, "every event delivered");
    assert_eq!(attempts.get(&payload(&abandoned)), Some(&2), "the event held by the leaver was redelivered");
    two.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connected_subscribers_both_receive() {
    let server = TestServer::start(&[]);
    server.create_topic("spread", 4).await;
    let ch = server.channel().await;
    for i in 0..40 {
        publish(&ch, "spread", event(&format!("s{i}"), &format!("case-{i}"), &format!("{i}"))).await.expect("publish");
    }
    let mut one = Subscriber::simple(&ch, "spread", "pool", 4).await;
    let mut two = Subscriber::simple(&ch, "spread", "pool", 4).await;
    let mut all = BTreeSet::new();
    let (mut n1, mut n2) = (0, 0);
    while all.len() < 40 {
        tokio::select! {
            Some(d) = one.next(ARRIVES) => { all.insert(payload(&d)); n1 += 1; one.ack(&[d.delivery_id]).await; }
            Some(d) = two.next(ARRIVES) => { all.insert(payload(&d)); n2 += 1; two.ack(&[d.delivery_id]).await; }
            else => break,
        }
    }
    assert_eq!(all.len(), 40);
    assert!(n1 > 0 && n2 > 0, "both subscribers got events ({n1}, {n2})");
    one.close().await;
    two.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_start_and_independent_groups() {
    let server = TestServer::start(&[]);
    server.create_topic("news", 1).await;
    let ch = server.channel().await;
    publish(&ch, "news", event("old", "k", "old")).await.expect("publish");
    let init = pb::SubscribeInit {
        topic: "news".into(),
        group: "late".into(),
        max_unacked: 10,
        start: pb::StartPosition::Latest as i32,
        ..Default::default()
    };
    let mut late = Subscriber::open(&ch, init).await.expect("subscribe");
    let mut early = Subscriber::simple(&ch, "news", "early", 10).await;
    publish(&ch, "news", event("new", "k", "new")).await.expect("publish");
    let l = late.next(ARRIVES).await.expect("new");
    assert_eq!(payload(&l), "new");
    assert!(late.next(QUIET).await.is_none(), "a latest-start group sees only new events");
    let e = early.next(ARRIVES).await.expect("old");
    assert_eq!(payload(&e), "old");
    early.ack(&[e.delivery_id]).await;
    let e = early.next(ARRIVES).await.expect("new");
    assert_eq!(payload(&e), "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let server = TestServer::start(&[]);
    let ch = server.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r =
        health.check(tonic_health::pb::HealthCheckRequest { service: "justizbus.v1.Publisher".into() }).await.expect("health").into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.expect("reflection").into_inner();
    let resp = stream.message().await.expect("message").expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("unexpected reflection answer") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in ["justizbus.v1.Publisher", "justizbus.v1.Subscriber", "justizbus.v1.Replayer", "justizbus.v1.Admin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == s), "{s} in {names:?}");
    }
}
