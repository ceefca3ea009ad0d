//! Thin wrappers around the socket calls the proxy needs and std/tokio do
//! not offer: socket cookies, TCP_INFO, send-queue size, non-blocking peek,
//! send-buffer size.

use std::{io, mem, os::fd::AsRawFd};

/// `SO_COOKIE`: the kernel's 64-bit id of a socket (the SOCKHASH key).
pub fn cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut value: u64 = 0;
    getsockopt(socket, libc::SOL_SOCKET, libc::SO_COOKIE, &mut value)?;
    Ok(value)
}

/// The part of the kernel's `struct tcp_info` the proxy reads; the layout
/// is UAPI and only ever grows at the end. `words` are the 24 `u32`
/// fields after the 8 bytes of flags (rto ... total_retrans).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawTcpInfo {
    head: [u8; 8],
    words: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

/// Counts of a TCP socket from TCP_INFO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounts {
    /// Bytes the peer has acknowledged, plus one for the SYN on the side that
    /// connected and one for a FIN once it is acknowledged.
    pub acked: u64,
    /// Bytes received in order from the peer, plus one once its FIN has
    /// arrived (the kernel counts the FIN's sequence number).
    pub received: u64,
}

pub fn tcp_counts(socket: &impl AsRawFd) -> io::Result<TcpCounts> {
    let info = tcp_info(socket)?;
    Ok(TcpCounts {
        acked: info.bytes_acked,
        received: info.bytes_received,
    })
}

fn tcp_info(socket: &impl AsRawFd) -> io::Result<RawTcpInfo> {
    let mut info = RawTcpInfo::default();
    getsockopt(socket, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    Ok(info)
}

/// States (`tcpi_state`, the first byte of `struct tcp_info`) of a
/// connection whose FIN was sent and acknowledged: `FIN_WAIT2`, then
/// `TIME_WAIT` (which a socket still held shows as `CLOSE`), and `CLOSE`
/// after `LAST_ACK`.
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
/// `TCP_CLOSE`, the state of a connection that is gone.
const TCP_CLOSE: u8 = 7;

/// Whether the socket's connection is gone (state `CLOSE`): reset by its
/// peer, or closed by both sides.
pub fn is_closed(socket: &impl AsRawFd) -> io::Result<bool> {
    Ok(tcp_info(socket)?.head[0] == TCP_CLOSE)
}

/// What TCP_INFO's counts include besides payload: each of SYN and FIN
/// takes a sequence number, which the kernel counts as a byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ends {
    /// This side made the connection: `acked` includes its SYN.
    pub connected: bool,
    /// This side shut down writing: once acknowledged, its FIN is in
    /// `acked`.
    pub fin_sent: bool,
    /// A read returned end of file: the peer's FIN is in `received`.
    pub fin_received: bool,
}

/// [`tcp_counts`] of payload bytes only, without the SYN and FINs that
/// `ends` says the socket's counts include.
pub fn payload_counts(socket: &impl AsRawFd, ends: Ends) -> io::Result<TcpCounts> {
    let info = tcp_info(socket)?;
    // One TCP_INFO says both: whether the FIN was acknowledged is in the
    // state it left the connection in.
    let fin_acked =
        ends.fin_sent && matches!(info.head[0], TCP_FIN_WAIT2 | TCP_TIME_WAIT | TCP_CLOSE);
    Ok(TcpCounts {
        acked: info
            .bytes_acked
            .saturating_sub(u64::from(ends.connected) + u64::from(fin_acked)),
        received: info
            .bytes_received
            .saturating_sub(u64::from(ends.fin_received)),
    })
}

/// Bytes written to a socket that the peer has not acknowledged yet
/// (`SIOCOUTQ`).
pub fn unacked(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: valid fd and out pointer of the size SIOCOUTQ writes.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut value) };
    if rc == 0 {
        Ok(value as u64)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the socket holds received bytes nobody has read yet.
pub fn has_pending_bytes(socket: &impl AsRawFd) -> io::Result<bool> {
    let mut byte = 0u8;
    // SAFETY: one-byte buffer, valid fd.
    let rc = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match rc {
        1.. => Ok(true),
        0 => Ok(false),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(err)
            }
        }
    }
}

/// Sets the send buffer to `bytes` (`SO_SNDBUF`; the kernel doubles the
/// value for its bookkeeping). Tries `SO_SNDBUFFORCE` first, which may pass
/// `net.core.wmem_max` (CAP_NET_ADMIN, which the daemon has for BPF);
/// without the capability the buffer is capped at `wmem_max`.
pub fn set_send_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    match setsockopt(socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &value) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt(socket, libc::SOL_SOCKET, libc::SO_SNDBUF, &value)
        }
        other => other,
    }
}

