//! The wire format between workers: length-prefixed binary frames.
//!
//! A frame is `u32 length (LE) | u8 tag | fields [| 16-byte frame tag]`, every number
//! little-endian, every float sent as its exact bits (so a tensor crosses the wire bit-for-bit).
//! Once a connection is authenticated the body is encrypted and the AES-GCM tag follows it (see
//! [`super::auth`]); the length counts it. A reader refuses a frame longer than its limit before reading it: a few hundred
//! bytes until the handshake is done ([`HANDSHAKE_FRAME_BYTES`]), then [`frame_limit`] of the
//! model, so a stranger cannot make a worker allocate more than that.

use std::io::{ErrorKind, Read, Write};

use super::auth::{FRAME_TAG_BYTES, FrameKey, Nonce, Tag};
use std::collections::BTreeMap;

use crate::model::{ExpertCall, ExpertId, HostTensor};
use crate::optim::Moments;
use crate::trainer::TrainerConfig;

/// Largest frame read before a connection is authenticated (the handshake's frames are < 100 B).
pub const HANDSHAKE_FRAME_BYTES: usize = 256;
/// Largest frame any model may use: the length prefix is a `u32`, and no model of this CPU
/// transport needs more (a bigger model must shard its checkpoint gather).
pub const MAX_FRAME_BYTES: usize = 1 << 30;

/// The largest frame `config`'s training can send, with room for framing: the biggest of an
/// expert call (every token of a micro-batch to one expert), a collective round (every
/// micro-batch's gradients of every parameter, names and lengths included) and the checkpoint
/// gather (parameters and both moments). `None` when it overflows or exceeds [`MAX_FRAME_BYTES`].
pub fn frame_limit(config: &TrainerConfig) -> Option<usize> {
    let d = &config.dims;
    let params = d.checked_total_params()?;
    // Every tensor's name (< 128 bytes), shape and lengths: a generous 256 bytes each.
    let tensors =
        u64::from(d.layers).checked_mul(u64::from(d.routed_experts).checked_add(8)?.checked_mul(3)?)?;
    let overhead = tensors.checked_add(16)?.checked_mul(256)?;
    let micro = u64::try_from(config.micro_batches()).ok()?.max(3);
    let collective = params.checked_mul(4)?.checked_add(overhead)?.checked_mul(micro)?;
    let tokens = u64::from(config.micro_batch_size).checked_mul(u64::from(d.seq_len))?;
    let expert_call = tokens.checked_mul(u64::from(d.hidden_size))?.checked_mul(4)?;
    let limit = collective.max(expert_call).checked_add(4096)?;
    usize::try_from(limit).ok().filter(|&l| l <= MAX_FRAME_BYTES)
}

/// One message between two workers.
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    /// First frame of every connection: who is calling, in which generation (a claim until the
    /// handshake proves it).
    Hello {
        /// Placement generation the caller is in.
        generation: u64,
        /// The caller's rank.
        rank: u32,
        /// The caller's fresh nonce.
        nonce: Nonce,
    },
    /// The accepting member's answer to a [`Msg::Hello`]: who it is, its nonce, and its proof.
    Challenge {
        /// The accepting member's rank.
        rank: u32,
        /// Its fresh nonce.
        nonce: Nonce,
        /// Its proof of the job key over the handshake.
        proof: Tag,
    },
    /// The caller's proof of the job key over the handshake; the connection is authenticated.
    Proof {
        /// The proof.
        proof: Tag,
    },
    /// Run an expert's forward pass on `rows` tokens (`data` is `[rows, hidden]`).
    Forward {
        /// Generation of the step.
        generation: u64,
        /// Step (0-based update count).
        step: u64,
        /// Micro-batch, layer and expert.
        call: ExpertCall,
        /// Token rows.
        rows: u32,
        /// Inputs, row-major.
        data: Vec<f32>,
    },
    /// Backward of an earlier [`Msg::Forward`]: `data` is the gradient of its output.
    Backward {
        /// Generation of the step.
        generation: u64,
        /// Step.
        step: u64,
        /// Micro-batch, layer and expert.
        call: ExpertCall,
        /// Token rows.
        rows: u32,
        /// Output gradient, row-major.
        data: Vec<f32>,
    },
    /// Answer to a forward (expert output) or backward (input gradient).
    Reply {
        /// Row-major values.
        data: Vec<f32>,
    },
    /// The request cannot be served (the owner aborted the step or is in another generation).
    Refused {
        /// Why.
        reason: String,
    },
    /// One worker's contribution to a collective round of a step. Its sender is the rank the
    /// connection authenticated, never a field of the frame.
    Push {
        /// Generation.
        generation: u64,
        /// Step.
        step: u64,
        /// Round within the step.
        round: u8,
        /// Round-specific bytes (see `engine`).
        payload: Vec<u8>,
    },
    /// The sender's peer snapshot copy (its experts' parameters and moments at `step`) for this
    /// member to keep; answered by [`Msg::PeerAck`]. The owner is the connection's rank.
    PeerCopy {
        /// Generation.
        generation: u64,
        /// Step of the snapshot.
        step: u64,
        /// Tensors ([`super::engine`]'s state encoding).
        payload: Vec<u8>,
    },
    /// The copy of `step` is kept.
    PeerAck {
        /// Step.
        step: u64,
    },
    /// Asks for the state of `step` this member keeps (own snapshot or held copies): the dense
    /// parameters when `dense`, and `experts`; answered by [`Msg::PeerState`] or [`Msg::Refused`].
    PeerFetch {
        /// Generation.
        generation: u64,
        /// Step.
        step: u64,
        /// Whether the dense parameters are wanted.
        dense: bool,
        /// Routed experts wanted.
        experts: Vec<ExpertId>,
    },
    /// What the member has of a [`Msg::PeerFetch`] (possibly only part of it).
    PeerState {
        /// Step.
        step: u64,
        /// Tensors ([`super::engine`]'s state encoding).
        payload: Vec<u8>,
    },
}

