//! `justizbus demo`: the whole path on one machine, in a temporary directory.
//!
//! An embedded bus with the example participants directory; the inbound adapter of a Land
//! system (Rheinland-Pfalz) watching its drop directory; outbound adapters for two courts
//! (Verwaltungsgericht Koblenz, Arbeitsgericht Ludwigshafen) and a law firm (Joswig & Partner)
//! writing into their inboxes. Five XJustiz 3.2.1 messages written for the project
//! (`examples/demo/`, valid against the schemas) are dropped; the demo waits until every
//! message is in its recipient's inbox and every sender has its receipt, then prints both.
//!
//! The adapters run as tasks of this process, over gRPC, with exactly the code of
//! `justizbus adapter inbound|outbound`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use justizbus_xjustiz::adapter::{InboundArgs, OutboundArgs};
use serde_json::Value;

use crate::config::ServerConfig;
use crate::routing::directory::Directory;

/// The example directory, built into the binary so the demo runs anywhere.
const DIRECTORY: &str = include_str!("../../examples/directory.toml");

/// The demo messages (file name, XML).
const MESSAGES: [(&str, &str); 5] = [
    ("01-joswig-an-vg-koblenz.xml", include_str!("../../examples/demo/01-joswig-an-vg-koblenz.xml")),
    ("02-vg-koblenz-an-joswig.xml", include_str!("../../examples/demo/02-vg-koblenz-an-joswig.xml")),
    ("03-joswig-an-arbg-ludwigshafen.xml", include_str!("../../examples/demo/03-joswig-an-arbg-ludwigshafen.xml")),
    ("04-arbg-ludwigshafen-an-joswig.xml", include_str!("../../examples/demo/04-arbg-ludwigshafen-an-joswig.xml")),
    ("05-vg-koblenz-an-joswig.xml", include_str!("../../examples/demo/05-vg-koblenz-an-joswig.xml")),
];

/// The participants that run an outbound adapter: (inbox folder, address in the directory).
const RECIPIENTS: [(&str, &str); 3] =
    [("vg-koblenz", "court:T6076"), ("arbg-ludwigshafen", "court:T6078"), ("joswig-partner", "other:Joswig & Partner")];

/// `justizbus demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Work in this directory (created) instead of a temporary one, and keep it.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up when not everything arrived within this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

/// Parses adapter arguments as the command line would (defaults included).
fn adapter_args<T: clap::Args>(args: &[&str]) -> anyhow::Result<T> {
    #[derive(Parser)]
    struct Wrapper<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    Ok(Wrapper::<T>::try_parse_from(std::iter::once("demo").chain(args.iter().copied()))?.inner)
}

/// One folder an outbound adapter wrote.
struct Delivered {
    folder: String,
    envelope: Value,
}

fn read_inbox(inbox: &Path) -> Vec<Delivered> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(inbox) else { return out };
    for entry in entries.flatten() {
        let folder = entry.file_name().to_string_lossy().into_owned();
        if folder.starts_with('.') {
            continue;
        }
        if let Some(envelope) = std::fs::read(entry.path().join("justizbus-event.json")).ok().and_then(|b| serde_json::from_slice(&b).ok())
        {
            out.push(Delivered { folder, envelope });
        }
    }
    out.sort_by(|a, b| a.folder.cmp(&b.folder));
    out
}

/// The dropped file a delivery or receipt is about.
fn file_of(d: &Delivered, files: &BTreeMap<String, String>) -> String {
    let id = if is_receipt(d) { d.envelope["data"]["event_id"].as_str() } else { d.envelope["id"].as_str() };
    id.and_then(|id| files.get(id)).cloned().unwrap_or_default()
}

fn is_receipt(d: &Delivered) -> bool {
    d.envelope["type"] == crate::routing::router::RECEIPT_TYPE
}

