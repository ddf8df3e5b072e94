//! The operator's one error type.

use thiserror::Error;

/// Everything that can go wrong while the operator runs. Each variant is one step of the
/// reconcile pipeline or of the process around it; [`Error::label`] names it in metrics and
/// Events.
#[derive(Debug, Error)]
pub enum Error {
    /// Reading pods, services or the job from the apiserver failed.
    #[error("reading {what} from the apiserver: {source}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Creating, updating or deleting a child object failed.
    #[error("applying {what}: {source}")]
    Apply {
        /// What was written, e.g. `pod tiny-0`.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Writing the job's status failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Deleting the job's etcd keys failed.
    #[error("deleting etcd keys under {prefix}: {source}")]
    Etcd {
        /// Key prefix being deleted.
        prefix: String,
        /// The etcd client error.
        #[source]
        source: etcd_client::Error,
    },
    /// Creating or deleting a job's or an agent's etcd user or role failed (etcd auth on).
    #[error("etcd users and roles: {0}")]
    EtcdIdentity(#[source] ninelives_control::ControlError),
    /// etcd did not answer in time.
    #[error("etcd did not answer within {0} s")]
    EtcdTimeout(u64),
    /// Worker pods of a deleted job are still terminating.
    #[error("{0} worker pods still terminating")]
    CleanupPending(usize),
    /// The object lacks a field the apiserver always sets (name, namespace, uid).
    #[error("object is missing {0}")]
    MissingField(&'static str),
    /// Serialising the job for the worker pods failed.
    #[error("serialising the job: {0}")]
    Serialize(#[from] serde_json::Error),
    /// Connecting to the apiserver or loading the kubeconfig failed.
    #[error("kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// Reading the kubeconfig failed.
    #[error("kubeconfig: {0}")]
    Config(String),
    /// Acquiring or renewing the leader Lease failed.
    #[error("leader lease: {0}")]
    Lease(#[source] kube::Error),
    /// Leadership was lost while reconciling; the process exits so a fresh start re-elects.
    #[error("lost the leader lease")]
    LostLease,
    /// The controller stream ended on its own.
    #[error("the controller stopped unexpectedly")]
    ControllerStopped,
    /// Binding the admin endpoint or installing signal handlers failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Registering metrics failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The recovery brain cannot act on the job's etcd state (malformed record or placement,
    /// a decision the workers cannot carry out).
    #[error("recovery brain: {0}")]
    Brain(String),
    /// A round of the job's control loop failed.
    #[error("control loop: {0}")]
    Control(#[from] ninelives_control::ControlError),
}

impl Error {
    /// Short, stable label: the `kind` of `ninelives_operator_reconcile_errors_total` and the
    /// reason of Warning Events.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Apply { .. } => "apply",
            Error::Status(_) => "status",
            Error::Finalizer(_) => "finalizer",
            Error::Etcd { .. } | Error::EtcdTimeout(_) | Error::EtcdIdentity(_) => "etcd",
            Error::CleanupPending(_) => "cleanup_pending",
            Error::MissingField(_) => "missing_field",
            Error::Serialize(_) => "serialize",
            Error::Client(_) | Error::Config(_) => "client",
            Error::Lease(_) | Error::LostLease => "lease",
            Error::ControllerStopped => "controller",
            Error::Io(_) => "io",
            Error::Metrics(_) => "metrics",
            Error::Brain(_) => "brain",
            Error::Control(e) => match e.label() {
                "etcd" => "etcd",
                // Deposed by a newer leader's epoch: a leadership matter.
                "fenced" => "lease",
                "node-table" => "read",
                _ => "brain",
            },
        }
    }
}

/// Convenience alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
