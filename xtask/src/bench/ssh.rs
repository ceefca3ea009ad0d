//! Real ssh (issue 13): one transfer of `--ssh-bytes` (1 GiB) through the
//! OpenSSH client and the builders' sshd, per cipher and direction, through
//! every contender. Unlike the bench server's figures, ssh's own crypto
//! competes with the middlebox for the CPUs here, which is what users feel.
//!
//! Upload: `ssh -c <cipher> <target> cksum` reads a file of random bytes
//! (in the page cache) as its stdin; download: `ssh -c <cipher> <target>
//! cat <file>` into a local `cksum`. Either way the receiving end's CRC and
//! byte count must equal the file's: a wrong one fails the transfer.
//! `cksum` (CRC-32 with PCLMUL) costs about a tenth of what `sha256sum`
//! costs here, so the check hardly competes with ssh; ssh's own MAC or AEAD
//! already rejects any altered byte in transit.
//!
//! Each figure is the wall time of the whole `ssh` run, session setup
//! included (a few ms of a 1-2 s transfer), and the whole machine's busy CPU
//! over it. Contenders run one after the other, each started afresh for
//! each of `--ssh-rounds` rounds, and each round starts one contender
//! later than the one before, so that no contender always follows the same
//! one; the table shows the median round. The local path is always a
//! contender here, whatever `--contender` says: its users are ssh clients.

use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value as Json, json};
use yensid_tests::wait::wait_child;
use yensid_tests::{Dataplane, RandomFile, SshClient, Topology};

use super::contender::{Contender, Upstream};
use super::cpu::CpuTimes;
use super::protocol::Mode;
use super::{BUILDERS, Setup, measure, write_section};
use crate::build;

/// The ciphers issue 13 names: AES-GCM (AES-NI) and ChaCha20-Poly1305.
pub const CIPHERS: [&str; 2] = ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"];
const DIRECTIONS: [Mode; 2] = [Mode::Upload, Mode::Download];
/// Only against hangs.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);
/// Connections a middlebox must hold: one transfer at a time.
const SESSIONS: usize = 16;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(clap::Args)]
#[group(id = "real_ssh")]
pub struct Options {
    /// Bytes per transfer in the real-ssh section.
    #[arg(long, default_value_t = 1 << 30)]
    pub ssh_bytes: u64,
    /// Rounds of the real-ssh section (every contender once per round); the
    /// report shows the median.
    #[arg(long, default_value_t = 5)]
    pub ssh_rounds: usize,
}

/// One transfer.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    seconds: f64,
    cpu_seconds: f64,
}

/// What one contender's runs gave for one cipher and direction.
#[derive(Default)]
struct Cell {
    samples: Vec<Sample>,
    errors: Vec<String>,
}

impl Cell {
    /// The median transfer by wall time (of an even number of rounds, the
    /// faster of the two in the middle).
    fn median(&self) -> Option<Sample> {
        let mut sorted = self.samples.clone();
        sorted.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }
}

/// Everything measured.
struct RealSsh {
    bytes: u64,
    rounds: usize,
    contenders: Vec<Contender>,
    /// `cells[contender][cipher * DIRECTIONS.len() + direction]`.
    cells: Vec<Vec<Cell>>,
    notes: Vec<String>,
}

