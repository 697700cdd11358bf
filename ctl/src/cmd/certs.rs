//! `replctl certs`: a private CA and host certificates.

use crate::cli::CertsCmd;
use crate::error::CtlError;

/// Runs a `certs` command.
pub fn run(cmd: CertsCmd) -> Result<(), CtlError> {
    match cmd {
        CertsCmd::Generate { out, hosts, days } => {
            crate::certs::generate(&out, &hosts, days)?;
            println!(
                "wrote ca.pem/ca.key and {} host certificate(s) to {}",
                hosts.len(),
                out.display()
            );
        }
        CertsCmd::Issue {
            ca_dir,
            out,
            host,
            days,
        } => {
            crate::certs::issue(&ca_dir, &out, &host, days)?;
            println!("wrote {host}.pem and {host}.key to {}", out.display());
        }
    }
    Ok(())
}
