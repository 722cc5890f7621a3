//! Loads hvnet's eBPF object and attaches/detaches its tc programs.
//!
//! The only module (with `links`) that changes kernel state. Attachments are
//! owned values: dropping one detaches it, so every exit path (error, signal,
//! panic unwinding) leaves nothing of hvnet behind. TCX links also vanish
//! when the process dies (kill -9); netlink filters do not, so in netlink
//! mode a restarted agent first removes filters left by a killed one.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{
        links::LinkOrder,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
        ProgramError, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Btf, Ebpf, EbpfLoader, Endianness,
};
use tracer_common::TapCounters;

use crate::{
    config::AttachMode,
    kernel::btf::KernelBtf,
    kernel::optional_probes::{self, ProbeStatus},
    kernel::program_error::describe_program_error,
    kernel::{
        collect::{current_netns_inum, KernelMaps},
        counter_array::counter_cpus,
    },
};

/// The eBPF object built by build.rs from tracer-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

pub const EGRESS_PROGRAM: &str = "hvnet_egress";
pub const INGRESS_PROGRAM: &str = "hvnet_ingress";
pub const EMPTY_PROGRAM: &str = "hvnet_empty";
pub const HOP_EGRESS_PROGRAM: &str = "hvnet_hop_egress";
pub const HOP_INGRESS_PROGRAM: &str = "hvnet_hop_ingress";

/// What an interface is to hvnet, which picks the tc programs it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcRole {
    /// A VM's tap: every frame counted, DHCP/ARP reported.
    Tap,
    /// A bridge, bridge port or uplink: DHCP followed, nothing counted.
    Hop,
}

impl TcRole {
    fn programs(self) -> [(&'static str, TcAttachType); 2] {
        match self {
            Self::Tap => [
                (EGRESS_PROGRAM, TcAttachType::Egress),
                (INGRESS_PROGRAM, TcAttachType::Ingress),
            ],
            Self::Hop => [
                (HOP_EGRESS_PROGRAM, TcAttachType::Egress),
                (HOP_INGRESS_PROGRAM, TcAttachType::Ingress),
            ],
        }
    }
}
/// Netlink mode: the tc priority hvnet's filters ask for (lower runs first).
const NETLINK_PRIORITY: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "kernel BTF not found at {path}: hvnet needs a kernel built with CONFIG_DEBUG_INFO_BTF=y \
         (or point `btf` in the config at a BTF file): {reason}"
    )]
    Btf { path: String, reason: String },
    #[error("loading hvnet's eBPF object failed: {0}")]
    Load(String),
    #[error("the kernel rejected program {program}: {reason}")]
    Program { program: String, reason: String },
    #[error("attach_mode tcx needs kernel 6.6 or newer (this one is {0}): use attach_mode auto")]
    TcxUnavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attaching {program} to {iface}: {reason}")]
    Attach {
        program: &'static str,
        iface: String,
        reason: String,
    },
}

/// The attach mechanism in use after resolving `auto` against the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcMechanism {
    Tcx,
    Netlink,
}

impl TcMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        }
    }
}

/// hvnet's two tc programs on one interface.
struct InterfaceAttachment {
    name: String,
    // Dropping the links detaches them.
    _links: Vec<SchedClassifierLink>,
}

/// The loaded eBPF object and every live attachment, keyed by ifindex.
pub struct TcProbes {
    ebpf: Ebpf,
    mechanism: TcMechanism,
    attached: BTreeMap<u32, InterfaceAttachment>,
    statuses: Vec<ProbeStatus>,
    drop_reasons: HashMap<u32, String>,
    logger: Option<crate::kernel::ebpf_log::EbpfLogger>,
}

