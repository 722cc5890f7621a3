//! What a QEMU command line says about a VM and the NIC behind one tap.
//!
//! Options come in two syntaxes, both seen in the wild: QEMU's keyval
//! (`-netdev tap,fd=28,id=hostnet0`) and JSON, which libvirt has generated
//! for `-netdev`/`-device` since 7.x
//! (`-device {"driver":"virtio-net-pci","netdev":"hostnet0","mac":"52:54:00:.."}`).
//! The tap is found by the fd QEMU holds it on (`fd=`/`fds=`, as libvirt
//! passes taps) or by name (`ifname=`, when QEMU opened it itself), through
//! `-netdev` + `-device` or the one-option `-nic`.

use std::collections::HashMap;

/// How the tap shows up in the VMM: the fd number it holds, and its name.
#[derive(Debug, Clone, Copy)]
pub struct TapHandle<'a> {
    pub fd: &'a str,
    pub ifname: &'a str,
}

/// The VM and NIC as one QEMU process describes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuNic {
    /// `-name guest=...` (empty when the VM was started without a name).
    pub vm_name: String,
    pub vm_uuid: String,
    /// The guest NIC's MAC, lower case (empty if the NIC is not found).
    pub mac: String,
}

/// `--flag` is QEMU's spelling of `-flag` too.
fn flag_name(arg: &str) -> Option<&str> {
    let rest = arg.strip_prefix('-')?;
    Some(rest.strip_prefix('-').unwrap_or(rest))
}

/// The values of every occurrence of `flag`.
fn values<'a>(args: &'a [String], flag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    args.windows(2)
        .filter(move |w| flag_name(&w[0]) == Some(flag))
        .map(|w| w[1].as_str())
}

/// An option value as key -> value; `implied` names a bare first element
/// (`tap` in `tap,fd=3` is the type, `virtio-net-pci` the driver).
fn options(value: &str, implied: &str) -> HashMap<String, String> {
    if value.trim_start().starts_with('{') {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(value) else {
            return HashMap::new();
        };
        return map
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect();
    }
    value
        .split(',')
        .enumerate()
        .filter_map(|(i, part)| match part.split_once('=') {
            Some((k, v)) => Some((k.to_owned(), v.to_owned())),
            None if i == 0 && !part.is_empty() => Some((implied.to_owned(), part.to_owned())),
            None => None,
        })
        .collect()
}

fn holds_tap(o: &HashMap<String, String>, tap: TapHandle<'_>) -> bool {
    if o.get("type").is_some_and(|t| t != "tap") {
        return false;
    }
    o.get("fd").is_some_and(|f| f == tap.fd)
        || o.get("fds")
            .is_some_and(|f| f.split(':').any(|x| x == tap.fd))
        || o.get("ifname").is_some_and(|n| n == tap.ifname)
}

/// A QEMU: its program is `qemu-system-*`, `qemu-kvm` or `kvm`, or it
/// carries `-name`/`-uuid`. Not merely "qemu" somewhere in the name: libvirt's
/// `virtqemud` holds each tap for a moment before handing it to QEMU.
pub fn looks_like_vmm(args: &[String]) -> bool {
    let Some(program) = args.first() else {
        return false;
    };
    let base = program.rsplit('/').next().unwrap_or(program);
    let named_like_qemu = base.starts_with("qemu-system-") || base == "qemu-kvm" || base == "kvm";
    named_like_qemu
        || values(args, "name").next().is_some()
        || values(args, "uuid").next().is_some()
}

