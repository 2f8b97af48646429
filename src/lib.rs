//! ftpx: a TLS file transfer service with private homes, quotas, and
//! verified, resumable transfers.
//!
//! How the pieces fit, following one upload from the client's shell to the
//! server's disk:
//!
//! - `shell` (the `connect` command) parses `put a.bin` and calls
//!   `client::Client::put`, which consults its resume `journal`, sends a
//!   `PUT` request (`protocol`) over its TLS `connection` (`tls`) and streams
//!   the file with `transfer::send`.
//! - `server` accepts the connection, checks the session limits and hands it
//!   to `session`, which logs the user in against `users`, resolves the path
//!   inside the user's home (`jail`), reserves space (`quota`) and receives
//!   the chunks with `transfer::receive` into a partial file under
//!   `var/partial/`, journaled (`journal`), then renames it into the home
//!   once the whole-file hash matched.
//!
//! `defender` throttles password guessing and registrations, and `turns`
//! shares the password-hashing turns fairly between client addresses.
//! `config` holds every setting, `error` the server's errors and their reply
//! codes, `admin` the user-management and `serve` commands, `logging` the
//! log files of both ends, `alloc` the memory allocator (huge pages for
//! password hashing).

pub mod admin;
pub mod alloc;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod defender;
pub mod error;
pub mod jail;
pub mod journal;
pub mod logging;
pub mod protocol;
pub mod quota;
pub mod server;
pub mod session;
pub mod shell;
pub mod tls;
pub mod transfer;
pub mod turns;
pub mod upload;
pub mod users;
