//! Pure decisions of expert-parallel training: who computes which micro-batch and which replica
//! serves an expert call. The generation protocol itself (what members agree on) is
//! [`ninelives_core::generation`]. No I/O here.

use crate::model::ExpertId;

/// The member that computes micro-batch `micro`: position `micro mod members`.
pub fn micro_batch_owner(members: &[u32], micro: usize) -> Option<u32> {
    (!members.is_empty()).then(|| members[micro % members.len()])
}

/// The replica that serves `expert` for micro-batch `micro`: holders sorted by rank, index
/// `(micro + expert) mod replicas`. Deterministic, so requester and replicas agree without
/// talking, and it spreads a replicated expert's micro-batches over its replicas.
pub fn serving_replica(holders: &[u32], micro: u32, expert: ExpertId) -> Option<u32> {
    if holders.is_empty() {
        return None;
    }
    let i = (u64::from(micro) + u64::from(expert.expert)) % holders.len() as u64;
    Some(holders[i as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_and_replicas_are_spread_deterministically() {
        assert_eq!(micro_batch_owner(&[0, 2, 3], 4), Some(2));
        assert_eq!(micro_batch_owner(&[], 0), None);
        let e = ExpertId::new(1, 3);
        assert_eq!(serving_replica(&[1, 4], 0, e), Some(4));
        assert_eq!(serving_replica(&[1, 4], 1, e), Some(1));
        assert_eq!(serving_replica(&[2], 7, e), Some(2));
        assert_eq!(serving_replica(&[], 0, e), None);
    }
}
