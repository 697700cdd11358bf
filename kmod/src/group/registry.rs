// SPDX-License-Identifier: GPL-2.0

//! The registry of groups, by name, and the volumes' membership: a table
//! adds its volume to its group (creating the group and its ring if needed)
//! and removes it when it goes; the last target of a group marks its ring
//! dead.

use core::sync::atomic::Ordering;

use kernel::c_str;
use kernel::prelude::*;
use kernel::sync::{new_mutex, Arc, Mutex};

use crate::capture::{self, Dirty};
use crate::dm::CtrError;

use super::{Group, Name, Volume, MAX_VOLUMES};

/// What a new table asks of its group.
pub(crate) struct Attach {
    pub(crate) group: Name,
    pub(crate) volume: Name,
    pub(crate) devt: u32,
    pub(crate) sectors: u64,
    pub(crate) ring_mib: Option<u32>,
    pub(crate) region_kib: u32,
    pub(crate) overflow_wait_ms: u32,
}

/// All groups, by name.
#[pin_data]
pub(crate) struct Registry {
    #[pin]
    groups: Mutex<KVec<Option<Arc<Group>>>>,
}

impl Registry {
    /// An empty registry.
    pub(crate) fn new() -> Result<Arc<Self>> {
        Arc::pin_init(
            pin_init!(Registry {
                groups <- new_mutex!(KVec::new(), "dm_replica_registry"),
            }),
            GFP_KERNEL,
        )
    }

    /// Looks up a live group by name.
    pub(crate) fn find(&self, name: &[u8]) -> Option<Arc<Group>> {
        let groups = self.groups.lock();
        groups.iter().flatten().find(|g| g.name.as_bytes() == name).cloned()
    }

    /// Adds a target's volume to its group (creating the group and its ring
    /// if needed). Returns the group and the volume's index in it.
    pub(crate) fn attach(&self, a: &Attach) -> Result<(Arc<Group>, u32), CtrError> {
        let mut groups = self.groups.lock();
        for g in groups.iter().flatten() {
            if g.name != a.group && g.has_volume(&a.volume) {
                pr_err!(
                    "table rejected: volume {} is already protected in group {}\n",
                    a.volume,
                    g.name
                );
                return Err(CtrError::invalid(c_str!(
                    "Volume id already in use in another group"
                )));
            }
        }
        let group = match groups.iter().flatten().find(|g| g.name == a.group) {
            Some(g) => {
                if let Some(mib) = a.ring_mib.filter(|&m| m != g.ring_mib) {
                    pr_err!(
                        "table rejected: group {} has a {} MiB ring, the table asks for {} MiB\n",
                        g.name,
                        g.ring_mib,
                        mib
                    );
                    return Err(CtrError::invalid(c_str!(
                        "Group exists with another ring size"
                    )));
                }
                g.clone()
            }
            None => {
                let mib = a.ring_mib.unwrap_or(crate::table::DEFAULT_RING_MIB);
                let g = Group::new(a.group, mib).map_err(|errno| {
                    pr_err!(
                        "table rejected: cannot allocate a {} MiB ring for group {} (error {})\n",
                        mib,
                        a.group,
                        errno.to_errno()
                    );
                    CtrError {
                        errno,
                        msg: c_str!("Cannot allocate the capture ring"),
                    }
                })?;
                match groups.iter_mut().find(|s| s.is_none()) {
                    Some(free) => *free = Some(g.clone()),
                    None => groups.push(Some(g.clone()), GFP_KERNEL).map_err(|_| CtrError {
                        errno: ENOMEM,
                        msg: c_str!("Cannot allocate the group registry entry"),
                    })?,
                }
                pr_info!(
                    "group {}: new {} MiB capture ring\n",
                    a.group,
                    mib
                );
                g
            }
        };
        let result = group.add_volume(a);
        if result.is_err() {
            // A group created for this table and left without volumes goes.
            let empty = group.state.lock().targets == 0;
            if empty {
                forget_group(&mut groups, &group);
                group.mark_dead();
            }
        }
        result.map(|idx| (group, idx))
    }

    /// Removes a target's volume reference; the last one removes the volume,
    /// the last target of the group removes the group (its ring is dead).
    pub(crate) fn detach(&self, group: &Arc<Group>, volume: u32) {
        let mut groups = self.groups.lock();
        let (removed, last) = {
            let mut st = group.state.lock();
            let removed = match st.volumes.get_mut(volume as usize) {
                Some(slot) => match slot {
                    Some(v) if v.targets > 1 => {
                        v.targets -= 1;
                        None
                    }
                    Some(_) => slot.take(),
                    None => None,
                },
                None => None,
            };
            if let Some(v) = &removed {
                st.dirty_total = st.dirty_total.wrapping_sub(v.dirty.dirty());
            }
            st.targets = st.targets.saturating_sub(1);
            group.publish_header(&st);
            (removed, st.targets == 0)
        };
        // Freed outside the spinlock (vfree may sleep).
        drop(removed);
        if last {
            forget_group(&mut groups, group);
            group.mark_dead();
            pr_info!("group {}: last target removed; capture ring closed\n", group.name);
        }
    }
}

