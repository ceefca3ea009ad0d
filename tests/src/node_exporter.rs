//! Builder load for the tests: the real Prometheus node_exporter (Debian's
//! `prometheus-node-exporter`) running inside a builder's namespace, fed either the
//! real /proc (what differs per builder namespace is its network statistics, such as
//! `node_netstat_Tcp_CurrEstab`) or a [`ControlledProc`]: a directory the test writes
//! `pressure/*`, `loadavg`, `stat` and `meminfo` into, with a small tmpfs as the
//! builder's store file system. All builders share one kernel, so pressure and load
//! can differ between builders only as controlled input to the real exporter.
//!
//! [`SecondClient`] is a second client namespace, routed to the builders through the
//! first, for a second yensid sharing the builders.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::command::run;
use crate::netns::{Netns, check_ifname};
use crate::tempdir::TempDir;
use crate::topology::Topology;
use crate::unique;
use crate::wait::wait_until;

/// The exporter's binary, from Debian's `prometheus-node-exporter`.
pub const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
/// node_exporter's usual port.
pub const EXPORTER_PORT: u16 = 9100;
/// How often the pressure counters advance.
const TICK: Duration = Duration::from_millis(100);
/// Only against hangs.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A node_exporter inside a namespace; killed on drop.
pub struct NodeExporter {
    child: Child,
    address: SocketAddr,
}

impl NodeExporter {
    /// Starts the exporter in `ns` on `address`. With `proc`, it reads that
    /// [`ControlledProc`] (pressure, load, CPUs, memory, the store's file system);
    /// without, the real /proc of the namespace, for its TCP statistics.
    pub fn start(ns: &Netns, address: SocketAddr, proc: Option<&ControlledProc>) -> Result<Self> {
        let mut cmd = ns.command(NODE_EXPORTER);
        cmd.arg(format!("--web.listen-address={address}"))
            .arg("--collector.disable-defaults")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match proc {
            Some(p) => {
                cmd.arg(format!("--path.procfs={}", p.procfs().display()))
                    .arg(format!("--path.rootfs={}", p.rootfs().display()));
                for c in ["pressure", "loadavg", "cpu", "meminfo", "filesystem"] {
                    cmd.arg(format!("--collector.{c}"));
                }
            }
            None => {
                for c in ["netstat", "loadavg", "cpu", "pressure"] {
                    cmd.arg(format!("--collector.{c}"));
                }
            }
        }
        let child = cmd.spawn().with_context(|| {
            format!("start {NODE_EXPORTER} (Debian package prometheus-node-exporter)")
        })?;
        let mut exporter = Self { child, address };
        let reached = wait_until("node_exporter to serve /metrics", START_TIMEOUT, || {
            if let Some(status) = exporter.child.try_wait()? {
                bail!("node_exporter exited: {status}");
            }
            Ok(ns.run(|| get_metrics(address))?.is_ok())
        });
        reached.map(|()| exporter)
    }

    /// `http://<address>/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.address)
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET /metrics, the body when the answer is 200.
fn get_metrics(address: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(body.to_owned())
        }
        _ => bail!(
            "unexpected answer: {}",
            response.lines().next().unwrap_or("")
        ),
    }
}

/// What a [`ControlledProc`] tells the exporter: pressure as the fraction of time
/// stalled (the counters advance at that rate), the load average and the CPU count.
#[derive(Clone, Copy, Debug)]
pub struct ProcInput {
    pub cpu_pressure: f64,
    pub memory_pressure: f64,
    pub io_pressure: f64,
    pub load1: f64,
    pub cpus: u32,
}

impl Default for ProcInput {
    fn default() -> Self {
        Self {
            cpu_pressure: 0.0,
            memory_pressure: 0.0,
            io_pressure: 0.0,
            load1: 0.0,
            cpus: 2,
        }
    }
}