pub fn run(setup: &Setup) -> Result<()> {
    let options = &setup.options.ssh;
    ensure!(
        options.ssh_bytes > 0 && options.ssh_rounds > 0,
        "--ssh-bytes and --ssh-rounds must be positive"
    );
    let topology = Topology::new(BUILDERS)?;
    build::progress(&format!(
        "real ssh: writing {} random bytes to send",
        options.ssh_bytes
    ));
    // The builders' sshd share this mount namespace: `cat` reads it there.
    let payload = RandomFile::create(options.ssh_bytes)?;
    let expected = checksum(Command::new("cksum").stdin(std::fs::File::open(payload.path())?))?;
    let ssh = topology.ssh_client()?;
    let mut contenders = setup.contenders.clone();
    if !contenders.contains(&Contender::LocalPath) {
        contenders.push(Contender::LocalPath);
    }
    let upstreams: Vec<Upstream> = topology
        .builders()
        .iter()
        .map(|b| Upstream {
            builder: b.name().to_owned(),
            address: b.ssh_addr(),
        })
        .collect();
    let mut report = RealSsh {
        bytes: options.ssh_bytes,
        rounds: options.ssh_rounds,
        contenders: contenders.clone(),
        cells: contenders
            .iter()
            .map(|_| {
                (0..CIPHERS.len() * DIRECTIONS.len())
                    .map(|_| Cell::default())
                    .collect()
            })
            .collect(),
        notes: Vec::new(),
    };
    for round in 0..options.ssh_rounds {
        for column in rotated(contenders.len(), round) {
            let contender = contenders[column];
            build::progress(&format!(
                "real ssh, round {} of {}: {}",
                round + 1,
                options.ssh_rounds,
                contender.name()
            ));
            let running = match contender.start(&topology, &setup.yensid, &upstreams, SESSIONS) {
                Ok(running) => running,
                Err(e) => {
                    for cell in &mut report.cells[column] {
                        cell.errors.push(format!("could not start: {e:#}"));
                    }
                    continue;
                }
            };
            match measure::background_cpus(Duration::from_secs(1)) {
                Ok(cpus) => report.notes.push(format!(
                    "{}, round {}: the machine was busy at {cpus:.2} CPUs before the transfers",
                    contender.name(),
                    round + 1
                )),
                Err(e) => report
                    .notes
                    .push(format!("no background CPU sample: {e:#}")),
            }
            // A direct client alternates between the builders by round.
            let target = running.targets[round % running.targets.len()];
            for (c, cipher) in CIPHERS.iter().enumerate() {
                for (d, &mode) in DIRECTIONS.iter().enumerate() {
                    let cell = &mut report.cells[column][c * DIRECTIONS.len() + d];
                    match transfer(&ssh, target, cipher, mode, &payload, &expected) {
                        Ok(sample) => {
                            build::progress(&format!(
                                "  {cipher} {}: {:.0} MB/s, {:.2} CPU s/GiB",
                                mode.name(),
                                options.ssh_bytes as f64 / sample.seconds / 1e6,
                                sample.cpu_seconds / (options.ssh_bytes as f64 / GIB)
                            ));
                            cell.samples.push(sample);
                        }
                        Err(e) => {
                            build::progress(&format!("  {cipher} {} FAILED: {e:#}", mode.name()));
                            cell.errors.push(format!("{e:#}"));
                        }
                    }
                }
            }
            running.stop_into(
                &format!("{}, round {}", contender.name(), round + 1),
                &mut report.notes,
            );
        }
    }
    let md = report.markdown();
    println!("\n{md}");
    write_section(&setup.out, "ssh", &md, &report.json())?;
    let unmeasured = report
        .cells
        .iter()
        .flatten()
        .filter(|c| c.samples.is_empty())
        .count();
    ensure!(
        unmeasured == 0,
        "{unmeasured} real-ssh figures could not be measured; see ssh.md"
    );
    Ok(())
}

/// The columns in the order round `round` measures them: all of them, from
/// `round % count` on.
pub fn rotated(count: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |i| (i + round) % count)
}

/// One `ssh` run moving the payload in `mode`, checked.
fn transfer(
    ssh: &SshClient,
    target: SocketAddr,
    cipher: &str,
    mode: Mode,
    payload: &RandomFile,
    expected: &str,
) -> Result<Sample> {
    let options = ["-c", cipher, "-o", "Compression=no"];
    let cpu_before = CpuTimes::now()?;
    let started = Instant::now();
    let received = match mode {
        Mode::Upload => checksum(
            ssh.command_with(target, &options, "cksum")
                .stdin(std::fs::File::open(payload.path())?),
        )?,
        Mode::Download => {
            let remote = format!("cat {}", payload.path().display());
            download_checksum(ssh.command_with(target, &options, &remote))?
        }
        Mode::BannerOnly | Mode::Hold => bail!("not a transfer: {}", mode.name()),
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = CpuTimes::now()?.seconds_since(cpu_before);
    ensure!(
        received == expected,
        "{} through {target} arrived as `{received}` (CRC, bytes), sent `{expected}`",
        mode.name()
    );
    Ok(Sample {
        seconds,
        cpu_seconds,
    })
}

/// Runs `cmd` (stdin set by the caller) and returns its stdout, trimmed: a
/// `cksum` of stdin prints `<crc> <bytes>`.
fn checksum(cmd: &mut Command) -> Result<String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    finish(&mut child, &format!("{cmd:?}"))
}

/// Runs the `ssh` of a download into a local `cksum`; returns its line.
fn download_checksum(mut ssh: Command) -> Result<String> {
    let mut cksum = Command::new("cksum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn cksum")?;
    let into_cksum = cksum.stdin.take().context("cksum's stdin")?;
    let mut child = ssh
        .stdout(into_cksum)
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn ssh")?;
    // The Command holds a copy of cksum's input until it goes: cksum would
    // never see the end of it.
    drop(ssh);
    let ssh_output = finish(&mut child, "ssh");
    let line = finish(&mut cksum, "cksum")?;
    ssh_output?;
    Ok(line)
}

