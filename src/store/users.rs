//! Accounts: the user database under `var/`, password hashing and the rules
//! for names and passwords.
//!
//! The database is `var/users.toml`, one `[[user]]` table per account. Every
//! change takes an exclusive lock on `var/users.lock`, reads the file, writes
//! a new one beside it, fsyncs it and renames it into place, so `useradd` and
//! a running server's registrations never lose or tear an account. The server
//! reads the file at each login, so changes take effect without a restart.
//!
//! Passwords are stored only as scrypt hashes in the PHC string format
//! (`$scrypt$ln=17,r=8,p=1$SALT$HASH`): the cost travels with each hash, so it
//! can be raised later without breaking old accounts.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use scrypt::phc::{Ident, Output, PasswordHash, Salt};
use serde::{Deserialize, Serialize};

use crate::config::AccountsSection;

/// Longest user name.
pub const MAX_NAME_LEN: usize = 32;

/// Names that could be mistaken for the system or the service itself.
const RESERVED: &[&str] = &[
    "root",
    "admin",
    "administrator",
    "ftpx",
    "ftp",
    "anonymous",
    "nobody",
    "daemon",
    "system",
    "server",
    "partial",
    "guest",
    "sys",
    "bin",
];

/// A password held in memory. Its Debug and Display print stars, so it can't
/// reach a log line by accident.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn new(s: impl Into<String>) -> Password {
        Password(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Bytes the user may store, partial uploads included.
    pub quota: u64,
    /// scrypt hash in PHC string format.
    pub hash: String,
    /// Unix time of creation.
    #[serde(default)]
    pub created: u64,
    /// Files plus directories the user may have; none set: the server's
    /// `default_max_files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u64>,
}

impl User {
    /// The user's limit on files plus directories.
    pub fn max_files(&self, settings: &AccountsSection) -> u64 {
        self.max_files.unwrap_or(settings.default_max_files)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    #[serde(default)]
    user: Vec<User>,
}

/// Checks a user name: 1 to 32 characters of `a-z 0-9 _ -`, starting with a
/// letter, and not a reserved name. There is no case folding or Unicode
/// normalisation to get wrong: anything else is refused.
pub fn check_name(name: &str) -> Result<(), String> {
    let rule = "a user name is 1 to 32 characters of a-z, 0-9, _ and -, starting with a letter";
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !first_ok
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
    {
        return Err(rule.into());
    }
    if RESERVED.contains(&name) {
        return Err(format!("the name {name:?} is reserved"));
    }
    Ok(())
}

/// Checks a new password against the configured length range.
pub fn check_password(password: &Password, settings: &AccountsSection) -> Result<(), String> {
    let n = password.0.chars().count();
    if n < settings.password_min_len || n > settings.password_max_len {
        return Err(format!(
            "a password has {} to {} characters",
            settings.password_min_len, settings.password_max_len
        ));
    }
    if password.0.chars().any(char::is_control) {
        return Err("a password may not hold control characters".into());
    }
    Ok(())
}

/// Hashes a password with the configured scrypt cost and a random salt.
pub fn hash_password(password: &Password, settings: &AccountsSection) -> Result<String, String> {
    let params = scrypt::Params::new(settings.scrypt_log_n, settings.scrypt_r, settings.scrypt_p)
        .map_err(|e| format!("bad scrypt parameters: {e}"))?;
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let mut out = [0u8; 32];
    scrypt::scrypt(password.0.as_bytes(), &salt, &params, &mut out).map_err(|e| e.to_string())?;
    let phc = PasswordHash {
        algorithm: Ident::new_unwrap("scrypt"),
        version: None,
        params: (&params).try_into().map_err(|e| format!("{e}"))?,
        salt: Some(Salt::new(&salt).map_err(|e| format!("{e}"))?),
        hash: Some(Output::new(&out).map_err(|e| format!("{e}"))?),
    };
    Ok(phc.to_string())
}

/// Checks `password` against a stored PHC string. A hash that is malformed,
/// not scrypt, or costlier than `max_log_n` allows is an error, never an
/// attempt to allocate what it asks for.
pub fn verify_password(password: &Password, stored: &str, max_log_n: u8) -> Result<bool, String> {
    let phc = PasswordHash::new(stored).map_err(|e| format!("malformed password hash: {e}"))?;
    if phc.algorithm.as_str() != "scrypt" {
        return Err(format!(
            "unsupported password hash algorithm {}",
            phc.algorithm
        ));
    }
    let params =
        scrypt::Params::try_from(&phc).map_err(|e| format!("bad scrypt parameters: {e}"))?;
    if params.log_n() > max_log_n || params.r() > 32 || params.p() > 16 {
        return Err(format!(
            "password hash cost ln={},r={},p={} exceeds the allowed maximum",
            params.log_n(),
            params.r(),
            params.p()
        ));
    }
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return Err("password hash lacks a salt or a digest".into());
    };
    let expected = expected.as_bytes();
    if expected.len() < 16 || expected.len() > 64 {
        return Err("password hash digest has an unusual length".into());
    }
    let mut out = vec![0u8; expected.len()];
    scrypt::scrypt(password.0.as_bytes(), &salt, &params, &mut out).map_err(|e| e.to_string())?;
    // Constant-time comparison: the difference is folded over every byte.
    let diff = out
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    Ok(diff == 0)
}

