//! `basic_auth_users`: HTTP basic authentication against bcrypt hashes.
//! bcrypt is deliberately slow (tens of ms at cost 10), so, like
//! exporter-toolkit, successful and failed checks are cached by a digest
//! of (hash, user, password) and never by the password itself.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use base64::Engine as _;

/// Any valid bcrypt hash: checked against for unknown users, so that a
/// wrong user name costs as long as a wrong password.
const DECOY_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";
/// Bound on remembered checks (a guessing client cannot grow memory).
const CACHE_LIMIT: usize = 256;

#[derive(Debug, Default)]
pub struct Authenticator {
    cache: Mutex<HashMap<[u8; 32], bool>>,
}

/// Credentials from an `Authorization: Basic ...` header.
#[derive(Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

pub fn parse_header(value: &str) -> Option<Credentials> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(Credentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

impl Authenticator {
    /// The remembered answer for `credentials`, if any (cheap: no bcrypt).
    pub fn cached(
        &self,
        users: &BTreeMap<String, String>,
        credentials: &Credentials,
    ) -> Option<bool> {
        let known = users.get(&credentials.user);
        let hash = known.map(String::as_str).unwrap_or(DECOY_HASH);
        let ok = *self.lock().get(&cache_key(hash, credentials))?;
        Some(ok && known.is_some())
    }

    /// True when `credentials` match `users` (user -> bcrypt hash). Blocks
    /// for a bcrypt check on a cache miss: call it off the async workers.
    pub fn check(&self, users: &BTreeMap<String, String>, credentials: &Credentials) -> bool {
        if let Some(ok) = self.cached(users, credentials) {
            return ok;
        }
        let known = users.get(&credentials.user);
        let hash = known.map(String::as_str).unwrap_or(DECOY_HASH);
        let key = cache_key(hash, credentials);
        let ok = bcrypt::verify(&credentials.password, hash).unwrap_or(false) && known.is_some();
        let mut cache = self.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, ok);
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], bool>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn cache_key(hash: &str, credentials: &Credentials) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [hash, &credentials.user, &credentials.password] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part.as_bytes());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_right_password_passes_and_others_do_not() {
        // htpasswd -nbBC 4 alice s3cret (cost 4 keeps the test fast)
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let users = BTreeMap::from([("alice".to_owned(), hash)]);
        let auth = Authenticator::default();
        let creds = |user: &str, password: &str| Credentials {
            user: user.into(),
            password: password.into(),
        };
        assert!(auth.check(&users, &creds("alice", "s3cret")));
        assert!(auth.check(&users, &creds("alice", "s3cret")), "cached");
        assert!(!auth.check(&users, &creds("alice", "wrong")));
        assert!(!auth.check(&users, &creds("bob", "s3cret")));
        // A user removed from the file no longer passes, cache or not.
        assert!(!auth.check(&BTreeMap::new(), &creds("alice", "s3cret")));
    }

    #[test]
    fn hashes_made_by_htpasswd_are_accepted() {
        // htpasswd -nbBC 10 prom s3cret ($2y$, as exporter-toolkit documents)
        let users = BTreeMap::from([(
            "prom".to_owned(),
            "$2y$10$zOuA791b8xjqYYidLM7qHuankPkUJVvRkefL/WqMkAqDeYwTdauLi".to_owned(),
        )]);
        let auth = Authenticator::default();
        let creds = |password: &str| Credentials {
            user: "prom".into(),
            password: password.into(),
        };
        assert!(auth.check(&users, &creds("s3cret")));
        assert!(!auth.check(&users, &creds("s3cret ")));
        assert_eq!(auth.cached(&users, &creds("s3cret")), Some(true));
        assert_eq!(auth.cached(&users, &creds("never tried")), None);
    }

    #[test]
    fn the_header_is_parsed_strictly() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:pa:ss")
        );
        assert_eq!(
            parse_header(&header),
            Some(Credentials {
                user: "alice".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(parse_header("Bearer abc"), None);
        assert_eq!(parse_header("Basic !!!"), None);
        assert_eq!(parse_header("Basic"), None);
    }
}
