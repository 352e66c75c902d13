//! Priority tiers and the rotation within each: plain round-robin (one atomic counter) when
//! every backend of the tier has the same weight, else smooth weighted round-robin.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::health::{Admission, BackendHealth, LazyNow};

/// The backends of one priority, in the order they were given.
pub(crate) struct Tier {
    pub(crate) priority: u32,
    /// Indices into the balance's backends.
    members: Box<[usize]>,
    rotation: Rotation,
}

enum Rotation {
    /// Every member weighs the same: the next pick starts after the last one.
    RoundRobin(AtomicUsize),
    /// nginx's smooth weighted round-robin: each pick adds each candidate's weight to its
    /// current value, takes the candidate with the largest, and subtracts the candidates' total
    /// weight from it. Weights 3 and 1 give a a b a, a a b a, ...
    Weighted {
        weights: Box<[i64]>,
        current: Mutex<Box<[i64]>>,
    },
}

impl Tier {
    /// Groups `backends` into tiers, best (lowest priority number) first; within a tier,
    /// backends keep the order they were given.
    pub(crate) fn build(backends: &[BackendHealth]) -> Box<[Tier]> {
        let mut priorities: Vec<u32> = backends.iter().map(|b| b.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        priorities
            .into_iter()
            .map(|priority| {
                let members: Box<[usize]> = (0..backends.len())
                    .filter(|&i| backends[i].priority == priority)
                    .collect();
                let weights: Box<[i64]> = members
                    .iter()
                    .map(|&i| i64::from(backends[i].weight))
                    .collect();
                let rotation = if weights.windows(2).all(|w| w[0] == w[1]) {
                    Rotation::RoundRobin(AtomicUsize::new(0))
                } else {
                    Rotation::Weighted {
                        current: Mutex::new(vec![0; weights.len()].into()),
                        weights,
                    }
                };
                Tier {
                    priority,
                    members,
                    rotation,
                }
            })
            .collect()
    }

    /// Picks the member that takes this request, in the tier's rotation, among those for which
    /// `skip` is false; claims its trial if it is on trial. Returns its index and whether the
    /// request is its trial.
    pub(crate) fn pick(
        &self,
        backends: &[BackendHealth],
        now: &LazyNow<'_>,
        skip: impl Fn(usize) -> bool,
    ) -> Option<(usize, bool)> {
        let admit = |index: usize| admit(backends, now, index);
        let count = self.members.len();
        match &self.rotation {
            Rotation::RoundRobin(next) => {
                let start = next.fetch_add(1, Ordering::Relaxed) % count;
                (0..count)
                    .map(|step| self.members[(start + step) % count])
                    .filter(|&i| !skip(i))
                    .find_map(admit)
            }
            Rotation::Weighted { weights, current } => {
                let mut current = current.lock().unwrap_or_else(PoisonError::into_inner);
                // One round per member at most: a round whose choice is refused (its trial
                // claimed, or a cooldown started, since it was seen available) is redone.
                for _ in 0..count {
                    let mut total = 0;
                    let mut best: Option<usize> = None;
                    for (position, &index) in self.members.iter().enumerate() {
                        if skip(index) || !backends[index].is_available(|| now.get()) {
                            continue;
                        }
                        current[position] += weights[position];
                        total += weights[position];
                        if best.is_none_or(|best| current[position] > current[best]) {
                            best = Some(position);
                        }
                    }
                    let best = best?;
                    current[best] -= total;
                    if let Some(picked) = admit(self.members[best]) {
                        return Some(picked);
                    }
                }
                None
            }
        }
    }

    /// Picks the member after backend `last` that takes the request (round-robin from it), if
    /// `last` is a member; else as [`Tier::pick`] does; among those for which `skip` is false.
    pub(crate) fn pick_after(
        &self,
        backends: &[BackendHealth],
        now: &LazyNow<'_>,
        last: usize,
        skip: impl Fn(usize) -> bool,
    ) -> Option<(usize, bool)> {
        let Some(position) = self.members.iter().position(|&i| i == last) else {
            return self.pick(backends, now, skip);
        };
        let count = self.members.len();
        (1..=count)
            .map(|step| self.members[(position + step) % count])
            .filter(|&i| !skip(i))
            .find_map(|index| admit(backends, now, index))
    }

    pub(crate) fn members(&self) -> &[usize] {
        &self.members
    }
}

/// Whether backend `index` takes the request (see [`BackendHealth::admit`]): its index and
/// whether the request is its trial.
fn admit(backends: &[BackendHealth], now: &LazyNow<'_>, index: usize) -> Option<(usize, bool)> {
    match backends[index].admit(|| now.get()) {
        Admission::Available => Some((index, false)),
        Admission::Trial => Some((index, true)),
        Admission::Refused => None,
    }
}

impl fmt::Debug for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tier")
            .field("priority", &self.priority)
            .field("members", &self.members)
            .field(
                "rotation",
                &match self.rotation {
                    Rotation::RoundRobin(_) => "round-robin",
                    Rotation::Weighted { .. } => "weighted",
                },
            )
            .finish()
    }
}
