//! Builder health: active SSH-banner probes and passive failures.
//!
//! [`Tracker`] is the pure state machine for one builder (unit-tested
//! below); [`probe`] is the I/O: a TCP connect plus a valid SSH
//! identification line within the timeout. A port that accepts TCP but does
//! not speak SSH, closes at once or sends garbage fails the probe.
//!
//! Rules: a healthy builder goes down after `fall` consecutive failed
//! probes, or at once on a passive failure (a real connection's connect
//! was refused or timed out). A builder that accepted a real connection and
//! then closed, reset or ignored it is busy (an sshd at `MaxStartups`, often
//! because of its own clients' flood), which is no passive failure: the
//! connection is failed over and the probes decide. A down builder is probed with exponential back-off
//! (`interval`, doubling, capped at `max_interval`) and comes back after
//! `rise` consecutive successful probes.

use std::{
    fmt,
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpStream, time::timeout};

use crate::{config::HealthSettings, dataplane::ident::escape};

/// Why a builder is considered down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connect or the banner read did not finish in time.
    Timeout,
    /// The connect was refused or reset.
    Refused(String),
    /// It answered, but not with an SSH identification line.
    BadBanner(String),
    /// A real connection could not reach it.
    Passive(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timeout"),
            Failure::Refused(e) => write!(f, "refused: {e}"),
            Failure::BadBanner(b) => write!(f, "bad banner: {b}"),
            Failure::Passive(e) => write!(f, "passive failure: {e}"),
        }
    }
}

/// A change of a builder's health, worth one log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Down(Failure),
    Up,
}

/// The health of one builder.
#[derive(Clone, Debug)]
pub struct Tracker {
    settings: HealthSettings,
    down: Option<Failure>,
    /// Consecutive probe results of the kind that would change the state.
    streak: u32,
    /// Consecutive failed probes since the builder went down (back-off).
    failed_probes: u32,
    next_probe: Instant,
    /// Duration of the last successful probe (connect to banner).
    last_rtt: Option<Duration>,
}

impl Tracker {
    /// A builder starts healthy and is probed at once.
    pub fn new(settings: HealthSettings, now: Instant) -> Self {
        Self {
            settings,
            down: None,
            streak: 0,
            failed_probes: 0,
            next_probe: now,
            last_rtt: None,
        }
    }

    pub fn settings(&self) -> &HealthSettings {
        &self.settings
    }

    /// Keeps the state across a reload; new timings apply from the next probe.
    pub fn update_settings(&mut self, settings: HealthSettings) {
        self.settings = settings;
    }

    /// `None` when healthy.
    pub fn failure(&self) -> Option<&Failure> {
        self.down.as_ref()
    }

    pub fn next_probe(&self) -> Instant {
        self.next_probe
    }

    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    pub fn on_probe(
        &mut self,
        now: Instant,
        result: Result<Duration, Failure>,
    ) -> Option<Transition> {
        match (result, self.down.is_some()) {
            (Ok(rtt), false) => {
                self.last_rtt = Some(rtt);
                self.streak = 0;
                self.next_probe = now + self.settings.interval;
                None
            }
            (Ok(rtt), true) => {
                self.last_rtt = Some(rtt);
                self.streak = self.streak.saturating_add(1);
                if self.streak >= self.settings.rise {
                    self.down = None;
                    self.streak = 0;
                    self.failed_probes = 0;
                    self.next_probe = now + self.settings.interval;
                    Some(Transition::Up)
                } else {
                    self.next_probe = now + self.settings.interval;
                    None
                }
            }
            (Err(failure), false) => {
                self.streak = self.streak.saturating_add(1);
                if self.streak >= self.settings.fall {
                    Some(self.go_down(now, failure))
                } else {
                    self.next_probe = now + self.settings.interval;
                    None
                }
            }
            (Err(failure), true) => {
                self.streak = 0;
                self.failed_probes = self.failed_probes.saturating_add(1);
                self.down = Some(failure);
                self.next_probe = now + self.backoff();
                None
            }
        }
    }

