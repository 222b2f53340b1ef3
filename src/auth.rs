//! Client authentication of the forward-proxy modes: `users` with a password or a bcrypt
//! hash (`password_hash`, as `htpasswd -B` writes it).
//!
//! Passwords are compared in constant time, as SHA-256 digests (so that neither the
//! content nor the length of a password shows in the time a check takes), and a name that
//! is no user's costs what a user's check costs. bcrypt is slow on purpose (tens of
//! milliseconds at the usual costs): it runs on the runtime's blocking threads, at most one
//! per core at a time, never on a worker; and a password once verified is remembered as a
//! keyed digest, so that a client opening many connections pays it once. Nothing here
//! ever logs a password.

use std::sync::{Arc, Mutex};

use ring::digest;
use ring::hmac;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::config::{Secret, User};
use crate::destinations::Destinations;

/// The users of one listener.
pub struct Users {
    users: Vec<Entry>,
    /// Keys the remembered bcrypt successes (random per process).
    key: hmac::Key,
    /// A bcrypt hash to spend the time of a check on when the name is no user's.
    decoy: Option<String>,
    /// Concurrent bcrypt checks.
    bcrypt_slots: Arc<Semaphore>,
}

struct Entry {
    name: String,
    check: Check,
    destinations: Option<Destinations>,
}

enum Check {
    /// SHA-256 of the password.
    Digest([u8; 32]),
    Bcrypt {
        hash: String,
        /// Keyed digests of passwords that verified (the last few).
        verified: Mutex<Vec<[u8; 32]>>,
    },
}

/// Passwords remembered per bcrypt user.
const REMEMBERED: usize = 4;

/// Who a client authenticated as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserId(usize);

impl Users {
    pub fn new(users: &[User]) -> Users {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            hmac::Key::new(hmac::HMAC_SHA256, &fastrand::u64(..).to_le_bytes())
        });
        let users: Vec<Entry> = users
            .iter()
            .map(|u| Entry {
                name: u.name.clone(),
                check: match &u.secret {
                    Secret::Password(p) => Check::Digest(sha256(p.as_bytes())),
                    Secret::Bcrypt(h) => Check::Bcrypt {
                        hash: h.clone(),
                        verified: Mutex::new(Vec::new()),
                    },
                },
                destinations: u.destinations.clone(),
            })
            .collect();
        let decoy = users.iter().find_map(|e| match &e.check {
            Check::Bcrypt { hash, .. } => Some(hash.clone()),
            Check::Digest(_) => None,
        });
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Users {
            users,
            key,
            decoy,
            bcrypt_slots: Arc::new(Semaphore::new(cores)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn name(&self, id: UserId) -> &str {
        self.users.get(id.0).map_or("", |u| u.name.as_str())
    }

    /// The user's own `destinations`, which narrow the listener's.
    pub fn destinations(&self, id: UserId) -> Option<&Destinations> {
        self.users.get(id.0).and_then(|u| u.destinations.as_ref())
    }

    /// Checks a user name and password; `None` when they do not match.
    pub async fn check(&self, name: &[u8], password: &[u8]) -> Option<UserId> {
        let found = self.users.iter().position(|u| u.name.as_bytes() == name);
        let Some(i) = found else {
            // As long as a user's check would take.
            let given = sha256(password);
            let _ = given.ct_eq(&[0u8; 32]);
            if let Some(decoy) = &self.decoy {
                let _ = self.bcrypt(decoy.clone(), password).await;
            }
            return None;
        };
        let ok = match &self.users[i].check {
            Check::Digest(want) => bool::from(sha256(password).ct_eq(want)),
            Check::Bcrypt { hash, verified } => {
                let tag = self.tag(name, password);
                let known = verified
                    .lock()
                    .map(|v| v.iter().fold(false, |k, t| k | bool::from(t.ct_eq(&tag))))
                    .unwrap_or(false);
                if known {
                    true
                } else if self.bcrypt(hash.clone(), password).await {
                    if let Ok(mut v) = verified.lock() {
                        if v.len() == REMEMBERED {
                            v.remove(0);
                        }
                        v.push(tag);
                    }
                    true
                } else {
                    false
                }
            }
        };
        ok.then_some(UserId(i))
    }

    /// A bcrypt check on a blocking thread, one per core at most at a time.
    async fn bcrypt(&self, hash: String, password: &[u8]) -> bool {
        let Ok(_slot) = self.bcrypt_slots.clone().acquire_owned().await else {
            return false;
        };
        let password = password.to_vec();
        tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false)
    }

    fn tag(&self, name: &[u8], password: &[u8]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&(name.len() as u64).to_le_bytes());
        ctx.update(name);
        ctx.update(password);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, b).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, secret: Secret) -> User {
        User {
            name: name.into(),
            secret,
            destinations: None,
        }
    }

    #[tokio::test]
    async fn passwords_and_bcrypt_hashes() {
        // Cost 4: the lowest bcrypt allows, to keep the test quick.
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let users = Users::new(&[
            user("alice", Secret::Password("wonderland".into())),
            user("bob", Secret::Bcrypt(hash)),
        ]);
        let alice = users.check(b"alice", b"wonderland").await.unwrap();
        assert_eq!(users.name(alice), "alice");
        assert!(users.check(b"alice", b"wonderlan").await.is_none());
        assert!(users.check(b"alice", b"").await.is_none());
        assert!(users.check(b"Alice", b"wonderland").await.is_none());
        assert!(users.check(b"carol", b"wonderland").await.is_none());
        for _ in 0..3 {
            // The second time from the remembered digest.
            let bob = users.check(b"bob", b"s3cret").await.unwrap();
            assert_eq!(users.name(bob), "bob");
        }
        assert!(users.check(b"bob", b"s3cre").await.is_none());
        assert!(users.check(b"bob", b"wonderland").await.is_none());
    }
}
