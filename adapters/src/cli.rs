//! `justizbus xjustiz ...`: validate, translate, convert back and generate schemas.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::instance::{self, Limits};
use crate::{event, schemas, xml, Registry, Rejection};

/// Where the models come from.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelSource {
    /// XSD sets to compile (`DIR/<version>/xsd`, e.g. ../shared/xjustiz); default: the committed `schemas/`.
    #[arg(long)]
    pub xsd_dir: Option<PathBuf>,
    /// Generated schemas directory (default: `$JUSTIZBUS_SCHEMAS`, `./schemas`, or the one beside the binary's checkout).
    #[arg(long)]
    pub schemas: Option<PathBuf>,
}

impl ModelSource {
    /// Loads the registry this source names.
    pub fn load(&self) -> anyhow::Result<Registry> {
        if let Some(dir) = &self.xsd_dir {
            return Registry::from_xsd_root(dir).with_context(|| format!("compiling the XSD sets under {}", dir.display()));
        }
        let dir = self.schemas.clone().unwrap_or_else(default_schemas_dir);
        let registry = Registry::from_schemas(&dir.join("xjustiz")).with_context(|| format!("loading {}", dir.display()))?;
        if registry.versions().is_empty() {
            bail!("no compiled XJustiz models under {}/xjustiz (run `justizbus xjustiz generate-schemas`)", dir.display());
        }
        Ok(registry)
    }
}

/// The `schemas/` directory: `$JUSTIZBUS_SCHEMAS`, `./schemas`, the checkout the binary was
/// built in (`target/<profile>/justizbus` -> `schemas/`), or the source tree.
pub fn default_schemas_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("JUSTIZBUS_SCHEMAS") {
        return PathBuf::from(dir);
    }
    let candidates = [
        Some(PathBuf::from("schemas")),
        std::env::current_exe().ok().and_then(|exe| exe.parent()?.parent()?.parent().map(|p| p.join("schemas"))),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas")),
    ];
    candidates.into_iter().flatten().find(|d| d.join("xjustiz").is_dir()).unwrap_or_else(|| PathBuf::from("schemas"))
}

/// `justizbus xjustiz` subcommands.
#[derive(Subcommand, Debug)]
pub enum XJustizCommand {
    /// Validate an XJustiz file: prints `valid`, or each error with element path and line (exit 1).
    Validate {
        /// The XML file.
        file: PathBuf,
        /// Where the models come from.
        #[command(flatten)]
        source: ModelSource,
    },
    /// Print the event an XJustiz file becomes (envelope, canonical JSON data, metadata).
    Translate {
        /// The XML file.
        file: PathBuf,
        /// Where the models come from.
        #[command(flatten)]
        source: ModelSource,
    },
    /// Write XJustiz XML from an event (or `{"type","schema_version","data"}`) in JSON.
    ToXml {
        /// The JSON file (`-` for stdin).
        file: PathBuf,
        /// Where the models come from.
        #[command(flatten)]
        source: ModelSource,
    },
    /// Measure parse + validate + translate throughput on one core; prints one JSON summary.
    Bench {
        /// Documents to measure (default: the largest real samples in ../shared/xjustiz/samples).
        files: Vec<PathBuf>,
        /// Valid message to grow the synthetic document from (default: the largest valid sample, an EGVP 3.2.1 message).
        #[arg(long)]
        seed: Option<PathBuf>,
        /// Size of the synthetic document.
        #[arg(long, default_value_t = 50_000)]
        synthetic_bytes: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Also write the synthetic document to this file.
        #[arg(long)]
        write_synthetic: Option<PathBuf>,
        /// Where the models come from.
        #[command(flatten)]
        source: ModelSource,
    },
    /// Compile the XSD sets and write `schemas/` (JSON Schemas, definitions, compiled models).
    GenerateSchemas {
        /// XSD sets (`DIR/<version>/xsd`), e.g. ../shared/xjustiz.
        #[arg(long)]
        xsd_dir: PathBuf,
        /// Output directory.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
}

/// `justizbus adapter` subcommands.
#[derive(Subcommand, Debug)]
pub enum AdapterCommand {
    /// Publish XJustiz files and EGVP message folders dropped into a directory.
    Inbound(crate::adapter::InboundArgs),
    /// Write a participant's mailbox into a legacy inbox directory.
    Outbound(crate::adapter::OutboundArgs),
}

/// Runs a `justizbus adapter` subcommand.
pub async fn run_adapter(command: AdapterCommand) -> anyhow::Result<()> {
    match command {
        AdapterCommand::Inbound(args) => crate::adapter::inbound(args).await,
        AdapterCommand::Outbound(args) => crate::adapter::outbound(args).await,
    }
}

/// Runs a `justizbus xjustiz` subcommand.
pub fn run(command: XJustizCommand) -> anyhow::Result<()> {
    match command {
        XJustizCommand::Validate { file, source } => {
            let registry = source.load()?;
            let xml = read(&file)?;
            match registry.read(&xml) {
                Ok(_) => {
                    println!("valid");
                    Ok(())
                }
                Err(rejection) => {
                    let count = report(&file, &rejection);
                    bail!("{} is not valid ({count} error{})", file.display(), if count == 1 { "" } else { "s" })
                }
            }
        }
        XJustizCommand::Translate { file, source } => {
            let registry = source.load()?;
            let xml = read(&file)?;
            let message = registry.read(&xml).map_err(|r| anyhow::anyhow!("{}: {r}", file.display()))?;
            if let Some(release) = registry.release(&message.version) {
                registry.json.check(release, &message.message_type, &message.data).map_err(|e| anyhow::anyhow!(e.join("\n")))?;
            }
            let mut e = event::build(&message, &xml, Vec::new(), "justizbus-xjustiz-cli");
            e.headers
                .insert(event::headers::FILE_NAME.into(), file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            println!("{}", serde_json::to_string_pretty(&event::to_json(&e))?);
            Ok(())
        }
        XJustizCommand::ToXml { file, source } => {
            let registry = source.load()?;
            let text = if file.as_os_str() == "-" {
                let mut s = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                read(&file)?
            };
            let doc: Value = serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", file.display()))?;
            let xml = json_to_xml(&registry, &doc)?;
            std::io::stdout().write_all(xml.as_bytes())?;
            Ok(())
        }
        XJustizCommand::Bench { files, seed, synthetic_bytes, seconds, write_synthetic, source } => {
            let registry = source.load()?;
            let shared = std::env::var_os("JUSTIZBUS_SHARED").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("../shared"));
            let samples = shared.join("xjustiz/samples");
            let files = if files.is_empty() {
                vec![
                    samples.join("XJV-Viewer-for-XJustiz/Beispiel_synthetisch1.xml"),
                    samples.join("EGVP-Enterprise-Receiver/Testnachricht_xjustiz321/attachments/xjustiz_nachricht.xml"),
                ]
            } else {
                files
            };
            let seed =
                seed.unwrap_or_else(|| samples.join("EGVP-Enterprise-Receiver/Testnachricht_xjustiz321/attachments/xjustiz_nachricht.xml"));
            let duration = std::time::Duration::from_secs_f64(seconds.max(0.1));
            let mut results = Vec::new();
            for f in &files {
                results.push(crate::bench::measure(&registry, &f.display().to_string(), &read(f)?, duration));
            }
            let grown = crate::bench::synthetic(&registry, &read(&seed)?, synthetic_bytes)
                .with_context(|| format!("cannot grow {} to {synthetic_bytes} bytes", seed.display()))?;
            if let Some(path) = write_synthetic {
                std::fs::write(&path, &grown).with_context(|| format!("writing {}", path.display()))?;
            }
            results.push(crate::bench::measure(&registry, &format!("synthetic from {}", seed.display()), &grown, duration));
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "threads": 1, "results": results }))?);
            Ok(())
        }
        XJustizCommand::GenerateSchemas { xsd_dir, out } => {
            let registry = Registry::from_xsd_root(&xsd_dir).with_context(|| format!("compiling {}", xsd_dir.display()))?;
            let written = schemas::generate(&registry, &out)?;
            let bytes: u64 = written.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
            println!("{} files, {} bytes, releases {}", written.len(), bytes, registry.versions().join(", "));
            Ok(())
        }
    }
}

