//! The node agent against the real kube-apiserver: a chip fault becomes the Node condition
//! `NinelivesChipsHealthy=False` and the `ninelives.io/chip-fault` taint, and clears again.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use ninelives_e2e::{Harness, tools, wait_for};

/// The agent process, killed when dropped (also on panic).
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chip_state(node: &Node) -> (Option<String>, Option<String>) {
    let condition = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "NinelivesChipsHealthy"))
        .map(|c| c.status.clone());
    let taint = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .and_then(|ts| ts.iter().find(|t| t.key == "ninelives.io/chip-fault"))
        .map(|t| t.effect.clone());
    (condition, taint)
}

#[tokio::test]
async fn chip_faults_reach_the_node_condition_and_taint() {
    let h = Harness::start(1).await.expect("control plane");
    let ninelives = tools::ninelives().unwrap();
    let chips = tempfile::tempdir().unwrap();
    let chips_dir = chips.path().to_str().unwrap().to_string();
    let _agent = AgentProcess(
        Command::new(&ninelives)
            .args(["agent", "run", "--node", "node-0", "--etcd", &h.plane.etcd.endpoint()])
            .args(["--chips-dir", &chips_dir, "--simulate", "8", "--ttl", "3", "--kube"])
            .env("KUBECONFIG", h.plane.kubeconfig())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let nodes: Api<Node> = Api::all(h.client.clone());
    let state = || async { nodes.get("node-0").await.ok().map(|n| chip_state(&n)) };

    wait_for("a healthy chip condition", Duration::from_secs(30), || async {
        (state().await == Some((Some("True".into()), None))).then_some(())
    })
    .await
    .expect("agent never reported healthy chips on the Node");

    let inject = Command::new(&ninelives)
        .args(["agent", "inject", "--chips-dir", &chips_dir, "3", "ecc"])
        .output()
        .unwrap();
    assert!(inject.status.success(), "{}", String::from_utf8_lossy(&inject.stderr));
    wait_for("the fault on the Node", Duration::from_secs(20), || async {
        (state().await == Some((Some("False".into()), Some("NoSchedule".into())))).then_some(())
    })
    .await
    .expect("chip fault never became condition False + taint");

    let recover = Command::new(&ninelives)
        .args(["agent", "inject", "--chips-dir", &chips_dir, "3", "recover"])
        .output()
        .unwrap();
    assert!(recover.status.success(), "{}", String::from_utf8_lossy(&recover.stderr));
    wait_for("the Node to heal", Duration::from_secs(20), || async {
        (state().await == Some((Some("True".into()), None))).then_some(())
    })
    .await
    .expect("recovered chip never cleared the condition and taint");
}
