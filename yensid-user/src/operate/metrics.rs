//! The Prometheus endpoint (`[metrics] listen`): `GET /metrics`.
//!
//! Every scrape asks the controller for the same [`Status`] document that
//! `yensid status --json` prints and renders it in Prometheus' text format,
//! so the two can never disagree. Rendering is a pure function.
//!
//! Whoever can reach the address can connect, so the endpoint is bounded:
//! a request head of at most [`MAX_HEAD`] bytes parsed by httparse within
//! [`READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] scrapes at once (one more
//! is answered 503 and closed), a proper status for any other method or
//! path, and a paced accept loop when descriptors run out.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    time::timeout,
};
use tracing::{debug, info};

use crate::{
    dataplane::ident::escape,
    dataplane::queue::WAIT_BUCKETS,
    operate::control::{AcceptBackoff, Pending, Request, Throttled},
    operate::status::{QueueStatus, Status},
};

/// Upper bounds of the connect-time histogram, in seconds.
pub const CONNECT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Time from the start of the upstream connect to the builder's
/// identification line, per builder.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Cumulative counts per bound of [`CONNECT_BUCKETS`].
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, value: Duration) {
        self.observe_in(&CONNECT_BUCKETS, value);
    }

    /// Counts `value` in a histogram whose buckets end at `bounds`.
    pub fn observe_in(&mut self, bounds: &[f64], value: Duration) {
        let seconds = value.as_secs_f64();
        if self.buckets.len() != bounds.len() {
            self.buckets = vec![0; bounds.len()];
        }
        for (count, &bound) in self.buckets.iter_mut().zip(bounds) {
            if seconds <= bound {
                *count += 1;
            }
        }
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

/// Longest request head read; a longer one is answered 431.
pub const MAX_HEAD: usize = 8192;
/// Most header lines a request may have.
const MAX_HEADERS: usize = 32;
/// Scrapes served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a scraper may take to send its request head, and to take the
/// answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Not complete yet: read more.
    NeedMore,
    /// `GET /metrics`.
    Metrics,
    /// Anything else, answered with this status line and body.
    Refuse { status: &'static str, body: String },
}

/// Reads the request head a scraper sent so far (at most [`MAX_HEAD`]
/// bytes are ever passed), with httparse.
pub fn route(head: &[u8]) -> Route {
    let refuse = |status, body: String| Route::Refuse { status, body };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Partial) if head.len() >= MAX_HEAD => refuse(
            "431 Request Header Fields Too Large",
            format!("the request head is longer than {MAX_HEAD} bytes\n"),
        ),
        Ok(httparse::Status::Partial) => Route::NeedMore,
        Err(httparse::Error::TooManyHeaders) => refuse(
            "431 Request Header Fields Too Large",
            format!("more than {MAX_HEADERS} header lines\n"),
        ),
        Err(e) => refuse("400 Bad Request", format!("not an HTTP request: {e}\n")),
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or_default();
            let resource = path.split_once('?').map_or(path, |(resource, _)| resource);
            if resource != "/metrics" {
                refuse(
                    "404 Not Found",
                    format!(
                        "only GET /metrics is served here, not `{}`\n",
                        escape(path.as_bytes())
                    ),
                )
            } else if request.method != Some("GET") {
                refuse(
                    "405 Method Not Allowed",
                    format!(
                        "only GET /metrics is served here, not `{}`\n",
                        escape(request.method.unwrap_or_default().as_bytes())
                    ),
                )
            } else {
                Route::Metrics
            }
        }
    }
}

/// Binds the metrics endpoint.
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(listen).await?;
    info!(%listen, "metrics endpoint listening");
    Ok(listener)
}

/// Serves the metrics endpoint on `listener` until the task is stopped.
pub async fn serve(listener: TcpListener, requests: mpsc::Sender<Pending>) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut backoff = AcceptBackoff::new("metrics");
    let mut turned_away = Throttled::new();
    loop {
        let stream = backoff.accept(|| listener.accept()).await;
        let Some(slot) = Slot::take(&open) else {
            if let Some(left_out) = turned_away.admit(Instant::now()) {
                info!(
                    left_out,
                    "metrics connection turned away: {MAX_CONNECTIONS} are open"
                );
            }
            turn_away(stream);
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, requests).await {
                debug!(error = %e, "metrics request failed");
            }
            drop(slot);
        });
    }
}

