//! Property tests of the pure parts that face untrusted input: request
//! lines, frame headers, paths, journals and the quota ledger. They run a
//! bounded number of cases, so CI time stays fixed.

use ftpx::protocol::VPath;
use ftpx::protocol::{FRAME_HEADER_LEN, FrameHeader, Request, quote, split_commands};
use ftpx::store::quota::{Ledger, Limits, Scan, Usage};
use proptest::prelude::*;

fn adversarial_part() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just(String::new()),
        Just("a".to_string()),
        Just("%2e%2e".to_string()),
        Just("．．".to_string()),
        Just("\u{2024}\u{2024}".to_string()),
        Just("\\".to_string()),
        Just("\0".to_string()),
        Just("x".repeat(255)),
        Just("x".repeat(256)),
        "[a-zé文 ]{1,8}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_line_parses_or_errors_without_panicking(line in "\\PC{0,200}") {
        let _ = Request::parse(&line);
        let _ = split_commands(&line, true);
    }

    #[test]
    fn quoted_words_round_trip(s in "[^\\p{Cc}]{0,64}") {
        let line = format!("DELE {}", quote(&s));
        prop_assert_eq!(Request::parse(&line), Ok(Request::Dele(s)));
    }

    #[test]
    fn any_frame_header_decodes_or_errors(bytes in proptest::collection::vec(any::<u8>(), FRAME_HEADER_LEN)) {
        let arr: [u8; FRAME_HEADER_LEN] = bytes.try_into().unwrap();
        if let Ok(h) = FrameHeader::decode(&arr) {
            prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }
    }

    #[test]
    fn resolved_paths_are_folded_and_stable(
        cwd in proptest::collection::vec("[a-z]{1,3}", 0..4),
        parts in proptest::collection::vec(adversarial_part(), 0..12),
        absolute in any::<bool>(),
    ) {
        let cwd = VPath::resolve(&VPath::root(), &format!("/{}", cwd.join("/")), 4096).unwrap();
        let arg = format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"));
        if let Ok(p) = VPath::resolve(&cwd, &arg, 4096) {
            let shown = p.to_string();
            prop_assert!(shown.starts_with('/'));
            for part in shown.split('/').skip(1) {
                prop_assert!(part != ".." && part != "." && (part.is_empty() == (shown == "/")));
                prop_assert!(!part.contains('\\') && !part.contains('\0'));
            }
            // Resolving the result again changes nothing.
            prop_assert_eq!(VPath::resolve(&VPath::root(), &shown, 4096).unwrap(), p.clone());
            // The host-side path never climbs.
            prop_assert!(!p.rel().components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::RootDir)));
        } else {
            prop_assert!(arg.is_empty() || arg.contains('\\') || arg.contains('\0') || parts.iter().any(|p| p.len() > 255));
        }
    }

    #[test]
    fn chunk_trees_equal_plain_blake3(len in 0usize..300_000, shift in 10u32..17, seed in any::<u8>()) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let chunk = 1usize << shift;
        let mut tree = ftpx::transfer::Tree::default();
        for (i, c) in data.chunks(chunk).enumerate() {
            tree.push(ftpx::transfer::chunk_hash(len as u64, (i * chunk) as u64, c));
        }
        prop_assert_eq!(tree.finalize(), blake3::hash(&data));
    }

    #[test]
    fn chunk_hash_never_panics(size in any::<u64>(), offset in any::<u64>(), len in 0usize..5000) {
        let _ = ftpx::transfer::chunk_hash(size, offset, &vec![7u8; len]);
    }

    #[test]
    fn journals_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.toml");
        std::fs::write(&p, &bytes).unwrap();
        let _ = ftpx::transfer::journal::Journal::load(&p);
    }

    #[test]
    fn the_ledger_never_passes_the_quota(
        quota in 0u64..1000,
        ops in proptest::collection::vec((0u8..4, 0u8..4, 0u64..600), 0..40),
    ) {
        let l = Ledger::default();
        let limits = Limits { bytes: quota, entries: u64::MAX };
        let b = |bytes| Usage { bytes, entries: 0 };
        l.open_session("u", || Ok(Scan { stored: b(0), reserved: vec![] })).unwrap();
        // Model: stored bytes and reservations by path.
        let mut stored = 0u64;
        let mut reserved = std::collections::HashMap::new();
        for (op, path, n) in ops {
            let p = VPath::resolve(&VPath::root(), &format!("f{path}"), 99).unwrap();
            let mut step = Ok(());
            l.with("u", |a| {
                step = (|| -> Result<(), TestCaseError> {
                match op {
                    0 => {
                        let others: u64 = reserved.iter().filter(|(k, _)| **k != path).map(|(_, v)| *v).sum();
                        let fits = stored + others + n <= quota || n == 0;
                        prop_assert_eq!(a.reserve(&p, b(n), limits).is_ok(), fits);
                        if fits { reserved.insert(path, n); }
                    }
                    1 => { a.release(&p); reserved.remove(&path); }
                    2 => {
                        if let Some(r) = reserved.remove(&path) {
                            a.check_landing(&p, r, Some(0), limits).map_err(|e| TestCaseError::fail(e.to_string()))?;
                            a.landed(&p, r, Some(0));
                            stored += r;
                        }
                    }
                    _ => { let freed = n.min(stored); a.removed(b(freed)); stored -= freed; }
                }
                Ok(())
                })();
                Ok(())
            }).unwrap();
            step?;
            let used = stored + reserved.values().sum::<u64>();
            prop_assert_eq!(l.used("u").unwrap().bytes, used);
            prop_assert!(used <= quota.max(stored));
        }
    }
}
