//! DHCP options: the one implementation of the cookie check and option
//! walk. The kernel does not walk options: its tc program copies the bytes
//! from the magic cookie on (up to [`OPTIONS_CAPTURE`]) into the event, and
//! userspace walks them here. A loop with data-dependent steps is what older
//! verifiers cannot prune (Debian 12's 6.1 refused the in-kernel walk after
//! a million instructions); a copy of bounded length is cheap on every
//! kernel. Userspace parsing (`crate::parse::parse_dhcp_frame`) walks the
//! same window with this same code.

use crate::{parse_flag, MAX_DHCP_OPTIONS};

/// Bytes of a DHCP message the kernel copies from the magic cookie on: the
/// options field of a minimum-size (576-byte) message is 312 bytes; this
/// leaves room for larger ones. Options beyond it are not read
/// ([`parse_flag::CAPTURE_LIMIT`]).
pub const OPTIONS_CAPTURE: usize = 388;

const DHCP_MAGIC: [u8; 4] = [99, 130, 83, 99];

/// The copied options of one DHCP event; follows its [`crate::PacketEvent`]
/// in the same ring buffer record ([`EventWithOptions`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionsCapture {
    /// Bytes copied into `bytes` (from the magic cookie on).
    pub len: u16,
    /// 1 if the frame goes on past the copied bytes.
    pub more: u8,
    pub _pad: u8,
    pub bytes: [u8; OPTIONS_CAPTURE],
}

impl Default for OptionsCapture {
    fn default() -> Self {
        Self {
            len: 0,
            more: 0,
            _pad: 0,
            bytes: [0; OPTIONS_CAPTURE],
        }
    }
}

impl OptionsCapture {
    /// The copied bytes (never more than the buffer, whatever `len` says).
    pub fn captured(&self) -> &[u8] {
        let len = usize::from(self.len).min(OPTIONS_CAPTURE);
        &self.bytes[..len]
    }
}

/// A DHCP event with its copied options: the ring buffer record of a DHCP
/// frame seen by the tc programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventWithOptions {
    pub event: crate::PacketEvent,
    pub options: OptionsCapture,
}

const _: () = assert!(core::mem::size_of::<EventWithOptions>() == 80 + 392);

/// What the options say, and what was wrong with them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionFields {
    /// Option 53, 0 if absent.
    pub msg_type: u8,
    /// Option 51, 0 if absent.
    pub lease_secs: u32,
    /// Option 54.
    pub server_id: [u8; 4],
    /// Option 50.
    pub requested_ip: [u8; 4],
    /// [`parse_flag`] bits.
    pub parse_flags: u16,
}

impl OptionFields {
    /// Copies the fields into an event (its other parse flags are kept).
    pub fn apply(&self, ev: &mut crate::PacketEvent) {
        ev.msg_type = self.msg_type;
        ev.lease_secs = self.lease_secs;
        ev.server_id = self.server_id;
        ev.requested_ip = self.requested_ip;
        ev.parse_flags |= self.parse_flags;
    }
}

fn four(bytes: &[u8], at: usize) -> Option<[u8; 4]> {
    bytes.get(at..at + 4)?.try_into().ok()
}

/// Walks `window`: the bytes from the magic cookie on, as far as they were
/// copied. `more` says the frame went on past the window, so running off
/// its end is the capture's limit, not a truncated frame. At most
/// [`MAX_DHCP_OPTIONS`] options are read.
pub fn walk(window: &[u8], more: bool) -> OptionFields {
    let mut out = OptionFields::default();
    // Running off the window: the frame ended there, or the copy did.
    let ran_off = if more {
        parse_flag::CAPTURE_LIMIT
    } else {
        parse_flag::TRUNCATED
    };
    match four(window, 0) {
        Some(cookie) if cookie == DHCP_MAGIC => {}
        Some(_) => {
            out.parse_flags |= parse_flag::BAD_COOKIE;
            return out;
        }
        None => {
            out.parse_flags |= ran_off;
            return out;
        }
    }
    let mut offset = DHCP_MAGIC.len();
    for _ in 0..MAX_DHCP_OPTIONS {
        let Some(&code) = window.get(offset) else {
            out.parse_flags |= ran_off;
            return out.finish();
        };
        match code {
            255 => return out.finish(),
            0 => {
                offset += 1;
                continue;
            }
            _ => {}
        }
        let Some(&len) = window.get(offset + 1) else {
            out.parse_flags |= ran_off;
            return out.finish();
        };
        let value = offset + 2;
        let len = usize::from(len);
        // An option whose value runs past the window: past the frame's end
        // it is malformed; past the copy's end it is the capture's limit.
        let overflow = if more {
            parse_flag::CAPTURE_LIMIT
        } else {
            parse_flag::OPTION_OVERFLOW
        };
        match code {
            53 if len == 1 => match window.get(value) {
                Some(&t) => out.msg_type = t,
                None => out.parse_flags |= overflow,
            },
            51 | 54 | 50 if len == 4 => match four(window, value) {
                Some(v) if code == 51 => out.lease_secs = u32::from_be_bytes(v),
                Some(v) if code == 54 => out.server_id = v,
                Some(v) => out.requested_ip = v,
                None => out.parse_flags |= overflow,
            },
            53 | 51 | 54 | 50 => out.parse_flags |= parse_flag::BAD_OPTION_LENGTH,
            52 => out.parse_flags |= parse_flag::OVERLOAD,
            _ => {}
        }
        offset = value + len;
    }
    out.parse_flags |= parse_flag::OPTION_LIMIT;
    out.finish()
}

