//! The core's locks and scheduling points. Normal builds use parking_lot and compile the
//! scheduling points away; with the `shuttle` feature every lock is shuttle's and every access
//! to shared page-table memory is a point where shuttle may switch threads, so its model
//! checker explores the interleavings of the real MMU code (tests/shuttle.rs).

#[cfg(not(feature = "shuttle"))]
pub use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(feature = "shuttle")]
pub use model::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A point where another thread may run: before each read or write of a shared SPTE.
#[inline(always)]
pub fn yield_point() {
    #[cfg(feature = "shuttle")]
    shuttle::thread::yield_now();
}

/// One turn of a wait for another thread's progress (a FROZEN entry being published).
#[inline(always)]
pub fn spin_wait() {
    #[cfg(feature = "shuttle")]
    shuttle::thread::yield_now();
    #[cfg(not(feature = "shuttle"))]
    std::hint::spin_loop();
}

#[cfg(feature = "shuttle")]
mod model {
    //! shuttle's locks behind parking_lot's API (no poisoning: a panic ends the test anyway).

    pub type MutexGuard<'a, T> = shuttle::sync::MutexGuard<'a, T>;
    pub type RwLockReadGuard<'a, T> = shuttle::sync::RwLockReadGuard<'a, T>;
    pub type RwLockWriteGuard<'a, T> = shuttle::sync::RwLockWriteGuard<'a, T>;

    #[derive(Debug, Default)]
    pub struct Mutex<T>(shuttle::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(v: T) -> Self {
            Self(shuttle::sync::Mutex::new(v))
        }
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().expect("poisoned")
        }
    }

    #[derive(Debug, Default)]
    pub struct RwLock<T>(shuttle::sync::RwLock<T>);

    impl<T> RwLock<T> {
        pub fn new(v: T) -> Self {
            Self(shuttle::sync::RwLock::new(v))
        }
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().expect("poisoned")
        }
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().expect("poisoned")
        }
    }
}
