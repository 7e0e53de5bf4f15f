//! Arbitrary bind/unbind/lookup sequences against the table and the reference model; any
//! disagreement or panic is a finding. Decoder: `subnetstack_demux::model::Differential::run_bytes`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use subnetstack_demux::model::Differential;

fuzz_target!(|data: &[u8]| {
    Differential::run_bytes(data);
});
