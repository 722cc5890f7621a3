//! The host-wide probes, each optional: attach what this kernel allows,
//! record why the rest failed. The table is the kernel capability matrix
//! behind `hvnet_agent_probe_attached{probe,kind}`.

use aya::{
    programs::{FEntry, KProbe, ProgramError, RawTracePoint},
    Btf, Ebpf,
};

use crate::loader::{describe_program_error, ProbeStatus};

pub const DEQUEUE_PROBE: &str = "rx_dequeue";
pub const DROP_PROBE: &str = "skb_drop";
pub const VHOST_PROBE: &str = "vhost_tun_recvmsg";

fn status(probe: &'static str, kind: &'static str, result: Result<(), String>) -> ProbeStatus {
    match result {
        Ok(()) => ProbeStatus {
            probe,
            kind,
            attached: true,
            detail: "attached".into(),
        },
        Err(detail) => ProbeStatus {
            probe,
            kind,
            attached: false,
            detail,
        },
    }
}

fn describe(err: ProgramError) -> String {
    describe_program_error(&err)
}

/// The object's program `name` as the kind `T` the caller attaches.
fn typed<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("{name} missing from the object"))?
        .try_into()
        .map_err(describe)
}

fn raw_tracepoint(ebpf: &mut Ebpf, program: &str, tracepoint: &str) -> Result<(), String> {
    let prog: &mut RawTracePoint = typed(ebpf, program)?;
    prog.load().map_err(describe)?;
    prog.attach(tracepoint).map_err(describe)?;
    Ok(())
}

fn kprobe(ebpf: &mut Ebpf, program: &str, function: &str) -> Result<(), String> {
    let prog: &mut KProbe = typed(ebpf, program)?;
    prog.load().map_err(describe)?;
    prog.attach(function, 0).map_err(describe)?;
    Ok(())
}

fn fentry(ebpf: &mut Ebpf, btf: &Btf, program: &str, function: &str) -> Result<(), String> {
    let prog: &mut FEntry = typed(ebpf, program)?;
    prog.load(function, btf).map_err(describe)?;
    prog.attach().map_err(describe)?;
    Ok(())
}

/// Attaches every optional probe it can and logs each outcome once.
/// `tun_missing` says why the tun offsets are unknown (then the vhost
/// probe cannot read which tap a call is for and is not attached).
pub fn attach_all(ebpf: &mut Ebpf, btf: &Btf, tun_missing: Option<String>) -> Vec<ProbeStatus> {
    let mut statuses = vec![
        status(
            DEQUEUE_PROBE,
            "raw_tracepoint",
            raw_tracepoint(ebpf, "hvnet_dequeue", "skb_copy_datagram_iovec"),
        ),
        status(
            DROP_PROBE,
            "raw_tracepoint",
            raw_tracepoint(ebpf, "hvnet_drop", "kfree_skb"),
        ),
    ];
    if let Some(reason) = tun_missing {
        statuses.push(status(VHOST_PROBE, "kprobe", Err(reason.clone())));
        statuses.push(status(VHOST_PROBE, "fentry", Err(reason)));
    } else {
        // kprobe first (oldest kernels), fentry second (lower overhead, but
        // refused under lockdown); never both, which would double count.
        let by_kprobe = kprobe(ebpf, "hvnet_tun_recvmsg_kprobe", "tun_recvmsg");
        let kprobe_ok = by_kprobe.is_ok();
        statuses.push(status(VHOST_PROBE, "kprobe", by_kprobe));
        let by_fentry = if kprobe_ok {
            Err("not needed: the kprobe attached".to_owned())
        } else {
            fentry(ebpf, btf, "hvnet_tun_recvmsg_fentry", "tun_recvmsg")
        };
        statuses.push(status(VHOST_PROBE, "fentry", by_fentry));
    }
    for s in &statuses {
        if s.attached {
            log::info!("probe {} ({}): attached", s.probe, s.kind);
        } else {
            log::warn!(
                "probe {} ({}): unavailable on this kernel, continuing without it: {}",
                s.probe,
                s.kind,
                s.detail
            );
        }
    }
    statuses
}
