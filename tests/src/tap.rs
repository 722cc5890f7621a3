//! Opening a host tap the way a VMM (or libvirt on its behalf) does.

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
};

use anyhow::{bail, Context as _};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Frame framing on the tap fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapFraming {
    /// Plain Ethernet frames (the fake VMM reads and writes these).
    Plain,
    /// Each frame prefixed by a virtio-net header, as libvirt opens taps
    /// for virtio NICs and QEMU expects with `-netdev tap,fd=N`.
    VnetHeader,
}

/// Opens `/dev/net/tun` and binds it to the existing tap `name` in the
/// calling thread's netns (a tun fd belongs to the netns it was opened in).
pub fn open_tap(name: &str, framing: TapFraming) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    let mut ifreq = [0u8; 40];
    let bytes = name.as_bytes();
    if bytes.len() > 15 {
        bail!("interface name {name:?} longer than 15 bytes");
    }
    ifreq[..bytes.len()].copy_from_slice(bytes);
    let mut flags = IFF_TAP | IFF_NO_PI;
    if framing == TapFraming::VnetHeader {
        flags |= IFF_VNET_HDR;
    }
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes) from the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc != 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}
