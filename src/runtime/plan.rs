//! What a reload changes: a typed difference between the running config and a new one,
//! computed without touching a socket. [`Shared::apply`](super::Shared::apply) carries it
//! out.

use std::net::SocketAddr;

use crate::config::{self, Config, ListenerMode};

/// The difference between two configs, in the new config's order.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub listeners: Vec<ListenerPlan>,
    /// Listeners that are gone: they stop accepting; their connections finish.
    pub removed_listeners: Vec<String>,
    pub upstreams: Vec<(String, UpstreamPlan)>,
    pub removed_upstreams: Vec<String>,
    /// The access log's settings changed (it is opened anew).
    pub log_changed: bool,
    /// `[global] max_connections`, if it changed.
    pub max_connections: Option<usize>,
    /// What changed that needs no action here, one line each, for the reload's answer.
    pub notes: Vec<String>,
}

/// What happens to one listener of the new config.
#[derive(Debug, PartialEq)]
pub enum ListenerPlan {
    /// New: every address bound.
    Add { name: String },
    /// It keeps the sockets of the addresses that stay, binds `bind` and closes `unbind`;
    /// `changed`: its settings or the upstreams it names changed (new connections get them).
    Keep {
        name: String,
        bind: Vec<SocketAddr>,
        unbind: Vec<SocketAddr>,
        changed: bool,
    },
    /// Its sockets need other options (`reuse_port`, transparent interception): every
    /// address bound anew, then the old sockets closed.
    Rebind { name: String },
}

impl ListenerPlan {
    pub fn name(&self) -> &str {
        match self {
            ListenerPlan::Add { name }
            | ListenerPlan::Keep { name, .. }
            | ListenerPlan::Rebind { name } => name,
        }
    }
}

/// What happens to one upstream of the new config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamPlan {
    /// Unchanged: the pool stays as it is.
    Same,
    /// A new pool, keeping the servers that stay (health, counters, drain state).
    Changed,
    Added,
}