/// Waits for `child` (killing it after [`TRANSFER_TIMEOUT`]); its trimmed
/// stdout if it succeeded, else an error with its stderr.
fn finish(child: &mut std::process::Child, what: &str) -> Result<String> {
    let status = match wait_child(child, TRANSFER_TIMEOUT)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {TRANSFER_TIMEOUT:?}");
        }
    };
    let read = |pipe: Option<&mut dyn Read>| {
        let mut text = String::new();
        if let Some(pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    };
    let stderr = read(child.stderr.as_mut().map(|p| p as &mut dyn Read));
    ensure!(
        status.success(),
        "{what} failed ({status}): {}",
        stderr.trim()
    );
    Ok(read(child.stdout.as_mut().map(|p| p as &mut dyn Read))
        .trim()
        .to_owned())
}

/// What the issue asks of a contender against HAProxy with real ssh: at
/// least HAProxy's throughput both ways, per cipher. Both forwardings of
/// the kernel path are held to it: `forward = "auto"` takes either.
const HELD_TO_HAPROXY: [Contender; 3] = [
    Contender::Yensid(Dataplane::Kernel),
    Contender::KernelSplice,
    Contender::Yensid(Dataplane::Userspace),
];

impl RealSsh {
    fn column(&self, contender: Contender) -> Option<usize> {
        self.contenders.iter().position(|&c| c == contender)
    }

    /// MB/s of the median transfer of `contender` in cell `cell`.
    fn mb_per_second(&self, contender: Contender, cell: usize) -> Option<f64> {
        let sample = self.cells[self.column(contender)?][cell].median()?;
        Some(self.bytes as f64 / sample.seconds / 1e6)
    }

    /// Slowest and fastest round of `contender` in `cell`, MB/s.
    fn spread(&self, contender: Contender, cell: usize) -> Option<(f64, f64)> {
        let samples = &self.cells[self.column(contender)?][cell].samples;
        let mb = |s: &Sample| self.bytes as f64 / s.seconds / 1e6;
        let slowest = samples.iter().map(mb).reduce(f64::min)?;
        let fastest = samples.iter().map(mb).reduce(f64::max)?;
        Some((slowest, fastest))
    }

    fn cpu_per_gib(&self, contender: Contender, cell: usize) -> Option<f64> {
        let sample = self.cells[self.column(contender)?][cell].median()?;
        Some(sample.cpu_seconds / (self.bytes as f64 / GIB))
    }

    fn rows() -> impl Iterator<Item = (usize, &'static str, Mode)> {
        CIPHERS.iter().enumerate().flat_map(|(c, cipher)| {
            DIRECTIONS
                .iter()
                .enumerate()
                .map(move |(d, &mode)| (c * DIRECTIONS.len() + d, *cipher, mode))
        })
    }

    fn table(&self, unit: &str, value: impl Fn(Contender, usize) -> Option<f64>) -> String {
        let names: Vec<&str> = self.contenders.iter().map(|c| c.name()).collect();
        let mut md = format!("| {unit} | {} |\n", names.join(" | "));
        md += &format!("|---|{}\n", "---:|".repeat(names.len()));
        for (cell, cipher, mode) in Self::rows() {
            let direct = value(Contender::Direct, cell);
            let cells: Vec<String> = self
                .contenders
                .iter()
                .map(|&c| match (value(c, cell), direct) {
                    (None, _) => "failed".to_owned(),
                    (Some(v), Some(d)) if c != Contender::Direct => {
                        format!("{} ({:.2}×)", format_value(unit, v), v / d)
                    }
                    (Some(v), _) => format_value(unit, v),
                })
                .collect();
            md += &format!("| {cipher}, {} | {} |\n", mode.name(), cells.join(" | "));
        }
        md
    }

    fn spread_table(&self) -> String {
        let names: Vec<&str> = self.contenders.iter().map(|c| c.name()).collect();
        let mut md = format!("| MB/s | {} |\n", names.join(" | "));
        md += &format!("|---|{}\n", "---:|".repeat(names.len()));
        for (cell, cipher, mode) in Self::rows() {
            let cells: Vec<String> = self
                .contenders
                .iter()
                .map(|&c| {
                    self.spread(c, cell)
                        .map_or("—".to_owned(), |(lo, hi)| format!("{lo:.0}–{hi:.0}"))
                })
                .collect();
            md += &format!("| {cipher}, {} | {} |\n", mode.name(), cells.join(" | "));
        }
        md
    }

