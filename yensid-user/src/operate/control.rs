//! The control socket: how the CLI's verbs and the live `status` and
//! `explain` reach a running daemon. One JSON request per connection, one
//! JSON reply. Who may send what is decided in [`crate::operate::access`].
//!
//! Once a group may use it the socket is `0666`, so every local user can
//! connect: nothing about a connection is trusted before its credentials
//! are checked. At accept, before a byte is read, a caller that may not
//! even look gets one reply line naming the group that would let it and
//! is closed; so is a caller over its user's or everyone's connection
//! cap (root is never capped, so the operator cannot be locked out). A
//! request is read into a fixed buffer of [`MAX_REQUEST`] bytes within
//! [`READ_TIMEOUT`]; anything else gets an error reply that names what
//! was wrong, with the caller's bytes escaped.

use std::{
    collections::HashMap,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    time::timeout,
};
use tracing::{info, warn};

use crate::{
    dataplane::ident::escape,
    operate::access::{self, Access, Peer, Right},
};

/// How long the CLI waits for the daemon's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line, its line feed included.
pub const MAX_REQUEST: usize = 4096;
/// Connections one user other than root may hold open at once.
pub const MAX_PER_USER: usize = 8;
/// Connections all users other than root may hold open at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a caller may take to send its request, and to take its reply.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a bad request an error message quotes.
const QUOTED: usize = 64;
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "kebab-case")]
pub enum Request {
    Drain {
        builder: String,
    },
    Undrain {
        builder: String,
    },
    /// Shows the mode in force; with a change, sets or removes the
    /// operator's override first.
    Mode {
        change: Option<ModeChange>,
    },
    /// The daemon's [`crate::operate::status::Status`], as JSON in the reply.
    Status,
    /// What happens to the next connection of `service` from `from`.
    Explain {
        service: Option<String>,
        from: Option<std::net::IpAddr>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeChange {
    /// `None` removes the override.
    pub mode: Option<crate::config::Mode>,
    /// `None`: until changed.
    pub for_seconds: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
}

/// A request waiting for the controller's answer.
pub type Pending = (Request, oneshot::Sender<Reply>);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another yensid already serves {0}")]
    InUse(PathBuf),
    #[error("cannot create the control socket {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("no daemon at {path}: {source}")]
    NotRunning { path: PathBuf, source: io::Error },
    #[error(
        "not allowed to talk to the daemon at {path}: run as root, or configure daemon.read_group or policy.control_group"
    )]
    Denied { path: PathBuf },
    #[error(transparent)]
    Group(#[from] access::UnknownGroup),
    #[error("the daemon at {path} did not answer: {detail}")]
    NoAnswer { path: PathBuf, detail: String },
}

/// What was wrong with what a caller sent instead of a request. Every
/// message quotes the caller's bytes escaped, so it is safe in a log line
/// and on a terminal.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("empty request: send one JSON object on one line, e.g. {{\"verb\": \"status\"}}")]
    Empty,
    #[error("request longer than {MAX_REQUEST} bytes (it starts `{start}`)")]
    TooLong { start: String },
    #[error("request is not UTF-8 (byte {at} of `{text}`)")]
    NotUtf8 { at: usize, text: String },
    #[error("request is not JSON ({error}): `{text}`")]
    NotJson { error: String, text: String },
    #[error("unknown request ({error}): `{text}`; verbs: status, explain, mode, drain, undrain")]
    Unknown { error: String, text: String },
    #[error("no complete request within {0:?}")]
    TimedOut(Duration),
}