/// The plan from `old` (running) to `new`, or why `new` cannot be applied as one step.
pub fn plan(old: &Config, new: &Config) -> Result<Plan, Vec<String>> {
    let mut listeners = Vec::new();
    let mut errors = Vec::new();
    for lc in &new.listeners {
        let prev = old.listeners.iter().find(|l| l.name == lc.name);
        let p = match prev {
            Some(p) if same_sockets(p, lc) => ListenerPlan::Keep {
                name: lc.name.clone(),
                bind: lc
                    .listen
                    .iter()
                    .filter(|a| !p.listen.contains(a))
                    .copied()
                    .collect(),
                unbind: p
                    .listen
                    .iter()
                    .filter(|a| !lc.listen.contains(a))
                    .copied()
                    .collect(),
                changed: unindexed(p) != unindexed(lc) || targets(old, p) != targets(new, lc),
            },
            Some(_) => ListenerPlan::Rebind {
                name: lc.name.clone(),
            },
            None => ListenerPlan::Add {
                name: lc.name.clone(),
            },
        };
        let binds: &[SocketAddr] = match &p {
            ListenerPlan::Keep { bind, .. } => bind,
            _ => &lc.listen,
        };
        // An address still held by another listener (removed or changed in this reload)
        // cannot be taken over in the same step. Port 0 (an ephemeral port) never clashes.
        // (A TCP and a UDP listener may share an address.)
        let udp = |l: &config::Listener| matches!(l.mode, ListenerMode::Udp(_));
        if let Some(other) = old.listeners.iter().find(|l| {
            l.name != lc.name
                && udp(l) == udp(lc)
                && l.listen.iter().any(|a| a.port() != 0 && binds.contains(a))
        }) {
            errors.push(format!(
                "listener {:?} takes an address of listener {:?}: rename or move in two reloads",
                lc.name, other.name
            ));
        }
        listeners.push(p);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let removed_listeners = old
        .listeners
        .iter()
        .filter(|l| !new.listeners.iter().any(|n| n.name == l.name))
        .map(|l| l.name.clone())
        .collect();
    let upstreams = new
        .upstreams
        .iter()
        .map(|u| {
            let p = match old.upstreams.iter().find(|o| o.name == u.name) {
                Some(o) if o == u => UpstreamPlan::Same,
                Some(_) => UpstreamPlan::Changed,
                None => UpstreamPlan::Added,
            };
            (u.name.clone(), p)
        })
        .collect();
    let removed_upstreams = old
        .upstreams
        .iter()
        .filter(|u| !new.upstreams.iter().any(|n| n.name == u.name))
        .map(|u| u.name.clone())
        .collect();

    let mut notes = Vec::new();
    let (g, og) = (&new.global, &old.global);
    if g.splice != og.splice || g.pipe_size != og.pipe_size {
        notes.push(if g.splice {
            format!(
                "new connections are relayed with splice through pipes of {} bytes",
                g.pipe_size
            )
        } else {
            "new connections are relayed through user space (splice off)".to_string()
        });
    }
    if g.io_uring != og.io_uring {
        notes.push(format!(
            "UDP sockets bound from now on send {}; the others keep theirs until a restart",
            if g.io_uring {
                "through io_uring"
            } else {
                "with sendmmsg"
            }
        ));
    }
    if g.udp_kernel != og.udp_kernel {
        notes.push(format!(
            "UDP sockets bound from now on relay their sessions {}; the others keep theirs",
            if g.udp_kernel {
                "in the kernel where it can be loaded"
            } else {
                "through sockets only"
            }
        ));
    }
    if g.workers != og.workers {
        notes.push("`workers` takes effect at the next restart".into());
    }
    if new.admin != old.admin {
        notes.push("`[admin]` takes effect at the next restart".into());
    }
    if new.log.level != old.log.level {
        notes.push("`[log] level` takes effect at the next restart".into());
    }
    let (l, ol) = (&new.log, &old.log);
    Ok(Plan {
        listeners,
        removed_listeners,
        upstreams,
        removed_upstreams,
        log_changed: l.access != ol.access
            || l.format != ol.format
            || l.interval != ol.interval
            || l.on_connect != ol.on_connect,
        max_connections: (g.max_connections != og.max_connections).then_some(g.max_connections),
        notes,
    })
}

/// Whether a listener's sockets can serve a new config of it: bound with the same options.
pub fn same_sockets(old: &config::Listener, new: &config::Listener) -> bool {
    old.reuse_port == new.reuse_port && kind(old) == kind(new)
}

/// What a listener's sockets are: TCP (with IP_TRANSPARENT for TPROXY) or UDP.
pub fn kind(lc: &config::Listener) -> crate::listener::Kind {
    match lc.mode {
        ListenerMode::Udp(_) => crate::listener::Kind::Udp,
        _ => crate::listener::Kind::Tcp {
            transparent: tproxy(lc),
        },
    }
}

/// A TPROXY listener: its sockets are bound with IP_TRANSPARENT.
pub fn tproxy(lc: &config::Listener) -> bool {
    matches!(&lc.mode, ListenerMode::Transparent(t) if t.interception == config::Interception::Tproxy)
}

/// The upstreams a listener's default route and routes name (the config holds indices,
/// which a reload may shuffle).
pub fn targets(cfg: &Config, lc: &config::Listener) -> Vec<String> {
    let name = |i: usize| cfg.upstreams[i].name.clone();
    std::iter::once(lc.upstream.map(name).unwrap_or_default())
        .chain(lc.routes.iter().map(|r| name(r.upstream)))
        .collect()
}

/// A listener's settings without the upstream indices (compared by name, see [`targets`]).
pub fn unindexed(lc: &config::Listener) -> config::Listener {
    let mut l = lc.clone();
    l.upstream = None;
    for r in &mut l.routes {
        r.upstream = 0;
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        crate::config::parse_str(text, "test.toml", std::path::Path::new("/nonexistent"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const POOLS: &str = r#"
[[upstream]]
name = "a"
servers = ["127.0.0.1:9001"]

[[upstream]]
name = "b"
servers = ["127.0.0.1:9002"]
"#;

    fn one(listen: &str, extra: &str) -> Config {
        cfg(&format!(
            "[[listener]]\nname = \"web\"\nlisten = {listen}\nupstream = \"a\"\n{extra}\n{POOLS}"
        ))
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_same_config_changes_nothing() {
        let c = one(r#"["127.0.0.1:8080"]"#, "");
        let p = plan(&c, &c).unwrap();
        assert_eq!(
            p.listeners,
            [ListenerPlan::Keep {
                name: "web".into(),
                bind: vec![],
                unbind: vec![],
                changed: false
            }]
        );
        assert!(p.removed_listeners.is_empty() && p.removed_upstreams.is_empty());
        assert!(p.upstreams.iter().all(|(_, u)| *u == UpstreamPlan::Same));
        assert!(!p.log_changed && p.max_connections.is_none() && p.notes.is_empty());
    }

    #[test]
    fn addresses_that_stay_keep_their_sockets() {
        let old = one(r#"["127.0.0.1:8080", "127.0.0.1:8081"]"#, "");
        let new = one(r#"["127.0.0.1:8080", "127.0.0.1:8082"]"#, "");
        let p = plan(&old, &new).unwrap();
        assert_eq!(
            p.listeners,
            [ListenerPlan::Keep {
                name: "web".into(),
                bind: vec![a("127.0.0.1:8082")],
                unbind: vec![a("127.0.0.1:8081")],
                changed: true
            }]
        );
    }

    #[test]
    fn other_socket_options_bind_anew() {
        let old = one(r#"["127.0.0.1:8080"]"#, "");
        let new = one(r#"["127.0.0.1:8080"]"#, "reuse_port = false");
        let p = plan(&old, &new).unwrap();
        assert_eq!(p.listeners, [ListenerPlan::Rebind { name: "web".into() }]);
    }

    #[test]
    fn an_upstream_renamed_under_a_listener_is_a_change() {
        let old = one(r#"["127.0.0.1:8080"]"#, "");
        let new = cfg(&format!(
            "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"b\"\n{POOLS}"
        ));
        let p = plan(&old, &new).unwrap();
        assert!(matches!(
            p.listeners[0],
            ListenerPlan::Keep { changed: true, .. }
        ));
        // The upstreams themselves did not change; reordering them is no change either.
        let reordered = cfg(
            "[[upstream]]\nname = \"b\"\nservers = [\"127.0.0.1:9002\"]\n\
             [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"a\"\n\
             [[upstream]]\nname = \"a\"\nservers = [\"127.0.0.1:9001\"]\n",
        );
        let p = plan(&old, &reordered).unwrap();
        assert!(matches!(
            p.listeners[0],
            ListenerPlan::Keep { changed: false, .. }
        ));
        assert!(p.upstreams.iter().all(|(_, u)| *u == UpstreamPlan::Same));
    }

    #[test]
    fn an_address_moving_between_listeners_takes_two_reloads() {
        let old = one(r#"["127.0.0.1:8080"]"#, "");
        let new = cfg(&format!(
            "[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"a\"\n{POOLS}"
        ));
        let errs = plan(&old, &new).unwrap_err();
        assert_eq!(
            errs,
            [
                r#"listener "other" takes an address of listener "web": rename or move in two reloads"#
            ]
        );
        // Port 0 is a new ephemeral port each time: never a clash.
        let old = one(r#"["127.0.0.1:0"]"#, "");
        let new = cfg(&format!(
            "[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:0\"\nupstream = \"a\"\n{POOLS}"
        ));
        let p = plan(&old, &new).unwrap();
        assert_eq!(
            p.listeners,
            [ListenerPlan::Add {
                name: "other".into()
            }]
        );
        assert_eq!(p.removed_listeners, ["web"]);
    }

    #[test]
    fn upstreams_and_global_settings() {
        let old = cfg(&format!(
            "[global]\nmax_connections = 100\n\
             [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"a\"\n{POOLS}"
        ));
        let new = cfg(
            "[global]\nmax_connections = 200\nworkers = 3\nsplice = false\nio_uring = false\n\
             [log]\naccess = \"stderr\"\n\
             [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"a\"\n\
             [[upstream]]\nname = \"a\"\nservers = [\"127.0.0.1:9001\", \"127.0.0.1:9003\"]\n\
             [[upstream]]\nname = \"c\"\nservers = [\"127.0.0.1:9004\"]\n",
        );
        let p = plan(&old, &new).unwrap();
        assert_eq!(
            p.upstreams,
            [
                ("a".to_string(), UpstreamPlan::Changed),
                ("c".to_string(), UpstreamPlan::Added)
            ]
        );
        assert_eq!(p.removed_upstreams, ["b"]);
        assert_eq!(p.max_connections, Some(200));
        assert!(p.log_changed);
        assert_eq!(
            p.notes,
            [
                "new connections are relayed through user space (splice off)",
                "UDP sockets bound from now on send with sendmmsg; the others keep theirs until a restart",
                "`workers` takes effect at the next restart"
            ]
        );
    }
}
