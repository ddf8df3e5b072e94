//! Every validation rule, each with a bad manifest and the exact message a user sees.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use ninelives_core::job::TrainingJob;
use ninelives_core::manifest::{check_document, check_manifests, parse_job};
use serde_json::{Value, json};

const TINY: &str = include_str!("../../examples/tiny.yaml");

fn tiny() -> Value {
    serde_saphyr::from_str(TINY).unwrap()
}

/// Applies `edits` (JSON pointer → new value; `null` removes the field) to the tiny example and
/// returns every (path, message) problem.
fn problems(edits: &[(&str, Value)]) -> Vec<(String, String)> {
    let mut doc = tiny();
    for (pointer, value) in edits {
        let (parent, leaf) = pointer.rsplit_once('/').unwrap();
        let target = doc.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}"));
        let map = target.as_object_mut().unwrap();
        if value.is_null() {
            map.remove(leaf);
        } else {
            map.insert(leaf.to_string(), value.clone());
        }
    }
    match check_document(doc) {
        Ok(_) => Vec::new(),
        Err(v) => v.into_iter().map(|v| (v.path, v.message)).collect(),
    }
}

#[track_caller]
fn assert_problem(edits: &[(&str, Value)], path: &str, message: &str) {
    let found = problems(edits);
    assert!(
        found.iter().any(|(p, m)| p == path && m == message),
        "expected `{path}: {message}`, got {found:#?}"
    );
}

#[test]
fn the_examples_are_valid() {
    assert_eq!(problems(&[]), Vec::<(String, String)>::new());
    let longcat =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/longcat-2.0.yaml"))
            .unwrap();
    assert!(parse_job(&longcat).is_ok(), "{:?}", parse_job(&longcat).err());
}

#[test]
fn chips_per_node_must_be_positive() {
    assert_problem(
        &[("/spec/topology/chipsPerNode", json!(0))],
        "spec.topology.chipsPerNode",
        "chipsPerNode must be between 1 and 64",
    );
}

#[test]
fn nodes_must_be_positive() {
    assert_problem(&[("/spec/topology/nodes", json!(0))], "spec.topology.nodes", "nodes must be at least 1");
}

#[test]
fn explicit_top_k_cannot_exceed_the_experts() {
    assert_problem(
        &[("/spec/model", json!({"preset": "tiny", "routedExperts": 4, "zeroExperts": 1, "topK": 6}))],
        "spec.model",
        "topK must not exceed routedExperts + zeroExperts",
    );
}

#[test]
fn top_k_is_checked_against_the_preset_too() {
    assert_problem(
        &[("/spec/model/topK", json!(11))],
        "spec.model.topK",
        "topK 11 exceeds the 10 experts a token can choose from (8 routed + 2 zero-computation)",
    );
}

#[test]
fn a_model_needs_a_preset_or_every_dimension() {
    assert_problem(
        &[("/spec/model", json!({"layers": 2, "routedExperts": 4, "topK": 2}))],
        "spec.model",
        "set a preset or every dimension (layers, hiddenSize, heads, vocabSize, routedExperts, topK, expertFfnSize, seqLen)",
    );
}

#[test]
fn hidden_size_must_split_into_heads() {
    assert_problem(
        &[("/spec/model/hiddenSize", json!(130))],
        "spec.model.hiddenSize",
        "hiddenSize 130 is not divisible by heads 4",
    );
}

#[test]
fn sparse_attention_blocks_must_tile_the_sequence() {
    assert_problem(
        &[("/spec/model/sparseAttention", json!({"blockSize": 7, "topBlocks": 2}))],
        "spec.model.sparseAttention.blockSize",
        "blockSize 7 does not divide seqLen 64",
    );
}

#[test]
fn global_batch_must_be_whole_micro_batches() {
    assert_problem(
        &[("/spec/data/globalBatchSize", json!(10))],
        "spec.data.globalBatchSize",
        "globalBatchSize must be a multiple of microBatchSize",
    );
}

#[test]
fn datasets_are_required() {
    assert_problem(
        &[("/spec/data/datasets", json!([]))],
        "spec.data.datasets",
        "at least one dataset path is required",
    );
    assert_problem(
        &[("/spec/data/datasets", json!(["  "]))],
        "spec.data.datasets[0]",
        "dataset path must not be empty",
    );
}

#[test]
fn expert_parallel_size_must_divide_the_chips() {
    assert_problem(
        &[("/spec/parallelism/expertParallelSize", json!(12))],
        "spec.parallelism.expertParallelSize",
        "expertParallelSize 12 does not divide the job's 32 chips (4 nodes x 8)",
    );
}

