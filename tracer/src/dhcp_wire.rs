//! The reference DHCP frame parser: locating and the fixed header by the
//! same rules as the kernel's (tracer-ebpf programs/dhcp.rs) over a byte
//! slice, and the options through the one option walk both sides use
//! (`tracer_common::dhcp_options`) on the same window the kernel copies.
//! The kernel is checked against it frame by frame (BPF_PROG_TEST_RUN in
//! the lab tests), and it is property-tested here: any input, no panic,
//! bounded work.

use tracer_common::{
    dhcp_options::{self, OPTIONS_CAPTURE},
    parse_flag,
};

const BOOTP_FIXED: usize = 236;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireDhcp {
    pub vlan: u16,
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub op: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: [u8; 4],
    pub yiaddr: [u8; 4],
    pub chaddr: [u8; 6],
    pub msg_type: u8,
    pub lease_secs: u32,
    pub server_id: [u8; 4],
    pub requested_ip: [u8; 4],
    pub parse_flags: u16,
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

fn four(f: &[u8], at: usize) -> Option<[u8; 4]> {
    f.get(at..at + 4)?.try_into().ok()
}

/// Where the DHCP message starts (the UDP header), if the frame carries one.
pub fn locate(frame: &[u8]) -> Option<(usize, usize, u16)> {
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = 14;
    let mut vlan = 0;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        vlan = be16(frame, 14)? & 0x0fff;
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    if ethertype != 0x0800 {
        return None;
    }
    let head = frame.get(l3..l3 + 10)?;
    if head[0] >> 4 != 4 || head[9] != 17 {
        return None;
    }
    let ihl = usize::from(head[0] & 0x0f) * 4;
    if ihl < 20 || u16::from_be_bytes([head[6], head[7]]) & 0x1fff != 0 {
        return None;
    }
    let l4 = l3 + ihl;
    let (src, dst) = (be16(frame, l4)?, be16(frame, l4 + 2)?);
    if !tracer_common::classify::is_dhcp_port_pair(src, dst) {
        return None;
    }
    Some((l3, l4, vlan))
}

/// Parses a DHCP frame as the kernel does: None if it is not DHCP at all,
/// otherwise what could be read plus parse flags for what could not.
pub fn parse_frame(frame: &[u8]) -> Option<WireDhcp> {
    let (l3, l4, vlan) = locate(frame)?;
    let mut d = WireDhcp {
        vlan,
        ..Default::default()
    };
    if let (Some(src), Some(dst)) = (four(frame, l3 + 12), four(frame, l3 + 16)) {
        d.src_ip = src;
        d.dst_ip = dst;
    }
    let b = l4 + 8;
    let Some(fixed) = frame.get(b..b + 44) else {
        d.parse_flags |= parse_flag::TRUNCATED;
        return Some(d);
    };
    d.op = fixed[0];
    d.xid = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    d.secs = u16::from_be_bytes([fixed[8], fixed[9]]);
    d.flags = u16::from_be_bytes([fixed[10], fixed[11]]);
    d.ciaddr = [fixed[12], fixed[13], fixed[14], fixed[15]];
    d.yiaddr = [fixed[16], fixed[17], fixed[18], fixed[19]];
    d.chaddr = [
        fixed[28], fixed[29], fixed[30], fixed[31], fixed[32], fixed[33],
    ];
    // The kernel copies at most OPTIONS_CAPTURE bytes from the cookie on;
    // the same window is walked here, by the same code.
    let cookie = b + BOOTP_FIXED;
    let end = frame.len().min(cookie + OPTIONS_CAPTURE);
    let window = frame.get(cookie..end).unwrap_or_default();
    let fields = dhcp_options::walk(window, frame.len() > end);
    d.msg_type = fields.msg_type;
    d.lease_secs = fields.lease_secs;
    d.server_id = fields.server_id;
    d.requested_ip = fields.requested_ip;
    d.parse_flags |= fields.parse_flags;
    Some(d)
}

/// The Ethernet frames of a classic pcap capture (tcpdump -w), for golden
/// tests on real clients' and servers' messages.
pub fn read_pcap(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let magic = bytes.get(0..4).ok_or("no pcap header")?;
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return Err("not a pcap file".into()),
    };
    let word = |at: usize| -> Result<u32, String> {
        let b: [u8; 4] = bytes
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or("truncated pcap")?;
        Ok(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    if word(20)? != 1 {
        return Err("not an Ethernet capture".into());
    }
    let mut frames = Vec::new();
    let mut at = 24;
    while at < bytes.len() {
        let len = word(at + 8)? as usize;
        let data = bytes
            .get(at + 16..at + 16 + len)
            .ok_or("truncated pcap record")?;
        frames.push(data.to_vec());
        at += 16 + len;
    }
    Ok(frames)
}

/// A corpus of malformed and edge-case DHCP frames (name, bytes): fed to
/// the kernel program and to this parser by the lab tests.
pub fn malformed_corpus() -> Vec<(&'static str, Vec<u8>)> {
    use crate::frames::{
        dhcp_ack, dhcp_discover, dhcp_message, udp_frame, with_vlan_tag, BROADCAST_MAC,
    };
    let vm = [0x52, 0x54, 0, 0xde, 0xad, 1];
    let host = [0xfe, 0x54, 0, 0xde, 0xad, 1];
    let discover = dhcp_discover(vm);
    let with_options = |options: &[u8]| {
        let mut message = dhcp_message(1, 0xabad_cafe, vm, 1);
        message.truncate(240);
        message.extend_from_slice(options);
        udp_frame(BROADCAST_MAC, vm, [0; 4], [255; 4], 68, 67, &message)
    };
    let mut corpus = vec![
        ("valid discover", discover.clone()),
        ("valid ack with lease", dhcp_ack(host, vm)),
        ("vlan tagged discover", with_vlan_tag(&discover, 42)),
        ("truncated in udp header", discover[..14 + 20 + 4].to_vec()),
        (
            "truncated in bootp header",
            discover[..14 + 20 + 8 + 30].to_vec(),
        ),
        (
            "truncated before cookie",
            discover[..14 + 20 + 8 + 238].to_vec(),
        ),
        (
            "truncated inside an option",
            discover[..14 + 20 + 8 + 240 + 2].to_vec(),
        ),
        ("wrong magic cookie", {
            let mut f = discover.clone();
            f[14 + 20 + 8 + 236] = 0x42;
            f
        }),
        (
            "no message type",
            with_options(&[12, 3, b'v', b'm', b'1', 255]),
        ),
        (
            "option length past the end",
            with_options(&[53, 1, 1, 12, 200, b'x']),
        ),
        (
            "lease option with wrong length",
            with_options(&[53, 1, 1, 51, 3, 0, 0, 1, 255]),
        ),
        (
            "message type with wrong length",
            with_options(&[53, 2, 1, 1, 255]),
        ),
        ("overload option", with_options(&[53, 1, 1, 52, 1, 3, 255])),
        ("no end option", with_options(&[53, 1, 1])),
        ("endless padding", with_options(&[0u8; 600])),
        (
            "many options (looping walk)",
            with_options(&[7, 0].repeat(200)),
        ),
        ("oversized options area", {
            let mut opts = vec![53, 1, 1];
            for _ in 0..6 {
                opts.extend_from_slice(&[43, 255]);
                opts.extend_from_slice(&[0xab; 255]);
            }
            opts.push(255);
            with_options(&opts)
        }),
        ("bootp without dhcp options", {
            let mut m = dhcp_message(1, 7, vm, 1);
            m.truncate(236);
            m.resize(300, 0);
            udp_frame(BROADCAST_MAC, vm, [0; 4], [255; 4], 68, 67, &m)
        }),
    ];
    corpus.push((
        "empty udp payload",
        udp_frame(BROADCAST_MAC, vm, [0; 4], [255; 4], 68, 67, &[]),
    ));
    corpus
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(name: &str) -> WireDhcp {
        let corpus = malformed_corpus();
        let frame = &corpus.iter().find(|(n, _)| *n == name).unwrap().1;
        parse_frame(frame).unwrap_or_else(|| panic!("{name} not located as DHCP"))
    }

    #[test]
    fn valid_messages_parse_fully() {
        let ack = parse("valid ack with lease");
        assert_eq!(
            (ack.op, ack.msg_type, ack.xid, ack.parse_flags),
            (2, 5, 0x3f2a_1c9d, 0)
        );
        let tagged = parse("vlan tagged discover");
        assert_eq!(
            (tagged.vlan, tagged.msg_type, tagged.parse_flags),
            (42, 1, 0)
        );
    }

    #[test]
    fn every_malformation_is_flagged() {
        let expect = [
            ("truncated in bootp header", parse_flag::TRUNCATED),
            ("truncated before cookie", parse_flag::TRUNCATED),
            ("truncated inside an option", parse_flag::TRUNCATED),
            ("wrong magic cookie", parse_flag::BAD_COOKIE),
            ("no message type", parse_flag::NO_MESSAGE_TYPE),
            ("option length past the end", parse_flag::TRUNCATED),
            (
                "lease option with wrong length",
                parse_flag::BAD_OPTION_LENGTH,
            ),
            (
                "message type with wrong length",
                parse_flag::BAD_OPTION_LENGTH,
            ),
            ("overload option", parse_flag::OVERLOAD),
            ("no end option", parse_flag::TRUNCATED),
            ("endless padding", parse_flag::OPTION_LIMIT),
            ("many options (looping walk)", parse_flag::OPTION_LIMIT),
            // Longer than the kernel copies: the rest is not read, and said so.
            ("oversized options area", parse_flag::CAPTURE_LIMIT),
            ("bootp without dhcp options", parse_flag::BAD_COOKIE),
            ("empty udp payload", parse_flag::TRUNCATED),
        ];
        for (name, flag) in expect {
            let d = parse(name);
            assert_ne!(
                d.parse_flags & flag,
                0,
                "{name}: flags {:#x}",
                d.parse_flags
            );
        }
        // Ports present, header cut: located as DHCP, flagged truncated.
        assert_ne!(
            parse("truncated in udp header").parse_flags & parse_flag::TRUNCATED,
            0
        );
        assert!(
            parse_frame(&malformed_corpus()[3].1[..14 + 20 + 2]).is_none(),
            "no ports, no DHCP"
        );
    }

    fn capture(name: &str) -> Vec<WireDhcp> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dhcp")
            .join(name);
        let frames = read_pcap(&std::fs::read(path).unwrap()).unwrap();
        frames
            .iter()
            .map(|f| parse_frame(f).expect("a DHCP frame"))
            .collect()
    }

    fn as_message(d: &WireDhcp, toward_vm: bool) -> crate::dhcp::DhcpMessage {
        crate::dhcp::DhcpMessage {
            seen: crate::dhcp::Seen::OnTap { toward_vm },
            msg_type: Some(crate::dhcp::MessageType::from_code(d.msg_type)),
            op: d.op,
            xid: d.xid,
            ciaddr: d.ciaddr,
            yiaddr: d.yiaddr,
            server_id: d.server_id,
            requested_ip: d.requested_ip,
            dst_ip: d.dst_ip,
            lease_secs: d.lease_secs,
            chaddr: d.chaddr,
        }
    }

    /// Captured in the lab: busybox udhcpc 1.35 against dnsmasq (DISCOVERs
    /// while dnsmasq ping-checks the address, DORA, SIGUSR1 renewal,
    /// SIGUSR2 release).
    #[test]
    fn golden_udhcpc_and_dnsmasq_capture() {
        use crate::dhcp::{client_state, ClientState};
        let msgs = capture("udhcpc.pcap");
        let types: Vec<u8> = msgs.iter().map(|m| m.msg_type).collect();
        assert_eq!(types, [1, 1, 1, 2, 2, 2, 1, 2, 3, 5, 3, 5, 7]);
        assert!(msgs.iter().all(|m| m.parse_flags == 0), "{msgs:?}");
        // udhcpc keeps the xid of a discovery cycle's first DISCOVER for
        // the request and the renewal; a new cycle (after its retries ran
        // out unanswered) and the RELEASE take new xids.
        assert!(msgs[..6].iter().all(|m| m.xid == msgs[0].xid));
        assert!(msgs[6..12].iter().all(|m| m.xid == msgs[6].xid));
        assert_ne!(msgs[0].xid, msgs[6].xid);
        assert_ne!(msgs[12].xid, msgs[6].xid);
        for ack in msgs.iter().filter(|m| m.msg_type == 5) {
            assert_eq!(
                (ack.lease_secs, ack.server_id, ack.op),
                (120, [10, 250, 0, 1], 2)
            );
        }
        let renewal = &msgs[10];
        assert_eq!(
            renewal.dst_ip,
            [10, 250, 0, 1],
            "renewal is unicast to the server"
        );
        assert_ne!(renewal.ciaddr, [0; 4]);
        assert_eq!(
            client_state(&as_message(renewal, false)),
            Some(ClientState::Renewing)
        );
        assert_eq!(
            client_state(&as_message(&msgs[8], false)),
            Some(ClientState::Requesting)
        );
    }

    /// Captured in the lab: ISC dhclient against dnsmasq: DORA, then a
    /// restart with its lease file (INIT-REBOOT).
    #[test]
    fn golden_dhclient_and_dnsmasq_capture() {
        use crate::dhcp::{client_state, ClientState, DhcpTracker, MessageType, Seen, Verdict};
        use crate::stall::VmState;
        let msgs = capture("dhclient.pcap");
        let types: Vec<u8> = msgs.iter().map(|m| m.msg_type).collect();
        assert_eq!(types, [1, 2, 3, 5, 3, 5]);
        assert!(msgs.iter().all(|m| m.parse_flags == 0));
        assert_eq!(
            client_state(&as_message(&msgs[2], false)),
            Some(ClientState::Requesting)
        );
        let reboot = &msgs[4];
        assert_eq!((reboot.ciaddr, reboot.server_id), ([0; 4], [0; 4]));
        assert_eq!(
            client_state(&as_message(reboot, false)),
            Some(ClientState::Rebooting)
        );
        // The tracker, fed the capture with every reply delivered, ends
        // with a lease and delivered exchanges.
        let mut tracker = DhcpTracker::new(3.0);
        for (i, m) in msgs.iter().enumerate() {
            let at = i as f64;
            let toward_vm = m.op == 2;
            tracker.observe(&as_message(m, toward_vm), at, VmState::Ok);
            if toward_vm {
                let mut dequeued = as_message(m, true);
                dequeued.seen = Seen::Dequeued;
                tracker.observe(&dequeued, at + 0.01, VmState::Ok);
            }
        }
        assert_eq!(tracker.last_verdict(), Some(Verdict::Delivered));
        assert_eq!(tracker.lease().map(|l| l.secs), Some(120));
        assert_eq!(tracker.counters().packets[0][MessageType::Ack as usize], 2);
        assert_eq!(tracker.counters().retries, [0; 5]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = parse_frame(&bytes);
        }

        #[test]
        fn any_options_after_a_valid_header_never_panic_and_stay_bounded(
            options in proptest::collection::vec(any::<u8>(), 0..1500)
        ) {
            let vm = [0x52, 0x54, 0, 1, 2, 3];
            let mut message = crate::frames::dhcp_message(1, 1, vm, 1);
            message.truncate(240);
            message.extend_from_slice(&options);
            let frame = crate::frames::udp_frame(crate::frames::BROADCAST_MAC, vm, [0; 4], [255; 4], 68, 67, &message);
            let d = parse_frame(&frame).expect("a DHCP frame");
            prop_assert_eq!(d.xid, 1);
            if d.parse_flags == 0 {
                prop_assert!(d.msg_type != 0);
            }
        }
    }
}
