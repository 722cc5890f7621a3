//! A minimal virtio-net device driver over `/dev/vhost-net`, playing a VM's
//! NIC the way QEMU with `vhost=on` sets it up: the kernel's vhost worker,
//! not this process, moves frames between the tap and the rings.
//!
//! One memory region (this process's anonymous mapping, "guest physical"
//! address = offset in it), two split virtqueues (0 = RX, 1 = TX) of
//! [`QUEUE_SIZE`] entries, legacy features (no VERSION_1, no mergeable RX
//! buffers): each buffer starts with the 10-byte virtio_net_hdr that the
//! tap (opened with IFF_VNET_HDR) reads and writes itself.

use std::{
    fs::{File, OpenOptions},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{fence, AtomicU16, Ordering},
};

use anyhow::{bail, Context as _};

pub const QUEUE_SIZE: u16 = 256;
pub const RX: usize = 0;
pub const TX: usize = 1;
/// sizeof(struct virtio_net_hdr) without VERSION_1/MRG_RXBUF.
pub const VNET_HDR_LEN: usize = 10;
/// One buffer per descriptor: a header and a full Ethernet frame.
const BUF_SIZE: usize = 2048;
const VRING_DESC_F_WRITE: u16 = 2;

// ioctl numbers from <linux/vhost.h> (type 0xAF).
const VHOST_SET_OWNER: libc::c_ulong = 0x0000_af01;
const VHOST_GET_FEATURES: libc::c_ulong = 0x8008_af00;
const VHOST_SET_FEATURES: libc::c_ulong = 0x4008_af00;
const VHOST_SET_MEM_TABLE: libc::c_ulong = 0x4008_af03;
const VHOST_SET_VRING_NUM: libc::c_ulong = 0x4008_af10;
const VHOST_SET_VRING_ADDR: libc::c_ulong = 0x4028_af11;
const VHOST_SET_VRING_BASE: libc::c_ulong = 0x4008_af12;
const VHOST_SET_VRING_KICK: libc::c_ulong = 0x4008_af20;
const VHOST_SET_VRING_CALL: libc::c_ulong = 0x4008_af21;
const VHOST_NET_SET_BACKEND: libc::c_ulong = 0x4008_af30;

#[repr(C)]
struct VringState {
    index: u32,
    num: u32,
}

#[repr(C)]
struct VringFile {
    index: u32,
    fd: i32,
}

#[repr(C)]
struct VringAddr {
    index: u32,
    flags: u32,
    desc_user_addr: u64,
    used_user_addr: u64,
    avail_user_addr: u64,
    log_guest_addr: u64,
}

#[repr(C)]
struct MemoryTable {
    nregions: u32,
    padding: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
    flags_padding: u64,
}