/// An open scrape; it frees its place when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Self> {
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < MAX_CONNECTIONS).then_some(n + 1)
        })
        .ok()?;
        Some(Self(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers 503 without reading and without waiting: a short response into
/// a fresh socket's empty buffer.
fn turn_away(stream: TcpStream) {
    if let Ok(stream) = stream.into_std() {
        let body = format!("more than {MAX_CONNECTIONS} scrapes at once\n");
        let _ = (&stream).write(response("503 Service Unavailable", &body).as_bytes());
    }
}

fn response(status: &str, body: &str) -> String {
    // RFC 9110 15.5.6: a 405 says which methods are allowed.
    let allow = if status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status}\r\n{allow}Content-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn answer(mut stream: TcpStream, requests: mpsc::Sender<Pending>) -> std::io::Result<()> {
    let mut head = vec![0; MAX_HEAD];
    let mut received = 0;
    // Until a head is complete, or NeedMore if the scraper leaves first.
    let read_head = async {
        loop {
            // Never empty: route refuses a head of MAX_HEAD bytes.
            let n = stream.read(&mut head[received..]).await?;
            received += n;
            match route(&head[..received]) {
                Route::NeedMore if n > 0 => continue,
                routed => return Ok::<_, std::io::Error>(routed),
            }
        }
    };
    let routed = timeout(READ_TIMEOUT, read_head).await.unwrap_or_else(|_| {
        Ok(Route::Refuse {
            status: "408 Request Timeout",
            body: format!("no complete request head within {READ_TIMEOUT:?}\n"),
        })
    })?;
    let text = match routed {
        Route::Metrics => {
            let (tx, rx) = oneshot::channel();
            let _ = requests.send((Request::Status, tx)).await;
            match rx
                .await
                .ok()
                .and_then(|r| serde_json::from_str::<Status>(&r.message).ok())
            {
                Some(status) => response("200 OK", &render(&status)),
                None => response("503 Service Unavailable", "the daemon is stopping\n"),
            }
        }
        Route::Refuse { status, body } => response(status, &body),
        Route::NeedMore => return Ok(()),
    };
    let send = async {
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    };
    timeout(READ_TIMEOUT, send).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "the scraper does not read")
    })?
}

