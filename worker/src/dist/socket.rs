//! Deadlines on peer sockets, so a peer that stops reading, or whose host vanished without a
//! reset, is found within the step timeout instead of blocking a write forever:
//! - a write timeout: a `write` blocked on a full send buffer returns an error;
//! - `TCP_USER_TIMEOUT`: data left unacknowledged that long closes the connection (Linux);
//! - TCP keepalive: an idle connection to a dead host is probed and closed.
//!
//! A peer paused for less than the step timeout (SIGSTOP, a long GC pause) is not cut off: its
//! kernel keeps acknowledging, and every bound here is the step timeout or longer.

use std::net::TcpStream;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Keepalive probes sent before an idle connection is declared dead.
const KEEPALIVE_PROBES: u32 = 3;

/// Sets the write timeout, user timeout and keepalive of a peer connection from the step
/// timeout: idle `step_timeout / 4` before the first probe, then [`KEEPALIVE_PROBES`] probes
/// `step_timeout / 4` apart (whole seconds, at least one).
pub fn set_deadlines(stream: &TcpStream, step_timeout: Duration) -> std::io::Result<()> {
    stream.set_write_timeout(Some(step_timeout.max(Duration::from_millis(1))))?;
    let socket = SockRef::from(stream);
    let probe = Duration::from_secs((step_timeout.as_secs() / 4).max(1));
    let keepalive = TcpKeepalive::new().with_time(probe).with_interval(probe).with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(step_timeout))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::Instant;

    #[test]
    fn a_peer_that_stops_reading_fails_the_write_within_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_never_read, _) = listener.accept().unwrap();
        let deadline = Duration::from_millis(500);
        set_deadlines(&stream, deadline).unwrap();
        let socket = SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(deadline));
        let chunk = vec![0u8; 1 << 20];
        let started = Instant::now();
        let mut writer = &stream;
        let err = loop {
            if let Err(e) = writer.write_all(&chunk) {
                break e;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "writes never blocked");
        };
        assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the full buffer was found in {:?}",
            started.elapsed()
        );
    }
}
