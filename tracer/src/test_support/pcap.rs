//! Classic pcap captures (tcpdump -w): the lab's captures of real
//! clients and servers are golden tests of the shared parser.

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

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::{direction, parse::parse_dhcp_frame, PacketEvent};

    fn capture(name: &str) -> Vec<PacketEvent> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dhcp")
            .join(name);
        let frames = read_pcap(&std::fs::read(path).unwrap()).unwrap();
        frames
            .iter()
            .map(|f| parse_dhcp_frame(f).expect("a DHCP frame"))
            .collect()
    }

    /// The tracker's message for a captured frame, through the same
    /// interpretation the agent gives kernel events.
    fn as_message(d: &PacketEvent, toward_vm: bool) -> crate::analysis::dhcp::DhcpMessage {
        let mut ev = *d;
        ev.direction = if toward_vm {
            direction::TO_VM
        } else {
            direction::FROM_VM
        };
        match crate::kernel::events::interpret(&ev, |_| String::new()) {
            Some(crate::kernel::events::Observed::Dhcp { message, .. }) => message,
            other => panic!("not a DHCP message: {other:?}"),
        }
    }

    /// Captured in the lab: busybox udhcpc 1.35 against dnsmasq (DISCOVERs
    /// while dnsmasq ping-checks the address, DORA, SIGUSR1 renewal,
    /// SIGUSR2 release).
    #[test]
    fn golden_udhcpc_and_dnsmasq_capture() {
        use crate::analysis::dhcp::{client_state, ClientState};
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
        use crate::analysis::dhcp::{
            client_state, ClientState, DhcpTracker, MessageType, Seen, Verdict,
        };
        use crate::analysis::stall::VmState;
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
}