/// The Prometheus text exposition of a status document.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let by_builder =
        |f: &dyn Fn(&crate::operate::status::BuilderStatus) -> String| -> Vec<(String, String)> {
            status
                .builders
                .iter()
                .map(|b| (format!("{{builder=\"{}\"}}", b.name), f(b)))
                .collect()
        };
    // Milliseconds as seconds; builders without a value are left out.
    let seconds_by_builder = |ms: &dyn Fn(
        &crate::operate::status::BuilderStatus,
    ) -> Option<f64>|
     -> Vec<(String, String)> {
        status
            .builders
            .iter()
            .filter_map(|b| {
                Some((
                    format!("{{builder=\"{}\"}}", b.name),
                    (ms(b)? / 1e3).to_string(),
                ))
            })
            .collect()
    };
    family(
        "yensid_mode",
        "gauge",
        "1 for the mode in force (auto, remote, local), with its source.",
        ["auto", "remote", "local"]
            .iter()
            .map(|m| {
                (
                    format!("{{mode=\"{m}\",source=\"{}\"}}", status.mode.source),
                    ((status.mode.in_force == *m) as u8).to_string(),
                )
            })
            .collect(),
    );
    family(
        "yensid_service_accepting",
        "gauge",
        "1 while a service sends connections to builders, 0 while it refuses them.",
        status
            .services
            .iter()
            .map(|s| {
                (
                    format!("{{service=\"{}\"}}", s.name),
                    (s.refusal.is_none() as u8).to_string(),
                )
            })
            .collect(),
    );
    family(
        "yensid_dispatched_total",
        "counter",
        "Connections the kernel steered to a builder.",
        status
            .services
            .iter()
            .filter_map(|s| {
                Some((
                    format!("{{service=\"{}\"}}", s.name),
                    s.dispatched?.to_string(),
                ))
            })
            .collect(),
    );
    family(
        "yensid_refused_total",
        "counter",
        "Connections the kernel refused (RST), by reason.",
        status
            .services
            .iter()
            .flat_map(|s| {
                [
                    ("mode_local", s.refused_mode_local),
                    ("no_builder", s.refused_no_builder),
                ]
                .into_iter()
                .filter_map(move |(reason, n)| {
                    Some((
                        format!("{{service=\"{}\",reason=\"{reason}\"}}", s.name),
                        n?.to_string(),
                    ))
                })
            })
            .collect(),
    );
    family(
        "yensid_builder_healthy",
        "gauge",
        "1 while probes (and real connections) find the builder serving SSH.",
        by_builder(&|b| ((b.state != "unhealthy") as u8).to_string()),
    );
    family(
        "yensid_builder_draining",
        "gauge",
        "1 while the operator drains the builder.",
        by_builder(&|b| ((b.state == "draining") as u8).to_string()),
    );
    family(
        "yensid_active_connections",
        "gauge",
        "Connections open to the builder.",
        by_builder(&|b| b.active.to_string()),
    );
    family(
        "yensid_connections_total",
        "counter",
        "Connections the builder served.",
        by_builder(&|b| b.connections.to_string()),
    );
    family(
        "yensid_failovers_total",
        "counter",
        "Connections moved away from the builder because it failed.",
        by_builder(&|b| b.failed_over.to_string()),
    );
    family(
        "yensid_rejected_clients_total",
        "counter",
        "Clients steered to the builder that did not speak SSH.",
        by_builder(&|b| b.rejected_clients.to_string()),
    );
    family(
        "yensid_handoffs",
        "gauge",
        "Connections accepted that have not finished their SSH handoff.",
        vec![(String::new(), status.handoffs.in_progress.to_string())],
    );
    family(
        "yensid_handoffs_refused_total",
        "counter",
        "Connections refused (RST) because too many were in handoff.",
        vec![(String::new(), status.handoffs.refused.to_string())],
    );
    family(
        "yensid_bytes_total",
        "counter",
        "Bytes forwarded, by direction.",
        status
            .builders
            .iter()
            .flat_map(|b| {
                [
                    ("to_builder", b.bytes_to_builder),
                    ("from_builder", b.bytes_from_builder),
                ]
                .into_iter()
                .map(move |(direction, n)| {
                    (
                        format!("{{builder=\"{}\",direction=\"{direction}\"}}", b.name),
                        n.to_string(),
                    )
                })
            })
            .collect(),
    );
    family(
        "yensid_probe_rtt_seconds",
        "gauge",
        "Round-trip time of the builder's last successful health probe.",
        seconds_by_builder(&|b| b.rtt_ms),
    );
    family(
        "yensid_kernel_rtt_seconds",
        "gauge",
        "TCP's smoothed RTT on connections to the builder (the daemon's or local clients' direct ones), at the kernel's latest sample.",
        seconds_by_builder(&|b| b.kernel_rtt_ms),
    );
    family(
        "yensid_retransmits_total",
        "counter",
        "TCP segments retransmitted to the builder.",
        by_builder(&|b| b.retransmits.to_string()),
    );
    // The local path: clients on this host connected straight to the builder.
    family(
        "yensid_local_connections",
        "gauge",
        "Local clients connected straight to the builder now (no proxy).",
        by_builder(&|b| b.local.open.to_string()),
    );
    family(
        "yensid_local_connections_total",
        "counter",
        "Local connects the kernel sent straight to the builder.",
        by_builder(&|b| b.local.connections.to_string()),
    );
    family(
        "yensid_local_failed_connects_total",
        "counter",
        "Local connects to the builder that failed (refused, timed out).",
        by_builder(&|b| b.local.failed_connects.to_string()),
    );
    family(
        "yensid_local_bytes_total",
        "counter",
        "Bytes of closed local connections, by direction.",
        status
            .builders
            .iter()
            .flat_map(|b| {
                [
                    ("to_builder", b.local.bytes_to_builder),
                    ("from_builder", b.local.bytes_from_builder),
                ]
                .into_iter()
                .map(move |(direction, n)| {
                    (
                        format!("{{builder=\"{}\",direction=\"{direction}\"}}", b.name),
                        n.to_string(),
                    )
                })
            })
            .collect(),
    );
    family(
        "yensid_local_retransmits_total",
        "counter",
        "TCP segments retransmitted on closed local connections to the builder.",
        by_builder(&|b| b.local.retransmits.to_string()),
    );
    family(
        "yensid_rtt_samples_total",
        "counter",
        "RTT samples the kernel took on the daemon's connections to the builder.",
        by_builder(&|b| b.rtt_samples.to_string()),
    );
    render_queues(&mut out, status);
    let _ = writeln!(
        out,
        "# HELP yensid_connect_seconds From upstream connect to the builder's SSH identification line.\n# TYPE yensid_connect_seconds histogram"
    );
    for b in &status.builders {
        let h = &b.connect_seconds;
        for (i, bound) in CONNECT_BUCKETS.iter().enumerate() {
            let count = h.buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "yensid_connect_seconds_bucket{{builder=\"{}\",le=\"{bound}\"}} {count}",
                b.name
            );
        }
        let _ = writeln!(
            out,
            "yensid_connect_seconds_bucket{{builder=\"{}\",le=\"+Inf\"}} {}",
            b.name, h.count
        );
        let _ = writeln!(
            out,
            "yensid_connect_seconds_sum{{builder=\"{}\"}} {}",
            b.name, h.sum_seconds
        );
        let _ = writeln!(
            out,
            "yensid_connect_seconds_count{{builder=\"{}\"}} {}",
            b.name, h.count
        );
    }
    render_load(status, &mut out);
    out
}

