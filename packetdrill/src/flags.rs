//! The `--so_flags` string: comma-separated `key=value` settings.
//!
//! | key | value | default |
//! |---|---|---|
//! | `prefix` | a local prefix (CIDR); repeat the key for more; the first one replaces the defaults | `198.18.0.0/15` and `2001:db8::/32` |
//! | `src4`, `src6` | source address of `connect()` on a socket not bound to an address | the first host of the first prefix of that family (`198.18.0.1`, `2001:db8::1`) |
//! | `mtu` | IP MTU of the virtual link (the stack's MSS follows from it) | `1500` |
//! | `timestamps`, `sack`, `syncookies` | `0`/`1`: the stack's TCP options | `1` |
//! | `nagle` | `0`/`1`: Nagle by default (sockets may still set `TCP_NODELAY`) | `1` |
//! | `delack_ms` | delayed-ACK timeout | the stack's (40) |
//! | `time_wait_ms` | TIME-WAIT length | the stack's (60000) |
//! | `syn_retries`, `retries` | SYN and data retransmissions before giving up | the stack's (6, 15) |
//! | `rcvbuf`, `sndbuf` | the stack's per-connection buffer sizes, bytes | the stack's (262144) |
//! | `block_ms` | longest virtual wait of a blocking call (and of `netdev_receive` for a packet) | `600000` |
//! | `tick_us` | virtual microseconds each `gettimeofday()` advances the clock | `1` |
//! | `log` | `0`/`1`: trace every call and packet on stderr | `0` |
//!
//! Example: `--so_flags=prefix=198.18.0.0/16,prefix=2001:db8::/32,delack_ms=40,log=1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

/// Settings parsed from packetdrill's `--so_flags`; see the module docs for the keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flags {
    /// The stack's local prefixes: it answers for every address in them.
    pub prefixes: Vec<IpNet>,
    /// Source address of `connect()` on IPv4 when the socket is not bound to an address.
    pub src4: Option<Ipv4Addr>,
    /// Same for IPv6.
    pub src6: Option<Ipv6Addr>,
    /// IP MTU of the virtual link.
    pub mtu: usize,
    /// Offer TCP timestamps.
    pub timestamps: bool,
    /// Offer and use SACK.
    pub sack: bool,
    /// Answer SYN floods with SYN cookies.
    pub syncookies: bool,
    /// Nagle's algorithm on new connections.
    pub nagle: bool,
    /// Delayed-ACK timeout (`None`: the stack's default).
    pub delayed_ack: Option<Duration>,
    /// TIME-WAIT length (`None`: the stack's default).
    pub time_wait: Option<Duration>,
    /// SYN retransmissions before giving up (`None`: the stack's default).
    pub syn_retries: Option<u32>,
    /// Data retransmissions before giving up (`None`: the stack's default).
    pub retries: Option<u32>,
    /// Receive buffer per connection (`None`: the stack's default).
    pub rcvbuf: Option<usize>,
    /// Send buffer per connection (`None`: the stack's default).
    pub sndbuf: Option<usize>,
    /// Longest virtual time a blocking call waits before giving up.
    pub block_timeout: Duration,
    /// Virtual time each `gettimeofday()` call advances the clock by.
    pub tick: Duration,
    /// Trace calls and packets on stderr.
    pub log: bool,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            prefixes: vec![
                "198.18.0.0/15".parse().expect("valid prefix"),
                "2001:db8::/32".parse().expect("valid prefix"),
            ],
            src4: None,
            src6: None,
            mtu: 1500,
            timestamps: true,
            sack: true,
            syncookies: true,
            nagle: true,
            delayed_ack: None,
            time_wait: None,
            syn_retries: None,
            retries: None,
            rcvbuf: None,
            sndbuf: None,
            block_timeout: Duration::from_secs(600),
            tick: Duration::from_micros(1),
            log: false,
        }
    }
}

fn boolean(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(format!("{key}: expected 0 or 1, got {v:?}")),
    }
}

fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{key}: expected a number, got {v:?}"))
}

