//! The every-poll interface dump (RTM_GETLINK), read with a plain netlink
//! socket and parsed by hand for the five attributes hvnet uses.
//!
//! Why not the rtnetlink crate here: at 2000 taps its full parse of every
//! attribute (per-family configuration, link info) was 89 % of the idle
//! agent's CPU, most of it formatting error contexts for attributes hvnet
//! never reads. Link *events* still come through rtnetlink (they are rare).
//!
//! Between full dumps the agent asks only for the counters (RTM_GETSTATS
//! with just the 64-bit link stats): the kernel then skips building every
//! link's attributes (its per-family configuration dominated the rest).

use std::{collections::HashMap, io};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::interfaces::links::{LinkInfo, NetdevStats};

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWSTATS: u16 = 92;
const RTM_GETSTATS: u16 = 94;
/// struct if_stats_msg: family, pad, pad, ifindex, filter_mask.
const IF_STATS_MSG_LEN: usize = 12;
/// IFLA_STATS_LINK_64 as an attribute and as a filter bit.
const IFLA_STATS_LINK_64: u16 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_TXQLEN: u16 = 13;
const IFLA_OPERSTATE: u16 = 16;
const IFLA_STATS64: u16 = 23;
/// Attribute type bits that are flags, not the type (nested, byte order).
const NLA_TYPE_MASK: u16 = 0x3fff;
const IFF_UP: u32 = 0x1;
const IFF_LOWER_UP: u32 = 0x1_0000;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// RFC 2863 operational states as `ip link` names them (IF_OPER_*).
fn oper_state_name(state: u8) -> String {
    match state {
        0 => "unknown".into(),
        1 => "notpresent".into(),
        2 => "down".into(),
        3 => "lowerlayerdown".into(),
        4 => "testing".into(),
        5 => "dormant".into(),
        6 => "up".into(),
        other => format!("other({other})"),
    }
}

/// struct rtnl_link_stats64: rx_packets, tx_packets, rx_bytes, tx_bytes,
/// rx_errors, tx_errors, rx_dropped, tx_dropped, ...
fn link_stats64(value: &[u8]) -> Option<NetdevStats> {
    Some(NetdevStats {
        rx_packets: u64_at(value, 0)?,
        tx_packets: u64_at(value, 8)?,
        rx_dropped: u64_at(value, 48)?,
        tx_dropped: u64_at(value, 56)?,
    })
}

/// One RTM_NEWSTATS message body: (ifindex, counters).
fn parse_stats(body: &[u8]) -> Option<(u32, NetdevStats)> {
    let ifindex = u32_at(body, 4)?;
    let mut at = IF_STATS_MSG_LEN;
    while at + 4 <= body.len() {
        let len = usize::from(u16_at(body, at)?);
        let kind = u16_at(body, at + 2)? & NLA_TYPE_MASK;
        if len < 4 || at + len > body.len() {
            return None;
        }
        if kind == IFLA_STATS_LINK_64 {
            return Some((ifindex, link_stats64(&body[at + 4..at + len])?));
        }
        at += align4(len);
    }
    None
}

/// One RTM_NEWLINK message body (after the netlink header); None if it has
/// no name or is cut short.
fn parse_link(body: &[u8]) -> Option<LinkInfo> {
    let ifindex = u32_at(body, 4)?;
    let flags = u32_at(body, 8)?;
    let mut info = LinkInfo {
        ifindex,
        oper_state: oper_state_name(0),
        admin_up: flags & IFF_UP != 0,
        carrier: flags & IFF_LOWER_UP != 0,
        ..Default::default()
    };
    let mut name = None;
    let mut peer_elsewhere = false;
    let mut at = IFINFOMSG_LEN;
    while at + 4 <= body.len() {
        let len = usize::from(u16_at(body, at)?);
        let kind = u16_at(body, at + 2)? & NLA_TYPE_MASK;
        if len < 4 || at + len > body.len() {
            break;
        }
        let value = &body[at + 4..at + len];
        match kind {
            IFLA_IFNAME => {
                let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                name = Some(String::from_utf8_lossy(&value[..end]).into_owned());
            }
            IFLA_ADDRESS => info.mac = <[u8; 6]>::try_from(value).ok(),
            IFLA_TXQLEN => info.txqueuelen = u32_at(value, 0).unwrap_or(0),
            IFLA_OPERSTATE => {
                info.oper_state = oper_state_name(value.first().copied().unwrap_or(0))
            }
            IFLA_STATS64 => info.stats = Some(link_stats64(value)?),
            IFLA_MASTER => info.master = u32_at(value, 0).filter(|m| *m != 0),
            IFLA_LINK => info.link = u32_at(value, 0).filter(|l| *l != 0),
            IFLA_LINK_NETNSID => peer_elsewhere = true,
            IFLA_LINKINFO => info.kind = link_kind(value).unwrap_or_default(),
            _ => {}
        }
        at += align4(len);
    }
    // A peer in another namespace has an ifindex that means nothing here.
    if peer_elsewhere || info.link == Some(ifindex) {
        info.link = None;
    }
    info.name = name?;
    Some(info)
}