impl TcProbes {
    /// Loads BTF and the object, verifies the programs, takes the maps out
    /// for the collector and attaches the host-wide probes (each optional:
    /// what this kernel refuses is reported, not fatal). Attaches no tc
    /// program yet.
    pub fn load(
        btf_path: &Path,
        mode: AttachMode,
        max_interfaces: u32,
        taps_at_start: usize,
    ) -> Result<(Self, KernelMaps, RingBuf<MapData>), LoaderError> {
        let btf_error = |reason: String| LoaderError::Btf {
            path: btf_path.display().to_string(),
            reason,
        };
        let btf_bytes = std::fs::read(btf_path).map_err(|e| btf_error(e.to_string()))?;
        let kernel_btf = KernelBtf::parse(&btf_bytes).map_err(|e| btf_error(e.to_string()))?;
        let aya_btf =
            Btf::parse(&btf_bytes, Endianness::default()).map_err(|e| btf_error(e.to_string()))?;
        let offsets = kernel_btf
            .skb_offsets()
            .map_err(|e| btf_error(e.to_string()))?;
        let drop_reasons = kernel_btf.drop_reasons().unwrap_or_default();
        let tun = tun_offsets(&kernel_btf, &btf_bytes, btf_path);
        log_kernel_capabilities(&offsets, &tun, &drop_reasons);
        let tun_offsets = tun.as_ref().ok().map(|t| t.offsets);
        let mechanism = resolve_mechanism(mode, taps_at_start)?;
        let netns = current_netns_inum()
            .map_err(|e| LoaderError::Load(format!("reading /proc/self/ns/net: {e}")))?;

        let (tfile_socket, tfile_tun, tun_dev) = tun_offsets.as_ref().map_or((0, 0, 0), |t| *t);
        let geometry = CounterGeometry::new(max_interfaces)?;
        let mut loader = EbpfLoader::new();
        size_counters(&mut loader, max_interfaces, &geometry);
        loader
            .btf(Some(&aya_btf))
            .override_global("SKB_DEV_OFF", &offsets.skb_dev, true)
            .override_global("SKB_SK_OFF", &offsets.skb_sk, true)
            .override_global("SKB_LEN_OFF", &offsets.skb_len, true)
            .override_global("SK_FAMILY_OFF", &offsets.sk_family, true)
            .override_global("SKB_DATA_OFF", &offsets.skb_data, true)
            .override_global("SKB_DATA_LEN_OFF", &offsets.skb_data_len, true)
            .override_global("DEV_IFINDEX_OFF", &offsets.dev_ifindex, true)
            .override_global("DEV_NET_OFF", &offsets.dev_nd_net, true)
            .override_global("NET_INUM_OFF", &offsets.net_ns_inum, true)
            .override_global("TFILE_SOCKET_OFF", &tfile_socket, true)
            .override_global("TFILE_TUN_OFF", &tfile_tun, true)
            .override_global("TUN_DEV_OFF", &tun_dev, true);
        // Every per-tap map holds every tap the agent accepts (it refuses
        // taps beyond max_interfaces): no tap's counts are silently dropped.
        let per_tap = [
            ("MONITORED", 1),
            ("DEQUEUED", 1),
            ("VHOST_RX", 1),
            ("EVENT_BUDGET", 1),
            ("EVENTS_THROTTLED", 1),
            ("TAP_SLOT_HIGH", 1),
            ("DROPS", tracer_common::DROP_REASONS_PER_TAP),
        ];
        for (map, per) in per_tap {
            loader.map_max_entries(map, max_interfaces.saturating_mul(per));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|err| LoaderError::Load(format!("{err:#}")))?;
        // hvnet's programs log nothing on the packet path; a logger only
        // exists if a future program adds aya-log statements.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        for name in [
            EGRESS_PROGRAM,
            INGRESS_PROGRAM,
            HOP_EGRESS_PROGRAM,
            HOP_INGRESS_PROGRAM,
        ] {
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(|err| program_error(name, &err))?;
        }
        let maps = KernelMaps::take(&mut ebpf, netns, geometry.cpus)
            .map_err(|e| LoaderError::Load(e.to_string()))?;
        let events = ebpf
            .take_map("EVENTS")
            .ok_or_else(|| LoaderError::Load("map EVENTS missing from the object".into()))
            .and_then(|m| RingBuf::try_from(m).map_err(|e| LoaderError::Load(e.to_string())))?;
        let tun_missing = tun.as_ref().err().cloned();
        let mut optional = optional_probes::attach_all(&mut ebpf, &aya_btf, tun_missing);
        let tc_kind = mechanism.as_str();
        let mut statuses = vec![
            ProbeStatus {
                probe: "tc_egress",
                kind: tc_kind,
                attached: true,
                detail: format!("{EGRESS_PROGRAM} loaded, attached per interface via {tc_kind}"),
            },
            ProbeStatus {
                probe: "tc_ingress",
                kind: tc_kind,
                attached: true,
                detail: format!("{INGRESS_PROGRAM} loaded, attached per interface via {tc_kind}"),
            },
            ProbeStatus {
                probe: "tc_hop",
                kind: tc_kind,
                attached: true,
                detail: format!(
                    "{HOP_EGRESS_PROGRAM}/{HOP_INGRESS_PROGRAM} loaded, attached per hop via {tc_kind}"
                ),
            },
        ];
        statuses.append(&mut optional);
        Ok((
            Self {
                ebpf,
                mechanism,
                attached: BTreeMap::new(),
                statuses,
                drop_reasons,
                logger,
            },
            maps,
            events,
        ))
    }

    /// The aya-log reader, if the object has aya-log's map (the agent
    /// polls it: see `ebpf_log`).
    pub fn take_logger(&mut self) -> Option<crate::kernel::ebpf_log::EbpfLogger> {
        self.logger.take()
    }

    /// Kernel drop reason numbers to names (`full_ring`, ...).
    pub fn drop_reasons(&self) -> &HashMap<u32, String> {
        &self.drop_reasons
    }

    /// Whether the optional probe `name` is attached.
    pub fn has_probe(&self, name: &str) -> bool {
        self.statuses.iter().any(|s| s.probe == name && s.attached)
    }

    pub fn mechanism(&self) -> TcMechanism {
        self.mechanism
    }

    /// The kernel capability matrix: every probe, attached or not.
    pub fn probe_statuses(&self) -> Vec<ProbeStatus> {
        self.statuses.clone()
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attached.contains_key(&ifindex)
    }

    pub fn attached_interfaces(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached.iter().map(|(i, a)| (*i, a.name.as_str()))
    }

    /// Attaches both programs of `role` to `name`. On failure nothing stays
    /// attached.
    pub fn attach(&mut self, ifindex: u32, name: &str, role: TcRole) -> Result<(), AttachError> {
        if self.mechanism == TcMechanism::Netlink {
            add_clsact(name);
        }
        // Also under TCX: `auto` may have chosen netlink at the last start
        // (more taps then), and a kill -9 leaves its filters behind.
        remove_stale_filters(name, role);
        let mut links = Vec::with_capacity(2);
        for (program, attach_type) in role.programs() {
            // On error `links` is dropped here, detaching what did attach.
            let link = self.attach_one(program, name, attach_type)?;
            links.push(link);
        }
        self.attached.insert(
            ifindex,
            InterfaceAttachment {
                name: name.to_owned(),
                _links: links,
            },
        );
        Ok(())
    }

    /// Detaches from an interface (which may already be gone).
    pub fn detach(&mut self, ifindex: u32) -> Option<String> {
        self.attached.remove(&ifindex).map(|a| a.name)
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self) -> usize {
        let count = self.attached.len();
        self.attached.clear();
        count
    }

    fn attach_one(
        &mut self,
        program: &'static str,
        iface: &str,
        attach_type: TcAttachType,
    ) -> Result<SchedClassifierLink, AttachError> {
        let fail = |reason: String| AttachError::Attach {
            program,
            iface: iface.to_owned(),
            reason,
        };
        let prog = program_mut(&mut self.ebpf, program).map_err(|e| fail(e.to_string()))?;
        // hvnet goes first so that it sees every frame even when another
        // program or filter ends classification (TC_ACT_OK, a u32 match);
        // its own verdict is "continue", so everything after it still runs.
        let id = match self.mechanism {
            TcMechanism::Tcx => prog.attach_with_options(
                iface,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            ),
            TcMechanism::Netlink => {
                let first = NlOptions {
                    priority: NETLINK_PRIORITY,
                    ..Default::default()
                };
                prog.attach_with_options(iface, attach_type, TcAttachOptions::Netlink(first))
                    .or_else(|err| {
                        log::warn!(
                            "{iface}: tc priority {NETLINK_PRIORITY} is taken ({}); attaching \
                             {program} after the existing filters, which may hide frames they consume",
                            describe_program_error(&err)
                        );
                        prog.attach_with_options(
                            iface,
                            attach_type,
                            TcAttachOptions::Netlink(NlOptions::default()),
                        )
                    })
            }
        }
        .map_err(|e| fail(describe_program_error(&e)))?;
        prog.take_link(id).map_err(|e| fail(e.to_string()))
    }
}

