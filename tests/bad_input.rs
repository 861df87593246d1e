//! Bad input gets a precise gRPC status, the server keeps serving, and nothing stored changes.

use justizbus_e2e::{admin, event, publish, publisher, Subscriber, TestServer, ARRIVES};
use justizbus_proto::v1 as pb;
use tonic::Code;

async fn end_offsets(server: &TestServer, topic: &str) -> Vec<u64> {
    let info = admin(server.channel().await)
        .describe_topic(pb::DescribeTopicRequest { topic: topic.into() })
        .await
        .expect("describe")
        .into_inner();
    info.partition_info.iter().map(|p| p.end_offset).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_errors_are_precise_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bus.toml");
    std::fs::write(&config, "[log_settings]\nmax_event_bytes = 4096\n").expect("config");
    let server = TestServer::start(&["--config", config.to_str().expect("utf8")]);
    server.create_topic("in", 2).await;
    let ch = server.channel().await;
    publish(&ch, "in", event("ok-1", "case", "fine")).await.expect("valid publish");
    let before = end_offsets(&server, "in").await;

    let cases: Vec<(&str, pb::PublishRequest, Code)> = vec![
        ("unknown topic", pb::PublishRequest { topic: "nope".into(), event: Some(event("e", "k", "x")) }, Code::NotFound),
        ("missing event", pb::PublishRequest { topic: "in".into(), event: None }, Code::InvalidArgument),
        ("empty event", pb::PublishRequest { topic: "in".into(), event: Some(event("e", "k", "")) }, Code::InvalidArgument),
        ("no subject", pb::PublishRequest { topic: "in".into(), event: Some(event("e", "", "x")) }, Code::InvalidArgument),
        ("bad id", pb::PublishRequest { topic: "in".into(), event: Some(event("has space", "k", "x")) }, Code::InvalidArgument),
        (
            "wrong envelope version",
            pb::PublishRequest { topic: "in".into(), event: Some(pb::Event { spec_version: "v0".into(), ..event("e", "k", "x") }) },
            Code::InvalidArgument,
        ),
        (
            "bad time",
            pb::PublishRequest {
                topic: "in".into(),
                event: Some(pb::Event { time: Some(prost_types_timestamp(-5)), ..event("e", "k", "x") }),
            },
            Code::InvalidArgument,
        ),
        (
            "oversized",
            pb::PublishRequest { topic: "in".into(), event: Some(event("big", "k", &"x".repeat(5000))) },
            Code::ResourceExhausted,
        ),
    ];
    for (what, req, code) in cases {
        let err = publisher(ch.clone()).publish(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(!err.message().is_empty(), "{what} has a readable message");
    }
    let err = publisher(ch.clone())
        .publish(pb::PublishRequest { topic: "in".into(), event: Some(event("e", "", "x")) })
        .await
        .expect_err("no subject");
    assert!(err.message().contains("subject"), "names the field: {}", err.message());

    // A batch with one bad event stores nothing.
    let batch = vec![
        pb::PublishRequest { topic: "in".into(), event: Some(event("b1", "case", "one")) },
        pb::PublishRequest { topic: "in".into(), event: Some(event("b2", "", "two")) },
        pb::PublishRequest { topic: "in".into(), event: Some(event("b3", "case", "three")) },
    ];
    let err = publisher(ch.clone()).publish_batch(tokio_stream::iter(batch)).await.expect_err("bad batch");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("events[1]"), "locates the bad event: {}", err.message());
    let batch = vec![
        pb::PublishRequest { topic: "in".into(), event: Some(event("c1", "case", "one")) },
        pb::PublishRequest { topic: "missing".into(), event: Some(event("c2", "case", "two")) },
    ];
    let err = publisher(ch.clone()).publish_batch(tokio_stream::iter(batch)).await.expect_err("unknown topic in batch");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(end_offsets(&server, "in").await, before, "nothing stored by rejected requests");

    // Topic admin errors.
    let mut a = admin(ch.clone());
    let err = a.create_topic(pb::CreateTopicRequest { topic: "in".into(), partitions: 3, ..Default::default() }).await.expect_err("exists");
    assert_eq!(err.code(), Code::AlreadyExists);
    let err =
        a.create_topic(pb::CreateTopicRequest { topic: "x/y".into(), partitions: 3, ..Default::default() }).await.expect_err("bad name");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = a
        .create_topic(pb::CreateTopicRequest { topic: "zero".into(), partitions: 0, ..Default::default() })
        .await
        .expect_err("zero partitions");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = a.describe_group(pb::DescribeGroupRequest { topic: "in".into(), group: "never".into() }).await.expect_err("unknown group");
    assert_eq!(err.code(), Code::NotFound);

    // Replay range errors.
    let mut r = pb::replayer_client::ReplayerClient::new(ch.clone());
    let err =
        r.replay(pb::ReplayRequest { topic: "in".into(), partition: Some(9), ..Default::default() }).await.expect_err("bad partition");
    assert_eq!(err.code(), Code::OutOfRange);
    let err = r
        .replay(pb::ReplayRequest { topic: "in".into(), partition: Some(0), from_offset: Some(1000), ..Default::default() })
        .await
        .expect_err("bad offset");
    assert_eq!(err.code(), Code::OutOfRange);

    // Still serving, and the valid event is intact.
    publish(&ch, "in", event("ok-2", "case", "fine")).await.expect("still serving");
}