    /// A real connection failed: down at once (the next connection must
    /// not go there), probed again after the first interval.
    pub fn on_passive_failure(&mut self, now: Instant, reason: String) -> Option<Transition> {
        if self.down.is_some() {
            return None;
        }
        Some(self.go_down(now, Failure::Passive(reason)))
    }

    fn go_down(&mut self, now: Instant, failure: Failure) -> Transition {
        self.down = Some(failure.clone());
        self.streak = 0;
        self.failed_probes = 1;
        self.next_probe = now + self.backoff();
        Transition::Down(failure)
    }

    fn backoff(&self) -> Duration {
        let doublings = self.failed_probes.saturating_sub(1).min(20);
        self.settings
            .interval
            .saturating_mul(1 << doublings)
            .min(self.settings.max_interval)
    }
}

/// The identification line a probe sends, so builders log a named client
/// instead of a connection that sent nothing.
const PROBE_IDENT: &[u8] = b"SSH-2.0-yensid-health-check\r\n";

/// A successful probe.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    /// From connect to identification line.
    pub rtt: Duration,
    /// The address the builder's name resolved to (for its egress link).
    pub peer: IpAddr,
}

/// Connects to `address` and waits for an SSH identification line.
pub async fn probe(address: &str, limit: Duration) -> Result<Answer, Failure> {
    let started = Instant::now();
    let attempt = async {
        let mut stream = crate::dataplane::proxy::connect(address)
            .await
            .map_err(|e| Failure::Refused(e.to_string()))?;
        let peer = stream
            .peer_addr()
            .map_err(|e| Failure::Refused(e.to_string()))?
            .ip();
        read_banner(&mut stream).await?;
        // Best effort: the result is known already.
        let _ = stream.write_all(PROBE_IDENT).await;
        Ok::<_, Failure>(peer)
    };
    match timeout(limit, attempt).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Err(f)) => Err(f),
        Ok(Ok(peer)) => Ok(Answer {
            rtt: started.elapsed(),
            peer,
        }),
    }
}

/// Reads lines until the identification line (RFC 4253 allows others
/// before it), within a bounded number of bytes.
async fn read_banner(stream: &mut TcpStream) -> Result<String, Failure> {
    use tokio::io::AsyncReadExt;
    const LIMIT: usize = 8192;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| Failure::Refused(e.to_string()))?;
        if n == 0 {
            return Err(Failure::BadBanner(if seen.is_empty() {
                "closed without a banner".into()
            } else {
                printable(&seen)
            }));
        }
        seen.extend_from_slice(&buf[..n]);
        for line in seen.split(|&b| b == b'\n') {
            if line.starts_with(b"SSH-") && seen.contains(&b'\n') {
                let text = escape(line.strip_suffix(b"\r").unwrap_or(line));
                return if text.starts_with("SSH-2.0-") || text.starts_with("SSH-1.99-") {
                    Ok(text)
                } else {
                    Err(Failure::BadBanner(text))
                };
            }
        }
        if seen.len() > LIMIT || (seen.contains(&b'\n') && !looks_like_text(&seen)) {
            return Err(Failure::BadBanner(printable(&seen)));
        }
    }
}

fn looks_like_text(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&b| b == b'\r' || b == b'\n' || b == b'\t' || (0x20..0x7f).contains(&b))
}