/// Where the accounts live: `var/users.toml` ([`UsersFile`]) for a single
/// node, the shared database for several ([`crate::cluster::accounts`]).
pub trait Records: Send + Sync + fmt::Debug {
    /// All accounts.
    fn load(&self) -> Result<Vec<User>, String>;
    fn find(&self, name: &str) -> Result<Option<User>, String>;
    /// A number that changes whenever an account may have changed; None
    /// while it can't be known.
    fn version(&self) -> Option<u64>;
    /// Adds `user`, unless the name is taken or `free` refuses it (checked
    /// in the same step as the insertion).
    fn insert(&self, user: &User, free: &dyn Fn(&str) -> Result<(), String>) -> Result<(), String>;
    /// Removes an account; an error if there is none.
    fn delete(&self, name: &str) -> Result<(), String>;
    /// Changes one account in place; an error if there is none.
    fn update(&self, name: &str, f: &dyn Fn(&mut User)) -> Result<(), String>;
}

/// The accounts, and the homes under `var/homes`.
#[derive(Debug, Clone)]
pub struct UserDb {
    records: Arc<dyn Records>,
    homes: PathBuf,
}

impl UserDb {
    /// The accounts of a single node, in `var_dir/users.toml`.
    pub fn new(var_dir: &Path) -> UserDb {
        UserDb::with_records(var_dir, Arc::new(UsersFile::new(var_dir)))
    }

    /// The accounts in `records`, the homes under `var_dir`.
    pub fn with_records(var_dir: &Path, records: Arc<dyn Records>) -> UserDb {
        UserDb {
            records,
            homes: var_dir.join("homes"),
        }
    }

    pub fn home(&self, name: &str) -> PathBuf {
        self.homes.join(name)
    }

    pub fn homes_dir(&self) -> &Path {
        &self.homes
    }

    /// All accounts. A missing file is an empty database; a damaged one is an error.
    pub fn load(&self) -> Result<Vec<User>, String> {
        self.records.load()
    }

    /// See [`Records::version`].
    pub fn version(&self) -> Option<u64> {
        self.records.version()
    }

    pub fn find(&self, name: &str) -> Result<Option<User>, String> {
        self.records.find(name)
    }

    /// Creates an account and its home, or takes over the home that is
    /// already there (the admin reviving an account). Fails if the name is taken.
    pub fn add(&self, user: User) -> Result<(), String> {
        self.add_checked(user, &|_| Ok(()))
    }

    /// Creates an account for a stranger: also refused while anything of an
    /// earlier account of that name is left (its home, or its unfinished
    /// uploads in `partial_dir`), so nobody inherits another's files.
    pub fn register(&self, user: User, partial_dir: &Path) -> Result<(), String> {
        let home = self.home(&user.name);
        let partial = partial_dir.join(&user.name);
        self.add_checked(user, &|name| {
            if home.symlink_metadata().is_ok() || partial.symlink_metadata().is_ok() {
                return Err(format!("user {name:?} already exists"));
            }
            Ok(())
        })
    }

    fn add_checked(
        &self,
        user: User,
        free: &dyn Fn(&str) -> Result<(), String>,
    ) -> Result<(), String> {
        check_name(&user.name)?;
        self.records.insert(&user, free)?;
        let home = self.home(&user.name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&home)
            .map_err(|e| format!("cannot create home {}: {e}", home.display()))
    }

    /// Removes an account; with `remove_home` its home too.
    pub fn remove(&self, name: &str, remove_home: bool) -> Result<(), String> {
        self.records.delete(name)?;
        if remove_home {
            self.remove_home(name)
                .map_err(|e| format!("account removed, but not its home: {e}"))?;
        }
        Ok(())
    }

