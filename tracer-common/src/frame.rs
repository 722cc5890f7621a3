//! Reading a frame at byte offsets, whatever holds it: a byte slice in
//! userspace, the packet of a tc program, an sk_buff's data read from a
//! tracepoint. The classification and DHCP parsing ([`crate::classify`],
//! [`crate::parse`]) are written once over this trait, so the eBPF programs
//! and userspace run the same code.

/// A frame's bytes, read at offsets. Every read is checked: a read past
/// the end is `None`, never a fault (the eBPF verifier needs exactly this).
pub trait FrameBytes {
    /// `N` bytes from `offset`, or None if the frame is shorter.
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    /// `N` bytes from `offset` if this reader has them at hand (for a tc
    /// program: inside the packet's linear part), for a fast path that
    /// falls back to [`Self::bytes`]. None never means the frame is short.
    #[inline(always)]
    fn linear_bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.bytes(offset)
    }

    #[inline(always)]
    fn u8_at(&self, offset: usize) -> Option<u8> {
        self.bytes::<1>(offset).map(|[b]| b)
    }

    #[inline(always)]
    fn be16_at(&self, offset: usize) -> Option<u16> {
        self.bytes::<2>(offset).map(u16::from_be_bytes)
    }
}

impl FrameBytes for [u8] {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }
}

/// Frames for the tests that hold two ways of reading a frame equal.
#[cfg(test)]
pub(crate) mod test_frames {
    /// 80 bytes from a seed (xorshift): no two seeds alike.
    pub fn noise(seed: u64) -> [u8; 80] {
        let mut state = seed | 1;
        core::array::from_fn(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
    }
}

#[cfg(test)]
mod tests {
    use super::FrameBytes;

    #[test]
    fn reads_are_bounded_by_the_slice() {
        let frame: &[u8] = &[1, 2, 3];
        assert_eq!(frame.bytes::<2>(1), Some([2, 3]));
        assert_eq!(frame.bytes::<2>(2), None);
        assert_eq!(frame.be16_at(0), Some(0x0102));
        assert_eq!(frame.u8_at(3), None);
        assert_eq!(frame.bytes::<1>(usize::MAX), None);
    }
}
