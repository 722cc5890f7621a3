//! The eBPF build and the userspace build of the one parser
//! (`tracer_common::classify`, `tracer_common::parse`) agree, frame by
//! frame, through BPF_PROG_TEST_RUN: the malformed corpus, real captures
//! and well-formed frames. The kernel classifies the frame, locates the
//! message, reads its fixed header and copies its options; decoding the
//! ring record walks the copy; userspace runs the same code on the bytes.
//! Every run must also return "continue" (fail-open) whatever the bytes,
//! and count the frame once, in the class userspace gives it.

use aya::{
    maps::{PerCpuArray, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use hvnet::{
    frames,
    kernel::loader,
    test_support::{corpus::malformed_corpus, pcap::read_pcap},
};
use hvnet_lab::testkit::require_root;
use tracer_common::{
    classify::classify_frame, direction, event_kind, parse::parse_dhcp_frame, PacketEvent,
    TrafficCounters,
};

/// TC_ACT_UNSPEC as the kernel reports the program's return value.
const CONTINUE: u32 = u32::MAX;

#[test]
fn the_ebpf_and_userspace_builds_of_the_parser_agree_on_every_frame_and_the_program_fails_open(
) -> anyhow::Result<()> {
    require_root();
    let mut ebpf = loader::load_for_bench()?;
    let mut ring = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or_else(|| anyhow::anyhow!("no EVENTS map"))?,
    )?;
    let mut corpus = malformed_corpus();
    // Real messages captured in the lab (udhcpc, dhclient, dnsmasq).
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tracer/tests/fixtures/dhcp");
    for name in ["udhcpc.pcap", "dhclient.pcap"] {
        let frames = read_pcap(&std::fs::read(fixtures.join(name))?).map_err(anyhow::Error::msg)?;
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
        Ok(hvnet::kernel::collect::sum_cpus(&counters.get(&0, 0)?))
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
            "{name}: not counted once in class {class} (eBPF vs userspace classifier)"
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
        match parse_dhcp_frame(frame) {
            None => assert!(
                dhcp.is_empty(),
                "{name}: the kernel reported DHCP for a frame userspace does not locate"
            ),
            Some(want) => {
                assert_eq!(
                    dhcp.len(),
                    1,
                    "{name}: expected one DHCP event, got {events:?}"
                );
                // What only the kernel knows (time, device, direction) is
                // taken from its event; every parsed field must match.
                let got = *dhcp[0];
                let want = PacketEvent {
                    ts_ns: got.ts_ns,
                    dev: got.dev,
                    direction: got.direction,
                    ..want
                };
                assert_eq!(got, want, "{name}: eBPF vs userspace build");
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
        "{checked} DHCP frames parsed identically by the eBPF and userspace builds; {} frames run",
        corpus.len()
    );
    assert!(checked >= 15 + 19, "the captures were not all checked");
    Ok(())
}
