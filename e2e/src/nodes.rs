//! A test-only node runner: it stands in for kube-scheduler and the kubelets.
//!
//! It registers fake Nodes, binds pending Pods to them (honouring nodeSelector, the default
//! scheduler name and one-pod-per-node anti-affinity), runs each bound Pod's container as a
//! local process (command, args and env, with downward-API fields and `$(VAR)` expansion
//! resolved; no images), and reports the Pod's phase and container state back through the API.
//! Killing a process is therefore a real pod failure, and deleting a Pod kills its process.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Binding, Container, Node, NodeCondition, NodeStatus, ObjectReference, Pod, Secret,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::Result;

/// Why a pod's process is being stopped.
#[derive(Debug)]
enum Stop {
    /// The Pod is being deleted: kill quietly, then finish the deletion.
    Delete,
    /// Simulated crash: kill, and report the Pod Failed like a kubelet would.
    Crash,
}

type Running = Arc<Mutex<HashMap<String, oneshot::Sender<Stop>>>>;

/// The fake nodes and the processes of the pods bound to them; everything stops on drop.
pub struct NodeRunner {
    task: JoinHandle<()>,
    running: Running,
    lost: Lost,
}

/// Nodes that are gone: nothing is bound to or started on them any more.
type Lost = Arc<Mutex<std::collections::BTreeSet<String>>>;

#[derive(Clone)]
struct Runtime {
    client: Client,
    nodes: Vec<String>,
    lost: Lost,
    bin_dir: PathBuf,
    work_dir: PathBuf,
    running: Running,
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

impl NodeRunner {
    /// Registers `nodes` (Ready, labelled `kubernetes.io/hostname`) and starts running pods.
    /// `bin_dir` is put first on the processes' `PATH`, so a container command `ninelives`
    /// runs the binary under test; `work_dir` holds each pod's working directory and log.
    pub async fn start(client: Client, nodes: &[String], bin_dir: &Path, work_dir: &Path) -> Result<Self> {
        let api: Api<Node> = Api::all(client.clone());
        for name in nodes {
            let node = Node {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([("kubernetes.io/hostname".to_string(), name.clone())])),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            };
            api.patch(name, &PatchParams::apply("ninelives-e2e-node").force(), &Patch::Apply(&node)).await?;
            let capacity = BTreeMap::from([
                ("cpu".to_string(), Quantity("64".into())),
                ("memory".to_string(), Quantity("256Gi".into())),
                ("pods".to_string(), Quantity("110".into())),
            ]);
            let status = NodeStatus {
                capacity: Some(capacity.clone()),
                allocatable: Some(capacity),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: Some("E2eNodeRunner".into()),
                    message: Some("pods run as local processes".into()),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            };
            let patch = serde_json::json!({ "status": status });
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        std::fs::create_dir_all(work_dir)?;
        let running = Running::default();
        let lost = Lost::default();
        let runtime = Runtime {
            client,
            nodes: nodes.to_vec(),
            lost: lost.clone(),
            bin_dir: bin_dir.to_path_buf(),
            work_dir: work_dir.to_path_buf(),
            running: running.clone(),
        };
        let task = tokio::spawn(runtime.run());
        Ok(Self { task, running, lost })
    }

    /// Kills the process of pod `namespace/name` as a crash would; the Pod becomes Failed.
    /// Returns false when no such process runs.
    pub fn crash(&self, namespace: &str, name: &str) -> bool {
        let sender =
            self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&format!("{namespace}/{name}"));
        sender.is_some_and(|s| s.send(Stop::Crash).is_ok())
    }

    /// Loses node `name` as a machine dies: from now on nothing is bound to it or started on it
    /// (its pods' processes are the caller's to crash). A real kubelet of a dead node starts
    /// nothing either, so a restart the operator orders there waits, as it would in a cluster.
    pub fn lose(&self, name: &str) {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
    }

    /// Pods whose processes are running now (`namespace/name`).
    pub fn running_pods(&self) -> Vec<String> {
        let mut keys: Vec<String> =
            self.running.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        keys.sort();
        keys
    }
}

impl Drop for NodeRunner {
    fn drop(&mut self) {
        self.task.abort();
        // Dropping the senders stops every process (each is spawned with kill_on_drop).
        let senders: Vec<_> = self.running.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (_, sender) in senders {
            let _ = sender.send(Stop::Delete);
        }
    }
}

