//! One view of a packet for TC and XDP programs, so parsing and NAT are written once.
//!
//! TC programs go through the kernel's skb helpers, which also keep `CHECKSUM_PARTIAL` skbs
//! right. XDP sees frames as they come off the wire, with complete checksums, and updates them
//! with plain RFC 1624 arithmetic.
use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    bindings::BPF_F_MARK_MANGLED_0,
    helpers::bpf_xdp_load_bytes,
    programs::{TcContext, XdpContext},
};
use lb_common::checksum_replace;

/// A copy of a header in memory aligned for word reads. The eBPF target reads memory it does not
/// know to be aligned a byte at a time: an IPv6 header's addresses would be 32 bytes held apart,
/// spilled to the stack slot by slot (and the stack is 512 bytes).
#[repr(C, align(8))]
pub struct Aligned<T>(pub T);

pub trait Packet {
    /// The frame's length in bytes.
    fn len(&self) -> usize;
    /// A copy of the `T` at `offset`, if the packet holds all of it.
    fn load<T>(&self, offset: usize) -> Option<T>;
    /// Like [`Packet::load`], into aligned memory; `T`'s size a multiple of 8.
    fn load_aligned<T>(&self, offset: usize) -> Option<Aligned<T>>;
    fn store<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64>;
    /// Updates the IPv4 header checksum at `offset` for a 4-byte field changed `from` → `to`
    /// (both as they lie in the packet).
    fn l3_csum_replace(&self, offset: usize, from: u32, to: u32) -> Result<(), i64>;
    /// Updates the L4 checksum at `offset`; `flags` as for `bpf_l4_csum_replace` (the low bits
    /// the field size, `BPF_F_MARK_MANGLED_0` for UDP, `BPF_F_PSEUDO_HDR` for addresses).
    fn l4_csum_replace(&self, offset: usize, from: u32, to: u32, flags: u64) -> Result<(), i64>;
}

impl Packet for TcContext {
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Option<T> {
        TcContext::load(self, offset).ok()
    }

    #[inline(always)]
    fn load_aligned<T>(&self, offset: usize) -> Option<Aligned<T>> {
        const { assert!(size_of::<Aligned<T>>() == size_of::<T>()) };
        TcContext::load(self, offset).ok()
    }

    #[inline(always)]
    fn store<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64> {
        TcContext::store(self, offset, value, 0)
    }

    #[inline(always)]
    fn l3_csum_replace(&self, offset: usize, from: u32, to: u32) -> Result<(), i64> {
        TcContext::l3_csum_replace(self, offset, from.into(), to.into(), 4)
    }

    #[inline(always)]
    fn l4_csum_replace(&self, offset: usize, from: u32, to: u32, flags: u64) -> Result<(), i64> {
        TcContext::l4_csum_replace(self, offset, from.into(), to.into(), flags)
    }
}

/// A pointer to the `T` at `offset` in an XDP frame, after the bounds check the verifier wants.
#[inline(always)]
fn xdp_ptr<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data() + offset;
    if start + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *mut T)
}

/// Adjusts the 16-bit checksum at `offset` for `size` bytes (2 or 4) changed `from` → `to`.
#[inline(always)]
fn xdp_csum_replace(
    ctx: &XdpContext,
    offset: usize,
    from: u32,
    to: u32,
    size: u64,
    udp: bool,
) -> Result<(), i64> {
    let check = xdp_ptr::<[u8; 2]>(ctx, offset).ok_or(-1i64)?;
    // SAFETY: bounds checked by xdp_ptr.
    let old = u16::from_be_bytes(unsafe { check.read_unaligned() });
    if udp && old == 0 {
        // UDP without a checksum stays without one.
        return Ok(());
    }
    let (from, to) = (from.to_ne_bytes(), to.to_ne_bytes());
    let width = if size == 2 { 2 } else { 4 };
    let mut new = checksum_replace(old, &from[..width], &to[..width]);
    if udp && new == 0 {
        new = 0xffff;
    }
    // SAFETY: as above.
    unsafe { check.write_unaligned(new.to_be_bytes()) };
    Ok(())
}

impl Packet for XdpContext {
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Option<T> {
        // SAFETY: bounds checked by xdp_ptr; read unaligned as packet data may be.
        xdp_ptr::<T>(self, offset).map(|ptr| unsafe { ptr.read_unaligned() })
    }

    /// Through the helper: read in place, the frame's bytes would be loaded one by one.
    #[inline(always)]
    fn load_aligned<T>(&self, offset: usize) -> Option<Aligned<T>> {
        const { assert!(size_of::<Aligned<T>>() == size_of::<T>()) };
        let mut copy = MaybeUninit::<Aligned<T>>::uninit();
        // SAFETY: the helper writes at most `size_of::<T>()` bytes into `copy`, and fails unless
        // the frame holds them all.
        let loaded = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                offset as u32,
                copy.as_mut_ptr().cast(),
                size_of::<T>() as u32,
            )
        };
        // SAFETY: every byte was written (`T`'s size is `Aligned<T>`'s).
        (loaded == 0).then(|| unsafe { copy.assume_init() })
    }

    #[inline(always)]
    fn store<T: Copy>(&self, offset: usize, value: &T) -> Result<(), i64> {
        let ptr = xdp_ptr::<T>(self, offset).ok_or(-1i64)?;
        // SAFETY: as above.
        unsafe { ptr.write_unaligned(*value) };
        Ok(())
    }

    #[inline(always)]
    fn l3_csum_replace(&self, offset: usize, from: u32, to: u32) -> Result<(), i64> {
        xdp_csum_replace(self, offset, from, to, 4, false)
    }

    #[inline(always)]
    fn l4_csum_replace(&self, offset: usize, from: u32, to: u32, flags: u64) -> Result<(), i64> {
        let udp = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        xdp_csum_replace(self, offset, from, to, flags & 0xf, udp)
    }
}
