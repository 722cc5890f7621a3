//! The kernel's DHCP/ARP events: read from the EVENTS ring buffer and
//! turned into the tracker's input. The ring buffer never blocks the
//! kernel; what did not fit is counted in EVENTS_LOST.

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracer_common::{direction, event_kind, hop::tunnel_kind, parse_flag, PacketEvent};

use crate::analysis::dhcp::{DhcpMessage, HopSighting, MessageType, Seen};

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("watching the event ring buffer: {0}")]
    Watch(std::io::Error),
}

/// Parse problems that make a DHCP event unusable as a message.
pub const MALFORMED: u16 = parse_flag::BAD_COOKIE
    | parse_flag::TRUNCATED
    | parse_flag::OPTION_OVERFLOW
    | parse_flag::OPTION_LIMIT
    | parse_flag::BAD_OPTION_LENGTH;

/// What one kernel event means to the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Dhcp {
        ifindex: u32,
        mono: f64,
        message: DhcpMessage,
    },
    MalformedDhcp {
        ifindex: u32,
        mono: f64,
        from_vm: bool,
        flags: u16,
    },
    Arp {
        ifindex: u32,
        mono: f64,
        from_vm: bool,
        op: u8,
        sender: [u8; 4],
        target: [u8; 4],
    },
}

