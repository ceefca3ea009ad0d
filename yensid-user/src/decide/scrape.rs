//! Reads each builder's node_exporter: one task per builder with a
//! `metrics_url`, a plain HTTP/1.1 GET every `scrape_interval` within
//! `scrape_timeout`, the response capped at [`MAX_RESPONSE`]. The head is
//! parsed by `httparse`, the body by `prometheus-parse` (in
//! [`crate::decide::load`]).
//!
//! A builder whose metrics cannot be read (unreachable, too slow, an HTTP
//! error, garbage) keeps working on connection counts alone: its load is
//! unknown, no threshold excludes it and `least-loaded` counts only this
//! daemon's connections to it. Each change between "readable" and a kind
//! of failure is logged once, the response's bytes escaped.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    config::{Config, MetricsSource},
    dataplane::ident::escape,
    decide::{
        load::{Load, Sample, SampleError},
        registry::Registry,
    },
};

/// The largest response read; node_exporter's is 50 to 200 KiB.
pub const MAX_RESPONSE: usize = 4 << 20;
/// Samples older than this many intervals are stale: the load is unknown.
const STALE_INTERVALS: u32 = 3;

/// Why a scrape gave no sample.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ScrapeError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    #[error("response larger than {MAX_RESPONSE} bytes")]
    TooLarge,
    #[error("invalid HTTP response: {0}")]
    BadResponse(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("{0}")]
    Body(#[from] SampleError),
    #[error("read failed: {0}")]
    Io(String),
}

impl ScrapeError {
    /// The kind of failure, without details that change on every scrape
    /// (so that a builder that keeps failing the same way is logged once).
    fn kind(&self) -> std::mem::Discriminant<ScrapeError> {
        std::mem::discriminant(self)
    }
}

/// One GET of `source` within `limit`.
pub async fn scrape(source: &MetricsSource, limit: Duration) -> Result<String, ScrapeError> {
    tokio::time::timeout(limit, fetch(source))
        .await
        .map_err(|_| ScrapeError::Timeout(limit))?
}

async fn fetch(source: &MetricsSource) -> Result<String, ScrapeError> {
    let addr = tokio::net::lookup_host(&source.authority)
        .await
        .map_err(|e| ScrapeError::Resolve(format!("{}: {e}", source.authority)))?
        .next()
        .ok_or_else(|| ScrapeError::Resolve(source.authority.clone()))?;
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ScrapeError::Connect(format!("{addr}: {e}")))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/plain\r\nConnection: close\r\nUser-Agent: yensid\r\n\r\n",
        source.path, source.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ScrapeError::Io(e.to_string()))?;
    let mut buf = Vec::with_capacity(256 << 10);
    loop {
        let mut chunk = [0u8; 64 << 10];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| ScrapeError::Io(e.to_string()))?;
        if n == 0 {
            break;
        }
        if buf.len() + n > MAX_RESPONSE {
            return Err(ScrapeError::TooLarge);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(done) = complete_body(&buf)? {
            return Ok(done);
        }
    }
    match complete_body(&buf)? {
        Some(body) => Ok(body),
        None => Err(ScrapeError::BadResponse(format!(
            "connection closed after {} bytes: {}",
            buf.len(),
            escape(&buf[..buf.len().min(80)])
        ))),
    }
}

/// The body once `buf` holds a whole response (by `Content-Length`, or
/// chunked, or up to the close when neither is given and the peer closed),
/// `None` while more is needed. Every byte of `buf` is the builder's: error
/// messages quote it escaped.
pub fn complete_body(buf: &[u8]) -> Result<Option<String>, ScrapeError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(ScrapeError::BadResponse(format!(
                "{e}: {}",
                escape(&buf[..buf.len().min(80)])
            )));
        }
    };
    let code = response.code.unwrap_or(0);
    if code != 200 {
        return Err(ScrapeError::Status(code));
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let body = &buf[head_len..];
    let text = |bytes: &[u8]| {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ScrapeError::BadResponse("body is not UTF-8".into()))
    };
    if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        return match dechunk(body)? {
            Some(b) => text(&b).map(Some),
            None => Ok(None),
        };
    }
    match header("content-length") {
        Some(len) => {
            let len: usize = len.parse().map_err(|_| {
                ScrapeError::BadResponse(format!("Content-Length {}", escape(len.as_bytes())))
            })?;
            if len > MAX_RESPONSE {
                return Err(ScrapeError::TooLarge);
            }
            if body.len() >= len {
                text(&body[..len]).map(Some)
            } else {
                Ok(None)
            }
        }
        // Delimited by the close: complete only at EOF (the caller's
        // second call, after the read loop ended).
        None => Ok(None),
    }
}

