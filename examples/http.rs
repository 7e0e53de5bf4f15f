//! A small HTTP/1.1 server (keep-alive) whose bindings serve different responses:
//!
//! - `GET /` says which binding and listener served it and the local address hit;
//! - `GET /big?bytes=N` streams N bytes;
//! - `GET /stats` shows live per-binding counters (HTML), `GET /metrics` Prometheus text.
//!
//! ```text
//! cargo run --release --example http -- --tap sst0 --prefix 198.18.0.0/16 \
//!     --bind tcp:198.18.0.0/16:80 --bind tcp:198.18.5.0/24:80
//! ```

mod common;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use subnetstack::{ListenOptions, Runtime, TcpListener, TcpStream};

/// HTTP for whole subnets: each binding answers with its own name.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    dev: common::DeviceArgs,
    /// Answer `GET /` with this fixed body instead of naming the binding (for side-by-side
    /// benchmarks against servers that answer a fixed body).
    #[arg(long, value_name = "TEXT")]
    fixed_body: Option<String>,
}

/// One parsed request: method, target, whether the connection stays open after it.
struct Request {
    method: String,
    target: String,
    keep_alive: bool,
}

/// Reads one request head (the body, if any, is not used); `None` at a clean end of stream.
fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (method, target, version) = (
        first.next().unwrap_or_default().to_owned(),
        first.next().unwrap_or("/").to_owned(),
        first.next().unwrap_or("HTTP/1.0"),
    );
    let mut keep_alive = version == "HTTP/1.1";
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("connection") {
                let v = v.trim().to_ascii_lowercase();
                keep_alive = v.contains("keep-alive") || (keep_alive && !v.contains("close"));
            }
        }
    }
    Ok(Some(Request {
        method,
        target,
        keep_alive,
    }))
}

fn respond(
    s: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &[u8],
    keep: bool,
) -> io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep { "keep-alive" } else { "close" }
    )?;
    s.write_all(body)
}

fn stats_html(rt: &Runtime) -> String {
    let snap = rt.snapshot().unwrap_or_default();
    let mut h = String::from(
        "<!doctype html><title>subnetstack</title><h1>Bindings</h1><table border=1>\
         <tr><th>binding</th><th>listener</th><th>SYNs</th><th>cookies</th><th>accepted</th>\
         <th>overflows</th><th>resets</th><th>active</th><th>bytes in</th><th>bytes out</th></tr>",
    );
    for l in &snap.tcp {
        let s = &l.stats;
        h += &format!(
            "<tr><td>tcp {}</td><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            l.binding, l.listener, s.syns, s.syncookies_valid, s.syncookies_sent, s.accepted,
            s.overflows, s.resets, s.active, s.bytes_in, s.bytes_out
        );
    }
    h += &format!(
        "</table><p>{} connections open</p><pre>{}</pre>",
        snap.tcp_connections, snap.counters
    );
    h
}

fn serve(
    rt: &Runtime,
    mut s: TcpStream,
    name: &str,
    fixed: Option<&str>,
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut s, &mut buf)? {
        let keep = req.keep_alive;
        if req.method != "GET" {
            respond(
                &mut s,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
                keep,
            )?;
        } else if req.target == "/" {
            let body = match fixed {
                Some(f) => f.to_owned(),
                None => format!("binding {name} local {local} peer {peer}\n"),
            };
            respond(&mut s, "200 OK", "text/plain", body.as_bytes(), keep)?;
        } else if let Some(n) = req.target.strip_prefix("/big?bytes=") {
            let n: u64 = n.parse().unwrap_or(0);
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: {}\r\n\r\n",
                if keep { "keep-alive" } else { "close" }
            )?;
            let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..k])?;
                left -= k as u64;
            }
        } else if req.target == "/stats" {
            respond(
                &mut s,
                "200 OK",
                "text/html",
                stats_html(rt).as_bytes(),
                keep,
            )?;
        } else if req.target == "/metrics" {
            let text = rt.snapshot()?.prometheus();
            respond(
                &mut s,
                "200 OK",
                "text/plain; version=0.0.4",
                text.as_bytes(),
                keep,
            )?;
        } else {
            respond(&mut s, "404 Not Found", "text/plain", b"not found\n", keep)?;
        }
        if !keep {
            // FIN right behind the response, as nginx does: a client that sees the response
            // without the FIN closes first and keeps the TIME-WAIT (and its port) itself.
            s.shutdown(std::net::Shutdown::Write)?;
            break;
        }
    }
    s.flush()
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    common::init_logs();
    let tcp: Vec<_> = args.dev.binds.iter().filter(|b| b.tcp()).cloned().collect();
    if tcp.is_empty() {
        eprintln!("nothing to serve: give at least one TCP --bind");
        std::process::exit(2);
    }
    let rt = Arc::new(args.dev.start()?);
    let mut threads = Vec::new();
    for b in tcp {
        let l = TcpListener::bind_with(&rt, b.prefix, b.ports, ListenOptions::default())?;
        let name = format!(
            "tcp:{} (listener {})",
            b.to_string().trim_start_matches("tcp:"),
            l.id()
        );
        println!("http on {b}");
        let rt = rt.clone();
        let fixed = args.fixed_body.clone();
        threads.push(std::thread::spawn(move || {
            while let Ok((s, local, peer)) = l.accept() {
                let (rt, name, fixed) = (rt.clone(), name.clone(), fixed.clone());
                std::thread::spawn(move || {
                    if let Err(e) = serve(&rt, s, &name, fixed.as_deref(), local, peer) {
                        eprintln!("{peer} -> {local}: {e}");
                    }
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
