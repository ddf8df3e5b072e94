//! Who may talk to a worker: the job's key, the handshake that proves both ends hold it, and the
//! tag every frame carries after it.
//!
//! Every job has its own secret ([`JobKey`]): the operator stores it in a Secret mounted into the
//! job's pods, `ninelives worker launch` and the demo write it to a private file. A connection is
//! opened by a member ("client", rank `c`) to another member ("server", rank `s`) of one
//! generation `g`:
//!
//! 1. client → server `Hello { g, c, Nc }` (a fresh random nonce);
//! 2. server → client `Challenge { s, Ns, Ts }` with `Ts = HMAC(K, "server" ‖ T)`;
//! 3. client → server `Proof { Tc }` with `Tc = HMAC(K, "client" ‖ T)`;
//!
//! where the transcript `T = job ‖ g ‖ c ‖ s ‖ Nc ‖ Ns`. Each side checks the other's tag, so both
//! prove they hold the job's key for this job, this generation and these two ranks; the fresh
//! nonces make a recorded handshake useless. Afterwards every frame in each direction is sealed
//! with AES-256-GCM under a per-connection, per-direction key derived from the transcript, with
//! the frame's number as nonce: a frame cannot be read, forged, replayed, reordered or moved to
//! another connection, and its sender is the rank the handshake authenticated.

use std::path::Path;

use hmac::{Hmac, Mac};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce as GcmNonce, UnboundKey};
use sha2::Sha256;

/// Fewest key bytes accepted (256 bits).
pub const MIN_KEY_BYTES: usize = 32;
/// Most key bytes accepted (a key file is read whole; a wrong path must not read gigabytes).
pub const MAX_KEY_BYTES: usize = 4096;
/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a handshake proof (a full HMAC-SHA256).
pub const TAG_BYTES: usize = 32;
/// Bytes of a frame's AES-GCM tag.
pub const FRAME_TAG_BYTES: usize = 16;

/// A handshake nonce.
pub type Nonce = [u8; NONCE_BYTES];
/// A handshake proof or frame tag.
pub type Tag = [u8; TAG_BYTES];

type HmacSha256 = Hmac<Sha256>;

/// Why key material or a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file cannot be read or written.
    #[error("job key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key is shorter or longer than allowed.
    #[error("a job key must have {MIN_KEY_BYTES}..={MAX_KEY_BYTES} bytes, this one has {0}")]
    KeyLength(usize),
    /// The operating system gave no random bytes.
    #[error("no randomness for a nonce or key: {0}")]
    Random(String),
}

/// A job's shared secret. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct JobKey(Vec<u8>);

impl std::fmt::Debug for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobKey({} bytes)", self.0.len())
    }
}

impl JobKey {
    /// A key from its bytes; surrounding ASCII whitespace (a trailing newline of a file or a
    /// Secret) is not part of it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AuthError> {
        let trimmed = bytes.trim_ascii();
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&trimmed.len()) {
            return Err(AuthError::KeyLength(trimmed.len()));
        }
        Ok(Self(trimmed.to_vec()))
    }

    /// Reads a key file (e.g. a mounted Secret's `job-key`).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        use std::io::Read;
        let err = |source| AuthError::KeyFile { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(err)?;
        let mut bytes = Vec::new();
        // One byte past the limit tells "too long" from "exactly the limit".
        file.take(MAX_KEY_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(err)?;
        Self::from_bytes(&bytes)
    }

    /// New key text: 32 random bytes as 64 lower-case hex digits (printable, so it fits a Secret's
    /// `stringData`, an environment variable or a file alike).
    pub fn generate_text() -> Result<String, AuthError> {
        let bytes: [u8; 32] = random()?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Creates `path` (owner read/write only; it must not exist) holding a new key, and returns it.
    pub fn create_file(path: &Path) -> Result<Self, AuthError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| AuthError::KeyFile { path: path.display().to_string(), source };
        let text = Self::generate_text()?;
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
        file.write_all(text.as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)?;
        Self::from_bytes(text.as_bytes())
    }
}

/// Random bytes from the operating system.
pub fn random<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(out)
}