impl Flags {
    /// Parses a `--so_flags` string (empty means all defaults).
    pub fn parse(s: &str) -> Result<Flags, String> {
        let mut f = Flags::default();
        let mut own_prefixes = false;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, v) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: expected key=value"))?;
            let (key, v) = (key.trim(), v.trim());
            match key {
                "prefix" => {
                    let p: IpNet = v
                        .parse()
                        .map_err(|_| format!("prefix: {v:?} is not a CIDR prefix"))?;
                    if p.trunc() != p {
                        return Err(format!("prefix: {p} has host bits set"));
                    }
                    if !own_prefixes {
                        f.prefixes.clear();
                        own_prefixes = true;
                    }
                    f.prefixes.push(p);
                }
                "src4" => {
                    f.src4 = Some(
                        v.parse()
                            .map_err(|_| format!("src4: {v:?} is not an IPv4 address"))?,
                    )
                }
                "src6" => {
                    f.src6 = Some(
                        v.parse()
                            .map_err(|_| format!("src6: {v:?} is not an IPv6 address"))?,
                    )
                }
                "mtu" => f.mtu = number(key, v)?,
                "timestamps" => f.timestamps = boolean(key, v)?,
                "sack" => f.sack = boolean(key, v)?,
                "syncookies" => f.syncookies = boolean(key, v)?,
                "nagle" => f.nagle = boolean(key, v)?,
                "delack_ms" => f.delayed_ack = Some(Duration::from_millis(number(key, v)?)),
                "time_wait_ms" => f.time_wait = Some(Duration::from_millis(number(key, v)?)),
                "syn_retries" => f.syn_retries = Some(number(key, v)?),
                "retries" => f.retries = Some(number(key, v)?),
                "rcvbuf" => f.rcvbuf = Some(number(key, v)?),
                "sndbuf" => f.sndbuf = Some(number(key, v)?),
                "block_ms" => f.block_timeout = Duration::from_millis(number(key, v)?),
                "tick_us" => f.tick = Duration::from_micros(number(key, v)?),
                "log" => f.log = boolean(key, v)?,
                _ => return Err(format!("unknown key {key:?}")),
            }
        }
        if f.prefixes.is_empty() {
            return Err("no local prefix".into());
        }
        for (fam, src) in [
            ("src4", f.src4.map(IpAddr::V4)),
            ("src6", f.src6.map(IpAddr::V6)),
        ] {
            if let Some(a) = src {
                if !f.prefixes.iter().any(|p| p.contains(&a)) {
                    return Err(format!("{fam}: {a} is outside the local prefixes"));
                }
            }
        }
        Ok(f)
    }

    /// The source address `connect()` uses for `v6` (or IPv4) when the socket has none:
    /// `src4`/`src6`, else the first host of the first prefix of that family.
    pub fn source(&self, v6: bool) -> Option<IpAddr> {
        let given = if v6 {
            self.src6.map(IpAddr::V6)
        } else {
            self.src4.map(IpAddr::V4)
        };
        given.or_else(|| {
            self.prefixes
                .iter()
                .find(|p| matches!(p, IpNet::V6(_)) == v6)
                .map(|p| match p {
                    IpNet::V4(n) if n.prefix_len() < 32 => {
                        IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + 1))
                    }
                    IpNet::V6(n) if n.prefix_len() < 128 => {
                        IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 1))
                    }
                    p => p.addr(),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_default() {
        assert_eq!(Flags::parse("").unwrap(), Flags::default());
        assert_eq!(Flags::parse(" , ").unwrap(), Flags::default());
    }

    #[test]
    fn keys_parse() {
        let f = Flags::parse("prefix=198.18.0.0/16, prefix=2001:db8:1::/48,mtu=1400,sack=0,delack_ms=200,log=1,tick_us=0").unwrap();
        assert_eq!(
            f.prefixes,
            vec![
                "198.18.0.0/16".parse::<IpNet>().unwrap(),
                "2001:db8:1::/48".parse().unwrap()
            ]
        );
        assert_eq!(f.mtu, 1400);
        assert!(!f.sack && f.timestamps && f.log);
        assert_eq!(f.delayed_ack, Some(Duration::from_millis(200)));
        assert_eq!(f.tick, Duration::ZERO);
        assert_eq!(f.source(false), Some("198.18.0.1".parse().unwrap()));
        assert_eq!(f.source(true), Some("2001:db8:1::1".parse().unwrap()));
    }

    #[test]
    fn sources() {
        let f = Flags::parse("prefix=198.18.7.9/32").unwrap();
        assert_eq!(f.source(false), Some("198.18.7.9".parse().unwrap()));
        assert_eq!(f.source(true), None, "no v6 prefix left");
        let f = Flags::parse("src6=2001:db8::77").unwrap();
        assert_eq!(f.source(true), Some("2001:db8::77".parse().unwrap()));
    }

    #[test]
    fn errors() {
        for bad in [
            "bogus=1",
            "prefix",
            "prefix=198.18.0.1/15",
            "prefix=nonsense",
            "mtu=big",
            "sack=maybe",
            "src4=10.0.0.1",
            "src4=2001:db8::1",
        ] {
            assert!(Flags::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
