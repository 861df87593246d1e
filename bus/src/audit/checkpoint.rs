//! Signed checkpoints: Ed25519 signatures over (topic, partition, offset, chain value, time).
//!
//! The signing key is a PKCS#8 PEM file (`justizbus audit keygen`, or `openssl genpkey
//! -algorithm ed25519`); the public key travels as 64 hex digits (`justizbus audit key`).

use std::path::Path;

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use super::chain::{hex, unhex, ChainHash};
use crate::{Error, Result};

/// What the signature covers is prefixed with this, so it cannot be mistaken for anything else.
const DOMAIN: &[u8] = b"justizbus.checkpoint.v1\0";

/// A signed statement: the chain of `topic`/`partition` had value `chain` after `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The last offset covered.
    pub offset: u64,
    /// h(offset), hex.
    pub chain: String,
    /// When it was signed (ms since the epoch).
    pub time_ms: i64,
    /// The signer's public key, hex (which key; trusting it is the verifier's decision).
    pub key: String,
    /// Ed25519 signature over [`Checkpoint::signed_bytes`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// The bytes the signature covers.
    pub fn signed_bytes(topic: &str, partition: u32, offset: u64, chain: &ChainHash, time_ms: i64) -> Vec<u8> {
        let mut b = Vec::with_capacity(DOMAIN.len() + topic.len() + 56);
        b.extend_from_slice(DOMAIN);
        b.extend_from_slice(&(topic.len() as u32).to_le_bytes());
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(&partition.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(chain);
        b.extend_from_slice(&time_ms.to_le_bytes());
        b
    }

    /// The chain value as bytes (None when malformed).
    pub fn chain_hash(&self) -> Option<ChainHash> {
        unhex(&self.chain)
    }

    /// Checks the signature with a trusted key. Err says what is wrong.
    pub fn check_signature(&self, key: &PublicKey) -> std::result::Result<(), String> {
        let chain = self.chain_hash().ok_or("chain value is not 64 hex digits")?;
        let signature = unhex::<64>(&self.signature).ok_or("signature is not 128 hex digits")?;
        let message = Self::signed_bytes(&self.topic, self.partition, self.offset, &chain, self.time_ms);
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&message, &signature)
            .map_err(|_| format!("signature does not verify with key {}", key.hex()))
    }
}

/// Name of the file beside a partition's segments (embedded log) that holds its checkpoints,
/// one JSON object per line.
pub const CHECKPOINT_FILE: &str = "checkpoints.jsonl";

/// Parses a checkpoints file: the checkpoints, and the lines that are not one (numbered from
/// 1), except an incomplete last line (an append cut short by a crash).
pub fn parse_checkpoint_lines(text: &str) -> (Vec<Checkpoint>, Vec<(usize, String)>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Checkpoint>(line) {
            Ok(cp) => good.push(cp),
            Err(_) if i + 1 == lines.len() && !complete => {}
            Err(e) => bad.push((i + 1, e.to_string())),
        }
    }
    (good, bad)
}

