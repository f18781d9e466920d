//! A TCP proxy in front of a test cluster's Unix socket that can stall (keep every connection
//! open and forward nothing, like a black-holed link or a frozen middlebox) or cut (close every
//! connection) on demand.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Stall,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    /// Bumped by `cut`: connections of an older generation close.
    generation: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to the server's socket in `socket_dir`.
    pub async fn start(socket_dir: &std::path::Path, server_port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = socket_dir.join(format!(".s.PGSQL.{server_port}"));
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (generation, gen_rx) = watch::channel(0u64);
        let target = Arc::new(target);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(relay(
                    client,
                    target.clone(),
                    mode_rx.clone(),
                    gen_rx.clone(),
                ));
            }
        });
        Proxy {
            port,
            mode,
            generation,
            accept,
        }
    }

    /// Forwards nothing from now on (connections stay open; new ones are accepted).
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Forwards again.
    pub fn pass(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// Closes every connection open now.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(
    client: tokio::net::TcpStream,
    target: Arc<PathBuf>,
    mode: watch::Receiver<Mode>,
    mut generation: watch::Receiver<u64>,
) {
    let born = *generation.borrow_and_update();
    let mut waiting = mode.clone();
    // A connection made while stalled waits, like the rest, before reaching the server.
    if waiting.wait_for(|m| *m == Mode::Pass).await.is_err() {
        return;
    }
    let Ok(server) = tokio::net::UnixStream::connect(target.as_path()).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone());
    let down = pump(sr, cw, mode);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = generation.wait_for(|g| *g != born) => {}
    }
}

/// Copies `from` to `to`, holding each chunk while the mode is `Stall`.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if mode.wait_for(|m| *m == Mode::Pass).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if mode.wait_for(|m| *m == Mode::Pass).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
