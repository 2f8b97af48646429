//! Client path strings: `VPath::resolve` against several working
//! directories and length limits.
//!
//! Properties: nothing panics; a resolved path is absolute, has no empty,
//! `.` or `..` component, no backslash or control character, fits the limit,
//! resolves to itself from any working directory, and its `rel()` (what
//! cap-std opens beneath the home) has only plain components, or is `.` for
//! the home itself.

#![no_main]

use std::path::Component;

use ftpx::protocol::VPath;
use libfuzzer_sys::fuzz_target;

const WORKING_DIRS: &[&str] = &["/", "/a", "/a/b/c", "/d ir/é/%2e%2e", "/．．/‥"];
const LIMITS: &[usize] = &[4096, 64, 1];

fuzz_target!(|data: &[u8]| {
    let Ok(arg) = std::str::from_utf8(data) else {
        return;
    };
    let root = VPath::root();
    for cwd in WORKING_DIRS {
        let cwd = VPath::resolve(&root, cwd, 4096).expect("a valid working directory");
        for &max in LIMITS {
            let Ok(path) = VPath::resolve(&cwd, arg, max) else {
                continue;
            };
            check(&path, arg, &cwd, max);
        }
    }
});

fn check(path: &VPath, arg: &str, cwd: &VPath, max: usize) {
    let text = path.to_string();
    let ctx = format!("{arg:?} from {cwd} (limit {max}) -> {text:?}");
    assert!(text.starts_with('/'), "not absolute: {ctx}");
    assert!(text.len() <= max, "over the limit: {ctx}");
    assert!(!text.contains('\\'), "backslash: {ctx}");
    assert!(
        !text.chars().any(char::is_control),
        "control character: {ctx}"
    );
    if path.is_root() {
        assert_eq!(text, "/", "{ctx}");
        assert_eq!(path.rel(), std::path::PathBuf::from("."), "{ctx}");
        assert_eq!(path.file_name(), None, "{ctx}");
    } else {
        for part in text[1..].split('/') {
            assert!(
                !matches!(part, "" | "." | ".."),
                "component {part:?} survived: {ctx}"
            );
            assert!(part.len() <= ftpx::protocol::MAX_NAME, "long name: {ctx}");
        }
        let rel = path.rel();
        assert!(rel.is_relative(), "rel() is absolute: {ctx}");
        for c in rel.components() {
            assert!(matches!(c, Component::Normal(_)), "rel() has {c:?}: {ctx}");
        }
        let name = path.file_name().expect("a file name below the root");
        assert_eq!(&path.parent().join(name), path, "parent/join: {ctx}");
    }
    // The written form is a fixed point, from any working directory.
    for from in [VPath::root(), cwd.clone()] {
        match VPath::resolve(&from, &text, max) {
            Ok(again) => assert_eq!(&again, path, "{ctx} resolves elsewhere from {from}"),
            Err(e) => panic!("{ctx} does not resolve from {from}: {e}"),
        }
    }
}
