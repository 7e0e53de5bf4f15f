//! `struct sockaddr` <-> [`SocketAddr`], with IPv4-mapped IPv6 addresses folded to IPv4 (what
//! the stack speaks) and unfolded again for IPv6 sockets.

use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libc::{c_int, sa_family_t, sockaddr, sockaddr_in, sockaddr_in6, socklen_t};

/// An address from the application: the canonical address (IPv4 for `::ffff:a.b.c.d`) and
/// whether it came as a `sockaddr_in6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppAddr {
    /// The address, IPv4-mapped folded to IPv4.
    pub addr: SocketAddr,
    /// It was a `sockaddr_in6`.
    pub v6_family: bool,
}

/// Folds `::ffff:a.b.c.d` to `a.b.c.d`.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Reads a `sockaddr_in` or `sockaddr_in6`.
///
/// # Safety
/// `addr` must be null or point to `len` readable bytes.
pub unsafe fn read(addr: *const sockaddr, len: socklen_t) -> Result<AppAddr, c_int> {
    if addr.is_null() {
        return Err(libc::EFAULT);
    }
    let len = len as usize;
    if len < size_of::<sa_family_t>() {
        return Err(libc::EINVAL);
    }
    // SAFETY: the caller vouches for `len >= 2` readable bytes at `addr`; read_unaligned has
    // no alignment requirement.
    let family = unsafe { std::ptr::read_unaligned(addr.cast::<sa_family_t>()) };
    match c_int::from(family) {
        libc::AF_INET => {
            if len < size_of::<sockaddr_in>() {
                return Err(libc::EINVAL);
            }
            // SAFETY: `len` covers a whole sockaddr_in (checked above).
            let sin = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in>()) };
            Ok(AppAddr {
                addr: SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )),
                v6_family: false,
            })
        }
        libc::AF_INET6 => {
            if len < size_of::<sockaddr_in6>() {
                return Err(libc::EINVAL);
            }
            // SAFETY: `len` covers a whole sockaddr_in6 (checked above).
            let sin6 = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in6>()) };
            let a = SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            ));
            Ok(AppAddr {
                addr: canonical(a),
                v6_family: true,
            })
        }
        _ => Err(libc::EAFNOSUPPORT),
    }
}

/// Writes `a` as a `sockaddr_in6` (IPv4 mapped) when `v6_family`, else as a `sockaddr_in`;
/// copies at most `*len` bytes and sets `*len` to the full size, like `accept(2)`.
///
/// # Safety
/// `addr` and `len` must both be null (nothing is written), or `len` must point to a
/// writable `socklen_t` and `addr` to `*len` writable bytes.
pub unsafe fn write(a: SocketAddr, v6_family: bool, addr: *mut sockaddr, len: *mut socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    let mut sin: sockaddr_in;
    let mut sin6: sockaddr_in6;
    let bytes: &[u8] = match (a, v6_family) {
        (SocketAddr::V4(v4), false) => {
            // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
            sin = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            // SAFETY: a byte view of a live, initialised local.
            unsafe {
                std::slice::from_raw_parts(
                    (&sin as *const sockaddr_in).cast::<u8>(),
                    size_of::<sockaddr_in>(),
                )
            }
        }
        (a, _) => {
            let (ip, port, flow, scope) = match a {
                SocketAddr::V4(v4) => (v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
                SocketAddr::V6(v6) => (*v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()),
            };
            // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
            sin6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as sa_family_t;
            sin6.sin6_port = port.to_be();
            sin6.sin6_addr.s6_addr = ip.octets();
            sin6.sin6_flowinfo = flow;
            sin6.sin6_scope_id = scope;
            // SAFETY: a byte view of a live, initialised local.
            unsafe {
                std::slice::from_raw_parts(
                    (&sin6 as *const sockaddr_in6).cast::<u8>(),
                    size_of::<sockaddr_in6>(),
                )
            }
        }
    };
    // SAFETY: the caller vouches for `len` pointing to a readable, writable socklen_t.
    let room = unsafe { *len } as usize;
    let n = room.min(bytes.len());
    // SAFETY: `addr` has `*len >= n` writable bytes (caller's contract); the source is a
    // local that cannot overlap it.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr.cast::<u8>(), n);
        *len = bytes.len() as socklen_t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for (a, v6) in [
            ("198.18.0.1:8080", false),
            ("198.18.0.1:8080", true),
            ("[2001:db8::5]:443", true),
        ] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: sockaddr_storage is plain old data.
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_storage>() as socklen_t;
            // SAFETY: a storage-sized buffer and its length.
            unsafe {
                write(
                    a,
                    v6,
                    (&mut ss as *mut libc::sockaddr_storage).cast(),
                    &mut len,
                )
            };
            let want = if v6 {
                size_of::<sockaddr_in6>()
            } else {
                size_of::<sockaddr_in>()
            };
            assert_eq!(len as usize, want);
            // SAFETY: `len` bytes were written into `ss`.
            let back = unsafe { read((&ss as *const libc::sockaddr_storage).cast(), len) }.unwrap();
            assert_eq!(
                back,
                AppAddr {
                    addr: a,
                    v6_family: v6
                }
            );
        }
    }

    #[test]
    fn short_buffers() {
        let a: SocketAddr = "198.18.0.1:80".parse().unwrap();
        let mut buf = [0xaau8; 4];
        let mut len: socklen_t = 4;
        // SAFETY: 4 writable bytes, len says 4.
        unsafe { write(a, false, buf.as_mut_ptr().cast(), &mut len) };
        assert_eq!(len as usize, size_of::<sockaddr_in>(), "full size reported");
        assert_eq!(&buf[2..4], &80u16.to_be_bytes(), "truncated copy");
        // SAFETY: 4 readable bytes.
        assert_eq!(unsafe { read(buf.as_ptr().cast(), 4) }, Err(libc::EINVAL));
        // SAFETY: null is allowed.
        assert_eq!(unsafe { read(std::ptr::null(), 16) }, Err(libc::EFAULT));
    }
}