#[test]
fn expert_parallel_groups_are_whole_nodes() {
    assert_problem(
        &[("/spec/parallelism/expertParallelSize", json!(4))],
        "spec.parallelism.expertParallelSize",
        "expertParallelSize 4 must be a whole number of nodes (8 chips each)",
    );
}

#[test]
fn expert_parallel_size_cannot_exceed_the_chips() {
    assert_problem(
        &[("/spec/parallelism/expertParallelSize", json!(64))],
        "spec.parallelism.expertParallelSize",
        "expertParallelSize 64 exceeds the job's 32 chips",
    );
}

#[test]
fn replicas_of_an_expert_need_distinct_chips() {
    // Replicas of one expert on one chip merge: 8 experts x 32 chips hold at most 256 apart.
    assert_problem(
        &[("/spec/parallelism/redundantExperts", json!(250))],
        "spec.parallelism.redundantExperts",
        "250 redundant experts per layer need more replicas of some expert than the 32 chips of an expert-parallel group can hold apart (at most 248)",
    );
    // Hot experts may have more replicas than the group has nodes.
    assert_eq!(
        problems(&[("/spec/parallelism/redundantExperts", json!(30))]),
        Vec::<(String, String)>::new()
    );
}

#[test]
fn pipeline_stages_divide_the_layers_and_the_groups() {
    assert_problem(
        &[("/spec/parallelism/pipelineParallelSize", json!(3))],
        "spec.parallelism.pipelineParallelSize",
        "pipelineParallelSize 3 does not divide the model's 4 layers",
    );
    assert_problem(
        &[("/spec/parallelism/pipelineParallelSize", json!(2))],
        "spec.parallelism.pipelineParallelSize",
        "pipelineParallelSize 2 does not divide the job's 1 expert-parallel groups (32 chips / expertParallelSize 32): every stage needs whole groups",
    );
    assert_problem(
        &[("/spec/parallelism/pipelineParallelSize", json!(0))],
        "spec.parallelism.pipelineParallelSize",
        "pipelineParallelSize must be at least 1",
    );
    let two_stages = [
        ("/spec/parallelism/pipelineParallelSize", json!(2)),
        ("/spec/parallelism/expertParallelSize", json!(16)),
    ];
    assert_eq!(problems(&two_stages), Vec::<(String, String)>::new());
}

#[test]
fn chip_memory_is_checked_per_pipeline_stage() {
    // Four stages of one 8-chip group each: a chip holds only its stage's layer, 10 replicas
    // over 8 chips = 2 per chip (1.5 MiB), not the whole model's 40 / 8.
    let four_stages = [
        ("/spec/parallelism/pipelineParallelSize", json!(4)),
        ("/spec/parallelism/expertParallelSize", json!(8)),
        ("/spec/topology/chipMemory", json!("1Mi")),
    ];
    assert_problem(
        &four_stages,
        "spec.topology.chipMemory",
        "expert state needs 1.5 MiB per chip (2 expert replicas of a stage's 1 layers x 768.0 KiB) but chips have 1.0 MiB",
    );
}

#[test]
fn experts_must_fit_in_chip_memory() {
    assert_problem(
        &[("/spec/topology/chipMemory", json!("1Mi"))],
        "spec.topology.chipMemory",
        "expert state needs 1.5 MiB per chip (2 expert replicas of a stage's 4 layers x 768.0 KiB) but chips have 1.0 MiB",
    );
}

#[test]
fn chip_memory_must_be_a_quantity() {
    assert_problem(
        &[("/spec/topology/chipMemory", json!("lots"))],
        "spec.topology.chipMemory",
        "invalid quantity \"lots\": expected a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E)",
    );
}

#[test]
fn degraded_operation_must_still_hold_every_expert() {
    assert_problem(
        &[("/spec/failurePolicy/minHealthyFraction", json!(0.01))],
        "spec.failurePolicy.minHealthyFraction",
        "minHealthyFraction 0.01 leaves no healthy chip in an expert-parallel group of 32",
    );
    // 2 MiB holds the full job (2 replicas of 768 KiB per chip) but not the 32 routed experts
    // crammed onto the 3 chips left at 10%.
    assert_problem(
        &[
            ("/spec/topology/chipMemory", json!("2Mi")),
            ("/spec/failurePolicy/minHealthyFraction", json!(0.1)),
        ],
        "spec.failurePolicy.minHealthyFraction",
        "at minHealthyFraction 0.1 an expert-parallel group keeps 3 chips, which need 8.2 MiB each for the routed experts but have 2.0 MiB",
    );
}

