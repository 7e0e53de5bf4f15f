//! Arbitrary segment sequences, timer ticks and application calls against a listener and its
//! connections, checked against a model of the peer: sequence space, delivered bytes, buffer
//! and connection bounds. The body is shared with the test suite.
#![no_main]

mod body {
    include!("../../stack/tests/fuzzing/tcp_conversation.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    body::run(data);
});
