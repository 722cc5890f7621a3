//! Orchestration only: set-up, build, test, demo, bench, lint. Every
//! command does the set-up it needs first, idempotently, so a fresh machine
//! needs nothing by hand.

mod dist;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "hvnet's build orchestration")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src, bpf-linker).
    Setup,
    /// Build target/release/hvnet (eBPF object embedded) and the lab.
    Build,
    /// Unit tests, then the privileged lab tests (one at a time).
    Test {
        /// Only the unprivileged tests.
        #[arg(long)]
        unit_only: bool,
        /// Also the minutes-long soak under heavy load (HVNET_SOAK_SECONDS).
        #[arg(long)]
        soak: bool,
        /// Only the real-guest regression test (QEMU TCG guest, the
        /// incident's fault reproduced by masking its RX interrupt).
        #[arg(long, conflicts_with_all = ["unit_only", "soak"])]
        qemu: bool,
        /// Only the kernel matrix: the core lab checks on this kernel and on
        /// Debian's 6.1 and 6.12 booted as compute nodes under QEMU (also
        /// the last step of a full test run).
        #[arg(long, conflicts_with_all = ["unit_only", "soak", "qemu"])]
        kernels: bool,
    },
    /// The embedded lab: a compute node in network namespaces, fake VMs, dnsmasq, hvnet.
    Demo {
        /// Number of fake VMs.
        #[arg(long, default_value_t = 2)]
        vms: u32,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Benchmark hvnet against empty programs: BPF_PROG_TEST_RUN, then real traffic (bpf_stats) and throughput A/B.
    Bench,
    /// Release artifacts in target/dist: a tarball, a .deb, and a static musl binary where possible.
    Dist,
    /// rustfmt and clippy.
    Lint,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Setup => setup::all(&root),
        Task::Build => {
            setup::all(&root)?;
            build(&root)
        }
        Task::Test {
            unit_only,
            soak,
            qemu,
            kernels,
        } => {
            setup::all(&root)?;
            if kernels {
                build(&root)?;
                return kernel_matrix(&root);
            }
            if qemu {
                build(&root)?;
                return run(lab_tests(&root).args([
                    "--test",
                    "qemu_guest_lab",
                    "--",
                    "--nocapture",
                ]));
            }
            test(&root, unit_only)?;
            if soak {
                run(lab_tests(&root).args([
                    "--test",
                    "soak_lab",
                    "--",
                    "--ignored",
                    "--test-threads=1",
                    "--nocapture",
                ]))?;
            }
            Ok(())
        }
        Task::Demo { vms, duration } => {
            setup::all(&root)?;
            build(&root)?;
            let mut cmd = Command::new(root.join("target/release/hvnet-lab"));
            cmd.args(["demo", "--vms", &vms.to_string()]);
            cmd.arg("--hvnet").arg(root.join("target/release/hvnet"));
            if let Some(secs) = duration {
                cmd.args(["--duration", &secs.to_string()]);
            }
            run(&mut cmd)
        }
        Task::Bench => {
            setup::all(&root)?;
            build(&root)?;
            // BPF_PROG_TEST_RUN on crafted frames, then the kernel's own
            // run-time stats on real traffic and throughput A/B.
            // Both always run; a budget missed by the first is reported at the end.
            let test_run = run(Command::new(root.join("target/release/hvnet")).arg("bench"));
            run(Command::new(root.join("target/release/hvnet-lab"))
                .arg("bench-cost")
                .env("HVNET_BIN", root.join("target/release/hvnet")))?;
            // A dense node: 500 and 2000 idle taps.
            run(Command::new(root.join("target/release/hvnet-lab"))
                .arg("bench-scale")
                .env("HVNET_BIN", root.join("target/release/hvnet")))?;
            test_run
        }
        Task::Dist => {
            setup::all(&root)?;
            build(&root)?;
            let artifacts = dist::build(&root, env!("CARGO_PKG_VERSION"))?;
            for path in [
                Some(&artifacts.deb),
                Some(&artifacts.tarball),
                artifacts.musl.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                println!("{}", path.display());
            }
            Ok(())
        }
        Task::Lint => {
            run(cargo(&root).args(["fmt", "--all", "--check"]))?;
            run(cargo(&root).args([
                "clippy",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The eBPF crate only builds for the BPF target, with nightly.
            let mut ebpf = Command::new("rustup");
            ebpf.current_dir(root.join("tracer-ebpf"));
            ebpf.env("PATH", setup::path_with_cargo_bin());
            ebpf.args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]);
            run(&mut ebpf)
        }
    }
}

