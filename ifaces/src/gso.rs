//! Transmit offloads done in software, as a NIC (or the kernel behind a TAP) does them:
//! cutting a TCP super-frame into MSS-sized segments (TSO) and completing a partial checksum.
//! The memory pair uses this to stand for a device with offloads, so that what the stack sends
//! for a TAP can be checked without one.

use crate::{Csum, FrameMeta, GsoKind};

/// Why a frame could not be segmented or completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadError {
    /// Too short for the headers it claims, or an offset outside the frame.
    Truncated,
    /// Not TCP over IPv4/IPv6 (without IPv6 extension headers), or a GSO size of 0.
    Unsupported,
}

/// The ones'-complement sum of `data` (RFC 1071), folded, starting from `sum`.
pub fn ones_sum(data: &[u8], sum: u32) -> u16 {
    let mut s = u64::from(sum);
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        s += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = words.remainder() {
        s += u64::from(*b) << 8;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Completes a [`Csum::Partial`] checksum in place: the field at `start + offset` holds the
/// pseudo-header sum; the sum over `start..` replaces it, inverted (virtio `NEEDS_CSUM`).
pub fn complete_csum(frame: &mut [u8], start: u16, offset: u16) -> Result<(), OffloadError> {
    let (start, at) = (usize::from(start), usize::from(start) + usize::from(offset));
    if at + 2 > frame.len() {
        return Err(OffloadError::Truncated);
    }
    let c = !ones_sum(&frame[start..], 0);
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// What a device does with `frame` before it goes on the wire: a GSO super-frame is cut into
/// segments of `gso.size` payload bytes (headers repeated; IPv4 length, identification and
/// header checksum, IPv6 payload length, TCP sequence number and checksum rewritten; FIN and PSH
/// on the last segment only, CWR on the first only), a partial checksum is completed. Each
/// resulting frame goes to `emit`; returns how many.
pub fn device_transmit(
    frame: &[u8],
    meta: &FrameMeta,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let Some(gso) = meta.gso else {
        let mut f = frame.to_vec();
        if let Csum::Partial { start, offset } = meta.csum {
            complete_csum(&mut f, start, offset)?;
        }
        emit(&f);
        return Ok(1);
    };
    if gso.size == 0 || gso.kind == GsoKind::Udp {
        return Err(OffloadError::Unsupported);
    }
    let v6 = match frame.get(12..14) {
        Some([0x08, 0x00]) => false,
        Some([0x86, 0xdd]) => true,
        Some(_) => return Err(OffloadError::Unsupported),
        None => return Err(OffloadError::Truncated),
    };
    let ip_len = if v6 {
        if frame.get(20) != Some(&6) {
            return Err(OffloadError::Unsupported);
        }
        40
    } else {
        let b = *frame.get(14).ok_or(OffloadError::Truncated)?;
        if frame.get(23) != Some(&6) {
            return Err(OffloadError::Unsupported);
        }
        usize::from(b & 0x0f) * 4
    };
    let l4 = 14 + ip_len;
    let thl = usize::from(*frame.get(l4 + 12).ok_or(OffloadError::Truncated)? >> 4) * 4;
    let hdr = l4 + thl;
    if thl < 20 || frame.len() < hdr {
        return Err(OffloadError::Truncated);
    }
    let payload = &frame[hdr..];
    let seq0 = u32::from_be_bytes(frame[l4 + 4..l4 + 8].try_into().expect("4 bytes"));
    let flags = frame[l4 + 13];
    let (fin_psh, cwr) = (0x01 | 0x08, 0x80);
    let ident0 = u16::from_be_bytes([frame[18], frame[19]]);
    let chunks = payload.chunks(usize::from(gso.size));
    let n = chunks.len();
    let mut f = Vec::with_capacity(hdr + usize::from(gso.size));
    for (i, chunk) in chunks.enumerate() {
        f.clear();
        f.extend_from_slice(&frame[..hdr]);
        f.extend_from_slice(chunk);
        let seg_l4 = thl + chunk.len();
        if v6 {
            f[18..20].copy_from_slice(&(seg_l4 as u16).to_be_bytes());
        } else {
            f[16..18].copy_from_slice(&((ip_len + seg_l4) as u16).to_be_bytes());
            f[18..20].copy_from_slice(&ident0.wrapping_add(i as u16).to_be_bytes());
            f[24..26].fill(0);
            let c = !ones_sum(&f[14..l4], 0);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * usize::from(gso.size)) as u32);
        f[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut fl = flags;
        if i + 1 < n {
            fl &= !fin_psh;
        }
        if i > 0 {
            fl &= !cwr;
        }
        f[l4 + 13] = fl;
        // The pseudo-header for this segment's length, then the segment.
        let mut pseudo = u32::from(6u8) + seg_l4 as u32;
        let addrs = if v6 { &f[22..54] } else { &f[26..34] };
        pseudo += u32::from(ones_sum(addrs, 0));
        f[l4 + 16..l4 + 18].fill(0);
        let c = !ones_sum(&f[l4..], pseudo);
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        emit(&f);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Gso;
    use smoltcp::wire::{Ipv4Packet, TcpPacket};

    /// An IPv4 TCP super-frame: 3 segments' worth (100 + 100 + 50 bytes), FIN|PSH|ACK|CWR.
    fn super_frame() -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        let total = (20 + 20 + 250) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[18..20].copy_from_slice(&7u16.to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[198, 18, 0, 1]);
        f[30..34].copy_from_slice(&[198, 18, 0, 2]);
        f[34..36].copy_from_slice(&80u16.to_be_bytes());
        f[36..38].copy_from_slice(&4000u16.to_be_bytes());
        f[38..42].copy_from_slice(&0xffff_ffc0u32.to_be_bytes());
        f[46] = 5 << 4;
        f[47] = 0x80 | 0x10 | 0x08 | 0x01;
        f.extend((0..250u32).map(|i| i as u8));
        f
    }

    /// The TCP checksum checked by smoltcp (an implementation other than the one under test).
    fn tcp_checksum_ok(f: &[u8]) -> bool {
        let ip = Ipv4Packet::new_unchecked(&f[14..]);
        TcpPacket::new_unchecked(ip.payload())
            .verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into())
    }

    #[test]
    fn segments_like_a_nic() {
        let f = super_frame();
        let meta = FrameMeta {
            gso: Some(Gso {
                kind: GsoKind::Tcp4,
                size: 100,
                hdr_len: 54,
            }),
            csum: Csum::Partial {
                start: 34,
                offset: 16,
            },
        };
        let mut segs = Vec::new();
        assert_eq!(device_transmit(&f, &meta, |s| segs.push(s.to_vec())), Ok(3));
        let lens: Vec<usize> = segs.iter().map(|s| s.len() - 54).collect();
        assert_eq!(lens, [100, 100, 50]);
        let mut payload = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(
                Ipv4Packet::new_unchecked(&s[14..]).verify_checksum(),
                "IPv4 header checksum"
            );
            assert_eq!(
                usize::from(u16::from_be_bytes([s[16], s[17]])),
                s.len() - 14
            );
            assert_eq!(u16::from_be_bytes([s[18], s[19]]), 7 + i as u16);
            assert!(tcp_checksum_ok(s), "segment {i}");
            let seq = u32::from_be_bytes(s[38..42].try_into().unwrap());
            assert_eq!(seq, 0xffff_ffc0u32.wrapping_add(100 * i as u32));
            let fl = s[47];
            assert_eq!(fl & 0x09 != 0, i == 2, "FIN/PSH on the last only");
            assert_eq!(fl & 0x80 != 0, i == 0, "CWR on the first only");
            assert!(fl & 0x10 != 0);
            payload.extend_from_slice(&s[54..]);
        }
        assert_eq!(payload, f[54..]);
    }

    #[test]
    fn completes_a_partial_checksum_and_refuses_bad_frames() {
        let mut f = super_frame();
        let pseudo = u32::from(ones_sum(&f[26..34], 0)) + 6 + (f.len() - 34) as u32;
        let p = ones_sum(&[], pseudo);
        f[50..52].copy_from_slice(&p.to_be_bytes());
        let meta = FrameMeta {
            gso: None,
            csum: Csum::Partial {
                start: 34,
                offset: 16,
            },
        };
        let mut out = Vec::new();
        assert_eq!(device_transmit(&f, &meta, |s| out = s.to_vec()), Ok(1));
        assert!(tcp_checksum_ok(&out));
        let gso = FrameMeta {
            gso: Some(Gso {
                kind: GsoKind::Tcp4,
                size: 100,
                hdr_len: 54,
            }),
            ..meta
        };
        assert_eq!(
            device_transmit(&f[..40], &gso, |_| {}),
            Err(OffloadError::Truncated)
        );
        let mut udp = f.clone();
        udp[23] = 17;
        assert_eq!(
            device_transmit(&udp, &gso, |_| {}),
            Err(OffloadError::Unsupported)
        );
        let bad = FrameMeta {
            gso: None,
            csum: Csum::Partial {
                start: 34,
                offset: 9000,
            },
        };
        assert_eq!(
            device_transmit(&f, &bad, |_| {}),
            Err(OffloadError::Truncated)
        );
    }
}
