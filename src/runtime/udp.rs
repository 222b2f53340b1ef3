//! A UDP listener as the runtime serves it: the [`udp::Route`] and [`udp::Report`] that
//! `udp::serve` is given for each of the listener's sockets. Both read the listener's
//! current context from its slot, so a reload's new settings, limits and pool apply to new
//! sessions while the sessions already open keep theirs.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::frontend::FrontEnd;
use crate::listener::{ListenerCtx, Permit, Slot};
use crate::observe::{Dropped, ListenerStats, Outcome, Record};
use crate::policy::ClientPermit;
use crate::udp::{self, Admitted, Direction, Ended};
use crate::upstream::{Pool, ServerGuard};

/// One UDP listener's sessions: admitted under its limits, sent to its pool, logged.
pub struct Sessions {
    pub slot: Slot,
    /// The listener's counters (kept across reloads, as the slot's contexts share them).
    pub stats: Arc<ListenerStats>,
}

/// What a session holds while it lives: its places under the limits and on its server,
/// and the context it started with (for its record).
pub struct Held {
    ctx: Arc<ListenerCtx>,
    pool: Arc<Pool>,
    server: ServerGuard,
    client: Option<ClientPermit>,
    permit: Permit,
}

impl udp::Route for Sessions {
    type Guard = Held;

    fn admit(&self, client: SocketAddr, local: SocketAddr) -> Result<Admitted<Held>, Dropped> {
        let ctx = self.slot.load_full();
        let FrontEnd::Udp(settings) = ctx.front else {
            return Err(Dropped::NoServer);
        };
        if !ctx.acl.permits(client.ip()) {
            return Err(Dropped::Denied);
        }
        let client_permit = match &ctx.clients {
            None => None,
            Some(t) => Some(t.admit(client.ip()).map_err(|_| Dropped::ClientLimit)?),
        };
        let permit = Permit::try_new(&ctx).ok_or(Dropped::SessionLimit)?;
        // The listener's upstream (a UDP listener has no routes); counted as its default
        // route's match, as a TCP listener's connections are.
        let facts = crate::route::Facts {
            sni: None,
            alpn: crate::route::Alpn::Agreed(None),
            source: client.ip(),
            port: local.port(),
        };
        let pool = ctx
            .router
            .route(&facts)
            .map(|r| r.pool.clone())
            .ok_or(Dropped::NoServer)?;
        let server = pool.pick(client.ip(), &[]).map_err(|_| Dropped::NoServer)?;
        let header = pool.proxy_protocol.map(|_| {
            (
                crate::wire::proxy::encode_datagram(client, local),
                pool.proxy_every_datagram,
            )
        });
        let check_each = ctx.clients.as_ref().is_some_and(|t| t.limits_rate());
        Ok(Admitted {
            check_each,
            server: server.server().addr,
            settings,
            header,
            guard: Held {
                ctx,
                pool,
                server,
                client: client_permit,
                permit,
            },
        })
    }

    fn pass(&self, client: SocketAddr) -> bool {
        self.slot
            .load()
            .clients
            .as_ref()
            .is_none_or(|t| t.pass(client.ip()))
    }
}

impl udp::Report<Held> for Sessions {
    fn ended(&self, s: Ended<Held>) {
        let Held {
            ctx,
            pool,
            server,
            client,
            permit,
        } = s.guard;
        let stats = &server.server().stats;
        stats.bytes_up.add(s.bytes_up);
        stats.bytes_down.add(s.bytes_down);
        // Passive health: ICMP unreachable is a failed connect; a reply, a working server.
        match s.outcome {
            Outcome::ConnectFailed => pool.connect_failed(server.server()),
            _ if s.datagrams_down > 0 => pool.connect_succeeded(server.server()),
            _ => {}
        }
        // The places are free before the record says the session is over.
        drop((server, client, permit));
        ctx.stats.finish(s.outcome);
        let mut rec = Record::new(s.started, &ctx.name, s.client, s.outcome);
        rec.upstream = Some(&pool.name);
        rec.server = Some(s.server);
        rec.bytes_up = s.bytes_up;
        rec.bytes_down = s.bytes_down;
        rec.datagrams_up = Some(s.datagrams_up);
        rec.datagrams_down = Some(s.datagrams_down);
        rec.datagrams_kernel = Some(s.datagrams_kernel);
        rec.duration_ms = s.duration;
        rec.reason = s.reason.as_deref();
        ctx.access_log.write(&rec);
    }

    fn dropped(&self, client: SocketAddr, why: Dropped) {
        self.stats.drop_datagram(why);
        // A refused session is a record (sampled, as refused connections are); a datagram
        // of a session dropped on the way is only counted.
        if let Some(outcome) = why.outcome().filter(|_| why != Dropped::Rate) {
            let ctx = self.slot.load();
            let mut rec = Record::new(std::time::SystemTime::now(), &ctx.name, client, outcome);
            rec.reason = Some(why.as_str());
            rec.datagrams_up = Some(1);
            ctx.refuse(&rec);
        }
    }

    fn relayed(&self, way: Direction, datagrams: u64, bytes: usize) {
        // Counted on the worker's own cache line: no per-datagram contention.
        let (d, b) = match way {
            Direction::Up => (&self.stats.datagrams_up, &self.stats.bytes_up),
            Direction::Down => (&self.stats.datagrams_down, &self.stats.bytes_down),
        };
        d.add(datagrams);
        b.add(bytes as u64);
    }
}
