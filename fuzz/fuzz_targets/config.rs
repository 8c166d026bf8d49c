//! Fuzzes configuration parsing and validation: any text must be accepted or refused with
//! problems that carry a message — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(error) = gatehouse::config::parse(text, std::path::Path::new("/nonexistent/fuzz.yaml")) {
            assert!(!error.problems.is_empty());
            assert!(error.problems.iter().all(|p| !p.message.is_empty()));
        }
    }
});
