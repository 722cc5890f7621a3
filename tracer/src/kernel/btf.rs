//! A small reader for kernel BTF (/sys/kernel/btf/vmlinux): struct member
//! offsets and enum values by name. The eBPF programs cannot use CO-RE
//! relocations from Rust, so the agent resolves the few kernel struct
//! offsets they need here, at start-up, and passes them as load-time
//! globals; drop reasons are looked up by name because their numbers
//! differ between kernels.
//!
//! Why not aya's own `Btf`: in aya 0.14 (aya-obj 0.3) it parses the same
//! data but keeps type lookup and struct members crate-private
//! (`type_by_id`, `members` are `pub(crate)`); only a type's id by name is
//! public, which gives no offsets. aya's `Btf` is still what the programs
//! are loaded against (tp_btf, fentry); this reader only answers offsets.

use std::collections::HashMap;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF data truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {kind} for type {id}")]
    UnknownKind { kind: u32, id: u32 },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {structure} has no member {member}")]
    NoMember { structure: String, member: String },
    #[error("kernel BTF has no enum {0}")]
    NoEnum(String),
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    /// Bit offset from the start of the containing struct/union.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Kind {
    Composite {
        members: Vec<Member>,
    },
    Enum {
        values: Vec<(String, i64)>,
    },
    /// typedef/const/volatile/restrict/type_tag: refers to another type.
    Alias {
        target: u32,
    },
    Other,
}

#[derive(Debug, Clone)]
struct TypeEntry {
    name: String,
    kind: Kind,
}

/// Parsed BTF: named structs, unions and enums.
pub struct KernelBtf {
    types: Vec<TypeEntry>,
    by_name: HashMap<String, Vec<u32>>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Truncated(at))
}

fn string_at(strings: &[u8], offset: u32) -> String {
    let start = offset as usize;
    strings
        .get(start..)
        .and_then(|rest| rest.split(|b| *b == 0).next())
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
        .unwrap_or_default()
}

/// The type and string sections of a BTF blob.
fn sections(data: &[u8]) -> Result<(&[u8], &[u8]), BtfError> {
    if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
        return Err(BtfError::BadHeader);
    }
    let hdr_len = u32_at(data, 4)? as usize;
    let type_off = u32_at(data, 8)? as usize;
    let type_len = u32_at(data, 12)? as usize;
    let str_off = u32_at(data, 16)? as usize;
    let str_len = u32_at(data, 20)? as usize;
    let types_start = hdr_len + type_off;
    let strings_start = hdr_len + str_off;
    let type_data = data
        .get(types_start..types_start + type_len)
        .ok_or(BtfError::Truncated(types_start))?;
    let strings = data
        .get(strings_start..strings_start + str_len)
        .ok_or(BtfError::Truncated(strings_start))?;

    Ok((type_data, strings))
}

