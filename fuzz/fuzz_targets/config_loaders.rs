//! The three config loaders on arbitrary file contents: each must answer
//! Ok or Err, never panic. The bytes go to a file, as the loaders read files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One file per fuzzing process, rewritten for each input.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("chat-fuzz-config-{}.toml", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    std::fs::write(path, data).expect("write the fuzz input to a temp file");
    let _ = ai_node::config::load(Some(path), &|_| None);
    let _ = backend::config::load(Some(path), &|_| None);
    let _ = proxy::config::load(path, &proxy::config::Overrides::default());
});
