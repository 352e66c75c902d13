//! Priority tiers and the rotation within each: plain round-robin when every backend of the
//! tier has the same weight, else smooth weighted round-robin; one rotation for requests for
//! any deployment and one for each deployment, as quotas are per deployment.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use crate::Deployment;
use crate::health::{Admission, BackendHealth, LazyNow};

/// How many deployments a tier keeps a rotation for. Deployment names come from callers; past
/// this many, the rotations start over (each deployment's next request goes to the tier's
/// first member that takes it) rather than grow.
const MAX_DEPLOYMENT_ROTATIONS: usize = 1024;

/// The backends of one priority, in the order they were given.
pub(crate) struct Tier {
    pub(crate) priority: u32,
    /// Indices into the balance's backends.
    members: Box<[usize]>,
    /// Each member's weight; `None` when they all weigh the same (plain round-robin).
    weights: Option<Box<[i64]>>,
    rotations: Mutex<Rotations>,
}

/// Where the tier's rotations stand: for requests for any deployment, and for each deployment
/// named by a request. Requests for two deployments sent in turn (an embedding, then a chat
/// completion) would otherwise each land on every other backend only.
#[derive(Default)]
struct Rotations {
    any: Rotation,
    by_deployment: HashMap<Deployment, Rotation>,
}

/// One rotation's state.
#[derive(Default)]
struct Rotation {
    /// Plain round-robin: the position the next pick starts at.
    next: usize,
    /// Weighted: nginx's smooth weighted round-robin, each member's current value (empty until
    /// the first pick). Each pick adds each candidate's weight to its current value, takes the
    /// candidate with the largest, and subtracts the candidates' total weight from it. Weights
    /// 3 and 1 give a a b a, a a b a, ...
    current: Vec<i64>,
}

impl Rotations {
    /// The rotation for requests for `deployment` (any, when `None`).
    fn for_deployment(&mut self, deployment: Option<&Deployment>) -> &mut Rotation {
        let Some(deployment) = deployment else {
            return &mut self.any;
        };
        if self.by_deployment.len() >= MAX_DEPLOYMENT_ROTATIONS
            && !self.by_deployment.contains_key(deployment)
        {
            self.by_deployment.clear();
        }
        self.by_deployment.entry(deployment.clone()).or_default()
    }
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
                Tier {
                    priority,
                    members,
                    weights: (!weights.windows(2).all(|w| w[0] == w[1])).then_some(weights),
                    rotations: Mutex::default(),
                }
            })
            .collect()
    }

    /// Picks the member that takes this request, in the tier's rotation for `deployment`,
    /// among those for which `skip` is false; claims its trial if it is on trial. Returns its
    /// index and whether the request is its trial.
    pub(crate) fn pick(
        &self,
        backends: &[BackendHealth],
        now: &LazyNow<'_>,
        deployment: Option<&Deployment>,
        skip: impl Fn(usize) -> bool,
    ) -> Option<(usize, bool)> {
        let admit = |index: usize| admit(backends, now, index);
        let count = self.members.len();
        let mut rotations = self
            .rotations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let rotation = rotations.for_deployment(deployment);
        let Some(weights) = &self.weights else {
            let start = rotation.next % count;
            rotation.next = start + 1;
            drop(rotations);
            return (0..count)
                .map(|step| self.members[(start + step) % count])
                .filter(|&i| !skip(i))
                .find_map(admit);
        };
        let current = &mut rotation.current;
        current.resize(count, 0);
        // One round per member at most: a round whose choice is refused (its trial claimed, or
        // a cooldown started, since it was seen available) is redone.
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

    /// Picks the member after backend `last` that takes the request (round-robin from it), if
    /// `last` is a member; else as [`Tier::pick`] does; among those for which `skip` is false.
    pub(crate) fn pick_after(
        &self,
        backends: &[BackendHealth],
        now: &LazyNow<'_>,
        deployment: Option<&Deployment>,
        last: usize,
        skip: impl Fn(usize) -> bool,
    ) -> Option<(usize, bool)> {
        let Some(position) = self.members.iter().position(|&i| i == last) else {
            return self.pick(backends, now, deployment, skip);
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
                &if self.weights.is_some() {
                    "weighted"
                } else {
                    "round-robin"
                },
            )
            .finish()
    }
}
