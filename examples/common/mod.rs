//! What the examples share: the device options (`--tap`, `--prefix`, `--bind`, `--gateway`,
//! `--queues`, `--pcap`), parsed with clap, and starting a runtime from them.
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::IpNet;
use subnetstack::demux::PortSpec;
use subnetstack::Runtime;

/// Device options of every example.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// TAP interface to create or attach in the current namespace (the caller configures the
    /// kernel side: addresses and routes to the prefixes).
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "xdp",
        conflicts_with = "xdp"
    )]
    pub tap: Option<String>,
    /// Interface to run on with AF_XDP instead of a TAP: frames for the prefixes go to the
    /// stack, everything else stays with the kernel.
    #[arg(long, value_name = "IFACE")]
    pub xdp: Option<String>,
    /// A local prefix: the stack answers for every address in it (repeatable).
    #[arg(long = "prefix", value_name = "CIDR", required = true)]
    pub prefixes: Vec<IpNet>,
    /// A binding, `[tcp:|udp:]CIDR:PORTS` (repeatable); PORTS is `80`, `8000-8099` or `*`;
    /// IPv6 as `[2001:db8:100::]/48:80`. Without `tcp:`/`udp:`, both.
    #[arg(long = "bind", value_name = "SPEC")]
    pub binds: Vec<BindSpec>,
    /// Next hop for peers outside the local prefixes (one per family).
    #[arg(long = "gateway", value_name = "IP")]
    pub gateways: Vec<IpAddr>,
    /// TAP queues, one poll thread (shard) each.
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Open the TAP without virtio-net offloads (no TSO super-frames, no checksum offload).
    #[arg(long)]
    pub no_offload: bool,
    /// Write every frame to this pcap file.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    /// How the poll thread waits: `busy`, `blocking`, or `adaptive:MICROS` (spin that long
    /// after the last work, then sleep; the default is `adaptive:50`).
    #[arg(long, value_name = "MODE", value_parser = parse_poll)]
    pub poll: Option<subnetstack::PollMode>,
}

fn parse_poll(s: &str) -> Result<subnetstack::PollMode, String> {
    use subnetstack::PollMode;
    match s {
        "busy" => Ok(PollMode::Busy),
        "blocking" => Ok(PollMode::Blocking),
        _ => s
            .strip_prefix("adaptive:")
            .and_then(|us| us.parse().ok())
            .map(|us| PollMode::Adaptive(std::time::Duration::from_micros(us)))
            .ok_or_else(|| format!("{s}: expected busy, blocking or adaptive:MICROS")),
    }
}

/// Which protocols a binding is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// Both.
    Both,
}

/// One `--bind` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindSpec {
    /// Protocols.
    pub proto: Proto,
    /// The prefix.
    pub prefix: IpNet,
    /// The ports.
    pub ports: PortSpec,
}

impl BindSpec {
    /// Whether it binds TCP.
    pub fn tcp(&self) -> bool {
        self.proto != Proto::Udp
    }

    /// Whether it binds UDP.
    pub fn udp(&self) -> bool {
        self.proto != Proto::Tcp
    }
}

impl std::fmt::Display for BindSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp:",
            Proto::Udp => "udp:",
            Proto::Both => "",
        };
        let ports = self.ports;
        match self.prefix {
            IpNet::V4(n) => write!(f, "{proto}{n}:{ports}"),
            IpNet::V6(n) => write!(f, "{proto}[{}]/{}:{ports}", n.addr(), n.prefix_len()),
        }
    }
}

impl FromStr for BindSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (proto, rest) = match s.split_once(':') {
            Some(("tcp", r)) => (Proto::Tcp, r),
            Some(("udp", r)) => (Proto::Udp, r),
            _ => (Proto::Both, s),
        };
        let (net, ports) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{s}: expected CIDR:PORTS"))?;
        let net = net.replace(['[', ']'], "");
        let prefix: IpNet = net.parse().map_err(|e| format!("{s}: {net}: {e}"))?;
        let ports = match ports {
            "*" => PortSpec::Any,
            p => match p.split_once('-') {
                Some((lo, hi)) => {
                    let lo = lo.parse().map_err(|e| format!("{s}: {lo}: {e}"))?;
                    let hi = hi.parse().map_err(|e| format!("{s}: {hi}: {e}"))?;
                    PortSpec::range(lo, hi).map_err(|e| format!("{s}: {e}"))?
                }
                None => {
                    let p = p.parse().map_err(|e| format!("{s}: {p}: {e}"))?;
                    PortSpec::exact(p).map_err(|e| format!("{s}: {e}"))?
                }
            },
        };
        Ok(BindSpec {
            proto,
            prefix,
            ports,
        })
    }
}

/// Logs (the runtime's `tracing` events) to stderr, coloured only on a terminal.
pub fn init_logs() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

impl DeviceArgs {
    /// Starts a runtime on the TAP with these options.
    pub fn start(&self) -> std::io::Result<Runtime> {
        self.builder().start()
    }

    /// A runtime builder with these options, for more settings before `start`.
    pub fn builder(&self) -> subnetstack::Builder {
        let mut b = Runtime::builder().queues(self.queues);
        b = match (&self.tap, &self.xdp) {
            (_, Some(x)) => b.xdp(x),
            (Some(t), None) if self.no_offload => {
                let mut cfg = subnetstack::ifaces::tap::TapConfig::new(t);
                cfg.queues = self.queues;
                b.tap_config(cfg)
            }
            (Some(t), None) => b.tap(t),
            (None, None) => unreachable!("clap requires --tap or --xdp"),
        };
        for p in &self.prefixes {
            b = b.prefix(*p);
        }
        for g in &self.gateways {
            b = match g {
                IpAddr::V4(v) => b.gateway_v4(*v),
                IpAddr::V6(v) => b.gateway_v6(*v),
            };
        }
        if let Some(p) = &self.pcap {
            b = b.pcap(p);
        }
        if let Some(m) = self.poll {
            b = b.poll_mode(m);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_specs_parse_and_print_back() {
        for s in [
            "tcp:198.18.0.0/15:80",
            "udp:198.18.5.0/24:53",
            "198.18.9.0/24:8000-8099",
            "tcp:[2001:db8:100::]/48:80",
            "198.18.0.0/16:*",
        ] {
            let b: BindSpec = s.parse().unwrap();
            assert_eq!(b.to_string(), s);
        }
        assert!("198.18.0.0/16".parse::<BindSpec>().is_err());
        assert!("198.18.0.0/16:0".parse::<BindSpec>().is_err());
        assert!("198.18.0.0/16:90-80".parse::<BindSpec>().is_err());
    }
}
