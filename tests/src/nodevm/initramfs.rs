//! The compute-node VM's initramfs: the unpacked Debian kernel's modules,
//! busybox-static, and host binaries (hvnet, the lab, iproute2, dnsmasq,
//! test binaries) each at its host path with the shared libraries `ldd`
//! names, so the binaries run unchanged inside the VM.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::guest::{
    cpio::NewcWriter,
    image::{module_load_order, read_module, GuestImage},
};

const INIT: &str = include_str!("node-init.sh");
const UDHCPC_SCRIPT: &str = include_str!("../scripts/udhcpc.sh");
/// What a compute node loads: taps, veths, the bridge, vhost-net, and both
/// tc paths (clsact via sch_ingress, cls_bpf filters). Dependencies come
/// from each module's `depends=`; a module absent from the tree is built in.
const NODE_MODULES: &[&str] = &[
    "tun",
    "veth",
    "bridge",
    "vhost_net",
    "sch_ingress",
    "cls_bpf",
    // The coexistence checks add a foreign u32 filter first.
    "cls_u32",
    // The hop checks: a bridge nftables rule drops a reply; a DHCP server
    // behind a VXLAN tunnel.
    "nf_tables",
    // Meta expressions (oifname) in the bridge family live here; the VM
    // has no modprobe to load it on demand.
    "nft_meta_bridge",
    "vxlan",
];
/// Enough of /etc for dnsmasq (`--user=root`) and the lab's tools.
const ETC_FILES: &[(&str, &str)] = &[
    (
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    ),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hosts", "127.0.0.1 localhost\n"),
    ("etc/resolv.conf", ""),
    (
        "etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files\n",
    ),
];

/// Host files to carry into the VM, by the absolute path they keep there.
#[derive(Debug, Default)]
pub struct Payload {
    files: BTreeMap<String, PathBuf>,
    /// Directories that must exist even if empty (e.g. a `..` in a path
    /// compiled into a test binary must resolve).
    dirs: BTreeSet<String>,
}

impl Payload {
    /// `binary` at its own path, and every shared library it links.
    pub fn binary(&mut self, binary: &Path) -> anyhow::Result<()> {
        let binary = std::path::absolute(binary)?;
        if !binary.is_file() {
            bail!("{} does not exist (build it first)", binary.display());
        }
        for lib in shared_libraries(&binary)? {
            self.add(&lib)?;
        }
        self.add(&binary)
    }

    /// A host tool found on PATH (e.g. `dnsmasq`), with its libraries.
    pub fn tool(&mut self, name: &str) -> anyhow::Result<()> {
        let found = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
            .with_context(|| {
                format!("{name} is not installed (`cargo xtask setup` installs it)")
            })?;
        self.binary(&found)
    }

    pub fn dir(&mut self, path: &Path) {
        self.dirs
            .insert(path.to_string_lossy().trim_start_matches('/').to_owned());
    }

    fn add(&mut self, path: &Path) -> anyhow::Result<()> {
        let source =
            std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        let dest = path.to_string_lossy().trim_start_matches('/').to_owned();
        self.files.insert(dest, source);
        Ok(())
    }
}

/// The libraries (and the ELF interpreter) `ldd` resolves for `binary`;
/// none for a static binary.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(parse_ldd(&text))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; vDSO lines have no path.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Every ancestor directory of `path`, outermost first.
fn ancestors(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path.split('/').collect();
    (1..parts.len()).map(|n| parts[..n].join("/")).collect()
}

/// Writes the node VM's initramfs: /init runs `plan` (one
/// "<label>\t<command>" per line).
pub fn write(image: &GuestImage, payload: &Payload, plan: &str, out: &Path) -> anyhow::Result<()> {
    let modules = module_load_order(&image.modules_dir, NODE_MODULES)?;
    let busybox = std::fs::read(&image.busybox)?;
    let mut w = NewcWriter::new(std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    ));
    let mut dirs: BTreeSet<String> = [
        "bin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "etc",
        "var",
        "lib/modules",
    ]
    .iter()
    .map(|d| d.to_string())
    .collect();
    for dest in payload.files.keys().chain(payload.dirs.iter()) {
        dirs.extend(ancestors(dest));
    }
    dirs.extend(payload.dirs.iter().cloned());
    dirs.extend(ancestors("lib/modules/x"));
    dirs.extend(ancestors("usr/bin/busybox"));
    // BTreeSet order puts every parent before its children.
    for dir in &dirs {
        w.dir(dir)?;
    }
    w.char_device("dev/console", 5, 1)?;
    w.file("bin/busybox", 0o755, &busybox)?;
    w.symlink("bin/sh", "busybox")?;
    // The lab runs `busybox udhcpc`/`busybox ping` by name.
    w.file("usr/bin/busybox", 0o755, &busybox)?;
    w.file("init", 0o755, INIT.as_bytes())?;
    w.file("plan", 0o644, plan.as_bytes())?;
    w.file("udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes())?;
    for (path, content) in ETC_FILES {
        w.file(path, 0o644, content.as_bytes())?;
    }
    for (dest, source) in &payload.files {
        let data =
            std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        w.file(dest, 0o755, &data)?;
    }
    let mut order = String::new();
    for (name, path) in &modules {
        w.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &read_module(path)?,
        )?;
        order.push_str(name);
        order.push('\n');
    }
    w.file("modules.order", 0o644, order.as_bytes())?;
    use std::io::Write as _;
    w.finish()?.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_and_interpreter_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f1)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn ancestors_come_outermost_first() {
        assert_eq!(
            ancestors("usr/lib/x/libc.so"),
            ["usr", "usr/lib", "usr/lib/x"]
        );
        assert!(ancestors("init").is_empty());
    }
}
