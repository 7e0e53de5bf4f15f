//! The `bpf(2)` calls we need (map create/update/delete, program load, link create) and a tiny
//! assembler for the XDP program, so that nothing needs clang, libbpf or a C toolchain.
//!
//! Encodings and constants are those of the kernel's UAPI (`linux/bpf.h`, `linux/if_xdp.h`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// bpf(2) commands.
const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_PROG_LOAD: u32 = 5;
const BPF_LINK_CREATE: u32 = 28;

// Map and program types, attach types, flags.
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// `XDP_FLAGS_SKB_MODE`: generic XDP, after the kernel built an skb.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`: native XDP, in the driver.
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

// Helpers called by the program.
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_REDIRECT_MAP: i32 = 51;

// XDP actions.
const XDP_PASS: i32 = 2;

/// `union bpf_attr`, as bytes: every command's fields are written at their UAPI offsets and the
/// rest stays zero (the kernel insists on zero past the fields it knows).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn name(&mut self, off: usize, name: &str) -> &mut Self {
        let n = name.len().min(15);
        self.0[off..off + n].copy_from_slice(&name.as_bytes()[..n]);
        self
    }
}

fn bpf(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised bpf_attr of the size passed; every pointer stored in
    // it points to memory that outlives the call (the callers' locals).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd(r: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new file descriptor to us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

/// A BPF map owned by this process (closed on drop; the kernel frees it with its last user).
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    fn create(
        kind: u32,
        key_size: usize,
        value_size: usize,
        max: u32,
        flags: u32,
        name: &str,
    ) -> io::Result<Map> {
        let mut a = Attr::new();
        a.u32(0, kind)
            .u32(4, key_size as u32)
            .u32(8, value_size as u32)
            .u32(12, max)
            .u32(16, flags)
            .name(28, name);
        let r = bpf(BPF_MAP_CREATE, &mut a)
            .map_err(|e| io::Error::new(e.kind(), format!("BPF_MAP_CREATE {name}: {e}")))?;
        Ok(Map {
            fd: fd(r),
            key_size,
            value_size,
        })
    }

    /// An LPM trie keyed by `u32 prefix length` + `addr_len` address bytes (network order).
    pub fn lpm(addr_len: usize, max: u32, name: &str) -> io::Result<Map> {
        Self::create(
            BPF_MAP_TYPE_LPM_TRIE,
            4 + addr_len,
            4,
            max,
            BPF_F_NO_PREALLOC,
            name,
        )
    }

    /// An XSK map with `max` slots (one per queue id).
    pub fn xsk(max: u32, name: &str) -> io::Result<Map> {
        Self::create(BPF_MAP_TYPE_XSKMAP, 4, 4, max, 0, name)
    }

    /// Inserts or replaces `key -> value`.
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        assert_eq!(key.len(), self.key_size, "key size");
        assert_eq!(value.len(), self.value_size, "value size");
        let mut a = Attr::new();
        a.u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, value.as_ptr() as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
    }

    /// Removes `key`; `Ok(false)` when it was not there.
    pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
        assert_eq!(key.len(), self.key_size, "key size");
        let mut a = Attr::new();
        a.u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64);
        match bpf(BPF_MAP_DELETE_ELEM, &mut a) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

// ---- assembler --------------------------------------------------------------------------

/// One instruction, or a jump whose target is a label resolved by [`Asm::finish`].
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
    /// Jump target label, patched into `off`.
    target: Option<Label>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Label(usize);

// Instruction classes, sizes, modes, operations (linux/bpf_common.h, linux/bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const MOV: u8 = 0xb0;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JNE: u8 = 0x50;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
const PSEUDO_MAP_FD: u8 = 1;

/// Registers: r0 return value, r1-r5 arguments (clobbered by calls), r6-r9 kept across calls,
/// r10 the read-only frame pointer.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R10: u8 = 10;

