//! Resolution of a `USER` specification against the text of a rootfs's `/etc/passwd` and
//! `/etc/group` (pure: no file system access), following runc's `GetExecUser` rules.

use thiserror::Error;

/// The numeric identity a step's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary group ids: always the primary group first (as `initgroups(3)` does; not
    /// doing so was containerd's CVE-2023-25173), then, only when the spec names no group, the
    /// groups that list the user as a member.
    pub additional_gids: Vec<u32>,
}

/// Why a user or group specification could not be resolved.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UserError {
    /// A user name that has no entry in /etc/passwd.
    #[error("unable to find user {0}: no matching entries in /etc/passwd")]
    UnknownUser(String),
    /// A group name that has no entry in /etc/group.
    #[error("unable to find group {0}: no matching entries in /etc/group")]
    UnknownGroup(String),
    /// A malformed specification (empty user with a group, too many colons, ...).
    #[error("invalid user specification {0:?}")]
    Invalid(String),
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn lines(text: Option<&str>) -> impl Iterator<Item = Vec<&str>> {
    text.unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
}

fn passwd_entries(passwd: Option<&str>) -> impl Iterator<Item = PasswdEntry<'_>> {
    lines(passwd).filter_map(|f| {
        Some(PasswdEntry {
            name: f.first()?,
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3)?.parse().ok()?,
        })
    })
}

fn group_entries(group: Option<&str>) -> impl Iterator<Item = GroupEntry<'_>> {
    lines(group).filter_map(|f| {
        Some(GroupEntry {
            name: f.first()?,
            gid: f.get(2)?.parse().ok()?,
            members: f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    })
}

/// Resolves `spec` (`""` = root, `user`, `uid`, `user:group`, `uid:gid`, ...) to numeric ids.
///
/// A name must exist in `passwd`/`group`; a number need not (an unknown uid gets gid 0).
pub fn resolve(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<User, UserError> {
    let spec = spec.trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((_, g)) if g.contains(':') => return Err(UserError::Invalid(spec.to_string())),
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() {
        if group_part.is_some() {
            return Err(UserError::Invalid(spec.to_string()));
        }
        "0"
    } else {
        user_part
    };
    let numeric_uid = user_part.parse::<u32>().ok();
    let entry = passwd_entries(passwd).find(|e| e.name == user_part || numeric_uid == Some(e.uid));
    let (uid, mut gid, name) = match (entry, numeric_uid) {
        (Some(e), _) => (numeric_uid.unwrap_or(e.uid), e.gid, Some(e.name)),
        (None, Some(uid)) => (uid, 0, None),
        (None, None) => return Err(UserError::UnknownUser(user_part.to_string())),
    };
    let mut member_of = Vec::new();
    match group_part {
        Some("") => return Err(UserError::Invalid(spec.to_string())),
        Some(g) => gid = resolve_group(g, group)?,
        None => {
            if let Some(name) = name {
                for e in group_entries(group) {
                    if e.members.contains(&name) {
                        member_of.push(e.gid);
                    }
                }
            }
        }
    }
    let mut additional_gids = vec![gid];
    for g in member_of {
        if !additional_gids.contains(&g) {
            additional_gids.push(g);
        }
    }
    Ok(User {
        uid,
        gid,
        additional_gids,
    })
}

/// Resolves a group name or numeric id against the text of `/etc/group`.
pub fn resolve_group(name_or_id: &str, group: Option<&str>) -> Result<u32, UserError> {
    let name_or_id = name_or_id.trim();
    if let Some(e) = group_entries(group).find(|e| e.name == name_or_id) {
        return Ok(e.gid);
    }
    name_or_id
        .parse()
        .map_err(|_| UserError::UnknownGroup(name_or_id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1::/:/bin/false\n\
        # comment\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken:x:notanumber:1\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:1001:app,other\nwheel:x:10:root\n";

    fn u(uid: u32, gid: u32, extra: &[u32]) -> User {
        User {
            uid,
            gid,
            additional_gids: extra.to_vec(),
        }
    }

    #[test]
    fn root_by_default() {
        assert_eq!(
            resolve("", Some(PASSWD), Some(GROUP)),
            Ok(u(0, 0, &[0, 10]))
        );
        assert_eq!(resolve("", None, None), Ok(u(0, 0, &[0])));
        assert_eq!(
            resolve("root", Some(PASSWD), Some(GROUP)),
            Ok(u(0, 0, &[0, 10]))
        );
    }

    #[test]
    fn name_gets_primary_and_supplementary_groups() {
        assert_eq!(
            resolve("app", Some(PASSWD), Some(GROUP)),
            Ok(u(1000, 1000, &[1000, 1001]))
        );
    }

    #[test]
    fn numeric_uid_matches_entry_or_defaults_gid_zero() {
        assert_eq!(
            resolve("1000", Some(PASSWD), Some(GROUP)),
            Ok(u(1000, 1000, &[1000, 1001]))
        );
        assert_eq!(
            resolve("4242", Some(PASSWD), Some(GROUP)),
            Ok(u(4242, 0, &[0]))
        );
        assert_eq!(resolve("4242", None, None), Ok(u(4242, 0, &[0])));
    }

    #[test]
    fn explicit_group_disables_supplementary_groups() {
        assert_eq!(
            resolve("app:extra", Some(PASSWD), Some(GROUP)),
            Ok(u(1000, 1001, &[1001]))
        );
        assert_eq!(
            resolve("1000:5", Some(PASSWD), Some(GROUP)),
            Ok(u(1000, 5, &[5]))
        );
        assert_eq!(resolve("77:88", None, None), Ok(u(77, 88, &[88])));
        assert_eq!(
            resolve("daemon:app", Some(PASSWD), Some(GROUP)),
            Ok(u(1, 1000, &[1000]))
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            resolve("nobody", Some(PASSWD), Some(GROUP)),
            Err(UserError::UnknownUser("nobody".into()))
        );
        assert_eq!(
            resolve("app:nogroup", Some(PASSWD), Some(GROUP)),
            Err(UserError::UnknownGroup("nogroup".into()))
        );
        assert_eq!(
            resolve("app", None, None),
            Err(UserError::UnknownUser("app".into()))
        );
    }

    #[test]
    fn malformed_specs_are_errors() {
        for bad in [":1", "a:b:c", "app:"] {
            assert!(
                matches!(
                    resolve(bad, Some(PASSWD), Some(GROUP)),
                    Err(UserError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn resolve_group_by_name_or_number() {
        assert_eq!(resolve_group("extra", Some(GROUP)), Ok(1001));
        assert_eq!(resolve_group("55", None), Ok(55));
        assert!(resolve_group("zzz", Some(GROUP)).is_err());
    }
}