/// XML for `{"type","schema_version","data"}`: the data is checked against its JSON Schema
/// (with the `jsonschema` crate), written, and the result validated against the XSD model.
pub fn json_to_xml(registry: &Registry, doc: &Value) -> anyhow::Result<String> {
    let field = |k: &str| doc.get(k).and_then(Value::as_str).with_context(|| format!("the JSON has no \"{k}\" string"));
    let (message_type, version) = (field("type")?, field("schema_version")?);
    let data = doc.get("data").context("the JSON has no \"data\"")?;
    let release = registry
        .release(version)
        .with_context(|| format!("XJustiz {version} is not a known release (known: {})", registry.versions().join(", ")))?;
    registry.json.check(release, message_type, data).map_err(|e| anyhow::anyhow!("data does not match its schema:\n{}", e.join("\n")))?;
    let root = crate::xsd::QName::new(crate::registry::XJUSTIZ_NS, message_type);
    let xml = xml::to_xml(release, &root, data).map_err(|e| anyhow::anyhow!("{e}"))?;
    let parsed = instance::parse(xml.as_bytes(), Limits::default()).map_err(|e| anyhow::anyhow!("written XML: {e}"))?;
    if let Err(r) = registry.read_parsed(xml.as_bytes(), &parsed) {
        bail!("the written XML is not valid:\n{r}");
    }
    Ok(xml)
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

/// Prints each error as `FILE:LINE: PATH: message`; returns how many.
pub fn report(file: &Path, rejection: &Rejection) -> usize {
    let name = file.display();
    match rejection {
        Rejection::Invalid(issues) => {
            for i in issues {
                println!("{name}:{}: {}: {}", i.line, i.path, i.message);
            }
            issues.len()
        }
        Rejection::Syntax(e) => {
            println!("{name}:{}: not well-formed: {}", e.line, e.message);
            1
        }
        Rejection::NotXJustiz { line, message } => {
            println!("{name}:{line}: {message}");
            1
        }
        Rejection::UnknownVersion { line, version, known } => {
            println!("{name}:{line}: xjustizVersion \"{version}\" is not a known release (known: {})", known.join(", "));
            1
        }
    }
}