fn build(root: &Path) -> anyhow::Result<()> {
    run(cargo(root).args([
        "build",
        "--release",
        "-p",
        "tracer",
        "-p",
        "hvnet-lab",
        "--bins",
    ]))
}

fn test(root: &Path, unit_only: bool) -> anyhow::Result<()> {
    // Unprivileged tier: pure logic, parsing, rendering.
    run(cargo(root).args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--lib",
        "--bins",
    ]))?;
    if unit_only {
        return Ok(());
    }
    build(root)?;
    // The package test installs the .deb this builds.
    let artifacts = dist::build(root, env!("CARGO_PKG_VERSION"))?;
    // Privileged tier: real netns, taps, dnsmasq, QEMU and the agent; they
    // share kernel state (tc, netns names), so one at a time.
    let lab = run(lab_tests(root).env("HVNET_DEB", &artifacts.deb).args([
        "--no-fail-fast",
        "--tests",
        "--",
        "--test-threads=1",
    ]));
    // The same core checks on Debian's 6.1 and 6.12 booted as compute
    // nodes (and the vhost-net datapath there); runs even if a lab test
    // failed, so one run shows both.
    let kernels = kernel_matrix(root);
    lab.and(kernels)
}

/// The lab tests the kernel matrix runs, built; name -> executable.
fn matrix_test_binaries(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    const TESTS: &[&str] = &[
        "tc_lab",
        "stall_lab",
        "dhcp_lab",
        "vhost_lab",
        "hops_lab",
        "kernel_parser",
    ];
    let mut cmd = cargo(root);
    cmd.args([
        "test",
        "--release",
        "-p",
        "hvnet-lab",
        "--no-run",
        "--message-format=json",
    ]);
    for test in TESTS {
        cmd.args(["--test", test]);
    }
    let out = cmd.output().context("building the lab tests")?;
    if !out.status.success() {
        bail!(
            "building the lab tests failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        if let (true, Some(exe)) = (TESTS.contains(&name), msg["executable"].as_str()) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    if found.len() != TESTS.len() {
        bail!("expected executables for {TESTS:?}, cargo named {found:?}");
    }
    Ok(found)
}

/// `cargo xtask test --kernels`: prints the matrix, fails on any failure.
fn kernel_matrix(root: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new(root.join("target/release/hvnet-lab"));
    cmd.arg("kernel-matrix")
        .arg("--work-dir")
        .arg(root.join("target/kernel-matrix"))
        .env("HVNET_BIN", root.join("target/release/hvnet"));
    for (label, _) in setup::MATRIX_KERNELS {
        cmd.arg("--kernel").arg(format!(
            "{label}={}",
            setup::kernel_cache(root, label).display()
        ));
    }
    for (name, exe) in matrix_test_binaries(root)? {
        cmd.arg("--test-bin")
            .arg(format!("{name}={}", exe.display()));
    }
    run(&mut cmd)
}

/// `cargo test` for the lab crate with what its tests need to know: the
/// agent binary, and that set-up provided QEMU and the guest's boot files
/// (so the real-guest test fails rather than skips if they are missing).
fn lab_tests(root: &Path) -> Command {
    let mut cmd = cargo(root);
    cmd.args(["test", "--release", "-p", "hvnet-lab"])
        .env("HVNET_BIN", root.join("target/release/hvnet"))
        .env("HVNET_GUEST_CACHE", setup::guest_cache(root))
        .env("HVNET_REQUIRE_QEMU", "1");
    cmd
}

pub(crate) fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd.env("PATH", setup::path_with_cargo_bin());
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!(
            "{:?} {:?} failed: {status}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        );
    }
    Ok(())
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask/ has no parent directory")
}
