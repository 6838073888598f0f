//! The backend's tests use the workspace harness (`testkit`).

pub use testkit::*;