/// IFLA_INFO_KIND inside a nested IFLA_LINKINFO.
fn link_kind(nested: &[u8]) -> Option<String> {
    let mut at = 0;
    while at + 4 <= nested.len() {
        let len = usize::from(u16_at(nested, at)?);
        let kind = u16_at(nested, at + 2)? & NLA_TYPE_MASK;
        if len < 4 || at + len > nested.len() {
            return None;
        }
        if kind == IFLA_INFO_KIND {
            let value = &nested[at + 4..at + len];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return Some(String::from_utf8_lossy(&value[..end]).into_owned());
        }
        at += align4(len);
    }
    None
}

/// Feeds each message of one dump datagram to `each` (type, body); true
/// once the dump is done.
fn parse_datagram(mut data: &[u8], each: &mut impl FnMut(u16, &[u8])) -> io::Result<bool> {
    while data.len() >= NLMSG_HDRLEN {
        let len = u32_at(data, 0).unwrap_or(0) as usize;
        let kind = u16_at(data, 4).unwrap_or(0);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(io::Error::other("truncated netlink message in a dump"));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(data, NLMSG_HDRLEN).map_or(0, |e| e as i32);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            _ => each(kind, &data[NLMSG_HDRLEN..len]),
        }
        data = &data[align4(len).min(data.len())..];
    }
    Ok(false)
}

/// Sends one dump request (`kind` with the family header `body`) and feeds
/// every answer message to `each`.
fn request_dump(kind: u16, body: &[u8], each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    request(kind, NLM_F_DUMP, body, each)
}

/// Sends one request and feeds every answer message to `each`, until the
/// dump ends or (not a dump) the one answer came.
fn request(kind: u16, flags: u16, body: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = vec![0u8; NLMSG_HDRLEN];
    let request_len = (NLMSG_HDRLEN + body.len()) as u32;
    request[0..4].copy_from_slice(&request_len.to_ne_bytes());
    request[4..6].copy_from_slice(&kind.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(body);
    socket.send(&request, 0)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        if n == 0 {
            return Err(io::Error::other(
                "a netlink answer ended without NLMSG_DONE",
            ));
        }
        if parse_datagram(&buf[..n], &mut each)? || flags & NLM_F_DUMP == 0 {
            return Ok(());
        }
    }
}

