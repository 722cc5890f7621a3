//! Malformed and edge-case DHCP frames, named: the shared parser's unit
//! tests and the lab's kernel parity test (BPF_PROG_TEST_RUN) feed every
//! one to both builds of the parser.

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
    use tracer_common::{parse::parse_dhcp_frame, parse_flag, PacketEvent};

    fn parse(name: &str) -> PacketEvent {
        let corpus = malformed_corpus();
        let frame = &corpus.iter().find(|(n, _)| *n == name).unwrap().1;
        parse_dhcp_frame(frame).unwrap_or_else(|| panic!("{name} not located as DHCP"))
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
            parse_dhcp_frame(&malformed_corpus()[3].1[..14 + 20 + 2]).is_none(),
            "no ports, no DHCP"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = parse_dhcp_frame(&bytes);
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
            let d = parse_dhcp_frame(&frame).expect("a DHCP frame");
            prop_assert_eq!(d.xid, 1);
            if d.parse_flags == 0 {
                prop_assert!(d.msg_type != 0);
            }
        }
    }
}