/// `None` when the process is not a QEMU (see [`looks_like_vmm`]).
pub fn parse_qemu_cmdline(args: &[String], tap: TapHandle<'_>) -> Option<QemuNic> {
    if !looks_like_vmm(args) {
        return None;
    }
    let name = values(args, "name").next().map(|v| {
        let o = options(v, "guest");
        o.get("guest").cloned().unwrap_or_default()
    });
    let uuid = values(args, "uuid").next().map(str::to_owned);
    let via_netdev = || {
        let id = values(args, "netdev")
            .map(|v| options(v, "type"))
            .find(|o| holds_tap(o, tap))?
            .get("id")?
            .clone();
        values(args, "device")
            .map(|v| options(v, "driver"))
            .find(|o| o.get("netdev") == Some(&id))?
            .get("mac")
            .cloned()
    };
    let via_nic = || {
        values(args, "nic")
            .map(|v| options(v, "type"))
            .find(|o| holds_tap(o, tap))?
            .get("mac")
            .cloned()
    };
    Some(QemuNic {
        vm_name: name.unwrap_or_default(),
        vm_uuid: uuid.unwrap_or_default(),
        mac: via_netdev()
            .or_else(via_nic)
            .unwrap_or_default()
            .to_lowercase(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_owned).collect()
    }

    const TAP31: TapHandle<'static> = TapHandle {
        fd: "31",
        ifname: "vnet3",
    };

    #[test]
    fn keyval_netdev_and_device_by_fd() {
        let args = argv("/usr/bin/qemu-system-x86_64 -name guest=web-2,debug-threads=on -uuid 1111-2222 -netdev tap,fd=31,id=hostnet0,vhost=on,vhostfd=32 -device virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:AB:CD:EF,bus=pci.0");
        let nic = parse_qemu_cmdline(&args, TAP31).unwrap();
        assert_eq!(
            (nic.vm_name.as_str(), nic.vm_uuid.as_str(), nic.mac.as_str()),
            ("web-2", "1111-2222", "52:54:00:ab:cd:ef")
        );
        let other = TapHandle {
            fd: "40",
            ifname: "vnet9",
        };
        assert_eq!(parse_qemu_cmdline(&args, other).unwrap().mac, "");
    }

    #[test]
    fn libvirt_json_options_with_multiqueue_fds() {
        let args = vec![
            "/usr/libexec/qemu-kvm".to_owned(),
            "-name".to_owned(),
            "guest=instance-0000002a,debug-threads=on".to_owned(),
            "-uuid".to_owned(),
            "3b8f0c1e-77aa-4d2e-8c9b-1f2e3d4c5b6a".to_owned(),
            "-netdev".to_owned(),
            r#"{"type":"tap","fds":"29:31","vhost":true,"vhostfds":"33:34","id":"hostnet0"}"#.to_owned(),
            "-device".to_owned(),
            r#"{"driver":"virtio-net-pci","mq":true,"vectors":6,"netdev":"hostnet0","id":"net0","mac":"fa:16:3e:5a:6b:7c","bus":"pci.0","addr":"0x3"}"#.to_owned(),
        ];
        let nic = parse_qemu_cmdline(&args, TAP31).unwrap();
        assert_eq!(nic.vm_name, "instance-0000002a");
        assert_eq!(nic.mac, "fa:16:3e:5a:6b:7c");
    }

    #[test]
    fn qemu_that_opened_the_tap_itself_and_the_nic_shorthand() {
        let by_name = argv("qemu-system-x86_64 --name db-1 -netdev tap,id=n0,ifname=vnet3,script=no,downscript=no -device e1000,netdev=n0,mac=52:54:00:00:00:03");
        let nic = parse_qemu_cmdline(&by_name, TAP31).unwrap();
        assert_eq!(
            (nic.vm_name.as_str(), nic.mac.as_str()),
            ("db-1", "52:54:00:00:00:03")
        );

        let shorthand = argv("qemu-system-x86_64 -nic tap,ifname=vnet3,script=no,model=virtio-net-pci,mac=52:54:00:00:00:04");
        let nic = parse_qemu_cmdline(&shorthand, TAP31).unwrap();
        assert_eq!(
            (nic.vm_name.as_str(), nic.mac.as_str()),
            ("", "52:54:00:00:00:04")
        );
    }

    #[test]
    fn not_a_vmm_or_garbage_is_none_or_empty_not_a_panic() {
        assert!(parse_qemu_cmdline(&argv("bash -c true"), TAP31).is_none());
        // libvirt's daemon holds the tap between creating it and exec'ing QEMU.
        assert!(!looks_like_vmm(&argv("/usr/sbin/virtqemud --timeout 120")));
        assert!(!looks_like_vmm(&argv("/usr/sbin/libvirtd")));
        assert!(looks_like_vmm(&argv("/usr/libexec/qemu-kvm -S")));
        assert!(looks_like_vmm(&argv("/usr/bin/qemu-system-aarch64")));
        assert!(parse_qemu_cmdline(&[], TAP31).is_none());
        let broken = argv("qemu-kvm -name -netdev {\"type\":\"tap\" -device ,,,= -uuid");
        let nic = parse_qemu_cmdline(&broken, TAP31).unwrap();
        assert_eq!(nic.mac, "");
    }
}