const HELLO: u8 = 1;
const FORWARD: u8 = 2;
const BACKWARD: u8 = 3;
const REPLY: u8 = 4;
const REFUSED: u8 = 5;
const PUSH: u8 = 6;
const CHALLENGE: u8 = 7;
const PROOF: u8 = 8;
const PEER_COPY: u8 = 9;
const PEER_ACK: u8 = 10;
const PEER_FETCH: u8 = 11;
const PEER_STATE: u8 = 12;

/// A frame or payload that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed frame: {0}")]
pub struct Malformed(pub String);

/// Little-endian encoder.
#[derive(Default, Debug)]
pub struct Enc {
    buf: Vec<u8>,
}

impl Enc {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends an f64 (exact bits).
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.u64(v.to_bits())
    }
    /// Appends an f32 (exact bits).
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.u32(v.to_bits())
    }
    /// Appends bytes as they are (a fixed-size field).
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// Appends a length-prefixed string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }
    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
        self
    }
    /// Appends a length-prefixed f32 vector.
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.u32(v.len() as u32);
        // One copy of the little-endian bytes (the wire layout), not a call per value.
        self.buf.extend_from_slice(crate::model::le_bytes(v));
        self
    }
    /// The bytes written.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Little-endian decoder over untrusted bytes: every read is bounds-checked.
#[derive(Debug)]
pub struct Dec<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Dec<'a> {
    /// A decoder at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            Malformed(format!("needs {n} bytes at offset {}, has {}", self.at, self.buf.len()))
        })?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }
    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    /// Reads a u32.
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Reads a u64.
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// Reads an f64.
    pub fn f64(&mut self) -> Result<f64, Malformed> {
        Ok(f64::from_bits(self.u64()?))
    }
    /// Reads an f32.
    pub fn f32(&mut self) -> Result<f32, Malformed> {
        Ok(f32::from_bits(self.u32()?))
    }
    /// Reads a fixed-size field.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    /// Reads a length-prefixed string.
    pub fn str(&mut self) -> Result<String, Malformed> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| Malformed(format!("string: {e}")))
    }
    /// Reads a length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<Vec<u8>, Malformed> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// Reads a length-prefixed f32 vector.
    pub fn f32s(&mut self) -> Result<Vec<f32>, Malformed> {
        let n = self.u32()? as usize;
        let bytes = self.take(n.checked_mul(4).ok_or_else(|| Malformed("f32 count overflows".into()))?)?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    /// Fails unless every byte was read.
    pub fn end(&self) -> Result<(), Malformed> {
        if self.at == self.buf.len() {
            Ok(())
        } else {
            Err(Malformed(format!("{} trailing bytes", self.buf.len() - self.at)))
        }
    }
}

