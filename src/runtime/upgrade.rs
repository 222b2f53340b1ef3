//! The running ferry's side of an upgrade (the exchange is in [`crate::upgrade`]): the
//! control socket `ferry upgrade` connects to, the successor SIGUSR2 starts, handing the
//! listening sockets over, and the switch to draining once the new process confirms.
//! And the new process's last step, [`Proxy::complete_upgrade`].

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Proxy, Shared};
use crate::upgrade::{self as handover, EXCHANGE_TIMEOUT, READY_TIMEOUT};

/// A running process's upgrade state.
#[derive(Default)]
pub(super) struct State {
    /// Set while a hand-over is under way: one at a time.
    busy: AtomicBool,
    /// Cancelled once the new process has confirmed that it serves: this one drains.
    pub(super) handed_over: CancellationToken,
    /// The control socket's accept loop (its stop and its task).
    control: std::sync::Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

impl State {
    /// Whether a hand-over is under way.
    pub(super) fn in_progress(&self) -> bool {
        self.busy.load(Relaxed)
    }

    /// Closes the control socket (and waits until it is closed, so that its name is free).
    pub(super) async fn stop_listening(&self) {
        let control = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, task)) = control {
            stop.cancel();
            let _ = task.await;
        }
    }
}

/// Runs blocking `f` off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

impl Shared {
    /// Listens on the control socket of the config file (none in quick or demo mode), so
    /// that `ferry upgrade --config FILE` finds this process.
    pub(super) fn listen_for_upgrades(self: &Arc<Self>) {
        let Some(path) = &self.config_path else {
            return;
        };
        let mut control = self
            .upgrade
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if control.is_some() {
            return;
        }
        match handover::listen(path) {
            Ok((fd, name)) => {
                tracing::info!("control socket {name} (for `ferry upgrade`)");
                let stop = CancellationToken::new();
                let task = tokio::spawn(control_loop(self.clone(), fd, stop.clone()));
                *control = Some((stop, task));
            }
            Err(e) => tracing::warn!(
                "no control socket for `ferry upgrade` ({e}); SIGUSR2 still upgrades"
            ),
        }
    }

    /// SIGUSR2: starts this process's binary again, with its arguments, and hands over to
    /// it.
    pub(super) async fn upgrade_to_successor(self: Arc<Self>) {
        if self.upgrade.busy.swap(true, Relaxed) {
            tracing::warn!("an upgrade is already under way; SIGUSR2 ignored");
            return;
        }
        let started = handover::binary().and_then(|exe| {
            let (ours, theirs) = handover::pair()?;
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(std::env::args_os().skip(1))
                .env(handover::ENV_FD, theirs.as_raw_fd().to_string())
                .stdin(std::process::Stdio::null());
            let child = cmd.spawn().map_err(|e| {
                io::Error::new(e.kind(), format!("cannot start {}: {e}", exe.display()))
            })?;
            // The new process has its own descriptor of its end now.
            drop(theirs);
            Ok((exe, ours, child))
        });
        match started {
            Ok((exe, ours, child)) => {
                let pid = child.id().unwrap_or(0);
                tracing::info!("started {} (pid {pid}) to take over", exe.display());
                self.hand_over(ours, pid, Some(child)).await;
            }
            Err(e) => {
                tracing::error!("upgrade: {e}; this process goes on serving");
                self.upgrade.busy.store(false, Relaxed);
            }
        }
    }

    /// Hands over to the new process at the other end of `ch` (pid `pid`; `child` if this
    /// process started it). On success the signal loop drains this process; on failure it
    /// goes on serving, and a child that has not exited by itself is killed and reaped.
    async fn hand_over(
        self: Arc<Self>,
        ch: OwnedFd,
        pid: u32,
        child: Option<tokio::process::Child>,
    ) {
        match self.try_hand_over(ch, pid).await {
            Ok(()) => {
                handover::set_handed_over();
                // A successor this process started is in the service's cgroup: systemd's
                // main process from now on (announced by the main process, so that
                // `NotifyAccess=main` takes it; READY=1 on its behalf).
                if child.is_some() {
                    crate::systemd::notify(&format!(
                        "MAINPID={pid}\nREADY=1\nSTATUS=serving (pid {pid} took over from pid {}); pid {} drains {} connection(s)",
                        std::process::id(),
                        std::process::id(),
                        self.global.active()
                    ));
                }
                tracing::info!("pid {pid} serves the listening sockets now");
                self.admin_stop.cancel();
                self.upgrade.handed_over.cancel();
                // The successor outlives this process, which does not wait for it.
                drop(child);
            }
            Err(e) => {
                tracing::error!("upgrade to pid {pid} failed: {e}; this process goes on serving");
                if let Some(child) = child {
                    let grace = self.live.lock().await.cfg.global.drain_timeout;
                    tokio::spawn(reap(child, pid, grace));
                }
                self.upgrade.busy.store(false, Relaxed);
                self.listen_for_upgrades();
            }
        }
    }