/// The first bytes a builder sent, escaped: they go into logs and status.
fn printable(bytes: &[u8]) -> String {
    format!("`{}`", escape(&bytes[..bytes.len().min(40)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rise: u32, fall: u32) -> HealthSettings {
        HealthSettings {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise,
            fall,
            max_interval: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(3),
        }
    }

    const OK: Result<Duration, Failure> = Ok(Duration::from_millis(1));

    #[test]
    fn goes_down_after_fall_failures_and_not_before() {
        let t0 = Instant::now();
        let mut t = Tracker::new(settings(1, 2), t0);
        assert_eq!(t.on_probe(t0, Err(Failure::Timeout)), None);
        assert!(t.failure().is_none());
        assert_eq!(
            t.on_probe(t0, Err(Failure::Timeout)),
            Some(Transition::Down(Failure::Timeout))
        );
        assert_eq!(t.failure(), Some(&Failure::Timeout));
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let t0 = Instant::now();
        let mut t = Tracker::new(settings(1, 2), t0);
        t.on_probe(t0, Err(Failure::Timeout));
        t.on_probe(t0, OK);
        assert_eq!(t.on_probe(t0, Err(Failure::Timeout)), None);
        assert!(t.failure().is_none());
    }

    #[test]
    fn passive_failure_is_immediate_and_reported_once() {
        let t0 = Instant::now();
        let mut t = Tracker::new(settings(1, 3), t0);
        let down = t.on_passive_failure(t0, "connection refused".into());
        assert_eq!(
            down,
            Some(Transition::Down(Failure::Passive(
                "connection refused".into()
            )))
        );
        assert_eq!(t.on_passive_failure(t0, "again".into()), None);
    }

    #[test]
    fn comes_back_after_rise_successes() {
        let t0 = Instant::now();
        let mut t = Tracker::new(settings(2, 1), t0);
        t.on_probe(t0, Err(Failure::Refused("x".into())));
        assert_eq!(t.on_probe(t0, OK), None);
        assert!(t.failure().is_some());
        assert_eq!(t.on_probe(t0, OK), Some(Transition::Up));
        assert!(t.failure().is_none());
    }

    #[test]
    fn down_builders_are_probed_with_capped_exponential_backoff() {
        let t0 = Instant::now();
        let mut t = Tracker::new(settings(1, 1), t0);
        t.on_probe(t0, Err(Failure::Timeout));
        let mut waits = vec![t.next_probe() - t0];
        for _ in 0..6 {
            t.on_probe(t0, Err(Failure::Timeout));
            waits.push(t.next_probe() - t0);
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 10, 20, 40, 60, 60, 60]);
        t.on_probe(t0, OK);
        assert_eq!(t.next_probe() - t0, Duration::from_secs(5));
    }

    #[test]
    fn the_last_failure_reason_is_kept_while_down() {
        let t0 = Instant::now();
        let mut t = Tracker::new(settings(1, 1), t0);
        t.on_probe(t0, Err(Failure::Timeout));
        t.on_probe(t0, Err(Failure::BadBanner("`HTTP/1.1`".into())));
        assert_eq!(t.failure(), Some(&Failure::BadBanner("`HTTP/1.1`".into())));
    }

    async fn serve_once(reply: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(reply).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        addr
    }

    #[tokio::test]
    async fn probes_accept_ssh_and_reject_everything_else() {
        let limit = Duration::from_secs(2);
        let ssh = serve_once(b"hello first\r\nSSH-2.0-OpenSSH_9.2\r\n").await;
        assert!(probe(&ssh, limit).await.is_ok());
        let http = serve_once(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        assert!(matches!(
            probe(&http, limit).await,
            Err(Failure::BadBanner(_))
        ));
        let garbage = serve_once(b"\x00\x01\x02\xff\n").await;
        assert_eq!(
            probe(&garbage, limit).await.err(),
            Some(Failure::BadBanner(r"`\x00\x01\x02\xff\n`".into())),
            "the builder's bytes are escaped"
        );
        let silent = serve_once(b"").await;
        assert!(matches!(
            probe(&silent, Duration::from_millis(100)).await,
            Err(Failure::Timeout)
        ));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = closed.local_addr().unwrap().to_string();
        drop(closed);
        assert!(matches!(
            probe(&refused, limit).await,
            Err(Failure::Refused(_))
        ));
    }
}