    /// Removes a home and everything in it (nothing if there is none).
    pub fn remove_home(&self, name: &str) -> Result<(), String> {
        check_name(name)?;
        let home = self.home(name);
        match fs::remove_dir_all(&home) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {}: {e}", home.display())),
        }
    }

    /// Changes one account in place.
    pub fn modify(&self, name: &str, f: impl Fn(&mut User)) -> Result<(), String> {
        self.records.update(name, &f)
    }
}

/// The accounts of a single node: `var/users.toml`, changed under
/// `var/users.lock`.
#[derive(Debug, Clone)]
pub struct UsersFile {
    file: PathBuf,
    lock: PathBuf,
}

impl UsersFile {
    pub fn new(var_dir: &Path) -> UsersFile {
        UsersFile {
            file: var_dir.join("users.toml"),
            lock: var_dir.join("users.lock"),
        }
    }

    /// The same, reading `file` instead of `users.toml`.
    pub fn with_file(self, file: &Path) -> UsersFile {
        UsersFile {
            file: file.to_path_buf(),
            ..self
        }
    }

    /// All accounts. A missing file is an empty database; a damaged one is an error.
    fn read(&self) -> Result<Vec<User>, String> {
        let text = match fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(format!(
                    "cannot read user database {}: {e}",
                    self.file.display()
                ));
            }
        };
        let parsed: UserFile = toml::from_str(&text)
            .map_err(|e| format!("user database {} is damaged: {e}", self.file.display()))?;
        let mut seen = std::collections::HashSet::new();
        for u in &parsed.user {
            check_name(&u.name).map_err(|e| {
                format!(
                    "user database {}: user {:?}: {e}",
                    self.file.display(),
                    u.name
                )
            })?;
            if !seen.insert(u.name.as_str()) {
                return Err(format!(
                    "user database {} lists {:?} twice",
                    self.file.display(),
                    u.name
                ));
            }
        }
        Ok(parsed.user)
    }

    /// Read, change and atomically replace the file under the lock.
    fn change(&self, f: impl FnOnce(&mut Vec<User>) -> Result<(), String>) -> Result<(), String> {
        let dir = self.file.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&self.lock)
            .map_err(|e| format!("cannot open {}: {e}", self.lock.display()))?;
        lock.lock()
            .map_err(|e| format!("cannot lock {}: {e}", self.lock.display()))?;
        let mut users = self.read()?;
        f(&mut users)?;
        let text = toml::to_string(&UserFile { user: users }).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(".users.toml.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            out.write_all(text.as_bytes())?;
            out.sync_all()?;
            fs::rename(&tmp, &self.file)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("cannot write user database {}: {e}", self.file.display())
        })
        // The lock is released when `lock` is dropped.
    }
}

impl Records for UsersFile {
    fn load(&self) -> Result<Vec<User>, String> {
        self.read()
    }

    fn find(&self, name: &str) -> Result<Option<User>, String> {
        Ok(self.read()?.into_iter().find(|u| u.name == name))
    }

    /// Of the file's present version (it is only ever replaced by a rename).
    fn version(&self) -> Option<u64> {
        use std::hash::{Hash as _, Hasher as _};
        use std::os::unix::fs::MetadataExt as _;
        let m = fs::metadata(&self.file).ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (m.modified().ok()?, m.ino(), m.len()).hash(&mut h);
        Some(h.finish())
    }

    fn insert(&self, user: &User, free: &dyn Fn(&str) -> Result<(), String>) -> Result<(), String> {
        self.change(|users| {
            if users.iter().any(|u| u.name == user.name) {
                return Err(format!("user {:?} already exists", user.name));
            }
            free(&user.name)?;
            users.push(user.clone());
            Ok(())
        })
    }

    fn delete(&self, name: &str) -> Result<(), String> {
        self.change(|users| {
            let before = users.len();
            users.retain(|u| u.name != name);
            if users.len() == before {
                return Err(format!("no user {name:?}"));
            }
            Ok(())
        })
    }

