//! Issue 23, etcd least privilege from the operator's side, on a real etcd with authentication
//! on: the users the operator creates for a job can write that job's member keys and nothing of
//! another job or of a node; an agent, authenticated by its node's client certificate, writes
//! only its own node's keys; a new password replaces the old; deleting a job or a Node deletes
//! its user and role.

#![allow(clippy::unwrap_used)] // test: a panic is the failure report

use std::collections::BTreeSet;

use etcd_client::{Client, ConnectOptions, PutOptions};
use ninelives_control::access::enable_auth;
use ninelives_core::access::{agent_user, worker_user};
use ninelives_core::keyspace::Keyspace;
use ninelives_operator::etcd::{Credentials, EtcdConfig};
use ninelives_operator::etcd_auth::{
    AgentUsers, ensure_job_user, random_password, remove_job_user, sync_agent_users,
};
use ninelives_testkit::{EtcdServer, free_port};

const ROOT_PASSWORD: &str = "root-secret";

/// A CA, etcd's serving certificate and one agent certificate per node, made by the chart's
/// own scripts (`scripts/etcd-certs`, `scripts/etcd-agent-cert`).
struct Pki {
    dir: tempfile::TempDir,
    https: String,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
        let ca = dir.path().join("ca");
        let made = std::process::Command::new(scripts.join("etcd-certs"))
            .args(["test", "test"])
            .arg(&ca)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        for node in ["node-1", "node-2"] {
            let made = std::process::Command::new(scripts.join("etcd-agent-cert"))
                .arg(&ca)
                .arg(node)
                .arg(dir.path().join(node))
                .output()
                .unwrap();
            assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        }
        Pki { dir, https: String::new() }
    }

    /// How `node`'s agent reaches etcd: TLS with its own certificate, no password.
    fn agent(&self, node: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.https.clone()],
            ca_file: Some(self.dir.path().join("ca/ca.crt")),
            cert_file: Some(self.dir.path().join(node).join("tls.crt")),
            key_file: Some(self.dir.path().join(node).join("tls.key")),
            ..EtcdConfig::default()
        }
    }
}

async fn connect_as(endpoint: &str, user: &str, password: &str) -> Result<Client, etcd_client::Error> {
    Client::connect([endpoint], Some(ConnectOptions::new().with_user(user, password))).await
}

/// Whether writing `key` was refused for lack of permission (not for any other reason).
async fn denied(client: &mut Client, key: &str) -> bool {
    match client.put(key, "{}", None).await {
        Err(etcd_client::Error::GRpcStatus(s)) => format!("{:?}", s.code()) == "PermissionDenied",
        _ => false,
    }
}

async fn users(root: &mut Client) -> BTreeSet<String> {
    root.user_list().await.unwrap().users().iter().cloned().collect()
}

