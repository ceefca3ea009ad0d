//! The control socket: how the CLI's verbs and the live `status` and
//! `explain` reach a running daemon. One JSON request per connection, one
//! JSON reply. Who may send what is decided in [`crate::operate::access`].

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    time::timeout,
};
use tracing::{info, warn};

use crate::operate::access::{self, Access, Right};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    let access = std::sync::Arc::new(access);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        let access = access.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, requests, &access).await {
                warn!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    requests: mpsc::Sender<Pending>,
    access: &Access,
) -> io::Result<()> {
    let peer = access::peer(&stream)?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    timeout(REQUEST_TIMEOUT, BufReader::new(read).read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))??;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply {
            ok: false,
            message: format!("bad request: {e}"),
        },
        Ok(request) => match access.check(&peer, Right::of(&request)) {
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
    let mut text = serde_json::to_string(&reply).expect("reply serializes");
    text.push('\n');
    write.write_all(text.as_bytes()).await
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
        write.write_all(text.as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        Ok::<_, io::Error>(line)
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
}
