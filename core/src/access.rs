//! Least-privilege access to etcd, derived from the keyspace: which keys each kind of client may
//! read and write once etcd's authentication is on (issue 23).
//!
//! | who | user | may write | may read |
//! | --- | --- | --- | --- |
//! | a job's workers | [`worker_user`] | the job's `members/`, `acks/`, `progress`, `checkpoints/`, `peers/`, `loads/` | the job's keys |
//! | a node's agent | [`agent_user`] | `nodes/<node>/` | `nodes/<node>/`, every job's keys |
//! | an agent executing a job | (same user) | that job's `acks/` ([`Keyspace::agent_job_role`]) | |
//! | the operator (the brain) | [`OPERATOR_USER`] | everything under the prefix | everything |
//!
//! So a worker of job A cannot touch job B, a chip state, the placement or the control and
//! recovery records the brain writes; an agent cannot report another node's chips. (Within a job,
//! ranks share one role: etcd's permissions are key ranges, and a rank's keys are not one range.)
//! The definitions are pure; the operator applies them with `ninelives_control::access`.

use crate::keyspace::{JobKeys, Keyspace};

/// What a grant allows on its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Get, range and watch.
    Read,
    /// Put and delete (and read).
    ReadWrite,
}

/// Keys a grant covers: one key, or every key starting with `key`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRange {
    /// The key, or the prefix.
    pub key: String,
    /// Whether every key starting with `key` is covered.
    pub prefix: bool,
}

impl KeyRange {
    /// Exactly `key`.
    pub fn key(key: impl Into<String>) -> Self {
        Self { key: key.into(), prefix: false }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self { key: prefix.into(), prefix: true }
    }

    /// Whether `key` is covered.
    pub fn covers(&self, key: &str) -> bool {
        if self.prefix { key.starts_with(&self.key) } else { key == self.key }
    }

    /// etcd's exclusive range end: none for one key; for a prefix, the prefix with its last byte
    /// incremented (bytes `0xff` dropped first), or `"\0"` (every key) when nothing is left.
    pub fn range_end(&self) -> Option<Vec<u8>> {
        if !self.prefix {
            return None;
        }
        let mut end = self.key.as_bytes().to_vec();
        while let Some(last) = end.pop() {
            if last < 0xff {
                end.push(last + 1);
                return Some(end);
            }
        }
        Some(vec![0])
    }
}

/// One permission of a role.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// The keys.
    pub range: KeyRange,
    /// What is allowed on them.
    pub access: Access,
}

/// An etcd role: a name and its permissions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// The role's name.
    pub name: String,
    /// Its permissions.
    pub grants: Vec<Grant>,
}

impl Role {
    /// Whether the role may read `key`.
    pub fn may_read(&self, key: &str) -> bool {
        self.grants.iter().any(|g| g.range.covers(key))
    }

    /// Whether the role may write `key`.
    pub fn may_write(&self, key: &str) -> bool {
        self.grants.iter().any(|g| g.access == Access::ReadWrite && g.range.covers(key))
    }
}

/// The etcd user of the operator (the brain publishes generations and control records).
pub const OPERATOR_USER: &str = "ninelives-operator";

/// The etcd user of job `namespace/name`'s workers (also the CN of their client certificate
/// when etcd authenticates by certificate).
pub fn worker_user(namespace: &str, name: &str) -> String {
    format!("ninelives-worker:{namespace}:{name}")
}

/// The etcd user of `node`'s agent (also its client certificate's CN).
pub fn agent_user(node: &str) -> String {
    format!("ninelives-agent:{node}")
}

fn write(range: KeyRange) -> Grant {
    Grant { range, access: Access::ReadWrite }
}

fn read(range: KeyRange) -> Grant {
    Grant { range, access: Access::Read }
}

fn member_writes(job: &JobKeys) -> Vec<Grant> {
    vec![
        write(KeyRange::prefix(job.members())),
        write(KeyRange::prefix(format!("{}acks/", job.root()))),
        write(KeyRange::key(job.progress())),
        write(KeyRange::prefix(job.checkpoints())),
        // Which peer snapshots each member holds (peer copies).
        write(KeyRange::prefix(job.peers())),
        // Windowed token counts per expert (measured load, read by the brain).
        write(KeyRange::prefix(job.loads())),
    ]
}

