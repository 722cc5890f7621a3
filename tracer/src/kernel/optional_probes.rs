//! The host-wide probes, each optional: attach what this kernel allows,
//! record why the rest failed. The table is the kernel capability matrix
//! behind `hvnet_agent_probe_attached{probe,kind}`.

use aya::{
    programs::{BtfTracePoint, FEntry, KProbe, ProgramError, RawTracePoint},
    Btf, Ebpf,
};

use crate::kernel::program_error::describe_program_error;

/// One row of the kernel capability matrix shown in
/// `hvnet_agent_probe_attached{probe,kind}` and logged at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStatus {
    pub probe: &'static str,
    pub kind: &'static str,
    pub attached: bool,
    pub detail: String,
}

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

fn btf_tracepoint(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &str,
    tracepoint: &str,
) -> Result<(), String> {
    let prog: &mut BtfTracePoint = typed(ebpf, program)?;
    prog.load(tracepoint, btf).map_err(describe)?;
    prog.attach().map_err(describe)?;
    Ok(())
}

/// Set to `raw` to skip the BTF tracepoints and use the raw ones (the
/// fallback), e.g. to rule them out when a kernel misbehaves.
pub const TRACEPOINTS_ENV: &str = "HVNET_TRACEPOINTS";

/// One host-wide tracepoint: the BTF program first (plain loads filter
/// non-tap skbs for a fraction of the helper calls the raw one needs), the
/// raw one only if the kernel refuses it. One status either way, with the
/// kind that runs, so the probe has one `hvnet_agent_probe_attached` series.
fn tracepoint(
    ebpf: &mut Ebpf,
    btf: &Btf,
    probe: &'static str,
    (btf_program, raw_program): (&str, &str),
    tracepoint: &str,
    raw_only: bool,
) -> ProbeStatus {
    let refused = if raw_only {
        format!("{TRACEPOINTS_ENV}=raw")
    } else {
        match btf_tracepoint(ebpf, btf, btf_program, tracepoint) {
            Ok(()) => return status(probe, "tp_btf", Ok(())),
            Err(reason) => reason,
        }
    };
    let mut fallback = status(
        probe,
        "raw_tracepoint",
        raw_tracepoint(ebpf, raw_program, tracepoint),
    );
    fallback.detail = format!(
        "tp_btf not used ({refused}); raw tracepoint: {}",
        fallback.detail
    );
    fallback
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
    let raw_only = std::env::var(TRACEPOINTS_ENV).is_ok_and(|v| v == "raw");
    let mut statuses = vec![
        tracepoint(
            ebpf,
            btf,
            DEQUEUE_PROBE,
            ("hvnet_dequeue", "hvnet_dequeue_raw"),
            "skb_copy_datagram_iovec",
            raw_only,
        ),
        tracepoint(
            ebpf,
            btf,
            DROP_PROBE,
            ("hvnet_drop", "hvnet_drop_raw"),
            "kfree_skb",
            raw_only,
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
            log::info!("probe {} ({}): {}", s.probe, s.kind, s.detail);
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
