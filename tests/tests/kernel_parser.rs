//! The eBPF build and the userspace build of the one parser
//! (`tracer_common::classify`, `tracer_common::parse`) agree, frame by
//! frame, through BPF_PROG_TEST_RUN: the malformed corpus, real captures
//! and well-formed frames. The kernel classifies the frame, locates the
//! message, reads its fixed header and copies its options; decoding the
//! ring record walks the copy; userspace runs the same code on the bytes.
//! Every run must also return "continue" (fail-open) whatever the bytes,
//! and count the frame once, in the class userspace gives it.

use aya::{
    maps::{Array, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use hvnet::{
    frames,
    kernel::{
        counter_array::{counter_cpus, CounterArray},
        loader,
    },
    test_support::{corpus::malformed_corpus, pcap::read_pcap},
};
use hvnet_lab::testkit::require_root;
use tracer_common::{
    classify::classify_frame, direction, event_kind, hop::locate_hop_dhcp, parse::parse_dhcp_frame,
    PacketEvent, TrafficCounters,
};

/// TC_ACT_UNSPEC as the kernel reports the program's return value.
const CONTINUE: u32 = u32::MAX;

/// The object as `hvnet bench` loads it, and its event ring.
fn loaded_with_events() -> anyhow::Result<(aya::Ebpf, RingBuf<aya::maps::MapData>)> {
    let mut ebpf = loader::load_for_bench()?;
    let ring = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or_else(|| anyhow::anyhow!("no EVENTS map"))?,
    )?;
    Ok((ebpf, ring))
}

/// Runs `program` once on `frame` (it must continue: fail-open) and
/// returns the events it sent.
fn run_once(
    ebpf: &aya::Ebpf,
    ring: &mut RingBuf<aya::maps::MapData>,
    program: &str,
    name: &str,
    frame: &[u8],
) -> anyhow::Result<Vec<PacketEvent>> {
    let result = loader::bench_program(ebpf, program)?.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat: 1,
        ..Default::default()
    })?;
    assert_eq!(
        result.return_value, CONTINUE,
        "{name}: {program} must always continue"
    );
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(loader::decode_event(&item).ok_or_else(|| anyhow::anyhow!("bad record"))?);
    }
    Ok(events)
}

/// The kernel's event equals the userspace parse in every parsed field;
/// what only the kernel knows (time, device, direction) is taken from it.
fn assert_parsed_alike(name: &str, got: PacketEvent, want: PacketEvent) {
    let want = PacketEvent {
        ts_ns: got.ts_ns,
        dev: got.dev,
        direction: got.direction,
        ..want
    };
    assert_eq!(got, want, "{name}: eBPF vs userspace build");
}

