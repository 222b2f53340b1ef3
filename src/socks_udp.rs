//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7): a UDP relay for one client, for as long as its TCP
//! control connection stays open.
//!
//! The relay socket is bound on the address the client reached ferry at, and takes
//! datagrams only from the client's address (its port too, once the client has declared or
//! used one). Each datagram's destination passes the listener's destination policy, as a
//! CONNECT's would; fragments (FRAG ≠ 0) are dropped. Datagrams go out from one socket per
//! address family, and a reply is passed back only from an address the client has sent
//! to (so nobody else can inject datagrams through the relay), with the SOCKS header that
//! names its source. It ends when the control connection closes, after `idle_timeout`
//! without a datagram or a byte on it, or at drain.
//!
//! The buffers are the association's own, allocated once; a name is resolved once and
//! remembered for the association's life (a handful of entries).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::Dial;
use crate::destinations::canonical;
use crate::net::Sock;
use crate::upstream::dial::{Host, Policy, Target};
use crate::wire::socks5::{self, UDP_HEADER_MAX};

/// How an association ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed its control connection.
    Done,
    IdleTimeout,
    ClientReset,
    Drained,
}

/// What an association moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub datagrams_up: u64,
    pub datagrams_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Datagrams dropped: from another address, fragments, bad headers, destinations not
    /// allowed or not resolved, replies from addresses the client has not sent to.
    pub dropped: u64,
}

/// Destinations remembered per association (replies are accepted from these only).
const PEERS: usize = 256;
/// Names remembered per association.
const NAMES: usize = 16;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// A bound relay socket, before it serves.
pub struct Association {
    relay: UdpSocket,
    /// The client's address; its port once known.
    client: SocketAddr,
    client_port_known: bool,
}

impl Association {
    /// Binds the relay socket on `local_ip` (where the client reached ferry). `hint` is the
    /// address the client said it will send from (often unspecified).
    pub async fn bind(
        local_ip: IpAddr,
        peer: SocketAddr,
        hint: SocketAddr,
    ) -> io::Result<Association> {
        let relay = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
        let client_port_known = hint.port() != 0;
        let port = if client_port_known {
            hint.port()
        } else {
            peer.port()
        };
        Ok(Association {
            relay,
            client: SocketAddr::new(canonical(peer.ip()), port),
            client_port_known,
        })
    }

    /// Where the client is to send its datagrams.
    pub fn bound(&self) -> io::Result<SocketAddr> {
        self.relay.local_addr()
    }

    /// Relays until the control connection closes, `idle` passes without traffic, or
    /// `stop` is cancelled.
    pub async fn run(
        mut self,
        control: &Sock,
        policy: &Policy<'_>,
        dial: &Dial,
        idle: Duration,
        stop: &CancellationToken,
    ) -> (End, Counts) {
        let mut st = State {
            c: Counts::default(),
            buf: vec![0u8; UDP_HEADER_MAX + MAX_DATAGRAM],
            out4: None,
            out6: None,
            peers: VecDeque::new(),
            names: VecDeque::new(),
        };
        let mut scratch = [0u8; 512];
        let sleep = tokio::time::sleep(idle);
        tokio::pin!(sleep);
        loop {
            enum Ev {
                Client,
                Reply4,
                Reply6,
                Control(io::Result<usize>),
                Idle,
                Stop,
            }
            let ev = tokio::select! {
                r = self.relay.readable() => match r { Ok(()) => Ev::Client, Err(_) => Ev::Stop },
                Some(()) = readable(st.out4.as_ref()) => Ev::Reply4,
                Some(()) = readable(st.out6.as_ref()) => Ev::Reply6,
                r = crate::net::read_some(control, &mut scratch) => Ev::Control(r),
                () = &mut sleep => Ev::Idle,
                () = stop.cancelled() => Ev::Stop,
            };
            let moved = match ev {
                Ev::Client => self.upstream(&mut st, policy, dial).await,
                Ev::Reply4 => self.downstream(&mut st, false).await,
                Ev::Reply6 => self.downstream(&mut st, true).await,
                // The client sends nothing more on the control connection; anything it does
                // send is ignored.
                Ev::Control(Ok(0)) => return (End::Done, st.c),
                Ev::Control(Ok(_)) => true,
                Ev::Control(Err(_)) => return (End::ClientReset, st.c),
                Ev::Idle => return (End::IdleTimeout, st.c),
                Ev::Stop => return (End::Drained, st.c),
            };
            if moved {
                sleep.as_mut().reset(crate::clock::later(idle));
            }
        }
    }