/// One interface by ifindex; None if it no longer exists.
pub fn get(ifindex: u32) -> io::Result<Option<LinkInfo>> {
    let mut body = [0u8; IFINFOMSG_LEN];
    body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    let mut found = None;
    match request(RTM_GETLINK, 0, &body, |kind, msg| {
        if kind == RTM_NEWLINK {
            found = parse_link(msg);
        }
    }) {
        Ok(()) => Ok(found),
        Err(err) if err.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Every interface of this netns with its counters (blocking: call off the
/// async workers).
pub fn dump() -> io::Result<Vec<LinkInfo>> {
    let mut links = Vec::new();
    request_dump(RTM_GETLINK, &[0u8; IFINFOMSG_LEN], |kind, body| {
        if kind == RTM_NEWLINK {
            links.extend(parse_link(body));
        }
    })?;
    Ok(links)
}

/// Only the counters of every interface, by ifindex (RTM_GETSTATS).
pub fn dump_stats() -> io::Result<HashMap<u32, NetdevStats>> {
    let mut request = [0u8; IF_STATS_MSG_LEN];
    let filter_mask: u32 = 1 << (IFLA_STATS_LINK_64 - 1);
    request[8..12].copy_from_slice(&filter_mask.to_ne_bytes());
    let mut stats = HashMap::new();
    request_dump(RTM_GETSTATS, &request, |kind, body| {
        if kind == RTM_NEWSTATS {
            stats.extend(parse_stats(body));
        }
    })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    fn newlink(ifindex: u32, flags: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        body[8..12].copy_from_slice(&flags.to_ne_bytes());
        for a in attrs {
            body.extend_from_slice(a);
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn master_peer_and_kind_are_read_and_a_peer_in_another_netns_is_not() {
        let info = attr(0x8000 | IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"veth\0"));
        let port = newlink(
            7,
            0,
            &[
                attr(IFLA_IFNAME, b"qvb1\0"),
                attr(IFLA_MASTER, &4u32.to_ne_bytes()),
                attr(IFLA_LINK, &8u32.to_ne_bytes()),
                info.clone(),
            ],
        );
        let link = parse_link(&port[NLMSG_HDRLEN..]).expect("parsed");
        assert_eq!(
            (link.master, link.link, link.kind.as_str()),
            (Some(4), Some(8), "veth")
        );
        let elsewhere = newlink(
            9,
            0,
            &[
                attr(IFLA_IFNAME, b"eth0\0"),
                attr(IFLA_LINK, &2u32.to_ne_bytes()),
                attr(IFLA_LINK_NETNSID, &0u32.to_ne_bytes()),
                info,
            ],
        );
        let link = parse_link(&elsewhere[NLMSG_HDRLEN..]).expect("parsed");
        assert_eq!((link.master, link.link), (None, None));
    }

    #[test]
    fn a_dump_datagram_gives_name_mac_state_queue_and_counters() {
        let mut stats = vec![0u8; 200];
        stats[0..8].copy_from_slice(&7u64.to_ne_bytes());
        stats[8..16].copy_from_slice(&9u64.to_ne_bytes());
        stats[56..64].copy_from_slice(&3u64.to_ne_bytes());
        let mut data = newlink(
            5,
            IFF_UP | IFF_LOWER_UP,
            &[
                attr(IFLA_IFNAME, b"tap0\0"),
                attr(IFLA_ADDRESS, &[0xfe, 0x54, 0, 1, 2, 3]),
                attr(IFLA_OPERSTATE, &[6]),
                attr(IFLA_TXQLEN, &500u32.to_ne_bytes()),
                attr(0x8000 | 26, &[0; 8]),
                attr(IFLA_STATS64, &stats),
            ],
        );
        data.extend(newlink(6, 0, &[attr(IFLA_ADDRESS, &[1; 6])]));
        let mut done = newlink(0, 0, &[]);
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        data.extend(done);
        let mut links = Vec::new();
        let done = parse_datagram(&data, &mut |kind, body| {
            if kind == RTM_NEWLINK {
                links.extend(parse_link(body));
            }
        })
        .unwrap();
        assert!(done);
        assert_eq!(links.len(), 1, "a link without a name is skipped");
        let tap = &links[0];
        assert_eq!((tap.ifindex, tap.name.as_str()), (5, "tap0"));
        assert_eq!(tap.mac_string(), "fe:54:00:01:02:03");
        assert_eq!((tap.oper_state.as_str(), tap.txqueuelen), ("up", 500));
        assert!(tap.admin_up && tap.carrier);
        assert_eq!(
            tap.stats,
            Some(NetdevStats {
                rx_packets: 7,
                tx_packets: 9,
                rx_dropped: 0,
                tx_dropped: 3
            })
        );
    }

    #[test]
    fn this_netns_answers_both_dumps_for_the_same_links() {
        // Unprivileged: reading links and their counters needs no capability.
        let links = dump().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo listed");
        assert!(lo.stats.is_some());
        let stats = dump_stats().unwrap();
        for link in &links {
            assert!(
                stats.contains_key(&link.ifindex),
                "{} has no stats",
                link.name
            );
        }
    }

    #[test]
    fn a_stats_message_gives_the_counters_of_its_ifindex() {
        let mut stats = vec![0u8; 200];
        stats[8..16].copy_from_slice(&11u64.to_ne_bytes());
        stats[56..64].copy_from_slice(&2u64.to_ne_bytes());
        let mut body = vec![0u8; IF_STATS_MSG_LEN];
        body[4..8].copy_from_slice(&42u32.to_ne_bytes());
        body.extend(attr(IFLA_STATS_LINK_64, &stats));
        let (ifindex, got) = parse_stats(&body).unwrap();
        assert_eq!((ifindex, got.tx_packets, got.tx_dropped), (42, 11, 2));
        assert!(parse_stats(&body[..IF_STATS_MSG_LEN]).is_none());
    }

    #[test]
    fn errors_and_truncation_are_errors_not_panics() {
        let mut err = newlink(0, 0, &[]);
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert!(parse_datagram(&err, &mut |_, _| {}).is_err());
        let msg = newlink(5, 0, &[attr(IFLA_IFNAME, b"tap0\0")]);
        assert!(parse_datagram(&msg[..msg.len() - 3], &mut |_, _| {}).is_err());
        // An attribute claiming more than the message: the link keeps what came before.
        let mut body = newlink(5, 0, &[attr(IFLA_IFNAME, b"tap0\0")]);
        body.extend_from_slice(&[0xff, 0x00, 0x01, 0x00]);
        let len = body.len() as u32;
        body[0..4].copy_from_slice(&len.to_ne_bytes());
        let mut links = Vec::new();
        let done = parse_datagram(&body, &mut |_, b| links.extend(parse_link(b))).unwrap();
        assert!(!done);
        assert_eq!(links[0].name, "tap0");
    }
}