impl Runtime {
    async fn run(self) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let mut stream = watcher::watcher(pods.clone(), watcher::Config::default()).boxed();
        // Pods that found no free node are retried periodically, as the scheduler's queue does.
        let mut retry = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = retry.tick() => {
                    self.schedule_pending(&pods).await;
                    continue;
                }
            };
            let Some(event) = event else { break };
            match event {
                Ok(Event::Apply(pod) | Event::InitApply(pod)) => {
                    if let Err(e) = self.handle(pod).await {
                        warn!(error = %e, "node runner");
                    }
                }
                Ok(Event::Delete(pod)) => self.stop(&key(&pod), Stop::Delete),
                Ok(Event::Init | Event::InitDone) => {}
                Err(e) => {
                    warn!(error = %e, "node runner watch");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn schedule_pending(&self, pods: &Api<Pod>) {
        let unbound = kube::api::ListParams::default().fields("spec.nodeName=");
        let Ok(list) = pods.list(&unbound).await else { return };
        for pod in list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            if let Err(e) = self.schedule(&api, &pod).await {
                warn!(error = %e, "scheduling");
            }
        }
    }

    fn stop(&self, key: &str, why: Stop) {
        let sender = self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        if let Some(sender) = sender {
            let _ = sender.send(why);
        }
    }

    async fn handle(&self, pod: Pod) -> Result<()> {
        let namespace = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let spec = pod.spec.clone().unwrap_or_default();
        let node = spec.node_name.clone();
        let ours = node.as_ref().is_some_and(|n| self.nodes.contains(n) && !self.is_lost(n));

        if pod.metadata.deletion_timestamp.is_some() {
            if ours {
                // What the kubelet does: stop the containers, then remove the object for good.
                self.stop(&key(&pod), Stop::Delete);
                let _ = api.delete(&pod.name_any(), &DeleteParams::default().grace_period(0)).await;
            }
            return Ok(());
        }
        let Some(node) = node else {
            return self.schedule(&api, &pod).await;
        };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let started = self.running.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&key(&pod));
        if ours && phase == "Pending" && !started {
            self.launch(api, pod, &node).await?;
        }
        Ok(())
    }

    fn is_lost(&self, node: &str) -> bool {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).contains(node)
    }

    /// Binds `pod` to a node that satisfies its nodeSelector and hosts no pod of the same job.
    async fn schedule(&self, api: &Api<Pod>, pod: &Pod) -> Result<()> {
        let spec = pod.spec.clone().unwrap_or_default();
        if spec.scheduler_name.as_deref().is_some_and(|s| s != "default-scheduler") {
            return Ok(()); // another scheduler's pod: stays Pending, as on a real cluster
        }
        if spec.node_selector.as_ref().is_some_and(|sel| {
            sel.iter().any(|(k, v)| k != "kubernetes.io/hostname" || !self.nodes.contains(v))
        }) {
            return Ok(());
        }
        let job = pod.labels().get("ninelives.io/job").cloned();
        let all: Api<Pod> = Api::all(self.client.clone());
        let placed = all.list(&Default::default()).await?.items;
        let taken: Vec<String> = placed
            .iter()
            .filter(|p| job.is_some() && p.labels().get("ninelives.io/job") == job.as_ref())
            .filter(|p| p.namespace() == pod.namespace())
            .filter(|p| {
                !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
            })
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        // A pod pinned by hostname (the operator moving a rank to a spare) goes there or nowhere.
        let pinned = spec.node_selector.as_ref().and_then(|sel| sel.get("kubernetes.io/hostname"));
        let Some(node) = self
            .nodes
            .iter()
            .filter(|n| pinned.is_none_or(|p| p == *n) && !self.is_lost(n))
            .find(|n| !taken.contains(n))
        else {
            return Ok(()); // unschedulable for now; retried on the next pod event
        };
        let binding = Binding {
            metadata: ObjectMeta { name: Some(pod.name_any()), ..ObjectMeta::default() },
            target: ObjectReference {
                kind: Some("Node".into()),
                name: Some(node.clone()),
                api_version: Some("v1".into()),
                ..ObjectReference::default()
            },
        };
        match api
            .create_subresource::<Binding, serde_json::Value>(
                "binding",
                &pod.name_any(),
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => info!(pod = %key(pod), node = %node, "bound"),
            Err(e) => warn!(pod = %key(pod), error = %e, "binding"),
        }
        Ok(())
    }

    /// The values of the container's `secretKeyRef` variables, by variable name (a missing
    /// Secret or key leaves the variable unset, as a kubelet would refuse to start it).
    async fn secret_values(&self, pod: &Pod, container: &Container) -> BTreeMap<String, String> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let mut out = BTreeMap::new();
        for var in container.env.iter().flatten() {
            let Some(selector) = var.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) else {
                continue;
            };
            let Ok(Some(secret)) = secrets.get_opt(&selector.name).await else { continue };
            let from_data = secret.data.as_ref().and_then(|d| d.get(&selector.key)).map(|b| b.0.clone());
            let from_text = secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&selector.key))
                .map(|t| t.clone().into_bytes());
            if let Some(value) = from_data.or(from_text).and_then(|b| String::from_utf8(b).ok()) {
                out.insert(var.name.clone(), value);
            }
        }
        out
    }

    async fn launch(&self, api: Api<Pod>, pod: Pod, node: &str) -> Result<()> {
        let spec = pod.spec.clone().unwrap_or_default();
        let Some(container) = spec.containers.first().cloned() else { return Ok(()) };
        let secrets = self.secret_values(&pod, &container).await;
        let env = resolve_env(&pod, &container, node, &secrets);
        let expand = |s: &String| expand_vars(s, &env);
        let mut words: Vec<String> = container.command.iter().flatten().map(expand).collect();
        words.extend(container.args.iter().flatten().map(expand));
        if words.is_empty() {
            return Ok(());
        }
        let dir = self.work_dir.join(format!(
            "{}_{}_{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any(),
            pod.uid().unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("container.log"))?;
        let path = format!("{}:{}", self.bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut command = Command::new(&words[0]);
        command
            .args(&words[1..])
            .env_clear()
            .env("PATH", path)
            .env("HOME", &dir)
            .envs(env.iter())
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let now = Timestamp::now().to_string();
        let (child, failure) = match command.spawn() {
            Ok(child) => (Some(child), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let Some(mut child) = child else {
            let message = failure.unwrap_or_default();
            report(
                &api,
                &pod.name_any(),
                &container.name,
                Outcome::Exited { code: 127, reason: "StartError", message },
            )
            .await;
            return Ok(());
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(key(&pod), stop_tx);
        report(&api, &pod.name_any(), &container.name, Outcome::Running { started: now }).await;
        info!(pod = %key(&pod), node = %node, command = ?words, "started");

        let running = self.running.clone();
        let pod_key = key(&pod);
        let name = pod.name_any();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                status = child.wait() => {
                    let code = status.ok().and_then(|s| s.code()).unwrap_or(137);
                    let reason = if code == 0 { "Completed" } else { "Error" };
                    Some(Outcome::Exited { code, reason, message: String::new() })
                }
                stop = stop_rx => {
                    let _ = child.kill().await;
                    match stop {
                        Ok(Stop::Crash) => Some(Outcome::Exited { code: 137, reason: "Error", message: "killed by the e2e harness".into() }),
                        Ok(Stop::Delete) | Err(_) => None,
                    }
                }
            };
            running.lock().unwrap_or_else(|p| p.into_inner()).remove(&pod_key);
            if let Some(outcome) = outcome {
                report(&api, &name, &container.name, outcome).await;
            }
        });
        Ok(())
    }
}

/// What a container did, as reported in the Pod's status.
enum Outcome {
    Running { started: String },
    Exited { code: i32, reason: &'static str, message: String },
}

async fn report(api: &Api<Pod>, pod: &str, container: &str, outcome: Outcome) {
    let now = Timestamp::now().to_string();
    let (phase, ready, state) = match outcome {
        Outcome::Running { started } => {
            ("Running", true, serde_json::json!({ "running": { "startedAt": started } }))
        }
        Outcome::Exited { code, reason, message } => (
            if code == 0 { "Succeeded" } else { "Failed" },
            false,
            serde_json::json!({ "terminated": { "exitCode": code, "reason": reason, "message": message, "finishedAt": now } }),
        ),
    };
    let flag = if ready { "True" } else { "False" };
    let patch = serde_json::json!({
        "status": {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": now,
            "conditions": [
                { "type": "PodScheduled", "status": "True", "lastTransitionTime": now },
                { "type": "Initialized", "status": "True", "lastTransitionTime": now },
                { "type": "ContainersReady", "status": flag, "lastTransitionTime": now },
                { "type": "Ready", "status": flag, "lastTransitionTime": now },
            ],
            "containerStatuses": [{
                "name": container, "ready": ready, "restartCount": 0, "started": ready,
                "image": "local-process", "imageID": "", "state": state,
            }],
        }
    });
    if let Err(e) = api.patch_status(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
        warn!(pod, error = %e, "reporting pod status");
    }
}

/// The container's environment with downward-API `fieldRef`s and `secretKeyRef`s (`secrets`:
/// values by variable name, read by the kubelet's part) resolved.
fn resolve_env(
    pod: &Pod,
    container: &Container,
    node: &str,
    secrets: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        if let Some(value) = secrets.get(&var.name) {
            env.insert(var.name.clone(), value.clone());
            continue;
        }
        let value = match (&var.value, var.value_from.as_ref().and_then(|v| v.field_ref.as_ref())) {
            (Some(value), _) => expand_vars(value, &env),
            (None, Some(field)) => match field.field_path.as_str() {
                "spec.nodeName" => node.to_string(),
                "metadata.name" => pod.name_any(),
                "metadata.namespace" => pod.namespace().unwrap_or_default(),
                "metadata.uid" => pod.uid().unwrap_or_default(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                _ => String::new(),
            },
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    env
}

/// Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` escapes, the rest stays.
pub fn expand_vars(input: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(value) = env.get(&inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env = BTreeMap::from([("NODE".to_string(), "n1".to_string())]);
        assert_eq!(expand_vars("--node $(NODE)", &env), "--node n1");
        assert_eq!(expand_vars("$$(NODE) $(MISSING) $x", &env), "$(NODE) $(MISSING) $x");
    }
}