    /// Takes the datagrams waiting on the relay socket (a bounded batch). Whether any was
    /// relayed.
    async fn upstream(&mut self, st: &mut State, policy: &Policy<'_>, dial: &Dial) -> bool {
        let mut moved = false;
        for _ in 0..BATCH {
            let (n, from) = match self.relay.try_recv_from(&mut st.buf) {
                Ok(r) => r,
                Err(_) => break,
            };
            let from = SocketAddr::new(canonical(from.ip()), from.port());
            if from.ip() != self.client.ip()
                || (self.client_port_known && from.port() != self.client.port())
            {
                st.c.dropped += 1;
                continue;
            }
            if !self.client_port_known {
                self.client = from;
                self.client_port_known = true;
            }
            let (target, payload_at) = match socks5::udp_header(&st.buf[..n]) {
                Ok(p) if p.frag == 0 => {
                    let t = match p.target {
                        socks5::Target::Ip(a) => Target::addr(a),
                        socks5::Target::Name(name, port) => Target::name(name, port),
                    };
                    (t, n - p.payload.len())
                }
                _ => {
                    st.c.dropped += 1;
                    continue;
                }
            };
            let Some(dst) = st.resolve(&target, policy, dial).await else {
                st.c.dropped += 1;
                continue;
            };
            let slot = if dst.is_ipv4() {
                &mut st.out4
            } else {
                &mut st.out6
            };
            let out = match out_socket(slot, dst, dial) {
                Ok(o) => o,
                Err(_) => {
                    st.c.dropped += 1;
                    continue;
                }
            };
            let payload = &st.buf[payload_at..n];
            // Sent with a wait for room (a socket made just now has no readiness yet).
            match out.send_to(payload, dst).await {
                Ok(_) => {
                    st.c.datagrams_up += 1;
                    st.c.bytes_up += payload.len() as u64;
                    moved = true;
                    if !st.peers.contains(&dst) {
                        if st.peers.len() == PEERS {
                            st.peers.pop_front();
                        }
                        st.peers.push_back(dst);
                    }
                }
                Err(_) => st.c.dropped += 1,
            }
        }
        moved
    }

    /// Passes replies waiting on an outbound socket back to the client.
    async fn downstream(&mut self, st: &mut State, v6: bool) -> bool {
        let mut moved = false;
        for _ in 0..BATCH {
            let sock = if v6 {
                st.out6.as_ref()
            } else {
                st.out4.as_ref()
            };
            let Some(sock) = sock else { break };
            let (n, from) = match sock.try_recv_from(&mut st.buf[UDP_HEADER_MAX..]) {
                Ok(r) => r,
                Err(_) => break,
            };
            let from = SocketAddr::new(canonical(from.ip()), from.port());
            if !st.peers.contains(&from) || !self.client_port_known {
                st.c.dropped += 1;
                continue;
            }
            let mut header = [0u8; UDP_HEADER_MAX];
            let h = socks5::encode_udp_header(from, &mut header);
            let start = UDP_HEADER_MAX - h;
            st.buf[start..UDP_HEADER_MAX].copy_from_slice(&header[..h]);
            match self
                .relay
                .send_to(&st.buf[start..UDP_HEADER_MAX + n], self.client)
                .await
            {
                Ok(_) => {
                    st.c.datagrams_down += 1;
                    st.c.bytes_down += n as u64;
                    moved = true;
                }
                Err(_) => st.c.dropped += 1,
            }
        }
        moved
    }
}

/// Datagrams taken per wake-up and direction, so that one busy direction cannot hold the
/// worker.
const BATCH: usize = 64;

struct State {
    c: Counts,
    buf: Vec<u8>,
    out4: Option<UdpSocket>,
    out6: Option<UdpSocket>,
    /// Destinations the client sent to, oldest first.
    peers: VecDeque<SocketAddr>,
    /// Names resolved, with the address chosen (`None`: not allowed or not resolved).
    names: VecDeque<(Box<str>, u16, Option<SocketAddr>)>,
}

impl State {
    /// The address to send to for `target`, if the policy allows one.
    async fn resolve(
        &mut self,
        target: &Target,
        policy: &Policy<'_>,
        dial: &Dial,
    ) -> Option<SocketAddr> {
        match &target.host {
            Host::Ip(ip) => {
                let a = SocketAddr::new(*ip, target.port);
                policy.allows(target, a).then_some(a)
            }
            Host::Name(name) => {
                if let Some((_, _, a)) = self
                    .names
                    .iter()
                    .find(|(n, p, _)| n == name && *p == target.port)
                {
                    return *a;
                }
                let found = if policy.may_allow_name(name, target.port) {
                    tokio::time::timeout(
                        dial.connect_timeout,
                        tokio::net::lookup_host((&**name, target.port)),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|mut addrs| addrs.find(|a| policy.allows(target, *a)))
                } else {
                    None
                };
                if self.names.len() == NAMES {
                    self.names.pop_front();
                }
                self.names.push_back((name.clone(), target.port, found));
                found
            }
        }
    }
}

/// The outbound socket in `slot` for `dst`'s family, made on first use.
fn out_socket<'a>(
    slot: &'a mut Option<UdpSocket>,
    dst: SocketAddr,
    dial: &Dial,
) -> io::Result<&'a UdpSocket> {
    if slot.is_none() {
        let any: SocketAddr = if dst.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = socket2::Socket::new(
            socket2::Domain::for_address(any),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if dst.is_ipv6() {
            s.set_only_v6(true)?;
        }
        if let Some(m) = dial.mark {
            s.set_mark(m)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&any.into())?;
        *slot = Some(UdpSocket::from_std(s.into())?);
    }
    slot.as_ref().ok_or_else(|| io::Error::other("no socket"))
}

/// Readiness of an optional socket (never, without one).
async fn readable(s: Option<&UdpSocket>) -> Option<()> {
    match s {
        Some(s) => s.readable().await.ok(),
        None => std::future::pending().await,
    }
}
