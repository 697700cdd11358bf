//! `dmr-peer`: a hostile replication peer for the VM tests.
//!
//! It opens a replication connection with the certificate and key ring it
//! is given and says a hello of its choosing, confirmed with its own key
//! ring's key, then prints what the target answered:
//!
//! ```text
//! dmr-peer hello --target ADDR --ca CA --cert CERT --key KEY --keys KEYRING
//!                --volume ID [--epoch N] [--generation HEX32] [--resync]
//! ```
//!
//! Output: `refused <code>: <message>` (exit 0), `welcomed durable=<seq>
//! epoch=<n>` (exit 0; the target took the hello), or `error: ...` (exit 1:
//! the connection itself failed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use replica_proto::confirm::{EXPORTER_LABEL, EXPORTER_LEN};
use replica_proto::handshake::SourceSide;
use replica_proto::msg::{Hello, PROTOCOL_FEATURES, PROTOCOL_VERSION};

#[derive(Parser)]
#[command(about = "A hostile replication peer for the dm-replica VM tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Says a hello and prints the answer.
    Hello {
        /// Target address, host:port.
        #[arg(long)]
        target: String,
        /// The target's TLS name.
        #[arg(long, default_value = "target-host")]
        name: String,
        /// CA certificate.
        #[arg(long)]
        ca: PathBuf,
        /// Client certificate.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key.
        #[arg(long)]
        key: PathBuf,
        /// The key ring to confirm with.
        #[arg(long)]
        keys: PathBuf,
        /// Volume id.
        #[arg(long)]
        volume: String,
        /// Epoch announced.
        #[arg(long, default_value_t = 1)]
        epoch: u64,
        /// Ring generation announced (32 hex digits).
        #[arg(long, default_value = "ffffffffffffffffffffffffffffffff")]
        generation: String,
        /// Announce a resync (a takeover by a new ring generation).
        #[arg(long)]
        resync: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<String, String> {
    let Cmd::Hello {
        target,
        name,
        ca,
        cert,
        key,
        keys,
        volume,
        epoch,
        generation,
        resync,
    } = cli.cmd;
    let tls = replicad::config::TlsConfig { ca, cert, key };
    let mut link = replica_tests::tls_link(&tls, &target, &name, Duration::from_secs(20))?;
    let ring = replica_proto::keys::KeyRing::load(&keys).map_err(|e| e.to_string())?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        features: PROTOCOL_FEATURES,
        volume,
        generation,
        epoch,
        source_random: hex::encode(replica_proto::keys::random16().map_err(|e| e.to_string())?),
        oldest_seq: 1,
        key_id: ring.active(),
        resync,
        replica_seeded: true,
        ping_interval_ms: 0,
    };
    let mut exporter = [0u8; EXPORTER_LEN];
    link.export(EXPORTER_LABEL, &mut exporter)
        .map_err(|e| e.to_string())?;
    let (mut opening, first) =
        SourceSide::new(&ring, &exporter, hello).map_err(|e| e.to_string())?;
    for m in &first {
        link.send(m);
    }
    Ok(
        match replica_tests::answer(&mut link, &mut opening, Duration::from_secs(30))? {
            Ok(w) => format!("welcomed durable={} epoch={}", w.durable_seq, w.epoch),
            Err(e) => format!("refused {}: {}", e.code, e.message),
        },
    )
}
