//! Attaching to the capture ring: the kernel's (a group on `/dev/dm-replica`)
//! or a ring file (development mode).

use replica_ring::{Consumer, FileRelease, Release};

use super::drain::KernelRing;
use crate::config::{RingSource, SourceConfig};
use crate::DaemonError;

/// The ring consumer, whatever the ring's origin.
pub type RingConsumer = Consumer<Box<dyn Release>>;

/// Opens the configured ring; for a kernel ring also the control device
/// and the volume's index (for its dirty bitmap).
pub fn open_ring(cfg: &SourceConfig) -> Result<(RingConsumer, Option<KernelRing>), DaemonError> {
    match &cfg.ring {
        RingSource::File(p) => {
            let map = replica_ring::Mapping::open_file(p, true)?;
            Ok((
                Consumer::new(map, Box::new(FileRelease) as Box<dyn Release>)?,
                None,
            ))
        }
        RingSource::Group(g) => {
            let dev =
                replica_ring::device::Device::open(std::path::Path::new(&cfg.control_device))?;
            let consumer = dev.attach(g)?;
            // One source replicates one volume; find its index in the group.
            let device = consumer.releaser().device().clone();
            let vols = device.volumes()?;
            let Some(v) = vols.iter().find(|v| v.id == cfg.volume) else {
                return Err(DaemonError::Unsupported(format!(
                    "group {g:?} has no volume {:?} (it has: {})",
                    cfg.volume,
                    vols.iter()
                        .map(|v| v.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            if vols.len() > 1 {
                return Err(DaemonError::Unsupported(format!(
                    "group {g:?} holds {} volumes; this version replicates groups of one volume",
                    vols.len()
                )));
            }
            let size = v.sectors * 512;
            if size != cfg.volume_size {
                return Err(DaemonError::Unsupported(format!(
                    "volume {:?} is {size} bytes in the kernel but volume_size says {}",
                    cfg.volume, cfg.volume_size
                )));
            }
            tracing::info!(group = %g, volume = %cfg.volume, index = v.index, "attached to the kernel capture ring");
            let index = v.index;
            Ok((consumer.boxed(), Some(KernelRing { device, index })))
        }
    }
}
