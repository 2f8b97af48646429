//! What the server keeps, and the rules for changing it: each user's home
//! (the jail), the accounts, the quota ledger with its upload locks, and the
//! life of one upload from its reservation to the file in the home.

pub mod jail;
pub mod quota;
pub mod upload;
pub mod users;
