//! Leader election with a `coordination.k8s.io/v1` Lease, so exactly one replica reconciles.
//!
//! Like client-go's leader election, expiry is judged on the local monotonic clock: a candidate
//! takes the Lease only after it has seen the same holder record, unrenewed, for a whole lease
//! duration. No clock comparison between replicas is needed. Writes use the Lease's
//! `resourceVersion`, so two candidates racing for an expired Lease cannot both win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

use crate::error::{Error, Result};

/// What a candidate saw of the Lease last time, and since when it has been unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<String>,
    since: Instant,
}

/// One replica's view of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    observed: Option<Observed>,
}

/// Whether a candidate may take a Lease held by `holder`, whose record has not changed for
/// `unchanged_for`.
pub fn may_take(holder: Option<&str>, identity: &str, unchanged_for: Duration, duration: Duration) -> bool {
    match holder {
        None | Some("") => true,
        Some(h) if h == identity => true,
        Some(_) => unchanged_for >= duration,
    }
}

impl LeaderElector {
    /// A candidate `identity` for Lease `name` (reached through `api`), held for `duration`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self { api, name: name.into(), identity: identity.into(), duration, observed: None }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX).max(1)),
            acquire_time: Some(acquire_time.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Acquires the Lease when it is free or expired, or renews it when held; returns whether
    /// this candidate holds it afterwards. A lost race is `Ok(false)`, not an error.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(Error::Lease)? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(e) => Err(Error::Lease(e)),
            };
        };

        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let renew_time = spec.renew_time.as_ref().map(|t| t.0.to_string());
        let seen = Observed { holder: holder.clone(), renew_time, since: Instant::now() };
        let unchanged = self
            .observed
            .as_ref()
            .is_some_and(|prev| prev.holder == seen.holder && prev.renew_time == seen.renew_time);
        if !unchanged {
            self.observed = Some(seen);
        }
        let since = self.observed.as_ref().map_or_else(Instant::now, |o| o.since);
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.duration, Duration::from_secs);
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !may_take(holder.as_deref(), &self.identity, since.elapsed(), duration) {
            return Ok(false);
        }

        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if mine {
            self.spec(spec.acquire_time, transitions)
        } else {
            self.spec(None, transitions.saturating_add(1))
        });
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(Error::Lease(e)),
        }
    }

    /// Gives the Lease up (on graceful shutdown) so a standby takes over at once instead of
    /// waiting for it to expire.
    pub async fn release(&mut self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(Error::Lease)? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(Error::Lease(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lease_is_taken_only_after_a_whole_unrenewed_duration() {
        let d = Duration::from_secs(15);
        assert!(may_take(None, "b", Duration::ZERO, d), "free");
        assert!(may_take(Some(""), "b", Duration::ZERO, d), "released");
        assert!(may_take(Some("b"), "b", Duration::ZERO, d), "renewing our own");
        assert!(!may_take(Some("a"), "b", Duration::from_secs(14), d), "still valid");
        assert!(may_take(Some("a"), "b", Duration::from_secs(15), d), "expired");
    }
}
