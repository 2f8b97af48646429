//! End-to-end tests, linked into one binary: real TLS on loopback, real
//! files in temp directories, and the real `ftpx` binary where the behaviour
//! is end to end.

mod cli;
mod cluster;
mod common;
mod core;
mod faults;
mod hostile;
mod jail;
mod ops;
mod props;
mod quota;
mod screen;
mod shell;
mod transfer;
mod wire;