/// A procfs directory the test controls, with a writer thread that advances the PSI
/// counters (`total=` microseconds stalled) at the configured rates, and a tmpfs of
/// its own mounted as the store (`<rootfs>/nix`, listed in the directory's
/// `1/mounts`, so that node_exporter reports it under mountpoint `/nix`). Everything
/// is unmounted, stopped and removed on drop.
pub struct ControlledProc {
    input: Arc<Mutex<ProcInput>>,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    store: PathBuf,
    mounted: bool,
    dir: TempDir,
}

impl ControlledProc {
    /// A controlled procfs with a store file system of `store_mib` MiB.
    pub fn new(input: ProcInput, store_mib: u32) -> Result<Self> {
        let dir = TempDir::new(&unique::name(&unique::next_id(), "proc"))?;
        let procfs = dir.path().join("proc");
        let store = dir.path().join("root/nix");
        for sub in [procfs.join("pressure"), procfs.join("1"), store.clone()] {
            fs::create_dir_all(&sub).with_context(|| format!("mkdir {}", sub.display()))?;
        }
        let mut proc = Self {
            input: Arc::new(Mutex::new(input)),
            stop: Arc::new(AtomicBool::new(false)),
            writer: None,
            store: store.clone(),
            mounted: false,
            dir,
        };
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={store_mib}m"), "tmpfs"])
            .arg(&store))?;
        proc.mounted = true;
        fs::write(
            procfs.join("1/mounts"),
            format!("tmpfs {} tmpfs rw,relatime 0 0\n", store.display()),
        )?;
        fs::write(
            procfs.join("meminfo"),
            "MemTotal:       16384000 kB\nMemFree:         8192000 kB\nMemAvailable:    8192000 kB\n",
        )?;
        write_static(&procfs, &input)?;
        write_pressure(&procfs, [0.0; 3])?;
        let writer = {
            let input = proc.input.clone();
            let stop = proc.stop.clone();
            thread::spawn(move || advance(&procfs, &input, &stop))
        };
        proc.writer = Some(writer);
        Ok(proc)
    }

    /// The directory given as `--path.procfs`.
    pub fn procfs(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    /// The directory given as `--path.rootfs`.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Changes what the exporter reads from now on.
    pub fn set(&self, change: impl FnOnce(&mut ProcInput)) -> Result<()> {
        let input = {
            let mut guard = self.input.lock().unwrap_or_else(|e| e.into_inner());
            change(&mut guard);
            *guard
        };
        write_static(&self.procfs(), &input)
    }

    /// Writes a file of `mib` MiB into the store file system.
    pub fn fill_store(&self, mib: u32) -> Result<()> {
        let chunk = vec![0x5au8; 1 << 20];
        let mut file = fs::File::create(self.fill_file())?;
        for _ in 0..mib {
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        Ok(())
    }

    /// Removes what [`Self::fill_store`] wrote.
    pub fn free_store(&self) -> Result<()> {
        fs::remove_file(self.fill_file()).context("free the store")
    }

    fn fill_file(&self) -> PathBuf {
        self.store.join("fill")
    }
}

impl Drop for ControlledProc {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        if self.mounted {
            let _ = run(Command::new("umount").arg("-l").arg(&self.store));
        }
    }
}

/// `loadavg` and `stat` (one `cpuN` line per CPU), replaced atomically.
fn write_static(procfs: &Path, input: &ProcInput) -> Result<()> {
    let l = input.load1;
    replace(
        &procfs.join("loadavg"),
        &format!("{l:.2} {l:.2} {l:.2} 1/100 4242\n"),
    )?;
    let mut stat = String::from("cpu  100 0 100 10000 0 0 0 0 0 0\n");
    for cpu in 0..input.cpus {
        stat.push_str(&format!("cpu{cpu} 50 0 50 5000 0 0 0 0 0 0\n"));
    }
    stat.push_str(
        "intr 0\nctxt 0\nbtime 1700000000\nprocesses 1\nprocs_running 1\nprocs_blocked 0\n",
    );
    replace(&procfs.join("stat"), &stat)
}

