//! `justizbus demo` end to end: it must complete, and what it leaves behind must show the
//! messages in exactly their recipients' inboxes, byte for byte, and the receipts.

use std::path::Path;

use justizbus_e2e::{files_below, run_cli};

#[test]
fn demo_delivers_every_message_and_every_receipt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("demo");
    let out = run_cli(&["demo".to_string(), "--dir".to_string(), work.display().to_string()], None);
    assert!(out.ok, "demo failed:\n{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("All 5 messages reached exactly their recipients"), "{}", out.stdout);
    assert_eq!(out.stdout.matches("  receipt  ").count(), 5, "{}", out.stdout);

    // Nothing was rejected by the inbound adapter: the project's messages are valid.
    let outbox = work.join("land-rp/outbox");
    assert!(files_below(&outbox.join("rejected")).is_empty(), "rejected: {:?}", files_below(&outbox.join("rejected")).keys());
    assert_eq!(files_below(&outbox.join("done")).len(), 5);

    // Each dropped message is in exactly one inbox, identical to the file in examples/demo.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let expected = [
        ("01-joswig-an-vg-koblenz.xml", "vg-koblenz"),
        ("02-vg-koblenz-an-joswig.xml", "joswig-partner"),
        ("03-joswig-an-arbg-ludwigshafen.xml", "arbg-ludwigshafen"),
        ("04-arbg-ludwigshafen-an-joswig.xml", "joswig-partner"),
        ("05-vg-koblenz-an-joswig.xml", "joswig-partner"),
    ];
    for (file, owner) in expected {
        let original = std::fs::read(examples.join(file)).expect("example message");
        for inbox in ["vg-koblenz", "arbg-ludwigshafen", "joswig-partner"] {
            let copies: Vec<_> = files_below(&work.join(inbox).join("inbox")).into_iter().filter(|(k, _)| k.ends_with(file)).collect();
            if inbox == owner {
                assert_eq!(copies.len(), 1, "{file} in {inbox}");
                assert_eq!(copies[0].1, original, "{file} arrives byte-identical");
            } else {
                assert!(copies.is_empty(), "{file} must not reach {inbox}");
            }
        }
    }
}
