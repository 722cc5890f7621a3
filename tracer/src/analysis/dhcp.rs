//! DHCP transactions per VM, from the kernel's DHCP events (pure logic).
//!
//! Clients differ (see ENVIRONMENT notes): udhcpc keeps the xid of its first
//! DISCOVER for every later REQUEST, renewals included; ISC dhclient starts
//! new xids and INIT-REBOOTs after a restart. So a transaction is one
//! exchange in time (started by a client message, ended by a delivered
//! ACK/NAK or by silence), not an xid; and a retry is "the client sent the
//! same kind of message again without having received an answer".

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use tracer_common::parse_flag;

use crate::analysis::stall::VmState;

/// Replies not dequeued this long after being offered count as undelivered.
pub const DEFAULT_UNDELIVERED_AFTER: f64 = 3.0;
/// A transaction with no message for this long is concluded (clients
/// retry every few seconds while they still wait for an answer).
const TRANSACTION_IDLE: f64 = 15.0;
/// Replies still undequeued after this long are forgotten (VMM gone).
const PENDING_TTL: f64 = 120.0;
/// Repeats further apart than this are a new attempt, not a retry.
const RETRY_WINDOW: f64 = 300.0;
/// A client asking again this soon after its ACK was dequeued never took
/// the ACK in (clients retransmit every few seconds; the next renewal of a
/// granted lease comes at T1, half the lease, minutes later).
const REASK_WINDOW: f64 = 30.0;
/// Replies waiting for a dequeue/drop verdict, per VM (a flood cannot grow it).
const MAX_PENDING_REPLIES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
    Other,
}

impl MessageType {
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Discover => "discover",
            Self::Offer => "offer",
            Self::Request => "request",
            Self::Decline => "decline",
            Self::Ack => "ack",
            Self::Nak => "nak",
            Self::Release => "release",
            Self::Inform => "inform",
            Self::Other => "other",
        }
    }

    pub const ALL: [MessageType; 8] = [
        Self::Discover,
        Self::Offer,
        Self::Request,
        Self::Decline,
        Self::Ack,
        Self::Nak,
        Self::Release,
        Self::Inform,
    ];
}

/// The client's state as its messages reveal it (RFC 2131 section 4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ClientState {
    /// DISCOVER: looking for a server.
    Selecting,
    /// REQUEST for an offered address (server id set, no ciaddr).
    Requesting,
    /// REQUEST with ciaddr, unicast to the server (T1).
    Renewing,
    /// REQUEST with ciaddr, broadcast to any server (T2).
    Rebinding,
    /// REQUEST for a remembered address (no ciaddr, no server id): INIT-REBOOT.
    Rebooting,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Selecting => "selecting",
            Self::Requesting => "requesting",
            Self::Renewing => "renewing",
            Self::Rebinding => "rebinding",
            Self::Rebooting => "rebooting",
        }
    }

    pub const ALL: [ClientState; 5] = [
        Self::Selecting,
        Self::Requesting,
        Self::Renewing,
        Self::Rebinding,
        Self::Rebooting,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The server's answer reached the VM (the VMM dequeued it).
    Delivered,
    /// The answer was sent but sat in the VM's stalled queue or died there.
    ReplyUndelivered,
    /// The answer was dropped on the tap for another reason.
    ReplyDropped,
    /// The server never answered: a server-side problem, not the VM.
    NoReply,
    /// The server answered NAK (delivered).
    Nak,
    /// The answer reached the node (seen on a bridge or uplink) but never
    /// the VM's tap: lost on the node in between.
    ReplyLostOnNode,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::ReplyUndelivered => "reply_undelivered",
            Self::ReplyDropped => "reply_dropped",
            Self::NoReply => "no_reply",
            Self::Nak => "nak",
            Self::ReplyLostOnNode => "reply_lost_on_node",
        }
    }

    pub const ALL: [Verdict; 6] = [
        Self::Delivered,
        Self::ReplyUndelivered,
        Self::ReplyDropped,
        Self::NoReply,
        Self::Nak,
        Self::ReplyLostOnNode,
    ];
}

/// How one DHCP observation reached the tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Crossed the tap's tc hook; `toward_vm` is its direction.
    OnTap { toward_vm: bool },
    /// Read from the tap by the VMM.
    Dequeued,
    /// Dropped on the tap (kernel drop reason name).
    Dropped { reason: String },
    /// Crossed a hop on the node (bridge, bridge port, uplink).
    OnHop { sighting: HopSighting },
    /// Dropped on a hop (kernel drop reason name).
    DroppedOnHop { reason: String, hop: String },
}

/// Where on the node a DHCP message was seen besides the tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HopSighting {
    pub hop: String,
    /// 802.1Q/802.1ad VLAN id, 0 if untagged.
    pub vlan: u16,
    /// "vxlan" or "geneve" when the message was tunnelled, else empty.
    pub tunnel: String,
    pub vni: u32,
}

impl HopSighting {
    /// "eth0 (VLAN 100)", "eth1 (VXLAN 42)", "br0".
    pub fn describe(&self) -> String {
        let mut tags = Vec::new();
        if self.vlan != 0 {
            tags.push(format!("VLAN {}", self.vlan));
        }
        if !self.tunnel.is_empty() {
            tags.push(format!("{} {}", self.tunnel.to_uppercase(), self.vni));
        }
        if tags.is_empty() {
            self.hop.clone()
        } else {
            format!("{} ({})", self.hop, tags.join(", "))
        }
    }
}

/// One DHCP message as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpMessage {
    pub seen: Seen,
    /// Option 53 (None when the kernel did not parse options).
    pub msg_type: Option<MessageType>,
    pub op: u8,
    pub xid: u32,
    pub ciaddr: [u8; 4],
    pub yiaddr: [u8; 4],
    pub server_id: [u8; 4],
    pub requested_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub lease_secs: u32,
    pub chaddr: [u8; 6],
}

pub fn ip(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

fn is_zero(a: [u8; 4]) -> bool {
    a == [0; 4]
}

/// Classifies a client message's state.
pub fn client_state(m: &DhcpMessage) -> Option<ClientState> {
    match m.msg_type? {
        MessageType::Discover => Some(ClientState::Selecting),
        MessageType::Request if !is_zero(m.ciaddr) => {
            if m.dst_ip == [255; 4] {
                Some(ClientState::Rebinding)
            } else {
                Some(ClientState::Renewing)
            }
        }
        MessageType::Request if !is_zero(m.server_id) => Some(ClientState::Requesting),
        MessageType::Request => Some(ClientState::Rebooting),
        _ => None,
    }
}

/// Something worth a line in the VM's timeline and the event stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DhcpNote {
    ClientMessage {
        message: MessageType,
        state: Option<ClientState>,
        xid: u32,
        to: String,
        retry: u32,
        during_stall: bool,
    },
    ReplyQueued {
        message: MessageType,
        xid: u32,
        yiaddr: String,
        /// The hops that saw it before the tap, in order.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        path: Vec<String>,
    },
    ReplyDelivered {
        message: MessageType,
        xid: u32,
        after_secs: f64,
        late: bool,
    },
    ReplyUndelivered {
        message: MessageType,
        xid: u32,
        waiting_secs: f64,
        vm_state: VmState,
    },
    ReplyDropped {
        message: MessageType,
        xid: u32,
        reason: String,
        vm_state: VmState,
    },
    /// A reply seen on the node's hops that never reached the tap.
    ReplyLostOnNode {
        message: MessageType,
        xid: u32,
        /// The hops that saw it, in order ("eth0 (VLAN 100)", "br0").
        path: Vec<String>,
        /// Where the kernel dropped it and why, when it said so: on a hop
        /// (`at_hop`), or with the tap as its device before the tap's tc
        /// hook saw it.
        dropped_at: Option<String>,
        at_hop: bool,
        reason: Option<String>,
    },
    /// The VMM dequeued the ACK, yet the client asked again: the guest
    /// never processed it (its RX ring is not being drained inside the VM).
    ReplyUnprocessed {
        xid: u32,
        after_secs: f64,
    },
    TransactionDone {
        id: u64,
        xid: u32,
        verdict: Verdict,
        attempts: u32,
        /// The hops the client's request was seen on (it left the node there).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        request_path: Vec<String>,
    },
    LeaseGranted {
        address: String,
        secs: u32,
        server: String,
    },
    LeaseExpired {
        address: String,
    },
    Released {
        address: String,
    },
}