async fn roles(root: &mut Client) -> BTreeSet<String> {
    root.role_list().await.unwrap().roles().iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_operators_users_confine_each_job_to_its_keys_and_each_agent_to_its_node() {
    let tls = Pki::new();
    let https = format!("https://127.0.0.1:{}", free_port().unwrap());
    // Plain text for the operator (root, by password) and a TLS listener whose client
    // certificates' CNs are users (the agents).
    let etcd = EtcdServer::start_with_client_url_args(|http| {
        let ca = tls.dir.path().join("ca");
        vec![
            format!("--listen-client-urls={http},{https}"),
            format!("--advertise-client-urls={http},{https}"),
            format!("--cert-file={}", ca.join("server.crt").display()),
            format!("--key-file={}", ca.join("server.key").display()),
            format!("--trusted-ca-file={}", ca.join("ca.crt").display()),
            "--client-cert-auth".into(),
        ]
    })
    .unwrap();
    let tls = Pki { https, ..tls };
    let ep = etcd.endpoint();
    let ks = Keyspace::default();
    let (a, b) = (ks.job("team", "a"), ks.job("team", "b"));
    let mut setup = Client::connect([ep.as_str()], None).await.unwrap();
    enable_auth(&mut setup, ROOT_PASSWORD).await.unwrap();

    // The operator connects with its configured credentials (password never in Debug output).
    let config = EtcdConfig {
        endpoints: vec![ep.clone()],
        prefix: ks.prefix().to_string(),
        credentials: Some(Credentials { user: "root".into(), password: ROOT_PASSWORD.into() }),
        ..EtcdConfig::default()
    };
    assert!(!format!("{config:?}").contains(ROOT_PASSWORD));
    let mut root = config.connect().await.unwrap();
    let no_credentials = EtcdConfig { credentials: None, ..config.clone() };
    let mut anonymous = no_credentials.connect().await.unwrap();
    assert!(anonymous.put(a.progress(), "{}", None).await.is_err(), "auth is on");

    // The job's user, as the reconcile creates it (twice: every reconcile runs it).
    let (pw_a, pw_b) = (random_password().unwrap(), random_password().unwrap());
    for _ in 0..2 {
        ensure_job_user(&mut root, &ks, "team", "a", &pw_a).await.unwrap();
    }
    ensure_job_user(&mut root, &ks, "team", "b", &pw_b).await.unwrap();
    let role_a = ks.worker_role("team", "a");
    assert_eq!(root.role_get(role_a.name.as_str()).await.unwrap().permissions().len(), role_a.grants.len());
    root.put(a.placement(), "{\"generation\":1}", None).await.unwrap();
    root.put(ks.chip("node-2", 0), "{\"state\":\"healthy\"}", None).await.unwrap();

    // Job A's worker writes its member keys...
    let mut worker = connect_as(&ep, &worker_user("team", "a"), &pw_a).await.unwrap();
    let lease = worker.lease_grant(5, None).await.unwrap().id();
    worker.put(a.member(0), "{}", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    worker.put(a.progress(), "{\"step\":1}", None).await.unwrap();
    worker.put(a.ack(1, "0"), "{}", None).await.unwrap();
    assert_eq!(worker.get(a.placement(), None).await.unwrap().kvs().len(), 1);
    // ...and cannot write another job's keys, its own brain records or a chip state.
    for key in [b.member(0), b.progress(), b.placement(), a.placement(), a.control(), a.recovery()] {
        assert!(denied(&mut worker, &key).await, "worker A wrote {key}");
    }
    for key in [ks.chip("node-2", 0), ks.node_alive("node-2")] {
        assert!(denied(&mut worker, &key).await, "worker A wrote {key}");
    }
    let chip = root.get(ks.chip("node-2", 0), None).await.unwrap();
    assert_eq!(chip.kvs()[0].value(), b"{\"state\":\"healthy\"}");

    // Ensuring the same password again (an operator failover) keeps the members' sessions.
    ensure_job_user(&mut root, &ks, "team", "a", &pw_a).await.unwrap();
    worker.put(a.progress(), "{\"step\":2}", None).await.unwrap();

    // A recreated Secret's new password replaces the old one; sessions under the old end.
    let rotated = random_password().unwrap();
    ensure_job_user(&mut root, &ks, "team", "a", &rotated).await.unwrap();
    let old_session = worker.put(a.progress(), "{\"step\":3}", None).await;
    assert!(connect_as(&ep, &worker_user("team", "a"), &pw_a).await.is_err(), "the old password still works");
    let mut worker = connect_as(&ep, &worker_user("team", "a"), &rotated).await.unwrap();
    worker.put(a.progress(), "{\"step\":3}", None).await.unwrap();
    // (Why the operator never rewrites a password etcd already accepts.)
    assert!(
        matches!(&old_session, Err(etcd_client::Error::GRpcStatus(s)) if format!("{:?}", s.code()) == "Unauthenticated"),
        "a session under the old password survived the change: {old_session:?}"
    );

    // Agents: one user per Node, created once, without a password: each agent is its node's
    // client certificate (CN ninelives-agent:<node>, made by the chart's scripts).
    let nodes: BTreeSet<String> = ["node-1", "node-2"].map(String::from).into();
    let changed = sync_agent_users(&mut root, &ks, &nodes).await.unwrap();
    assert_eq!(changed.added, ["node-1", "node-2"]);
    assert_eq!(sync_agent_users(&mut root, &ks, &nodes).await.unwrap(), AgentUsers::default());
    assert!(connect_as(&ep, &agent_user("node-1"), "").await.is_err(), "no password to guess");
    let mut agent = tls.agent("node-1").connect().await.unwrap();
    agent.put(ks.node_alive("node-1"), "{}", None).await.unwrap();
    agent.put(ks.chip("node-1", 3), "{\"state\":\"healthy\"}", None).await.unwrap();
    for key in
        [ks.chip("node-2", 0), ks.node_alive("node-2"), ks.chip("node-10", 0), a.progress(), a.member(0)]
    {
        assert!(denied(&mut agent, &key).await, "agent node-1 wrote {key}");
    }
    let chip = root.get(ks.chip("node-2", 0), None).await.unwrap();
    assert_eq!(chip.kvs()[0].value(), b"{\"state\":\"healthy\"}", "node-2's chip untouched");
    let mut agent_2 = tls.agent("node-2").connect().await.unwrap();
    agent_2.put(ks.chip("node-2", 0), "{\"state\":\"faulty\"}", None).await.unwrap();
    assert!(denied(&mut agent_2, &ks.chip("node-1", 3)).await, "agent node-2 wrote node-1's chip");

    // A Node that is gone loses its user and role.
    let left: BTreeSet<String> = ["node-1".to_string()].into();
    let changed = sync_agent_users(&mut root, &ks, &left).await.unwrap();
    assert_eq!((changed.added.len(), changed.removed.as_slice()), (0, &["node-2".to_string()][..]));
    assert!(!users(&mut root).await.contains(&agent_user("node-2")));
    assert!(!roles(&mut root).await.contains(&ks.agent_role("node-2").name));

    // Deleting job A deletes its user and role (twice: the cleanup may be retried); B keeps its.
    for _ in 0..2 {
        remove_job_user(&mut root, &ks, "team", "a").await.unwrap();
    }
    assert!(connect_as(&ep, &worker_user("team", "a"), &rotated).await.is_err());
    assert!(!roles(&mut root).await.contains(&role_a.name));
    let mut worker_b = connect_as(&ep, &worker_user("team", "b"), &pw_b).await.unwrap();
    worker_b.put(b.progress(), "{}", None).await.unwrap();

    // The cleanup of the job's keys works under the operator's credentials.
    assert!(config.delete_job_keys("team", "a").await.unwrap() >= 3);
}
