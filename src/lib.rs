//! ftpx: a TLS file transfer service with private homes, quotas, and
//! verified, resumable transfers.
//!
//! The folders are the layers, and imports point down: `client` and
//! `server` (the two ends) use `store` (what the server keeps) and
//! `transfer` (a verified transfer, both ends), which use `protocol` (the
//! wire, pure).
//!
//! - `protocol/`: the specification of the wire (its doc comment), requests,
//!   replies and their named codes, frames, listing entries, and virtual
//!   paths (`protocol::path`). No I/O.
//! - `transfer/`: both ends of a verified transfer: the BLAKE3 chunk tree and
//!   resume proofs, `send` and `receive`, the resume `journal`, the framed
//!   `connection` they run over, and their own `error`.
//! - `store/`: what the server keeps: each user's home (`jail`), the
//!   accounts (`users`), the quota ledger and its upload locks (`quota`),
//!   and `upload`, which owns one upload's life from its reservation to the
//!   file in the home, and sweeps what uploads left. The ledger and the
//!   accounts keep their numbers and records in a `quota::Book` and a
//!   `users::Records`: this process and `var/users.toml` for one node.
//! - `cluster/`: the same two, and the defender's shared counts, in a
//!   PostgreSQL database for several nodes (`ledger`, `accounts`,
//!   `defences`), with the node leases (`mod.rs`) and the schema's
//!   migrations (`schema`). `store` and `server` reach it only through
//!   those traits and `server::Server::new`.
//! - `server/`: the accept loop and what sessions share (`mod.rs`), one
//!   client's `session` (its loop and one match in `session/mod.rs`, the
//!   handlers beside it: `auth`, `files`, `upload`, `download`, and `log`,
//!   its log lines), the `defender` against password guessing, the fair
//!   hashing `turns`; for the operator, `live` (who is on), `kick` (ending
//!   a session from outside), `metrics` (Prometheus) and `control` (the
//!   socket of `ftpx status` and `ftpx kick`).
//! - `client/`: `Client` (`connect`, `reply`, `upload`, `download`, its own
//!   `error`), and the `shell` of `ftpx connect` (its loop, `commands`,
//!   `tree` transfers, `output`).
//!
//! One upload, from the client's shell to the server's disk:
//! `client::shell::commands` parses `put a.bin` and calls
//! `client::Client::put` (`client/upload.rs`), which consults its resume
//! `transfer::journal`, sends a `PUT` (`protocol`) over its TLS
//! `transfer::connection` and streams the file with `transfer::send`. On the
//! server, `server` accepts the connection and hands it to
//! `server::session`, whose match sends the `PUT` to `session/upload.rs`:
//! it takes a `store::upload::Upload` (the path lock, the quota reservation
//! in `store::quota`, the target checked in the home by `store::jail`),
//! receives the chunks with `transfer::receive` into the upload's partial
//! file, and has the upload land: renamed into the home once the whole-file
//! hash matched, its charge settled under the account's lock.
//!
//! Beside them: `config` holds every setting, `error` the errors of the
//! server side and the one table of their replies, `tls` the certificates and TLS set-up
//! of both ends, `admin` the user-management and `serve` commands,
//! `operator` the `status` and `kick` commands, `cli` the command line,
//! `logging` the log files of both ends and the server log's schema, `clock` the wall
//! clock, `alloc` the memory allocator (huge pages for password hashing).

pub mod admin;
pub mod alloc;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod logging;
pub mod operator;
pub mod protocol;
pub mod server;
pub mod store;
pub mod tls;
pub mod transfer;