/// Netlink mode: make sure a clsact qdisc exists (creating one only when
/// absent; hvnet never deletes qdiscs, an empty clsact is inert).
fn add_clsact(iface: &str) {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => log::info!("{iface}: created clsact qdisc (it will be left in place)"),
        Err(err) => log::debug!("{iface}: clsact not added ({err}); using the existing one"),
    }
}

/// Removes hvnet's own cls_bpf filters (found by program name) that a
/// killed netlink-mode hvnet left; other filters stay. Quiet where there
/// are none.
fn remove_stale_filters(iface: &str, role: TcRole) {
    for (program, attach_type) in role.programs() {
        if tc::qdisc_detach_program(iface, attach_type, program).is_ok() {
            log::warn!("{iface}: removed a stale {program} filter left by a previous hvnet");
        }
    }
}

impl Drop for TcProbes {
    fn drop(&mut self) {
        let count = self.detach_all();
        if count > 0 {
            log::info!("detached from {count} interface(s)");
        }
    }
}

/// tun_file.socket, tun_file.tun, tun_struct.dev: present in vmlinux BTF
/// when tun is built in; without them the vhost probes cannot name a tap.
/// The tun offsets the vhost probe reads, and where they came from.
struct TunOffsets {
    /// (tun_file.socket, tun_file.tun, tun_struct.dev)
    offsets: (u32, u32, u32),
    source: String,
}