/// Appends the types of `type_data` to `types` (ids continue from its length).
fn parse_types(
    type_data: &[u8],
    strings: &[u8],
    types: &mut Vec<TypeEntry>,
) -> Result<(), BtfError> {
    let mut at = 0;
    while at < type_data.len() {
        let id = types.len() as u32;
        let name = string_at(strings, u32_at(type_data, at)?);
        let info = u32_at(type_data, at + 4)?;
        let size_or_type = u32_at(type_data, at + 8)?;
        let vlen = (info & 0xffff) as usize;
        let kind_code = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        at += 12;
        let kind = match kind_code {
            KIND_STRUCT | KIND_UNION => {
                let mut members = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let m = at + i * 12;
                    let offset = u32_at(type_data, m + 8)?;
                    members.push(Member {
                        name: string_at(strings, u32_at(type_data, m)?),
                        type_id: u32_at(type_data, m + 4)?,
                        // With kind_flag, the top 8 bits are a bitfield size.
                        bit_offset: if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        },
                    });
                }
                at += vlen * 12;
                Kind::Composite { members }
            }
            KIND_ENUM => {
                let mut values = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let e = at + i * 8;
                    let raw = u32_at(type_data, e + 4)?;
                    let value = if kind_flag {
                        i64::from(raw as i32)
                    } else {
                        i64::from(raw)
                    };
                    values.push((string_at(strings, u32_at(type_data, e)?), value));
                }
                at += vlen * 8;
                Kind::Enum { values }
            }
            KIND_ENUM64 => {
                let mut values = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let e = at + i * 12;
                    let lo = u64::from(u32_at(type_data, e + 4)?);
                    let hi = u64::from(u32_at(type_data, e + 8)?);
                    values.push((
                        string_at(strings, u32_at(type_data, e)?),
                        ((hi << 32) | lo) as i64,
                    ));
                }
                at += vlen * 12;
                Kind::Enum { values }
            }
            KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                Kind::Alias {
                    target: size_or_type,
                }
            }
            KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                at += 4;
                Kind::Other
            }
            KIND_ARRAY => {
                at += 12;
                Kind::Other
            }
            KIND_FUNC_PROTO => {
                at += vlen * 8;
                Kind::Other
            }
            KIND_DATASEC => {
                at += vlen * 12;
                Kind::Other
            }
            2 | 7 | 12 | 16 => Kind::Other, // ptr, fwd, func, float
            other => return Err(BtfError::UnknownKind { kind: other, id }),
        };
        types.push(TypeEntry { name, kind });
    }
    Ok(())
}

