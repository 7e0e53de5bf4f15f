//! Arbitrary frame sequences into one stack (every parser: Ethernet, ARP, IPv4, IPv6 with
//! extension headers, fragments, ICMP/ICMPv6 and NDP, UDP, TCP with options): never a panic,
//! consistent counters, bounded queues. The body is shared with the test suite.
#![no_main]

mod body {
    include!("../../stack/tests/fuzzing/stack_frames.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
