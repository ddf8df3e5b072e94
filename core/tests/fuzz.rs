//! Property-based fuzzing of every decoder of outside data in `ninelives-core` (issue 23): etcd
//! records (chip, placement, recovery, control, progress, checkpoints, acks), fault schedules and
//! TrainingJob manifests. For each: arbitrary bytes, byte-level mutations of a valid encoding,
//! and valid encodings with one field replaced by an arbitrary JSON value (huge, negative, of
//! another type). The decoder never panics; whatever it accepts re-encodes to a value it accepts
//! again, unchanged (a round trip), and the checks that consume an accepted value (a plan's
//! `check`, a schedule's `validate`, a spec's validation) never
//! panic either.
//!
//! Cases per property: `NINELIVES_FUZZ_CASES` (default 64; `scripts/fuzz` runs many more).

#![allow(clippy::unwrap_used)] // test: a panic is the failure report

use std::fmt::Debug;

use ninelives_core::fault_schedule::FaultSchedule;
use ninelives_core::generation::{DistPlan, Restore, initial_plan, worker_shape};
use ninelives_core::keyspace::ChipRecord;
use ninelives_core::recovery::{
    Ack, BrainConfig, CheckpointRecord, ControlRecord, ProgressRecord, RecoveryState,
};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn config() -> ProptestConfig {
    let cases = std::env::var("NINELIVES_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Arbitrary JSON values, with the numbers and strings that break decoders.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(1e20), Just(-1.0), Just(1e308), Just(-0.0), Just(5e-324), any::<f64>()]
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z0-9/_.-]{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every path to a value inside `v` (object keys and array indices).
fn paths(v: &Value, here: Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            m.iter().for_each(|(k, c)| paths(c, [here.clone(), vec![k.clone()]].concat(), out))
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, c)| paths(c, [here.clone(), vec![i.to_string()]].concat(), out)),
        _ => {}
    }
}

/// `seed` with the value at its `pick`-th path replaced by `with`.
fn replace(seed: &Value, pick: usize, with: Value) -> Value {
    let mut all = Vec::new();
    paths(seed, Vec::new(), &mut all);
    let path = &all[pick % all.len()];
    let mut out = seed.clone();
    let mut at = &mut out;
    for step in path {
        at = match at {
            Value::Object(m) => m.get_mut(step).unwrap(),
            Value::Array(a) => &mut a[step.parse::<usize>().unwrap()],
            _ => unreachable!(),
        };
    }
    *at = with;
    out
}

/// Byte-level mutations: flip, insert, delete, truncate.
fn mutate(seed: &[u8], edits: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for &(kind, at, byte) in edits {
        let at = if out.is_empty() { 0 } else { at % out.len() };
        match kind % 4 {
            0 if !out.is_empty() => out[at] ^= byte | 1,
            1 => out.insert(at, byte),
            2 if !out.is_empty() => {
                out.remove(at);
            }
            _ => out.truncate(at),
        }
    }
    out
}

/// Whatever `parse` accepts re-encodes to bytes it accepts again, as the same value.
fn round_trips<T, E: Debug>(parse: &dyn Fn(&[u8]) -> Result<T, E>, input: &[u8])
where
    T: Serialize + PartialEq + Debug,
{
    if let Ok(value) = parse(input) {
        let again = serde_json::to_vec(&value).unwrap();
        let back = parse(&again).unwrap_or_else(|e| panic!("{value:?} re-encoded does not parse: {e:?}"));
        assert_eq!(back, value);
    }
}

fn serde_parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// A decoder under test: bytes in, the value or why not.
type Parser<T> = dyn Fn(&[u8]) -> Result<T, String>;

/// A decoder under test: its parse, what consumes an accepted value, and a valid seed.
struct Target<T> {
    parse: Box<Parser<T>>,
    consume: Box<dyn Fn(&T)>,
    seed: Vec<u8>,
}

fn target<T: Serialize + 'static, E: std::fmt::Display>(
    parse: impl Fn(&[u8]) -> Result<T, E> + 'static,
    consume: impl Fn(&T) + 'static,
    seed: &T,
) -> Target<T> {
    Target {
        parse: Box::new(move |b| parse(b).map_err(|e| e.to_string())),
        consume: Box::new(consume),
        seed: serde_json::to_vec(seed).unwrap(),
    }
}

