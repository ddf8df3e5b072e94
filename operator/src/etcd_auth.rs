//! etcd least privilege from the operator's side (issue 23), when etcd's authentication is on
//! (`--etcd-auth`):
//!
//! - every job gets an etcd user ([`ninelives_core::access::worker_user`]) holding its worker
//!   role (write only the job's member keys), with a random password kept in a Secret owned by
//!   the job ([`crate::resources::etcd_credentials_secret`]); its worker pods read it through a
//!   `secretKeyRef`. A missing or unusable Secret is recreated with a new password, which is
//!   then set in etcd; a password changed in the Secret by hand (a rotation) is set in etcd on
//!   the next reconcile. Deleting the job deletes its user and role (the finalizer's cleanup);
//! - every Node gets an agent user ([`ninelives_core::access::agent_user`]) holding its agent
//!   role (write only `nodes/<node>/`), without a password: etcd authenticates agents by the
//!   common name of the client certificate each node is provisioned with (docs/cluster.md). A
//!   Node's user and role are deleted once the Node is gone.
//!
//! Every change of etcd's users and roles bumps its auth revision, which invalidates the tokens
//! of every client using JWT tokens; so each step writes only what differs, and a job's password
//! is set once per operator term unless its Secret changes ([`Identities`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use ninelives_control::access::{add_user, ensure_user, remove_user, users_with_prefix};
use ninelives_core::TrainingJob;
use ninelives_core::access::{agent_user, worker_user};
use ninelives_core::keyspace::Keyspace;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::etcd::SharedEtcd;
use crate::resources::{ETCD_PASSWORD_DATA, etcd_credentials_secret, job_labels, owner_reference};

/// How often the agents' users are reconciled with the cluster's Nodes.
pub const AGENT_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// Longest password accepted from a Secret: etcd hashes passwords with bcrypt, which refuses
/// more than 72 bytes.
const MAX_PASSWORD_BYTES: usize = 72;

/// A fresh password: 32 random bytes as 64 hex digits.
pub fn random_password() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The job's credentials Secret holding `password`, owned by the job (deleted with it).
pub fn desired_credentials_secret(job: &TrainingJob, password: &str) -> Result<Secret> {
    let name = job.name_any();
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(etcd_credentials_secret(&name)),
            namespace: job.namespace(),
            labels: Some(job_labels(&name)),
            owner_references: Some(vec![owner_reference(job)?]),
            ..ObjectMeta::default()
        },
        string_data: Some([(ETCD_PASSWORD_DATA.to_string(), password.to_string())].into()),
        type_: Some("Opaque".into()),
        ..Secret::default()
    })
}

/// The password a Secret holds, if it is one etcd accepts (1 to 72 printable ASCII bytes).
pub fn secret_password(secret: &Secret) -> Option<String> {
    let ByteString(bytes) = secret.data.as_ref()?.get(ETCD_PASSWORD_DATA)?;
    let usable =
        !bytes.is_empty() && bytes.len() <= MAX_PASSWORD_BYTES && bytes.iter().all(|b| b.is_ascii_graphic());
    usable.then(|| String::from_utf8(bytes.clone()).ok()).flatten()
}

/// Which job passwords this operator term has set in etcd: job key → digest of (job UID,
/// password). A reconcile finding the same digest leaves etcd alone.
#[derive(Default)]
pub struct Identities {
    applied: Mutex<HashMap<String, [u8; 32]>>,
}

fn digest(uid: &str, password: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(uid.as_bytes());
    hash.update([0]);
    hash.update(password.as_bytes());
    hash.finalize().into()
}

impl Identities {
    fn is_applied(&self, key: &str, digest: &[u8; 32]) -> bool {
        self.applied.lock().is_ok_and(|a| a.get(key) == Some(digest))
    }

    fn set_applied(&self, key: &str, digest: [u8; 32]) {
        if let Ok(mut applied) = self.applied.lock() {
            applied.insert(key.to_string(), digest);
        }
    }

    fn forget(&self, key: &str) {
        if let Ok(mut applied) = self.applied.lock() {
            applied.remove(key);
        }
    }
}

fn etcd_failed(e: ninelives_control::ControlError) -> Error {
    Error::EtcdIdentity(e)
}

