//! Builders for well-formed Ethernet frames: the benchmark's representative
//! traffic, golden classification tests, and the lab's eBPF-vs-userspace
//! classifier check all use the same bytes.

pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut header = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0];
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&src);
    header.extend_from_slice(&dst);
    let sum = checksum(&header);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    header.extend_from_slice(payload);
    header
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut seg = Vec::with_capacity(usize::from(len));
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&len.to_be_bytes());
    seg.extend_from_slice(&[0, 0]); // checksum optional over IPv4
    seg.extend_from_slice(payload);
    seg
}

/// A UDP datagram in an Ethernet frame.
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    ethernet(
        dst_mac,
        src_mac,
        0x0800,
        &ipv4(src, dst, 17, &udp(sport, dport, payload)),
    )
}

/// A small unicast UDP frame (60 bytes on the wire without FCS).
pub fn small_udp(src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    udp_frame(
        dst_mac,
        src_mac,
        [10, 250, 0, 10],
        [10, 250, 0, 1],
        40000,
        5001,
        &[0u8; 18],
    )
}

/// A BOOTP/DHCP message (fixed part, magic cookie, message type, end).
pub fn dhcp_message(op: u8, xid: u32, client_mac: [u8; 6], message_type: u8) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = op;
    bootp[1] = 1; // htype ethernet
    bootp[2] = 6; // hlen
    bootp[4..8].copy_from_slice(&xid.to_be_bytes());
    bootp[28..34].copy_from_slice(&client_mac);
    bootp.extend_from_slice(&[99, 130, 83, 99]); // magic cookie
    bootp.extend_from_slice(&[53, 1, message_type, 255]);
    bootp.resize(300, 0); // BOOTP minimum size, as clients pad
    bootp
}

/// A broadcast DHCPDISCOVER from a client, as a guest sends it.
pub fn dhcp_discover(client_mac: [u8; 6]) -> Vec<u8> {
    let message = dhcp_message(1, 0x3f2a_1c9d, client_mac, 1);
    udp_frame(
        BROADCAST_MAC,
        client_mac,
        [0; 4],
        [255; 4],
        68,
        67,
        &message,
    )
}

/// A unicast DHCPACK from the server to a client.
pub fn dhcp_ack(server_mac: [u8; 6], client_mac: [u8; 6]) -> Vec<u8> {
    let message = dhcp_message(2, 0x3f2a_1c9d, client_mac, 5);
    udp_frame(
        client_mac,
        server_mac,
        [10, 250, 0, 1],
        [10, 250, 0, 10],
        67,
        68,
        &message,
    )
}

/// An ARP who-has request (broadcast).
pub fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&sender_mac);
    arp.extend_from_slice(&sender_ip);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target_ip);
    ethernet(BROADCAST_MAC, sender_mac, 0x0806, &arp)
}

/// A full-size TCP segment (1514-byte frame: 1500-byte IP packet).
pub fn tcp_1500(src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&5201u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
    tcp[12] = 0x50; // data offset 5
    tcp[13] = 0x10; // ACK
    tcp.resize(1480, 0xab);
    ethernet(
        dst_mac,
        src_mac,
        0x0800,
        &ipv4([10, 250, 0, 1], [10, 250, 0, 10], 6, &tcp),
    )
}

/// Inserts an 802.1Q tag (VLAN id) after the MAC addresses.
pub fn with_vlan_tag(frame: &[u8], vlan: u16) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&0x8100u16.to_be_bytes());
    tagged.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::{class, classify::classify_frame};

    const VM: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const HOST: [u8; 6] = [0xfe, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn golden_classes() {
        assert_eq!(classify_frame(&dhcp_discover(VM)), class::DHCP);
        assert_eq!(classify_frame(&dhcp_ack(HOST, VM)), class::DHCP);
        assert_eq!(
            classify_frame(&arp_request(VM, [10, 250, 0, 10], [10, 250, 0, 1])),
            class::ARP
        );
        assert_eq!(classify_frame(&small_udp(VM, HOST)), class::OTHER);
        assert_eq!(classify_frame(&tcp_1500(HOST, VM)), class::OTHER);
        let bcast = udp_frame(
            BROADCAST_MAC,
            VM,
            [10, 250, 0, 10],
            [10, 250, 0, 255],
            5000,
            9,
            b"x",
        );
        assert_eq!(classify_frame(&bcast), class::BROADCAST);
    }

    #[test]
    fn vlan_tagged_dhcp_and_arp_are_recognised() {
        assert_eq!(
            classify_frame(&with_vlan_tag(&dhcp_discover(VM), 100)),
            class::DHCP
        );
        assert_eq!(
            classify_frame(&with_vlan_tag(
                &arp_request(VM, [10, 250, 0, 10], [10, 250, 0, 1]),
                7
            )),
            class::ARP
        );
    }

    #[test]
    fn malformed_frames_are_other_or_broadcast_never_dhcp() {
        let discover = dhcp_discover(VM);
        // Cut inside the UDP header: broadcast frame, no DHCP claim.
        assert_eq!(classify_frame(&discover[..14 + 20 + 2]), class::BROADCAST);
        assert_eq!(classify_frame(&discover[..10]), class::OTHER);
        assert_eq!(classify_frame(&[]), class::OTHER);
        // IHL below 5 is invalid.
        let mut bad_ihl = dhcp_discover(VM);
        bad_ihl[14] = 0x44;
        assert_eq!(classify_frame(&bad_ihl), class::BROADCAST);
        // A non-first fragment has no UDP header even if the bytes look like one.
        let mut fragment = dhcp_ack(HOST, VM);
        fragment[14 + 6] = 0x00;
        fragment[14 + 7] = 0x10;
        assert_eq!(classify_frame(&fragment), class::OTHER);
        // Port 67 to an unrelated port is not DHCP.
        let not_dhcp = udp_frame(HOST, VM, [10, 250, 0, 10], [10, 250, 0, 1], 67, 53, b"x");
        assert_eq!(classify_frame(&not_dhcp), class::OTHER);
    }

    #[test]
    fn ip_checksum_is_valid() {
        let frame = small_udp(VM, HOST);
        assert_eq!(checksum(&frame[14..34]), 0);
        assert_eq!(frame.len(), 60);
        assert_eq!(tcp_1500(HOST, VM).len(), 1514);
    }
}