/// The queues of services with `when_full = "queue"`.
fn render_queues(out: &mut String, status: &Status) {
    let queues: Vec<(&str, &QueueStatus)> = status
        .services
        .iter()
        .filter_map(|s| Some((s.name.as_str(), s.queue.as_ref()?)))
        .collect();
    let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&QueueStatus) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (service, q) in &queues {
            let _ = writeln!(out, "{name}{{service=\"{service}\"}} {}", value(q));
        }
    };
    family(
        "yensid_queue_length",
        "gauge",
        "Connections waiting in the service's queue for a builder slot.",
        &|q| q.waiting,
    );
    family(
        "yensid_queued_total",
        "counter",
        "Connections that entered the service's queue.",
        &|q| q.queued,
    );
    family(
        "yensid_queue_served_total",
        "counter",
        "Queued connections handed to a builder.",
        &|q| q.served,
    );
    family(
        "yensid_queue_timed_out_total",
        "counter",
        "Queued connections refused (RST) at queue_timeout.",
        &|q| q.timed_out,
    );
    family(
        "yensid_queue_left_total",
        "counter",
        "Queued connections whose client left while waiting.",
        &|q| q.left,
    );
    let _ = writeln!(
        out,
        "# HELP yensid_queue_refused_total Connections refused (RST) by the queue, by reason.\n# TYPE yensid_queue_refused_total counter"
    );
    for (service, q) in &queues {
        for (reason, n) in [
            ("queue_full", q.refused_full),
            ("service_refusing", q.refused),
        ] {
            let _ = writeln!(
                out,
                "yensid_queue_refused_total{{service=\"{service}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP yensid_queue_wait_seconds How long queued connections waited before a builder took them.\n# TYPE yensid_queue_wait_seconds histogram"
    );
    for (service, q) in &queues {
        let h = &q.wait_seconds;
        for (i, bound) in WAIT_BUCKETS.iter().enumerate() {
            let count = h.buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "yensid_queue_wait_seconds_bucket{{service=\"{service}\",le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "yensid_queue_wait_seconds_bucket{{service=\"{service}\",le=\"+Inf\"}} {}\n\
             yensid_queue_wait_seconds_sum{{service=\"{service}\"}} {}\n\
             yensid_queue_wait_seconds_count{{service=\"{service}\"}} {}",
            h.count, h.sum_seconds, h.count
        );
    }
}

/// The families of builder load (builders with a `metrics_url` only).
fn render_load(status: &Status, out: &mut String) {
    let loaded: Vec<(&str, &crate::operate::status::LoadStatus)> = status
        .builders
        .iter()
        .filter_map(|b| Some((b.name.as_str(), b.load.as_ref()?)))
        .collect();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let each = |f: &dyn Fn(&crate::operate::status::LoadStatus) -> Option<f64>| {
        loaded
            .iter()
            .filter_map(|(name, l)| Some((format!("{{builder=\"{name}\"}}"), f(l)?)))
            .collect::<Vec<_>>()
    };
    family(
        "yensid_builder_pressure",
        "gauge",
        "Fraction of the last scrape interval the builder stalled (PSI some: a task waited; full: all did).",
        loaded
            .iter()
            .flat_map(|(name, l)| {
                let load = l.load.clone().unwrap_or_default();
                [
                    ("cpu", "some", load.cpu_pressure),
                    ("memory", "some", load.memory_pressure_some),
                    ("memory", "full", load.memory_pressure),
                    ("io", "some", load.io_pressure_some),
                    ("io", "full", load.io_pressure),
                ]
                .into_iter()
                .filter_map(move |(resource, kind, v)| {
                    Some((
                        format!("{{builder=\"{name}\",resource=\"{resource}\",kind=\"{kind}\"}}"),
                        v?,
                    ))
                })
            })
            .collect(),
    );
    family(
        "yensid_builder_load_per_core",
        "gauge",
        "The builder's 1-minute load average per CPU.",
        each(&|l| l.load.as_ref()?.load_per_core),
    );
    family(
        "yensid_builder_memory_available_bytes",
        "gauge",
        "The builder's MemAvailable.",
        each(&|l| l.load.as_ref()?.memory_available_bytes),
    );
    family(
        "yensid_builder_free_disk_bytes",
        "gauge",
        "Free space of the builder's store file system.",
        loaded
            .iter()
            .filter_map(|(name, l)| {
                let disk = l.load.as_ref()?.disk.as_ref()?;
                Some((
                    format!(
                        "{{builder=\"{name}\",mountpoint=\"{}\"}}",
                        disk.mountpoint.replace('\\', "\\\\").replace('"', "\\\"")
                    ),
                    disk.available_bytes,
                ))
            })
            .collect(),
    );
    family(
        "yensid_builder_tcp_established",
        "gauge",
        "Established TCP connections on the builder, from every client (node_netstat_Tcp_CurrEstab).",
        each(&|l| l.load.as_ref()?.tcp_established),
    );
    family(
        "yensid_builder_load_sample_age_seconds",
        "gauge",
        "Age of the builder's last good metrics sample.",
        each(&|l| l.sample_age_seconds),
    );
    family(
        "yensid_builder_metrics_readable",
        "gauge",
        "1 while the builder's load is freshly measured, 0 while it is judged on connection counts alone.",
        each(&|l| Some(l.load.is_some() as u8 as f64)),
    );
    family(
        "yensid_builder_scrape_errors_total",
        "counter",
        "Scrapes of the builder's metrics that failed.",
        each(&|l| Some(l.scrape_errors as f64)),
    );
    family(
        "yensid_builder_load_score",
        "gauge",
        "The measured part of least-loaded's score, in open connections per unit of weight.",
        each(&|l| Some(l.load_cost as f64 / yensid_ebpf::select::LOAD_UNIT as f64)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operate::status::{BuilderStatus, ModeStatus, ServiceStatus};

    fn status() -> Status {
        let mut connect = Histogram::default();
        connect.observe(Duration::from_micros(300));
        connect.observe(Duration::from_millis(30));
        let mut wait = Histogram::default();
        wait.observe_in(&WAIT_BUCKETS, Duration::from_millis(300));
        wait.observe_in(&WAIT_BUCKETS, Duration::from_secs(20));
        Status {
            pid: 1,
            dataplane: "kernel".into(),
            forward: "sockmap".into(),
            forward_reason: "set in [daemon] forward".into(),
            bpf: true,
            path_measurement: "kernel".into(),
            handoffs: Default::default(),
            takeover: None,
            retired_builders: Vec::new(),
            mode: ModeStatus {
                in_force: "local".into(),
                source: "override".into(),
                until: None,
                reason: None,
                summary: String::new(),
            },
            services: vec![ServiceStatus {
                name: "x86".into(),
                listen: vec!["127.0.0.22/32".into()],
                port: 22,
                strategy: "least-connections".into(),
                refusal: Some("mode is local".into()),
                members: Vec::new(),
                dispatched: Some(7),
                refused_mode_local: Some(3),
                refused_no_builder: Some(0),
                local_delivery: Vec::new(),
                queue: Some(QueueStatus {
                    waiting: 2,
                    limit: 10,
                    timeout_seconds: 60.0,
                    queued: 9,
                    served: 5,
                    timed_out: 1,
                    refused_full: 3,
                    left: 1,
                    refused: 0,
                    wait_seconds: wait,
                    kernel_queued: Some(12),
                }),
                local_clients: "direct".into(),
            }],
            builders: vec![BuilderStatus {
                name: "b1".into(),
                address: "198.18.1.2:22".into(),
                state: "draining".into(),
                reason: None,
                weight: 1,
                max_connections: None,
                active: 1,
                connections: 6,
                rejected_clients: 1,
                failed_over: 0,
                spliced: 5,
                copied: 0,
                bytes_to_builder: 100,
                bytes_from_builder: 200,
                rtt_ms: Some(2.0),
                kernel_rtt_ms: Some(0.5),
                rtt_samples: 9,
                retransmits: 4,
                egress: None,
                connect_seconds: connect,
                local: crate::operate::status::LocalBuilderStatus {
                    open: 2,
                    connections: 11,
                    ..Default::default()
                },
                load: Some(crate::operate::status::LoadStatus {
                    metrics_url: "http://198.18.1.2:9100/metrics".into(),
                    load: Some(crate::decide::load::Load {
                        cpu_pressure: Some(0.25),
                        load_per_core: Some(1.5),
                        disk: Some(crate::decide::load::Disk {
                            mountpoint: "/nix".into(),
                            available_bytes: 1e9,
                            size_bytes: None,
                        }),
                        tcp_established: Some(4.0),
                        ..Default::default()
                    }),
                    sample_age_seconds: Some(1.5),
                    error: None,
                    scrape_errors: 2,
                    other_connections: Some(2.0),
                    load_cost: 2048,
                }),
            }],
        }
    }

    #[test]
    fn every_family_is_rendered_with_its_samples() {
        let text = render(&status());
        for line in [
            "yensid_mode{mode=\"local\",source=\"override\"} 1",
            "yensid_mode{mode=\"auto\",source=\"override\"} 0",
            "yensid_service_accepting{service=\"x86\"} 0",
            "yensid_dispatched_total{service=\"x86\"} 7",
            "yensid_refused_total{service=\"x86\",reason=\"mode_local\"} 3",
            "yensid_builder_healthy{builder=\"b1\"} 1",
            "yensid_builder_draining{builder=\"b1\"} 1",
            "yensid_connections_total{builder=\"b1\"} 6",
            "yensid_bytes_total{builder=\"b1\",direction=\"from_builder\"} 200",
            "yensid_probe_rtt_seconds{builder=\"b1\"} 0.002",
            "yensid_connect_seconds_bucket{builder=\"b1\",le=\"0.0005\"} 1",
            "yensid_connect_seconds_bucket{builder=\"b1\",le=\"0.05\"} 2",
            "yensid_connect_seconds_count{builder=\"b1\"} 2",
            "yensid_kernel_rtt_seconds{builder=\"b1\"} 0.0005",
            "yensid_retransmits_total{builder=\"b1\"} 4",
            "yensid_local_connections{builder=\"b1\"} 2",
            "yensid_local_connections_total{builder=\"b1\"} 11",
            "yensid_rtt_samples_total{builder=\"b1\"} 9",
            "yensid_handoffs 0",
            "yensid_queue_length{service=\"x86\"} 2",
            "yensid_queued_total{service=\"x86\"} 9",
            "yensid_queue_served_total{service=\"x86\"} 5",
            "yensid_queue_timed_out_total{service=\"x86\"} 1",
            "yensid_queue_left_total{service=\"x86\"} 1",
            "yensid_queue_refused_total{service=\"x86\",reason=\"queue_full\"} 3",
            "yensid_queue_wait_seconds_bucket{service=\"x86\",le=\"0.25\"} 0",
            "yensid_queue_wait_seconds_bucket{service=\"x86\",le=\"0.5\"} 1",
            "yensid_queue_wait_seconds_bucket{service=\"x86\",le=\"30\"} 2",
            "yensid_queue_wait_seconds_bucket{service=\"x86\",le=\"+Inf\"} 2",
            "yensid_queue_wait_seconds_count{service=\"x86\"} 2",
            "yensid_builder_pressure{builder=\"b1\",resource=\"cpu\",kind=\"some\"} 0.25",
            "yensid_builder_load_per_core{builder=\"b1\"} 1.5",
            "yensid_builder_free_disk_bytes{builder=\"b1\",mountpoint=\"/nix\"} 1000000000",
            "yensid_builder_tcp_established{builder=\"b1\"} 4",
            "yensid_builder_load_sample_age_seconds{builder=\"b1\"} 1.5",
            "yensid_builder_metrics_readable{builder=\"b1\"} 1",
            "yensid_builder_scrape_errors_total{builder=\"b1\"} 2",
            "yensid_builder_load_score{builder=\"b1\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        // 18, 7 of the queue, 5 of the local path and 9 of builder load.
        assert_eq!(families, 39);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(2));
        h.observe(Duration::from_secs(10));
        assert_eq!(h.buckets[1], 0, "<= 1ms");
        assert_eq!(h.buckets[2], 1, "<= 2.5ms");
        assert_eq!(*h.buckets.last().unwrap(), 1, "10 s is only in +Inf");
        assert_eq!(h.count, 2);
    }

    fn status_of(route: Route) -> &'static str {
        match route {
            Route::Refuse { status, .. } => status,
            Route::Metrics => "metrics",
            Route::NeedMore => "need more",
        }
    }

    #[test]
    fn only_get_metrics_is_served_and_everything_else_gets_a_proper_status() {
        let cases: [(&[u8], &str); 9] = [
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "metrics"),
            (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", "metrics"),
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", "need more"),
            (b"GET /metr", "need more"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
            (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
            (b"GET /metrics/x HTTP/1.1\r\n\r\n", "404 Not Found"),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                "400 Bad Request",
            ),
            (b"SSH-2.0-OpenSSH_9.2\r\n", "400 Bad Request"),
        ];
        for (head, expected) in cases {
            assert_eq!(status_of(route(head)), expected, "{}", escape(head));
        }
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            status_of(route(&many)),
            "431 Request Header Fields Too Large"
        );
        let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD, b'y');
        assert_eq!(
            status_of(route(&long)),
            "431 Request Header Fields Too Large"
        );
        let Route::Refuse { body, .. } = route(b"GET /\x1b[2J HTTP/1.1\r\n\r\n") else {
            panic!("served");
        };
        assert!(!body.trim_end().chars().any(char::is_control), "{body:?}");
    }

    #[tokio::test]
    async fn the_endpoint_answers_a_scrape_and_refuses_a_stranger() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        let (tx, mut rx) = mpsc::channel::<Pending>(1);
        let listener = bind(listen).await.unwrap();
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let message = serde_json::to_string(&status()).unwrap();
                let _ = reply.send(crate::operate::control::Reply { ok: true, message });
            }
        });
        let fetch = |request: &'static [u8]| async move {
            let mut stream = TcpStream::connect(listen).await.unwrap();
            stream.write_all(request).await.unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            text
        };
        let text = fetch(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("\nyensid_connections_total{builder=\"b1\"} 6\n"),
            "{text}"
        );
        let text = fetch(b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        let text = fetch(b"\0\0\0\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    }
}
