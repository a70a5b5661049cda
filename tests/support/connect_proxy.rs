//! A loopback HTTP `CONNECT` proxy, as corporate proxies and `HTTPS_PROXY` expect: it opens
//! a tunnel to the target the client names and copies bytes both ways, counting the tunnels
//! it opened by target. It refuses targets off loopback, and, started with
//! [`ConnectProxy::start_ssl_ports_only`], every port but 443 as many forward proxies do
//! (squid's default `http_access deny CONNECT !SSL_ports`), counting what it refused.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

/// A running proxy; it serves until the test process ends.
pub struct ConnectProxy {
    addr: SocketAddr,
    tunnels: Arc<Mutex<BTreeMap<String, usize>>>,
    refused: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        Self::serve(false)
    }

    /// A proxy that tunnels only to port 443 and answers 403 to any other `CONNECT`.
    pub fn start_ssl_ports_only() -> ConnectProxy {
        Self::serve(true)
    }

    fn serve(ssl_ports_only: bool) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let proxy = ConnectProxy {
            addr,
            tunnels: Arc::default(),
            refused: Arc::default(),
        };
        let (tunnels, refused) = (proxy.tunnels.clone(), proxy.refused.clone());
        thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let (tunnels, refused) = (tunnels.clone(), refused.clone());
                thread::spawn(move || {
                    let _ = tunnel(client, ssl_ports_only, &tunnels, &refused);
                });
            }
        });
        proxy
    }

    /// How many `CONNECT`s to `target` (`host:port`) were refused.
    pub fn refused_to(&self, target: &str) -> usize {
        self.refused
            .lock()
            .unwrap()
            .get(target)
            .copied()
            .unwrap_or(0)
    }

    /// `http://127.0.0.1:PORT`, the form `HTTPS_PROXY` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many tunnels were opened to `target` (`host:port`).
    pub fn tunnels_to(&self, target: &str) -> usize {
        self.tunnels
            .lock()
            .unwrap()
            .get(target)
            .copied()
            .unwrap_or(0)
    }

    /// Every tunnel opened, by target.
    pub fn tunnels(&self) -> BTreeMap<String, usize> {
        self.tunnels.lock().unwrap().clone()
    }
}

fn tunnel(
    client: TcpStream,
    ssl_ports_only: bool,
    counts: &Mutex<BTreeMap<String, usize>>,
    refused: &Mutex<BTreeMap<String, usize>>,
) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        (&client).write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    };
    let upstream = match target.parse::<SocketAddr>() {
        Ok(addr) if ssl_ports_only && addr.port() != 443 => {
            *refused
                .lock()
                .unwrap()
                .entry(target.to_owned())
                .or_default() += 1;
            (&client).write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        }
        Ok(addr) if addr.ip().is_loopback() => TcpStream::connect(addr)?,
        _ => {
            (&client).write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        }
    };
    *counts.lock().unwrap().entry(target.to_owned()).or_default() += 1;
    (&client).write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    // Bytes the reader already buffered belong to the tunnel.
    let buffered = reader.buffer().to_vec();
    (&upstream).write_all(&buffered)?;
    let (mut up_read, mut down_write) = (upstream.try_clone()?, client.try_clone()?);
    let down = thread::spawn(move || {
        let _ = io::copy(&mut up_read, &mut down_write);
        let _ = down_write.shutdown(Shutdown::Write);
    });
    let mut client_read = reader.into_inner();
    let mut up_write = upstream;
    let _ = io::copy(&mut client_read as &mut dyn Read, &mut up_write);
    let _ = up_write.shutdown(Shutdown::Write);
    let _ = down.join();
    Ok(())
}
