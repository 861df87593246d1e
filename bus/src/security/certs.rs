//! `justizbus certs`: a test certificate authority with a server certificate and one client
//! certificate per participant (the participant id as common name), made with rcgen.
//!
//! For tests, demos and first steps; a production deployment takes its certificates from the
//! justice PKI, and the bus only needs their PEM files (`[tls]` in the server config).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use time::{Duration, OffsetDateTime};

use crate::{Error, Result};

fn tls_err(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Tls(format!("{what}: {e}"))
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start.
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - Duration::hours(1), not_after: now + Duration::days(days) }
    }

    /// A period that ended yesterday (for tests of refused certificates).
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - Duration::days(30), not_after: now - Duration::days(1) }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate.
    pub cert_pem: String,
    /// Private key (PKCS#8).
    pub key_pem: String,
}

/// A certificate authority that can issue server and participant certificates.
pub struct Authority {
    /// The CA's certificate (PEM), what servers and clients trust.
    pub cert_pem: String,
    /// The CA's private key (PEM).
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn create(name: &str, validity: Validity) -> Result<Self> {
        let key = KeyPair::generate().map_err(tls_err("generating the CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err("CA parameters"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key).map_err(tls_err("signing the CA certificate"))?;
        let key_pem = key.serialize_pem();
        Ok(Authority { cert_pem: cert.pem(), key_pem, issuer: Issuer::new(params, key) })
    }

    /// A CA from its PEM files (to issue more certificates later).
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(format!("reading {}", p.display()), e));
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let key_pair = KeyPair::from_pem(&key_pem).map_err(tls_err("reading the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(tls_err("reading the CA certificate"))?;
        Ok(Authority { cert_pem, key_pem, issuer })
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Issued> {
        let key = KeyPair::generate().map_err(tls_err("generating a key"))?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(tls_err("signing a certificate"))?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A server certificate for `hosts` (DNS names or IP addresses).
    pub fn server(&self, hosts: &[String], validity: Validity) -> Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err("server parameters"))?;
        for h in hosts {
            let san = match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.clone().try_into().map_err(tls_err("server host name"))?),
            };
            params.subject_alt_names.push(san);
        }
        self.issue(params, hosts.first().map_or("justizbus", String::as_str), ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// A client certificate for participant `id` (its common name).
    pub fn participant(&self, id: &str, validity: Validity) -> Result<Issued> {
        let params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err("participant parameters"))?;
        self.issue(params, id, ExtendedKeyUsagePurpose::ClientAuth, validity)
    }
}

/// Writes a PEM file; keys are readable by the owner only.
pub fn write_pem(path: &Path, pem: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    f.write_all(pem.as_bytes()).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Paths of one issued certificate in an output directory: `<name>.pem` and `<name>.key`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}

/// Writes `issued` as `<name>.pem`/`<name>.key` below `dir`.
pub fn write_issued(dir: &Path, name: &str, issued: &Issued) -> Result<()> {
    let (cert, key) = paths(dir, name);
    write_pem(&cert, &issued.cert_pem, false)?;
    write_pem(&key, &issued.key_pem, true)
}

/// `justizbus certs`: writes `ca.pem`/`ca.key` (kept if present, so more participants can be
/// added later), `server.pem`/`server.key`, and `<participant id>.pem`/`.key` per participant.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Participants directory (TOML): a certificate for every participant in it.
    #[arg(long)]
    pub directory: Option<PathBuf>,
    /// A participant id to issue a certificate for (repeatable).
    #[arg(long = "participant")]
    pub participants: Vec<String>,
    /// Host names and IP addresses of the server certificate (repeatable).
    #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
    pub hosts: Vec<String>,
    /// Validity of new certificates in days.
    #[arg(long, default_value_t = 365)]
    pub days: i64,
}

/// What `justizbus certs` wrote.
#[derive(Debug, serde::Serialize)]
pub struct CertsSummary {
    /// The CA certificate (what `[tls] client_ca` and clients' `--tls-ca` name).
    pub ca: PathBuf,
    /// Whether the CA was made now (else an existing one issued the certificates).
    pub ca_created: bool,
    /// The server certificate.
    pub server: PathBuf,
    /// Participant certificates written.
    pub participants: Vec<PathBuf>,
}

/// Runs `justizbus certs`.
pub fn run(args: &CertsArgs) -> Result<CertsSummary> {
    let mut ids = args.participants.clone();
    if let Some(path) = &args.directory {
        ids.extend(crate::routing::directory::Directory::load(path)?.participants().iter().map(|p| p.id.clone()));
    }
    for id in &ids {
        if id.is_empty() || id.contains(['/', '\\']) || id == "ca" || id == "server" || id.starts_with('.') {
            return Err(Error::invalid("participant", format!("{id:?} cannot name a certificate file")));
        }
    }
    if args.days < 1 {
        return Err(Error::invalid("days", "must be at least 1"));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(format!("creating {}", args.out.display()), e))?;
    let validity = Validity::days(args.days);
    let (ca_cert, ca_key) = paths(&args.out, "ca");
    let ca_created = !(ca_cert.exists() && ca_key.exists());
    let ca = if ca_created {
        // A name of its own, so that certificates of another test CA are told apart by issuer.
        let name = format!("Justizbus test CA {}", uuid::Uuid::now_v7().simple());
        let ca = Authority::create(&name, Validity::days(args.days.max(3650)))?;
        write_pem(&ca_cert, &ca.cert_pem, false)?;
        write_pem(&ca_key, &ca.key_pem, true)?;
        ca
    } else {
        Authority::load(&ca_cert, &ca_key)?
    };
    write_issued(&args.out, "server", &ca.server(&args.hosts, validity)?)?;
    let mut participants = Vec::with_capacity(ids.len());
    for id in &ids {
        write_issued(&args.out, id, &ca.participant(id, validity)?)?;
        participants.push(paths(&args.out, id).0);
    }
    tracing::info!(out = %args.out.display(), ca_created, participants = participants.len(), "certificates written");
    Ok(CertsSummary { ca: ca_cert, ca_created, server: paths(&args.out, "server").0, participants })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participant_certificate_names_the_participant() {
        let ca = Authority::create("test CA", Validity::days(1)).expect("ca");
        let issued = ca.participant("DE.Justiz.abc.1", Validity::days(1)).expect("issue");
        use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("pem");
        assert_eq!(crate::security::tls::participant_id(&der).expect("cn"), "DE.Justiz.abc.1");
    }

    #[test]
    fn an_existing_ca_issues_more_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = |p: &str| CertsArgs {
            out: dir.path().into(),
            directory: None,
            participants: vec![p.into()],
            hosts: vec!["localhost".into()],
            days: 2,
        };
        let first = run(&args("a")).expect("first");
        let ca = std::fs::read_to_string(&first.ca).expect("ca");
        let second = run(&args("b")).expect("second");
        assert!(first.ca_created && !second.ca_created);
        assert_eq!(std::fs::read_to_string(&second.ca).expect("ca"), ca, "the CA is kept");
        assert!(run(&args("../x")).is_err(), "ids that escape the directory are refused");
    }
}
