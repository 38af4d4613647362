//! The `longlink` command, one module per command family; `main.rs` holds
//! the argument tree and dispatches.

pub(crate) mod client;
pub(crate) mod push;
pub(crate) mod serve;
pub(crate) mod upgrade;