#[test]
fn the_ebpf_and_userspace_builds_of_the_parser_agree_on_every_frame_and_the_program_fails_open(
) -> anyhow::Result<()> {
    require_root();
    let (mut ebpf, mut ring) = loaded_with_events()?;
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
    // counter slot 0; read through the mapping, as the agent reads it.
    let counters = CounterArray::new(
        Array::try_from(
            ebpf.take_map("VM_COUNTERS")
                .ok_or_else(|| anyhow::anyhow!("no VM_COUNTERS map"))?,
        )?,
        counter_cpus()?,
    )?;
    let totals = || -> anyhow::Result<TrafficCounters> {
        counters
            .read(0)
            .ok_or_else(|| anyhow::anyhow!("no counter slot 0"))
    };
    let mut checked = 0;
    for (name, frame) in &corpus {
        let before = totals()?;
        let events = run_once(&ebpf, &mut ring, loader::INGRESS_PROGRAM, name, frame)?;
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
                assert_parsed_alike(name, *dhcp[0], want);
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

/// A frame inside a VXLAN (`geneve_options: None`) or Geneve tunnel, as an
/// uplink carries it between nodes.
fn tunnelled(inner: &[u8], vni: u32, geneve_options: Option<usize>) -> Vec<u8> {
    let vni = vni.to_be_bytes();
    let (port, mut header) = match geneve_options {
        None => (4789, vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0]),
        Some(words) => {
            let mut h = vec![words as u8, 0, 0x65, 0x58, vni[1], vni[2], vni[3], 0];
            h.resize(8 + words * 4, 0xa5);
            (6081, h)
        }
    };
    header.extend_from_slice(inner);
    frames::udp_frame(
        [0x52, 0x54, 0, 1, 1, 1],
        [0x52, 0x54, 0, 2, 2, 2],
        [10, 250, 99, 2],
        [10, 250, 99, 1],
        40000,
        port,
        &header,
    )
}

/// An 802.1ad service tag in front of an 802.1Q customer tag (QinQ).
fn qinq(frame: &[u8], outer: u16, inner: u16) -> Vec<u8> {
    let tagged = frames::with_vlan_tag(frame, inner);
    let mut out = tagged[..12].to_vec();
    out.extend_from_slice(&[0x88, 0xa8]);
    out.extend_from_slice(&outer.to_be_bytes());
    out.extend_from_slice(&tagged[12..]);
    out
}

#[test]
fn the_hop_program_finds_dhcp_behind_vlan_tags_and_inside_tunnels_as_userspace_does(
) -> anyhow::Result<()> {
    require_root();
    let (ebpf, mut ring) = loaded_with_events()?;
    let vm = [0x52, 0x54, 0, 9, 9, 9];
    let ack = frames::dhcp_ack([0x52, 0x54, 0, 1, 1, 1], vm);
    let mut corpus: Vec<(String, Vec<u8>)> = vec![
        ("plain ACK".into(), ack.clone()),
        ("802.1Q ACK".into(), frames::with_vlan_tag(&ack, 100)),
        ("QinQ ACK".into(), qinq(&ack, 200, 100)),
        ("VXLAN ACK".into(), tunnelled(&ack, 42, None)),
        (
            "VXLAN 802.1Q ACK".into(),
            tunnelled(&frames::with_vlan_tag(&ack, 7), 42, None),
        ),
        ("Geneve ACK".into(), tunnelled(&ack, 5, Some(0))),
        (
            "Geneve ACK with options".into(),
            tunnelled(&ack, 5, Some(3)),
        ),
        ("TCP".into(), frames::tcp_1500(vm, [0xfe, 0x54, 0, 9, 9, 9])),
        (
            "VXLAN TCP".into(),
            tunnelled(&frames::tcp_1500(vm, vm), 42, None),
        ),
        ("DISCOVER".into(), frames::dhcp_discover(vm)),
    ];
    // Malformed DHCP inside a tunnel: the kernel must agree on every one.
    for (name, frame) in malformed_corpus() {
        if frame.len() >= 14 {
            corpus.push((format!("VXLAN {name}"), tunnelled(&frame, 42, None)));
        }
    }
    let mut found = 0;
    for (name, frame) in &corpus {
        let events = run_once(&ebpf, &mut ring, loader::HOP_INGRESS_PROGRAM, name, frame)?;
        let want = locate_hop_dhcp(frame.as_slice()).and_then(|hop| {
            let mut ev = parse_dhcp_frame(&frame[hop.inner..])?;
            ev.kind = event_kind::DHCP_HOP;
            ev.tunnel = hop.tunnel;
            Some(ev)
        });
        match want {
            None => assert!(events.is_empty(), "{name}: the kernel reported {events:?}"),
            Some(want) => {
                assert_eq!(
                    events.len(),
                    1,
                    "{name}: expected one event, got {events:?}"
                );
                assert_parsed_alike(name, events[0], want);
                found += 1;
            }
        }
    }
    eprintln!(
        "{found} DHCP messages found identically on a hop; {} frames run",
        corpus.len()
    );
    assert!(
        found >= 8,
        "the well-formed tunnelled and tagged messages were not all found"
    );
    Ok(())
}