/// Makes job `namespace/name`'s etcd user exist with its worker role and `password`. The
/// password is written only when it is not already the user's: etcd drops every session of a
/// user whose password changes, which would cut a running job's members off.
pub async fn ensure_job_user(
    client: &mut Client,
    keyspace: &Keyspace,
    namespace: &str,
    name: &str,
    password: &str,
) -> Result<()> {
    let role = keyspace.worker_role(namespace, name);
    let user = worker_user(namespace, name);
    let current = client.auth_client().authenticate(user.clone(), password.to_string()).await.is_ok();
    let set = (!current).then_some(password);
    ensure_user(client, &user, set, &[&role]).await.map_err(etcd_failed)
}

/// Deletes job `namespace/name`'s etcd user and role (nothing when already gone).
pub async fn remove_job_user(
    client: &mut Client,
    keyspace: &Keyspace,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let role = keyspace.worker_role(namespace, name);
    remove_user(client, &worker_user(namespace, name), &[role.name.as_str()]).await.map_err(etcd_failed)
}

/// The job's password: the one in its Secret, or a new one in a Secret created (or replacing an
/// unusable one) now.
async fn job_password(job: &TrainingJob, secrets: &Api<Secret>) -> Result<String> {
    let name = etcd_credentials_secret(&job.name_any());
    let current = secrets.get_opt(&name).await.map_err(|source| Error::Read { what: "secret", source })?;
    if let Some(password) = current.as_ref().and_then(secret_password) {
        return Ok(password);
    }
    if current.is_some() {
        warn!(secret = %name, "etcd credentials Secret holds no usable password; replacing it");
        secrets
            .delete(&name, &DeleteParams::default())
            .await
            .map_err(|source| Error::Apply { what: format!("delete secret {name}"), source })?;
    }
    let password = random_password()?;
    let secret = desired_credentials_secret(job, &password)?;
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(password),
        // Another reconcile created it first: its password is the one.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let theirs =
                secrets.get_opt(&name).await.map_err(|source| Error::Read { what: "secret", source })?;
            theirs.as_ref().and_then(secret_password).ok_or_else(|| Error::Apply {
                what: format!("secret {name}"),
                source: kube::Error::Api(status),
            })
        }
        Err(source) => Err(Error::Apply { what: format!("secret {name}"), source }),
    }
}

/// The job's etcd identity before its pods start: the credentials Secret, then the user and
/// role in etcd with the Secret's password (skipped when this term already set that password).
pub async fn apply_job_identity(
    job: &TrainingJob,
    kube: &kube::Client,
    etcd: &SharedEtcd,
    identities: &Identities,
) -> Result<()> {
    let namespace = job.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = job.name_any();
    let uid = job.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &namespace);
    let password = job_password(job, &secrets).await?;
    let key = format!("{namespace}/{name}");
    let wanted = digest(&uid, &password);
    if identities.is_applied(&key, &wanted) {
        return Ok(());
    }
    let mut client = etcd.client().await?;
    let keyspace = Keyspace::new(&etcd.config.prefix);
    if let Err(e) = ensure_job_user(&mut client, &keyspace, &namespace, &name, &password).await {
        etcd.reconnect();
        return Err(e);
    }
    identities.set_applied(&key, wanted);
    info!(job = %key, user = %worker_user(&namespace, &name), "etcd worker user ready");
    Ok(())
}

/// Deletes the job's etcd user and role (its Secret goes with the job).
pub async fn remove_job_identity(
    namespace: &str,
    name: &str,
    etcd: &SharedEtcd,
    identities: &Identities,
) -> Result<()> {
    let mut client = etcd.client().await?;
    let keyspace = Keyspace::new(&etcd.config.prefix);
    if let Err(e) = remove_job_user(&mut client, &keyspace, namespace, name).await {
        etcd.reconnect();
        return Err(e);
    }
    identities.forget(&format!("{namespace}/{name}"));
    Ok(())
}

/// What one [`sync_agent_users`] pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentUsers {
    /// Nodes whose agent user was created.
    pub added: Vec<String>,
    /// Agent users deleted because their node is gone.
    pub removed: Vec<String>,
}

