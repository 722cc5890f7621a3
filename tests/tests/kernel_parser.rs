//! The kernel's DHCP parsing against the reference parser, frame by frame,
//! through BPF_PROG_TEST_RUN: the malformed corpus and well-formed frames.
//! The kernel locates the message, reads its fixed header and copies its
//! options; decoding the ring record walks the copy with the shared option
//! walker, so this checks the kernel's locating, header reads and copy
//! (offset, length, the "frame goes on" bit) against the reference.
//! Every run must also return "continue" (fail-open) whatever the bytes,
//! and count the frame once, in the class the reference classifier gives.

use aya::{
    maps::{PerCpuArray, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use hvnet::{dhcp_wire, frames, loader};
use hvnet_lab::testkit::require_root;
use tracer_common::{
    classify::classify_frame, direction, event_kind, PacketEvent, TrafficCounters,
};

/// TC_ACT_UNSPEC as the kernel reports the program's return value.
const CONTINUE: u32 = u32::MAX;

#[test]
fn kernel_and_reference_parsers_agree_on_every_frame_and_the_program_fails_open(
) -> anyhow::Result<()> {
    require_root();
    let mut ebpf = loader::load_for_bench()?;
    let mut ring = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or_else(|| anyhow::anyhow!("no EVENTS map"))?,
    )?;
    let mut corpus = dhcp_wire::malformed_corpus();
    // Real messages captured in the lab (udhcpc, dhclient, dnsmasq).
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tracer/tests/fixtures/dhcp");
    for name in ["udhcpc.pcap", "dhclient.pcap"] {
        let frames = dhcp_wire::read_pcap(&std::fs::read(fixtures.join(name))?)
            .map_err(anyhow::Error::msg)?;
        corpus.extend(frames.into_iter().map(|f| ("captured", f)));
    }
    let vm = [0x52, 0x54, 0, 9, 9, 9];
    corpus.push((
        "ARP request",
        frames::arp_request(vm, [10, 250, 0, 9], [10, 250, 0, 1]),
    ));
    corpus.push((
        "TCP segment",
        frames::tcp_1500(vm, [0xfe, 0x54, 0, 9, 9, 9]),
    ));
    // The smallest frame a tap carries (BPF_PROG_TEST_RUN refuses less).
    corpus.push(("bare ethernet header", vec![0xff; 14]));
    // load_for_bench gives the loopback device (the test runs' skb->dev)
    // counter slot 0.
    let counters: PerCpuArray<_, TrafficCounters> = PerCpuArray::try_from(
        ebpf.map("VM_COUNTERS")
            .ok_or_else(|| anyhow::anyhow!("no VM_COUNTERS map"))?,
    )?;
    let totals = || -> anyhow::Result<TrafficCounters> {
        Ok(hvnet::collect::sum_cpus(&counters.get(&0, 0)?))
    };
    let mut checked = 0;
    for (name, frame) in &corpus {
        let before = totals()?;
        let program = loader::bench_program(&ebpf, loader::INGRESS_PROGRAM)?;
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..Default::default()
        })?;
        assert_eq!(
            result.return_value, CONTINUE,
            "{name}: the program must always continue"
        );
        let after = totals()?;
        let class = classify_frame(frame);
        let counted = after.get(direction::FROM_VM, class);
        let was = before.get(direction::FROM_VM, class);
        assert_eq!(
            (counted.packets - was.packets, counted.bytes - was.bytes),
            (1, frame.len() as u64),
            "{name}: not counted once in class {class} (kernel vs reference classifier)"
        );
        assert_eq!(
            after.packets(direction::FROM_VM),
            before.packets(direction::FROM_VM) + 1,
            "{name}: counted in more than one class"
        );
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            events.push(loader::decode_event(&item).ok_or_else(|| anyhow::anyhow!("bad record"))?);
        }
        let dhcp: Vec<&PacketEvent> = events
            .iter()
            .filter(|e| e.kind == event_kind::DHCP)
            .collect();
        match dhcp_wire::parse_frame(frame) {
            None => assert!(
                dhcp.is_empty(),
                "{name}: kernel reported DHCP for a non-DHCP frame"
            ),
            Some(want) => {
                assert_eq!(
                    dhcp.len(),
                    1,
                    "{name}: expected one DHCP event, got {events:?}"
                );
                let got = dhcp[0];
                let got = dhcp_wire::WireDhcp {
                    vlan: got.vlan,
                    src_ip: got.src_ip,
                    dst_ip: got.dst_ip,
                    op: got.op,
                    xid: got.xid,
                    secs: got.secs,
                    flags: got.flags,
                    ciaddr: got.ciaddr,
                    yiaddr: got.yiaddr,
                    chaddr: got.chaddr,
                    msg_type: got.msg_type,
                    lease_secs: got.lease_secs,
                    server_id: got.server_id,
                    requested_ip: got.requested_ip,
                    parse_flags: got.parse_flags,
                };
                assert_eq!(got, want, "{name}: kernel vs reference");
                checked += 1;
            }
        }
        if *name == "ARP request" {
            assert!(
                events
                    .iter()
                    .any(|e| e.kind == event_kind::ARP && e.src_ip == [10, 250, 0, 9]),
                "{events:?}"
            );
        }
    }
    eprintln!(
        "{checked} DHCP frames parsed identically by kernel and reference; {} frames run",
        corpus.len()
    );
    assert!(checked >= 15 + 19, "the captures were not all checked");
    Ok(())
}
