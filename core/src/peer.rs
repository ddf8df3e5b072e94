//! Who keeps a copy of whom: the buddies of in-memory peer snapshots.
//!
//! With `checkpoint.peerCopies: k` every member's training state is copied into the host memory
//! of `k` other members, its buddies. A copy protects only if the failure that takes the member
//! spares the buddy, so buddies are chosen in other failure domains: another node always (a
//! member stands for its node), another rack whenever the racks allow.

use std::collections::BTreeMap;

/// The buddies of each member: `copies` other members each, in other racks when racks are
/// given and enough of them exist. Members are taken in an order that alternates racks, and
/// each member's buddies are the next `copies` members of that ring, so every member holds as
/// many copies as it hands out. Empty when `copies` is 0 or there is nobody else.
pub fn buddies(members: &[u32], copies: u32, nodes_per_rack: Option<u32>) -> BTreeMap<u32, Vec<u32>> {
    let mut sorted: Vec<u32> = members.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let copies = usize::try_from(copies).unwrap_or(usize::MAX).min(sorted.len().saturating_sub(1));
    if copies == 0 {
        return BTreeMap::new();
    }
    let ring = alternate_racks(&sorted, nodes_per_rack);
    let n = ring.len();
    ring.iter()
        .enumerate()
        .map(|(i, &rank)| (rank, (1..=copies).map(|d| ring[(i + d) % n]).collect()))
        .collect()
}

/// `sorted` reordered to take one member of each rack in turn (rack = rank / nodes per rack).
fn alternate_racks(sorted: &[u32], nodes_per_rack: Option<u32>) -> Vec<u32> {
    let Some(per_rack) = nodes_per_rack.filter(|&p| p > 0) else { return sorted.to_vec() };
    let mut racks: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for &rank in sorted {
        racks.entry(rank / per_rack).or_default().push(rank);
    }
    let deepest = racks.values().map(Vec::len).max().unwrap_or(0);
    (0..deepest).flat_map(|i| racks.values().filter_map(move |r| r.get(i).copied())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_has_k_distinct_buddies_and_holds_k_copies() {
        let members: Vec<u32> = (0..8).collect();
        let b = buddies(&members, 2, None);
        assert_eq!(b.len(), 8);
        let mut held: BTreeMap<u32, usize> = BTreeMap::new();
        for (rank, bs) in &b {
            assert_eq!(bs.len(), 2);
            assert!(!bs.contains(rank), "nobody is its own buddy");
            for x in bs {
                *held.entry(*x).or_default() += 1;
            }
        }
        assert!(held.values().all(|&c| c == 2), "{held:?}");
        assert_eq!(b[&7], vec![0, 1]);
    }

    #[test]
    fn buddies_sit_in_other_racks_when_racks_are_given() {
        // Two racks of 4 nodes: ranks 0-3 and 4-7.
        let members: Vec<u32> = (0..8).collect();
        for (rank, bs) in buddies(&members, 1, Some(4)) {
            assert_ne!(rank / 4, bs[0] / 4, "rank {rank}'s buddy {} shares its rack", bs[0]);
        }
    }

    #[test]
    fn no_copies_or_nobody_else_means_no_buddies_and_k_is_capped() {
        assert!(buddies(&[0, 1, 2], 0, None).is_empty());
        assert!(buddies(&[5], 1, None).is_empty());
        let b = buddies(&[0, 2, 5], 7, None);
        assert_eq!(b[&0], vec![2, 5]);
        assert_eq!(b[&5], vec![0, 2]);
    }
}