/// Reads the request in what a caller sent so far: one JSON object on one
/// line, ended by a line feed or by the caller's end of stream (`eof`).
/// `Ok(None)`: not complete yet, read more. Never looks past
/// [`MAX_REQUEST`] bytes, and bytes after the line are ignored.
pub fn parse_request(received: &[u8], eof: bool) -> Result<Option<Request>, RequestError> {
    let window = &received[..received.len().min(MAX_REQUEST)];
    let line = match window.iter().position(|&b| b == b'\n') {
        Some(end) => &window[..end],
        None if received.len() >= MAX_REQUEST => {
            return Err(RequestError::TooLong {
                start: quote(received),
            });
        }
        None if eof => window,
        None => return Ok(None),
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.trim_ascii().is_empty() {
        return Err(RequestError::Empty);
    }
    let text = std::str::from_utf8(line).map_err(|e| RequestError::NotUtf8 {
        at: e.valid_up_to(),
        text: quote(line),
    })?;
    serde_json::from_str(text).map(Some).map_err(|e| {
        // serde quotes the caller's strings (an unknown verb) unescaped.
        let error = escape(e.to_string().as_bytes());
        let text = quote(line);
        match e.classify() {
            serde_json::error::Category::Data => RequestError::Unknown { error, text },
            _ => RequestError::NotJson { error, text },
        }
    })
}

/// The start of untrusted bytes, escaped, for a message.
fn quote(bytes: &[u8]) -> String {
    let shown = escape(&bytes[..bytes.len().min(QUOTED)]);
    if bytes.len() > QUOTED {
        format!("{shown}...")
    } else {
        shown
    }
}

/// Reads one request within [`MAX_REQUEST`] bytes.
async fn receive(read: &mut (impl AsyncRead + Unpin)) -> io::Result<Result<Request, RequestError>> {
    let mut buffer = vec![0; MAX_REQUEST];
    let mut received = 0;
    loop {
        // Never empty: parse_request ends the request at MAX_REQUEST bytes.
        let n = read.read(&mut buffer[received..]).await?;
        received += n;
        match parse_request(&buffer[..received], n == 0) {
            Ok(None) => continue,
            Ok(Some(request)) => return Ok(Ok(request)),
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// Connections open per user, to cap them.
#[derive(Debug, Default)]
struct Connections {
    per_user: HashMap<u32, usize>,
    total: usize,
}

impl Connections {
    /// Counts a new connection of `uid`, or says why it is one too many.
    /// Root is neither counted nor capped.
    fn admit(&mut self, uid: u32) -> Result<(), String> {
        if uid == 0 {
            return Ok(());
        }
        let mine = self.per_user.entry(uid).or_default();
        if *mine >= MAX_PER_USER {
            return Err(format!(
                "too many connections: uid {uid} already has {MAX_PER_USER} open"
            ));
        }
        if self.total >= MAX_CONNECTIONS {
            return Err(format!(
                "too many connections: {MAX_CONNECTIONS} are open; try again"
            ));
        }
        *mine += 1;
        self.total += 1;
        Ok(())
    }

    fn release(&mut self, uid: u32) {
        if uid == 0 {
            return;
        }
        if let Some(mine) = self.per_user.get_mut(&uid) {
            *mine -= 1;
            if *mine == 0 {
                self.per_user.remove(&uid);
            }
            self.total -= 1;
        }
    }
}

/// An admitted connection; it frees its place when dropped.
struct Slot {
    connections: Arc<Mutex<Connections>>,
    uid: u32,
}

impl Slot {
    fn take(connections: &Arc<Mutex<Connections>>, uid: u32) -> Result<Self, String> {
        lock(connections).admit(uid)?;
        Ok(Self {
            connections: connections.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.connections).release(self.uid);
    }
}

/// The counts stay consistent even if a holder panicked.
fn lock(connections: &Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    connections
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Paces an accept loop whose `accept` fails: a full descriptor table
/// (`EMFILE`, `ENFILE`) leaves the listener readable, so retrying at once
/// would spin. Sleeps longer after each failure in a row, up to a second,
/// and logs once per burst.
pub(crate) struct AcceptBackoff {
    socket: &'static str,
    failures: u32,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const LONGEST: Duration = Duration::from_secs(1);

    pub(crate) fn new(socket: &'static str) -> Self {
        Self {
            socket,
            failures: 0,
        }
    }

    /// The next connection `accept` gives, backing off while it fails.
    pub(crate) async fn accept<S, A, F>(&mut self, mut accept: impl FnMut() -> F) -> S
    where
        F: Future<Output = io::Result<(S, A)>>,
    {
        loop {
            match accept().await {
                Ok((stream, _)) => {
                    self.accepted();
                    return stream;
                }
                Err(e) => self.failed(&e).await,
            }
        }
    }

    pub(crate) async fn failed(&mut self, error: &io::Error) {
        if self.failures == 0 {
            warn!(socket = self.socket, %error, "cannot accept connections: backing off");
        }
        self.failures = self.failures.saturating_add(1);
        tokio::time::sleep(self.delay()).await;
    }

    pub(crate) fn accepted(&mut self) {
        if self.failures > 0 {
            info!(
                socket = self.socket,
                failures = self.failures,
                "accepting connections again"
            );
            self.failures = 0;
        }
    }

    /// 10 ms after the first failure, doubling up to [`Self::LONGEST`].
    fn delay(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(7);
        (Self::FIRST * 2u32.pow(doublings)).min(Self::LONGEST)
    }
}

/// Logs one line for the first of a kind of event and then at most one
/// every [`Self::PERIOD`], with the number left out in between, so a
/// flood of bad callers cannot flood the log.
pub(crate) struct Throttled {
    last: Option<Instant>,
    left_out: u64,
}

impl Throttled {
    const PERIOD: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        Self {
            last: None,
            left_out: 0,
        }
    }

    /// `Some(number left out since the last line)` when this one is to be
    /// logged.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Self::PERIOD)
        {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}

/// One reply as the line that goes on the wire.
fn reply_line(reply: &Reply) -> Vec<u8> {
    let mut text = serde_json::to_vec(reply).expect("reply serializes");
    text.push(b'\n');
    text
}

/// Tells a caller that is not let in why, without reading from it and
/// without waiting: one small line into a fresh socket's empty buffer.
fn turn_away(stream: UnixStream, message: String) {
    if let Ok(stream) = stream.into_std() {
        let _ = (&stream).write(&reply_line(&Reply { ok: false, message }));
    }
}

/// Binds the control socket, refusing to steal one a live daemon serves,
/// with the mode `access` asks for.
pub async fn bind(path: &Path, access: &Access) -> Result<UnixListener, ControlError> {
    let create = |source| ControlError::Create {
        path: path.to_owned(),
        source,
    };
    if UnixStream::connect(path).await.is_ok() {
        return Err(ControlError::InUse(path.to_owned()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(create)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(create)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.socket_mode()))
        .map_err(create)?;
    Ok(listener)
}

/// Accepts requests, checks each against `access`, and hands the allowed
/// ones to the controller through `requests`.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Pending>, access: Access) {
    let access = Arc::new(access);
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut backoff = AcceptBackoff::new("control");
    let mut turned_away = Throttled::new();
    let bad_requests = Arc::new(Mutex::new(Throttled::new()));
    loop {
        let stream = backoff.accept(|| listener.accept()).await;
        let peer = match access::peer(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                warn!(error = %e, "control connection without credentials: closed");
                continue;
            }
        };
        let admitted = match access.check(&peer, Right::Read) {
            Some(why) => Err(why),
            None => Slot::take(&connections, peer.uid),
        };
        let slot = match admitted {
            Ok(slot) => slot,
            Err(why) => {
                if let Some(left_out) = turned_away.admit(Instant::now()) {
                    info!(
                        uid = peer.uid,
                        left_out, "control connection turned away: {why}"
                    );
                }
                turn_away(stream, why);
                continue;
            }
        };
        let requests = requests.clone();
        let access = access.clone();
        let bad_requests = bad_requests.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &peer, requests, &access, &bad_requests).await {
                warn!(uid = peer.uid, error = %e, "control request failed");
            }
            drop(slot);
        });
    }
}

async fn answer(
    stream: UnixStream,
    peer: &Peer,
    requests: mpsc::Sender<Pending>,
    access: &Access,
    bad_requests: &Mutex<Throttled>,
) -> io::Result<()> {
    let (mut read, mut write) = stream.into_split();
    let received = timeout(READ_TIMEOUT, receive(&mut read))
        .await
        .unwrap_or(Ok(Err(RequestError::TimedOut(READ_TIMEOUT))))?;
    let reply = match received {
        Err(bad) => {
            let logged = bad_requests
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .admit(Instant::now());
            if let Some(left_out) = logged {
                info!(uid = peer.uid, left_out, "bad control request: {bad}");
            }
            Reply {
                ok: false,
                message: bad.to_string(),
            }
        }
        Ok(request) => match access.check(peer, Right::of(&request)) {
            Some(why) => {
                info!(uid = peer.uid, ?request, "control request refused: {why}");
                Reply {
                    ok: false,
                    message: why,
                }
            }
            None => {
                let (tx, rx) = oneshot::channel();
                if requests.send((request, tx)).await.is_err() {
                    return Ok(());
                }
                rx.await.unwrap_or(Reply {
                    ok: false,
                    message: "the daemon is stopping".into(),
                })
            }
        },
    };
    timeout(READ_TIMEOUT, write.write_all(&reply_line(&reply)))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the caller does not read its reply",
            )
        })?
}