#[test]
fn min_healthy_fraction_is_a_fraction() {
    assert_problem(
        &[("/spec/failurePolicy/minHealthyFraction", json!(1.5))],
        "spec.failurePolicy.minHealthyFraction",
        "minHealthyFraction must be in (0, 1]",
    );
}

#[test]
fn recovery_tiers_are_known_unique_and_non_empty() {
    assert_problem(
        &[("/spec/failurePolicy/allowedTiers", json!(["reroute", "restore", "reroute"]))],
        "spec.failurePolicy.allowedTiers[2]",
        "tier reroute is listed twice",
    );
    assert_problem(
        &[("/spec/failurePolicy/allowedTiers", json!([]))],
        "spec.failurePolicy.allowedTiers",
        "allowedTiers must name at least one tier",
    );
    let found = problems(&[("/spec/failurePolicy/allowedTiers", json!(["teleport"]))]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "spec.failurePolicy.allowedTiers[0]");
    assert!(
        found[0].1.starts_with("unknown variant `teleport`, expected one of `reroute`"),
        "{}",
        found[0].1
    );
}

#[test]
fn checkpoint_location_is_path_xor_pvc() {
    assert_problem(
        &[("/spec/checkpoint/pvc", json!({"claimName": "ckpt"}))],
        "spec.checkpoint",
        "set exactly one of path or pvc",
    );
    assert_problem(
        &[("/spec/checkpoint/path", Value::Null)],
        "spec.checkpoint",
        "set exactly one of path or pvc",
    );
}

#[test]
fn checkpoint_cadence_and_retention_are_positive() {
    assert_problem(
        &[("/spec/checkpoint/intervalSteps", json!(0))],
        "spec.checkpoint.intervalSteps",
        "intervalSteps must be at least 1",
    );
    assert_problem(
        &[("/spec/checkpoint/keepLast", json!(0))],
        "spec.checkpoint.keepLast",
        "keepLast must be at least 1",
    );
}

#[test]
fn peer_copies_need_other_nodes() {
    assert_problem(
        &[("/spec/checkpoint/peerCopies", json!(4))],
        "spec.checkpoint.peerCopies",
        "peerCopies 4 must be fewer than the 4 nodes that could hold them",
    );
}

#[test]
fn warmup_cannot_outlast_training() {
    assert_problem(
        &[("/spec/training/steps", json!(10))],
        "spec.training.learningRate.warmupSteps",
        "learningRate.warmupSteps must not exceed steps",
    );
}

#[test]
fn optimizer_settings_are_in_range() {
    assert_problem(
        &[("/spec/training/adamw/beta1", json!(1.0))],
        "spec.training.adamw",
        "beta1 and beta2 must be in [0, 1)",
    );
    assert_problem(
        &[("/spec/training/learningRate/peak", json!(-0.1))],
        "spec.training.learningRate.peak",
        "peak learning rate must be positive",
    );
    assert_problem(
        &[("/spec/training/gradClip", json!(0.0))],
        "spec.training.gradClip",
        "gradClip must be positive",
    );
}

#[test]
fn heartbeat_ttl_is_bounded() {
    assert_problem(
        &[("/spec/failurePolicy/heartbeatTtlSeconds", json!(0))],
        "spec.failurePolicy.heartbeatTtlSeconds",
        "heartbeatTtlSeconds must be between 1 and 300",
    );
}

#[test]
fn unknown_fields_are_errors() {
    assert_problem(&[("/spec/topology/gpus", json!(8))], "spec.topology.gpus", "unknown field");
    assert_problem(&[("/spec/extra", json!({"a": 1}))], "spec.extra", "unknown field");
}

#[test]
fn wrong_types_name_the_field() {
    let found = problems(&[("/spec/topology/nodes", json!("four"))]);
    assert_eq!(
        found,
        [("spec.topology.nodes".to_string(), "invalid type: string \"four\", expected u32".to_string())]
    );
    let found = problems(&[("/spec/topology/nodes", json!(-1))]);
    assert_eq!(
        found,
        [("spec.topology.nodes".to_string(), "invalid value: integer `-1`, expected u32".to_string())]
    );
}