#[derive(Debug, Clone)]
struct PendingReply {
    message: MessageType,
    xid: u32,
    chaddr: [u8; 6],
    offered_at: f64,
    yiaddr: [u8; 4],
    server_id: [u8; 4],
    lease_secs: u32,
    reported_undelivered: bool,
    /// The hops that saw it before the tap.
    path: Vec<HopSighting>,
}

fn add_to_path(path: &mut Vec<HopSighting>, sighting: &HopSighting) {
    if path.len() < MAX_PATH && !path.iter().any(|h| h.hop == sighting.hop) {
        path.push(sighting.clone());
    }
}

fn describe_path(path: &[HopSighting]) -> Vec<String> {
    path.iter().map(HopSighting::describe).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyFate {
    None,
    Undelivered,
    LostOnNode,
    Dropped,
}

/// A reply seen on the node's hops, not yet on the tap.
#[derive(Debug, Clone)]
struct HopReply {
    message: MessageType,
    xid: u32,
    chaddr: [u8; 6],
    first_at: f64,
    path: Vec<HopSighting>,
}

/// Hops remembered per message (a path longer than this is a loop).
const MAX_PATH: usize = 8;
/// A hop sighting this long after the tap saw the same reply is a copy
/// going elsewhere (a broadcast reply the bridge floods to every port,
/// the uplink's egress included), not a reply on its way to the tap.
const SEEN_ON_TAP_WINDOW: f64 = 10.0;

#[derive(Debug, Clone)]
struct Transaction {
    id: u64,
    xid: u32,
    last_activity: f64,
    attempts: u32,
    worst_fate: ReplyFate,
    request_path: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct LastClientMessage {
    message: MessageType,
    state: Option<ClientState>,
    at: f64,
    answered: bool,
}

/// The last ACK the VMM dequeued, and the lease the VM held before it (the
/// one it still holds if it turns out never to have processed the ACK).
#[derive(Debug, Clone)]
struct DequeuedAck {
    xid: u32,
    at: f64,
    /// The client state of the request it answered.
    answered: Option<ClientState>,
    lease_before: Option<Lease>,
}

/// The lease as the VM knows it: from the last ACK that reached it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lease {
    pub address: String,
    pub server: String,
    pub granted_at: f64,
    pub secs: u32,
    pub expired: bool,
}

impl Lease {
    pub fn remaining(&self, now: f64) -> f64 {
        (self.granted_at + f64::from(self.secs) - now).max(0.0)
    }
}

/// Counters exported per VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DhcpCounters {
    /// [to_vm, from_vm] x MessageType::ALL
    pub packets: [[u64; 8]; 2],
    pub retries: [u64; 5],
    pub retries_during_stall: u64,
    pub replies_undelivered: u64,
    /// ACKs the VMM dequeued that the client then asked for again.
    pub replies_unprocessed: u64,
    /// Replies seen on the node's hops that never reached the tap.
    pub replies_lost_on_node: u64,
    pub transactions: [u64; 6],
    pub malformed: u64,
}

pub struct DhcpTracker {
    undelivered_after: f64,
    pending: VecDeque<PendingReply>,
    on_hops: VecDeque<HopReply>,
    /// Replies the tap saw lately: (xid, chaddr, message, when).
    seen_on_tap: VecDeque<(u32, [u8; 6], MessageType, f64)>,
    /// The client's MAC, from its own messages on the tap: how replies
    /// seen on shared hops are told apart per VM.
    client_mac: Option<[u8; 6]>,
    /// The tap's name, for "dropped before tap3".
    tap: String,
    current: Option<Transaction>,
    next_id: u64,
    last_client: Option<LastClientMessage>,
    retry_streak: u32,
    lease: Option<Lease>,
    last_ack: Option<DequeuedAck>,
    last_verdict: Option<Verdict>,
    counters: DhcpCounters,
}

fn type_index(t: MessageType) -> Option<usize> {
    MessageType::ALL.iter().position(|x| *x == t)
}

impl DhcpTracker {
    pub fn new(undelivered_after: f64) -> Self {
        Self {
            undelivered_after,
            pending: VecDeque::new(),
            on_hops: VecDeque::new(),
            seen_on_tap: VecDeque::new(),
            client_mac: None,
            tap: "the tap".to_owned(),
            current: None,
            next_id: 1,
            last_client: None,
            retry_streak: 0,
            lease: None,
            last_ack: None,
            last_verdict: None,
            counters: DhcpCounters::default(),
        }
    }

    /// Names the tap in what the tracker says.
    pub fn for_tap(mut self, tap: &str) -> Self {
        self.tap = tap.to_owned();
        self
    }