    /// Each target of the issue: (contender, cell, ratio to HAProxy, met).
    fn verdicts(&self) -> Vec<(Contender, usize, Option<f64>)> {
        HELD_TO_HAPROXY
            .iter()
            .flat_map(|&c| Self::rows().map(move |(cell, _, _)| (c, cell)))
            .filter(|(c, _)| self.column(*c).is_some())
            .map(|(c, cell)| {
                let ratio = self
                    .mb_per_second(c, cell)
                    .zip(self.mb_per_second(Contender::Haproxy, cell))
                    .map(|(mine, theirs)| mine / theirs);
                (c, cell, ratio)
            })
            .collect()
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Real ssh (issue 13)\n");
        let _ = writeln!(
            md,
            "{} bytes of random data per transfer through the OpenSSH client and the \
             builders' sshd, checked by CRC and byte count at the receiving end; wall time of \
             the whole `ssh` run (session setup included), median of {} rounds (each \
             contender started afresh in each round). MB = 10^6 bytes. In brackets: the ratio \
             to direct.\n",
            self.bytes, self.rounds
        );
        md += &self.table("MB/s", |c, cell| self.mb_per_second(c, cell));
        let _ = writeln!(
            md,
            "\nSlowest and fastest round, MB/s (how much the machine's other load moved \
             them):\n"
        );
        md += &self.spread_table();
        let _ = writeln!(
            md,
            "\nWhole machine's CPU per GiB over the same transfers (ssh, sshd, the middlebox, \
             the checksum and anything else running):\n"
        );
        md += &self.table("CPU s/GiB", |c, cell| self.cpu_per_gib(c, cell));
        let _ = writeln!(
            md,
            "\n### Targets: at least HAProxy's throughput with real ssh\n"
        );
        let _ = writeln!(
            md,
            "| contender | transfer | ratio to direct | HAProxy's | ratio to HAProxy | verdict |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---|");
        let to_direct = |c: Contender, cell: usize| {
            self.mb_per_second(c, cell)
                .zip(self.mb_per_second(Contender::Direct, cell))
                .map_or("—".to_owned(), |(v, d)| format!("{:.2}×", v / d))
        };
        for (contender, cell, ratio) in self.verdicts() {
            let (_, cipher, mode) = Self::rows()
                .find(|(c, _, _)| *c == cell)
                .expect("a cell of the rows");
            let _ = writeln!(
                md,
                "| {} | {cipher}, {} | {} | {} | {} | {} |",
                contender.name(),
                mode.name(),
                to_direct(contender, cell),
                to_direct(Contender::Haproxy, cell),
                ratio.map_or("—".to_owned(), |r| format!("{r:.2}×")),
                verdict(ratio)
            );
        }
        let errors: Vec<String> = self
            .contenders
            .iter()
            .zip(&self.cells)
            .flat_map(|(c, cells)| {
                Self::rows().flat_map(move |(cell, cipher, mode)| {
                    cells[cell]
                        .errors
                        .iter()
                        .map(move |e| format!("{}, {cipher} {}: {e}", c.name(), mode.name()))
                })
            })
            .collect();
        if !errors.is_empty() || !self.notes.is_empty() {
            let _ = writeln!(md, "\n### Notes\n");
            for line in errors.iter().chain(&self.notes) {
                let _ = writeln!(md, "- {line}");
            }
        }
        md
    }

    fn json(&self) -> Json {
        let contenders: Vec<Json> = self
            .contenders
            .iter()
            .zip(&self.cells)
            .map(|(&c, cells)| {
                let transfers: Vec<Json> = Self::rows()
                    .map(|(cell, cipher, mode)| {
                        json!({
                            "cipher": cipher,
                            "direction": mode.name(),
                            "seconds": cells[cell].samples.iter().map(|s| s.seconds).collect::<Vec<_>>(),
                            "cpu_seconds": cells[cell].samples.iter().map(|s| s.cpu_seconds).collect::<Vec<_>>(),
                            "median_mb_per_second": self.mb_per_second(c, cell),
                            "median_cpu_seconds_per_gib": self.cpu_per_gib(c, cell),
                            "ratio_to_direct": self.mb_per_second(c, cell)
                                .zip(self.mb_per_second(Contender::Direct, cell))
                                .map(|(v, d)| v / d),
                            "errors": cells[cell].errors,
                        })
                    })
                    .collect();
                json!({ "key": c.key(), "name": c.name(), "transfers": transfers })
            })
            .collect();
        let targets: Vec<Json> = self
            .verdicts()
            .into_iter()
            .map(|(c, cell, ratio)| {
                let (_, cipher, mode) = Self::rows()
                    .find(|(r, _, _)| *r == cell)
                    .expect("a cell of the rows");
                json!({
                    "contender": c.key(),
                    "cipher": cipher,
                    "direction": mode.name(),
                    "target": "≥ 1× HAProxy",
                    "ratio_to_haproxy": ratio,
                    "verdict": verdict(ratio),
                })
            })
            .collect();
        json!({
            "bytes": self.bytes,
            "rounds": self.rounds,
            "contenders": contenders,
            "targets": targets,
            "notes": self.notes,
        })
    }
}