fn prost_types_timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_protocol_errors() {
    let server = TestServer::start(&[]);
    server.create_topic("t", 1).await;
    let ch = server.channel().await;
    publish(&ch, "t", event("e1", "case", "x")).await.expect("publish");

    let unknown = Subscriber::open(&ch, pb::SubscribeInit { topic: "nope".into(), group: "g".into(), ..Default::default() }).await;
    assert_eq!(unknown.err().map(|s| s.code()), Some(Code::NotFound));
    let bad_group = Subscriber::open(&ch, pb::SubscribeInit { topic: "t".into(), group: "".into(), ..Default::default() }).await;
    assert_eq!(bad_group.err().map(|s| s.code()), Some(Code::InvalidArgument));
    let greedy =
        Subscriber::open(&ch, pb::SubscribeInit { topic: "t".into(), group: "g".into(), max_unacked: 5_000_000, ..Default::default() })
            .await;
    assert_eq!(greedy.err().map(|s| s.code()), Some(Code::InvalidArgument), "credit abuse at init");

    // First message not init.
    let mut client = pb::subscriber_client::SubscriberClient::new(ch.clone());
    let ack_first = pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Ack(pb::Ack { delivery_ids: vec![1] })) };
    let err = match client.subscribe(tokio_stream::iter(vec![ack_first])).await {
        Err(status) => status,
        Ok(resp) => resp.into_inner().message().await.expect_err("stream fails"),
    };
    assert_eq!(err.code(), Code::InvalidArgument);

    // Ack of an unknown delivery: answered in-band, the stream goes on.
    let mut sub = Subscriber::simple(&ch, "t", "g", 10).await;
    let d = sub.next(ARRIVES).await.expect("delivery");
    sub.ack(&[987_654]).await;
    match sub.next_message(ARRIVES).await {
        Some(Ok(pb::subscribe_response::Response::AckError(e))) => {
            assert_eq!(e.delivery_id, 987_654);
            assert_eq!(e.code, Code::NotFound as i32);
        }
        other => panic!("expected an ack error, got {other:?}"),
    }
    sub.ack(&[d.delivery_id]).await;
    // Credit abuse later in the stream ends it with INVALID_ARGUMENT.
    sub.send(pb::subscribe_request::Request::Flow(pb::Flow { max_unacked: u32::MAX })).await;
    match sub.next_message(ARRIVES).await {
        Some(Err(status)) => assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message()),
        other => panic!("expected the stream to fail, got {other:?}"),
    }
    // A second init ends the stream too.
    let mut sub = Subscriber::simple(&ch, "t", "g2", 10).await;
    sub.send(pb::subscribe_request::Request::Init(pb::SubscribeInit { topic: "t".into(), group: "g2".into(), ..Default::default() })).await;
    loop {
        match sub.next_message(ARRIVES).await {
            Some(Ok(_)) => continue,
            Some(Err(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument);
                break;
            }
            None => panic!("expected the stream to fail"),
        }
    }
    // The acknowledged event stays acknowledged; the server still serves.
    let g = admin(ch.clone())
        .describe_group(pb::DescribeGroupRequest { topic: "t".into(), group: "g".into() })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(g.partitions[0].committed_offset, 1);
}
