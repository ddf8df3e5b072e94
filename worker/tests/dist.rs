//! Expert-parallel training with members as threads of this process, a real etcd and real TCP:
//! W members produce the same parameters, bit for bit, as one member and as the single-process
//! trainer. (Process-level tests, including kill -9, are in `cli/tests/launch.rs`.)

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ninelives_core::keyspace::Keyspace;
use ninelives_core::placement::PlacementShape;
use ninelives_testkit::EtcdServer;
use ninelives_worker::dist::coordinator::Coordinator;
use ninelives_worker::dist::member::{MemberEvent, MemberOptions, run_member};
use ninelives_worker::dist::plan::worker_shape;
use ninelives_worker::dist::rendezvous::Etcd;
use ninelives_worker::trainer::run_with_threads;
use ninelives_worker::{CheckpointStore, Trainer, TrainerConfig};

/// A small MoE: 2 layers × 4 routed experts, 4 micro-batches per step.
fn small_config(steps: u64) -> TrainerConfig {
    let mut config = common::tiny_config(steps);
    config.dims.layers = 2;
    config.dims.hidden_size = 64;
    config.dims.heads = 2;
    config.dims.routed_experts = 4;
    config.dims.zero_experts = 1;
    config.dims.expert_ffn_size = 64;
    config.dims.seq_len = 32;
    config.global_batch_size = 8;
    config.micro_batch_size = 2;
    config
}

fn distributed(
    etcd: &EtcdServer,
    job: &str,
    workers: u32,
    redundant: u32,
    config: &TrainerConfig,
    dir: &Path,
) -> String {
    let keys = Keyspace::default().job("test", job);
    let base = PlacementShape {
        layers: config.dims.layers,
        routed_experts: config.dims.routed_experts,
        redundant_experts: redundant,
        expert_state_bytes: 1 << 20,
        nodes: 1,
        chips_per_node: 1,
        chip_memory_bytes: 1 << 30,
        expert_parallel_size: 1,
        nodes_per_rack: None,
        min_healthy_fraction: 0.25,
    };
    let store = CheckpointStore::open(dir, 10).unwrap();
    let endpoints = vec![etcd.endpoint()];
    let link = Arc::new(Etcd::connect(&endpoints, keys.clone()).unwrap());
    let mut coordinator = Coordinator::new(link, worker_shape(&base, workers), store.clone());
    coordinator.reset().unwrap();
    let corpus = common::demo_corpus();
    let members: Vec<_> = (0..workers)
        .map(|rank| {
            let (config, corpus, store, endpoints, keys) =
                (config.clone(), corpus.clone(), store.clone(), endpoints.clone(), keys.clone());
            std::thread::spawn(move || {
                let etcd = Arc::new(Etcd::connect(&endpoints, keys).unwrap());
                let options = MemberOptions {
                    rank,
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    ttl_seconds: 3,
                    step_timeout: Duration::from_secs(30),
                    join_timeout: Duration::from_secs(60),
                    checkpoint_every: 2,
                };
                run_with_threads(1, || {
                    run_member(config, corpus, store, etcd, &options, |e| {
                        if let MemberEvent::Aborted { reason, .. } = e {
                            panic!("rank {rank} aborted: {reason}");
                        }
                    })
                })
                .unwrap()
                .unwrap()
            })
        })
        .collect();
    coordinator.wait_registered(workers, Duration::from_secs(60)).unwrap();
    coordinator.start(false).unwrap();
    let digests: Vec<Option<String>> = members.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(digests[0].is_some(), "the leader reports the digest");
    assert!(digests[1..].iter().all(Option::is_none), "only the leader reports");
    digests[0].clone().unwrap()
}

#[test]
fn members_train_bit_identically_to_one_process() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(3);

    let mut single = Trainer::new(config.clone(), common::demo_corpus()).unwrap();
    let expected = run_with_threads(1, || {
        for _ in 0..3 {
            single.train_step().unwrap();
        }
        single.params_sha256().unwrap()
    })
    .unwrap();

    let one = distributed(&etcd, "one", 1, 0, &config, &dir.path().join("one"));
    assert_eq!(one, expected, "one member == the single-process trainer");
    let three = distributed(&etcd, "three", 3, 0, &config, &dir.path().join("three"));
    assert_eq!(three, expected, "three members == one process");
    // Every expert on two members: replicas split the micro-batches and must stay identical.
    let replicated = distributed(&etcd, "replicated", 3, 4, &config, &dir.path().join("replicated"));
    assert_eq!(replicated, expected, "replicated experts == one process");
}