/// Sends one request to the daemon serving `path`.
pub async fn request(path: &Path, request: &Request) -> Result<Reply, ControlError> {
    let stream = UnixStream::connect(path).await.map_err(|source| {
        // Only a missing socket or nobody listening means no daemon; a
        // daemon the caller may not talk to is still running.
        match source.kind() {
            io::ErrorKind::PermissionDenied => ControlError::Denied {
                path: path.to_owned(),
            },
            _ => ControlError::NotRunning {
                path: path.to_owned(),
                source,
            },
        }
    })?;
    let no_answer = |detail: String| ControlError::NoAnswer {
        path: path.to_owned(),
        detail,
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut text = serde_json::to_string(request).expect("request serializes");
        text.push('\n');
        // A caller the daemon turns away is closed before its request is
        // read, so the write may fail; the reply saying why is there.
        let sent = write.write_all(text.as_bytes()).await;
        let mut line = String::new();
        let read = BufReader::new(read).read_line(&mut line).await;
        match (sent, read) {
            (_, Ok(_)) if line.ends_with('\n') => Ok(line),
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok(()), Ok(_)) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without a reply",
            )),
        }
    };
    let line = timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| no_answer("timed out".into()))?
        .map_err(|e| no_answer(e.to_string()))?;
    serde_json::from_str(&line).map_err(|e| no_answer(format!("unreadable reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_reaches_the_controller_and_its_reply_the_client() {
        let dir = std::env::temp_dir().join(format!("yensid-control-{}", std::process::id()));
        let path = dir.join("control.sock");
        let listener = bind(&path, &Access::default()).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            bind(&path, &Access::default()).await,
            Err(ControlError::InUse(_))
        ));
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(serve(listener, tx, Access::default()));
        tokio::spawn(async move {
            let (request, reply) = rx.recv().await.unwrap();
            assert_eq!(
                request,
                Request::Drain {
                    builder: "b1".into()
                }
            );
            reply
                .send(Reply {
                    ok: true,
                    message: "drained".into(),
                })
                .unwrap();
        });
        let reply = request(
            &path,
            &Request::Drain {
                builder: "b1".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(reply.message, "drained");
        drop(std::fs::remove_file(&path));
        let other = dir.join("group.sock");
        let shared = Access {
            read: Some(access::Group::resolve("daemon.read_group", "root").unwrap()),
            control: None,
        };
        drop(bind(&other, &shared).await.unwrap());
        let meta = std::fs::metadata(&other).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o666);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            request(
                &path,
                &Request::Undrain {
                    builder: "b1".into()
                }
            )
            .await,
            Err(ControlError::NotRunning { .. })
        ));
    }

    #[test]
    fn a_request_is_one_json_line_and_what_follows_it_is_ignored() {
        let status = Some(Request::Status);
        assert_eq!(
            parse_request(b"{\"verb\":\"status\"}\n", false),
            Ok(status.clone())
        );
        assert_eq!(
            parse_request(b"{\"verb\":\"status\"}\r\n", false),
            Ok(status.clone())
        );
        assert_eq!(
            parse_request(b"{\"verb\":\"status\"}\njunk", false),
            Ok(status.clone())
        );
        assert_eq!(parse_request(b"{\"verb\":\"status\"}", true), Ok(status));
        assert_eq!(parse_request(b"{\"verb\":\"sta", false), Ok(None));
        assert_eq!(parse_request(b"", true), Err(RequestError::Empty));
        assert_eq!(parse_request(b" \r\n", false), Err(RequestError::Empty));
        assert_eq!(
            parse_request(b"{\"verb\":\"drain\",\"builder\":\"b1\"}\n", false),
            Ok(Some(Request::Drain {
                builder: "b1".into()
            }))
        );
    }

    #[test]
    fn a_line_longer_than_the_cap_is_refused_without_looking_further() {
        let mut long = vec![b' '; MAX_REQUEST - 1];
        assert_eq!(parse_request(&long, false), Ok(None));
        long.push(b'x');
        let Err(RequestError::TooLong { start }) = parse_request(&long, false) else {
            panic!("{MAX_REQUEST} bytes without a line feed were accepted");
        };
        assert_eq!(start.len(), QUOTED + 3, "{start}");
        // The line feed must come within the cap.
        long.push(b'\n');
        assert!(matches!(
            parse_request(&long, false),
            Err(RequestError::TooLong { .. })
        ));
        let mut fits = b"{\"verb\":\"status\"}".to_vec();
        fits.resize(MAX_REQUEST - 1, b' ');
        fits.push(b'\n');
        assert_eq!(parse_request(&fits, false), Ok(Some(Request::Status)));
    }

    #[test]
    fn every_malformed_request_is_named_with_its_bytes_escaped() {
        let cases: [(&[u8], &str); 4] = [
            (
                b"\x1b[2J\xff\xfe\n",
                "request is not UTF-8 (byte 4 of `\\x1b[2J\\xff\\xfe`)",
            ),
            (
                b"hello\x07\n",
                "request is not JSON (expected value at line 1 column 1): `hello\\x07`",
            ),
            (
                b"{\"verb\":\"reboot\"}\n",
                "unknown request (unknown variant `reboot`, expected one of `drain`, `undrain`, \
                 `mode`, `status`, `explain` at line 1 column 16): `{\\\"verb\\\":\\\"reboot\\\"}`; \
                 verbs: status, explain, mode, drain, undrain",
            ),
            (
                b"{\"verb\":\"\\u001b]0;x\\u0007\"}\n",
                "unknown request (unknown variant `\\x1b]0;x\\x07`",
            ),
        ];
        for (bytes, expected) in cases {
            let message = parse_request(bytes, false).unwrap_err().to_string();
            assert!(message.starts_with(expected), "{message}");
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
        assert!(matches!(
            parse_request(b"{\"verb\":\"drain\"}\n", false),
            Err(RequestError::Unknown { .. })
        ));
    }

    #[test]
    fn each_user_but_root_is_capped_and_so_is_everyone_together() {
        let mut open = Connections::default();
        for _ in 0..MAX_PER_USER {
            open.admit(1000).unwrap();
        }
        let why = open.admit(1000).unwrap_err();
        assert_eq!(why, "too many connections: uid 1000 already has 8 open");
        open.release(1000);
        open.admit(1000).unwrap();
        for _ in 0..1000 {
            open.admit(0).unwrap();
        }
        for uid in 2000.. {
            if open.total == MAX_CONNECTIONS {
                break;
            }
            open.admit(uid).unwrap();
        }
        assert!(open.admit(3000).unwrap_err().contains("32 are open"));
        open.admit(0).unwrap();
        open.release(1000);
        open.admit(3000).unwrap();
    }

    #[test]
    fn accept_failures_back_off_up_to_a_second() {
        let mut backoff = AcceptBackoff::new("test");
        let mut delays = Vec::new();
        for _ in 0..10 {
            backoff.failures += 1;
            delays.push(backoff.delay().as_millis());
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        backoff.accepted();
        backoff.failures += 1;
        assert_eq!(backoff.delay(), AcceptBackoff::FIRST);
    }

    #[test]
    fn a_flood_of_events_logs_one_line_per_period_with_the_count_left_out() {
        let mut log = Throttled::new();
        let start = Instant::now();
        assert_eq!(log.admit(start), Some(0));
        for ms in 1..100 {
            assert_eq!(log.admit(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(log.admit(start + Throttled::PERIOD), Some(99));
        assert_eq!(log.admit(start + Throttled::PERIOD), None);
    }

    #[tokio::test]
    async fn a_bad_request_gets_a_reply_and_an_endless_line_is_cut_off() {
        let dir = std::env::temp_dir().join(format!("yensid-control-bad-{}", std::process::id()));
        let path = dir.join("control.sock");
        let listener = bind(&path, &Access::default()).await.unwrap();
        let (tx, _rx) = mpsc::channel(1);
        tokio::spawn(serve(listener, tx, Access::default()));
        let exchange = |bytes: Vec<u8>| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(&path).await.unwrap();
                let (read, mut write) = stream.into_split();
                // The daemon stops reading at the cap, so this write fails.
                let writer = tokio::spawn(async move { write.write_all(&bytes).await });
                let mut line = String::new();
                BufReader::new(read).read_line(&mut line).await.unwrap();
                drop(writer);
                serde_json::from_str::<Reply>(&line).unwrap()
            }
        };
        let reply = exchange(b"{\"verb\":\"nope\"}\n".to_vec()).await;
        assert!(
            !reply.ok && reply.message.starts_with("unknown request"),
            "{reply:?}"
        );
        let reply = exchange(vec![b'{'; 64 * MAX_REQUEST]).await;
        assert!(
            !reply.ok && reply.message.starts_with("request longer than 4096 bytes"),
            "{reply:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
