//! Which VM is behind a tap. Sources, best first, each optional:
//! libvirt's running-domain status XML (name, UUID, nova metadata, MAC);
//! the process holding the tap (`/proc/*/fdinfo` `iff:`) and its QEMU
//! command line (`-name`, `-uuid`, the NIC's MAC); OpenStack/Neutron tap
//! naming (`tap` + the port UUID's first 11 characters); else the tap
//! itself. Files are read, libvirt is never called (its API can hang on
//! domain locks while a VM is in trouble: exactly when hvnet is needed).

pub mod qemu_cmdline;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use serde::{Deserialize, Serialize};

use qemu_cmdline::{looks_like_vmm, parse_qemu_cmdline, TapHandle};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub vm_name: String,
    pub vm_uuid: String,
    /// The guest NIC's MAC (not the tap's).
    pub mac: String,
    pub project: String,
    pub flavor: String,
    pub domain: String,
    /// The Neutron port UUID prefix from the tap name, when it follows that scheme.
    pub neutron_port: String,
    /// Which source named it: libvirt, qemu, neutron_name, tap.
    pub source: String,
    /// The VMM (QEMU) process: libvirt's status file or the tap's holder.
    pub vmm_pid: Option<u32>,
    /// Its vhost worker threads (tids): where to look (`/proc/<tid>/stack`)
    /// when a VM with vhost-net stops draining its queue.
    pub vhost_workers: Vec<u32>,
}

impl Identity {
    /// Named only by the tap (or its Neutron naming): worth looking again
    /// soon, a VM's status file or its QEMU may just be appearing.
    pub fn is_weak(&self) -> bool {
        matches!(self.source.as_str(), "tap" | "neutron_name")
    }

    /// The details an on-call engineer needs to find the VM and its VMM:
    /// "uuid ..., mac ..., VMM pid N, vhost workers a b" (known parts only).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.vm_uuid.is_empty() {
            parts.push(format!("uuid {}", self.vm_uuid));
        }
        if !self.mac.is_empty() {
            parts.push(format!("mac {}", self.mac));
        }
        if let Some(pid) = self.vmm_pid {
            parts.push(format!("VMM pid {pid}"));
        }
        if !self.vhost_workers.is_empty() {
            let tids: Vec<String> = self.vhost_workers.iter().map(u32::to_string).collect();
            parts.push(format!("vhost workers {}", tids.join(" ")));
        }
        parts.push(format!("named from {}", self.source));
        parts.join(", ")
    }
}

/// An interface libvirt lists for a domain but hvnet does not watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub domain: String,
    pub device: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("libvirt status file {path}: {reason}")]
    Xml { path: String, reason: String },
}

/// A domain's taps with their identities, and the interfaces skipped.
pub type DomainTaps = (Vec<(String, Identity)>, Vec<Skipped>);

fn child<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> Option<roxmltree::Node<'a, 'a>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn text_of(node: Option<roxmltree::Node<'_, '_>>) -> String {
    node.and_then(|n| n.text()).unwrap_or("").trim().to_owned()
}

/// Taps (target dev) of one libvirt status/domain XML, with identities,
/// plus the interfaces skipped and why.
pub fn parse_libvirt_xml(path: &str, xml: &str) -> Result<DomainTaps, IdentityError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| IdentityError::Xml {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let root = doc.root_element();
    let domain = if root.tag_name().name() == "domain" {
        Some(root)
    } else {
        child(root, "domain")
    };
    let Some(domain) = domain else {
        return Err(IdentityError::Xml {
            path: path.to_owned(),
            reason: "no <domain> element".into(),
        });
    };
    let vmm_pid = (root.tag_name().name() == "domstatus")
        .then(|| root.attribute("pid"))
        .flatten()
        .and_then(|p| p.parse().ok());
    let domain_name = text_of(child(domain, "name"));
    let uuid = text_of(child(domain, "uuid"));
    let nova = child(domain, "metadata").and_then(|m| child(m, "instance"));
    let nova_name = text_of(nova.and_then(|n| child(n, "name")));
    let flavor = nova
        .and_then(|n| child(n, "flavor"))
        .and_then(|f| f.attribute("name"))
        .unwrap_or("")
        .to_owned();
    let project = text_of(
        nova.and_then(|n| child(n, "owner"))
            .and_then(|o| child(o, "project")),
    );
    let mut taps = Vec::new();
    let mut skipped = Vec::new();
    let Some(devices) = child(domain, "devices") else {
        return Ok((taps, skipped));
    };
    for iface in devices
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "interface")
    {
        // A libvirt network says in <actual> what it really created (a
        // macvtap "network" has no tap either).
        let kind = child(iface, "actual")
            .and_then(|a| a.attribute("type"))
            .or_else(|| iface.attribute("type"))
            .unwrap_or("");
        let Some(dev) = child(iface, "target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        if kind == "direct" || kind == "hostdev" || kind == "vhostuser" {
            skipped.push(Skipped {
                domain: domain_name.clone(),
                device: dev.to_owned(),
                reason: format!(
                    "{kind} interface: no host tap carries its traffic, hvnet cannot watch it"
                ),
            });
            continue;
        }
        let mac = child(iface, "mac")
            .and_then(|m| m.attribute("address"))
            .unwrap_or("")
            .to_lowercase();
        taps.push((
            dev.to_owned(),
            Identity {
                vm_name: if nova_name.is_empty() {
                    domain_name.clone()
                } else {
                    nova_name.clone()
                },
                vm_uuid: uuid.clone(),
                mac,
                project: project.clone(),
                flavor: flavor.clone(),
                domain: domain_name.clone(),
                neutron_port: neutron_port(dev).unwrap_or_default(),
                source: "libvirt".into(),
                vmm_pid,
                vhost_workers: Vec::new(),
            },
        ));
    }
    Ok((taps, skipped))
}

