//! A tiny HTTP/1.1 host for tests, plain or over TLS: every connection's request is read up
//! to the end of its head and answered with the bytes the caller's function gives for its
//! path (status line, headers and body, written as given), then closed.

use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Serves on a free loopback port until the runtime ends; its base URL (`https://` with
/// `tls`, else `http://`).
pub async fn serve<F, Fut>(tls: Option<TlsAcceptor>, answer: F) -> String
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Vec<u8>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, answer) = (tls.clone(), answer.clone());
            tokio::spawn(async move {
                match tls {
                    // A client refusing the certificate ends the handshake: nothing to do.
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            reply(stream, answer).await;
                        }
                    }
                    None => reply(tcp, answer).await,
                }
            });
        }
    });
    format!("{scheme}://{addr}")
}

async fn reply<S, F, Fut>(mut stream: S, answer: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Vec<u8>>,
{
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
    let out = answer(path).await;
    // A client may hang up early (e.g. past its size limit): write errors are expected.
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}