/// Why a volume cannot be added to a group.
enum Refusal {
    /// The volume id is registered with other parameters (or the group is
    /// full): `EINVAL`.
    Conflict(&'static str),
    /// A new volume while a consumer that refuses joins is attached:
    /// `EBUSY`.
    Busy,
}

/// Removes `group` from the registry's slots.
fn forget_group(groups: &mut [Option<Arc<Group>>], group: &Arc<Group>) {
    for slot in groups.iter_mut() {
        if slot.as_ref().is_some_and(|g| Arc::ptr_eq(g, group)) {
            *slot = None;
        }
    }
}

impl Group {
    fn has_volume(&self, id: &Name) -> bool {
        let st = self.state.lock();
        st.volumes.iter().flatten().any(|v| v.id == *id)
    }

    fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
        let st = self.state.lock();
        self.publish_header(&st);
        drop(st);
        self.notify();
    }

    fn add_volume(&self, a: &Attach) -> Result<u32, CtrError> {
        let region_shift = a.region_kib.trailing_zeros() + 1;
        let regions = capture::regions_for(a.sectors, region_shift);
        let words = usize::try_from(capture::words_for(regions)).map_err(|_| CtrError::invalid(c_str!("Volume too large")))?;
        let nomem = CtrError {
            errno: ENOMEM,
            msg: c_str!("Cannot allocate the dirty bitmap"),
        };
        let mut bits = KVVec::with_capacity(words, GFP_KERNEL).map_err(|_| nomem)?;
        for _ in 0..words {
            bits.push(0u64, GFP_KERNEL).map_err(|_| nomem)?;
        }
        let dirty = Dirty::new(region_shift, regions, bits).ok_or(CtrError::invalid(c_str!("Bad region size")))?;
        let mut fresh = Some(Volume {
            id: a.volume,
            devt: a.devt,
            sectors: a.sectors,
            region_kib: a.region_kib,
            dirty,
            targets: 1,
            overflow_in_flight: 0,
        });
        let mut st = self.state.lock();
        let existing = st
            .volumes
            .iter()
            .position(|v| v.as_ref().is_some_and(|v| v.id == a.volume));
        let result = match (existing, st.targets.checked_add(1)) {
            // Cannot happen (a u32 of tables).
            (_, None) => Err(Refusal::Conflict("too many tables")),
            // A volume of the group (a reload, or another table of it): its
            // records are already in the stream.
            (Some(i), Some(_)) => {
                let v = st.volumes.get_mut(i).and_then(Option::as_mut);
                match v {
                    Some(v) if v.devt != a.devt => Err(Refusal::Conflict("another data device")),
                    Some(v) if v.sectors != a.sectors => Err(Refusal::Conflict("another size")),
                    Some(v) if v.region_kib != a.region_kib => {
                        Err(Refusal::Conflict("another region size"))
                    }
                    Some(v) => match v.targets.checked_add(1) {
                        Some(n) => {
                            v.targets = n;
                            Ok(i)
                        }
                        None => Err(Refusal::Conflict("too many tables")),
                    },
                    None => Err(Refusal::Conflict("a vanished entry")),
                }
            }
            // A new member: not while a consumer that did not allow joins
            // is attached.
            (None, Some(_)) if st.consumer && !st.joins_allowed => Err(Refusal::Busy),
            (None, Some(_)) => match st.volumes.iter().position(Option::is_none) {
                Some(i) => {
                    if let Some(slot) = st.volumes.get_mut(i) {
                        *slot = fresh.take();
                    }
                    Ok(i)
                }
                None => Err(Refusal::Conflict("no free volume slot")),
            },
        };
        if result.is_ok() {
            st.targets = st.targets.saturating_add(1);
            st.overflow_wait_ns = u64::from(a.overflow_wait_ms) * 1_000_000;
        }
        drop(st);
        // An unused bitmap is freed outside the spinlock.
        drop(fresh);
        match result {
            Ok(i) => u32::try_from(i).map_err(|_| CtrError::invalid(c_str!("Bad volume index"))),
            Err(Refusal::Busy) => {
                pr_err!(
                    "table rejected: group {} has an attached consumer that does not accept new members: volume {} cannot join it while it is replicated (EBUSY; reloading a member's table still works)\n",
                    self.name,
                    a.volume
                );
                Err(CtrError {
                    errno: EBUSY,
                    msg: c_str!("Group has an attached consumer that does not accept new members"),
                })
            }
            Err(Refusal::Conflict(why)) => {
                pr_err!(
                    "table rejected: volume {} in group {} is already registered with {} (or the group is full: {} volumes)\n",
                    a.volume,
                    self.name,
                    why,
                    MAX_VOLUMES
                );
                Err(CtrError::invalid(c_str!(
                    "Volume already registered with other parameters"
                )))
            }
        }
    }
}
