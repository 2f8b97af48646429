//! The chunk hashes of files sent before, so that a sender need not hash
//! an unchanged file again.
//!
//! An entry is keyed by what any change to a file moves: its device and
//! inode, size, modification time and change time (to the nanosecond),
//! and the chunk size. A write, a truncation, a `touch` that puts the old
//! modification time back, a rename over it: each gives a new change time
//! or a new inode, so the old entry is never found again.
//!
//! One hole is left by the clocks: the kernel stamps files from a clock that
//! moves in ticks, so two writes within one tick, at the same size, can
//! leave the same key. An entry is therefore kept only if the file had not
//! changed for [`SETTLED`] when its hashing began (git calls such files
//! "racily clean" and treats them the same way), and only if the key was
//! the same before and after the hashing. Such a file is hashed again
//! until it has settled.
//!
//! The cache holds at most its capacity in bytes of hashes (each entry
//! costs its chunks' 32 bytes plus [`ENTRY_COST`]); the oldest entries go
//! first. A receiver checks every chunk whatever the sender believed, so a
//! wrong entry would fail a transfer, never change what arrives.

use std::collections::{HashMap, VecDeque};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blake3::hazmat::ChainingValue;

/// How long a file must have been left alone before its hashes are kept.
pub const SETTLED: Duration = Duration::from_secs(2);

/// What an entry costs beside its hashes (key, bookkeeping).
pub const ENTRY_COST: usize = 192;

/// The chunk hashes of one whole file, in file order.
pub type Chunks = Arc<[ChainingValue]>;

/// What identifies one version of one file, for one chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    chunk: u64,
}

impl Key {
    pub fn of(meta: &Metadata, chunk: u64) -> Key {
        Key {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            chunk,
        }
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Whether the file had not changed for [`SETTLED`] at `at`.
    pub fn settled_at(&self, at: SystemTime) -> bool {
        let Ok(at) = at.duration_since(UNIX_EPOCH) else {
            return false;
        };
        let Some(limit) = at.checked_sub(SETTLED) else {
            return false;
        };
        let before = |(secs, nanos): (i64, i64)| {
            let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
                return false;
            };
            Duration::new(secs, nanos) < limit
        };
        before(self.mtime) && before(self.ctime)
    }

    /// How many chunks a file of this key has.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk.max(1))
    }
}

/// The cache, shared by every session of a server.
pub struct ChunkCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Chunks>,
    /// Keys from oldest to newest.
    order: VecDeque<Key>,
    bytes: usize,
}

fn cost(chunks: usize) -> usize {
    chunks.saturating_mul(32).saturating_add(ENTRY_COST)
}

impl ChunkCache {
    /// A cache of at most `capacity` bytes; 0 keeps nothing.
    pub fn new(capacity: u64) -> ChunkCache {
        ChunkCache {
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
            inner: Mutex::default(),
        }
    }

    /// Whether a file of `key` could be kept: worth collecting its hashes.
    pub fn would_keep(&self, key: &Key) -> bool {
        usize::try_from(key.chunks()).is_ok_and(|n| cost(n) <= self.capacity)
    }

    /// The hashes of the file version `key`, if known.
    pub fn get(&self, key: &Key) -> Option<Chunks> {
        self.lock().map.get(key).cloned()
    }

    /// Keeps `chunks`, hashed from a file whose key was `key` both when
    /// hashing began at `began` and after it ended; ignored unless the file
    /// had settled by then and the hashes cover it.
    pub fn put(&self, key: Key, began: SystemTime, chunks: Vec<ChainingValue>) {
        let cost = cost(chunks.len());
        if chunks.len() as u64 != key.chunks() || !key.settled_at(began) || cost > self.capacity {
            return;
        }
        let mut inner = self.lock();
        if inner.map.insert(key, chunks.into()).is_none() {
            inner.bytes += cost;
            inner.order.push_back(key);
        }
        while inner.bytes > self.capacity {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(gone) = inner.map.remove(&old) {
                inner.bytes -= self::cost(gone.len());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(data: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        (dir, path)
    }

    fn later() -> SystemTime {
        SystemTime::now() + SETTLED + Duration::from_secs(1)
    }

    #[test]
    fn an_entry_is_found_by_the_same_version_only() {
        let (_dir, path) = file_with(&[7; 3000]);
        let cache = ChunkCache::new(1 << 20);
        let key = Key::of(&std::fs::metadata(&path).unwrap(), 1024);
        cache.put(key, later(), vec![[1; 32]; 3]);
        assert_eq!(cache.get(&key).unwrap().len(), 3);
        // Another chunk size is another entry.
        let other = Key::of(&std::fs::metadata(&path).unwrap(), 2048);
        assert!(cache.get(&other).is_none());
        // A write in place, the same size, the old modification time put back.
        let before = std::fs::metadata(&path).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        f.write_all(&[8]).unwrap();
        f.set_modified(before.modified().unwrap()).unwrap();
        drop(f);
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(after.modified().unwrap(), before.modified().unwrap());
        assert!(cache.get(&Key::of(&after, 1024)).is_none());
    }

    #[test]
    fn a_file_changed_lately_is_not_kept() {
        let (_dir, path) = file_with(b"fresh");
        let cache = ChunkCache::new(1 << 20);
        let key = Key::of(&std::fs::metadata(&path).unwrap(), 1024);
        cache.put(key, SystemTime::now(), vec![[1; 32]]);
        assert!(cache.get(&key).is_none());
        cache.put(key, later(), vec![[1; 32]]);
        assert!(cache.get(&key).is_some());
    }

    #[test]
    fn hashes_that_do_not_cover_the_file_are_not_kept() {
        let (_dir, path) = file_with(&[0; 5000]);
        let cache = ChunkCache::new(1 << 20);
        let key = Key::of(&std::fs::metadata(&path).unwrap(), 1024);
        cache.put(key, later(), vec![[1; 32]; 4]);
        assert!(cache.get(&key).is_none());
    }

    #[test]
    fn the_oldest_entries_go_past_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Key> = (0..4)
            .map(|i| {
                let path = dir.path().join(i.to_string());
                std::fs::write(&path, [0u8; 100]).unwrap();
                Key::of(&std::fs::metadata(&path).unwrap(), 1024)
            })
            .collect();
        // Room for two entries of one chunk.
        let cache = ChunkCache::new(2 * cost(1) as u64);
        for k in &keys {
            cache.put(*k, later(), vec![[1; 32]]);
        }
        let kept: Vec<bool> = keys.iter().map(|k| cache.get(k).is_some()).collect();
        assert_eq!(kept, [false, false, true, true]);
        // Nothing is kept by a cache of no bytes.
        let none = ChunkCache::new(0);
        assert!(!none.would_keep(&keys[0]));
        none.put(keys[0], later(), vec![[1; 32]]);
        assert!(none.get(&keys[0]).is_none());
    }
}
