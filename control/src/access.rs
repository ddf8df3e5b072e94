//! Applies the least-privilege roles of [`ninelives_core::access`] to a real etcd: idempotent, so
//! the operator may call it on every reconcile of a job (and on startup for the agents).
//!
//! Users created here have no password when none is given: etcd then authenticates them by the
//! common name of their TLS client certificate (`--client-cert-auth`), which is how worker pods
//! and agents connect in a cluster. Tests give passwords instead.

use std::collections::BTreeSet;

use etcd_client::{Client, Permission, PermissionType, UserAddOptions};
use ninelives_core::access::{Access, Grant, KeyRange, Role};

use crate::error::ControlError;

fn failed(op: &'static str, name: &str) -> impl FnOnce(etcd_client::Error) -> ControlError {
    let name = name.to_string();
    move |source| ControlError::Access { op, name, source }
}

fn permission(grant: &Grant) -> Permission {
    let kind = match grant.access {
        Access::Read => PermissionType::Read,
        Access::ReadWrite => PermissionType::Readwrite,
    };
    let p = Permission::new(kind, grant.range.key.as_bytes().to_vec());
    match grant.range.range_end() {
        Some(end) => p.with_range_end(end),
        None => p,
    }
}

/// What a permission etcd reports stands for, to compare with the wanted grants.
fn as_grant(p: &Permission) -> Option<Grant> {
    let access = match PermissionType::try_from(p.get_type()).ok()? {
        PermissionType::Read => Access::Read,
        PermissionType::Readwrite => Access::ReadWrite,
        PermissionType::Write => return None, // never granted here: revoked as foreign
    };
    let key = String::from_utf8(p.key().to_vec()).ok()?;
    let range = if p.range_end().is_empty() { KeyRange::key(key) } else { KeyRange::prefix(key) };
    let grant = Grant { range, access };
    // A range end other than the prefix's own is foreign too.
    (grant.range.range_end().as_deref() == Some(p.range_end()) || !grant.range.prefix).then_some(grant)
}

/// Makes `role` exist with exactly its grants (adds missing ones, revokes others).
pub async fn ensure_role(client: &mut Client, role: &Role) -> Result<(), ControlError> {
    let existing = client.role_list().await.map_err(failed("role-list", &role.name))?;
    if !existing.roles().iter().any(|r| r == &role.name) {
        client.role_add(role.name.as_str()).await.map_err(failed("role-add", &role.name))?;
    }
    let current = client.role_get(role.name.as_str()).await.map_err(failed("role-get", &role.name))?;
    let wanted: BTreeSet<&Grant> = role.grants.iter().collect();
    for p in current.permissions() {
        let keep = as_grant(&p).is_some_and(|g| wanted.contains(&g));
        if !keep {
            let mut options = etcd_client::RoleRevokePermissionOptions::new();
            if !p.range_end().is_empty() {
                options = options.with_range_end(p.range_end().to_vec());
            }
            client
                .role_revoke_permission(role.name.as_str(), p.key().to_vec(), Some(options))
                .await
                .map_err(failed("role-revoke", &role.name))?;
        }
    }
    // Only missing grants are written: every auth change bumps etcd's auth revision, which
    // invalidates the tokens of every client (JWT) or fails requests in flight, and the
    // operator calls this on every reconcile.
    let held: BTreeSet<Grant> = current.permissions().iter().filter_map(as_grant).collect();
    for grant in role.grants.iter().filter(|g| !held.contains(g)) {
        client
            .role_grant_permission(role.name.as_str(), permission(grant))
            .await
            .map_err(failed("role-grant", &role.name))?;
    }
    Ok(())
}

/// Makes `user` exist holding `roles` (and its password `password`; `None`: certificate only,
/// or an existing user's password left as it is). Roles it held before are kept: a user may
/// hold one role per job its node runs. Writes only what differs (roles it lacks, the password
/// when given), so repeating it costs reads.
pub async fn ensure_user(
    client: &mut Client,
    user: &str,
    password: Option<&str>,
    roles: &[&Role],
) -> Result<(), ControlError> {
    let existing = client.user_list().await.map_err(failed("user-list", user))?;
    let held: Vec<String> = if !existing.users().iter().any(|u| u == user) {
        let options = password.is_none().then(|| UserAddOptions::new().with_no_pwd());
        client.user_add(user, password.unwrap_or(""), options).await.map_err(failed("user-add", user))?;
        Vec::new()
    } else {
        if let Some(password) = password {
            client.user_change_password(user, password).await.map_err(failed("user-password", user))?;
        }
        client.user_get(user).await.map_err(failed("user-get", user))?.roles().to_vec()
    };
    for role in roles {
        ensure_role(client, role).await?;
        if !held.iter().any(|r| r == &role.name) {
            client.user_grant_role(user, role.name.as_str()).await.map_err(failed("user-grant", user))?;
        }
    }
    Ok(())
}

/// Creates `user` (password `password`; `None`: certificate only) and `roles`, none of which
/// may exist yet: a constant number of requests per user, where [`ensure_user`] lists every user
/// and role (thousands of agents). Fails if any exists already; [`ensure_user`] then repairs.
pub async fn add_user(
    client: &mut Client,
    user: &str,
    password: Option<&str>,
    roles: &[&Role],
) -> Result<(), ControlError> {
    for role in roles {
        client.role_add(role.name.as_str()).await.map_err(failed("role-add", &role.name))?;
        for grant in &role.grants {
            client
                .role_grant_permission(role.name.as_str(), permission(grant))
                .await
                .map_err(failed("role-grant", &role.name))?;
        }
    }
    let options = password.is_none().then(|| UserAddOptions::new().with_no_pwd());
    client.user_add(user, password.unwrap_or(""), options).await.map_err(failed("user-add", user))?;
    for role in roles {
        client.user_grant_role(user, role.name.as_str()).await.map_err(failed("user-grant", user))?;
    }
    Ok(())
}

/// Deletes `user` and the roles named `roles` (a deleted job's or node's identity); those
/// already gone are skipped, so repeating it is harmless.
pub async fn remove_user(client: &mut Client, user: &str, roles: &[&str]) -> Result<(), ControlError> {
    let users = client.user_list().await.map_err(failed("user-list", user))?;
    if users.users().iter().any(|u| u == user) {
        client.user_delete(user).await.map_err(failed("user-delete", user))?;
    }
    let existing = client.role_list().await.map_err(failed("role-list", user))?;
    for role in roles {
        if existing.roles().iter().any(|r| r == role) {
            client.role_delete(*role).await.map_err(failed("role-delete", role))?;
        }
    }
    Ok(())
}

/// The users whose names start with `prefix` (e.g. every agent's user, to remove those of
/// nodes that are gone).
pub async fn users_with_prefix(client: &mut Client, prefix: &str) -> Result<Vec<String>, ControlError> {
    let users = client.user_list().await.map_err(failed("user-list", prefix))?;
    Ok(users.users().iter().filter(|u| u.starts_with(prefix)).cloned().collect())
}

/// Turns authentication on, with `root` (password `password`) holding etcd's `root` role: the
/// one user that may change users and roles afterwards.
pub async fn enable_auth(client: &mut Client, password: &str) -> Result<(), ControlError> {
    let existing = client.user_list().await.map_err(failed("user-list", "root"))?;
    if !existing.users().iter().any(|u| u == "root") {
        client.user_add("root", password, None).await.map_err(failed("user-add", "root"))?;
    }
    client.user_grant_role("root", "root").await.map_err(failed("user-grant", "root"))?;
    client.auth_enable().await.map_err(failed("auth-enable", "root"))?;
    Ok(())
}