fn ioctl<T>(fd: RawFd, request: libc::c_ulong, arg: *const T, what: &str) -> anyhow::Result<()> {
    // SAFETY: each caller passes the struct its request number encodes.
    let rc = unsafe { libc::ioctl(fd, request, arg) };
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn eventfd() -> anyhow::Result<OwnedFd> {
    // SAFETY: eventfd has no pointer arguments.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        bail!("eventfd: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Offsets of one split virtqueue in the region.
struct Queue {
    desc: usize,
    avail: usize,
    used: usize,
    bufs: usize,
    /// avail.idx as this driver last published it.
    next_avail: u16,
    /// used.idx up to which completions were taken.
    last_used: u16,
    kick: OwnedFd,
    call: OwnedFd,
}

/// The anonymous mapping the rings and buffers live in.
struct Region {
    base: *mut u8,
    size: usize,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base/size are the mapping made in `VhostNet::open`.
        unsafe { libc::munmap(self.base.cast(), self.size) };
    }
}

pub struct VhostNet {
    // Field order is drop order: the device (and with it the vhost worker
    // and its use of the memory) goes before the mapping.
    dev: File,
    queues: [Queue; 2],
    region: Region,
}

// SAFETY: the raw mapping is owned by this value and only touched through
// &mut self (or read-only helpers on &self) by one thread at a time.
unsafe impl Send for VhostNet {}

fn align(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl VhostNet {
    /// Opens /dev/vhost-net, shares the memory and both rings with the
    /// kernel and makes `tap` (opened with IFF_VNET_HDR) the backend.
    pub fn open(tap: &File) -> anyhow::Result<Self> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vhost-net")
            .context("opening /dev/vhost-net (module vhost_net)")?;
        let fd = dev.as_raw_fd();
        ioctl(
            fd,
            VHOST_SET_OWNER,
            std::ptr::null::<u8>(),
            "VHOST_SET_OWNER",
        )?;
        let mut features = 0u64;
        // SAFETY: VHOST_GET_FEATURES writes one u64.
        if unsafe { libc::ioctl(fd, VHOST_GET_FEATURES, &mut features as *mut u64) } < 0 {
            bail!("VHOST_GET_FEATURES: {}", std::io::Error::last_os_error());
        }
        // Legacy virtio-net with no offloads: nothing to negotiate.
        ioctl(fd, VHOST_SET_FEATURES, &0u64, "VHOST_SET_FEATURES")?;

        let q = usize::from(QUEUE_SIZE);
        let mut layout = Vec::new();
        let mut at = 0;
        for _ in 0..2 {
            let desc = at;
            let avail = align(desc + 16 * q, 4096);
            let used = align(avail + 6 + 2 * q, 4096);
            let bufs = align(used + 6 + 8 * q, 4096);
            at = bufs + BUF_SIZE * q;
            layout.push((desc, avail, used, bufs));
        }
        let size = align(at, 4096);
        // SAFETY: a new private anonymous mapping, no fd.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        let region = Region {
            base: base.cast(),
            size,
        };
        let table = MemoryTable {
            nregions: 1,
            padding: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: region.base as u64,
            flags_padding: 0,
        };
        ioctl(fd, VHOST_SET_MEM_TABLE, &table, "VHOST_SET_MEM_TABLE")?;
        let mut queues = Vec::new();
        for (index, (desc, avail, used, bufs)) in layout.into_iter().enumerate() {
            let index = index as u32;
            let queue = Queue {
                desc,
                avail,
                used,
                bufs,
                next_avail: 0,
                last_used: 0,
                kick: eventfd()?,
                call: eventfd()?,
            };
            let state = VringState {
                index,
                num: u32::from(QUEUE_SIZE),
            };
            ioctl(fd, VHOST_SET_VRING_NUM, &state, "VHOST_SET_VRING_NUM")?;
            let base_state = VringState { index, num: 0 };
            ioctl(
                fd,
                VHOST_SET_VRING_BASE,
                &base_state,
                "VHOST_SET_VRING_BASE",
            )?;
            let addr = VringAddr {
                index,
                flags: 0,
                desc_user_addr: region.base as u64 + desc as u64,
                used_user_addr: region.base as u64 + used as u64,
                avail_user_addr: region.base as u64 + avail as u64,
                log_guest_addr: 0,
            };
            ioctl(fd, VHOST_SET_VRING_ADDR, &addr, "VHOST_SET_VRING_ADDR")?;
            let kick = VringFile {
                index,
                fd: queue.kick.as_raw_fd(),
            };
            ioctl(fd, VHOST_SET_VRING_KICK, &kick, "VHOST_SET_VRING_KICK")?;
            let call = VringFile {
                index,
                fd: queue.call.as_raw_fd(),
            };
            ioctl(fd, VHOST_SET_VRING_CALL, &call, "VHOST_SET_VRING_CALL")?;
            queues.push(queue);
        }
        for index in 0..2 {
            let backend = VringFile {
                index,
                fd: tap.as_raw_fd(),
            };
            ioctl(fd, VHOST_NET_SET_BACKEND, &backend, "VHOST_NET_SET_BACKEND")?;
        }
        let [rx, tx]: [Queue; 2] = queues
            .try_into()
            .map_err(|_| anyhow::anyhow!("two queues"))?;
        Ok(Self {
            dev,
            queues: [rx, tx],
            region,
        })
    }

    fn ptr(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset < self.region.size);
        // SAFETY: offsets come from the layout computed in `open`, inside
        // the mapping.
        unsafe { self.region.base.add(offset) }
    }

    fn index_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: a 2-byte-aligned u16 inside the mapping, shared with the
        // kernel, accessed atomically.
        unsafe { &*self.ptr(offset).cast::<AtomicU16>() }
    }

    /// Buffer `id` of queue `q`.
    fn buffer(&self, q: usize, id: u16) -> *mut u8 {
        self.ptr(self.queues[q].bufs + usize::from(id) * BUF_SIZE)
    }

    /// Publishes descriptor `id` (its buffer, `len` bytes) on queue `q`.
    fn publish(&mut self, q: usize, id: u16, len: usize, device_writes: bool) {
        let queue = &self.queues[q];
        let desc = self.ptr(queue.desc + 16 * usize::from(id));
        let addr = (queue.bufs + usize::from(id) * BUF_SIZE) as u64;
        let flags = if device_writes { VRING_DESC_F_WRITE } else { 0 };
        // SAFETY: descriptor `id` (16 bytes) and the avail ring slot are
        // inside the mapping; the kernel reads them only after the index
        // store below (Release).
        unsafe {
            desc.cast::<u64>().write_unaligned(addr);
            desc.add(8).cast::<u32>().write_unaligned(len as u32);
            desc.add(12).cast::<u16>().write_unaligned(flags);
            desc.add(14).cast::<u16>().write_unaligned(0);
            let slot = queue.avail + 4 + 2 * usize::from(queue.next_avail % QUEUE_SIZE);
            self.ptr(slot).cast::<u16>().write_unaligned(id);
        }
        let next = queue.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        self.index_at(queue.avail + 2)
            .store(next, Ordering::Release);
        self.queues[q].next_avail = next;
    }

    /// Offers RX buffer `id` to the device.
    pub fn post_rx(&mut self, id: u16) {
        self.publish(RX, id, BUF_SIZE, true);
    }

    /// Queues `frame` for transmission in TX buffer `id`; false if it does
    /// not fit a buffer.
    pub fn post_tx(&mut self, id: u16, frame: &[u8]) -> bool {
        let len = VNET_HDR_LEN + frame.len();
        if len > BUF_SIZE {
            return false;
        }
        let buf = self.buffer(TX, id);
        // SAFETY: BUF_SIZE bytes at buf belong to descriptor `id`, which is
        // not in the device's hands.
        unsafe {
            std::ptr::write_bytes(buf, 0, VNET_HDR_LEN);
            std::ptr::copy_nonoverlapping(frame.as_ptr(), buf.add(VNET_HDR_LEN), frame.len());
        }
        self.publish(TX, id, len, false);
        true
    }

    /// Tells the device that queue `q` has new buffers.
    pub fn kick(&self, q: usize) -> anyhow::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8 bytes to an eventfd this value owns.
        let rc = unsafe { libc::write(self.queues[q].kick.as_raw_fd(), one.as_ptr().cast(), 8) };
        if rc != 8 {
            bail!("kick: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The device's "used" notifications for queue `q` (poll it; then
    /// [`VhostNet::clear_call`]).
    pub fn call_fd(&self, q: usize) -> RawFd {
        self.queues[q].call.as_raw_fd()
    }

    pub fn clear_call(&self, q: usize) {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes from a non-blocking eventfd.
        unsafe { libc::read(self.queues[q].call.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }

    /// Completions on queue `q` since the last call: (descriptor id, bytes
    /// the device wrote).
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = self.queues[q].used;
        let device_idx = self.index_at(used + 2).load(Ordering::Acquire);
        let mut out = Vec::new();
        while self.queues[q].last_used != device_idx {
            let slot = usize::from(self.queues[q].last_used % QUEUE_SIZE);
            let elem = self.ptr(used + 4 + 8 * slot);
            // SAFETY: a used element the device published before idx.
            let (id, len) = unsafe {
                (
                    elem.cast::<u32>().read_unaligned(),
                    elem.add(4).cast::<u32>().read_unaligned(),
                )
            };
            out.push((id as u16, len));
            self.queues[q].last_used = self.queues[q].last_used.wrapping_add(1);
        }
        out
    }

    /// The frame the device wrote into RX buffer `id` (`len` bytes with the
    /// header), without the header.
    pub fn rx_frame(&self, id: u16, len: u32) -> &[u8] {
        let len = (len as usize).min(BUF_SIZE);
        if len <= VNET_HDR_LEN {
            return &[];
        }
        // SAFETY: the device finished writing `len` bytes of buffer `id`.
        unsafe {
            std::slice::from_raw_parts(self.buffer(RX, id).add(VNET_HDR_LEN), len - VNET_HDR_LEN)
        }
    }

    /// The vhost device fd (its worker is named after this process).
    pub fn device_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_vhost_h() {
        // _IOW(0xAF, nr, size) = (1 << 30) | (size << 16) | (0xAF << 8) | nr
        let iow = |nr: u64, size: usize| (1u64 << 30) | ((size as u64) << 16) | (0xaf << 8) | nr;
        assert_eq!(u64::from(VHOST_SET_FEATURES as u32), iow(0x00, 8));
        assert_eq!(u64::from(VHOST_SET_MEM_TABLE as u32), iow(0x03, 8));
        assert_eq!(
            u64::from(VHOST_SET_VRING_ADDR as u32),
            iow(0x11, std::mem::size_of::<VringAddr>())
        );
        assert_eq!(
            u64::from(VHOST_NET_SET_BACKEND as u32),
            iow(0x30, std::mem::size_of::<VringFile>())
        );
        assert_eq!(std::mem::size_of::<MemoryTable>(), 40);
    }
}