    /// Sends the sockets, waits for `ready`, frees the control socket's name and confirms.
    /// Nothing is changed for good until the confirmation has gone: an error leaves this
    /// process as it was (its control socket to listen again).
    async fn try_hand_over(self: &Arc<Self>, ch: OwnedFd, pid: u32) -> io::Result<()> {
        let fds = self.listening_fds().await?;
        let n = fds.len();
        let ch = blocking(move || {
            handover::send_sockets(ch.as_fd(), &fds)?;
            // This process's copies stay with the listeners; these were for sending.
            drop(fds);
            handover::wait_ready(ch.as_fd(), READY_TIMEOUT)?;
            Ok(ch)
        })
        .await?;
        tracing::info!("pid {pid} is ready on the {n} socket(s) handed over");
        // The control socket's name is the new process's from now on.
        self.upgrade.stop_listening().await;
        blocking(move || handover::send_ok(ch.as_fd())).await
    }

    /// A descriptor of every listening socket, the listeners' and the admin server's, one
    /// per socket (the workers' descriptors of a shared socket are one socket).
    async fn listening_fds(&self) -> io::Result<Vec<OwnedFd>> {
        let live = self.live.lock().await;
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut add = |fd: &OwnedFd| -> io::Result<()> {
            let st = rustix::fs::fstat(fd)?;
            if seen.insert((st.st_dev, st.st_ino)) {
                out.push(fd.try_clone()?);
            }
            Ok(())
        };
        for g in live.listeners.values().flat_map(|l| &l.groups) {
            for fd in g.held.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                add(fd)?;
            }
        }
        if let Some(fd) = &*self.admin_fd.lock().unwrap_or_else(|e| e.into_inner()) {
            add(fd)?;
        }
        Ok(out)
    }
}

/// Reaps a successor whose upgrade failed: its channel is closed, so it exits by itself (it
/// had not started, or it drains what it accepted); else it is told to drain (SIGTERM),
/// and killed if it is still there after `grace` more.
async fn reap(mut child: tokio::process::Child, pid: u32, grace: Duration) {
    if let Ok(Ok(st)) = tokio::time::timeout(EXCHANGE_TIMEOUT, child.wait()).await {
        tracing::info!("the new process (pid {pid}) exited: {st}");
        return;
    }
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    }
    match tokio::time::timeout(grace + EXCHANGE_TIMEOUT, child.wait()).await {
        Ok(Ok(st)) => tracing::info!("the new process (pid {pid}) was stopped: {st}"),
        _ => {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, child.wait()).await;
            tracing::warn!("the new process (pid {pid}) was killed");
        }
    }
}

/// Accepts `ferry upgrade` connections on the control socket until `stop`.
async fn control_loop(shared: Arc<Shared>, fd: OwnedFd, stop: CancellationToken) {
    let listener = match crate::net::register_readable(fd) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("cannot register the control socket: {e}");
            return;
        }
    };
    loop {
        let mut ready = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.readable() => match r {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!("control socket: {e}");
                    return;
                }
            },
        };
        match handover::accept(listener.get_ref().as_fd()) {
            Ok((ch, pid)) => {
                tracing::info!("`ferry upgrade` from pid {pid}");
                let shared = shared.clone();
                tokio::spawn(async move {
                    if shared.upgrade.busy.swap(true, Relaxed) {
                        tracing::warn!("refused pid {pid}: an upgrade is already under way");
                        let _ = blocking(move || {
                            handover::refuse_busy(ch.as_fd());
                            Ok(())
                        })
                        .await;
                        return;
                    }
                    shared.hand_over(ch, pid, None).await;
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
            // Another user: refused at once (and never a reason to wait).
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::warn!("control socket: {e}")
            }
            Err(e) => {
                tracing::warn!("control socket: {e}");
                // Out of descriptors, say: not a busy loop.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Proxy {
    /// Taking over from another process (`ferry upgrade`, SIGUSR2): once this one serves,
    /// tells the old one, and waits until it confirms that it stops accepting; then serves
    /// the admin API (until then the old process answers it). Returns the old process's
    /// pid; `None` when this process took over from nobody. An error means the old process
    /// did not confirm: it may be serving too, or be gone. This one serves either way (two
    /// processes on the same sockets lose nothing; none would).
    pub async fn complete_upgrade(&mut self) -> io::Result<Option<u32>> {
        if !handover::pending() {
            return Ok(None);
        }
        let by_signal = handover::by_signal();
        let done = blocking(handover::finish).await;
        if let Some(serving) = self.admin_later.take() {
            let task = tokio::spawn(serving);
            *self
                .shared
                .admin_task
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        let old = done?;
        tracing::info!("took over from pid {old}, which drains its connections");
        // Started by SIGUSR2, the old process told systemd already.
        if !by_signal {
            crate::systemd::notify(&format!(
                "READY=1\nSTATUS={}",
                self.shared
                    .status_line(&format!("serving (took over from pid {old})"))
            ));
        }
        Ok(Some(old))
    }
}
