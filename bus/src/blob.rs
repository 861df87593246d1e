//! Content-addressed blob store: documents attached to events, named by their SHA-256.
//!
//! Layout under `<data_dir>/blobs`: `sha256/<first two hex digits>/<hex>` for stored blobs and
//! `tmp/` for uploads in progress. An upload is written to a temporary file, fsynced, checked
//! against its hash and only then renamed into place (and the directory fsynced), so a crash
//! leaves either the whole blob or nothing; stale temporary files are removed at start.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Chunk size of downloads.
pub const CHUNK: usize = 64 * 1024;

/// A stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Lower-case hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The blob store of one server.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    max_bytes: u64,
}

/// Whether `s` is 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io { context: path.display().to_string(), source: e }
}

impl BlobStore {
    /// Opens (creating) the store under `root`; removes uploads a crash left behind.
    pub fn open(root: &Path, max_bytes: u64) -> Result<BlobStore> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        std::fs::create_dir_all(root.join("sha256")).map_err(|e| io(root, e))?;
        for entry in std::fs::read_dir(&tmp).map_err(|e| io(&tmp, e))?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(BlobStore { root: root.to_path_buf(), max_bytes })
    }

    /// Largest blob accepted.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Where a stored blob's file is.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(&sha256[..2]).join(sha256)
    }

    /// A stored blob's size, or `None`.
    pub fn stat(&self, sha256: &str) -> Result<Option<BlobInfo>> {
        if !is_sha256_hex(sha256) {
            return Err(Error::invalid("sha256", "must be 64 lower-case hex digits"));
        }
        match std::fs::metadata(self.path_of(sha256)) {
            Ok(m) => Ok(Some(BlobInfo { sha256: sha256.to_string(), size: m.len() })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&self.path_of(sha256), e)),
        }
    }

    /// Starts an upload.
    pub fn begin(&self) -> Result<Upload> {
        let path = self.root.join("tmp").join(uuid::Uuid::now_v7().to_string());
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        Ok(Upload { path, file: Some(std::io::BufWriter::with_capacity(CHUNK, file)), hasher: Sha256::new(), size: 0, max: self.max_bytes })
    }

    /// Finishes an upload: checks the expected hash and size (when given) and stores the blob.
    pub fn commit(&self, mut upload: Upload, expected_sha256: &str, expected_size: u64) -> Result<BlobInfo> {
        let file = upload.file.take().ok_or_else(|| Error::Internal("upload finished twice".into()))?;
        let file = file.into_inner().map_err(|e| io(&upload.path, e.into_error()))?;
        file.sync_data().map_err(|e| io(&upload.path, e))?;
        drop(file);
        let sha256: String = upload.hasher.clone().finalize().iter().map(|b| format!("{b:02x}")).collect();
        if !expected_sha256.is_empty() && expected_sha256 != sha256 {
            return Err(Error::invalid("header.sha256", format!("the content's SHA-256 is {sha256}, not {expected_sha256}")));
        }
        if expected_size != 0 && expected_size != upload.size {
            return Err(Error::invalid("header.size", format!("the content has {} bytes, not {expected_size}", upload.size)));
        }
        let target = self.path_of(&sha256);
        if target.exists() {
            return Ok(BlobInfo { sha256, size: upload.size });
        }
        let dir = target.parent().map(Path::to_path_buf).unwrap_or_default();
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        std::fs::rename(&upload.path, &target).map_err(|e| io(&target, e))?;
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io(&dir, e))?;
        tracing::info!(sha256 = %sha256, size = upload.size, "blob stored");
        Ok(BlobInfo { sha256, size: upload.size })
    }

    /// Opens a stored blob for reading.
    pub fn open_blob(&self, sha256: &str) -> Result<Option<std::fs::File>> {
        if !is_sha256_hex(sha256) {
            return Err(Error::invalid("sha256", "must be 64 lower-case hex digits"));
        }
        match std::fs::File::open(self.path_of(sha256)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&self.path_of(sha256), e)),
        }
    }
}

/// An upload in progress; dropped unfinished, its temporary file is removed.
#[derive(Debug)]
pub struct Upload {
    path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    hasher: Sha256,
    size: u64,
    max: u64,
}

impl Upload {
    /// Appends a chunk.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.size += chunk.len() as u64;
        if self.size > self.max {
            return Err(Error::BlobTooLarge { limit: self.max });
        }
        self.hasher.update(chunk);
        let file = self.file.as_mut().ok_or_else(|| Error::Internal("upload already finished".into()))?;
        file.write_all(chunk).map_err(|e| io(&self.path, e))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_hash_and_checks_what_is_expected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path(), 1024).expect("opens");
        let mut up = store.begin().expect("begin");
        up.write(b"hello ").expect("write");
        up.write(b"world").expect("write");
        let info = store.commit(up, "", 11).expect("commit");
        assert_eq!(info.sha256, "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
        assert_eq!(store.stat(&info.sha256).expect("stat"), Some(info.clone()));
        // A wrong expected hash stores nothing.
        let mut up = store.begin().expect("begin");
        up.write(b"other").expect("write");
        let wrong = "0".repeat(64);
        assert!(store.commit(up, &wrong, 0).is_err());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
        assert_eq!(store.stat(&wrong).expect("stat"), None);
        // Too large.
        let mut up = store.begin().expect("begin");
        assert!(up.write(&[0; 2000]).is_err());
        assert!(store.stat("not-hex").is_err());
    }
}
