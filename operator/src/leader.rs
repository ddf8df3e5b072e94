//! Leader election with a `coordination.k8s.io/v1` Lease, so exactly one replica reconciles.
//!
//! Like client-go's leader election, expiry is judged on the local monotonic clock: a candidate
//! takes the Lease only after it has seen the same holder record, unrenewed, for a whole lease
//! duration. No clock comparison between replicas is needed. Writes use the Lease's
//! `resourceVersion`, so two candidates racing for an expired Lease cannot both win.

use std::sync::{Arc, Mutex, PoisonError};
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
    /// The epoch of the term this candidate holds (set by a successful acquire or renewal).
    epoch: Option<u64>,
}

/// Transitions counted within one Lease object (beyond this the epoch would overlap the next
/// second of creation time).
const TRANSITIONS_PER_SECOND: u64 = 1_000_000;

/// The leadership epoch a Lease stands for: its creation time (unix seconds) then its
/// `leaseTransitions`, as one number (`creation × 10⁶ + transitions`). Every change of holder
/// raises `leaseTransitions` through a compare on the Lease's `resourceVersion`, so a later term
/// has a higher epoch; a Lease deleted and created again has a later creation time, so its
/// epochs stay above the old object's. `None` for a Lease without a creation time (the
/// apiserver always sets it).
pub fn lease_epoch(lease: &Lease) -> Option<u64> {
    let created = lease.metadata.creation_timestamp.as_ref()?;
    let seconds = u64::try_from(created.0.as_second()).ok()?;
    let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
    let transitions = u64::try_from(transitions).unwrap_or(0).min(TRANSITIONS_PER_SECOND - 1);
    seconds.checked_mul(TRANSITIONS_PER_SECOND)?.checked_add(transitions)
}

/// One leadership term of this replica, as its drivers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// This replica's identity (the Lease holder).
    pub identity: String,
    /// The term's epoch ([`lease_epoch`]); the drivers claim jobs with it.
    pub epoch: u64,
    /// Until when this replica may act as leader without another renewal: the start of its
    /// last successful renewal plus the renew deadline (shorter than the Lease).
    pub valid_until: tokio::time::Instant,
}

/// The term this replica holds, shared by the election loop (which renews and ends it) and the
/// drivers (which stop as soon as it is no longer valid, before the Lease can expire).
#[derive(Clone, Debug, Default)]
pub struct Leadership(Arc<Mutex<Option<Term>>>);

