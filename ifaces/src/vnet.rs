//! The virtio-net header that precedes each frame on a TAP opened with `IFF_VNET_HDR`
//! (`struct virtio_net_hdr`, 10 bytes, little-endian on the hosts we support).

use crate::{Csum, FrameMeta, Gso, GsoKind};

const F_NEEDS_CSUM: u8 = 1;
const F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr`: offload metadata in front of a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Header bytes repeated in each segment.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

/// Why a virtio-net header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VnetError {
    /// Fewer than 10 bytes.
    Truncated,
    /// A GSO type we do not know.
    UnknownGso(u8),
}

impl VirtioNetHdr {
    /// Size on the wire.
    pub const LEN: usize = 10;

    /// Parses the first 10 bytes.
    pub fn parse(b: &[u8]) -> Result<Self, VnetError> {
        if b.len() < Self::LEN {
            return Err(VnetError::Truncated);
        }
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Writes the 10 bytes.
    pub fn emit(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// The frame metadata this header describes.
    pub fn to_meta(&self) -> Result<FrameMeta, VnetError> {
        let csum = if self.flags & F_NEEDS_CSUM != 0 {
            Csum::Partial {
                start: self.csum_start,
                offset: self.csum_offset,
            }
        } else if self.flags & F_DATA_VALID != 0 {
            Csum::Valid
        } else {
            Csum::Complete
        };
        let kind = match self.gso_type & !GSO_ECN {
            GSO_NONE => None,
            GSO_TCPV4 => Some(GsoKind::Tcp4),
            GSO_TCPV6 => Some(GsoKind::Tcp6),
            GSO_UDP | GSO_UDP_L4 => Some(GsoKind::Udp),
            t => return Err(VnetError::UnknownGso(t)),
        };
        Ok(FrameMeta {
            gso: kind.map(|kind| Gso {
                kind,
                size: self.gso_size,
                hdr_len: self.hdr_len,
            }),
            csum,
        })
    }

    /// The header for a frame with this metadata.
    pub fn from_meta(m: &FrameMeta) -> Self {
        let mut h = VirtioNetHdr::default();
        match m.csum {
            Csum::Complete => {}
            Csum::Partial { start, offset } => {
                h.flags = F_NEEDS_CSUM;
                h.csum_start = start;
                h.csum_offset = offset;
            }
            Csum::Valid => h.flags = F_DATA_VALID,
        }
        if let Some(g) = m.gso {
            h.gso_type = match g.kind {
                GsoKind::Tcp4 => GSO_TCPV4,
                GsoKind::Tcp6 => GSO_TCPV6,
                GsoKind::Udp => GSO_UDP_L4,
            };
            h.gso_size = g.size;
            h.hdr_len = g.hdr_len;
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_input() {
        let m = FrameMeta {
            gso: Some(Gso {
                kind: GsoKind::Tcp4,
                size: 1448,
                hdr_len: 66,
            }),
            csum: Csum::Partial {
                start: 34,
                offset: 16,
            },
        };
        let h = VirtioNetHdr::from_meta(&m);
        let b = h.emit();
        assert_eq!(b, [1, 1, 66, 0, 0xa8, 5, 34, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&b).unwrap().to_meta().unwrap(), m);
        assert_eq!(VirtioNetHdr::parse(&b[..9]), Err(VnetError::Truncated));
        let mut bad = b;
        bad[1] = 9;
        assert_eq!(
            VirtioNetHdr::parse(&bad).unwrap().to_meta(),
            Err(VnetError::UnknownGso(9))
        );
        bad[1] = GSO_TCPV6 | GSO_ECN;
        assert_eq!(
            VirtioNetHdr::parse(&bad)
                .unwrap()
                .to_meta()
                .unwrap()
                .gso
                .unwrap()
                .kind,
            GsoKind::Tcp6
        );
    }
}