fn exercise<T: Serialize + PartialEq + Debug>(t: &Target<T>, input: &[u8]) {
    if let Ok(v) = (t.parse)(input) {
        (t.consume)(&v);
    }
    round_trips(&*t.parse, input);
}

fn plan_seed() -> DistPlan {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tiny.yaml")).unwrap();
    let job = ninelives_core::manifest::parse_job(&text).unwrap();
    let shape = BrainConfig::from_spec(&job.spec).unwrap().shape;
    initial_plan(&worker_shape(&shape, 2), Restore::Fresh).unwrap()
}

fn chip() -> Target<ChipRecord> {
    let seed: ChipRecord =
        serde_json::from_str(r#"{"state":"failed","code":"ecc","since":1700000000.5}"#).unwrap();
    target(|b| ChipRecord::parse("k", b), |_| {}, &seed)
}

fn plan() -> Target<DistPlan> {
    target(serde_parse::<DistPlan>, |p| drop(p.check(4, 8)), &plan_seed())
}

fn recovery() -> Target<RecoveryState> {
    let seed = RecoveryState::new(vec!["n0".into(), "n1".into(), "n2".into()], vec!["n2".into()]);
    target(|b| RecoveryState::parse("k", b), |_| {}, &seed)
}

fn control() -> Target<ControlRecord> {
    let seed: ControlRecord = serde_json::from_slice(
        br#"{"generation":8,"restoreStep":500,"loadExperts":{"n0":[{"layer":0,"expert":4,"chip":0,"source":{"kind":"checkpoint","step":500}}],"n1":[{"layer":3,"expert":17,"chip":2,"source":{"kind":"peer","node":"n2","chip":1}}]},"timeoutSeconds":30.0}"#,
    )
    .unwrap();
    target(serde_parse::<ControlRecord>, |_| {}, &seed)
}

fn progress() -> Target<ProgressRecord> {
    target(
        serde_parse::<ProgressRecord>,
        |_| {},
        &ProgressRecord { step: 12, loss: Some(2.5), generation: Some(3), rank: Some(0) },
    )
}

fn checkpoint() -> Target<CheckpointRecord> {
    let seed =
        CheckpointRecord { step: 40, location: Some("/ckpt/step-000000000040".into()), generation: None };
    target(serde_parse::<CheckpointRecord>, |_| {}, &seed)
}

fn ack() -> Target<Ack> {
    let seed: Ack =
        serde_json::from_str(r#"{"node":"n1","generation":4,"outcome":"applied","error":null}"#).unwrap();
    target(|b| Ack::parse("k", b), |_| {}, &seed)
}

macro_rules! record_properties {
    ($($name:ident => $target:expr),* $(,)?) => {$(
        mod $name {
            use super::*;
            proptest! {
                #![proptest_config(config())]
                #[test]
                fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                    exercise(&$target, &bytes);
                }
                #[test]
                fn mutated_encodings(edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6)) {
                    let t = $target;
                    exercise(&t, &mutate(&t.seed, &edits));
                }
                #[test]
                fn a_field_replaced(pick in any::<usize>(), with in json()) {
                    let t = $target;
                    let seed: Value = serde_json::from_slice(&t.seed).unwrap();
                    exercise(&t, &serde_json::to_vec(&replace(&seed, pick, with)).unwrap());
                }
            }
            #[test]
            fn the_seed_round_trips() {
                let t = $target;
                let v = (t.parse)(&t.seed).unwrap();
                (t.consume)(&v);
                round_trips(&*t.parse, &t.seed);
            }
        }
    )*};
}

record_properties! {
    chip_record => chip(),
    placement => plan(),
    recovery_state => recovery(),
    control_record => control(),
    progress_record => progress(),
    checkpoint_record => checkpoint(),
    ack_record => ack(),
}

mod fault_schedule {
    use super::*;