/// Runs the demo; prints what each recipient received and the receipts the senders got.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    // Removed at the end unless --dir was given or something went wrong.
    let temp_guard = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            None
        }
        None => Some(tempfile::Builder::new().prefix("justizbus-demo-").tempdir()?),
    };
    let work = match (&args.dir, &temp_guard) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory exists without --dir"),
    };
    let directory_file = work.join("directory.toml");
    std::fs::write(&directory_file, DIRECTORY)?;
    let directory = Directory::parse(DIRECTORY)?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut config = ServerConfig { data_dir: work.join("bus-data"), ..Default::default() };
    config.routing.directory = Some(directory_file);
    config.validate()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::run(config, listener, async move {
        let _ = stopped.await;
    }));

    println!("Justizbus demo in {}", work.display());
    println!("  bus        {url}  (embedded log, {} participants in the directory)", directory.participants().len());
    let outbox = work.join("land-rp").join("outbox");
    std::fs::create_dir_all(&outbox)?;
    let inbound: InboundArgs =
        adapter_args(&["--server", &url, "--watch", &outbox.display().to_string(), "--name", "fachverfahren-rp", "--poll-ms", "100"])?;
    println!("  inbound    Land system Rheinland-Pfalz, drop directory {}", outbox.display());
    let mut tasks = vec![tokio::spawn(justizbus_xjustiz::adapter::inbound(inbound))];
    let mut inboxes = Vec::new();
    for (folder, address) in RECIPIENTS {
        let p = directory.resolve(address).with_context(|| format!("{address} is not in the example directory"))?;
        let inbox = work.join(folder).join("inbox");
        let outbound: OutboundArgs =
            adapter_args(&["--server", &url, "--participant", &p.id, "--group", "inbox", "--out", &inbox.display().to_string()])?;
        println!("  outbound   {} ({}), inbox {}", p.name, p.id, inbox.display());
        tasks.push(tokio::spawn(justizbus_xjustiz::adapter::outbound(outbound)));
        inboxes.push((p.clone(), inbox));
    }

    // Each message is written aside and renamed into the drop directory, as a legacy system does.
    for (name, xml) in MESSAGES {
        let tmp = outbox.join(format!(".{name}"));
        std::fs::write(&tmp, xml)?;
        std::fs::rename(&tmp, outbox.join(name))?;
    }
    println!("\nDropped {} XJustiz messages (XJustiz 3.2.1, Übermittlung Schriftgutobjekte 0005005).", MESSAGES.len());

    // Every demo message has one recipient, and every recipient runs an adapter: done when all
    // messages and as many receipts are in the inboxes.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let complete = loop {
        let (mut messages, mut receipts) = (0, 0);
        for (_, inbox) in &inboxes {
            for d in read_inbox(inbox) {
                if is_receipt(&d) {
                    receipts += 1;
                } else {
                    messages += 1;
                }
            }
        }
        if messages >= MESSAGES.len() && receipts >= MESSAGES.len() {
            break true;
        }
        if Instant::now() > deadline || tasks.iter().any(|t| t.is_finished()) || server.is_finished() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for t in &tasks {
        t.abort();
    }
    let _ = stop.send(());
    server.await.context("the embedded bus panicked")??;

    let report = report(&directory, &inboxes);
    print!("{}", report.text);
    if !complete || report.problems > 0 {
        if let Some(temp) = temp_guard {
            let _ = temp.keep();
        }
        bail!("the demo did not complete: {} problem(s); see {}", report.problems.max(1), work.display());
    }
    println!("\nAll {} messages reached exactly their recipients, byte for byte; every sender got its receipt.", MESSAGES.len());
    if args.dir.is_none() {
        println!("(The temporary directory is removed; run with --dir DIR to keep it.)");
    }
    Ok(())
}

struct Report {
    text: String,
    problems: usize,
}

/// What each inbox holds, checked against what was dropped.
fn report(directory: &Directory, inboxes: &[(crate::routing::directory::Participant, PathBuf)]) -> Report {
    let name_of = |address: &str| {
        directory.resolve(address).or_else(|| directory.participant(address)).map_or(address.to_string(), |p| p.name.clone())
    };
    let dropped: BTreeMap<&str, &str> = MESSAGES.iter().copied().collect();
    // Event id -> dropped file name, from the deliveries.
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for (_, inbox) in inboxes {
        for d in read_inbox(inbox).into_iter().filter(|d| !is_receipt(d)) {
            if let (Some(id), Some(file)) = (d.envelope["id"].as_str(), d.envelope["headers"]["xjustiz.file_name"].as_str()) {
                files.insert(id.to_string(), file.to_string());
            }
        }
    }
    let mut text = String::new();
    let mut problems = 0;
    for (p, inbox) in inboxes {
        text.push_str(&format!("\n{} received:\n", p.name));
        // Messages in the order they were dropped, then the receipts.
        let mut delivered = read_inbox(inbox);
        delivered.sort_by_key(|d| (is_receipt(d), file_of(d, &files)));
        for d in delivered {
            let e = &d.envelope;
            if is_receipt(&d) {
                let r = &e["data"];
                let event = r["event_id"].as_str().unwrap_or("?");
                text.push_str(&format!(
                    "  receipt  {}: acknowledged by {} at {} (mailbox offset {})\n",
                    files.get(event).map_or(event, String::as_str),
                    name_of(r["recipient"].as_str().unwrap_or("?")),
                    r["acknowledged_at"].as_str().unwrap_or("?"),
                    r["offset"],
                ));
                continue;
            }
            let file = e["headers"]["xjustiz.file_name"].as_str().unwrap_or("?");
            let identical = match (dropped.get(file), std::fs::read(inbox.join(&d.folder).join(file))) {
                (Some(sent), Ok(got)) => sent.as_bytes() == got.as_slice(),
                _ => false,
            };
            let case = e["metadata"]["proceeding_cases"][0]["number"].as_str().unwrap_or("?");
            // The router names recipients by participant id in what it delivers.
            let addressed = e["recipients"].as_array().is_some_and(|r| r.iter().any(|a| a.as_str() == Some(p.id.as_str())));
            if !identical || !addressed {
                problems += 1;
            }
            text.push_str(&format!(
                "  message  {file}  case {case}  from {}{}{}\n",
                name_of(e["sender"].as_str().unwrap_or("?")),
                if identical { "" } else { "  [DIFFERS FROM WHAT WAS DROPPED]" },
                if addressed { "" } else { "  [NOT ADDRESSED TO THIS RECIPIENT]" },
            ));
        }
    }
    Report { text, problems }
}
