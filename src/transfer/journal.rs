//! Resume journals, on both ends: what an unfinished transfer is, and how
//! many of its bytes are durable.
//!
//! A journal is a small TOML file, replaced atomically (write a temp file,
//! fsync, rename, fsync the directory). The receiver fsyncs the partial file
//! before a journal claims its bytes, so after a crash the journal never
//! claims more than the disk holds. Journals are untrusted input all the same
//! (a hand edit, a disk error): a journal that does not parse is discarded,
//! and a resume only ever starts at an offset whose bytes both ends have
//! proven equal by their BLAKE3 (see `transfer`).
//!
//! Where they live: the server's in `var/partial/USER/`, beside the partial
//! uploads; the client's in its state directory (see `client::state_dir`).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    /// `upload` or `download`.
    pub kind: String,
    /// Where the bytes come from (a local path, or a remote virtual path).
    pub source: String,
    /// Where they go.
    pub target: String,
    /// Size of the whole file being transferred.
    pub size: u64,
    /// Modification time of the source when the transfer began (seconds).
    pub mtime: i64,
    /// Inode of a local source, 0 if unknown.
    pub inode: u64,
    /// Chunk size of the transfer (resume offers are whole chunks).
    #[serde(default)]
    pub chunk: u64,
    /// Bytes of the partial file known to be on disk.
    pub verified: u64,
    /// Unix time of the last save.
    pub updated: u64,
}

impl Record {
    /// A new record of `kind` (`upload` or `download`) with nothing durable yet.
    pub fn new(kind: &str, source: String, target: String, size: u64, chunk: u64) -> Record {
        Record {
            version: VERSION,
            kind: kind.into(),
            source,
            target,
            size,
            mtime: 0,
            inode: 0,
            chunk,
            verified: 0,
            updated: 0,
        }
    }
}

/// A journal file and its current record.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
    pub record: Record,
}

impl Journal {
    pub fn new(path: PathBuf, record: Record) -> Journal {
        Journal { path, record }
    }

    /// Reads a journal. Missing gives `Ok(None)`; damaged or of another
    /// version is an error the caller logs before starting afresh.
    pub fn load(path: &Path) -> Result<Option<Record>, String> {
        let text = match fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read journal {}: {e}", path.display())),
        };
        if text.len() > 64 * 1024 {
            return Err(format!("journal {} is too large", path.display()));
        }
        Journal::parse(&text)
            .map(Some)
            .map_err(|e| format!("journal {}: {e}", path.display()))
    }

    /// Parses a journal's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Record, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?;
        let record: Record = toml::from_str(text).map_err(|e| format!("damaged: {e}"))?;
        if record.version != VERSION {
            return Err(format!("unknown version {}", record.version));
        }
        Ok(record)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `verified` bytes as durable. The caller has fsynced them.
    pub fn save(&mut self, verified: u64) -> io::Result<()> {
        self.record.verified = verified;
        self.record.updated = crate::clock::now_secs();
        let text = toml::to_string(&self.record).map_err(io::Error::other)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        fs::File::open(dir)?.sync_all()
    }

    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A stable file name for a transfer, from what identifies it.
pub fn key(parts: &[&str]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().to_hex()[..32].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            version: VERSION,
            kind: "upload".into(),
            source: "a b".into(),
            target: "/x".into(),
            size: 10,
            mtime: 1,
            inode: 2,
            chunk: 1024,
            verified: 0,
            updated: 0,
        }
    }

    #[test]
    fn save_load_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.toml");
        assert_eq!(Journal::load(&path).unwrap(), None);
        let mut j = Journal::new(path.clone(), record());
        j.save(7).unwrap();
        assert_eq!(Journal::load(&path).unwrap().unwrap().verified, 7);
        for bad in [
            &b"\0\0\0\0"[..],
            b"version = 1\n",
            b"\xff\xfe",
            b"verified = \"x\"",
        ] {
            fs::write(&path, bad).unwrap();
            assert!(Journal::load(&path).is_err());
        }
        let mut r = record();
        r.version = 9;
        fs::write(&path, toml::to_string(&r).unwrap()).unwrap();
        assert!(Journal::load(&path).is_err());
        j.remove();
        assert!(!path.exists());
    }

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
        assert_eq!(key(&["x"]).len(), 32);
    }
}