    pub fn counters(&self) -> &DhcpCounters {
        &self.counters
    }
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }
    pub fn last_verdict(&self) -> Option<Verdict> {
        self.last_verdict
    }
    pub fn pending_replies(&self) -> usize {
        self.pending.len()
    }
    /// Replies seen on the node's hops, not (yet) on the tap.
    pub fn replies_on_hops(&self) -> usize {
        self.on_hops.len()
    }
    /// The MAC the VM's DHCP client uses (None before its first message).
    pub fn client_mac(&self) -> Option<[u8; 6]> {
        self.client_mac
    }

    pub fn note_malformed(&mut self) {
        self.counters.malformed += 1;
    }

    /// Feeds one message; `vm_state` is the stall detector's view now.
    pub fn observe(&mut self, m: &DhcpMessage, now: f64, vm_state: VmState) -> Vec<DhcpNote> {
        let mut notes = Vec::new();
        match &m.seen {
            Seen::OnTap { toward_vm: false } if m.op == 1 => {
                self.client_message(m, now, vm_state, &mut notes)
            }
            Seen::OnTap { toward_vm: true } if m.op == 2 => self.server_reply(m, now, &mut notes),
            Seen::OnTap { toward_vm } => {
                // A relay or a misdirected message: count it, nothing more.
                if let Some(i) = m.msg_type.and_then(type_index) {
                    self.counters.packets[usize::from(!*toward_vm)][i] += 1;
                }
            }
            Seen::Dequeued => self.reply_dequeued(m, now, &mut notes),
            Seen::Dropped { reason } => self.reply_dropped(m, reason, now, vm_state, &mut notes),
            Seen::OnHop { sighting } => self.seen_on_hop(m, sighting, now),
            Seen::DroppedOnHop { reason, hop } => {
                let dropped = Some((hop.clone(), reason.clone()));
                self.lost_on_node(m, dropped, true, now, vm_state, &mut notes)
            }
        }
        notes
    }

    /// A message on a hop: a request's way out, or a reply on its way in.
    fn seen_on_hop(&mut self, m: &DhcpMessage, sighting: &HopSighting, now: f64) {
        if m.op == 1 {
            if let Some(t) = self.current.as_mut().filter(|t| t.xid == m.xid) {
                let hop = sighting.describe();
                if t.request_path.len() < MAX_PATH && !t.request_path.contains(&hop) {
                    t.request_path.push(hop);
                }
            }
            return;
        }
        let Some(message) = m.msg_type else { return };
        // Already on the tap (events from two CPUs can cross): add the hop.
        if let Some(reply) = self.find_pending(m) {
            add_to_path(&mut reply.path, sighting);
            return;
        }
        if let Some(reply) = self
            .on_hops
            .iter_mut()
            .find(|r| r.xid == m.xid && r.chaddr == m.chaddr && r.message == message)
        {
            add_to_path(&mut reply.path, sighting);
            return;
        }
        let copy_of_delivered = self.seen_on_tap.iter().any(|(xid, chaddr, msg, at)| {
            *xid == m.xid && *chaddr == m.chaddr && *msg == message && now - at < SEEN_ON_TAP_WINDOW
        });
        if copy_of_delivered {
            return;
        }
        if self.on_hops.len() >= MAX_PENDING_REPLIES {
            self.on_hops.pop_front();
        }
        if let Some(t) = self.current.as_mut().filter(|t| t.xid == m.xid) {
            t.last_activity = now;
        }
        self.on_hops.push_back(HopReply {
            message,
            xid: m.xid,
            chaddr: m.chaddr,
            first_at: now,
            path: vec![sighting.clone()],
        });
    }

    /// A reply the node's hops saw is gone before the tap: dropped (where
    /// and why, when the kernel said) or never seen there in time.
    #[allow(clippy::too_many_arguments)]
    fn lost_on_node(
        &mut self,
        m: &DhcpMessage,
        dropped: Option<(String, String)>,
        at_hop: bool,
        now: f64,
        vm_state: VmState,
        notes: &mut Vec<DhcpNote>,
    ) {
        let at = self
            .on_hops
            .iter()
            .position(|r| r.xid == m.xid && r.chaddr == m.chaddr);
        let reply = match at.and_then(|at| self.on_hops.remove(at)) {
            Some(reply) => reply,
            // Dropped where the hop's tc program had not seen it yet (at
            // the hop's own ingress): the drop is the sighting.
            None => match (&dropped, m.op) {
                (Some((hop, _)), 2) => HopReply {
                    message: m.msg_type.unwrap_or(MessageType::Other),
                    xid: m.xid,
                    chaddr: m.chaddr,
                    first_at: now,
                    path: vec![HopSighting {
                        hop: hop.clone(),
                        vlan: 0,
                        tunnel: String::new(),
                        vni: 0,
                    }],
                },
                _ => return,
            },
        };
        self.record_lost(reply, dropped, at_hop, now, vm_state, notes);
    }

    /// A reply that did not reach the tap. Lost on the node, unless the VM
    /// is the cause: the host could not resolve the VM's address (a
    /// `neigh_*` drop: the VM does not answer ARP, which a stalled VM
    /// cannot), or the VM is stalled and the kernel named no other reason
    /// (the reply waits in the neighbour queue). A rule that drops it
    /// (netfilter_drop, ...) is the node's, stalled VM or not.
    fn record_lost(
        &mut self,
        reply: HopReply,
        dropped: Option<(String, String)>,
        at_hop: bool,
        now: f64,
        vm_state: VmState,
        notes: &mut Vec<DhcpNote>,
    ) {
        let stalled = vm_state == VmState::RxStalled;
        let unresolved = dropped
            .as_ref()
            .is_some_and(|(_, reason)| reason.starts_with("neigh"));
        if unresolved || (stalled && dropped.is_none()) {
            self.counters.replies_undelivered += 1;
            let fate = if stalled {
                ReplyFate::Undelivered
            } else {
                ReplyFate::Dropped
            };
            worsen_fate(&mut self.current, reply.xid, fate);
            notes.push(match dropped {
                Some((_, reason)) => DhcpNote::ReplyDropped {
                    message: reply.message,
                    xid: reply.xid,
                    reason,
                    vm_state,
                },
                None => DhcpNote::ReplyUndelivered {
                    message: reply.message,
                    xid: reply.xid,
                    waiting_secs: now - reply.first_at,
                    vm_state,
                },
            });
            return;
        }
        self.counters.replies_lost_on_node += 1;
        worsen_fate(&mut self.current, reply.xid, ReplyFate::LostOnNode);
        let (dropped_at, reason) = match dropped {
            Some((at, reason)) => (Some(at), Some(reason)),
            None => (None, None),
        };
        notes.push(DhcpNote::ReplyLostOnNode {
            message: reply.message,
            xid: reply.xid,
            path: describe_path(&reply.path),
            dropped_at,
            at_hop,
            reason,
        });
    }

    fn client_message(
        &mut self,
        m: &DhcpMessage,
        now: f64,
        vm_state: VmState,
        notes: &mut Vec<DhcpNote>,
    ) {
        let Some(message) = m.msg_type else { return };
        if let Some(i) = type_index(message) {
            self.counters.packets[1][i] += 1;
        }
        self.client_mac = Some(m.chaddr);
        let state = client_state(m);
        let unprocessed = self.reask_after_dequeued_ack(message, state, m.xid, now, notes);
        let is_retry = unprocessed
            || self.last_client.is_some_and(|last| {
                // Renewing -> rebinding (unicast gave up, now broadcast) is the
                // same request retried; a DISCOVER after that is a new start.
                !last.answered && last.message == message && now - last.at < RETRY_WINDOW
            });
        let during_stall = vm_state == VmState::RxStalled;
        if is_retry {
            self.retry_streak += 1;
            // Counted by the client state they reveal (DISCOVER, REQUEST);
            // a repeated DECLINE or INFORM reveals none and is counted in
            // neither total, so retries during stalls stay a subset of
            // retries (a property test found them apart).
            if let Some(s) = state {
                self.counters.retries[s as usize] += 1;
                if during_stall {
                    self.counters.retries_during_stall += 1;
                }
            }
        } else {
            self.retry_streak = 0;
        }
        self.last_client = Some(LastClientMessage {
            message,
            state,
            at: now,
            answered: false,
        });

        // Transactions: a new exchange starts with a new xid or after the
        // previous one ended.
        let continues = self.current.as_ref().is_some_and(|t| t.xid == m.xid);
        if !continues {
            self.conclude(None, notes);
            self.current = Some(Transaction {
                id: self.next_id,
                xid: m.xid,
                last_activity: now,
                attempts: 0,
                worst_fate: ReplyFate::None,
                request_path: Vec::new(),
            });
            self.next_id += 1;
        }
        if let Some(t) = self.current.as_mut() {
            t.attempts += 1;
            t.last_activity = now;
        }
        match message {
            MessageType::Release => {
                if let Some(lease) = self.lease.take() {
                    notes.push(DhcpNote::Released {
                        address: lease.address,
                    });
                }
            }
            MessageType::Decline | MessageType::Inform => {}
            _ => {}
        }
        notes.push(DhcpNote::ClientMessage {
            message,
            state,
            xid: m.xid,
            to: ip(m.dst_ip),
            retry: if is_retry { self.retry_streak } else { 0 },
            during_stall,
        });
    }

    /// A REQUEST soon after the VMM dequeued the ACK to the last one: the
    /// ACK reached the VM's virtio ring but the guest never processed it.
    /// The lease it would have granted is taken back.
    fn reask_after_dequeued_ack(
        &mut self,
        message: MessageType,
        state: Option<ClientState>,
        xid: u32,
        now: f64,
        notes: &mut Vec<DhcpNote>,
    ) -> bool {
        if message != MessageType::Request {
            // A DISCOVER, DECLINE or RELEASE after an ACK is the client's choice.
            self.last_ack = None;
            return false;
        }
        let Some(ack) = self.last_ack.take() else {
            return false;
        };
        // Retransmissions keep the xid (udhcpc always, dhclient within a
        // state); a restarted client starts a new one: that is no re-ask.
        let granted = self.lease.as_ref().map_or(0.0, |l| f64::from(l.secs));
        let window = REASK_WINDOW.min(granted / 4.0);
        if ack.xid != xid || now - ack.at >= window {
            return false;
        }
        // Only a client that is still where it was can have missed the ACK.
        // One that went on to renew took it in and is bound; a unicast
        // renewal right after a renewal is an operator forcing one (udhcpc
        // SIGUSR1), not a retransmission: never page on that.
        use ClientState::{Rebinding, Rebooting, Renewing, Requesting};
        let still_asking = matches!(
            (ack.answered, state),
            (Some(Requesting), Some(Requesting))
                | (Some(Rebooting), Some(Rebooting))
                | (Some(Renewing), Some(Rebinding))
                | (Some(Rebinding), Some(Rebinding))
        );
        if !still_asking {
            return false;
        }
        self.counters.replies_unprocessed += 1;
        self.lease = ack.lease_before;
        notes.push(DhcpNote::ReplyUnprocessed {
            xid: ack.xid,
            after_secs: now - ack.at,
        });
        true
    }

    fn server_reply(&mut self, m: &DhcpMessage, now: f64, notes: &mut Vec<DhcpNote>) {
        let Some(message) = m.msg_type else { return };
        if let Some(i) = type_index(message) {
            self.counters.packets[0][i] += 1;
        }
        if self.pending.len() >= MAX_PENDING_REPLIES {
            self.pending.pop_front();
        }
        let path = self
            .on_hops
            .iter()
            .position(|r| r.xid == m.xid && r.chaddr == m.chaddr && r.message == message)
            .and_then(|at| self.on_hops.remove(at))
            .map(|r| r.path)
            .unwrap_or_default();
        let described = describe_path(&path);
        if self.seen_on_tap.len() >= MAX_PENDING_REPLIES {
            self.seen_on_tap.pop_front();
        }
        self.seen_on_tap.push_back((m.xid, m.chaddr, message, now));
        self.pending.push_back(PendingReply {
            message,
            xid: m.xid,
            chaddr: m.chaddr,
            offered_at: now,
            yiaddr: m.yiaddr,
            server_id: m.server_id,
            lease_secs: m.lease_secs,
            reported_undelivered: false,
            path,
        });
        if let Some(t) = self.current.as_mut().filter(|t| t.xid == m.xid) {
            t.last_activity = now;
        }
        notes.push(DhcpNote::ReplyQueued {
            message,
            xid: m.xid,
            yiaddr: ip(m.yiaddr),
            path: described,
        });
    }

    fn find_pending(&mut self, m: &DhcpMessage) -> Option<&mut PendingReply> {
        self.pending
            .iter_mut()
            .find(|p| p.xid == m.xid && p.chaddr == m.chaddr)
    }

    fn take_pending(&mut self, m: &DhcpMessage) -> Option<PendingReply> {
        let at = self
            .pending
            .iter()
            .position(|p| p.xid == m.xid && p.chaddr == m.chaddr)?;
        self.pending.remove(at)
    }

    fn reply_dequeued(&mut self, m: &DhcpMessage, now: f64, notes: &mut Vec<DhcpNote>) {
        let Some(reply) = self.take_pending(m) else {
            return;
        };
        notes.push(DhcpNote::ReplyDelivered {
            message: reply.message,
            xid: reply.xid,
            after_secs: now - reply.offered_at,
            late: reply.reported_undelivered,
        });
        match reply.message {
            MessageType::Ack | MessageType::Nak => {
                if let Some(last) = self.last_client.as_mut() {
                    last.answered = true;
                }
                self.retry_streak = 0;
                self.last_ack = (reply.message == MessageType::Ack).then(|| DequeuedAck {
                    xid: reply.xid,
                    at: now,
                    answered: self.last_client.and_then(|c| c.state),
                    lease_before: self.lease.clone(),
                });
                if reply.message == MessageType::Ack
                    && reply.lease_secs > 0
                    && !is_zero(reply.yiaddr)
                {
                    let lease = Lease {
                        address: ip(reply.yiaddr),
                        server: ip(reply.server_id),
                        granted_at: now,
                        secs: reply.lease_secs,
                        expired: false,
                    };
                    notes.push(DhcpNote::LeaseGranted {
                        address: lease.address.clone(),
                        secs: lease.secs,
                        server: lease.server.clone(),
                    });
                    self.lease = Some(lease);
                }
                let verdict = if reply.message == MessageType::Nak {
                    Verdict::Nak
                } else {
                    Verdict::Delivered
                };
                if self.current.as_ref().is_some_and(|t| t.xid == reply.xid) {
                    self.conclude(Some(verdict), notes);
                }
            }
            _ => {}
        }
    }

    fn reply_dropped(
        &mut self,
        m: &DhcpMessage,
        reason: &str,
        now: f64,
        vm_state: VmState,
        notes: &mut Vec<DhcpNote>,
    ) {
        let Some(reply) = self.take_pending(m) else {
            // Dropped on its way to the tap (a bridge rule drops it with
            // the tap as its device, before the tap's tc hook saw it).
            let tap = self.tap.clone();
            self.lost_on_node(
                m,
                Some((tap, reason.to_owned())),
                false,
                now,
                vm_state,
                notes,
            );
            return;
        };
        // A full ring or a stalled VM: the stall is the cause, whatever the
        // drop site says.
        let stall = vm_state == VmState::RxStalled || reason == "full_ring";
        if !reply.reported_undelivered {
            self.counters.replies_undelivered += 1;
        }
        let fate = if stall {
            ReplyFate::Undelivered
        } else {
            ReplyFate::Dropped
        };
        worsen_fate(&mut self.current, reply.xid, fate);
        notes.push(DhcpNote::ReplyDropped {
            message: reply.message,
            xid: reply.xid,
            reason: reason.to_owned(),
            vm_state,
        });
    }

    /// Time passes: replies waiting too long, idle transactions, leases.
    pub fn tick(&mut self, now: f64, vm_state: VmState) -> Vec<DhcpNote> {
        let mut notes = Vec::new();
        for reply in self.pending.iter_mut() {
            let waiting = now - reply.offered_at;
            if !reply.reported_undelivered && waiting >= self.undelivered_after {
                reply.reported_undelivered = true;
                self.counters.replies_undelivered += 1;
                worsen_fate(&mut self.current, reply.xid, ReplyFate::Undelivered);
                notes.push(DhcpNote::ReplyUndelivered {
                    message: reply.message,
                    xid: reply.xid,
                    waiting_secs: waiting,
                    vm_state,
                });
            }
        }
        // Seen on the node, never on the tap in time: lost in between.
        while let Some(reply) = self
            .on_hops
            .front()
            .filter(|r| now - r.first_at >= self.undelivered_after)
            .cloned()
        {
            self.on_hops.pop_front();
            self.record_lost(reply, None, false, now, vm_state, &mut notes);
        }
        // Forget replies nobody will ever dequeue (the VMM went away).
        self.pending.retain(|r| now - r.offered_at < PENDING_TTL);
        if self
            .current
            .as_ref()
            .is_some_and(|t| now - t.last_activity >= TRANSACTION_IDLE)
        {
            self.conclude(None, &mut notes);
        }
        if let Some(lease) = self.lease.as_mut() {
            if !lease.expired && lease.remaining(now) <= 0.0 {
                lease.expired = true;
                notes.push(DhcpNote::LeaseExpired {
                    address: lease.address.clone(),
                });
            }
        }
        notes
    }

    /// Ends the current transaction with `verdict`, or with what its
    /// replies' fates imply.
    fn conclude(&mut self, verdict: Option<Verdict>, notes: &mut Vec<DhcpNote>) {
        let Some(t) = self.current.take() else { return };
        let verdict = verdict.unwrap_or(match t.worst_fate {
            ReplyFate::Undelivered => Verdict::ReplyUndelivered,
            ReplyFate::LostOnNode => Verdict::ReplyLostOnNode,
            ReplyFate::Dropped => Verdict::ReplyDropped,
            ReplyFate::None => {
                let answered = self.pending.iter().any(|p| p.xid == t.xid);
                if answered {
                    Verdict::ReplyUndelivered
                } else {
                    Verdict::NoReply
                }
            }
        });
        if let Some(i) = Verdict::ALL.iter().position(|v| *v == verdict) {
            self.counters.transactions[i] += 1;
        }
        self.last_verdict = Some(verdict);
        notes.push(DhcpNote::TransactionDone {
            id: t.id,
            xid: t.xid,
            verdict,
            attempts: t.attempts,
            request_path: t.request_path,
        });
    }
}