fn put_call(e: &mut Enc, c: &ExpertCall) {
    e.u32(c.micro).u32(c.layer).u32(c.expert);
}

fn get_call(d: &mut Dec<'_>) -> Result<ExpertCall, Malformed> {
    Ok(ExpertCall { micro: d.u32()?, layer: d.u32()?, expert: d.u32()? })
}

impl Msg {
    /// The variant's name (for errors and logs).
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Challenge { .. } => "Challenge",
            Msg::Proof { .. } => "Proof",
            Msg::Forward { .. } => "Forward",
            Msg::Backward { .. } => "Backward",
            Msg::Reply { .. } => "Reply",
            Msg::Refused { .. } => "Refused",
            Msg::Push { .. } => "Push",
            Msg::PeerCopy { .. } => "PeerCopy",
            Msg::PeerAck { .. } => "PeerAck",
            Msg::PeerFetch { .. } => "PeerFetch",
            Msg::PeerState { .. } => "PeerState",
        }
    }

    /// The frame body (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        match self {
            Msg::Hello { generation, rank, nonce } => {
                e.u8(HELLO).u64(*generation).u32(*rank).raw(nonce);
            }
            Msg::Challenge { rank, nonce, proof } => {
                e.u8(CHALLENGE).u32(*rank).raw(nonce).raw(proof);
            }
            Msg::Proof { proof } => {
                e.u8(PROOF).raw(proof);
            }
            Msg::Forward { generation, step, call, rows, data } => {
                e.u8(FORWARD).u64(*generation).u64(*step);
                put_call(&mut e, call);
                e.u32(*rows).f32s(data);
            }
            Msg::Backward { generation, step, call, rows, data } => {
                e.u8(BACKWARD).u64(*generation).u64(*step);
                put_call(&mut e, call);
                e.u32(*rows).f32s(data);
            }
            Msg::Reply { data } => {
                e.u8(REPLY).f32s(data);
            }
            Msg::Refused { reason } => {
                e.u8(REFUSED).str(reason);
            }
            Msg::Push { generation, step, round, payload } => {
                e.u8(PUSH).u64(*generation).u64(*step).u8(*round).bytes(payload);
            }
            Msg::PeerCopy { generation, step, payload } => {
                e.u8(PEER_COPY).u64(*generation).u64(*step).bytes(payload);
            }
            Msg::PeerAck { step } => {
                e.u8(PEER_ACK).u64(*step);
            }
            Msg::PeerFetch { generation, step, dense, experts } => {
                e.u8(PEER_FETCH).u64(*generation).u64(*step).u8(u8::from(*dense)).u32(experts.len() as u32);
                for x in experts {
                    e.u32(x.layer).u32(x.expert);
                }
            }
            Msg::PeerState { step, payload } => {
                e.u8(PEER_STATE).u64(*step).bytes(payload);
            }
        }
        e.finish()
    }

    /// Decodes a frame body.
    pub fn decode(body: &[u8]) -> Result<Msg, Malformed> {
        let mut d = Dec::new(body);
        let msg = match d.u8()? {
            HELLO => Msg::Hello { generation: d.u64()?, rank: d.u32()?, nonce: d.array()? },
            CHALLENGE => Msg::Challenge { rank: d.u32()?, nonce: d.array()?, proof: d.array()? },
            PROOF => Msg::Proof { proof: d.array()? },
            tag @ (FORWARD | BACKWARD) => {
                let (generation, step) = (d.u64()?, d.u64()?);
                let call = get_call(&mut d)?;
                let (rows, data) = (d.u32()?, d.f32s()?);
                if tag == FORWARD {
                    Msg::Forward { generation, step, call, rows, data }
                } else {
                    Msg::Backward { generation, step, call, rows, data }
                }
            }
            REPLY => Msg::Reply { data: d.f32s()? },
            REFUSED => Msg::Refused { reason: d.str()? },
            PUSH => Msg::Push { generation: d.u64()?, step: d.u64()?, round: d.u8()?, payload: d.bytes()? },
            PEER_COPY => Msg::PeerCopy { generation: d.u64()?, step: d.u64()?, payload: d.bytes()? },
            PEER_ACK => Msg::PeerAck { step: d.u64()? },
            PEER_FETCH => {
                let (generation, step) = (d.u64()?, d.u64()?);
                let dense = match d.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(Malformed(format!("dense flag {other}"))),
                };
                let n = d.u32()? as usize;
                // Each expert takes 8 bytes: a count the frame cannot hold is refused up front.
                if n.checked_mul(8).is_none_or(|b| b > body.len()) {
                    return Err(Malformed(format!("{n} experts in a {}-byte frame", body.len())));
                }
                let experts = (0..n)
                    .map(|_| Ok(ExpertId::new(d.u32()?, d.u32()?)))
                    .collect::<Result<Vec<_>, Malformed>>()?;
                Msg::PeerFetch { generation, step, dense, experts }
            }
            PEER_STATE => Msg::PeerState { step: d.u64()?, payload: d.bytes()? },
            other => return Err(Malformed(format!("unknown message tag {other}"))),
        };
        d.end()?;
        Ok(msg)
    }
}