/// `tap` + 11 characters of a Neutron port UUID (8 hex, '-', 2 hex).
pub fn neutron_port(tap: &str) -> Option<String> {
    let rest = tap.strip_prefix("tap")?;
    let ok = rest.len() == 11
        && rest.char_indices().all(|(i, c)| {
            if i == 8 {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    ok.then(|| rest.to_owned())
}

/// The interface a tun fd is bound to, from /proc/<pid>/fdinfo/<fd>.
pub fn fdinfo_tap(fdinfo: &str) -> Option<&str> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("iff:"))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Reads the identity sources from a libvirt run directory and a /proc.
pub struct IdentityResolver {
    libvirt_dir: PathBuf,
    proc_root: PathBuf,
    /// "Permission denied" is said once per source, not at every refresh.
    denied_libvirt: AtomicBool,
    denied_proc: AtomicBool,
}

/// What one walk of /proc found.
#[derive(Default)]
struct ProcScan {
    /// Wanted taps and the VMM holding each.
    holders: HashMap<String, Identity>,
    /// vhost kernel threads (Linux < 6.4) by the VMM pid they serve.
    kthread_workers: HashMap<u32, Vec<u32>>,
}

/// The numerically named entries of a directory (/proc's pids, a task dir's tids).
fn numbered_entries(dir: &Path) -> Vec<(u32, PathBuf)> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
                .collect()
        })
        .unwrap_or_default()
}

/// The VMM pid a `vhost-<pid>` worker serves.
fn vhost_owner(comm: &str) -> Option<u32> {
    comm.trim().strip_prefix("vhost-")?.parse().ok()
}

