//! The guest's boot files: a Debian kernel and busybox-static unpacked by
//! `cargo xtask setup` (apt-get download + dpkg-deb -x, no image
//! downloads), and an initramfs generated here from them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};

use super::cpio::NewcWriter;

const INIT: &str = include_str!("init.sh");
const UDHCPC_SCRIPT: &str = include_str!("../scripts/udhcpc.sh");
/// The modules the guest loads; their dependencies are found from each
/// module's own `depends=` record.
const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_net"];

/// Where `cargo xtask setup` unpacks the guest packages.
pub fn default_cache() -> PathBuf {
    std::env::var_os("HVNET_GUEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/hvnet-guest"))
}

#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    /// `lib/modules/<release>` of the unpacked kernel package.
    pub modules_dir: PathBuf,
    /// The static busybox unpacked beside it.
    pub busybox: PathBuf,
}

impl GuestImage {
    /// Finds the unpacked kernel, its modules and busybox under `cache`.
    pub fn locate(cache: &Path) -> anyhow::Result<Self> {
        let root = cache.join("root");
        let boot = root.join("boot");
        let kernel = std::fs::read_dir(&boot)
            .with_context(|| {
                format!(
                    "no guest kernel at {} (run `cargo xtask setup`)",
                    boot.display()
                )
            })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
        let release = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .context("kernel file name")?
            .to_owned();
        let modules_dir = root.join("lib/modules").join(&release);
        let busybox = root.join("bin/busybox");
        for needed in [&modules_dir, &busybox] {
            if !needed.exists() {
                bail!("{} is missing (run `cargo xtask setup`)", needed.display());
            }
        }
        Ok(Self {
            kernel,
            modules_dir,
            busybox,
        })
    }

    /// Writes an initramfs with busybox, the virtio-net modules (in load
    /// order) and the guest's /init.
    pub fn write_initramfs(&self, out: &Path) -> anyhow::Result<()> {
        let modules = module_load_order(&self.modules_dir, GUEST_MODULES)?;
        let mut w = NewcWriter::new(Vec::new());
        for dir in [
            "bin",
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "lib",
            "lib/modules",
        ] {
            w.dir(dir)?;
        }
        w.char_device("dev/console", 5, 1)?;
        w.file("bin/busybox", 0o755, &std::fs::read(&self.busybox)?)?;
        w.file("bin/sh", 0o755, &std::fs::read(&self.busybox)?)?;
        w.file("init", 0o755, INIT.as_bytes())?;
        w.file("udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes())?;
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
        std::fs::write(out, w.finish()?).with_context(|| format!("writing {}", out.display()))
    }
}

/// Module names as the kernel spells them: dashes become underscores.
/// Newer Debian kernels ship modules xz-compressed (`tun.ko.xz`).
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))?;
    Some(stem.replace('-', "_"))
}

/// A module's ELF image, decompressed if it is `.ko.xz` (busybox insmod
/// hands the kernel the bytes as they are).
pub fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.extension().and_then(|e| e.to_str()) != Some("xz") {
        return std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    }
    let out = std::process::Command::new("xz")
        .arg("-dc")
        .arg(path)
        .output()
        .context("running xz (apt package xz-utils)")?;
    if !out.status.success() {
        bail!(
            "xz -dc {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = module_name(&path) {
            index.insert(name, path);
        }
    }
    Ok(())
}

/// The `depends=` record of a module's .modinfo section.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    ko.windows(KEY.len())
        .position(|w| w == KEY)
        .map(|at| {
            let rest = &ko[at + KEY.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `wanted` and their dependencies, dependencies first. A module absent
/// from the tree is taken as built into the kernel.
pub fn module_load_order(dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut index = HashMap::new();
    index_modules(&dir.join("kernel"), &mut index)
        .with_context(|| format!("listing modules under {}", dir.display()))?;
    let mut order: Vec<(String, PathBuf)> = Vec::new();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> anyhow::Result<()> {
        if depth > 32 {
            bail!("module dependency loop at {name}");
        }
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            return Ok(());
        };
        let data = read_module(path)?;
        for dep in module_depends(&data) {
            visit(&dep, index, order, depth + 1)?;
        }
        order.push((name.to_owned(), path.clone()));
        Ok(())
    }
    for name in wanted {
        visit(name, &index, &mut order, 0)?;
    }
    if order.is_empty() {
        bail!("none of {wanted:?} found under {}", dir.display());
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_and_plain_modules_have_kernel_names() {
        assert_eq!(
            module_name(Path::new("a/vhost-net.ko")).as_deref(),
            Some("vhost_net")
        );
        assert_eq!(
            module_name(Path::new("a/tun.ko.xz")).as_deref(),
            Some("tun")
        );
        assert_eq!(module_name(Path::new("a/modules.order")), None);
    }

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko = b"\x7fELF...license=GPL\0depends=virtio_ring,virtio,net_failover\0intree=Y\0";
        assert_eq!(
            module_depends(ko),
            vec!["virtio_ring", "virtio", "net_failover"]
        );
        assert!(module_depends(b"depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }
}