/// What a connection's handshake binds: the generation, both ranks and both nonces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// Generation the connection belongs to.
    pub generation: u64,
    /// Rank of the member that connected.
    pub client: u32,
    /// Rank of the member that accepted.
    pub server: u32,
    /// The client's nonce.
    pub client_nonce: Nonce,
    /// The server's nonce.
    pub server_nonce: Nonce,
}

/// Which end of a connection a tag or key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The member that connected.
    Client,
    /// The member that accepted.
    Server,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Client => b"client",
            Side::Server => b"server",
        }
    }
}

/// A job's identity and key: what both ends of a connection must share.
#[derive(Clone, Debug)]
pub struct JobAuth {
    job: String,
    key: JobKey,
}

impl JobAuth {
    /// Authentication for `job` (its UID where there is one, else `namespace/name`).
    pub fn new(job: impl Into<String>, key: JobKey) -> Self {
        Self { job: job.into(), key }
    }

    /// The job identity bound into every handshake.
    pub fn job(&self) -> &str {
        &self.job
    }

    fn mac(&self, key: &[u8], purpose: &[u8], h: &Handshake) -> HmacSha256 {
        // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        for part in [b"ninelives/peer/v1".as_slice(), purpose] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.update(&(self.job.len() as u64).to_le_bytes());
        mac.update(self.job.as_bytes());
        mac.update(&h.generation.to_le_bytes());
        mac.update(&h.client.to_le_bytes());
        mac.update(&h.server.to_le_bytes());
        mac.update(&h.client_nonce);
        mac.update(&h.server_nonce);
        mac
    }

    /// The proof `side` sends in the handshake `h`.
    pub fn proof(&self, side: Side, h: &Handshake) -> Tag {
        self.mac(&self.key.0, side.label(), h).finalize().into_bytes().into()
    }

    /// Whether `tag` is `side`'s proof for `h` (compared in constant time).
    pub fn verify(&self, side: Side, h: &Handshake, tag: &Tag) -> bool {
        self.mac(&self.key.0, side.label(), h).verify_slice(tag).is_ok()
    }

    /// The frame key of what `sender` sends on the connection of `h`.
    pub fn frame_key(&self, sender: Side, h: &Handshake) -> FrameKey {
        let purpose: &[u8] = match sender {
            Side::Client => b"frames client->server",
            Side::Server => b"frames server->client",
        };
        let key: [u8; 32] = self.mac(&self.key.0, purpose, h).finalize().into_bytes().into();
        FrameKey::new(&key)
    }
}

/// The frame protection of one direction of one connection: AES-256-GCM under a key derived
/// from the handshake, the frame's number as its nonce. Frames are encrypted as well as
/// authenticated (AES-NI and carry-less multiply make it cheaper than an HMAC over the bytes).
pub struct FrameKey {
    key: LessSafeKey,
    seq: u64,
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameKey(seq {})", self.seq)
    }
}

impl FrameKey {
    fn new(key: &[u8; 32]) -> Self {
        // AES-256 takes exactly the 32 bytes given: `new` cannot fail here.
        let key = UnboundKey::new(&AES_256_GCM, key).unwrap_or_else(|_| unreachable!());
        Self { key: LessSafeKey::new(key), seq: 0 }
    }

