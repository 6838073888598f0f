//! The system tests use the workspace harness (`testkit`).
#![allow(unused_imports)]

pub use testkit::*;