    fn seeds() -> Vec<String> {
        FaultSchedule::default_for(4, 8, 100).faults().iter().map(ToString::to_string).collect()
    }

    proptest! {
        #![proptest_config(config())]
        #[test]
        fn arbitrary_entries_parse_or_fail_and_accepted_ones_round_trip(
            entries in prop::collection::vec(any::<String>(), 0..4),
            edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..4),
            nodes in 0u32..8, chips in 0u32..16, steps in any::<u64>(),
        ) {
            let mut all = entries;
            for s in seeds() {
                all.push(String::from_utf8_lossy(&mutate(s.as_bytes(), &edits)).into_owned());
            }
            for entry in &all {
                if let Ok(schedule) = FaultSchedule::parse(std::slice::from_ref(entry)) {
                    let _ = schedule.validate(nodes, chips, steps);
                    let again: Vec<String> = schedule.faults().iter().map(ToString::to_string).collect();
                    let back = FaultSchedule::parse(&again).unwrap();
                    prop_assert_eq!(back.faults(), schedule.faults());
                }
            }
        }
    }

    #[test]
    fn the_default_schedule_round_trips() {
        let back = FaultSchedule::parse(&seeds()).unwrap();
        assert_eq!(back.faults(), FaultSchedule::default_for(4, 8, 100).faults());
    }
}

mod manifest {
    use super::*;
    use ninelives_core::manifest::parse_job;
    use ninelives_core::validate::validate_spec;

    fn seeds() -> Vec<String> {
        ["tiny.yaml", "longcat-2.0.yaml"]
            .iter()
            .map(|f| {
                std::fs::read_to_string(format!("{}/../examples/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap()
            })
            .collect()
    }

    /// Parses and validates; an accepted job re-encoded (as JSON, which is YAML) is accepted
    /// again with the same spec.
    fn exercise_text(text: &str) {
        if let Ok(job) = parse_job(text) {
            let _ = validate_spec(&job.spec);
            let again = serde_json::to_string(&job).unwrap();
            let back =
                parse_job(&again).unwrap_or_else(|v| panic!("re-encoded job is refused: {v:?}\n{again}"));
            assert_eq!(serde_json::to_value(&back.spec).unwrap(), serde_json::to_value(&job.spec).unwrap());
        }
    }

    proptest! {
        #![proptest_config(config())]
        #[test]
        fn arbitrary_text(text in any::<String>()) {
            exercise_text(&text);
        }

        #[test]
        fn mutated_manifests(which in 0usize..2, edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6)) {
            let seed = &seeds()[which];
            exercise_text(&String::from_utf8_lossy(&mutate(seed.as_bytes(), &edits)));
        }

        #[test]
        fn a_field_replaced(which in 0usize..2, pick in any::<usize>(), with in json()) {
            let job = parse_job(&seeds()[which]).unwrap();
            let seed = serde_json::to_value(&job).unwrap();
            exercise_text(&serde_json::to_string(&replace(&seed, pick, with)).unwrap());
        }
    }

    proptest! {
        #![proptest_config(config())]
        #[test]
        fn extreme_model_dimensions(dims in prop::collection::vec(prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()], 9)) {
            let mut job = parse_job(&seeds()[0]).unwrap();
            let model = &mut job.spec.model;
            (model.layers, model.hidden_size, model.heads) = (Some(dims[0]), Some(dims[1]), Some(dims[2]));
            (model.routed_experts, model.zero_experts, model.top_k) = (Some(dims[3]), Some(dims[4]), Some(dims[5]));
            (model.expert_ffn_size, model.seq_len, model.vocab_size) = (Some(dims[6]), Some(dims[7]), Some(dims[8]));
            exercise_text(&serde_json::to_string(&job).unwrap());
            if let Ok(d) = ninelives_core::ModelDims::resolve(&job.spec.model) {
                let _ = (d.total_params(), d.active_params(), d.expert_state_bytes(), d.checked_total_params());
            }
        }
    }

    #[test]
    fn the_examples_round_trip() {
        for s in seeds() {
            exercise_text(&s);
            assert!(parse_job(&s).is_ok());
        }
    }
}
