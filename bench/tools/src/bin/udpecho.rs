//! UDP echo server: the backend of the udp-64 and udp-1400 measurements. Every datagram is
//! sent back, unchanged, to the address it came from.
//!
//! Built not to be the bottleneck: `--threads` sockets bound to the same address with
//! SO_REUSEPORT (the kernel spreads the senders over them by their address and port), each
//! served by its own thread with blocking `recvmmsg` (MSG_WAITFORONE: returns as soon as
//! one datagram is there, with up to `--batch` of them) and one `sendmmsg` of the whole
//! batch back; large socket buffers (SO_RCVBUFFORCE when root, else SO_RCVBUF up to
//! net.core.rmem_max). Runs until killed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use clap::Parser;
use ferry_bench_tools::{udp_socket, UdpSocketOpts};

#[derive(Parser, Debug)]
#[command(about = "Multi-threaded UDP echo server (SO_REUSEPORT, recvmmsg/sendmmsg)")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:9000.
    #[arg(long)]
    listen: SocketAddr,
    /// Threads, each with its own SO_REUSEPORT socket.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Datagrams per recvmmsg/sendmmsg call at most.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Socket receive and send buffer size in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    buffer: usize,
}

/// The largest datagram echoed whole (bigger ones are truncated to this).
const MAX_DATAGRAM: usize = 65_536;

fn serve(fd: RawFd, batch: usize) {
    // SAFETY (whole function): the mmsghdr/iovec arrays point into `bufs` and `addrs`,
    // which live as long as the loop and are not moved while the kernel writes into them.
    let mut bufs = vec![0u8; batch * MAX_DATAGRAM];
    let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; batch];
    let mut iovs: Vec<libc::iovec> = (0..batch)
        .map(|i| libc::iovec {
            iov_base: bufs[i * MAX_DATAGRAM..].as_mut_ptr().cast(),
            iov_len: MAX_DATAGRAM,
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; batch];
    loop {
        for i in 0..batch {
            iovs[i].iov_len = MAX_DATAGRAM;
            let h = &mut hdrs[i];
            h.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                batch as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("udpecho: recvmmsg: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            continue;
        }
        let n = n as usize;
        for i in 0..n {
            // Send back exactly what came (the kernel left the sender in msg_name).
            iovs[i].iov_len = hdrs[i].msg_len as usize;
        }
        let mut off = 0;
        while off < n {
            let m = unsafe {
                libc::sendmmsg(fd, hdrs[off..].as_mut_ptr(), (n - off) as libc::c_uint, 0)
            };
            if m < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // This datagram cannot go (its sender vanished, ...): skip it.
                off += 1;
            } else {
                off += m as usize;
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    let threads = args.threads.max(1);
    let batch = args.batch.clamp(1, 1024);
    let opts = UdpSocketOpts {
        reuseport: true,
        buffer: Some(args.buffer),
        ..Default::default()
    };
    let mut socks = Vec::new();
    for _ in 0..threads {
        match udp_socket(Some(args.listen), None, &opts) {
            Ok(s) => socks.push(s),
            Err(e) => {
                eprintln!("udpecho: bind {}: {e}", args.listen);
                std::process::exit(1);
            }
        }
    }
    let handles: Vec<_> = socks
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                use std::os::fd::AsRawFd;
                serve(s.as_raw_fd(), batch);
                drop(s);
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}