/// `SO_LINGER` with a zero timeout: closing sends RST at once (it never
/// blocks, unlike a non-zero linger).
pub fn reset_on_close(socket: &impl AsRawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(socket, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// `IPV6_V6ONLY` on an IPv6 socket: off, it takes IPv4 too.
pub fn set_v6only(socket: &impl AsRawFd, on: bool) -> io::Result<()> {
    setsockopt(
        socket,
        libc::IPPROTO_IPV6,
        libc::IPV6_V6ONLY,
        &libc::c_int::from(on),
    )
}

/// `SO_RCVTIMEO`: a blocking receive gives up after `timeout`.
pub fn set_receive_timeout(socket: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<()> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(socket, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &value)
}

fn setsockopt<T>(socket: &impl AsRawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a `T` of the given size that the kernel
    // only reads.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt<T>(socket: &impl AsRawFd, level: i32, name: i32, value: &mut T) -> io::Result<()> {
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a writable buffer of `len` bytes; the kernel writes
    // at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *mut T).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    #[test]
    fn counts_and_cookies_of_a_real_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert_ne!(cookie(&client).unwrap(), cookie(&server).unwrap());
        assert!(!has_pending_bytes(&server).unwrap());
        client.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"hi").unwrap();
        client.read_exact(&mut buf[..2]).unwrap();
        assert_eq!(tcp_counts(&server).unwrap().received, 5);
        assert_eq!(tcp_counts(&client).unwrap().received, 2);
        client.write_all(b"x").unwrap();
        while !has_pending_bytes(&server).unwrap() {}
        assert!(unacked(&client).unwrap() <= 1);
        server.read_exact(&mut buf[..1]).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        // The kernel counts a received FIN as one byte: 6 bytes + FIN.
        let counts = tcp_counts(&server).unwrap();
        assert_eq!(counts.received, 7);
    }

    #[test]
    fn payload_counts_leave_out_syn_and_fins() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let client_ends = Ends {
            connected: true,
            ..Ends::default()
        };
        client.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"hi").unwrap();
        client.read_exact(&mut buf[..2]).unwrap();
        while unacked(&client).unwrap() + unacked(&server).unwrap() > 0 {
            std::thread::yield_now();
        }
        // The connecting side's SYN is counted as acknowledged data.
        assert_eq!(tcp_counts(&client).unwrap().acked, 6);
        let expected = TcpCounts {
            acked: 5,
            received: 2,
        };
        assert_eq!(payload_counts(&client, client_ends).unwrap(), expected);
        assert_eq!(
            payload_counts(&server, Ends::default()).unwrap(),
            TcpCounts {
                acked: 2,
                received: 5
            }
        );

        // Both FINs: sent and acknowledged by the client, received by it.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        server.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        while unacked(&client).unwrap() > 0 {
            std::thread::yield_now();
        }
        let counts = tcp_counts(&client).unwrap();
        assert_eq!((counts.acked, counts.received), (7, 3));
        let ended = Ends {
            connected: true,
            fin_sent: true,
            fin_received: true,
        };
        assert_eq!(payload_counts(&client, ended).unwrap(), expected);
        // The server closed second (LAST_ACK, then CLOSE once acknowledged).
        while unacked(&server).unwrap() > 0 {
            std::thread::yield_now();
        }
        let server_ends = Ends {
            connected: false,
            fin_sent: true,
            fin_received: true,
        };
        assert_eq!(
            payload_counts(&server, server_ends).unwrap(),
            TcpCounts {
                acked: 2,
                received: 5
            }
        );
    }

    #[test]
    fn a_reset_connection_is_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(!is_closed(&client).unwrap());
        reset_on_close(&server).unwrap();
        drop(server);
        let mut buf = [0u8; 1];
        // The RST arrives on loopback before the read returns.
        let _ = (&client).read(&mut buf);
        assert!(is_closed(&client).unwrap());
    }

    #[test]
    fn send_buffer_is_set() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        set_send_buffer(&client, 64 * 1024).unwrap();
        let mut size: libc::c_int = 0;
        getsockopt(&client, libc::SOL_SOCKET, libc::SO_SNDBUF, &mut size).unwrap();
        // The kernel reports the doubled value it uses.
        assert_eq!(size, 128 * 1024);
    }
}
