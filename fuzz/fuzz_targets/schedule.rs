//! The smooth weighted round-robin builder, on arbitrary weights.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rusty_shared::invariants::schedule_bytes(data));
