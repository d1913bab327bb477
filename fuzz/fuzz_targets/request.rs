//! The data plane's request validation, on arbitrary request heads parsed as Pingora parses them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rusty_lb::http1::invariants::request_invariants(data));