/// Interprets one event; `drop_reason` names kernel drop reasons.
pub fn interpret(ev: &PacketEvent, drop_reason: impl Fn(u32) -> String) -> Option<Observed> {
    let ifindex = ev.dev.ifindex;
    let mono = ev.ts_ns as f64 / 1e9;
    let from_vm = ev.direction == direction::FROM_VM;
    let seen = match ev.kind {
        event_kind::ARP => {
            return Some(Observed::Arp {
                ifindex,
                mono,
                from_vm,
                op: ev.msg_type,
                sender: ev.src_ip,
                target: ev.dst_ip,
            })
        }
        event_kind::DHCP | event_kind::DHCP_HOP if ev.parse_flags & MALFORMED != 0 => {
            return Some(Observed::MalformedDhcp {
                ifindex,
                mono,
                from_vm,
                flags: ev.parse_flags,
            })
        }
        event_kind::DHCP => Seen::OnTap {
            toward_vm: !from_vm,
        },
        event_kind::DHCP_HOP => Seen::OnHop {
            // The agent names the hop (it knows the ifindex).
            sighting: HopSighting {
                hop: String::new(),
                vlan: ev.vlan,
                tunnel: match ev.tunnel >> 24 {
                    tunnel_kind::VXLAN => "vxlan".to_owned(),
                    tunnel_kind::GENEVE => "geneve".to_owned(),
                    _ => String::new(),
                },
                vni: ev.tunnel & 0x00ff_ffff,
            },
        },
        event_kind::DHCP_DEQUEUED => Seen::Dequeued,
        event_kind::DHCP_DROPPED => Seen::Dropped {
            reason: drop_reason(ev.drop_reason),
        },
        _ => return None,
    };
    // Options (the message type) come with tap and hop sightings only.
    let with_options = ev.kind == event_kind::DHCP || ev.kind == event_kind::DHCP_HOP;
    let msg_type = (with_options && ev.msg_type != 0).then(|| MessageType::from_code(ev.msg_type));
    if with_options && msg_type.is_none() {
        // BOOTP without a message type: nothing DHCP can say about it.
        return Some(Observed::MalformedDhcp {
            ifindex,
            mono,
            from_vm,
            flags: ev.parse_flags,
        });
    }
    Some(Observed::Dhcp {
        ifindex,
        mono,
        message: DhcpMessage {
            seen,
            msg_type,
            op: ev.op,
            xid: ev.xid,
            ciaddr: ev.ciaddr,
            yiaddr: ev.yiaddr,
            server_id: ev.server_id,
            requested_ip: ev.requested_ip,
            dst_ip: ev.dst_ip,
            lease_secs: ev.lease_secs,
            chaddr: ev.chaddr,
        },
    })
}

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> Result<Self, EventsError> {
        // The AsyncFd owns the RingBuf and with it the fd, for as long as
        // it is registered: the I/O-safety concern behind the deprecation
        // (an fd closed under the reactor) cannot arise.
        #[allow(deprecated)]
        let ring = AsyncFd::new(ring).map_err(EventsError::Watch)?;
        Ok(Self { ring })
    }

    /// Waits for events and returns all that are ready.
    pub async fn next_batch(&mut self) -> Result<Vec<PacketEvent>, EventsError> {
        let mut guard = self.ring.readable_mut().await.map_err(EventsError::Watch)?;
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(ev) = crate::kernel::loader::decode_event(&item) {
                batch.push(ev);
            }
        }
        guard.clear_ready();
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::DevKey;

    fn event(kind: u8, dir: u8) -> PacketEvent {
        PacketEvent {
            ts_ns: 5_000_000_000,
            dev: DevKey {
                netns: 0,
                ifindex: 7,
            },
            kind,
            direction: dir,
            msg_type: 5,
            op: 2,
            xid: 0x3f2a,
            ..Default::default()
        }
    }

    #[test]
    fn dhcp_events_become_messages_with_their_direction() {
        let obs = interpret(&event(event_kind::DHCP, direction::TO_VM), |_| {
            String::new()
        })
        .unwrap();
        let Observed::Dhcp {
            ifindex,
            mono,
            message,
        } = obs
        else {
            panic!("{obs:?}")
        };
        assert_eq!((ifindex, mono), (7, 5.0));
        assert_eq!(message.seen, Seen::OnTap { toward_vm: true });
        assert_eq!(message.msg_type, Some(MessageType::Ack));
    }

    #[test]
    fn drops_carry_the_reason_name_and_tracepoint_events_no_type() {
        let mut ev = event(event_kind::DHCP_DROPPED, direction::TO_VM);
        ev.drop_reason = 77;
        let obs = interpret(&ev, |r| format!("r{r}")).unwrap();
        let Observed::Dhcp { message, .. } = obs else {
            panic!()
        };
        assert_eq!(
            message.seen,
            Seen::Dropped {
                reason: "r77".into()
            }
        );
        assert_eq!(message.msg_type, None);
    }

    #[test]
    fn malformed_and_typeless_dhcp_is_reported_as_such() {
        let mut ev = event(event_kind::DHCP, direction::FROM_VM);
        ev.parse_flags = parse_flag::OPTION_OVERFLOW;
        assert!(matches!(
            interpret(&ev, |_| String::new()),
            Some(Observed::MalformedDhcp { from_vm: true, .. })
        ));
        let mut ev = event(event_kind::DHCP, direction::FROM_VM);
        ev.msg_type = 0;
        assert!(matches!(
            interpret(&ev, |_| String::new()),
            Some(Observed::MalformedDhcp { .. })
        ));
        assert_eq!(
            crate::analysis::dhcp::flag_names(parse_flag::TRUNCATED | parse_flag::OVERLOAD),
            ["truncated", "overload"]
        );
    }

    #[test]
    fn records_of_the_wrong_size_are_ignored() {
        use crate::kernel::loader::decode_event;
        assert!(decode_event(&[0u8; 12]).is_none());
        assert!(decode_event(&[0u8; std::mem::size_of::<PacketEvent>()]).is_some());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever bytes a ring record holds (a newer kernel object, a bug,
        /// memory the kernel reused), interpreting it never panics and never
        /// makes up a DHCP message out of a malformed or non-DHCP event.
        #[test]
        fn any_event_record_is_interpreted_without_panic_and_honestly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 80)
        ) {
            let ev = crate::kernel::loader::decode_event(&bytes).expect("80 bytes is a record");
            match interpret(&ev, |r| format!("reason{r}")) {
                Some(Observed::Dhcp { message, .. }) => {
                    proptest::prop_assert!(matches!(
                        ev.kind,
                        event_kind::DHCP
                            | event_kind::DHCP_DEQUEUED
                            | event_kind::DHCP_DROPPED
                            | event_kind::DHCP_HOP
                    ));
                    proptest::prop_assert_eq!(message.xid, ev.xid);
                    if ev.kind == event_kind::DHCP || ev.kind == event_kind::DHCP_HOP {
                        proptest::prop_assert!(ev.parse_flags & MALFORMED == 0);
                        proptest::prop_assert!(message.msg_type.is_some());
                    }
                }
                Some(Observed::MalformedDhcp { .. }) => {
                    proptest::prop_assert!(matches!(ev.kind, event_kind::DHCP | event_kind::DHCP_HOP));
                }
                Some(Observed::Arp { .. }) => proptest::prop_assert_eq!(ev.kind, event_kind::ARP),
                None => proptest::prop_assert!(!matches!(
                    ev.kind,
                    event_kind::DHCP
                        | event_kind::ARP
                        | event_kind::DHCP_DEQUEUED
                        | event_kind::DHCP_DROPPED
                        | event_kind::DHCP_HOP
                )),
            }
        }

        /// A DHCP record with copied options: any option bytes are walked
        /// without panic, and flags only ever add up.
        #[test]
        fn any_copied_options_decode_without_panic(
            options in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            claimed in 0u16..600,
            more in 0u8..2,
        ) {
            use tracer_common::dhcp_options::{EventWithOptions, OPTIONS_CAPTURE};
            let mut record = EventWithOptions::default();
            record.event.kind = event_kind::DHCP;
            let n = options.len().min(OPTIONS_CAPTURE);
            record.options.bytes[..n].copy_from_slice(&options[..n]);
            record.options.len = claimed;
            record.options.more = more;
            // SAFETY: EventWithOptions is repr(C) plain data.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&record as *const EventWithOptions).cast::<u8>(),
                    std::mem::size_of::<EventWithOptions>(),
                )
            };
            let ev = crate::kernel::loader::decode_event(bytes).expect("a DHCP record");
            let _ = interpret(&ev, |r| format!("reason{r}"));
        }
    }
}