impl Leadership {
    fn with<T>(&self, f: impl FnOnce(&mut Option<Term>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Starts (or continues) a term.
    pub fn begin(&self, term: Term) {
        self.with(|t| *t = Some(term));
    }

    /// The term was renewed: valid until `valid_until`.
    pub fn renewed(&self, valid_until: tokio::time::Instant) {
        self.with(|t| {
            if let Some(term) = t {
                term.valid_until = valid_until;
            }
        });
    }

    /// The term ended (lost, missed renewal, shutdown).
    pub fn end(&self) {
        self.with(|t| *t = None);
    }

    /// The term, if one is held and still valid now.
    pub fn current(&self) -> Option<Term> {
        let now = tokio::time::Instant::now();
        self.with(|t| t.clone().filter(|term| now < term.valid_until))
    }

    /// Whether the term of `epoch` is still held and valid now.
    pub fn holds(&self, epoch: u64) -> bool {
        self.current().is_some_and(|t| t.epoch == epoch)
    }
}

/// How the renewals of a held Lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// Asked to stop.
    Stopped,
    /// Another replica holds the Lease.
    Lost,
    /// No renewal succeeded within the renew deadline (apiserver slow or unreachable, or this
    /// process was paused): the drivers were stopped before the Lease could expire.
    MissedDeadline,
}

/// Something that renews a held Lease: whether this replica still holds it afterwards.
pub trait Renew {
    /// One renewal attempt.
    fn renew(&mut self) -> impl Future<Output = Result<bool>>;
}

impl Renew for LeaderElector {
    fn renew(&mut self) -> impl Future<Output = Result<bool>> {
        self.try_acquire_or_renew()
    }
}

/// Renews the held term every `retry` until `stop` resolves or the term ends, bounding every
/// renewal by the renew deadline: `renew_deadline` after the start of the last successful
/// renewal (client-go's 2/3 of the Lease). The term in `leadership` is renewed on success and
/// ended at once on any other outcome, so drivers checking it stop before a standby may take
/// over.
pub async fn hold_term(
    leadership: &Leadership,
    elector: &mut impl Renew,
    retry: Duration,
    renew_deadline: Duration,
    stop: impl Future<Output = ()>,
) -> TermEnd {
    let mut stop = std::pin::pin!(stop);
    let mut deadline = leadership.current().map_or_else(tokio::time::Instant::now, |t| t.valid_until);
    let end = loop {
        tokio::select! {
            () = &mut stop => break TermEnd::Stopped,
            () = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + retry)) => {}
        }
        let started = tokio::time::Instant::now();
        if started >= deadline {
            break TermEnd::MissedDeadline;
        }
        match tokio::time::timeout_at(deadline, elector.renew()).await {
            Ok(Ok(true)) => {
                deadline = started + renew_deadline;
                leadership.renewed(deadline);
            }
            Ok(Ok(false)) => break TermEnd::Lost,
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the lease"),
            Err(_) => break TermEnd::MissedDeadline,
        }
    };
    leadership.end();
    end
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
        Self { api, name: name.into(), identity: identity.into(), duration, observed: None, epoch: None }
    }

    /// The epoch of the term this candidate acquired or renewed last ([`lease_epoch`]).
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
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
                Ok(written) => {
                    self.epoch = lease_epoch(&written);
                    Ok(true)
                }
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
            Ok(written) => {
                self.epoch = lease_epoch(&written);
                Ok(true)
            }
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

    fn lease(created_s: i64, transitions: i32) -> Lease {
        let created =
            Timestamp::from_second(created_s).ok().map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
        Lease {
            metadata: ObjectMeta { creation_timestamp: created, ..ObjectMeta::default() },
            spec: Some(LeaseSpec { lease_transitions: Some(transitions), ..LeaseSpec::default() }),
        }
    }

    #[test]
    fn a_later_term_has_a_higher_epoch_even_across_a_recreated_lease() {
        let first = lease_epoch(&lease(1_800_000_000, 0));
        let taken_over = lease_epoch(&lease(1_800_000_000, 1));
        let much_later = lease_epoch(&lease(1_800_000_000, 41));
        let recreated = lease_epoch(&lease(1_800_000_001, 0));
        assert!(first < taken_over && taken_over < much_later && much_later < recreated);
        assert_eq!(first, Some(1_800_000_000_000_000));
        assert_eq!(lease_epoch(&Lease::default()), None, "no creation time, no epoch");
        assert_eq!(lease_epoch(&lease(1_800_000_000, -3)), first, "a negative count is read as 0");
    }

    /// What a scripted renewal does once its good renewals are used up.
    #[derive(Clone, Copy)]
    enum Then {
        /// Never answers (a hung apiserver).
        Hang,
        /// Answers with an error (an unreachable apiserver).
        Fail,
        /// Answers whether the Lease is still held.
        Held(bool),
    }

    /// Renews as scripted: `Ok(true)` `ok` times, then `then` forever.
    struct Script {
        ok: usize,
        then: Then,
        calls: usize,
        last_ok: Option<tokio::time::Instant>,
    }

    impl Renew for Script {
        async fn renew(&mut self) -> Result<bool> {
            self.calls += 1;
            if self.calls <= self.ok {
                self.last_ok = Some(tokio::time::Instant::now());
                return Ok(true);
            }
            match self.then {
                Then::Held(held) => Ok(held),
                Then::Fail => Err(Error::LostLease),
                Then::Hang => std::future::pending().await,
            }
        }
    }

    fn term(valid_for: Duration) -> Leadership {
        let leadership = Leadership::default();
        let valid_until = tokio::time::Instant::now() + valid_for;
        leadership.begin(Term { identity: "op-a".into(), epoch: 7, valid_until });
        leadership
    }

    const RETRY: Duration = Duration::from_millis(20);
    const DEADLINE: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_renewal_that_hangs_ends_the_term_within_the_renew_deadline() {
        let leadership = term(DEADLINE);
        let mut script = Script { ok: 3, then: Then::Hang, calls: 0, last_ok: None };
        let end = hold_term(&leadership, &mut script, RETRY, DEADLINE, std::future::pending()).await;
        let ended = tokio::time::Instant::now();
        assert_eq!(end, TermEnd::MissedDeadline);
        let last_ok = script.last_ok.expect("three renewals succeeded");
        // The deadline counts from the start of the last good renewal: stopped within it (plus
        // scheduling slack), long before a 3/2 × deadline Lease could expire.
        let held = ended.duration_since(last_ok);
        assert!(held <= DEADLINE + Duration::from_millis(50), "held {held:?} past the renew deadline");
        assert_eq!(leadership.current(), None);
        assert!(!leadership.holds(7), "a driver would go on");
    }

    #[tokio::test]
    async fn failing_renewals_end_the_term_at_the_deadline_and_a_lost_lease_at_once() {
        let leadership = term(DEADLINE);
        let started = tokio::time::Instant::now();
        let mut failing = Script { ok: 0, then: Then::Fail, calls: 0, last_ok: None };
        // Errors are retried every `retry` until the deadline, then the term ends.
        let end = hold_term(&leadership, &mut failing, RETRY, DEADLINE, std::future::pending()).await;
        assert_eq!(end, TermEnd::MissedDeadline);
        assert!(started.elapsed() < DEADLINE + Duration::from_millis(50));
        assert!(failing.calls >= 5, "retried: {}", failing.calls);

        let leadership = term(DEADLINE);
        let mut lost = Script { ok: 1, then: Then::Held(false), calls: 0, last_ok: None };
        let end = hold_term(&leadership, &mut lost, RETRY, DEADLINE, std::future::pending()).await;
        assert_eq!((end, lost.calls, leadership.current()), (TermEnd::Lost, 2, None));

        let leadership = term(DEADLINE);
        let mut fine = Script { ok: usize::MAX, then: Then::Hang, calls: 0, last_ok: None };
        let stop = tokio::time::sleep(DEADLINE * 3);
        assert_eq!(hold_term(&leadership, &mut fine, RETRY, DEADLINE, stop).await, TermEnd::Stopped);
        assert!(fine.calls >= 10, "renewed every retry: {}", fine.calls);
    }

    #[tokio::test]
    async fn a_term_not_renewed_in_time_is_invalid_even_if_nobody_ended_it() {
        // A process paused (SIGSTOP) past its deadline: on resume its drivers see the term over
        // before the election loop has run at all.
        let leadership = term(Duration::from_millis(50));
        assert!(leadership.holds(7) && !leadership.holds(6));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!leadership.holds(7));
        assert_eq!(leadership.current(), None);
    }

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
