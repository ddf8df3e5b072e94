//! Property-based fuzzing of the transport's decoders (issue 23): frames, the frame reader over
//! arbitrary splits, tagged frames, and the collective rounds' payloads. Decoders never panic,
//! never hold more than their limit, and what they accept re-encodes to the same bytes.
//!
//! Cases per property: `NINELIVES_FUZZ_CASES` (default 64; `scripts/fuzz` runs many more).

use std::io::{ErrorKind, Read};

use proptest::prelude::*;

use super::auth::{Handshake, JobAuth, JobKey, Side};
use super::engine::{decode_expert_grads, decode_partials, decode_results};
use super::wire::decode_state;
use super::wire::{FrameReader, HANDSHAKE_FRAME_BYTES, Msg, ReadError, write_frame};
use crate::model::ExpertCall;

fn config() -> ProptestConfig {
    let cases = std::env::var("NINELIVES_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn msg() -> impl Strategy<Value = Msg> {
    let call = (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(micro, layer, expert)| ExpertCall {
        micro,
        layer,
        expert,
    });
    let floats = prop::collection::vec(any::<u32>().prop_map(f32::from_bits), 0..32);
    prop_oneof![
        (any::<u64>(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(generation, rank, nonce)| Msg::Hello {
            generation,
            rank,
            nonce
        }),
        (any::<u32>(), any::<[u8; 32]>(), any::<[u8; 32]>())
            .prop_map(|(rank, nonce, proof)| Msg::Challenge { rank, nonce, proof }),
        any::<[u8; 32]>().prop_map(|proof| Msg::Proof { proof }),
        (any::<u64>(), any::<u64>(), call.clone(), any::<u32>(), floats.clone()).prop_map(
            |(generation, step, call, rows, data)| Msg::Forward { generation, step, call, rows, data }
        ),
        (any::<u64>(), any::<u64>(), call, any::<u32>(), floats.clone()).prop_map(
            |(generation, step, call, rows, data)| Msg::Backward { generation, step, call, rows, data }
        ),
        floats.prop_map(|data| Msg::Reply { data }),
        any::<String>().prop_map(|reason| Msg::Refused { reason }),
        (any::<u64>(), any::<u64>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(generation, step, round, payload)| Msg::Push { generation, step, round, payload }),
    ]
}

/// A stream that hands out its bytes in the given chunk sizes, timing out between chunks.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    turn: usize,
    tick: bool,
}

impl Read for Chunked<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.tick = !self.tick;
        if self.tick {
            return Err(std::io::Error::new(ErrorKind::WouldBlock, "timeout"));
        }
        if self.data.is_empty() {
            return Ok(0);
        }
        let size = self.sizes.get(self.turn % self.sizes.len().max(1)).copied().unwrap_or(1).max(1);
        self.turn += 1;
        let n = size.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Reads every frame `reader` yields from `data` until it ends or fails.
fn read_all(reader: &mut FrameReader, data: &[u8], sizes: Vec<usize>) -> (Vec<Msg>, Option<ReadError>) {
    let mut src = Chunked { data, sizes, turn: 0, tick: false };
    let mut got = Vec::new();
    loop {
        match reader.next(&mut src) {
            Ok(Some(m)) => got.push(m),
            Ok(None) => {}
            Err(ReadError::Closed) => return (got, None),
            Err(e) => return (got, Some(e)),
        }
        assert!(reader.buffered() <= reader.limit() + 4, "the reader holds more than a frame");
    }
}

fn auth() -> (JobAuth, Handshake) {
    let auth = JobAuth::new("ns/job", JobKey::from_bytes(&[b'k'; 32]).unwrap_or_else(|e| panic!("{e}")));
    let h = Handshake { generation: 2, client: 0, server: 1, client_nonce: [1; 32], server_nonce: [2; 32] };
    (auth, h)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_decode_or_fail_and_accepted_frames_are_canonical(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = Msg::decode(&body) {
            prop_assert_eq!(m.encode(), body);
        }
    }

    #[test]
    fn every_message_round_trips(m in msg()) {
        let body = m.encode();
        prop_assert_eq!(Msg::decode(&body).map(|b| b.encode()), Ok(body));
    }

    #[test]
    fn the_reader_survives_any_stream_and_never_buffers_past_its_limit(
        data in prop::collection::vec(any::<u8>(), 0..2048),
        sizes in prop::collection::vec(1usize..300, 1..8),
        limit in 0usize..1024,
    ) {
        let mut reader = FrameReader::new(limit);
        let (got, _) = read_all(&mut reader, &data, sizes);
        let consumed: usize = got.iter().map(|m| m.encode().len() + 4).sum();
        prop_assert!(consumed <= data.len());
    }

    #[test]
    fn frames_arrive_whole_and_in_order_whatever_the_splits(
        msgs in prop::collection::vec(msg(), 1..6),
        sizes in prop::collection::vec(1usize..200, 1..8),
    ) {
        let mut wire = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m, None).unwrap_or_else(|e| panic!("{e}"));
        }
        let (got, err) = read_all(&mut FrameReader::new(1 << 20), &wire, sizes);
        prop_assert!(err.is_none(), "{:?}", err);
        let encode = |v: &[Msg]| v.iter().map(Msg::encode).collect::<Vec<_>>();
        prop_assert_eq!(encode(&got), encode(&msgs));
    }

    #[test]
    fn a_changed_byte_of_a_tagged_stream_is_never_accepted_as_a_frame(
        msgs in prop::collection::vec(msg(), 1..4),
        at in any::<usize>(),
        flip in 1u8..=255,
    ) {
        let (auth, h) = auth();
        let mut send = auth.frame_key(Side::Client, &h);
        let mut wire = Vec::new();
        let mut ends = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m, Some(&mut send)).unwrap_or_else(|e| panic!("{e}"));
            ends.push(wire.len());
        }
        let at = at % wire.len();
        wire[at] ^= flip;
        let mut reader = FrameReader::new(HANDSHAKE_FRAME_BYTES);
        reader.authenticate(auth.frame_key(Side::Client, &h), 1 << 20);
        let (got, err) = read_all(&mut reader, &wire, vec![4096]);
        // Only the frames wholly before the changed byte are accepted, unchanged.
        let intact = ends.iter().filter(|&&end| end <= at).count();
        prop_assert!(got.len() <= intact);
        for (g, m) in got.iter().zip(&msgs) {
            prop_assert_eq!(g.encode(), m.encode());
        }
        prop_assert!(err.is_some() || got.len() < msgs.len(), "the change went unnoticed");
    }

    #[test]
    fn round_payloads_decode_or_fail_within_their_size(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let n = bytes.len();
        if let Ok(results) = decode_results(&bytes) {
            let values: usize = results.iter().flat_map(|r| r.grads.values()).map(Vec::len).sum();
            prop_assert!(values * 4 <= n);
        }
        if let Ok(grads) = decode_expert_grads(&bytes) {
            prop_assert!(grads.iter().map(|g| g.2.len() * 4 + g.1.len()).sum::<usize>() <= n);
        }
        if let Ok(partials) = decode_partials(&bytes) {
            prop_assert!(partials.len() * 12 <= n);
        }
        if let Ok((params, _)) = decode_state(&bytes) {
            prop_assert!(params.values().map(|p| p.data.len() * 12).sum::<usize>() <= n);
        }
    }

    #[test]
    fn any_model_dimensions_are_checked_without_overflow(
        dims in (1u32..=u32::MAX, any::<u32>(), 1u32..64, any::<u32>(), any::<u32>(), 1u32..4, any::<u32>(), any::<u32>()),
        batch in (1u32..=u32::MAX, 1u32..=u32::MAX),
    ) {
        let (layers, hidden_size, heads, routed_experts, zero_experts, top_k, expert_ffn_size, seq_len) = dims;
        let mut config = crate::trainer::TrainerConfig::from_job(
            &ninelives_core::manifest::parse_job(include_str!("../../../examples/tiny.yaml"))
                .unwrap_or_else(|v| panic!("{v:?}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        config.dims = ninelives_core::ModelDims {
            layers, hidden_size, heads, vocab_size: 256, routed_experts, zero_experts, top_k,
            expert_ffn_size, seq_len, sparse_attention: None,
        };
        (config.global_batch_size, config.micro_batch_size) = batch;
        if config.check().is_ok() {
            // Everything the worker sizes from them fits.
            prop_assert!(config.dims.checked_total_params().is_some());
            let _ = super::wire::frame_limit(&config);
            prop_assert!(config.tokens_per_step() >= u64::from(config.dims.seq_len));
        }
    }

    #[test]
    fn a_state_payload_with_any_shape_never_panics(
        dims in prop::collection::vec(any::<u32>(), 0..6),
        values in 0u32..8,
    ) {
        // A tensor whose shape product overflows, or disagrees with its data, is refused.
        let mut e = super::wire::Enc::new();
        e.u32(1).str("x").u32(u32::try_from(dims.len()).unwrap_or(0));
        for d in &dims {
            e.u32(*d);
        }
        let data = vec![0.5f32; values as usize];
        e.f32s(&data).f32s(&data).f32s(&data);
        let product = dims.iter().try_fold(1u64, |p, &d| p.checked_mul(u64::from(d)));
        let decoded = decode_state(&e.finish());
        prop_assert_eq!(decoded.is_ok(), product == Some(u64::from(values)));
    }
}
