//! The control loop publishing a large layout's generation to a real etcd with etcd's default
//! limits (1.5 MiB requests, 128 operations per transaction): the plan goes into bounded group
//! values and a small commit record, reads back bit for bit, and older group values are
//! collected once the generation in force has settled (issue 22 item 1).

#![allow(clippy::unwrap_used)] // a panic is the failure report

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use ninelives_control::{ControlLoop, EffectError, Effects, EtcdStore, JobIdentity, Progress};
use ninelives_core::generation::{DistPlan, MAX_VALUE_BYTES, PlacementValue};
use ninelives_core::keyspace::{ChipRecord, ChipState, Keyspace};
use ninelives_core::recovery::{BrainConfig, MemberAck, RecoveryState};

const NS: &str = "ml";
const JOB: &str = "longcat";
/// Two pipeline stages' worth of the reference layout: 500 nodes, 4,000 chips, 20 groups.
const NODES: u32 = 500;

struct Table(RecoveryState);

impl Effects for Table {
    async fn node_table(&mut self) -> Result<Option<RecoveryState>, EffectError> {
        Ok(Some(self.0.clone()))
    }
}

fn node(n: u32) -> String {
    format!("node-{n:05}")
}

async fn put_all(client: &mut Client, puts: Vec<(String, String)>) {
    for chunk in puts.chunks(100) {
        let ops = chunk.iter().map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None)).collect::<Vec<_>>();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

/// Every key and value in etcd.
async fn everything(client: &Client) -> Vec<(String, Vec<u8>)> {
    let mut kv = client.kv_client().max_decoding_message_size(1 << 30);
    let all = kv.get(vec![0u8], Some(GetOptions::new().with_from_key())).await.unwrap();
    all.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec())).collect()
}

/// The plan in force as a member reads it: the commit record, then every group it names.
fn read_plan(all: &[(String, Vec<u8>)], keys: &ninelives_core::keyspace::JobKeys) -> DistPlan {
    let get = |k: &str| all.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
    let PlacementValue::Record(record) = PlacementValue::parse(&get(&keys.placement())).unwrap() else {
        panic!("the loop wrote a whole plan at placement")
    };
    let groups: Vec<_> =
        (0..).zip(record.group_keys(keys)).map(|(g, k)| record.parse_group(g, &get(&k)).unwrap()).collect();
    record.assemble(&groups).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_generation_fits_etcds_default_limits_and_older_groups_are_collected() {
    let etcd = ninelives_testkit::EtcdServer::start().unwrap();
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
    let text = include_str!("../../examples/longcat-2.0.yaml");
    let mut job = ninelives_core::manifest::parse_job(text).unwrap();
    job.spec.topology.nodes = NODES;
    job.spec.topology.spare_nodes = 8;
    let brain = BrainConfig::from_spec(&job.spec).unwrap().for_expert_parallel();
    let keys = Keyspace::default();
    let job_keys = keys.job(NS, JOB);
    let total = NODES + 8;
    // Every node alive with healthy chips.
    let healthy =
        serde_json::to_string(&ChipRecord { state: ChipState::Healthy, code: "ok".into(), since: 1.0 })
            .unwrap();
    let mut puts = Vec::new();
    for n in 0..total {
        puts.push((keys.node_alive(&node(n)), "{}".to_string()));
        for c in 0..8 {
            puts.push((keys.chip(&node(n), c), healthy.clone()));
        }
    }
    put_all(&mut client, puts).await;
    let identity = JobIdentity {
        keys: keys.clone(),
        namespace: NS.into(),
        name: JOB.into(),
        chips_per_node: 8,
        min_healthy_fraction: 0.9,
    };
    let store = EtcdStore::new(client.clone(), keys.clone(), NS, JOB);
    let mut lp = ControlLoop::new(brain, identity, store, None);
    let mut fx =
        Table(RecoveryState::new((0..NODES).map(node).collect(), (NODES..total).map(node).collect()));
    let Progress::Ran(first) = lp.step(&mut fx, 1000.0).await.unwrap() else {
        panic!("generation 1 not published")
    };
    assert_eq!(first.published.len(), 1);
    let plan = &first.published[0];

    let all = everything(&client).await;
    let largest = all.iter().map(|(_, v)| v.len()).max().unwrap();
    assert!(largest <= MAX_VALUE_BYTES, "a {largest} B value in etcd");
    let groups: Vec<&String> =
        all.iter().map(|(k, _)| k).filter(|k| k.starts_with(&job_keys.plan_groups())).collect();
    assert_eq!(groups.len(), 20, "one value per group");
    assert_eq!(read_plan(&all, &job_keys), *plan, "the plan reads back bit for bit");

    // A leftover group value (a fenced writer's, an older generation's) stays while generation 1
    // has not settled, and is collected once every member joined it.
    let stray = job_keys.plan_group(3, "00000000deadbeef");
    client.put(stray.as_str(), "{}", None).await.unwrap();
    lp.step(&mut fx, 1000.5).await.unwrap();
    assert_eq!(client.get(stray.as_str(), None).await.unwrap().kvs().len(), 1, "collected before settling");
    let ack = serde_json::to_string(&MemberAck { step: 0, generation: Some(1) }).unwrap();
    let mut joined = Vec::new();
    for r in 0..NODES {
        joined.push((job_keys.member(r), format!(r#"{{"rank":{r},"addr":"127.0.0.1:1","pid":1}}"#)));
        joined.push((job_keys.ack(1, &r.to_string()), ack.clone()));
    }
    put_all(&mut client, joined).await;
    lp.step(&mut fx, 1001.0).await.unwrap();
    assert!(client.get(stray.as_str(), None).await.unwrap().kvs().is_empty(), "the stray group value stayed");
    let left = client
        .get(job_keys.plan_groups(), Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    assert_eq!(left.kvs().len(), 20, "the generation in force kept its groups");
}
