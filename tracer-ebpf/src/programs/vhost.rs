//! Optional probes on the vhost-net/tun RX path: tun_recvmsg is what the
//! vhost worker's handle_rx calls to pull frames for a guest. Kernels
//! without kprobes, or with lockdown forbidding fentry, refuse these; the
//! agent reports that and works from tc, tracepoints and netdev stats.

use aya_ebpf::{
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};

use crate::{bump, maps::VHOST_RX, programs::kernel::tun_socket_device};

#[inline(always)]
fn count_tun_recvmsg(sock: u64) {
    if let Some(dev) = tun_socket_device(sock) {
        bump!(VHOST_RX, &dev, tracer_common::map_slot::VHOST_RX);
    }
}

/// tun_recvmsg(struct socket *sock, struct msghdr *m, size_t len, int flags)
#[kprobe]
pub fn hvnet_tun_recvmsg_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<u64>(0) {
        count_tun_recvmsg(sock);
    }
    0
}

#[fentry(function = "tun_recvmsg")]
pub fn hvnet_tun_recvmsg_fentry(ctx: FEntryContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    count_tun_recvmsg(sock);
    0
}
