//! Table decode + validation + schedules, on arbitrary bytes (what a data plane receives).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rusty_shared::invariants::table_bytes(data));