impl Keyspace {
    /// The role of job `namespace/name`'s workers: read the job's keys; write only what members
    /// write (membership, acknowledgements, progress, checkpoint, peer-snapshot and load records).
    pub fn worker_role(&self, namespace: &str, name: &str) -> Role {
        let job = self.job(namespace, name);
        let mut grants = vec![read(KeyRange::prefix(job.root()))];
        grants.extend(member_writes(&job));
        Role { name: format!("{}-role", worker_user(namespace, name)), grants }
    }

    /// The role of `node`'s agent: its own node's keys (presence, chip states), and reading the
    /// jobs' placements and control records it executes.
    pub fn agent_role(&self, node: &str) -> Role {
        let node_prefix = format!("{}nodes/{node}/", self.prefix());
        Role {
            name: format!("{}-role", agent_user(node)),
            grants: vec![
                write(KeyRange::prefix(node_prefix)),
                read(KeyRange::prefix(format!("{}jobs/", self.prefix()))),
            ],
        }
    }

    /// The role an agent also holds while its node runs job `namespace/name`: writing the
    /// job's acknowledgements (`acks/<generation>/<node>`; etcd cannot narrow it to one node).
    pub fn agent_job_role(&self, namespace: &str, name: &str) -> Role {
        let job = self.job(namespace, name);
        Role {
            name: format!("ninelives-agents:{namespace}:{name}-role"),
            grants: vec![write(KeyRange::prefix(format!("{}acks/", job.root())))],
        }
    }

    /// The operator's role: everything under the prefix.
    pub fn operator_role(&self) -> Role {
        Role { name: format!("{OPERATOR_USER}-role"), grants: vec![write(KeyRange::prefix(self.prefix()))] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_writes_only_its_own_jobs_member_keys() {
        let ks = Keyspace::default();
        let role = ks.worker_role("team", "a");
        let a = ks.job("team", "a");
        let b = ks.job("team", "b");
        let ab = ks.job("team", "ab");
        for key in [a.member(0), a.ack(3, "1"), a.progress(), a.checkpoint(12), a.peer(2), a.load(1)] {
            assert!(role.may_write(&key), "{key}");
        }
        for key in [
            a.placement(),
            a.control(),
            a.recovery(),
            b.member(0),
            b.progress(),
            ab.progress(),
            b.peer(2),
            b.load(1),
        ] {
            assert!(!role.may_write(&key), "{key}");
        }
        assert!(
            role.may_read(&a.placement())
                && !role.may_read(&b.placement())
                && !role.may_read(&ab.placement())
        );
        assert!(!role.may_write(&ks.chip("node-1", 0)) && !role.may_read(&ks.chip("node-1", 0)));
    }

    #[test]
    fn an_agent_writes_only_its_own_node() {
        let ks = Keyspace::default();
        let role = ks.agent_role("node-1");
        assert!(role.may_write(&ks.chip("node-1", 3)) && role.may_write(&ks.node_alive("node-1")));
        assert!(!role.may_write(&ks.chip("node-10", 3)) && !role.may_write(&ks.chip("node-2", 0)));
        let job = ks.job("team", "a");
        assert!(role.may_read(&job.control()) && !role.may_write(&job.control()));
        assert!(!role.may_write(&job.ack(1, "node-1")));
        assert!(ks.agent_job_role("team", "a").may_write(&job.ack(1, "node-1")));
    }

    #[test]
    fn range_ends_cover_exactly_the_prefix() {
        assert_eq!(KeyRange::key("a").range_end(), None);
        assert_eq!(KeyRange::prefix("/ninelives/").range_end(), Some(b"/ninelives0".to_vec()));
        // UTF-8 "aÿ" is 61 c3 bf: the last byte goes up by one.
        assert_eq!(KeyRange::prefix("a\u{ff}").range_end(), Some(vec![0x61, 0xc3, 0xc0]));
        assert_eq!(KeyRange::prefix("").range_end(), Some(vec![0]));
    }
}
