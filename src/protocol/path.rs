//! Virtual paths: how a client names files. `/` is the user's home and
//! nothing outside it exists.
//!
//! [`VPath::resolve`] is the one edge where a client's path string becomes a
//! path: it refuses what is never a valid name (backslashes, control
//! characters, over-long paths or components) and folds `.` and `..`
//! lexically, with `..` stopping at `/` as under chroot. Nothing is
//! percent-decoded or normalised, so `%2e%2e` and `．．` are ordinary names.
//! Pure: no I/O; the server's `store::jail` opens what a path names.

use std::path::PathBuf;

/// Why a path string names no path: said to the client as a bad argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadPath(pub String);

type Result<T> = std::result::Result<T, BadPath>;

/// Longest single name in a path, as on Linux.
pub const MAX_NAME: usize = 255;

/// A virtual path, folded: no `.`, `..` or empty components.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct VPath {
    parts: Vec<String>,
}

impl VPath {
    pub fn root() -> VPath {
        VPath::default()
    }

    /// Resolves `arg` against the working directory `cwd`.
    pub fn resolve(cwd: &VPath, arg: &str, max_path: usize) -> Result<VPath> {
        if arg.is_empty() {
            return Err(BadPath("empty path".into()));
        }
        if arg.len() > max_path {
            return Err(BadPath(format!("path longer than {max_path} bytes")));
        }
        if arg.contains('\\') {
            return Err(BadPath("backslashes are not allowed in paths".into()));
        }
        if arg.chars().any(char::is_control) {
            return Err(BadPath(
                "control characters are not allowed in paths".into(),
            ));
        }
        let mut parts = if arg.starts_with('/') {
            vec![]
        } else {
            cwd.parts.clone()
        };
        for part in arg.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                name if name.len() > MAX_NAME => {
                    return Err(BadPath(format!(
                        "a name in the path is longer than {MAX_NAME} bytes"
                    )));
                }
                name => parts.push(name.to_string()),
            }
        }
        let path = VPath { parts };
        if path.to_string().len() > max_path {
            return Err(BadPath(format!("path longer than {max_path} bytes")));
        }
        Ok(path)
    }

    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    /// The path relative to the home, for cap-std (`.` for the home itself).
    pub fn rel(&self) -> PathBuf {
        if self.parts.is_empty() {
            PathBuf::from(".")
        } else {
            self.parts.iter().collect()
        }
    }

    pub fn file_name(&self) -> Option<&str> {
        self.parts.last().map(String::as_str)
    }

    pub fn parent(&self) -> VPath {
        let mut parts = self.parts.clone();
        parts.pop();
        VPath { parts }
    }

    pub fn join(&self, name: &str) -> VPath {
        let mut parts = self.parts.clone();
        parts.push(name.to_string());
        VPath { parts }
    }
}

impl std::fmt::Display for VPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.parts.is_empty() {
            return f.write_str("/");
        }
        for p in &self.parts {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cwd: &str, arg: &str) -> Result<String> {
        let cwd = VPath::resolve(&VPath::root(), cwd, 4096).unwrap();
        VPath::resolve(&cwd, arg, 4096).map(|p| p.to_string())
    }

    #[test]
    fn dot_dot_stops_at_the_root() {
        assert_eq!(r("/", "../../etc/passwd").unwrap(), "/etc/passwd");
        assert_eq!(r("/sub", "a/b/../../..").unwrap(), "/");
        assert_eq!(r("/a/b", "..").unwrap(), "/a");
        assert_eq!(r("/a", "/x//y/./z/").unwrap(), "/x/y/z");
        assert_eq!(r("/a", ".").unwrap(), "/a");
        assert_eq!(r("/", "/").unwrap(), "/");
    }

    #[test]
    fn names_are_literal() {
        assert_eq!(r("/", "%2e%2e/%2e%2e").unwrap(), "/%2e%2e/%2e%2e");
        assert_eq!(r("/", "．．／x").unwrap(), "/．．／x");
        assert_eq!(r("/", "‥/x").unwrap(), "/‥/x");
        assert_eq!(r("/", "..%2f").unwrap(), "/..%2f");
    }

    #[test]
    fn bad_paths_are_refused() {
        for bad in ["", "..\\..\\etc", "a\\b", "a\0b", "a\nb", "\u{1b}[2J"] {
            assert!(r("/", bad).is_err(), "{bad:?}");
        }
        assert!(r("/", &"a/".repeat(3000)).is_err());
        assert!(r("/", &"n".repeat(256)).is_err());
        assert!(r("/", &"n".repeat(255)).is_ok());
    }

    #[test]
    fn rel_paths() {
        assert_eq!(VPath::root().rel(), PathBuf::from("."));
        assert_eq!(
            VPath::resolve(&VPath::root(), "/a/b", 99).unwrap().rel(),
            PathBuf::from("a/b")
        );
    }
}