/// A process's argv (empty for kernel threads and vanished processes).
fn read_cmdline(pid_dir: &Path) -> Vec<String> {
    std::fs::read(pid_dir.join("cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn is_denied(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::PermissionDenied
}

impl IdentityResolver {
    pub fn new(libvirt_dir: &Path, proc_root: &Path) -> Self {
        Self {
            libvirt_dir: libvirt_dir.to_owned(),
            proc_root: proc_root.to_owned(),
            denied_libvirt: AtomicBool::new(false),
            denied_proc: AtomicBool::new(false),
        }
    }

    /// Identity sources are optional, but an unreadable one silently turns
    /// VM names into tap names: say so once, with the fix.
    fn warn_denied(&self, flag: &AtomicBool, what: &str, fix: &str) {
        if !flag.swap(true, Ordering::Relaxed) {
            log::warn!(
                "cannot read {what}: permission denied; VMs there are named by their taps ({fix})"
            );
        }
    }

    fn read_libvirt(&self) -> (HashMap<String, Identity>, Vec<Skipped>) {
        let mut taps = HashMap::new();
        let mut skipped = Vec::new();
        let libvirt_fix = "libvirt's status files are root-only: give hvnet CAP_DAC_READ_SEARCH";
        let entries = match std::fs::read_dir(&self.libvirt_dir) {
            Ok(entries) => entries,
            Err(err) => {
                if is_denied(&err) {
                    let what = self.libvirt_dir.display().to_string();
                    self.warn_denied(&self.denied_libvirt, &what, libvirt_fix);
                }
                return (taps, skipped);
            }
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "xml") {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(err) => {
                    if is_denied(&err) {
                        let what = path.display().to_string();
                        self.warn_denied(&self.denied_libvirt, &what, libvirt_fix);
                    }
                    continue;
                }
            };
            match parse_libvirt_xml(&path.display().to_string(), &text) {
                Ok((found, skip)) => {
                    taps.extend(found);
                    skipped.extend(skip);
                }
                // libvirt rewrites these files; a half-written one is retried later.
                Err(err) => log::debug!("{err}"),
            }
        }
        (taps, skipped)
    }

    /// One walk of /proc: the VMMs holding the `wanted` taps, and the vhost
    /// kernel threads. Only VMMs' fds are read (one cmdline read per process
    /// instead of one fdinfo read per fd of every process on the node), and
    /// only kernel threads' names.
    fn scan_proc(&self, wanted: &[&str]) -> ProcScan {
        let mut scan = ProcScan::default();
        for (pid, pid_dir) in numbered_entries(&self.proc_root) {
            let args = read_cmdline(&pid_dir);
            if args.is_empty() {
                let comm = std::fs::read_to_string(pid_dir.join("comm")).unwrap_or_default();
                if let Some(owner) = vhost_owner(&comm) {
                    scan.kthread_workers.entry(owner).or_default().push(pid);
                }
            } else if !wanted.is_empty() && looks_like_vmm(&args) {
                self.read_vmm_fds(pid, &pid_dir, &args, wanted, &mut scan.holders);
            }
        }
        scan
    }

    /// The `wanted` taps VMM `pid` holds, named from its command line.
    fn read_vmm_fds(
        &self,
        pid: u32,
        pid_dir: &Path,
        args: &[String],
        wanted: &[&str],
        holders: &mut HashMap<String, Identity>,
    ) {
        let fds = match std::fs::read_dir(pid_dir.join("fdinfo")) {
            Ok(fds) => fds,
            Err(err) => {
                if is_denied(&err) {
                    self.warn_denied(
                        &self.denied_proc,
                        "other users' /proc/<pid>/fdinfo (the VMMs holding the taps)",
                        "give hvnet CAP_SYS_PTRACE, which it uses only to read /proc",
                    );
                }
                return;
            }
        };
        for fd_path in fds.filter_map(Result::ok).map(|e| e.path()) {
            let Ok(info) = std::fs::read_to_string(&fd_path) else {
                continue;
            };
            let Some(tap) = fdinfo_tap(&info) else {
                continue;
            };
            // Several processes may hold one tap (a VMM while it starts
            // up, multiqueue fds): a named VM beats an unnamed holder.
            let named = |i: &Identity| !i.vm_uuid.is_empty() || !i.vm_name.is_empty();
            if !wanted.contains(&tap) || holders.get(tap).is_some_and(named) {
                continue;
            }
            let fd = fd_path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_owned();
            let handle = TapHandle {
                fd: &fd,
                ifname: tap,
            };
            if let Some(nic) = parse_qemu_cmdline(args, handle) {
                let identity = Identity {
                    vm_name: nic.vm_name,
                    vm_uuid: nic.vm_uuid,
                    mac: nic.mac,
                    source: "qemu".into(),
                    vmm_pid: Some(pid),
                    ..Default::default()
                };
                holders.insert(tap.to_owned(), identity);
            }
        }
    }

    /// vhost worker tids per owner pid. Since Linux 6.4 a worker is a
    /// thread of the VMM named `vhost-<pid>`; before, a kernel thread of the
    /// same name (found by [`Self::scan_proc`]): look in both places.
    fn vhost_workers(
        &self,
        owners: &[u32],
        kthread_workers: &HashMap<u32, Vec<u32>>,
    ) -> HashMap<u32, Vec<u32>> {
        let mut workers: HashMap<u32, Vec<u32>> = HashMap::new();
        for owner in owners {
            let task_dir = self.proc_root.join(owner.to_string()).join("task");
            let threads = numbered_entries(&task_dir).into_iter().filter(|(_, task)| {
                let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
                vhost_owner(&comm) == Some(*owner)
            });
            let mut tids: Vec<u32> = threads.map(|(tid, _)| tid).collect();
            tids.extend(kthread_workers.get(owner).into_iter().flatten());
            tids.sort_unstable();
            tids.dedup();
            if !tids.is_empty() {
                workers.insert(*owner, tids);
            }
        }
        workers
    }

    /// Identities for `taps`, best source first; every tap gets one.
    pub fn resolve(&self, taps: &[&str]) -> (HashMap<String, Identity>, Vec<Skipped>) {
        let (mut libvirt, skipped) = self.read_libvirt();
        let missing: Vec<&str> = taps
            .iter()
            .copied()
            .filter(|t| !libvirt.contains_key(*t))
            .collect();
        let mut scan = if taps.is_empty() {
            ProcScan::default()
        } else {
            self.scan_proc(&missing)
        };
        let mut out = HashMap::new();
        for tap in taps {
            let identity = libvirt
                .remove(*tap)
                .or_else(|| scan.holders.remove(*tap))
                .or_else(|| {
                    neutron_port(tap).map(|port| Identity {
                        vm_name: (*tap).to_owned(),
                        neutron_port: port,
                        source: "neutron_name".into(),
                        ..Default::default()
                    })
                })
                .unwrap_or_else(|| Identity {
                    vm_name: (*tap).to_owned(),
                    source: "tap".into(),
                    ..Default::default()
                });
            let mut identity = identity;
            // A QEMU started without -name still gives its pid and MAC;
            // the tap names the VM then.
            if identity.vm_name.is_empty() {
                identity.vm_name = (*tap).to_owned();
            }
            out.insert((*tap).to_owned(), identity);
        }
        let owners: Vec<u32> = out.values().filter_map(|i| i.vmm_pid).collect();
        if !owners.is_empty() {
            let workers = self.vhost_workers(&owners, &scan.kthread_workers);
            for identity in out.values_mut() {
                if let Some(tids) = identity.vmm_pid.and_then(|p| workers.get(&p)) {
                    identity.vhost_workers = tids.clone();
                }
            }
        }
        (out, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/libvirt")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn plain_libvirt_domain() {
        let (taps, skipped) = parse_libvirt_xml("plain.xml", &fixture("plain.xml")).unwrap();
        assert!(skipped.is_empty());
        let (tap, id) = &taps[0];
        assert_eq!(tap, "vnet0");
        assert_eq!(
            (id.vm_name.as_str(), id.vm_uuid.as_str(), id.mac.as_str()),
            (
                "web-1",
                "6f1c2a9e-5b7d-4c1e-9a3f-2b8d7e6c5a41",
                "52:54:00:12:34:56"
            )
        );
        assert_eq!(id.source, "libvirt");
    }

    #[test]
    fn nova_domain_with_metadata_ovs_port_and_a_skipped_macvtap() {
        let (taps, skipped) = parse_libvirt_xml("nova.xml", &fixture("nova.xml")).unwrap();
        assert_eq!(taps.len(), 2);
        let eth = &taps.iter().find(|(t, _)| t == "tap3f2a1c9d-1e").unwrap().1;
        assert_eq!(eth.vm_name, "db-primary");
        assert_eq!(eth.domain, "instance-0000002a");
        assert_eq!(eth.project, "payments");
        assert_eq!(eth.flavor, "m1.large");
        assert_eq!(eth.neutron_port, "3f2a1c9d-1e");
        assert_eq!(eth.mac, "fa:16:3e:5a:6b:7c");
        assert!(
            taps.iter().any(|(t, _)| t == "tap7d2e9c4b-00"),
            "OVS port tap"
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].device, "macvtap0");
        assert!(skipped[0].reason.contains("direct"));
    }

    #[test]
    fn libvirt_networks_follow_what_libvirt_actually_created() {
        let (taps, skipped) = parse_libvirt_xml("networks.xml", &fixture("networks.xml")).unwrap();
        assert_eq!(taps.len(), 1, "{taps:?}");
        let (dev, id) = &taps[0];
        assert_eq!(dev, "vnet7");
        assert_eq!(
            (id.vm_name.as_str(), id.mac.as_str(), id.vmm_pid),
            ("batch-7", "52:54:00:07:00:01", Some(6161))
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].device, "macvtap7");
        assert!(skipped[0].reason.contains("direct"), "{:?}", skipped[0]);
    }

    #[test]
    fn a_half_written_file_is_an_error_not_a_panic() {
        assert!(parse_libvirt_xml("broken.xml", &fixture("broken.xml")).is_err());
    }

    #[test]
    fn neutron_names_and_fdinfo() {
        assert_eq!(
            neutron_port("tap3f2a1c9d-1e").as_deref(),
            Some("3f2a1c9d-1e")
        );
        assert_eq!(neutron_port("tap0"), None);
        assert_eq!(neutron_port("vnet12"), None);
        assert_eq!(
            fdinfo_tap("pos:\t0\nflags:\t0104002\nmnt_id:\t25\niff:\tvnet3\n"),
            Some("vnet3")
        );
        assert_eq!(fdinfo_tap("pos:\t0\n"), None);
    }

    /// A libvirt dir with the nova fixture (VMM pid 5151).
    fn root_nova(root: &Path) -> PathBuf {
        let dir = root.join("libvirt-nova");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("nova.xml"), fixture("nova.xml")).unwrap();
        dir
    }

    /// A /proc where VMM 5151's vhost worker is kernel thread 77 (< 6.4).
    fn proc_root_kthread(root: &Path) -> PathBuf {
        let dir = root.join("proc-kthread");
        std::fs::create_dir_all(dir.join("77")).unwrap();
        std::fs::write(dir.join("77/comm"), "vhost-5151\n").unwrap();
        std::fs::create_dir_all(dir.join("78")).unwrap();
        std::fs::write(dir.join("78/comm"), "vhost-9999\n").unwrap();
        dir
    }

    #[test]
    fn resolver_prefers_libvirt_then_proc_then_naming_then_the_tap() {
        let root = std::env::temp_dir().join(format!("hvnet-identity-{}", std::process::id()));
        let libvirt = root.join("libvirt");
        let proc_root = root.join("proc");
        std::fs::create_dir_all(&libvirt).unwrap();
        std::fs::write(libvirt.join("web-1.xml"), fixture("plain.xml")).unwrap();
        std::fs::write(libvirt.join("broken.xml"), fixture("broken.xml")).unwrap();
        let pid = proc_root.join("4242");
        std::fs::create_dir_all(pid.join("fdinfo")).unwrap();
        std::fs::write(pid.join("fdinfo/31"), "pos:\t0\niff:\tvnet1\n").unwrap();
        std::fs::write(pid.join("fdinfo/4"), "pos:\t0\n").unwrap();
        std::fs::write(
            pid.join("cmdline"),
            "qemu-system-x86_64\0-name\0guest=api-1\0-uuid\0aaaa-bbbb\0-netdev\0tap,fd=31,id=hostnet0\0-device\0virtio-net-pci,netdev=hostnet0,mac=52:54:00:00:00:31\0",
        )
        .unwrap();
        // QEMU 4242's threads: a vCPU and a vhost worker (Linux >= 6.4);
        // libvirt's VM (pid 4242 in plain.xml, too) shares it here. A
        // kernel-thread worker (older kernels) of VMM 5151 elsewhere.
        for (tid, comm) in [
            ("4242", "qemu-system-x86\n"),
            ("4250", "CPU 0/KVM\n"),
            ("4251", "vhost-4242\n"),
        ] {
            let task = pid.join("task").join(tid);
            std::fs::create_dir_all(&task).unwrap();
            std::fs::write(task.join("comm"), comm).unwrap();
        }
        std::fs::write(pid.join("comm"), "qemu-system-x86\n").unwrap();
        let resolver = IdentityResolver::new(&libvirt, &proc_root);
        let (ids, _) = resolver.resolve(&["vnet0", "vnet1", "tap3f2a1c9d-1e", "tap9"]);
        assert_eq!(ids["vnet0"].vmm_pid, Some(4242), "libvirt's domstatus pid");
        assert_eq!(ids["vnet1"].vmm_pid, Some(4242), "the tap's holder");
        assert_eq!(ids["vnet1"].vhost_workers, [4251]);
        assert_eq!(ids["tap9"].vmm_pid, None);
        let resolver = IdentityResolver::new(&root_nova(&root), &proc_root_kthread(&root));
        let (nova, _) = resolver.resolve(&["tap7d2e9c4b-00"]);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(nova["tap7d2e9c4b-00"].vmm_pid, Some(5151));
        assert_eq!(
            nova["tap7d2e9c4b-00"].vhost_workers,
            [77],
            "a kernel-thread worker"
        );
        assert!(ids["tap9"].vhost_workers.is_empty());
        assert_eq!(
            (ids["vnet0"].source.as_str(), ids["vnet0"].vm_name.as_str()),
            ("libvirt", "web-1")
        );
        assert_eq!(
            (
                ids["vnet1"].source.as_str(),
                ids["vnet1"].vm_name.as_str(),
                ids["vnet1"].mac.as_str()
            ),
            ("qemu", "api-1", "52:54:00:00:00:31")
        );
        assert_eq!(ids["tap3f2a1c9d-1e"].source, "neutron_name");
        assert_eq!(
            (ids["tap9"].source.as_str(), ids["tap9"].vm_name.as_str()),
            ("tap", "tap9")
        );
    }
}