    /// The nonce of the next frame: its number. Unique, because every connection and direction
    /// has its own key (derived from both fresh handshake nonces).
    fn nonce(&self) -> GcmNonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.seq.to_le_bytes());
        GcmNonce::assume_unique_for_key(n)
    }

    /// Encrypts the next frame's `body` in place; returns its tag.
    pub fn seal(&mut self, body: &mut [u8]) -> [u8; FRAME_TAG_BYTES] {
        let mut out = [0u8; FRAME_TAG_BYTES];
        // Sealing fails only past 2^36 bytes in one frame, far beyond any frame limit.
        if let Ok(tag) = self.key.seal_in_place_separate_tag(self.nonce(), Aad::empty(), body) {
            out.copy_from_slice(tag.as_ref());
        }
        self.seq += 1;
        out
    }

    /// Decrypts the next frame (`sealed` = ciphertext ‖ tag) in place; returns the plaintext's
    /// length, or `None` when the tag does not verify (forged, replayed, reordered, corrupted).
    /// The count advances only on success (a failed frame closes the connection anyway).
    pub fn open(&mut self, sealed: &mut [u8]) -> Option<usize> {
        let n = self.key.open_in_place(self.nonce(), Aad::empty(), sealed).ok()?.len();
        self.seq += 1;
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(job: &str, key: &[u8]) -> JobAuth {
        JobAuth::new(job, JobKey::from_bytes(key).unwrap())
    }

    fn handshake() -> Handshake {
        Handshake { generation: 3, client: 1, server: 2, client_nonce: [7; 32], server_nonce: [9; 32] }
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn proofs_bind_the_key_the_job_the_generation_the_ranks_and_the_nonces() {
        let a = auth("default/a", KEY);
        let h = handshake();
        let tag = a.proof(Side::Client, &h);
        assert!(a.verify(Side::Client, &h, &tag));
        assert!(!a.verify(Side::Server, &h, &tag), "a client proof is not a server proof");
        assert!(!auth("default/b", KEY).verify(Side::Client, &h, &tag), "another job");
        assert!(!auth("default/a", b"0123456789abcdef0123456789abcdeX").verify(Side::Client, &h, &tag));
        for changed in [
            Handshake { generation: 4, ..h },
            Handshake { client: 0, ..h },
            Handshake { server: 0, ..h },
            Handshake { client_nonce: [8; 32], ..h },
            Handshake { server_nonce: [8; 32], ..h },
        ] {
            assert!(!a.verify(Side::Client, &changed, &tag), "{changed:?}");
        }
    }

    #[test]
    fn frames_are_sealed_and_refuse_forgery_replay_and_the_other_direction() {
        let a = auth("j", KEY);
        let h = handshake();
        let (mut send, mut recv) = (a.frame_key(Side::Client, &h), a.frame_key(Side::Client, &h));
        let sealed = |key: &mut FrameKey, body: &[u8]| {
            let mut b = body.to_vec();
            let tag = key.seal(&mut b);
            assert_ne!(b, body, "encrypted");
            [b, tag.to_vec()].concat()
        };
        let f0 = sealed(&mut send, b"first frame");
        let f1 = sealed(&mut send, b"second frame");
        assert_eq!(recv.open(&mut f1.clone()), None, "out of order");
        let mut forged = f0.clone();
        forged[3] ^= 1;
        assert_eq!(recv.open(&mut forged), None, "changed body");
        let mut ok = f0.clone();
        assert_eq!(recv.open(&mut ok), Some(11));
        assert_eq!(&ok[..11], b"first frame");
        assert_eq!(recv.open(&mut f0.clone()), None, "replayed");
        assert_eq!(recv.open(&mut f1.clone()), Some(12));
        let mut other = a.frame_key(Side::Server, &h);
        assert_eq!(other.open(&mut f0.clone()), None, "a client frame is not a server frame");
        assert_eq!(recv.open(&mut [0u8; 8]), None, "shorter than a tag");
    }

    #[test]
    fn keys_are_trimmed_and_sized_and_created_private() {
        assert!(matches!(JobKey::from_bytes(b"short"), Err(AuthError::KeyLength(5))));
        assert!(matches!(JobKey::from_bytes(&[b'a'; MAX_KEY_BYTES + 1]), Err(AuthError::KeyLength(_))));
        let with_newline = [KEY, b"\n"].concat();
        assert_eq!(JobKey::from_bytes(&with_newline).unwrap().0, KEY);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let created = JobKey::create_file(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(JobKey::from_file(&path).unwrap().0, created.0);
        assert_eq!(created.0.len(), 64);
        assert!(JobKey::create_file(&path).is_err(), "an existing key is never overwritten");
        let other = JobKey::generate_text().unwrap();
        assert_ne!(other.as_bytes(), created.0.as_slice(), "fresh randomness");
        assert!(!format!("{created:?}").contains(std::str::from_utf8(&created.0).unwrap()));
    }
}