impl KernelBtf {
    /// Parses little-endian BTF (the only kind this agent's targets have).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let (type_data, strings) = sections(data)?;
        let mut types = vec![TypeEntry {
            name: String::new(),
            kind: Kind::Other,
        }];
        parse_types(type_data, strings, &mut types)?;
        Ok(Self::index(types))
    }

    /// Parses a kernel module's split BTF (/sys/kernel/btf/<module>) on top
    /// of vmlinux's: the module's type ids continue after the base's, and
    /// its string offsets continue after the base's string section. This is
    /// where a modular tun keeps `tun_file` and `tun_struct`.
    pub fn parse_split(base: &[u8], split: &[u8]) -> Result<Self, BtfError> {
        let (base_types, base_strings) = sections(base)?;
        let (split_types, split_strings) = sections(split)?;
        let mut strings = Vec::with_capacity(base_strings.len() + split_strings.len());
        strings.extend_from_slice(base_strings);
        strings.extend_from_slice(split_strings);
        let mut types = vec![TypeEntry {
            name: String::new(),
            kind: Kind::Other,
        }];
        parse_types(base_types, &strings, &mut types)?;
        parse_types(split_types, &strings, &mut types)?;
        Ok(Self::index(types))
    }

    fn index(types: Vec<TypeEntry>) -> Self {
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (id, entry) in types.iter().enumerate() {
            if !entry.name.is_empty() {
                by_name
                    .entry(entry.name.clone())
                    .or_default()
                    .push(id as u32);
            }
        }
        Self { types, by_name }
    }

    fn resolve(&self, mut id: u32) -> Option<&TypeEntry> {
        for _ in 0..32 {
            let entry = self.types.get(id as usize)?;
            match entry.kind {
                Kind::Alias { target } => id = target,
                _ => return Some(entry),
            }
        }
        None
    }

    fn composite(&self, name: &str) -> Option<&[Member]> {
        self.by_name
            .get(name)?
            .iter()
            .find_map(|id| match &self.types[*id as usize].kind {
                Kind::Composite { members } if !members.is_empty() => Some(members.as_slice()),
                _ => None,
            })
    }

    /// Byte offset of `member` in `struct structure`, looking inside
    /// anonymous unions/structs as C does (e.g. `sk_buff.dev`).
    pub fn member_offset(&self, structure: &str, member: &str) -> Result<u32, BtfError> {
        let members = self
            .composite(structure)
            .ok_or_else(|| BtfError::NoStruct(structure.to_owned()))?;
        self.find_member(members, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember {
                structure: structure.to_owned(),
                member: member.to_owned(),
            })
    }

    fn find_member(&self, members: &[Member], wanted: &str, base_bits: u32) -> Option<u32> {
        for m in members {
            if m.name == wanted {
                return Some(base_bits + m.bit_offset);
            }
        }
        for m in members.iter().filter(|m| m.name.is_empty()) {
            if let Some(Kind::Composite { members: inner }) =
                self.resolve(m.type_id).map(|t| &t.kind)
            {
                if let Some(found) = self.find_member(inner, wanted, base_bits + m.bit_offset) {
                    return Some(found);
                }
            }
        }
        None
    }

    /// All (name, value) pairs of `enum name`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        self.by_name
            .get(name)
            .and_then(|ids| {
                ids.iter()
                    .find_map(|id| match &self.types[*id as usize].kind {
                        Kind::Enum { values } => Some(values.clone()),
                        _ => None,
                    })
            })
            .ok_or_else(|| BtfError::NoEnum(name.to_owned()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a BTF blob: `struct outer { int a; union { void *dev; long x; }; int b; }`
    /// and `enum reason { R_NOT_SPECIFIED = 2, R_FULL_RING = 77 }`.
    pub(crate) fn sample_btf() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let (n_int, n_outer, n_a, n_dev, n_x, n_b, n_enum, n_r1, n_r2) = (
            name("int"),
            name("outer"),
            name("a"),
            name("dev"),
            name("x"),
            name("b"),
            name("reason"),
            name("R_NOT_SPECIFIED"),
            name("R_FULL_RING"),
        );
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            words
                .iter()
                .for_each(|w| types.extend_from_slice(&w.to_le_bytes()))
        };
        // 1: int (4 bytes) + int encoding word
        push(&[n_int, KIND_INT << 24, 4, 32]);
        // 2: ptr to void
        push(&[0, 2 << 24, 0]);
        // 3: anonymous union { dev: ptr @0, x: int @0 }
        push(&[0, (KIND_UNION << 24) | 2, 8, n_dev, 2, 0, n_x, 1, 0]);
        // 4: struct outer { a @0, <anon union> @64 bits, b @128 bits }
        push(&[
            n_outer,
            (KIND_STRUCT << 24) | 3,
            24,
            n_a,
            1,
            0,
            0,
            3,
            64,
            n_b,
            1,
            128,
        ]);
        // 5: enum reason
        push(&[n_enum, (KIND_ENUM << 24) | 2, 4, n_r1, 2, n_r2, 77]);
        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]); // version, flags
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&word.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_members_inside_anonymous_unions() {
        let btf = KernelBtf::parse(&sample_btf()).unwrap();
        assert_eq!(btf.member_offset("outer", "a"), Ok(0));
        assert_eq!(btf.member_offset("outer", "dev"), Ok(8));
        assert_eq!(btf.member_offset("outer", "b"), Ok(16));
        assert!(matches!(
            btf.member_offset("outer", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("inner", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn reads_enum_values_by_name() {
        let btf = KernelBtf::parse(&sample_btf()).unwrap();
        let values = btf.enum_values("reason").unwrap();
        assert!(values.contains(&("R_FULL_RING".to_owned(), 77)));
        assert!(btf.enum_values("missing").is_err());
    }

    /// A module's split BTF on top of `base`: `struct tun_file { int pad;
    /// outer *tun; }` whose member `tun` points at... only offsets matter.
    fn split_btf(base: &[u8]) -> Vec<u8> {
        let base_types = 5u32;
        let base_strings = u32_at(base, 20).unwrap();
        let split_strings = b"tun_file\0pad\0tun\0".to_vec();
        let name = |at: u32| base_strings + at;
        let mut types = Vec::new();
        // id 6 (first after the base's 5): ptr to base type 4 (outer).
        for w in [0u32, 2 << 24, 4] {
            types.extend_from_slice(&w.to_le_bytes());
        }
        // id 7: struct tun_file { pad: int @0, tun: ptr(6) @64 bits }
        for w in [
            name(0),
            (KIND_STRUCT << 24) | 2,
            16,
            name(9),
            1,
            0,
            name(13),
            base_types + 1,
            64,
        ] {
            types.extend_from_slice(&w.to_le_bytes());
        }
        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            split_strings.len() as u32,
        ] {
            blob.extend_from_slice(&word.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&split_strings);
        blob
    }

    #[test]
    fn module_split_btf_continues_the_base_ids_and_strings() {
        let base = sample_btf();
        let split = split_btf(&base);
        let btf = KernelBtf::parse_split(&base, &split).unwrap();
        assert_eq!(btf.member_offset("tun_file", "tun"), Ok(8));
        assert_eq!(btf.member_offset("tun_file", "pad"), Ok(0));
        // The base's types are still there, by their own ids.
        assert_eq!(btf.member_offset("outer", "dev"), Ok(8));
        assert!(KernelBtf::parse(&base)
            .unwrap()
            .member_offset("tun_file", "tun")
            .is_err());
        assert!(KernelBtf::parse_split(&base, b"garbage, not btf at all").is_err());
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert_eq!(
            KernelBtf::parse(b"not btf at all, really").err(),
            Some(BtfError::BadHeader)
        );
        let blob = sample_btf();
        for cut in [24, 30, 60, blob.len() - 5] {
            assert!(KernelBtf::parse(&blob[..cut]).is_err(), "cut at {cut}");
        }
    }
}

/// Offsets the drop/dequeue tracepoint programs read through
/// bpf_probe_read_kernel, resolved from this kernel's BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkbOffsets {
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub skb_len: u32,
    pub sk_family: u32,
    pub skb_data: u32,
    pub skb_data_len: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
}

impl KernelBtf {
    pub fn skb_offsets(&self) -> Result<SkbOffsets, BtfError> {
        Ok(SkbOffsets {
            skb_dev: self.member_offset("sk_buff", "dev")?,
            skb_sk: self.member_offset("sk_buff", "sk")?,
            skb_len: self.member_offset("sk_buff", "len")?,
            skb_data: self.member_offset("sk_buff", "data")?,
            skb_data_len: self.member_offset("sk_buff", "data_len")?,
            sk_family: self.member_offset("sock", "__sk_common")?
                + self.member_offset("sock_common", "skc_family")?,
            dev_ifindex: self.member_offset("net_device", "ifindex")?,
            // possible_net_t wraps one pointer at offset 0.
            dev_nd_net: self.member_offset("net_device", "nd_net")?,
            net_ns_inum: self.member_offset("net", "ns")?
                + self.member_offset("ns_common", "inum")?,
        })
    }

    /// Drop reason numbers to names, e.g. 77 -> "full_ring", from
    /// `enum skb_drop_reason` (SKB_DROP_REASON_ prefix removed, lowercased).
    pub fn drop_reasons(&self) -> Result<HashMap<u32, String>, BtfError> {
        Ok(self
            .enum_values("skb_drop_reason")?
            .into_iter()
            .filter_map(|(name, value)| {
                let short = name.strip_prefix("SKB_DROP_REASON_")?;
                Some((u32::try_from(value).ok()?, short.to_lowercase()))
            })
            .collect())
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    /// This machine's own BTF, when it has one (CI's kernel does).
    #[test]
    fn this_kernels_btf_has_what_the_probes_need() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("no /sys/kernel/btf/vmlinux here; covered by the synthetic tests only");
            return;
        };
        let btf = KernelBtf::parse(&data).unwrap();
        let offsets = btf.skb_offsets().unwrap();
        assert!(
            offsets.skb_dev < 256 && offsets.skb_len < 256,
            "{offsets:?}"
        );
        assert_ne!(offsets.skb_dev, offsets.skb_sk);
        let reasons = btf.drop_reasons().unwrap();
        assert!(
            reasons.values().any(|r| r == "full_ring"),
            "no FULL_RING drop reason"
        );
        assert!(reasons.values().any(|r| r == "not_specified"));
        eprintln!("{offsets:?}; {} drop reasons", reasons.len());
    }
}