fn tun_members(btf: &KernelBtf) -> Result<(u32, u32, u32), crate::kernel::btf::BtfError> {
    Ok((
        btf.member_offset("tun_file", "socket")?,
        btf.member_offset("tun_file", "tun")?,
        btf.member_offset("tun_struct", "dev")?,
    ))
}

/// tun's types: in vmlinux when tun is built in; otherwise in the tun
/// module's split BTF beside it (/sys/kernel/btf/tun), as on distribution
/// kernels where tun is a module.
fn tun_offsets(
    vmlinux: &KernelBtf,
    vmlinux_bytes: &[u8],
    btf_path: &Path,
) -> Result<TunOffsets, String> {
    if let Ok(offsets) = tun_members(vmlinux) {
        return Ok(TunOffsets {
            offsets,
            source: format!("{} (tun built in)", btf_path.display()),
        });
    }
    let module = btf_path.with_file_name("tun");
    let split = std::fs::read(&module).map_err(|e| {
        format!(
            "tun_file/tun_struct are not in {} and the tun module's BTF {} cannot be read ({e}): \
             tun is a module that is not loaded, or the kernel lacks CONFIG_DEBUG_INFO_BTF_MODULES",
            btf_path.display(),
            module.display()
        )
    })?;
    let offsets = KernelBtf::parse_split(vmlinux_bytes, &split)
        .and_then(|btf| tun_members(&btf))
        .map_err(|e| format!("the tun module's BTF {}: {e}", module.display()))?;
    Ok(TunOffsets {
        offsets,
        source: format!("{} (tun module's split BTF)", module.display()),
    })
}

