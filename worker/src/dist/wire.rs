//! The wire format between workers: length-prefixed binary frames.
//!
//! A frame is `u32 length (LE) | u8 tag | fields`, every number little-endian, every float sent as
//! its exact bits (so a tensor crosses the wire bit-for-bit). Frames larger than
//! [`MAX_FRAME_BYTES`] are refused: a corrupt length must not make a worker allocate gigabytes.

use std::io::{ErrorKind, Read, Write};

use crate::model::ExpertCall;

/// Largest frame accepted (a tiny step's dense gradients are ~1.3 MB per micro-batch).
pub const MAX_FRAME_BYTES: usize = 1 << 30;

/// One message between two workers.
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    /// First frame of every connection: who is calling, in which generation.
    Hello {
        /// Placement generation the caller is in.
        generation: u64,
        /// The caller's rank.
        rank: u32,
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
    /// One worker's contribution to a collective round of a step.
    Push {
        /// Generation.
        generation: u64,
        /// Step.
        step: u64,
        /// Round within the step.
        round: u8,
        /// Sender's rank.
        from: u32,
        /// Round-specific bytes (see `engine`).
        payload: Vec<u8>,
    },
}

const HELLO: u8 = 1;
const FORWARD: u8 = 2;
const BACKWARD: u8 = 3;
const REPLY: u8 = 4;
const REFUSED: u8 = 5;
const PUSH: u8 = 6;

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
    /// The frame body (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        match self {
            Msg::Hello { generation, rank } => {
                e.u8(HELLO).u64(*generation).u32(*rank);
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
            Msg::Push { generation, step, round, from, payload } => {
                e.u8(PUSH).u64(*generation).u64(*step).u8(*round).u32(*from).bytes(payload);
            }
        }
        e.finish()
    }

    /// Decodes a frame body.
    pub fn decode(body: &[u8]) -> Result<Msg, Malformed> {
        let mut d = Dec::new(body);
        let msg = match d.u8()? {
            HELLO => Msg::Hello { generation: d.u64()?, rank: d.u32()? },
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
            PUSH => Msg::Push {
                generation: d.u64()?,
                step: d.u64()?,
                round: d.u8()?,
                from: d.u32()?,
                payload: d.bytes()?,
            },
            other => return Err(Malformed(format!("unknown message tag {other}"))),
        };
        d.end()?;
        Ok(msg)
    }
}

/// Writes one frame. Returns the bytes put on the wire.
pub fn write_frame(w: &mut impl Write, msg: &Msg) -> std::io::Result<u64> {
    let body = msg.encode();
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(frame.len() as u64)
}

/// Reads frames from a stream whose reads may time out, without losing a partially received
/// frame: a timeout returns `Ok(None)` and the next call continues where this one stopped.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
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
    /// The bytes are not a frame.
    #[error(transparent)]
    Malformed(#[from] Malformed),
}

impl FrameReader {
    /// A reader with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next whole frame, `Ok(None)` when the read timed out first.
    pub fn next(&mut self, r: &mut impl Read) -> Result<Option<Msg>, ReadError> {
        loop {
            if let Some(msg) = self.take_frame()? {
                return Ok(Some(msg));
            }
            let mut chunk = [0u8; 64 * 1024];
            match r.read(&mut chunk) {
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

    fn take_frame(&mut self) -> Result<Option<Msg>, Malformed> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(Malformed(format!("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = Msg::decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        let call = ExpertCall { micro: 3, layer: 1, expert: 7 };
        vec![
            Msg::Hello { generation: 9, rank: 2 },
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
            Msg::Push { generation: 2, step: 0, round: 3, from: 1, payload: vec![0, 255, 7] },
        ]
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
            write_frame(&mut wire, &msg).unwrap();
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
        let mut reader = FrameReader::new();
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
        let mut reader = FrameReader::new();
        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        assert!(matches!(reader.next(&mut &huge[..]), Err(ReadError::Malformed(_))));
    }
}
