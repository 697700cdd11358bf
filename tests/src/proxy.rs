//! A TCP proxy that can blackhole its path: a dead network without FIN or
//! RST, as when a route or a firewall drops every packet.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the proxy's threads look at the switch.
const TICK: Duration = Duration::from_millis(20);

/// Forwards connections on a loopback port to `upstream`. While
/// [blackholed](Proxy::blackhole) nothing is forwarded in either direction
/// on the connections of the time, which stay open forever after (no FIN,
/// no RST, what was not forwarded is dropped), and new connections are
/// accepted and left hanging. [`Proxy::restore`] forwards new connections
/// again; the blackholed ones stay dead.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    blackholed: AtomicBool,
    stop: AtomicBool,
    /// The dead flag of every forwarded connection.
    conns: Mutex<Vec<Arc<AtomicBool>>>,
    /// Sockets of dead connections, kept open until the proxy is dropped.
    held: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn hold(&self, s: TcpStream) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`
    /// (`host:port`).
    pub fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream.parse().expect("upstream address");
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            blackholed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(&listener, &s));
        Self {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Where sources connect.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The path goes dead: nothing more is forwarded on any connection of
    /// now, and new connections hang.
    pub fn blackhole(&self) {
        self.shared.blackholed.store(true, Ordering::Release);
        for dead in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            dead.store(true, Ordering::Release);
        }
    }

    /// New connections are forwarded again.
    pub fn restore(&self) {
        self.shared.blackholed.store(false, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.blackhole();
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((client, _)) => {
                if shared.blackholed.load(Ordering::Acquire) {
                    shared.hold(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(shared.upstream) else {
                    // Nothing listens upstream: the client sees it close.
                    continue;
                };
                let dead = Arc::new(AtomicBool::new(false));
                shared
                    .conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(dead.clone());
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let (dead, shared) = (dead.clone(), shared.clone());
                    std::thread::spawn(move || forward(from, to, &dead, &shared));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(TICK),
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// Copies `from` to `to` until either end closes, passing the close on;
/// once `dead` is set, forwards nothing more and keeps both sockets open.
fn forward(mut from: TcpStream, mut to: TcpStream, dead: &AtomicBool, shared: &Shared) {
    let _ = from.set_read_timeout(Some(TICK));
    let _ = to.set_write_timeout(Some(TICK));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if dead.load(Ordering::Acquire) {
            shared.hold(from);
            shared.hold(to);
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        };
        let mut off = 0;
        while off < n {
            if dead.load(Ordering::Acquire) {
                break;
            }
            match to.write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }
}