/// One line each for what the programs will read on this kernel: the
/// kernel matrix and operators read these.
fn log_kernel_capabilities(
    skb: &crate::kernel::btf::SkbOffsets,
    tun: &Result<TunOffsets, String>,
    drop_reasons: &HashMap<u32, String>,
) {
    let tun = match tun {
        Ok(t) => format!(
            "tun_file.socket@{} tun_file.tun@{} tun_struct.dev@{} from {}",
            t.offsets.0, t.offsets.1, t.offsets.2, t.source
        ),
        Err(reason) => format!("no tun offsets ({reason})"),
    };
    log::info!(
        "kernel BTF: sk_buff.dev@{} sk_buff.len@{} sk_buff.data@{} net_device.ifindex@{} net.ns.inum@{}; {tun}",
        skb.skb_dev,
        skb.skb_len,
        skb.skb_data,
        skb.dev_ifindex,
        skb.net_ns_inum
    );
    if drop_reasons.is_empty() {
        log::info!(
            "kfree_skb drop reasons: none named (the kernel's BTF has no enum skb_drop_reason)"
        );
    } else {
        let full_ring = drop_reasons
            .iter()
            .find(|(_, name)| name.as_str() == "full_ring")
            .map_or_else(
                || "no FULL_RING".to_owned(),
                |(n, _)| format!("FULL_RING={n}"),
            );
        log::info!(
            "kfree_skb drop reasons: {} named from enum skb_drop_reason ({full_ring})",
            drop_reasons.len()
        );
    }
}

/// The most taps `auto` attaches with TCX. Each TCX attach and each detach
/// waits for an RCU grace period inside the kernel while holding RTNL
/// (`tcx_link_attach` -> `synchronize_rcu`), about 12 ms per hook measured
/// here, and RTNL serialises them: 128 taps (256 hooks) take ~3 s to attach
/// and as long to detach at exit; 2000 take ~55 s and ~35 s. cls_bpf
/// filters through netlink do 2000 in under a second.
pub const AUTO_TCX_MAX_TAPS: usize = 128;

fn resolve_mechanism(mode: AttachMode, taps_at_start: usize) -> Result<TcMechanism, LoaderError> {
    let version = KernelVersion::current().ok();
    let has_tcx = version.is_some_and(|v| v >= KernelVersion::new(6, 6, 0));
    if mode == AttachMode::Tcx && !has_tcx {
        return Err(LoaderError::TcxUnavailable(
            version.map_or_else(|| "unknown".into(), |v| format!("{v:?}")),
        ));
    }
    let (mechanism, why) = choose_mechanism(mode, has_tcx, taps_at_start);
    if mode == AttachMode::Auto {
        log::info!("attach_mode auto: {} ({why})", mechanism.as_str());
    }
    Ok(mechanism)
}

/// What `mode` means on a kernel with or without TCX and a node with
/// `taps_at_start` matching taps, and why (for the log).
fn choose_mechanism(
    mode: AttachMode,
    has_tcx: bool,
    taps_at_start: usize,
) -> (TcMechanism, String) {
    match mode {
        AttachMode::Netlink => (TcMechanism::Netlink, "asked for".into()),
        AttachMode::Tcx => (TcMechanism::Tcx, "asked for".into()),
        AttachMode::Auto if !has_tcx => (
            TcMechanism::Netlink,
            "this kernel has no TCX (6.6+)".into(),
        ),
        AttachMode::Auto if taps_at_start > AUTO_TCX_MAX_TAPS => (
            TcMechanism::Netlink,
            format!(
                "{taps_at_start} taps match at start, more than {AUTO_TCX_MAX_TAPS}: each TCX attach and detach waits a kernel grace period under RTNL, cls_bpf does not; set attach_mode = \"tcx\" to force TCX"
            ),
        ),
        AttachMode::Auto => (
            TcMechanism::Tcx,
            format!("{taps_at_start} taps match at start, at most {AUTO_TCX_MAX_TAPS}"),
        ),
    }
}

