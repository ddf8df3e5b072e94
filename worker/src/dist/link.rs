//! One connection between two members of a generation: the handshake (see [`super::auth`]) and
//! the framed, tagged messages after it.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::auth::{AuthError, FrameKey, Handshake, JobAuth, Side, random};
use super::wire::{FrameReader, HANDSHAKE_FRAME_BYTES, Msg, ReadError, write_frame};

/// Most connections being authenticated at once; more are closed as they arrive.
pub const MAX_HANDSHAKES: usize = 64;
/// Most authenticated inbound connections at once (a member opens one per generation to each
/// other member; old generations' connections close as their members move on).
pub const MAX_CONNECTIONS: usize = 4096;
/// Longest a connection may take to authenticate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a handshake's reads re-check their deadline.
const HANDSHAKE_POLL: Duration = Duration::from_millis(20);

/// How members prove to each other that they belong to the job.
#[derive(Clone, Debug)]
pub enum Security {
    /// The handshake of [`super::auth`] and a tag on every frame: what every worker runs.
    Authenticated(JobAuth),
    /// No proof and no tags: anyone who can reach the port is a member. Only for measuring what
    /// authentication costs (the transport bench); nothing in the `ninelives` command selects it.
    Plaintext,
}

/// How a member's connections are authenticated and bounded.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Authentication.
    pub security: Security,
    /// Largest frame accepted after the handshake ([`super::wire::frame_limit`] of the model).
    pub frame_limit: usize,
    /// Most authenticated inbound connections at once.
    pub max_connections: usize,
    /// Attempts at re-establishing a link to a member that broke within a generation (a reset
    /// connection), within the step timeout, before the step is abandoned.
    pub reconnect_attempts: u32,
}

/// Default of [`LinkConfig::reconnect_attempts`].
pub const DEFAULT_RECONNECT_ATTEMPTS: u32 = 3;

