//! `hvnet bench`: hvnet's tc programs against an empty tc program, both run
//! by the kernel through BPF_PROG_TEST_RUN on the same frames in one run.

use aya::programs::{TestRun, TestRunOptions};

use crate::{frames, kernel::loader};

/// The budget: hvnet may add this much per ordinary packet.
pub const TARGET_OVERHEAD_NS: f64 = 10.0;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Load(#[from] loader::LoaderError),
    #[error("BPF_PROG_TEST_RUN of {program} failed: {reason}")]
    Run { program: String, reason: String },
}

pub struct BenchRow {
    pub frame: &'static str,
    /// Ordinary frames are held to the budget; DHCP/ARP frames also build
    /// and send an event (rare control traffic), so they are reported only.
    pub ordinary: bool,
    pub program: &'static str,
    pub empty_ns: f64,
    pub hvnet_ns: f64,
}

impl BenchRow {
    pub fn overhead_ns(&self) -> f64 {
        self.hvnet_ns - self.empty_ns
    }
    pub fn ratio(&self) -> f64 {
        self.hvnet_ns / self.empty_ns.max(f64::MIN_POSITIVE)
    }
}

fn representative_frames() -> Vec<(&'static str, bool, Vec<u8>)> {
    let vm = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let host = [0xfe, 0x54, 0, 0x12, 0x34, 0x56];
    let arp = frames::arp_request(vm, [10, 250, 0, 10], [10, 250, 0, 1]);
    vec![
        ("small UDP (60 B)", true, frames::small_udp(vm, host)),
        ("TCP 1500 (1514 B)", true, frames::tcp_1500(host, vm)),
        ("DHCP ACK (342 B)", false, frames::dhcp_ack(host, vm)),
        ("ARP request (42 B)", false, arp),
    ]
}

/// Median of `rounds` kernel-timed runs of `repeat` iterations, in ns/run.
fn time_program(
    ebpf: &aya::Ebpf,
    program: &str,
    frame: &[u8],
    repeat: u32,
    rounds: usize,
) -> Result<f64, BenchError> {
    let prog = loader::bench_program(ebpf, program)?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        };
        let result = prog.test_run(opts).map_err(|e| BenchError::Run {
            program: program.to_owned(),
            reason: e.to_string(),
        })?;
        samples.push(result.duration.as_nanos() as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

pub fn run(repeat: u32, rounds: usize) -> Result<Vec<BenchRow>, BenchError> {
    let ebpf = loader::load_for_bench()?;
    let mut rows = Vec::new();
    for (frame_name, ordinary, frame) in representative_frames() {
        for program in [loader::EGRESS_PROGRAM, loader::INGRESS_PROGRAM] {
            // Interleave the baseline with the measured program so that both
            // see the same machine state (frequency, cache, other load).
            let empty_ns = time_program(&ebpf, loader::EMPTY_PROGRAM, &frame, repeat, rounds)?;
            let hvnet_ns = time_program(&ebpf, program, &frame, repeat, rounds)?;
            rows.push(BenchRow {
                frame: frame_name,
                ordinary,
                program: if program == loader::EGRESS_PROGRAM {
                    "egress (to_vm)"
                } else {
                    "ingress (from_vm)"
                },
                empty_ns,
                hvnet_ns,
            });
        }
    }
    Ok(rows)
}

pub fn print(rows: &[BenchRow]) -> bool {
    println!(
        "{:<20} {:<18} {:>9} {:>9} {:>10} {:>7}",
        "frame", "program", "empty ns", "hvnet ns", "overhead", "ratio"
    );
    let mut within = true;
    for row in rows {
        let ok = row.overhead_ns() < TARGET_OVERHEAD_NS;
        let verdict = match (row.ordinary, ok) {
            (true, true) => "ok",
            (true, false) => "OVER BUDGET",
            (false, _) => "event frame (not budgeted)",
        };
        within &= ok || !row.ordinary;
        println!(
            "{:<20} {:<18} {:>9.1} {:>9.1} {:>+9.1} {:>6.2}x {}",
            row.frame,
            row.program,
            row.empty_ns,
            row.hvnet_ns,
            row.overhead_ns(),
            row.ratio(),
            verdict
        );
    }
    println!(
        "target: under {TARGET_OVERHEAD_NS:.0} ns per ordinary packet over the empty program: {}",
        if within { "met" } else { "NOT met" }
    );
    within
}