/// Marks the transaction in progress, if `xid` is its own, with `fate`
/// unless it already had a worse one.
fn worsen_fate(current: &mut Option<Transaction>, xid: u32, fate: ReplyFate) {
    if let Some(t) = current.as_mut().filter(|t| t.xid == xid) {
        t.worst_fate = worse(t.worst_fate, fate);
    }
}

fn worse(a: ReplyFate, b: ReplyFate) -> ReplyFate {
    match (a, b) {
        (ReplyFate::Undelivered, _) | (_, ReplyFate::Undelivered) => ReplyFate::Undelivered,
        (ReplyFate::LostOnNode, _) | (_, ReplyFate::LostOnNode) => ReplyFate::LostOnNode,
        (ReplyFate::Dropped, _) | (_, ReplyFate::Dropped) => ReplyFate::Dropped,
        _ => ReplyFate::None,
    }
}

/// Names of the parse problems the kernel flagged on a DHCP event.
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    [
        (parse_flag::BAD_COOKIE, "bad_cookie"),
        (parse_flag::TRUNCATED, "truncated"),
        (parse_flag::OPTION_OVERFLOW, "option_overflow"),
        (parse_flag::OPTION_LIMIT, "option_limit"),
        (parse_flag::NO_MESSAGE_TYPE, "no_message_type"),
        (parse_flag::OVERLOAD, "overload"),
        (parse_flag::BAD_OPTION_LENGTH, "bad_option_length"),
        (parse_flag::CAPTURE_LIMIT, "capture_limit"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
    const SERVER: [u8; 4] = [10, 250, 0, 1];
    const LEASED: [u8; 4] = [10, 250, 0, 150];

    fn client(
        t: MessageType,
        xid: u32,
        ciaddr: [u8; 4],
        dst: [u8; 4],
        server_id: [u8; 4],
        requested: [u8; 4],
    ) -> DhcpMessage {
        DhcpMessage {
            seen: Seen::OnTap { toward_vm: false },
            msg_type: Some(t),
            op: 1,
            xid,
            ciaddr,
            yiaddr: [0; 4],
            server_id,
            requested_ip: requested,
            dst_ip: dst,
            lease_secs: 0,
            chaddr: VM_MAC,
        }
    }

    fn reply(t: MessageType, xid: u32) -> DhcpMessage {
        DhcpMessage {
            seen: Seen::OnTap { toward_vm: true },
            msg_type: Some(t),
            op: 2,
            xid,
            ciaddr: [0; 4],
            yiaddr: LEASED,
            server_id: SERVER,
            requested_ip: [0; 4],
            dst_ip: LEASED,
            lease_secs: 120,
            chaddr: VM_MAC,
        }
    }

    fn seen_as(mut m: DhcpMessage, seen: Seen) -> DhcpMessage {
        m.seen = seen;
        m.msg_type = None; // the dequeue/drop tracepoints do not walk options
        m
    }

    fn renew(xid: u32) -> DhcpMessage {
        client(MessageType::Request, xid, LEASED, SERVER, [0; 4], [0; 4])
    }

    /// A full DORA with udhcpc's behaviour (one xid), delivered.
    fn bind(t: &mut DhcpTracker, xid: u32, at: f64) {
        t.observe(
            &client(MessageType::Discover, xid, [0; 4], [255; 4], [0; 4], [0; 4]),
            at,
            VmState::Ok,
        );
        t.observe(&reply(MessageType::Offer, xid), at + 0.01, VmState::Ok);
        t.observe(
            &seen_as(reply(MessageType::Offer, xid), Seen::Dequeued),
            at + 0.02,
            VmState::Ok,
        );
        t.observe(
            &client(MessageType::Request, xid, [0; 4], [255; 4], SERVER, LEASED),
            at + 0.03,
            VmState::Ok,
        );
        t.observe(&reply(MessageType::Ack, xid), at + 0.04, VmState::Ok);
        t.observe(
            &seen_as(reply(MessageType::Ack, xid), Seen::Dequeued),
            at + 0.05,
            VmState::Ok,
        );
    }

    #[test]
    fn client_states_follow_rfc_2131() {
        let discover = client(MessageType::Discover, 1, [0; 4], [255; 4], [0; 4], [0; 4]);
        assert_eq!(client_state(&discover), Some(ClientState::Selecting));
        let requesting = client(MessageType::Request, 1, [0; 4], [255; 4], SERVER, LEASED);
        assert_eq!(client_state(&requesting), Some(ClientState::Requesting));
        assert_eq!(client_state(&renew(1)), Some(ClientState::Renewing));
        let rebinding = client(MessageType::Request, 1, LEASED, [255; 4], [0; 4], [0; 4]);
        assert_eq!(client_state(&rebinding), Some(ClientState::Rebinding));
        let reboot = client(MessageType::Request, 9, [0; 4], [255; 4], [0; 4], LEASED);
        assert_eq!(client_state(&reboot), Some(ClientState::Rebooting));
    }

    #[test]
    fn a_delivered_exchange_grants_a_lease_and_counts_no_retry() {
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 0x3f2a, 100.0);
        assert_eq!(t.last_verdict(), Some(Verdict::Delivered));
        let lease = t.lease().unwrap();
        assert_eq!(lease.address, "10.250.0.150");
        assert!((lease.remaining(160.0) - 60.05).abs() < 0.01);
        assert_eq!(t.counters().retries, [0; 5]);
        assert_eq!(t.counters().transactions[0], 1);
    }

    #[test]
    fn the_incident_renewals_during_a_stall_are_retries_and_acks_undelivered() {
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 0x3f2a, 0.0);
        // T1: udhcpc renews with the SAME xid, unicast; the VM's RX is stalled.
        let mut notes = Vec::new();
        for (i, at) in [60.0, 63.0, 66.0].into_iter().enumerate() {
            let mut m = renew(0x3f2a);
            if i > 0 {
                m.dst_ip = [255; 4]; // udhcpc's later tries are broadcast, ciaddr set
            }
            notes.extend(t.observe(&m, at, VmState::RxStalled));
            notes.extend(t.observe(
                &reply(MessageType::Ack, 0x3f2a),
                at + 0.01,
                VmState::RxStalled,
            ));
            notes.extend(t.tick(at + 3.5, VmState::RxStalled));
        }
        let c = t.counters();
        // The first renewal is not a retry; both broadcasts that follow are.
        assert_eq!(c.retries[ClientState::Rebinding as usize], 2);
        assert_eq!(c.retries[ClientState::Renewing as usize], 0);
        assert_eq!(c.replies_undelivered, 3);
        assert_eq!(c.retries_during_stall, 2);
        assert!(notes.iter().any(|n| matches!(
            n,
            DhcpNote::ReplyUndelivered {
                vm_state: VmState::RxStalled,
                ..
            }
        )));
        // The lease runs out: the VM never got any of the ACKs.
        let notes = t.tick(121.0, VmState::RxStalled);
        assert!(
            notes
                .iter()
                .any(|n| matches!(n, DhcpNote::LeaseExpired { .. })),
            "{notes:?}"
        );
        assert_eq!(t.lease().unwrap().remaining(121.0), 0.0);
        // Silence ends the transaction as reply_undelivered.
        t.tick(200.0, VmState::RxStalled);
        assert_eq!(t.last_verdict(), Some(Verdict::ReplyUndelivered));
    }

    #[test]
    fn a_request_again_right_after_a_dequeued_ack_means_the_guest_never_took_it_in() {
        // The fault's first minutes: the VMM still fills the guest's RX ring,
        // so every ACK is dequeued, but the guest never processes any.
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 0x77, 0.0);
        let bound_until = t.lease().unwrap().remaining(0.0);
        let mut notes = Vec::new();
        for (i, at) in [60.0, 62.0, 64.0].into_iter().enumerate() {
            let mut m = renew(0x77);
            if i > 0 {
                m.dst_ip = [255; 4];
            }
            notes.extend(t.observe(&m, at, VmState::Ok));
            let ack = reply(MessageType::Ack, 0x77);
            notes.extend(t.observe(&ack, at + 0.01, VmState::Ok));
            notes.extend(t.observe(&seen_as(ack, Seen::Dequeued), at + 0.02, VmState::Ok));
        }
        let c = t.counters();
        assert_eq!(c.replies_unprocessed, 2, "{notes:?}");
        assert_eq!(c.retries.iter().sum::<u64>(), 2);
        assert!(notes
            .iter()
            .any(|n| matches!(n, DhcpNote::ReplyUnprocessed { xid: 0x77, .. })));
        // The lease is still the one granted at bind time, except for the
        // last ACK, which the guest may yet take in.
        let before_last = t.lease().unwrap().granted_at;
        assert!(before_last > 60.0, "the last ACK stands until re-asked");
        let mut again = renew(0x77);
        again.dst_ip = [255; 4];
        t.observe(&again, 66.0, VmState::Ok);
        assert!((t.lease().unwrap().remaining(0.0) - bound_until).abs() < 0.1);

        // A renewal at the next T1 (minutes later) is not a re-ask, nor is a
        // restarted client's REQUEST (a new xid) seconds after its ACK.
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 0x78, 0.0);
        t.observe(&renew(0x78), 60.0, VmState::Ok);
        assert_eq!(t.counters().replies_unprocessed, 0);
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 0x79, 0.0);
        t.observe(&renew(0x80), 5.0, VmState::Ok);
        assert_eq!(t.counters().replies_unprocessed, 0);
        assert_eq!(t.counters().retries.iter().sum::<u64>(), 0);

        // Renewals forced seconds apart (udhcpc SIGUSR1), each delivered and
        // taken in: a bound client renewing is no re-ask, ever.
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 0x81, 0.0);
        for at in [5.0, 10.0, 15.0] {
            t.observe(&renew(0x81), at, VmState::Ok);
            let ack = reply(MessageType::Ack, 0x81);
            t.observe(&ack, at + 0.01, VmState::Ok);
            t.observe(&seen_as(ack, Seen::Dequeued), at + 0.02, VmState::Ok);
        }
        assert_eq!(t.counters().replies_unprocessed, 0);
    }

    #[test]
    fn repeated_identical_requests_are_retries_whatever_the_xid() {
        // dhclient-style: a new xid for each INIT-REBOOT attempt.
        let mut t = DhcpTracker::new(3.0);
        for (i, xid) in [10, 11, 12, 13].into_iter().enumerate() {
            let m = client(MessageType::Request, xid, [0; 4], [255; 4], [0; 4], LEASED);
            t.observe(&m, i as f64 * 4.0, VmState::Ok);
        }
        assert_eq!(t.counters().retries[ClientState::Rebooting as usize], 3);
        assert_eq!(t.counters().retries_during_stall, 0);
    }

    #[test]
    fn server_silence_is_no_reply_not_the_vm() {
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 1, 0.0);
        for at in [60.0, 65.0, 70.0] {
            t.observe(&renew(1), at, VmState::Ok);
            t.tick(at + 4.0, VmState::Ok);
        }
        t.tick(200.0, VmState::Ok);
        assert_eq!(t.last_verdict(), Some(Verdict::NoReply));
        assert_eq!(t.counters().replies_undelivered, 0);
        assert_eq!(t.counters().transactions[Verdict::NoReply as usize], 1);
    }

    #[test]
    fn a_full_ring_drop_is_undelivered_and_a_nak_is_its_own_verdict() {
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 5, 0.0);
        t.observe(&renew(5), 60.0, VmState::Ok);
        t.observe(&reply(MessageType::Ack, 5), 60.01, VmState::Ok);
        let dropped = seen_as(
            reply(MessageType::Ack, 5),
            Seen::Dropped {
                reason: "full_ring".into(),
            },
        );
        t.observe(&dropped, 60.02, VmState::Ok);
        assert_eq!(t.counters().replies_undelivered, 1);
        t.observe(&renew(6), 70.0, VmState::Ok); // new xid ends the old transaction
        assert_eq!(t.last_verdict(), Some(Verdict::ReplyUndelivered));
        t.observe(&reply(MessageType::Nak, 6), 70.01, VmState::Ok);
        t.observe(
            &seen_as(reply(MessageType::Nak, 6), Seen::Dequeued),
            70.02,
            VmState::Ok,
        );
        assert_eq!(t.last_verdict(), Some(Verdict::Nak));
    }

    #[test]
    fn a_late_delivery_after_recovery_is_reported_as_late() {
        let mut t = DhcpTracker::new(3.0);
        bind(&mut t, 7, 0.0);
        t.observe(&renew(7), 60.0, VmState::RxStalled);
        t.observe(&reply(MessageType::Ack, 7), 60.01, VmState::RxStalled);
        t.tick(64.0, VmState::RxStalled);
        let notes = t.observe(
            &seen_as(reply(MessageType::Ack, 7), Seen::Dequeued),
            70.0,
            VmState::Ok,
        );
        assert!(notes
            .iter()
            .any(|n| matches!(n, DhcpNote::ReplyDelivered { late: true, .. })));
        assert_eq!(t.last_verdict(), Some(Verdict::Delivered));
    }

    #[test]
    fn a_dhcp_flood_keeps_memory_bounded() {
        let mut t = DhcpTracker::new(3.0);
        for i in 0..100_000u32 {
            t.observe(
                &client(MessageType::Discover, i, [0; 4], [255; 4], [0; 4], [0; 4]),
                f64::from(i) * 0.001,
                VmState::Ok,
            );
            t.observe(
                &reply(MessageType::Offer, i),
                f64::from(i) * 0.001,
                VmState::Ok,
            );
        }
        assert!(t.pending_replies() <= MAX_PENDING_REPLIES);
        assert_eq!(t.counters().packets[1][0], 100_000);
    }

    /// Seen by a hop's tc program (which copies the options, as the tap's).
    fn on_br0(mut m: DhcpMessage) -> DhcpMessage {
        m.seen = Seen::OnHop {
            sighting: HopSighting {
                hop: "br0".into(),
                vlan: 100,
                tunnel: String::new(),
                vni: 0,
            },
        };
        m
    }

    #[test]
    fn a_reply_seen_on_a_hop_then_on_the_tap_carries_its_path_and_is_not_lost() {
        let mut t = DhcpTracker::new(3.0).for_tap("tap3");
        let discover = client(MessageType::Discover, 9, [0; 4], [255; 4], [0; 4], [0; 4]);
        t.observe(&discover, 0.0, VmState::Ok);
        t.observe(&on_br0(reply(MessageType::Offer, 9)), 0.1, VmState::Ok);
        let notes = t.observe(&reply(MessageType::Offer, 9), 0.1, VmState::Ok);
        assert!(
            notes
                .iter()
                .any(|n| matches!(n, DhcpNote::ReplyQueued { path, .. }
                if path == &["br0 (VLAN 100)".to_owned()])),
            "{notes:?}"
        );
        t.tick(10.0, VmState::Ok);
        assert_eq!(t.counters().replies_lost_on_node, 0);
        assert_eq!(t.replies_on_hops(), 0);
    }

    #[test]
    fn a_flooded_copy_seen_on_a_hop_after_the_tap_is_not_a_lost_reply() {
        let mut t = DhcpTracker::new(3.0);
        let discover = client(MessageType::Discover, 9, [0; 4], [255; 4], [0; 4], [0; 4]);
        t.observe(&discover, 0.0, VmState::Ok);
        t.observe(&reply(MessageType::Offer, 9), 0.1, VmState::Ok);
        t.observe(
            &seen_as(reply(MessageType::Offer, 9), Seen::Dequeued),
            0.1,
            VmState::Ok,
        );
        // The bridge flooded the broadcast OFFER to the uplink too.
        t.observe(&on_br0(reply(MessageType::Offer, 9)), 0.1, VmState::Ok);
        t.tick(10.0, VmState::Ok);
        assert_eq!(t.counters().replies_lost_on_node, 0);
    }

    #[test]
    fn a_reply_dropped_before_the_tap_is_lost_on_node_with_the_reason() {
        let mut t = DhcpTracker::new(3.0).for_tap("tap3");
        let discover = client(MessageType::Discover, 9, [0; 4], [255; 4], [0; 4], [0; 4]);
        t.observe(&discover, 0.0, VmState::Ok);
        t.observe(&on_br0(reply(MessageType::Offer, 9)), 0.1, VmState::Ok);
        let dropped = seen_as(
            reply(MessageType::Offer, 9),
            Seen::Dropped {
                reason: "netfilter_drop".into(),
            },
        );
        let notes = t.observe(&dropped, 0.1, VmState::Ok);
        assert_eq!(
            notes,
            vec![DhcpNote::ReplyLostOnNode {
                message: MessageType::Offer,
                xid: 9,
                path: vec!["br0 (VLAN 100)".into()],
                dropped_at: Some("tap3".into()),
                at_hop: false,
                reason: Some("netfilter_drop".into()),
            }]
        );
        assert_eq!(t.counters().replies_lost_on_node, 1);
        assert_eq!(t.counters().replies_undelivered, 0, "never reached the tap");
        // The transaction ends as lost on the node once the client is quiet.
        let notes = t.tick(30.0, VmState::Ok);
        assert!(
            notes
                .iter()
                .any(|n| matches!(n, DhcpNote::TransactionDone { verdict, .. }
                if *verdict == Verdict::ReplyLostOnNode)),
            "{notes:?}"
        );
    }

    #[test]
    fn a_reply_the_host_could_not_resolve_the_vm_for_is_the_vms_side_not_the_nodes() {
        // dnsmasq's unicast ACK to a stalled VM waits for ARP in br0's
        // neighbour queue and is dropped there (neigh_failed): the stall.
        let mut t = DhcpTracker::new(3.0).for_tap("tap3");
        t.observe(&renew(9), 0.0, VmState::RxStalled);
        let neigh = seen_as(
            reply(MessageType::Ack, 9),
            Seen::DroppedOnHop {
                reason: "neigh_failed".into(),
                hop: "br0".into(),
            },
        );
        let notes = t.observe(&neigh, 1.0, VmState::RxStalled);
        assert!(
            matches!(&notes[..], [DhcpNote::ReplyDropped { reason, .. }] if reason == "neigh_failed"),
            "{notes:?}"
        );
        // Seen on the bridge, then nothing while stalled: the stall too.
        t.observe(&on_br0(reply(MessageType::Ack, 9)), 2.0, VmState::RxStalled);
        t.tick(6.0, VmState::RxStalled);
        assert_eq!(t.counters().replies_lost_on_node, 0);
        assert_eq!(t.counters().replies_undelivered, 2);
        // A rule's drop stays the node's, stalled VM or not.
        let rule = seen_as(
            reply(MessageType::Ack, 9),
            Seen::DroppedOnHop {
                reason: "netfilter_drop".into(),
                hop: "br0".into(),
            },
        );
        t.observe(&rule, 7.0, VmState::RxStalled);
        assert_eq!(t.counters().replies_lost_on_node, 1);
    }

    #[test]
    fn a_reply_seen_on_a_hop_and_never_on_the_tap_is_lost_after_the_wait() {
        let mut t = DhcpTracker::new(3.0);
        let discover = client(MessageType::Discover, 9, [0; 4], [255; 4], [0; 4], [0; 4]);
        t.observe(&discover, 0.0, VmState::Ok);
        t.observe(&on_br0(reply(MessageType::Offer, 9)), 0.1, VmState::Ok);
        assert!(t.tick(2.0, VmState::Ok).is_empty());
        let notes = t.tick(3.2, VmState::Ok);
        assert!(
            notes.iter().any(|n| matches!(
                n,
                DhcpNote::ReplyLostOnNode {
                    dropped_at: None,
                    ..
                }
            )),
            "{notes:?}"
        );
        assert_eq!(t.counters().replies_lost_on_node, 1);
    }

    /// What a random sequence step feeds the tracker.
    #[derive(Debug, Clone)]
    enum Step {
        Client { code: u8, xid: u32, renewing: bool },
        Reply { code: u8, xid: u32 },
        Dequeued { xid: u32 },
        Dropped { xid: u32 },
        OnHop { code: u8, xid: u32, request: bool },
        DroppedOnHop { xid: u32 },
        Tick,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        // A few xids only, so that retries, answers and verdicts meet.
        prop_oneof![
            (1u8..=8, 0u32..4, any::<bool>()).prop_map(|(code, xid, renewing)| Step::Client {
                code,
                xid,
                renewing
            }),
            (1u8..=8, 0u32..4).prop_map(|(code, xid)| Step::Reply { code, xid }),
            (0u32..4).prop_map(|xid| Step::Dequeued { xid }),
            (0u32..4).prop_map(|xid| Step::Dropped { xid }),
            (1u8..=8, 0u32..4, any::<bool>()).prop_map(|(code, xid, request)| Step::OnHop {
                code,
                xid,
                request
            }),
            (0u32..4).prop_map(|xid| Step::DroppedOnHop { xid }),
            Just(Step::Tick),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Any sequence of what the kernel can report, at any pace, in any
        /// VM state: no panic, bounded memory, and counts that add up.
        #[test]
        fn random_sequences_keep_the_tracker_bounded_and_consistent(
            steps in proptest::collection::vec(
                (step(), 0.0f64..40.0, 0usize..VmState::ALL.len()),
                0..300,
            )
        ) {
            let mut t = DhcpTracker::new(2.0);
            let mut now = 0.0;
            let (mut client_sent, mut on_tap, mut replies_offered) = (0u64, 0u64, 0u64);
            // Replies seen on a hop, and drops: each can be lost once.
            let mut may_be_lost = 0u64;
            for (step, dt, state) in steps {
                now += dt;
                let vm_state = VmState::ALL[state];
                match step {
                    Step::Client { code, xid, renewing } => {
                        let ciaddr = if renewing { LEASED } else { [0; 4] };
                        let mut m = client(MessageType::from_code(code), xid, ciaddr, SERVER, [0; 4], [0; 4]);
                        m.msg_type = Some(MessageType::from_code(code));
                        client_sent += 1;
                        on_tap += 1;
                        t.observe(&m, now, vm_state);
                    }
                    Step::Reply { code, xid } => {
                        replies_offered += 1;
                        on_tap += 1;
                        t.observe(&reply(MessageType::from_code(code), xid), now, vm_state);
                    }
                    Step::Dequeued { xid } => {
                        let m = seen_as(reply(MessageType::Ack, xid), Seen::Dequeued);
                        t.observe(&m, now, vm_state);
                    }
                    Step::OnHop { code, xid, request } => {
                        let mut m = if request {
                            client(MessageType::from_code(code), xid, [0; 4], [255; 4], [0; 4], [0; 4])
                        } else {
                            may_be_lost += 1;
                            replies_offered += 1;
                            reply(MessageType::from_code(code), xid)
                        };
                        m.seen = Seen::OnHop {
                            sighting: HopSighting {
                                hop: "br0".into(),
                                vlan: 0,
                                tunnel: String::new(),
                                vni: 0,
                            },
                        };
                        t.observe(&m, now, vm_state);
                    }
                    Step::DroppedOnHop { xid } => {
                        may_be_lost += 1;
                        replies_offered += 1;
                        let m = seen_as(
                            reply(MessageType::Offer, xid),
                            Seen::DroppedOnHop { reason: "netfilter_drop".into(), hop: "br0".into() },
                        );
                        t.observe(&m, now, vm_state);
                    }
                    Step::Dropped { xid } => {
                        may_be_lost += 1;
                        replies_offered += 1;
                        let m = seen_as(
                            reply(MessageType::Ack, xid),
                            Seen::Dropped { reason: "full_ring".into() },
                        );
                        t.observe(&m, now, vm_state);
                    }
                    Step::Tick => {
                        t.tick(now, vm_state);
                    }
                }
                proptest::prop_assert!(t.pending_replies() <= MAX_PENDING_REPLIES);
                proptest::prop_assert!(t.replies_on_hops() <= MAX_PENDING_REPLIES);
            }
            let c = t.counters();
            let retries: u64 = c.retries.iter().sum();
            let packets: u64 = c.packets.iter().flatten().sum();
            let transactions: u64 = c.transactions.iter().sum();
            proptest::prop_assert!(retries <= client_sent, "{retries} retries of {client_sent} client messages");
            proptest::prop_assert!(c.retries_during_stall <= retries);
            proptest::prop_assert!(packets <= on_tap, "{packets} counted of {on_tap} seen on the tap");
            proptest::prop_assert!(transactions <= client_sent, "{transactions} transactions from {client_sent} client messages");
            proptest::prop_assert!(
                c.replies_undelivered <= replies_offered,
                "{} undelivered of {replies_offered} replies", c.replies_undelivered
            );
            proptest::prop_assert!(c.replies_unprocessed <= replies_offered);
            proptest::prop_assert!(
                c.replies_lost_on_node <= may_be_lost,
                "{} lost of {may_be_lost} hop sightings and drops", c.replies_lost_on_node
            );
            if let Some(lease) = t.lease() {
                // (granted_at + 120) - now is not exactly 120 in floating
                // point when now == granted_at: allow the rounding.
                proptest::prop_assert!(lease.remaining(now) <= 120.0 + 1e-9);
            }
        }
    }
}
