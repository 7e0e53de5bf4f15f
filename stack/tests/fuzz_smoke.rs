//! The fuzz targets' bodies (`stack/tests/fuzzing/`, included by `fuzz/fuzz_targets/`) on
//! pseudo-random inputs and on the checked-in seed corpora: any frame sequence leaves the stack
//! unpanicked, bounded, and with consistent counters; any TCP conversation keeps its
//! invariants.

#[path = "fuzzing/stack_frames.rs"]
mod stack_frames;
use stack_frames::run;

#[test]
fn random_frame_sequences_never_panic() {
    let mut x = 0x853c_49e6_748f_ea9bu64;
    for _ in 0..20_000 {
        let len = 1 + (x % 900) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Sparse mutations: mostly zero bytes (no change), sometimes a flip.
                if x % 11 == 0 {
                    (x >> 24) as u8
                } else {
                    0
                }
            })
            .collect();
        run(&data);
    }
}

#[test]
fn seed_corpus_runs() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/stack_frames");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("seed corpus is checked in") {
        run(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0);
}

#[path = "fuzzing/tcp_conversation.rs"]
mod tcp_conversation;

#[test]
fn random_tcp_conversations_keep_their_invariants() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut total = tcp_conversation::Reach::default();
    for _ in 0..3_000 {
        let len = 1 + (x % 600) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        if std::env::var_os("CONV_TRACE").is_some() {
            // Replays quietly until the failing input, then prints it.
            let ok = std::panic::catch_unwind(|| {
                std::env::remove_var("CONV_TRACE");
                tcp_conversation::run(&data);
                std::env::set_var("CONV_TRACE", "1");
            });
            if ok.is_err() {
                std::env::set_var("CONV_TRACE", "1");
                tcp_conversation::run(&data);
            }
        }
        let r = tcp_conversation::run(&data);
        total.accepted += r.accepted;
        total.read += r.read;
        total.sent += r.sent;
    }
    // The inputs get past the handshake and move data both ways, or the checks check nothing.
    println!("{total:?}");
    assert!(total.accepted > 300, "{total:?}");
    assert!(total.read > 100_000 && total.sent > 100_000, "{total:?}");
}

#[test]
fn tcp_conversation_seed_corpus_runs() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/tcp_conversation"
    );
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("seed corpus is checked in") {
        tcp_conversation::run(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0);
}