fn missing_program(name: &str) -> LoaderError {
    LoaderError::Program {
        program: name.to_owned(),
        reason: "missing from the eBPF object".into(),
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, LoaderError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| missing_program(name))?;
    program
        .try_into()
        .map_err(|err: ProgramError| program_error(name, &err))
}

fn program_error(name: &str, err: &ProgramError) -> LoaderError {
    LoaderError::Program {
        program: name.to_owned(),
        reason: describe_program_error(err),
    }
}

/// Loads the object and returns the tc programs the benchmark runs; kept
/// here so that only this module knows the object and program names.
pub fn load_for_bench() -> Result<Ebpf, LoaderError> {
    let geometry = CounterGeometry::new(1)?;
    let mut loader = EbpfLoader::new();
    size_counters(&mut loader, 1, &geometry);
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|err| LoaderError::Load(format!("{err:#}")))?;
    for name in [
        EGRESS_PROGRAM,
        INGRESS_PROGRAM,
        EMPTY_PROGRAM,
        HOP_INGRESS_PROGRAM,
    ] {
        program_mut(&mut ebpf, name)?
            .load()
            .map_err(|err| program_error(name, &err))?;
    }
    give_loopback_slot(&mut ebpf, geometry.cpus)?;
    Ok(ebpf)
}

/// BPF_PROG_TEST_RUN hands the programs skbs on the loopback device
/// (ifindex 1): give it counter slot 0 (the one its ifindex suggests when
/// there is one slot) as the agent gives a tap one, so the bench times the
/// counting path a monitored tap takes.
fn give_loopback_slot(ebpf: &mut Ebpf, cpus: u32) -> Result<(), LoaderError> {
    let failed = |e: &dyn std::fmt::Display| {
        LoaderError::Load(format!("giving loopback a counter slot: {e}"))
    };
    let mut counters: aya::maps::Array<_, TapCounters> = ebpf
        .map_mut("VM_COUNTERS")
        .ok_or_else(|| failed(&"map VM_COUNTERS missing from the object"))?
        .try_into()
        .map_err(|e: aya::maps::MapError| failed(&e))?;
    let mut owned = TapCounters::default();
    for line in &mut owned.lines {
        line.owner = LOOPBACK_IFINDEX;
    }
    for cpu in 0..cpus {
        counters.set(cpu, owned, 0).map_err(|e| failed(&e))?;
    }
    let mut slots: aya::maps::Array<_, u32> = ebpf
        .map_mut("TAP_SLOT")
        .ok_or_else(|| failed(&"map TAP_SLOT missing from the object"))?
        .try_into()
        .map_err(|e: aya::maps::MapError| failed(&e))?;
    slots.set(LOOPBACK_IFINDEX, 1, 0).map_err(|e| failed(&e))
}

/// The geometry of VM_COUNTERS the tc programs are told at load time.
struct CounterGeometry {
    cpus: u32,
    slot_mask: u32,
}

impl CounterGeometry {
    fn new(taps: u32) -> Result<Self, LoaderError> {
        Ok(Self {
            cpus: counter_cpus().map_err(|e| LoaderError::Load(e.to_string()))?,
            slot_mask: tracer_common::slot_mask(taps),
        })
    }
}

/// Sizes VM_COUNTERS for `taps` counter slots with a copy per possible
/// CPU each, and tells the tc programs the stride and the preferred-slot
/// mask.
fn size_counters<'a>(loader: &mut EbpfLoader<'a>, taps: u32, geometry: &'a CounterGeometry) {
    loader
        .override_global("COUNTER_CPUS", &geometry.cpus, true)
        .override_global("SLOT_MASK", &geometry.slot_mask, true)
        .map_max_entries("VM_COUNTERS", taps.saturating_mul(geometry.cpus));
}

/// The loopback device's ifindex in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// The empty programs the real-traffic cost benchmark attaches beside
/// hvnet's on the same hooks: (tc, dequeue tracepoint, drop tracepoint).
pub const EMPTY_BASELINES: [(&str, Option<&str>); 3] = [
    (EMPTY_PROGRAM, None),
    ("hvnet_empty_dequeue", Some("skb_copy_datagram_iovec")),
    ("hvnet_empty_drop", Some("kfree_skb")),
];