    fn update(&self, name: &str, f: &dyn Fn(&mut User)) -> Result<(), String> {
        self.change(|users| {
            let user = users
                .iter_mut()
                .find(|u| u.name == name)
                .ok_or_else(|| format!("no user {name:?}"))?;
            f(user);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> AccountsSection {
        AccountsSection {
            scrypt_log_n: 4,
            scrypt_r: 1,
            ..AccountsSection::default()
        }
    }

    #[test]
    fn names() {
        for ok in [
            "alice",
            "a",
            "bob-2",
            "x_y",
            "a234567890123456789012345678901",
        ] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../admin",
            "a/b",
            "a\\b",
            "Alice",
            "1abc",
            "-x",
            "_x",
            " ",
            "a b",
            "%2e%2e",
            "a\0",
            "аdmin",
            "ａｂｃ",
            "root",
            "admin",
            "a2345678901234567890123456789012x",
            "a\u{202e}b",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hashes_verify_and_hide_nothing() {
        let s = cheap();
        let h = hash_password(&Password::new("correct horse"), &s).unwrap();
        assert!(h.starts_with("$scrypt$ln=4,r=1,p=1$"), "{h}");
        assert!(!h.contains("correct"));
        assert!(verify_password(&Password::new("correct horse"), &h, 20).unwrap());
        assert!(!verify_password(&Password::new("correct horsf"), &h, 20).unwrap());
        // Two hashes of one password differ (random salt).
        assert_ne!(
            h,
            hash_password(&Password::new("correct horse"), &s).unwrap()
        );
        assert_eq!(format!("{:?}", Password::new("secret")), "********");
    }

    #[test]
    fn hostile_hashes_are_refused_without_hashing() {
        let p = Password::new("x");
        for bad in [
            "",
            "plain",
            "$scrypt$ln=40,r=8,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "$scrypt$ln=21,r=8,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "$scrypt$ln=10,r=1048576,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "$scrypt$ln=10,r=8,p=1$c2FsdHNhbHRzYWx0",
            "$scrypt$ln=10,r=8,p=1$c2FsdHNhbHRzYWx0$AAAA",
        ] {
            assert!(verify_password(&p, bad, 20).is_err(), "{bad}");
        }
    }

    #[test]
    fn database_add_remove_modify() {
        let dir = tempfile::tempdir().unwrap();
        let db = UserDb::new(dir.path());
        assert!(db.load().unwrap().is_empty());
        let user = |name: &str| User {
            name: name.into(),
            quota: 5,
            hash: "h".into(),
            created: 1,
            max_files: None,
        };
        db.add(user("ann")).unwrap();
        assert!(db.home("ann").is_dir());
        assert!(db.add(user("ann")).unwrap_err().contains("exists"));
        assert!(db.add(user("../x")).is_err());
        db.add(user("bob")).unwrap();
        db.modify("bob", |u| u.quota = 9).unwrap();
        assert_eq!(db.find("bob").unwrap().unwrap().quota, 9);
        db.remove("ann", true).unwrap();
        assert!(!db.home("ann").exists());
        // A kept home (or unfinished uploads) keeps the name from strangers.
        let partial = dir.path().join("partial");
        db.remove("bob", false).unwrap();
        assert!(db.register(user("bob"), &partial).is_err());
        db.add(user("bob")).unwrap();
        db.remove("bob", true).unwrap();
        std::fs::create_dir_all(partial.join("bob")).unwrap();
        assert!(db.register(user("bob"), &partial).is_err());
        std::fs::remove_dir(partial.join("bob")).unwrap();
        db.register(user("bob"), &partial).unwrap();
        assert!(db.remove("ann", false).is_err());
        assert_eq!(db.load().unwrap().len(), 1);
    }

    #[test]
    fn damaged_database_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let db = UserDb::new(dir.path());
        for bad in [
            "[[user]]\nname = \"ann\"\n",
            "garbage ][",
            "[[user]]\nname = \"../x\"\nquota = 1\nhash = \"h\"\n",
            "[[user]]\nname = \"a\"\nquota = 1\nhash = \"h\"\n[[user]]\nname = \"a\"\nquota = 1\nhash = \"h\"\n",
        ] {
            fs::write(dir.path().join("users.toml"), bad).unwrap();
            assert!(db.load().is_err(), "{bad}");
        }
    }

    #[test]
    fn concurrent_adds_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = UserDb::new(dir.path());
        std::thread::scope(|s| {
            for t in 0..8 {
                let db = db.clone();
                s.spawn(move || {
                    for i in 0..10 {
                        db.add(User {
                            name: format!("u{t}x{i}"),
                            quota: 1,
                            hash: "h".into(),
                            created: 0,
                            max_files: None,
                        })
                        .unwrap();
                    }
                });
            }
        });
        assert_eq!(db.load().unwrap().len(), 80);
    }
}