/// `pressure/{cpu,memory,io}` with these cumulative stalled microseconds ("some" and
/// "full" alike).
fn write_pressure(procfs: &Path, totals_us: [f64; 3]) -> Result<()> {
    for (name, total) in ["cpu", "memory", "io"].iter().zip(totals_us) {
        let total = total as u64;
        replace(
            &procfs.join("pressure").join(name),
            &format!(
                "some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total={total}\n"
            ),
        )?;
    }
    Ok(())
}

fn advance(procfs: &Path, input: &Mutex<ProcInput>, stop: &AtomicBool) {
    let mut totals = [0.0f64; 3];
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(TICK);
        let now = Instant::now();
        let elapsed_us = now.duration_since(last).as_secs_f64() * 1e6;
        last = now;
        let i = *input.lock().unwrap_or_else(|e| e.into_inner());
        for (total, rate) in
            totals
                .iter_mut()
                .zip([i.cpu_pressure, i.memory_pressure, i.io_pressure])
        {
            *total += rate * elapsed_us;
        }
        // A failed write is seen by the test as a load that does not change.
        let _ = write_pressure(procfs, totals);
    }
}

fn replace(path: &Path, text: &str) -> Result<()> {
    let next = path.with_extension("next");
    fs::write(&next, text)?;
    fs::rename(&next, path).with_context(|| format!("replace {}", path.display()))
}

/// Inserts `lines` right after the `header` line of a rendered config (TOML cannot
/// reopen a table, so keys the typed config does not know go in there).
pub fn insert_after(toml: &str, header: &str, lines: &str) -> Result<String> {
    let at = toml
        .lines()
        .position(|l| l.trim() == header)
        .with_context(|| format!("no `{header}` in the config"))?;
    let mut out: Vec<&str> = toml.lines().collect();
    out.insert(at + 1, lines);
    Ok(out.join("\n") + "\n")
}

/// A second client namespace, linked to the first client namespace (which routes for
/// it) by a veth, 198.18.251.2/30 here and 198.18.251.1/30 there; every builder routes
/// 198.18.251.0/30 back through the first client. Goes with its namespace on drop.
pub struct SecondClient {
    ns: Netns,
}

/// The subnet of the second client's link: above the builders' and the extra client
/// sources' (198.18.250.x).
const SECOND_CLIENT_OCTET: u8 = 251;

impl SecondClient {
    pub fn new(topology: &Topology) -> Result<Self> {
        let id = unique::next_id();
        let ns = Netns::create(&unique::name(&id, "client2"))?;
        let here = format!("y{id}s2");
        let there = format!("y{id}s1");
        check_ifname(&here)?;
        check_ifname(&there)?;
        let client = topology.client_ns();
        run(Command::new("ip").args([
            "link",
            "add",
            &there,
            "netns",
            client.name(),
            "type",
            "veth",
            "peer",
            "name",
            &here,
            "netns",
            ns.name(),
        ]))?;
        let gateway = Ipv4Addr::new(198, 18, SECOND_CLIENT_OCTET, 1);
        let address = Ipv4Addr::new(198, 18, SECOND_CLIENT_OCTET, 2);
        client.ip(&["addr", "add", &format!("{gateway}/30"), "dev", &there])?;
        client.ip(&["link", "set", &there, "up"])?;
        ns.ip(&["addr", "add", &format!("{address}/30"), "dev", &here])?;
        ns.ip(&["link", "set", &here, "up"])?;
        ns.ip(&["route", "add", "198.18.0.0/16", "via", &gateway.to_string()])?;
        run(client
            .command("sysctl")
            .args(["-q", "-w", "net.ipv4.ip_forward=1"]))?;
        let subnet = format!("198.18.{SECOND_CLIENT_OCTET}.0/30");
        for b in topology.builders() {
            b.ns()
                .ip(&["route", "add", &subnet, "via", &b.gateway().to_string()])?;
        }
        Ok(Self { ns })
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }
}
