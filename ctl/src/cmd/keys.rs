//! `replctl keys`: generate, rotate and retire data keys.

use replica_proto::keys::KeyRing;

use crate::cli::KeysCmd;
use crate::error::CtlError;

/// Runs a `keys` command.
pub fn run(cmd: KeysCmd) -> Result<(), CtlError> {
    match cmd {
        KeysCmd::Generate { out } => {
            let kr = KeyRing::generate()?;
            kr.save(&out, false)?;
            println!(
                "wrote {} (key id {}); copy it to the other site over a secure channel",
                out.display(),
                kr.active()
            );
        }
        KeysCmd::Rotate { file } => {
            let mut kr = KeyRing::load(&file)?;
            let id = kr.rotate()?;
            kr.save(&file, true)?;
            println!(
                "key id {id} is now active in {}; install the file on both sites",
                file.display()
            );
        }
        KeysCmd::Retire { file, state_dir } => {
            let needed = crate::keys::needed_key_ids(&state_dir)?;
            let mut kr = KeyRing::load(&file)?;
            let gone = kr.retire(&needed);
            if gone.is_empty() {
                println!(
                    "nothing to retire: keys {:?} are active or still needed by journaled segments",
                    kr.ids()
                );
            } else {
                kr.save(&file, true)?;
                println!(
                    "retired key id(s) {gone:?} from {}; kept {:?}; install the file on both sites",
                    file.display(),
                    kr.ids()
                );
            }
        }
    }
    Ok(())
}
