//! Least privilege on a real etcd with authentication on (issue 23): the roles of
//! `ninelives_core::access`, applied by `ninelives_control::access`, let a job's workers write
//! only their job's member keys and an agent only its own node's keys.

#![allow(clippy::unwrap_used)] // test: a panic is the failure report

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use ninelives_control::access::{enable_auth, ensure_role, ensure_user};
use ninelives_core::access::{OPERATOR_USER, agent_user, worker_user};
use ninelives_core::keyspace::Keyspace;
use ninelives_testkit::EtcdServer;

async fn connect_as(endpoint: &str, user: &str, password: &str) -> Client {
    let options = ConnectOptions::new().with_user(user, password);
    Client::connect([endpoint], Some(options)).await.unwrap()
}

fn denied(result: Result<etcd_client::PutResponse, etcd_client::Error>) -> bool {
    matches!(result, Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::PermissionDenied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_worker_cannot_write_another_jobs_keys_or_a_chip_state_and_an_agent_only_its_node() {
    let etcd = EtcdServer::start().unwrap();
    let ep = etcd.endpoint();
    let ks = Keyspace::default();
    let (a, b) = (ks.job("team", "a"), ks.job("team", "b"));

    let mut setup = Client::connect([ep.as_str()], None).await.unwrap();
    enable_auth(&mut setup, "root-secret").await.unwrap();
    assert!(setup.put(a.progress(), "{}", None).await.is_err(), "auth is on: anonymous writes fail");
    let mut root = connect_as(&ep, "root", "root-secret").await;
    let (role_a, role_b) = (ks.worker_role("team", "a"), ks.worker_role("team", "b"));
    ensure_user(&mut root, &worker_user("team", "a"), Some("pw-a"), &[&role_a]).await.unwrap();
    ensure_user(&mut root, &worker_user("team", "b"), Some("pw-b"), &[&role_b]).await.unwrap();
    let agent_roles = [&ks.agent_role("node-1"), &ks.agent_job_role("team", "a")];
    ensure_user(&mut root, &agent_user("node-1"), Some("pw-n1"), &agent_roles).await.unwrap();
    ensure_user(&mut root, OPERATOR_USER, Some("pw-op"), &[&ks.operator_role()]).await.unwrap();
    // Applying again changes nothing and fails nothing (the operator reconciles repeatedly).
    ensure_user(&mut root, &worker_user("team", "a"), Some("pw-a"), &[&role_a]).await.unwrap();
    assert_eq!(root.role_get(role_a.name.as_str()).await.unwrap().permissions().len(), role_a.grants.len());

    // The operator publishes the generation and a chip state exists.
    let mut operator = connect_as(&ep, OPERATOR_USER, "pw-op").await;
    for key in [a.placement(), b.placement()] {
        operator.put(key, "{\"generation\":1}", None).await.unwrap();
    }
    operator.put(ks.chip("node-2", 0), "{\"state\":\"healthy\"}", None).await.unwrap();

    // A worker of job A does what a member does...
    let mut worker = connect_as(&ep, &worker_user("team", "a"), "pw-a").await;
    let lease = worker.lease_grant(5, None).await.unwrap().id();
    worker.put(a.member(0), "{}", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    worker.put(a.ack(1, "0"), "{\"step\":0}", None).await.unwrap();
    worker.put(a.progress(), "{\"step\":1}", None).await.unwrap();
    worker.put(a.checkpoint(2), "{\"step\":2}", None).await.unwrap();
    worker.put(a.peer(0), "{\"generation\":1}", None).await.unwrap();
    worker.delete(a.checkpoint(2), None).await.unwrap();
    assert_eq!(worker.get(a.placement(), None).await.unwrap().kvs().len(), 1);
    let members = worker.get(a.members(), Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(members.kvs().len(), 1);
    worker.lease_revoke(lease).await.unwrap();

    // ...and nothing else: not job B's keys, not its own job's brain records, not a chip.
    for key in [b.member(0), b.progress(), b.ack(1, "0"), b.placement(), b.peer(0)] {
        assert!(denied(worker.put(key.clone(), "{}", None).await), "worker A wrote {key}");
    }
    for key in [a.placement(), a.control(), a.recovery()] {
        assert!(denied(worker.put(key.clone(), "{}", None).await), "worker A wrote {key}");
    }
    for key in [ks.chip("node-2", 0), ks.node_alive("node-2")] {
        assert!(denied(worker.put(key.clone(), "{}", None).await), "worker A wrote {key}");
    }
    assert!(worker.get(b.placement(), None).await.is_err(), "worker A read job B");
    // The brain's records stayed as the operator wrote them.
    let kept = operator.get(ks.chip("node-2", 0), None).await.unwrap();
    assert_eq!(kept.kvs()[0].value(), b"{\"state\":\"healthy\"}");
    let kept = operator.get(b.placement(), None).await.unwrap();
    assert_eq!(kept.kvs()[0].value(), b"{\"generation\":1}");

    // The agent of node-1 reports its own chips and acknowledges job A, and nothing more.
    let mut agent = connect_as(&ep, &agent_user("node-1"), "pw-n1").await;
    agent.put(ks.chip("node-1", 3), "{}", None).await.unwrap();
    agent.put(ks.node_alive("node-1"), "{}", None).await.unwrap();
    agent.put(a.ack(1, "node-1"), "{}", None).await.unwrap();
    assert_eq!(agent.get(a.control(), None).await.unwrap().kvs().len(), 0, "it reads control records");
    for key in [ks.chip("node-2", 0), ks.chip("node-10", 0), a.progress(), a.control(), b.ack(1, "node-1")] {
        assert!(denied(agent.put(key.clone(), "{}", None).await), "agent node-1 wrote {key}");
    }

    // A role that drifted (a grant added by hand) is put back to exactly its definition.
    let extra = etcd_client::Permission::read_write(b.progress());
    root.role_grant_permission(role_a.name.as_str(), extra).await.unwrap();
    ensure_role(&mut root, &role_a).await.unwrap();
    let mut worker = connect_as(&ep, &worker_user("team", "a"), "pw-a").await;
    assert!(denied(worker.put(b.progress(), "{}", None).await), "the extra grant was revoked");
}