/// Loads the object with only the empty baseline programs loaded (the
/// tracepoint ones as BTF tracepoints, like hvnet's own), none attached:
/// the benchmark attaches each where and in which order it measures.
pub fn load_empty_baselines() -> Result<Ebpf, LoaderError> {
    let btf = Btf::from_sys_fs().map_err(|e| LoaderError::Btf {
        path: "/sys/kernel/btf/vmlinux".into(),
        reason: e.to_string(),
    })?;
    let mut ebpf = EbpfLoader::new()
        .load(EBPF_OBJECT)
        .map_err(|err| LoaderError::Load(format!("{err:#}")))?;
    for (name, tracepoint) in EMPTY_BASELINES {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| missing_program(name))?;
        match tracepoint {
            None => {
                let tc: &mut SchedClassifier = program
                    .try_into()
                    .map_err(|err: ProgramError| program_error(name, &err))?;
                tc.load().map_err(|err| program_error(name, &err))?;
            }
            Some(tp) => {
                let traced: &mut aya::programs::BtfTracePoint = program
                    .try_into()
                    .map_err(|err: ProgramError| program_error(name, &err))?;
                traced
                    .load(tp, &btf)
                    .map_err(|err| program_error(name, &err))?;
            }
        }
    }
    Ok(ebpf)
}

pub fn bench_program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a SchedClassifier, LoaderError> {
    let program = ebpf.program(name).ok_or_else(|| missing_program(name))?;
    program
        .try_into()
        .map_err(|err: ProgramError| program_error(name, &err))
}

/// Decodes an EVENTS ring buffer record (exactly one PacketEvent).
pub fn decode_event(bytes: &[u8]) -> Option<tracer_common::PacketEvent> {
    use tracer_common::{dhcp_options, PacketEvent};
    if bytes.len() == std::mem::size_of::<PacketEvent>() {
        // SAFETY: PacketEvent is repr(C), Copy and valid for any bit pattern
        // (integers and byte arrays); the length was checked and
        // read_unaligned copes with any alignment.
        return Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PacketEvent>()) });
    }
    if bytes.len() != std::mem::size_of::<dhcp_options::EventWithOptions>() {
        return None;
    }
    // SAFETY: as above; EventWithOptions is repr(C) integers and byte arrays.
    let record = unsafe {
        std::ptr::read_unaligned(bytes.as_ptr().cast::<dhcp_options::EventWithOptions>())
    };
    // The kernel copied the options; they are walked here, by the same
    // code userspace parsing uses.
    let mut event = record.event;
    dhcp_options::walk(record.options.captured(), record.options.more != 0).apply(&mut event);
    Some(event)
}

/// CLOCK_MONOTONIC in seconds: the clock bpf_ktime_get_ns uses, so kernel
/// event times and the agent's own times compare directly.
pub fn monotonic_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_tcx_for_a_small_node_and_netlink_for_a_dense_one() {
        let small = choose_mechanism(AttachMode::Auto, true, AUTO_TCX_MAX_TAPS);
        assert_eq!(small.0, TcMechanism::Tcx);
        let dense = choose_mechanism(AttachMode::Auto, true, AUTO_TCX_MAX_TAPS + 1);
        assert_eq!(dense.0, TcMechanism::Netlink);
        assert!(dense.1.contains("129 taps"), "{}", dense.1);
        let old_kernel = choose_mechanism(AttachMode::Auto, false, 1);
        assert_eq!(old_kernel.0, TcMechanism::Netlink);
    }

    #[test]
    fn an_explicit_mode_is_kept_whatever_the_tap_count() {
        assert_eq!(
            choose_mechanism(AttachMode::Tcx, true, 5000).0,
            TcMechanism::Tcx
        );
        assert_eq!(
            choose_mechanism(AttachMode::Netlink, true, 1).0,
            TcMechanism::Netlink
        );
    }
}
