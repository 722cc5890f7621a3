//! Idempotent set-up: each step checks first and only acts when something
//! is missing, so a second run takes a second or two.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

/// Debian packages the lab and tests use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",     // ip, tc
    "dnsmasq-base", // the lab's DHCP server
    "busybox",      // udhcpc and ping in the lab's guests
    "isc-dhcp-client",
    "iperf3",
    "tcpdump",
    "curl",
    "prometheus",              // promtool, and the end-to-end test's server
    "prometheus-alertmanager", // the end-to-end test routes alerts through it
    "qemu-system-x86",         // the real-guest test (TCG; no KVM needed)
    "openssl",                 // the secured-agent tests' CA and certificates
    "apache2-utils",           // htpasswd: bcrypt hashes as operators make them
    "chromium",                // the landing page, checked in a real browser
    "fonts-dejavu-core",       // so the browser draws text
    "systemd",                 // systemd-analyze verify of the shipped unit
    "xz-utils",                // newer Debian kernels' modules are .ko.xz
    "nftables",                // the hop lab drops a reply with a bridge rule
];
/// Packages unpacked (not installed) as the real-guest test's boot files:
/// the meta-package's current kernel, and a static busybox for its initramfs.
const GUEST_KERNEL_META: &str = "linux-image-cloud-amd64";
const GUEST_BUSYBOX: &str = "busybox-static";
/// The kernels `cargo xtask test --kernels` boots as compute nodes, by the
/// label the matrix prints: Debian 12's own kernel (no TCX: clsact through
/// netlink) and its 6.12 security/backports kernel (TCX). Each is unpacked
/// from the meta-package's current version, with busybox-static.
pub const MATRIX_KERNELS: &[(&str, &str)] = &[
    ("6.1", "linux-image-cloud-amd64"),
    ("6.12", "linux-image-6.12-cloud-amd64"),
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

pub fn all(root: &Path) -> anyhow::Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    unpack_kernel(&guest_cache(root), GUEST_KERNEL_META)?;
    for (label, meta) in MATRIX_KERNELS {
        unpack_kernel(&kernel_cache(root, label), meta)?;
    }
    Ok(())
}

/// Where the kernel matrix finds the unpacked kernel `label`.
pub fn kernel_cache(root: &Path, label: &str) -> PathBuf {
    root.join("target/hvnet-kernels").join(label)
}

/// Where the real-guest test finds its kernel and busybox (the test reads
/// the same HVNET_GUEST_CACHE).
pub fn guest_cache(root: &Path) -> PathBuf {
    std::env::var_os("HVNET_GUEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/hvnet-guest"))
}

/// Downloads the kernel package `meta` points at and busybox-static with
/// apt-get download and unpacks them with dpkg-deb -x (nothing is installed
/// on the host, no VM image is downloaded). Skipped when already unpacked.
fn unpack_kernel(cache: &Path, meta: &str) -> anyhow::Result<()> {
    let marker = cache.join("unpacked");
    if marker.exists() {
        return Ok(());
    }
    let kernel_package = match kernel_package(meta) {
        Ok(pkg) => pkg,
        Err(_) => {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            kernel_package(meta)?
        }
    };
    eprintln!(
        "setup: fetching boot files into {} ({kernel_package}, {GUEST_BUSYBOX})",
        cache.display()
    );
    let debs = cache.join("debs");
    let _ = std::fs::remove_dir_all(cache);
    std::fs::create_dir_all(&debs)?;
    // apt's sandbox user must be able to write the download directory.
    run(Command::new("chmod").arg("777").arg(&debs))?;
    run(Command::new("apt-get")
        .args(["download", "-qq", &kernel_package, GUEST_BUSYBOX])
        .current_dir(&debs))?;
    let root = cache.join("root");
    for deb in std::fs::read_dir(&debs)?.filter_map(Result::ok) {
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb.path())
            .arg(&root))?;
    }
    std::fs::remove_dir_all(&debs)?;
    std::fs::write(&marker, format!("{kernel_package}\n{GUEST_BUSYBOX}\n"))?;
    Ok(())
}

/// The kernel package the meta-package currently points at.
fn kernel_package(meta: &str) -> anyhow::Result<String> {
    let out = capture(Command::new("apt-cache").args(["depends", meta]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .with_context(|| format!("apt-cache depends {meta} names no kernel"))
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("running rustup: hvnet's eBPF build needs rustup with a nightly toolchain")?;
    if !installed.status.success() {
        bail!("no nightly toolchain: the eBPF programs build with nightly (`rustup toolchain install nightly`)");
    }
    if String::from_utf8_lossy(&installed.stdout).contains("rust-src") {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// bpf-linker built from the crates registry against the nightly's own
/// libLLVM (no prebuilt downloads), installed under ~/.cargo/bin.
fn bpf_linker() -> anyhow::Result<()> {
    let current = Command::new(cargo_bin().join("bpf-linker"))
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    if current.is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM (about a minute)"
    );
    let sysroot =
        capture(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let version = capture(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV printed no LLVM version")?
        .to_owned();
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let rustflags = format!(
        "-C link-arg=-Wl,-rpath,{} -C link-arg={}",
        lib.display(),
        libllvm.display()
    );
    run(Command::new("rustup")
        .args([
            "run",
            NIGHTLY,
            "cargo",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major},no-llvm-linking"),
            "--force",
        ])
        .env("RUSTFLAGS", rustflags))
    .context("building bpf-linker failed: check that the nightly toolchain ships libLLVM")
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with ~/.cargo/bin first, so aya-build finds bpf-linker.
pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(existing) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}

fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
