//! SSH identification lines (RFC 4253 4.2), checked without trusting a
//! byte of them.
//!
//! `SSH-protoversion-softwareversion SP comments CR LF`, at most 255 bytes
//! including the CR LF. A client sends it first; a server may send other
//! lines before it. OpenSSH ends it with CR LF but accepts a bare LF, and so
//! do we. Only protocol 2.0 (and 1.99, "2.0 and 1.x") can be served.

use thiserror::Error;

/// Longest identification line, CR LF included (RFC 4253 4.2).
pub const MAX_LINE: usize = 255;

/// What was wrong with a line that should have been an identification line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentError {
    #[error("not an SSH identification line (it starts {start})")]
    NotSsh { start: String },
    #[error("identification line longer than RFC 4253 allows ({MAX_LINE} bytes)")]
    TooLong,
    #[error("identification line is not terminated by a line feed")]
    Unterminated,
    #[error("unsupported SSH protocol version {version}")]
    Version { version: String },
    #[error("identification line holds a control character or non-ASCII byte")]
    Binary,
}

/// The parts of a valid identification line.
#[derive(Debug, PartialEq, Eq)]
pub struct Identification<'a> {
    /// `2.0` or `1.99`.
    pub protocol: &'a str,
    /// The peer's software version, e.g. `OpenSSH_9.2p1`.
    pub software: &'a str,
}

/// Checks one line, its terminating LF included, as an SSH identification
/// line. `line` is what a peer sent: any bytes, any length.
pub fn parse(line: &[u8]) -> Result<Identification<'_>, IdentError> {
    if !line.starts_with(b"SSH-") {
        return Err(IdentError::NotSsh {
            start: escape(&line[..line.len().min(16)]),
        });
    }
    if line.len() > MAX_LINE {
        return Err(IdentError::TooLong);
    }
    let body = line.strip_suffix(b"\n").ok_or(IdentError::Unterminated)?;
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    // Printable US-ASCII and spaces only (the comment may hold spaces).
    if body.iter().any(|&b| !(b' '..=b'~').contains(&b)) {
        return Err(IdentError::Binary);
    }
    // Checked above: every byte is ASCII.
    let text = std::str::from_utf8(body).map_err(|_| IdentError::Binary)?;
    let rest = &text[4..];
    let (protocol, rest) = rest.split_once('-').ok_or_else(|| IdentError::Version {
        version: rest.to_owned(),
    })?;
    if protocol != "2.0" && protocol != "1.99" {
        return Err(IdentError::Version {
            version: protocol.to_owned(),
        });
    }
    let software = rest.split(' ').next().unwrap_or_default();
    if software.is_empty() {
        return Err(IdentError::Version {
            version: format!("{protocol} without a software version"),
        });
    }
    Ok(Identification { protocol, software })
}

/// Untrusted bytes made safe for a log line or a message: printable ASCII
/// stays, everything else (control characters, escape sequences, bytes
/// above 0x7e, quotes and backslashes) is escaped as in Rust literals.
pub fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_openssh_lines_with_and_without_cr() {
        let id = parse(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n").unwrap();
        assert_eq!(id.protocol, "2.0");
        assert_eq!(id.software, "OpenSSH_9.2p1");
        assert_eq!(parse(b"SSH-1.99-x\n").unwrap().software, "x");
    }

    #[test]
    fn rejects_what_rfc_4253_forbids() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(IdentError::NotSsh { .. })
        ));
        assert_eq!(
            parse(b"SSH-1.5-old\r\n"),
            Err(IdentError::Version {
                version: "1.5".into()
            })
        );
        assert!(matches!(
            parse(b"SSH-2.0-\r\n"),
            Err(IdentError::Version { .. })
        ));
        assert!(matches!(
            parse(b"SSH-2.0\r\n"),
            Err(IdentError::Version { .. })
        ));
        assert_eq!(parse(b"SSH-2.0-a\x1b[31m\r\n"), Err(IdentError::Binary));
        assert_eq!(parse(b"SSH-2.0-a\0\r\n"), Err(IdentError::Binary));
        assert_eq!(parse(b"SSH-2.0-abc"), Err(IdentError::Unterminated));
        let mut long = b"SSH-2.0-".to_vec();
        long.resize(MAX_LINE - 1, b'a');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(IdentError::TooLong));
        long.remove(10);
        assert!(parse(&long).is_ok(), "255 bytes with CR LF is allowed");
    }

    #[test]
    fn escape_keeps_control_bytes_out_of_logs() {
        assert_eq!(
            escape(b"ok \x1b[2J\r\n\xff\""),
            "ok \\x1b[2J\\r\\n\\xff\\\""
        );
        let shown = format!("{:?}", parse(b"\x1b]0;pwned\x07\n"));
        assert!(!shown.contains('\x1b'), "{shown}");
    }
}