#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
            target: None,
        });
    }
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.raw(JMP | code, dst, src, 0, imm);
        self.insns.last_mut().expect("just pushed").target = Some(to);
    }
    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.raw(ALU64 | MOV | X, dst, src, 0, 0);
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.raw(ALU64 | MOV | K, dst, 0, 0, imm);
    }
    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.raw(ALU64 | ADD | K, dst, 0, 0, imm);
    }
    /// `dst = *(size *)(src + off)`
    fn load(&mut self, size: u8, dst: u8, src: u8, off: i16) {
        self.raw(LDX | MEM | size, dst, src, off, 0);
    }
    /// `*(u32 *)(dst + off) = src`
    fn store32(&mut self, dst: u8, off: i16, src: u8) {
        self.raw(STX | MEM | W, dst, src, off, 0);
    }
    /// `*(u32 *)(dst + off) = imm`
    fn store32_imm(&mut self, dst: u8, off: i16, imm: i32) {
        self.raw(ST | MEM | W, dst, 0, off, imm);
    }
    /// `dst = map` (the 16-byte `ld_imm64` with a map fd the kernel swaps for the map).
    fn load_map(&mut self, dst: u8, map: &Map) {
        self.raw(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, map.raw());
        self.raw(0, 0, 0, 0, 0);
    }
    fn call(&mut self, helper: i32) {
        self.raw(JMP | CALL, 0, 0, 0, helper);
    }
    fn exit(&mut self) {
        self.raw(JMP | EXIT, 0, 0, 0, 0);
    }
    /// `if data + len > data_end goto fail`: the bounds check the verifier wants before reading
    /// `len` bytes of the packet (data in r7, data_end in r8; clobbers r1).
    fn need(&mut self, len: i32, fail: Label) {
        self.mov_reg(R1, R7);
        self.add_imm(R1, len);
        self.jump(JGT | X, R1, R8, 0, fail);
    }

    fn finish(self) -> Vec<u64> {
        self.insns
            .iter()
            .enumerate()
            .map(|(pc, i)| {
                let off = match i.target {
                    Some(l) => {
                        let to = self.labels[l.0].expect("every label bound");
                        i16::try_from(to as isize - pc as isize - 1).expect("short program")
                    }
                    None => i.off,
                };
                u64::from(i.code)
                    | u64::from(i.dst | (i.src << 4)) << 8
                    | u64::from(off as u16) << 16
                    | u64::from(i.imm as u32) << 32
            })
            .collect()
    }
}

/// The XDP program: frames for the stack go to the XSK socket of their RX queue, the rest to the
/// kernel.
///
/// Ours are: IPv4 whose destination is in `v4` (an LPM trie of the local prefixes), ARP whose
/// target address is in `v4`, IPv6 whose destination is in `v6`, and Neighbour Solicitations
/// (sent to a solicited-node multicast address) whose target is in `v6`. Everything else,
/// and anything too short to judge, is `XDP_PASS`. A queue without a socket in `xsks` also
/// passes (the fallback action given to `bpf_redirect_map`).
fn program(v4: &Map, v6: &Map, xsks: &Map) -> Vec<u64> {
    let mut a = Asm::default();
    let pass = a.label();
    let ipv4 = a.label();
    let arp = a.label();
    let ipv6 = a.label();
    let lookup4 = a.label();
    let redirect = a.label();

    a.mov_reg(R6, R1); // ctx (struct xdp_md)
    a.load(W, R7, R6, 0); // data
    a.load(W, R8, R6, 4); // data_end
    a.need(14, pass);
    a.load(H, R1, R7, 12); // EtherType, network order read little-endian
    a.jump(JEQ | K, R1, 0, 0x0008, ipv4);
    a.jump(JEQ | K, R1, 0, 0x0608, arp);
    a.jump(JEQ | K, R1, 0, 0xdd86u16 as i32, ipv6);
    a.jump(JA, 0, 0, 0, pass);

    a.bind(ipv4);
    a.need(14 + 20, pass);
    a.load(W, R1, R7, 14 + 16); // destination address
    a.jump(JA, 0, 0, 0, lookup4);

    a.bind(arp);
    a.need(14 + 28, pass);
    a.load(W, R1, R7, 14 + 24); // target protocol address

    a.bind(lookup4);
    // Key on the stack: { u32 prefixlen = 32; u8 addr[4] } at r10-8.
    a.store32_imm(R10, -8, 32);
    a.store32(R10, -4, R1);
    a.mov_reg(R2, R10);
    a.add_imm(R2, -8);
    a.load_map(R1, v4);
    a.call(FN_MAP_LOOKUP_ELEM);
    a.jump(JEQ | K, R0, 0, 0, pass);
    a.jump(JA, 0, 0, 0, redirect);

    a.bind(ipv6);
    a.need(14 + 40, pass);
    // Key: { u32 prefixlen = 128; u8 addr[16] } at r10-20, from the destination address.
    let key6 = |a: &mut Asm, at: i16| {
        a.store32_imm(R10, -20, 128);
        for i in 0..4 {
            a.load(W, R1, R7, at + 4 * i);
            a.store32(R10, -16 + 4 * i, R1);
        }
        a.mov_reg(R2, R10);
        a.add_imm(R2, -20);
        a.load_map(R1, v6);
        a.call(FN_MAP_LOOKUP_ELEM);
    };
    key6(&mut a, 14 + 24);
    a.jump(JNE | K, R0, 0, 0, redirect);
    // A Neighbour Solicitation (ICMPv6 type 135 right after the fixed header) for a target of
    // ours: the target follows the 8-byte ICMPv6 header.
    a.need(14 + 40 + 8 + 16, pass);
    a.load(B, R1, R7, 14 + 6); // next header
    a.jump(JNE | K, R1, 0, 58, pass);
    a.load(B, R1, R7, 14 + 40); // ICMPv6 type
    a.jump(JNE | K, R1, 0, 135, pass);
    key6(&mut a, 14 + 40 + 8);
    a.jump(JEQ | K, R0, 0, 0, pass);

    a.bind(redirect);
    a.load(W, R2, R6, 16); // rx_queue_index
    a.load_map(R1, xsks);
    a.mov_imm(R3, XDP_PASS); // what to do when the queue has no socket
    a.call(FN_REDIRECT_MAP);
    a.exit();

    a.bind(pass);
    a.mov_imm(R0, XDP_PASS);
    a.exit();
    a.finish()
}