#[test]
fn names_must_be_dns_labels_with_room_for_pod_suffixes() {
    assert_problem(
        &[("/metadata/name", json!("Tiny_Job"))],
        "metadata.name",
        "name \"Tiny_Job\" must consist of lower-case letters, digits and '-', and start and end with a letter or digit",
    );
    assert_problem(
        &[("/metadata/name", json!("a".repeat(60)))],
        "metadata.name",
        "name is 60 characters; at most 52 leave room for worker pod names",
    );
}

#[test]
fn api_version_and_kind_are_checked_first() {
    assert_problem(
        &[("/apiVersion", json!("v1"))],
        "apiVersion",
        "expected \"ninelives.io/v1alpha1\", found \"v1\"",
    );
    assert_problem(&[("/kind", json!("Pod"))], "kind", "expected \"TrainingJob\", found \"Pod\"");
}

#[test]
fn malformed_yaml_is_an_error_not_a_panic() {
    let err = check_manifests("spec: [unclosed").unwrap_err().to_string();
    assert!(err.starts_with("malformed YAML:") && err.contains("line 1"), "{err}");
    let err = check_manifests("a: 1\n  b: 2\n").unwrap_err().to_string();
    assert!(err.starts_with("malformed YAML:"), "{err}");
    let docs = check_manifests("--- 42\n").unwrap();
    assert_eq!(docs[0].result.as_ref().unwrap_err()[0].message, "document is not a mapping");
}

#[test]
fn multi_document_files_report_each_document() {
    let text = format!("{TINY}\n---\n{}\n---\n", TINY.replace("chipsPerNode: 8", "chipsPerNode: 0"));
    let docs = check_manifests(&text).unwrap();
    assert_eq!(docs.len(), 2);
    assert!(docs[0].result.is_ok());
    assert_eq!(docs[1].label(), "document 2 (tiny)");
    assert!(docs[1].result.is_err());
}

#[test]
fn the_model_is_immutable() {
    let old: TrainingJob = parse_job(TINY).unwrap();
    let mut new = old.clone();
    new.spec.model.layers = Some(2);
    let errors = TrainingJob::validate_cel_update(&new, &old).unwrap_err();
    assert!(errors.iter().any(|e| e.message == "model is immutable once the job exists"), "{errors:?}");
    let mut resized = old.clone();
    resized.spec.training.steps = 400;
    assert!(TrainingJob::validate_cel_update(&resized, &old).is_ok());
}

#[test]
fn rebalance_threshold_is_a_step_inflation() {
    let bad = json!({"threshold": 0.5, "minIntervalSteps": 10});
    let found = problems(&[("/spec/parallelism/rebalance", bad)]);
    assert!(
        found.iter().any(|(p, m)| p == "spec.parallelism.rebalance.threshold" && m.contains("at least 1.0")),
        "{found:#?}"
    );
    let good = json!({"threshold": 1.5, "minIntervalSteps": 10, "windowSteps": 5});
    assert_eq!(problems(&[("/spec/parallelism/rebalance", good)]), Vec::<(String, String)>::new());
}

#[test]
fn rebalance_interval_and_window_are_positive() {
    for field in ["minIntervalSteps", "windowSteps"] {
        let mut bad = json!({"threshold": 1.5});
        bad[field] = json!(0);
        let found = problems(&[("/spec/parallelism/rebalance", bad)]);
        let path = format!("spec.parallelism.rebalance.{field}");
        assert!(found.iter().any(|(p, m)| *p == path && m.contains("at least 1")), "{field}: {found:#?}");
    }
}

#[test]
fn router_skew_is_bounded() {
    let found = problems(&[("/spec/model/routerSkew", json!(25.0))]);
    assert!(found.iter().any(|(p, m)| p.starts_with("spec.model") && m.contains("routerSkew")), "{found:#?}");
    assert_eq!(problems(&[("/spec/model/routerSkew", json!(3.0))]), Vec::<(String, String)>::new());
}

#[test]
fn the_start_deadline_is_at_least_a_second_and_defaults_to_ten_minutes() {
    assert_problem(
        &[("/spec/failurePolicy/startTimeoutSeconds", json!(0))],
        "spec.failurePolicy.startTimeoutSeconds",
        "startTimeoutSeconds must be at least 1",
    );
    assert_eq!(
        problems(&[("/spec/failurePolicy/startTimeoutSeconds", json!(1))]),
        Vec::<(String, String)>::new()
    );
    assert_eq!(ninelives_core::job::FailurePolicy::default().start_timeout_seconds, 600);
}
