//! What every service binary of the workspace shares, so the three read and
//! run alike:
//!
//! - [`config`]: one configuration machinery (file, environment and flag
//!   overrides with their origin, every problem at once with file:line, one
//!   duration format);
//! - [`flags`]: one flag set (`-c/--config`, `-t/--test`), logging, one exit
//!   code for an unusable configuration;
//! - [`http`]: the JSON error shape, the access log line, the shutdown
//!   signal, a listener with Nagle's algorithm off.
//!
//! The wire the backend and the nodes agree on is `chat-wire`'s, not here.

pub mod config;
pub mod flags;
pub mod http;