/// Makes exactly `nodes` have an agent user (no password: certificate identity) with their agent
/// role: creates those missing, deletes those of nodes that are gone. Existing users are left
/// as they are (one user list per pass, whatever the number of nodes).
pub async fn sync_agent_users(
    client: &mut Client,
    keyspace: &Keyspace,
    nodes: &BTreeSet<String>,
) -> Result<AgentUsers> {
    const PREFIX: &str = "ninelives-agent:";
    let existing: BTreeSet<String> =
        users_with_prefix(client, PREFIX).await.map_err(etcd_failed)?.into_iter().collect();
    let mut changed = AgentUsers::default();
    for node in nodes {
        let user = agent_user(node);
        if existing.contains(&user) {
            continue;
        }
        let role = keyspace.agent_role(node);
        // Half-created by an interrupted pass (the role exists): the idempotent path repairs.
        if add_user(client, &user, None, &[&role]).await.is_err() {
            ensure_user(client, &user, None, &[&role]).await.map_err(etcd_failed)?;
        }
        changed.added.push(node.clone());
    }
    let wanted: BTreeSet<String> = nodes.iter().map(|n| agent_user(n)).collect();
    for user in existing.difference(&wanted) {
        let Some(node) = user.strip_prefix(PREFIX) else { continue };
        let role = keyspace.agent_role(node);
        remove_user(client, user, &[role.name.as_str()]).await.map_err(etcd_failed)?;
        changed.removed.push(node.to_string());
    }
    Ok(changed)
}

/// One pass: the cluster's Nodes, then [`sync_agent_users`].
async fn sync_agents_once(kube: &kube::Client, etcd: &SharedEtcd) -> Result<AgentUsers> {
    let nodes: Api<Node> = Api::all(kube.clone());
    let listed = nodes
        .list_metadata(&ListParams::default())
        .await
        .map_err(|source| Error::Read { what: "nodes", source })?;
    let names: BTreeSet<String> = listed.items.iter().map(ResourceExt::name_any).collect();
    let mut client = etcd.client().await?;
    let keyspace = Keyspace::new(&etcd.config.prefix);
    let result = sync_agent_users(&mut client, &keyspace, &names).await;
    if result.is_err() {
        etcd.reconnect();
    }
    result
}

/// Keeps the agents' etcd users in step with the cluster's Nodes every `period`, until the task
/// is aborted (the operator's term ends).
pub async fn run_agent_identities(kube: kube::Client, etcd: Arc<SharedEtcd>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sync_agents_once(&kube, &etcd).await {
            Ok(changed) if changed != AgentUsers::default() => {
                info!(added = ?changed.added, removed = ?changed.removed, "etcd agent users synced");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "syncing the agents' etcd users"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::job;

    #[test]
    fn the_credentials_secret_is_owned_by_the_job_and_holds_a_fresh_password() {
        let job = job("tiny").build();
        let password = random_password().unwrap();
        assert_eq!(password.len(), 64);
        assert!(password.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(password, random_password().unwrap(), "random");
        let secret = desired_credentials_secret(&job, &password).unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("tiny-etcd-credentials"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("default"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("TrainingJob", "uid-tiny", Some(true))
        );
        assert_eq!(secret.string_data.as_ref().unwrap()[ETCD_PASSWORD_DATA], password);
        assert!(!format!("{:?}", secret.metadata).contains(&password), "metadata never carries it");
    }

    #[test]
    fn only_passwords_etcd_accepts_are_read_from_a_secret() {
        let with = |bytes: &[u8]| Secret {
            data: Some([(ETCD_PASSWORD_DATA.to_string(), ByteString(bytes.to_vec()))].into()),
            ..Secret::default()
        };
        assert_eq!(secret_password(&with(b"rotated-by-hand")).as_deref(), Some("rotated-by-hand"));
        assert_eq!(secret_password(&with(&[b'a'; 72])).map(|p| p.len()), Some(72));
        for bad in [&b""[..], &[b'a'; 73][..], b"with space", b"new\nline", &[0xff, 0xfe]] {
            assert_eq!(secret_password(&with(bad)), None, "{bad:?}");
        }
        assert_eq!(secret_password(&Secret::default()), None);
        let other_key = Secret {
            data: Some([("token".to_string(), ByteString(b"x".to_vec()))].into()),
            ..Secret::default()
        };
        assert_eq!(secret_password(&other_key), None);
    }

    #[test]
    fn a_password_is_applied_once_per_job_uid_and_value() {
        let ids = Identities::default();
        let first = digest("uid-1", "pw");
        assert!(!ids.is_applied("ns/a", &first));
        ids.set_applied("ns/a", first);
        assert!(ids.is_applied("ns/a", &digest("uid-1", "pw")));
        assert!(!ids.is_applied("ns/a", &digest("uid-1", "rotated")), "a rotation is applied");
        assert!(!ids.is_applied("ns/a", &digest("uid-2", "pw")), "a recreated job is applied");
        assert!(!ids.is_applied("ns/b", &first));
        ids.forget("ns/a");
        assert!(!ids.is_applied("ns/a", &first));
    }
}