/// A chunked body, `None` until its last chunk arrived.
fn dechunk(mut data: &[u8]) -> Result<Option<Vec<u8>>, ScrapeError> {
    let mut out = Vec::new();
    loop {
        let (size, rest) = match httparse::parse_chunk_size(data) {
            Ok(httparse::Status::Complete((n, size))) => (size, &data[n..]),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ScrapeError::BadResponse("invalid chunk size".into())),
        };
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s <= MAX_RESPONSE)
            .ok_or(ScrapeError::TooLarge)?;
        if size == 0 {
            return Ok(Some(out));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&rest[..size]);
        data = &rest[size + 2..];
    }
}

/// What the daemon knows of one builder's load.
#[derive(Debug, Default)]
pub struct LoadTracker {
    /// The previous good sample and when it was taken.
    last: Option<(Instant, Sample)>,
    /// The load at the last good sample.
    load: Option<Load>,
    /// This daemon's open connections to the builder at that sample.
    own_at_sample: u64,
    /// The failure in force, if the last scrape failed.
    error: Option<ScrapeError>,
    pub errors_total: u64,
}

impl LoadTracker {
    /// Records a scrape; returns a line to log if the state changed
    /// (readable <-> failing, or a new kind of failure).
    fn record(
        &mut self,
        now: Instant,
        result: Result<Sample, ScrapeError>,
        own: u64,
    ) -> Option<Change> {
        match result {
            Ok(sample) => {
                let previous = self.last.take();
                let load = Load::between(
                    previous.as_ref().map(|(_, s)| s),
                    &sample,
                    previous
                        .as_ref()
                        .map_or(Duration::ZERO, |(at, _)| now.saturating_duration_since(*at)),
                );
                self.load = Some(load);
                self.own_at_sample = own;
                self.last = Some((now, sample));
                self.error.take().map(|_| Change::Readable)
            }
            Err(e) => {
                self.errors_total += 1;
                let changed = self.error.as_ref().is_none_or(|old| old.kind() != e.kind());
                // A failure breaks the series: the next rates start afresh.
                self.last = None;
                self.load = None;
                self.error = Some(e.clone());
                changed.then_some(Change::Failing(e))
            }
        }
    }

    /// The load while the last sample is fresh, else `None`.
    pub fn fresh(&self, now: Instant, interval: Duration) -> Option<&Load> {
        let (at, _) = self.last.as_ref()?;
        (now.saturating_duration_since(*at) <= interval * STALE_INTERVALS)
            .then_some(self.load.as_ref())
            .flatten()
    }

    /// Age of the last good sample.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.last
            .as_ref()
            .map(|(at, _)| now.saturating_duration_since(*at))
    }

    pub fn error(&self) -> Option<&ScrapeError> {
        self.error.as_ref()
    }

    pub fn own_at_sample(&self) -> u64 {
        self.own_at_sample
    }
}

enum Change {
    Readable,
    Failing(ScrapeError),
}

/// The scrape tasks, one per builder with a `metrics_url`.
#[derive(Default)]
pub struct Scrapers {
    tasks: HashMap<String, (MetricsSource, JoinHandle<()>)>,
}

impl Scrapers {
    /// Starts, restarts (a changed source) and stops tasks to match `config`.
    pub fn sync(&mut self, registry: &Arc<Registry>, config: &Config) {
        self.tasks.retain(|name, (source, task)| {
            let keep = config
                .builder(name)
                .and_then(|b| b.metrics.as_ref())
                .is_some_and(|m| m == source);
            if !keep {
                task.abort();
                registry.inner().load.remove(name);
            }
            keep
        });
        for b in &config.builders {
            let Some(source) = &b.metrics else {
                continue;
            };
            if !self.tasks.contains_key(&b.name) {
                let task = tokio::spawn(scrape_loop(
                    registry.clone(),
                    b.name.clone(),
                    source.clone(),
                ));
                self.tasks.insert(b.name.clone(), (source.clone(), task));
            }
        }
    }

    pub fn close(&mut self) {
        for (_, (_, task)) in self.tasks.drain() {
            task.abort();
        }
    }
}

async fn scrape_loop(registry: Arc<Registry>, builder: String, source: MetricsSource) {
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next.into()).await;
        let settings = registry.inner().config.scrape;
        next = Instant::now() + settings.interval;
        let result = scrape(&source, settings.timeout)
            .await
            .and_then(|body| Ok(Sample::parse(&body, source.store_mountpoint.as_deref())?));
        registry.scraped(&builder, &source.url, result);
    }
}

impl Registry {
    /// Records a scrape of `builder`'s metrics, logs a change of state
    /// once, and replans when decisions may depend on load.
    pub fn scraped(&self, builder: &str, url: &str, result: Result<Sample, ScrapeError>) {
        let mut inner = self.inner();
        let own = inner.active.get(builder).copied().unwrap_or(0);
        let tracker = inner.load.entry(builder.to_owned()).or_default();
        match tracker.record(Instant::now(), result, own) {
            Some(Change::Readable) => info!(builder, url, "builder metrics readable again"),
            Some(Change::Failing(e)) => warn!(
                builder,
                url,
                error = %e,
                "builder metrics unreadable: using connection counts alone"
            ),
            None => {}
        }
        let decides = load_decides(&inner.config);
        drop(inner);
        if decides {
            self.replan.notify_one();
        }
    }
}