fn verdict(ratio_to_haproxy: Option<f64>) -> &'static str {
    match ratio_to_haproxy {
        None => "unknown",
        Some(r) if r >= 1.0 => "met",
        Some(_) => "missed",
    }
}

fn format_value(unit: &str, value: f64) -> String {
    if unit == "MB/s" {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seconds: f64) -> Sample {
        Sample {
            seconds,
            cpu_seconds: 1.0,
        }
    }

    #[test]
    fn the_median_is_the_middle_transfer_by_time() {
        let cell = Cell {
            samples: vec![sample(3.0), sample(1.0), sample(2.0)],
            errors: Vec::new(),
        };
        assert_eq!(cell.median(), Some(sample(2.0)));
        let even = Cell {
            samples: vec![sample(4.0), sample(1.0)],
            errors: Vec::new(),
        };
        assert_eq!(even.median(), Some(sample(1.0)));
        assert_eq!(Cell::default().median(), None);
    }

    #[test]
    fn each_round_starts_one_contender_later() {
        assert_eq!(rotated(4, 0).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(rotated(4, 1).collect::<Vec<_>>(), [1, 2, 3, 0]);
        assert_eq!(rotated(4, 5).collect::<Vec<_>>(), [1, 2, 3, 0]);
    }

    #[test]
    fn the_spread_is_the_slowest_and_fastest_round() {
        let report = RealSsh {
            bytes: 1_000_000_000,
            rounds: 3,
            contenders: vec![Contender::Direct],
            cells: vec![vec![Cell {
                samples: vec![sample(2.0), sample(1.0), sample(4.0)],
                errors: vec!["one failed".to_owned()],
            }]],
            notes: Vec::new(),
        };
        assert_eq!(report.spread(Contender::Direct, 0), Some((250.0, 1000.0)));
        assert_eq!(report.mb_per_second(Contender::Direct, 0), Some(500.0));
        assert_eq!(report.spread(Contender::Haproxy, 0), None);
    }

    #[test]
    fn kernel_and_userspace_are_held_to_haproxy_per_cipher_and_direction() {
        let mut report = RealSsh {
            bytes: 1_000_000_000,
            rounds: 1,
            contenders: super::super::contender::CONTENDERS.to_vec(),
            cells: Vec::new(),
            notes: Vec::new(),
        };
        // direct 1 s, HAProxy 2 s, kernel 1.5 s, userspace 2.5 s everywhere.
        report.cells = [1.0, 2.0, 1.5, 2.5]
            .iter()
            .map(|&s| {
                (0..4)
                    .map(|_| Cell {
                        samples: vec![sample(s)],
                        errors: Vec::new(),
                    })
                    .collect()
            })
            .collect();
        let verdicts = report.verdicts();
        assert_eq!(verdicts.len(), 8);
        for (contender, _, ratio) in &verdicts {
            let ratio = ratio.expect("both measured");
            match contender {
                Contender::Yensid(Dataplane::Kernel) => assert!((ratio - 2.0 / 1.5).abs() < 1e-9),
                _ => assert!((ratio - 0.8).abs() < 1e-9),
            }
        }
        let md = report.markdown();
        assert!(
            md.contains(
                "| yensid kernel | aes128-gcm@openssh.com, upload | 0.67× | 0.50× | 1.33× | met |"
            ),
            "{md}"
        );
        assert!(md.contains("| yensid userspace | chacha20-poly1305@openssh.com, download | 0.40× | 0.50× | 0.80× | missed |"), "{md}");
        assert!(md.contains("| aes128-gcm@openssh.com, upload | 1000 | 500 (0.50×) | 667 (0.67×) | 400 (0.40×) |"), "{md}");
        assert!(
            md.contains(
                "| aes128-gcm@openssh.com, upload | 1000–1000 | 500–500 | 667–667 | 400–400 |"
            ),
            "{md}"
        );
    }
}
