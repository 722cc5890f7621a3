//! Sending hand-built Ethernet frames out of an interface (AF_PACKET): for
//! what no real client produces on this machine (a flooding guest, a DHCP
//! reply on a VLAN the host kernel has no device for).

use anyhow::bail;

/// An AF_PACKET socket bound to send out of one interface.
pub struct FrameSender {
    fd: i32,
    addr: libc::sockaddr_ll,
}

impl FrameSender {
    pub fn open(iface: &str) -> anyhow::Result<Self> {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        // SAFETY: plain socket(2) call; the fd is closed on drop.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        Ok(Self { fd, addr })
    }

    /// Sends one frame; whether the kernel took it.
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sendto with a buffer and address we own.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        n > 0
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        // SAFETY: closing the fd opened in `open`.
        unsafe { libc::close(self.fd) };
    }
}

/// An interface's MAC address, from sysfs.
pub fn interface_mac(iface: &str) -> anyhow::Result<[u8; 6]> {
    parse_mac(std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))?.trim())
}

/// "52:54:00:fa:01:02" as bytes.
pub fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    <[u8; 6]>::try_from(bytes).map_err(|_| anyhow::anyhow!("not a MAC address: {text:?}"))
}