impl OptionFields {
    fn finish(mut self) -> Self {
        if self.msg_type == 0 {
            self.parse_flags |= parse_flag::NO_MESSAGE_TYPE;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(options: &[u8]) -> [u8; 64] {
        let mut w = [0u8; 64];
        w[..4].copy_from_slice(&DHCP_MAGIC);
        w[4..4 + options.len()].copy_from_slice(options);
        w
    }

    #[test]
    fn a_request_reads_type_address_and_server() {
        let w = window(&[53, 1, 3, 50, 4, 10, 250, 0, 9, 54, 4, 10, 250, 0, 1, 255]);
        let f = walk(&w[..20], false);
        assert_eq!(f.msg_type, 3);
        assert_eq!(f.requested_ip, [10, 250, 0, 9]);
        assert_eq!(f.server_id, [10, 250, 0, 1]);
        assert_eq!(f.parse_flags, 0);
    }

    #[test]
    fn running_off_the_frame_is_truncation_but_off_the_copy_is_the_capture_limit() {
        let w = window(&[53, 1, 5, 51, 4, 0, 0]);
        assert_eq!(
            walk(&w[..11], false).parse_flags,
            parse_flag::OPTION_OVERFLOW | parse_flag::TRUNCATED
        );
        assert_eq!(walk(&w[..11], true).parse_flags, parse_flag::CAPTURE_LIMIT);
        assert_eq!(walk(&w[..11], true).msg_type, 5);
        let no_end = window(&[53, 1, 5]);
        assert_eq!(walk(&no_end[..7], false).parse_flags, parse_flag::TRUNCATED);
        assert_eq!(
            walk(&no_end[..7], true).parse_flags,
            parse_flag::CAPTURE_LIMIT
        );
    }

    #[test]
    fn cookie_and_message_type_problems_are_flagged() {
        assert_eq!(
            walk(&[1, 2, 3, 4, 255], false).parse_flags,
            parse_flag::BAD_COOKIE
        );
        assert_eq!(walk(&[99, 130], false).parse_flags, parse_flag::TRUNCATED);
        let w = window(&[255]);
        assert_eq!(
            walk(&w[..5], false).parse_flags,
            parse_flag::NO_MESSAGE_TYPE
        );
        let w = window(&[53, 2, 1, 1, 255]);
        assert_eq!(
            walk(&w[..9], false).parse_flags,
            parse_flag::BAD_OPTION_LENGTH | parse_flag::NO_MESSAGE_TYPE
        );
    }

    #[test]
    fn the_walk_stops_after_the_option_limit() {
        let mut w = [0u8; 4 + 3 * 50];
        w[..4].copy_from_slice(&DHCP_MAGIC);
        for i in 0..50 {
            w[4 + 3 * i..7 + 3 * i].copy_from_slice(&[12, 1, b'x']);
        }
        let f = walk(&w, false);
        assert_ne!(f.parse_flags & parse_flag::OPTION_LIMIT, 0);
    }

    #[test]
    fn a_lying_length_never_reads_past_the_buffer() {
        let mut c = OptionsCapture {
            len: u16::MAX,
            ..Default::default()
        };
        c.bytes[..4].copy_from_slice(&DHCP_MAGIC);
        assert_eq!(c.captured().len(), OPTIONS_CAPTURE);
    }
}