/// Loads the XDP program over these maps. A refusal carries the verifier's log.
pub fn load_program(v4: &Map, v6: &Map, xsks: &Map) -> io::Result<OwnedFd> {
    let insns = program(v4, v6, xsks);
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new();
    a.u32(0, BPF_PROG_TYPE_XDP)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .name(48, "subnetstack")
        .u32(68, BPF_XDP);
    match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(r) => Ok(fd(r)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let last = text.lines().rev().take(4).collect::<Vec<_>>();
            Err(io::Error::new(
                e.kind(),
                format!(
                    "BPF_PROG_LOAD (XDP): {e}{}{}",
                    if last.is_empty() { "" } else { "; verifier: " },
                    last.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            ))
        }
    }
}

/// Attaches `prog` to interface `ifindex` with a BPF link (`XDP_FLAGS_DRV_MODE` or
/// `XDP_FLAGS_SKB_MODE`). The program stays attached while the returned link is open: it is
/// detached when the link is closed, including when the process dies.
pub fn attach_xdp(prog: &OwnedFd, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, BPF_XDP)
        .u32(12, flags);
    bpf(BPF_LINK_CREATE, &mut a).map(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_resolve_relative_to_the_next_instruction() {
        let mut a = Asm::default();
        let l = a.label();
        a.jump(JA, 0, 0, 0, l);
        a.mov_imm(R0, 1);
        a.bind(l);
        a.exit();
        let code = a.finish();
        assert_eq!(code.len(), 3);
        // ja +1: code 0x05, off 1.
        assert_eq!(code[0] & 0xff, 0x05);
        assert_eq!((code[0] >> 16) & 0xffff, 1);
        // mov64 r0, 1: code 0xb7, imm 1.
        assert_eq!(code[1], 0xb7 | (1 << 32));
        assert_eq!(code[2], 0x95);
    }

    fn fake_map(key_size: usize) -> Map {
        Map {
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            key_size,
            value_size: 4,
        }
    }

    #[test]
    fn the_program_is_small_and_every_jump_lands_inside_it() {
        let code = program(&fake_map(8), &fake_map(20), &fake_map(4));
        println!("XDP program: {} instructions", code.len());
        assert!(code.len() < 100, "{}", code.len());
        let mut pc = 0;
        while pc < code.len() {
            let op = (code[pc] & 0xff) as u8;
            if op == LD | DW | IMM {
                pc += 2; // the 16-byte ld_imm64
                continue;
            }
            if op & 0x07 == JMP && op != JMP | CALL && op != JMP | EXIT {
                let off = ((code[pc] >> 16) & 0xffff) as u16 as i16;
                let to = pc as isize + 1 + off as isize;
                assert!(
                    to > pc as isize && (to as usize) < code.len(),
                    "jump at {pc} to {to}"
                );
            }
            pc += 1;
        }
        // Both exits return r0; the last instruction is one of them.
        assert_eq!(code[code.len() - 1] & 0xff, u64::from(JMP | EXIT));
    }

    #[test]
    fn registers_pack_dst_low_src_high() {
        let mut a = Asm::default();
        a.mov_reg(R6, R1);
        a.store32(R10, -8, R1);
        let code = a.finish();
        assert_eq!(code[0], 0xbf | (0x16 << 8));
        // stxw [r10-8], r1: code 0x63, regs 0x1a, off 0xfff8.
        assert_eq!(code[1], 0x63 | (0x1a << 8) | (0xfff8 << 16));
    }
}