/// The contents of the first PEM block labelled `label`; None when there is none or its base64
/// is broken.
fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let body: String = text.lines().skip_while(|l| l.trim() != begin).skip(1).take_while(|l| l.trim() != end).map(str::trim).collect();
    if body.is_empty() {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// An Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Hex form.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 64 hex digits, or reads a file holding them, a PEM `PUBLIC KEY` (as `openssl pkey
    /// -pubout` writes it) or a signing key (whose public half is taken).
    pub fn parse(text_or_file: &str) -> Result<PublicKey> {
        if let Some(k) = unhex::<32>(text_or_file) {
            return Ok(PublicKey(k));
        }
        let path = Path::new(text_or_file);
        if !path.is_file() {
            return Err(Error::invalid("key", format!("{text_or_file:?} is neither 64 hex digits nor a readable key file")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if let Some(k) = unhex::<32>(text.trim()) {
            return Ok(PublicKey(k));
        }
        if let Some(der) = pem_block(&text, "PUBLIC KEY") {
            // SubjectPublicKeyInfo of an Ed25519 key: a fixed 12-byte prefix, then the key.
            const PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
            return match der.strip_prefix(&PREFIX[..]).and_then(|k| <[u8; 32]>::try_from(k).ok()) {
                Some(k) => Ok(PublicKey(k)),
                None => Err(Error::invalid("key", format!("{}: the PUBLIC KEY is not an Ed25519 key", path.display()))),
            };
        }
        if pem_block(&text, "PRIVATE KEY").is_some() {
            return Ok(Signer::from_pem(&text, path)?.public_key());
        }
        Err(Error::invalid("key", format!("{}: neither 64 hex digits nor a PEM PUBLIC KEY or PRIVATE KEY", path.display())))
    }
}

/// The keys a verifier trusts: a checkpoint counts when one of them signed it (several, so
/// that a log signed before and after a key change verifies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKeys(pub Vec<PublicKey>);

impl TrustedKeys {
    /// Parses each of `texts` with [`PublicKey::parse`].
    pub fn parse(texts: &[String]) -> Result<TrustedKeys> {
        if texts.is_empty() {
            return Err(Error::invalid("key", "give the trusted public key (--key)"));
        }
        texts.iter().map(|t| PublicKey::parse(t)).collect::<Result<Vec<_>>>().map(TrustedKeys)
    }

    /// Checks a checkpoint's signature against the trusted keys.
    pub fn check(&self, checkpoint: &Checkpoint) -> std::result::Result<(), String> {
        if self.0.iter().any(|k| checkpoint.check_signature(k).is_ok()) {
            return Ok(());
        }
        Err(format!("signature does not verify with the trusted key{} {}", if self.0.len() > 1 { "s" } else { "" }, self.hex()))
    }

    /// The keys in hex, comma-separated.
    pub fn hex(&self) -> String {
        self.0.iter().map(PublicKey::hex).collect::<Vec<_>>().join(", ")
    }
}

impl From<PublicKey> for TrustedKeys {
    fn from(key: PublicKey) -> Self {
        TrustedKeys(vec![key])
    }
}

/// The bus's checkpoint signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.public_key().hex())
    }
}

impl Signer {
    /// Loads a PKCS#8 PEM private key file.
    pub fn load(path: &Path) -> Result<Signer> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading signing key {}", path.display()), e))?;
        Self::from_pem(&text, path)
    }

    fn from_pem(text: &str, path: &Path) -> Result<Signer> {
        let bad = |why: String| Error::invalid("signing key", format!("{}: {why}", path.display()));
        let der = pem_block(text, "PRIVATE KEY").ok_or_else(|| bad("no valid PEM block \"PRIVATE KEY\" (PKCS#8) found".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| bad(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        Ok(Signer { pair })
    }

    /// Writes a new key to `path` (mode 0600), refusing to overwrite one.
    pub fn generate(path: &Path) -> Result<Signer> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| Error::invalid("key", format!("generating a key: {e}")))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        file.write_all(pem.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Self::from_pem(&pem, path)
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    /// Signs a checkpoint.
    pub fn sign(&self, topic: &str, partition: u32, offset: u64, chain: &ChainHash, time_ms: i64) -> Checkpoint {
        let signature = self.pair.sign(&Checkpoint::signed_bytes(topic, partition, offset, chain, time_ms));
        Checkpoint {
            topic: topic.to_string(),
            partition,
            offset,
            chain: hex(chain),
            time_ms,
            key: self.public_key().hex(),
            signature: hex(signature.as_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_only_unchanged_and_with_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = Signer::generate(&dir.path().join("k.pem")).expect("generate");
        assert!(Signer::generate(&dir.path().join("k.pem")).is_err(), "never overwrites a key");
        let again = Signer::load(&dir.path().join("k.pem")).expect("load");
        assert_eq!(again.public_key(), signer.public_key());
        let key = signer.public_key();
        let cp = signer.sign("t", 1, 41, &[7u8; 32], 1000);
        cp.check_signature(&key).expect("verifies");
        for altered in [
            Checkpoint { offset: 42, ..cp.clone() },
            Checkpoint { partition: 0, ..cp.clone() },
            Checkpoint { topic: "u".into(), ..cp.clone() },
            Checkpoint { chain: hex(&[8u8; 32]), ..cp.clone() },
            Checkpoint { time_ms: 1001, ..cp.clone() },
        ] {
            assert!(altered.check_signature(&key).is_err(), "{altered:?}");
        }
        let other = Signer::generate(&dir.path().join("other.pem")).expect("generate").public_key();
        assert!(cp.check_signature(&other).is_err());
        assert_eq!(PublicKey::parse(&key.hex()).expect("hex"), key);
        assert_eq!(PublicKey::parse(dir.path().join("k.pem").to_str().expect("utf8")).expect("pem"), key);
        // A PEM public key as `openssl pkey -pubout` writes it.
        let mut spki = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        spki.extend_from_slice(&key.0);
        let pem =
            format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", base64::engine::general_purpose::STANDARD.encode(&spki));
        std::fs::write(dir.path().join("pub.pem"), pem).expect("write");
        assert_eq!(PublicKey::parse(dir.path().join("pub.pem").to_str().expect("utf8")).expect("public pem"), key);
        std::fs::write(dir.path().join("junk.pem"), "hello").expect("write");
        let err = PublicKey::parse(dir.path().join("junk.pem").to_str().expect("utf8")).expect_err("junk");
        assert!(err.to_string().contains("neither"), "{err}");
        // A key made by `openssl genpkey -algorithm ed25519` (PKCS#8 v1, no public key inside);
        // its public half as `openssl pkey -pubout` prints it.
        let openssl =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIPqM25SbkgHbvul9Lgsmfl1u0o1VGS3h+zxQ5g26nhk7\n-----END PRIVATE KEY-----\n";
        std::fs::write(dir.path().join("openssl.pem"), openssl).expect("write");
        let loaded = Signer::load(&dir.path().join("openssl.pem")).expect("an openssl key loads");
        assert_eq!(loaded.public_key().hex(), "1af37aadfcd6d089edf65bee6105e75790aedc25c81346c354a7162e953215ed");
        // Several trusted keys: a checkpoint of either counts (a key change).
        assert!(TrustedKeys(vec![other]).check(&cp).is_err());
        TrustedKeys(vec![other, key]).check(&cp).expect("the second key");
    }
}