/// Why a connection was not established.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Reading or writing the handshake failed.
    #[error("handshake: {0}")]
    Read(#[from] ReadError),
    /// Writing failed.
    #[error("handshake: {0}")]
    Write(#[from] std::io::Error),
    /// The other end sent something other than the next handshake message.
    #[error("handshake: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol expects.
        expected: &'static str,
        /// What came.
        got: String,
    },
    /// The other end's proof does not verify: it does not hold this job's key, or it is not the
    /// member it claims to be in this generation.
    #[error("handshake: the proof of rank {rank} does not verify")]
    BadProof {
        /// The rank claimed.
        rank: u32,
    },
    /// The accepting member is not the one this connection was opened to.
    #[error("handshake: connected to rank {got}, expected rank {expected}")]
    WrongPeer {
        /// Rank expected.
        expected: u32,
        /// Rank that answered.
        got: u32,
    },
    /// The handshake did not finish in time, or the worker is stopping.
    #[error("handshake: {0}")]
    Timeout(&'static str),
    /// No nonce.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// An established connection: its authenticated peer and generation, and its framing state.
pub struct Link {
    stream: TcpStream,
    reader: FrameReader,
    seal: Option<FrameKey>,
    /// The other member's rank (proven when authenticated).
    pub peer: u32,
    /// The generation the connection belongs to.
    pub generation: u64,
}

fn expected(what: &'static str, got: &Msg) -> LinkError {
    let got = got.name();
    LinkError::Unexpected { expected: what, got: got.into() }
}

/// Reads the next handshake frame before `deadline` (or until `stop`).
fn read_before(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Msg, LinkError> {
    loop {
        if let Some(msg) = reader.next(stream)? {
            return Ok(msg);
        }
        if stop.load(Ordering::SeqCst) {
            return Err(LinkError::Timeout("the worker is stopping"));
        }
        if Instant::now() >= deadline {
            return Err(LinkError::Timeout("no answer in time"));
        }
    }
}

impl Link {
    /// Opens the connection `stream` from member `me` to member `peer` of `generation`.
    pub fn connect(
        mut stream: TcpStream,
        config: &LinkConfig,
        generation: u64,
        me: u32,
        peer: u32,
        stop: &AtomicBool,
    ) -> Result<Self, LinkError> {
        stream.set_read_timeout(Some(HANDSHAKE_POLL))?;
        let mut reader = FrameReader::new(HANDSHAKE_FRAME_BYTES);
        let auth = match &config.security {
            Security::Plaintext => {
                write_frame(&mut stream, &Msg::Hello { generation, rank: me, nonce: [0; 32] }, None)?;
                reader = FrameReader::new(config.frame_limit);
                return Ok(Self { stream, reader, seal: None, peer, generation });
            }
            Security::Authenticated(auth) => auth,
        };
        let client_nonce = random()?;
        write_frame(&mut stream, &Msg::Hello { generation, rank: me, nonce: client_nonce }, None)?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let (server, server_nonce, proof) = match read_before(&mut stream, &mut reader, deadline, stop)? {
            Msg::Challenge { rank, nonce, proof } => (rank, nonce, proof),
            Msg::Refused { reason } => {
                return Err(LinkError::Unexpected {
                    expected: "Challenge",
                    got: format!("Refused: {reason}"),
                });
            }
            other => return Err(expected("Challenge", &other)),
        };
        if server != peer {
            return Err(LinkError::WrongPeer { expected: peer, got: server });
        }
        let h = Handshake { generation, client: me, server, client_nonce, server_nonce };
        if !auth.verify(Side::Server, &h, &proof) {
            return Err(LinkError::BadProof { rank: server });
        }
        write_frame(&mut stream, &Msg::Proof { proof: auth.proof(Side::Client, &h) }, None)?;
        reader.authenticate(auth.frame_key(Side::Server, &h), config.frame_limit);
        Ok(Self { stream, reader, seal: Some(auth.frame_key(Side::Client, &h)), peer, generation })
    }

    /// Accepts `stream` as member `me`: the first frame must be a `Hello` for a generation not
    /// older than `oldest`, and (authenticated) its sender must prove it holds the job's key.
    pub fn accept(
        mut stream: TcpStream,
        config: &LinkConfig,
        me: u32,
        oldest: u64,
        stop: &AtomicBool,
    ) -> Result<Self, LinkError> {
        stream.set_read_timeout(Some(HANDSHAKE_POLL))?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut reader = FrameReader::new(HANDSHAKE_FRAME_BYTES);
        let hello = read_before(&mut stream, &mut reader, deadline, stop);
        let (generation, client, client_nonce) = match hello {
            Ok(Msg::Hello { generation, rank, nonce }) => (generation, rank, nonce),
            Ok(other) => return Err(refuse(&mut stream, expected("Hello", &other))),
            Err(e) => return Err(refuse(&mut stream, e)),
        };
        if generation < oldest {
            let e = LinkError::Unexpected { expected: "a current generation", got: format!("{generation}") };
            return Err(refuse(&mut stream, e));
        }
        let auth = match &config.security {
            Security::Plaintext => {
                let reader = FrameReader::new(config.frame_limit);
                return Ok(Self { stream, reader, seal: None, peer: client, generation });
            }
            Security::Authenticated(auth) => auth,
        };
        let server_nonce = random()?;
        let h = Handshake { generation, client, server: me, client_nonce, server_nonce };
        let challenge = Msg::Challenge { rank: me, nonce: server_nonce, proof: auth.proof(Side::Server, &h) };
        write_frame(&mut stream, &challenge, None)?;
        let proof = match read_before(&mut stream, &mut reader, deadline, stop) {
            Ok(Msg::Proof { proof }) => proof,
            Ok(other) => return Err(refuse(&mut stream, expected("Proof", &other))),
            Err(e) => return Err(refuse(&mut stream, e)),
        };
        if !auth.verify(Side::Client, &h, &proof) {
            return Err(refuse(&mut stream, LinkError::BadProof { rank: client }));
        }
        reader.authenticate(auth.frame_key(Side::Client, &h), config.frame_limit);
        Ok(Self { stream, reader, seal: Some(auth.frame_key(Side::Server, &h)), peer: client, generation })
    }

    /// Sets how long a read may block before [`Link::recv`] returns `Ok(None)`.
    pub fn set_poll(&self, poll: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(poll))
    }

    /// Sends one message. Returns the bytes put on the wire.
    pub fn send(&mut self, msg: &Msg) -> std::io::Result<u64> {
        write_frame(&mut self.stream, msg, self.seal.as_mut())
    }

    /// The next message, `Ok(None)` when the read timed out first.
    pub fn recv(&mut self) -> Result<Option<Msg>, ReadError> {
        self.reader.next(&mut self.stream)
    }

    /// Whether the other end closed or reset the connection, seen without blocking and without
    /// consuming anything (a peek). A connection whose state cannot be read counts as broken.
    pub fn is_broken(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let mut byte = [0u8; 1];
        let broken = match self.stream.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted),
        };
        broken || self.stream.set_nonblocking(false).is_err()
    }

    /// Closes both directions, so the other end sees the end at once.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Tells the other end why its connection is refused (best effort), and returns the reason.
fn refuse(stream: &mut TcpStream, why: LinkError) -> LinkError {
    let _ = write_frame(stream, &Msg::Refused { reason: why.to_string() }, None);
    let _ = stream.shutdown(Shutdown::Both);
    why
}
