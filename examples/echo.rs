//! TCP and UDP echo on `prefix:ports` bindings: every address of each prefix answers, and each
//! reply comes from the address the client targeted.
//!
//! ```text
//! cargo run --release --example echo -- --tap sst0 --prefix 198.18.0.0/16 \
//!     --bind 198.18.0.0/16:7 --bind udp:198.18.5.0/24:*
//! ```

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use clap::Parser;
use subnetstack::{ListenOptions, TcpListener, UdpSocket};

/// TCP and UDP echo for whole subnets.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    dev: common::DeviceArgs,
    /// Stop after serving this many TCP connections (default: run until killed).
    #[arg(long)]
    max_conns: Option<usize>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    common::init_logs();
    if args.dev.binds.is_empty() {
        eprintln!("nothing to serve: give at least one --bind");
        std::process::exit(2);
    }
    let rt = Arc::new(args.dev.start()?);
    let mut threads = Vec::new();
    for b in &args.dev.binds {
        if b.tcp() {
            let l = TcpListener::bind_with(&rt, b.prefix, b.ports, ListenOptions::default())?;
            let max = args.max_conns;
            threads.push(std::thread::spawn(move || {
                let mut served = 0;
                while max.is_none_or(|m| served < m) {
                    let Ok((mut s, local, peer)) = l.accept() else {
                        break;
                    };
                    served += 1;
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 16384];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = s.flush();
                        eprintln!("tcp {peer} -> {local} done");
                    });
                }
            }));
        }
        if b.udp() {
            let u = UdpSocket::bind(&rt, b.prefix, b.ports, false)?;
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, src, dst)) = u.recv_from(&mut buf) {
                    let _ = u.send_from(&buf[..n], dst, src);
                }
            }));
        }
        println!("echo on {b}");
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