/// Writes one frame, tagged with `seal` when the connection is authenticated. Returns the bytes
/// put on the wire.
pub fn write_frame(w: &mut impl Write, msg: &Msg, seal: Option<&mut FrameKey>) -> std::io::Result<u64> {
    let mut body = msg.encode();
    let tag = seal.map(|key| key.seal(&mut body));
    let len = body.len() + tag.map_or(0, |t| t.len());
    let prefix = u32::try_from(len)
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, format!("a {len}-byte frame")))?;
    let mut frame = Vec::with_capacity(len + 4);
    frame.extend_from_slice(&prefix.to_le_bytes());
    frame.extend_from_slice(&body);
    if let Some(tag) = tag {
        frame.extend_from_slice(&tag);
    }
    w.write_all(&frame)?;
    w.flush()?;
    Ok(frame.len() as u64)
}

/// Reads frames from a stream whose reads may time out, without losing a partially received
/// frame: a timeout returns `Ok(None)` and the next call continues where this one stopped.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    limit: usize,
    open: Option<FrameKey>,
}

/// Why reading a frame stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection (or it was reset): the peer is gone.
    #[error("connection closed by peer")]
    Closed,
    /// Another I/O error.
    #[error("read failed: {0}")]
    Io(std::io::Error),
    /// The frame is longer than this connection allows.
    #[error("a frame of {len} bytes exceeds this connection's {limit}-byte limit")]
    TooLarge {
        /// Its length prefix.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The frame's tag does not verify: forged, replayed, reordered or corrupted.
    #[error("a frame's tag does not verify")]
    Forged,
    /// The bytes are not a frame.
    #[error(transparent)]
    Malformed(#[from] Malformed),
}

impl FrameReader {
    /// A reader of untagged frames of at most `limit` bytes (a new connection's handshake).
    pub fn new(limit: usize) -> Self {
        Self { buf: Vec::new(), limit, open: None }
    }

    /// From now on every frame must carry `key`'s next tag, and may have up to `limit` bytes.
    pub fn authenticate(&mut self, key: FrameKey, limit: usize) {
        self.open = Some(key);
        self.limit = limit;
    }

    /// Bytes held for the frame being received.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The largest frame accepted now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The next whole frame, `Ok(None)` when the read timed out first.
    pub fn next(&mut self, r: &mut impl Read) -> Result<Option<Msg>, ReadError> {
        loop {
            if let Some(msg) = self.take_frame()? {
                return Ok(Some(msg));
            }
            let mut chunk = [0u8; 64 * 1024];
            // Never read past the frame in hand plus one prefix: the buffer stays within the limit.
            let want = self.wanted().min(chunk.len());
            match r.read(&mut chunk[..want]) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
                    ) =>
                {
                    return Err(ReadError::Closed);
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Bytes still missing from the frame being received (its prefix first), at least one.
    fn wanted(&self) -> usize {
        match self.prefix() {
            None => 4 - self.buf.len(),
            Some(len) => (4 + len).saturating_sub(self.buf.len()).max(1),
        }
    }

    fn prefix(&self) -> Option<usize> {
        let p: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(p)).ok()
    }

    fn take_frame(&mut self) -> Result<Option<Msg>, ReadError> {
        let Some(len) = self.prefix() else { return Ok(None) };
        if len > self.limit {
            return Err(ReadError::TooLarge { len, limit: self.limit });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = &mut self.buf[4..4 + len];
        let body = match self.open.as_mut() {
            None => &frame[..],
            Some(key) => {
                if len < FRAME_TAG_BYTES {
                    return Err(ReadError::Forged);
                }
                let n = key.open(frame).ok_or(ReadError::Forged)?;
                &frame[..n]
            }
        };
        let msg = Msg::decode(body);
        self.buf.drain(..4 + len);
        Ok(Some(msg?))
    }
}

/// Parameters and optimizer moments of one worker, on the host.
pub type HostState = (BTreeMap<String, HostTensor>, BTreeMap<String, Moments>);

/// A member's full state (parameters and optimizer moments) as bytes: the checkpoint gather
/// and the peer copies send it.
pub(crate) fn encode_state(
    params: &BTreeMap<String, HostTensor>,
    moments: &BTreeMap<String, Moments>,
) -> Vec<u8> {
    let mut e = Enc::new();
    e.u32(params.len() as u32);
    for (name, p) in params {
        e.str(name).u32(p.shape.len() as u32);
        for &d in &p.shape {
            e.u32(d as u32);
        }
        e.f32s(&p.data);
        let (m, v) = moments.get(name).map_or((&[][..], &[][..]), |m| (&m.m[..], &m.v[..]));
        e.f32s(m).f32s(v);
    }
    e.finish()
}

/// Reads [`encode_state`]'s bytes, checking every size against the others (they come from a peer).
pub(crate) fn decode_state(bytes: &[u8]) -> Result<HostState, Malformed> {
    let mut d = Dec::new(bytes);
    let n = d.u32()?;
    let mut params = BTreeMap::new();
    let mut moments = BTreeMap::new();
    for _ in 0..n {
        let name = d.str()?;
        let dims = d.u32()?;
        let shape = (0..dims).map(|_| d.u32().map(|x| x as usize)).collect::<Result<Vec<_>, _>>()?;
        let data = d.f32s()?;
        let (m, v) = (d.f32s()?, d.f32s()?);
        // The shape comes from a peer: its product may overflow.
        let elements = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d));
        if elements != Some(data.len()) || m.len() != data.len() || v.len() != data.len() {
            return Err(Malformed(format!("tensor {name} has inconsistent sizes")));
        }
        moments.insert(name.clone(), Moments { m, v });
        params.insert(name, HostTensor { shape, data });
    }
    d.end()?;
    Ok((params, moments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        let call = ExpertCall { micro: 3, layer: 1, expert: 7 };
        vec![
            Msg::Hello { generation: 9, rank: 2, nonce: [3; 32] },
            Msg::Challenge { rank: 1, nonce: [4; 32], proof: [5; 32] },
            Msg::Proof { proof: [6; 32] },
            Msg::Forward {
                generation: 1,
                step: 5,
                call,
                rows: 2,
                data: vec![1.5, -0.0, f32::MIN_POSITIVE, 3.0],
            },
            Msg::Backward { generation: 1, step: 5, call, rows: 1, data: vec![f32::NAN.copysign(-1.0)] },
            Msg::Reply { data: vec![] },
            Msg::Refused { reason: "generation 3 ended".into() },
            Msg::Push { generation: 2, step: 0, round: 3, payload: vec![0, 255, 7] },
            Msg::PeerCopy { generation: 4, step: 12, payload: vec![1, 2, 3] },
            Msg::PeerAck { step: 12 },
            Msg::PeerFetch { generation: 4, step: 12, dense: true, experts: vec![ExpertId::new(1, 3)] },
            Msg::PeerState { step: 12, payload: vec![9; 5] },
        ]
    }

    #[test]
    fn forged_peer_fetches_are_refused_before_allocating() {
        // A count of experts the frame cannot hold.
        let mut e = Enc::new();
        e.u8(PEER_FETCH).u64(1).u64(2).u8(0).u32(u32::MAX);
        assert!(Msg::decode(&e.finish()).is_err());
        // A flag that is not a bool.
        let mut e = Enc::new();
        e.u8(PEER_FETCH).u64(1).u64(2).u8(7).u32(0);
        assert!(Msg::decode(&e.finish()).is_err());
        // A copy whose payload length runs past the frame.
        let mut e = Enc::new();
        e.u8(PEER_COPY).u64(1).u64(2).u32(1 << 30).raw(&[0; 8]);
        assert!(Msg::decode(&e.finish()).is_err());
        // Every truncation of every peer message is an error, never a panic.
        for msg in samples().into_iter().skip(8) {
            let body = msg.encode();
            for cut in 0..body.len() {
                assert!(Msg::decode(&body[..cut]).is_err(), "{msg:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn an_oversized_peer_copy_is_refused_from_its_length_prefix() {
        let msg = Msg::PeerCopy { generation: 1, step: 1, payload: vec![0; 4096] };
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &msg, None).unwrap();
        let mut reader = FrameReader::new(1024);
        let err = reader.next(&mut &bytes[..]).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { limit: 1024, .. }), "{err:?}");
        assert!(reader.buffered() <= 8, "the body was never buffered");
    }

    #[test]
    fn every_message_round_trips_bit_for_bit() {
        for msg in samples() {
            let body = msg.encode();
            let back = Msg::decode(&body).unwrap();
            // Compare encodings: NaN != NaN as floats, but the bits must survive.
            assert_eq!(back.encode(), body, "{msg:?}");
        }
    }

    #[test]
    fn frames_survive_arbitrary_splits_and_timeouts() {
        let mut wire = Vec::new();
        for msg in samples() {
            write_frame(&mut wire, &msg, None).unwrap();
        }
        // A reader that delivers one byte per call and times out every other call.
        struct Trickle<'a> {
            data: &'a [u8],
            at: usize,
            tick: bool,
        }
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                self.tick = !self.tick;
                if self.tick {
                    return Err(std::io::Error::new(ErrorKind::WouldBlock, "timeout"));
                }
                if self.at == self.data.len() {
                    return Ok(0);
                }
                out[0] = self.data[self.at];
                self.at += 1;
                Ok(1)
            }
        }
        let mut src = Trickle { data: &wire, at: 0, tick: false };
        let mut reader = FrameReader::new(1 << 20);
        let mut got = Vec::new();
        loop {
            match reader.next(&mut src) {
                Ok(Some(m)) => got.push(m.encode()),
                Ok(None) => {}
                Err(ReadError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, samples().iter().map(Msg::encode).collect::<Vec<_>>());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Msg::decode(&[]).is_err());
        assert!(Msg::decode(&[99]).is_err());
        assert!(Msg::decode(&[FORWARD, 1, 2]).is_err());
        let mut body = Msg::Reply { data: vec![1.0] }.encode();
        body.push(0);
        assert!(Msg::decode(&body).is_err(), "trailing bytes");
        // A length that claims more f32s than the frame has.
        let mut e = Enc::new();
        e.u8(REPLY).u32(u32::MAX);
        assert!(Msg::decode(&e.finish()).is_err());
        let mut reader = FrameReader::new(HANDSHAKE_FRAME_BYTES);
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(reader.next(&mut &huge[..]), Err(ReadError::TooLarge { .. })));
    }

    #[test]
    fn authenticated_frames_carry_the_senders_next_tag() {
        use crate::dist::auth::{Handshake, JobAuth, JobKey, Side};
        let auth = JobAuth::new("ns/job", JobKey::from_bytes(&[b'k'; 32]).unwrap());
        let h =
            Handshake { generation: 1, client: 0, server: 1, client_nonce: [1; 32], server_nonce: [2; 32] };
        let mut send = auth.frame_key(Side::Client, &h);
        let mut wire = Vec::new();
        for msg in samples() {
            write_frame(&mut wire, &msg, Some(&mut send)).unwrap();
        }
        let mut reader = FrameReader::new(HANDSHAKE_FRAME_BYTES);
        reader.authenticate(auth.frame_key(Side::Client, &h), 1 << 20);
        let mut src = &wire[..];
        for msg in samples() {
            assert_eq!(reader.next(&mut src).unwrap().unwrap().encode(), msg.encode());
        }
        // An untagged frame, and a tagged one whose body was changed, are refused.
        let mut plain = Vec::new();
        write_frame(&mut plain, &samples()[0], None).unwrap();
        let mut reader = FrameReader::new(64);
        reader.authenticate(auth.frame_key(Side::Client, &h), 1 << 20);
        assert!(matches!(reader.next(&mut &plain[..]), Err(ReadError::Forged)));
        let mut reader = FrameReader::new(64);
        reader.authenticate(auth.frame_key(Side::Client, &h), 1 << 20);
        let mut flipped = Vec::new();
        write_frame(&mut flipped, &samples()[0], Some(&mut auth.frame_key(Side::Client, &h))).unwrap();
        flipped[6] ^= 1;
        assert!(matches!(reader.next(&mut &flipped[..]), Err(ReadError::Forged)));
    }
}