/// Whether any decision depends on measured load: a threshold somewhere,
/// or a `least-loaded` service. Otherwise a sample only informs status.
fn load_decides(config: &Config) -> bool {
    config
        .services
        .iter()
        .any(|s| s.strategy == crate::config::Strategy::LeastLoaded || !s.load.is_empty())
        || config.builders.iter().any(|b| !b.load.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        Sample::parse("node_load1 1\nnode_netstat_Tcp_CurrEstab 3\n", None).unwrap()
    }

    #[test]
    fn only_thresholds_or_least_loaded_make_samples_replan() {
        let base = "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.22/32\"]\n";
        let builder = "[builders.b1]\naddress = \"198.18.1.2:22\"\nmetrics_url = \"http://198.18.1.2:9100/\"\n";
        let parse = |text: String| Config::parse(&text).unwrap();
        assert!(!load_decides(&parse(format!("{base}{builder}"))));
        assert!(load_decides(&parse(format!(
            "{base}strategy = \"least-loaded\"\n{builder}"
        ))));
        assert!(load_decides(&parse(format!(
            "{base}load = {{ max_load_per_core = 4 }}\n{builder}"
        ))));
        assert!(load_decides(&parse(format!(
            "{base}{builder}load = {{ min_free_disk = \"5%\" }}\n"
        ))));
    }

    /// A real socket: a response past the cap is cut off, a silent server
    /// runs into the timeout, and both say so.
    #[tokio::test]
    async fn oversized_and_silent_endpoints_fail_with_their_reason() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = MetricsSource {
            url: format!("http://{addr}/metrics"),
            authority: addr.to_string(),
            path: "/metrics".into(),
            store_mountpoint: None,
        };
        let server = tokio::spawn(async move {
            // First: an endless body. Second: silence.
            let (mut big, _) = listener.accept().await.unwrap();
            let _ = big.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            let chunk = vec![b'#'; 1 << 16];
            while big.write_all(&chunk).await.is_ok() {}
            let (silent, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(silent);
        });
        assert_eq!(
            scrape(&source, Duration::from_secs(20)).await,
            Err(ScrapeError::TooLarge)
        );
        assert_eq!(
            scrape(&source, Duration::from_millis(200)).await,
            Err(ScrapeError::Timeout(Duration::from_millis(200)))
        );
        server.abort();
    }

    #[test]
    fn responses_by_length_chunks_and_close() {
        let by_length = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nnode_load1 1";
        assert_eq!(
            complete_body(by_length).unwrap().as_deref(),
            Some("node_load1 1")
        );
        assert_eq!(complete_body(&by_length[..40]).unwrap(), None);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nnode_\r\n7\r\nload1 1\r\n0\r\n\r\n";
        assert_eq!(
            complete_body(chunked).unwrap().as_deref(),
            Some("node_load1 1")
        );
        assert_eq!(complete_body(&chunked[..60]).unwrap(), None);
        let until_close = b"HTTP/1.0 200 OK\r\n\r\nnode_load1 1";
        assert_eq!(complete_body(until_close).unwrap(), None);
    }

    #[test]
    fn errors_and_garbage_are_named() {
        assert_eq!(
            complete_body(b"HTTP/1.1 503 Busy\r\n\r\n"),
            Err(ScrapeError::Status(503))
        );
        assert!(matches!(
            complete_body(b"\x1b[2J garbage\r\n\r\n"),
            Err(ScrapeError::BadResponse(m)) if m.contains("\\x1b")
        ));
        assert_eq!(
            complete_body(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"),
            Err(ScrapeError::TooLarge)
        );
        assert!(complete_body(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n\xff\xfe").is_err());
    }

    #[test]
    fn a_failing_builder_is_logged_once_per_kind_and_its_load_forgotten() {
        let mut t = LoadTracker::default();
        let t0 = Instant::now();
        let interval = Duration::from_secs(5);
        assert!(t.record(t0, Ok(sample()), 2).is_none());
        assert!(t.fresh(t0, interval).is_some());
        assert_eq!(t.own_at_sample(), 2);
        let timeout = || Err(ScrapeError::Timeout(Duration::from_secs(2)));
        assert!(matches!(
            t.record(t0, timeout(), 0),
            Some(Change::Failing(_))
        ));
        assert!(
            t.record(t0, timeout(), 0).is_none(),
            "same failure: not again"
        );
        assert!(t.fresh(t0, interval).is_none());
        assert!(matches!(
            t.record(t0, Err(ScrapeError::Status(500)), 0),
            Some(Change::Failing(_))
        ));
        assert_eq!(t.errors_total, 3);
        assert!(matches!(
            t.record(t0, Ok(sample()), 0),
            Some(Change::Readable)
        ));
        assert!(t.error().is_none());
        // A sample older than three intervals is stale.
        assert!(t.fresh(t0 + interval * 4, interval).is_none());
        assert_eq!(t.age(t0 + interval), Some(interval));
    }
}
