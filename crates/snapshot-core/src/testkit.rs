//! What the state machines' tests share: failure injection into recording fakes, simulated
//! kills, and a poller for futures that wait on nothing but a fake clock.

use crate::error::{Error, Result};
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// What the fake does at its armed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inject {
    /// Fails without effect.
    Fail,
    /// Acts, then never answers.
    HangAfterEffect,
    /// virt-snap dies before the effect (after the step's journal record).
    KillBefore,
    /// virt-snap dies after the effect, before the step is marked done.
    KillAfter,
}

/// The panic payload of a simulated kill (raised with `resume_unwind`: no panic message).
pub(crate) struct Killed;

/// The injection counters a fake's state keeps.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Every call, forward and undo.
    pub calls: u64,
    effects: usize,
    inject: Option<(usize, Inject)>,
}

impl Faults {
    /// Injects `how` at forward effect call `at` (counted from now).
    pub fn arm(&mut self, at: usize, how: Inject) {
        self.effects = 0;
        self.inject = Some((at, how));
    }

    /// No more injection.
    pub fn disarm(&mut self) {
        self.inject = None;
    }

    /// A forward effect call: what to inject, if this is the armed call.
    pub fn hit(&mut self) -> Option<Inject> {
        self.calls += 1;
        let n = self.effects;
        self.effects += 1;
        match self.inject {
            Some((at, how)) if at == n => {
                self.inject = None;
                Some(how)
            }
            _ => None,
        }
    }
}

/// A fake's state behind a mutex, with its [`Faults`].
pub(crate) trait Faulty: Send + Sync {
    /// The state.
    type State;
    /// Its mutex.
    fn mutex(&self) -> &Mutex<Self::State>;
    /// Its faults.
    fn faults(s: &mut Self::State) -> &mut Faults;

    /// The state, locked.
    fn st(&self) -> MutexGuard<'_, Self::State> {
        self.mutex().lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An undo call (counted, never injected).
    fn undo_call(&self) {
        Self::faults(&mut self.st()).calls += 1;
    }

    /// Runs forward effect `f` with injection.
    #[allow(async_fn_in_trait)]
    async fn effect<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Self::State) -> Result<T>,
    ) -> Result<T> {
        let hit = Self::faults(&mut self.st()).hit();
        match hit {
            None => f(&mut self.st()),
            Some(Inject::Fail) => Err(Error::backend(what, "injected failure")),
            Some(Inject::KillBefore) => std::panic::resume_unwind(Box::new(Killed)),
            Some(Inject::KillAfter) => {
                let _ = f(&mut self.st());
                std::panic::resume_unwind(Box::new(Killed))
            }
            Some(Inject::HangAfterEffect) => {
                let _ = f(&mut self.st());
                std::future::pending().await
            }
        }
    }
}

/// Polls `f` to completion; the fakes never wait on anything but the clock.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future never completed");
}

/// A fake of the pool volumes of `snapshot='storage'` disks: each volume's current data and
/// its volume snapshots' data by name, with the backends' rules (a snapshot name is taken
/// once, a revert keeps the snapshot, deleting a missing snapshot succeeds). A fake calls
/// these inside [`Faulty::effect`] for failure injection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct FakeVolumes(pub std::collections::BTreeMap<String, FakeVolume>);

/// One fake pool volume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct FakeVolume {
    /// Its current data.
    pub data: String,
    /// Its volume snapshots' data, by name.
    pub snaps: std::collections::BTreeMap<String, String>,
}

impl FakeVolumes {
    fn key(v: &crate::capture::PoolVolume) -> String {
        format!("{}/{}", v.pool, v.volume)
    }

    /// The volume `pool/volume`, if there is one.
    pub fn get(&self, pool: &str, volume: &str) -> Option<&FakeVolume> {
        self.0.get(&format!("{pool}/{volume}"))
    }

    fn vol(&mut self, v: &crate::capture::PoolVolume) -> Result<&mut FakeVolume> {
        self.0
            .get_mut(&Self::key(v))
            .ok_or_else(|| Error::backend(&v.volume, "no such volume"))
    }

    /// Volume snapshot `name` of the volume's current data (refused if the name is taken).
    pub fn snapshot(&mut self, v: &crate::capture::PoolVolume, name: &str) -> Result<()> {
        let vol = self.vol(v)?;
        if vol.snaps.contains_key(name) {
            return Err(Error::backend(name, "volume snapshot exists"));
        }
        let data = vol.data.clone();
        vol.snaps.insert(name.into(), data);
        Ok(())
    }

    /// The volume's data that of its snapshot `name` again (the snapshot kept).
    pub fn revert(&mut self, v: &crate::capture::PoolVolume, name: &str) -> Result<()> {
        let vol = self.vol(v)?;
        let data = vol
            .snaps
            .get(name)
            .cloned()
            .ok_or_else(|| Error::backend(name, "no such volume snapshot"))?;
        vol.data = data;
        Ok(())
    }

    /// Deletes snapshot `name`; missing is success.
    pub fn delete_snapshot(&mut self, v: &crate::capture::PoolVolume, name: &str) -> Result<()> {
        self.vol(v)?.snaps.remove(name);
        Ok(())
    }
}
