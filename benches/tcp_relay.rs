//! A plain TCP relay (one runtime thread, bytes copied both ways, no TLS, no HTTP): the floor
//! any proxy's extra hop costs on this machine. `benches/e2e.sh` runs it as the `relay` target
//! so keystamp's added latency and CPU are read against what relaying alone costs.
//!
//!   cargo bench --bench tcp_relay -- 127.0.0.1:18139 127.0.0.1:18443

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).filter(|arg| arg != "--bench");
    let (Some(listen), Some(target)) = (args.next(), args.next()) else {
        eprintln!("usage: tcp_relay LISTEN_ADDR TARGET_ADDR");
        std::process::exit(2);
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&listen).await?;
            loop {
                let (mut inbound, _) = listener.accept().await?;
                let target = target.clone();
                tokio::spawn(async move {
                    inbound.set_nodelay(true)?;
                    let mut outbound = TcpStream::connect(&target).await?;
                    outbound.set_nodelay(true)?;
                    copy_bidirectional(&mut inbound, &mut outbound).await?;
                    Ok::<_, std::io::Error>(())
                });
            }
        })
}
