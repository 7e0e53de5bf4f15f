//! An idle runtime costs about no CPU, and shutdown ends its handles. Its own test binary, so
//! that the CPU time it measures is its own.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{addr, two};
use subnetstack::demux::PortSpec;
use subnetstack::{TcpListener, TcpStream};

#[test]
fn an_idle_runtime_sleeps_and_shutdown_ends_its_handles() {
    let (srv, cli) = two();
    let l = TcpListener::bind(&srv, "198.18.1.0/24".parse().unwrap(), PortSpec::Any).unwrap();
    let mut c = TcpStream::connect_from(&cli, addr("198.18.2.1:0"), addr("198.18.1.1:9")).unwrap();
    let (_s, _, _) = l.accept().unwrap();
    // Idle with a connection open: the poll threads sleep.
    let cpu = || {
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        Duration::new(u.ru_utime.tv_sec as u64, u.ru_utime.tv_usec as u32 * 1000)
            + Duration::new(u.ru_stime.tv_sec as u64, u.ru_stime.tv_usec as u32 * 1000)
    };
    let (c0, t0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu() - c0;
    println!("CPU while idle: {used:?} in {:?}", t0.elapsed());
    assert!(
        used < Duration::from_millis(100),
        "{used:?} of CPU in a second of idling"
    );
    let stacks = cli.shutdown();
    assert_eq!(stacks.len(), 1, "one shard per device");
    assert!(stacks[0].tcp_connections() <= 1);
    let mut b = [0u8; 4];
    assert!(c.read(&mut b).is_err(), "the runtime is gone");
}
